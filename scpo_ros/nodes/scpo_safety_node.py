"""``scpo_safety_node``: the certified controller of the double integrator (a lifecycle node).

Control path (every ``joint_states`` message, executor thread, no lock, no waiting):
the state is read by joint *name* (``joint_names``) and accepted only with a fresh,
increasing stamp (``scpo_ros.inputs``); the candidate command is
``u = backup(x, r) + φ_θ([x, r])`` with ``θ`` the last *certified* weights (a preallocated
numpy MLP); then the **command envelope** (``scpo_ros.envelope``) projects it onto
``U_safe(x)`` of the safe set both nodes share, and the result goes out on ``cmd``. The
law and who acts (policy or fallback, with hysteresis) are ``scpo_ros.control_law``. Every
command passes the envelope: the policy's (counted as ``policy_interventions`` and an
ERROR diagnostic if it ever had to change one: the certificate covers the safe-set
metric, so it should not), and the envelope's fallback, which is the backup projected
onto ``U_safe(x)`` (the recovery action where that set is empty). The fallback acts
- outside the certified region of ``[x, r]`` (mode ``backup_region``),
- while re-certifying after a model change (``backup_recertifying``),
- on stale state (``hold_stale``: no accepted state for ``state_timeout``; the watchdog
  then sends the fallback for the state the model predicts under it, ``hold_mode``),
- while inactive, unconfigured or shutting down (``inactive_behavior: fallback``, default).
Leaving the policy is immediate; returning to it takes ``policy_return_steps`` qualifying
states in a row (hysteresis: the console and ``safety_mode`` stay readable at a boundary).

References are clamped into the certified reference box (``|r| <= r_max``; a NaN/Inf or
mis-sized reference keeps the last valid one), counted, with a WARN diagnostic.

SCPO path (a worker *process*, ``scpo_ros.scpo_worker``, off the control path): ``proposed_weights`` arrive through
``ProposalIntake`` (a raw subscription in its own thread: a size check before anything is
deserialised, a one-slot mailbox, newest wins). The results timer takes the newest one,
checks it (layout fingerprint, NaN/Inf; a malformed one is rejected, counted, and reported
in one aggregated decision record per second) and the worker runs one
``ResidualSCPO.propose_weights`` step. Results come back through a pipe that the
timer polls: the decision goes out on ``scpo_decision`` (JSON), committed weights on
``certified_weights`` and the control law is swapped in one attribute assignment.

Clocks. Stamps are compared with the node's ROS clock (``use_sim_time`` works: then
``/clock``, e.g. ``double_integrator_sim`` with ``publish_clock``); the watchdog, the
results poll and the diagnostics run on the steady clock, so they never stop, with or
without ``/clock``. Until a ``/clock`` arrives only the stamp ordering is checked and the
``inputs`` diagnostic says so (WARN).

Parameters: the tables of ``scpo_ros.params`` (plant, backup, region, policy, rollout,
SCPO, envelope, state input, lifecycle) and this node's own (``NODE_PARAMS``), each with a
range; the model is ``scpo_ros.safety_model.build_model`` of them. ``state_timeout`` means
what it means for ``action_safeguard``: an accepted state older than that is stale; here
the watchdog answers it with the hold command. A change of the model
(limits, backup, certified region, SCPO or safety settings) is validated first (the new
backup must certify the new region, else the change is rejected with the reason); once
accepted the envelope is rebuilt and the fallback alone acts (``backup_recertifying``)
until the worker has re-certified the current weights under the new model (or reverted to
the backup's). Weights certified for other limits are never used.

Every ``cmd`` carries its source in ``layout.dim[0].label``: ``policy``, ``backup`` (the
envelope's fallback) or ``hold`` (stale state); forward command controllers ignore it.

Lifecycle (the ros2/demos lifecycle talker's, as ``action_safeguard``): ``configure``
creates the lifecycle publishers (``certified_weights``, ``scpo_decision``) and starts SCPO
(worker, intake, results timer); ``activate``/``deactivate`` switch them and whether the
certified policy may act; ``cleanup`` and ``shutdown`` undo ``configure``. The issue-9
exception: the plain ``cmd`` publisher, ``safety_mode``, the ``joint_states``/``reference``
subscriptions, the envelope and the watchdog live as long as the node, so inactive means
safe, not silent (``inactive_behavior``). ``autostart`` goes to active through
``scpo_ros.ros.runner.autostart``; at shutdown the fallback goes on until the plant is at
rest (``shutdown_hold``), then the runner prints ``summary()`` as the ``SUMMARY`` line.
"""
from __future__ import annotations

import array
import dataclasses
import json
import math
import sys
import time

import numpy as np
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension, MultiArrayLayout, String

from ..backup import BackupCertificationError
from ..control_law import command_view, make_law, select
from ..envelope import CommandEnvelope
from ..inputs import JointMap, ReferenceGate, StateGate
from ..params import (
    BACKUP_PARAMS,
    LIFECYCLE_PARAMS,
    MODEL_PARAMS,
    PLANT_PARAMS,
    REGION_PARAMS,
    ROLLOUT_PARAMS,
    SCPO_PARAMS,
    STATE_INPUT_PARAMS,
    ParamSpec,
    compose,
)
from ..policy import WeightsRejected, check_weights
from ..ros.diagnostics import ERROR, OK, WARN, Diagnostics
from ..ros.messages import stamp_to_sec, weights_to_msg
from ..ros.parameters import add_parameter_validator, declare_parameters
from ..ros.proposal_intake import ProposalIntake
from ..ros.qos import CONTROL_QOS, EVENT_QOS, LATCHED_QOS, state_qos
from ..ros.runner import autostart, flush_publishers, ros_now, run_node, steady_timer
from ..safety_model import Model, build_model
from ..scpo import STATUSES, Decision
from ..scpo_worker import SCPOWorker

NODE_PARAMS = (
    ParamSpec("hold_mode", "backup_predicted", "Candidate on stale state: the backup on the model-predicted state, "
                                               "or zero (either through the envelope).",
              choices=("backup_predicted", "zero")),
    ParamSpec("policy_return_steps", 5, "Qualifying states in a row before a fallback returns to the policy "
                                        "(leaving the policy is immediate).", 1, 1000),
    ParamSpec("min_update_period_s", 0.0, "Least time between two SCPO steps (0: as fast as they run).",
              0.0, 3600.0),
    ParamSpec("require_fingerprint", True, "Reject proposals that carry no layout fingerprint."),
    ParamSpec("worker_niceness", 10, "Scheduling niceness of the SCPO worker process (0: same priority as "
                                     "the control path). Learning is background work: on a loaded CPU the "
                                     "control callback must win.", 0, 19, read_only=True),
)
_STATE_TIMEOUT = next(s for s in STATE_INPUT_PARAMS if s.name == "state_timeout")
PARAMS = compose(MODEL_PARAMS, STATE_INPUT_PARAMS, LIFECYCLE_PARAMS, NODE_PARAMS,
                 state_timeout=dataclasses.replace(
                     _STATE_TIMEOUT, description=_STATE_TIMEOUT.description + " Here: the watchdog then sends the "
                                                                              "hold command (hold_mode)."))

MODEL = {s.name for table in (PLANT_PARAMS, BACKUP_PARAMS, REGION_PARAMS, ROLLOUT_PARAMS, SCPO_PARAMS)
         for s in table if not s.read_only}
"""Parameters the certificate depends on: a change re-certifies."""

FALLBACK_MODES = ("backup_region", "backup_recertifying", "hold_stale")
MODE_LEVELS = {"inactive": OK, "waiting_for_state": WARN, "waiting_for_certificate": WARN, "policy": OK,
               "backup_region": WARN, "returning": WARN, "backup_recertifying": WARN, "hold_stale": ERROR,
               "shutting_down": WARN}
REST_SPEED = 1e-2
"""|v| below this on every axis, for ``REST_STATES`` accepted states in a row: the plant is at rest
(the shutdown hold stops sending)."""
REST_STATES = 5


class SCPOSafetyNode(LifecycleNode):
    """The lifecycle of the module docstring (the same as ``action_safeguard``'s)."""

    def __init__(self, **kwargs):
        super().__init__("scpo_safety_node", **kwargs)
        self.p = declare_parameters(self, PARAMS)
        self.dof = d = int(self.p["dof"])
        self.model = build_model(self.p)   # fail at start-up, with the reason, if unusable
        names = [n for n in self.p["joint_names"] if n]
        self.joints = JointMap.for_axes(d, names)   # ValueError (exit 1, with the reason) on bad names
        self.diag = Diagnostics(self)
        self._reset_counters()
        self.mode = "inactive"
        self.active = False
        self.configured = False
        self.shutting_down = False
        self.worker: SCPOWorker | None = None
        self.intake: ProposalIntake | None = None
        self.model_id = 0
        self.theta: np.ndarray | None = None
        self._build_runtime(self.model)
        self.law = make_law(self.model, None, 0)
        # buffers of the control path
        self._x = np.zeros(2 * d)            # the last accepted state
        self._x_new = np.zeros(2 * d)        # the state being read
        self._r = np.zeros(d)
        self._r_list = [0.0] * d
        # [x, r, 1]: FoldedPolicy's augmented input, a numpy view on an array.array
        self._inp_buf = array.array("d", [0.0] * (3 * d) + [1.0])
        self._inp = np.frombuffer(self._inp_buf, dtype=np.float64)
        self._policy_out = np.zeros(d)
        self._cmd_labels = {k: [MultiArrayDimension(label=k, size=d, stride=d)] for k in ("policy", "backup", "hold")}
        # One message per label, written through a numpy view into its own array.array (no list, no
        # data setter): publish() serialises before it returns, so reuse is safe.
        self._cmd_msgs, self._cmd_out = {}, {}
        for k in ("policy", "backup", "hold"):
            msg = Float64MultiArray(layout=MultiArrayLayout(dim=self._cmd_labels[k]), data=[0.0] * d)
            self._cmd_msgs[k], self._cmd_out[k] = msg, command_view(msg)
        self._last_state_time = None        # steady clock of the last *accepted* state
        self._last_stamp = None
        self._dt_measured = None
        self._qualifying = 0
        self._rest_count = 0
        self._hold_x = None
        self._hold_since = 0.0
        self._hold_steps = 0
        self._malformed_pending = 0
        self._malformed_reason = ""
        self._last_malformed_record = -math.inf
        self._clock_warned = False
        self._inputs_diag_time = -math.inf
        self._last_reject_reason = ""
        # alive for the node's lifetime (the lifecycle exception above)
        self.cmd_pub = self.create_publisher(Float64MultiArray, "cmd", CONTROL_QOS)
        self.mode_pub = self.create_publisher(String, "safety_mode", LATCHED_QOS)
        events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_qos)
        self.state_sub = self.create_subscription(JointState, "joint_states", self._on_state,
                                                  state_qos(self.p["state_qos"]), event_callbacks=events)
        self.ref_sub = self.create_subscription(Float64MultiArray, "reference", self._on_reference, CONTROL_QOS)
        self.watchdog = steady_timer(self, self._watchdog_period(), self._on_watchdog)
        add_parameter_validator(self, PARAMS, check=self._check, apply=self._apply)
        self._update_control_diag("unconfigured")
        self._update_inputs_diag()
        self.get_logger().info(f"SCPO safety node: dof={d}, layout {self.model.layout.sizes} "
                               f"({self.model.layout.fingerprint}), region {self.model.plant.region}, joints "
                               f"{self.joints.joints}, safe set {self.envelope.safe_set.name} "
                               f"({self.envelope.projector.num_rows} rows)")
        if self.p["autostart"]:
            autostart(self)

    def _build_runtime(self, model: Model) -> None:
        """The envelope, the state gate and the reference gate of ``model`` (limits, region)."""
        self.envelope = CommandEnvelope(model.safe_set(), model.backup)
        self.gate = StateGate(self.p["max_state_age"], self.p["future_tolerance"]) if not hasattr(self, "gate") \
            else self.gate
        r = model.plant.region.r_max
        if not hasattr(self, "references"):
            self.references = ReferenceGate(np.full(self.dof, -r), np.full(self.dof, r))
        else:   # keep the counters across configure and model changes: only the box moves
            self.references.lower[:], self.references.upper[:] = -r, r

    def _reset_counters(self) -> None:
        self.control_steps = 0
        self.backup_steps = 0
        self.hold_commands = 0
        self.fallbacks = 0
        self.malformed = 0
        self.bad_states = 0
        self.rejected_states: dict[str, int] = {}
        self.policy_interventions = 0
        self.envelope_changes = 0
        self.inactive_commands = 0
        self.shutdown_commands = 0
        self.recovery_commands = 0
        self.updates = {k: 0 for k in STATUSES}
        self.recertifications = {"accepted": 0, "rejected": 0}
        self.worker_errors = 0
        self.weights_version = 0
        self._compute_us = np.zeros(4096)
        self._compute_n = 0

    # ----------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.model = build_model(self.p)
        except ValueError as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self._build_runtime(self.model)
        self.theta = None
        # until the worker's first certification: the envelope's fallback alone
        self.law = make_law(self.model, None, self.weights_version)
        self.weights_pub = self.create_lifecycle_publisher(Float64MultiArray, "certified_weights", LATCHED_QOS)
        self.decision_pub = self.create_lifecycle_publisher(String, "scpo_decision", EVENT_QOS)
        self.intake = ProposalIntake(self, "proposed_weights", self.model.layout.size)
        self.results_timer = steady_timer(self, 0.05, self._drain_results)
        self.model_id += 1
        self.worker = SCPOWorker(self.p["min_update_period_s"], self.p["worker_niceness"])
        self.worker.start()
        self.worker.rebuild(self.model, self.model_id, None)
        self.configured = True
        self._set_mode("inactive", "configured")
        self.get_logger().info("configured")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = True
        self._qualifying = 0
        self._set_mode("waiting_for_state", "activated")
        self.get_logger().info("activated: the certified policy acts")
        ret = super().on_activate(state)
        if self.theta is not None:
            self.weights_pub.publish(weights_to_msg(self.theta, self.model.layout.fingerprint))
        return ret

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = False
        self._set_mode("inactive", "deactivated")
        self.get_logger().info(f"deactivated: inactive_behavior {self.p['inactive_behavior']}")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.get_logger().info("cleaned up")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self) -> None:
        """Undo ``on_configure``."""
        self.active = False
        if not self.configured:
            return
        self.configured = False
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.intake is not None:
            self.intake.destroy()
            self.intake = None
        self.destroy_timer(self.results_timer)
        for pub in (self.weights_pub, self.decision_pub):
            self.destroy_lifecycle_publisher(pub)
        # the weights die with the worker: the fallback acts until a new configure certifies
        self.theta = None
        self.law = make_law(self.model, None, self.weights_version)
        self.mode = "inactive"
        self._update_control_diag("unconfigured")

    def shutdown_hold(self, spin_once) -> None:
        """After SIGINT/SIGTERM: keep answering states with the fallback (``inactive_behavior``)
        until the plant is at rest, the states stop, or ``shutdown_timeout`` passes; a plant
        left with a moving command would otherwise keep it until its own timeout."""
        self.shutting_down = True
        self.active = False
        if self.p["inactive_behavior"] != "fallback" or self._last_state_time is None:
            return
        self._set_mode("shutting_down", "shutdown: fallback until the plant is at rest")
        self._rest_count = 0
        deadline = time.monotonic() + self.p["shutdown_timeout"]
        while time.monotonic() < deadline and self.context.ok():
            spin_once()
            if self._rest_count >= REST_STATES:
                break
            if time.monotonic() - self._last_state_time > self.p["state_timeout"]:
                break   # the plant is gone (the demo stops the simulator first)

    # ---------------------------------------------------------------- parameters
    def _check(self, values: dict) -> str | None:
        try:
            build_model(values)
        except BackupCertificationError as exc:
            return f"the backup cannot certify the new settings: {exc}"
        except ValueError as exc:
            return str(exc)
        return None

    def _apply(self, values: dict, changed: set[str]) -> None:
        self.p = values
        self.get_logger().info(f"parameters changed: {sorted(changed)}")
        if changed & {"max_state_age", "future_tolerance"}:
            self.gate.max_age, self.gate.future_tolerance = values["max_state_age"], values["future_tolerance"]
        if "state_timeout" in changed:
            self.destroy_timer(self.watchdog)
            self.watchdog = steady_timer(self, self._watchdog_period(), self._on_watchdog)
        if not changed & MODEL:
            if "min_update_period_s" in changed and self.worker is not None:
                self.worker.min_period_s = values["min_update_period_s"]
            return
        # The weights in force were certified for the old model: the new envelope's fallback
        # (its backup certified for the new model in _check) acts until the worker re-certifies.
        self.model = build_model(values)
        self._build_runtime(self.model)
        self._r[:] = np.clip(self._r, self.references.lower, self.references.upper)
        self._r_list = self._r.tolist()
        self.law = make_law(self.model, None, self.weights_version, certifying=self.configured)
        if not self.configured:
            return
        if "min_update_period_s" in changed:
            self.worker.min_period_s = values["min_update_period_s"]
        self.model_id += 1
        self.worker.rebuild(self.model, self.model_id, self.theta)
        self.get_logger().warning("model changed: fallback alone until the weights are re-certified")
        if self.active and self.mode in ("policy", "backup_region", "returning", "waiting_for_state",
                                         "waiting_for_certificate"):
            self._set_mode("backup_recertifying", f"parameters {sorted(changed & MODEL)} changed")

    def _watchdog_period(self) -> float:
        return max(0.005, min(self.p["dt"], self.p["state_timeout"] / 2.0))

    # -------------------------------------------------------------- control path
    def _on_state(self, msg: JointState) -> None:
        t_start = time.perf_counter()
        x = self._x_new
        reason = self.joints.read(msg.name, msg.position, msg.velocity, x)
        if reason is None:
            stamp = stamp_to_sec(msg.header.stamp)
            now = ros_now(self)
            if now is None and not self._clock_warned:
                self._clock_warned = True
                self._update_inputs_diag()
            reason = self.gate.check(stamp, now)
        if reason is not None:
            return self._reject_state(reason)
        # accepted: from here on this is the plant's state
        self._last_state_time = time.monotonic()
        if self.gate.jumps != self._jumps_seen:
            self._jumps_seen = self.gate.jumps
            self.get_logger().warning(f"clock jump of {self.gate.last_jump:.3g} s: stamp history reset")
            self._update_inputs_diag()
        d = self.dof
        vals = x.tolist()
        self._x[:] = x
        self._rest_count = self._rest_count + 1 if max(map(abs, vals[d:])) < REST_SPEED else 0
        law = self.law
        if not self.active:
            if self.p["inactive_behavior"] == "fallback":
                self._publish_fallback(x, "inactive" if not self.shutting_down else "shutdown", t_start)
            return
        vals += self._r_list
        mode, self._qualifying = select(law, vals, self.mode, self._qualifying, self.p["policy_return_steps"])
        if mode == "policy":
            self._inp_buf[:-1] = array.array("d", vals)
            cand = law.policy(self._inp, self._policy_out)
            res = self.envelope.filter(x, cand, self._r)
            label = "policy"
            if res.changed:
                self._policy_changed(res)
        else:
            res = self.envelope.fallback(x, self._r, "fallback")
            label = "backup"
        self._publish(label, res, t_start)
        self.control_steps += 1
        self.backup_steps += label == "backup"
        if mode != self.mode:
            self._set_mode(mode, {"backup_region": "state or reference outside the certified region",
                                  "returning": "back in the certified region",
                                  "policy": "the certified policy acts"}.get(mode, "state received"))
        stamp = stamp_to_sec(msg.header.stamp)
        if self._last_stamp is not None and stamp > self._last_stamp:
            gap = stamp - self._last_stamp
            self._dt_measured = gap if self._dt_measured is None else 0.95 * self._dt_measured + 0.05 * gap
        self._last_stamp = stamp
        if self.control_steps % 50 == 0:
            self._update_control_diag()

    _jumps_seen = 0

    def _publish(self, label: str, res, t_start: float | None = None) -> None:
        out = self._cmd_out[label]
        out[:] = res.u
        compute = time.perf_counter() - t_start if t_start is not None else None
        self.cmd_pub.publish(self._cmd_msgs[label])
        if compute is not None:
            self._compute_us[self._compute_n % len(self._compute_us)] = 1e6 * compute
            self._compute_n += 1
        if res.changed and label != "policy":
            self.envelope_changes += res.distance > self.envelope.change_tol or res.violation > 0.0
        if res.violation > 0.0:
            self.recovery_commands += 1
            self.get_logger().error(f"state {np.round(self._x, 4).tolist()} is outside the recoverable set: "
                                    f"recovery action (next-state violation {res.violation:.3g})",
                                    throttle_duration_sec=2.0)

    def _publish_fallback(self, x: np.ndarray, reason: str, t_start: float | None) -> None:
        res = self.envelope.fallback(x, self._r, reason)
        self._publish("backup", res, t_start)
        if self.shutting_down:
            self.shutdown_commands += 1
        else:
            self.inactive_commands += 1

    def _policy_changed(self, res) -> None:
        """The envelope moved a certified-policy command: the certificate's sampled states missed
        this one. The command sent is the safe one; say so loudly."""
        self.policy_interventions += 1
        self.envelope_changes += 1
        self.get_logger().error(f"the envelope changed a certified-policy command by {res.distance:.3g} "
                                f"({res.reason}) at x = {np.round(self._x, 4).tolist()}: "
                                f"{self.policy_interventions} so far", throttle_duration_sec=2.0)
        if self.policy_interventions == 1 or self.policy_interventions % 100 == 0:
            self._update_control_diag()

    def _reject_state(self, reason: str) -> None:
        self.bad_states += 1
        first = reason not in self.rejected_states
        self.rejected_states[reason] = self.rejected_states.get(reason, 0) + 1
        self.get_logger().warning(f"rejected joint_states ({reason}): {self._reject_text(reason)}",
                                  throttle_duration_sec=2.0)
        now = time.monotonic()
        if first or now - self._inputs_diag_time >= 0.5:    # a new reason at once, counts at most at 2 Hz
            self._last_reject_reason = reason
            self._update_inputs_diag()

    def _reject_text(self, reason: str) -> str:
        return {"missing_joint": f"needs joints {self.joints.joints}",
                "bad_lengths": "position/velocity arrays do not match the names",
                "non_finite": "NaN or Inf", "non_increasing_stamp": "stamp not newer than the last accepted one",
                "stale_stamp": f"stamp older than max_state_age = {self.p['max_state_age']:g} s",
                "future_stamp": f"stamp more than future_tolerance = {self.p['future_tolerance']:g} s ahead"
                }.get(reason, reason)

    def _on_reference(self, msg: Float64MultiArray) -> None:
        reason = self.references.apply(msg.data, self._r)
        if reason is not None:
            self.get_logger().warning(f"reference {list(msg.data)[:8]}: {reason} "
                                      f"({'clamped into' if reason == 'clamped' else 'kept the last valid, in'} "
                                      f"|r| <= r_max = {self.model.plant.region.r_max:g})", throttle_duration_sec=2.0)
            self._update_inputs_diag()
        self._r_list = self._r.tolist()

    def _on_incompatible_qos(self, info) -> None:
        self.get_logger().warning(f"joint_states: a publisher's QoS is incompatible with state_qos = "
                                  f"{self.p['state_qos']} (policy {info.last_policy_kind}): its states never arrive")
        self.diag.update("inputs", WARN, f"incompatible QoS on joint_states (state_qos {self.p['state_qos']})",
                         **self._input_counts())

    def _on_watchdog(self) -> None:
        if self._last_state_time is None or (not self.active and self.p["inactive_behavior"] == "silent"):
            return
        now = time.monotonic()
        if now - self._last_state_time <= self.p["state_timeout"]:
            return
        if self.mode != "hold_stale":
            self._hold_x = self._x.copy()
            self._hold_since = now
            self._hold_steps = 0
            self._set_mode("hold_stale", f"no valid state for {self.p['state_timeout']:g} s: "
                                         f"holding ({self.p['hold_mode']})")
        # dead reckoning under the fallback: advance the nominal model to the present
        sysm = self.model.plant.system
        target = int((now - self._hold_since) / sysm.dt)
        while self._hold_steps < target:
            u = self.envelope.fallback(self._hold_x, self._r, "hold_stale").u
            self._hold_x = sysm.step(self._hold_x, u)
            self._hold_steps += 1
        if self.p["hold_mode"] == "zero":
            res = self.envelope.filter(self._hold_x, np.zeros(self.dof), self._r)
        else:
            res = self.envelope.fallback(self._hold_x, self._r, "hold_stale")
        self._publish("hold", res)
        self.hold_commands += 1

    # ----------------------------------------------------------------- SCPO path
    def _take_proposal(self) -> None:
        """The newest proposal from the intake, checked; malformed ones are counted and reported
        in one aggregated record per second (a flood must not flood the decision topic)."""
        self._malformed_pending += self.intake.drain_rejections()
        if self._malformed_pending and not self._malformed_reason:
            self._malformed_reason = (f"wrong message size: expected {self.model.layout.size} weights and a "
                                      f"layout label")
        item = self.intake.take()
        if item is not None:
            flat, fingerprint = item
            try:
                if fingerprint is None and self.p["require_fingerprint"]:
                    raise WeightsRejected("proposal carries no layout fingerprint (layout.dim[0].label)")
                flat = check_weights(self.model.layout, flat, fingerprint)
            except WeightsRejected as exc:
                self._malformed_pending += 1
                self._malformed_reason = str(exc)
            else:
                if self.active:
                    self.worker.submit(flat)
        now = time.monotonic()
        if self._malformed_pending and now - self._last_malformed_record >= 1.0:
            n, reason = self._malformed_pending, f"malformed proposal: {self._malformed_reason}"
            self.malformed += n
            self.updates["rejected"] += n
            self._malformed_pending, self._malformed_reason, self._last_malformed_record = 0, "", now
            self.get_logger().error(f"rejected {n} {reason}", throttle_duration_sec=5.0)
            self.decision_pub.publish(String(data=json.dumps(
                {"kind": "malformed", "count": n, "stamp": self._now(),
                 **Decision(status="rejected", reason=reason).to_dict()})))
            self.diag.update("weights", WARN, f"rejected {reason}", malformed=self.malformed,
                             layout=str(self.model.layout.sizes), fingerprint=self.model.layout.fingerprint,
                             **self.intake.stats())

    def _drain_results(self) -> None:
        if self.worker is None:
            return
        self._take_proposal()
        if not self.worker.alive():
            # a crashed worker: the certified weights stay in force; start a new one
            self.worker_errors += 1
            self.get_logger().error("SCPO worker process died: restarting it (certified weights unchanged)")
            self.worker.restart(self.model, self.model_id, self.theta)
            self.diag.update("scpo", ERROR, "SCPO worker process died: restarted", restarts=self.worker.restarts)
        for kind, decision, theta, model_id in self.worker.poll():
            if kind == "recertify":
                self.recertifications["accepted" if decision.status == "accepted" else "rejected"] += 1
                if model_id != self.model_id:   # another change came in meanwhile: wait for its result
                    continue
                self._deploy(theta, certifying_done=True)
                level = OK if decision.status == "accepted" else WARN
                self.get_logger().info(f"re-certification: {decision.status} ({decision.reason})")
            elif kind == "proposal":
                self.updates[decision.status] += 1
                if theta is not None and not self.law.certifying and model_id == self.model_id:
                    self._deploy(theta)
                level = OK
            else:
                self.worker_errors += 1
                level = ERROR
                self.get_logger().error(f"SCPO worker error (weights unchanged): {decision.reason}")
            if kind in ("proposal", "recertify") and not self._malformed_pending:
                self.diag.update("weights", OK, f"{self.malformed} malformed proposals rejected",
                                 malformed=self.malformed, fingerprint=self.model.layout.fingerprint,
                                 **self.intake.stats())
            record = {"kind": kind, "stamp": self._now(), "weights_version": self.weights_version,
                      **decision.to_dict()}
            self.decision_pub.publish(String(data=json.dumps(record, default=_json_default)))
            self.diag.update("scpo", level, f"last {kind}: {decision.status}" +
                             (f" ({decision.reason})" if decision.reason else ""),
                             updates=self.updates, recertifications=self.recertifications,
                             superseded=self.worker.superseded, weights_version=self.weights_version,
                             last_total_ms=decision.times_ms.get("total", 0.0))

    def _deploy(self, theta: np.ndarray, certifying_done: bool = False) -> None:
        """Make certified ``theta`` the law in force and publish it."""
        self.theta = np.asarray(theta, dtype=np.float64)
        self.weights_version += 1
        self.law = make_law(self.model, self.theta, self.weights_version)
        if self.active:
            self.weights_pub.publish(weights_to_msg(self.theta, self.model.layout.fingerprint))
        if certifying_done and self.mode == "backup_recertifying":
            self._set_mode("returning", "weights re-certified")

    # --------------------------------------------------------------- reporting
    def _set_mode(self, mode: str, reason: str) -> None:
        old, self.mode = self.mode, mode
        if mode in FALLBACK_MODES:
            self.fallbacks += 1
        # mode changes at a region boundary can come every few steps: throttled per kind
        if mode == "hold_stale":
            self.get_logger().error(f"mode {old} -> {mode}: {reason}", throttle_duration_sec=5.0)
        elif mode in FALLBACK_MODES:
            self.get_logger().warning(f"mode {old} -> {mode}: {reason} ({self.fallbacks} fallbacks)",
                                      throttle_duration_sec=5.0)
        elif old in FALLBACK_MODES:
            self.get_logger().info(f"mode {old} -> {mode}: {reason}", throttle_duration_sec=5.0)
        self.mode_pub.publish(String(data=json.dumps({"mode": mode, "previous": old, "reason": reason,
                                                      "fallbacks": self.fallbacks, "stamp": self._now()})))
        self._update_control_diag(reason)

    def _update_control_diag(self, reason: str = "") -> None:
        text = {"inactive": f"inactive: {self.p['inactive_behavior']}", "waiting_for_state": "waiting for a state",
                "waiting_for_certificate": "fallback until the first certification of the weights",
                "returning": f"fallback: {self.p['policy_return_steps']} qualifying states before the policy acts",
                "policy": "certified policy in force",
                "backup_region": "FALLBACK: state or reference outside the certified region",
                "backup_recertifying": "FALLBACK: re-certifying after a parameter change",
                "hold_stale": f"STALE STATE: hold command ({self.p['hold_mode']})",
                "shutting_down": "shutting down: fallback until the plant is at rest"}[self.mode]
        if self.mode == "inactive" and reason == "unconfigured":
            text = f"unconfigured: {self.p['inactive_behavior']}"
        dt_ok = self._dt_measured is None or abs(self._dt_measured - self.p["dt"]) <= 0.25 * self.p["dt"] or \
            self.mode != "policy"
        level = MODE_LEVELS[self.mode]
        if not dt_ok and level == OK:
            level = WARN
            text += f"; state period {self._dt_measured:.4f} s differs from the model dt {self.p['dt']:g} s"
        if self.policy_interventions:
            level = ERROR
            text += f"; ENVELOPE CHANGED {self.policy_interventions} CERTIFIED-POLICY COMMANDS"
        n = min(self._compute_n, len(self._compute_us))
        comp = self._compute_us[:n]
        self.diag.update("control", level, text, mode=self.mode, control_steps=self.control_steps,
                         backup_steps=self.backup_steps, hold_commands=self.hold_commands, fallbacks=self.fallbacks,
                         policy_interventions=self.policy_interventions, envelope_changes=self.envelope_changes,
                         recovery_commands=self.recovery_commands, inactive_commands=self.inactive_commands,
                         weights_version=self.weights_version,
                         compute_us_median=float(np.median(comp)) if n else 0.0,
                         compute_us_p99=float(np.percentile(comp, 99)) if n else 0.0)

    def _input_counts(self) -> dict:
        return {"rejected_states": dict(self.rejected_states), "clamped_references": self.references.clamped,
                "bad_references": sum(self.references.rejected.values()), "clock_jumps": self.gate.jumps}

    def _update_inputs_diag(self) -> None:
        counts = self._input_counts()
        level, text = OK, "inputs valid"
        rejected = sum(counts["rejected_states"].values())
        if self.get_clock().ros_time_is_active and ros_now(self) is None:
            level, text = WARN, "use_sim_time is set but no /clock has arrived: stamp ages are not checked"
        elif self.references.clamped or counts["bad_references"]:
            level, text = WARN, (f"{self.references.clamped} references clamped into |r| <= "
                                 f"{self.model.plant.region.r_max:g}, {counts['bad_references']} malformed kept the "
                                 f"last valid")
        if rejected:
            level, text = WARN, (f"{rejected} joint_states rejected (last: {self._last_reject_reason}: "
                                 f"{self._reject_text(self._last_reject_reason)})"
                                 + ("" if text == "inputs valid" else "; " + text))
        if self.gate.jumps:
            text += f"; {self.gate.jumps} clock jumps (stamp history reset)"
        self._inputs_diag_time = time.monotonic()
        self.diag.update("inputs", level, text, joints=self.joints.joints, **counts)

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def summary(self) -> dict:
        n = min(self._compute_n, len(self._compute_us))
        comp = self._compute_us[:n]
        return {"node": "scpo_safety_node", "control_steps": self.control_steps, "backup_steps": self.backup_steps,
                "hold_commands": self.hold_commands, "fallbacks": self.fallbacks, "updates": self.updates,
                "malformed": self.malformed + self._malformed_pending, "recertifications": self.recertifications,
                "worker_errors": self.worker_errors, "weights_version": self.weights_version,
                "superseded": self.worker.superseded if self.worker else 0,
                "flood_dropped": self.intake.stats().get("dropped", 0) if self.intake else 0,
                "bad_states": self.bad_states, **self._input_counts(),
                "policy_interventions": self.policy_interventions, "envelope_changes": self.envelope_changes,
                "recovery_commands": self.recovery_commands, "inactive_commands": self.inactive_commands,
                "shutdown_commands": self.shutdown_commands,
                "compute_us": {"median": float(np.median(comp)) if n else None,
                               "p99": float(np.percentile(comp, 99)) if n else None}}

    def destroy_node(self):
        pubs = [self.cmd_pub, self.mode_pub] + ([self.weights_pub, self.decision_pub] if self.configured else [])
        flush_publishers(pubs)
        self.active = False
        self._teardown()
        return super().destroy_node()


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def main(args=None) -> int:
    return run_node(SCPOSafetyNode, args)


if __name__ == "__main__":
    sys.exit(main())
