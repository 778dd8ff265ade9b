"""rosbag2 bags without ROS tooling, through ``rosbags``.

Writing: MCAP (default) or sqlite3 storage, metadata version 9, i.e. what ``ros2 bag
record`` writes on Kilted, with each topic's ``offered_qos_profiles`` (the QoS of its
publishers): ``ros2 bag play`` publishes a topic whose publishers all offered
transient-local (a latched topic) transient-local again, and with no profiles volatile.
The recorder hands over the CDR bytes exactly as they came off the wire (a ``raw=True``
subscription): no deserialise/serialise round trip, and no
``rclpy.serialization.serialize_message`` (its trailing padding makes rosbags reject the
message with "CDR message size mismatch").

Reading: any rosbag2 bag, ours or from ``ros2 bag record`` (MCAP or sqlite3, metadata
v4..v9). Message definitions come from the bag where it stores them (MCAP), else from
the Kilted typestore.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rosbags.highlevel import AnyReader
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


def typestore():
    return get_typestore(Stores.ROS2_KILTED)


def _qos_time(duration) -> QosTime:
    ns = int(duration.nanoseconds)
    return QosTime(ns // 10**9, ns % 10**9)


def qos_from_profile(profile) -> Qos:
    """A QoS profile as rosbag2 stores it, from an object with rclpy ``QoSProfile``'s fields
    (policies as enums named like rmw's, durations with ``nanoseconds``); an infinite
    duration (rmw's ``INT64_MAX`` ns) stays ``9223372036 s 854775807 ns`` as rosbag2 writes it."""
    return Qos(QosHistory[profile.history.name], int(profile.depth), QosReliability[profile.reliability.name],
               QosDurability[profile.durability.name], _qos_time(profile.deadline), _qos_time(profile.lifespan),
               QosLiveliness[profile.liveliness.name], _qos_time(profile.liveliness_lease_duration),
               bool(profile.avoid_ros_namespace_conventions))


class BagWriter:
    """rosbag2 writer for raw CDR messages: ``add_topic`` once per topic, then ``write``."""

    def __init__(self, path: str | Path, storage: str = "mcap", version: int = 9):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {sorted(STORAGES)}, got {storage!r}")
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"bag {self.path} already exists")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.typestore = typestore()
        self._writer = Writer(self.path, version=version, storage_plugin=STORAGES[storage])
        self._writer.open()
        self._connections: dict[str, object] = {}
        self.counts: dict[str, int] = {}

    def add_topic(self, topic: str, msgtype: str, offered_qos: Sequence[Qos] = ()) -> None:
        """Register ``topic`` with a ROS 2 type name such as ``sensor_msgs/msg/JointState`` and
        the QoS profiles its publishers offer (``qos_from_profile``; one per publisher)."""
        if topic in self._connections:
            return
        if msgtype not in self.typestore.types:
            raise KeyError(f"type {msgtype} of {topic} is not in the Kilted typestore")
        self._connections[topic] = self._writer.add_connection(topic, msgtype, typestore=self.typestore,
                                                               offered_qos_profiles=list(offered_qos))
        self.counts[topic] = 0

    def write(self, topic: str, timestamp_ns: int, data: bytes) -> None:
        self._writer.write(self._connections[topic], int(timestamp_ns), bytes(data))
        self.counts[topic] += 1

    def close(self) -> None:
        """Finish the file and write ``metadata.yaml`` (a bag is unreadable without it)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class BagMessage:
    topic: str
    msgtype: str
    log_time_ns: int
    msg: object


def read_messages(path: str | Path, topics: Sequence[str] | None = None) -> Iterator[BagMessage]:
    """Deserialised messages in log-time order; ``topics`` filters (exact names)."""
    with AnyReader([Path(path)], default_typestore=typestore()) as reader:
        conns = [c for c in reader.connections if topics is None or c.topic in topics]
        for conn, t, raw in reader.messages(connections=conns):
            yield BagMessage(conn.topic, conn.msgtype, t, reader.deserialize(raw, conn.msgtype))


def offered_qos(path: str | Path) -> dict[str, list[Qos]]:
    """topic -> the QoS profiles its publishers offered, as the bag recorded them."""
    with AnyReader([Path(path)], default_typestore=typestore()) as reader:
        return {c.topic: list(c.ext.offered_qos_profiles) for c in reader.connections}


def bag_topics(path: str | Path) -> dict[str, tuple[str, int]]:
    """topic -> (type, message count)."""
    with AnyReader([Path(path)], default_typestore=typestore()) as reader:
        out: dict[str, tuple[str, int]] = {}
        for c in reader.connections:
            typ, n = out.get(c.topic, (c.msgtype, 0))
            out[c.topic] = (typ, n + c.msgcount)
        return out
