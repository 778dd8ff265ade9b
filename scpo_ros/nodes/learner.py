"""``learner``: proposes weights for the residual policy. Knows nothing of safety.

Parameters in, messages in, one call, messages out; the learning itself lives in
``scpo_ros.learners`` (ROS-free), picked by the ``algorithm`` parameter:

- ``imitation``: collects ``(state, reference, expert action)`` triples from
  ``joint_states``, ``reference`` and ``expert_action`` (each expert action is paired with
  the latest state and reference) and runs ``steps_per_proposal`` Adam steps per proposal.
- ``c_trpo``: trains C-TRPO on its own vectorised simulation of the plant (episodes start
  in the certified region) and runs ``epochs_per_proposal`` epochs per proposal. It proposes the Gaussian policy's
  mean network; exploration never touches the real plant, and demonstrations are unused.

Every ``1/publish_rate_hz`` s the update runs in a worker thread (a C-TRPO epoch takes
~0.1 s, longer than a callback should block the executor), and its result is published on
``proposed_weights`` (``std_msgs/Float64MultiArray``, ``layout.dim[0].label`` = the
``MLPLayout`` fingerprint; see ``scpo_ros.ros.messages.weights_to_msg``). A tick that finds the
previous update still running is skipped (``busy_ticks``).

With ``follow_certified`` (default) the learner continues from the weights the safety
node certified (``certified_weights``), loaded before the next update: each proposal is
projected and certified by SCPO, and learning goes on from what was committed. That is
bookkeeping, not safety: the learner never sees a constraint.

States are read by joint name (the plant file's ``joints:``); a malformed one is ignored.

Parameters: ``plant_file`` and the policy structure, from the tables of ``scpo_ros.params``
that the safety node composes too (the shared parameter file sets them once for both),
read-only here; then the learner's own.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

from .. import graph as g
from ..backup import LQRBackup
from ..ctrpo import DIVERGENCES, CTRPOConfig
from ..inputs import JointMap
from ..learners import CTRPOProposer, ImitationLearner
from ..params import PLANT_PARAMS, POLICY_PARAMS, SEED, ParamSpec, compose
from ..plant import Plant, load_plant
from ..policy import MLPLayout, check_weights
from ..ros.diagnostics import OK, WARN, Diagnostics
from ..ros.messages import array_from_float64, weights_from_msg, weights_to_msg
from ..ros.parameters import add_parameter_validator, declare_parameters
from ..ros.qos import CONTROL_QOS, LATCHED_QOS
from ..ros.runner import flush_publishers, run_node

_T = CTRPOConfig()


def build_imitation(p: dict, plant: Plant, layout: MLPLayout) -> ImitationLearner:
    return ImitationLearner(LQRBackup(plant), layout, lr=p["lr"], batch_size=p["batch_size"],
                            buffer_size=p["buffer_size"], seed=p["seed"])


def build_c_trpo(p: dict, plant: Plant, layout: MLPLayout) -> CTRPOProposer:
    config = CTRPOConfig(algorithm="c_trpo", cost_limit=p["cost_limit"], hidden=layout.hidden,
                         target_kl=p["target_kl"], beta=p["beta"], divergence=p["divergence"],
                         log_std_init=p["log_std_init"], critic_lr=p["lr"], critic_epochs=p["critic_epochs"],
                         critic_batch=p["batch_size"])
    return CTRPOProposer(plant, LQRBackup(plant), layout, config=config, num_envs=p["sim_envs"],
                         horizon=p["sim_horizon"], episode_length=p["sim_episode_length"], seed=p["seed"])


ALGORITHMS = {"imitation": build_imitation, "c_trpo": build_c_trpo}
"""``algorithm`` parameter value -> builder of the ROS-free learner (``scpo_ros.learners``)."""

LEARNER_PARAMS = (
    ParamSpec("algorithm", "imitation", "Learning algorithm: imitation (of the expert's demonstrations) or c_trpo "
              "(constrained RL in the learner's own simulation of the plant).", choices=tuple(ALGORITHMS),
              read_only=True),
    ParamSpec("lr", 1e-3, "Adam learning rate (imitation: the residual network; c_trpo: the critics).", 1e-7, 1.0),
    ParamSpec("batch_size", 256, "Minibatch size (imitation: demonstrations; c_trpo: critic regression).", 1, 65536),
    ParamSpec("buffer_size", 20000, "imitation: demonstrations kept (ring buffer).", 16, 10_000_000, read_only=True),
    ParamSpec("min_samples", 64, "imitation: demonstrations needed before the first proposal.", 1, 10_000_000),
    ParamSpec("steps_per_proposal", 1, "imitation: Adam steps between two proposals.", 1, 10000),
    ParamSpec("publish_rate_hz", 2.0, "Proposals per second (at most: a tick that finds the last update still "
              "running is skipped).", 0.01, 100.0),
    ParamSpec("follow_certified", True, "Continue from the deployed (certified) weights when they change."),
    # c_trpo: the training simulation
    ParamSpec("sim_envs", 16, "c_trpo: simulated plants stepped at once.", 1, 4096, read_only=True),
    ParamSpec("sim_horizon", 50, "c_trpo: steps of every simulated plant per epoch (one policy update).", 1, 10000,
              read_only=True),
    ParamSpec("sim_episode_length", 100, "c_trpo: steps per simulated episode (time limit).", 1, 100000,
              read_only=True),
    ParamSpec("epochs_per_proposal", 1, "c_trpo: epochs (rollout + update) between two proposals.", 1, 100),
    # c_trpo: the algorithm (scpo_ros.ctrpo.CTRPOConfig)
    ParamSpec("cost_limit", _T.cost_limit, "c_trpo: b, limit on the expected unsafe steps per simulated episode.",
              1e-6, 1e6, read_only=True),
    ParamSpec("target_kl", _T.target_kl, "c_trpo: bound on the constrained divergence per update.", 1e-6, 10.0,
              read_only=True),
    ParamSpec("beta", _T.beta, "c_trpo: weight of the cost barrier term of the divergence.", 0.0, 1e6,
              read_only=True),
    ParamSpec("divergence", _T.divergence, "c_trpo: form of the barrier term (entropy: x log x, barrier: -log x).",
              choices=DIVERGENCES, read_only=True),
    ParamSpec("log_std_init", _T.log_std_init, "c_trpo: initial log standard deviation of the exploration noise "
              "(in the simulation only).", -10.0, 2.0, read_only=True),
    ParamSpec("critic_epochs", _T.critic_epochs, "c_trpo: passes over each epoch's data by the critics.", 0, 1000,
              read_only=True),
)
PARAMS = compose(PLANT_PARAMS[:1], POLICY_PARAMS, LEARNER_PARAMS,
                 seed=dataclasses.replace(SEED, read_only=True, description="Seed of the initial weights, the "
                                                                            "minibatches and the c_trpo simulation."))


class LearnerNode(Node):
    def __init__(self, **kwargs):
        super().__init__(g.LEARNER, **kwargs)
        self.p = declare_parameters(self, PARAMS)
        torch.set_num_threads(1)
        self.plant = plant = load_plant(self.p["plant_file"])
        self.joints = JointMap(plant.joints)
        # the safety node's layout (safety_model.build_model): input [x, r], output the inputs
        self.layout = MLPLayout(plant.n + plant.nr, plant.m, tuple(self.p["hidden"]))
        self.algo = ALGORITHMS[self.p["algorithm"]](self.p, plant, self.layout)
        self.x = np.zeros(plant.n)
        self.have_state = False
        self.r = np.zeros(plant.nr)
        self.proposals = 0
        self.loaded_certified = 0
        self.busy_ticks = 0
        self.update_errors = 0
        self.last_stats: dict = {}
        # observe() (executor thread) and update() (worker thread) share the learner's buffers
        self._algo_lock = threading.Lock()
        self._certified_lock = threading.Lock()
        self._certified: np.ndarray | None = None     # newest certified weights not yet loaded
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner_update")
        self._job: Future | None = None
        self.pub = self.create_publisher(Float64MultiArray, g.PROPOSED_WEIGHTS, CONTROL_QOS)
        # every algorithm listens to joint_states: the demo and the launch file start the simulator once
        # all of the graph's state subscribers are matched
        self.create_subscription(JointState, g.JOINT_STATES, self._on_state, CONTROL_QOS)
        if self.algo.needs_demonstrations:
            self.create_subscription(Float64MultiArray, g.REFERENCE, self._on_reference, CONTROL_QOS)
            self.create_subscription(Float64MultiArray, g.EXPERT_ACTION, self._on_expert, CONTROL_QOS)
        self.create_subscription(Float64MultiArray, g.CERTIFIED_WEIGHTS, self._on_certified, LATCHED_QOS)
        self.diag = Diagnostics(self)
        add_parameter_validator(self, PARAMS, apply=self._apply)
        self.timer = self.create_timer(1.0 / self.p["publish_rate_hz"], self._propose)
        self._update_diagnostics()
        extra = ""
        if self.p["algorithm"] == "c_trpo":
            extra = (f"; C-TRPO on {self.p['sim_envs']} simulated plants, {self.p['sim_horizon']} steps per epoch, "
                     f"{self.p['epochs_per_proposal']} epoch(s) per proposal, cost limit {self.p['cost_limit']:g}")
        self.get_logger().info(f"learner ({self.p['algorithm']}): layout {self.layout.sizes}, "
                               f"fingerprint {self.layout.fingerprint}, {self.p['publish_rate_hz']:g} proposals/s"
                               + extra)

    def _apply(self, values, changed) -> None:
        self.p = values
        if "lr" in changed:
            self.algo.set_lr(values["lr"])
        if "batch_size" in changed:
            self.algo.batch_size = values["batch_size"]
        if "follow_certified" in changed and not values["follow_certified"]:
            with self._certified_lock:
                self._certified = None
        if "publish_rate_hz" in changed:
            self.destroy_timer(self.timer)
            self.timer = self.create_timer(1.0 / values["publish_rate_hz"], self._propose)
        self.get_logger().info(f"parameters changed: {sorted(changed)}")

    # ------------------------------------------------------------------ messages in
    def _on_state(self, msg: JointState) -> None:
        self.have_state = self.joints.read_msg(msg, self.x) is None

    def _on_reference(self, msg: Float64MultiArray) -> None:
        r = array_from_float64(msg)
        if r.size == self.plant.nr and np.isfinite(r).all():
            self.r[:] = r

    def _on_expert(self, msg: Float64MultiArray) -> None:
        u = array_from_float64(msg)
        if not self.have_state or u.size != self.plant.m or not np.isfinite(u).all():
            return
        with self._algo_lock:
            self.algo.observe(self.x, self.r, u)

    def _on_certified(self, msg: Float64MultiArray) -> None:
        if not self.p["follow_certified"]:
            return
        flat, fingerprint = weights_from_msg(msg)
        try:
            flat = check_weights(self.layout, flat, fingerprint)
        except ValueError as exc:
            self.get_logger().warning(f"ignored certified weights: {exc}", throttle_duration_sec=5.0)
            return
        with self._certified_lock:        # loaded by the worker before its next update
            self._certified = flat

    # ------------------------------------------------------------------ one update, messages out
    def _propose(self) -> None:
        if self._job is not None:
            if not self._job.done():
                self.busy_ticks += 1
                return
            self._collect(self._job)
            self._job = None
        if not self.algo.ready(self.p["min_samples"]):
            self._update_diagnostics()
            return
        steps = self.p["epochs_per_proposal"] if self.p["algorithm"] == "c_trpo" else self.p["steps_per_proposal"]
        self._job = self._pool.submit(self._update_and_publish, int(steps))

    def _update_and_publish(self, steps: int) -> dict:
        """Worker thread: re-base on certified weights, train, publish the proposal."""
        with self._certified_lock:
            certified, self._certified = self._certified, None
        with self._algo_lock:
            if certified is not None:
                self.algo.load(certified)
                self.loaded_certified += 1
            stats = self.algo.update(steps)
            flat = self.algo.weights()
        if not np.all(np.isfinite(flat)):
            # the safety node would refuse it anyway; say so here where the cause is
            raise FloatingPointError(f"{int(np.count_nonzero(~np.isfinite(flat)))} non-finite weights after the "
                                     "update: not proposed")
        self.pub.publish(weights_to_msg(flat, self.layout.fingerprint))
        self.proposals += 1
        return stats

    def _collect(self, job: Future) -> None:
        exc = job.exception()
        if exc is not None:
            self.update_errors += 1
            self.get_logger().error(f"learner update failed ({type(exc).__name__}: {exc}); last proposal stands",
                                    throttle_duration_sec=5.0)
            self.diag.update("learning", WARN, f"update failed: {exc}", update_errors=self.update_errors,
                             proposals=self.proposals, algorithm=self.p["algorithm"])
            return
        self.last_stats = job.result()
        if self.proposals % 10 == 1:
            self._update_diagnostics()

    def _update_diagnostics(self) -> None:
        ready = self.algo.ready(self.p["min_samples"])
        self.diag.update("learning", OK if ready else WARN,
                         "proposing" if ready else f"collecting demonstrations ({self.algo.count})",
                         **{**self.last_stats, "proposals": self.proposals, "samples": self.algo.count,
                            "loaded_certified": self.loaded_certified, "busy_ticks": self.busy_ticks,
                            "update_errors": self.update_errors, "algorithm": self.p["algorithm"]})

    def summary(self) -> dict:
        return {"node": g.LEARNER, "algorithm": self.p["algorithm"], "proposals": self.proposals,
                "samples": self.algo.count, "loss": self.last_stats.get("loss", float("nan")),
                "loaded_certified": self.loaded_certified, "busy_ticks": self.busy_ticks,
                "update_errors": self.update_errors, "last_update": self.last_stats}

    def shutdown_hold(self, spin_once) -> None:
        """After SIGINT/SIGTERM: let a running update finish (and publish), so that the
        SUMMARY line counts it."""
        self._finish_update()

    def _finish_update(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._job is not None and self._job.done() and not self._job.cancelled():
            self._collect(self._job)
            self._job = None

    def destroy_node(self):
        self._finish_update()   # before the publisher goes
        flush_publishers([self.pub])
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(LearnerNode, args)


if __name__ == "__main__":
    sys.exit(main())
