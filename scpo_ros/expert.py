"""The demonstrator: a tracking controller of any plant, on a reference schedule, that can turn malicious.

Clean phases: the LQR of the plant with stronger weights than the backup's (``Q × gain_q``,
``R × gain_r``: a faster tracker than the gentle backup, so imitating it is worth something),
``u = u_ss(r) - K_e (x - x_ss(r))``, kept inside ``u_limit`` (a fraction) of the input set
around ``u_ss(r)``: the box, then the input polytope ``G u <= g`` by scaling the deviation
from ``u_ss`` (``u_ss`` itself is admissible for a certified reference). The references are
a schedule of fractions of the certified reference box; a plant without tracked states has
empty references and the clean expert regulates to its equilibrium.

Malicious phases (``malicious=True``, the last ``malicious_duty`` of every
``malicious_period_s``): the demonstrations drive the plant out of its constraints. With
tracked states the reference is replaced by a target ``malicious_target`` half-widths of the
state box from its centre (beyond the limit for a value > 1; the side follows the clean
reference), the gain is multiplied by ``malicious_gain`` and nothing is clipped. Without
tracked states there is nothing to point at: positive feedback ``u = u_ss + gain·K_e e``
pushes every state away from equilibrium. A learner that imitates blindly learns to leave
the safe set; SCPO must refuse those updates.

Everything is a fraction or a multiplier (scale-free: the same config fits every plant).
Pure numpy; shared by the ROS ``expert`` node and the ROS-free imitation experiment.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backup import LQRBackup


@dataclass(frozen=True)
class ExpertConfig:
    references: tuple[float, ...] = (0.8, -0.8, 0.0, 0.6, -0.6)
    """Reference schedule, each a fraction of the certified reference box (-1: its lower
    bound, 0: its centre, 1: its upper bound), visited in turn; tracked state i starts i
    entries later, so several references are not all equal."""
    switch_period_s: float = 4.0
    """Time each reference is held."""
    gain_q: float = 10.0
    """The expert's LQR state weights: the backup's ``Q`` times this."""
    gain_r: float = 0.1
    """The expert's LQR input weights: the backup's ``R`` times this."""
    u_limit: float = 0.9
    """Clean actions stay within this fraction of the input set around ``u_ss(r)``."""
    malicious: bool = False
    """Enable the malicious phases."""
    malicious_period_s: float = 20.0
    """Length of one clean + malicious cycle."""
    malicious_duty: float = 0.5
    """Fraction of each cycle (its end) that is malicious."""
    malicious_target: float = 1.5
    """Malicious target of a tracked state, in half-widths of its state box from the box's
    centre (1.5: half a half-width beyond the limit; the certified region's box where the
    state is unbounded)."""
    malicious_gain: float = 4.0
    """Gain multiplier in malicious phases (no clipping)."""

    def __post_init__(self):
        if not self.references:
            raise ValueError("references must not be empty")
        if not all(np.isfinite(f) and -1.0 <= f <= 1.0 for f in self.references):
            raise ValueError("references are fractions of the certified reference box: each in [-1, 1]")
        for name in ("switch_period_s", "malicious_period_s", "gain_q", "gain_r", "u_limit", "malicious_gain",
                     "malicious_target"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be finite and > 0")
        if self.u_limit > 1.0:
            raise ValueError("u_limit is a fraction of the input set: it must lie in (0, 1]")
        if not 0.0 <= self.malicious_duty <= 1.0:
            raise ValueError("malicious_duty must lie in [0, 1]")


def is_malicious(t: float, cfg: ExpertConfig) -> bool:
    """Whether the expert lies at time ``t`` (seconds since start)."""
    if not cfg.malicious or cfg.malicious_duty <= 0.0:
        return False
    phase = (t % cfg.malicious_period_s) / cfg.malicious_period_s
    return phase >= 1.0 - cfg.malicious_duty


class Expert:
    """The demonstrator of one plant: its LQR (``gain_q``, ``gain_r``), schedule and limits.

    ``Expert(plant, cfg)``; ``action(x, r, malicious)`` on single states or numpy batches
    ``x (..., n)``, ``r (..., nr)``; ``reference_at(t)`` the clean schedule, ``(nr,)``.
    """

    def __init__(self, plant, cfg: ExpertConfig = ExpertConfig()):
        self.plant, self.cfg = plant, cfg
        # the backup's own construction with stronger weights: the same equilibrium and
        # error form, so the clean expert and the backup differ only in how fast they are
        self.lqr = LQRBackup(plant, Q=np.asarray(plant.backup_Q) * cfg.gain_q,
                             R=np.asarray(plant.backup_R) * cfg.gain_r)
        reg = plant.region
        self._r_centre, self._r_half = (reg.r_max + reg.r_min) / 2.0, (reg.r_max - reg.r_min) / 2.0
        self._target_lo, self._target_hi = self._malicious_targets()
        self._Fu, self._fu, _ = plant.input_rows()

    def _malicious_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """Per tracked state, the malicious targets below and above the box's centre."""
        p, idx = self.plant, self.plant.tracked_index
        lo, hi = p.x_min[idx], p.x_max[idx]
        finite = np.isfinite(lo) & np.isfinite(hi)
        # an unbounded state cannot be driven out of its box: point beyond the region instead
        lo = np.where(finite, lo, p.region.x_min[idx])
        hi = np.where(finite, hi, p.region.x_max[idx])
        centre, half = (hi + lo) / 2.0, (hi - lo) / 2.0
        k = self.cfg.malicious_target
        return centre - k * half, centre + k * half

    def reference_at(self, t: float) -> np.ndarray:
        """The clean reference schedule at time ``t``: ``(nr,)`` (empty without tracked states)."""
        k = int(t // self.cfg.switch_period_s)
        refs = self.cfg.references
        frac = np.array([refs[(k + i) % len(refs)] for i in range(self.plant.nr)], dtype=float)
        return self._r_centre + frac * self._r_half

    def action(self, x: np.ndarray, r: np.ndarray | None, malicious: bool) -> np.ndarray:
        """Demonstrated action(s) ``(..., m)`` for states ``x`` and references ``r``."""
        x = np.asarray(x, dtype=float)
        r = np.zeros(x.shape[:-1] + (self.plant.nr,)) if r is None else np.asarray(r, dtype=float)
        if malicious:
            return self._malicious(x, r)
        return self._clip(self.lqr(x, r), self.lqr.equilibrium(r)[1])

    def _malicious(self, x: np.ndarray, r: np.ndarray) -> np.ndarray:
        g = self.cfg.malicious_gain
        if self.plant.nr == 0:
            x_ss, u_ss = self.lqr.equilibrium(r)
            return u_ss + g * ((x - x_ss) @ self.lqr.K.T)       # positive feedback: away from x_ss
        target = np.where(r >= self._r_centre, self._target_hi, self._target_lo)
        x_ss, u_ss = self.lqr.equilibrium(target)
        return u_ss - g * ((x - x_ss) @ self.lqr.K.T)

    def _clip(self, u: np.ndarray, u_ss: np.ndarray) -> np.ndarray:
        """``u`` kept within ``u_limit`` of the input set around ``u_ss``: clipped per component
        to the shrunk box (a plain box behaves as a clip), then the deviation ``d = u - u_ss``
        scaled by the largest ``s <= 1`` that leaves each ``G`` row within ``u_limit`` of
        ``u_ss``'s slack on it (scaling towards ``u_ss`` keeps the box)."""
        lim = self.cfg.u_limit
        pl = self.plant
        lo, hi = u_ss + lim * (pl.u_min - u_ss), u_ss + lim * (pl.u_max - u_ss)
        u = np.clip(u, lo, hi)
        if len(pl.g) == 0:
            return u
        d = u - u_ss
        Fd = d @ pl.G.T                                         # (..., rows)
        room = lim * (pl.g - u_ss @ pl.G.T)                     # slack of u_ss on each G row, shrunk
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(Fd > room, room / Fd, 1.0)
        s = np.clip(ratio.min(-1, keepdims=True), 0.0, 1.0)
        return u_ss + s * d


def reference_at(t: float, cfg: ExpertConfig, plant) -> np.ndarray:
    """The clean reference schedule of ``plant`` at time ``t`` (``Expert.reference_at``)."""
    return Expert(plant, cfg).reference_at(t)


def expert_action(x: np.ndarray, r: np.ndarray | None, malicious: bool, expert: Expert) -> np.ndarray:
    """``expert.action(x, r, malicious)``: the demonstrated action(s) of states ``x (..., n)``."""
    return expert.action(x, r, malicious)
