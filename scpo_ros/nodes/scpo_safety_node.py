"""``scpo_safety_node``: the certified controller of the double integrator (a lifecycle node).

Control path (every ``joint_states`` message, executor thread, no lock, no waiting):
the state is read by joint *name* (``joint_names``) and accepted only with a fresh,
increasing stamp (``scpo_ros.inputs``); the candidate command is
``u = backup(x, r) + φ_θ([x, r])`` with ``θ`` the last *certified* weights (a preallocated
numpy MLP); then the **command envelope** (``scpo_ros.envelope``) projects it onto
``U_safe(x)`` of the safe set both nodes share, and the result goes out on ``cmd``. Every
command passes the envelope: the policy's (counted as ``policy_interventions`` and an
ERROR diagnostic if it ever had to change one: the certificate covers the safe-set
metric, so it should not), and the envelope's fallback, which is the backup projected
onto ``U_safe(x)`` (the recovery action where that set is empty). The fallback acts
- outside the certified region of ``[x, r]`` (mode ``backup_region``),
- while re-certifying after a model change (``backup_recertifying``),
- on stale state (``hold_stale``: the fallback for the state predicted under it),
- while inactive, unconfigured or shutting down (``inactive_behavior: fallback``, default).
Leaving the policy is immediate; returning to it takes ``policy_return_steps`` qualifying
states in a row (hysteresis: the console and ``safety_mode`` stay readable at a boundary).

References are clamped into the certified reference box (``|r| <= r_max``; a NaN/Inf or
mis-sized reference keeps the last valid one), counted, with a WARN diagnostic.

SCPO path (a worker *process*, off the control path): ``proposed_weights`` arrive through
``ProposalIntake`` (a raw subscription in its own thread: a size check before anything is
deserialised, a one-slot mailbox, newest wins). The results timer takes the newest one,
checks it (layout fingerprint, NaN/Inf; a malformed one is rejected, counted, and reported
in one aggregated decision record per second) and the worker runs one
``DoubleIntegratorSCPO.propose_weights`` step. Results come back through a pipe that the
timer polls: the decision goes out on ``scpo_decision`` (JSON), committed weights on
``certified_weights`` and the control law is swapped in one attribute assignment.

Clocks. Stamps are compared with the node's ROS clock (``use_sim_time`` works: then
``/clock``, e.g. ``double_integrator_sim`` with ``publish_clock``); the watchdog, the
results poll and the diagnostics run on the steady clock, so they never stop, with or
without ``/clock``. Until a ``/clock`` arrives only the stamp ordering is checked and the
``inputs`` diagnostic says so (WARN).

Parameters: everything is declared with a range (see ``PARAMS``). A change of the model
(limits, backup, certified region, SCPO or safety settings) is validated first (the new
backup must certify the new region, else the change is rejected with the reason); once
accepted the envelope is rebuilt and the fallback alone acts (``backup_recertifying``)
until the worker has re-certified the current weights under the new model (or reverted to
the backup's). Weights certified for other limits are never used.

Every ``cmd`` carries its source in ``layout.dim[0].label``: ``policy``, ``backup`` (the
envelope's fallback) or ``hold`` (stale state); forward command controllers ignore it.
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
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension, MultiArrayLayout, String

from ..backup import BackupCertificationError, InitialSet, LQRBackup
from ..dynamics import DoubleIntegrator
from ..envelope import CommandEnvelope
from ..inputs import JointMap, ReferenceGate, StateGate
from ..policy import MLPLayout, WeightsRejected, check_weights
from ..proposal_intake import ProposalIntake
from ..ros_common import (CONTROL_QOS, ERROR, EVENT_QOS, LATCHED_QOS, OK, STATE_QOS_CHOICES, WARN, Diagnostics,
                          ParamSpec, add_parameter_validator, array_from_float64, declare_parameters,
                          flush_publishers, ros_now, run_node, state_qos, steady_timer, weights_to_msg)
from ..rollout import METRICS, DoubleIntegratorRollout, SafetySpec, structured_states
from ..safeguard.invariant_set import safe_set_for
from ..scpo import STATUSES, Decision, DoubleIntegratorSCPO, SCPOConfig, backup_weights

_C, _S, _I = SCPOConfig(), SafetySpec(), InitialSet()
PARAMS = [
    # structure: fixed once the node runs
    ParamSpec("dof", 1, "Number of axes.", 1, 4, read_only=True),
    ParamSpec("hidden", [32, 32], "Hidden layer sizes of the residual MLP.", 1, 1024, read_only=True,
              min_len=1, max_len=8),
    ParamSpec("seed", 0, "Seed of SCPO's sampling and of the backup weights.", 0, 2**31 - 1, read_only=True),
    ParamSpec("autostart", True, "Configure and activate at start-up (no lifecycle manager needed).",
              read_only=True),
    ParamSpec("joint_names", [""], "JointState joints of the axes, in axis order (matched by name; extra joints "
                                   "are ignored, a missing one rejects the message). [''] or []: axis_0..",
              read_only=True, min_len=0, max_len=4),
    ParamSpec("state_qos", "reliable", "QoS of the joint_states subscription.", choices=STATE_QOS_CHOICES,
              read_only=True),
    ParamSpec("late_commands", 1, "Late or missed commands in a row the safe set absorbs (1: a command stays "
                                  "safe when the plant applies it one period longer).", 0, 1, read_only=True),
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
    ParamSpec("p0_max", _I.p0_max, "Certified region: |p| <= p0_max.", 1e-3, 1e3),
    ParamSpec("v0_max", _I.v0_max, "Certified region: |v| <= v0_max.", 1e-3, 1e3),
    ParamSpec("r_max", _I.r_max, "Certified references: |r| <= r_max (references beyond are clamped).", 0.0, 1e3),
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
    ParamSpec("state_timeout", 0.25, "Seconds without an accepted state before the hold command.", 0.005, 10.0),
    ParamSpec("max_state_age", 0.5, "A state stamped more than this before now is rejected (s; 0: no age check, "
                                    "for publishers on an unsynchronised clock).", 0.0, 3600.0),
    ParamSpec("future_tolerance", 0.05, "A state stamped more than this after now is rejected (s).", 0.0, 3600.0),
    ParamSpec("hold_mode", "backup_predicted", "Candidate on stale state: the backup on the model-predicted state, "
                                               "or zero (either through the envelope).",
              choices=("backup_predicted", "zero")),
    ParamSpec("inactive_behavior", "fallback", "While inactive, unconfigured and shutting down: answer every "
                                               "state with the envelope's fallback, or publish nothing.",
              choices=("fallback", "silent")),
    ParamSpec("shutdown_timeout", 2.0, "At shutdown keep sending the fallback until the plant is at rest, no state "
                                       "comes for state_timeout, or this passes (s).", 0.0, 60.0),
    ParamSpec("policy_return_steps", 5, "Qualifying states in a row before a fallback returns to the policy "
                                        "(leaving the policy is immediate).", 1, 1000),
    ParamSpec("min_update_period_s", 0.0, "Least time between two SCPO steps (0: as fast as they run).",
              0.0, 3600.0),
    ParamSpec("require_fingerprint", True, "Reject proposals that carry no layout fingerprint."),
    ParamSpec("worker_niceness", 10, "Scheduling niceness of the SCPO worker process (0: same priority as "
                                     "the control path). Learning is background work: on a loaded CPU the "
                                     "control callback must win.", 0, 19, read_only=True),
]

STRUCTURE = {"dof", "hidden", "seed", "autostart", "worker_niceness", "joint_names", "state_qos", "late_commands"}
RUNTIME = {"state_timeout", "max_state_age", "future_tolerance", "hold_mode", "inactive_behavior",
           "shutdown_timeout", "policy_return_steps", "min_update_period_s", "require_fingerprint"}
MODEL = {s.name for s in PARAMS} - STRUCTURE - RUNTIME
"""Parameters the certificate depends on: a change re-certifies."""

FALLBACK_MODES = ("backup_region", "backup_recertifying", "hold_stale")
MODE_LEVELS = {"inactive": OK, "waiting_for_state": WARN, "waiting_for_certificate": WARN, "policy": OK,
               "backup_region": WARN, "returning": WARN, "backup_recertifying": WARN, "hold_stale": ERROR,
               "shutting_down": WARN}
REST_SPEED = 1e-2
"""|v| below this on every axis, for ``REST_STATES`` accepted states in a row: the plant is at rest
(the shutdown hold stops sending)."""
REST_STATES = 5


@dataclass(frozen=True)
class Model:
    """Everything the certificate depends on, built from parameter values (picklable: the
    worker process gets it; the safe set is rebuilt there from the same values, cached)."""

    system: DoubleIntegrator
    backup: LQRBackup
    initial_set: InitialSet
    layout: MLPLayout
    config: SCPOConfig
    safety: SafetySpec
    n_sample_states: int
    n_cert_states: int
    seed: int
    late_commands: int

    def safe_set(self):
        """The safe set of the envelope and of the certificate's ``safe_set`` metric."""
        return safe_set_for(self.system, late_commands=self.late_commands)


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
    model = Model(system, backup, initial_set, layout, config, safety, int(v["n_sample_states"]),
                  int(v["n_cert_states"]), int(v["seed"]), int(v["late_commands"]))
    check_backup_in_safe_set(model)
    return model


def check_backup_in_safe_set(model: Model) -> None:
    """Refuse a model whose backup leaves ``U_safe`` from the certified region.

    The backup's weights are what the node starts from and falls back to; they must pass the
    ``safe_set`` metric like any certified weights, or the envelope would have to correct
    the "certified" law from the start. Checked on the region's structured states (its
    vertices among them: the worst case of a linear closed loop sits there).
    """
    try:
        safe_set = model.safe_set()
    except (ValueError, RuntimeError) as exc:
        raise BackupCertificationError(f"no safe set for these limits: {exc}") from exc
    engine = DoubleIntegratorRollout(model.system, model.backup, model.layout, model.safety,
                                     safe_rows=safe_set.affine_rows())
    x0, r = structured_states(model.initial_set, model.system.dof, max_points=128)
    g = engine.evaluate(backup_weights(model.layout, model.seed), x0, r).g[0]
    worst = float(g[METRICS.index("safe_set")])
    if not worst < 0.0:
        raise BackupCertificationError(f"the backup leaves the safe set from the certified region "
                                       f"(safe_set metric {worst:.3g} > 0): shrink the region or change the limits")


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

    ``policy`` computes ``backup + φ`` (certified weights), None while only the backup is
    certified; ``certifying`` marks the interval after a model change during which only the
    envelope's fallback may act. ``lower``/``upper``: the certified region of ``[x, r]``.
    """

    policy: FoldedPolicy | None
    lower: tuple
    upper: tuple
    version: int
    certifying: bool = False


def make_law(model: Model, theta: np.ndarray | None, version: int, certifying: bool = False) -> ControlLaw:
    d = model.system.dof
    s = model.initial_set
    upper = tuple([s.p0_max] * d + [s.v0_max] * d + [s.r_max] * d)
    policy = FoldedPolicy(np.ascontiguousarray(model.backup.K), model.layout, theta) if theta is not None else None
    return ControlLaw(policy, tuple(-u for u in upper), upper, version, certifying)


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
                                            n_cert_states=model.n_cert_states, seed=model.seed,
                                            safe_set=model.safe_set())
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
    """Lifecycle: the ros2/demos pattern, except that the envelope, the ``joint_states`` and
    ``reference`` subscriptions, the ``cmd`` publisher (a plain one) and the watchdog live
    as long as the node: inactive means safe, not silent (``inactive_behavior``).
    ``configure`` starts SCPO (worker, intake, weights and decision publishers),
    ``activate`` lets the certified policy act, ``deactivate`` hands the plant to the
    fallback, ``cleanup`` stops SCPO."""

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
        if self.p["autostart"]:
            self._autostart_timer = steady_timer(self, 0.001, self._autostart)
        self.get_logger().info(f"SCPO safety node: dof={d}, layout {self.model.layout.sizes} "
                               f"({self.model.layout.fingerprint}), region {self.model.initial_set}, joints "
                               f"{self.joints.joints}, safe set {self.envelope.safe_set.name} "
                               f"({self.envelope.projector.num_rows} rows)")

    def _build_runtime(self, model: Model) -> None:
        """The envelope, the state gate and the reference gate of ``model`` (limits, region)."""
        self.envelope = CommandEnvelope(model.safe_set(), model.backup)
        self.gate = StateGate(self.p["max_state_age"], self.p["future_tolerance"]) if not hasattr(self, "gate") \
            else self.gate
        r = model.initial_set.r_max
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

    def _autostart(self) -> None:
        self.destroy_timer(self._autostart_timer)
        if self.configured:   # a short timer can fire again before its destruction takes effect
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
        self.active = False
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self) -> None:
        if not self.configured:
            return
        self.configured = False
        self.active = False
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
            stamp = msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec
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
        in_region = True
        for v, lo, hi in zip(vals, law.lower, law.upper):
            if not (lo <= v <= hi):
                in_region = False
                break
        qualifies = law.policy is not None and in_region and not law.certifying
        self._qualifying = self._qualifying + 1 if qualifies else 0
        # hysteresis delays only a *return* to the policy (not its first use after a start)
        use_policy = qualifies and (self.mode in ("policy", "waiting_for_state", "waiting_for_certificate")
                                    or self._qualifying >= self.p["policy_return_steps"])
        if use_policy:
            self._inp_buf[:-1] = array.array("d", vals)
            cand = law.policy(self._inp, self._policy_out)
            res = self.envelope.filter(x, cand, self._r)
            label = mode = "policy"
            if res.changed:
                self._policy_changed(res)
        else:
            res = self.envelope.fallback(x, self._r, "fallback")
            label = "backup"
            mode = ("backup_recertifying" if law.certifying else "backup_region" if not in_region else
                    "waiting_for_certificate" if law.policy is None else "returning")
        self._publish(label, res, t_start)
        self.control_steps += 1
        self.backup_steps += label == "backup"
        if mode != self.mode:
            self._set_mode(mode, {"backup_region": "state or reference outside the certified region",
                                  "returning": "back in the certified region",
                                  "policy": "the certified policy acts"}.get(mode, "state received"))
        stamp = msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec
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
                                      f"|r| <= r_max = {self.model.initial_set.r_max:g})", throttle_duration_sec=2.0)
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
        sysm, target = self.model.system, int((now - self._hold_since) / self.model.system.dt)
        while self._hold_steps < target:
            u = self.envelope.fallback(self._hold_x, self._r, "hold_stale").u
            self._hold_x = sysm.A @ self._hold_x + sysm.B @ u
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
                                 f"{self.model.initial_set.r_max:g}, {counts['bad_references']} malformed kept the "
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
