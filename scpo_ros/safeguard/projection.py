"""The action projection ``Φ(x, u) = argmin_ũ ½||ũ - u||²  s.t.  ũ ∈ U_safe(x)``.

``U_safe(x) = {ũ : G ũ <= b(x), |ũ| <= u_max}`` (see ``invariant_set.SafeActionSet``).
The constraint rows are numbered ``[G rows (k), ũ_j <= u_max (m), -ũ_j <= u_max (m)]``
everywhere in this package (``active`` masks, intervention records, the layer).

Two exact solvers, one per structure:
- **closed form** when every row of ``G`` touches one action coordinate (the double
  integrator's product set, the pendulum, any 1-D action): each coordinate lives in an
  interval ``[lo_j(x), hi_j(x)]`` and the projection is a clip.
- **dense active-set QP** (daqp) otherwise, set up once (Hessian I, constant ``G``) and
  updated per step with the new linear term and right-hand side; daqp starts from the
  previous step's active set (warm start).

``SafeguardProjector.project`` never returns an action outside ``U_safe(x)``: if ``x``
is not in the invariant set (or, numerically, the QP has no solution) it returns the
backup action, clipped to the actuator box, with ``fallback=True`` and a reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .invariant_set import SafeActionSet

FEAS_TOL = 1e-9
"""Slack on membership and interval feasibility: the invariant set is a fixed point of
the pre-set iteration up to ~1e-10, and states on its boundary come back from the
plant with rounding errors of that order."""


@dataclass
class ProjectionResult:
    u: np.ndarray
    """The action to apply (safe projection, or the clipped backup action on fallback)."""
    distance: float
    """``||u - u_raw||`` (0 when the raw action was already safe)."""
    active: np.ndarray
    """Boolean mask over the rows ``[G; I; -I]``: the constraints the projection sits on."""
    fallback: bool
    """True when the backup action was used instead of a projection."""
    reason: str = ""
    """Why it fell back: ``outside_invariant_set``, ``infeasible`` or ``bad_input``."""

    @property
    def intervened(self) -> bool:
        return self.fallback or self.distance > 0.0


class IntervalForm:
    """``G ũ <= b`` with at most one nonzero per row, as per-coordinate intervals.

    ``upper[j]`` / ``lower[j]``: rows that bound coordinate ``j`` from above / below,
    with their coefficients. Works on single states and on batches (leading dims).
    """

    def __init__(self, G: np.ndarray, u_max: float):
        k, m = G.shape
        nonzero = np.abs(G) > 1e-12
        if np.any(nonzero.sum(axis=1) > 1):
            raise ValueError("G is not separable: a row touches more than one action coordinate")
        self.k, self.m, self.u_max = k, m, float(u_max)
        col = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), -1)
        coef = G[np.arange(k), np.maximum(col, 0)]
        self.upper = [np.flatnonzero((col == j) & (coef > 0)) for j in range(m)]
        self.lower = [np.flatnonzero((col == j) & (coef < 0)) for j in range(m)]
        self.upper_coef = [coef[r] for r in self.upper]
        self.lower_coef = [coef[r] for r in self.lower]
        self.constant_rows = np.flatnonzero(col < 0)
        # Box rows appended as candidates: index k + j (upper) and k + m + j (lower).
        self._cand_hi = [np.concatenate([r, [k + j]]) for j, r in enumerate(self.upper)]
        self._cand_lo = [np.concatenate([r, [k + m + j]]) for j, r in enumerate(self.lower)]

    def bounds(self, b: np.ndarray):
        """Intervals ``lo, hi (..., m)``, the rows attaining them ``lo_row, hi_row``, and
        whether every constant row holds (``ok (...)``)."""
        lead = b.shape[:-1]
        lo = np.empty(lead + (self.m,))
        hi = np.empty(lead + (self.m,))
        lo_row = np.empty(lead + (self.m,), dtype=np.int64)
        hi_row = np.empty(lead + (self.m,), dtype=np.int64)
        for j in range(self.m):
            ub = np.concatenate([b[..., self.upper[j]] / self.upper_coef[j],
                                 np.full(lead + (1,), self.u_max)], axis=-1)
            lb = np.concatenate([b[..., self.lower[j]] / self.lower_coef[j],
                                 np.full(lead + (1,), -self.u_max)], axis=-1)
            ih, il = ub.argmin(-1), lb.argmax(-1)
            hi[..., j] = np.take_along_axis(ub, ih[..., None], -1)[..., 0]
            lo[..., j] = np.take_along_axis(lb, il[..., None], -1)[..., 0]
            hi_row[..., j] = self._cand_hi[j][ih]
            lo_row[..., j] = self._cand_lo[j][il]
        ok = (b[..., self.constant_rows] >= -FEAS_TOL).all(-1) if len(self.constant_rows) else np.ones(lead, bool)
        return lo, hi, lo_row, hi_row, ok


def project_intervals(form: IntervalForm, u: np.ndarray, b: np.ndarray):
    """Closed-form projection for batches: ``(ũ, active (..., k + 2m), feasible (...))``.

    Intervals empty by no more than ``FEAS_TOL`` (rounding at the set's boundary) are
    collapsed to a point; emptier ones make the state infeasible.
    """
    lo, hi, lo_row, hi_row, ok = form.bounds(b)
    feasible = ok & (lo <= hi + FEAS_TOL).all(-1)
    hi = np.maximum(hi, lo)
    ut = np.clip(u, lo, hi)
    active = np.zeros(u.shape[:-1] + (form.k + 2 * form.m,), dtype=bool)
    over, under = u > hi, u < lo
    # One write per coordinate (False where it is not clamped); the rows of different
    # coordinates are disjoint, so no write undoes another.
    np.put_along_axis(active, np.where(over, hi_row, lo_row), over | under, axis=-1)
    return ut, active, feasible


class SafeguardProjector:
    """Per-step projection for one plant, set up once.

    ``backup(x, r) -> u``: the action used when ``x`` is outside the invariant set
    (``r``: the reference, passed through; ``None`` if the caller has none).
    ``solver``: ``"auto"`` (closed form when separable, else daqp), ``"closed_form"``
    or ``"daqp"``. The per-step path is a handful of small numpy operations on
    preallocated constants: no per-call setup, no Python loop over constraints.
    """

    def __init__(self, safe_set: SafeActionSet, backup: Callable | None = None, solver: str = "auto"):
        self.safe_set = safe_set
        self.backup = backup
        self.G = np.ascontiguousarray(safe_set.G)
        self.k, self.m = self.G.shape
        self.n = safe_set.state_dim
        self.u_max = float(safe_set.u_max)
        if solver == "auto":
            solver = "closed_form" if safe_set.separable else "daqp"
        if solver not in ("closed_form", "daqp"):
            raise ValueError(f"solver must be auto, closed_form or daqp, got {solver!r}")
        self.solver = solver
        C = safe_set.invariant
        self._h_member = C.h + FEAS_TOL
        self._linear = safe_set.drift_matrix is not None
        if solver == "closed_form":
            self._setup_closed_form()
        else:
            self._qp = DaqpProjection(self.G, self.u_max)
            A = safe_set.drift_matrix
            # One matrix-vector product gives H x (membership) and H A x (right-hand side).
            self._HS = np.vstack([C.H, C.H @ A]) if self._linear else C.H.copy()
            self._h = C.h.copy()

    def _setup_closed_form(self) -> None:
        """Precompute the per-coordinate bounds ``ũ_j <= b_i / G_ij`` as one affine map.

        The bound candidates are laid out in contiguous segments (upper bounds of
        coordinate 0, 1, ..., then lower bounds), each ending with its box bound, so a
        step is one matrix-vector product and one ``reduceat`` per side. ``_cand_rows``
        maps a candidate back to its constraint row ``[G; I; -I]``.
        """
        C, form, k, m = self.safe_set.invariant, IntervalForm(self.G, self.u_max), self.k, self.m
        self._form = form
        self._const = form.constant_rows
        rows, coefs = [], []
        for side, cands, box_row in ((0, form.upper, k), (1, form.lower, k + m)):
            for j in range(m):
                rows.append(np.append(cands[j], box_row + j))
        self._seg_starts = np.cumsum([0] + [len(r) for r in rows[:-1]])
        self._n_upper = int(sum(len(r) for r in rows[:m]))
        self._cand_rows = np.concatenate(rows)
        # Candidate value c = (h_i - H_i drift(x)) / G_ij for G rows, ±u_max for box rows.
        Hfull = np.vstack([C.H, np.zeros((2 * m, C.H.shape[1]))])
        hfull = np.concatenate([C.h, np.full(m, self.u_max), np.full(m, self.u_max)])
        Gfull = np.concatenate([self.G.sum(axis=1), np.ones(m), -np.ones(m)])  # one nonzero per row
        inv = 1.0 / Gfull[self._cand_rows]
        self._cand_H = Hfull[self._cand_rows] * inv[:, None]
        self._cand_c = hfull[self._cand_rows] * inv
        A = self.safe_set.drift_matrix
        n_c = len(self._cand_rows)
        if self._linear:
            self._M = np.vstack([C.H, self._cand_H @ A])      # [H x ; candidates' drift part]
        else:
            self._M = C.H.copy()
        self._n_cand = n_c
        self._seg_ends = np.append(self._seg_starts[1:], n_c)
        # reduceat over [0, s_1, .., s_{m-1}, n_upper] gives the m upper minima (and one
        # spare segment); over [0, n_upper, ...] the lower maxima after one spare.
        self._starts_hi = np.append(self._seg_starts[:m], self._n_upper)
        self._starts_lo = np.concatenate([[0], self._seg_starts[m:]])

    @property
    def num_rows(self) -> int:
        return self.k + 2 * self.m

    def project(self, x, u, r=None) -> ProjectionResult:
        """Safe action for state ``x (n,)`` and raw action ``u (m,)``."""
        x = np.asarray(x, dtype=float)
        u_raw = np.asarray(u, dtype=float)
        # x·x + u·u is finite iff every entry is (short of 1e154, far outside any set).
        if x.shape != (self.n,) or u_raw.shape != (self.m,) or not math.isfinite(x @ x + u_raw @ u_raw):
            return self.fallback(x, u_raw, r, "bad_input")
        k = self.k
        if self.solver == "daqp":
            y = self._HS @ x
            if (y[:k] > self._h_member).any():
                return self.fallback(x, u_raw, r, "outside_invariant_set")
            b = self._h - y[k:] if self._linear else self.safe_set.rhs(x)
            ut, active, feasible = self._qp.solve(u_raw, b)
            if not feasible:
                return self.fallback(x, u_raw, r, "infeasible")
            d = ut - u_raw
            return ProjectionResult(ut, math.sqrt(d @ d), active, False)
        y = self._M @ x
        if (y[:k] > self._h_member).any():
            return self.fallback(x, u_raw, r, "outside_invariant_set")
        if self._linear:
            cand = self._cand_c - y[k:]
        else:
            cand = self._cand_c - self._cand_H @ self.safe_set.drift_np(x)
        hi = np.minimum.reduceat(cand, self._starts_hi)[:self.m]
        lo = np.maximum.reduceat(cand, self._starts_lo)[1:]
        if (lo - hi).max() > FEAS_TOL or (len(self._const) and self._constant_rows_violated(x)):
            return self.fallback(x, u_raw, r, "infeasible")
        ut = np.minimum(np.maximum(u_raw, lo), np.maximum(hi, lo))
        d = ut - u_raw
        dist = math.sqrt(d @ d)
        active = np.zeros(k + 2 * self.m, dtype=bool)
        if dist > 0.0:
            self._mark_active(active, u_raw, lo, hi, cand)
        return ProjectionResult(ut, dist, active, False)

    def _constant_rows_violated(self, x) -> bool:
        return bool((self.safe_set.rhs(x)[self._const] < -FEAS_TOL).any())

    def _mark_active(self, active, u, lo, hi, cand) -> None:
        """The row each clamped coordinate sits on (one per coordinate)."""
        m, starts, ends = self.m, self._seg_starts, self._seg_ends
        for j in range(m):
            if u[j] > hi[j]:
                s, e = starts[j], ends[j]
                active[self._cand_rows[s + cand[s:e].argmin()]] = True
            elif u[j] < lo[j]:
                s, e = starts[m + j], ends[m + j]
                active[self._cand_rows[s + cand[s:e].argmax()]] = True

    def fallback(self, x, u_raw, r, reason: str) -> ProjectionResult:
        """The backup action for ``x`` (clipped to the box; zero if ``x`` is unusable),
        flagged as a fallback with ``reason``."""
        u = np.zeros(self.m)
        if self.backup is not None and x.shape == (self.n,) and np.isfinite(x).all():
            try:
                ub = np.asarray(self.backup(x, r), dtype=float)
            except (ValueError, TypeError):   # a backup that cannot handle this input: zero action
                ub = u
            if ub.shape == (self.m,) and np.isfinite(ub).all():
                u = np.clip(ub, -self.u_max, self.u_max)
        ok = u_raw.shape == u.shape and np.isfinite(u_raw).all()
        dist = float(np.linalg.norm(u - u_raw)) if ok else float("nan")
        return ProjectionResult(u, dist, np.zeros(self.num_rows, dtype=bool), True, reason)


class DaqpProjection:
    """Dense active-set projection QP (daqp), workspace set up once, warm-started.

    ``min ½||ũ||² - uᵀũ  s.t.  -u_max <= ũ <= u_max (simple bounds), G ũ <= b``.
    """

    def __init__(self, G: np.ndarray, u_max: float, primal_tol: float = 1e-10):
        import daqp
        self.k, self.m = G.shape
        self.u_max = float(u_max)
        self._f = np.zeros(self.m)
        self._bu = np.concatenate([np.full(self.m, self.u_max), np.zeros(self.k)])
        self._bl = np.concatenate([np.full(self.m, -self.u_max), np.full(self.k, -1e30)])
        self._model = daqp.Model()
        flag, _ = self._model.setup(np.eye(self.m), self._f, np.ascontiguousarray(G, dtype=float),
                                    self._bu.copy(), self._bl.copy())
        if flag < 0:
            raise RuntimeError(f"daqp setup failed with exit flag {flag}")
        self._model.settings = {"primal_tol": primal_tol}
        self._G = G

    def solve(self, u: np.ndarray, b: np.ndarray):
        """``(ũ, active (k + 2m), feasible)`` for one raw action and right-hand side."""
        np.negative(u, out=self._f)
        self._bu[self.m:] = b
        self._model.update(f=self._f, bupper=self._bu)
        ut, _, flag, info = self._model.solve()
        if flag < 1:
            return np.clip(u, -self.u_max, self.u_max), np.zeros(self.k + 2 * self.m, bool), False
        lam = info["lam"]
        active = np.empty(self.k + 2 * self.m, dtype=bool)
        active[:self.k] = lam[self.m:] > 0.0
        active[self.k:self.k + self.m] = lam[:self.m] > 0.0
        active[self.k + self.m:] = lam[:self.m] < 0.0
        return np.asarray(ut, dtype=float), active, True


def project_batch(safe_set: SafeActionSet, x: np.ndarray, u: np.ndarray):
    """Batched projection (numpy) for states already in the set: ``(ũ, active, feasible)``.

    Closed form when separable; otherwise one daqp solve per row (C calls).
    """
    b = safe_set.rhs(x)
    if safe_set.separable:
        return project_intervals(IntervalForm(safe_set.G, safe_set.u_max), u, b)
    qp = DaqpProjection(safe_set.G, safe_set.u_max)
    out = [qp.solve(ui, bi) for ui, bi in zip(u.reshape(-1, u.shape[-1]), b.reshape(-1, b.shape[-1]))]
    ut = np.stack([o[0] for o in out]).reshape(u.shape)
    active = np.stack([o[1] for o in out]).reshape(u.shape[:-1] + (-1,))
    feasible = np.array([o[2] for o in out]).reshape(u.shape[:-1])
    return ut, active, feasible
