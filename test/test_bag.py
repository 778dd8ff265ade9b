"""Bags (``bag.py``): the offered QoS profiles a bag keeps per topic."""
import types

import pytest
from rosbags.interfaces import QosDurability, QosHistory, QosReliability

from scpo_ros.bag import BagWriter, offered_qos, qos_from_profile, typestore
from scpo_ros.graph import CERTIFIED_WEIGHTS, CMD, SAFETY_MODE, TOPIC_TYPES

INFINITE_NS = 2**63 - 1
"""rmw's RMW_DURATION_INFINITE, as rclpy reports an unset deadline, lifespan or lease."""


def _profile(durability: str, reliability: str = "RELIABLE", depth: int = 1):
    """An object with rclpy ``QoSProfile``'s fields (what ``get_publishers_info_by_topic`` gives)."""
    name = types.SimpleNamespace
    forever = name(nanoseconds=INFINITE_NS)
    return name(history=name(name="KEEP_LAST"), depth=depth, reliability=name(name=reliability),
                durability=name(name=durability), deadline=forever, lifespan=forever,
                liveliness=name(name="AUTOMATIC"), liveliness_lease_duration=forever,
                avoid_ros_namespace_conventions=False)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_the_bag_keeps_each_topics_offered_qos(tmp_path, storage):
    """``ros2 bag play`` publishes a topic with the QoS its recorded publishers offered: a
    latched topic replays transient-local only if the bag says so."""
    bag = tmp_path / "bag"
    writer = BagWriter(bag, storage=storage)
    writer.add_topic(f"/ns/{SAFETY_MODE}", TOPIC_TYPES[SAFETY_MODE], [qos_from_profile(_profile("TRANSIENT_LOCAL"))])
    writer.add_topic(f"/ns/{CERTIFIED_WEIGHTS}", TOPIC_TYPES[CERTIFIED_WEIGHTS])          # no publisher seen
    writer.add_topic(f"/ns/{CMD}", TOPIC_TYPES[CMD], [qos_from_profile(_profile("VOLATILE", depth=10)),
                                                      qos_from_profile(_profile("VOLATILE", "BEST_EFFORT"))])
    String = typestore().types["std_msgs/msg/String"]
    writer.write(f"/ns/{SAFETY_MODE}", 1, typestore().serialize_cdr(String(data="{}"), "std_msgs/msg/String"))
    writer.close()
    qos = offered_qos(bag)
    (latched,) = qos[f"/ns/{SAFETY_MODE}"]
    assert latched.durability == QosDurability.TRANSIENT_LOCAL and latched.reliability == QosReliability.RELIABLE
    assert latched.history == QosHistory.KEEP_LAST and latched.depth == 1
    assert (latched.deadline.sec, latched.deadline.nsec) == (9223372036, 854775807)   # infinite, as rosbag2 writes it
    assert qos[f"/ns/{CERTIFIED_WEIGHTS}"] == []
    assert [q.reliability for q in qos[f"/ns/{CMD}"]] == [QosReliability.RELIABLE, QosReliability.BEST_EFFORT]
    assert [q.depth for q in qos[f"/ns/{CMD}"]] == [10, 1]
    # metadata v9 writes the policies by name, as rosbag2 does from Jazzy on
    assert "durability: transient_local" in (bag / "metadata.yaml").read_text()
