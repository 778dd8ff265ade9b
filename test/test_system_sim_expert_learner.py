"""Simulator, expert and learner over real DDS: topics, reset service, refused input, parameters."""
import numpy as np
import pytest

pytest.importorskip("rclpy")

from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Bool, Float64MultiArray  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from ros_graph_helpers import PARAMS, STARTUP_TIMEOUT, NodeProcess, Probe, wait_for  # noqa: E402
from scpo_ros.graph import SIMULATOR  # noqa: E402
from scpo_ros.policy import MLPLayout  # noqa: E402
from scpo_ros.ros.diagnostics import OK, diagnostic_values  # noqa: E402
from scpo_ros.ros.qos import CONTROL_QOS  # noqa: E402


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("nodes")
    procs = [
        NodeProcess(SIMULATOR, log_dir, PARAMS, {"initial_state": [0.3, 0.0], "rate_hz": 50.0}),
        # malicious from the start: duty 1 makes every demonstration a malicious one
        NodeProcess("expert", log_dir, PARAMS, {"malicious": True, "malicious_duty": 1.0}),
        NodeProcess("learner", log_dir, PARAMS, {"min_samples": 10, "publish_rate_hz": 5.0,
                                                 "follow_certified": False}),
    ]
    probe = Probe("nodes_probe")
    probe.cmd_pub = probe.node.create_publisher(Float64MultiArray, "cmd", CONTROL_QOS)
    for typ, topic in ((JointState, "joint_states"), (Float64MultiArray, "expert_action"),
                       (Float64MultiArray, "reference"), (Bool, "malicious"),
                       (Float64MultiArray, "proposed_weights")):
        probe.record(typ, topic, CONTROL_QOS)
    probe.record_diagnostics()
    try:
        wait_for(lambda: probe.messages("proposed_weights"), STARTUP_TIMEOUT, "the learner's first proposal")
        yield probe
    finally:
        probe.close()
        codes = [p.stop() for p in procs]
        assert codes == [0, 0, 0], [p.text()[-2000:] for p in procs]
        for p in procs:   # the runner prints it, once per node
            assert p.text().count("SUMMARY ") == 1, p.text()[-2000:]
            assert p.summary()["node"] == p.name


def test_sim_publishes_state_and_resets(nodes):
    st = wait_for(lambda: nodes.messages("joint_states"), what="states")[-1]
    assert list(st.name) == ["axis_0"] and len(st.position) == 1 and len(st.velocity) == 1
    assert st.header.stamp.sec > 0
    nodes.cmd_pub.publish(Float64MultiArray(data=[0.5]))
    wait_for(lambda: nodes.messages("joint_states")[-1].velocity[0] > 0.05, what="the command to act")
    services = dict(nodes.node.get_service_names_and_types())
    assert services.get(f"/{SIMULATOR}/reset") == ["std_srvs/srv/Trigger"] and "/reset" not in services
    res = nodes.call(Trigger, f"/{SIMULATOR}/reset", Trigger.Request())
    assert res.success
    wait_for(lambda: abs(nodes.messages("joint_states")[-1].position[0] - 0.3) < 1e-9, what="state back to 0.3")


def test_diagnostics_name_each_node_by_its_fully_qualified_name(nodes):
    """``hardware_id`` tells two namespaced copies of a node apart (the compare graph runs two
    simulators and two experts)."""
    for name in (SIMULATOR, "expert", "learner"):
        st = wait_for(lambda name=name: nodes.statuses(f"{name}: "), what=f"{name}'s diagnostics")[-1]
        assert st.hardware_id == f"/{name}"


def test_sim_refuses_bad_commands_and_params(nodes):
    nodes.cmd_pub.publish(Float64MultiArray(data=[float("nan")]))
    nodes.cmd_pub.publish(Float64MultiArray(data=[0.1, 0.2]))

    def refused():
        for s in nodes.statuses(f"{SIMULATOR}: plant"):
            if int(diagnostic_values(s)["refused_commands"]) >= 2:
                return s
    status = wait_for(refused, what="refused commands in the diagnostics")
    assert status.level != OK
    bad = nodes.call(SetParameters, f"/{SIMULATOR}/set_parameters", SetParameters.Request(parameters=[
        Parameter(name="rate_hz", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=-5.0))]))
    assert not bad.results[0].successful
    bad = nodes.call(SetParameters, f"/{SIMULATOR}/set_parameters", SetParameters.Request(parameters=[
        Parameter(name="initial_state", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE_ARRAY,
                                                             double_array_value=[0.1, 0.2, 0.3]))]))
    assert not bad.results[0].successful and "initial_state" in bad.results[0].reason
    ok = nodes.call(SetParameters, f"/{SIMULATOR}/set_parameters", SetParameters.Request(parameters=[
        Parameter(name="noise_std", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=0.01))]))
    assert ok.results[0].successful


def test_expert_demonstrates_malicious_actions(nodes):
    acts = wait_for(lambda: nodes.messages("expert_action"), what="expert actions")
    refs = wait_for(lambda: nodes.messages("reference"), what="references")
    mal = wait_for(lambda: nodes.messages("malicious"), what="malicious flags")
    assert all(m.data for m in mal)
    assert refs[0].data[0] == pytest.approx(0.4)            # the schedule's first reference
    # a malicious demonstration drives towards the target beyond the position limit: no clipping to u_limit
    assert any(abs(a.data[0]) > 0.9 for a in acts)


def test_learner_proposes_fingerprinted_weights(nodes):
    layout = MLPLayout(3, 1, (32, 32))
    props = wait_for(lambda: nodes.messages("proposed_weights")[1:], what="two proposals")
    msg = props[-1]
    assert msg.layout.dim[0].label == layout.fingerprint
    assert len(msg.data) == layout.size == msg.layout.dim[0].size
    assert np.all(np.isfinite(msg.data))
    first = np.asarray(nodes.messages("proposed_weights")[0].data)
    assert np.linalg.norm(np.asarray(msg.data) - first) > 0     # it learns


def test_the_plant_is_one_read_only_file_parameter_in_every_node(nodes):
    """``plant_file``: the same read-only parameter (and default) in the simulator, the expert and
    the learner, from ``PLANT_PARAMS``; no node declares a plant parameter of its own, and no
    description asks to keep two nodes in step by hand."""
    from rcl_interfaces.srv import DescribeParameters, ListParameters

    from scpo_ros.params import PLANT_PARAMS
    from scpo_ros.ros.parameters import descriptor

    spec = PLANT_PARAMS[0]
    for node in (SIMULATOR, "expert", "learner"):
        d, = nodes.call(DescribeParameters, f"/{node}/describe_parameters",
                        DescribeParameters.Request(names=[spec.name])).descriptors
        assert d.read_only and d.description == descriptor(spec).description, node
        listed = nodes.call(ListParameters, f"/{node}/list_parameters", ListParameters.Request()).result.names
        old = {"dof", "dt", "p_max", "v_max", "u_max", "q_pos", "q_vel", "r_act", "p0_max", "v0_max", "r_max"}
        assert not old & set(listed), (node, sorted(old & set(listed)))
        every = nodes.call(DescribeParameters, f"/{node}/describe_parameters",
                           DescribeParameters.Request(names=list(listed))).descriptors
        assert not [d.name for d in every if "must match" in d.description], node
