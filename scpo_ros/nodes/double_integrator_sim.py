"""``double_integrator_sim``: a simulated ``dof``-axis double integrator.

Every ``1/rate_hz`` s (wall clock) it integrates the last command over ``dt`` (zero-order
hold, the ``DoubleIntegrator`` model of ``scpo_ros.dynamics``, optional process noise) and
publishes the state.

Topics (relative names, so a namespace applies):
- ``joint_states`` (out, ``sensor_msgs/JointState``): joints ``axis_0..``, position and velocity, stamped.
- ``cmd`` (in, ``std_msgs/Float64MultiArray``): one acceleration per axis, the convention of
  ros2_control's forward command controllers. The last command is held. Commands of the
  wrong length or with NaN/Inf are refused (counted, logged) and the previous one is kept.
- ``constraint_violation`` (out, ``std_msgs/String``, JSON): one message per simulated step
  that breaks ``|p| <= p_max``, ``|v| <= v_max`` or ``|u| <= u_max``:
  ``{"step", "stamp", "kinds", "position", "velocity", "command", "total"}``.
- ``/clock`` (out, ``rosgraph_msgs/Clock``, only with ``publish_clock``): see below.
- ``/diagnostics``: ``double_integrator_sim: plant``, ERROR once any violation happened,
  with the counters, the limits (the analysis reads the limits from here),
  ``cmd_timeout_active`` and ``late_commands``.

Command watchdog (``cmd_timeout``, ``cmd_timeout_action``). This is the plant's own
watchdog, the drive's "no command" reaction: while the controller is dead (a crashed or
deactivated safety node, a cut cable) nothing else protects the plant. After
``cmd_timeout`` s without a command (counted from the start of stepping when no command
ever came) the command becomes
- ``brake`` (default): the hardest admissible braking toward zero velocity, per axis
  ``u = clip(-v / dt, -u_max, u_max)``: the plant stops without overshoot and within its
  actuator limits (a plant that cannot stop inside its position limits still leaves them);
- ``zero``: zero acceleration, the plant coasts at its last velocity.
The first command that arrives again takes over at once. Engaging and releasing are logged
once each.

Simulated time (``publish_clock``). The simulator steps on its wall-clock timer and never
runs on simulated time itself (``use_sim_time: true`` is refused at start and at runtime:
its own ``/clock`` would drive its own timer). With ``publish_clock`` it publishes ``/clock``
with the simulated time ``t = sum of dt over the steps`` (``steps * dt`` at constant ``dt``,
starting at 0) before the state of the same step, and stamps the states (and the violation
records) with that time, so a node with ``use_sim_time: true`` has the new time when the
state arrives. ``/clock`` QoS: reliable, keep last 1, volatile; it matches rclpy's and
rclcpp's ``TimeSource`` subscription (best effort, depth 1) and reliable subscribers alike.

Fault injection (``late_command_probability``): at a tick where a new command arrived since
the previous tick, with this probability the new command is not applied yet and the command
applied at the previous tick is held once more (a late or missed command, the fault the
nodes' safe set is built to absorb once). Never two ticks in a row: the tick after a late
one applies the newest command. Drawn from its own generator seeded by ``seed`` (the noise
sequence does not change), counted as ``late_commands``.

Service ``~/reset`` (``std_srvs/Trigger``, private: ``/double_integrator_sim/reset``): state
back to the initial state, command to zero (counters and the simulated time keep counting).

Parameters: the plant (``PLANT_PARAMS`` of ``scpo_ros.params``, the same table and defaults
as every node's: the default ``rate_hz`` = 1/``dt`` runs in real time) and the simulator's own.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from .. import graph as g
from ..dynamics import DoubleIntegrator
from ..inputs import axis_names
from ..params import PLANT_PARAMS, SEED, ParamSpec, compose
from ..plant import plant_from_params
from ..ros.diagnostics import ERROR, OK, WARN, Diagnostics
from ..ros.messages import stamp_to_sec
from ..ros.parameters import add_parameter_validator, declare_parameters
from ..ros.qos import CONTROL_QOS, EVENT_QOS
from ..ros.runner import flush_publishers, run_node

SIM_PARAMS = (
    ParamSpec("rate_hz", 1.0 / DoubleIntegrator.dt, "Simulation and state publication rate (wall clock); "
                                                       "1/dt runs in real time.", 1.0, 1000.0),
    ParamSpec("noise_std", 0.0, "Std of the process noise on the acceleration.", 0.0, 10.0),
    dataclasses.replace(SEED, description="Seed of the process noise and of the late-command fault injection."),
    ParamSpec("initial_position", [0.0], "Initial positions, one per axis (or one for all).", -1e3, 1e3,
              min_len=1, max_len=8),
    ParamSpec("initial_velocity", [0.0], "Initial velocities, one per axis (or one for all).", -1e3, 1e3,
              min_len=1, max_len=8),
    ParamSpec("cmd_timeout", 0.5, "Seconds without a command after which cmd_timeout_action applies "
                                  "(0 = hold the last command forever).", 0.0, 60.0),
    ParamSpec("cmd_timeout_action", "brake", "After cmd_timeout: brake = hardest admissible braking to rest "
                                             "(u = clip(-v/dt, -u_max, u_max)), zero = zero command (coast).",
              choices=("zero", "brake")),
    ParamSpec("publish_clock", False, "Publish /clock with the simulated time (steps * dt from 0) and stamp the "
                                      "states with it.", read_only=True),
    ParamSpec("late_command_probability", 0.0, "Fault injection: probability that a tick holds the previous "
                                               "command once more instead of the new one (never twice in a row).",
              0.0, 1.0),
    ParamSpec("wait_for_subscribers", 0, "Do not start stepping before this many subscriptions to joint_states "
                                         "are matched (a recorder or controller that must see the first state).",
              0, 64),
    ParamSpec("frame_id", "", "header.frame_id of the published states."),
)
PARAMS = compose(PLANT_PARAMS, SIM_PARAMS)


CLOCK_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                       durability=DurabilityPolicy.VOLATILE)
"""``/clock``: keep last 1 like ROS's ClockQoS. A reliable writer serves the best-effort,
depth-1 reader of rclpy's/rclcpp's TimeSource and reliable readers (recorders, tests) alike;
keep-last 1 never blocks the step on a slow reader."""


def brake_command(v: np.ndarray, dt: float, u_max: float) -> np.ndarray:
    """Hardest admissible braking toward zero velocity: ``clip(-v / dt, -u_max, u_max)``.

    With the zero-order hold ``v+ = v + dt u`` this reaches ``v = 0`` in one step when
    ``|v| <= dt u_max`` and never reverses the velocity (no overshoot)."""
    return np.clip(-np.asarray(v, dtype=float) / dt, -u_max, u_max)


def _ns_to_time(ns: int) -> Time:
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _per_axis(values: list[float], dof: int, name: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(dof, float(values[0]))
    if len(values) != dof:
        raise ValueError(f"{name} has {len(values)} entries for dof={dof}")
    return np.asarray(values, dtype=float)


class DoubleIntegratorSim(Node):
    def __init__(self, **kwargs):
        super().__init__(g.SIMULATOR, **kwargs)
        if self.get_parameter("use_sim_time").value:
            raise ValueError("use_sim_time is true, but double_integrator_sim steps on its wall-clock timer and is "
                             "itself the source of simulated time (publish_clock): run it with use_sim_time:=false")
        self.p = declare_parameters(self, PARAMS)
        self.dof = int(self.p["dof"])
        self.system = self._make_system(self.p)
        self.x0 = self._initial_state(self.p)
        self.x = self.x0.copy()
        self.u = np.zeros(self.dof)
        self.rng = np.random.default_rng(self.p["seed"])
        self.late_rng = self._late_rng(self.p["seed"])
        self.u_pending = np.zeros(self.dof)   # newest command received since the last tick
        self.new_cmd = False
        self.last_tick_late = False
        self.late_commands = 0
        self.timeout_active = False
        self.sim_time_ns = 0                 # simulated time of the current state (steps * dt)
        self.steps = 0
        self.states_published = 0
        self.violations = 0
        self.violations_by_kind = {"position": 0, "velocity": 0, "actuation": 0}
        self.refused_commands = 0
        self.commands = 0
        self.last_cmd_time = None
        self.started = self.p["wait_for_subscribers"] == 0
        self.start_time = time.monotonic()        # the watchdog counts from here until a first command comes
        self.names = axis_names(self.dof)

        self.state_pub = self.create_publisher(JointState, g.JOINT_STATES, CONTROL_QOS)
        self.violation_pub = self.create_publisher(String, g.CONSTRAINT_VIOLATION, EVENT_QOS)
        self.clock_pub = self.create_publisher(Clock, g.CLOCK, CLOCK_QOS) if self.p["publish_clock"] else None
        self.create_subscription(Float64MultiArray, g.CMD, self._on_cmd, CONTROL_QOS)
        self.create_service(Trigger, g.RESET_SERVICE, self._on_reset)
        self.diag = Diagnostics(self)
        add_parameter_validator(self, PARAMS, check=self._check, apply=self._apply)
        self.add_on_set_parameters_callback(self._refuse_sim_time)
        self.timer = self.create_timer(1.0 / self.p["rate_hz"], self._step)
        self._update_diagnostics()
        self.get_logger().info(
            f"double integrator: dof={self.dof}, {self.p['rate_hz']:g} Hz, dt={self.p['dt']:g} s, "
            f"limits p={self.system.p_max:g} v={self.system.v_max:g} u={self.system.u_max:g}, "
            f"cmd_timeout={self.p['cmd_timeout']:g} s ({self.p['cmd_timeout_action']})"
            + (", publishing /clock" if self.clock_pub is not None else "")
            + (f", late_command_probability={self.p['late_command_probability']:g}"
               if self.p["late_command_probability"] > 0.0 else ""))

    # -- parameters
    @staticmethod
    def _make_system(p) -> DoubleIntegrator:
        """The plant's model with the simulator's process noise.

        The parameters are checked by the one bridge to the generic core
        (``plant.plant_from_params``, the same checks and messages as every node's); the
        simulator itself integrates ``DoubleIntegrator`` (its zero-order hold equals the
        bridge plant's ``A``, ``B``), which adds the process noise and counts violations per
        kind (position, velocity, actuation)."""
        plant_from_params(p)
        return DoubleIntegrator(int(p["dof"]), float(p["dt"]), float(p["p_max"]), float(p["v_max"]),
                                float(p["u_max"]), noise_std=float(p["noise_std"]))

    @staticmethod
    def _late_rng(seed: int) -> np.random.Generator:
        # its own stream: switching the fault injection on does not change the noise sequence
        return np.random.default_rng([int(seed), 1])

    def _refuse_sim_time(self, params) -> SetParametersResult:
        for p in params:
            if p.name == "use_sim_time" and p.value is True:
                reason = "use_sim_time is refused: double_integrator_sim steps on the wall clock and publishes /clock"
                self.get_logger().warning(f"parameter change rejected: {reason}")
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _initial_state(self, p) -> np.ndarray:
        return np.concatenate([_per_axis(p["initial_position"], int(p["dof"]), "initial_position"),
                               _per_axis(p["initial_velocity"], int(p["dof"]), "initial_velocity")])

    def _check(self, values) -> str | None:
        try:
            self._make_system(values)
            self._initial_state(values)
        except ValueError as exc:
            return str(exc)
        return None

    def _apply(self, values, changed) -> None:
        self.p = values
        self.system = self._make_system(values)
        self.x0 = self._initial_state(values)
        if "rate_hz" in changed:
            self.destroy_timer(self.timer)
            self.timer = self.create_timer(1.0 / values["rate_hz"], self._step)
        if "seed" in changed:
            self.rng = np.random.default_rng(values["seed"])
            self.late_rng = self._late_rng(values["seed"])
        self.get_logger().info(f"parameters changed: {sorted(changed)}")
        self._update_diagnostics()

    # -- callbacks
    def _on_cmd(self, msg: Float64MultiArray) -> None:
        u = np.asarray(msg.data, dtype=float)
        if u.size != self.dof or not np.isfinite(u).all():
            self.refused_commands += 1
            self.get_logger().error(f"refused command {list(msg.data)}: need {self.dof} finite values",
                                    throttle_duration_sec=1.0)
            return
        # applied at the next tick (or, with the fault injection, the one after)
        self.u_pending[:] = u
        self.new_cmd = True
        self.commands += 1
        self.last_cmd_time = time.monotonic()

    def _on_reset(self, request, response):
        self.x[:] = self.x0
        self.u[:] = 0.0
        self.new_cmd = False
        response.success = True
        response.message = f"state reset to {self.x0.tolist()}"
        self.get_logger().info(response.message)
        return response

    def _step(self) -> None:
        if not self.started:
            if self.state_pub.get_subscription_count() < self.p["wait_for_subscribers"]:
                return
            self.started = True
            self.start_time = time.monotonic()
            self.get_logger().info(f"{self.state_pub.get_subscription_count()} subscribers matched: starting")
            self._publish_state()  # x_0: nothing has answered a state yet, so nothing to integrate
            self._check_violation(self.x, np.zeros(self.dof))
            return
        self._update_command()
        # The held command answers the state published last tick: integrate with it
        # (x_{k+1} = A x_k + B u_k, zero-order hold), then publish x_{k+1} for the next
        # command. Publishing first would apply every command one step late, which is not
        # the model the SCPO certificate and the safeguard's invariant set are computed for.
        self.x = self.system.step(self.x, self.u, self.rng)
        self.steps += 1
        self.sim_time_ns += int(round(self.system.dt * 1e9))
        self._publish_state()
        self._check_violation(self.x, self.u)  # every published state, and the command that led to it
        if self.steps % max(1, int(self.p["rate_hz"])) == 0:
            self._update_diagnostics()

    def _update_command(self) -> None:
        """The command this tick applies: the newest one received, held once more by the
        fault injection, or the watchdog's action after ``cmd_timeout`` s without one."""
        if self.new_cmd:
            if self.timeout_active:
                self.timeout_active = False
                self.get_logger().info("command received again: watchdog released")
                self._update_diagnostics()
            prob = self.p["late_command_probability"]
            if prob > 0.0 and not self.last_tick_late and self.late_rng.random() < prob:
                self.late_commands += 1   # keep self.u (the previous command) one tick more
                self.last_tick_late = True
            else:
                self.u[:] = self.u_pending
                self.new_cmd = False
                self.last_tick_late = False
            return
        self.last_tick_late = False
        timeout = self.p["cmd_timeout"]
        last = self.last_cmd_time if self.last_cmd_time is not None else self.start_time
        if timeout <= 0.0 or time.monotonic() - last <= timeout:
            return
        action = self.p["cmd_timeout_action"]
        if not self.timeout_active:
            self.timeout_active = True
            self.get_logger().warning(f"no command for {timeout:g} s: watchdog engaged, "
                                      + ("braking to rest" if action == "brake" else "command set to zero"))
            self._update_diagnostics()
        if action == "brake":
            self.u[:] = brake_command(self.x[self.dof:], self.system.dt, self.system.u_max)
        else:
            self.u[:] = 0.0

    def _stamp(self) -> Time:
        if self.clock_pub is not None:
            return _ns_to_time(self.sim_time_ns)
        return self.get_clock().now().to_msg()

    def _publish_state(self) -> None:
        if self.clock_pub is not None:
            # the clock first: a node on simulated time has the new time when the state arrives
            self.clock_pub.publish(Clock(clock=_ns_to_time(self.sim_time_ns)))
        msg = JointState()
        msg.header.stamp = self._stamp()
        msg.header.frame_id = self.p["frame_id"]
        msg.name = self.names
        msg.position = self.x[:self.dof].tolist()
        msg.velocity = self.x[self.dof:].tolist()
        self.state_pub.publish(msg)
        self.states_published += 1

    def _check_violation(self, x: np.ndarray, u: np.ndarray) -> None:
        s, n = self.system, self.dof
        # strict (tol 0): the plant counts any overshoot of its limits, rounding included
        kinds = [kind for kind, bad in s.violations(x, u, tol=0.0).items() if bad]
        if not kinds:
            return
        self.violations += 1
        for k in kinds:
            self.violations_by_kind[k] += 1
        now = self._stamp()
        self.violation_pub.publish(String(data=json.dumps({
            "step": self.steps, "stamp": stamp_to_sec(now), "kinds": kinds,
            "position": x[:n].tolist(), "velocity": x[n:].tolist(), "command": u.tolist(),
            "total": self.violations})))
        self.get_logger().error(f"constraint violation #{self.violations} at step {self.steps}: {kinds}, "
                                f"x={np.round(x, 4).tolist()}, u={np.round(u, 4).tolist()}",
                                throttle_duration_sec=1.0)
        self._update_diagnostics()

    def _update_diagnostics(self) -> None:
        s = self.system
        level = ERROR if self.violations else (WARN if self.refused_commands else OK)
        msg = (f"{self.violations} constraint violations" if self.violations else
               f"{self.refused_commands} commands refused" if self.refused_commands else "within limits")
        self.diag.update("plant", level, msg, steps=self.steps, constraint_violations=self.violations,
                         violations_by_kind=self.violations_by_kind, commands=self.commands,
                         refused_commands=self.refused_commands, p_max=s.p_max, v_max=s.v_max, u_max=s.u_max,
                         dof=self.dof, dt=s.dt, rate_hz=self.p["rate_hz"], cmd_timeout_active=self.timeout_active,
                         cmd_timeout_action=self.p["cmd_timeout_action"], late_commands=self.late_commands)

    def summary(self) -> dict:
        return {"node": g.SIMULATOR, "steps": self.steps, "states_published": self.states_published,
                "constraint_violations": self.violations, "violations_by_kind": self.violations_by_kind,
                "commands": self.commands, "refused_commands": self.refused_commands,
                "late_commands": self.late_commands}

    def destroy_node(self):
        flush_publishers([pub for pub in (self.state_pub, self.violation_pub, self.clock_pub) if pub is not None])
        self._update_diagnostics()
        self.diag.publish()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(DoubleIntegratorSim, args)


if __name__ == "__main__":
    sys.exit(main())
