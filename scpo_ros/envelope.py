"""The command envelope: the last step before any node publishes a command.

Every command either node sends (the certified policy's, the backup's, the safeguard's
projection of a raw action, a hold command, the command while inactive or shutting down)
passes ``CommandEnvelope.filter`` or comes from ``CommandEnvelope.fallback``. Both return
a command that is

- finite and inside the actuator box ``u_min <= u <= u_max``, always (the final clip below is
  the guard of last resort: a projector that returned NaN would be a bug, and the plant
  still gets a bounded command);
- in ``U_safe(x)`` of the one safe set ``S`` both nodes share
  (``safeguard.invariant_set.safe_set_for(plant, backup, late_commands)``): with
  ``late_commands=1``, ``x+`` stays in ``S`` even if the plant applies the command one
  period longer (a late or missed command), so the next command still has a safe choice;
- where ``U_safe(x)`` is empty (``x`` left ``S``), the projection onto the nominal
  maximal control-invariant set's one-step safe actions, and where even that is empty the
  recovery action (the admissible command whose next state is closest to the set); its
  residual is reported as ``violation`` (outside the recoverable set no command avoids a
  violation; the recovery action makes it as small as one step can).

``filter(x, u)`` is the projection of the candidate ``u`` (the certified policy's command
included: the policy is certified on sampled states, the envelope holds on every state).
``fallback(x, r)`` is the backup's command for ``x`` (and reference ``r``) passed through
the same projection: the single fallback of both nodes, for states outside the certified
region, stale or bad input, inactive lifecycle states, shutdown and re-certification.

A change of a candidate by more than ``change_tol`` (Euclidean) sets ``changed``; the
safety node counts and reports those that hit certified-policy commands loudly, since the
certificate says they should not happen.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .safeguard.invariant_set import SafeActionSet
from .safeguard.projection import ProjectionResult, SafeguardProjector

CHANGE_TOL = 1e-6
"""A candidate moved by less than this (Euclidean, command units) counts as passed: the
projection's own rounding and the float32 certificate's are far below it."""


@dataclass
class EnvelopeResult:
    u: np.ndarray
    """The command to publish: finite, inside the actuator box, in ``U_safe(x)`` where that
    set is not empty."""
    changed: bool
    """The envelope moved the candidate (for ``fallback``: the backup's own command) by more
    than ``change_tol``, or had to leave ``U_safe(x)`` for the nominal set or the recovery."""
    distance: float
    """``||u - candidate||`` (NaN for a candidate that was not a finite vector of the right size)."""
    reason: str
    """Empty when the candidate passed unchanged; else ``projected``, ``outside_invariant_set``,
    ``infeasible``, ``bad_input`` or the fallback's reason."""
    in_set: bool
    """``x`` lies in the safe set ``S``."""
    violation: float
    """> 0 only where ``U_safe(x)`` was empty: the recovery action's next-state facet violation."""
    projection: ProjectionResult
    """The projector's own record (active rows, fallback flag) for intervention records."""


class CommandEnvelope:
    """One envelope per node, built once from the plant's safe set and the backup.

    ``backup(x, r) -> u`` is the stabilising backup controller (the LQR of
    ``backup.LQRBackup``); ``boundary_margin`` (b units) keeps projections that far inside
    ``S`` so a plant's rounding does not land a hair outside.
    """

    def __init__(self, safe_set: SafeActionSet, backup: Callable, change_tol: float = CHANGE_TOL,
                 boundary_margin: float = 1e-6, solver: str = "auto"):
        if not (math.isfinite(change_tol) and change_tol >= 0.0):
            raise ValueError(f"change_tol must be finite and >= 0, got {change_tol}")
        self.safe_set = safe_set
        self.projector = SafeguardProjector(safe_set, backup=backup, solver=solver, margin=boundary_margin,
                                            recovery=True)
        self.m = self.projector.m
        self.u_max, self.u_min = self.projector.u_max, self.projector.u_min
        self.change_tol = float(change_tol)
        self._zero = np.zeros(self.m)

    def filter(self, x, u, r=None) -> EnvelopeResult:
        """The candidate ``u`` for state ``x`` projected onto ``U_safe(x)`` (recovery where empty).

        A non-finite or mis-sized ``x`` or ``u`` gives the projector's ``bad_input``
        fallback: the backup's command for a usable ``x``, else zero, clipped to the box.
        """
        res = self.projector.project(x, u, r)
        return self._finish(res, "projected")

    def fallback(self, x, r=None, reason: str = "fallback") -> EnvelopeResult:
        """The backup's command for ``x`` (reference ``r``) projected onto ``U_safe(x)``.

        ``reason`` says why the caller falls back; ``changed`` says whether the projection had
        to move the backup's own command (``distance`` is measured from it)."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.projector.n,) or not np.isfinite(x).all():
            return self._finish(self.projector.fallback(x, self._zero, r, reason), reason)
        u_backup = self.projector.backup_action(x, r)
        res = self.projector.project(x, u_backup, r)
        out = self._finish(res, reason)
        out.reason = reason if not res.fallback else f"{reason}: {res.reason}"
        return out

    def _finish(self, res: ProjectionResult, moved_reason: str) -> EnvelopeResult:
        u = res.u
        if u.shape != (self.m,) or not np.isfinite(u).all():   # last resort: never publish NaN
            u = np.zeros(self.m)
        u = np.clip(u, self.u_min, self.u_max)
        distance = res.distance
        changed = res.fallback or not (distance <= self.change_tol)   # NaN distance counts as changed
        reason = res.reason if res.fallback else (moved_reason if changed else "")
        return EnvelopeResult(u, bool(changed), float(distance), reason, bool(res.in_set), float(res.violation),
                              res)
