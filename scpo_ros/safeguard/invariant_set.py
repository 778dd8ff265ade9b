"""Safe sets of a plant and the safe action set ``U_safe(x)`` they induce.

Every set here ends in the same object, ``SafeActionSet``: rows

    D drift(x) + G u + F ρ <= f,   u in the input box [u_min, u_max],   ρ in [rho_min, rho_max]

(``drift(x)`` = the input-free part of the next state, ``A x + c`` for a linear plant), so
``U_safe(x) = {u in box : ∃ρ, G u + F ρ <= f - D drift(x)}``. ``ρ`` are free reference
variables (implicit sets only; zero columns otherwise); the input polytope ``G u <= g`` of the
plant is among the rows (``D = 0``, ``F = 0``). ``safe_set_for(plant, backup, late_commands)``
picks the construction:

**Explicit** (``kind="explicit"``): the maximal control-invariant set, exact, for a linear plant
whose decoupled blocks each have ``n_i + m_i <= 4`` and a bounded state polytope. The pre-set
iteration

    C_0 = X,   C_{k+1} = Pre(C_k) ∩ X,   Pre(C) = {x : ∃u ∈ U, A x + B u + c ∈ C},

stopped when ``C_{k+1} ⊇ C_k``; ``Pre`` is the projection onto x of a polytope in (x, u),
computed by vertex enumeration (qhull: half-space intersection, project the vertices, convex
hull), which also removes redundant rows. qhull needs the origin strictly inside, so the
iteration runs in coordinates shifted to an interior equilibrium ``(x_s, u_s)`` (the
Chebyshev centre of the equilibria inside X and U; the affine term ``c`` vanishes there:
``x̄+ = A x̄ + B ū``). The state rows are ``state_rows()`` (finite box bounds and ``H``), the
input set ``input_rows()`` (an asymmetric box and ``G``). A plant whose (A, B, constraint
rows) split into independent blocks (the double integrator's axes) gets the product of the
blocks' sets: exact, not an approximation (a product's facets are its factors' facets).

Late commands (``late_commands=1``): a command may be late or missed once; the plant then
holds the previous command one more period, so ``u`` chosen at ``x`` is applied at ``x`` and
at ``x+``, reaching ``x++ = A x+ + B u + c``. The robust set is the fixed point of
``Pre2(C) = {x : ∃u ∈ U, x+ ∈ C, x++ ∈ C}`` (the same vertex enumeration with a second block
of rows). ``U_safe(x)`` then has two blocks of rows (``x+`` and ``x++`` in ``S``); the rows
implied by the others and the input set are dropped (``nonredundant_rows``). A command in
``U_safe(x_k)`` keeps ``x_{k+1}`` in ``S`` on time and ``x_{k+2}`` in ``S`` when the next one is
late, and every state of ``S`` has a non-empty ``U_safe`` again. The nominal set (no late
command, ``S ⊆ nominal``) is kept beside it for the projector's fallback levels.
For the double integrator the late set is the nominal set itself; what it changes is
``U_safe(x)`` (the held-command rows exclude accelerating into a wall until the last moment).

**Implicit** (``kind="implicit"``): every other linear plant (vertex enumeration blows up past
three dimensions, ``n + m`` of a block: past that qhull's time on a random 3-state plant
ran from seconds to minutes). ``O_L``: the maximal set of ``(x, r')`` (``r'`` in the certified reference
box) from which the backup ``u = u_ss(r') - K (x - x_ss(r'))`` tracking ``r'`` keeps every
constraint, also when any command is held one extra period: with ``e = x - x_ss(r')`` it is
closed under ``e -> Φ e`` (``Φ = A - B K``) and ``e -> Ψ e`` (``Ψ = A Φ - B K``, the held command:
``A x_ss + B u_ss + c = x_ss``), ``r'`` fixed. Computed by ``O_{k+1} = O_k ∩ Φ⁻¹O_k ∩ Ψ⁻¹O_k``
from the constraint set ``Y`` with redundant rows removed by LPs (HiGHS), no vertex
enumeration; it stops when the mapped rows are all redundant (then ``O_k`` is closed under
both maps). That is finite when the certified references' equilibria have strict slack and
the maps contract (checked; a clear ``ValueError`` otherwise or past ``horizon_s`` seconds of
iterations). Then

    U_safe(x) = {u ∈ U : ∃ρ1: (f(x, u), ρ1) ∈ O_L  and  ∃ρ2: (f(f(x, u), u), ρ2) ∈ O_L}

(``ρ = (ρ1, ρ2)``; only ``ρ1``'s block with ``late_commands=0``, and then ``O_L`` need only be
closed under ``Φ``). Why it keeps the guarantee: if ``(x, r')`` is in ``O_L`` the backup's
command ``u_b`` of ``x`` is in ``U_safe(x)`` (``ρ1 = ρ2 = r'``: ``x+`` is ``Φ e`` and ``x++`` is ``Ψ e``,
both in ``O_L`` by closure). Any ``u ∈ U_safe(x)`` puts ``x+`` in the projection of ``O_L`` (and
``x++`` too if the command is held), so the next state again has a non-empty ``U_safe``
(its backup command, for its witness reference), late command or not; and every state of
``O_L`` satisfies every constraint (``O_L ⊆ Y``). It is not the maximal control-invariant
set but the set the backup can hold, enlarged by the projection's freedom of choosing any
command that lands in it (the MPSC construction with a one-step plan). The membership test
(``contains``) uses the current reference as the witness.

What the implicit set does *not* give, honestly: it is not maximal (a state the projection could
still save may lie outside ``O_L``), and ``O_L`` is the λ-contractive set (``backup_invariant_set``),
slightly smaller than the backup's largest invariant set. When the Ψ-closure keeps growing (the
images of ``Φ`` and ``Ψ`` multiply; every shipped implicit plant), the iteration stops at a row
budget (a quarter more than ``O_Φ``'s) and the held block is taken on ``O_Φ`` instead, the
**fallback "held block on the nominal set"** (in ``name``): one late command then lands the plant
in ``O_Φ``, where the backup's command is in the nominal ``U_safe`` (the projector's level 2), but a
*run* of late commands is not covered. Boundedness: ``O_L`` may be unbounded in a direction the
constraints leave free (the cart's rail); finite determination needs strict slack at the
certified references' equilibria and contracting ``Φ`` (and ``Ψ``).

Cost: the implicit set is LPs (seconds); its final ``U_safe`` rows are pruned (a row the others
imply on the lifted set of ``(x, u, ρ)`` is dropped: ``U_safe(x)`` is unchanged for every ``x``), and
the result is cached per process (an LRU keyed on the plant's data, the backup's gain and
``late_commands``; its arrays are read-only).

**Model plants**: ``plant.model.safe_set(plant, late_commands)`` (the pendulum: the
gravity-as-known-input construction, ``pendulum_safe_set``); a model without one is refused.

Pendulum (``θ'' = 1.5 g sin θ + 3 τ_max a``, semi-implicit Euler): per step
``x+ = A0 x + B0 (w(x) + 3 τ_max a)`` with ``w(x) = 1.5 g sin θ``, ``|w| <= 1.5 g``. Gravity enters
through the input's column and is known when the action is chosen, so any virtual
acceleration ``|v| <= 3 τ_max a_max - 1.5 g`` is reachable from every state: the maximal
control-invariant set of ``(A0, B0)`` with that input box is invariant for the true nonlinear
pendulum, with the exact next-state constraint ``drift(x) = A0 x + B0 w(x)``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linprog
from scipy.spatial import ConvexHull, HalfspaceIntersection, QhullError

EXPLICIT_MAX_DIM = 3
"""Largest ``n + m`` of a block whose maximal control-invariant set is computed by vertex
enumeration (qhull's cost grows steeply with the dimension)."""
IMPLICIT_HORIZON_S = 10.0
"""Default cap on the implicit set's iteration, in closed-loop seconds (iterations × dt)."""


@dataclass(frozen=True)
class Polytope:
    """``{z : H z <= h}`` with rows normalised to unit norm."""

    H: np.ndarray
    h: np.ndarray

    @property
    def dim(self) -> int:
        return self.H.shape[1]

    def contains(self, x, tol: float = 1e-9):
        """Boolean mask over a batch ``x (..., dim)`` (numpy or torch)."""
        if isinstance(x, torch.Tensor):
            H = torch.as_tensor(self.H, dtype=x.dtype)
            h = torch.as_tensor(self.h, dtype=x.dtype)
            return (x @ H.T <= h + tol).all(-1)
        return (np.asarray(x) @ self.H.T <= self.h + tol).all(-1)

    def vertices(self) -> np.ndarray:
        """Vertices (qhull; the origin must be an interior point)."""
        return _vertices(self.H, self.h)

    def shifted(self, z0: np.ndarray) -> Polytope:
        """``{z : z - z0 ∈ self}``."""
        return Polytope(self.H, self.h + self.H @ z0)


def _normalise(H: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(H, axis=1)
    keep = norms > 1e-12
    return H[keep] / norms[keep, None], h[keep] / norms[keep]


def _vertices(H: np.ndarray, h: np.ndarray) -> np.ndarray:
    # qhull's convention: rows [a, -b] for a·x - b <= 0; the origin is strictly inside
    # every set built here (the shifted equilibrium, with slack on every constraint).
    if np.any(h <= 0):
        raise ValueError("the origin must be strictly inside the polytope")
    if H.shape[1] == 1:        # qhull needs 2-D data: the interval's two ends
        a = H[:, 0]
        with np.errstate(divide="ignore"):
            hi = np.min(np.where(a > 0, h / np.where(a > 0, a, 1.0), np.inf))
            lo = np.max(np.where(a < 0, h / np.where(a < 0, a, 1.0), -np.inf))
        return np.array([[lo], [hi]])
    hs = HalfspaceIntersection(np.hstack([H, -h[:, None]]), np.zeros(H.shape[1]))
    return hs.intersections


def _hull(points: np.ndarray, merge_tol: float = 1e-10) -> Polytope:
    """Minimal H-representation of the convex hull of ``points``.

    qhull triangulates facets in 3-D and above: coplanar facets come back as repeated
    equations and are merged here.
    """
    if points.shape[1] == 1:   # qhull needs 2-D data: an interval's facets are its two ends
        lo, hi = float(points.min()), float(points.max())
        return Polytope(np.array([[1.0], [-1.0]]), np.array([hi, -lo]))
    hull = ConvexHull(points)
    H, h = hull.equations[:, :-1], -hull.equations[:, -1]
    H, h = _normalise(H, h)
    rows = np.round(np.hstack([H, h[:, None]]) / merge_tol) * merge_tol
    _, first = np.unique(rows, axis=0, return_index=True)
    first = np.sort(first)
    return Polytope(H[first], h[first])


def box(limits, lower=None) -> Polytope:
    """``{|x_i| <= limits_i}``, or ``{lower_i <= x_i <= limits_i}`` when ``lower`` is given."""
    limits = np.asarray(limits, dtype=float)
    lower = -limits if lower is None else np.asarray(lower, dtype=float)
    n = len(limits)
    return Polytope(np.vstack([np.eye(n), -np.eye(n)]), np.concatenate([limits, -lower]))


def intersect(a: Polytope, b: Polytope) -> Polytope:
    """Intersection with redundant rows removed."""
    return _hull(_vertices(np.vstack([a.H, b.H]), np.concatenate([a.h, b.h])))


def _check_late(late_commands) -> int:
    if late_commands not in (0, 1):
        raise ValueError(f"late_commands must be 0 or 1, got {late_commands!r}")
    return int(late_commands)


def _input_set(u_max, m: int) -> Polytope:
    """The input set as a polytope: a given ``Polytope``, or the symmetric box ``|u| <= u_max``."""
    if isinstance(u_max, Polytope):
        return u_max
    return box(np.broadcast_to(np.asarray(u_max, dtype=float), (m,)))


def late_blocks(H: np.ndarray, A: np.ndarray, B: np.ndarray, late_commands: int):
    """The next-state constraint ``{H x' <= h}`` as rows on ``(x, u)`` (origin-shifted coordinates):
    ``(E, G)`` with ``E x + G u <= h`` for the next state (``late_commands=0``), stacked with the
    state one held command later (``late_commands=1``: ``x'' = A² x + (A + I) B u``)."""
    E, G = H @ A, H @ B
    if not _check_late(late_commands):
        return E, G
    return np.vstack([E, E @ A]), np.vstack([G, H @ (A + np.eye(A.shape[0])) @ B])


def disturbance_margin(H: np.ndarray, A: np.ndarray, w, late_commands: int) -> np.ndarray:
    """How much each next-state row ``H x' <= h`` loses to an additive disturbance ``|w_i| <= w_i``
    per step: ``|H| w`` for the next state, then (``late_commands=1``) ``|H A| w + |H| w`` for the
    state one held command later (two disturbances, the first one propagated). Zeros for
    ``w=None``, stacked like ``late_blocks``."""
    k = len(H) * (1 + _check_late(late_commands))
    if w is None:
        return np.zeros(k)
    w = np.asarray(w, dtype=float)
    one = np.abs(H) @ w
    return one if not late_commands else np.concatenate([one, np.abs(H @ A) @ w + one])


def pre_set(C: Polytope, A: np.ndarray, B: np.ndarray, u_max, late_commands: int = 0, w=None) -> Polytope:
    """``{x : ∃u ∈ U, A x + B u + w ∈ C for every |w| <= w}`` by projecting the (x, u) polytope's
    vertices; with ``late_commands=1`` also ``A² x + (A + I) B u (+ A w + w') ∈ C`` (``Pre2``).
    ``u_max``: the input set (a ``Polytope`` in u, or the bound of a symmetric box); ``w``: the
    per-state disturbance bound (None: the nominal pre-set)."""
    n, m = B.shape
    U = _input_set(u_max, m)
    E, G = late_blocks(C.H, A, B, late_commands)
    lifted_H = np.vstack([np.hstack([E, G]), np.hstack([np.zeros((len(U.h), n)), U.H])])
    lifted_h = np.concatenate([np.tile(C.h, len(E) // len(C.h)) - disturbance_margin(C.H, A, w, late_commands),
                               U.h])
    lifted_H, lifted_h = _normalise(lifted_H, lifted_h)
    return _hull(_vertices(lifted_H, lifted_h)[:, :n])


def contains_polytope(outer: Polytope, inner: Polytope, tol: float) -> bool:
    """``inner ⊆ outer`` (within ``tol``), checked on the vertices of ``inner``."""
    return bool(np.all(inner.vertices() @ outer.H.T <= outer.h + tol))


def maximal_control_invariant_set(A: np.ndarray, B: np.ndarray, state_limits, u_max,
                                  max_iter: int = 500, tol: float = 1e-10,
                                  late_commands: int = 0, time_budget_s: float = 5.0,
                                  w=None) -> tuple[Polytope, int]:
    """The maximal control-invariant subset of the state set, and the iterations it took; with
    ``late_commands=1`` the maximal subset that stays control invariant when a command may be
    held one extra step (``Pre2``); with ``w`` the maximal *robust* one, invariant whatever
    additive disturbance ``|w_i| <= w_i`` acts per step. ``state_limits``: a ``Polytope`` or the
    bounds of a symmetric box; ``u_max`` likewise for the input set. Origin-shifted coordinates
    (the origin strictly inside both sets, ``x+ = A x + B u``).

    Raises ``RuntimeError`` if the iteration does not converge in ``max_iter`` steps or within
    ``time_budget_s`` (vertex enumeration can grow without bound on near-degenerate plants: the
    caller, ``safe_set_for``, then takes the implicit construction, which scales).
    """
    late_commands = _check_late(late_commands)
    X = state_limits if isinstance(state_limits, Polytope) else box(state_limits)
    U = _input_set(u_max, B.shape[1])
    C = X
    deadline = time.monotonic() + time_budget_s
    for k in range(1, max_iter + 1):
        nxt = intersect(pre_set(C, A, B, U, late_commands, w), X)
        if contains_polytope(nxt, C, tol):
            return nxt, k
        if time.monotonic() > deadline:
            raise RuntimeError(f"pre-set iteration did not converge within {time_budget_s:g} s ({k} iterations, "
                               f"{len(nxt.h)} rows)")
        C = nxt
    raise RuntimeError(f"pre-set iteration did not converge in {max_iter} iterations")


def nonredundant_rows(E: np.ndarray, G: np.ndarray, f: np.ndarray, u_max, match_tol: float = 1e-7,
                      check_tol: float = 1e-10) -> np.ndarray:
    """Mask of the rows of ``P = {(x, u) : E x + G u <= f, u ∈ U}`` that are facets of ``P``
    (``U``: ``u_max`` as in ``pre_set``; its rows are not in the mask). Dropping the others
    leaves ``{u : (x, u) ∈ P}`` unchanged for every ``x``. ``P`` must be bounded with the origin
    inside.

    Every row within ``match_tol`` of a facet is kept (near-duplicates included), and the
    result is verified: every vertex of the reduced polytope must satisfy every row within
    ``check_tol``. Where the check fails, every row is kept.
    """
    k, m = G.shape
    U = _input_set(u_max, m)
    L = np.vstack([np.hstack([E, G]), np.hstack([np.zeros((len(U.h), E.shape[1])), U.H])])
    b = np.concatenate([f, U.h])
    norms = np.linalg.norm(L, axis=1)
    if np.any(norms <= 1e-12):
        return np.ones(k, dtype=bool)
    Ln, bn = L / norms[:, None], b / norms
    facets = _hull(_vertices(Ln, bn))
    close = (np.abs(Ln[:, None, :] - facets.H[None]).max(-1) + np.abs(bn[:, None] - facets.h[None])) < match_tol
    if not close.any(axis=0).all():       # a facet no row explains: keep everything
        return np.ones(k, dtype=bool)
    keep = close.any(axis=1)
    keep[k:] = True                       # the input set stays whatever the facets say
    vertices = _vertices(Ln[keep], bn[keep])
    if not np.all(vertices @ Ln.T <= bn + check_tol):
        return np.ones(k, dtype=bool)
    return keep[:k]


def block_product(parts: list[Polytope], axis_index: list[list[int]], dim: int) -> Polytope:
    """Cartesian product: ``parts[i]`` constrains the coordinates ``axis_index[i]``."""
    rows, rhs = [], []
    for part, idx in zip(parts, axis_index):
        H = np.zeros((part.H.shape[0], dim))
        H[:, idx] = part.H
        rows.append(H)
        rhs.append(part.h)
    return Polytope(np.vstack(rows), np.concatenate(rhs))


def _as_vec(a, m: int) -> np.ndarray:
    out = np.array(np.broadcast_to(np.asarray(a, dtype=float), (m,)), dtype=float)
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class SafeActionSet:
    """``U_safe(x) = {u : u_min <= u <= u_max, ∃ρ ∈ [rho_min, rho_max]: G u + F ρ <= f - D drift(x)}``.

    ``invariant``: the set ``S`` the projection keeps the state in, a polytope in ``x``
    (explicit sets) or in ``(x, r)`` (implicit sets: ``O_L``, ``ref_dim`` reference columns; its
    membership needs a witness reference, ``contains``). ``B``: the input matrix of the next
    state; ``drift_np``/``drift_torch``: the input-free part of the next state for batches
    ``(..., n)`` (``A x + c`` for linear plants, ``drift_matrix = A``, ``drift_offset = c``).
    ``late_commands=1`` (linear plants): the rows of the next state and of the state one held
    command later. ``nominal_rows``: the set without late commands (``nominal_set()``; None:
    this set itself). ``kind``: ``explicit``, ``implicit`` or ``model`` (with ``name``, in logs).
    ``G`` is constant; only the right-hand side ``rhs(x)`` changes per step. ``separable``: no
    ``ρ`` and every row of ``G`` touches at most one action coordinate (the projection splits
    into independent intervals, exact closed form).
    """

    invariant: Polytope
    B: np.ndarray
    u_min: np.ndarray
    u_max: np.ndarray
    D: np.ndarray = field(repr=False)
    G: np.ndarray = field(repr=False)
    F: np.ndarray = field(repr=False)
    f: np.ndarray = field(repr=False)
    drift_np: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    drift_torch: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    name: str = ""
    kind: str = "explicit"
    drift_matrix: np.ndarray | None = field(default=None, repr=False)
    """``A`` when ``drift(x) = A x + c`` (the per-step projector folds ``D A`` into one product)."""
    drift_offset: np.ndarray | None = field(default=None, repr=False)
    late_commands: int = 0
    nominal_rows: SafeActionSet | None = field(default=None, repr=False)
    rho_min: np.ndarray | None = field(default=None, repr=False)
    rho_max: np.ndarray | None = field(default=None, repr=False)
    ref_dim: int = 0
    """Reference columns of ``invariant`` (``nr`` for an implicit set, else 0)."""
    w_max: np.ndarray | None = field(default=None, repr=False)
    """The per-state bound of the additive disturbance the set is robust to (None: nominal)."""

    def __post_init__(self):
        _check_late(self.late_commands)
        if self.late_commands and self.drift_matrix is None:
            raise ValueError(f"late_commands={self.late_commands} needs a linear plant (drift_matrix): "
                             f"the state one held command later is then linear in (x, u)")
        m = self.B.shape[1]
        object.__setattr__(self, "u_min", _as_vec(self.u_min, m))
        object.__setattr__(self, "u_max", _as_vec(self.u_max, m))
        p = self.F.shape[1]
        object.__setattr__(self, "rho_min", _as_vec(-np.inf if self.rho_min is None else self.rho_min, p))
        object.__setattr__(self, "rho_max", _as_vec(np.inf if self.rho_max is None else self.rho_max, p))
        if self.drift_offset is None:
            object.__setattr__(self, "drift_offset", np.zeros(self.B.shape[0]))

    # ------------------------------------------------------------------ sizes and views
    @property
    def state_dim(self) -> int:
        return self.B.shape[0]

    @property
    def action_dim(self) -> int:
        return self.B.shape[1]

    @property
    def rho_dim(self) -> int:
        return self.F.shape[1]

    @property
    def nominal(self) -> Polytope:
        """The nominal set (``S ⊆ nominal``): the set of ``nominal_set()``."""
        return self.invariant if self.nominal_rows is None else self.nominal_rows.invariant

    @property
    def separable(self) -> bool:
        return self.rho_dim == 0 and bool(np.all((np.abs(self.G) > 1e-12).sum(axis=1) <= 1))

    def nominal_set(self) -> SafeActionSet:
        """The one-step safe action set of the nominal set (``late_commands=0``)."""
        return self if self.nominal_rows is None else self.nominal_rows

    def drift_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(D, f)`` with ``rhs(x) = f - D drift(x)`` (rows of ``G`` in the same order)."""
        return self.D, self.f

    def affine_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(E, G, F, f)`` with ``U_safe(x) = {u in box : ∃ρ: E x + G u + F ρ <= f}`` (linear drift
        only; ``f`` has the affine term folded in). ``ρ = (r, r)`` (``rho_of``) implies membership."""
        if self.drift_matrix is None:
            raise ValueError(f"{self.name or 'this set'} has a nonlinear drift: U_safe(x) is not affine in x")
        return self.D @ self.drift_matrix, self.G, self.F, self.f - self.D @ self.drift_offset

    def rho_of(self, r=None) -> np.ndarray:
        """The reference variables of reference ``r (nr,)``: ``r`` once per block, clipped to the
        box; the box centre without a reference."""
        p = self.rho_dim
        if p == 0:
            return np.zeros(0)
        centre = np.where(np.isfinite(self.rho_min + self.rho_max), (self.rho_min + self.rho_max) / 2.0, 0.0)
        if r is None or np.size(r) == 0:
            return centre
        r = np.asarray(r, dtype=float).ravel()
        if p % len(r) or not np.isfinite(r).all():
            return centre
        return np.clip(np.tile(r, p // len(r)), self.rho_min, self.rho_max)

    # ------------------------------------------------------------------ per state
    def rhs(self, x):
        """``b(x) = f - D drift(x)`` for batches (numpy or torch)."""
        if isinstance(x, torch.Tensor):
            return torch.as_tensor(self.f, dtype=x.dtype) - self.drift_torch(x) @ torch.as_tensor(self.D.T,
                                                                                                   dtype=x.dtype)
        return self.f - self.drift_np(np.asarray(x, dtype=float)) @ self.D.T

    def contains(self, x, r=None, tol: float = 1e-9):
        """Whether ``x`` is in ``S`` (implicit sets: ``(x, r) ∈ O_L`` with the reference ``r`` as the
        witness, the box centre without one)."""
        if not self.ref_dim:
            return self.invariant.contains(x, tol)
        x = np.asarray(x, dtype=float)
        rr = self.rho_of(r)[:self.ref_dim]
        z = np.concatenate([x, np.broadcast_to(rr, x.shape[:-1] + (self.ref_dim,))], axis=-1)
        return self.invariant.contains(z, tol)

    def next_state(self, x, u):
        if isinstance(x, torch.Tensor):
            return self.drift_torch(x) + u @ torch.as_tensor(self.B.T, dtype=x.dtype)
        return self.drift_np(np.asarray(x, dtype=float)) + np.asarray(u) @ self.B.T

    def held_state(self, x, u):
        """The state after ``u`` is applied twice from ``x`` (a late command)."""
        if self.drift_matrix is None:
            raise ValueError("held_state needs a linear plant (drift_matrix)")
        return self.next_state(self.next_state(x, u), u)


def _frozen(a) -> np.ndarray:
    a = np.array(a, dtype=float)
    a.flags.writeable = False
    return a


def _affine_drift(A: np.ndarray, c: np.ndarray | None = None):
    AT = A.T.copy()
    c = np.zeros(A.shape[0]) if c is None else np.asarray(c, dtype=float).copy()
    if not c.any():
        return (lambda x: x @ AT), (lambda x: x @ torch.as_tensor(AT, dtype=x.dtype))
    return ((lambda x: x @ AT + c),
            (lambda x: x @ torch.as_tensor(AT, dtype=x.dtype) + torch.as_tensor(c, dtype=x.dtype)))


def _split_input_set(U: Polytope, m: int):
    """``(u_min, u_max, Gp, gp)``: the box rows of a polytopic input set (unit rows ``±e_j``) and
    the other rows. The box must bound every coordinate (the plant's inputs always do)."""
    lo, hi = np.full(m, -np.inf), np.full(m, np.inf)
    other = []
    for row, b in zip(U.H, U.h):
        nz = np.flatnonzero(np.abs(row) > 1e-12)
        if len(nz) == 1 and abs(abs(row[nz[0]]) - 1.0) < 1e-12:
            j = nz[0]
            if row[j] > 0:
                hi[j] = min(hi[j], b)
            else:
                lo[j] = max(lo[j], -b)
        else:
            other.append((row, b))
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("the input set needs a finite box on every input")
    Gp = np.array([r for r, _ in other]).reshape(len(other), m)
    return lo, hi, Gp, np.array([b for _, b in other], dtype=float)


# ====================================================================== explicit sets

def decoupled_blocks(A: np.ndarray, B: np.ndarray, HX: np.ndarray, HU: np.ndarray) -> list[tuple[list, list]]:
    """The independent blocks ``[(states, inputs), ...]`` of a linear plant: states and inputs
    joined by a nonzero of ``A`` or ``B`` or by a common constraint row (``HX`` on states, ``HU``
    on inputs), ordered by their first state. One block when everything is coupled."""
    n, m = B.shape
    parent = list(range(n + m))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(idx):
        idx = list(idx)
        for j in idx[1:]:
            parent[find(j)] = find(idx[0])

    for i, j in zip(*np.nonzero(np.abs(A) > 0)):
        join([i, j])
    for i, j in zip(*np.nonzero(np.abs(B) > 0)):
        join([i, n + j])
    for row in HX:
        join(np.flatnonzero(np.abs(row) > 0))
    for row in HU:
        join(n + np.flatnonzero(np.abs(row) > 0))
    groups: dict[int, tuple[list, list]] = {}
    for i in range(n + m):
        s, u = groups.setdefault(find(i), ([], []))
        (s if i < n else u).append(i if i < n else i - n)
    return sorted(groups.values(), key=lambda g: (g[0] or [n])[0])


def interior_equilibrium(A, B, c, X: Polytope, U: Polytope) -> tuple[np.ndarray, np.ndarray, float]:
    """``(x_s, u_s, radius)``: the equilibrium ``A x + B u + c = x`` deepest inside ``X × U`` (the
    Chebyshev centre: the largest distance to every constraint row, an LP). ``ValueError``
    when no equilibrium lies strictly inside (the sets are built around one)."""
    n, m = B.shape
    nx, nu = np.linalg.norm(X.H, axis=1), np.linalg.norm(U.H, axis=1)
    A_ub = np.vstack([np.hstack([X.H, np.zeros((len(X.h), m)), nx[:, None]]),
                      np.hstack([np.zeros((len(U.h), n)), U.H, nu[:, None]])])
    b_ub = np.concatenate([X.h, U.h])
    A_eq = np.hstack([A - np.eye(n), B, np.zeros((n, 1))])
    cost = np.zeros(n + m + 1)
    cost[-1] = -1.0
    res = linprog(cost, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=-np.asarray(c, dtype=float),
                  bounds=[(None, None)] * (n + m) + [(None, 1e6)], method="highs")
    if res.status != 0 or res.x[-1] <= 0.0:
        raise ValueError("no equilibrium lies strictly inside the state and input constraints: "
                         "the safe set needs one to be built around")
    x, u = res.x[:n], res.x[n:n + m]
    return x, u, float(res.x[-1])


def _bounded(P: Polytope) -> bool:
    """Whether ``P`` (non-empty) is bounded: every coordinate's max and min is finite (LPs)."""
    d = P.dim
    for i in range(d):
        for s in (1.0, -1.0):
            cost = np.zeros(d)
            cost[i] = -s
            res = linprog(cost, A_ub=P.H, b_ub=P.h, bounds=[(None, None)] * d, method="highs")
            if res.status != 0:
                return False
    return True


_BLOCK_CACHE: dict = {}


def _block_sets(A, B, X: Polytope, U: Polytope, late_commands: int, w=None):
    """``(nominal, late set or None, row mask or None)`` of one block in origin-shifted
    coordinates, robust to the disturbance bound ``w`` (None: nominal), cached per block data
    (the double integrator's axes are computed once)."""
    wk = None if w is None else np.ascontiguousarray(w, dtype=float)
    key = tuple(np.ascontiguousarray(a).tobytes() for a in (A, B, X.H, X.h, U.H, U.h)) + (late_commands,) + \
        (None if wk is None else wk.tobytes(),)
    if key not in _BLOCK_CACHE:
        nominal, _ = maximal_control_invariant_set(A, B, X, U, w=wk)
        S = mask = None
        if late_commands:
            S, _ = maximal_control_invariant_set(A, B, X, U, late_commands=1, w=wk)
            E, G = late_blocks(S.H, A, B, 1)
            mask = nonredundant_rows(E, G, np.concatenate([S.h, S.h]) - disturbance_margin(S.H, A, wk, 1), U)
            mask.flags.writeable = False
        if len(_BLOCK_CACHE) > 64:
            _BLOCK_CACHE.clear()
        _BLOCK_CACHE[key] = (nominal, S, mask)
    return _BLOCK_CACHE[key]


def _sub_polytope(P: Polytope, idx: list) -> Polytope:
    """The rows of ``P`` that touch only the coordinates ``idx``, on those coordinates."""
    others = np.setdiff1d(np.arange(P.dim), idx)
    rows = ~(np.abs(P.H[:, others]) > 0).any(axis=1) & (np.abs(P.H[:, idx]) > 0).any(axis=1)
    H, h = _normalise(P.H[rows][:, idx], P.h[rows])
    return Polytope(H, h)


def explicit_blocks(A, B, c, X: Polytope, U: Polytope, max_dim: int = EXPLICIT_MAX_DIM):
    """``(x_s, u_s, [(states, inputs, X_i, U_i), ...])`` when the explicit construction applies:
    every decoupled block has ``n_i + m_i <= max_dim``, at least one input and a bounded state
    polytope; ``None`` otherwise. ``X_i``, ``U_i`` are shifted to the interior equilibrium."""
    try:
        x_s, u_s, _ = interior_equilibrium(A, B, c, X, U)
    except ValueError:
        return None
    Xs = Polytope(*_normalise(X.H, X.h - X.H @ x_s))
    Us = Polytope(*_normalise(U.H, U.h - U.H @ u_s))
    out = []
    for states, inputs in decoupled_blocks(A, B, X.H, U.H):
        if not inputs or not states or len(states) + len(inputs) > max_dim:
            return None
        Xi, Ui = _sub_polytope(Xs, states), _sub_polytope(Us, inputs)
        if len(Xi.h) <= len(states) or not _bounded(Xi):
            return None
        out.append((states, inputs, Xi, Ui))
    return x_s, u_s, out


def explicit_safe_set(A, B, c, X: Polytope, U: Polytope, late_commands: int = 0, name: str = "linear",
                      blocks=None, w=None) -> SafeActionSet:
    """The maximal (late-command robust) control-invariant set of ``x+ = A x + B u + c`` in the
    state polytope ``X`` with inputs in ``U`` (original coordinates), and its ``U_safe``
    (module docstring); with ``w`` (per-state bound of an additive disturbance) the maximal
    robust control-invariant set and the ``U_safe`` that keeps the next state in it whatever
    the disturbance. ``blocks``: ``explicit_blocks``' result (computed when None)."""
    late_commands = _check_late(late_commands)
    A, B = np.asarray(A, dtype=float), np.asarray(B, dtype=float)
    n, m = B.shape
    c = np.zeros(n) if c is None else np.asarray(c, dtype=float)
    blocks = explicit_blocks(A, B, c, X, U) if blocks is None else blocks
    if blocks is None:
        raise ValueError(f"{name}: no explicit safe set (a block with n + m > {EXPLICIT_MAX_DIM}, an unbounded "
                         f"state set, or no equilibrium strictly inside the constraints)")
    x_s, _, parts = blocks
    w = None if w is None or not np.any(np.asarray(w) > 0) else np.asarray(w, dtype=float)
    if w is not None and not np.isfinite(w).all():
        raise ValueError(f"{name}: the disturbance bound must be finite, got {w.tolist()}")
    sets = [_block_sets(A[np.ix_(s, s)], B[np.ix_(s, u)], Xi, Ui, late_commands, None if w is None else w[s])
            for s, u, Xi, Ui in parts]
    idx = [s for s, _, _, _ in parts]
    nominal = block_product([p[0] for p in sets], idx, n).shifted(x_s)
    u_min, u_max, Gp, gp = _split_input_set(U, m)
    drift_np, drift_torch = _affine_drift(A, c)
    common = dict(B=B, u_min=u_min, u_max=u_max, drift_np=drift_np, drift_torch=drift_torch,
                  drift_matrix=A, drift_offset=c, kind="explicit", w_max=None if w is None else _frozen(w))
    nom = _explicit_rows(nominal, A, B, c, Gp, gp, 0, None, w)
    nominal_set = SafeActionSet(nominal, **nom, **common, name=name)
    if not late_commands:
        return nominal_set
    S = block_product([p[1] for p in sets], idx, n).shifted(x_s)
    k = [len(p[1].h) for p in sets]
    mask = np.concatenate([p[2][:ki] for p, ki in zip(sets, k)] + [p[2][ki:] for p, ki in zip(sets, k)])
    rows = _explicit_rows(S, A, B, c, Gp, gp, 1, mask, w)
    return SafeActionSet(S, **rows, **common, name=f"{name}(late_commands=1)", late_commands=1,
                         nominal_rows=nominal_set)


def _explicit_rows(S: Polytope, A, B, c, Gp, gp, late_commands: int, mask, w=None) -> dict:
    """``D, G, F, f`` of ``U_safe`` for the set ``S`` (original coordinates, ``drift = A x + c``):
    ``S_H x+ <= S_h``, with ``late_commands=1`` also ``S_H x++ <= S_h`` (``x++ = A drift(x) + c +
    (A + I) B u``) restricted to ``mask``, each less its ``disturbance_margin``, then the input
    polytope's rows."""
    D, G, f = S.H, S.H @ B, S.h
    if late_commands:
        D = np.vstack([D, S.H @ A])
        G = np.vstack([G, S.H @ (A + np.eye(A.shape[0])) @ B])
        f = np.concatenate([f, S.h - S.H @ c])
    f = f - disturbance_margin(S.H, A, w, late_commands)
    if late_commands and mask is not None:
        D, G, f = D[mask], G[mask], f[mask]
    D = np.vstack([D, np.zeros((len(gp), A.shape[0]))])
    G = np.vstack([G, Gp])
    f = np.concatenate([f, gp])
    return dict(D=D, G=G, F=np.zeros((len(f), 0)), f=f)


# ====================================================================== implicit sets

def _lp_max(a: np.ndarray, H: np.ndarray, h: np.ndarray, bounds=None) -> float:
    """``max a·z  s.t.  H z <= h`` (and ``bounds``, per coordinate; default free) (``inf`` when
    unbounded, ``-inf`` when empty)."""
    bounds = [(None, None)] * len(a) if bounds is None else bounds
    res = linprog(-a, A_ub=H, b_ub=h, bounds=bounds, method="highs")
    if res.status == 0:
        return float(-res.fun)
    return math.inf if res.status == 3 else -math.inf


def _bounding_box(H, h) -> tuple[np.ndarray, np.ndarray]:
    d = H.shape[1]
    eye = np.eye(d)
    return (np.array([-_lp_max(-eye[i], H, h) for i in range(d)]),
            np.array([_lp_max(eye[i], H, h) for i in range(d)]))


def _redundant(rows: np.ndarray, rhs: np.ndarray, H: np.ndarray, h: np.ndarray, lo, hi, tol) -> np.ndarray:
    """Which of ``rows z <= rhs`` hold on all of ``{H z <= h}`` (within ``tol``, per row): first the
    cheap support function of its bounding box ``[lo, hi]``, then one LP for each row the box cannot settle."""
    c, w = (lo + hi) / 2.0, (hi - lo) / 2.0
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(lo) & np.isfinite(hi)
        touch_inf = (np.abs(rows[:, ~finite]) > 0).any(axis=1)
        support = rows[:, finite] @ c[finite] + np.abs(rows[:, finite]) @ w[finite]
    tol = np.broadcast_to(tol, rhs.shape)
    out = ~touch_inf & (support <= rhs + tol)
    for i in np.flatnonzero(~out):
        out[i] = _lp_max(rows[i], H, h) <= rhs[i] + tol[i]
    return out


def _prune(H: np.ndarray, h: np.ndarray, tol: float, first: int = 0):
    """Drop the rows from ``first`` on that the others imply (one LP per row, removed as found);
    returns the rows (kept ones in order) and how many of the rows from ``first`` on survive."""
    keep = np.ones(len(h), dtype=bool)
    for i in range(first, len(h)):
        keep[i] = False
        if _lp_max(H[i], H[keep], h[keep]) > h[i] + tol:   # needed (or unbounded without it)
            keep[i] = True
    return H[keep], h[keep], int(keep[first:].sum())


def _prune_action_rows(E: np.ndarray, G: np.ndarray, F: np.ndarray, f: np.ndarray, u_min, u_max, rho_min,
                       rho_max, tol: float = 1e-9) -> np.ndarray:
    """Mask of the rows of ``E x + G u + F ρ <= f`` to keep: a row the others imply on the whole
    lifted set ``{(x, u, ρ) : rows, u and ρ in their boxes}`` is dropped (one LP each, removed as
    found). The lifted set is unchanged, so ``U_safe(x)`` is unchanged for every ``x``: exact, not
    an approximation (an unbounded LP keeps its row)."""
    L = np.hstack([E, G, F])
    free = [(None, None)] * E.shape[1]
    box_ = [(lo if np.isfinite(lo) else None, hi if np.isfinite(hi) else None)
            for lo, hi in zip(np.concatenate([u_min, rho_min]), np.concatenate([u_max, rho_max]))]
    keep = np.ones(len(f), dtype=bool)
    scale = np.maximum(1.0, np.abs(f))
    for i in range(len(f)):
        keep[i] = False
        if _lp_max(L[i], L[keep], f[keep], free + box_) > f[i] + tol * scale[i]:
            keep[i] = True
    return keep


def _constraint_rows(plant, backup):
    """``Y`` in ``(e, r)``: every state and input row of the backup tracking ``r`` from the error
    ``e`` (``x = x_ss(r) + e``, ``u = u_ss(r) - K e``), and the reference box; with the rows' names."""
    n, nr = plant.n, plant.nr
    Mx, mx, Mu, mu = (np.asarray(a, dtype=float) for a in plant.equilibrium_map())
    Fs, fs, ns = plant.state_rows()
    Fi, fi, ni = plant.input_rows()
    eye = np.eye(nr)
    reg = plant.region
    H = np.vstack([np.hstack([Fs, Fs @ Mx]), np.hstack([-Fi @ backup.K, Fi @ Mu]),
                   np.hstack([np.zeros((nr, n)), eye]), np.hstack([np.zeros((nr, n)), -eye])])
    h = np.concatenate([fs - Fs @ mx, fi - Fi @ mu, reg.r_max, -reg.r_min])
    names = tuple(ns) + tuple(ni) + tuple(f"reference_{i}<=max" for i in range(nr)) + \
        tuple(f"reference_{i}>=min" for i in range(nr))
    return H, h, names


def _check_equilibrium_slack(plant, H, h, names) -> None:
    """Finite determination needs every row to have strict slack at ``(e, r) = (0, r)`` for every
    certified reference ``r`` (the support function of the reference box)."""
    n, nr = plant.n, plant.nr
    reg = plant.region
    c, w = (reg.r_min + reg.r_max) / 2.0, (reg.r_max - reg.r_min) / 2.0
    Hr = H[:, n:]
    slack = h - Hr @ c - np.abs(Hr) @ w
    scale = np.maximum(1.0, np.abs(h))
    rows = np.arange(len(h)) < len(h) - 2 * nr          # the reference box rows themselves aside
    bad = np.flatnonzero(rows & (slack <= 1e-9 * scale))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{plant.name}: no implicit safe set: the equilibrium of a certified reference sits on "
                         f"constraint {names[i]} (slack {slack[i]:.3g}); shrink certified_region.r_max or relax "
                         f"that limit (the set is finitely determined only with strict slack)")


def backup_invariant_set(plant, backup, held: bool = True, horizon_s: float = IMPLICIT_HORIZON_S,
                         contraction: float = 0.2, max_rows: int = 600, w=None) -> tuple[Polytope, int]:
    """``O_L`` in ``(x, r)`` and the iterations it took: a set of states and certified references
    from which the backup keeps every constraint, closed under ``Φ`` and (``held``) ``Ψ`` (module
    docstring). ``ValueError`` when it is not finitely determined within ``horizon_s`` seconds of
    iterations or a closed loop does not contract.

    The iteration runs on the scaled maps ``Φ/λ``, ``Ψ/λ`` (``1 - λ = contraction (1 - ρ)``, ``ρ`` the
    larger spectral radius): the set is then λ-contractive, and a mapped row may be dropped as
    redundant when it exceeds its bound by at most ``δ_i = (1 - λ) s_i / (2 λ)`` (``s_i``: the row's
    slack at the equilibria of the reference box), which still leaves the set exactly closed under
    the true maps: for ``(e, r)`` in the set, ``a·Φe <= λ (h - a_r r + δ_i) <= h - a_r r``. Without
    that slack, the two maps' images are near-parallel rows that never become redundant and
    their number doubles every step.

    With ``w`` (the per-state bound of an additive disturbance, ``e+ = Φ e + w``) the set is
    robustly closed: a row ``a·e + a_r r <= b`` maps to ``a Φ e + a_r r <= b - |a| w`` (and, held,
    ``a Ψ e + a_r r <= b - |a A| w - |a| w``: two disturbances). The argument above then holds with
    each row's robust slack, which must stay positive at the certified references' equilibria:
    otherwise a disturbance sequence pushes the backup out of a constraint from its own
    equilibrium, and the set is refused (``ValueError``) with that reason."""
    n = plant.n
    Phi = backup.A_cl
    eye = np.eye(n)
    maps = [("Φ", Phi, [eye])] + ([("Ψ", backup.A @ Phi - backup.B @ backup.K, [backup.A, eye])] if held else [])
    w = None if w is None or not np.any(np.asarray(w) > 0) else np.asarray(w, dtype=float)
    rho = 0.0
    for label, M, _ in maps:
        rho_m = float(np.max(np.abs(np.linalg.eigvals(M))))
        if not rho_m < 1.0:
            why = " (a held command destabilises it)" if label == "Ψ" else ""
            raise ValueError(f"{plant.name}: no implicit safe set: the backup's {label} (spectral radius "
                             f"{rho_m:.4f}) does not contract{why}")
        rho = max(rho, rho_m)
    lam = 1.0 - contraction * (1.0 - rho)
    H, h, names = _constraint_rows(plant, backup)
    _check_equilibrium_slack(plant, H, h, names)
    H, h = _normalise(H, h)
    reg = plant.region
    r_c, r_w = (reg.r_min + reg.r_max) / 2.0, (reg.r_max - reg.r_min) / 2.0

    def slack_tol(rows, rhs):
        s = rhs - rows[:, n:] @ r_c - np.abs(rows[:, n:]) @ r_w
        return np.maximum(0.0, 0.5 * (1.0 - lam) / lam * s)

    # Only the rows added last iteration (the frontier) can give new rows: a row a of O_{k-1}
    # maps to a·M, a row of M⁻¹O_{k-1} ⊇ O_k, already implied. The bounding box of O_k (the
    # cheap redundancy test) stays valid as the sets shrink, so it is refreshed only now and then.
    front_H, front_h = H, h
    lo, hi = _bounding_box(H, h)
    steps = max(1, int(math.ceil(horizon_s / plant.dt)))
    for k in range(1, steps + 1):
        if k % 10 == 0:
            lo, hi = _bounding_box(H, h)
        cand = [_normalise(np.hstack([front_H[:, :n] @ M / lam, front_H[:, n:]]),
                           front_h - _margin(front_H[:, :n], Ds, w)) for _, M, Ds in maps]
        cand_H, cand_h = np.vstack([a for a, _ in cand]), np.concatenate([b for _, b in cand])
        if w is not None:
            robust_slack = cand_h - cand_H[:, n:] @ r_c - np.abs(cand_H[:, n:]) @ r_w
            if np.any(robust_slack <= 0.0):
                raise ValueError(f"{plant.name}: the backup is not robustly safe on the certified region: under the "
                                 f"declared uncertainty (additive bound {np.round(w, 6).tolist()} per step) a "
                                 f"disturbance sequence of {k} steps breaks a constraint from the equilibrium of a "
                                 f"certified reference; shrink certified_region.r_max, make the backup faster, "
                                 f"or declare less uncertainty")
        keep = ~_redundant(cand_H, cand_h, H, h, lo, hi, slack_tol(cand_H, cand_h))
        if not keep.any():
            return _in_state_coordinates(plant, H, h), k
        n_old = len(h)
        H, h = np.vstack([H, cand_H[keep]]), np.concatenate([h, cand_h[keep]])
        # the new rows, less those implied by the other new rows (Φ's and Ψ's images overlap)
        H, h, alive = _prune(H, h, 1e-9, first=n_old)
        front_H, front_h = H[len(h) - alive:], h[len(h) - alive:]
        if len(h) > max_rows:
            raise ValueError(f"{plant.name}: the implicit safe set needs more than {max_rows} rows "
                             f"({'Φ and Ψ' if held else 'Φ'} images after {k} iterations)")
    raise ValueError(f"{plant.name}: the implicit safe set is not finitely determined within {horizon_s:g} s "
                     f"({steps} iterations): the backup contracts too slowly; make it faster (backup Q/R) or "
                     f"raise the horizon")


def _margin(He: np.ndarray, Ds: list, w) -> np.ndarray:
    """``Σ_j |He D_j| w``: what rows ``He e`` lose to disturbances entering through ``D_j``."""
    if w is None:
        return np.zeros(len(He))
    return sum(np.abs(He @ D) @ w for D in Ds)


def _in_state_coordinates(plant, H, h) -> Polytope:
    """Rows on ``(e, r)`` as rows on ``(x, r)``: ``e = x - Mx r - mx``."""
    n = plant.n
    Mx, mx, _, _ = (np.asarray(a, dtype=float) for a in plant.equilibrium_map())
    He, Hr = H[:, :n], H[:, n:]
    H2 = np.hstack([He, Hr - He @ Mx])
    h2 = h + He @ mx
    return Polytope(*_normalise(H2, h2))


IMPLICIT_CACHE_SIZE = 16
"""Implicit sets kept per process (``implicit_safe_set``'s LRU): the build takes seconds (LPs), and
every node, rollout and test of a plant asks for the same set."""
_IMPLICIT_CACHE: OrderedDict = OrderedDict()


def _implicit_key(plant, backup, late_commands: int, horizon_s: float, name: str, w) -> tuple:
    """What the implicit set depends on: the plant's data (its description: dynamics, limits,
    polytopes, region; the digest alone would miss ``with_limits``), the backup's gain, late,
    horizon, the disturbance bound."""
    desc = json.dumps(plant.describe(), sort_keys=True, default=str)
    K = np.ascontiguousarray(backup.K, dtype=float).tobytes()
    wk = b"" if w is None else np.ascontiguousarray(w, dtype=float).tobytes()
    return hashlib.sha256(desc.encode() + K + wk).hexdigest(), late_commands, float(horizon_s), name


def implicit_safe_set(plant, backup, late_commands: int = 1, horizon_s: float = IMPLICIT_HORIZON_S,
                      name: str | None = None, w=None) -> SafeActionSet:
    """The implicit safe set of a linear plant (module docstring): ``U_safe`` from ``O_L``, with the
    reference variables ``ρ = (ρ1[, ρ2])`` in the certified reference box; robust to the additive
    disturbance bound ``w`` (None: nominal). Cached per plant data, backup gain, ``late_commands``
    and ``w`` (an LRU of ``IMPLICIT_CACHE_SIZE``; the arrays are read-only)."""
    late_commands = _check_late(late_commands)
    name = name or plant.name
    w = None if w is None or not np.any(np.asarray(w) > 0) else _frozen(w)
    key = _implicit_key(plant, backup, late_commands, horizon_s, name, w)
    if key in _IMPLICIT_CACHE:
        _IMPLICIT_CACHE.move_to_end(key)
        return _IMPLICIT_CACHE[key]
    out = _build_implicit(plant, backup, late_commands, horizon_s, name, w)
    _IMPLICIT_CACHE[key] = out
    while len(_IMPLICIT_CACHE) > IMPLICIT_CACHE_SIZE:
        _IMPLICIT_CACHE.popitem(last=False)
    return out


def _build_implicit(plant, backup, late_commands: int, horizon_s: float, name: str, w) -> SafeActionSet:
    nominal = implicit_safe_set(plant, backup, 0, horizon_s, name, w) if late_commands else None
    held_label = ""
    try:
        # A Ψ-closed set, when it exists, is a few more rows than the Φ-closed one; past a quarter
        # more the Φ and Ψ images are multiplying (seen on every shipped implicit plant) and the
        # attempt only costs time (LPs on ever more rows).
        budget = max(int(1.25 * len(nominal.invariant.h)), len(nominal.invariant.h) + 20) if late_commands \
            else 600
        O_L, _ = backup_invariant_set(plant, backup, held=bool(late_commands), horizon_s=horizon_s,
                                      max_rows=budget, w=w)
    except ValueError as exc:
        if not late_commands or "robustly" in str(exc):
            raise
        # The Ψ-closed set did not settle (the images of Φ and Ψ keep adding rows): the held
        # block is taken w.r.t. the Φ-closed set. One late command still leaves the plant in
        # O_Φ, where the backup's command is in the nominal U_safe (the projector's level 2);
        # a run of late commands is no longer covered. The name says so.
        O_L = nominal.invariant
        held_label = ", held block on the nominal set"
    A, B, c = (np.asarray(a, dtype=float) for a in (plant.A, plant.B, plant.c))
    D, G, F, f = _implicit_rows(plant, O_L, A, B, c, late_commands, w)
    blocks = 1 + late_commands
    rho_min, rho_max = np.tile(plant.region.r_min, blocks), np.tile(plant.region.r_max, blocks)
    keep = _prune_action_rows(D @ A, G, F, f - D @ c, plant.u_min, plant.u_max, rho_min, rho_max)
    D, G, F, f = (np.ascontiguousarray(a[keep]) for a in (D, G, F, f))
    for a in (D, G, F, f, O_L.H, O_L.h):
        a.flags.writeable = False
    drift_np, drift_torch = _affine_drift(A, c)
    late = f", late_commands=1{held_label}" if late_commands else ""
    robust = ", robust" if w is not None else ""
    label = f"{name} implicit(backup-invariant, {len(O_L.h)} rows, {len(f)} action rows{late}{robust})"
    return SafeActionSet(O_L, B, plant.u_min, plant.u_max, D=D, G=G, F=F, f=f, drift_np=drift_np,
                         drift_torch=drift_torch, name=label, kind="implicit", drift_matrix=A, drift_offset=c,
                         late_commands=late_commands, nominal_rows=nominal, rho_min=rho_min, rho_max=rho_max,
                         ref_dim=plant.nr, w_max=w)


def _implicit_rows(plant, O_L: Polytope, A, B, c, late_commands: int, w=None):
    """``(D, G, F, f)`` of ``U_safe``: ``(x+, ρ1) ∈ O_L`` (and ``(x++, ρ2) ∈ O_L``), each less its
    ``disturbance_margin``, then the input polytope's rows; the reference box rows of ``O_L`` are
    the bounds of ``ρ``, not rows."""
    n, nr = plant.n, plant.nr
    Hx, Hr, ho = O_L.H[:, :n], O_L.H[:, n:], O_L.h
    box_row = ~(np.abs(Hx) > 1e-12).any(axis=1) & ((np.abs(Hr) > 1e-12).sum(axis=1) == 1)
    Hx, Hr, ho = Hx[~box_row], Hr[~box_row], ho[~box_row]
    k = len(ho)
    D, G, F, f = Hx, Hx @ B, np.hstack([Hr, np.zeros((k, nr * late_commands))]), ho
    if late_commands:
        D = np.vstack([D, Hx @ A])
        G = np.vstack([G, Hx @ (A + np.eye(n)) @ B])
        F = np.vstack([F, np.hstack([np.zeros((k, nr)), Hr])])
        f = np.concatenate([f, ho - Hx @ c])
    f = f - disturbance_margin(Hx, A, w, late_commands)
    _, _, Gp, gp = _split_input_set(Polytope(*plant.input_rows()[:2]), plant.m)
    return (np.vstack([D, np.zeros((len(gp), n))]), np.vstack([G, Gp]),
            np.vstack([F, np.zeros((len(gp), F.shape[1]))]), np.concatenate([f, gp]))


# ====================================================================== per plant

def plant_polytopes(plant, measured: bool = False) -> tuple[Polytope, Polytope]:
    """``(X, U)``: the plant's state rows (finite box bounds and ``H``) and input rows (box and ``G``);
    ``measured``: the state rows on the measured state, tightened by the declared measurement noise
    (``uncertainty.measured_state_rows``)."""
    if measured:
        from ..uncertainty import measured_state_rows
        F, f, _ = measured_state_rows(plant)
    else:
        F, f, _ = plant.state_rows()
    Fu, fu, _ = plant.input_rows()
    return Polytope(np.asarray(F, dtype=float), np.asarray(f, dtype=float)), \
        Polytope(np.asarray(Fu, dtype=float), np.asarray(fu, dtype=float))


def safe_set_for(plant, backup=None, late_commands: int = 1, horizon_s: float = IMPLICIT_HORIZON_S,
                 robust: bool = True) -> SafeActionSet:
    """The safe action set of ``plant`` (module docstring): explicit for small linear plants with a
    bounded state polytope, implicit (around ``backup``, default ``LQRBackup(plant)``) for the
    other linear plants, the model's own for model plants; ``late_commands=1``: robust to one
    late command. ``robust`` (default) and a plant file that declares ``uncertainty:``: the set
    is robust to it (``uncertainty.additive_bound``, measured-state rows, at least the declared
    input delay in late commands); its ``w_max`` says to what."""
    late_commands = _check_late(late_commands)
    w = None
    if robust and plant.uncertainty.declared:
        from ..uncertainty import additive_bound
        w = additive_bound(plant)
        late_commands = max(late_commands, plant.uncertainty.input_delay_steps)
    if not plant.linear:
        make = getattr(plant.model, "safe_set", None)
        if not callable(make):
            raise ValueError(f"model {plant.model_name or type(plant.model).__name__} provides no safe set "
                             f"(give the model class a safe_set(plant, late_commands) method)")
        return make(plant, late_commands, w=w) if w is not None else make(plant, late_commands)
    X, U = plant_polytopes(plant, measured=w is not None)
    A, B, c = (np.asarray(a, dtype=float) for a in (plant.A, plant.B, plant.c))
    blocks = explicit_blocks(A, B, c, X, U)
    if blocks is not None:
        try:
            kind = "robust control-invariant" if w is not None else "control-invariant"
            return explicit_safe_set(A, B, c, X, U, late_commands, name=f"{plant.name} explicit(maximal "
                                     f"{kind})", blocks=blocks, w=w)
        except ValueError as exc:
            if w is None:
                raise
            # the robust pre-set lost the interior equilibrium: the set is empty
            raise ValueError(f"{plant.name}: no robust control-invariant set: under the declared uncertainty "
                             f"(additive bound {np.round(w, 6).tolist()} per step) the inputs cannot hold the "
                             f"plant inside its limits ({exc}); declare less uncertainty or relax the limits") from None
        except (QhullError, RuntimeError):
            # qhull on a set with thousands of near-degenerate facets (a random 3-state plant)
            # or a pre-set iteration that does not settle: the implicit set is sound for every
            # linear plant, only smaller; its name says it is not the explicit one
            pass
    if backup is None:
        from ..backup import LQRBackup
        backup = LQRBackup(plant)
    return implicit_safe_set(plant, backup, late_commands, horizon_s, w=w)


def safe_set_at_most(plant, backup=None, late_commands: int = 1,
                     horizon_s: float = IMPLICIT_HORIZON_S, robust: bool = True) -> tuple[SafeActionSet, int]:
    """``(safe_set_for(plant, backup, late_commands), late_commands)``, or, for a model plant whose
    own set cannot absorb late commands (the pendulum's: its drift is nonlinear), its nominal set
    and 0. A linear plant's refusal is raised: every linear construction absorbs one."""
    try:
        s = safe_set_for(plant, backup, late_commands, horizon_s, robust)
        return s, int(s.late_commands) if plant.linear else int(late_commands)
    except ValueError:
        if plant.linear or not late_commands or plant.uncertainty.input_delay_steps:
            raise
        return safe_set_for(plant, backup, 0, horizon_s, robust), 0


def linear_safe_set(A: np.ndarray, B: np.ndarray, state_limits, u_max, late_commands: int = 0,
                    name: str = "linear", c=None) -> SafeActionSet:
    """The explicit safe set of ``x+ = A x + B u (+ c)`` on the state set ``state_limits`` (a
    ``Polytope`` or symmetric box bounds) with inputs in ``u_max`` (likewise)."""
    A, B = np.asarray(A, dtype=float), np.asarray(B, dtype=float)
    X = state_limits if isinstance(state_limits, Polytope) else box(state_limits)
    return explicit_safe_set(A, B, c, X, _input_set(u_max, B.shape[1]), late_commands, name=name)


def double_integrator_safe_set(system, late_commands: int = 0) -> SafeActionSet:
    """The explicit safe set of a ``dynamics.DoubleIntegrator`` (its axes' product)."""
    n = 2 * system.dof
    lim = np.array([system.p_max] * system.dof + [system.v_max] * system.dof, dtype=float)
    return explicit_safe_set(system.A, system.B, np.zeros(n), box(lim), box(np.full(system.dof, system.u_max)),
                             late_commands, name=f"double_integrator(dof={system.dof})")


def pendulum_virtual_input_bound(system) -> float:
    """Acceleration every state can command whatever gravity does: ``3 τ_max a_max - 1.5 g``."""
    bound = 3.0 * system.tau_max * system.a_max - 1.5 * system.g
    if bound <= 0.0:
        raise ValueError("the actuator cannot overcome gravity: no invariant set by this construction")
    return bound


def pendulum_safe_set(system, late_commands: int = 0, w=None) -> SafeActionSet:
    """Invariant set of the pendulum by the gravity-as-known-input argument (module docstring); with
    ``w`` (per-state additive bound) the robust one (the virtual-input system is linear, so the
    robust pre-set applies as for any linear block). No late commands: the state one held
    command later is not linear in the action here."""
    if _check_late(late_commands):
        raise ValueError("the pendulum supports late_commands=0 only: its drift (gravity) is nonlinear, "
                         "and the late-command set is built for linear plants x+ = A x + B u")
    dt = system.dt
    A0 = np.array([[1.0, dt], [0.0, 1.0]])
    B0 = np.array([[dt * dt], [dt]])
    X = box([float(system.theta_max), float(system.theta_dot_max)])
    w = None if w is None or not np.any(np.asarray(w) > 0) else _frozen(w)
    axis, _, _ = _block_sets(A0, B0, X, box([pendulum_virtual_input_bound(system)]), 0, w)
    k = 1.5 * system.g
    B = B0 * (3.0 * system.tau_max)

    def drift_np(x):
        w = k * np.sin(x[..., 0:1])
        return x @ A0.T + w * B0[:, 0]

    def drift_torch(x):
        w = k * torch.sin(x[..., 0:1])
        return x @ torch.as_tensor(A0.T, dtype=x.dtype) + w * torch.as_tensor(B0[:, 0], dtype=x.dtype)

    a = float(system.a_max)
    f = axis.h - disturbance_margin(axis.H, A0, w, 0)
    return SafeActionSet(axis, B, -a, a, D=axis.H, G=axis.H @ B, F=np.zeros((len(axis.h), 0)), f=f,
                         drift_np=drift_np, drift_torch=drift_torch, name="pendulum" + (" robust" if w is not None
                                                                                        else ""),
                         kind="model", w_max=w)


__all__ = ["Polytope", "SafeActionSet", "safe_set_for", "explicit_safe_set", "implicit_safe_set",
           "backup_invariant_set", "linear_safe_set", "double_integrator_safe_set", "pendulum_safe_set",
           "maximal_control_invariant_set", "pre_set", "late_blocks", "nonredundant_rows", "box", "intersect",
           "contains_polytope", "block_product", "decoupled_blocks", "interior_equilibrium", "plant_polytopes"]
