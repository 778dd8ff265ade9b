"""The bag recorder node over real DDS (with the simulator as its source): an MCAP bag whose
violation count equals the simulator's, and whose latched topic, published before the recorder
existed, is in the bag with its transient-local QoS."""
import json

import pytest
from rosbags.interfaces import QosDurability, QosReliability

from scpo_ros.analysis import analyze
from scpo_ros.bag import offered_qos
from scpo_ros.graph import SAFETY_MODE, SIMULATOR


def test_recorded_mcap_violations_match_simulator(tmp_path):
    pytest.importorskip("rclpy")
    from std_msgs.msg import String

    from ros_graph_helpers import PARAMS, STARTUP_TIMEOUT, NodeProcess, Probe, wait_for
    from scpo_ros.ros.diagnostics import diagnostic_values
    from scpo_ros.ros.qos import LATCHED_QOS

    bag = tmp_path / "bag"
    # a latched topic, published once before the recorder exists: it must still reach the bag,
    # and the bag must say transient-local, so that `ros2 bag play` replays it latched
    probe = Probe("bag_test_probe")
    latched = probe.node.create_publisher(String, SAFETY_MODE, LATCHED_QOS)
    latched.publish(String(data=json.dumps({"mode": "inactive"})))
    recorder = NodeProcess("bag_recorder", tmp_path, PARAMS, {"output": str(bag), "topics": ["joint_states",
                           "cmd", "constraint_violation", SAFETY_MODE, "plant", "/diagnostics"]})
    # no controller: the plant drifts out of |p| <= 1 at 0.5 m/s
    sim = NodeProcess(SIMULATOR, tmp_path, PARAMS, {"initial_state": [0.0, 0.5], "rate_hz": 100.0,
                                                    "wait_for_subscribers": 1})
    try:
        probe.record_diagnostics()

        def violations():
            for s in probe.statuses(f"{SIMULATOR}: plant"):
                n = int(diagnostic_values(s)["constraint_violations"])
                if n >= 20:
                    return n
            return None
        wait_for(violations, STARTUP_TIMEOUT, "20 violations reported by the simulator")
        # the probe's participant may be discovered after the simulator's: wait until the recorder
        # reports the latched value written (its diagnostics carry the counts)
        def latched_recorded():
            return any(json.loads(diagnostic_values(s).get("counts", "{}")).get(f"/{SAFETY_MODE}", 0) >= 1
                       for s in probe.statuses("bag_recorder: recording"))
        wait_for(latched_recorded, STARTUP_TIMEOUT, "the latched value in the bag")
    finally:
        probe.close()
        assert sim.stop() == 0
        assert recorder.stop() == 0
    reported = sim.summary()
    assert (bag / "metadata.yaml").exists()
    assert "version: 9" in (bag / "metadata.yaml").read_text()
    metrics, _ = analyze(bag)
    assert metrics["constraint_violations"] == reported["constraint_violations"] >= 20
    assert metrics["constraint_violations_from_states"] == reported["constraint_violations"]
    assert reported["states_published"] == reported["steps"] + 1
    assert reported["states_published"] - 3 <= metrics["states"] <= reported["states_published"]   # load: ≤ 3 lost
    assert metrics["limits"]["source"] == "plant topic"     # the simulator's latched record, in the bag
    assert metrics["limits"]["plant"] == "double_integrator"
    assert recorder.summary()["counts"][f"/{SAFETY_MODE}"] == 1
    qos = offered_qos(bag)
    assert [q.durability for q in qos[f"/{SAFETY_MODE}"]] == [QosDurability.TRANSIENT_LOCAL]
    assert [q.durability for q in qos["/joint_states"]] == [QosDurability.VOLATILE]
    assert all(q.reliability == QosReliability.RELIABLE for q in qos["/joint_states"])
