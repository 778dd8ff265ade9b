"""``scpo_safety_node``: the certified controller of the double integrator (a lifecycle node).

Control path (every ``joint_states`` message, executor thread, no lock, no waiting):
``u = backup(x, r) + φ_θ([x, r])`` with ``θ`` the last *certified* weights, evaluated by a
preallocated numpy MLP, published on ``cmd`` at once. When the measured state or the
reference lies outside the region the certificate covers (the SCPO initial set, grown by
``region_margin``) the backup alone acts (mode ``backup_region``) and the node says so.

SCPO path (a worker *process*, off the control path): ``proposed_weights`` are checked
(size, layout fingerprint, NaN/Inf; a malformed one is rejected here, logged, counted and
diagnosed), the latest valid one waits in a one-slot mailbox (older ones are superseded),
and the worker runs one ``DoubleIntegratorSCPO.propose_weights`` step per proposal. Its
results come back through a pipe that an executor timer polls: the decision is
published on ``scpo_decision`` (JSON), committed weights on ``certified_weights`` and the
control law is swapped in one attribute assignment. A silent learner leaves the last
certified weights in force.

Stale state: after ``state_timeout`` s without a valid state the node publishes the hold
command (``hold_mode``) at every watchdog tick and an ERROR diagnostic; control resumes by
itself with the next state. ``backup_predicted`` (default) runs the backup on the last
state propagated with the nominal model: for the exact model this *is* the closed loop the
certificate covers (from a certified-region state the backup keeps every constraint),
whereas a constant command (zero, or the backup of a frozen state) lets a double
integrator drift at its last velocity or keep accelerating. ``zero`` suits plants whose
zero command brakes.

Parameters: everything is declared with a range (see ``PARAMS``). A change of the model
(limits, backup, initial set, SCPO or safety settings) is validated first (the new backup
must certify the new initial set, else the change is rejected with the reason); once
accepted the backup alone controls (mode ``backup_recertifying``) until the worker has
re-certified the current weights under the new model (or reverted to the backup's).
Weights certified for other limits are never used.

Every ``cmd`` carries its source in ``layout.dim[0].label``: ``policy``, ``backup`` or
``hold`` (forward command controllers ignore the layout).
"""
from __future__ import annotations

import array
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension, MultiArrayLayout, String

from ..backup import BackupCertificationError, InitialSet, LQRBackup
from ..dynamics import DoubleIntegrator
from ..policy import MLPLayout, WeightsRejected, check_weights
from ..ros_common import (CONTROL_QOS, ERROR, EVENT_QOS, LATCHED_QOS, OK, WARN, Diagnostics, ParamSpec,
                          add_parameter_validator, array_from_float64, declare_parameters, flush_publishers, run_node,
                          stamp_to_sec, weights_from_msg, weights_to_msg)
from ..rollout import METRICS, SafetySpec
from ..scpo import STATUSES, Decision, DoubleIntegratorSCPO, SCPOConfig

_C, _S, _I = SCPOConfig(), SafetySpec(), InitialSet()
PARAMS = [
    # structure: fixed once the node runs
    ParamSpec("dof", 1, "Number of axes.", 1, 4, read_only=True),
    ParamSpec("hidden", [32, 32], "Hidden layer sizes of the residual MLP.", 1, 1024, read_only=True,
              min_len=1, max_len=8),
    ParamSpec("seed", 0, "Seed of SCPO's sampling and of the backup weights.", 0, 2**31 - 1, read_only=True),
    ParamSpec("autostart", True, "Configure and activate at start-up (no lifecycle manager needed).",
              read_only=True),
    # plant model and constraints
    ParamSpec("dt", 0.05, "Model time step (s): must equal the simulator's dt.", 1e-3, 1.0),
    ParamSpec("p_max", 1.0, "Position constraint |p| <= p_max.", 1e-3, 1e3),
    ParamSpec("v_max", 1.0, "Velocity constraint |v| <= v_max.", 1e-3, 1e3),
    ParamSpec("u_max", 1.0, "Actuation constraint |u| <= u_max.", 1e-3, 1e3),
    # backup LQR
    ParamSpec("q_pos", 1.0, "Backup LQR position weight.", 0.0, 1e6),
    ParamSpec("q_vel", 1.0, "Backup LQR velocity weight.", 0.0, 1e6),
    ParamSpec("r_act", 10.0, "Backup LQR action weight.", 1e-6, 1e6),
    # certified region (SCPO's initial set)
    ParamSpec("p0_max", _I.p0_max, "Certified initial set: |p| <= p0_max.", 1e-3, 1e3),
    ParamSpec("v0_max", _I.v0_max, "Certified initial set: |v| <= v0_max.", 1e-3, 1e3),
    ParamSpec("r_max", _I.r_max, "Certified references: |r| <= r_max.", 0.0, 1e3),
    ParamSpec("region_margin", 0.0, "Slack added to the certified box by the runtime region monitor. 0 trusts "
                                    "the policy exactly where it was certified; > 0 trusts it slightly beyond.",
              0.0, 1.0),
    # safety metrics of the rollouts
    ParamSpec("horizon", _S.horizon, "Rollout length H (steps).", 1, 2000),
    ParamSpec("lyap_alpha", _S.lyap_alpha, "Required relative decrease of V per step.", 0.0, 0.99),
    ParamSpec("lyap_eps", _S.lyap_eps, "V-level of the terminal set where decrease is not required.", 0.0, 1e3),
    # SCPO
    ParamSpec("n_samples", _C.n_samples, "K: parameter perturbations per step.", 2, 4096),
    ParamSpec("sample_radius", _C.sample_radius, "σ: sampling radius and largest step (trust radius).",
              1e-6, 10.0),
    ParamSpec("inner_radius_ratio", _C.inner_radius_ratio, "Second sampling radius as a fraction of σ.",
              0.01, 0.99),
    ParamSpec("n_random_directions", _C.n_random_directions, "Random directions added to the step subspace.",
              0, 256),
    ParamSpec("safety_factor", _C.safety_factor, "κ >= 1 multiplying the fitted error/curvature bounds.",
              1.0, 100.0),
    ParamSpec("margins", list(_C.margins), f"m_i kept below 0 by the projection (one, or one per metric "
                                           f"{', '.join(METRICS)}).", 0.0, 10.0, min_len=1, max_len=len(METRICS)),
    ParamSpec("cert_margins", list(_C.cert_margins), "c_i: certification requires g_i <= -c_i (one or one per "
                                                     "metric).", 0.0, 10.0, min_len=1, max_len=len(METRICS)),
    ParamSpec("max_backtracks", _C.max_backtracks, "Halvings tried when the projected step fails certification.",
              0, 20),
    ParamSpec("ridge", _C.ridge, "Tikhonov term of the gradient fit.", 0.0, 1.0),
    ParamSpec("n_sample_states", 256, "Initial states of the sampling rollouts.", 8, 65536),
    ParamSpec("n_cert_states", 1024, "Fresh initial states of the certification rollouts.", 8, 65536),
    # runtime
    ParamSpec("state_timeout", 0.25, "Seconds without a valid state before the hold command.", 0.005, 10.0),
    ParamSpec("hold_mode", "backup_predicted", "Command on stale state: backup on the model-predicted state, or "
                                               "zero.", choices=("backup_predicted", "zero")),
    ParamSpec("min_update_period_s", 0.0, "Least time between two SCPO steps (0: as fast as they run).",
              0.0, 3600.0),
    ParamSpec("require_fingerprint", True, "Reject proposals that carry no layout fingerprint."),
    ParamSpec("worker_niceness", 10, "Scheduling niceness of the SCPO worker process (0: same priority as "
                                     "the control path). Learning is background work: on a loaded CPU the "
                                     "control callback must win.", 0, 19, read_only=True),
]

STRUCTURE = {"dof", "hidden", "seed", "autostart", "worker_niceness"}
RUNTIME = {"region_margin", "state_timeout", "hold_mode", "min_update_period_s", "require_fingerprint"}
MODEL = {s.name for s in PARAMS} - STRUCTURE - RUNTIME
"""Parameters the certificate depends on: a change re-certifies."""

FALLBACK_MODES = ("backup_region", "backup_recertifying", "hold_stale")
MODE_LEVELS = {"inactive": OK, "waiting_for_state": WARN, "policy": OK, "backup_region": WARN,
               "backup_recertifying": WARN, "hold_stale": ERROR}


@dataclass(frozen=True)
class Model:
    """Everything the certificate depends on, built from parameter values."""

    system: DoubleIntegrator
    backup: LQRBackup
    initial_set: InitialSet
    layout: MLPLayout
    config: SCPOConfig
    safety: SafetySpec
    n_sample_states: int
    n_cert_states: int
    seed: int


def build_model(v: dict) -> Model:
    """Raise ``ValueError`` (``BackupCertificationError`` included) with the reason if unusable."""
    dof = int(v["dof"])
    system = DoubleIntegrator(dof=dof, dt=v["dt"], p_max=v["p_max"], v_max=v["v_max"], u_max=v["u_max"])
    backup = LQRBackup(system, q_pos=v["q_pos"], q_vel=v["q_vel"], r_act=v["r_act"])
    initial_set = InitialSet(p0_max=v["p0_max"], v0_max=v["v0_max"], r_max=v["r_max"])
    backup.certify(initial_set)
    for name in ("margins", "cert_margins"):
        if len(v[name]) not in (1, len(METRICS)):
            raise ValueError(f"{name} needs 1 or {len(METRICS)} entries, got {len(v[name])}")
    config = SCPOConfig(n_samples=v["n_samples"], sample_radius=v["sample_radius"],
                        inner_radius_ratio=v["inner_radius_ratio"], n_random_directions=v["n_random_directions"],
                        safety_factor=v["safety_factor"], margins=tuple(v["margins"]),
                        cert_margins=tuple(v["cert_margins"]), max_backtracks=v["max_backtracks"], ridge=v["ridge"])
    safety = SafetySpec(horizon=v["horizon"], lyap_alpha=v["lyap_alpha"], lyap_eps=v["lyap_eps"])
    layout = MLPLayout(3 * dof, dof, tuple(int(h) for h in v["hidden"]))
    return Model(system, backup, initial_set, layout, config, safety, int(v["n_sample_states"]),
                 int(v["n_cert_states"]), int(v["seed"]))


class FoldedPolicy:
    """``u = backup(x, r) + φ_θ([x, r])`` for one input, in as few numpy calls as possible.

    The input is augmented with a constant 1: ``z = [x, r, 1]``, so every bias is a column
    of its matrix. The backup is linear in ``z``: ``-K (x - [r, 0]) = W_b z`` with
    ``W_b = [-K, K_p, 0]`` (``K_p``: the position columns of K). Every layer's output is
    ``[h, 1, u_b]``: its activations, a constant 1 for the next bias, and the backup action
    carried through unchanged (pass-through rows, outside the tanh); the last layer adds
    ``u_b`` by an identity block. A layer therefore costs one product and one tanh, and
    the whole law ``2 L - 1`` numpy calls. At 100 Hz each callback starts with cold
    caches, where the number of numpy calls, not the arithmetic, sets the time (measured:
    ~150 µs for a plain numpy version vs ~15 µs when called back to back). Every buffer is
    preallocated; the caller owns ``z`` and ``out``.
    """

    def __init__(self, K: np.ndarray, layout: MLPLayout | None, theta: np.ndarray | None):
        d = K.shape[0]
        Wb = np.hstack([-K, K[:, :d], np.zeros((d, 1))])             # (d, 3d + 1)
        self.d = d
        self._last = None                     # None: the law is the single affine map ``first``
        if theta is None:                                            # the backup alone
            self.first = np.ascontiguousarray(Wb)
            return
        layers = [(np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64))
                  for W, b in layout.unflatten(np.asarray(theta, dtype=np.float64))]
        if len(layers) == 1:                   # no hidden layer: φ and the backup are both affine
            W, b = layers[0]
            self.first = np.ascontiguousarray(np.hstack([W, b[:, None]]) + Wb)
            return

        def carry(W, b, last: bool) -> np.ndarray:
            """``[h, 1, u_b] -> [W h + b, 1, u_b]`` (hidden) or ``W h + b + u_b`` (last)."""
            n_out, n_in = W.shape
            M = np.zeros((n_out + (0 if last else 1 + d), n_in + 1 + d))
            M[:n_out, :n_in], M[:n_out, n_in] = W, b
            if last:
                M[:, n_in + 1:] = np.eye(d)
            else:
                M[n_out, n_in] = 1.0
                M[n_out + 1:, n_in + 1:] = np.eye(d)
            return M

        W0, b0 = layers[0]
        h0 = W0.shape[0]
        first = np.zeros((h0 + 1 + d, W0.shape[1] + 1))
        first[:h0, :-1], first[:h0, -1], first[h0, -1], first[h0 + 1:] = W0, b0, 1.0, Wb
        self.first = first
        hidden = [first] + [carry(W, b, False) for W, b in layers[1:-1]]
        bufs = [np.zeros(M.shape[0]) for M in hidden]
        acts = [buf[:buf.size - 1 - d] for buf in bufs]               # the tanh part of each
        self._steps = list(zip(hidden, bufs, acts))
        self._last = carry(*layers[-1], True)

    def __call__(self, z_in: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``z_in = [x, r, 1]`` (length ``3 dof + 1``) -> the command, written into ``out``."""
        if self._last is None:
            return np.dot(self.first, z_in, out=out)
        h = z_in
        for W, buf, act in self._steps:
            np.dot(W, h, out=buf)
            np.tanh(act, out=act)
            h = buf
        return np.dot(self._last, h, out=out)


def command_view(msg: Float64MultiArray) -> np.ndarray:
    """A float64 numpy view on ``msg.data``'s own storage: writing it writes the message.

    Checked once here (a rosidl whose getter returned a copy would otherwise publish stale
    commands silently).
    """
    view = np.frombuffer(msg.data, dtype=np.float64)
    view[:] = 1.0
    if list(msg.data) != [1.0] * view.size:
        raise RuntimeError("Float64MultiArray.data is not backed by the array its getter returns")
    view[:] = 0.0
    return view


@dataclass(frozen=True)
class ControlLaw:
    """What the control path evaluates; replaced as a whole, never mutated by others.

    ``policy`` computes ``backup + φ`` (certified weights) and ``backup`` the backup alone;
    ``certifying`` marks the interval after a model change during which only the (new,
    certified) backup may act. ``lower``/``upper``: the certified region of ``[x, r]``.
    """

    policy: FoldedPolicy | None
    backup: FoldedPolicy
    lower: tuple
    upper: tuple
    version: int
    certifying: bool = False


def make_law(model: Model, theta: np.ndarray | None, margin: float, version: int,
             certifying: bool = False) -> ControlLaw:
    d = model.system.dof
    s = model.initial_set
    upper = tuple([s.p0_max + margin] * d + [s.v0_max + margin] * d + [s.r_max + margin] * d)
    K = np.ascontiguousarray(model.backup.K)
    policy = FoldedPolicy(K, model.layout, theta) if theta is not None else None
    return ControlLaw(policy, FoldedPolicy(K, None, None), tuple(-u for u in upper), upper, version, certifying)


def _worker_main(conn, niceness: int = 0) -> None:
    """The SCPO process: one request at a time from ``conn``, one result back per request.

    ``niceness`` lowers its CPU priority (``os.nice``) so that, on a loaded CPU, the
    scheduler runs the control callback first (measured: p99 round trip 2.4–2.9 ms with
    an equal-priority worker on 2 cores).

    Requests: ``("rebuild", model, model_id, theta)`` (build the SCPO client for ``model``,
    re-certify ``theta`` or fall back to the backup's weights), ``("proposal", flat)``,
    ``("stop",)``. Results: ``(kind, decision, theta or None, model_id)``.
    """
    import signal as _signal
    if niceness > 0:
        try:
            os.nice(niceness)
        except OSError:                                # not permitted here: run at the parent's priority
            pass

    import torch
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)   # the parent decides when to stop
    torch.set_num_threads(1)
    scpo, model_id = None, -1
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):                    # parent gone
            return
        try:
            if req[0] == "stop":
                return
            if req[0] == "rebuild":
                _, model, model_id, theta = req
                scpo = DoubleIntegratorSCPO(model.system, model.backup, model.layout, model.initial_set,
                                            model.config, safety=model.safety,
                                            n_sample_states=model.n_sample_states,
                                            n_cert_states=model.n_cert_states, seed=model.seed)
                if theta is not None and np.shape(theta) == scpo.theta.shape:
                    scpo.theta = np.asarray(theta, dtype=np.float32).copy()
                decision = scpo.recertify()
                conn.send(("recertify", decision, scpo.theta.astype(np.float64), model_id))
            elif req[0] == "proposal":
                decision = scpo.propose_weights(req[1])
                theta = scpo.theta.astype(np.float64) if decision.committed else None
                conn.send(("proposal", decision, theta, model_id))
        except Exception as exc:  # report, keep serving; the parent keeps its certified weights
            conn.send(("error", Decision(status="rejected", reason=f"{type(exc).__name__}: {exc}"), None, model_id))


class SCPOWorker:
    """Parent side of the SCPO process: a one-slot mailbox per request kind.

    SCPO steps run in their own process, not a thread: a thread would hold the GIL
    between the hundreds of small torch calls of a rollout and stall the control
    callback (measured: median callback compute 35 µs alone, ~170 µs beside a busy
    worker thread). ``poll()`` (from an executor timer) collects results and sends the
    next request; a re-build outranks proposals and the newest proposal supersedes older
    ones. Nothing here blocks.
    """

    def __init__(self, min_period_s: float = 0.0, niceness: int = 0):
        import multiprocessing as mp
        self._ctx = mp.get_context("spawn")   # never fork a process that runs DDS threads
        self.min_period_s = min_period_s
        self.niceness = niceness
        self.superseded = 0
        self.restarts = 0
        self._proc = None
        self._conn = None
        self._busy = False
        self._pending_rebuild = None
        self._pending_proposal = None
        self._last_sent = 0.0
        self._stopping = False

    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker_main, args=(child, self.niceness), name="scpo_worker", daemon=True)
        self._proc.start()
        child.close()
        self._conn, self._busy = parent, False

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def rebuild(self, model: Model, model_id: int, theta) -> None:
        self._pending_rebuild = (model, model_id, None if theta is None else np.asarray(theta))

    def submit(self, flat: np.ndarray) -> None:
        if self._pending_proposal is not None:
            self.superseded += 1
        self._pending_proposal = flat

    def poll(self) -> list:
        results = []
        try:
            while self._conn is not None and self._conn.poll():
                results.append(self._conn.recv())
                self._busy = False
        except (EOFError, OSError):
            self._busy = False
        if self._busy or not self.alive():
            return results
        if self._pending_rebuild is not None:
            self._conn.send(("rebuild", *self._pending_rebuild))
            self._pending_rebuild, self._busy = None, True
        elif self._pending_proposal is not None and time.monotonic() - self._last_sent >= self.min_period_s:
            self._conn.send(("proposal", self._pending_proposal))
            self._pending_proposal, self._busy = None, True
            self._last_sent = time.monotonic()
        return results

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=5.0)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=2.0)
        self._conn.close()
        self._proc, self._conn = None, None


class SCPOSafetyNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("scpo_safety_node", **kwargs)
        self.p = declare_parameters(self, PARAMS)
        self.dof = int(self.p["dof"])
        self.model = build_model(self.p)   # fail at start-up, with the reason, if unusable
        self.diag = Diagnostics(self)
        add_parameter_validator(self, PARAMS, check=self._check, apply=self._apply)
        self._reset_counters()
        self.mode = "inactive"
        self.active = False
        self.configured = False
        self.worker: SCPOWorker | None = None
        self.law: ControlLaw | None = None
        self.model_id = 0
        self.theta: np.ndarray | None = None
        self._dt_measured = None
        self._update_control_diag("unconfigured")
        if self.p["autostart"]:
            self._autostart_timer = self.create_timer(0.0, self._autostart)
        self.get_logger().info(f"SCPO safety node: dof={self.dof}, layout {self.model.layout.sizes} "
                               f"({self.model.layout.fingerprint}), region {self.model.initial_set}")

    def _reset_counters(self) -> None:
        self.control_steps = 0
        self.backup_steps = 0
        self.hold_commands = 0
        self.fallbacks = 0
        self.malformed = 0
        self.bad_states = 0
        self.updates = {k: 0 for k in STATUSES}
        self.recertifications = {"accepted": 0, "rejected": 0}
        self.worker_errors = 0
        self.weights_version = 0
        self._compute_us = np.zeros(4096)
        self._compute_n = 0

    def _autostart(self) -> None:
        self.destroy_timer(self._autostart_timer)
        if self.configured:   # a 0 s timer can fire again before its destruction takes effect
            return
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    # ----------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.model = build_model(self.p)
        except ValueError as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        d = self.dof
        self._x = np.zeros(2 * d)
        self._r = np.zeros(d)
        self._r_list = [0.0] * d
        # [x, r, 1]: FoldedPolicy's augmented input, a numpy view on an array.array that the
        # control path fills without a numpy call
        self._inp_buf = array.array("d", [0.0] * (3 * d) + [1.0])
        self._inp = np.frombuffer(self._inp_buf, dtype=np.float64)
        self._last_state_time = None
        self._last_stamp = None
        self._dt_measured = None
        self._hold_x = None
        self._hold_since = 0.0
        self._hold_steps = 0
        self.theta = None
        # until the worker's first certification: the backup alone (φ ≡ 0 is certified by construction
        # through backup.certify in build_model)
        self.law = make_law(self.model, None, self.p["region_margin"], 0)
        self._cmd_labels = {k: [MultiArrayDimension(label=k, size=d, stride=d)] for k in ("policy", "backup",
                                                                                          "hold")}
        # The control path writes each command through a numpy view straight into the array.array
        # its message holds: no list, no data setter (which copies, or type-checks every element).
        self._cmd_msgs, self._cmd_out = {}, {}
        for k in ("policy", "backup"):
            msg = Float64MultiArray(layout=MultiArrayLayout(dim=self._cmd_labels[k]), data=[0.0] * d)
            self._cmd_msgs[k], self._cmd_out[k] = msg, command_view(msg)
        self.cmd_pub = self.create_lifecycle_publisher(Float64MultiArray, "cmd", CONTROL_QOS)
        self.weights_pub = self.create_lifecycle_publisher(Float64MultiArray, "certified_weights", LATCHED_QOS)
        self.decision_pub = self.create_lifecycle_publisher(String, "scpo_decision", EVENT_QOS)
        self.mode_pub = self.create_publisher(String, "safety_mode", LATCHED_QOS)
        self.subs = [
            self.create_subscription(JointState, "joint_states", self._on_state, CONTROL_QOS),
            self.create_subscription(Float64MultiArray, "reference", self._on_reference, CONTROL_QOS),
            self.create_subscription(Float64MultiArray, "proposed_weights", self._on_proposal, EVENT_QOS),
        ]
        self.watchdog = self.create_timer(self._watchdog_period(), self._on_watchdog)
        self.results_timer = self.create_timer(0.05, self._drain_results)
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
        self._last_state_time = None
        self._set_mode("waiting_for_state", "activated")
        self.get_logger().info("activated: publishing commands")
        ret = super().on_activate(state)
        if self.theta is not None:
            self.weights_pub.publish(weights_to_msg(self.theta, self.model.layout.fingerprint))
        return ret

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = False
        self._set_mode("inactive", "deactivated")
        self.get_logger().info("deactivated: no commands are published")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.get_logger().info("cleaned up")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = False
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self) -> None:
        if not self.configured:
            return
        self.configured = False
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        for sub in self.subs:
            self.destroy_subscription(sub)
        self.destroy_timer(self.watchdog)
        self.destroy_timer(self.results_timer)
        for pub in (self.cmd_pub, self.weights_pub, self.decision_pub):
            self.destroy_lifecycle_publisher(pub)
        self.destroy_publisher(self.mode_pub)
        self.mode = "inactive"
        self._update_control_diag("unconfigured")

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
        if not self.configured:
            self.model = build_model(values)
            return
        if "state_timeout" in changed:
            self.destroy_timer(self.watchdog)
            self.watchdog = self.create_timer(self._watchdog_period(), self._on_watchdog)
        if "min_update_period_s" in changed:
            self.worker.min_period_s = values["min_update_period_s"]
        if changed & MODEL:
            # the weights in force were certified for the old model: the new backup alone
            # (certified for the new model in _check) acts until the worker re-certifies
            self.model = build_model(values)
            self.law = make_law(self.model, None, values["region_margin"], self.weights_version, certifying=True)
            self.model_id += 1
            self.worker.rebuild(self.model, self.model_id, self.theta)
            self.get_logger().warning("model changed: backup alone until the weights are re-certified")
            if self.active and self.mode in ("policy", "backup_region"):
                self._set_mode("backup_recertifying", f"parameters {sorted(changed & MODEL)} changed")
        elif "region_margin" in changed:
            self.law = make_law(self.model, self.theta, values["region_margin"], self.weights_version,
                                certifying=self.law.certifying)

    def _watchdog_period(self) -> float:
        return max(0.005, min(self.p["dt"], self.p["state_timeout"] / 2.0))

    # -------------------------------------------------------------- control path
    def _on_state(self, msg: JointState) -> None:
        if not self.active:
            return
        t_start = time.perf_counter()
        d = self.dof
        pos, vel = msg.position, msg.velocity
        if len(pos) < d or len(vel) < d:
            return self._bad_state()
        # z = [p, v, r] as Python floats: finiteness and the region check need no numpy call
        vals = [*pos[:d], *vel[:d], *self._r_list]
        law = self.law
        in_region = True
        for v, lo, hi in zip(vals, law.lower, law.upper):
            if not (lo <= v <= hi):                     # False for NaN too
                if not math.isfinite(v):
                    return self._bad_state()
                in_region = False
        self._inp_buf[:-1] = array.array("d", vals)
        inp = self._inp
        if law.policy is not None and in_region and not law.certifying:
            law.policy(inp, self._cmd_out["policy"])
            label = mode = "policy"
        else:
            law.backup(inp, self._cmd_out["backup"])
            label = "backup"
            mode = "backup_recertifying" if law.certifying else ("policy" if in_region else "backup_region")
        cmd = self._cmd_msgs[label]   # reused: publish() serialises before it returns
        compute = time.perf_counter() - t_start
        self.cmd_pub.publish(cmd)
        # bookkeeping after the command is out
        self._x[:] = inp[:2 * d]
        self._last_state_time = time.monotonic()
        self._compute_us[self._compute_n % len(self._compute_us)] = 1e6 * compute
        self._compute_n += 1
        self.control_steps += 1
        self.backup_steps += label == "backup"
        if mode != self.mode:
            self._set_mode(mode, "state outside the certified region" if mode == "backup_region" else
                           "state back in the certified region" if self.mode == "backup_region" else
                           "state received")
        stamp = stamp_to_sec(msg.header.stamp)
        if self._last_stamp is not None and stamp > self._last_stamp:
            gap = stamp - self._last_stamp
            self._dt_measured = gap if self._dt_measured is None else 0.95 * self._dt_measured + 0.05 * gap
        self._last_stamp = stamp
        if self.control_steps % 50 == 0:
            self._update_control_diag()

    def _bad_state(self) -> None:
        self.bad_states += 1
        self.get_logger().error(f"ignored a state without {self.dof} finite positions and velocities",
                                throttle_duration_sec=1.0)

    def _on_reference(self, msg: Float64MultiArray) -> None:
        r = array_from_float64(msg)
        if r.size != self.dof or not np.isfinite(r).all():
            self.get_logger().error(f"ignored reference {list(msg.data)}", throttle_duration_sec=1.0)
            return
        self._r[:] = r
        self._r_list = r.tolist()

    def _on_watchdog(self) -> None:
        if not self.active or self._last_state_time is None:
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
        if self.p["hold_mode"] == "zero":
            u = np.zeros(self.dof)
        else:
            # dead reckoning under the backup: advance the nominal model to the present
            sysm, backup, r = self.model.system, self.model.backup, self._r
            target = int((now - self._hold_since) / sysm.dt)
            while self._hold_steps < target:
                self._hold_x = sysm.A @ self._hold_x + sysm.B @ backup(self._hold_x, r)
                self._hold_steps += 1
            u = backup(self._hold_x, r)
        cmd = Float64MultiArray(data=np.asarray(u, dtype=float).tolist())
        cmd.layout.dim = self._cmd_labels["hold"]
        self.cmd_pub.publish(cmd)
        self.hold_commands += 1

    # ----------------------------------------------------------------- SCPO path
    def _on_proposal(self, msg: Float64MultiArray) -> None:
        if not self.active:
            return
        flat, fingerprint = weights_from_msg(msg)
        try:
            if fingerprint is None and self.p["require_fingerprint"]:
                raise WeightsRejected("proposal carries no layout fingerprint (layout.dim[0].label)")
            flat = check_weights(self.model.layout, flat, fingerprint)
        except WeightsRejected as exc:
            self.malformed += 1
            self.updates["rejected"] += 1
            reason = f"malformed proposal: {exc}"
            self.get_logger().error(f"rejected {reason}", throttle_duration_sec=1.0)
            self.decision_pub.publish(String(data=json.dumps(
                {"kind": "malformed", "stamp": self._now(), **Decision(status="rejected", reason=reason).to_dict()})))
            self.diag.update("weights", WARN, f"rejected {reason}", malformed=self.malformed,
                             layout=str(self.model.layout.sizes), fingerprint=self.model.layout.fingerprint)
            self.diag.publish()
            return
        self.worker.submit(flat)

    def _drain_results(self) -> None:
        if self.worker is None:
            return
        if not self.worker.alive():
            # a crashed worker: the certified weights stay in force; start a new one
            self.worker_errors += 1
            self.worker.restarts += 1
            self.get_logger().error("SCPO worker process died: restarting it (certified weights unchanged)")
            self.diag.update("scpo", ERROR, "SCPO worker process died: restarted", restarts=self.worker.restarts)
            self.worker.stop()
            self.worker.start()
            self.worker.rebuild(self.model, self.model_id, self.theta)
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
                if theta is not None and not self.law.certifying:
                    self._deploy(theta)
                level = OK
            else:
                self.worker_errors += 1
                level = ERROR
                self.get_logger().error(f"SCPO worker error (weights unchanged): {decision.reason}")
            if kind in ("proposal", "recertify"):
                self.diag.update("weights", OK, f"{self.malformed} malformed proposals rejected",
                                 malformed=self.malformed, fingerprint=self.model.layout.fingerprint)
            record = {"kind": kind, "stamp": self._now(), "weights_version": self.weights_version,
                      **decision.to_dict()}
            self.decision_pub.publish(String(data=json.dumps(record, default=_json_default)))
            self.diag.update("scpo", level, f"last {kind}: {decision.status}" +
                             (f" ({decision.reason})" if decision.reason else ""),
                             updates=self.updates, recertifications=self.recertifications,
                             superseded=self.worker.superseded if self.worker else 0,
                             weights_version=self.weights_version,
                             last_total_ms=decision.times_ms.get("total", 0.0))

    def _deploy(self, theta: np.ndarray, certifying_done: bool = False) -> None:
        """Make certified ``theta`` the law in force and publish it."""
        self.theta = np.asarray(theta, dtype=np.float64)
        self.weights_version += 1
        self.law = make_law(self.model, self.theta, self.p["region_margin"], self.weights_version)
        if self.active:
            self.weights_pub.publish(weights_to_msg(self.theta, self.model.layout.fingerprint))
        if certifying_done and self.mode == "backup_recertifying":
            self._set_mode("policy", "weights re-certified")

    # --------------------------------------------------------------- reporting
    def _set_mode(self, mode: str, reason: str) -> None:
        old, self.mode = self.mode, mode
        if mode in FALLBACK_MODES:
            self.fallbacks += 1
        if mode == "hold_stale":
            self.get_logger().error(f"mode {old} -> {mode}: {reason}")
        elif mode in FALLBACK_MODES or old in FALLBACK_MODES:
            self.get_logger().warning(f"mode {old} -> {mode}: {reason}")
        if self.configured:
            self.mode_pub.publish(String(data=json.dumps({"mode": mode, "previous": old, "reason": reason,
                                                          "fallbacks": self.fallbacks, "stamp": self._now()})))
        self._update_control_diag(reason)

    def _update_control_diag(self, reason: str = "") -> None:
        text = {"inactive": "inactive: no commands", "waiting_for_state": "waiting for the first state",
                "policy": "certified policy in force", "backup_region":
                    "BACKUP ALONE: state or reference outside the certified region",
                "backup_recertifying": "BACKUP ALONE: re-certifying after a parameter change",
                "hold_stale": f"STALE STATE: hold command ({self.p['hold_mode']})"}[self.mode]
        if self.mode == "inactive" and reason == "unconfigured":
            text = "unconfigured"
        dt_ok = self._dt_measured is None or abs(self._dt_measured - self.p["dt"]) <= 0.25 * self.p["dt"] or \
            self.mode != "policy"
        level = MODE_LEVELS[self.mode]
        if not dt_ok and level == OK:
            level = WARN
            text += f"; state period {self._dt_measured:.4f} s differs from the model dt {self.p['dt']:g} s"
        n = min(self._compute_n, len(self._compute_us))
        comp = self._compute_us[:n]
        self.diag.update("control", level, text, mode=self.mode, control_steps=self.control_steps,
                         backup_steps=self.backup_steps, hold_commands=self.hold_commands, fallbacks=self.fallbacks,
                         bad_states=self.bad_states, weights_version=self.weights_version,
                         compute_us_median=float(np.median(comp)) if n else 0.0,
                         compute_us_p99=float(np.percentile(comp, 99)) if n else 0.0)

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def summary(self) -> dict:
        n = min(self._compute_n, len(self._compute_us))
        comp = self._compute_us[:n]
        return {"node": "scpo_safety_node", "control_steps": self.control_steps, "backup_steps": self.backup_steps,
                "hold_commands": self.hold_commands, "fallbacks": self.fallbacks, "updates": self.updates,
                "malformed": self.malformed, "recertifications": self.recertifications,
                "worker_errors": self.worker_errors, "weights_version": self.weights_version,
                "superseded": self.worker.superseded if self.worker else 0,
                "compute_us": {"median": float(np.median(comp)) if n else None,
                               "p99": float(np.percentile(comp, 99)) if n else None}}

    def destroy_node(self):
        if self.configured:
            flush_publishers([self.cmd_pub, self.weights_pub, self.decision_pub, self.mode_pub])
        print("SUMMARY " + json.dumps(self.summary()), flush=True)
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
