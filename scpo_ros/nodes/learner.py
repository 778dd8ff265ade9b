"""``learner``: learns the residual policy from demonstrations and proposes weights. Knows nothing of safety.

Collects ``(state, reference, expert action)`` triples from ``joint_states``, ``reference``
and ``expert_action`` (each expert action is paired with the latest state and reference),
runs ``steps_per_proposal`` optimiser steps every ``1/publish_rate_hz`` s and publishes
the flat weights on ``proposed_weights`` (``std_msgs/Float64MultiArray``,
``layout.dim[0].label`` = the ``MLPLayout`` fingerprint; see ``ros_common.weights_to_msg``).

With ``follow_certified`` (default) the learner continues from the weights the safety
node actually deploys (``certified_weights``) instead of drifting on its own: the same
loop as the ROS-free imitation experiment. That is bookkeeping, not safety: the learner
never sees a constraint.

Learning algorithms are plain classes (ROS-free) registered in ``ALGORITHMS`` and picked
by the ``algorithm`` parameter; one needs ``observe``, ``ready``, ``update``, ``weights``,
``load``.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

from ..backup import LQRBackup
from ..dynamics import DoubleIntegrator
from ..policy import MLPLayout, ResidualMLP, check_weights, policy_inputs
from ..ros_common import (CONTROL_QOS, LATCHED_QOS, OK, WARN, Diagnostics, ParamSpec, add_parameter_validator,
                          array_from_float64, declare_parameters, flush_publishers, run_node, state_from_joint_state,
                          weights_from_msg, weights_to_msg)


class ImitationLearner:
    """Residual imitation: fit ``φ_θ([x, r])`` to ``u_expert - backup(x, r)`` with Adam.

    A ring buffer of the last ``buffer_size`` triples; each update draws minibatches of
    ``batch_size`` from it. ROS-free.
    """

    def __init__(self, backup: LQRBackup, layout: MLPLayout, lr: float = 1e-3, batch_size: int = 256,
                 buffer_size: int = 20000, seed: int = 0):
        self.backup, self.layout = backup, layout
        dof = layout.out_dim
        self.inputs = np.zeros((buffer_size, layout.in_dim), dtype=np.float32)
        self.targets = np.zeros((buffer_size, dof), dtype=np.float32)
        self.count = 0
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.model = ResidualMLP(layout, seed=seed)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def observe(self, x: np.ndarray, r: np.ndarray, u_expert: np.ndarray) -> None:
        i = self.count % len(self.inputs)
        self.inputs[i] = policy_inputs(x, r)
        self.targets[i] = u_expert - self.backup(x, r)
        self.count += 1

    def ready(self, min_samples: int) -> bool:
        return self.count >= min_samples

    def update(self, steps: int) -> dict:
        n = min(self.count, len(self.inputs))
        loss = float("nan")
        for _ in range(steps):
            idx = self.rng.integers(0, n, size=min(self.batch_size, n))
            inp = torch.from_numpy(self.inputs[idx])
            tgt = torch.from_numpy(self.targets[idx])
            self.opt.zero_grad()
            err = ((self.model(inp) - tgt) ** 2).sum(-1).mean()
            err.backward()
            self.opt.step()
            loss = float(err.detach())
        return {"loss": loss, "samples": n}

    def weights(self) -> np.ndarray:
        return self.model.flat().detach().numpy().astype(np.float64)

    def load(self, flat: np.ndarray) -> None:
        self.model.load_flat(flat)


ALGORITHMS = {"imitation": ImitationLearner}
"""``algorithm`` parameter value -> learner class."""

PARAMS = [
    ParamSpec("dof", 1, "Number of axes.", 1, 8, read_only=True),
    ParamSpec("hidden", [32, 32], "Hidden layer sizes of the residual MLP (must match the safety node).", 1, 1024,
              read_only=True, min_len=1, max_len=8),
    ParamSpec("dt", 0.05, "Model time step (s) of the backup LQR (must match the safety node).", 1e-4, 1.0,
              read_only=True),
    ParamSpec("q_pos", 1.0, "Backup LQR position weight (must match the safety node).", 0.0, 1e6, read_only=True),
    ParamSpec("q_vel", 1.0, "Backup LQR velocity weight (must match the safety node).", 0.0, 1e6, read_only=True),
    ParamSpec("r_act", 10.0, "Backup LQR action weight (must match the safety node).", 1e-6, 1e6, read_only=True),
    ParamSpec("algorithm", "imitation", "Learning algorithm.", choices=tuple(ALGORITHMS), read_only=True),
    ParamSpec("lr", 1e-3, "Adam learning rate.", 1e-7, 1.0),
    ParamSpec("batch_size", 256, "Minibatch size.", 1, 65536),
    ParamSpec("buffer_size", 20000, "Demonstrations kept (ring buffer).", 16, 10_000_000, read_only=True),
    ParamSpec("min_samples", 64, "Demonstrations needed before the first proposal.", 1, 10_000_000),
    ParamSpec("steps_per_proposal", 1, "Optimiser steps between two proposals.", 1, 10000),
    ParamSpec("publish_rate_hz", 2.0, "Proposals per second.", 0.01, 100.0),
    ParamSpec("follow_certified", True, "Continue from the deployed (certified) weights when they change."),
    ParamSpec("seed", 0, "Seed of the initial weights and the minibatches.", 0, 2**31 - 1, read_only=True),
]


class LearnerNode(Node):
    def __init__(self, **kwargs):
        super().__init__("learner", **kwargs)
        self.p = declare_parameters(self, PARAMS)
        torch.set_num_threads(1)
        self.dof = int(self.p["dof"])
        system = DoubleIntegrator(dof=self.dof, dt=self.p["dt"])
        backup = LQRBackup(system, q_pos=self.p["q_pos"], q_vel=self.p["q_vel"], r_act=self.p["r_act"])
        self.layout = MLPLayout(3 * self.dof, self.dof, tuple(self.p["hidden"]))
        self.algo = ALGORITHMS[self.p["algorithm"]](backup, self.layout, lr=self.p["lr"],
                                                    batch_size=self.p["batch_size"],
                                                    buffer_size=self.p["buffer_size"], seed=self.p["seed"])
        self.x = np.zeros(2 * self.dof)
        self.have_state = False
        self.r = np.zeros(self.dof)
        self.proposals = 0
        self.loaded_certified = 0
        self.last_loss = float("nan")
        self.pub = self.create_publisher(Float64MultiArray, "proposed_weights", CONTROL_QOS)
        self.create_subscription(JointState, "joint_states", self._on_state, CONTROL_QOS)
        self.create_subscription(Float64MultiArray, "reference", self._on_reference, CONTROL_QOS)
        self.create_subscription(Float64MultiArray, "expert_action", self._on_expert, CONTROL_QOS)
        self.create_subscription(Float64MultiArray, "certified_weights", self._on_certified, LATCHED_QOS)
        self.diag = Diagnostics(self, hardware_id="learner")
        add_parameter_validator(self, PARAMS, apply=self._apply)
        self.timer = self.create_timer(1.0 / self.p["publish_rate_hz"], self._propose)
        self._update_diagnostics()
        self.get_logger().info(f"learner ({self.p['algorithm']}): layout {self.layout.sizes}, "
                               f"fingerprint {self.layout.fingerprint}, {self.p['publish_rate_hz']:g} proposals/s")

    def _apply(self, values, changed) -> None:
        self.p = values
        if "lr" in changed:
            self.algo.set_lr(values["lr"])
        if "batch_size" in changed:
            self.algo.batch_size = values["batch_size"]
        if "publish_rate_hz" in changed:
            self.destroy_timer(self.timer)
            self.timer = self.create_timer(1.0 / values["publish_rate_hz"], self._propose)
        self.get_logger().info(f"parameters changed: {sorted(changed)}")

    def _on_state(self, msg: JointState) -> None:
        self.have_state = state_from_joint_state(msg, self.dof, out=self.x) is not None

    def _on_reference(self, msg: Float64MultiArray) -> None:
        r = array_from_float64(msg)
        if r.size == self.dof and np.isfinite(r).all():
            self.r[:] = r

    def _on_expert(self, msg: Float64MultiArray) -> None:
        u = array_from_float64(msg)
        if not self.have_state or u.size != self.dof or not np.isfinite(u).all():
            return
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
        self.algo.load(flat)
        self.loaded_certified += 1

    def _propose(self) -> None:
        if not self.algo.ready(self.p["min_samples"]):
            return
        stats = self.algo.update(self.p["steps_per_proposal"])
        self.last_loss = stats.get("loss", float("nan"))
        self.pub.publish(weights_to_msg(self.algo.weights(), self.layout.fingerprint))
        self.proposals += 1
        if self.proposals % 10 == 1:
            self._update_diagnostics()

    def _update_diagnostics(self) -> None:
        ready = self.algo.ready(self.p["min_samples"])
        self.diag.update("learning", OK if ready else WARN,
                         "proposing" if ready else f"collecting demonstrations ({self.algo.count})",
                         proposals=self.proposals, samples=self.algo.count, loss=self.last_loss,
                         loaded_certified=self.loaded_certified, algorithm=self.p["algorithm"])

    def destroy_node(self):
        flush_publishers([self.pub])
        print("SUMMARY " + json.dumps({"node": "learner", "proposals": self.proposals, "samples": self.algo.count,
                                       "loss": self.last_loss}), flush=True)
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(LearnerNode, args)


if __name__ == "__main__":
    sys.exit(main())
