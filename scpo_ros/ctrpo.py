"""C-TRPO (arXiv 2411.02957), TRPO-Lagrangian and TRPO in one file, read top to bottom.

All three share the Gaussian policy, the reward and cost critics, GAE, the natural-gradient
step (conjugate gradient on the Hessian of a divergence) and the backtracking line search.
They differ only in the divergence, the loss and how the cost limit ``b`` enters:

- ``trpo``:     maximise the reward surrogate in a KL trust region; costs are ignored.
- ``trpo_lag``: maximise ``(A_r - λ A_c) / (1 + λ)`` in a KL region; ``λ`` follows the
  episode cost by gradient ascent (Adam), as in the usual TRPO-Lagrangian baselines.
- ``c_trpo``:   maximise the reward surrogate in the region ``D̄_C <= δ`` of the
  constrained divergence
      ``D̄_C = D̄_KL + β [φ(δ_b - A_c) - φ(δ_b) + φ'(δ_b) A_c]``,   ``δ_b = b - J_c(π_k)``,
  with ``φ(x) = x log x`` (``"entropy"``, default) or ``φ(x) = -log x`` (``"barrier"``), and
  ``D̄_C = +∞`` once the cost surrogate ``A_c >= δ_b``, so no step that is predicted to
  cross the cost limit can be accepted. The CG matrix is the Hessian of ``D̄_C`` at
  ``π_k``: the Fisher matrix plus ``β φ''(δ_b) ∇A_c ∇A_cᵀ`` (taken by double
  back-propagation of ``D̄_C``, like the official code). Recovery with hysteresis: once the
  episode cost reaches ``b`` the step minimises the cost surrogate in a plain KL region,
  until the cost falls below ``b_H = hysteresis · b``.

Units follow the official code: ``A_c = (1-γ)⁻¹ · mean((π/π_k - 1) Â_c)`` (centred cost
advantages), ``J_c`` is the mean undiscounted episode cost of the latest ``cost_window``
episodes, reward advantages are standardised, cost advantages only centred.

The policy mean is ``base_gain · obs + φ_θ(obs)`` with ``φ_θ`` the project's
``ResidualMLP`` (last layer zero at start): with the LQR backup as ``base_gain`` the
initial mean *is* the certified backup and the flat weights of ``φ_θ`` are exactly what
the SCPO safety node checks (``CTRPOLearner.mean_weights``). With ``base_gain = None``
the mean is a plain MLP.

A caller drives ``CTRPOLearner`` incrementally: ``learner.act(obs)`` → plant →
``Collector.record(...)`` per step → ``Collector.update(last_obs)`` when ``Collector.ready``
→ ``learner.mean_weights()`` to publish. ``Collector.run_epoch`` is one such epoch over a
vectorised env; ``train`` below and ``learners.CTRPOProposer`` both run their epochs with it.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .envs import StepResult
from .policy import MLPLayout, ResidualMLP

ALGORITHMS = ("c_trpo", "trpo_lag", "trpo")
DIVERGENCES = ("entropy", "barrier")


@dataclass(frozen=True)
class CTRPOConfig:
    algorithm: str = "c_trpo"
    """c_trpo | trpo_lag | trpo"""
    cost_limit: float = 2.0
    """b: limit on the expected undiscounted episode cost."""
    hidden: tuple[int, ...] = (64, 64)
    gamma: float = 0.99
    lam: float = 0.95
    """GAE λ (rewards and costs)."""
    target_kl: float = 0.01
    """δ: bound on the divergence (KL, or D̄_C for c_trpo) accepted by the line search."""
    cg_iters: int = 15
    cg_damping: float = 0.1
    line_search_steps: int = 15
    line_search_decay: float = 0.8
    beta: float = 1.0
    """β: weight of the cost barrier term in D̄_C."""
    divergence: str = "entropy"
    """φ of the barrier term: entropy (x log x) | barrier (-log x)."""
    hysteresis: float = 0.8
    """b_H / b: recovery ends once the episode cost falls below this fraction of b."""
    cost_window: int = 50
    """Episodes in the running episode-cost estimate J_c (the official code keeps 50)."""
    log_std_init: float = -0.5
    critic_lr: float = 1e-3
    critic_epochs: int = 10
    critic_batch: int = 256
    critic_l2: float = 1e-3
    max_grad_norm: float = 40.0
    lagrange_init: float = 0.0
    lagrange_lr: float = 0.035

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        checks = [
            (self.algorithm in ALGORITHMS, f"algorithm must be one of {ALGORITHMS}"),
            (self.divergence in DIVERGENCES, f"divergence must be one of {DIVERGENCES}"),
            (math.isfinite(self.cost_limit) and self.cost_limit > 0, "cost_limit must be > 0"),
            (0.0 < self.gamma < 1.0 and 0.0 <= self.lam <= 1.0, "need 0 < gamma < 1 and 0 <= lam <= 1"),
            (self.target_kl > 0 and self.cg_iters >= 1 and self.cg_damping >= 0, "bad trust-region settings"),
            (self.line_search_steps >= 1 and 0.0 < self.line_search_decay < 1.0, "bad line-search settings"),
            (self.beta >= 0, "beta must be >= 0"),
            (0.0 < self.hysteresis <= 1.0, "hysteresis must lie in (0, 1]"),
            (self.cost_window >= 1, "cost_window must be >= 1"),
            (self.critic_epochs >= 0 and self.critic_batch >= 1, "bad critic settings"),
            (self.lagrange_init >= 0 and self.lagrange_lr > 0, "bad Lagrange settings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------

class GaussianPolicy(nn.Module):
    """``N(base_gain·obs + φ_θ(obs), diag(exp(log_std))²)``; ``φ_θ`` a ``ResidualMLP``."""

    def __init__(self, layout: MLPLayout, base_gain: torch.Tensor | None = None,
                 log_std_init: float = -0.5, seed: int = 0):
        super().__init__()
        self.layout = layout
        self.residual = ResidualMLP(layout, seed=seed)
        gain = torch.zeros(layout.out_dim, layout.in_dim) if base_gain is None else base_gain
        gain = torch.as_tensor(gain, dtype=torch.float32)
        if gain.shape != (layout.out_dim, layout.in_dim):
            raise ValueError(f"base_gain must have shape {(layout.out_dim, layout.in_dim)}, got {tuple(gain.shape)}")
        self.register_buffer("base_gain", gain.clone())
        self.log_std = nn.Parameter(torch.full((layout.out_dim,), float(log_std_init)))

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        return obs @ self.base_gain.T + self.residual(obs)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std broadcast to the mean's shape)."""
        mu = self.mean(obs)
        return mu, self.log_std.expand_as(mu)


def gaussian_log_prob(mu, log_std, act) -> torch.Tensor:
    """Log density of a diagonal Gaussian, summed over action dimensions."""
    z = (act - mu) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std - 0.5 * math.log(2.0 * math.pi)).sum(-1)


def gaussian_kl(mu_old, log_std_old, mu_new, log_std_new) -> torch.Tensor:
    """KL(old ‖ new) per sample (closed form), summed over action dimensions."""
    var_old, var_new = torch.exp(2 * log_std_old), torch.exp(2 * log_std_new)
    kl = log_std_new - log_std_old + (var_old + (mu_old - mu_new) ** 2) / (2 * var_new) - 0.5
    return kl.sum(-1)


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.Tanh()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class Critic(nn.Module):
    def __init__(self, obs_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim, hidden, 1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


# ----------------------------------------------------------------------------------------
# Rollout storage and GAE (time-major, all envs at once)
# ----------------------------------------------------------------------------------------

@dataclass
class Batch:
    """Flattened on-policy data for one update."""
    obs: torch.Tensor
    act: torch.Tensor
    log_prob: torch.Tensor
    adv_r: torch.Tensor
    adv_c: torch.Tensor
    ret_r: torch.Tensor
    """Value targets (GAE advantages + values)."""
    ret_c: torch.Tensor


class RolloutBuffer:
    """``horizon`` steps of ``num_envs`` envs. ``done`` cuts the GAE recursion; a time-limit
    bootstrap is folded into the reward/cost of the last step by the caller."""

    def __init__(self, horizon: int, num_envs: int, obs_dim: int, act_dim: int):
        self.horizon, self.num_envs = int(horizon), int(num_envs)
        shape = (self.horizon, self.num_envs)
        self.obs = torch.zeros(*shape, obs_dim)
        self.act = torch.zeros(*shape, act_dim)
        self.log_prob, self.reward, self.cost = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        self.value_r, self.value_c, self.done = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        self.ptr = 0

    @property
    def full(self) -> bool:
        return self.ptr >= self.horizon

    def add(self, obs, act, log_prob, reward, cost, value_r, value_c, done) -> None:
        if self.full:
            raise RuntimeError("rollout buffer is full: call finish() first")
        t = self.ptr
        self.obs[t], self.act[t], self.log_prob[t] = obs, act, log_prob
        self.reward[t], self.cost[t] = reward, cost
        self.value_r[t], self.value_c[t], self.done[t] = value_r, value_c, done
        self.ptr += 1

    def finish(self, last_value_r: torch.Tensor, last_value_c: torch.Tensor,
               gamma: float, lam: float) -> Batch:
        """GAE over the stored steps (bootstrapping unfinished episodes with the last
        values); returns the flattened batch and empties the buffer."""
        T = self.ptr
        adv_r, ret_r = gae(self.reward[:T], self.value_r[:T], self.done[:T], last_value_r, gamma, lam)
        adv_c, ret_c = gae(self.cost[:T], self.value_c[:T], self.done[:T], last_value_c, gamma, lam)
        flat = lambda x: x[:T].reshape(T * self.num_envs, *x.shape[2:])  # noqa: E731
        batch = Batch(flat(self.obs), flat(self.act), flat(self.log_prob), flat(adv_r), flat(adv_c),
                      flat(ret_r), flat(ret_c))
        self.ptr = 0
        return batch


def gae(rewards, values, dones, last_value, gamma: float, lam: float):
    """Generalised advantage estimates for (T, N) tensors; ``dones[t]`` = episode ended at t."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(T)):          # the only loop: over time, all envs at once
        live = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * live - values[t]
        running = delta + gamma * lam * live * running
        adv[t] = running
        next_value = values[t]
    return adv, adv + values


# ----------------------------------------------------------------------------------------
# The constrained divergence, conjugate gradient, line search, hysteresis
# ----------------------------------------------------------------------------------------

def barrier_term(alpha: torch.Tensor, delta_b: float, form: str = "entropy") -> torch.Tensor:
    """``φ(δ_b - α) - φ(δ_b) + φ'(δ_b) α``, the Bregman term of ``D̄_C`` (without β).

    ``α``: cost surrogate (predicted change of the episode cost), ``δ_b = b - J_c``: the
    remaining cost budget. Zero with zero slope at ``α = 0``, convex, ``+∞`` for
    ``α >= δ_b`` (and for every α when there is no budget left, ``δ_b <= 0``).
    """
    alpha = torch.as_tensor(alpha)
    if not (delta_b > 0 and bool(alpha < delta_b)):
        return torch.full_like(alpha, math.inf)
    y = (delta_b - alpha) / delta_b                  # remaining budget fraction, in (0, ∞)
    if form == "entropy":                            # φ(x) = x log x, φ'' = 1/x
        return alpha + (delta_b - alpha) * torch.log(y)
    if form == "barrier":                            # φ(x) = -log x,  φ'' = 1/x²
        return -(torch.log(y) + alpha / delta_b)
    raise ValueError(f"unknown divergence form {form!r}")


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       iters: int = 15, tol: float = 1e-10) -> torch.Tensor:
    """Approximately solve ``A x = b`` for symmetric positive definite ``A`` given ``x ↦ Ax``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = torch.dot(r, r)
    for _ in range(iters):
        if rr.sqrt() < tol:
            break
        Ap = matvec(p)
        step = rr / torch.dot(p, Ap)
        x += step * p
        r -= step * Ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


@dataclass
class LineSearchResult:
    step_fraction: float
    """Fraction of the full natural step accepted (0: none)."""
    accepted_at: int
    """1-based index of the accepted trial, 0 if every trial was rejected."""
    divergence: float
    loss_improvement: float


def backtracking_line_search(evaluate: Callable[[float], tuple[float, float]], loss_before: float,
                             max_divergence: float, steps: int = 15, decay: float = 0.8) -> LineSearchResult:
    """Try fractions ``1, decay, decay², ...`` of the step; accept the first whose loss is
    finite and not worse and whose divergence is finite and ``<= max_divergence``.

    ``evaluate(fraction) -> (loss, divergence)``. An infinite divergence (a step predicted
    to cross the cost limit) is never accepted.
    """
    frac = 1.0
    for k in range(steps):
        loss, div = evaluate(frac)
        improve = loss_before - loss
        if math.isfinite(loss) and math.isfinite(div) and improve >= 0.0 and div <= max_divergence:
            return LineSearchResult(frac, k + 1, div, improve)
        frac *= decay
    return LineSearchResult(0.0, 0, 0.0, 0.0)


@dataclass
class Hysteresis:
    """Recovery switch: on when ``J_c >= b``, off again only once ``J_c < b_H``."""
    cost_limit: float
    fraction: float = 0.8
    recovering: bool = False

    @property
    def recovery_threshold(self) -> float:
        return self.fraction * self.cost_limit

    def update(self, episode_cost: float) -> bool:
        if self.recovering:
            self.recovering = not episode_cost < self.recovery_threshold
        else:
            self.recovering = not episode_cost < self.cost_limit
        return self.recovering


# ----------------------------------------------------------------------------------------
# The learner
# ----------------------------------------------------------------------------------------

class CTRPOLearner:
    """Policy, critics and one ``update`` per batch, for any of the three algorithms."""

    def __init__(self, obs_dim: int, act_dim: int, config: CTRPOConfig = CTRPOConfig(),
                 base_gain: torch.Tensor | None = None, seed: int = 0):
        self.config = cfg = config
        self.layout = MLPLayout(obs_dim, act_dim, cfg.hidden)
        self.policy = GaussianPolicy(self.layout, base_gain, cfg.log_std_init, seed=seed)
        with torch.random.fork_rng():          # seeded critics without touching the caller's RNG
            torch.manual_seed(seed)
            self.critic_r = Critic(obs_dim, cfg.hidden)
            self.critic_c = Critic(obs_dim, cfg.hidden)
        # L2 penalty c·Σp² on the critics as Adam weight decay 2c (the same gradient, cheaper);
        # the fused CPU kernel makes the many small critic steps ~3x faster where it exists.
        self.critic_params = list(self.critic_r.parameters()) + list(self.critic_c.parameters())
        try:
            self.critic_opt = torch.optim.Adam(self.critic_params, lr=cfg.critic_lr,
                                               weight_decay=2.0 * cfg.critic_l2, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.critic_opt = torch.optim.Adam(self.critic_params, lr=cfg.critic_lr,
                                               weight_decay=2.0 * cfg.critic_l2)
        self.hysteresis = Hysteresis(cfg.cost_limit, cfg.hysteresis)
        # TRPO-Lag multiplier: a non-negative scalar moved by Adam on -λ (J_c - b).
        self.lagrange = torch.tensor(float(cfg.lagrange_init), requires_grad=True)
        self.lagrange_opt = torch.optim.Adam([self.lagrange], lr=cfg.lagrange_lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.recent_costs: deque[float] = deque(maxlen=cfg.cost_window)

    # -- acting -------------------------------------------------------------------------

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False):
        """Batched action, its log-probability and both critics' values."""
        mu, log_std = self.policy(obs)
        act = mu if deterministic else mu + torch.exp(log_std) * torch.randn(
            mu.shape, generator=self.generator)
        return act, gaussian_log_prob(mu, log_std, act), self.critic_r(obs), self.critic_c(obs)

    @torch.no_grad()
    def values(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.critic_r(obs), self.critic_c(obs)

    def mean_weights(self) -> np.ndarray:
        """Flat weights of the mean network ``φ_θ`` in the ``MLPLayout`` order."""
        return self.policy.residual.flat().detach().double().numpy()

    def load_mean_weights(self, flat) -> None:
        """Adopt externally committed weights (e.g. the ones the SCPO safety node certified)."""
        self.policy.residual.load_flat(flat)

    # -- one update ---------------------------------------------------------------------

    def update(self, batch: Batch, episode_costs) -> dict:
        """Policy step, then critic regression. ``episode_costs``: undiscounted costs of the
        episodes finished since the last update (they enter the running ``J_c``)."""
        bad = [name for name, t in vars(batch).items() if not bool(torch.isfinite(t).all())]
        costs = np.atleast_1d(np.asarray(episode_costs, dtype=float))
        if bad or not np.all(np.isfinite(costs)):
            # A NaN/Inf sample would poison every parameter; keep the policy as it is.
            return {"skipped": f"non-finite values in {bad or ['episode_costs']}", "recovering":
                    self.hysteresis.recovering, "lagrange": float(self.lagrange.detach()), "accepted_at": 0,
                    "step_fraction": 0.0, "kl": 0.0, "divergence": 0.0, "loss_improvement": 0.0}
        for c in costs:
            self.recent_costs.append(float(c))
        ep_cost = float(np.mean(self.recent_costs)) if self.recent_costs else 0.0
        adv_r = (batch.adv_r - batch.adv_r.mean()) / (batch.adv_r.std() + 1e-8)
        adv_c = batch.adv_c - batch.adv_c.mean()
        info = {"skipped": "", "ep_cost_estimate": ep_cost}
        info.update(self._policy_step(batch, adv_r, adv_c, ep_cost))
        info.update(self._critic_step(batch))
        return info

    def _policy_step(self, batch: Batch, adv_r, adv_c, ep_cost: float) -> dict:
        cfg = self.config
        params = list(self.policy.parameters())
        with torch.no_grad():
            mu_old, log_std_old = self.policy(batch.obs)

        recovering = False
        if cfg.algorithm == "c_trpo":
            recovering = self.hysteresis.update(ep_cost)
        if cfg.algorithm == "trpo_lag":
            self.lagrange_opt.zero_grad()
            (-self.lagrange * (ep_cost - cfg.cost_limit)).backward()
            self.lagrange_opt.step()
            with torch.no_grad():
                self.lagrange.clamp_(min=0.0)
        lam = float(self.lagrange.detach())

        def surrogates():
            mu, log_std = self.policy(batch.obs)
            ratio = torch.exp(gaussian_log_prob(mu, log_std, batch.act) - batch.log_prob)
            if cfg.algorithm == "trpo_lag":
                loss = -(ratio * (adv_r - lam * adv_c)).mean() / (1.0 + lam)
            elif recovering:
                loss = (ratio * adv_c).mean()
            else:
                loss = -(ratio * adv_r).mean()
            kl = gaussian_kl(mu_old, log_std_old, mu, log_std).mean()
            # Predicted change of the episode cost, zero at π_k by construction.
            alpha = ((ratio - 1.0) * adv_c).mean() / (1.0 - cfg.gamma)
            return loss, kl, alpha

        def divergence(kl, alpha):
            if cfg.algorithm != "c_trpo" or recovering:
                return kl
            term = barrier_term(alpha, cfg.cost_limit - ep_cost, cfg.divergence)
            # Checked apart from β so that β = 0 still means "+∞ beyond the boundary" (0·∞ is NaN).
            return kl + cfg.beta * term if bool(torch.isfinite(term)) else term

        loss, kl, alpha = surrogates()
        grad = torch.autograd.grad(loss, params, retain_graph=True)
        g = -parameters_to_vector(grad)                  # ascent direction of -loss
        div = divergence(kl, alpha)
        if not torch.isfinite(div):                      # no budget left: nothing is safe to try
            return {"recovering": recovering, "lagrange": lam, "accepted_at": 0, "step_fraction": 0.0,
                    "kl": 0.0, "divergence": 0.0, "loss_improvement": 0.0}
        div_grad = parameters_to_vector(torch.autograd.grad(div, params, create_graph=True))

        def hvp(v: torch.Tensor) -> torch.Tensor:
            hv = torch.autograd.grad(div_grad @ v, params, retain_graph=True)
            return parameters_to_vector(hv) + cfg.cg_damping * v

        x = conjugate_gradient(hvp, g, cfg.cg_iters)
        xHx = float(x @ hvp(x))
        theta_old = parameters_to_vector(params).detach().clone()
        step = math.sqrt(2.0 * cfg.target_kl / max(xHx, 1e-12)) * x if xHx > 0 else torch.zeros_like(x)
        loss_before = float(loss.detach())

        def evaluate(frac: float) -> tuple[float, float]:
            vector_to_parameters(theta_old + frac * step, params)
            with torch.no_grad():
                loss_k, kl_k, alpha_k = surrogates()
                return float(loss_k), float(divergence(kl_k, alpha_k))

        ls = backtracking_line_search(evaluate, loss_before, cfg.target_kl,
                                      cfg.line_search_steps, cfg.line_search_decay)
        vector_to_parameters(theta_old + ls.step_fraction * step, params)
        with torch.no_grad():
            kl_final = float(surrogates()[1])
        return {"recovering": recovering, "lagrange": lam, "accepted_at": ls.accepted_at,
                "step_fraction": ls.step_fraction, "kl": kl_final, "divergence": ls.divergence,
                "loss_improvement": ls.loss_improvement}

    def _critic_step(self, batch: Batch) -> dict:
        cfg = self.config
        n = batch.obs.shape[0]
        loss_r = loss_c = torch.zeros(())
        for _ in range(cfg.critic_epochs):
            perm = torch.randperm(n, generator=self.generator)
            for start in range(0, n, cfg.critic_batch):
                idx = perm[start:start + cfg.critic_batch]
                loss_r = ((self.critic_r(batch.obs[idx]) - batch.ret_r[idx]) ** 2).mean()
                loss_c = ((self.critic_c(batch.obs[idx]) - batch.ret_c[idx]) ** 2).mean()
                self.critic_opt.zero_grad()
                (loss_r + loss_c).backward()
                nn.utils.clip_grad_norm_(self.critic_params, cfg.max_grad_norm, foreach=True)
                self.critic_opt.step()
        return {"critic_loss_r": float(loss_r.detach()), "critic_loss_c": float(loss_c.detach())}


# ----------------------------------------------------------------------------------------
# Training loop over a vectorised env
# ----------------------------------------------------------------------------------------

@dataclass
class EpochStats:
    epoch: int
    env_steps: int
    """Executed environment steps so far (all envs)."""
    episodes: int
    """Episodes finished in this epoch."""
    ep_return: float
    ep_cost: float
    """Mean undiscounted return / cost of the episodes finished in this epoch (NaN if none)."""
    violating_episodes: int
    """Episodes of this epoch with at least one unsafe step."""
    recovering: bool = False
    lagrange: float = 0.0
    accepted_at: int = 0
    kl: float = 0.0
    divergence: float = 0.0
    wall_s: float = 0.0


@dataclass
class TrainResult:
    learner: CTRPOLearner
    history: list[EpochStats] = field(default_factory=list)

    def as_dicts(self) -> list[dict]:
        return [asdict(h) for h in self.history]


class Collector:
    """Turns env steps into update batches: what a training loop or a ROS node calls per step.

    ``record`` stores one (vectorised) transition; a time-limit end is bootstrapped with
    the critics' value of the episode's last observation (folded into its reward and cost)
    and closes the episode's return/cost. ``update`` runs GAE and ``learner.update`` once
    the buffer holds ``horizon`` steps; ``run_epoch`` does both over a vectorised env.
    """

    def __init__(self, learner: CTRPOLearner, horizon: int, num_envs: int):
        self.learner = learner
        self.buffer = RolloutBuffer(horizon, num_envs, learner.layout.in_dim, learner.layout.out_dim)
        self.ep_ret = torch.zeros(num_envs)
        self.ep_cost = torch.zeros(num_envs)
        self.finished_returns: list[float] = []
        self.finished_costs: list[float] = []

    @property
    def ready(self) -> bool:
        return self.buffer.full

    def record(self, obs, act, log_prob, value_r, value_c, step: StepResult) -> None:
        gamma = self.learner.config.gamma
        self.ep_ret += step.reward
        self.ep_cost += step.cost
        reward, cost = step.reward.clone(), step.cost.clone()
        done = (step.truncated | step.terminated).float()
        if bool(step.truncated.any()):
            # Time limit, not a terminal state: bootstrap with the value of the last state.
            idx = step.truncated.nonzero().squeeze(-1)
            fv_r, fv_c = self.learner.values(step.final_obs[idx])
            reward[idx] += gamma * fv_r
            cost[idx] += gamma * fv_c
        ended = done.bool().nonzero().squeeze(-1)
        if len(ended):
            self.finished_returns += self.ep_ret[ended].tolist()
            self.finished_costs += self.ep_cost[ended].tolist()
            self.ep_ret[ended] = 0.0
            self.ep_cost[ended] = 0.0
        self.buffer.add(obs, act, log_prob, reward, cost, value_r, value_c, done)

    def run_epoch(self, env, obs: torch.Tensor) -> tuple[torch.Tensor, dict, list[float], list[float]]:
        """One epoch from ``obs``: ``horizon`` steps of every env of ``env`` with the learner's
        stochastic policy, then ``update``. Returns the last observation, the update's info and
        the returns / costs of the episodes finished since the last update."""
        for _ in range(self.buffer.horizon):
            act, log_prob, v_r, v_c = self.learner.act(obs)
            step = env.step(act)
            self.record(obs, act, log_prob, v_r, v_c, step)
            obs = step.obs
        info, rets, costs = self.update(obs)
        return obs, info, rets, costs

    def update(self, last_obs: torch.Tensor) -> tuple[dict, list[float], list[float]]:
        """GAE (bootstrapping unfinished episodes from ``last_obs``) and one learner update;
        returns its info and the returns / costs of the episodes finished since the last one."""
        cfg = self.learner.config
        last_r, last_c = self.learner.values(last_obs)
        batch = self.buffer.finish(last_r, last_c, cfg.gamma, cfg.lam)
        rets, costs = self.finished_returns, self.finished_costs
        self.finished_returns, self.finished_costs = [], []
        return self.learner.update(batch, costs), rets, costs


def train(env, config: CTRPOConfig, epochs: int, horizon: int | None = None, seed: int = 0,
          base_gain: torch.Tensor | None = None, learner: CTRPOLearner | None = None,
          on_epoch: Callable[[EpochStats], None] | None = None,
          after_update: Callable[[CTRPOLearner, dict], None] | None = None) -> TrainResult:
    """Run ``epochs`` updates, each on ``horizon`` steps of every env of ``env``
    (default: one episode length, so every epoch holds ``num_envs`` whole episodes).
    ``learner``: continue with an existing learner instead of a fresh one (its own config
    then applies). ``after_update(learner, info)`` runs after every update, before the next
    rollout: the place to pass the proposed mean weights through a safety filter (SCPO) and
    load back what it committed."""
    horizon = int(horizon or env.episode_length)
    if learner is None:
        learner = CTRPOLearner(env.obs_dim, env.act_dim, config, base_gain=base_gain, seed=seed)
    collector = Collector(learner, horizon, env.num_envs)
    result = TrainResult(learner)
    obs = env.reset()
    start = time.perf_counter()
    for epoch in range(epochs):
        obs, info, rets, costs = collector.run_epoch(env, obs)
        if after_update is not None:
            after_update(learner, info)
        costs = np.asarray(costs)
        stats = EpochStats(
            epoch=epoch, env_steps=(epoch + 1) * horizon * env.num_envs, episodes=len(costs),
            ep_return=float(np.mean(rets)) if rets else float("nan"),
            ep_cost=float(costs.mean()) if len(costs) else float("nan"),
            violating_episodes=int((costs > 0).sum()),
            recovering=bool(info["recovering"]), lagrange=float(info["lagrange"]),
            accepted_at=int(info["accepted_at"]), kl=float(info["kl"]), divergence=float(info["divergence"]),
            wall_s=time.perf_counter() - start)
        result.history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return result


@torch.no_grad()
def evaluate_policy(env, act_fn: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor | None = None,
                    episodes: int = 1) -> dict:
    """Run ``act_fn`` (observation batch → action batch) for whole episodes in every env of
    ``env``, from ``obs`` (episodes just started, e.g. by ``set_episodes``) or from a fresh
    ``reset``; mean return / cost and the number of unsafe episodes."""
    rets, costs = [], []
    obs = env.reset() if obs is None else obs
    for _ in range(episodes):
        ep_ret = torch.zeros(env.num_envs)
        ep_cost = torch.zeros(env.num_envs)
        for _ in range(env.episode_length):
            step = env.step(act_fn(obs))
            ep_ret += step.reward
            ep_cost += step.cost
            obs = step.obs
        rets.append(ep_ret)
        costs.append(ep_cost)
    ret, cost = torch.cat(rets), torch.cat(costs)
    return {"return": float(ret.mean()), "cost": float(cost.mean()),
            "unsafe_episodes": int((cost > 0).sum()), "episodes": int(cost.numel())}
