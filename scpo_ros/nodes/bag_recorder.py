"""``bag_recorder``: record topics into a rosbag2 bag (MCAP, metadata v9) without ``ros2 bag``.

Subscribes with ``raw=True`` and writes the CDR bytes as received, stamped with the
receive time (node clock, ns) as the bag's log time, as ``ros2 bag record`` does.
Topics of the scpo_ros graph (``scpo_ros.graph``) are subscribed at once, the latched ones
transient-local (their types are known, so no message before the first discovery round is
lost); any other topic is subscribed as soon as discovery reports its type, with the QoS
its publishers offer allow (``ros2 bag record``'s rule: transient-local if all of them are,
best-effort if any is). Relative names resolve in the node's namespace.

A topic enters the bag with its first message, with the QoS profiles its publishers offer
then (``offered_qos_profiles``, one per publisher, as ``ros2 bag record`` writes them), so
``ros2 bag play`` replays a latched topic latched; a subscribed topic that got no message is
written at close, with the QoS of its publishers then (or when the first of them matched).
The bag is closed (``metadata.yaml`` written) on SIGINT/SIGTERM.

``ros2 bag record -s mcap <topics>`` on a distro records the same bag.
"""
from __future__ import annotations

import importlib
import sys
import time

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from .. import graph
from ..bag import BagWriter, qos_from_profile
from ..params import ParamSpec
from ..ros.diagnostics import OK, WARN, Diagnostics
from ..ros.parameters import add_parameter_validator, declare_parameters
from ..ros.runner import run_node

PARAMS = [
    ParamSpec("output", "", "Bag directory to create (must not exist). Empty: runs/bag_<YYYYmmdd_HHMMSS>.",
              read_only=True),
    ParamSpec("topics", list(graph.RECORDED_TOPICS), "Topics to record (relative names resolve in the namespace).",
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
        super().__init__(graph.RECORDER, **kwargs)
        self.p = declare_parameters(self, PARAMS)
        output = self.p["output"] or time.strftime("runs/bag_%Y%m%d_%H%M%S")
        self.writer = BagWriter(output, storage=self.p["storage"])
        self.diag = Diagnostics(self)
        add_parameter_validator(self, PARAMS, apply=lambda values, changed: self._restart_discovery(values))
        self.pending: set[str] = set()  # resolved names waiting for a type
        self.subs = {}
        self.types: dict[str, str] = {}
        for name in self.p["topics"]:
            resolved = self.resolve_topic_name(name)
            msgtype = graph.topic_type(resolved)
            if msgtype is not None:
                self._subscribe(resolved, msgtype, graph.base_name(resolved) in graph.LATCHED_TOPICS)
            else:
                self.pending.add(resolved)
        self.discovery = self.create_timer(self.p["discovery_period"], self._discover)
        self.unmatched = set(self.subs)   # topics without a matched publisher yet
        self.first_offers: dict[str, list] = {}   # topic -> offered QoS when a publisher first matched
        self.match_timer = self.create_timer(0.1, self._check_matched)
        self.status_timer = self.create_timer(1.0, self._update_diagnostics)
        self.get_logger().info(f"recording {len(self.subs)} topics to {output} ({self.p['storage']}); "
                               f"waiting for {sorted(self.pending) or 'none'}")
        self._update_diagnostics()

    def _restart_discovery(self, values) -> None:
        self.destroy_timer(self.discovery)
        self.p = values
        self.discovery = self.create_timer(values["discovery_period"], self._discover)

    def _subscribe(self, topic: str, msgtype: str, latched: bool, reliable: bool = True) -> None:
        qos = QoSProfile(depth=self.p["queue_depth"],
                         reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                         history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
        clock = self.get_clock()
        writer = self.writer
        self.types[topic] = msgtype

        def on_message(data: bytes, topic=topic) -> None:
            if topic not in writer.counts:
                self._add_to_bag(topic)
            writer.write(topic, clock.now().nanoseconds, data)

        self.subs[topic] = self.create_subscription(message_class(msgtype), topic, on_message, qos, raw=True)

    def _offered(self, topic: str) -> list:
        """The QoS profiles the topic's publishers offer now."""
        try:
            return [qos_from_profile(info.qos_profile) for info in self.get_publishers_info_by_topic(topic)]
        except Exception as exc:   # the graph is gone (a context shut down at close)
            self.get_logger().warning(f"offered QoS of {topic} unknown: {exc}")
            return []

    def _add_to_bag(self, topic: str) -> None:
        """The topic's connection in the bag, with the QoS its publishers offer now (or offered
        when the first of them matched: a topic without messages is added at close, when its
        publishers may be gone)."""
        self.writer.add_topic(topic, self.types[topic], self._offered(topic) or self.first_offers.get(topic, []))

    def _check_matched(self) -> None:
        """Log the first matched publisher of every topic (the demo waits for these lines)."""
        for topic in sorted(self.unmatched):
            if self.subs[topic].get_publisher_count() > 0:
                self.unmatched.discard(topic)
                self.first_offers[topic] = self._offered(topic)
                self.get_logger().info(f"publisher matched: {topic}")

    def _discover(self) -> None:
        if not self.pending:
            return
        for name, types in self.get_topic_names_and_types():
            if name in self.pending and types:
                offers = [info.qos_profile for info in self.get_publishers_info_by_topic(name)]
                self._subscribe(name, types[0], latched=bool(offers) and all(
                    q.durability == DurabilityPolicy.TRANSIENT_LOCAL for q in offers),
                    reliable=all(q.reliability == ReliabilityPolicy.RELIABLE for q in offers))
                self.unmatched.add(name)
                self.get_logger().info(f"recording {name} ({types[0]})")
                self.pending.discard(name)

    def counts(self) -> dict[str, int]:
        """Messages written per subscribed topic."""
        return {topic: self.writer.counts.get(topic, 0) for topic in self.subs}

    def _update_diagnostics(self) -> None:
        counts = self.counts()
        level = WARN if self.pending else OK
        msg = f"{sum(counts.values())} messages" + (f"; no publisher yet for {sorted(self.pending)}"
                                                    if self.pending else "")
        self.diag.update("recording", level, msg, path=str(self.writer.path), counts=counts)

    def summary(self) -> dict:
        return {"node": graph.RECORDER, "path": str(self.writer.path), "counts": self.counts()}

    def destroy_node(self):
        writer = getattr(self, "writer", None)   # None: __init__ failed (the bag exists, say)
        if writer is not None:
            for topic in self.subs:   # topics that got no message are in the bag too
                if topic not in writer.counts:
                    self._add_to_bag(topic)
            writer.close()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(BagRecorder, args)


if __name__ == "__main__":
    sys.exit(main())
