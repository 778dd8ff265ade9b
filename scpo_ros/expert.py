"""The demonstrator: a PD tracking controller on a reference schedule that can turn malicious.

Clean phases: ``u = clip(kp (r - p) - kd v, ±u_limit)``, a faster tracker than the
gentle LQR backup (so imitating it is worth something) that stays inside the limits.
Malicious phases (``malicious=True``, the last ``malicious_duty`` of every
``malicious_period_s``): the demonstrations drive the plant out of its constraints:
the reference is replaced by ``malicious_target`` (beyond ``p_max``) and the gains are
multiplied by ``malicious_gain`` with no clipping. A learner that imitates blindly
learns to leave the safe set; SCPO must refuse those updates.

Pure numpy; shared by the ROS ``expert`` node and the ROS-free imitation experiment.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dynamics import DoubleIntegrator


@dataclass(frozen=True)
class ExpertConfig:
    references: tuple[float, ...] = (0.4, -0.4, 0.0, 0.3, -0.3)
    """Reference positions visited in turn (axis i starts i entries later)."""
    switch_period_s: float = 4.0
    """Time each reference is held."""
    kp: float = 1.0
    """Proportional gain of the clean expert."""
    kd: float = 1.5
    """Derivative gain of the clean expert."""
    u_limit: float = 0.9
    """Clean actions are clipped to ±u_limit (≤ u_max)."""
    malicious: bool = False
    """Enable the malicious phases."""
    malicious_period_s: float = 20.0
    """Length of one clean + malicious cycle."""
    malicious_duty: float = 0.5
    """Fraction of each cycle (its end) that is malicious."""
    malicious_target: float = 1.5
    """Reference the malicious expert drives to (sign follows the clean reference)."""
    malicious_gain: float = 4.0
    """Gain multiplier in malicious phases (no clipping)."""

    def __post_init__(self):
        if not self.references:
            raise ValueError("references must not be empty")
        for name in ("switch_period_s", "malicious_period_s", "kp", "kd", "u_limit", "malicious_gain"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be finite and > 0")
        if not 0.0 <= self.malicious_duty <= 1.0:
            raise ValueError("malicious_duty must lie in [0, 1]")


def is_malicious(t: float, cfg: ExpertConfig) -> bool:
    """Whether the expert lies at time ``t`` (seconds since start)."""
    if not cfg.malicious or cfg.malicious_duty <= 0.0:
        return False
    phase = (t % cfg.malicious_period_s) / cfg.malicious_period_s
    return phase >= 1.0 - cfg.malicious_duty


def reference_at(t: float, cfg: ExpertConfig, dof: int) -> np.ndarray:
    """The clean reference schedule, ``(dof,)``."""
    k = int(t // cfg.switch_period_s)
    n = len(cfg.references)
    return np.array([cfg.references[(k + i) % n] for i in range(dof)], dtype=float)


def expert_action(x: np.ndarray, r: np.ndarray, malicious: bool, cfg: ExpertConfig,
                  system: DoubleIntegrator) -> np.ndarray:
    """Demonstrated action(s) for states ``x (..., 2 dof)`` and references ``r (..., dof)``.

    Works on single states and on batches (numpy).
    """
    dof = system.dof
    p, v = x[..., :dof], x[..., dof:]
    if malicious:
        target = np.where(r >= 0.0, cfg.malicious_target, -cfg.malicious_target)
        return cfg.malicious_gain * (cfg.kp * (target - p) - cfg.kd * v)
    limit = min(cfg.u_limit, system.u_max)
    return np.clip(cfg.kp * (r - p) - cfg.kd * v, -limit, limit)
