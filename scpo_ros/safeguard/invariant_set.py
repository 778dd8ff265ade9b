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

Late commands (``late_commands=1``). A command may be late or missed once: the plant then
holds the previous command one more control period, i.e. the command ``u`` chosen at ``x``
is applied at ``x`` *and* at ``x+ = A x + B u``, reaching ``A x+ + B u = A² x + (A + I) B u``.
The set robust to that is the maximal ``S ⊆ X`` with, for every ``x ∈ S``, a ``u`` in the box
such that both ``A x + B u`` and ``A² x + (A + I) B u`` are in ``S``: the fixed point of
``C_{k+1} = Pre2(C_k) ∩ X``, ``Pre2(C) = {x : ∃u, |u| <= u_max, A x + B u ∈ C,
A² x + (A + I) B u ∈ C}``, the same vertex enumeration with the second block of rows in
the lifted (x, u) polytope (linear plants only: the second step needs ``x+`` linear in x).
``U_safe(x)`` then has two blocks of rows, ``H (A x + B u) <= h`` and ``H (A² x + (A + I) B u)
<= h``, still linear in ``u`` with a constant ``G``. Most rows of the first block are implied
by the second and the box (for the double integrator 4 per axis remain) and are dropped
(``nonredundant_rows``), so the late set costs the projection about what the nominal one
does. Why it works: a command ``u_k ∈ U_safe(x_k)`` keeps ``x_{k+1}`` in ``S`` when it is
applied on time, and keeps ``x_{k+2} = A x_{k+1} + B u_k`` in ``S`` when the next one is
late, so one late command in a row never leaves ``S``, and every state of ``S`` has a
non-empty ``U_safe`` again. The nominal maximal control-invariant set (no late command) is
kept beside it (``SafeActionSet.nominal``, ``S ⊆ nominal``) for the projector's fallback
levels (``projection`` module docstring).

For the double integrator the late set ``S`` is the nominal set itself (the iteration reaches
the same polytope, in about half the iterations since ``Pre2`` looks two steps ahead):
every state that can brake in time can still brake in time after holding a suitable command
once. What the late set changes there is ``U_safe(x)``: the held-command rows exclude the
actions the nominal rows allow right at the boundary (accelerating towards a wall until the
next state sits on the braking curve), which a held command would carry past it. For other
plants ``S`` is strictly smaller (``linear_safe_set``).

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

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

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


def _check_late(late_commands) -> int:
    if late_commands not in (0, 1):
        raise ValueError(f"late_commands must be 0 or 1, got {late_commands!r}")
    return int(late_commands)


def late_blocks(H: np.ndarray, A: np.ndarray, B: np.ndarray, late_commands: int):
    """The next-state constraint ``{H x' <= h}`` as rows on ``(x, u)``: ``(E, G)`` with
    ``E x + G u <= h`` for the next state (``late_commands=0``), stacked with the state one
    held command later (``late_commands=1``: ``x'' = A² x + (A + I) B u``)."""
    E, G = H @ A, H @ B
    if not _check_late(late_commands):
        return E, G
    return np.vstack([E, E @ A]), np.vstack([G, H @ (A + np.eye(A.shape[0])) @ B])


def pre_set(C: Polytope, A: np.ndarray, B: np.ndarray, u_max: np.ndarray, late_commands: int = 0) -> Polytope:
    """``{x : ∃u, |u| <= u_max, A x + B u ∈ C}`` by projecting the (x, u) polytope's vertices;
    with ``late_commands=1`` also ``A² x + (A + I) B u ∈ C`` (``Pre2``, module docstring)."""
    n, m = B.shape
    u_max = np.broadcast_to(np.asarray(u_max, dtype=float), (m,))
    E, G = late_blocks(C.H, A, B, late_commands)
    lifted_H = np.vstack([np.hstack([E, G]),
                          np.hstack([np.zeros((2 * m, n)), np.vstack([np.eye(m), -np.eye(m)])])])
    lifted_h = np.concatenate([np.tile(C.h, len(E) // len(C.h)), u_max, u_max])
    lifted_H, lifted_h = _normalise(lifted_H, lifted_h)
    return _hull(_vertices(lifted_H, lifted_h)[:, :n])


def contains_polytope(outer: Polytope, inner: Polytope, tol: float) -> bool:
    """``inner ⊆ outer`` (within ``tol``), checked on the vertices of ``inner``."""
    return bool(np.all(inner.vertices() @ outer.H.T <= outer.h + tol))


def maximal_control_invariant_set(A: np.ndarray, B: np.ndarray, state_limits, u_max,
                                  max_iter: int = 500, tol: float = 1e-10,
                                  late_commands: int = 0) -> tuple[Polytope, int]:
    """The maximal control-invariant subset of the state box, and the iterations it took;
    with ``late_commands=1`` the maximal subset that stays control invariant when a command
    may be held one extra step (``Pre2``, module docstring).

    Raises ``RuntimeError`` if the iteration does not converge in ``max_iter`` steps
    (the set is then not finitely determined at this tolerance).
    """
    late_commands = _check_late(late_commands)
    X = box(state_limits)
    C = X
    for k in range(1, max_iter + 1):
        nxt = intersect(pre_set(C, A, B, u_max, late_commands), X)
        if contains_polytope(nxt, C, tol):
            return nxt, k
        C = nxt
    raise RuntimeError(f"pre-set iteration did not converge in {max_iter} iterations")


def nonredundant_rows(E: np.ndarray, G: np.ndarray, f: np.ndarray, u_max, match_tol: float = 1e-7,
                      check_tol: float = 1e-10) -> np.ndarray:
    """Mask of the rows of ``P = {(x, u) : E x + G u <= f, |u| <= u_max}`` that are facets of
    ``P`` (box rows excluded from the mask). Dropping the others leaves ``{u : (x, u) ∈ P}``
    unchanged for every ``x``, empty or not. ``P`` must be bounded with the origin inside.

    Every row within ``match_tol`` of a facet is kept (near-duplicates included), and the
    result is verified: every vertex of the reduced polytope must satisfy every row within
    ``check_tol``, so the reduced set exceeds ``P`` by no more than that anywhere (the
    rows are linear and the reduced set is the hull of those vertices). Where the check
    fails, every row is kept.
    """
    k, m = G.shape
    u_max = np.broadcast_to(np.asarray(u_max, dtype=float), (m,))
    L = np.vstack([np.hstack([E, G]), np.hstack([np.zeros((2 * m, E.shape[1])), np.vstack([np.eye(m), -np.eye(m)])])])
    b = np.concatenate([f, u_max, u_max])
    norms = np.linalg.norm(L, axis=1)
    if np.any(norms <= 1e-12):
        return np.ones(k, dtype=bool)
    Ln, bn = L / norms[:, None], b / norms
    facets = _hull(_vertices(Ln, bn))
    close = (np.abs(Ln[:, None, :] - facets.H[None]).max(-1) + np.abs(bn[:, None] - facets.h[None])) < match_tol
    if not close.any(axis=0).all():       # a facet no row explains: keep everything
        return np.ones(k, dtype=bool)
    keep = close.any(axis=1)
    keep[k:] = True                       # the box stays whatever the facets say
    vertices = _vertices(Ln[keep], bn[keep])
    if not np.all(vertices @ Ln.T <= bn + check_tol):
        return np.ones(k, dtype=bool)
    return keep[:k]


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
    """``U_safe(x) = {u : |u| <= u_max, G u <= f - D drift(x)}`` for one plant.

    ``invariant``: the set ``S`` the projection keeps the state in; ``B``: input matrix of
    the next state; ``drift_np``/``drift_torch``: the input-free part of the next state for
    batches ``(..., n)``. ``late_commands=0``: ``D = H``, ``f = h``, ``G = H B`` (the next
    state in ``S``). ``late_commands=1`` (linear drift ``A x`` only): the rows of the next
    state and of the state one held command later, ``D = [H; H A]``, ``f = [h; h]``,
    ``G = [H B; H (A + I) B]``, restricted to ``row_mask`` (the non-redundant rows, see
    ``nonredundant_rows``; all rows when None). ``nominal``: the maximal control-invariant
    set without late commands (``invariant`` itself when ``late_commands=0``). ``G`` is
    constant; only the right-hand side ``rhs(x)`` changes per step. ``separable``: every
    row of ``G`` touches at most one action coordinate, so the projection splits into
    independent intervals (exact closed form).
    """

    invariant: Polytope
    B: np.ndarray
    u_max: float
    drift_np: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    drift_torch: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    name: str = ""
    drift_matrix: np.ndarray | None = field(default=None, repr=False)
    """``A`` when ``drift(x) = A x`` (lets the per-step projector fold ``H A`` into one product)."""
    late_commands: int = 0
    """Late or missed commands in a row the set absorbs (0 or 1; 1 needs ``drift_matrix``)."""
    nominal: Polytope | None = field(default=None, repr=False)
    """The nominal maximal control-invariant set (``S ⊆ nominal``); None: ``invariant``."""
    row_mask: np.ndarray | None = field(default=None, repr=False)
    """``late_commands=1``: which of the stacked rows ``[first block; second block]`` to keep."""

    def __post_init__(self):
        _check_late(self.late_commands)
        if self.late_commands and self.drift_matrix is None:
            raise ValueError(f"late_commands={self.late_commands} needs a linear plant (drift_matrix): "
                             f"the state one held command later is then linear in (x, u)")
        if self.nominal is None:
            object.__setattr__(self, "nominal", self.invariant)

    @functools.cached_property
    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(D, f, G)``: ``U_safe(x) = {u : G u <= f - D drift(x)}`` (box aside)."""
        C = self.invariant
        if not self.late_commands:
            return C.H, C.h, C.H @ self.B
        A = self.drift_matrix
        D = np.vstack([C.H, C.H @ A])
        f = np.concatenate([C.h, C.h])
        G = np.vstack([C.H @ self.B, C.H @ (A + np.eye(A.shape[0])) @ self.B])
        if self.row_mask is not None:
            D, f, G = D[self.row_mask], f[self.row_mask], G[self.row_mask]
        return D, f, G

    @property
    def G(self) -> np.ndarray:
        return self._rows[2]

    def drift_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(D, f)`` with ``rhs(x) = f - D drift(x)`` (rows of ``G`` in the same order)."""
        return self._rows[0], self._rows[1]

    def affine_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(E, G, f)`` with ``U_safe(x) = {u : |u| <= u_max, G u <= f - E x}`` (linear drift only)."""
        if self.drift_matrix is None:
            raise ValueError(f"{self.name or 'this set'} has a nonlinear drift: U_safe(x) is not affine in x")
        D, f, G = self._rows
        return D @ self.drift_matrix, G, f

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
        """``b(x) = f - D drift(x)`` for batches (numpy or torch)."""
        D, f, _ = self._rows
        if isinstance(x, torch.Tensor):
            return torch.as_tensor(f, dtype=x.dtype) - self.drift_torch(x) @ torch.as_tensor(D, dtype=x.dtype).T
        return f - self.drift_np(np.asarray(x, dtype=float)) @ D.T

    def next_state(self, x, u):
        B = self.B
        if isinstance(x, torch.Tensor):
            return self.drift_torch(x) + u @ torch.as_tensor(B.T, dtype=x.dtype)
        return self.drift_np(np.asarray(x, dtype=float)) + np.asarray(u) @ B.T

    def held_state(self, x, u):
        """The state after ``u`` is applied twice from ``x`` (a late command): ``A² x + (A + I) B u``."""
        if self.drift_matrix is None:
            raise ValueError("held_state needs a linear plant (drift_matrix)")
        return self.next_state(self.next_state(x, u), u)

    def nominal_set(self) -> SafeActionSet:
        """The one-step safe action set of the nominal set: ``{u : A x + B u ∈ nominal}``."""
        if not self.late_commands:
            return self
        return dataclasses.replace(self, invariant=self.nominal, late_commands=0, nominal=None, row_mask=None,
                                   name=f"{self.name} nominal")


def _linear_drift(A: np.ndarray):
    AT = A.T.copy()
    return (lambda x: x @ AT), (lambda x: x @ torch.as_tensor(AT, dtype=x.dtype))


@functools.lru_cache(maxsize=16)
def _axis_set(A_key: tuple, B_key: tuple, p_max: float, v_max: float, u_max: float,
              late_commands: int = 0) -> tuple[Polytope, int]:
    A = np.array(A_key).reshape(2, 2)
    B = np.array(B_key).reshape(2, 1)
    return maximal_control_invariant_set(A, B, [p_max, v_max], u_max, late_commands=late_commands)


@functools.lru_cache(maxsize=16)
def _axis_row_mask(A_key: tuple, B_key: tuple, p_max: float, v_max: float, u_max: float) -> np.ndarray:
    """Non-redundant rows of one axis' late set (the stacked two-block rows)."""
    A = np.array(A_key).reshape(2, 2)
    B = np.array(B_key).reshape(2, 1)
    S, _ = _axis_set(A_key, B_key, p_max, v_max, u_max, 1)
    E, G = late_blocks(S.H, A, B, 1)
    mask = nonredundant_rows(E, G, np.concatenate([S.h, S.h]), u_max)
    mask.flags.writeable = False
    return mask


def double_integrator_safe_set(system: DoubleIntegrator, late_commands: int = 0) -> SafeActionSet:
    """Maximal control-invariant set of ``system`` (cached per parameter set) and its U_safe;
    ``late_commands=1``: the set robust to one late command (module docstring)."""
    late_commands = _check_late(late_commands)
    one = DoubleIntegrator(dof=1, dt=system.dt)
    key = (tuple(one.A.ravel()), tuple(one.B.ravel()), float(system.p_max), float(system.v_max),
           float(system.u_max))
    nominal_axis, _ = _axis_set(*key)
    n = system.dof
    axes = [[i, n + i] for i in range(n)]
    nominal = block_product([nominal_axis] * n, axes, 2 * n)
    drift_np, drift_torch = _linear_drift(system.A)
    if not late_commands:
        return SafeActionSet(nominal, system.B, float(system.u_max), drift_np, drift_torch,
                             name=f"double_integrator(dof={n})", drift_matrix=system.A)
    late_axis, _ = _axis_set(*key, 1)
    axis_mask = _axis_row_mask(*key)
    k = len(late_axis.h)
    # The product's stacked rows are [first block: axis 0, .., axis n-1; second block: the same].
    mask = np.concatenate([np.tile(axis_mask[:k], n), np.tile(axis_mask[k:], n)])
    return SafeActionSet(block_product([late_axis] * n, axes, 2 * n), system.B, float(system.u_max),
                         drift_np, drift_torch, name=f"double_integrator(dof={n}, late_commands=1)",
                         drift_matrix=system.A, late_commands=1, nominal=nominal, row_mask=mask)


def linear_safe_set(A: np.ndarray, B: np.ndarray, state_limits, u_max: float, late_commands: int = 0,
                    name: str = "linear") -> SafeActionSet:
    """The safe action set of a linear plant ``x+ = A x + B u`` on the state box ``state_limits``
    (the sets computed in the full state space: for low dimensions; the double integrator
    uses its per-axis product instead, ``double_integrator_safe_set``)."""
    late_commands = _check_late(late_commands)
    A, B = np.asarray(A, dtype=float), np.asarray(B, dtype=float)
    nominal, _ = maximal_control_invariant_set(A, B, state_limits, u_max)
    drift_np, drift_torch = _linear_drift(A)
    if not late_commands:
        return SafeActionSet(nominal, B, float(u_max), drift_np, drift_torch, name=name, drift_matrix=A)
    S, _ = maximal_control_invariant_set(A, B, state_limits, u_max, late_commands=1)
    E, G = late_blocks(S.H, A, B, 1)
    mask = nonredundant_rows(E, G, np.concatenate([S.h, S.h]), u_max)
    return SafeActionSet(S, B, float(u_max), drift_np, drift_torch, name=f"{name}(late_commands=1)", drift_matrix=A,
                         late_commands=1, nominal=nominal, row_mask=mask)


def pendulum_virtual_input_bound(system: Pendulum) -> float:
    """Acceleration every state can command whatever gravity does: ``3 τ_max a_max - 1.5 g``."""
    bound = 3.0 * system.tau_max * system.a_max - 1.5 * system.g
    if bound <= 0.0:
        raise ValueError("the actuator cannot overcome gravity: no invariant set by this construction")
    return bound


def pendulum_safe_set(system: Pendulum, late_commands: int = 0) -> SafeActionSet:
    """Invariant set of the pendulum by the gravity-as-known-input argument (module docstring).
    Nominal only: the state one held command later is not linear in the action here."""
    if _check_late(late_commands):
        raise ValueError("the pendulum supports late_commands=0 only: its drift (gravity) is nonlinear, "
                         "and the late-command set is built for linear plants x+ = A x + B u")
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


def safe_set_for(system, late_commands: int = 0) -> SafeActionSet:
    """The safe action set of ``system``; ``late_commands=1``: robust to one late command
    (linear plants only: a ``ValueError`` for the pendulum)."""
    if isinstance(system, DoubleIntegrator):
        return double_integrator_safe_set(system, late_commands)
    if isinstance(system, Pendulum):
        return pendulum_safe_set(system, late_commands)
    raise TypeError(f"no safe set construction for {type(system).__name__}")
