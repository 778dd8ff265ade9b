"""`scpo-ros analyze` (``analysis.py``): a sqlite3 bag written like `ros2 bag record`
(no ROS needed), latency from the state's stamp, and the per-pipeline columns (one bag with
two namespaces, or two bags)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer

from scpo_ros.analysis import analyze, analyze_pipelines, format_comparison
from scpo_ros.bag import bag_topics, typestore
from scpo_ros.cli import main as cli_main
from scpo_ros.graph import LABEL_HOLD, LABEL_POLICY
from scpo_ros.scpo import STATUSES

REQUIRED = ("constraint_violations", "updates", "fallbacks", "control_steps", "latency_ms")


def write_sqlite_bag(path: Path) -> dict:
    """A small bag as `ros2 bag record -s sqlite3` writes it, with known contents."""
    ts = typestore()
    JointState, Header, Time = (ts.types[n] for n in ("sensor_msgs/msg/JointState", "std_msgs/msg/Header",
                                                       "builtin_interfaces/msg/Time"))
    F64, Layout, Dim = (ts.types[n] for n in ("std_msgs/msg/Float64MultiArray", "std_msgs/msg/MultiArrayLayout",
                                              "std_msgs/msg/MultiArrayDimension"))
    String = ts.types["std_msgs/msg/String"]
    with Writer(path, version=8, storage_plugin=StoragePlugin.SQLITE3) as w:
        c_state = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=ts)
        c_cmd = w.add_connection("/cmd", "std_msgs/msg/Float64MultiArray", typestore=ts)
        c_dec = w.add_connection("/scpo_decision", "std_msgs/msg/String", typestore=ts)
        c_mode = w.add_connection("/safety_mode", "std_msgs/msg/String", typestore=ts)
        t0 = 1_000_000_000_000
        positions = [0.0, 0.5, 1.2, 0.9]          # one state beyond p_max = 1
        for k, p in enumerate(positions):
            t = t0 + k * 50_000_000
            msg = JointState(header=Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id=""),
                             name=["axis_0"], position=np.array([p]), velocity=np.array([0.1]),
                             effort=np.array([], dtype=float))
            w.write(c_state, t, ts.serialize_cdr(msg, "sensor_msgs/msg/JointState"))
            label = LABEL_HOLD if k == 3 else LABEL_POLICY
            cmd = F64(layout=Layout(dim=[Dim(label=label, size=1, stride=1)], data_offset=0),
                      data=np.array([0.1 * k]))
            w.write(c_cmd, t + (k + 1) * 1_000_000, ts.serialize_cdr(cmd, "std_msgs/msg/Float64MultiArray"))
        for k, status in enumerate(["accepted", "rejected", "backtracked", "accepted"]):
            rec = {"kind": "proposal", "status": status, "raw_step_norm": 1.0, "committed_step_norm": 0.01,
                   "margins_after": {"state": -0.1, "safe_set": -0.2}, "times_ms": {"total": 10.0 + k}}
            w.write(c_dec, t0 + k, ts.serialize_cdr(String(data=json.dumps(rec)), "std_msgs/msg/String"))
        w.write(c_mode, t0 + 5, ts.serialize_cdr(String(data=json.dumps({"mode": "backup_region"})),
                                                 "std_msgs/msg/String"))
    return {"states": len(positions)}


def test_latency_is_measured_from_the_state_stamp_when_a_command_is_logged_before_its_state(tmp_path):
    """Two topics, two subscriptions in the recorder: a command can be logged before the state it
    answers. Matched by log time it would count against the previous state (~one period);
    matched by the simulator's stamp it counts against its own. Stamps off the recorder's
    clock (sim time here: 0 s) fall back to the log times."""
    ts = typestore()
    JointState, Header, Time = (ts.types[n] for n in ("sensor_msgs/msg/JointState", "std_msgs/msg/Header",
                                                       "builtin_interfaces/msg/Time"))
    F64, Layout, Dim = (ts.types[n] for n in ("std_msgs/msg/Float64MultiArray", "std_msgs/msg/MultiArrayLayout",
                                              "std_msgs/msg/MultiArrayDimension"))
    ms = 1_000_000
    t0 = 1_000_000_000_000
    for name, stamp_offset, expected in (("on_clock", 0, 2.0), ("sim_time", -t0, 49.0)):
        bag = tmp_path / name
        with Writer(bag, version=8, storage_plugin=StoragePlugin.SQLITE3) as w:
            c_state = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=ts)
            c_cmd = w.add_connection("/cmd", "std_msgs/msg/Float64MultiArray", typestore=ts)
            for k in range(5):
                t = t0 + k * 50 * ms                               # published (stamped) at t
                st = t + stamp_offset
                msg = JointState(header=Header(stamp=Time(sec=st // 10**9, nanosec=st % 10**9), frame_id=""),
                                 name=["axis_0"], position=np.array([0.1]), velocity=np.array([0.0]),
                                 effort=np.array([], dtype=float))
                w.write(c_state, t + 3 * ms, ts.serialize_cdr(msg, "sensor_msgs/msg/JointState"))   # logged late
                cmd = F64(layout=Layout(dim=[Dim(label=LABEL_POLICY, size=1, stride=1)], data_offset=0),
                          data=np.array([0.0]))
                w.write(c_cmd, t + 2 * ms, ts.serialize_cdr(cmd, "std_msgs/msg/Float64MultiArray"))
        metrics, _ = analyze(bag)
        assert metrics["latency_ms"]["median"] == pytest.approx(expected), name


def test_sqlite3_bag_metrics_and_cli(tmp_path):
    bag = tmp_path / "sqlite_bag"
    write_sqlite_bag(bag)
    assert bag_topics(bag)["/joint_states"] == ("sensor_msgs/msg/JointState", 4)
    metrics, _ = analyze(bag)
    assert metrics["control_steps"] == 3 and metrics["hold_commands"] == 1
    assert metrics["updates"] == {"accepted": 2, "backtracked": 1, "rejected": 1, "infeasible": 0}
    assert metrics["fallbacks"] == 1
    assert metrics["constraint_violations_from_states"] == 1           # the state at p = 1.2
    assert metrics["min_margin_by_kind"]["position"] == pytest.approx(-0.2)
    # command k was logged k+1 ms after state k
    assert metrics["latency_ms"]["median"] == pytest.approx(2.0)
    assert metrics["latency_ms"]["max"] == pytest.approx(3.0)

    out_json, plots = tmp_path / "m.json", tmp_path / "plots"
    assert cli_main(["analyze", str(bag), "--json", str(out_json), "--plots", str(plots)]) == 0
    data = json.loads(out_json.read_text())
    for key in REQUIRED:
        assert key in data
    assert set(data["updates"]) == set(STATUSES)
    assert set(data["latency_ms"]) >= {"median", "p99"}
    assert (plots / "states.png").stat().st_size > 0 and (plots / "decisions.png").stat().st_size > 0
    # two bags: one JSON with both
    other = tmp_path / "copy"
    shutil.copytree(bag, other)
    assert cli_main(["analyze", str(bag), str(other), "--json", str(out_json)]) == 0
    both = json.loads(out_json.read_text())["bags"]
    assert set(both) == {str(bag), str(other)} and both[str(other)]["control_steps"] == 3


# ------------------------------------------------------------------ one column per pipeline

def _write_pipeline(w, ts, ns: str, kind: str, n: int = 6, t0: int = 10**12):
    """Messages of one pipeline under ``/ns``: states, commands, and SCPO decisions or
    safeguard intervention records."""
    T = ts.types
    F64, Layout, Dim = T["std_msgs/msg/Float64MultiArray"], T["std_msgs/msg/MultiArrayLayout"], \
        T["std_msgs/msg/MultiArrayDimension"]
    String, JointState = T["std_msgs/msg/String"], T["sensor_msgs/msg/JointState"]
    Header, Time = T["std_msgs/msg/Header"], T["builtin_interfaces/msg/Time"]
    conn = {name: w.add_connection(f"/{ns}/{name}", typ, typestore=ts) for name, typ in (
        ("joint_states", "sensor_msgs/msg/JointState"), ("cmd", "std_msgs/msg/Float64MultiArray"),
        ("scpo_decision" if kind == "scpo" else "intervention", "std_msgs/msg/String"))}
    for k in range(n):
        t = t0 + k * 50_000_000
        st = JointState(header=Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id=""), name=["axis_0"],
                        position=np.array([0.1 * k]), velocity=np.array([0.0]), effort=np.array([], dtype=float))
        w.write(conn["joint_states"], t, ts.serialize_cdr(st, "sensor_msgs/msg/JointState"))
        label = "backup" if (kind == "safeguard" and k == 0) else ("safeguard" if kind == "safeguard" else "policy")
        cmd = F64(layout=Layout(dim=[Dim(label=label, size=1, stride=1)], data_offset=0), data=np.array([0.5]))
        w.write(conn["cmd"], t + 2_000_000, ts.serialize_cdr(cmd, "std_msgs/msg/Float64MultiArray"))
    if kind == "scpo":
        records = [{"kind": "proposal", "status": s, "raw_step_norm": 1.0, "committed_step_norm": 0.02}
                   for s in ("accepted", "rejected", "accepted")]
        topic = "scpo_decision"
    else:   # a startup fallback, then three projections of distance 1, 2, 3
        records = [{"fallback": True, "reason": "stale_action", "distance": 0.5, "active": []}] + \
                  [{"fallback": False, "reason": "", "distance": d, "active": [0]} for d in (1.0, 2.0, 3.0)]
        topic = "intervention"
    for i, rec in enumerate(records):
        w.write(conn[topic], t0 + i * 50_000_000 + 3_000_000,
                ts.serialize_cdr(String(data=json.dumps(rec)), "std_msgs/msg/String"))


def _bag(path: Path, pipelines: dict[str, str]) -> Path:
    ts = typestore()
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        for ns, kind in pipelines.items():
            _write_pipeline(w, ts, ns, kind)
    return path


def _check_columns(scpo: dict, guard: dict):
    assert scpo["pipeline"] == "scpo" and guard["pipeline"] == "safeguard"
    assert scpo["control_steps"] == guard["control_steps"] == 6
    assert scpo["updates"] == {"accepted": 2, "backtracked": 0, "rejected": 1, "infeasible": 0}
    assert scpo["interventions"] == 0 and scpo["projection_distance_mean"] is None
    assert guard["updates_total"] == 0
    assert guard["interventions"] == 4 and guard["intervention_rate"] == pytest.approx(4 / 6)
    assert guard["projection_distance_mean"] == pytest.approx(2.0)    # fallbacks excluded
    assert guard["fallbacks"] == 1 and guard["fallbacks_by_mode"] == {"stale_action": 1}
    assert guard["backup_steps"] == 1
    assert scpo["latency_ms"]["median"] == pytest.approx(2.0) == guard["latency_ms"]["median"]


def test_one_bag_two_namespaces_and_two_bags_give_one_table(tmp_path, capsys):
    both = _bag(tmp_path / "both", {"scpo": "scpo", "safeguard": "safeguard"})
    columns = analyze_pipelines([both])
    assert set(columns) == {"scpo", "safeguard"}
    _check_columns(columns["scpo"][0], columns["safeguard"][0])
    # every column holds only its namespace's topics
    assert all(t.startswith("/safeguard/") for t in columns["safeguard"][0]["topics"])
    table = format_comparison({k: m for k, (m, _) in columns.items()}).splitlines()
    assert table[0].split() == list(columns)
    row = lambda name: dict(zip(columns, next(line.split()[-2:] for line in table  # noqa: E731
                                              if line.strip().startswith(name)), strict=True))
    assert row("interventions") == {"scpo": "-", "safeguard": "4"}
    assert row("SCPO updates rejected") == {"scpo": "1", "safeguard": "-"}

    out = tmp_path / "both.json"
    assert cli_main(["analyze", str(both), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["pipelines"]) == {"scpo", "safeguard"}
    _check_columns(data["pipelines"]["scpo"], data["pipelines"]["safeguard"])
    assert "intervention rate" in capsys.readouterr().out

    # the same two pipelines as two bags: columns named by their namespaces, plus per-bag metrics
    a, b = _bag(tmp_path / "a", {"scpo": "scpo"}), _bag(tmp_path / "b", {"safeguard": "safeguard"})
    assert cli_main(["analyze", str(a), str(b), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    _check_columns(data["pipelines"]["scpo"], data["pipelines"]["safeguard"])
    assert data["bags"][str(b)]["pipeline"] == "safeguard"


# ------------------------------------------------------------------ the plant from the bag

def _write_plant_bag(path: Path, plant, record: dict | None, states: list, cmds: list, refs: list) -> Path:
    """A bag of one pipeline of ``plant``: the latched plant record (if given), the states
    through the file's joints: map, commands, references."""
    from scpo_ros.inputs import JointMap
    ts = typestore()
    T = ts.types
    JointState, Header = T["sensor_msgs/msg/JointState"], T["std_msgs/msg/Header"]
    Time = T["builtin_interfaces/msg/Time"]
    F64, Layout, Dim = T["std_msgs/msg/Float64MultiArray"], T["std_msgs/msg/MultiArrayLayout"], \
        T["std_msgs/msg/MultiArrayDimension"]
    String = T["std_msgs/msg/String"]
    jm = JointMap.for_plant(plant)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        c = {name: w.add_connection(f"/{name}", typ, typestore=ts) for name, typ in (
            ("joint_states", "sensor_msgs/msg/JointState"), ("cmd", "std_msgs/msg/Float64MultiArray"),
            ("reference", "std_msgs/msg/Float64MultiArray"), ("plant", "std_msgs/msg/String"))}
        t0 = 10**12
        if record is not None:
            w.write(c["plant"], t0, ts.serialize_cdr(String(data=json.dumps(record)), "std_msgs/msg/String"))
        for k, (x, u, r) in enumerate(zip(states, cmds, refs, strict=True)):
            t = t0 + (k + 1) * 10_000_000
            names, pos, vel, eff = jm.write(x)
            msg = JointState(header=Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id=""), name=names,
                             position=np.array(pos, dtype=float), velocity=np.array(vel, dtype=float),
                             effort=np.array(eff, dtype=float))
            w.write(c["joint_states"], t, ts.serialize_cdr(msg, "sensor_msgs/msg/JointState"))
            for key, data, label in (("cmd", u, LABEL_POLICY), ("reference", r, "")):
                m = F64(layout=Layout(dim=[Dim(label=label, size=len(data), stride=len(data))], data_offset=0),
                        data=np.array(data, dtype=float))
                w.write(c[key], t + 1_000_000, ts.serialize_cdr(m, "std_msgs/msg/Float64MultiArray"))
    return path


def test_the_plant_comes_from_the_bag_with_its_names_limits_and_polytope(tmp_path):
    """The DC motor (speed as velocity, current as effort of one joint) and the coupled plant
    (a state polytope H): the bag's plant record decides how states are read, what is counted
    against which limit and what the tracking cost tracks; without the record the analysis
    says it fell back."""
    from scpo_ros.plant import load_plant, plant_record
    motor = load_plant("dc_motor")
    states = [[1.0, 0.5], [2.0, 2.5], [3.0, 1.0]]          # the second breaks current <= 2 A
    bag = _write_plant_bag(tmp_path / "motor", motor, {**plant_record(motor), "node": "plant_sim"}, states,
                           [[1.0], [30.0], [2.0]], [[1.0], [1.0], [4.0]])   # 30 V > 24 V acts on state 1
    m, s = analyze(bag)
    assert m["limits"]["source"] == "plant topic" and m["limits"]["plant"] == "dc_motor"
    assert m["limits"]["digest"] == motor.digest and m["unreadable_states"] == 0
    assert np.allclose(s.state, states)
    assert m["min_margin_by_kind"]["current"] == pytest.approx(-0.5)
    assert m["min_margin_by_kind"]["voltage"] == pytest.approx(-6.0)
    assert m["min_margin_by_kind"]["speed"] == pytest.approx(47.0)
    assert m["constraint_violations_from_states"] == 1                # state 1, and the command on it
    # the reference in force when the next state came: r = 1 for states 0, 1; r = 4 for state 2
    assert m["tracking_cost"] == pytest.approx(((0.0) ** 2 + (1.0) ** 2 + (3.0 - 4.0) ** 2) / 3)
    files = __import__("scpo_ros.analysis", fromlist=["write_plots"]).write_plots(s, m, tmp_path / "plots")
    assert {Path(f).name for f in files} == {"states.png", "actions.png", "phase.png", "residuals.png"}

    coupled = load_plant("coupled_two_input")
    x_ok = coupled.equilibrium(np.zeros(coupled.nr))[0]
    F, f, names = coupled.state_rows()
    h_rows = [i for i, nm in enumerate(names) if nm.startswith("H")]
    # a state that breaks only the first H row: step from the equilibrium along that row's normal
    i = h_rows[0]
    x_bad = x_ok + F[i] / (F[i] @ F[i]) * (f[i] - F[i] @ x_ok + 0.01)
    bag = _write_plant_bag(tmp_path / "coupled", coupled, {**plant_record(coupled), "node": "plant_sim"},
                           [x_ok, x_bad], [[0.0, 0.0]] * 2, [[0.0, 0.0]] * 2)
    m, _ = analyze(bag)
    assert m["min_margin_by_kind"]["H"] == pytest.approx(-0.01)
    assert m["constraint_violations_from_states"] == 1

    # no record in the bag: the argument, else the default double integrator (and the motor's
    # states do not carry its joints: every one is unreadable, not misread)
    bag = _write_plant_bag(tmp_path / "bare", motor, None, states, [[1.0]] * 3, [[1.0]] * 3)
    m, _ = analyze(bag, plant="dc_motor")
    assert m["limits"]["source"] == "argument" and m["unreadable_states"] == 0
    m, _ = analyze(bag)
    assert m["limits"]["source"] == "default" and m["limits"]["plant"] == "double_integrator"
    assert m["unreadable_states"] == 3 and m["states"] == 0


def test_transition_residuals_pair_each_transition_with_its_command_and_the_declared_bound():
    """States that follow the model give residuals of zero; a plant with half the input gain gives
    ``|B u| / 2``, above the declared bound of a file that declares nothing; a transition without a
    command between its states is left out."""
    import numpy as np

    from scpo_ros.analysis import Series, transition_residuals
    from scpo_ros.plant import load_plant
    plant = load_plant("double_integrator")
    x = [np.array([0.1, 0.0])]
    cmds, cmd_t = [], []
    for k in range(10):
        u = np.array([0.5 * (-1) ** k])
        cmds.append(u)
        cmd_t.append(k * 0.05 + 0.01)
        x.append(plant.step(x[-1], u))
    t = np.arange(11) * 0.05
    s = Series(state_t=t, state_stamp=t, state=np.array(x), cmd_t=np.array(cmd_t), cmd=cmds,
               cmd_label=["policy"] * 10, plant=plant)
    tt, res, bnd = transition_residuals(s)
    assert len(tt) == 10 and np.allclose(res, 0.0, atol=1e-12) and np.allclose(bnd, 0.0)
    half = [x[0]]
    for u in cmds:
        half.append(plant.A @ half[-1] + 0.5 * plant.B @ u)
    s.state = np.array(half)
    _, res, _ = transition_residuals(s)
    assert np.allclose(res, 0.5 * np.abs(np.array([plant.B @ u for u in cmds])), atol=1e-12)
    s.cmd_t = np.array(cmd_t) + 0.2                  # commands after their states: no pairs for the first ones
    assert len(transition_residuals(s)[0]) < 10
