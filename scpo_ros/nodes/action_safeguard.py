"""``action_safeguard``: the SE-RL safeguard as a ROS 2 lifecycle node.

Sits between any policy and the plant. Every raw action on ``raw_action``
(``std_msgs/Float64MultiArray``) is projected onto ``U_safe(x)`` of the latest state
from ``joint_states`` (``sensor_msgs/JointState``) and the result goes out on ``cmd``
(``Float64MultiArray``). When the safeguard changed the action or fell back to the
backup, a JSON record goes out on ``intervention`` (``std_msgs/String``: raw and safe
action, projection distance, active constraint rows, fallback and its reason).
``/diagnostics`` carries counts and the current condition.

Input rules (the same as the SCPO safety node's). "The safe backup" below is the LQR
backup action for the state, projected onto ``U_safe(x)`` (``SafeguardProjector.fallback``):
- a JointState without ``dof`` finite positions and velocities, or a raw action of the
  wrong size or with NaN/Inf, is dropped with a log line and a WARN diagnostic; a bad
  raw action is answered with the safe backup for the current state (the plant always
  gets a safeguarded command);
- stale raw action (none for ``action_timeout`` s): every new state is answered with the
  safe backup (``fallback``, reason ``stale_action``);
- stale state (none for ``state_timeout`` s when a raw action arrives): the safe backup
  for the last known state, reason ``stale_state``, ERROR diagnostic;
- a state outside the invariant set: still the projection where ``U_safe(x)`` is not
  empty (the record says ``in_set: false``, WARN diagnostic); where it is empty the
  recovery action (``fallback_action``, default ``recovery``: the admissible action whose
  next state is closest to the set; ``backup``: the clipped LQR backup), reason
  ``outside_invariant_set``, ERROR diagnostic.

Nothing else is ever published on ``cmd``: projections, the safe backup, or the recovery
action (with ``fallback_action: backup``, the clipped backup instead). The command's source goes into ``layout.dim[0].label`` (as the SCPO safety node
does): ``safeguard`` for a projection (changed or not), ``backup`` for a fallback (the
safe backup or the recovery action; the intervention record gives the reason); a
forward command controller ignores it, ``scpo-ros analyze`` counts with it. On shutdown
the node prints one ``SUMMARY {json}`` line with its counts (read by
``scpo-ros demo --compare``).

Command delay (``command_delay_steps``): the projection keeps ``x+`` in the invariant set
only if the command acts on the state it was computed for. A plant that applies each
command one control period late (``x_{k+1} = A x_k + B u_{k-1}``) needs the projection for the state the command will act on:
``x̂_{k+1} = A x_k + B u_{k-1}`` with the command last sent. ``1`` does that; ``0``
projects for the measured state (a plant that integrates a command before publishing
the next state, like ``double_integrator_sim``). A command later than that (a slow transport) breaks the assumption
either way; the recovery action then brings the state back (the margins ``p_margin``,
``v_margin`` give it room).

Lifecycle: ``configure`` builds the invariant set and the projector from the plant
parameters and creates the publishers; ``activate`` starts the subscriptions;
``deactivate``/``cleanup`` undo them. With ``autostart`` (default) the node configures
and activates itself, so it runs without a lifecycle manager.

    action_safeguard --ros-args --params-file config/scpo_double_integrator.yaml --params-file config/safeguard.yaml
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String

from ..backup import LQRBackup, dlqr
from ..dynamics import DoubleIntegrator, Pendulum
from ..ros_common import (CONTROL_QOS, ERROR, EVENT_QOS, OK, WARN, Diagnostics, ParamSpec, array_from_float64,
                          add_parameter_validator, declare_parameters, float64_msg, flush_publishers, run_node,
                          state_from_joint_state)
from ..safeguard.invariant_set import safe_set_for
from ..safeguard.projection import SafeguardProjector

PARAMS = (
    ParamSpec("plant", "double_integrator", "plant model of the invariant set",
              choices=("double_integrator", "pendulum"), read_only=True),
    ParamSpec("dof", 1, "double integrator axes (pendulum: 1)", min=1, max=2, read_only=True),
    ParamSpec("dt", 0.05, "control period of the plant model [s]", min=1e-4, max=1.0, read_only=True),
    ParamSpec("p_max", 1.0, "position limit (pendulum: angle limit) [m or rad]", min=1e-3, max=100.0,
              read_only=True),
    ParamSpec("v_max", 1.0, "velocity limit (pendulum: rate limit) [m/s or rad/s]", min=1e-3, max=100.0,
              read_only=True),
    ParamSpec("u_max", 1.0, "actuator limit (pendulum: normalised torque a_max)", min=1e-3, max=100.0,
              read_only=True),
    ParamSpec("p_margin", 0.0, "the invariant set is computed for |p| <= p_max - p_margin (robustness, e.g. to "
              "a command that reaches the plant a period late)", min=0.0, max=10.0, read_only=True),
    ParamSpec("v_margin", 0.0, "the invariant set is computed for |v| <= v_max - v_margin", min=0.0, max=10.0,
              read_only=True),
    ParamSpec("solver", "auto", "projection solver", choices=("auto", "closed_form", "daqp"), read_only=True),
    ParamSpec("state_timeout", 0.25, "joint_states older than this is stale [s]", min=0.01, max=10.0),
    ParamSpec("action_timeout", 0.25, "raw_action older than this is stale [s]", min=0.01, max=10.0),
    ParamSpec("backup_q_pos", 1.0, "LQR backup position weight", min=0.0, max=1e4, read_only=True),
    ParamSpec("backup_q_vel", 1.0, "LQR backup velocity weight", min=0.0, max=1e4, read_only=True),
    ParamSpec("backup_r_act", 10.0, "LQR backup action weight", min=1e-6, max=1e6, read_only=True),
    ParamSpec("boundary_margin", 1e-6, "the projection keeps the next state this far inside the invariant set "
              "(its rows' units), so the plant's rounding does not land a hair outside", min=0.0, max=0.1,
              read_only=True),
    ParamSpec("command_delay_steps", 0, "control periods between a state and the plant applying its command "
              "(1: project for the state predicted with the last command sent)", min=0, max=1, read_only=True),
    ParamSpec("fallback_action", "recovery", "action where U_safe(x) is empty: recovery (the admissible action "
              "bringing the next state closest to the invariant set: hardest braking at a wall) or backup (the "
              "clipped LQR backup)", choices=("recovery", "backup"), read_only=True),
    ParamSpec("autostart", True, "configure and activate on startup", read_only=True),
)


def make_plant(values: dict):
    """The plant model the invariant set is computed for: the limits tightened by the margins."""
    p_max, v_max = values["p_max"] - values["p_margin"], values["v_max"] - values["v_margin"]
    if p_max <= 0.0 or v_max <= 0.0:
        raise ValueError(f"margins leave no room: p_max - p_margin = {p_max:g}, v_max - v_margin = {v_max:g}")
    if values["plant"] == "pendulum":
        return Pendulum(dt=values["dt"], theta_max=p_max, theta_dot_max=v_max, a_max=values["u_max"])
    return DoubleIntegrator(dof=values["dof"], dt=values["dt"], p_max=p_max, v_max=v_max, u_max=values["u_max"])


def make_backup(plant, values: dict):
    """``backup(x, r) -> u``: the LQR backup of the double integrator (tracking ``r``),
    or an LQR on the pendulum's upright linearisation (``r`` ignored)."""
    if isinstance(plant, DoubleIntegrator):
        lqr = LQRBackup(plant, q_pos=values["backup_q_pos"], q_vel=values["backup_q_vel"],
                        r_act=values["backup_r_act"])
        return lambda x, r: lqr(x, np.zeros(plant.dof) if r is None else r)
    A, B = plant.linearization()
    K, _ = dlqr(A, B, np.diag([values["backup_q_pos"], values["backup_q_vel"]]),
                np.array([[values["backup_r_act"]]]))
    return lambda x, r: -K @ x


class ActionSafeguard(LifecycleNode):
    def __init__(self, name: str = "action_safeguard", **kwargs):
        super().__init__(name, **kwargs)
        self.values = declare_parameters(self, PARAMS)
        # Only the timeouts are writable at runtime (the set and backup are read-only:
        # changing them means a new invariant set, i.e. cleanup + configure).
        add_parameter_validator(self, PARAMS, apply=lambda values, _changed: self.values.update(values))
        if self.values["plant"] == "pendulum" and self.values["dof"] != 1:
            raise ValueError("parameter dof must be 1 for the pendulum")
        self.projector: SafeguardProjector | None = None
        self.diag: Diagnostics | None = None
        self._subs = []
        self._reset_state()
        if self.values["autostart"]:
            self.trigger_configure()
            self.trigger_activate()

    def _reset_state(self) -> None:
        self.x = None
        self.x_time = -np.inf
        self.u_time = -np.inf
        self.reference = None
        self.u_sent = None   # the last command published (the one a delayed plant applies next)
        self.counts = {"commands": 0, "interventions": 0, "fallbacks": 0, "outside_set_projections": 0,
                       "bad_state": 0, "bad_action": 0}
        self._proj_us = []

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        try:
            plant = make_plant(self.values)
            self.plant = plant
            self.dof = plant.dof if isinstance(plant, DoubleIntegrator) else 1
            self.state_dim = 2 * self.dof
            safe_set = safe_set_for(plant)
            self.projector = SafeguardProjector(safe_set, backup=make_backup(plant, self.values),
                                                solver=self.values["solver"], margin=self.values["boundary_margin"],
                                                recovery=self.values["fallback_action"] == "recovery")
        except (ValueError, RuntimeError) as exc:
            self.get_logger().error(f"cannot build the safeguard: {exc}")
            return TransitionCallbackReturn.FAILURE
        self._x_buf = np.empty(self.state_dim)
        self.cmd_pub = self.create_lifecycle_publisher(Float64MultiArray, "cmd", CONTROL_QOS)
        self.record_pub = self.create_lifecycle_publisher(String, "intervention", EVENT_QOS)
        self.diag = Diagnostics(self)
        self.diag.update("safeguard", OK, "configured", rows=int(self.projector.num_rows),
                         solver=self.projector.solver)
        self.get_logger().info(
            f"safeguard configured: {safe_set.name}, invariant set with {safe_set.invariant.H.shape[0]} "
            f"facets, {self.projector.solver} projection")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self._subs = [
            self.create_subscription(JointState, "joint_states", self._on_state, CONTROL_QOS),
            self.create_subscription(Float64MultiArray, "raw_action", self._on_raw_action, CONTROL_QOS),
            self.create_subscription(Float64MultiArray, "reference", self._on_reference, CONTROL_QOS),
        ]
        self.diag.update("safeguard", OK, "active", **self.counts)
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._drop_subscriptions()
        self.diag.update("safeguard", WARN, "inactive: no commands", **self.counts)
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._drop_subscriptions()
        for pub in (getattr(self, "cmd_pub", None), getattr(self, "record_pub", None)):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        if self.diag is not None:
            self.diag.destroy()
            self.diag = None
        self.projector = None
        self._reset_state()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self._drop_subscriptions()
        return TransitionCallbackReturn.SUCCESS

    def _drop_subscriptions(self) -> None:
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []

    # ------------------------------------------------------------------ callbacks
    def _on_state(self, msg: JointState) -> None:
        x = state_from_joint_state(msg, self.dof, out=self._x_buf)
        if x is None or len(msg.position) != self.dof or len(msg.velocity) != self.dof:
            self.counts["bad_state"] += 1
            self.get_logger().warning(
                f"dropping joint_states: need {self.dof} finite positions and velocities, got "
                f"{len(msg.position)}/{len(msg.velocity)}", throttle_duration_sec=1.0)
            self.diag.update("safeguard", WARN, "bad joint_states dropped", **self.counts)
            return
        self.x = self._acting_state(x)
        now = time.monotonic()
        self.x_time = now
        if now - self.u_time > self.values["action_timeout"]:
            # No live policy: keep the plant under the backup.
            self._publish(self.projector.fallback(self.x, np.zeros(self.projector.m), self.reference,
                                                   "stale_action"), raw=None)

    def _acting_state(self, x: np.ndarray) -> np.ndarray:
        """The state the next command will act on: ``x`` itself, or with a one-step command
        delay ``x`` advanced by the plant model under the command already sent."""
        if self.values["command_delay_steps"] == 0:
            return x.copy()
        u = self.u_sent if self.u_sent is not None else np.zeros(self.projector.m)
        return np.asarray(self.projector.safe_set.next_state(x, u), dtype=float)

    def _on_raw_action(self, msg: Float64MultiArray) -> None:
        u = array_from_float64(msg)
        if u.shape != (self.projector.m,) or not np.isfinite(u).all():
            self.counts["bad_action"] += 1
            self.get_logger().warning(
                f"bad raw_action (size {u.size}, expected {self.projector.m}, or non-finite): backup action",
                throttle_duration_sec=1.0)
            if self.x is None:
                self.diag.update("safeguard", WARN, "bad raw_action: no state yet, nothing sent", **self.counts)
            else:   # the fallback's diagnostic says so (one status per event: no overwrite within a tick)
                self._publish(self.projector.fallback(self.x, np.zeros(self.projector.m), self.reference,
                                                       "bad_action"), raw=None)
            return
        now = time.monotonic()
        self.u_time = now
        if self.x is None:
            self.diag.update("safeguard", WARN, "no state yet: raw action ignored", **self.counts)
            return
        if now - self.x_time > self.values["state_timeout"]:
            self.get_logger().error("joint_states stale: backup action on the last state",
                                    throttle_duration_sec=1.0)
            self._publish(self.projector.fallback(self.x, u, self.reference, "stale_state"), raw=u)
            return
        t0 = time.perf_counter()
        res = self.projector.project(self.x, u, self.reference)
        self._proj_us.append((time.perf_counter() - t0) * 1e6)
        self._publish(res, raw=u)

    def _on_reference(self, msg: Float64MultiArray) -> None:
        r = array_from_float64(msg)
        limit = self.values["p_max"]
        if r.shape != (self.dof,) or not np.isfinite(r).all() or np.any(np.abs(r) > limit):
            self.get_logger().warning(f"reference rejected (need {self.dof} finite values within ±{limit})",
                                      throttle_duration_sec=1.0)
            return
        self.reference = r

    def _publish(self, res, raw) -> None:
        self.cmd_pub.publish(float64_msg(res.u, "backup" if res.fallback else "safeguard"))
        self.u_sent = res.u
        self.counts["commands"] += 1
        if not res.intervened and res.in_set:
            if self.counts["commands"] % 200 == 0:
                self._report_ok()
            return
        # a record for every changed action, and for every state outside the set
        self.counts["interventions"] += int(res.intervened)
        self.counts["fallbacks"] += int(res.fallback)
        record = {"stamp": self.get_clock().now().nanoseconds * 1e-9,
                  "raw": None if raw is None else [float(v) for v in raw],
                  "safe": [float(v) for v in res.u],
                  "distance": None if not np.isfinite(res.distance) else float(res.distance),
                  "active": np.flatnonzero(res.active).tolist(),
                  "fallback": bool(res.fallback), "reason": res.reason, "in_set": bool(res.in_set)}
        if res.violation > 0.0:
            record["violation"] = float(res.violation)
        self.record_pub.publish(String(data=json.dumps(record)))
        if res.fallback:
            level = WARN if res.reason in ("stale_action", "bad_action") else ERROR
            prefix = "bad raw_action: " if res.reason == "bad_action" else ""
            recovered = res.reason in ("outside_invariant_set", "infeasible") and self.projector.recovery
            what = "recovery action" if recovered else "backup"
            self.diag.update("safeguard", level, f"{prefix}fallback to {what}: {res.reason}", **self.counts)
        elif not res.in_set:
            self.counts["outside_set_projections"] += 1
            self.diag.update("safeguard", WARN, "state outside the invariant set: projected back into it",
                             **self.counts)
        elif self.counts["commands"] % 200 == 0:
            self._report_ok()

    def _report_ok(self) -> None:
        times = self._proj_us[-1000:]
        self._proj_us = times
        self.diag.update("safeguard", OK, "projecting", **self.counts,
                         projection_us_median=float(np.median(times)) if times else 0.0,
                         intervention_rate=self.counts["interventions"] / max(self.counts["commands"], 1))


    def summary(self) -> dict:
        # also called for a node whose constructor failed (destroy_node): nothing counted yet
        times, counts = getattr(self, "_proj_us", []), getattr(self, "counts", {"commands": 0, "interventions": 0})
        return {"node": "action_safeguard", **counts,
                "intervention_rate": counts["interventions"] / max(counts["commands"], 1),
                "projection_us": {"median": float(np.median(times)) if times else None,
                                  "p99": float(np.percentile(times, 99)) if times else None}}

    def destroy_node(self):
        pubs = [getattr(self, name, None) for name in ("cmd_pub", "record_pub")]
        flush_publishers([pub for pub in pubs if pub is not None])
        print("SUMMARY " + json.dumps(self.summary()), flush=True)
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(ActionSafeguard, args=args)


if __name__ == "__main__":
    sys.exit(main())
