"""The whole graph over real DDS (the demo's code path): malicious expert, SCPO safety node,
bag recorded; zero violations, and the bag's numbers equal what the nodes reported."""
import json
import types

import pytest

pytest.importorskip("rclpy")

from ros_graph_helpers import PARAMS  # noqa: E402
from scpo_ros.demo import run_graph  # noqa: E402
from scpo_ros.graph import SIMULATOR, merged_params_file  # noqa: E402
from scpo_ros.scpo import COMMITTED  # noqa: E402


def _malicious_run(tmp_path, plant, namespace: str, duration: float, publish_rate_hz: float, **demo_args):
    """``run_graph`` of the demo with malicious phases every 4 s (2 s each, so a short run sees
    both kinds of demonstration), recording a bag: ``(result, args)``."""
    params = merged_params_file(PARAMS, {"expert": {"malicious": True, "malicious_period_s": 4.0},
                                         "learner": {"publish_rate_hz": publish_rate_hz}}, tmp_path / "params.yaml")
    args = types.SimpleNamespace(params=params, bag=str(tmp_path / "bag"), no_record=False, overwrite=False,
                                 no_malicious=False, plant=plant, namespace=namespace, duration=duration,
                                 startup_timeout=120.0, plots=None, **demo_args)
    return run_graph(args, out=lambda *a: None), args


@pytest.mark.slow
def test_malicious_graph_zero_violations_bag_matches_nodes(tmp_path):
    result, args = _malicious_run(tmp_path, None, "scpo_test", 12.0, 4.0)
    nodes, m = result["nodes"], result["bag_metrics"]
    assert set(result["exit_codes"].values()) == {0}, result["exit_codes"]
    sim, safety, expert = nodes[SIMULATOR], nodes["scpo_safety_node"], nodes["expert"]

    # the malicious expert did lie, SCPO ran, and the plant never left its limits
    assert expert["malicious_demonstrations"] > 0
    assert sum(safety["updates"].values()) > 0
    assert sim["constraint_violations"] == 0
    assert m["constraint_violations"] == 0 and m["constraint_violations_from_states"] == 0
    assert m["min_constraint_margin"] > 0

    # the bag holds exactly what the nodes counted
    assert m["states"] == sim["states_published"] == sim["steps"] + 1
    assert m["control_steps"] == safety["control_steps"]
    assert m["backup_steps"] == safety["backup_steps"]
    assert m["hold_commands"] == safety["hold_commands"]
    assert m["updates"] == safety["updates"]
    assert m["fallbacks"] == safety["fallbacks"]
    assert m["latency_ms"]["n"] == safety["control_steps"]
    assert all(t.startswith("/scpo_test/") for t in m["topics"] if "diagnostics" not in t)
    # every committed update stayed inside SCPO's trust radius
    from scpo_ros.bag import read_messages
    records = [json.loads(b.msg.data) for b in read_messages(args.bag, ["/scpo_test/scpo_decision"])]
    committed = [r for r in records if r["kind"] == "proposal" and r["status"] in COMMITTED]
    assert all(r["committed_step_norm"] <= 0.05 + 1e-6 for r in committed)
    assert all(v <= 0 for r in committed for v in r["margins_after"].values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coupled_two_input", "dc_motor", "pendulum"])
def test_another_plant_by_its_file_alone(tmp_path, name):
    """``--plant NAME``, nothing else changed: ``coupled_two_input`` (two coupled inputs, an H
    polytope, the implicit safe set), ``dc_motor`` (speed and current as velocity and effort of
    one joint), ``pendulum`` (a model class, no tracked states: episodes). Zero violations,
    every state read, one value per input in every command, and the bag carries the plant
    (its limits read from the ``plant`` record)."""
    from scpo_ros.plant import load_plant
    plant = load_plant(name)
    result, args = _malicious_run(tmp_path, name, "", 10.0, 2.0)
    nodes, m = result["nodes"], result["bag_metrics"]
    assert set(result["exit_codes"].values()) == {0}, result["exit_codes"]
    assert nodes["expert"]["malicious_demonstrations"] > 0
    assert nodes[SIMULATOR]["constraint_violations"] == 0
    assert m["constraint_violations"] == 0 and m["constraint_violations_from_states"] == 0
    assert m["limits"]["source"] == "plant topic"
    assert m["control_steps"] == nodes["scpo_safety_node"]["control_steps"] > 50
    assert nodes["scpo_safety_node"]["rejected_states"] == {} and m["unreadable_states"] == 0
    from scpo_ros.bag import read_messages
    cmds = [b.msg.data for b in read_messages(args.bag, ["/cmd"])]
    assert cmds and all(len(u) == plant.m for u in cmds)
    records = [json.loads(b.msg.data) for b in read_messages(args.bag, ["/plant"])]
    assert {r["digest"] for r in records} == {plant.digest}


@pytest.mark.slow
def test_uncertain_plant_with_a_mismatched_simulator_inside_its_declaration(tmp_path):
    """``--plant double_integrator_uncertain --model-mismatch 1 --disturbance bounded``: the simulated
    plant at the edge of its declared input gain (±30 %) and a disturbance at a random corner of
    its declared box every step, the malicious expert: zero violations, SCPO's robust
    certificate commits updates, the model monitor does not trip."""
    result, args = _malicious_run(tmp_path, "double_integrator_uncertain", "", 12.0, 4.0, model_mismatch=1.0,
                                  disturbance="bounded")
    nodes, m = result["nodes"], result["bag_metrics"]
    assert set(result["exit_codes"].values()) == {0}, result["exit_codes"]
    assert nodes[SIMULATOR]["constraint_violations"] == 0 and m["constraint_violations"] == 0
    safety = nodes["scpo_safety_node"]
    assert sum(safety["updates"][k] for k in COMMITTED) > 0
    mon = safety["model_monitor"]
    assert mon["declared"] and mon["trips"] == 0 and mon["transitions"] > 100, mon
    from scpo_ros.bag import read_messages
    decisions = [json.loads(b.msg.data) for b in read_messages(args.bag, ["/scpo_decision"])]
    assert any("corners" in d.get("covers", "") for d in decisions)
