"""Control-invariant polytopes and the safe action set they induce.

A set ``C = {x : H x <= h}`` is control invariant for ``x+ = A x + B u`` under the
input box ``|u| <= u_max`` when every ``x`` in ``C`` has an admissible ``u`` with
``x+`` in ``C``. The *maximal* such set inside the state box ``X`` is the fixed point
of the pre-set iteration

    C_0 = X,   C_{k+1} = Pre(C_k) ∩ X,   Pre(C) = {x : ∃u, |u| <= u_max, A x + B u ∈ C},

stopped when ``C_{k+1} ⊇ C_k`` (then ``C_k ⊆ Pre(C_k)``: invariant). ``Pre`` is the
projection onto x of a polytope in (x, u); it is computed here by vertex enumeration
(qhull: half-space intersection, project the vertices, convex hull), which also
removes redundant inequalities. That is exact and fast for the low dimensions used
here (one axis: 2 states + 1 input).

The safe action set of a state is then ``U_safe(x) = {u : |u| <= u_max, H x+ <= h}``,
with ``x+ = drift(x) + B u``: linear in ``u`` with a constant matrix ``G = H B`` and a
state-dependent right-hand side ``b(x) = h - H drift(x)``. See ``SafeActionSet``.

Double integrator: the axes, their limits and the input box are independent, so the
maximal control-invariant set of ``dof`` axes is the product of the one-axis sets
(exact, not an approximation): one 2-D set is computed and repeated per axis.

Pendulum (``θ'' = 1.5 g sin θ + 3 τ_max a``, semi-implicit Euler): per step
``x+ = A0 x + B0 (w(x) + 3 τ_max a)`` with ``A0 = [[1, dt], [0, 1]]``,
``B0 = [dt², dt]ᵀ`` and the gravity term ``w(x) = 1.5 g sin θ``, ``|w| <= 1.5 g``.
Gravity enters through the same column as the input and is known when the action is
chosen, so any "virtual acceleration" ``v`` with ``|v| <= 3 τ_max a_max - 1.5 g`` is
reachable from every state by ``a = (v - w(x)) / (3 τ_max)`` with ``|a| <= a_max``.
Hence the maximal control-invariant set of the linear system ``(A0, B0)`` with input
box ``|v| <= 3 τ_max a_max - 1.5 g`` is control invariant for the true nonlinear
pendulum (conservative only by the gravity margin), and its next-state constraint is
exact: ``drift(x) = A0 x + B0 w(x)``, no linearisation error.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.spatial import ConvexHull, HalfspaceIntersection

from ..dynamics import DoubleIntegrator, Pendulum


@dataclass(frozen=True)
class Polytope:
    """``{x : H x <= h}`` with rows normalised to unit norm."""

    H: np.ndarray
    h: np.ndarray

    @property
    def dim(self) -> int:
        return self.H.shape[1]

    def contains(self, x, tol: float = 1e-9):
        """Boolean mask over a batch ``x (..., n)`` (numpy or torch)."""
        if isinstance(x, torch.Tensor):
            H = torch.as_tensor(self.H, dtype=x.dtype)
            h = torch.as_tensor(self.h, dtype=x.dtype)
            return (x @ H.T <= h + tol).all(-1)
        return (np.asarray(x) @ self.H.T <= self.h + tol).all(-1)

    def vertices(self) -> np.ndarray:
        """Vertices (qhull; the origin must be an interior point)."""
        return _vertices(self.H, self.h)


def _normalise(H: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(H, axis=1)
    keep = norms > 1e-12
    return H[keep] / norms[keep, None], h[keep] / norms[keep]


def _vertices(H: np.ndarray, h: np.ndarray) -> np.ndarray:
    # qhull's convention: rows [a, -b] for a·x - b <= 0; the origin is strictly inside
    # every set built here (the equilibrium with slack on every constraint).
    if np.any(h <= 0):
        raise ValueError("the origin must be strictly inside the polytope")
    hs = HalfspaceIntersection(np.hstack([H, -h[:, None]]), np.zeros(H.shape[1]))
    return hs.intersections


def _hull(points: np.ndarray, merge_tol: float = 1e-10) -> Polytope:
    """Minimal H-representation of the convex hull of ``points``.

    qhull triangulates facets in 3-D and above: coplanar facets come back as repeated
    equations and are merged here.
    """
    hull = ConvexHull(points)
    H, h = hull.equations[:, :-1], -hull.equations[:, -1]
    H, h = _normalise(H, h)
    rows = np.round(np.hstack([H, h[:, None]]) / merge_tol) * merge_tol
    _, first = np.unique(rows, axis=0, return_index=True)
    first = np.sort(first)
    return Polytope(H[first], h[first])


def box(limits) -> Polytope:
    """``{|x_i| <= limits_i}``."""
    limits = np.asarray(limits, dtype=float)
    n = len(limits)
    return Polytope(np.vstack([np.eye(n), -np.eye(n)]), np.concatenate([limits, limits]))


def intersect(a: Polytope, b: Polytope) -> Polytope:
    """Intersection with redundant rows removed."""
    H = np.vstack([a.H, b.H])
    h = np.concatenate([a.h, b.h])
    return _hull(_vertices(H, h))


def pre_set(C: Polytope, A: np.ndarray, B: np.ndarray, u_max: np.ndarray) -> Polytope:
    """``{x : ∃u, |u| <= u_max, A x + B u ∈ C}`` by projecting the (x, u) polytope's vertices."""
    n, m = B.shape
    u_max = np.broadcast_to(np.asarray(u_max, dtype=float), (m,))
    lifted_H = np.vstack([np.hstack([C.H @ A, C.H @ B]),
                          np.hstack([np.zeros((2 * m, n)), np.vstack([np.eye(m), -np.eye(m)])])])
    lifted_h = np.concatenate([C.h, u_max, u_max])
    lifted_H, lifted_h = _normalise(lifted_H, lifted_h)
    return _hull(_vertices(lifted_H, lifted_h)[:, :n])


def contains_polytope(outer: Polytope, inner: Polytope, tol: float) -> bool:
    """``inner ⊆ outer`` (within ``tol``), checked on the vertices of ``inner``."""
    return bool(np.all(inner.vertices() @ outer.H.T <= outer.h + tol))


def maximal_control_invariant_set(A: np.ndarray, B: np.ndarray, state_limits, u_max,
                                  max_iter: int = 500, tol: float = 1e-10) -> tuple[Polytope, int]:
    """The maximal control-invariant subset of the state box, and the iterations it took.

    Raises ``RuntimeError`` if the iteration does not converge in ``max_iter`` steps
    (the set is then not finitely determined at this tolerance).
    """
    X = box(state_limits)
    C = X
    for k in range(1, max_iter + 1):
        nxt = intersect(pre_set(C, A, B, u_max), X)
        if contains_polytope(nxt, C, tol):
            return nxt, k
        C = nxt
    raise RuntimeError(f"pre-set iteration did not converge in {max_iter} iterations")


def block_product(parts: list[Polytope], axis_index: list[list[int]], dim: int) -> Polytope:
    """Cartesian product: ``parts[i]`` constrains the state coordinates ``axis_index[i]``."""
    rows, rhs = [], []
    for part, idx in zip(parts, axis_index):
        H = np.zeros((part.H.shape[0], dim))
        H[:, idx] = part.H
        rows.append(H)
        rhs.append(part.h)
    return Polytope(np.vstack(rows), np.concatenate(rhs))


@dataclass(frozen=True)
class SafeActionSet:
    """``U_safe(x) = {u : |u| <= u_max, H (drift(x) + B u) <= h}`` for one plant.

    ``invariant``: the control-invariant set ``C``; ``B``: input matrix of the next
    state; ``drift_np``/``drift_torch``: the input-free part of the next state for
    batches ``(..., n)``. ``G = H B`` is constant; only ``b(x)`` changes per step.
    ``separable``: every row of ``G`` touches at most one action coordinate, so the
    projection splits into independent intervals (exact closed form).
    """

    invariant: Polytope
    B: np.ndarray
    u_max: float
    drift_np: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    drift_torch: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    name: str = ""
    drift_matrix: np.ndarray | None = field(default=None, repr=False)
    """``A`` when ``drift(x) = A x`` (lets the per-step projector fold ``H A`` into one product)."""

    @property
    def G(self) -> np.ndarray:
        return self.invariant.H @ self.B

    @property
    def state_dim(self) -> int:
        return self.B.shape[0]

    @property
    def action_dim(self) -> int:
        return self.B.shape[1]

    @property
    def separable(self) -> bool:
        return bool(np.all((np.abs(self.G) > 1e-12).sum(axis=1) <= 1))

    def rhs(self, x):
        """``b(x) = h - H drift(x)`` for batches (numpy or torch)."""
        C = self.invariant
        if isinstance(x, torch.Tensor):
            H = torch.as_tensor(C.H, dtype=x.dtype)
            return torch.as_tensor(C.h, dtype=x.dtype) - self.drift_torch(x) @ H.T
        return C.h - self.drift_np(np.asarray(x, dtype=float)) @ C.H.T

    def next_state(self, x, u):
        B = self.B
        if isinstance(x, torch.Tensor):
            return self.drift_torch(x) + u @ torch.as_tensor(B.T, dtype=x.dtype)
        return self.drift_np(np.asarray(x, dtype=float)) + np.asarray(u) @ B.T


def _linear_drift(A: np.ndarray):
    AT = A.T.copy()
    return (lambda x: x @ AT), (lambda x: x @ torch.as_tensor(AT, dtype=x.dtype))


@functools.lru_cache(maxsize=16)
def _axis_set(A_key: tuple, B_key: tuple, p_max: float, v_max: float, u_max: float) -> tuple[Polytope, int]:
    A = np.array(A_key).reshape(2, 2)
    B = np.array(B_key).reshape(2, 1)
    return maximal_control_invariant_set(A, B, [p_max, v_max], u_max)


def double_integrator_safe_set(system: DoubleIntegrator) -> SafeActionSet:
    """Maximal control-invariant set of ``system`` (cached per parameter set) and its U_safe."""
    one = DoubleIntegrator(dof=1, dt=system.dt)
    axis, _ = _axis_set(tuple(one.A.ravel()), tuple(one.B.ravel()),
                        float(system.p_max), float(system.v_max), float(system.u_max))
    n = system.dof
    C = block_product([axis] * n, [[i, n + i] for i in range(n)], 2 * n)
    drift_np, drift_torch = _linear_drift(system.A)
    return SafeActionSet(C, system.B, float(system.u_max), drift_np, drift_torch,
                         name=f"double_integrator(dof={n})", drift_matrix=system.A)


def pendulum_virtual_input_bound(system: Pendulum) -> float:
    """Acceleration every state can command whatever gravity does: ``3 τ_max a_max - 1.5 g``."""
    bound = 3.0 * system.tau_max * system.a_max - 1.5 * system.g
    if bound <= 0.0:
        raise ValueError("the actuator cannot overcome gravity: no invariant set by this construction")
    return bound


def pendulum_safe_set(system: Pendulum) -> SafeActionSet:
    """Invariant set of the pendulum by the gravity-as-known-input argument (module docstring)."""
    dt = system.dt
    A0 = np.array([[1.0, dt], [0.0, 1.0]])
    B0 = np.array([[dt * dt], [dt]])
    axis, _ = _axis_set(tuple(A0.ravel()), tuple(B0.ravel()), float(system.theta_max),
                        float(system.theta_dot_max), pendulum_virtual_input_bound(system))
    k = 1.5 * system.g
    B = B0 * (3.0 * system.tau_max)

    def drift_np(x):
        w = k * np.sin(x[..., 0:1])
        return x @ A0.T + w * B0[:, 0]

    def drift_torch(x):
        w = k * torch.sin(x[..., 0:1])
        return x @ torch.as_tensor(A0.T, dtype=x.dtype) + w * torch.as_tensor(B0[:, 0], dtype=x.dtype)

    return SafeActionSet(axis, B, float(system.a_max), drift_np, drift_torch, name="pendulum")


def safe_set_for(system) -> SafeActionSet:
    if isinstance(system, DoubleIntegrator):
        return double_integrator_safe_set(system)
    if isinstance(system, Pendulum):
        return pendulum_safe_set(system)
    raise TypeError(f"no safe set construction for {type(system).__name__}")
