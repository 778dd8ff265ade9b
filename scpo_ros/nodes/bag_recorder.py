"""``bag_recorder``: record topics into a rosbag2 bag (MCAP, metadata v9) without ``ros2 bag``.

Subscribes with ``raw=True`` and writes the CDR bytes as received, stamped with the
receive time (node clock, ns) as the bag's log time, as ``ros2 bag record`` does.
Topics of the scpo_ros graph are subscribed at once (their types are known, so no
message before the first discovery round is lost); any other topic is subscribed as
soon as discovery reports its type. Relative names resolve in the node's namespace.
The bag is closed (``metadata.yaml`` written) on SIGINT/SIGTERM.

``ros2 bag record -s mcap <topics>`` on a distro records the same bag.
"""
from __future__ import annotations

import importlib
import json
import sys
import time

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from ..bag import BagWriter
from ..ros_common import OK, WARN, Diagnostics, ParamSpec, add_parameter_validator, declare_parameters, run_node

KNOWN_TYPES = {
    "joint_states": "sensor_msgs/msg/JointState",
    "cmd": "std_msgs/msg/Float64MultiArray",
    "expert_action": "std_msgs/msg/Float64MultiArray",
    "reference": "std_msgs/msg/Float64MultiArray",
    "malicious": "std_msgs/msg/Bool",
    "proposed_weights": "std_msgs/msg/Float64MultiArray",
    "certified_weights": "std_msgs/msg/Float64MultiArray",
    "scpo_decision": "std_msgs/msg/String",
    "safety_mode": "std_msgs/msg/String",
    "constraint_violation": "std_msgs/msg/String",
    "diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
}
"""Base name -> type of the graph's topics (see docs/ros_graph.md)."""

LATCHED = {"certified_weights", "safety_mode"}
"""Published transient-local: subscribe the same way to get the value already sent."""

DEFAULT_TOPICS = ["joint_states", "cmd", "expert_action", "reference", "malicious", "proposed_weights",
                  "certified_weights", "scpo_decision", "safety_mode", "constraint_violation", "/diagnostics"]

PARAMS = [
    ParamSpec("output", "", "Bag directory to create (must not exist). Empty: runs/bag_<YYYYmmdd_HHMMSS>.",
              read_only=True),
    ParamSpec("topics", DEFAULT_TOPICS, "Topics to record (relative names resolve in the namespace).",
              read_only=True, min_len=1),
    ParamSpec("storage", "mcap", "Storage plugin.", choices=("mcap", "sqlite3"), read_only=True),
    ParamSpec("queue_depth", 1000, "Subscription depth (reliable): messages buffered while writing.", 1, 100000,
              read_only=True),
    ParamSpec("discovery_period", 0.5, "Seconds between looks for the types of not yet subscribed topics.",
              0.05, 10.0),
]


def message_class(msgtype: str):
    """``pkg/msg/Name`` -> the Python message class."""
    pkg, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)


class BagRecorder(Node):
    def __init__(self, **kwargs):
        super().__init__("bag_recorder", **kwargs)
        self.p = declare_parameters(self, PARAMS)
        output = self.p["output"] or time.strftime("runs/bag_%Y%m%d_%H%M%S")
        self.writer = BagWriter(output, storage=self.p["storage"])
        self.diag = Diagnostics(self)
        add_parameter_validator(self, PARAMS, apply=lambda values, changed: self._restart_discovery(values))
        self.pending: dict[str, str] = {}  # resolved name -> base name, waiting for a type
        self.subs = {}
        for name in self.p["topics"]:
            resolved = self.resolve_topic_name(name)
            base = resolved.rsplit("/", 1)[-1]
            if base in KNOWN_TYPES:
                self._subscribe(resolved, KNOWN_TYPES[base], base in LATCHED)
            else:
                self.pending[resolved] = base
        self.discovery = self.create_timer(self.p["discovery_period"], self._discover)
        self.unmatched = set(self.subs)   # topics without a matched publisher yet
        self.match_timer = self.create_timer(0.1, self._check_matched)
        self.status_timer = self.create_timer(1.0, self._update_diagnostics)
        self.get_logger().info(f"recording {len(self.subs)} topics to {output} ({self.p['storage']}); "
                               f"waiting for {sorted(self.pending) or 'none'}")
        self._update_diagnostics()

    def _restart_discovery(self, values) -> None:
        self.destroy_timer(self.discovery)
        self.p = values
        self.discovery = self.create_timer(values["discovery_period"], self._discover)

    def _subscribe(self, topic: str, msgtype: str, latched: bool) -> None:
        self.writer.add_topic(topic, msgtype)
        qos = QoSProfile(depth=self.p["queue_depth"], reliability=ReliabilityPolicy.RELIABLE,
                         history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
        clock = self.get_clock()

        def on_message(data: bytes, topic=topic) -> None:
            self.writer.write(topic, clock.now().nanoseconds, data)

        self.subs[topic] = self.create_subscription(message_class(msgtype), topic, on_message, qos, raw=True)

    def _check_matched(self) -> None:
        """Log the first matched publisher of every topic (the demo waits for these lines)."""
        for topic in sorted(self.unmatched):
            if self.subs[topic].get_publisher_count() > 0:
                self.unmatched.discard(topic)
                self.get_logger().info(f"publisher matched: {topic}")

    def _discover(self) -> None:
        if not self.pending:
            return
        for name, types in self.get_topic_names_and_types():
            if name in self.pending and types:
                self._subscribe(name, types[0], False)
                self.unmatched.add(name)
                self.get_logger().info(f"recording {name} ({types[0]})")
                del self.pending[name]

    def _update_diagnostics(self) -> None:
        total = sum(self.writer.counts.values())
        level = WARN if self.pending else OK
        msg = f"{total} messages" + (f"; no publisher yet for {sorted(self.pending)}" if self.pending else "")
        self.diag.update("recording", level, msg, path=str(self.writer.path), counts=self.writer.counts)

    def destroy_node(self):
        writer = getattr(self, "writer", None)   # None: __init__ failed (the bag exists, say)
        if writer is not None:
            writer.close()
            print("SUMMARY " + json.dumps({"node": "bag_recorder", "path": str(writer.path),
                                           "counts": writer.counts}), flush=True)
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(BagRecorder, args)


if __name__ == "__main__":
    sys.exit(main())
