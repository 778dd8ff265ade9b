"""SCPO vs the action safeguard side by side over real DDS: ``scpo-ros demo --compare`` runs
both pipelines (10 processes), both stay safe, and the bag gives the same two columns as the nodes."""
import json
import types
from pathlib import Path

import pytest

from scpo_ros.cli import main as cli_main
from scpo_ros.graph import SIMULATOR

REPO = Path(__file__).resolve().parent.parent
PARAMS = REPO / "config" / "scpo.yaml"


@pytest.mark.slow
def test_compare_demo_both_pipelines_safe_and_one_table(tmp_path):
    pytest.importorskip("rclpy")
    from scpo_ros.demo import format_compare_summary, run_graph
    from scpo_ros.graph import merged_params_file

    # malicious phases every 4 s (2 s each) so a short run sees both kinds of demonstration.
    # Two pipelines (10 processes) on 2 cores: the safeguard's guarantee holds only if each
    # command reaches the plant before its next tick, and under this load commands are
    # sometimes late several ticks in a row. With the LQR as the safeguard's fallback that
    # broke 2 of 8 fresh-clone runs at 20 Hz; the recovery action (hardest braking) has
    # since passed 23 of 25 runs at 20 Hz beside CPU hogs (the 2 failures not diagnosed).
    # A test must not depend on the machine's load, so the simulators run at half real
    # time here (10 Hz ticks of dt = 0.05 s: a 100 ms deadline) and SCPO gets one proposal
    # every 2 s, so its worker does not hold a core throughout.
    params = merged_params_file(PARAMS, {"expert": {"malicious": True, "malicious_period_s": 4.0},
                                         "learner": {"publish_rate_hz": 0.5},
                                         SIMULATOR: {"rate_hz": 10.0}}, tmp_path / "params.yaml")
    args = types.SimpleNamespace(compare=True, params=params, safeguard_params=None, bag=str(tmp_path / "bag"),
                                 no_record=False, overwrite=False, no_malicious=False, plant=None, namespace="",
                                 duration=10.0, startup_timeout=120.0, plots=None)
    result = run_graph(args, out=lambda *a: None)
    assert set(result["exit_codes"].values()) == {0}, result["exit_codes"]
    nodes, columns = result["nodes"], result["bag_metrics"]
    assert set(columns) == {"scpo", "safeguard"}
    scpo, guard = columns["scpo"], columns["safeguard"]
    for ns in ("scpo", "safeguard"):
        assert nodes[ns]["expert"]["malicious_demonstrations"] > 0
        assert nodes[ns][SIMULATOR]["constraint_violations"] == 0
        assert columns[ns]["constraint_violations"] == 0 and columns[ns]["constraint_violations_from_states"] == 0
        assert columns[ns]["control_steps"] > 50
        assert columns[ns]["limits"]["source"] == "plant topic"
    assert scpo["pipeline"] == "scpo" and guard["pipeline"] == "safeguard"
    # SCPO ran on the malicious demonstrations; the bag holds what the safety node counted
    safety = nodes["scpo"]["scpo_safety_node"]
    assert sum(safety["updates"].values()) > 0 and scpo["updates"] == safety["updates"]
    assert scpo["control_steps"] == safety["control_steps"]
    # the safeguard projected the malicious actions
    sg = nodes["safeguard"]["action_safeguard"]
    assert guard["interventions"] == sg["interventions"] > 0
    assert guard["control_steps"] == sg["commands"]
    assert 0 < guard["intervention_rate"] < 1 and guard["projection_distance_mean"] > 0
    # Fallbacks are the safeguard answering with the safe backup or the recovery action; their
    # timing depends on the machine's load (three fresh-clone CI runs each saw a different
    # mix): waiting for the expert's first action or a late one (stale_action), a command
    # that reached the plant a period late and left the tightened set too far to be
    # projected back (outside_invariant_set), the simulators stopping first at shutdown
    # (stale_state). Only these reasons, and the safeguard mostly projects: the plant stayed
    # inside throughout (checked above).
    # An expert action later than action_deadline_periods after its state (no_action) is one more
    # such reason: seen in 2 of 6 runs here beside other test runs (load 4-5 on 2 cores).
    assert set(guard["fallbacks_by_mode"]) <= {"stale_action", "no_action", "outside_invariant_set", "stale_state"}
    assert guard["fallbacks"] <= 0.1 * guard["control_steps"]
    text = format_compare_summary(result)
    assert "intervention rate" in text and "SCPO updates accepted" in text
    # the CLI reads the same bag into the same two columns
    out = tmp_path / "cmp.json"
    assert cli_main(["analyze", args.bag, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["pipelines"]["safeguard"]["interventions"] == guard["interventions"]
