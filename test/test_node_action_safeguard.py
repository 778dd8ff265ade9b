"""action_safeguard over real DDS: malicious raw actions are projected (zero violations),
bad and stale inputs fall back to the (projected) backup, states outside the invariant set are
projected back or recovered, each with a record and a diagnostic."""
import json
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.exceptions import InvalidParameterValueException  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray, String  # noqa: E402

from scpo_ros.backup import LQRBackup  # noqa: E402
from scpo_ros.dynamics import DoubleIntegrator  # noqa: E402
from scpo_ros.inputs import JointMap  # noqa: E402
from scpo_ros.nodes.action_safeguard import ActionSafeguard  # noqa: E402
from scpo_ros.plant import load_plant  # noqa: E402
from scpo_ros.ros.diagnostics import ERROR, WARN  # noqa: E402
from scpo_ros.safeguard.invariant_set import safe_set_for  # noqa: E402
from scpo_ros.safeguard.projection import SafeguardProjector  # noqa: E402

TIMEOUT = 10.0
PLANT = load_plant("double_integrator")
"""The safeguard's default plant (``plant_file``: the shipped double integrator): the safe set
and backup it builds; ``DoubleIntegrator()`` (the same dt and limits) steps it here."""


def joint_state(plant, x) -> JointState:
    """A JointState of ``x`` by the plant file's ``joints:`` map (what ``plant_sim`` publishes)."""
    names, position, velocity, effort = JointMap.for_plant(plant).write(x)
    return JointState(name=names, position=position, velocity=velocity, effort=effort)


def wait_for(cond, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


class Harness:
    """The safeguard node plus a peer node (state/raw-action publisher, cmd/record/diagnostics
    listener) in one private context, spun by one executor thread."""

    def __init__(self, timeout=5.0, **overrides):
        self.ctx = rclpy.context.Context()
        rclpy.init(context=self.ctx)
        self.node = ActionSafeguard(context=self.ctx, parameter_overrides=[
            Parameter("state_timeout", value=timeout), Parameter("action_timeout", value=timeout),
            *(Parameter(k, value=v) for k, v in overrides.items())])
        self.peer = rclpy.create_node("safeguard_test_peer", context=self.ctx)
        self.state_pub = self.peer.create_publisher(JointState, "joint_states", 10)
        self.raw_pub = self.peer.create_publisher(Float64MultiArray, "raw_action", 10)
        self.cmds, self.records, self.diags = [], [], []
        self.peer.create_subscription(Float64MultiArray, "cmd", lambda m: self.cmds.append(np.array(m.data)), 10)
        self.peer.create_subscription(String, "intervention", lambda m: self.records.append(json.loads(m.data)), 100)
        self.peer.create_subscription(DiagnosticArray, "/diagnostics", lambda m: self.diags.extend(m.status), 100)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        self.executor.add_node(self.peer)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        # autostart configures from a timer: the intervention publisher exists once it fired
        assert wait_for(lambda: self.raw_pub.get_subscription_count() >= 1
                        and self.state_pub.get_subscription_count() >= 1
                        and self.node.cmd_pub.get_subscription_count() >= 1
                        and self.node.record_pub is not None and self.node.active
                        and self.node.record_pub.get_subscription_count() >= 1
                        and self.node.diag._pub.get_subscription_count() >= 1)

    def send_state(self, x, wait=True):
        msg = joint_state(self.node.plant, x)
        msg.header.stamp = self.peer.get_clock().now().to_msg()    # states need fresh, increasing stamps
        self.state_pub.publish(msg)
        if wait:   # the node has taken this state (ordering across topics is not guaranteed)
            assert wait_for(lambda: self.node.x is not None and np.allclose(self.node.x, x))

    def send_raw(self, u):
        n = len(self.cmds)
        self.raw_pub.publish(Float64MultiArray(data=list(map(float, u))))
        assert wait_for(lambda: len(self.cmds) > n), "no command for the raw action"
        return self.cmds[-1]

    def prime(self):
        """A raw action before any state: ignored (no state yet) but marks the policy as
        alive, so the first state is not answered with a stale-action fallback."""
        self.raw_pub.publish(Float64MultiArray(data=[0.0] * self.node.projector.m))
        assert wait_for(lambda: np.isfinite(self.node.u_time))

    def close(self):
        self.executor.shutdown()
        self.thread.join(timeout=5)
        self.node.destroy_node()
        self.peer.destroy_node()
        rclpy.shutdown(context=self.ctx)


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def test_malicious_raw_actions_are_projected_and_the_plant_stays_safe(harness):
    sysm = DoubleIntegrator()
    S = safe_set_for(PLANT, late_commands=1)
    x = np.array([0.3, 0.4])
    harness.prime()
    for t in range(150):
        harness.send_state(x)
        raw = np.array([3.0 if t < 100 else -3.0])          # drive into the wall, then the other way
        cmd = harness.send_raw(raw)
        assert cmd.shape == (1,) and abs(cmd[0]) <= sysm.u_max + 1e-12
        x = sysm.step(x, cmd)
        assert not sysm.violation(x), f"violation at step {t}: x={x}"
        assert S.invariant.contains(x, tol=1e-9)
    assert x[0] > 0.9 or x[0] < -0.5   # it did get pushed to the limits
    assert len(harness.records) >= 100
    projected = [r for r in harness.records if not r["fallback"]]
    assert projected and all(r["distance"] > 0 and r["active"] for r in projected)
    assert all(not r["fallback"] for r in harness.records)
    assert harness.node.counts["fallbacks"] == 0


def test_bad_and_stale_inputs_fall_back_to_the_backup(harness):
    sysm = DoubleIntegrator()
    backup = LQRBackup(PLANT)
    x = np.array([0.2, -0.1])
    harness.prime()
    harness.send_state(x)
    expected = np.clip(backup(x, np.zeros(1)), -1, 1)
    # A raw action with NaN, and one of the wrong size: the backup goes out, with a record.
    for bad in ([float("nan")], [0.1, 0.2]):
        cmd = harness.send_raw(bad)
        np.testing.assert_allclose(cmd, expected)
        assert wait_for(lambda: harness.records and harness.records[-1]["reason"] == "bad_action")
    assert harness.node.counts["bad_action"] == 2
    assert wait_for(lambda: any(s.level == WARN and "bad raw_action" in s.message for s in harness.diags))
    # A joint state with NaN or the wrong size is dropped: the node keeps the last good state.
    harness.send_state(np.array([np.nan, 0.0]), wait=False)
    harness.state_pub.publish(JointState(position=[0.1, 0.2], velocity=[0.0, 0.0]))
    assert wait_for(lambda: harness.node.counts["bad_state"] == 2)
    np.testing.assert_allclose(harness.node.x, x)
    # A state outside the invariant set from which one admissible action still returns into it:
    # projected (no fallback), the record says so, WARN diagnostic.
    S = safe_set_for(PLANT, late_commands=1)
    offline = SafeguardProjector(S, margin=1e-6)
    back = np.array([1.02, -0.6])
    assert not S.invariant.contains(back) and not offline.project(back, [0.5]).fallback
    harness.send_state(back)
    cmd = harness.send_raw([0.5])
    np.testing.assert_allclose(cmd, offline.project(back, [0.5]).u, atol=1e-9)
    assert S.invariant.contains(sysm.step(back, cmd), tol=1e-9)
    assert wait_for(lambda: harness.records[-1]["in_set"] is False and not harness.records[-1]["fallback"])
    assert wait_for(lambda: any(s.level == WARN and "outside the safe set" in s.message for s in harness.diags))
    assert harness.node.counts["outside_set_projections"] == 1
    # Outside, and no admissible action returns: the recovery action (hardest braking; the
    # LQR backup would brake with -0.70 only), ERROR diagnostic.
    outside = np.array([0.9, 0.5])
    assert np.clip(backup(outside, np.zeros(1)), -1, 1)[0] > -0.8
    harness.send_state(outside)
    cmd = harness.send_raw([0.5])
    np.testing.assert_allclose(cmd, [-1.0])
    assert wait_for(lambda: harness.records[-1]["reason"] == "outside_invariant_set")
    assert harness.records[-1]["fallback"] and harness.records[-1]["violation"] > 0
    assert wait_for(lambda: any(s.level == ERROR and "recovery action: outside_invariant_set" in s.message
                                for s in harness.diags))
    # The node is still alive and projecting.
    harness.send_state(np.array([0.0, 0.0]))
    assert abs(harness.send_raw([5.0])[0]) <= 1.0


def test_stale_state_and_stale_action():
    h = Harness(timeout=0.3)
    try:
        backup = LQRBackup(PLANT)
        x = np.array([0.1, 0.2])
        # No raw action yet: every state is answered with the backup (stale_action).
        n = len(h.cmds)
        h.send_state(x)
        assert wait_for(lambda: len(h.cmds) > n)
        np.testing.assert_allclose(h.cmds[-1], np.clip(backup(x, np.zeros(1)), -1, 1))
        assert wait_for(lambda: h.records and h.records[-1]["reason"] == "stale_action")
        # Fresh state and action: a projection, no fallback.
        h.send_state(x)
        h.send_raw([0.0])
        assert wait_for(lambda: h.node.counts["commands"] >= 2)
        # The state goes stale: a raw action gets the backup on the last state, ERROR.
        assert wait_for(lambda: time.monotonic() - h.node.x_time > 0.35)
        cmd = h.send_raw([0.7])
        np.testing.assert_allclose(cmd, np.clip(backup(x, np.zeros(1)), -1, 1))
        assert wait_for(lambda: h.records[-1]["reason"] == "stale_state")
        assert wait_for(lambda: any(s.level == ERROR and "stale_state" in s.message for s in h.diags))
    finally:
        h.close()


def test_lifecycle_deactivate_answers_states_with_the_fallback_and_bad_parameters_are_refused():
    h = Harness()
    try:
        backup = LQRBackup(PLANT)
        h.prime()
        h.send_state(np.array([0.0, 0.0]))
        h.send_raw([0.1])
        h.node.trigger_deactivate()
        # Deactivated: inactive means safe, not silent. Raw actions are ignored, every state gets
        # the envelope's fallback (the backup projected onto U_safe(x)).
        n = len(h.cmds)
        h.raw_pub.publish(Float64MultiArray(data=[0.9]))
        x = np.array([0.3, 0.1])
        h.send_state(x)
        assert wait_for(lambda: len(h.cmds) > n)
        np.testing.assert_allclose(h.cmds[-1], np.clip(backup(x, np.zeros(1)), -1, 1))
        assert wait_for(lambda: h.node.counts["inactive_commands"] >= 1)
        h.node.trigger_activate()
        h.send_state(np.array([0.0, 0.0]))
        h.send_raw([0.1])
        # Runtime parameters: a timeout change is applied, an out-of-range or read-only one refused.
        results = h.node.set_parameters([Parameter("action_timeout", value=0.5)])
        assert results[0].successful and h.node.values["action_timeout"] == 0.5
        assert not h.node.set_parameters([Parameter("action_timeout", value=-1.0)])[0].successful
        assert not h.node.set_parameters([Parameter("u_max_tight", value=[0.5])])[0].successful   # read-only
        assert h.node.values["action_timeout"] == 0.5 and h.node.values["u_max_tight"] == []
    finally:
        h.close()
    ctx = rclpy.context.Context()
    rclpy.init(context=ctx)
    try:
        with pytest.raises((ValueError, InvalidParameterValueException), match="u_max_tight"):   # loosens
            ActionSafeguard(context=ctx, parameter_overrides=[Parameter("u_max_tight", value=[2.0])])
        with pytest.raises(ValueError, match="rocket"):                     # no such plant file
            ActionSafeguard(context=ctx, parameter_overrides=[Parameter("plant_file", value="rocket")])
    finally:
        rclpy.shutdown(context=ctx)


def test_the_pendulum_variant_keeps_the_pendulum_in_its_safe_set():
    """``plant_file: pendulum`` (a model plant) with its limits tightened at start (angle 1 rad,
    rate 6 rad/s, torque 0.8; no references): membership by ``safe_set.contains(x, r)``."""
    limits = {"x_min_tight": [-1.0, -6.0], "x_max_tight": [1.0, 6.0], "u_min_tight": [-0.8], "u_max_tight": [0.8]}
    h = Harness(plant_file="pendulum", late_commands=0, **limits)
    try:
        plant = load_plant("pendulum").with_limits(*limits.values())
        assert h.node.plant.x_max.tolist() == [1.0, 6.0] and h.node.plant.u_max.tolist() == [0.8]
        S = h.node.envelope.safe_set
        assert "pendulum" in S.name.lower() and h.node.projector.m == 1
        x = np.array([0.3, 1.0])
        assert S.contains(x, None)
        h.prime()
        for t in range(60):                                  # full torque towards the limit, then back
            h.send_state(x)
            cmd = h.send_raw([0.8 if t < 40 else -0.8])
            assert cmd.shape == (1,) and abs(cmd[0]) <= 0.8 + 1e-12
            x = np.asarray(plant.step(x, cmd), dtype=float)
            assert S.contains(x, None, tol=1e-7), f"left the safe set at step {t}: x={x}"
            assert abs(x[0]) <= 1.0 and abs(x[1]) <= 6.0
        assert any(not r["fallback"] and r["distance"] > 0 for r in h.records)   # it did project
    finally:
        h.close()


@pytest.mark.parametrize("name", ["coupled_two_input", "dc_motor"])
def test_another_plant_stays_safe_and_its_plant_is_latched(name):
    """Other robots by their file alone: ``coupled_two_input`` (two inputs, an H polytope, the
    implicit safe set) and ``dc_motor`` (one joint: speed as velocity, current as effort):
    aggressive raw actions, the plant stepped with the commands, no limit left; the plant
    record on the latched ``plant`` topic matches the file."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    plant = load_plant(name)
    h = Harness(plant_file=name)
    try:
        records = []
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        h.peer.create_subscription(String, "plant", lambda m: records.append(json.loads(m.data)), latched)
        assert wait_for(lambda: records)            # a late subscriber still gets it
        assert records[0]["digest"] == plant.digest and records[0]["node"] == "action_safeguard"
        assert h.node.projector.m == plant.m and h.node.plant.name == plant.name
        rng = np.random.default_rng(3)
        x = plant.region.x_min + 0.5 * (plant.region.x_max - plant.region.x_min)
        h.prime()
        for t in range(60):
            h.send_state(x)
            raw = 3.0 * rng.uniform(plant.u_min, plant.u_max)
            cmd = h.send_raw(raw)
            assert cmd.shape == (plant.m,) and np.all(cmd >= plant.u_min - 1e-12) \
                and np.all(cmd <= plant.u_max + 1e-12)
            x = np.asarray(plant.step(x, cmd), dtype=float)
            bad = {k: v for k, v in plant.violations(x, cmd).items() if np.any(v)}
            assert not bad, f"step {t}: {bad}, x={x}, u={cmd}"
        assert any(r["distance"] > 0 for r in h.records)   # it did project
    finally:
        h.close()
