"""The ``c_trpo`` learner composed with SCPO over real DDS: sim + expert + learner
(``algorithm: c_trpo``) + scpo_safety_node; C-TRPO's proposals reach the safety node and get
SCPO decisions, the learner re-bases on the certified weights, the plant never leaves its
limits, and every node shuts down cleanly."""
import numpy as np
import pytest

from scpo_ros.graph import SIMULATOR
from scpo_ros.policy import MLPLayout


def test_ctrpo_learner_proposals_are_certified_by_the_safety_node(tmp_path):
    pytest.importorskip("rclpy")
    import json

    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray, String

    from ros_graph_helpers import PARAMS, STARTUP_TIMEOUT, NodeProcess, Probe, wait_for
    from scpo_ros.ros.qos import CONTROL_QOS, EVENT_QOS, LATCHED_QOS
    from scpo_ros.scpo import STATUSES

    layout = MLPLayout(3, 1, (32, 32))      # the YAML's `hidden` for every node (/**)
    probe = Probe("ctrpo_probe")
    probe.record(Float64MultiArray, "proposed_weights", CONTROL_QOS)
    probe.record(Float64MultiArray, "certified_weights", LATCHED_QOS)
    probe.record(String, "scpo_decision", EVENT_QOS)
    probe.record(JointState, "joint_states", CONTROL_QOS)
    procs = []
    try:
        procs = [
            # small SCPO settings keep each certification step short on a loaded machine
            NodeProcess("scpo_safety_node", tmp_path, PARAMS, {
                "n_samples": 16, "n_sample_states": 64, "n_cert_states": 128, "horizon_s": 3.0}),
            NodeProcess("learner", tmp_path, PARAMS, {
                "algorithm": "c_trpo", "publish_rate_hz": 4.0, "sim_envs": 8, "sim_horizon": 25,
                "critic_epochs": 2, "epochs_per_proposal": 1}),
            NodeProcess("expert", tmp_path, PARAMS, {"malicious": False, "switch_period_s": 2.0}),
            NodeProcess(SIMULATOR, tmp_path, PARAMS, {}),
        ]

        def proposal_decisions():
            return [json.loads(m.data) for m in probe.messages("scpo_decision")
                    if json.loads(m.data)["kind"] == "proposal"]
        decisions = wait_for(lambda: len(proposal_decisions()) >= 4 and proposal_decisions(), STARTUP_TIMEOUT,
                             "SCPO decisions on four C-TRPO proposals")
        # let the plant run a while (>= 5 s at 20 Hz: the expert's references switch twice) under
        # whatever SCPO committed of C-TRPO's proposals
        wait_for(lambda: len(probe.messages("joint_states")) >= 100, 30.0, "100 plant states")
        decisions = proposal_decisions()
        assert all(d["status"] in STATUSES for d in decisions)
        proposals = [np.asarray(m.data) for m in probe.messages("proposed_weights")]
        labels = {m.layout.dim[0].label for m in probe.messages("proposed_weights")}
        assert labels == {layout.fingerprint}
        assert all(p.shape == (layout.size,) and np.all(np.isfinite(p)) for p in proposals)
        assert np.linalg.norm(proposals[-1] - proposals[0]) > 0            # C-TRPO is learning
    finally:
        probe.close()
        codes = {p.name: p.stop() for p in reversed(procs)}
    assert set(codes.values()) == {0}, {p.name: p.text()[-2000:] for p in procs}
    sim, safety, learner = (next(p for p in procs if p.name == n).summary()
                            for n in (SIMULATOR, "scpo_safety_node", "learner"))
    assert learner["algorithm"] == "c_trpo" and learner["last_update"]["epochs"] >= 1
    assert learner["update_errors"] == 0
    # the learner continued from what the safety node certified (at least its start-up certificate)
    assert learner["loaded_certified"] >= 1
    assert safety["malformed"] == 0 and sum(safety["updates"].values()) >= len(decisions)
    assert sim["steps"] > 0 and sim["constraint_violations"] == 0
