"""The QoS profiles of the graph."""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from ..params import STATE_QOS_CHOICES

CONTROL_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
"""State, command, reference, expert action: reliable, depth 10 (the transport numbers of
BENCHMARKS.md were measured with this profile)."""

LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
"""Last value for late joiners: certified weights, safety mode."""

EVENT_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
"""Sparse events that must not be dropped (decisions, violations)."""


def state_qos(kind: str) -> QoSProfile:
    """The ``joint_states`` subscription profile of a controller (parameter ``state_qos``):
    ``reliable`` (CONTROL_QOS) or ``best_effort``, which also matches a best-effort sensor
    driver (a reliable subscription to a best-effort publisher gets nothing: DDS calls that
    incompatible QoS, and the nodes report it as a WARN diagnostic)."""
    if kind == "best_effort":
        return QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST)
    if kind == "reliable":
        return CONTROL_QOS
    raise ValueError(f"state_qos must be one of {STATE_QOS_CHOICES}, got {kind!r}")
