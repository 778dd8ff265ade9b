"""plant_sim over real DDS: the command watchdog (brake | zero), /clock with simulated time,
use_sim_time refused, the late-command fault injection, and a plant with another joint map
(the DC motor: velocity and effort of one joint) with its latched plant record.

Five simulators run for the module in their own namespaces (only ``/clocked`` publishes
``/clock``); a sixth is started with ``use_sim_time:=true`` and must refuse to run. The
pendulum's (no tracked states) runs in episodes."""
import json
import threading
import time

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

rclpy = pytest.importorskip("rclpy")

from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter as NodeParameter  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray, String  # noqa: E402

from ros_graph_helpers import STARTUP_TIMEOUT, NodeProcess, Probe, wait_for  # noqa: E402
from scpo_ros.backup import LQRBackup  # noqa: E402
from scpo_ros.nodes.plant_sim import brake_command, initial_state  # noqa: E402
from scpo_ros.plant import double_integrator_file, load_plant, plant_from_record  # noqa: E402
from scpo_ros.ros.diagnostics import diagnostic_values  # noqa: E402
from scpo_ros.ros.qos import CONTROL_QOS, LATCHED_QOS  # noqa: E402

DT = 0.02
DT_NS = 20_000_000
U_MAX = 1.0
V0 = 0.8
CMD_TIMEOUT = 0.2
LATE_RATE_HZ = 10.0          # 100 ms between ticks: a probe answer is rarely late by itself
ANSWER_MARGIN_S = 0.03       # an answer counts as in time when the next state came this much after it
# the double integrator at dt = 0.02 with a brisk backup (R = 0.1): the brake stops it in ~2 s
DI = double_integrator_file(dt=DT, u_max=U_MAX, r_act=0.1)
SIMS = {
    "brake": {"initial_state": [0.0, V0], "cmd_timeout": CMD_TIMEOUT, "rate_hz": 50.0, "wait_for_subscribers": 1},
    "zero": {"initial_state": [-0.9, V0], "cmd_timeout": CMD_TIMEOUT, "cmd_timeout_action": "zero",
             "rate_hz": 50.0, "wait_for_subscribers": 1},
    "clocked": {"publish_clock": True, "late_command_probability": 0.5, "seed": 3, "rate_hz": LATE_RATE_HZ,
                "wait_for_subscribers": 1},
    "motor": {"plant_file": "dc_motor", "cmd_timeout": 0.0, "rate_hz": 50.0, "wait_for_subscribers": 1},
    # no tracked states: it starts away from its equilibrium, and again every episode_s
    "pendulum": {"plant_file": "pendulum", "cmd_timeout": 0.0, "rate_hz": 50.0, "episode_s": 0.5,
                 "wait_for_subscribers": 1},
}
def answer(j: int) -> float:
    """A distinct command per state index: alternating sign (the plant stays near rest), and
    no two of the last four share a value, so the applied one is told from the velocity step."""
    return (-1.0) ** j * (0.2 + 0.05 * (j % 8))


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("sim_node")
    plant_file = log_dir / "di_dt002.yaml"
    plant_file.write_text(yaml.safe_dump(DI))
    probe = Probe("sim_probe")
    probe.plant_file = plant_file
    for ns in SIMS:
        probe.record(JointState, f"/{ns}/joint_states", CONTROL_QOS)
    probe.record(Clock, "/clock", 100)   # reliable, deep: every tick's clock, to compare with the states
    probe.record_diagnostics()
    probe.record(String, "/motor/constraint_violation", 100)
    probe.cmd_pub = {ns: probe.node.create_publisher(Float64MultiArray, f"/{ns}/cmd", CONTROL_QOS) for ns in SIMS}

    # the late-command test answers every state of /clocked with answer(j), j = stamp / dt
    probe.answering = threading.Event()
    probe.answers = {}   # j -> (monotonic time state j was received, time its answer was published)
    probe.answers_lock = threading.Lock()

    def on_clocked_state(msg):
        if not probe.answering.is_set():
            return
        received = time.monotonic()
        j = round(stamp_ns(msg) / DT_NS)
        probe.cmd_pub["clocked"].publish(Float64MultiArray(data=[answer(j)]))
        with probe.answers_lock:
            probe.answers[j] = (received, time.monotonic())
    probe.node.create_subscription(JointState, "/clocked/joint_states", on_clocked_state, CONTROL_QOS)

    # a node on simulated time in the test process: rclpy's TimeSource subscribes to /clock
    # with its own QoS (best effort, depth 1); it must follow the simulator's clock
    probe.listener = Node("sim_time_listener", context=probe.context,
                          parameter_overrides=[NodeParameter("use_sim_time", value=True)])
    probe.executor.add_node(probe.listener)

    procs = {}
    for ns, params in SIMS.items():
        (log_dir / ns).mkdir()
        procs[ns] = NodeProcess("plant_sim", log_dir / ns, None, {"plant_file": str(plant_file), **params},
                                namespace=f"/{ns}")
    (log_dir / "sim_time").mkdir()
    # started with the others (a start imports torch: slow on 2 cores); must refuse to run
    probe.sim_time_proc = NodeProcess("plant_sim", log_dir / "sim_time", None, {"use_sim_time": True},
                                      namespace="/sim_time")
    probe.procs = procs
    try:
        wait_for(lambda: all(plant_status(probe, ns) for ns in SIMS), STARTUP_TIMEOUT, "the simulators")
        yield probe
    finally:
        probe.answering.clear()
        probe.close()
        probe.sim_time_proc.stop()
        codes = {ns: p.stop() for ns, p in procs.items()}
        assert set(codes.values()) == {0}, {ns: p.text()[-2000:] for ns, p in procs.items()}


def plant_status(probe, ns, since=0.0):
    return [diagnostic_values(s) for s in probe.statuses("plant_sim: plant", since)
            if s.hardware_id == f"/{ns}/plant_sim"]


def states(probe, ns, since=0.0):
    return probe.messages(f"/{ns}/joint_states", since)


def set_param(probe, ns, name, pv):
    res = probe.call(SetParameters, f"/{ns}/plant_sim/set_parameters",
                     SetParameters.Request(parameters=[Parameter(name=name, value=pv)]))
    return res.results[0]


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["double_integrator", "double_integrator_2axis", "mass_spring_damper", "dc_motor",
                             "cart_pole", "coupled_two_input"]),
       z=st.lists(st.floats(-3.0, 3.0), min_size=4, max_size=4))
def test_brake_command_is_admissible_and_heads_for_rest(name, z):
    plant = load_plant(name)
    backup = LQRBackup(plant)
    # any state, up to 3 times the limits' range away from the certified region's centre
    lo, hi = plant.region.x_min, plant.region.x_max
    x = 0.5 * (lo + hi) + np.asarray(z[:plant.n]) * (hi - lo)
    u = brake_command(plant, backup, x)
    assert u.shape == (plant.m,) and np.all(np.isfinite(u))
    assert np.all(u >= plant.u_min) and np.all(u <= plant.u_max)          # within the input box
    if plant.G.size:
        assert np.all(plant.G @ u <= plant.g + 1e-9)                       # and the input polytope
    # where the backup's own command is admissible, the brake is exactly the backup toward the
    # equilibrium of the tracked states' present values (clipped into their limits)
    idx = plant.tracked_index
    r = np.clip(x[idx], plant.x_min[idx], plant.x_max[idx])
    raw = backup(x, r)
    if np.all(raw >= plant.u_min) and np.all(raw <= plant.u_max):
        assert np.allclose(u, raw)


REST = 1e-4   # |v| below this: at rest (the backup's brake approaches rest geometrically)


def test_watchdog_brake_stops_the_plant_within_its_limits(sims):
    # no controller: after cmd_timeout the watchdog brakes to rest with the file's backup LQR
    wait_for(lambda: any(s["cmd_timeout_active"] == "True" for s in plant_status(sims, "brake")),
             what="the brake sim's watchdog to engage")
    wait_for(lambda: states(sims, "brake") and abs(states(sims, "brake")[-1].velocity[0]) < REST,
             what="the plant at rest")
    xs = states(sims, "brake")
    assert xs[0].name == ["axis_0"]                                     # the file's joints: map
    p = np.array([m.position[0] for m in xs])
    v = np.array([m.velocity[0] for m in xs])
    assert v[0] == V0                    # coasting from x_0 (a loaded probe may miss the very first states)
    dv = np.diff(v)
    assert np.all(dv <= 1e-12), "the watchdog never accelerates"
    assert np.all(dv >= -DT * U_MAX - 1e-12), "braking within the actuator limit"
    assert v.min() >= -1e-12, "no overshoot past zero velocity"
    k = int(np.argmax(dv < 0))                                          # the first braking step
    assert k > 0 and np.all(v[:k + 1] == V0)                           # coasted until the timeout
    assert np.isclose(dv[k], -DT * U_MAX), "the backup asks for more than u_max at first: it brakes at u_max"
    # from there no further than the hardest braking's distance would have taken it, times 2
    assert p.max() <= p[k] + 2 * v[k] ** 2 / (2 * U_MAX)
    assert np.all(np.abs(p) < 1.0)
    assert int(plant_status(sims, "brake")[-1]["constraint_violations"]) == 0
    assert "watchdog engaged, braking to rest" in sims.procs["brake"].text()


def test_watchdog_releases_on_a_command_and_engages_again(sims):
    wait_for(lambda: states(sims, "brake") and abs(states(sims, "brake")[-1].velocity[0]) < REST,
             what="the plant at rest")
    since = time.monotonic()
    sims.cmd_pub["brake"].publish(Float64MultiArray(data=[0.5]))
    wait_for(lambda: any(m.velocity[0] > 0.005 for m in states(sims, "brake", since)), what="the command to act")
    wait_for(lambda: "command received again: watchdog released" in sims.procs["brake"].text(),
             what="the release log line")
    # the command stops again: the watchdog brakes to rest a second time
    wait_for(lambda: sims.procs["brake"].text().count("watchdog engaged") >= 2, what="the watchdog again")
    wait_for(lambda: abs(states(sims, "brake")[-1].velocity[0]) < REST, what="the plant at rest again")
    v = np.array([m.velocity[0] for m in states(sims, "brake", since)])
    assert v.max() <= 0.5 * DT * (CMD_TIMEOUT / DT + 5) and v.min() >= -1e-12


def test_watchdog_zero_coasts_and_the_action_is_runtime_settable(sims):
    wait_for(lambda: any(s["cmd_timeout_active"] == "True" for s in plant_status(sims, "zero")),
             what="the zero sim's watchdog to engage")
    assert "watchdog engaged, command set to zero" in sims.procs["zero"].text()
    engaged_at = time.monotonic()
    wait_for(lambda: len(states(sims, "zero", engaged_at)) >= 5, what="states after the timeout")
    assert all(m.velocity[0] == V0 for m in states(sims, "zero"))     # zero acceleration: it coasts
    res = set_param(sims, "zero", "cmd_timeout_action",
                    ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="brake"))
    assert res.successful, res.reason
    wait_for(lambda: abs(states(sims, "zero")[-1].velocity[0]) < REST, what="the zero sim braked to rest")
    bad = set_param(sims, "zero", "cmd_timeout_action",
                    ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="coast"))
    assert not bad.successful and "zero, brake" in bad.reason


def test_publish_clock_advances_by_dt_and_stamps_the_states(sims):
    wait_for(lambda: len(states(sims, "clocked")) >= 10, what="10 states of the clocked sim")
    xs = states(sims, "clocked")
    stamps = [stamp_ns(m) for m in xs]
    assert stamps[0] == 0                                               # simulated time starts at 0 (x_0)
    assert np.all(np.diff(stamps) == DT_NS)                             # one dt per state, exactly
    clocks = [c.clock.sec * 1_000_000_000 + c.clock.nanosec for c in sims.messages("/clock")]
    assert np.all(np.diff(clocks) == DT_NS)
    assert {t for t in stamps if t >= clocks[0]} <= set(clocks)         # every state's stamp was a /clock tick
    # a node on use_sim_time (rclpy's TimeSource, best effort depth 1) follows the simulator's clock
    wait_for(lambda: sims.listener.get_clock().now().nanoseconds > 0, what="the listener on simulated time")
    listener_ns = sims.listener.get_clock().now().nanoseconds
    latest = sims.messages("/clock")[-1].clock
    assert listener_ns % DT_NS == 0 and listener_ns <= latest.sec * 1_000_000_000 + latest.nanosec + DT_NS


def test_use_sim_time_is_refused(sims):
    proc = sims.sim_time_proc
    wait_for(lambda: not proc.alive(), STARTUP_TIMEOUT, "the sim on use_sim_time to exit")
    code = proc.stop()
    assert code == 1, proc.text()[-2000:]
    assert "cannot start" in proc.text() and "use_sim_time" in proc.text()
    # and at runtime: the sim keeps stepping on the wall clock
    res = set_param(sims, "brake", "use_sim_time", ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=True))
    assert not res.successful and "use_sim_time" in res.reason
    since = time.monotonic()
    wait_for(lambda: len(states(sims, "brake", since)) >= 3, what="the sim still stepping")


def test_late_commands_hold_the_previous_command_never_twice_in_a_row(sims):
    wait_for(lambda: states(sims, "clocked"), what="the clocked sim")
    sims.answering.set()
    wait_for(lambda: len(sims.answers) >= 60, 60.0, "60 answered states")
    sims.answering.clear()
    with sims.answers_lock:
        answers = dict(sims.answers)
    by_index = {round(stamp_ns(m) / DT_NS): m.velocity[0] for m in states(sims, "clocked")}
    # the command applied from state j to state j + 1, from the velocity step v_{j+1} - v_j = dt u
    applied = {j: (by_index[j + 1] - v) / DT for j, v in by_index.items() if j + 1 in by_index}
    kinds = []
    for j in sorted(answers)[2:]:     # the first answers replace the watchdog's braking
        if j not in applied or j - 1 not in applied:
            continue
        on_time = abs(applied[j] - answer(j)) < 1e-6
        held = not on_time and abs(applied[j] - applied[j - 1]) < 1e-6
        # an answer that reached the sim after its tick (a probe stalled by the load): an older answer applies
        stale = any(abs(applied[j] - answer(i)) < 1e-6 for i in answers if i < j)
        # every step applies the newest command it had or, late, the previous one: nothing else
        assert on_time or held or stale, (j, applied[j], answer(j), applied[j - 1])
        # in time: the next state came well after the answer was published (so the sim had it at its tick)
        timely = j + 1 in answers and answers[j + 1][0] - answers[j][1] > ANSWER_MARGIN_S
        kinds.append((j, "on_time" if on_time else "held" if held else "stale", timely))
    timely = [(j, kind) for j, kind, in_time in kinds if in_time]
    assert len(kinds) >= 40 and len(timely) >= 20, kinds
    assert all(kind != "stale" for _, kind in timely), kinds   # a timely answer is applied now or held once
    held = [j for j, kind in timely if kind == "held"]
    assert held, "the fault injection held no command"
    # never two late ticks in a row
    assert not any(j + 1 in held for j in held), kinds
    assert 0.1 <= len(held) / len(timely) <= 0.6, kinds                # p / (1 + p) = 1/3 expected
    proc = sims.procs["clocked"]
    assert proc.stop() == 0
    summary = proc.summary()
    assert summary["late_commands"] >= len(held) > 0
    assert summary["constraint_violations"] == 0


def test_another_joint_map_and_the_latched_plant_record(sims):
    """The DC motor: one joint ``motor`` carrying speed as velocity and current as effort (no
    position); a late subscriber still gets the plant record; commands of the wrong size are
    refused; a violation names the file's constraint."""
    plant = load_plant("dc_motor")
    wait_for(lambda: states(sims, "motor"), what="the motor sim")
    m = states(sims, "motor")[-1]
    assert m.name == ["motor"] and list(m.position) == [] and len(m.velocity) == len(m.effort) == 1
    x0 = plant.equilibrium(0.5 * (plant.region.r_min + plant.region.r_max))[0]
    assert np.allclose([m.velocity[0], m.effort[0]], x0)
    # subscribed now, long after the simulator published it: transient-local delivers it
    key = sims.record(String, "/motor/plant", LATCHED_QOS)
    wait_for(lambda: sims.messages(key), what="the latched plant record")
    record = json.loads(sims.messages(key)[-1].data)
    assert record["node"] == "plant_sim" and record["name"] == "dc_motor"
    assert record["digest"] == plant.digest and plant_from_record(record).digest == plant.digest
    # a command of two values for a one-input plant, and a NaN: both refused, the plant unchanged
    sims.cmd_pub["motor"].publish(Float64MultiArray(data=[1.0, 2.0]))
    sims.cmd_pub["motor"].publish(Float64MultiArray(data=[float("nan")]))
    wait_for(lambda: any(int(s["refused_commands"]) >= 2 for s in plant_status(sims, "motor")),
             what="two refused commands")
    assert all(abs(x.velocity[0] - x0[0]) < 1e-9 for x in states(sims, "motor"))
    # full voltage: the current passes its 2 A limit; the record names the constraint "current"
    sims.cmd_pub["motor"].publish(Float64MultiArray(data=[24.0]))
    wait_for(lambda: sims.messages("/motor/constraint_violation"), what="a violation record")
    rec = json.loads(sims.messages("/motor/constraint_violation")[0].data)
    assert rec["kinds"] == ["current"] and rec["state"][1] > 2.0 and rec["command"] == [24.0]
    sims.cmd_pub["motor"].publish(Float64MultiArray(data=[0.0]))


def test_a_plant_without_tracked_states_runs_in_episodes_from_off_equilibrium(sims):
    plant = load_plant("pendulum")
    reg = plant.region
    x0 = 0.5 * (reg.x_min + reg.x_max) + 0.25 * (reg.x_max - reg.x_min)
    assert np.allclose(initial_state(plant, []), x0) and np.all(x0 > reg.x_min) and np.all(x0 < reg.x_max)
    per_episode = round(0.5 / plant.dt)
    wait_for(lambda: len(states(sims, "pendulum")) >= 3 * per_episode + 2, what="three pendulum episodes")
    xs = [np.array([m.position[0], m.velocity[0]]) for m in states(sims, "pendulum")]
    starts = [k for k, x in enumerate(xs) if np.allclose(x, x0)]
    assert len(starts) >= 3, starts
    # every episode_s, exactly (a state lost under load may hide a start, never move one)
    assert all(d % per_episode == 0 for d in np.diff(starts)) and per_episode in np.diff(starts), starts
    assert not np.allclose(xs[starts[0] + 1], x0)                   # and it moves in between (gravity)
    assert int(plant_status(sims, "pendulum")[-1]["episodes"]) >= 2
