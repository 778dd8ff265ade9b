"""``ProposalIntake``: weight proposals received off the control path (issue 9, finding 9).

A flood on ``proposed_weights`` (1 kHz, half of it malformed) used to cost the control
path ~80x in p99 latency: every proposal was deserialised into a Python list of ~1 200
floats, checked, logged and answered with a decision record in the control executor. The
intake does the least possible per message:

- a **raw** subscription (the CDR bytes, nothing deserialised), reliable, depth 1
  (``KEEP_LAST``: DDS itself keeps only the newest sample; a reliable ``KEEP_LAST`` reader
  never blocks the writer);
- a **size check** on the bytes before anything is deserialised: a ``Float64MultiArray``
  with ``n`` doubles and a layout of at most one dimension whose label has at most
  ``max_label`` characters serialises to a known range of sizes (``cdr_size_range``).
  Anything outside is counted as ``size_rejected`` and dropped. The check bounds the work a
  message can cause, it does not validate: the data is 8-byte aligned, so a label a few
  characters longer, or up to 10 doubles more or fewer with another label length, still
  fit; the owner's ``check_weights`` sees those;
- a **one-slot mailbox**: the newest proposal wins, the one it replaces is counted as
  ``superseded`` (SCPO only ever wants the newest proposal anyway).

The owner calls ``take()`` from a timer (the safety node: its 20 Hz results timer): the
newest pending proposal is deserialised there, once per period whatever the flood rate,
and returned as ``(flat weights, fingerprint label or None)``. Content checks (layout
fingerprint, length, NaN/Inf) stay with the owner (``scpo_ros.policy.check_weights``).
``drain_rejections()`` returns the size rejections since its last call, so that the owner
can publish ONE aggregated decision record per period for a malformed flood.

Isolation (``isolation``; ``SCPO_ROS_INTAKE=group|poll|thread`` overrides the default):
- ``"group"`` (default): the raw callback (size check + mailbox, a few microseconds of
  Python) on the owner node in its own callback group, dispatched by the owner's executor
  (the EventsExecutor: one thread, so no GIL hand-over; a state waits for one callback).
- ``"poll"``: the subscription on a helper node that no executor spins; DDS's depth-1
  history is the mailbox and ``take()`` polls it (``take_message``). Messages DDS replaced
  before a poll are counted as ``superseded`` from the gaps in each publisher's sequence
  numbers (so a size-rejected one among them counts as superseded).
- ``"thread"``: the callback on a helper node spun by its own ``SingleThreadedExecutor``
  in a daemon thread.
Measured with bench/bench_latency.py ``--flood 1000`` (600 states per phase, 2 shared
cores), flood p99 / baseline p99 and the safety-node process's CPU per flood message:
group 1.06 and 2.05 in two runs without a stall (~60 us); poll ~15-30 us, but 5 of 9 flood
phases (2 of 9 baseline phases) had a ~300 ms stall of the control path (22 states lost
from its depth-10 queue; a reliable reader whose one-sample history is not taken makes the
writer repeat itself, plausibly what loads the shared DDS threads): ratios 35-41; thread
15 (its Python executor holds the GIL the control callback needs). Before the intake: 32-84.

Helper nodes (``<owner>_proposal_intake``, the owner's namespace and context) are built
without the process's global arguments, so that a ``__node:=`` remap cannot make them a
duplicate of the owner; the topic name is resolved by the owner
(``node.resolve_topic_name``), so its namespace and remappings apply in every mode.
Thread safety: one lock guards the mailbox and counters.
"""
from __future__ import annotations

import os
import threading

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Float64MultiArray, MultiArrayDimension

INTAKE_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
"""Reliable (a sparse proposal must not be lost), depth 1 (only the newest one matters)."""

ISOLATIONS = ("group", "poll", "thread")
MAX_PUBLISHERS = 256
"""Publishers whose sequence numbers are tracked (poll): a bound, against many short-lived ones."""
POLL_MAX = 8
"""Samples taken per poll at most (a bound on the work of one ``take()`` under any flood)."""
MAX_LABEL = 64
"""Longest layout label accepted by the size check (a fingerprint is 16 hex digits)."""


def cdr_size_range(n: int, max_label: int = MAX_LABEL) -> tuple[int, int]:
    """Serialised sizes (bytes, CDR with its encapsulation header, as a raw subscription
    delivers them) of a ``Float64MultiArray`` with ``n`` doubles: from no layout at all to
    one dimension labelled with ``max_label`` characters. Computed by serialising both ends,
    so the numbers follow the middleware's encoding rather than a hand-written formula
    (XCDR1: ``20 + 8 n`` to ``100 + 8 n`` for ``max_label = 64``)."""
    if n < 0 or max_label < 0:
        raise ValueError(f"n and max_label must be >= 0, got {n}, {max_label}")
    data = np.zeros(n).tolist()
    bare = Float64MultiArray(data=data)
    labelled = Float64MultiArray(data=data)
    labelled.layout.dim = [MultiArrayDimension(label="f" * max_label, size=n, stride=n)]
    return len(serialize_message(bare)), len(serialize_message(labelled))


class ProposalIntake:
    """Raw, size-checked, newest-wins intake of ``Float64MultiArray`` weight proposals.

    ``ProposalIntake(node, "proposed_weights", layout.size)`` in ``on_configure``;
    ``take()`` from the results timer; ``destroy()`` in teardown (idempotent).
    """

    def __init__(self, node: Node, topic: str, n: int, *, max_label: int = MAX_LABEL,
                 qos: QoSProfile = INTAKE_QOS, isolation: str | None = None):
        isolation = isolation or os.environ.get("SCPO_ROS_INTAKE", "group")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.n = int(n)
        self.min_bytes, self.max_bytes = cdr_size_range(self.n, max_label)
        self.isolation = isolation
        self.topic = node.resolve_topic_name(topic)        # owner's namespace and remappings
        self._lock = threading.Lock()
        self._pending: bytes | None = None
        self._received = self._size_rejected = self._superseded = self._taken = 0
        self._rejections_drained = 0
        self._destroyed = False
        self._owner = node
        self._helper: Node | None = None
        self._executor = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_seq: dict[bytes, int] = {}
        if isolation == "group":
            self._sub_node = node
            group = MutuallyExclusiveCallbackGroup()
        else:
            # own node: no global arguments (an owner's __node/__ns remap would otherwise make
            # it a duplicate of the owner); the topic is already resolved
            self._helper = Node(f"{node.get_name()}_proposal_intake", namespace=node.get_namespace(),
                                context=node.context, use_global_arguments=False, enable_rosout=False,
                                start_parameter_services=False)
            self._sub_node = self._helper
            group = None
        self._sub = self._sub_node.create_subscription(Float64MultiArray, self.topic, self._on_raw, qos,
                                                       callback_group=group, raw=True)
        if isolation == "thread":
            from rclpy.executors import SingleThreadedExecutor
            self._executor = SingleThreadedExecutor(context=node.context)
            self._executor.add_node(self._helper)
            self._thread = threading.Thread(target=self._spin, name="proposal_intake", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ receiving
    def _on_raw(self, data: bytes) -> None:
        size = len(data)
        with self._lock:
            self._received += 1
            if size < self.min_bytes or size > self.max_bytes:
                self._size_rejected += 1
                return
            if self._pending is not None:
                self._superseded += 1
            self._pending = data

    def poll(self) -> None:
        """(``poll`` mode) Move what DDS holds into the mailbox, counting it; ``take()`` calls it.
        A no-op in the other modes (their callback does it on arrival)."""
        if self.isolation != "poll" or self._destroyed:
            return
        for _ in range(POLL_MAX):       # depth 1: one sample, unless more arrive while polling
            try:
                with self._sub.handle:
                    got = self._sub.handle.take_message(Float64MultiArray, True)
            except Exception:
                return
            if got is None:
                return
            data, info = got
            gid, seq = bytes(info["publisher_gid"]["data"]), info.get("publication_sequence_number") or 0
            last = self._last_seq.get(gid) if seq else None    # 0/None: this middleware does not number
            if last is None and len(self._last_seq) >= MAX_PUBLISHERS:
                self._last_seq.pop(next(iter(self._last_seq)))
            self._last_seq[gid] = seq
            if last is not None and seq > last + 1:
                with self._lock:            # dropped by DDS's depth-1 history, unseen
                    self._received += seq - last - 1
                    self._superseded += seq - last - 1
            self._on_raw(data)

    def _spin(self) -> None:
        context = self._helper.context
        while not self._stop.is_set() and context.ok():
            try:
                self._executor.spin_once(timeout_sec=0.05)
            except Exception:  # context shut down under us (process exit): nothing left to receive
                break

    # ------------------------------------------------------------------ the owner's side
    def take(self) -> tuple[np.ndarray, str | None] | None:
        """The newest pending proposal as ``(flat float64 weights, layout label or None)``, or
        None when nothing arrived since the last call. Deserialised here, outside the lock."""
        self.poll()
        with self._lock:
            data, self._pending = self._pending, None
            if data is not None:
                self._taken += 1
        if data is None:
            return None
        msg = deserialize_message(data, Float64MultiArray)
        label = msg.layout.dim[0].label if msg.layout.dim else None
        return np.asarray(msg.data, dtype=np.float64), label

    def drain_rejections(self) -> int:
        """Size rejections since the previous call (for one aggregated record per period)."""
        with self._lock:
            n = self._size_rejected - self._rejections_drained
            self._rejections_drained = self._size_rejected
        return n

    def stats(self) -> dict:
        """Counters since construction; ``dropped`` = ``size_rejected + superseded`` (the
        safety node's ``flood_dropped``)."""
        with self._lock:
            return {"received": self._received, "size_rejected": self._size_rejected,
                    "superseded": self._superseded, "taken": self._taken,
                    "dropped": self._size_rejected + self._superseded}

    def destroy(self) -> None:
        """Stop the thread and destroy what the intake created (safe to call twice, and after
        the context was shut down)."""
        if self._destroyed:
            return
        self._destroyed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        try:
            self._sub_node.destroy_subscription(self._sub)
        except Exception:  # node already destroyed: the subscription went with it
            pass
        if self._executor is not None:
            try:
                self._executor.remove_node(self._helper)
                self._executor.shutdown(timeout_sec=1.0)
            except Exception:
                pass
        if self._helper is not None:
            try:
                self._helper.destroy_node()
            except Exception:
                pass
        with self._lock:
            self._pending = None
