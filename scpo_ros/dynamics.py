"""Plant models: the double integrator (any number of axes) and the pendulum (also the model
class of the pendulum plant file: ``scpo_ros.plant``).

Both work on batches: ``step`` takes states of shape ``(..., n)`` and actions of
shape ``(..., m)`` as numpy arrays or torch tensors and returns the next states of
the same kind. Nothing here knows about ROS.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _matmul_T(x, M: np.ndarray):
    """x @ M.T for numpy arrays or torch tensors (M is a numpy matrix)."""
    if isinstance(x, torch.Tensor):
        return x @ torch.as_tensor(M.T, dtype=x.dtype, device=x.device)
    return x @ M.T


@dataclass(frozen=True)
class DoubleIntegrator:
    """``dof`` independent axes, each ``p' = v, v' = u``, sampled with zero-order hold.

    State layout: ``x = [p_1..p_dof, v_1..v_dof]``; action ``u = [u_1..u_dof]``.
    Constraints are boxes: ``|p| <= p_max``, ``|v| <= v_max``, ``|u| <= u_max``.
    """

    dof: int = 1
    dt: float = 0.05
    p_max: float = 1.0
    v_max: float = 1.0
    u_max: float = 1.0
    noise_std: float = 0.0

    def __post_init__(self):
        if int(self.dof) != self.dof or self.dof < 1:
            raise ValueError(f"dof must be a positive integer, got {self.dof!r}")
        for name in ("dt", "p_max", "v_max", "u_max"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0.0:
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if not np.isfinite(self.noise_std) or self.noise_std < 0.0:
            raise ValueError(f"noise_std must be finite and >= 0, got {self.noise_std!r}")

    @property
    def state_dim(self) -> int:
        return 2 * self.dof

    @property
    def action_dim(self) -> int:
        return self.dof

    @property
    def A(self) -> np.ndarray:
        n = self.dof
        eye = np.eye(n)
        return np.block([[eye, self.dt * eye], [np.zeros((n, n)), eye]])

    @property
    def B(self) -> np.ndarray:
        eye = np.eye(self.dof)
        return np.vstack([0.5 * self.dt**2 * eye, self.dt * eye])

    def step(self, x, u, generator: torch.Generator | np.random.Generator | None = None):
        """Next state for batches of states ``x (..., 2*dof)`` and actions ``u (..., dof)``.

        Process noise (``noise_std`` > 0) is added to the velocity, scaled by ``dt``,
        drawn from ``generator`` (a fresh default one if None).
        """
        nxt = _matmul_T(x, self.A) + _matmul_T(u, self.B)
        if self.noise_std > 0.0:
            nxt = nxt + self._velocity_noise(nxt, generator)
        return nxt

    def _velocity_noise(self, like, generator):
        n = self.dof
        if isinstance(like, torch.Tensor):
            w = torch.randn(like.shape[:-1] + (n,), generator=generator, dtype=like.dtype,
                            device=like.device)
            zeros = torch.zeros_like(w)
            return torch.cat([zeros, w], dim=-1) * (self.noise_std * self.dt)
        rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng()
        w = rng.standard_normal(like.shape[:-1] + (n,))
        return np.concatenate([np.zeros_like(w), w], axis=-1) * (self.noise_std * self.dt)

    def violations(self, x, u=None, tol: float = 1e-9) -> dict:
        """Per constraint (``position``, ``velocity``, and with ``u`` ``actuation``): boolean
        masks over the batch of the states (actions) that break its box by more than ``tol``."""
        lib = torch if isinstance(x, torch.Tensor) else np
        n = self.dof
        out = {"position": (lib.abs(x[..., :n]) > self.p_max + tol).any(-1),
               "velocity": (lib.abs(x[..., n:]) > self.v_max + tol).any(-1)}
        if u is not None:
            out["actuation"] = (lib.abs(u) > self.u_max + tol).any(-1)
        return out

    def violation(self, x, u=None, tol: float = 1e-9):
        """Boolean mask over the batch: which states (and actions) break a box constraint."""
        masks = list(self.violations(x, u, tol).values())
        bad = masks[0]
        for mask in masks[1:]:
            bad = bad | mask
        return bad


@dataclass(frozen=True)
class Pendulum:
    """Inverted pendulum of the SafeGBPO setup: ``θ'' = 1.5 g sin θ + 3 τ``, ``τ = τ_max a``.

    State ``x = [θ, θ']`` (θ = 0 upright), action ``a ∈ [-1, 1]``; explicit Euler
    with ``dt`` as in that setup. ``theta_dot_max`` bounds the angular rate.

    It is also the model class of ``config/plants/pendulum.yaml`` (``model: pendulum``, the
    entry point ``scpo_ros.plants``): ``Pendulum(dt, g=, tau_max=)`` takes the file's
    ``params``; the limits then come from the file (``safe_set`` reads them from the plant),
    the constructor's limit fields serve the older callers that build it directly.
    """

    dt: float = 0.05
    g: float = 9.81
    tau_max: float = 30.0
    a_max: float = 1.0
    theta_dot_max: float = 8.0
    theta_max: float = np.pi

    state_dim = 2
    action_dim = 1

    def __post_init__(self):
        # a plant file's params arrive here: refuse nonsense with the field's name
        for name in ("dt", "g", "tau_max", "a_max", "theta_dot_max", "theta_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("dt", "tau_max", "a_max", "theta_dot_max", "theta_max"):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def step(self, x, a, generator=None):
        lib = torch if isinstance(x, torch.Tensor) else np
        theta, omega = x[..., 0], x[..., 1]
        acc = 1.5 * self.g * lib.sin(theta) + 3.0 * self.tau_max * a[..., 0]
        omega_next = omega + self.dt * acc
        theta_next = theta + self.dt * omega_next
        return lib.stack([theta_next, omega_next], -1)

    def linearization(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of the upright equilibrium for the same semi-implicit Euler scheme."""
        dt, k = self.dt, 1.5 * self.g
        A = np.array([[1.0 + dt * dt * k, dt], [dt * k, 1.0]])
        B = np.array([[dt * dt * 3.0 * self.tau_max], [dt * 3.0 * self.tau_max]])
        return A, B

    def linearize(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model interface: ``(A, B, c)`` at the upright equilibrium (``c = 0``: upright
        with zero torque is an equilibrium, ``sin 0 = 0``)."""
        A, B = self.linearization()
        return A, B, np.zeros(2)

    def safe_set(self, plant, late_commands: int = 0, w=None):
        """The model interface: the pendulum's safe action set (``pendulum_safe_set``, the
        gravity-as-known-input construction) with the plant file's limits: angle bound
        ``x_max[0]``, rate bound ``x_max[1]``, ``a_max = u_max[0]``; robust to the additive bound
        ``w`` (``uncertainty.additive_bound``: the declared parameter ranges and disturbance,
        measured-state limits tightened by the declared noise). That construction is
        symmetric and knows only boxes: asymmetric bounds or polytope rows are refused with a
        ``PlantError`` naming the key."""
        from .plant import PlantError
        from .safeguard.invariant_set import pendulum_safe_set  # lazy: it imports this module
        for lo_key, hi_key in (("x_min", "x_max"), ("u_min", "u_max")):
            lo, hi = np.asarray(getattr(plant, lo_key)), np.asarray(getattr(plant, hi_key))
            if not np.allclose(lo, -hi, rtol=1e-12, atol=0.0):
                raise PlantError(lo_key, f"the pendulum's safe set needs symmetric bounds {lo_key} = -{hi_key}, "
                                 f"got {lo.tolist()} and {hi.tolist()}", plant.source)
        if not np.all(np.isfinite(plant.x_max)):
            raise PlantError("x_max", "the pendulum's safe set needs finite angle and rate bounds", plant.source)
        for key in ("H", "G"):
            if len(getattr(plant, key)):
                raise PlantError(key, f"the pendulum's safe set takes no {key} rows (boxes only)", plant.source)
        x_max = np.asarray(plant.x_max, dtype=float)
        if w is not None:
            x_max = x_max - np.asarray(plant.uncertainty.measurement_noise, dtype=float)
        system = Pendulum(dt=self.dt, g=self.g, tau_max=self.tau_max, a_max=float(plant.u_max[0]),
                          theta_dot_max=float(x_max[1]), theta_max=float(x_max[0]))
        return pendulum_safe_set(system, late_commands, w)

    def violation(self, x, u=None, tol: float = 1e-9):
        lib = torch if isinstance(x, torch.Tensor) else np
        bad = (lib.abs(x[..., 1]) > self.theta_dot_max + tol) | (lib.abs(x[..., 0]) > self.theta_max + tol)
        if u is not None:
            bad = bad | (lib.abs(u) > self.a_max + tol).any(-1)
        return bad
