"""Helpers for the attack tests of issue 9 (test_attacks_safety_node.py, test_attacks_safeguard.py);
``ros_parameter`` and ``background`` serve test_node_scpo_safety_node.py too.

Everything goes over real DDS: the nodes under test run as their own processes
(``ros_graph_helpers.NodeProcess``), the test talks to them through an ``AttackProbe``
(a ``Probe`` with the attacker's publishers and every output recorded). Waits are
conditions with timeouts; an observation window ("no matching command over the next
1.5 s") is a bounded wait, never a fixed sleep that a result depends on.

Run as a script, this module is the proposal flooder (its own process, so that the
flood does not share the probe's GIL and the probe still measures the command stream):
``python test/attack_helpers.py flood --topic /ns/proposed_weights --rate 1000 --duration 5``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

PARAMS = REPO / "config" / "scpo.yaml"
SAFEGUARD_PARAMS = REPO / "config" / "safeguard.yaml"
DT = 0.05
U_MAX = 1.0
P_MAX = 1.0
V_MAX = 1.0
# the certified region of config/scpo.yaml
P0_MAX, V0_MAX, R_MAX = 0.8, 0.2, 0.5
# The SCPO settings of test_node_scpo_safety_node.py: short worker steps on the 2-core machine.
SMALL_SCPO = {"n_samples": 16, "n_sample_states": 64, "n_cert_states": 128, "horizon_s": 3.0}


# --------------------------------------------------------------------------- pure helpers

def nominal_and_safe_sets(dof: int = 1, dt: float = DT):
    """(nominal maximal control-invariant set, the set S the envelope keeps) for the test plant:
    the ``dof``-axis double integrator of the shipped plant files (``plant.double_integrator_plant``),
    ``late_commands=1``."""
    from scpo_ros.plant import double_integrator_plant
    from scpo_ros.safeguard.invariant_set import safe_set_for
    s = safe_set_for(double_integrator_plant(dof, dt), late_commands=1)
    return s.nominal, s.invariant


def recoverable_starts(n_extra: int = 3, shrink: float = 0.97) -> list[tuple[float, float]]:
    """States of the nominal maximal control-invariant set outside the certified box, moving
    toward a wall: (0.75, 0.7) and (-0.75, -0.7) from the issue, plus ``n_extra`` vertices of
    the nominal set shrunk by ``shrink`` (spread along its boundary)."""
    nominal, _ = nominal_and_safe_sets()
    V = nominal.vertices() * shrink
    outside = V[((np.abs(V[:, 0]) > P0_MAX) | (np.abs(V[:, 1]) > V0_MAX)) & (V[:, 0] * V[:, 1] > 0.05)]
    outside = outside[np.argsort(np.arctan2(outside[:, 1], outside[:, 0]))]
    picks = [outside[int(i)] for i in np.linspace(0, len(outside) - 1, n_extra)] if len(outside) else []
    starts = [(0.75, 0.7), (-0.75, -0.7)] + [(round(float(p), 4), round(float(v), 4)) for p, v in picks]
    for p, v in starts:
        assert nominal.contains(np.array([p, v])), (p, v)
    return starts


def reset_state_for(p: float, v: float, dt: float = DT) -> tuple[float, float]:
    """The simulator's reset state whose first *published* state is (p, v).

    ``reset`` sets the state and zeroes the command; the next tick integrates that zero
    command before it publishes, so x0 itself is never answered: start one coasting step
    earlier. (A simulator that publishes x0 at once starts a step further from the wall:
    also inside the nominal set.)"""
    return p - v * dt, v


def max_gap(times: list[float], start: float, end: float) -> float:
    """Largest interval without an event in [start, end] (edges included)."""
    ts = [start] + sorted(t for t in times if start <= t <= end) + [end]
    return max(b - a for a, b in zip(ts[:-1], ts[1:], strict=True))


# --------------------------------------------------------------------------- ROS helpers

def ros_parameter(name: str, value):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    if isinstance(value, bool):
        pv = ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
    elif isinstance(value, int):
        pv = ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    elif isinstance(value, float):
        pv = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    elif isinstance(value, str):
        pv = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        pv = ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=list(value))
    elif isinstance(value, (list, tuple)):
        pv = ParameterValue(type=ParameterType.PARAMETER_DOUBLE_ARRAY, double_array_value=[float(v) for v in value])
    else:
        raise TypeError(f"no ROS parameter type for {value!r}")
    return Parameter(name=name, value=pv)


class AttackProbe:
    """A ``Probe`` in one namespace with the attacker's publishers and every output recorded."""

    def __init__(self, ns: str, name: str = "attack_probe"):
        from diagnostic_msgs.msg import DiagnosticArray  # noqa: F401 (recorded by record_diagnostics)
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64MultiArray, String

        from ros_graph_helpers import Probe
        from scpo_ros.ros.qos import CONTROL_QOS, EVENT_QOS, LATCHED_QOS
        self.ns = "/" + ns.strip("/")
        self.probe = Probe(name)
        node = self.probe.node
        t = self.topic
        self.state_pub = node.create_publisher(JointState, t("joint_states"), CONTROL_QOS)
        self.ref_pub = node.create_publisher(Float64MultiArray, t("reference"), CONTROL_QOS)
        self.raw_pub = node.create_publisher(Float64MultiArray, t("raw_action"), CONTROL_QOS)
        self.weights_pub = node.create_publisher(Float64MultiArray, t("proposed_weights"), EVENT_QOS)
        self.probe.record(Float64MultiArray, t("cmd"), CONTROL_QOS, key="cmd")
        self.probe.record(JointState, t("joint_states"), CONTROL_QOS, key="joint_states")
        self.probe.record(String, t("constraint_violation"), EVENT_QOS, key="violations")
        self.probe.record(String, t("safety_mode"), LATCHED_QOS, key="safety_mode")
        self.probe.record(String, t("scpo_decision"), EVENT_QOS, key="decisions")
        self.probe.record(String, t("intervention"), EVENT_QOS, key="interventions")
        self.probe.record_diagnostics()
        self.policy = None            # callable(JointState) -> raw action list, or None: silent
        self._policy_lock = threading.Lock()
        node.create_subscription(JointState, t("joint_states"), self._on_state_for_policy, CONTROL_QOS)

    # -- names and time
    def topic(self, name: str) -> str:
        return f"{self.ns}/{name}"

    @property
    def node(self):
        return self.probe.node

    def now(self, offset: float = 0.0):
        from rclpy.duration import Duration
        t = self.node.get_clock().now()
        t = t + Duration(nanoseconds=int(offset * 1e9)) if offset >= 0 else t - Duration(nanoseconds=int(-offset * 1e9))
        return t.to_msg()

    # -- inputs
    def joint_state(self, p, v, names=None, stamp=None, offset: float = 0.0):
        from sensor_msgs.msg import JointState
        p = [p] if not isinstance(p, (list, tuple)) else list(p)
        v = [v] if not isinstance(v, (list, tuple)) else list(v)
        msg = JointState(name=list(names) if names is not None else ["axis_0"],
                         position=[float(x) for x in p], velocity=[float(x) for x in v])
        msg.header.stamp = stamp if stamp is not None else self.now(offset)
        return msg

    def send_state(self, p, v, **kw):
        msg = self.joint_state(p, v, **kw)
        self.state_pub.publish(msg)
        return msg

    def send_reference(self, r):
        from std_msgs.msg import Float64MultiArray
        self.ref_pub.publish(Float64MultiArray(data=[float(x) for x in np.atleast_1d(r)]))

    def send_raw(self, u):
        from std_msgs.msg import Float64MultiArray
        self.raw_pub.publish(Float64MultiArray(data=[float(x) for x in np.atleast_1d(u)]))

    def set_policy(self, policy):
        with self._policy_lock:
            self.policy = policy

    def _on_state_for_policy(self, msg):
        with self._policy_lock:
            policy = self.policy
        if policy is not None:
            u = policy(msg)
            if u is not None:
                self.send_raw(u)

    # -- outputs
    def commands(self, since: float = 0.0) -> list[tuple[float, np.ndarray, str]]:
        """(receive time, data, label) of every ``cmd`` received since ``since``."""
        with self.probe._lock:
            items = [(t, m) for t, m in self.probe.received["cmd"] if t >= since]
        return [(t, np.asarray(m.data, dtype=float), m.layout.dim[0].label if m.layout.dim else "")
                for t, m in items]

    def times(self, key: str, since: float = 0.0, until: float = math.inf) -> list[float]:
        with self.probe._lock:
            return [t for t, _ in self.probe.received[key] if since <= t <= until]

    def violations(self, since: float = 0.0) -> list[dict]:
        return self.probe.json_messages("violations", since)

    def modes(self, since: float = 0.0) -> list[dict]:
        return self.probe.json_messages("safety_mode", since)

    def decisions(self, since: float = 0.0) -> list[dict]:
        return self.probe.json_messages("decisions", since)

    def statuses(self, node_name: str, task: str, since: float = 0.0) -> list:
        """``/diagnostics`` statuses of ``<node_name>: <task>`` from the node in this namespace."""
        fqn = f"{self.ns}/{node_name}"
        return [s for s in self.probe.statuses(f"{node_name}: {task}", since)
                if not s.hardware_id or s.hardware_id == fqn]

    # -- services
    def set_params(self, node_name: str, values: dict, timeout: float = 30.0) -> list:
        from rcl_interfaces.srv import SetParameters
        req = SetParameters.Request(parameters=[ros_parameter(k, v) for k, v in values.items()])
        return self.probe.call(SetParameters, f"{self.ns}/{node_name}/set_parameters", req, timeout).results

    def transition(self, node_name: str, transition_id: int, timeout: float = 30.0) -> bool:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState
        req = ChangeState.Request(transition=Transition(id=transition_id))
        return self.probe.call(ChangeState, f"{self.ns}/{node_name}/change_state", req, timeout).success

    def lifecycle_state(self, node_name: str, timeout: float = 30.0) -> int:
        from lifecycle_msgs.srv import GetState
        return self.probe.call(GetState, f"{self.ns}/{node_name}/get_state", GetState.Request(),
                               timeout).current_state.id

    def ensure_active(self, node_name: str) -> None:
        from lifecycle_msgs.msg import State, Transition
        state = self.lifecycle_state(node_name)
        if state == State.PRIMARY_STATE_UNCONFIGURED:
            assert self.transition(node_name, Transition.TRANSITION_CONFIGURE)
            state = self.lifecycle_state(node_name)
        if state == State.PRIMARY_STATE_INACTIVE:
            assert self.transition(node_name, Transition.TRANSITION_ACTIVATE)
        assert self.lifecycle_state(node_name) == State.PRIMARY_STATE_ACTIVE

    def reset_plant(self, p: float, v: float) -> float:
        """Simulator to the state whose first published state is (p, v); returns the time
        after the reset's reply (violations and commands of the run count from there)."""
        from std_srvs.srv import Trigger
        p0, v0 = reset_state_for(p, v)
        from scpo_ros.graph import SIMULATOR
        res = self.set_params(SIMULATOR, {"initial_state": [p0, v0]})
        assert all(r.successful for r in res), [r.reason for r in res]
        assert self.probe.call(Trigger, f"{self.ns}/{SIMULATOR}/reset", Trigger.Request()).success
        return time.monotonic()

    def settle(self, timeout: float = 20.0) -> float:
        """Plant at rest at the origin under the node (nothing in flight that would act on
        the next reset's state): reset there and wait for a small command answering it."""
        since = self.reset_plant(0.0, 0.0)

        def calm():
            cmds = self.commands(since)
            return len(cmds) >= 3 and all(abs(u).max() < 0.05 for _, u, _ in cmds[-3:])
        from ros_graph_helpers import wait_for
        wait_for(calm, timeout, "the plant at rest under the node")
        return time.monotonic()

    def close(self):
        self.probe.close()


def assert_commands_bounded(cmds, u_max: float = U_MAX, dof: int = 1) -> None:
    """Every published command: ``dof`` finite values within the actuator box."""
    bad = [(round(t, 3), u.tolist(), lab) for t, u, lab in cmds
           if u.shape != (dof,) or not np.all(np.isfinite(u)) or np.any(np.abs(u) > u_max + 1e-9)]
    assert not bad, f"{len(bad)} of {len(cmds)} commands not finite or outside |u| <= {u_max}: {bad[:5]}"


def wait_window(seconds: float) -> None:
    """An observation window of fixed length (what happens *in* it is asserted, nothing waits on it)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)


def status_mentions(status, *words: str) -> bool:
    """The status's message, a key or a value names one of ``words`` (case-insensitive)."""
    text = " ".join([status.message] + [f"{kv.key} {kv.value}" for kv in status.values]).lower()
    return any(w.lower() in text for w in words)


@contextlib.contextmanager
def busy_processes(n: int = 2):
    """``n`` CPU-bound processes at nice 0 (the load of finding 10), killed on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
             for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@contextlib.contextmanager
def background(fn, period: float):
    """Call ``fn()`` every ``period`` s in a thread until the block ends."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            fn()
            stop.wait(period)
    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=5.0)


# --------------------------------------------------------------------------- the attack tests' graphs

def start_node(log_dir, name: str, ns: str, params: dict, params_file=PARAMS):
    """``name`` as a ``NodeProcess`` in ``/ns``, ``params`` merged into ``params_file``."""
    from ros_graph_helpers import NodeProcess
    return NodeProcess(name, log_dir, params_file, params, namespace=f"/{ns}")


def stop_all(procs: dict) -> dict:
    """Stop in reverse start order; the exit codes by name (each must be 0: checked by the caller)."""
    return {name: proc.stop(timeout=30.0) for name, proc in reversed(list(procs.items()))}


@contextlib.contextmanager
def probed(ns: str, probe_name: str, procs: dict, ready=None):
    """An ``AttackProbe`` in ``ns`` on the node processes ``procs`` (also ``ap.procs``), yielded once
    ``ready(ap)`` returned; after the block: no raw-action policy, the probe closed, every process
    stopped and, unless the block failed, every exit code 0."""
    ap = AttackProbe(ns, probe_name)
    ap.procs = procs
    try:
        if ready is not None:
            ready(ap)
        yield ap
    finally:
        ap.set_policy(None)
        ap.close()
        codes = stop_all(procs)
    assert all(c == 0 for c in codes.values()), {k: (c, procs[k].text()[-2000:]) for k, c in codes.items()}


def commanding(what: str, n: int = 10):
    """``probed``'s ``ready``: ``n`` commands came (a controller under a running plant)."""
    from ros_graph_helpers import STARTUP_TIMEOUT, wait_for

    def ready(ap):
        wait_for(lambda: len(ap.commands()) >= n, STARTUP_TIMEOUT, what)
    return ready


def answering(what: str):
    """``probed``'s ``ready``: the node subscribes to the states and answers one (a node alone)."""
    from ros_graph_helpers import STARTUP_TIMEOUT, wait_for

    def ready(ap):
        wait_for(lambda: ap.node.count_subscribers(ap.topic("joint_states")) > 0, STARTUP_TIMEOUT, what)
        answer(ap, 0.1, 0.05, timeout=STARTUP_TIMEOUT)
    return ready


def not_hold(cmds):
    """The commands that answer a state (``hold`` commands answer none)."""
    return [c for c in cmds if c[2] != "hold"]


def answer(ap: AttackProbe, p, v, names=None, timeout: float = 20.0):
    """The command answering (p, v): publish it with fresh stamps until two answers agree."""
    from ros_graph_helpers import wait_for
    since = time.monotonic()

    def got():
        cmds = not_hold(ap.commands(since))
        if len(cmds) >= 2 and np.allclose(cmds[-1][1], cmds[-2][1], atol=1e-9):
            return cmds[-1]
        ap.send_state(p, v, names=names)
        time.sleep(0.05)
        return None
    return wait_for(got, timeout, f"a command answering p={p}, v={v}")


def quiet(ap: AttackProbe, quiet_s: float = 0.4, timeout: float = 10.0) -> float:
    """Wait until no state-answering command came for ``quiet_s``: nothing in flight."""
    from ros_graph_helpers import wait_for
    wait_for(lambda: not not_hold(ap.commands(time.monotonic() - quiet_s)), timeout, "no command in flight")
    return time.monotonic()


def assert_unanswered(ap: AttackProbe, publish, u_bad, window: float = 1.5, what: str = ""):
    """``publish()`` sends a state that must be rejected: in the window no command equals the
    one its values would get (``u_bad``, measured by a positive control)."""
    since = quiet(ap)
    publish()
    wait_window(window)
    hits = [(round(t - since, 3), u.tolist(), lab) for t, u, lab in ap.commands(since)
            if lab != "hold" and np.allclose(u, u_bad, atol=1e-6)]
    assert not hits, f"{what}: the node answered a state it must reject: {hits}"


def assert_late_commands_harmless(ap: AttackProbe, sim, since: float) -> None:
    """After a run with late commands (the simulator's ``late_command_probability``) under load:
    no violation reported since ``since``, every command bounded, and the stopped simulator's
    SUMMARY counts no violation and at least one late command (else the run tested nothing)."""
    v = ap.violations(since)
    assert not v, f"{len(v)} violations with late commands under load: first {v[0]}"
    assert_commands_bounded(ap.commands())
    s = sim.summary()
    assert s["constraint_violations"] == 0, s
    assert s.get("late_commands", 0) > 0, f"no late command was injected: {s}"


def stop_node(proc, timeout: float = 30.0) -> int:
    """SIGINT a ``NodeProcess`` (if still running), wait; the exit code."""
    return proc.stop(timeout=timeout)


class Flooder:
    """The proposal flooder as a subprocess: ``start()``, ``result()`` -> its counts."""

    def __init__(self, topic: str, rate: float, duration: float, malformed_fraction: float = 0.5):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "flood", "--topic", topic,
                                      "--rate", str(rate), "--duration", str(duration),
                                      "--malformed", str(malformed_fraction)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ), start_new_session=True)

    def result(self, timeout: float = 120.0) -> dict:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate()
            raise AssertionError(f"flooder did not finish: {out[-2000:]}") from None
        for line in out.splitlines():
            if line.startswith("FLOOD "):
                return json.loads(line[len("FLOOD "):])
        raise AssertionError(f"flooder printed no FLOOD line (rc {self.proc.returncode}): {out[-2000:]}")

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _flood_main(argv: list[str]) -> int:
    """Publish proposals at ``--rate`` for ``--duration`` s; a ``--malformed`` fraction of them
    malformed (wrong sizes small and large, NaN, wrong fingerprint, no fingerprint)."""
    import argparse

    import rclpy
    from std_msgs.msg import Float64MultiArray

    from scpo_ros.policy import MLPLayout
    from scpo_ros.residual_scpo import backup_weights
    from scpo_ros.ros.messages import weights_to_msg
    from scpo_ros.ros.qos import EVENT_QOS
    ap = argparse.ArgumentParser()
    ap.add_argument("--topic", required=True)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--malformed", type=float, default=0.5)
    a = ap.parse_args(argv)
    layout = MLPLayout(3, 1, (32, 32))
    theta = backup_weights(layout).astype(float)
    rng = np.random.default_rng(0)
    nan = theta.copy()
    nan[7] = math.nan
    inf = theta.copy()
    inf[-1] = math.inf
    bad = [weights_to_msg(theta[:5], layout.fingerprint),                              # far too short
           weights_to_msg(np.concatenate([theta, [0.0]]), layout.fingerprint),         # one too many
           weights_to_msg(np.zeros(20000), layout.fingerprint),                        # large, wrong size
           weights_to_msg(nan, layout.fingerprint),
           weights_to_msg(inf, layout.fingerprint),
           weights_to_msg(theta, MLPLayout(3, 1, (16,)).fingerprint),                   # wrong fingerprint
           Float64MultiArray(data=theta.tolist())]                                     # no fingerprint
    good = [weights_to_msg(theta + 0.01 * rng.standard_normal(theta.size), layout.fingerprint) for _ in range(8)]
    rclpy.init()
    node = rclpy.create_node("proposal_flooder")
    pub = node.create_publisher(Float64MultiArray, a.topic, EVENT_QOS)
    deadline = time.monotonic() + 30.0
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = {"sent": 0, "malformed": 0, "valid": 0, "matched": pub.get_subscription_count()}
    t0 = time.monotonic()
    period = 1.0 / a.rate
    i = 0
    while True:
        now = time.monotonic()
        if now - t0 >= a.duration:
            break
        # pace by the clock: catch up after a descheduling, never sleep past the schedule
        due = t0 + i * period
        if due > now:
            time.sleep(due - now)
        if rng.random() < a.malformed:
            pub.publish(bad[i % len(bad)])
            counts["malformed"] += 1
        else:
            pub.publish(good[i % len(good)])
            counts["valid"] += 1
        counts["sent"] += 1
        i += 1
    counts["seconds"] = time.monotonic() - t0
    print("FLOOD " + json.dumps(counts), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "flood":
        sys.exit(_flood_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} flood --topic T [--rate R] [--duration S] [--malformed F]")
