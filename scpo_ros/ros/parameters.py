"""Declaring and validating a node's parameters (the specs of ``scpo_ros.params``).

Every tunable is declared with a ``ParameterDescriptor`` (description,
``FloatingPointRange``/``IntegerRange``, read-only flag, the other constraints as text),
and runtime changes are validated with a reason that ``ros2 param set`` prints.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from ..params import ParamSpec

ROS_TYPES = {
    "bool": ParameterType.PARAMETER_BOOL, "int": ParameterType.PARAMETER_INTEGER,
    "double": ParameterType.PARAMETER_DOUBLE, "string": ParameterType.PARAMETER_STRING,
    "double[]": ParameterType.PARAMETER_DOUBLE_ARRAY, "int[]": ParameterType.PARAMETER_INTEGER_ARRAY,
    "string[]": ParameterType.PARAMETER_STRING_ARRAY,
}
"""``ParamSpec.type`` -> ``rcl_interfaces`` parameter type."""
_KIND_OF = {v: k for k, v in ROS_TYPES.items()}


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """The ``ParameterDescriptor`` of ``spec``: a scalar's range as ``FloatingPointRange`` or
    ``IntegerRange``, what rclpy does not check (element ranges, lengths, choices) as text."""
    kind = spec.type
    constraints = []
    if spec.choices:
        constraints.append("one of: " + ", ".join(spec.choices))
    if kind in ("double[]", "int[]") and (spec.min is not None or spec.max is not None):
        constraints.append(f"every element in [{spec.min}, {spec.max}]")
    if spec.min_len or spec.max_len is not None:
        constraints.append(f"length in [{spec.min_len}, {spec.max_len if spec.max_len is not None else 'inf'}]")
    desc = ParameterDescriptor(name=spec.name, type=ROS_TYPES[kind], description=spec.description,
                               additional_constraints="; ".join(constraints), read_only=spec.read_only)
    if kind == "double" and spec.min is not None and spec.max is not None:
        desc.floating_point_range = [FloatingPointRange(from_value=float(spec.min), to_value=float(spec.max),
                                                        step=0.0)]
    elif kind == "int" and spec.min is not None and spec.max is not None:
        desc.integer_range = [IntegerRange(from_value=int(spec.min), to_value=int(spec.max), step=1)]
    return desc


def declare_parameters(node: Node, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """Declare every spec on ``node`` (overrides from ``--params-file``/``-p`` apply) and
    return the resulting values. Raises ``ValueError`` with the reason when an override
    is out of range (rclpy enforces descriptor ranges; arrays and choices are ours)."""
    for spec in specs:
        default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
        if isinstance(default, list) and not default:
            # an empty list has no element type (rclpy would declare a byte array, and a YAML
            # "[]" arrives as no value at all): declare the type, then set the typed empty
            # array; a read-only one cannot be set and stays "not set" (its value is the default)
            ptype = Parameter.Type(ROS_TYPES[spec.type])
            node.declare_parameter(spec.name, ptype, descriptor(spec))
            if not spec.read_only and not _initialised(node, spec.name):
                node.set_parameters([Parameter(spec.name, ptype, [])])
            continue
        node.declare_parameter(spec.name, default, descriptor(spec))
    values = parameter_values(node, specs)
    for spec in specs:
        reason = spec.check(values[spec.name])
        if reason:
            raise ValueError(f"parameter {reason}")
    return values


def _initialised(node: Node, name: str) -> bool:
    try:
        _ = node.get_parameter(name).value
    except ParameterUninitializedException:
        return False
    return True


def parameter_values(node: Node, specs: Iterable[ParamSpec]) -> dict[str, Any]:
    """Current values as plain Python (arrays as lists); a parameter declared without a value
    (a read-only empty array) has its spec's default."""
    out = {}
    for spec in specs:
        if not _initialised(node, spec.name):
            out[spec.name] = list(spec.default) if isinstance(spec.default, (list, tuple)) else spec.default
            continue
        v = node.get_parameter(spec.name).value
        out[spec.name] = list(v) if isinstance(v, (list, tuple, np.ndarray)) or type(v).__name__ == "array" else v
    return out


def add_parameter_validator(node: Node, specs: Sequence[ParamSpec],
                            check: Callable[[dict[str, Any]], str | None] | None = None,
                            apply: Callable[[dict[str, Any], set[str]], None] | None = None) -> None:
    """Validate runtime parameter changes, then apply them.

    Each changed value is checked against its spec (range, finiteness, choices, array
    length). Then ``check(values)`` sees *all* values as they would be after the change
    (for constraints between parameters) and returns a reason to reject, or None. A
    rejected change leaves every parameter as it was; the reason goes back to the caller
    (``ros2 param set`` prints it) and into the log. After an accepted change,
    ``apply(values, changed_names)`` runs (from the post-set callback, so it only ever
    sees values rclpy has stored).
    """
    by_name = {s.name: s for s in specs}

    def on_set(params) -> SetParametersResult:
        proposed = parameter_values(node, specs)
        for p in params:
            spec = by_name.get(p.name)
            if spec is None:
                continue
            if spec.read_only:
                return _reject(node, f"{p.name} is read-only")
            if p.type_ != ROS_TYPES[spec.type]:
                return _reject(node, f"{p.name} must be {spec.type}, got {_KIND_OF.get(int(p.type_), p.type_)}")
            value = list(p.value) if not isinstance(p.value, (str, bool, int, float)) else p.value
            reason = spec.check(value)
            if reason:
                return _reject(node, reason)
            proposed[p.name] = value
        if check is not None:
            try:
                reason = check(proposed)
            except Exception as exc:  # a check that fails to run must reject, not crash the node
                reason = f"validation failed: {exc}"
            if reason:
                return _reject(node, reason)
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(on_set)
    if apply is not None:
        def on_post_set(params) -> None:
            names = {p.name for p in params if p.name in by_name}
            if names:
                apply(parameter_values(node, specs), names)
        node.add_post_set_parameters_callback(on_post_set)


def _reject(node: Node, reason: str) -> SetParametersResult:
    node.get_logger().warning(f"parameter change rejected: {reason}")
    return SetParametersResult(successful=False, reason=reason)
