"""``action_safeguard``: the SE-RL safeguard as a ROS 2 lifecycle node.

Sits between any policy and the plant. Every raw action on ``raw_action``
(``std_msgs/Float64MultiArray``) is passed through the command envelope
(``scpo_ros.envelope``, the same one the SCPO safety node uses, built from the same safe
set): projected onto ``U_safe(x)`` of the latest accepted state from ``joint_states``
(``sensor_msgs/JointState``), and the result goes out on ``cmd`` (``Float64MultiArray``).
When the safeguard changed the action or fell back, a JSON record goes out on
``intervention`` (raw and safe action, projection distance, active constraint rows,
fallback and its reason). ``/diagnostics`` carries counts and the current condition.

Input rules (the same as the SCPO safety node's: ``scpo_ros.inputs``). "The fallback"
below is the envelope's: the LQR backup projected onto ``U_safe(x)``, the recovery action
where that set is empty.
- a JointState is read by joint name (the plant file's ``joints:``) and accepted only with a fresh,
  increasing stamp (``max_state_age``, ``future_tolerance``); a rejected one is counted
  (``rejected_states``) with a WARN diagnostic and changes nothing;
- a raw action of the wrong size or with NaN/Inf is answered with the fallback for the
  current state (the plant always gets a safeguarded command);
- **every accepted state gets a command**: if no raw action comes within
  ``action_deadline_periods`` control periods of it, the fallback for it goes out
  (``no_action_fallbacks``); a raw action that arrives later is still projected and sent;
- stale raw action (none for ``action_timeout`` s): every new state is answered with the
  fallback at once (reason ``stale_action``);
- stale state (no accepted state for ``state_timeout`` s when a raw action arrives): the
  fallback for the last known state, reason ``stale_state``, ERROR diagnostic.
  ``state_timeout`` means what it means for ``scpo_safety_node``: an accepted state older
  than that is stale. The safety node, the only source of its commands, notices it in a
  watchdog and sends hold commands; the safeguard commands on events, so it checks the
  state's age when a raw action arrives (and the deadline timer answers every fresh state);
- a state outside the safe set: still the projection where ``U_safe(x)`` is not empty (the
  record says ``in_set: false``, WARN diagnostic); where it is empty the nominal set's
  projection, then the recovery action, reason ``outside_invariant_set``, ERROR diagnostic;
- references are clamped into the certified reference box (a malformed one keeps the last valid).

Command labels (``layout.dim[0].label``): ``safeguard`` for a projection of a raw action
(changed or not), ``backup`` for a fallback. ``summary()`` holds its counts; the runner
prints it once at shutdown as the ``SUMMARY {json}`` line (read by ``scpo-ros demo --compare``).

Parameters: the plant (``plant_file`` and the ``*_tight`` limits, read-only here: the safe
set is built once), envelope, state-input and lifecycle tables of ``scpo_ros.params``, and
this node's own (``NODE_PARAMS``). The envelope is ``scpo_ros.safety_model.safeguard_envelope``
of them.

Late commands: the safe set absorbs ``late_commands`` (default 1) late or missed commands
in a row: every command stays safe if the plant applies it one period longer, so one
late command costs no violation (``docs/ros_graph.md``). Command delay
(``command_delay_steps``): ``1`` projects for the state predicted under the last command
sent, for a plant that applies every command a period late; ``0`` (default) for a plant
that integrates a command before publishing the next state, like ``plant_sim``.

Lifecycle (the ros2/demos lifecycle talker's, as ``scpo_safety_node``): ``configure``
creates the lifecycle publisher ``intervention``; ``activate``/``deactivate`` switch it and
whether raw actions get through; ``cleanup`` and ``shutdown`` undo ``configure``. The
issue-9 exception: the plain ``cmd`` publisher, the ``joint_states``/``raw_action``/
``reference`` subscriptions, the envelope and the deadline timer live as long as the node,
so inactive means safe, not silent: every state gets the fallback (``inactive_behavior:
fallback``, default) or nothing (``silent``). ``autostart`` (default) goes to active
through ``scpo_ros.ros.runner.autostart``; at shutdown the fallback goes on until the
plant is at rest (``shutdown_hold``, ``shutdown_timeout``).

    action_safeguard --ros-args --params-file config/scpo.yaml --params-file config/safeguard.yaml
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String

from .. import graph as g
from ..control_law import ComputeTimes, RestDetector
from ..inputs import JointMap, ReferenceGate, StateGate, reference_text
from ..params import (
    ENVELOPE_PARAMS,
    LIFECYCLE_PARAMS,
    PLANT_PARAMS,
    STATE_INPUT_PARAMS,
    ParamSpec,
    compose,
    plant_of,
    read_only,
)
from ..plant import plant_record
from ..ros.diagnostics import ERROR, OK, WARN, Diagnostics
from ..ros.messages import array_from_float64, float64_msg, stamp_to_sec
from ..ros.parameters import add_parameter_validator, declare_parameters
from ..ros.qos import CONTROL_QOS, EVENT_QOS, LATCHED_QOS, state_qos
from ..ros.runner import autostart, flush_publishers, ros_now, run_node, spin_until, steady_timer
from ..safety_model import safe_set_with_late, safeguard_envelope

NODE_PARAMS = (
    ParamSpec("solver", "auto", "Projection solver.", choices=("auto", "closed_form", "daqp"), read_only=True),
    ParamSpec("boundary_margin", 1e-6, "The projection keeps the next state this far inside the safe set (its "
              "rows' units), so the plant's rounding does not land a hair outside.", 0.0, 0.1, read_only=True),
    ParamSpec("command_delay_steps", 0, "Control periods between a state and the plant applying its command "
              "(1: project for the state predicted with the last command sent).", 0, 1, read_only=True),
    ParamSpec("action_deadline_periods", 0.5, "Control periods after an accepted state within which a raw action "
              "must arrive; else the fallback answers the state.", 0.05, 10.0),
    ParamSpec("action_timeout", 0.25, "A raw_action older than this is stale: every state gets the fallback (s).",
              0.01, 10.0),
)
_STATE_TIMEOUT = next(s for s in STATE_INPUT_PARAMS if s.name == "state_timeout")
PARAMS = compose(read_only(PLANT_PARAMS), ENVELOPE_PARAMS, STATE_INPUT_PARAMS, LIFECYCLE_PARAMS, NODE_PARAMS,
                 state_timeout=dataclasses.replace(
                     _STATE_TIMEOUT, description=_STATE_TIMEOUT.description + " Here: a raw action then gets the "
                                                                              "fallback on the last state."))
"""The plant is built once (every plant parameter read-only): the envelope lives as long as the node."""


class ActionSafeguard(LifecycleNode):
    """The lifecycle of the module docstring (the same as ``scpo_safety_node``'s)."""

    def __init__(self, name: str = g.SAFEGUARD, **kwargs):
        super().__init__(name, **kwargs)
        self.values = declare_parameters(self, PARAMS)
        # built once, alive as long as the node: inactive and unconfigured states are answered through it
        self.plant = plant = plant_of(self.values)
        self.envelope = safeguard_envelope(self.values, plant)
        safe_set = self.envelope.safe_set
        self.projector = self.envelope.projector
        self.joints = JointMap.for_plant(plant)
        self.gate = StateGate(self.values["max_state_age"], self.values["future_tolerance"])
        self.references = ReferenceGate(plant.region.r_min, plant.region.r_max)
        add_parameter_validator(self, PARAMS, apply=self._apply)
        self.diag = Diagnostics(self)
        self.active = False
        self.configured = False
        self.shutting_down = False
        self.record_pub = None
        self._clock_warned = False
        self._x_buf = np.empty(plant.n)
        self._reset_state()
        self.cmd_pub = self.create_publisher(Float64MultiArray, g.CMD, CONTROL_QOS)
        # the plant of the safe set, latched: late subscribers and bags get it
        self.plant_pub = self.create_publisher(String, g.PLANT, LATCHED_QOS)
        self.plant_pub.publish(String(data=json.dumps({**plant_record(plant), "node": g.SAFEGUARD})))
        events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_qos)
        self._subs = [
            self.create_subscription(JointState, g.JOINT_STATES, self._on_state, state_qos(self.values["state_qos"]),
                                     event_callbacks=events),
            self.create_subscription(Float64MultiArray, g.RAW_ACTION, self._on_raw_action, CONTROL_QOS),
            self.create_subscription(Float64MultiArray, g.REFERENCE, self._on_reference, CONTROL_QOS),
        ]
        self._deadline_timer = steady_timer(self, max(1e-3, 0.25 * plant.dt), self._on_deadline)
        self.diag.update("safeguard", OK, "unconfigured: " + self.values["inactive_behavior"], **self.counts)
        late = safe_set_with_late(plant, self.projector.backup, self.values["late_commands"])[1]
        self.get_logger().info(
            f"safeguard for {plant.name}: {safe_set.name}, safe set with {safe_set.invariant.H.shape[0]} facets "
            f"(late_commands {late}), {self.projector.solver} projection, joints {self.joints.joints}")
        if late < self.values["late_commands"]:
            self.get_logger().warning(f"late_commands {self.values['late_commands']} asked, but the safe set of "
                                      f"{plant.name} is nominal only: a late command is not covered")
        if self.values["autostart"]:
            autostart(self)

    def _apply(self, values: dict, changed: set[str]) -> None:
        self.values.update(values)
        self.gate.max_age, self.gate.future_tolerance = values["max_state_age"], values["future_tolerance"]

    def _reset_state(self) -> None:
        self.x = None
        self.x_time = -np.inf
        self.u_time = -np.inf
        self.reference = None
        self._r = self.plant.region.r_min + 0.5 * (self.plant.region.r_max - self.plant.region.r_min)
        self.u_sent = None   # the last command published (the one a delayed plant applies next)
        self._pending = False   # the latest accepted state has not been answered yet
        self.rest = RestDetector.for_plant(self.plant)
        self.counts = {"commands": 0, "interventions": 0, "fallbacks": 0, "outside_set_projections": 0,
                       "bad_state": 0, "bad_action": 0, "no_action_fallbacks": 0, "inactive_commands": 0,
                       "shutdown_commands": 0, "rejected_states": {}}
        self.projection_us = ComputeTimes(1000)

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.record_pub = self.create_lifecycle_publisher(String, g.INTERVENTION, EVENT_QOS)
        self.configured = True
        self.diag.update("safeguard", OK, "configured", rows=int(self.projector.num_rows),
                         solver=self.projector.solver)
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = True
        self.diag.update("safeguard", OK, "active", **self._diag_counts())
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = False
        self.diag.update("safeguard", WARN, f"inactive: {self.values['inactive_behavior']}", **self._diag_counts())
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.diag.update("safeguard", WARN, f"unconfigured: {self.values['inactive_behavior']}",
                         **self._diag_counts())
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self) -> None:
        """Undo ``on_configure``."""
        self.active = False
        self.configured = False
        if self.record_pub is not None:
            self.destroy_lifecycle_publisher(self.record_pub)
            self.record_pub = None

    def shutdown_hold(self, spin_once) -> None:
        """After SIGINT/SIGTERM: the fallback for every state until the plant is at rest, the
        states stop or ``shutdown_timeout`` passes (``inactive_behavior: fallback``)."""
        self.shutting_down = True
        self.active = False
        if self.values["inactive_behavior"] != "fallback" or self.x is None:
            return
        self.rest.restart()
        spin_until(self, spin_once, lambda: self.rest.at_rest or
                   time.monotonic() - self.x_time > self.values["state_timeout"], self.values["shutdown_timeout"])

    # ------------------------------------------------------------------ callbacks
    def _on_state(self, msg: JointState) -> None:
        x = self._x_buf
        reason = self.joints.read_msg(msg, x)
        if reason is None:
            now_ros = ros_now(self)
            if now_ros is None and not self._clock_warned:     # use_sim_time without /clock
                self._clock_warned = True
                self.get_logger().warning("use_sim_time is set but no /clock has arrived: stamp ages are not checked")
                self.diag.update("inputs", WARN, "use_sim_time is set but no /clock has arrived: stamp ages are "
                                                 "not checked")
            reason = self.gate.check(stamp_to_sec(msg.header.stamp), now_ros)
        if reason is not None:
            self.counts["bad_state"] += 1
            rej = self.counts["rejected_states"]
            rej[reason] = rej.get(reason, 0) + 1
            self.get_logger().warning(f"rejected joint_states ({reason}); joints {self.joints.joints}",
                                      throttle_duration_sec=2.0)
            self.diag.update("safeguard", WARN, f"joint_states rejected: {reason}", **self._diag_counts())
            return
        self.x = self._acting_state(x)
        now = time.monotonic()
        self.x_time = now
        self.rest.update(x)
        if not self.active:
            if self.values["inactive_behavior"] == "fallback":
                key = "shutdown_commands" if self.shutting_down else "inactive_commands"
                self.counts[key] += 1
                self._publish_fallback("inactive")
            return
        if now - self.u_time > self.values["action_timeout"]:
            # No live policy: keep the plant under the fallback.
            self._publish_fallback("stale_action")
            return
        self._pending = True    # answered by the next raw action, or by _on_deadline

    def _on_deadline(self) -> None:
        """Every accepted state gets a command: no raw action within the deadline -> the fallback."""
        if not self._pending or not self.active:
            return
        if time.monotonic() - self.x_time < self.values["action_deadline_periods"] * self.plant.dt:
            return
        self.counts["no_action_fallbacks"] += 1
        self._publish_fallback("no_action")

    def _acting_state(self, x: np.ndarray) -> np.ndarray:
        """The state the next command will act on: ``x`` itself, or with a one-step command
        delay ``x`` advanced by the plant model under the command already sent."""
        if self.values["command_delay_steps"] == 0:
            return x.copy()
        u = self.u_sent if self.u_sent is not None else np.zeros(self.projector.m)
        return np.asarray(self.projector.safe_set.next_state(x, u), dtype=float)

    def _on_raw_action(self, msg: Float64MultiArray) -> None:
        if not self.active:
            return
        u = array_from_float64(msg)
        if u.shape != (self.projector.m,) or not np.isfinite(u).all():
            self.counts["bad_action"] += 1
            self.get_logger().warning(
                f"bad raw_action (size {u.size}, expected {self.projector.m}, or non-finite): fallback",
                throttle_duration_sec=1.0)
            if self.x is None:
                self.diag.update("safeguard", WARN, "bad raw_action: no state yet, nothing sent", **self._diag_counts())
            else:   # the fallback's diagnostic says so (one status per event: no overwrite within a tick)
                self._publish_fallback("bad_action")
            return
        now = time.monotonic()
        self.u_time = now
        if self.x is None:
            self.diag.update("safeguard", WARN, "no state yet: raw action ignored", **self._diag_counts())
            return
        if now - self.x_time > self.values["state_timeout"]:
            self.get_logger().error("joint_states stale: fallback on the last state", throttle_duration_sec=1.0)
            self._publish_fallback("stale_state", raw=u)
            return
        t0 = time.perf_counter()
        res = self.envelope.filter(self.x, u, self._r)
        self.projection_us.add((time.perf_counter() - t0) * 1e6)
        self._publish(res, raw=u)

    def _on_reference(self, msg: Float64MultiArray) -> None:
        reason = self.references.apply(msg.data, self._r)
        if reason is None:
            self.reference = self._r
            return
        if reason == "clamped":
            self.reference = self._r
        self.get_logger().warning(reference_text(reason, msg.data, self.plant.region.r_min, self.plant.region.r_max),
                                  throttle_duration_sec=2.0)
        self.diag.update("inputs", WARN, f"reference {reason}", clamped_references=self.references.clamped,
                         bad_references=sum(self.references.rejected.values()))

    def _on_incompatible_qos(self, info) -> None:
        self.get_logger().warning(f"joint_states: a publisher's QoS is incompatible with state_qos = "
                                  f"{self.values['state_qos']}: its states never arrive")
        self.diag.update("inputs", WARN, f"incompatible QoS on joint_states (state_qos {self.values['state_qos']})")

    def _publish_fallback(self, reason: str, raw=None) -> None:
        """The envelope's fallback for the current state, flagged with ``reason``."""
        res = self.envelope.fallback(self.x, self._r, reason)
        if raw is not None:
            res.distance = float(np.linalg.norm(res.u - raw))
        self._publish(res, raw, fallback=True)

    def _publish(self, res, raw, fallback: bool = False) -> None:
        """Publish an ``EnvelopeResult`` (the projection of ``raw``, or a fallback)."""
        u = res.u
        fallback = fallback or res.projection.fallback   # a raw action outside the nominal set is recovered
        self.cmd_pub.publish(float64_msg(u, g.LABEL_BACKUP if fallback else g.LABEL_SAFEGUARD))
        self._pending = False
        self.u_sent = u
        self.counts["commands"] += 1
        intervened = fallback or res.changed
        if not intervened and res.in_set:
            if self.counts["commands"] % 200 == 0:
                self._report_ok()
            return
        # a record for every changed action, and for every state outside the set
        self.counts["interventions"] += int(intervened)
        self.counts["fallbacks"] += int(fallback)
        reason = res.reason if fallback else res.projection.reason
        record = {"stamp": self.get_clock().now().nanoseconds * 1e-9,
                  "raw": None if raw is None else [float(v) for v in raw],
                  "safe": [float(v) for v in u],
                  "distance": None if not np.isfinite(res.distance) else float(res.distance),
                  "active": np.flatnonzero(res.projection.active).tolist(),
                  "fallback": bool(fallback), "reason": reason, "in_set": bool(res.in_set)}
        if res.violation > 0.0:
            record["violation"] = float(res.violation)
        if self.record_pub is not None:
            self.record_pub.publish(String(data=json.dumps(record)))
        if fallback:
            recovered = res.projection.fallback       # U_safe(x) was empty: nominal set or recovery action
            level = ERROR if recovered or reason.startswith("stale_state") else WARN
            prefix = "bad raw_action: " if reason.startswith("bad_action") else ""
            what = "recovery action" if recovered else "fallback"
            self.diag.update("safeguard", level, f"{prefix}{what}: {reason}", **self._diag_counts())
        elif not res.in_set:
            self.counts["outside_set_projections"] += 1
            self.diag.update("safeguard", WARN, "state outside the safe set: projected back into it",
                             **self._diag_counts())
        elif self.counts["commands"] % 200 == 0:
            self._report_ok()

    def _diag_counts(self) -> dict:
        return {**self.counts, "clock_jumps": self.gate.jumps}

    def _report_ok(self) -> None:
        self.diag.update("safeguard", OK, "projecting", **self._diag_counts(),
                         projection_us_median=self.projection_us.stats(empty=0.0)["median"],
                         intervention_rate=self.counts["interventions"] / max(self.counts["commands"], 1))

    def summary(self) -> dict:
        # also called for a node whose constructor failed (destroy_node): nothing counted yet
        counts = getattr(self, "counts", {"commands": 0, "interventions": 0})
        times, refs = getattr(self, "projection_us", ComputeTimes(1)), getattr(self, "references", None)
        return {"node": g.SAFEGUARD, **counts,
                "clamped_references": refs.clamped if refs is not None else 0,
                "intervention_rate": counts["interventions"] / max(counts["commands"], 1),
                "projection_us": times.stats()}

    def destroy_node(self):
        pubs = [getattr(self, name, None) for name in ("cmd_pub", "record_pub")]
        flush_publishers([pub for pub in pubs if pub is not None])
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(ActionSafeguard, args=args)


if __name__ == "__main__":
    sys.exit(main())
