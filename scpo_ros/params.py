"""The parameter tables: one per concept, composed by every node.

A ``ParamSpec`` is one declared parameter (default, description, range). The tables group
them by concept, and each default is read from the dataclass the parameters build, so a
default lives in one place:

- ``PLANT_PARAMS``: the plant file (``plant.load_plant``: dynamics, limits, joints, backup
  weights, certified region; read once) and the runtime limits that can only tighten it;
- ``POLICY_PARAMS``: the residual policy's structure (``policy.MLPLayout``) and the seed;
- ``ROLLOUT_PARAMS``: the safety metrics of the rollouts (``rollout.SafetySpec``: the horizon in
  seconds, the Lyapunov terms as fractions);
- ``SCPO_PARAMS``: the projector (``scpo.SCPOConfig``) and its state samples;
- ``ENVELOPE_PARAMS``: the late commands the shared safe set absorbs;
- ``STATE_INPUT_PARAMS``: how a controller reads ``joint_states`` (``inputs``);
- ``LIFECYCLE_PARAMS``: autostart, behaviour while inactive, the shutdown hold;
- ``MONITOR_PARAMS``: the runtime model monitor (``model_monitor.MonitorSettings``).

``plant_of(values)`` builds the plant from the first. A node declares
``compose(TABLE, ..., its own specs)`` through ``scpo_ros.ros.parameters``. Nothing here
imports rclpy.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .model_monitor import MonitorSettings
from .plant import PACKAGE_PREFIX, Plant, load_plant
from .policy import MLPLayout
from .residual_scpo import ResidualSCPO
from .rollout import METRICS, SafetySpec

KINDS = ("bool", "int", "double", "string", "double[]", "int[]", "string[]")
"""Parameter types, named as ``ros2 param describe`` names them."""


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter.

    ``default``'s Python type decides the type (bool, int, float, str, or a list of
    float/int/str; give ``ptype``, one of ``KINDS``, for an empty list). ``min``/``max``
    bound scalars and every element of an array; ``choices`` restricts strings;
    ``min_len``/``max_len`` bound array lengths.
    """

    name: str
    default: Any
    description: str
    min: float | int | None = None
    max: float | int | None = None
    choices: tuple[str, ...] | None = None
    read_only: bool = False
    ptype: str | None = None
    min_len: int = 0
    max_len: int | None = None
    finite: bool = True
    """Refuse ±inf (NaN always): False for the tightening arrays, where ±inf means "the file's bound"."""

    @property
    def type(self) -> str:
        """One of ``KINDS``."""
        if self.ptype is not None:
            if self.ptype not in KINDS:
                raise TypeError(f"{self.name}: ptype must be one of {KINDS}, got {self.ptype!r}")
            return self.ptype
        d = self.default
        if isinstance(d, bool):
            return "bool"
        if isinstance(d, int):
            return "int"
        if isinstance(d, float):
            return "double"
        if isinstance(d, str):
            return "string"
        if isinstance(d, (list, tuple)) and d:
            first = d[0]
            if isinstance(first, bool):
                raise TypeError(f"{self.name}: bool arrays are not supported")
            if isinstance(first, int):
                return "int[]"
            if isinstance(first, float):
                return "double[]"
            if isinstance(first, str):
                return "string[]"
        raise TypeError(f"{self.name}: cannot infer the type of {d!r}; give ptype")

    def check(self, value) -> str | None:
        """Reason why ``value`` is not acceptable, or None."""
        t = self.type
        if t in ("double", "int"):
            values = [value]
        elif t.endswith("[]"):
            values = list(value)
            if len(values) < self.min_len or (self.max_len is not None and len(values) > self.max_len):
                return f"{self.name} needs between {self.min_len} and {self.max_len} entries, got {len(values)}"
            if t == "string[]":
                values = []
        else:
            values = []
        for v in values:
            if isinstance(v, float) and (math.isnan(v) or (self.finite and not math.isfinite(v))):
                return f"{self.name} must be finite, got {v}"
            if self.min is not None and v < self.min:
                return f"{self.name} = {v} is below its minimum {self.min}"
            if self.max is not None and v > self.max:
                return f"{self.name} = {v} is above its maximum {self.max}"
        if self.choices and value not in self.choices:
            return f"{self.name} = {value!r} is not one of {', '.join(self.choices)}"
        return None


_FIXED = ("default", "min", "max", "choices", "ptype", "min_len", "max_len")
"""What a node may not change when it replaces a spec of a table: its value and range."""


def compose(*tables: Sequence[ParamSpec], **replace: ParamSpec) -> list[ParamSpec]:
    """The tables concatenated, in order. A name twice raises ``ValueError``.

    ``replace=`` swaps the spec of that name for a node's own (its description or
    ``read_only`` flag); a replacement that changes the default or the range, or names no
    spec of the tables, raises ``ValueError``.
    """
    specs: list[ParamSpec] = []
    seen: set[str] = set()
    for table in tables:
        for spec in table:
            if spec.name in seen:
                raise ValueError(f"parameter {spec.name} is declared twice")
            seen.add(spec.name)
            specs.append(spec)
    unknown = sorted(set(replace) - seen)
    if unknown:
        raise ValueError(f"replace names no composed parameter: {', '.join(unknown)}")
    for i, spec in enumerate(specs):
        new = replace.get(spec.name)
        if new is None:
            continue
        changed = [f for f in ("name", *_FIXED) if getattr(new, f) != getattr(spec, f)]
        if changed:
            raise ValueError(f"replacing {spec.name} may change its description and read_only flag only, "
                             f"not {', '.join(changed)}")
        specs[i] = new
    return specs


def read_only(table: Sequence[ParamSpec]) -> tuple[ParamSpec, ...]:
    """The table with every spec read-only (a node that builds its model once)."""
    return tuple(dataclasses.replace(s, read_only=True) for s in table)


def _defaults(cls) -> dict[str, Any]:
    """Field defaults of a dataclass (fields without a default are left out)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _floats(value) -> list[float]:
    return [float(v) for v in np.atleast_1d(value)]


PLANT_FILE_DEFAULT = f"{PACKAGE_PREFIX}scpo_ros/config/plants/double_integrator.yaml"
"""The plant of every node unless ``plant_file`` names another."""
_S, _C = SafetySpec(), ResidualSCPO.default_config()   # the residual client's per-metric margins
_MAX_DIM = 64
"""Longest tightening array a parameter accepts (states or inputs of a plant)."""


def _tight(name: str, side: str, what: str) -> ParamSpec:
    return ParamSpec(name, [], f"Runtime tightening of the plant file's {side}: one value per {what} (±.inf: the "
                               f"file's bound), or [] for the file's. Only tightens; a change re-certifies.",
                     ptype="double[]", max_len=_MAX_DIM, finite=False)


PLANT_FILE = ParamSpec("plant_file", PLANT_FILE_DEFAULT, "The plant file: a path, package://scpo_ros/config/plants/"
                                                           "NAME.yaml or a shipped plant's NAME (docs/plants.md). "
                                                           "Read once at start-up (a file may name a model class, "
                                                           "which runs code).", read_only=True)
"""Every node's plant; the simulator declares only this one."""

PLANT_PARAMS = (
    PLANT_FILE,
    _tight("x_min_tight", "x_min", "state"),
    _tight("x_max_tight", "x_max", "state"),
    _tight("u_min_tight", "u_min", "input"),
    _tight("u_max_tight", "u_max", "input"),
)
TIGHTENING = tuple(s.name for s in PLANT_PARAMS[1:])
"""The runtime limits: ``x_min_tight`` ... (``plant_of`` passes them to ``Plant.with_limits``)."""


def plant_of(values: Mapping[str, Any], base: Plant | None = None) -> Plant:
    """The plant of parameter values: ``load_plant(values["plant_file"])`` (or ``base``, the file
    already read) with the ``*_tight`` limits applied. ``PlantError`` (a ``ValueError``) names the
    key that is wrong."""
    plant = base if base is not None else load_plant(values.get("plant_file") or PLANT_FILE_DEFAULT)
    tight = {name[:-len("_tight")]: list(values.get(name) or []) for name in TIGHTENING}
    if not any(tight.values()):
        return plant
    return plant.with_limits(**{k: v or None for k, v in tight.items()})


SEED = ParamSpec("seed", 0, "Seed of the node's random numbers.", 0, 2**31 - 1)
"""The seed's range, for every node that has one (each says what it seeds)."""

POLICY_PARAMS = (
    ParamSpec("hidden", list(_defaults(MLPLayout)["hidden"]), "Hidden layer sizes of the residual MLP.", 1, 1024,
              read_only=True, min_len=1, max_len=8),
    dataclasses.replace(SEED, read_only=True, description="Seed of the policy's initial weights and of the "
                                                          "sampling."),
)

ROLLOUT_PARAMS = (
    ParamSpec("horizon_s", _S.horizon_s, "Certification horizon: every rollout runs this long (s), in steps of the "
                                         "plant's dt.", 1e-3, 600.0),
    ParamSpec("lyap_alpha", _S.lyap_alpha, "Required decrease of V per step, as a fraction of the backup's own "
                                           "worst-case decrease.", 0.0, 0.99),
    # ε divides the metric: 0 is refused (rollout.SafetySpec), hence the positive minimum
    ParamSpec("lyap_eps", _S.lyap_eps, "V-level of the terminal set where decrease is not required, as a "
                                       "fraction of the largest V over the certified region.", 1e-9, 1e3),
)

SCPO_PARAMS = (
    ParamSpec("n_samples", _C.n_samples, "K: parameter perturbations per step.", 2, 4096),
    ParamSpec("sample_radius", _C.sample_radius, "σ: sampling radius and largest step (trust radius).", 1e-6, 10.0),
    ParamSpec("inner_radius_ratio", _C.inner_radius_ratio, "Second sampling radius as a fraction of σ.",
              0.01, 0.99),
    ParamSpec("n_random_directions", _C.n_random_directions, "Random directions added to the step subspace.",
              0, 256),
    ParamSpec("safety_factor", _C.safety_factor, "κ >= 1 multiplying the fitted error/curvature bounds.",
              1.0, 100.0),
    ParamSpec("margins", _floats(_C.margins), f"m_i, the projection keeps g_i <= -m_i (fractions of each "
                                              f"constraint's range; one for every metric, or one per metric "
                                              f"{', '.join(METRICS)}).", 0.0, 10.0,
              min_len=1, max_len=len(METRICS)),
    ParamSpec("cert_margins", _floats(_C.cert_margins), "c_i: certification requires g_i <= -c_i (fractions, like "
                                                        "margins; one for every metric, or one per metric).", 0.0, 10.0,
              min_len=1, max_len=len(METRICS)),
    ParamSpec("max_backtracks", _C.max_backtracks, "Halvings tried when the projected step fails certification.",
              0, 20),
    ParamSpec("ridge", _C.ridge, "Tikhonov term of the gradient fit.", 0.0, 1.0),
    ParamSpec("n_sample_states", 256, "Initial states of the sampling rollouts.", 8, 65536),
    ParamSpec("n_cert_states", 1024, "Fresh initial states of the certification rollouts.", 8, 65536),
)

ENVELOPE_PARAMS = (
    ParamSpec("late_commands", 1, "Late or missed commands in a row the safe set absorbs (1: every command stays "
                                  "safe when the plant applies it one period longer). At most: a model plant "
                                  "whose safe set is nominal only (the pendulum's) gets 0, with a warning.", 0, 1,
              read_only=True),
)

STATE_QOS_CHOICES = ("reliable", "best_effort")
"""Values of ``state_qos`` (``scpo_ros.ros.qos.state_qos`` turns one into a profile)."""

STATE_INPUT_PARAMS = (
    ParamSpec("state_qos", "reliable", "QoS of the joint_states subscription.", choices=STATE_QOS_CHOICES,
              read_only=True),
    ParamSpec("max_state_age", 0.5, "A state stamped more than this before now is rejected (s; 0: no age check, "
                                    "for publishers on an unsynchronised clock).", 0.0, 3600.0),
    ParamSpec("future_tolerance", 0.05, "A state stamped more than this after now is rejected (s).", 0.0, 3600.0),
    ParamSpec("state_timeout", 0.25, "Seconds without an accepted state after which the state is stale.",
              0.005, 10.0),
)

LIFECYCLE_PARAMS = (
    ParamSpec("autostart", True, "Configure and activate at start-up (no lifecycle manager needed).",
              read_only=True),
    ParamSpec("inactive_behavior", "fallback", "While inactive, unconfigured and shutting down: answer every "
                                               "state with the envelope's fallback, or publish nothing.",
              choices=("fallback", "silent")),
    ParamSpec("shutdown_timeout", 2.0, "At shutdown keep sending the fallback until the plant is at rest, no state "
                                       "comes for state_timeout, or this passes (s).", 0.0, 60.0),
)


_M = MonitorSettings()
MONITOR_PARAMS = (
    ParamSpec("monitor_enabled", True, "Run the model monitor: the one-step residual against the plant file's "
                                       "declared uncertainty; while it is tripped no update is committed and "
                                       "the envelope's fallback acts."),
    ParamSpec("monitor_tolerance", _M.tolerance, "The residual may exceed the declared bound by this fraction of "
                                                 "it.", 0.0, 100.0),
    ParamSpec("monitor_floor", _M.floor, "Residual floor per state, as a fraction of its certified-region range "
                                         "(rounding; the whole bound of a plant that declares nothing).", 1e-12, 1.0),
    ParamSpec("monitor_window", _M.window, "Transitions the trip rule looks back over.", 1, 10000),
    ParamSpec("monitor_trip_count", _M.trip_count, "Out-of-bounds transitions within the window that trip the "
                                                   "monitor (at most monitor_window).", 1, 10000),
    ParamSpec("monitor_clear_steps", _M.clear_steps, "In-bounds transitions in a row that clear it.", 1, 1000000),
)
"""The model monitor (``model_monitor.MonitorSettings``); ``monitor_settings`` builds it."""


def monitor_settings(values: Mapping[str, Any]) -> MonitorSettings:
    """``MonitorSettings`` of parameter values (``ValueError`` naming the rule broken)."""
    return MonitorSettings(tolerance=float(values["monitor_tolerance"]), floor=float(values["monitor_floor"]),
                           window=int(values["monitor_window"]), trip_count=int(values["monitor_trip_count"]),
                           clear_steps=int(values["monitor_clear_steps"]))


MODEL_PARAMS = PLANT_PARAMS + POLICY_PARAMS + ROLLOUT_PARAMS + SCPO_PARAMS + ENVELOPE_PARAMS
"""What ``safety_model.build_model`` reads: everything the safety node's certificate covers."""


def defaults(specs: Sequence[ParamSpec], **changes) -> dict[str, Any]:
    """``{name: default}`` of ``specs`` updated with ``changes`` (which may add a node's own
    parameters): the values a node holds before any override, what the ROS-free tests build
    models from."""
    return {**{s.name: s.default for s in specs}, **changes}
