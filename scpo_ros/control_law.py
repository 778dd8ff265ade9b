"""The safety node's control law, ROS-free: ``u = backup(x, r) + φ_θ([x, r])`` folded into a
few numpy calls (``FoldedPolicy``), the certified region it may act in (``ControlLaw``,
``make_law``) and the command buffer it writes into (``command_view``).

What the control path of ``nodes/scpo_safety_node`` evaluates on every state; replaced as a
whole (one attribute assignment) when SCPO commits new weights or the model changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .policy import MLPLayout, fold_residual_policy

if TYPE_CHECKING:
    from .safety_model import Model


class FoldedPolicy:
    """``u = backup(x, r) + φ_θ([x, r])`` for one input, in as few numpy calls as possible.

    The matrices are ``policy.fold_residual_policy``'s on the augmented input
    ``z = [x, r, 1]``: every bias a column, the backup (``LQRBackup.input_gain``) carried
    through every layer beside the activations and added by the last one. A layer therefore
    costs one product and one tanh, and the whole law ``2 L - 1`` numpy calls. At 100 Hz
    each callback starts with cold caches, where the number of numpy calls, not the
    arithmetic, sets the time (measured: ~150 µs for a plain numpy version vs ~15 µs when
    called back to back). Every buffer is preallocated; the caller owns ``z`` and ``out``.
    """

    def __init__(self, base_gain: np.ndarray, layout: MLPLayout | None, theta: np.ndarray | None):
        mats = fold_residual_policy(base_gain, layout, theta)
        self.d = d = mats[-1].shape[0]
        self.first = mats[0]
        self._last = None if len(mats) == 1 else mats[-1]   # None: the law is the single affine map ``first``
        hidden = mats[:-1]
        bufs = [np.zeros(M.shape[0]) for M in hidden]
        acts = [buf[:buf.size - 1 - d] for buf in bufs]               # the tanh part of each
        self._steps = list(zip(hidden, bufs, acts, strict=True))

    def __call__(self, z_in: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``z_in = [x, r, 1]`` (length ``3 dof + 1``) -> the command, written into ``out``."""
        if self._last is None:
            return np.dot(self.first, z_in, out=out)
        h = z_in
        for W, buf, act in self._steps:
            np.dot(W, h, out=buf)
            np.tanh(act, out=act)
            h = buf
        return np.dot(self._last, h, out=out)


def command_view(msg) -> np.ndarray:
    """A float64 numpy view on ``msg.data``'s own storage (an ``array.array('d')``, as in a
    ``std_msgs/Float64MultiArray``): writing the view writes the message.

    Checked once here (a rosidl whose getter returned a copy would otherwise publish stale
    commands silently).
    """
    view = np.frombuffer(msg.data, dtype=np.float64)
    view[:] = 1.0
    if list(msg.data) != [1.0] * view.size:
        raise RuntimeError("the message's data is not backed by the array its getter returns")
    view[:] = 0.0
    return view


@dataclass(frozen=True)
class ControlLaw:
    """What the control path evaluates; replaced as a whole, never mutated by others.

    ``policy`` computes ``backup + φ`` (certified weights), None while only the backup is
    certified; ``certifying`` marks the interval after a model change during which only the
    envelope's fallback may act. ``lower``/``upper``: the certified region of ``[x, r]``.
    """

    policy: FoldedPolicy | None
    lower: tuple
    upper: tuple
    version: int
    certifying: bool = False


def make_law(model: Model, theta: np.ndarray | None, version: int, certifying: bool = False) -> ControlLaw:
    """The law of ``model`` with certified weights ``theta`` (None: the backup's, i.e. the
    envelope's fallback alone); its region is the certified box of ``[x, r]``."""
    d = model.plant.system.dof
    s = model.plant.region
    upper = tuple([s.p0_max] * d + [s.v0_max] * d + [s.r_max] * d)
    policy = FoldedPolicy(model.backup.input_gain(), model.layout, theta) if theta is not None else None
    return ControlLaw(policy, tuple(-u for u in upper), upper, version, certifying)


IMMEDIATE_MODES = ("policy", "waiting_for_state", "waiting_for_certificate")
"""Modes from which a qualifying state hands the plant to the policy at once; from any other
(a fallback) it takes ``return_steps`` qualifying states in a row (hysteresis)."""


def select(law: ControlLaw, z: list, mode: str, qualifying: int, return_steps: int) -> tuple[str, int]:
    """Who acts on ``z = [x, r]`` (a list: the control path's cheapest form) under ``law``.

    Returns ``(mode, qualifying)``: ``mode`` is ``"policy"`` when the certified policy acts,
    else the fallback's reason (``backup_recertifying``, ``backup_region``,
    ``waiting_for_certificate``, ``returning``); ``qualifying`` counts the qualifying states
    in a row (the policy exists, is not re-certifying, and ``z`` is in the region). Leaving
    the policy is immediate; returning takes ``return_steps`` qualifying states.
    """
    in_region = True
    for v, lo, hi in zip(z, law.lower, law.upper, strict=True):
        if not (lo <= v <= hi):
            in_region = False
            break
    qualifies = law.policy is not None and in_region and not law.certifying
    qualifying = qualifying + 1 if qualifies else 0
    if qualifies and (mode in IMMEDIATE_MODES or qualifying >= return_steps):
        return "policy", qualifying
    return ("backup_recertifying" if law.certifying else "backup_region" if not in_region else
            "waiting_for_certificate" if law.policy is None else "returning"), qualifying
