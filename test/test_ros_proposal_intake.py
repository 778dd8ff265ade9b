"""``ProposalIntake`` over real DDS: size check before deserialising, newest wins, namespaces.

The intake lives on an owner node inside the test process (spun by its own executor in a
thread, as the safety node's executor would); proposals come from a ``Probe`` in another
context. Every wait is a condition with a timeout. Every isolation is tested; in ``poll``
mode nothing is counted before a poll, so the waits poll (``intake.poll()``, what
``take()`` does first, without taking).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rclpy.serialization import serialize_message
from std_msgs.msg import Float64MultiArray, MultiArrayDimension

from ros_graph_helpers import Probe, SpunNode, wait_for
from scpo_ros.ros.proposal_intake import INTAKE_QOS, MAX_LABEL, ProposalIntake, cdr_size_range
from scpo_ros.ros.runner import make_executor

N = 1217                      # the safety node's default layout (3, 32, 32, 1)
FINGERPRINT = "7f19c98323715ef5"
NAMESPACE = "/intake_ns"


def proposal(values, label: str | None = FINGERPRINT) -> Float64MultiArray:
    msg = Float64MultiArray(data=np.asarray(values, dtype=float).tolist())
    if label is not None:
        msg.layout.dim = [MultiArrayDimension(label=label, size=len(msg.data), stride=len(msg.data))]
    return msg


# ------------------------------------------------------------------ pure: the size range

@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), label_len=st.integers(0, MAX_LABEL), with_layout=st.booleans())
def test_every_well_formed_size_is_inside_the_range(n, label_len, with_layout):
    lo, hi = cdr_size_range(n)
    size = len(serialize_message(proposal(np.zeros(n), "x" * label_len if with_layout else None)))
    assert lo <= size <= hi


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), off=st.integers(11, 3000), sign=st.sampled_from([-1, 1]),
       label_len=st.integers(0, MAX_LABEL), with_layout=st.booleans())
def test_a_length_off_by_eleven_or_more_is_outside(n, off, sign, label_len, with_layout):
    m = n + sign * off
    if m < 0:
        return
    lo, hi = cdr_size_range(n)
    size = len(serialize_message(proposal(np.zeros(m), "x" * label_len if with_layout else None)))
    assert not lo <= size <= hi


def test_a_label_longer_than_the_limit_is_outside():
    # the data is 8-aligned: a label up to 7 characters over the limit can hide in the padding
    lo, hi = cdr_size_range(N)
    assert len(serialize_message(proposal(np.zeros(N), "x" * (MAX_LABEL + 8)))) > hi
    assert hi - lo == 80           # XCDR1: one dimension with a 64-character label


# ------------------------------------------------------------------ the owner and the probe

class Owner(SpunNode):
    """A node in ``NAMESPACE`` spun by its own executor in a thread (its own context): the
    EventsExecutor of the nodes (``scpo_ros.ros.runner.make_executor``) or rclpy's default one."""

    def __init__(self, name: str = "owner", cli_args: list[str] | None = None, executor: str = "events"):
        super().__init__(name, lambda context: make_executor(executor, context=context), namespace=NAMESPACE,
                         cli_args=cli_args)


class RecordingIntake(ProposalIntake):
    """Remembers the last bytes its callback saw: the test can wait for the newest proposal
    to have arrived without peeking into (and emptying) the mailbox."""

    last_seen: bytes | None = None

    def _on_raw(self, data: bytes) -> None:
        super()._on_raw(data)
        self.last_seen = data


@pytest.fixture(scope="module")
def probe():
    p = Probe("intake_probe")
    yield p
    p.close()


@pytest.fixture(params=[("poll", "events"), ("group", "events"), ("group", "single"), ("thread", "events")],
                ids=lambda p: "-".join(p))
def owner_intake(request):
    isolation, executor = request.param
    owner = Owner(executor=executor)
    intake = RecordingIntake(owner.node, "proposed_weights", N, isolation=isolation)
    yield owner, intake
    intake.destroy()
    owner.close()


def publisher_to(probe: Probe, topic: str):
    pub = probe.node.create_publisher(Float64MultiArray, topic, INTAKE_QOS)
    wait_for(lambda: pub.get_subscription_count() >= 1, what=f"the intake on {topic}")
    return pub


def publish_and_wait(pub, intake: ProposalIntake, msg: Float64MultiArray) -> None:
    """One message, then wait until the intake's callback counted it (depth 1: a second
    message sent before the first was read could replace it inside DDS)."""
    before = intake.stats()["received"]
    pub.publish(msg)
    wait_for(lambda: intake.poll() or intake.stats()["received"] == before + 1, what="the proposal to arrive")


# ------------------------------------------------------------------ over DDS

def test_wrong_sizes_never_reach_take_and_a_valid_one_does(probe, owner_intake):
    owner, intake = owner_intake
    pub = publisher_to(probe, f"{NAMESPACE}/proposed_weights")
    wrong = [proposal([]), proposal(np.ones(3)), proposal(np.ones(N // 2)), proposal(np.ones(N + 11)),
             proposal(np.ones(2 * N)), proposal(np.ones(N - 11), label=None),
             proposal(np.ones(N), label="x" * (MAX_LABEL + 8))]
    for msg in wrong:
        publish_and_wait(pub, intake, msg)
    assert intake.take() is None
    s = intake.stats()
    assert (s["received"], s["size_rejected"], s["superseded"], s["taken"]) == (len(wrong), len(wrong), 0, 0)
    assert intake.drain_rejections() == len(wrong)
    assert intake.drain_rejections() == 0               # counted once

    theta = np.random.default_rng(3).standard_normal(N)
    publish_and_wait(pub, intake, proposal(theta))
    item = intake.take()
    assert item is not None
    flat, fingerprint = item
    assert fingerprint == FINGERPRINT
    assert flat.dtype == np.float64 and flat.shape == (N,)
    np.testing.assert_array_equal(flat, theta)
    assert intake.take() is None                        # taken once
    # no layout at all: passes the size check, the fingerprint is None (the node decides)
    publish_and_wait(pub, intake, proposal(theta, label=None))
    flat, fingerprint = intake.take()
    assert fingerprint is None and flat.shape == (N,)
    s = intake.stats()
    assert (s["received"], s["size_rejected"], s["taken"], s["dropped"]) == (len(wrong) + 2, len(wrong), 2,
                                                                              len(wrong))
    assert intake.drain_rejections() == 0


def test_a_burst_leaves_exactly_the_newest(probe, owner_intake):
    owner, intake = owner_intake
    pub = publisher_to(probe, f"{NAMESPACE}/proposed_weights")
    msgs = [serialize_message(proposal(np.full(N, float(i)))) for i in range(200)]
    for i in range(200):
        pub.publish(msgs[i])
        if i % 40 == 39 and i < 199:
            pub.publish(serialize_message(proposal(np.ones(7))))    # malformed ones in between
    wait_for(lambda: intake.poll() or intake.last_seen == msgs[-1], what="the newest proposal of the burst")
    s = intake.stats()
    # DDS (depth 1) may drop some in between; what arrived replaced what was pending
    assert 1 <= s["received"] - s["size_rejected"] <= 200
    assert s["superseded"] == s["received"] - s["size_rejected"] - 1
    assert s["size_rejected"] <= 4                  # the last one came after the last malformed
    flat, fingerprint = intake.take()
    assert fingerprint == FINGERPRINT
    assert np.all(flat == 199.0)
    assert intake.take() is None
    assert intake.stats()["taken"] == 1


def test_mailbox_counts_every_replaced_proposal(owner_intake):
    """The callback itself, 200 times in a row with nothing taken: 199 superseded."""
    _owner, intake = owner_intake
    msgs = [serialize_message(proposal(np.full(N, float(i)))) for i in range(200)]
    for m in msgs:
        intake._on_raw(m)
    intake._on_raw(b"\0" * 8)                            # too short: dropped, the mailbox untouched
    s = intake.stats()
    assert (s["received"], s["size_rejected"], s["superseded"]) == (201, 1, 199)
    flat, _ = intake.take()
    assert np.all(flat == 199.0)


def test_destroy_twice_is_safe_and_removes_the_subscription(probe, owner_intake):
    owner, intake = owner_intake
    pub = publisher_to(probe, f"{NAMESPACE}/proposed_weights")
    publish_and_wait(pub, intake, proposal(np.zeros(N)))
    intake.destroy()
    intake.destroy()
    assert intake.take() is None                        # the pending one went with it
    wait_for(lambda: pub.get_subscription_count() == 0, what="the subscription to disappear")
    if intake._thread is not None:
        assert not intake._thread.is_alive()
    if intake.isolation != "group":
        wait_for(lambda: "owner_proposal_intake" not in probe.node.get_node_names(),
                 what="the helper node to disappear")


def test_the_owner_namespace_is_respected(probe, owner_intake):
    owner, intake = owner_intake
    assert intake.topic == f"{NAMESPACE}/proposed_weights"
    inside = publisher_to(probe, f"{NAMESPACE}/proposed_weights")
    outside = probe.node.create_publisher(Float64MultiArray, "/proposed_weights", INTAKE_QOS)
    # discovery of the intake is done (inside matched); the root topic has no subscriber
    assert outside.get_subscription_count() == 0
    publish_and_wait(inside, intake, proposal(np.zeros(N)))
    if intake.isolation != "group":
        # node names arrive by their own discovery, after the topic match: wait for it
        wait_for(lambda: ("owner_proposal_intake", NAMESPACE) in probe.node.get_node_names_and_namespaces(),
                 what="the helper node in the owner's namespace")


@pytest.mark.parametrize("isolation", ["poll", "group", "thread"])
def test_the_owner_remapping_applies(probe, isolation):
    owner = Owner(cli_args=["--ros-args", "-r", "proposed_weights:=other_weights"])
    intake = ProposalIntake(owner.node, "proposed_weights", N, isolation=isolation)
    try:
        assert intake.topic == f"{NAMESPACE}/other_weights"
        pub = publisher_to(probe, f"{NAMESPACE}/other_weights")
        publish_and_wait(pub, intake, proposal(np.ones(N)))
        flat, _ = intake.take()
        assert np.all(flat == 1.0)
    finally:
        intake.destroy()
        owner.close()


def test_bad_arguments_are_refused():
    owner = Owner(name="owner_bad_args")
    try:
        with pytest.raises(ValueError):
            ProposalIntake(owner.node, "proposed_weights", N, isolation="process")
        with pytest.raises(ValueError):
            cdr_size_range(-1)
    finally:
        owner.close()
