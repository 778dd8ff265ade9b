"""``scpo_safety_node``: the certified controller of the plant in ``plant_file`` (a lifecycle node).

An adapter (parameters and messages in, one call into an algorithm, messages out); each part
is documented where it lives, the node's behaviour in ``docs/ros_graph.md``:

- every ``joint_states`` message (executor thread, no lock, no waiting): the state by joint
  name and fresh stamp (``inputs``), who acts (``control_law.select``: the certified policy
  ``backup + φ_θ``, else the fallback), the command envelope (``envelope``), out on ``cmd``
  labelled ``policy``, ``backup`` or ``hold`` (``graph.COMMAND_LABELS``); references clamped
  into the certified box (``inputs.ReferenceGate``);
- stale state (no accepted state for ``state_timeout``): the watchdog's hold command for the
  state the model predicts under the fallback (``control_law.HoldPredictor``);
- SCPO, off the control path: ``proposed_weights`` through ``ros.proposal_intake``, checked
  (``scpo_worker.ProposalGate``), one ``ResidualSCPO.propose_weights`` step in the worker
  process (``scpo_worker``); decisions on ``scpo_decision``, committed weights on
  ``certified_weights`` and as the new law (one attribute assignment); a model change
  (``MODEL`` parameters, validated by ``safety_model.build_model``) re-certifies, the
  fallback alone acting meanwhile;
- the model monitor (``model_monitor``), after each command is out: the one-step residual
  against the plant file's declared uncertainty; tripped, it sends the node to
  ``backup_model_mismatch`` (the envelope's fallback acts: the backup projected onto the safe
  set, robust to the declared uncertainty) and no proposal is taken or update deployed until
  it clears; its record on the latched ``model_monitor`` topic and the ``model`` diagnostic;
- modes on ``safety_mode`` and the ``control`` diagnostic (``graph.SAFETY_MODE_TABLE``);
- the plant it certifies for (``plant.plant_record``: file text, digest, the limits in force)
  on the latched ``plant`` topic, again after a runtime tightening.

Stamps are checked against the ROS clock (``use_sim_time`` works); the timers run on the
steady clock. Lifecycle as ``action_safeguard``'s: ``configure`` starts SCPO and its
publishers, ``activate`` lets the certified policy act; ``cmd``, ``safety_mode``, the
subscriptions, the envelope and the watchdog live as long as the node (inactive means safe:
``inactive_behavior``); at shutdown the fallback acts until the plant is at rest, then the
runner prints ``summary()`` as the ``SUMMARY`` line.
"""
from __future__ import annotations

import array
import dataclasses
import json
import sys
import time

import numpy as np
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String

from .. import control_law as cl
from .. import graph as g
from ..backup import BackupCertificationError
from ..envelope import CommandEnvelope
from ..inputs import InputMonitor, JointMap, ReferenceGate, StampPeriod, StateGate, reference_text
from ..model_monitor import ModelMonitor
from ..params import (
    LIFECYCLE_PARAMS,
    MODEL_PARAMS,
    MONITOR_PARAMS,
    STATE_INPUT_PARAMS,
    ParamSpec,
    compose,
    monitor_settings,
)
from ..plant import load_plant, plant_record
from ..ros.diagnostics import Diagnostics
from ..ros.messages import float64_msg, stamp_to_sec, weights_to_msg
from ..ros.parameters import add_parameter_validator, declare_parameters
from ..ros.proposal_intake import ProposalIntake
from ..ros.qos import CONTROL_QOS, EVENT_QOS, LATCHED_QOS, state_qos
from ..ros.runner import autostart, flush_publishers, ros_now, run_node, spin_until, steady_timer
from ..safety_model import Model, build_model
from ..scpo import Decision
from ..scpo_worker import ProposalGate, SCPOWorker, WorkerResults, decision_record

NODE_PARAMS = (
    ParamSpec("hold_mode", "backup_predicted", "Candidate on stale state: the backup on the model-predicted state, "
                                               "or zero (either through the envelope).",
              choices=cl.HOLD_MODES),
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
PARAMS = compose(MODEL_PARAMS, STATE_INPUT_PARAMS, LIFECYCLE_PARAMS, MONITOR_PARAMS, NODE_PARAMS,
                 state_timeout=dataclasses.replace(
                     _STATE_TIMEOUT, description=_STATE_TIMEOUT.description + " Here: the watchdog then sends the "
                                                                              "hold command (hold_mode)."))

MODEL = {s.name for s in MODEL_PARAMS if not s.read_only}
"""Parameters the certificate depends on: a change re-certifies."""
MONITOR = {s.name for s in MONITOR_PARAMS}
MONITOR_CANDIDATES = 3
"""Commands the monitor tries per transition: the answer to the previous state and the two
before it (one or two periods late on a loaded machine: not a model error)."""
RECERTIFY_FROM = (g.MODE_POLICY, g.MODE_BACKUP_REGION, g.MODE_RETURNING, g.MODE_WAITING_FOR_STATE,
                  g.MODE_WAITING_FOR_CERTIFICATE)
"""The modes a model change switches to ``backup_recertifying`` (the others stay: inactive, hold, shutdown)."""
LABELS = (g.LABEL_POLICY, g.LABEL_BACKUP, g.LABEL_HOLD)
"""The labels of this node's commands."""


class SCPOSafetyNode(LifecycleNode):
    """The lifecycle of the module docstring (the same as ``action_safeguard``'s)."""

    def __init__(self, **kwargs):
        super().__init__(g.SAFETY_NODE, **kwargs)
        self.p = declare_parameters(self, PARAMS)
        self.plant_file = load_plant(self.p["plant_file"])   # read once: plant_file is read-only
        self.model = build_model(self.p, self.plant_file)   # fail at start-up, with the reason, if unusable
        plant = self.model.plant
        n, m, nr = plant.n, plant.m, plant.nr
        self.joints = JointMap.for_plant(plant)
        self.diag = Diagnostics(self)
        self.counts = cl.ControlCounts()
        self.weights_version = 0
        self.proposals, self.results = ProposalGate(), WorkerResults()
        self.compute_us = cl.ComputeTimes(4096)
        self.mode = g.MODE_INACTIVE
        self.active = self.configured = self.shutting_down = False
        self.worker: SCPOWorker | None = None
        self.intake: ProposalIntake | None = None
        self.model_id = 0
        self.theta: np.ndarray | None = None
        self.gate = StateGate(self.p["max_state_age"], self.p["future_tolerance"])
        region = self.model.plant.region
        self.references = ReferenceGate(region.r_min, region.r_max)
        self.inputs = InputMonitor(self.joints, self.gate, self.references)
        self._build_runtime(self.model)
        self.law = cl.make_law(self.model, None, 0)
        # buffers of the control path
        self._x = np.zeros(n)            # the last accepted state
        self._x_new = np.zeros(n)        # the state being read
        self._r = region.r_min + 0.5 * (region.r_max - region.r_min)   # the reference box's centre
        self._r_list = self._r.tolist()
        # [x, r, 1]: FoldedPolicy's augmented input, a numpy view on an array.array
        self._inp_buf = array.array("d", [0.0] * (n + nr) + [1.0])
        self._inp = np.frombuffer(self._inp_buf, dtype=np.float64)
        self._policy_out = np.zeros(m)
        # One message per label, written through a numpy view into its own array.array (no list, no
        # data setter): publish() serialises before it returns, so reuse is safe.
        self._cmd_msgs = {k: float64_msg(np.zeros(m), k) for k in LABELS}
        self._cmd_out = {k: cl.command_view(msg) for k, msg in self._cmd_msgs.items()}
        self._last_state_time = None        # steady clock of the last *accepted* state
        self.period = StampPeriod()
        self.hold = cl.HoldPredictor()
        self.rest = cl.RestDetector.for_plant(plant)
        self._qualifying = self._jumps_seen = 0
        self._clock_warned = False
        # the model monitor: the commands sent (newest first) and the state each answered
        self.monitor: ModelMonitor | None = None
        self._sent_u = np.zeros((MONITOR_CANDIDATES + 1, m))
        self._sent_seq = [-10] * (MONITOR_CANDIDATES + 1)
        self._state_seq = 0
        self._mon_x = np.zeros(n)            # the state of the previous transition
        self._mon_stamp: float | None = None
        self._mon_published = 0.0
        self.monitor_blocked = 0             # proposals and certified updates held back while tripped
        # alive for the node's lifetime (the lifecycle exception above)
        self.cmd_pub = self.create_publisher(Float64MultiArray, g.CMD, CONTROL_QOS)
        self.mode_pub = self.create_publisher(String, g.SAFETY_MODE, LATCHED_QOS)
        self.plant_pub = self.create_publisher(String, g.PLANT, LATCHED_QOS)
        self.monitor_pub = self.create_publisher(String, g.MODEL_MONITOR, LATCHED_QOS)
        self._publish_plant()
        self._build_monitor()
        events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_qos)
        self.state_sub = self.create_subscription(JointState, g.JOINT_STATES, self._on_state,
                                                  state_qos(self.p["state_qos"]), event_callbacks=events)
        self.ref_sub = self.create_subscription(Float64MultiArray, g.REFERENCE, self._on_reference, CONTROL_QOS)
        self.watchdog = steady_timer(self, self._watchdog_period(), self._on_watchdog)
        add_parameter_validator(self, PARAMS, check=self._check, apply=self._apply)
        self._update_control_diag(cl.UNCONFIGURED)
        self._update_inputs_diag()
        box = f"{np.round(region.lower, 4).tolist()}..{np.round(region.upper, 4).tolist()}"
        self.get_logger().info(f"SCPO safety node for {plant.name} ({n} states, {m} inputs), layout "
                               f"{self.model.layout.sizes} "
                               f"({self.model.layout.fingerprint}), region [x, r] in {box}, joints "
                               f"{self.joints.joints}, safe set {self.envelope.safe_set.name} "
                               f"({self.envelope.projector.num_rows} rows, late_commands "
                               f"{self.model.late_commands})")
        if self.model.late_commands < self.p["late_commands"]:
            self.get_logger().warning(f"late_commands {self.p['late_commands']} asked, but the safe set of "
                                      f"{plant.name} is nominal only: a late command is not covered")
        if self.p["autostart"]:
            autostart(self)

    def _build_monitor(self) -> None:
        """A fresh monitor for the model in force (None when ``monitor_enabled`` is false)."""
        was = self.monitor is not None and self.monitor.tripped
        self.monitor = ModelMonitor(self.model.plant, monitor_settings(self.p)) if self.p["monitor_enabled"] else None
        self._mon_stamp = None
        self._publish_monitor()
        if was and self.mode == g.MODE_MODEL_MISMATCH:
            self._set_mode(g.MODE_RETURNING, "model monitor rebuilt")

    def _build_runtime(self, model: Model) -> None:
        """The envelope of ``model`` and its reference box (the gates keep their counters)."""
        self.envelope = CommandEnvelope(model.safe_set(), model.backup)
        self.references.lower[:], self.references.upper[:] = model.plant.region.r_min, model.plant.region.r_max

    # ----------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.model = build_model(self.p, self.plant_file)
        except ValueError as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self._build_runtime(self.model)
        self.theta = None
        # until the worker's first certification: the envelope's fallback alone
        self.law = cl.make_law(self.model, None, self.weights_version)
        self.weights_pub = self.create_lifecycle_publisher(Float64MultiArray, g.CERTIFIED_WEIGHTS, LATCHED_QOS)
        self.decision_pub = self.create_lifecycle_publisher(String, g.SCPO_DECISION, EVENT_QOS)
        self.intake = ProposalIntake(self, g.PROPOSED_WEIGHTS, self.model.layout.size)
        self.results_timer = steady_timer(self, 0.05, self._drain_results)
        self.model_id += 1
        self.worker = SCPOWorker(self.p["min_update_period_s"], self.p["worker_niceness"])
        self.worker.start()
        self.worker.rebuild(self.model, self.model_id, None)
        self.configured = True
        self._set_mode(g.MODE_INACTIVE, "configured")
        self.get_logger().info("configured")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = True
        self._qualifying = 0
        self._set_mode(g.MODE_WAITING_FOR_STATE, "activated")
        self.get_logger().info("activated: the certified policy acts")
        ret = super().on_activate(state)
        if self.theta is not None:
            self.weights_pub.publish(weights_to_msg(self.theta, self.model.layout.fingerprint))
        return ret

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = False
        self._set_mode(g.MODE_INACTIVE, "deactivated")
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
        self.law = cl.make_law(self.model, None, self.weights_version)
        self.mode = g.MODE_INACTIVE
        self._update_control_diag(cl.UNCONFIGURED)

    def shutdown_hold(self, spin_once) -> None:
        """After SIGINT/SIGTERM: keep answering states with the fallback (``inactive_behavior``)
        until the plant is at rest, the states stop, or ``shutdown_timeout`` passes; a plant
        left with a moving command would otherwise keep it until its own timeout."""
        self.shutting_down = True
        self.active = False
        if self.p["inactive_behavior"] != "fallback" or self._last_state_time is None:
            return
        self._set_mode(g.MODE_SHUTTING_DOWN, "shutdown: fallback until the plant is at rest")
        self.rest.restart()
        # at rest, or the plant is gone (the demo stops the simulator first)
        spin_until(self, spin_once, lambda: self.rest.at_rest or
                   time.monotonic() - self._last_state_time > self.p["state_timeout"], self.p["shutdown_timeout"])

    # ---------------------------------------------------------------- parameters
    def _check(self, values: dict) -> str | None:
        try:
            monitor_settings(values)
            build_model(values, self.plant_file)
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
        if changed & MONITOR and not changed & MODEL:
            self._build_monitor()
        if not changed & MODEL:
            if "min_update_period_s" in changed and self.worker is not None:
                self.worker.min_period_s = values["min_update_period_s"]
            return
        # The weights in force were certified for the old model: the new envelope's fallback
        # (its backup certified for the new model in _check) acts until the worker re-certifies.
        self.model = build_model(values, self.plant_file)
        self._build_runtime(self.model)
        self._r[:] = np.clip(self._r, self.references.lower, self.references.upper)
        self._r_list = self._r.tolist()
        self.law = cl.make_law(self.model, None, self.weights_version, certifying=self.configured)
        self._publish_plant()
        self._build_monitor()
        if not self.configured:
            return
        if "min_update_period_s" in changed:
            self.worker.min_period_s = values["min_update_period_s"]
        self.model_id += 1
        self.worker.rebuild(self.model, self.model_id, self.theta)
        self.get_logger().warning("model changed: fallback alone until the weights are re-certified")
        if self.active and self.mode in RECERTIFY_FROM:
            self._set_mode(g.MODE_BACKUP_RECERTIFYING, f"parameters {sorted(changed & MODEL)} changed")

    def _publish_plant(self) -> None:
        """The plant this node certifies for (its file, the limits in force) on the latched
        ``plant`` topic: late subscribers and bags get it."""
        self.plant_pub.publish(String(data=json.dumps({**plant_record(self.model.plant), "node": g.SAFETY_NODE})))

    def _watchdog_period(self) -> float:
        return max(0.005, min(self.model.plant.dt, self.p["state_timeout"] / 2.0))

    # -------------------------------------------------------------- control path
    def _on_state(self, msg: JointState) -> None:
        t_start = time.perf_counter()
        x = self._x_new
        reason = self.joints.read_msg(msg, x)
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
        vals = x.tolist()
        self._x[:] = x
        self._state_seq += 1
        self.rest.update(vals)
        law = self.law
        if not self.active:
            if self.p["inactive_behavior"] == "fallback":
                self._publish_fallback(x, "inactive" if not self.shutting_down else "shutdown", t_start)
            self._monitor_step(x, stamp)
            return
        vals += self._r_list
        if self.monitor is not None and self.monitor.tripped:
            mode, self._qualifying = g.MODE_MODEL_MISMATCH, 0
        else:
            mode, self._qualifying = cl.select(law, vals, self.mode, self._qualifying,
                                               self.p["policy_return_steps"])
        if mode == g.MODE_POLICY:
            self._inp_buf[:-1] = array.array("d", vals)
            res = self.envelope.filter(x, law.policy(self._inp, self._policy_out), self._r)
            label = g.LABEL_POLICY
            if res.changed:
                self._policy_changed(res)
        else:
            res = self.envelope.fallback(x, self._r, "fallback")
            label = g.LABEL_BACKUP
        self._publish(label, res, t_start)
        self.counts.control_steps += 1
        self.counts.backup_steps += label == g.LABEL_BACKUP
        if mode != self.mode:
            self._set_mode(mode, g.mode_reason(mode))
        self.period.update(stamp)   # the stamp the gate accepted above
        if self.counts.control_steps % 50 == 0:
            self._update_control_diag()
        self._monitor_step(x, stamp)

    def _monitor_step(self, x: np.ndarray, stamp: float) -> None:
        """The transition from the previous accepted state to ``x`` through the model monitor (the
        command for ``x`` is already out): the candidates are the commands sent in answer to the
        previous states (``MONITOR_CANDIDATES``)."""
        mon = self.monitor
        if mon is None:
            return
        seq = self._state_seq
        if self._mon_stamp is not None:
            cands = [self._sent_u[i] for i in range(MONITOR_CANDIDATES + 1)
                     if seq - MONITOR_CANDIDATES <= self._sent_seq[i] < seq]
            change = mon.observe(self._mon_x, cands, x, stamp - self._mon_stamp, self.period.value)
            if change is True:
                rec = mon.record()
                self.get_logger().error(f"model monitor tripped: the residual left the declared uncertainty "
                                        f"(ratio {rec['last_ratio']}, {rec['out_of_bounds']} of {rec['transitions']} "
                                        f"transitions out of bounds, detected after {rec['detection_delay']}); the "
                                        f"fallback acts and no update is committed")
                self._publish_monitor()
            elif change is False:
                self.get_logger().warning("model monitor cleared: the residual is back inside the declared "
                                          "uncertainty")
                self._publish_monitor()
            elif time.monotonic() - self._mon_published > 1.0:
                self._publish_monitor()
        self._mon_x[:] = x
        self._mon_stamp = stamp

    def _publish(self, label: str, res, t_start: float | None = None) -> None:
        self._cmd_out[label][:] = res.u
        compute = time.perf_counter() - t_start if t_start is not None else None
        self.cmd_pub.publish(self._cmd_msgs[label])
        # the monitor's candidates, newest first (a hold answers no state: -1)
        self._sent_u[1:] = self._sent_u[:-1]
        self._sent_u[0] = res.u
        self._sent_seq[1:] = self._sent_seq[:-1]
        self._sent_seq[0] = self._state_seq if label != g.LABEL_HOLD else -1
        if compute is not None:
            self.compute_us.add(1e6 * compute)
        if self.counts.command(label, res, self.envelope.change_tol):
            self.get_logger().error(f"state {np.round(self._x, 4).tolist()} is outside the recoverable set: "
                                    f"recovery action (next-state violation {res.violation:.3g})",
                                    throttle_duration_sec=2.0)

    def _publish_fallback(self, x: np.ndarray, reason: str, t_start: float | None) -> None:
        self._publish(g.LABEL_BACKUP, self.envelope.fallback(x, self._r, reason), t_start)
        if self.shutting_down:
            self.counts.shutdown_commands += 1
        else:
            self.counts.inactive_commands += 1

    def _policy_changed(self, res) -> None:
        """The envelope moved a certified-policy command: the certificate's sampled states missed
        this one. The command sent is the safe one; say so loudly."""
        n = self.counts.policy_changed()
        self.get_logger().error(f"the envelope changed a certified-policy command by {res.distance:.3g} "
                                f"({res.reason}) at x = {np.round(self._x, 4).tolist()}: {n} so far",
                                throttle_duration_sec=2.0)
        if n == 1 or n % 100 == 0:
            self._update_control_diag()

    def _reject_state(self, reason: str) -> None:
        self.get_logger().warning(f"rejected joint_states ({reason}): {self.inputs.text(reason)}",
                                  throttle_duration_sec=2.0)
        if self.inputs.reject(reason, time.monotonic()):
            self._update_inputs_diag()

    def _on_reference(self, msg: Float64MultiArray) -> None:
        reason = self.references.apply(msg.data, self._r)
        if reason is not None:
            self.get_logger().warning(reference_text(reason, msg.data, self.references.lower, self.references.upper),
                                      throttle_duration_sec=2.0)
            self._update_inputs_diag()
        self._r_list = self._r.tolist()

    def _on_incompatible_qos(self, info) -> None:
        self.get_logger().warning(f"joint_states: a publisher's QoS is incompatible with state_qos = "
                                  f"{self.p['state_qos']} (policy {info.last_policy_kind}): its states never arrive")
        self.diag.update("inputs", g.LEVEL_WARN, f"incompatible QoS on joint_states (state_qos {self.p['state_qos']})",
                         **self.inputs.counts())

    def _on_watchdog(self) -> None:
        if self._last_state_time is None or (not self.active and self.p["inactive_behavior"] == "silent"):
            return
        now = time.monotonic()
        if now - self._last_state_time <= self.p["state_timeout"]:
            return
        if self.mode != g.MODE_HOLD_STALE:
            self.hold.start(self._x, now)
            self._set_mode(g.MODE_HOLD_STALE, f"no valid state for {self.p['state_timeout']:g} s: "
                                              f"holding ({self.p['hold_mode']})")
        self._publish(g.LABEL_HOLD, self.hold.command(now, self.model.plant, self.envelope, self._r,
                                                      self.p["hold_mode"]))
        self.counts.hold_commands += 1

    # ----------------------------------------------------------------- SCPO path
    def _take_proposal(self) -> None:
        """The newest proposal from the intake, checked, to the worker; the malformed ones'
        aggregated record when one is due (``ProposalGate``)."""
        gate = self.proposals
        gate.refused_by_size(self.intake.drain_rejections(), self.model.layout.size)
        item = self.intake.take()
        if item is not None:
            flat = gate.check(self.model.layout, *item, self.p["require_fingerprint"])
            if flat is not None and self.active:
                if self._monitor_tripped():
                    self._monitor_blocks("proposal not taken")
                else:
                    self.worker.submit(flat)
        due = gate.due(time.monotonic())
        if due is None:
            return
        n, reason = due
        self.results.updates["rejected"] += n
        self.get_logger().error(f"rejected {n} {reason}", throttle_duration_sec=5.0)
        self.decision_pub.publish(String(data=decision_record(
            "malformed", Decision(status="rejected", reason=reason), count=n, stamp=self._now())))
        self.diag.update("weights", g.LEVEL_WARN, f"rejected {reason}", malformed=gate.total,
                         layout=str(self.model.layout.sizes), fingerprint=self.model.layout.fingerprint,
                         **self.intake.stats())

    def _drain_results(self) -> None:
        if self.worker is None:
            return
        self._take_proposal()
        results = self.results
        if not self.worker.alive():
            # a crashed worker: the certified weights stay in force; start a new one
            results.errors += 1
            self.get_logger().error("SCPO worker process died: restarting it (certified weights unchanged)")
            self.worker.restart(self.model, self.model_id, self.theta)
            self.diag.update("scpo", g.LEVEL_ERROR, "SCPO worker process died: restarted",
                             restarts=self.worker.restarts)
        for kind, decision, theta, model_id in self.worker.poll():
            action = results.account(kind, decision, theta, model_id == self.model_id, self.law.certifying)
            if action is None:   # another change came in meanwhile: wait for its result
                continue
            deploy, level = action
            if deploy and kind == "proposal" and self._monitor_tripped():
                # certified on a model the plant has just been seen to leave: not deployed
                self._monitor_blocks(f"certified update ({decision.status}) not deployed")
                deploy = False
            if deploy:
                self._deploy(theta, certifying_done=kind == "recertify")
            if kind == "recertify":
                self.get_logger().info(f"re-certification: {decision.status} ({decision.reason}); the certificate "
                                       f"covers {decision.covers or 'the nominal model'}")
            elif kind == "error":
                self.get_logger().error(f"SCPO worker error (weights unchanged): {decision.reason}")
            if kind in ("proposal", "recertify") and not self.proposals.pending:
                self.diag.update("weights", g.LEVEL_OK, f"{self.proposals.total} malformed proposals rejected",
                                 malformed=self.proposals.total, fingerprint=self.model.layout.fingerprint,
                                 **self.intake.stats())
            self.decision_pub.publish(String(data=decision_record(kind, decision, stamp=self._now(),
                                                                  weights_version=self.weights_version)))
            self.diag.update("scpo", level, f"last {kind}: {decision.status}" +
                             (f" ({decision.reason})" if decision.reason else ""),
                             updates=results.updates, recertifications=results.recertifications,
                             superseded=self.worker.superseded, weights_version=self.weights_version,
                             last_total_ms=decision.times_ms.get("total", 0.0))

    def _deploy(self, theta: np.ndarray, certifying_done: bool = False) -> None:
        """Make certified ``theta`` the law in force and publish it."""
        self.theta = np.asarray(theta, dtype=np.float64)
        self.weights_version += 1
        self.law = cl.make_law(self.model, self.theta, self.weights_version)
        if self.active:
            self.weights_pub.publish(weights_to_msg(self.theta, self.model.layout.fingerprint))
        if certifying_done and self.mode == g.MODE_BACKUP_RECERTIFYING:
            self._set_mode(g.MODE_RETURNING, "weights re-certified")

    def _monitor_tripped(self) -> bool:
        return self.monitor is not None and self.monitor.tripped

    def _monitor_blocks(self, what: str) -> None:
        self.monitor_blocked += 1
        self.get_logger().warning(f"{what}: the model monitor is tripped ({self.monitor_blocked} held back)",
                                  throttle_duration_sec=2.0)

    def _publish_monitor(self) -> None:
        """The monitor's record on ``model_monitor`` and the ``model`` diagnostic."""
        self._mon_published = time.monotonic()
        if self.monitor is None:
            rec = {"enabled": False}
            self.diag.update("model", g.LEVEL_OK, "model monitor disabled")
        else:
            rec = {"enabled": True, **self.monitor.record(), "held_back": self.monitor_blocked}
            level = g.LEVEL_ERROR if rec["tripped"] else g.LEVEL_OK
            text = ("MODEL MISMATCH: residual outside the declared uncertainty" if rec["tripped"] else
                    f"model within its declared uncertainty ({'declared' if rec['declared'] else 'nominal'})")
            self.diag.update("model", level, text, **{k: v for k, v in rec.items() if k != "enabled"})
        self.monitor_pub.publish(String(data=json.dumps({**rec, "stamp": self._now()})))

    # --------------------------------------------------------------- reporting
    def _set_mode(self, mode: str, reason: str) -> None:
        old, self.mode = self.mode, mode
        self.counts.fallbacks += mode in g.FALLBACK_MODES
        # mode changes at a region boundary can come every few steps: throttled per kind
        if mode == g.MODE_HOLD_STALE:
            self.get_logger().error(f"mode {old} -> {mode}: {reason}", throttle_duration_sec=5.0)
        elif mode in g.FALLBACK_MODES:
            self.get_logger().warning(f"mode {old} -> {mode}: {reason} ({self.counts.fallbacks} fallbacks)",
                                      throttle_duration_sec=5.0)
        elif old in g.FALLBACK_MODES:
            self.get_logger().info(f"mode {old} -> {mode}: {reason}", throttle_duration_sec=5.0)
        self.mode_pub.publish(String(data=json.dumps({"mode": mode, "previous": old, "reason": reason,
                                                      "fallbacks": self.counts.fallbacks, "stamp": self._now()})))
        self._update_control_diag(reason)

    def _update_control_diag(self, reason: str = "") -> None:
        level, text = cl.control_status(self.mode, self.p, reason, self.period.value,
                                        self.counts.policy_interventions, dt=self.model.plant.dt)
        comp = self.compute_us.stats(empty=0.0)
        self.diag.update("control", level, text, mode=self.mode, **self.counts.diag_values(),
                         weights_version=self.weights_version, compute_us_median=comp["median"],
                         compute_us_p99=comp["p99"])

    def _update_inputs_diag(self) -> None:
        clock_missing = self.get_clock().ros_time_is_active and ros_now(self) is None
        level, text = self.inputs.status(time.monotonic(), clock_missing)
        self.diag.update("inputs", level, text, joints=self.joints.joints, **self.inputs.counts())

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def summary(self) -> dict:
        res = self.results
        return {"node": g.SAFETY_NODE, **dataclasses.asdict(self.counts), "updates": res.updates,
                "malformed": self.proposals.total + self.proposals.pending, "recertifications": res.recertifications,
                "worker_errors": res.errors, "weights_version": self.weights_version,
                "superseded": self.worker.superseded if self.worker else 0,
                "flood_dropped": self.intake.stats().get("dropped", 0) if self.intake else 0,
                "bad_states": self.inputs.bad_states, **self.inputs.counts(), "compute_us": self.compute_us.stats(),
                "model_monitor": self.monitor.record() if self.monitor is not None else None,
                "monitor_held_back": self.monitor_blocked}

    def destroy_node(self):
        pubs = [self.cmd_pub, self.mode_pub, self.monitor_pub] + \
            ([self.weights_pub, self.decision_pub] if self.configured else [])
        flush_publishers(pubs)
        self.active = False
        self._teardown()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(SCPOSafetyNode, args)


if __name__ == "__main__":
    sys.exit(main())
