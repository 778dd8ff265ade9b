"""The parameter tables: one per concept, composed by every node.

A ``ParamSpec`` is one declared parameter (default, description, range). The tables group
them by concept, and each default is read from the dataclass the parameters build, so a
default lives in one place:

- ``PLANT_PARAMS``: the double integrator (``dynamics.DoubleIntegrator``): dof, dt, limits;
- ``BACKUP_PARAMS``: the LQR backup's weights (the double integrator's ``backup: {Q, R}``);
- ``REGION_PARAMS``: the certified region of states and references (its ``certified_region``);
- ``POLICY_PARAMS``: the residual policy's structure (``policy.MLPLayout``) and the seed;
- ``ROLLOUT_PARAMS``: the safety metrics of the rollouts (``rollout.SafetySpec``; ``horizon`` in
  steps, read as ``horizon × dt`` seconds by ``safety_model.safety_spec``);
- ``SCPO_PARAMS``: the projector (``scpo.SCPOConfig``) and its state samples;
- ``ENVELOPE_PARAMS``: the late commands the shared safe set absorbs;
- ``STATE_INPUT_PARAMS``: how a controller reads ``joint_states`` (``inputs``);
- ``LIFECYCLE_PARAMS``: autostart, behaviour while inactive, the shutdown hold.

``plant.plant_from_params`` builds the plant from the first three. A node declares
``compose(TABLE, ..., its own specs)`` through ``scpo_ros.ros.parameters``. Nothing here
imports rclpy.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dynamics import DoubleIntegrator
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
            if isinstance(v, float) and not math.isfinite(v):
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


_P = _defaults(DoubleIntegrator)
# The backup weights and the certified region of the parameter era are the shipped
# config/plants/double_integrator.yaml's ``backup:`` and ``certified_region:`` (the generic
# LQRBackup and plant.Region carry no defaults of their own; phase 2 reads the file itself).
_B = {"q_pos": 1.0, "q_vel": 1.0, "r_act": 10.0}
_R = {"p0_max": 0.8, "v0_max": 0.2, "r_max": 0.5}
_S, _C = SafetySpec(), ResidualSCPO.default_config()   # the residual client's per-metric margins
_HORIZON_STEPS = _S.steps(_P["dt"])
"""``horizon`` stays in steps of the default dt (``safety_model.safety_spec`` reads it as
``horizon × dt`` seconds) until the nodes take ``horizon_s``."""

PLANT_PARAMS = (
    ParamSpec("dof", _P["dof"], "Number of independent axes.", 1, 8, read_only=True),
    ParamSpec("dt", _P["dt"], "Time step of the plant model (s): the control period.", 1e-4, 1.0),
    ParamSpec("p_max", _P["p_max"], "Position limit |p| <= p_max.", 1e-3, 1e3),
    ParamSpec("v_max", _P["v_max"], "Velocity limit |v| <= v_max.", 1e-3, 1e3),
    ParamSpec("u_max", _P["u_max"], "Actuation limit |u| <= u_max.", 1e-3, 1e3),
)

BACKUP_PARAMS = (
    ParamSpec("q_pos", _B["q_pos"], "Backup LQR position weight.", 0.0, 1e6),
    ParamSpec("q_vel", _B["q_vel"], "Backup LQR velocity weight.", 0.0, 1e6),
    ParamSpec("r_act", _B["r_act"], "Backup LQR action weight.", 1e-6, 1e6),
)

REGION_PARAMS = (
    ParamSpec("p0_max", _R["p0_max"], "Certified region: |p| <= p0_max.", 0.0, 1e3),
    ParamSpec("v0_max", _R["v0_max"], "Certified region: |v| <= v0_max.", 0.0, 1e3),
    ParamSpec("r_max", _R["r_max"], "Certified references: |r| <= r_max (references beyond are clamped).",
              0.0, 1e3),
)

SEED = ParamSpec("seed", 0, "Seed of the node's random numbers.", 0, 2**31 - 1)
"""The seed's range, for every node that has one (each says what it seeds)."""

POLICY_PARAMS = (
    ParamSpec("hidden", list(_defaults(MLPLayout)["hidden"]), "Hidden layer sizes of the residual MLP.", 1, 1024,
              read_only=True, min_len=1, max_len=8),
    dataclasses.replace(SEED, read_only=True, description="Seed of the policy's initial weights and of the "
                                                          "sampling."),
)

ROLLOUT_PARAMS = (
    ParamSpec("horizon", _HORIZON_STEPS, "Rollout length H (steps of dt; the certification horizon is H × dt "
                                         "seconds).", 1, 2000),
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
                                  "safe when the plant applies it one period longer).", 0, 1, read_only=True),
)

STATE_QOS_CHOICES = ("reliable", "best_effort")
"""Values of ``state_qos`` (``scpo_ros.ros.qos.state_qos`` turns one into a profile)."""

STATE_INPUT_PARAMS = (
    ParamSpec("joint_names", [""], "JointState joints of the axes, in axis order (matched by name; extra joints "
                                   "are ignored, a missing one rejects the message). [''] or []: axis_0..",
              read_only=True, min_len=0, max_len=8),
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


MODEL_PARAMS = PLANT_PARAMS + BACKUP_PARAMS + REGION_PARAMS + POLICY_PARAMS + ROLLOUT_PARAMS + SCPO_PARAMS \
    + ENVELOPE_PARAMS
"""What ``safety_model.build_model`` reads: everything the safety node's certificate covers."""


def defaults(specs: Sequence[ParamSpec], **changes) -> dict[str, Any]:
    """``{name: default}`` of ``specs`` updated with ``changes`` (which may add a node's own
    parameters): the values a node holds before any override, what the ROS-free tests build
    models from."""
    return {**{s.name: s.default for s in specs}, **changes}
