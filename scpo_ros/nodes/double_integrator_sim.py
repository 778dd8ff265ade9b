"""``double_integrator_sim``: a simulated ``dof``-axis double integrator.

Every ``1/rate_hz`` s it integrates the last command over ``dt`` (zero-order hold, the
``DoubleIntegrator`` model of ``scpo_ros.dynamics``, optional process noise) and
publishes the state.

Topics (relative names, so a namespace applies):
- ``joint_states`` (out, ``sensor_msgs/JointState``): joints ``axis_0..``, position and velocity, stamped.
- ``cmd`` (in, ``std_msgs/Float64MultiArray``): one acceleration per axis, the convention of
  ros2_control's forward command controllers. The last command is held; after
  ``cmd_timeout`` s without one the command falls back to zero. Commands of the wrong
  length or with NaN/Inf are refused (counted, logged) and the previous one is kept.
- ``constraint_violation`` (out, ``std_msgs/String``, JSON): one message per simulated step
  that breaks ``|p| <= p_max``, ``|v| <= v_max`` or ``|u| <= u_max``:
  ``{"step", "stamp", "kinds", "position", "velocity", "command", "total"}``.
- ``/diagnostics``: ``double_integrator_sim: plant``, ERROR once any violation happened,
  with the counters and the limits (the analysis reads the limits from here).

Service ``reset`` (``std_srvs/Trigger``): state back to the initial state, command to zero
(counters keep counting).
"""
from __future__ import annotations

import json
import sys

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from ..dynamics import DoubleIntegrator
from ..ros_common import (CONTROL_QOS, ERROR, EVENT_QOS, OK, WARN, Diagnostics, ParamSpec, add_parameter_validator,
                          axis_names, declare_parameters, flush_publishers, monotonic, run_node)

PARAMS = [
    ParamSpec("dof", 1, "Number of independent axes.", 1, 8, read_only=True),
    ParamSpec("rate_hz", 50.0, "Simulation and state publication rate (wall clock).", 1.0, 1000.0),
    ParamSpec("dt", 0.02, "Simulated time per step (s); dt = 1/rate_hz runs in real time. The safety node's "
                          "model must use the same dt.", 1e-4, 1.0),
    ParamSpec("p_max", 1.0, "Position limit |p| <= p_max (reported, not enforced).", 1e-3, 1e3),
    ParamSpec("v_max", 1.0, "Velocity limit |v| <= v_max (reported, not enforced).", 1e-3, 1e3),
    ParamSpec("u_max", 1.0, "Actuation limit |u| <= u_max (reported; commands are applied as given).", 1e-3, 1e3),
    ParamSpec("noise_std", 0.0, "Std of the process noise on the acceleration.", 0.0, 10.0),
    ParamSpec("seed", 0, "Seed of the process noise.", 0, 2**31 - 1),
    ParamSpec("initial_position", [0.0], "Initial positions, one per axis (or one for all).", -1e3, 1e3,
              min_len=1, max_len=8),
    ParamSpec("initial_velocity", [0.0], "Initial velocities, one per axis (or one for all).", -1e3, 1e3,
              min_len=1, max_len=8),
    ParamSpec("cmd_timeout", 0.5, "Seconds without a command after which the command is zero (0 = hold forever).",
              0.0, 60.0),
    ParamSpec("wait_for_subscribers", 0, "Do not start stepping before this many subscriptions to joint_states "
                                         "are matched (a recorder or controller that must see the first state).",
              0, 64),
    ParamSpec("frame_id", "", "header.frame_id of the published states."),
]


def _per_axis(values: list[float], dof: int, name: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(dof, float(values[0]))
    if len(values) != dof:
        raise ValueError(f"{name} has {len(values)} entries for dof={dof}")
    return np.asarray(values, dtype=float)


class DoubleIntegratorSim(Node):
    def __init__(self, **kwargs):
        super().__init__("double_integrator_sim", **kwargs)
        self.p = declare_parameters(self, PARAMS)
        self.dof = int(self.p["dof"])
        self.system = self._make_system(self.p)
        self.x0 = self._initial_state(self.p)
        self.x = self.x0.copy()
        self.u = np.zeros(self.dof)
        self.rng = np.random.default_rng(self.p["seed"])
        self.steps = 0
        self.states_published = 0
        self.violations = 0
        self.violations_by_kind = {"position": 0, "velocity": 0, "actuation": 0}
        self.refused_commands = 0
        self.commands = 0
        self.last_cmd_time = None
        self.started = self.p["wait_for_subscribers"] == 0
        self.names = axis_names(self.dof)

        self.state_pub = self.create_publisher(JointState, "joint_states", CONTROL_QOS)
        self.violation_pub = self.create_publisher(String, "constraint_violation", EVENT_QOS)
        self.create_subscription(Float64MultiArray, "cmd", self._on_cmd, CONTROL_QOS)
        self.create_service(Trigger, "reset", self._on_reset)
        self.diag = Diagnostics(self)
        add_parameter_validator(self, PARAMS, check=self._check, apply=self._apply)
        self.timer = self.create_timer(1.0 / self.p["rate_hz"], self._step)
        self._update_diagnostics()
        self.get_logger().info(
            f"double integrator: dof={self.dof}, {self.p['rate_hz']:g} Hz, dt={self.p['dt']:g} s, "
            f"limits p={self.system.p_max:g} v={self.system.v_max:g} u={self.system.u_max:g}")

    # -- parameters
    @staticmethod
    def _make_system(p) -> DoubleIntegrator:
        return DoubleIntegrator(dof=int(p["dof"]), dt=p["dt"], p_max=p["p_max"], v_max=p["v_max"],
                                u_max=p["u_max"], noise_std=p["noise_std"])

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
        self.u[:] = u
        self.commands += 1
        self.last_cmd_time = monotonic()

    def _on_reset(self, request, response):
        self.x[:] = self.x0
        self.u[:] = 0.0
        response.success = True
        response.message = f"state reset to {self.x0.tolist()}"
        self.get_logger().info(response.message)
        return response

    def _step(self) -> None:
        if not self.started:
            if self.state_pub.get_subscription_count() < self.p["wait_for_subscribers"]:
                return
            self.started = True
            self.get_logger().info(f"{self.state_pub.get_subscription_count()} subscribers matched: starting")
            self._publish_state()  # x_0: nothing has answered a state yet, so nothing to integrate
            self._check_violation(self.x, np.zeros(self.dof))
            return
        timeout = self.p["cmd_timeout"]
        if timeout > 0.0 and self.last_cmd_time is not None and monotonic() - self.last_cmd_time > timeout:
            if np.any(self.u != 0.0):
                self.get_logger().warning(f"no command for {timeout:g} s: command set to zero")
            self.u[:] = 0.0
        # The held command answers the state published last tick: integrate with it
        # (x_{k+1} = A x_k + B u_k, zero-order hold), then publish x_{k+1} for the next
        # command. Publishing first would apply every command one step late, which is not
        # the model the SCPO certificate and the safeguard's invariant set are computed for.
        self.x = self.system.step(self.x, self.u, self.rng)
        self.steps += 1
        self._publish_state()
        self._check_violation(self.x, self.u)  # every published state, and the command that led to it
        if self.steps % max(1, int(self.p["rate_hz"])) == 0:
            self._update_diagnostics()

    def _publish_state(self) -> None:
        msg = JointState()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.p["frame_id"]
        msg.name = self.names
        msg.position = self.x[:self.dof].tolist()
        msg.velocity = self.x[self.dof:].tolist()
        self.state_pub.publish(msg)
        self.states_published += 1

    def _check_violation(self, x: np.ndarray, u: np.ndarray) -> None:
        s, n = self.system, self.dof
        kinds = []
        if np.any(np.abs(x[:n]) > s.p_max):
            kinds.append("position")
        if np.any(np.abs(x[n:]) > s.v_max):
            kinds.append("velocity")
        if np.any(np.abs(u) > s.u_max):
            kinds.append("actuation")
        if not kinds:
            return
        self.violations += 1
        for k in kinds:
            self.violations_by_kind[k] += 1
        now = self.get_clock().now().to_msg()
        self.violation_pub.publish(String(data=json.dumps({
            "step": self.steps, "stamp": now.sec + 1e-9 * now.nanosec, "kinds": kinds,
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
                         dof=self.dof, dt=s.dt, rate_hz=self.p["rate_hz"])

    def summary(self) -> dict:
        return {"node": "double_integrator_sim", "steps": self.steps, "states_published": self.states_published, "constraint_violations": self.violations,
                "violations_by_kind": self.violations_by_kind, "commands": self.commands,
                "refused_commands": self.refused_commands}

    def destroy_node(self):
        flush_publishers([self.state_pub, self.violation_pub])
        # one machine-readable line for the demo and the tests
        print("SUMMARY " + json.dumps(self.summary()), flush=True)
        self._update_diagnostics()
        self.diag.publish()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(DoubleIntegratorSim, args)


if __name__ == "__main__":
    sys.exit(main())
