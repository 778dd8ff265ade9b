"""``/diagnostics`` publishing: a minimal ``diagnostic_updater`` (not on PyPI).

Status name ``"<node>: <task>"``, ``hardware_id``, stamped header; published about once a
second and immediately when a task's level changes.
"""
from __future__ import annotations

import json
import threading

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

from .. import graph
from .runner import steady_timer

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
_LEVELS = {graph.LEVEL_OK: OK, graph.LEVEL_WARN: WARN, graph.LEVEL_ERROR: ERROR}


class Diagnostics:
    """Named tasks, each with a level, message and values.

    ``update(task, level, message, **values)`` stores a task's status; a timer publishes
    every task at ``period_s`` and a level change is published at once (an ERROR must not
    wait up to a second). Call from the node's executor thread, or from another thread:
    the state is guarded by a lock and ``publish`` is thread-safe in rclpy.
    """

    def __init__(self, node: Node, hardware_id: str | None = None, period_s: float = 1.0):
        self.node = node
        self.hardware_id = hardware_id or node.get_fully_qualified_name()
        self._pub = node.create_publisher(DiagnosticArray, graph.DIAGNOSTICS, 10)
        self._tasks: dict[str, DiagnosticStatus] = {}
        self._lock = threading.Lock()
        self._timer = steady_timer(node, period_s, self.publish)   # alive on use_sim_time without /clock

    def update(self, task: str, level, message: str, **values) -> None:
        """``level``: ``OK``/``WARN``/``ERROR`` here, or ``graph.LEVEL_*`` (the same levels as ints)."""
        status = DiagnosticStatus(level=_LEVELS.get(level, level), name=f"{self.node.get_name()}: {task}",
                                  message=message, hardware_id=self.hardware_id,
                                  values=[KeyValue(key=k, value=_kv_text(v)) for k, v in values.items()])
        with self._lock:
            old = self._tasks.get(task)
            self._tasks[task] = status
        if old is None or old.level != status.level:
            self.publish()

    def publish(self) -> None:
        with self._lock:
            statuses = list(self._tasks.values())
        if not statuses or not rclpy.ok(context=self.node.context):
            return
        msg = DiagnosticArray(status=statuses)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        try:
            self._pub.publish(msg)
        except Exception:  # publishing during shutdown: nothing left to tell
            pass


def _kv_text(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return str(v)


def diagnostic_values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}
