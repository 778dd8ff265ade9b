"""scpo_safety_node over real DDS: lifecycle, control law, region fallback, stale state,
malformed and valid proposals, runtime parameters. One node process for the module.
Its ROS-free parts have their own tests: test_control_law.py, test_safety_model.py,
test_scpo_worker.py."""
import json
import math
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from lifecycle_msgs.msg import State, Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray, String  # noqa: E402

from attack_helpers import background, ros_parameter  # noqa: E402
from ros_graph_helpers import PARAMS, STARTUP_TIMEOUT, NodeProcess, Probe, wait_for  # noqa: E402
from scpo_ros.backup import LQRBackup  # noqa: E402
from scpo_ros.plant import load_plant  # noqa: E402
from scpo_ros.policy import MLPLayout  # noqa: E402
from scpo_ros.residual_scpo import backup_weights  # noqa: E402
from scpo_ros.ros.diagnostics import ERROR, OK  # noqa: E402
from scpo_ros.ros.messages import weights_to_msg  # noqa: E402
from scpo_ros.ros.qos import CONTROL_QOS, EVENT_QOS, LATCHED_QOS  # noqa: E402
from scpo_ros.scpo import COMMITTED, STATUSES  # noqa: E402

NODE = "/scpo_safety_node"
LAYOUT = MLPLayout(3, 1, (32, 32))
# the node's plant and backup (config/scpo.yaml's plant_file: the shipped double integrator)
PLANT = load_plant("double_integrator")
BACKUP = LQRBackup(PLANT)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("safety_node")
    # small SCPO settings keep the worker's steps short; autostart off to drive the lifecycle
    node = NodeProcess("scpo_safety_node", log_dir, PARAMS, {
        "autostart": False, "n_samples": 16, "n_sample_states": 64, "n_cert_states": 128, "horizon_s": 3.0,
        "state_timeout": 0.3, "monitor_enabled": False})   # the probe's states follow no dynamics
    probe = Probe()
    probe.state_pub = probe.node.create_publisher(JointState, "joint_states", CONTROL_QOS)
    probe.ref_pub = probe.node.create_publisher(Float64MultiArray, "reference", CONTROL_QOS)
    probe.weights_pub = probe.node.create_publisher(Float64MultiArray, "proposed_weights", EVENT_QOS)
    probe.record(Float64MultiArray, "cmd", CONTROL_QOS)
    probe.record(Float64MultiArray, "certified_weights", LATCHED_QOS)
    probe.record(String, "scpo_decision", EVENT_QOS)
    probe.record(String, "safety_mode", LATCHED_QOS)
    probe.record_diagnostics()
    try:
        wait_for(lambda: probe.node.count_publishers("/diagnostics") > 0 and "SCPO safety node" in node.text(),
                 STARTUP_TIMEOUT, "the safety node to start")
        probe.proc = node
        yield probe
    finally:
        probe.close()
        code = node.stop()
        assert code == 0, node.text()[-3000:]


def transition(probe, tid):
    return probe.call(ChangeState, f"{NODE}/change_state", ChangeState.Request(transition=Transition(id=tid)))


def lifecycle_state(probe):
    return probe.call(GetState, f"{NODE}/get_state", GetState.Request()).current_state.id


def ensure_active(probe):
    """Tests after the lifecycle test need an active node; run alone they bring it there."""
    state = lifecycle_state(probe)
    if state == State.PRIMARY_STATE_UNCONFIGURED:
        assert transition(probe, Transition.TRANSITION_CONFIGURE).success
        state = lifecycle_state(probe)
    if state == State.PRIMARY_STATE_INACTIVE:
        assert transition(probe, Transition.TRANSITION_ACTIVATE).success
    assert lifecycle_state(probe) == State.PRIMARY_STATE_ACTIVE


def send_state(probe, p, v):
    msg = JointState(name=["axis_0"], position=[float(p)], velocity=[float(v)])
    msg.header.stamp = probe.node.get_clock().now().to_msg()
    probe.state_pub.publish(msg)


def command_for(probe, p, v, timeout=10.0):
    """Publish states until a command newer than the publish arrives; return it."""
    since = time.monotonic()

    def got():
        cmds = probe.messages("cmd", since)
        if cmds:
            return cmds[-1]
        send_state(probe, p, v)
        time.sleep(0.05)
        return None
    return wait_for(got, timeout, "a command")


def streaming_states(probe, p, v, period=0.05):
    """Publish the same state every ``period`` s in the background (a plant that keeps running)."""
    return background(lambda: send_state(probe, p, v), period)


def set_param(probe, name, value):
    res = probe.call(SetParameters, f"{NODE}/set_parameters",
                     SetParameters.Request(parameters=[ros_parameter(name, value)]))
    return res.results[0]


def test_lifecycle_configure_activate(graph):
    assert lifecycle_state(graph) == State.PRIMARY_STATE_UNCONFIGURED
    assert transition(graph, Transition.TRANSITION_CONFIGURE).success
    assert lifecycle_state(graph) == State.PRIMARY_STATE_INACTIVE
    # configured but inactive: inactive means safe, not silent (inactive_behavior: fallback):
    # every state is answered with the envelope's fallback, never with the policy
    wait_for(lambda: graph.node.count_subscribers("/joint_states") > 0, what="the node's state subscription")
    since = time.monotonic()
    cmd = command_for(graph, 0.1, 0.0)
    assert cmd.layout.dim[0].label == "backup"
    assert np.allclose(cmd.data, BACKUP(np.array([0.1, 0.0]), np.zeros(1)))
    assert all(m.layout.dim[0].label == "backup" for m in graph.messages("cmd", since))
    assert transition(graph, Transition.TRANSITION_ACTIVATE).success
    assert lifecycle_state(graph) == State.PRIMARY_STATE_ACTIVE
    # the first certification (the backup's weights) is published
    wait_for(lambda: any(d["kind"] == "recertify" and d["status"] == "accepted"
                         for d in graph.json_messages("scpo_decision")), 60.0, "the initial certification")
    assert graph.messages("certified_weights")[-1].layout.dim[0].label == LAYOUT.fingerprint


def test_control_law_is_certified_backup_at_start(graph):
    ensure_active(graph)
    # a fallback (stale hold while nobody published) returns to the policy after
    # policy_return_steps qualifying states: keep the plant "running"
    cmd = wait_for(lambda: (c := command_for(graph, 0.3, -0.1)).layout.dim[0].label == "policy" and c,
                   what="a policy command")
    x = np.array([0.3, -0.1])
    expected = BACKUP(x, np.zeros(1))
    assert np.allclose(cmd.data, expected, atol=1e-9)


def test_outside_certified_region_backup_alone(graph):
    ensure_active(graph)
    since = time.monotonic()
    cmd = command_for(graph, 0.95, 0.0)   # |p| > 0.8, the file's certified region
    assert cmd.layout.dim[0].label == "backup"
    assert np.allclose(cmd.data, BACKUP(np.array([0.95, 0.0]), np.zeros(1)))
    wait_for(lambda: any(json.loads(m.data)["mode"] == "backup_region" for m in graph.messages("safety_mode", since)),
             what="safety_mode backup_region")
    # back inside: the policy again, after policy_return_steps qualifying states (hysteresis)
    back = time.monotonic()
    wait_for(lambda: command_for(graph, 0.1, 0.0).layout.dim[0].label == "policy", what="the policy again")
    labels = [m.layout.dim[0].label for m in graph.messages("cmd", back)]
    assert labels.index("policy") >= 4, labels


def test_stale_state_hold_and_recovery(graph):
    ensure_active(graph)
    command_for(graph, 0.2, 0.1)
    t_last = time.monotonic()
    holds = wait_for(lambda: [m for m in graph.messages("cmd", t_last) if m.layout.dim[0].label == "hold"],
                     what="hold commands")
    assert np.all(np.isfinite(holds[0].data))
    # hold_mode backup_predicted: the backup of the last state propagated by the model
    assert np.sign(holds[0].data[0]) == np.sign(BACKUP(np.array([0.2, 0.1]), np.zeros(1))[0])
    err = wait_for(lambda: [s for s in graph.statuses("scpo_safety_node: control", t_last) if s.level == ERROR],
                   what="ERROR diagnostic")
    assert "STALE" in err[0].message
    # recovery by itself with the next state
    since = time.monotonic()
    wait_for(lambda: command_for(graph, 0.1, 0.0).layout.dim[0].label == "policy", what="recovery")
    wait_for(lambda: any(json.loads(m.data)["mode"] == "policy" for m in graph.messages("safety_mode", since)),
             what="mode back to policy")


@pytest.mark.parametrize("case", ["nan", "wrong_length", "wrong_fingerprint", "no_fingerprint"])
def test_malformed_proposals_rejected(graph, case):
    ensure_active(graph)
    theta = backup_weights(LAYOUT).astype(float)
    if case == "nan":
        theta[3] = math.nan
        msg = weights_to_msg(theta, LAYOUT.fingerprint)
    elif case == "wrong_length":
        msg = weights_to_msg(theta[:-5], LAYOUT.fingerprint)
    elif case == "wrong_fingerprint":
        msg = weights_to_msg(theta, MLPLayout(3, 1, (16,)).fingerprint)
    else:
        msg = Float64MultiArray(data=theta.tolist())
    since = time.monotonic()
    graph.weights_pub.publish(msg)
    rec = wait_for(lambda: [d for d in graph.json_messages("scpo_decision", since) if d["kind"] == "malformed"],
                   what="a malformed-proposal decision")
    assert rec[0]["status"] == "rejected"
    words = {"nan": "NaN", "wrong_length": "expected", "wrong_fingerprint": "fingerprint",
             "no_fingerprint": "fingerprint"}[case]
    assert words in rec[0]["reason"]
    diag = wait_for(lambda: [s for s in graph.statuses("scpo_safety_node: weights", since) if "malformed" in s.message
                             and s.level != OK], what="weights diagnostic")
    assert "rejected" in diag[0].message
    assert graph.proc.alive()
    wait_for(lambda: command_for(graph, 0.1, 0.0).layout.dim[0].label == "policy", what="policy")   # unaffected


def test_valid_and_huge_proposals_go_through_scpo(graph):
    ensure_active(graph)
    theta = backup_weights(LAYOUT).astype(float)
    rng = np.random.default_rng(0)
    since = time.monotonic()
    huge = theta + 50.0 * rng.standard_normal(theta.size)   # far outside anything safe
    graph.weights_pub.publish(weights_to_msg(huge, LAYOUT.fingerprint))
    rec = wait_for(lambda: [d for d in graph.json_messages("scpo_decision", since) if d["kind"] == "proposal"],
                   60.0, "an SCPO decision")[0]
    assert rec["status"] in STATUSES
    assert set(rec["times_ms"]) >= {"total"}
    # never more than the trust radius from the certified weights
    assert rec["committed_step_norm"] <= 0.05 + 1e-6
    if rec["status"] in COMMITTED:
        w = wait_for(lambda: [m for m in graph.messages("certified_weights", since)], 10.0, "certified weights")
        assert np.linalg.norm(np.asarray(w[-1].data) - theta) <= 0.05 + 1e-5
        assert all(v <= 0 for v in rec["margins_after"].values())


def test_runtime_parameters(graph):
    ensure_active(graph)
    bad = set_param(graph, "n_samples", 1)                   # below its range
    assert not bad.successful and bad.reason
    bad = set_param(graph, "x_max_tight", [2.0, 1.0])        # loosens the file's x_max: refused, key named
    assert not bad.successful and "x_max_tight" in bad.reason and "loosen" in bad.reason
    bad = set_param(graph, "x_max_tight", [0.5, 1.0])        # the certified region (|p| <= 0.8) left outside
    assert not bad.successful and "x_max" in bad.reason
    bad = set_param(graph, "x_max_tight", [0.9])              # one value for two states
    assert not bad.successful and "x_max_tight" in bad.reason
    bad = set_param(graph, "u_max_tight", [float("nan")])     # NaN: never
    assert not bad.successful
    bad = set_param(graph, "plant_file", "package://scpo_ros/config/plants/dc_motor.yaml")   # read-only
    assert not bad.successful
    bad = set_param(graph, "horizon_s", 0.0)                  # below its range
    assert not bad.successful
    with streaming_states(graph, 0.1, 0.0):
        wait_for(lambda: graph.messages("cmd", time.monotonic() - 0.1)
                 and graph.messages("cmd", time.monotonic() - 0.1)[-1].layout.dim[0].label == "policy",
                 what="policy commands")
        since = time.monotonic()
        ok = set_param(graph, "x_max_tight", [0.98, float("inf")])   # tighter position limit: re-certification
        assert ok.successful, ok.reason
        rec = wait_for(lambda: [d for d in graph.json_messages("scpo_decision", since) if d["kind"] == "recertify"],
                       60.0, "re-certification after the change")
        assert rec[0]["status"] in ("accepted", "rejected")
        assert any(json.loads(m.data)["mode"] == "backup_recertifying" for m in graph.messages("safety_mode", since))
        # the weights re-certified (or the backup's) are in force again
        wait_for(lambda: graph.messages("cmd", time.monotonic() - 0.1)
                 and graph.messages("cmd", time.monotonic() - 0.1)[-1].layout.dim[0].label == "policy",
                 30.0, "policy after re-certification")
    ok = set_param(graph, "state_timeout", 0.5)
    assert ok.successful
    assert graph.proc.alive()


def test_lifecycle_deactivate_cleanup(graph):
    ensure_active(graph)
    assert transition(graph, Transition.TRANSITION_DEACTIVATE).success
    assert lifecycle_state(graph) == State.PRIMARY_STATE_INACTIVE
    since = time.monotonic()
    assert command_for(graph, 0.1, 0.0).layout.dim[0].label == "backup"      # inactive: the fallback
    assert transition(graph, Transition.TRANSITION_CLEANUP).success
    assert lifecycle_state(graph) == State.PRIMARY_STATE_UNCONFIGURED
    assert command_for(graph, 0.1, 0.0).layout.dim[0].label == "backup"      # unconfigured: the fallback
    assert not [m for m in graph.messages("cmd", since) if m.layout.dim[0].label == "policy"]
    assert transition(graph, Transition.TRANSITION_CONFIGURE).success
    assert transition(graph, Transition.TRANSITION_ACTIVATE).success
    assert command_for(graph, 0.1, 0.0, timeout=30.0).layout.dim[0].label in ("policy", "backup")
