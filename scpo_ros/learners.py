"""The learning algorithms behind the ``learner`` node, free of ROS.

Each one turns what the node hands it into proposed weights of the residual network
``φ_θ`` (flat, ``MLPLayout`` order). The node (``scpo_ros.nodes.learner``) only moves data
in and out; it calls:

- ``needs_demonstrations``: whether ``observe`` uses the expert's demonstrations (the node
  subscribes to ``reference`` and ``expert_action`` only then);
- ``observe(x, r, u_expert)``: one demonstration;
- ``ready(min_samples) -> bool``: whether ``update`` can run;
- ``update(steps) -> dict``: a bounded amount of training, returns statistics (numbers);
  it may take longer than a callback should, so the node runs it off the executor thread;
- ``weights() -> np.ndarray``: the current proposal (float64);
- ``load(flat)``: continue from given weights (the ones the safety node certified);
- ``set_lr(lr)``, ``batch_size``: the two runtime-tunable settings;
- ``count``: samples so far (demonstrations, or simulated environment steps).

None of them knows about safety: the SCPO safety node decides what is deployed.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from .backup import LQRBackup
from .ctrpo import Collector, CTRPOConfig, CTRPOLearner
from .envs import VecPlantEnv
from .plant import Plant, Region
from .policy import MLPLayout, ResidualMLP, policy_inputs


def residual_targets(backup: LQRBackup, x: np.ndarray, r: np.ndarray,
                     u_expert: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residual imitation data (float32): inputs ``[x, r]`` of ``φ_θ`` and targets
    ``u_expert - backup(x, r)``, for one demonstration or a batch."""
    return (np.asarray(policy_inputs(x, r), dtype=np.float32),
            np.asarray(u_expert - backup(x, r), dtype=np.float32))


class ImitationLearner:
    """Residual imitation: fit ``φ_θ([x, r])`` to ``u_expert - backup(x, r)`` with Adam.

    A ring buffer of the last ``buffer_size`` triples; each update draws minibatches of
    ``batch_size`` from it. ``fit`` is the Adam step alone, for callers with their own data
    (the imitation experiment draws fresh demonstrations for every step).
    """

    needs_demonstrations = True

    def __init__(self, backup: LQRBackup, layout: MLPLayout, lr: float = 1e-3, batch_size: int = 256,
                 buffer_size: int = 20000, seed: int = 0):
        self.backup, self.layout = backup, layout
        self.inputs = np.zeros((buffer_size, layout.in_dim), dtype=np.float32)     # [x, r]: n + nr
        self.targets = np.zeros((buffer_size, layout.out_dim), dtype=np.float32)   # residual inputs: m
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
        self.inputs[i], self.targets[i] = residual_targets(self.backup, x, r, u_expert)
        self.count += 1

    def ready(self, min_samples: int) -> bool:
        return self.count >= min_samples

    def update(self, steps: int) -> dict:
        n = min(self.count, len(self.inputs))
        loss = float("nan")
        for _ in range(steps):
            idx = self.rng.integers(0, n, size=min(self.batch_size, n))
            loss = self.fit(self.inputs[idx], self.targets[idx])
        return {"loss": loss, "samples": n}

    def fit(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """One Adam step on a batch of ``residual_targets``; returns the batch's loss before the step."""
        self.opt.zero_grad()
        err = ((self.model(torch.as_tensor(inputs)) - torch.as_tensor(targets)) ** 2).sum(-1).mean()
        err.backward()
        self.opt.step()
        return float(err.detach())

    def weights(self) -> np.ndarray:
        return self.model.flat().detach().numpy().astype(np.float64)

    def load(self, flat: np.ndarray) -> None:
        self.model.load_flat(flat)


class CTRPOProposer:
    """C-TRPO trained on its own vectorised simulation of the plant; proposes the mean network.

    The policy is the Gaussian of ``scpo_ros.ctrpo`` whose mean is ``backup(x, r) + φ_θ([x, r])``
    (the LQR backup as ``base_gain``, its constant part the env's ``action_offset``), so
    ``weights()`` (the mean's ``φ_θ``) is exactly the residual the SCPO safety node checks, and
    a fresh proposer proposes the backup itself. Exploration happens only in ``num_envs``
    simulated copies of ``plant`` (``envs.VecPlantEnv``: ``plant.step``, episodes starting in
    ``region``, default ``plant.region``); the real plant never runs a sampled action.

    ``update(steps)`` runs ``steps`` C-TRPO epochs, each ``horizon`` steps of every
    simulated env followed by one policy and critic update (``Collector``). Every call ends
    on an epoch boundary, so ``load`` between two calls (re-basing on certified weights)
    leaves no off-policy data behind: the next epoch's rollouts run the loaded mean.
    """

    needs_demonstrations = False

    def __init__(self, plant: Plant, backup: LQRBackup | None, layout: MLPLayout, region: Region | None = None,
                 config: CTRPOConfig = CTRPOConfig(hidden=(32, 32)), num_envs: int = 16, horizon: int = 50,
                 episode_length: int = 100, action_weight: float = 0.1, seed: int = 0):
        if layout.in_dim != plant.n + plant.nr or layout.out_dim != plant.m:
            raise ValueError(f"layout {layout.sizes} does not fit the plant {plant.name} (inputs [x, r]: "
                             f"{plant.n + plant.nr}, outputs {plant.m})")
        if tuple(config.hidden) != tuple(layout.hidden):
            raise ValueError(f"C-TRPO hidden sizes {config.hidden} differ from the layout's {layout.hidden}")
        region = plant.region if region is None else region
        _check_training_region(plant, region)
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.layout, self.plant = layout, plant
        self.env = VecPlantEnv(plant, num_envs, backup, episode_length=episode_length,
                               action_weight=action_weight, seed=seed, region=region)
        self.learner = CTRPOLearner(self.env.obs_dim, self.env.act_dim, config,
                                    base_gain=self.env.backup_gain(), seed=seed)
        if self.learner.layout.fingerprint != layout.fingerprint:
            raise ValueError(f"C-TRPO mean network {self.learner.layout.sizes} is not the layout {layout.sizes}")
        self.horizon = int(horizon)
        self.collector = Collector(self.learner, self.horizon, self.env.num_envs)
        self.obs = self.env.reset()
        self.count = 0
        """Simulated environment steps (all envs)."""
        self.epochs = 0
        self.last_episodes = (math.nan, math.nan)
        """Mean return and cost of the episodes of the latest epoch that finished any."""

    # -- the node's interface ---------------------------------------------------------

    def observe(self, x: np.ndarray, r: np.ndarray, u_expert: np.ndarray) -> None:
        """Demonstrations are not used: C-TRPO learns from its own simulation."""

    def ready(self, min_samples: int) -> bool:
        return True     # needs no outside data: the first update can run at once

    def update(self, steps: int) -> dict:
        episodes = 0
        info: dict = {}
        for _ in range(steps):
            self.obs, info, ep_rets, ep_costs = self.collector.run_epoch(self.env, self.obs)
            if ep_costs:
                self.last_episodes = (float(np.mean(ep_rets)), float(np.mean(ep_costs)))
            episodes += len(ep_costs)
            self.count += self.horizon * self.env.num_envs
            self.epochs += 1
        return {"epochs": self.epochs, "env_steps": self.count, "episodes": episodes,
                "ep_return": self.last_episodes[0], "ep_cost": self.last_episodes[1],
                "cost_estimate": float(info.get("ep_cost_estimate", math.nan)),
                "recovering": bool(info.get("recovering", False)),
                "accepted_at": int(info.get("accepted_at", 0)),
                "kl": float(info.get("kl", 0.0))}

    def weights(self) -> np.ndarray:
        return self.learner.mean_weights()

    def load(self, flat: np.ndarray) -> None:
        self.learner.load_mean_weights(flat)

    def set_lr(self, lr: float) -> None:
        """The critics' Adam rate (the policy moves by natural-gradient steps, not by a rate)."""
        for group in self.learner.critic_opt.param_groups:
            group["lr"] = lr

    @property
    def batch_size(self) -> int:
        """Minibatch of the critic regression."""
        return self.learner.config.critic_batch

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        # the config is frozen; the learner reads it afresh at every update
        self.learner.config = replace(self.learner.config, critic_batch=int(value))


def _check_training_region(plant: Plant, region: Region) -> None:
    """Refuse a training region whose states are not strictly inside the state constraints, or
    whose references' equilibria break them: every episode would carry cost from its first step."""
    lo, hi = np.asarray(region.x_min, float), np.asarray(region.x_max, float)
    r_lo, r_hi = np.asarray(region.r_min, float), np.asarray(region.r_max, float)
    if lo.shape != (plant.n,) or r_lo.shape != (plant.nr,) or np.any(lo > hi) or np.any(r_lo > r_hi):
        raise ValueError(f"training region {region} does not fit the plant {plant.name} "
                         f"({plant.n} states, {plant.nr} references)")
    F, f, names = plant.state_rows()
    # the largest F_i x over the box: centre term + |F_i| · half-widths (support function of a box)
    worst = F @ (0.5 * (lo + hi)) + np.abs(F) @ (0.5 * (hi - lo))
    Mx, mx, _, _ = plant.equilibrium_map()
    ss = F @ (Mx @ (0.5 * (r_lo + r_hi)) + mx) + np.abs(F @ Mx) @ (0.5 * (r_hi - r_lo))
    bad = [n for n, w, s_, lim in zip(names, worst, ss, f) if not (w < lim and s_ <= lim + 1e-12)]
    if bad:
        raise ValueError(f"training region {region} must lie inside the constraint box of {plant.name} "
                         f"(broken: {', '.join(bad)})")
