"""The model monitor over real DDS: ``plant_sim`` simulating a plant that differs from the model,
``scpo_safety_node`` certifying for the model and its declared uncertainty.

The plant file is the robust study's (``double_integrator_uncertain``: the input gain ±30 %, a
disturbance of 10 % of ``u_max``), written to a file of the test's. One graph for the module,
three phases driven by ``plant_sim``'s runtime parameters: inside the declared uncertainty
(the model at the edge of its declared set, a bounded disturbance at its declared box every
step): the monitor stays quiet and the plant
inside its limits; beyond it (``model_mismatch`` 4): it trips within its trip rule, the node
goes to ``backup_model_mismatch`` with an ERROR ``model`` diagnostic, the fallback acts, and a
proposal is not taken; back inside: it clears and the policy returns."""
import time

import pytest
import yaml

rclpy = pytest.importorskip("rclpy")

from std_msgs.msg import String  # noqa: E402

from attack_helpers import SMALL_SCPO, commanding, probed, start_node  # noqa: E402
from ros_graph_helpers import wait_for  # noqa: E402
from scpo_ros.plant import load_plant  # noqa: E402
from scpo_ros.policy import MLPLayout  # noqa: E402
from scpo_ros.residual_scpo import backup_weights  # noqa: E402
from scpo_ros.ros.diagnostics import ERROR, diagnostic_values  # noqa: E402
from scpo_ros.ros.messages import weights_to_msg  # noqa: E402
from scpo_ros.ros.qos import LATCHED_QOS  # noqa: E402

NS = "monitor_graph"
NODE, SIM = "scpo_safety_node", "plant_sim"
CLEAR = 20


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("monitor_graph")
    d = yaml.safe_load(load_plant("double_integrator_uncertain").text)
    plant_file = log_dir / "di_uncertain.yaml"
    plant_file.write_text(yaml.safe_dump(d))
    procs = {NODE: start_node(log_dir, NODE, NS, {**SMALL_SCPO, "plant_file": str(plant_file),
                                                  "monitor_clear_steps": CLEAR}),
             SIM: start_node(log_dir, SIM, NS, {"plant_file": str(plant_file), "model_mismatch": 1.0,
                                               "disturbance": "bounded", "seed": 5})}
    with probed(NS, "monitor_probe", procs, commanding("commands from the safety node")) as ap:
        ap.probe.record(String, ap.topic("model_monitor"), LATCHED_QOS, key="model_monitor")
        ap.plant_file = plant_file
        yield ap


def monitor_records(ap, since=0.0):
    return ap.probe.json_messages("model_monitor", since)


def labels(ap, since):
    return [label for _, _, label in ap.commands(since)]


def test_inside_the_declared_uncertainty_the_monitor_is_quiet_and_the_plant_safe(graph):
    ap = graph
    wait_for(lambda: any(m["mode"] == "policy" for m in ap.modes()), 60.0, "the certified policy in force")
    since = time.monotonic()
    wait_for(lambda: len(ap.times("joint_states", since)) >= 120, 60.0, "6 s of plant states")
    recs = monitor_records(ap)
    assert recs, "no model_monitor record"
    last = recs[-1]
    assert last["declared"] and not last["tripped"] and last["trips"] == 0, last
    assert last["transitions"] >= 100 and last["out_of_bounds"] <= 2, last   # a rare DDS hiccup at most
    assert not ap.violations(), ap.violations()[:3]
    assert labels(ap, since).count("policy") > 0.9 * len(labels(ap, since))


def test_beyond_it_the_monitor_trips_the_fallback_acts_and_no_update_is_taken(graph):
    ap = graph
    since = time.monotonic()
    # beyond: the mass 4x as far off as declared (it shows where the commands are large: a
    # reference step) and the disturbance at 3x its declared box (it shows at once)
    assert all(r.successful for r in ap.set_params(SIM, {"model_mismatch": 4.0, "disturbance_scale": 3.0}))
    ap.send_reference(0.4)
    trip = wait_for(lambda: [r for r in monitor_records(ap, since) if r["tripped"]], 30.0, "the monitor to trip")[0]
    assert trip["detection_delay"] is not None and trip["detection_delay"] <= 10, trip
    wait_for(lambda: any(m["mode"] == "backup_model_mismatch" for m in ap.modes(since)), 10.0,
             "safety_mode backup_model_mismatch")
    status = wait_for(lambda: [s for s in ap.statuses(NODE, "model", since) if s.level == ERROR], 10.0,
                      "an ERROR model diagnostic")[-1]
    assert diagnostic_values(status)["tripped"] == "True"
    t_fb = time.monotonic()
    wait_for(lambda: len(ap.commands(t_fb)) >= 20, 20.0, "commands in the fallback")
    assert set(labels(ap, t_fb)) == {"backup"}, "the policy acted while the model monitor was tripped"
    # a valid proposal is not taken while tripped
    layout = MLPLayout(3, 1, (32, 32))
    theta = backup_weights(layout) + 1e-3
    n_dec = len(ap.decisions())
    ap.weights_pub.publish(weights_to_msg(theta, layout.fingerprint))
    wait_for(lambda: "proposal not taken" in ap.procs[NODE].text(), 20.0, "the proposal held back")
    assert len([d for d in ap.decisions() if d.get("kind") == "proposal"]) <= n_dec


def test_back_inside_it_clears_and_the_policy_returns(graph):
    ap = graph
    since = time.monotonic()
    assert all(r.successful for r in ap.set_params(SIM, {"model_mismatch": 0.0, "disturbance_scale": 1.0}))
    ap.send_reference(0.0)
    wait_for(lambda: [r for r in monitor_records(ap, since) if r["clears"] >= 1 and not r["tripped"]], 30.0,
             "the monitor to clear")
    wait_for(lambda: any(m["mode"] == "policy" for m in ap.modes(since)), 30.0, "the policy back")
    summary_text = ap.procs[NODE].text()
    assert "model monitor cleared" in summary_text
