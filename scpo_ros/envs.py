"""Vectorised torch environments for on-policy RL: every env is stepped at once.

Two tasks, both built on the plant models of ``dynamics.py``:

- ``VecDoubleIntegrator``: track a position reference ``r`` held for the episode.
  Observation ``[p, v, r]`` (exactly ``policy_inputs([x, r])`` of the residual policy),
  reward ``-(|p - r|² + w|u|²)·dt`` per step, so the undiscounted return is minus the
  task cost that the SCPO rollouts report. Initial states and references are drawn
  from an ``InitialSet`` box.
- ``VecPendulum``: hold the pendulum upright (SafeGBPO setup); observation ``[θ, θ']``,
  reward ``-θ² - 0.1θ'² - 0.001a²``.

Cost: ``1`` for every step whose *next* state leaves the plant's constraint box
(``system.violation``), else ``0``, so the episode cost counts unsafe steps. Actions
are clipped to the actuator limit before they reach the plant (the plant cannot do
more); reward and dynamics see the clipped action.

Episodes end only by the time limit (``truncated``), never by termination: an unsafe
state is a cost, not the end of the episode. Finished envs are reset automatically in
the same ``step`` call; ``StepResult.final_obs`` holds their last observation so the
learner can bootstrap its value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backup import InitialSet, LQRBackup, PendulumLQR
from .dynamics import DoubleIntegrator, Pendulum
from .rollout import region_bounds


@dataclass
class StepResult:
    obs: torch.Tensor
    """(N, obs_dim) observation after the step (of the new episode where one was reset)."""
    reward: torch.Tensor
    """(N,)"""
    cost: torch.Tensor
    """(N,) 1.0 where the step ended outside the constraint box."""
    terminated: torch.Tensor
    """(N,) bool; always False here (no terminal states), kept for the usual API."""
    truncated: torch.Tensor
    """(N,) bool: the episode hit its time limit and the env was reset."""
    final_obs: torch.Tensor
    """(N, obs_dim) last observation of the finished episode where ``truncated``, else ``obs``."""


class VecEnv:
    """Common bookkeeping: time counters, automatic resets, action clipping.

    Subclasses define ``_sample_episodes(n)``, ``_observe(idx=None)``,
    ``_advance(action)`` (returns reward and next state) and ``_violation()``.
    """

    obs_dim: int
    act_dim: int
    action_limit: float

    def __init__(self, num_envs: int, episode_length: int, seed: int, dtype: torch.dtype):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if episode_length < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")
        self.num_envs, self.episode_length, self.dtype = int(num_envs), int(episode_length), dtype
        self.generator = torch.Generator().manual_seed(int(seed))
        self.t = torch.zeros(self.num_envs, dtype=torch.long)

    def _uniform(self, n: int, dim: int, bound) -> torch.Tensor:
        """U(-bound, bound) samples of shape (n, dim); ``bound`` a scalar or (dim,) tensor.
        Drawn in float32 whatever ``dtype``, so float32 and float64 envs with one seed start
        from the same episodes."""
        u = torch.rand(n, dim, generator=self.generator).to(self.dtype)
        return (2.0 * u - 1.0) * torch.as_tensor(bound, dtype=self.dtype)

    def reset(self) -> torch.Tensor:
        """Start a new episode in every env; return the observations (N, obs_dim)."""
        self._sample_episodes(torch.arange(self.num_envs))
        self.t.zero_()
        return self._observe()

    def step(self, action: torch.Tensor) -> StepResult:
        action = torch.as_tensor(action, dtype=self.dtype).reshape(self.num_envs, self.act_dim)
        # A NaN action would poison the state for the rest of the episode; treat it as 0.
        action = torch.nan_to_num(action, nan=0.0).clamp(-self.action_limit, self.action_limit)
        reward = self._advance(action)
        cost = self._violation().to(self.dtype)
        self.t += 1
        obs = self._observe()
        truncated = self.t >= self.episode_length
        final_obs = obs
        if bool(truncated.any()):
            final_obs = obs.clone()
            idx = truncated.nonzero().squeeze(-1)
            self._sample_episodes(idx)
            self.t[idx] = 0
            obs = self._observe()
        terminated = torch.zeros(self.num_envs, dtype=torch.bool)
        return StepResult(obs, reward, cost, terminated, truncated, final_obs)


class VecDoubleIntegrator(VecEnv):
    """``num_envs`` double integrators tracking references (see the module docstring)."""

    def __init__(self, num_envs: int, system: DoubleIntegrator = DoubleIntegrator(),
                 initial_set: InitialSet = InitialSet(), episode_length: int = 100,
                 action_weight: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__(num_envs, episode_length, seed, dtype)
        if not (math.isfinite(action_weight) and action_weight >= 0.0):
            raise ValueError(f"action_weight must be finite and >= 0, got {action_weight!r}")
        self.system, self.initial_set, self.action_weight = system, initial_set, float(action_weight)
        n = system.dof
        self.obs_dim, self.act_dim, self.action_limit = 3 * n, n, float(system.u_max)
        self.x = torch.zeros(self.num_envs, 2 * n, dtype=dtype)
        self.r = torch.zeros(self.num_envs, n, dtype=dtype)
        self.reset()

    def _sample_episodes(self, idx: torch.Tensor) -> None:
        # the box of ``rollout.random_states``, drawn from the env's own generator (states
        # first, then references) so that the episodes follow the env's seed alone
        n, k = self.system.dof, len(idx)
        bound = region_bounds(self.initial_set, n)
        self.x[idx] = self._uniform(k, 2 * n, bound[:2 * n])
        self.r[idx] = self._uniform(k, n, bound[2 * n:])

    def _observe(self) -> torch.Tensor:
        return torch.cat([self.x, self.r], dim=-1)

    def _advance(self, u: torch.Tensor) -> torch.Tensor:
        n = self.system.dof
        self.x = self.system.step(self.x, u, self.generator)
        err = self.x[:, :n] - self.r
        return -((err * err).sum(-1) + self.action_weight * (u * u).sum(-1)) * self.system.dt

    def _violation(self) -> torch.Tensor:
        return self.system.violation(self.x)

    def set_episodes(self, x0: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Start every env from given states ``x0 (N, 2 dof)`` and references ``r (N, dof)``
        (fixed evaluation sets); return the observations."""
        self.x = torch.as_tensor(x0, dtype=self.dtype).reshape(self.num_envs, -1).clone()
        self.r = torch.as_tensor(r, dtype=self.dtype).reshape(self.num_envs, -1).clone()
        self.t.zero_()
        return self._observe()

    def backup_gain(self, backup: LQRBackup | None = None) -> torch.Tensor:
        """The LQR backup ``u = -K(x - [r, 0])`` as a linear map of the observation:
        ``u = W [p, v, r]`` with ``W = [-K, K_p]`` (shape (dof, 3 dof))."""
        backup = backup or LQRBackup(self.system)
        return torch.as_tensor(backup.input_gain(), dtype=self.dtype)


class VecPendulum(VecEnv):
    """``num_envs`` pendulums to hold upright; cost when ``|θ'| > θ'_max`` or ``|θ| > θ_max``."""

    def __init__(self, num_envs: int, system: Pendulum = Pendulum(), episode_length: int = 100,
                 theta0_max: float = math.pi / 2, omega0_max: float = 1.0, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(num_envs, episode_length, seed, dtype)
        if not (0.0 <= theta0_max <= system.theta_max and 0.0 <= omega0_max <= system.theta_dot_max):
            raise ValueError("initial state box must lie inside the constraint box")
        self.system, self.theta0_max, self.omega0_max = system, float(theta0_max), float(omega0_max)
        self.obs_dim, self.act_dim, self.action_limit = 2, 1, float(system.a_max)
        self.x = torch.zeros(self.num_envs, 2, dtype=dtype)
        self.reset()

    def _sample_episodes(self, idx: torch.Tensor) -> None:
        bound = torch.tensor([self.theta0_max, self.omega0_max], dtype=self.dtype)
        self.x[idx] = self._uniform(len(idx), 2, bound)

    def _observe(self) -> torch.Tensor:
        return self.x.clone()

    def _advance(self, a: torch.Tensor) -> torch.Tensor:
        theta, omega = self.x[:, 0], self.x[:, 1]
        self.x = self.system.step(self.x, a)
        return -(theta * theta + 0.1 * omega * omega + 0.001 * a[:, 0] * a[:, 0])

    def _violation(self) -> torch.Tensor:
        return self.system.violation(self.x)

    def backup_gain(self, q=(1.0, 0.1), r: float = 1.0) -> torch.Tensor:
        """LQR on the upright linearisation, ``a = -K x``: a stabilising base for a residual policy."""
        return torch.as_tensor(PendulumLQR(self.system, q[0], q[1], r).input_gain(), dtype=self.dtype)


def make_env(name: str, num_envs: int, seed: int = 0, **kwargs) -> VecEnv:
    """``"double_integrator"`` or ``"pendulum"``; ``kwargs`` go to the env's constructor."""
    if name == "double_integrator":
        return VecDoubleIntegrator(num_envs, seed=seed, **kwargs)
    if name == "pendulum":
        return VecPendulum(num_envs, seed=seed, **kwargs)
    raise ValueError(f"unknown env {name!r} (double_integrator | pendulum)")
