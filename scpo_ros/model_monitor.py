"""The runtime model monitor: is the robot still the plant its certificates are about?

Every certificate (SCPO's rollouts, the safe sets) holds for the plant file's model *and the
uncertainty it declares* (``plant.Uncertainty``). The monitor checks that premise on every
measured transition: the one-step residual ``x_k - f(x_{k-1}, u)`` against the declared bound
at that state and input (``uncertainty.ModelBound``), per state,

    ratio_k = max_i |x_k - f(x_{k-1}, u)|_i / ((1 + tolerance) bound_i + floor_i),

with ``floor_i = floor × (range of state i over the certified region)``: rounding, and a
nominal plant (nothing declared) whose bound is 0. ``u`` is the command that was applied,
which the node does not know for sure: the simulator (and a drive) applies the newest
command it has, so the one sent for ``x_{k-1}`` or, when that one arrived late, the one sent
before it. The residual is taken for each candidate and the smallest kept: a late command
is not a model error.

A transition is *out of bounds* when ``ratio_k > 1``. The monitor *trips* when at least
``trip_count`` of the last ``window`` transitions were out of bounds (one glitch, an episode
reset, a single late packet is not a model error), and *clears* after ``clear_steps``
transitions in bounds in a row. Transitions whose stamps are not one period apart (a lost
message, a clock jump) are skipped, not judged; the period is the stream's measured one (a
simulator may run faster or slower than real time), else the plant's ``dt``. ``detection_delay`` is the number of
transitions from the first out-of-bounds one of the run that tripped it to the trip.

ROS-free; the safety node feeds it after each command is published (off the command's
latency) and, while it is tripped, commits no new weights and lets the envelope's fallback
(the robust safe set's projection of the backup) act.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .plant import Plant
from .uncertainty import ModelBound


@dataclass(frozen=True)
class MonitorSettings:
    tolerance: float = 0.25
    """The residual may exceed the declared bound by this fraction of it."""
    floor: float = 1e-4
    """Per state, as a fraction of its range over the certified region: rounding, and the
    whole bound of a plant that declares no uncertainty."""
    window: int = 10
    trip_count: int = 3
    clear_steps: int = 50
    period_tolerance: float = 0.5
    """A transition is judged only when its stamps are ``period (1 ± period_tolerance)`` apart."""

    def __post_init__(self):
        if not (np.isfinite(self.tolerance) and self.tolerance >= 0.0):
            raise ValueError(f"monitor tolerance must be >= 0, got {self.tolerance!r}")
        if not (np.isfinite(self.floor) and self.floor > 0.0):
            raise ValueError(f"monitor floor must be > 0, got {self.floor!r}")
        if not 1 <= self.trip_count <= self.window:
            raise ValueError(f"monitor trip_count must lie in [1, window = {self.window}], got {self.trip_count}")
        if self.clear_steps < 1:
            raise ValueError(f"monitor clear_steps must be >= 1, got {self.clear_steps}")


@dataclass
class MonitorCounts:
    transitions: int = 0
    out_of_bounds: int = 0
    skipped: int = 0
    trips: int = 0
    clears: int = 0
    max_ratio: float = 0.0
    last_ratio: float = 0.0
    detection_delay: int | None = None
    """Transitions from the first out-of-bounds one of the run that tripped the monitor to the
    trip (the last trip's)."""


class ModelMonitor:
    """The monitor of the module docstring for ``plant`` (its file's model and uncertainty)."""

    def __init__(self, plant: Plant, settings: MonitorSettings | None = None):
        self.plant = plant
        self.settings = settings or MonitorSettings()
        self.bound = ModelBound(plant)
        reg = plant.region
        self.floor = self.settings.floor * np.maximum(reg.x_max - reg.x_min, 1e-12)
        self.counts = MonitorCounts()
        self.tripped = False
        self._recent: deque[bool] = deque(maxlen=self.settings.window)
        self._run_start: int | None = None      # transition index of the current out-of-bounds run's first
        self._in_bounds_run = 0

    def ratio(self, x_prev: np.ndarray, candidates, x_now: np.ndarray) -> float:
        """``ratio_k`` of one transition: the smallest over the candidate commands."""
        tol = 1.0 + self.settings.tolerance
        best = np.inf
        for u in candidates:
            res = np.abs(x_now - np.asarray(self.plant.step(x_prev, u), dtype=float))
            r = float(np.max(res / (tol * self.bound.at(x_prev, u) + self.floor)))
            best = min(best, r)
        return best if np.isfinite(best) else np.inf

    def observe(self, x_prev: np.ndarray, candidates, x_now: np.ndarray, period_s: float | None = None,
                expected_s: float | None = None) -> bool | None:
        """Judge the transition ``x_prev -> x_now`` under one of ``candidates`` (the commands that may
        have been applied; none: skipped), ``period_s`` apart (None: unknown, judged) where one
        period is ``expected_s`` (None: the plant's ``dt``). Returns True/False for a transition
        that changed the tripped state to tripped/cleared, None otherwise."""
        s, c = self.settings, self.counts
        dt = expected_s if expected_s is not None and expected_s > 0.0 else self.plant.dt
        if not candidates or (period_s is not None and abs(period_s - dt) > s.period_tolerance * dt):
            c.skipped += 1
            return None
        ratio = self.ratio(x_prev, candidates, x_now)
        c.transitions += 1
        c.last_ratio = ratio
        c.max_ratio = max(c.max_ratio, ratio) if np.isfinite(ratio) else np.inf
        out = not ratio <= 1.0
        c.out_of_bounds += out
        self._recent.append(out)
        k = c.transitions
        if out:
            self._in_bounds_run = 0
            if self._run_start is None:
                self._run_start = k
        else:
            self._in_bounds_run += 1
            if not any(self._recent):
                self._run_start = None
        if not self.tripped and sum(self._recent) >= s.trip_count:
            self.tripped = True
            c.trips += 1
            c.detection_delay = k - (self._run_start if self._run_start is not None else k)
            return True
        if self.tripped and self._in_bounds_run >= s.clear_steps:
            self.tripped = False
            c.clears += 1
            self._recent.clear()
            self._run_start = None
            return False
        return None

    def record(self) -> dict:
        """What the ``model_monitor`` topic and the diagnostic carry."""
        c = self.counts
        return {"tripped": self.tripped, "transitions": c.transitions, "out_of_bounds": c.out_of_bounds,
                "skipped": c.skipped, "trips": c.trips, "clears": c.clears,
                "last_ratio": _finite(c.last_ratio), "max_ratio": _finite(c.max_ratio),
                "detection_delay": c.detection_delay, "declared": bool(self.plant.uncertainty.declared)}


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
