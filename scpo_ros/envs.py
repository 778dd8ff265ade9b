"""Vectorised torch environments for on-policy RL (C-TRPO): every env is stepped at once.

One task for any plant (``VecPlantEnv``): track references ``r`` of the plant's tracked
states held for the episode (without tracked states: regulate to the equilibrium).
Observation ``[x, r]`` (exactly ``policy_inputs(x, r)`` of the residual policy), reward
``-(|x_tracked - r|² + w|u - u_ss(r)|²)·dt`` per step (without tracked states ``|e|²``,
``e = x - x_ss``, in place of the tracking error), so the undiscounted return is minus the
task cost that the SCPO rollouts report (``rollout.SafetySpec.cost_action_weight``). Initial
states and references are drawn uniformly from the plant's certified region (``plant.region``).
The dynamics are ``plant.step`` (a linear plant's ``A x + B u + c``, a model plant's model).

``VecDoubleIntegrator`` and ``VecPendulum`` are the two plants of the parameter era under
their old constructors (the pendulum keeps the SafeGBPO reward ``-θ² - 0.1θ'² - 0.001a²``).

Actions: ``action_offset`` (the constant part of the backup's ``u = W [x, r, 1]``, nonzero
only for a plant with an affine term) is added, so a policy whose mean is
``backup_gain() · obs + φ_θ(obs)`` applies exactly ``backup(x, r) + φ_θ([x, r])``, the law the
SCPO safety node checks; then the action is clipped to the input box ``[u_min, u_max]`` (the
actuator cannot do more); reward and dynamics see the clipped action.

Cost: ``1`` for every step whose *next* state breaks a state constraint (box or ``H``) or
whose applied action breaks the input polytope ``G`` (the box cannot be broken: it is
clipped), else ``0``, so the episode cost counts unsafe steps.

Episodes end only by the time limit (``truncated``), never by termination: an unsafe
state is a cost, not the end of the episode. Finished envs are reset automatically in
the same ``step`` call; ``StepResult.final_obs`` holds their last observation so the
learner can bootstrap its value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .backup import LQRBackup
from .dynamics import DoubleIntegrator, Pendulum
from .plant import Plant, Region, double_integrator_plant, load_plant, plant_from_dict


@dataclass
class StepResult:
    obs: torch.Tensor
    """(N, obs_dim) observation after the step (of the new episode where one was reset)."""
    reward: torch.Tensor
    """(N,)"""
    cost: torch.Tensor
    """(N,) 1.0 where the step ended outside the constraints."""
    terminated: torch.Tensor
    """(N,) bool; always False here (no terminal states), kept for the usual API."""
    truncated: torch.Tensor
    """(N,) bool: the episode hit its time limit and the env was reset."""
    final_obs: torch.Tensor
    """(N, obs_dim) last observation of the finished episode where ``truncated``, else ``obs``."""


class VecPlantEnv:
    """``num_envs`` copies of ``plant`` tracking references (see the module docstring).

    ``backup``: the plant's ``LQRBackup`` (built when None): its gain is ``backup_gain()``,
    its constant part ``action_offset``. ``region``: where episodes start (default
    ``plant.region``).
    """

    def __init__(self, plant: Plant, num_envs: int, backup: LQRBackup | None = None, episode_length: int = 100,
                 action_weight: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float32,
                 region: Region | None = None):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if episode_length < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")
        if not (math.isfinite(action_weight) and action_weight >= 0.0):
            raise ValueError(f"action_weight must be finite and >= 0, got {action_weight!r}")
        self.num_envs, self.episode_length, self.dtype = int(num_envs), int(episode_length), dtype
        self.plant, self.action_weight = plant, float(action_weight)
        self.backup = backup if backup is not None else LQRBackup(plant)
        self.region = region if region is not None else plant.region
        self.generator = torch.Generator().manual_seed(int(seed))
        self.t = torch.zeros(self.num_envs, dtype=torch.long)
        self.obs_dim, self.act_dim = plant.n + plant.nr, plant.m
        t = self._t
        self.u_min, self.u_max = t(plant.u_min), t(plant.u_max)
        self.action_offset = t(self.backup.input_gain()[:, -1])
        self._lo, self._hi = t(self.region.lower), t(self.region.upper)
        self._Fx, self._fx = (t(a) for a in plant.state_rows()[:2])
        self._G, self._g = t(plant.G), t(plant.g)
        self._track = torch.as_tensor(plant.tracked_index, dtype=torch.long)
        self.x = torch.zeros(self.num_envs, plant.n, dtype=dtype)
        self.r = torch.zeros(self.num_envs, plant.nr, dtype=dtype)
        self.reset()

    @property
    def action_limit(self) -> float:
        """The largest input magnitude the box allows (the symmetric bound of the older envs)."""
        return float(torch.maximum(self.u_max.abs(), self.u_min.abs()).max())

    def _t(self, a) -> torch.Tensor:
        return torch.as_tensor(np.array(a, dtype=np.float64), dtype=self.dtype)

    def _uniform(self, n: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """U(lo, hi) samples of shape (n, len(lo)). Drawn in float32 whatever ``dtype``, so
        float32 and float64 envs with one seed start from the same episodes."""
        u = torch.rand(n, len(lo), generator=self.generator).to(self.dtype)
        return lo + u * (hi - lo)

    # ------------------------------------------------------------------ the task
    def _sample_episodes(self, idx: torch.Tensor) -> None:
        # the box of ``rollout.random_states`` ([x, r] drawn at once), from the env's own
        # generator so that the episodes follow the env's seed alone
        z = self._uniform(len(idx), self._lo, self._hi)
        self.x[idx], self.r[idx] = z[:, :self.plant.n], z[:, self.plant.n:]

    def _observe(self) -> torch.Tensor:
        return torch.cat([self.x, self.r], dim=-1)

    def _dynamics(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.plant.step(x, u)

    def _advance(self, u: torch.Tensor) -> torch.Tensor:
        """Step every env with the applied actions ``u``; return the reward of the step."""
        x_ss, u_ss = self.plant.equilibrium(self.r)
        self.x = self._dynamics(self.x, u)
        err = self.x[:, self._track] - self.r if self.plant.nr else self.x - x_ss
        du = u - u_ss
        return -((err * err).sum(-1) + self.action_weight * (du * du).sum(-1)) * self.plant.dt

    def _violation(self, u: torch.Tensor) -> torch.Tensor:
        bad = (self.x @ self._Fx.T > self._fx + 1e-9).any(-1)
        if len(self._g):
            bad = bad | (u @ self._G.T > self._g + 1e-9).any(-1)
        return bad

    # ------------------------------------------------------------------ the env API
    def reset(self) -> torch.Tensor:
        """Start a new episode in every env; return the observations (N, obs_dim)."""
        self._sample_episodes(torch.arange(self.num_envs))
        self.t.zero_()
        return self._observe()

    def step(self, action: torch.Tensor) -> StepResult:
        action = torch.as_tensor(action, dtype=self.dtype).reshape(self.num_envs, self.act_dim)
        # A NaN action would poison the state for the rest of the episode; treat it as 0.
        action = torch.nan_to_num(action, nan=0.0) + self.action_offset
        action = torch.clamp(action, self.u_min, self.u_max)
        reward = self._advance(action)
        cost = self._violation(action).to(self.dtype)
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

    def set_episodes(self, x0: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """Start every env from given states ``x0 (N, n)`` and references ``r (N, nr)`` (fixed
        evaluation sets; None without tracked states); return the observations."""
        self.x = torch.as_tensor(x0, dtype=self.dtype).reshape(self.num_envs, self.plant.n).clone()
        r = torch.zeros(self.num_envs, self.plant.nr) if r is None else r
        self.r = torch.as_tensor(r, dtype=self.dtype).reshape(self.num_envs, self.plant.nr).clone()
        self.t.zero_()
        return self._observe()

    def backup_gain(self, backup: LQRBackup | None = None) -> torch.Tensor:
        """The backup as a linear map of the observation: ``W (m, n + nr)`` with
        ``backup(x, r) = W [x, r] + action_offset`` (``LQRBackup.input_gain`` without its
        constant column, which the env adds to every action)."""
        backup = backup or self.backup
        gain = backup.input_gain()
        if not np.allclose(gain[:, -1], self.action_offset.double().numpy(), atol=1e-6):
            raise ValueError("this backup's constant term differs from the env's action_offset")
        return torch.as_tensor(gain[:, :-1], dtype=self.dtype)


VecEnv = VecPlantEnv
"""The older name of the common class."""


class VecDoubleIntegrator(VecPlantEnv):
    """``num_envs`` double integrators of ``system`` (dof, dt, limits, process noise) tracking
    references, the plant of ``plant.double_integrator_plant`` (the shipped file's backup
    weights). ``initial_set``: where episodes start, a ``plant.Region`` or anything with the
    parameter-era fields ``p0_max``, ``v0_max``, ``r_max`` (shrunk into the limits);
    None: the shipped file's certified region."""

    def __init__(self, num_envs: int, system: DoubleIntegrator = DoubleIntegrator(), initial_set: Region | None = None,
                 episode_length: int = 100, action_weight: float = 0.1, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        self.system = system
        values = {"dof": system.dof, "dt": system.dt, "p_max": system.p_max, "v_max": system.v_max,
                  "u_max": system.u_max}
        if initial_set is not None and not isinstance(initial_set, Region):
            values.update(p0_max=initial_set.p0_max, v0_max=initial_set.v0_max, r_max=initial_set.r_max)
            initial_set = None
        super().__init__(double_integrator_plant(**values), num_envs, None, episode_length, action_weight, seed, dtype,
                         region=initial_set)

    def _dynamics(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.system.step(x, u, self.generator)       # the system's process noise included


def pendulum_plant(system: Pendulum = Pendulum(), theta0_max: float = math.pi / 2,
                   omega0_max: float = 1.0) -> Plant:
    """The shipped pendulum file with ``system``'s dt, parameters and limits, its certified
    region the start box ``|θ| <= theta0_max``, ``|θ'| <= omega0_max``."""
    import yaml
    if not (0.0 <= theta0_max <= system.theta_max and 0.0 <= omega0_max <= system.theta_dot_max):
        raise ValueError("initial state box must lie inside the constraint box")
    d = yaml.safe_load(load_plant("pendulum").text)
    d.update(dt=system.dt, params={"g": system.g, "tau_max": system.tau_max},
             x_min=[-system.theta_max, -system.theta_dot_max], x_max=[system.theta_max, system.theta_dot_max],
             u_min=[-system.a_max], u_max=[system.a_max],
             certified_region={"x_min": [-theta0_max, -omega0_max], "x_max": [theta0_max, omega0_max]})
    return plant_from_dict(d, "<pendulum env>")


class VecPendulum(VecPlantEnv):
    """``num_envs`` pendulums to hold upright (SafeGBPO setup); observation ``[θ, θ']``, reward
    ``-θ² - 0.1θ'² - 0.001a²``; cost when ``|θ'| > θ'_max`` or ``|θ| > θ_max``."""

    def __init__(self, num_envs: int, system: Pendulum = Pendulum(), episode_length: int = 100,
                 theta0_max: float = math.pi / 2, omega0_max: float = 1.0, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        self.system, self.theta0_max, self.omega0_max = system, float(theta0_max), float(omega0_max)
        super().__init__(pendulum_plant(system, theta0_max, omega0_max), num_envs, None, episode_length, 0.0, seed,
                         dtype)

    def _advance(self, a: torch.Tensor) -> torch.Tensor:
        theta, omega = self.x[:, 0], self.x[:, 1]
        self.x = self._dynamics(self.x, a)
        return -(theta * theta + 0.1 * omega * omega + 0.001 * a[:, 0] * a[:, 0])


def make_env(name: str, num_envs: int, seed: int = 0, **kwargs) -> VecPlantEnv:
    """``"double_integrator"`` or ``"pendulum"`` (the parameter-era envs), else any plant file
    (``plant.load_plant``: a shipped name or a path); ``kwargs`` go to the env's constructor."""
    if name == "double_integrator":
        return VecDoubleIntegrator(num_envs, seed=seed, **kwargs)
    if name == "pendulum":
        return VecPendulum(num_envs, seed=seed, **kwargs)
    return VecPlantEnv(load_plant(name), num_envs, seed=seed, **kwargs)

