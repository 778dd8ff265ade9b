"""The safety node's control law, ROS-free: ``u = backup(x, r) + φ_θ([x, r])`` folded into a
few numpy calls (``FoldedPolicy``), the certified region it may act in (``ControlLaw``,
``make_law``), who acts (``select``), the command buffer it writes into (``command_view``),
the stale-state hold (``HoldPredictor``), the ``control`` diagnostic (``control_status``,
``ControlCounts``), and
for both controller nodes the control path's compute times (``ComputeTimes``) and when the
plant is at rest (``RestDetector``, the shutdown hold).

What the control path of ``nodes/scpo_safety_node`` evaluates on every state; the law is
replaced as a whole (one attribute assignment) when SCPO commits new weights or the model
changes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from .graph import (
    LABEL_POLICY,
    LEVEL_ERROR,
    LEVEL_OK,
    LEVEL_WARN,
    MODE_BACKUP_RECERTIFYING,
    MODE_BACKUP_REGION,
    MODE_HOLD_STALE,
    MODE_INACTIVE,
    MODE_POLICY,
    MODE_RETURNING,
    MODE_WAITING_FOR_CERTIFICATE,
    MODE_WAITING_FOR_STATE,
    mode_level,
    mode_text,
)
from .policy import MLPLayout, fold_residual_policy

if TYPE_CHECKING:
    from .envelope import CommandEnvelope, EnvelopeResult
    from .safety_model import Model


class FoldedPolicy:
    """``u = backup(x, r) + φ_θ([x, r])`` for one input, in as few numpy calls as possible.

    The matrices are ``policy.fold_residual_policy``'s on the augmented input
    ``z = [x, r, 1]``: every bias a column, the backup (``LQRBackup.input_gain``, an affine map
    ``(m, n + nr + 1)`` whose last column, the constant part of ``u_ss``, meets the 1) carried
    through every layer beside the activations and added by the last one. A layer therefore
    costs one product and one tanh, and the whole law ``2 L - 1`` numpy calls. At 100 Hz
    each callback starts with cold caches, where the number of numpy calls, not the
    arithmetic, sets the time (measured: ~150 µs for a plain numpy version vs ~15 µs when
    called back to back). Every buffer is preallocated; the caller owns ``z`` and ``out``.
    """

    def __init__(self, base_gain: np.ndarray, layout: MLPLayout | None, theta: np.ndarray | None):
        """``base_gain``: ``(m, n + nr + 1)`` (``LQRBackup.input_gain``: affine) or ``(m, n + nr)``
        (linear); ``layout``/``theta``: the residual (None: the backup alone)."""
        gain = np.asarray(base_gain, dtype=np.float64)
        d_out = gain.shape[0]
        in_dim = layout.in_dim if layout is not None else gain.shape[1] - 1
        if gain.shape[1] not in (in_dim, in_dim + 1):
            raise ValueError(f"base gain {gain.shape} does not fit inputs of size {in_dim} (+ 1 constant)")
        affine = gain.shape[1] == in_dim + 1
        mats = fold_residual_policy(gain[:, :in_dim] if affine else gain, layout, theta)
        if affine:
            # fold_residual_policy takes the linear part; the constant column meets the 1 of
            # ``z_in`` in the rows of the first matrix that carry the backup's action (its last
            # ``m`` rows; with a single affine matrix, all of them)
            mats[0] = mats[0].copy()
            mats[0][-d_out:, -1] += gain[:, -1]
        self.d = d = mats[-1].shape[0]
        self.first = mats[0]
        self._last = None if len(mats) == 1 else mats[-1]   # None: the law is the single affine map ``first``
        hidden = mats[:-1]
        bufs = [np.zeros(M.shape[0]) for M in hidden]
        acts = [buf[:buf.size - 1 - d] for buf in bufs]               # the tanh part of each
        self._steps = list(zip(hidden, bufs, acts, strict=True))

    def __call__(self, z_in: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``z_in = [x, r, 1]`` (length ``n + nr + 1``) -> the command (``m``), written into ``out``."""
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
    envelope's fallback alone); its region is the certified box of ``[x, r]``
    (``model.plant.region``: ``lower``/``upper`` are its corners, ``n + nr`` entries each)."""
    region = model.plant.region
    policy = FoldedPolicy(model.backup.input_gain(), model.layout, theta) if theta is not None else None
    return ControlLaw(policy, tuple(float(v) for v in region.lower), tuple(float(v) for v in region.upper), version,
                      certifying)


IMMEDIATE_MODES = (MODE_POLICY, MODE_WAITING_FOR_STATE, MODE_WAITING_FOR_CERTIFICATE)
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
        return MODE_POLICY, qualifying
    return (MODE_BACKUP_RECERTIFYING if law.certifying else MODE_BACKUP_REGION if not in_region else
            MODE_WAITING_FOR_CERTIFICATE if law.policy is None else MODE_RETURNING), qualifying


HOLD_MODES = ("backup_predicted", "zero")
"""The hold candidate on stale state (``hold_mode``): the fallback on the predicted state, or zero."""


class HoldPredictor:
    """Dead reckoning on stale state: the state the nominal model predicts under the fallback.

    ``start(x, now)`` when the state goes stale (``x`` the last accepted state); every
    ``command(now, ...)`` then advances the model to the present, one ``plant.step`` per
    ``plant.dt`` elapsed since ``start``, each under the envelope's fallback for the
    predicted state, and returns the hold command for that state: the envelope's fallback
    (``backup_predicted``) or its filter of a zero candidate (``zero``). The plant, the
    envelope and ``r`` are passed on every call: a model change or a new reference during
    the hold applies from the next step on.
    """

    def __init__(self):
        self.x: np.ndarray | None = None
        self.since = 0.0
        self.steps = 0

    def start(self, x: np.ndarray, now: float) -> None:
        self.x = np.array(x, dtype=np.float64)
        self.since = now
        self.steps = 0

    def advance(self, now: float, plant, envelope: CommandEnvelope, r: np.ndarray) -> np.ndarray:
        """The predicted state at ``now``."""
        target = int((now - self.since) / plant.dt)
        while self.steps < target:
            self.x = plant.step(self.x, envelope.fallback(self.x, r, MODE_HOLD_STALE).u)
            self.steps += 1
        return self.x

    def command(self, now: float, plant, envelope: CommandEnvelope, r: np.ndarray,
                hold_mode: str) -> EnvelopeResult:
        """The hold command at ``now`` (``hold_mode`` one of ``HOLD_MODES``)."""
        x = self.advance(now, plant, envelope, r)
        if hold_mode == "zero":
            return envelope.filter(x, np.zeros(plant.m), r)
        return envelope.fallback(x, r, MODE_HOLD_STALE)


UNCONFIGURED = "unconfigured"
"""The reason the ``control`` diagnostic gives while the node is not configured."""


def control_status(mode: str, params, reason: str = "", dt_measured: float | None = None,
                   policy_interventions: int = 0, dt: float | None = None) -> tuple[int, str]:
    """The ``control`` diagnostic's ``(level, text)``: the mode's (``graph.SAFETY_MODE_TABLE``,
    ``params`` the node's parameter values), WARN where the policy acts on a state period
    ``dt_measured`` more than 25 % off the plant's ``dt``, ERROR once the envelope has changed
    a certified policy command."""
    text = f"{UNCONFIGURED}: {params['inactive_behavior']}" if mode == MODE_INACTIVE and reason == UNCONFIGURED \
        else mode_text(mode, params)
    level = mode_level(mode)
    off_period = dt is not None and dt_measured is not None and not abs(dt_measured - dt) <= 0.25 * dt
    if mode == MODE_POLICY and off_period and level == LEVEL_OK:
        level = LEVEL_WARN
        text += f"; state period {dt_measured:.4f} s differs from the model dt {dt:g} s"
    if policy_interventions:
        level = LEVEL_ERROR
        text += f"; ENVELOPE CHANGED {policy_interventions} CERTIFIED-POLICY COMMANDS"
    return level, text


@dataclass
class ControlCounts:
    """The safety node's command counts (its ``control`` diagnostic and SUMMARY line)."""

    control_steps: int = 0
    backup_steps: int = 0
    hold_commands: int = 0
    fallbacks: int = 0
    """Entries into a fallback mode (``graph.FALLBACK_MODES``)."""
    policy_interventions: int = 0
    """Certified-policy commands the envelope changed (the certificate should make this 0)."""
    envelope_changes: int = 0
    """Commands the envelope changed: every policy intervention, and fallbacks it moved by more
    than its ``change_tol`` or had to recover."""
    recovery_commands: int = 0
    """Commands with a next-state violation: the state was outside the recoverable set."""
    inactive_commands: int = 0
    shutdown_commands: int = 0

    def command(self, label: str, res: EnvelopeResult, change_tol: float) -> bool:
        """Count the envelope's part in a command sent with ``label``; True for a recovery action."""
        if res.changed and label != LABEL_POLICY:
            self.envelope_changes += res.distance > change_tol or res.violation > 0.0
        if res.violation > 0.0:
            self.recovery_commands += 1
            return True
        return False

    def policy_changed(self) -> int:
        """Count a certified-policy command the envelope changed; the number so far."""
        self.policy_interventions += 1
        self.envelope_changes += 1
        return self.policy_interventions

    def diag_values(self) -> dict:
        """The counts of the ``control`` diagnostic (all but ``shutdown_commands``)."""
        values = asdict(self)
        del values["shutdown_commands"]
        return values


class ComputeTimes:
    """The last ``capacity`` compute times of a control path (µs, a ring buffer): their
    median and 99th percentile for the diagnostics and the SUMMARY line of both controller
    nodes. ``add`` writes one float into a preallocated array (no allocation)."""

    def __init__(self, capacity: int = 4096):
        self._buf = np.zeros(int(capacity))
        self.count = 0

    def add(self, us: float) -> None:
        self._buf[self.count % self._buf.size] = us
        self.count += 1

    def values(self) -> np.ndarray:
        """The times held (at most ``capacity``, the newest), in no particular order."""
        return self._buf[:min(self.count, self._buf.size)]

    def stats(self, empty: float | None = None) -> dict:
        """``{"median": ..., "p99": ...}`` of the times held; ``empty`` for both when there are none."""
        v = self.values()
        if not v.size:
            return {"median": empty, "p99": empty}
        return {"median": float(np.median(v)), "p99": float(np.percentile(v, 99))}


class RestDetector:
    """The plant is at rest: no state moves faster than ``speed`` (a fraction of its scale per
    second: ``|x_k - x_{k-1}| / dt < speed × scale`` on every entry) for ``states`` accepted
    states in a row (the controllers' shutdown hold stops sending then). ``scale``: per state,
    e.g. the certified region's half-widths (``for_plant``)."""

    def __init__(self, scale, dt: float, speed: float = 2e-2, states: int = 5):
        self.threshold = [float(s) * speed * dt for s in np.atleast_1d(np.asarray(scale, dtype=float))]
        self.speed, self.states = speed, states
        self.count = 0
        self._last: list[float] | None = None

    @classmethod
    def for_plant(cls, plant, **kwargs) -> RestDetector:
        """Scaled by the certified region's half-widths, at the plant's ``dt``."""
        return cls((plant.region.x_max - plant.region.x_min) / 2.0, plant.dt, **kwargs)

    def update(self, x) -> None:
        """One accepted state (any sequence of floats, the state vector)."""
        last, self._last = self._last, [float(v) for v in x]
        moving = last is None or any(abs(a - b) >= t for a, b, t in zip(self._last, last, self.threshold))
        self.count = 0 if moving else self.count + 1

    def restart(self) -> None:
        """Count again from the next state (the shutdown hold starts)."""
        self.count = 0

    @property
    def at_rest(self) -> bool:
        return self.count >= self.states
