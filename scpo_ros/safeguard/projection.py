"""The action projection ``Φ(x, u) = argmin_ũ ½||ũ - u||²  s.t.  ũ ∈ U_safe(x)``.

``U_safe(x) = {ũ : G ũ <= b(x), |ũ| <= u_max}`` (see ``invariant_set.SafeActionSet``; with
``late_commands=1`` its rows keep both the next state and the state one held command later
in the set ``S``).
The constraint rows are numbered ``[G rows (k), ũ_j <= u_max (m), -ũ_j <= u_max (m)]``
everywhere in this package (``active`` masks, intervention records, the layer).

Two exact solvers, one per structure:
- **closed form** when every row of ``G`` touches one action coordinate (the double
  integrator's product set, the pendulum, any 1-D action): each coordinate lives in an
  interval ``[lo_j(x), hi_j(x)]`` and the projection is a clip.
- **dense active-set QP** (daqp) otherwise, set up once (Hessian I, constant ``G``) and
  updated per step with the new linear term and right-hand side; daqp starts from the
  previous step's active set (warm start).

``SafeguardProjector.project`` returns the projection whenever ``U_safe(x)`` is not
empty, also for a state outside the invariant set ``C`` (a state the plant left ``C``
from, e.g. after a late command, from which one admissible action still brings it back:
the result says ``in_set=False``). Only when ``U_safe(x)`` is empty does it fall back
(``fallback=True``, reason ``outside_invariant_set``, or ``infeasible`` for a state in
``C`` whose QP has no solution numerically), with the **recovery action**: the action
whose next state is closest to ``C``, i.e. the ``u`` in the actuator box minimising the
largest facet violation ``max_i (H_i x+ - h_i)`` (the facets have unit normals, so this is
a distance), projected from the raw action where that minimiser is not unique. For a
double integrator running at a wall this is the hardest admissible braking, where the
backup LQR (``recovery=False``) brakes gently
and lets a late command turn into a run of violations. Fallbacks for the caller's own
reasons (``fallback(x, u, r, reason)``: stale or bad input) apply the backup action
projected onto ``U_safe(x)`` (the recovery action where that set is empty).

Levels for a set robust to a late command (``late_commands=1``). ``S`` (``invariant``) is
the set robust to one late command, inside the nominal maximal control-invariant set
``N`` (``nominal``). The guarantee degrades in steps, each level taken only where the one
above has no admissible action:

1. ``U_safe(x)`` w.r.t. ``S`` (next state and held-command state in ``S``) not empty:
   its projection (``fallback=False``; ``in_set`` says whether ``x ∈ S``). A late command
   next step still leaves the plant in ``S``.
2. Else the one-step set of the nominal set ``{u in box : A x + B u ∈ N}`` not empty (every
   state of ``N`` has one): the projection onto it, ``fallback=True``, reason
   ``outside_invariant_set`` (``infeasible`` for ``x ∈ S``, numerically), ``violation`` 0.
   The next state stays in ``N`` (safe without late commands; a late one may leave it).
3. Else the recovery action w.r.t. ``N``: the action in the box minimising the largest
   facet violation of the next state w.r.t. ``N`` (``violation`` > 0).

The ``active`` mask of levels 2 and 3 marks only the box rows (the facets of ``N`` have no
row in ``[G; I; -I]``). ``recovery=False`` replaces level 3 by the clipped backup action.

Precision. A projection that is active puts the next state exactly *on* the invariant
set's boundary. A float64 plant returns it within ~1e-15 of the boundary (``FEAS_TOL``
covers that); a float32 plant rounds it up to ~1e-7 *outside*, and a 1e-9 membership
test would then reject the state and fall back to the backup. So the tolerances follow
the precision of the state handed in (``tolerances_for``): for float32 (or lower)
states, membership and interval feasibility get a slack of a few dozen float32 ulps,
and the projection aims ``margin`` *inside* the set (``H x+ <= h - margin``, box rows
untouched), so that the plant's rounding lands inside. Where that tightened set is
empty (a state whose safe interval is narrower than the margin) the projection takes the
middle of the exact interval, the point with the most room for rounding. float64 states
keep the exact projection.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .invariant_set import SafeActionSet

FEAS_TOL = 1e-9
"""Slack on membership and interval feasibility for float64 states: the invariant set
is a fixed point of the pre-set iteration up to ~1e-10, and states on its boundary come
back from a float64 plant with rounding errors far below that."""

ROUNDING_ULPS = 32
"""Slack and inward margin for lower-precision states, in units of the state dtype's
epsilon times the set's scale: one step ``A x + B u`` of a float32 plant rounds ``H x+``
by a few ulps; 32 leaves room without being a visible change of the set (~4e-6 at scale 1)."""


@dataclass(frozen=True)
class Tolerances:
    """The numerical slack for states of one precision (``tolerances_for``)."""

    member: float
    """``x`` is in the set when ``H x <= h + member``."""
    interval: float
    """An interval (or QP) empty by no more than this in ``b`` units (``G u <= b``) is
    rounding, not infeasibility."""
    margin: float
    """The projection aims this far inside the set (``G u <= b - margin``); 0 for float64."""


def tolerances_for(dtype, scale: float = 1.0) -> Tolerances:
    """Tolerances for states of ``dtype``: exact (``FEAS_TOL``, no margin) for float64,
    ``ROUNDING_ULPS`` ulps of ``dtype`` times ``scale`` (the set's size) below that."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f" or dtype.itemsize >= 8:
        return Tolerances(FEAS_TOL, FEAS_TOL, 0.0)
    slack = max(FEAS_TOL, ROUNDING_ULPS * float(np.finfo(dtype).eps) * max(1.0, float(scale)))
    return Tolerances(slack, slack, slack)


def qp_shifts(tol: Tolerances) -> tuple[float, ...]:
    """Right-hand-side shifts tried in turn by the QP path for low-precision states: the
    first feasible one wins. A QP has no "middle of the interval" to fall back on, so it
    steps from ``margin`` inside to ``interval`` outside in halvings, ending as close to
    the most interior feasible level as these steps resolve."""
    if tol.margin <= 0.0:
        return (0.0,)
    inside = tuple(-tol.margin * 2.0 ** -i for i in range(4))
    outside = tuple(tol.interval * 2.0 ** -i for i in range(3, -1, -1))
    return inside + (0.0,) + outside


def tolerance_scale(safe_set: SafeActionSet) -> float:
    """The size of the invariant set the float32 tolerances scale with (``tolerances_for``)."""
    return max(1.0, float(np.abs(safe_set.invariant.h).max()))


def state_dtype(x) -> np.dtype:
    """The floating dtype of a state (numpy array or torch tensor); float64 for anything else."""
    dt = getattr(x, "dtype", None)
    if dt is not None and not isinstance(dt, np.dtype):   # torch.float32 -> "float32"
        dt = str(dt).rsplit(".", 1)[-1]
    try:
        dt = np.dtype(dt) if dt is not None else np.dtype(np.float64)
    except TypeError:
        return np.dtype(np.float64)
    return dt if dt.kind == "f" else np.dtype(np.float64)


@dataclass
class ProjectionResult:
    u: np.ndarray
    """The action to apply (safe projection, or the clipped backup action on fallback)."""
    distance: float
    """``||u - u_raw||`` (0 when the raw action was already safe)."""
    active: np.ndarray
    """Boolean mask over the rows ``[G; I; -I]``: the constraints the projection sits on."""
    fallback: bool
    """True when the action is not the projection of the raw action (recovery or backup)."""
    reason: str = ""
    """Why it fell back: ``outside_invariant_set``, ``infeasible``, ``bad_input``, or the
    caller's reason passed to ``fallback``."""
    in_set: bool = True
    """Whether ``x`` was in the invariant set (within the dtype's tolerance)."""
    violation: float = 0.0
    """``max_i (H_i x+ - h_i)`` the action leaves for the model's next state when no admissible
    action reaches the set (the recovery's optimum; > 0), else 0. For ``late_commands=1`` the
    facets are the nominal set's (level 3 in the module docstring)."""

    @property
    def intervened(self) -> bool:
        return self.fallback or self.distance > 0.0


class IntervalForm:
    """``G ũ <= b`` with at most one nonzero per row, as per-coordinate intervals.

    ``upper[j]`` / ``lower[j]``: rows that bound coordinate ``j`` from above / below,
    with their coefficients; ``constant_rows``: rows that touch no coordinate.
    """

    def __init__(self, G: np.ndarray, u_max, u_min=None):
        k, m = G.shape
        nonzero = np.abs(G) > 1e-12
        if np.any(nonzero.sum(axis=1) > 1):
            raise ValueError("G is not separable: a row touches more than one action coordinate")
        self.k, self.m = k, m
        self.u_max, self.u_min = box_bounds(u_max, u_min, m)
        col = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), -1)
        coef = G[np.arange(k), np.maximum(col, 0)]
        self.upper = [np.flatnonzero((col == j) & (coef > 0)) for j in range(m)]
        self.lower = [np.flatnonzero((col == j) & (coef < 0)) for j in range(m)]
        self.upper_coef = [coef[r] for r in self.upper]
        self.lower_coef = [coef[r] for r in self.lower]
        self.constant_rows = np.flatnonzero(col < 0)


class IntervalBatch:
    """The closed-form projection for batches (torch): ``ũ_j = clip(u_j, lo_j, hi_j)`` with
    ``hi_j = min(u_max, min_i b_i / G_ij)`` over the upper rows, ``lo_j`` likewise.

    ``__call__(u (B, m), b (B, k))`` returns ``(ũ, active (B, k + 2m), feasible (B,))``:
    feasible where the intervals of ``G ũ <= b + slack`` are non-empty (``slack``: the
    ``interval`` tolerance of ``dtype``, default ``b``'s; an emptier interval collapses onto
    its lower end). No inward margin: the output is the exact projection (the layer's
    gradients need it). ``SafeguardProjector``'s per-step closed form is the fused form of
    this (candidates as one affine map of ``x``), tested against it.
    """

    def __init__(self, G: np.ndarray, u_max, scale: float = 1.0, u_min=None):
        self.scale = scale
        form = IntervalForm(G, u_max, u_min)
        k, m = G.shape
        self.k, self.m = k, m
        self.u_max, self.u_min = form.u_max, form.u_min
        coef = np.zeros(k)
        up = np.zeros((m, k), dtype=bool)
        lo = np.zeros((m, k), dtype=bool)
        for j in range(m):
            up[j, form.upper[j]] = True
            lo[j, form.lower[j]] = True
            coef[form.upper[j]] = form.upper_coef[j]
            coef[form.lower[j]] = form.lower_coef[j]
        self.inv = np.where(coef != 0.0, 1.0 / np.where(coef != 0.0, coef, 1.0), 0.0)
        self.up, self.lo = torch.as_tensor(up), torch.as_tensor(lo)
        self.const = torch.as_tensor(form.constant_rows, dtype=torch.long)

    def __call__(self, u: torch.Tensor, b: torch.Tensor, dtype=None):
        k, m = self.k, self.m
        inv = torch.as_tensor(self.inv, dtype=b.dtype)
        ratio = (b * inv).unsqueeze(1)                                          # (B, 1, k)
        inf = torch.tensor(float("inf"), dtype=b.dtype)
        hi_g, hi_idx = torch.where(self.up, ratio, inf).min(-1)                # (B, m)
        lo_g, lo_idx = torch.where(self.lo, ratio, -inf).max(-1)
        u_hi = torch.as_tensor(self.u_max, dtype=b.dtype)
        u_lo = torch.as_tensor(self.u_min, dtype=b.dtype)
        hi = torch.minimum(hi_g, u_hi)
        lo = torch.maximum(lo_g, u_lo)
        # the slack is in b units: a rounding error of b(x) is amplified by 1/G_ij in u units,
        # ~1e3 for the double integrator
        slack = tolerances_for(state_dtype(b) if dtype is None else dtype, self.scale).interval
        ratio_w = ((b + slack) * inv).unsqueeze(1)
        hi_w = torch.minimum(torch.where(self.up, ratio_w, inf).min(-1).values, u_hi)
        lo_w = torch.maximum(torch.where(self.lo, ratio_w, -inf).max(-1).values, u_lo)
        feasible = (lo_w <= hi_w).all(-1)
        if len(self.const):
            feasible &= (b[:, self.const] >= -slack).all(-1)
        hi = torch.maximum(hi, lo)
        ut = torch.minimum(torch.maximum(u, lo), hi)
        cols = torch.arange(m)
        hi_row = torch.where(hi_g < u_hi, hi_idx, k + cols)
        lo_row = torch.where(lo_g > u_lo, lo_idx, k + m + cols)
        over, under = u > hi, u < lo
        active = torch.zeros(u.shape[0], k + 2 * m, dtype=torch.bool)
        active.scatter_(1, torch.where(over, hi_row, lo_row), over | under)
        return ut, active, feasible


class SafeguardProjector:
    """Per-step projection for one plant, set up once.

    ``backup(x, r) -> u``: the action used when ``x`` is outside the invariant set
    (``r``: the reference, passed through; ``None`` if the caller has none).
    ``solver``: ``"auto"`` (closed form when separable, else daqp), ``"closed_form"``
    or ``"daqp"``. The per-step path is a handful of small numpy operations on
    preallocated constants: no per-call setup, no Python loop over constraints.
    The tolerances follow the dtype of the state passed to ``project`` (float64, or a
    list: exact; float32: slack and inward margin, see the module docstring).
    ``margin``: an inward margin (b units) for every state whatever its dtype, for a plant
    that checks its limits strictly (any rounding beyond the boundary counts there).
    ``recovery``: where ``U_safe(x)`` is empty, apply the recovery action (default) or
    the clipped backup action.
    For a set with ``late_commands=1`` an empty ``U_safe(x)`` goes to the nominal set's
    projector first (levels 2 and 3, module docstring); ``recovery`` applies to its last level.
    """

    def __init__(self, safe_set: SafeActionSet, backup: Callable | None = None, solver: str = "auto",
                 margin: float = 0.0, recovery: bool = True):
        if not (math.isfinite(margin) and margin >= 0.0):
            raise ValueError(f"margin must be finite and >= 0, got {margin}")
        self.margin = float(margin)
        self.recovery = bool(recovery)
        self.safe_set = safe_set
        self.backup = backup
        self.G = np.ascontiguousarray(safe_set.G)
        self.k, self.m = self.G.shape
        self.n = safe_set.state_dim
        self.u_max, self.u_min = box_bounds(safe_set.u_max, safe_set.u_min, self.m)
        self._ref_dim = int(getattr(safe_set, "ref_dim", 0))
        if solver == "auto":
            solver = "closed_form" if safe_set.separable else "daqp"
        if solver not in ("closed_form", "daqp"):
            raise ValueError(f"solver must be auto, closed_form or daqp, got {solver!r}")
        self.solver = solver
        C = safe_set.invariant
        self._member_x = np.ascontiguousarray(C.H[:, :self.n])     # implicit sets: rows on (x, r)
        self._member_r = C.H[:, self.n:]
        self._n_facets = len(C.h)     # membership rows: the facets of S (G may have more or fewer rows)
        self._scale = tolerance_scale(safe_set)
        self._tolerances: dict[np.dtype, tuple[Tolerances, np.ndarray]] = {}
        self._tol64, self._h_member = self._tolerances_for(np.dtype(np.float64))
        self._linear = safe_set.drift_matrix is not None
        if solver == "closed_form":
            self._setup_closed_form()
        else:
            self._qp = DaqpProjection(self.G, self.u_max, self.u_min, F=safe_set.F, rho_min=safe_set.rho_min,
                                      rho_max=safe_set.rho_max)
            A = safe_set.drift_matrix
            D, f = safe_set.drift_rows()
            # One matrix-vector product gives H x (membership) and D A x (right-hand side).
            self._HS = np.vstack([self._member_x, D @ A]) if self._linear else self._member_x.copy()
            self._h = f - D @ safe_set.drift_offset if self._linear else f.copy()
        # Level 2 and 3 (module docstring): the nominal set's one-step projection and recovery.
        self._nominal = None
        if safe_set.late_commands:
            self._nominal = SafeguardProjector(safe_set.nominal_set(), backup, solver, margin, recovery)

    def _setup_closed_form(self) -> None:
        """Precompute the per-coordinate bounds ``ũ_j <= b_i / G_ij`` as one affine map (the
        fused per-step form of ``IntervalBatch``, tested against it).

        The bound candidates are laid out in contiguous segments (upper bounds of
        coordinate 0, 1, ..., then lower bounds), each ending with its box bound, so a
        step is one matrix-vector product and one ``reduceat`` per side. ``_cand_rows``
        maps a candidate back to its constraint row ``[G; I; -I]``.
        """
        C, form, k, m = self.safe_set.invariant, IntervalForm(self.G, self.u_max, self.u_min), self.k, self.m
        D, f = self.safe_set.drift_rows()
        self._const = form.constant_rows
        rows = []
        for cands, box_row in ((form.upper, k), (form.lower, k + m)):
            for j in range(m):
                rows.append(np.append(cands[j], box_row + j))
        self._seg_starts = np.cumsum([0] + [len(r) for r in rows[:-1]])
        self._n_upper = int(sum(len(r) for r in rows[:m]))
        self._cand_rows = np.concatenate(rows)
        # Candidate value c = (f_i - D_i drift(x)) / G_ij for G rows, ±u_max for box rows.
        Hfull = np.vstack([D, np.zeros((2 * m, D.shape[1]))])
        hfull = np.concatenate([f, self.u_max, -self.u_min])
        Gfull = np.concatenate([self.G.sum(axis=1), np.ones(m), -np.ones(m)])  # one nonzero per row
        inv = 1.0 / Gfull[self._cand_rows]
        # moving row i's bound b_i by s moves its candidate by s / G_ij (box rows never move)
        self._cand_inv_g = np.where(self._cand_rows < k, inv, 0.0)
        self._cand_H = Hfull[self._cand_rows] * inv[:, None]
        self._cand_c = hfull[self._cand_rows] * inv
        A = self.safe_set.drift_matrix
        n_c = len(self._cand_rows)
        if self._linear:
            self._M = np.vstack([C.H, self._cand_H @ A])      # [H x (membership); candidates' drift part]
            self._cand_c_lin = self._cand_c - self._cand_H @ self.safe_set.drift_offset
        else:
            self._M = C.H.copy()
        self._n_cand = n_c
        self._seg_ends = np.append(self._seg_starts[1:], n_c)
        # reduceat over [0, s_1, .., s_{m-1}, n_upper] gives the m upper minima (and one
        # spare segment); over [0, n_upper, ...] the lower maxima after one spare.
        self._starts_hi = np.append(self._seg_starts[:m], self._n_upper)
        self._starts_lo = np.concatenate([[0], self._seg_starts[m:]])
        # Recovery: every (upper, lower) candidate pair of a coordinate. Relaxing every G row
        # by s moves candidate c to c + s / G_ij; the pair stays ordered for
        # s >= (c_lo - c_hi) / (1/G_hi - 1/G_lo) (the denominator is > 0 unless both are box rows).
        pairs_hi, pairs_lo = [], []
        for j in range(m):
            hi_idx = np.arange(self._seg_starts[j], self._seg_ends[j])
            lo_idx = np.arange(self._seg_starts[m + j], self._seg_ends[m + j])
            pairs_hi.append(np.repeat(hi_idx, len(lo_idx)))
            pairs_lo.append(np.tile(lo_idx, len(hi_idx)))
        pairs_hi, pairs_lo = np.concatenate(pairs_hi), np.concatenate(pairs_lo)
        denom = self._cand_inv_g[pairs_hi] - self._cand_inv_g[pairs_lo]
        keep = denom > 0.0
        self._pair_hi, self._pair_lo, self._pair_inv_den = pairs_hi[keep], pairs_lo[keep], 1.0 / denom[keep]

    @property
    def num_rows(self) -> int:
        return self.k + 2 * self.m

    def _tolerances_for(self, dtype: np.dtype) -> tuple[Tolerances, np.ndarray]:
        """``(Tolerances, h + member slack)`` for states of ``dtype`` (cached)."""
        if dtype not in self._tolerances:
            tol = tolerances_for(dtype, self._scale)
            if self.margin > tol.margin:
                tol = Tolerances(tol.member, tol.interval, self.margin)
            self._tolerances[dtype] = (tol, self.safe_set.invariant.h + tol.member)
        return self._tolerances[dtype]

    def _tol_for(self, x) -> tuple[Tolerances, np.ndarray]:
        """``(Tolerances, h + member slack)`` for the state ``x`` (numpy, torch or a list)."""
        dtype = getattr(x, "dtype", None)
        if dtype is None or dtype == np.float64:   # the common case, without a dict lookup
            return self._tol64, self._h_member
        return self._tolerances_for(state_dtype(x))

    def project(self, x, u, r=None) -> ProjectionResult:
        """Safe action for state ``x (n,)`` and raw action ``u (m,)``: the projection onto
        ``U_safe(x)``, or where that is empty the recovery action (``fallback=True``)."""
        tol, h_member = self._tol_for(x)
        x = np.asarray(x, dtype=float)
        u_raw = np.asarray(u, dtype=float)
        # x·x + u·u is finite iff every entry is (short of 1e154, far outside any set).
        if x.shape != (self.n,) or u_raw.shape != (self.m,) or not math.isfinite(x @ x + u_raw @ u_raw):
            return self.fallback(x, u_raw, r, "bad_input")
        return self._project(x, u_raw, tol, h_member, r)

    def fallback(self, x, u_raw, r, reason: str) -> ProjectionResult:
        """The caller's fallback (stale or bad input) for state ``x``, flagged with ``reason``:
        the backup action (clipped to the box; zero if there is none or ``x`` is unusable),
        projected onto ``U_safe(x)``, or where that set is empty the next level (module
        docstring: the nominal one-step set, then the recovery action)."""
        x = np.asarray(x, dtype=float)
        u_raw = np.asarray(u_raw, dtype=float)
        valid = x.shape == (self.n,) and bool(np.isfinite(x).all())
        if not (valid and self.recovery):
            return self._backup_result(x, u_raw, r, reason, None)
        tol, h_member = self._tol_for(x)
        res = self._project(x, self.backup_action(x, r), tol, h_member, r)
        return ProjectionResult(res.u, self._distance(res.u, u_raw), res.active, True, reason, res.in_set,
                                res.violation)

    # ------------------------------------------------------------------ internals
    def _project(self, x: np.ndarray, u_raw: np.ndarray, tol: Tolerances, h_member: np.ndarray,
                 r=None) -> ProjectionResult:
        """Projection of a valid ``(x, u_raw)``, or where ``U_safe(x)`` is empty the next level
        (the nominal set's, or the recovery action; the backup with ``recovery=False``)."""
        nf = self._n_facets
        if self.solver == "daqp":
            y = self._HS @ x
            rho_ref = self.safe_set.rho_of(r) if self._qp.p else None
            if self._ref_dim:
                h_member = h_member - self._member_r @ rho_ref[:self._ref_dim]
            in_set = not (y[:nf] > h_member).any()
            b = self._h - y[nf:] if self._linear else self.safe_set.rhs(x)
            if tol.margin > 0.0:
                # aim inside; where that is empty, ever closer to the exact set, then just outside it
                ut, active, feasible = self._qp.solve_shifted(u_raw, b, qp_shifts(tol), rho_ref)
            else:
                ut, active, feasible = self._qp.solve(u_raw, b, rho_ref)
            if not feasible:
                if self._nominal is not None:
                    return self._nominal_level(x, u_raw, tol, in_set, r)
                if not self.recovery:
                    return self._backup_result(x, u_raw, r, self._reason(in_set), in_set)
                return self._recover_qp(x, u_raw, b, in_set)
            d = ut - u_raw
            return ProjectionResult(ut, math.sqrt(d @ d), active, False, in_set=in_set)
        y = self._M @ x
        in_set = not (y[:nf] > h_member).any()
        if self._linear:
            cand = self._cand_c_lin - y[nf:]
        else:
            cand = self._cand_c - self._cand_H @ self.safe_set.drift_np(x)
        hi = np.minimum.reduceat(cand, self._starts_hi)[:self.m]
        lo = np.maximum.reduceat(cand, self._starts_lo)[1:]
        if tol.margin > 0.0:
            lo_t, hi_t, cand_t, feasible = self._widen_and_tighten(cand, lo, hi, tol)
            if not feasible or (len(self._const) and self._constant_rows_violated(x, tol.interval)):
                return self._empty_intervals(x, u_raw, cand, tol, in_set, r)
            lo, hi, cand = lo_t, hi_t, cand_t
        elif (lo - hi).max() > FEAS_TOL or (len(self._const) and self._constant_rows_violated(x)):
            return self._empty_intervals(x, u_raw, cand, tol, in_set, r)
        ut = np.minimum(np.maximum(u_raw, lo), np.maximum(hi, lo))
        # an interval empty by rounding collapses onto its lower end, which may sit a hair
        # beyond the actuator box: the box is exact
        np.clip(ut, self.u_min, self.u_max, out=ut)
        d = ut - u_raw
        dist = math.sqrt(d @ d)
        active = np.zeros(self.k + 2 * self.m, dtype=bool)
        if dist > 0.0:
            self._mark_active(active, u_raw, lo, hi, cand)
        return ProjectionResult(ut, dist, active, False, in_set=in_set)

    @staticmethod
    def _reason(in_set: bool) -> str:
        return "infeasible" if in_set else "outside_invariant_set"

    def _empty_intervals(self, x, u_raw, cand, tol: Tolerances, in_set: bool, r) -> ProjectionResult:
        """``U_safe(x)`` is empty (closed form): the next level."""
        if self._nominal is not None:
            return self._nominal_level(x, u_raw, tol, in_set, r)
        if not self.recovery:
            return self._backup_result(x, u_raw, r, self._reason(in_set), in_set)
        return self._recover_intervals(x, u_raw, cand, in_set)

    def _nominal_level(self, x, u_raw, tol: Tolerances, in_set: bool, r) -> ProjectionResult:
        """Levels 2 and 3 (module docstring): the nominal set's projector, on the same tolerances;
        flagged as a fallback of this set, with the box rows of its active mask."""
        nom = self._nominal
        res = nom._project(x, u_raw, tol, nom.safe_set.invariant.h + tol.member, r)
        active = np.zeros(self.num_rows, dtype=bool)
        active[self.k:] = res.active[nom.k:]
        return ProjectionResult(res.u, res.distance, active, True, self._reason(in_set), in_set, res.violation)

    def _recover_intervals(self, x, u_raw, cand, in_set: bool) -> ProjectionResult:
        """Recovery, closed form: the smallest relaxation ``s`` of every facet that makes all
        intervals non-empty (one vectorised max over candidate pairs), then the clip."""
        s = (cand[self._pair_lo] - cand[self._pair_hi]) * self._pair_inv_den
        s_star = max(0.0, float(s.max()) if s.size else 0.0)
        if len(self._const):
            s_star = max(s_star, float(-self.safe_set.rhs(x)[self._const].min()))
        relaxed = cand + s_star * self._cand_inv_g
        hi = np.minimum.reduceat(relaxed, self._starts_hi)[:self.m]
        lo = np.maximum.reduceat(relaxed, self._starts_lo)[1:]
        ut = np.clip(np.minimum(np.maximum(u_raw, lo), np.maximum(hi, lo)), self.u_min, self.u_max)
        active = np.zeros(self.num_rows, dtype=bool)
        self._mark_active(active, u_raw, lo, hi, relaxed)
        return ProjectionResult(ut, self._distance(ut, u_raw), active, True, self._reason(in_set), in_set, s_star)

    def _recover_qp(self, x, u_raw, b, in_set: bool) -> ProjectionResult:
        """Recovery, general ``G``: ``min s  s.t.  G u + F ρ <= b + s, u in the box, ρ in its box`` (an
        LP, HiGHS; this path runs only where ``U_safe(x)`` is empty), then the projection onto the
        relaxed set by the same warm QP."""
        from scipy.optimize import linprog
        k, m, p = self.k, self.m, self._qp.p
        c = np.zeros(m + p + 1)
        c[-1] = 1.0
        F = self.safe_set.F
        rho_bounds = [(lo if np.isfinite(lo) else None, hi if np.isfinite(hi) else None)
                      for lo, hi in zip(self.safe_set.rho_min, self.safe_set.rho_max)]
        lp = linprog(c, A_ub=np.hstack([self.G, F, -np.ones((k, 1))]), b_ub=b,
                     bounds=list(zip(self.u_min, self.u_max)) + rho_bounds + [(0.0, None)], method="highs")
        reason = self._reason(in_set)
        if lp.status != 0:   # cannot happen for a bounded box and finite b; never leave without an action
            return self._backup_result(x, u_raw, None, reason, in_set)
        s_star = float(lp.x[-1])
        ut, active, feasible = self._qp.solve_shifted(
            u_raw, b, [s_star + slack * self._scale for slack in (0.0, 1e-12, 1e-10, 1e-8)])
        if not feasible:
            ut, active = np.clip(lp.x[:m], self.u_min, self.u_max), np.zeros(self.num_rows, dtype=bool)
        return ProjectionResult(ut, self._distance(ut, u_raw), active, True, reason, in_set, s_star)

    def backup_action(self, x, r) -> np.ndarray:
        """The backup action for ``x``, clipped to the box; zero if ``x`` is unusable or the
        backup cannot give a finite action of the right size."""
        u = np.zeros(self.m)
        if self.backup is not None and x.shape == (self.n,) and np.isfinite(x).all():
            try:
                ub = np.asarray(self.backup(x, r), dtype=float)
            except (ValueError, TypeError):   # a backup that cannot handle this input: zero action
                ub = u
            if ub.shape == (self.m,) and np.isfinite(ub).all():
                u = np.clip(ub, self.u_min, self.u_max)
        return u

    def _backup_result(self, x, u_raw, r, reason: str, in_set) -> ProjectionResult:
        """The clipped backup action itself, flagged (``recovery=False``, unusable ``x``)."""
        u = self.backup_action(x, r)
        if in_set is None:
            in_set = bool(x.shape == (self.n,) and np.isfinite(x).all()
                          and self.safe_set.contains(x, r, tol=self._tol64.member))
        return ProjectionResult(u, self._distance(u, u_raw), np.zeros(self.num_rows, dtype=bool), True, reason,
                                in_set)

    @staticmethod
    def _distance(u, u_raw) -> float:
        ok = u_raw.shape == u.shape and np.isfinite(u_raw).all()
        return float(np.linalg.norm(u - u_raw)) if ok else float("nan")

    def _constant_rows_violated(self, x, tol: float = FEAS_TOL) -> bool:
        return bool((self.safe_set.rhs(x)[self._const] < -tol).any())

    def _widen_and_tighten(self, cand, lo, hi, tol: Tolerances):
        """Low-precision states: feasible if the intervals widened by ``tol.interval``
        (b units) are non-empty; the intervals used are those tightened by ``tol.margin``
        where non-empty, else the middle of the exact interval (most room for rounding).
        Returns ``(lo, hi, candidates used, feasible)``."""
        wide = cand + tol.interval * self._cand_inv_g
        feasible = bool((np.maximum.reduceat(wide, self._starts_lo)[1:]
                         <= np.minimum.reduceat(wide, self._starts_hi)[:self.m]).all())
        tight = cand - tol.margin * self._cand_inv_g
        hi_t = np.minimum.reduceat(tight, self._starts_hi)[:self.m]
        lo_t = np.maximum.reduceat(tight, self._starts_lo)[1:]
        inner = lo_t <= hi_t
        mid = np.clip(0.5 * (lo + hi), self.u_min, self.u_max)   # the actuator box is exact
        return np.where(inner, lo_t, mid), np.where(inner, hi_t, mid), tight, feasible

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


class DaqpProjection:
    """Dense active-set projection QP (daqp), workspace set up once, warm-started.

    Variables ``(ũ, ρ)``: ``min ½||ũ - u||² + ½ w ||ρ - ρ_ref||²  s.t.  u_min <= ũ <= u_max,
    rho_min <= ρ <= rho_max (simple bounds), G ũ + F ρ <= b``. The small weight ``w`` on the free
    reference variables keeps the QP strictly convex without moving ``ũ`` noticeably; without
    ``F`` (``p = 0``) it is the plain projection.

    daqp sees the problem in normalised coordinates: every bounded variable centred on its box
    and divided by its half-width, ``w`` relative to the mean squared input half-width. In raw
    units a plant whose inputs sit at 30 ± 1.2 with references in a box 0.007 wide made daqp
    declare a feasible projection infeasible (a random plant of the safe-set property test).
    """

    def __init__(self, G: np.ndarray, u_max, u_min=None, primal_tol: float = 1e-10, F=None,
                 rho_min=None, rho_max=None, rho_weight: float = 1e-6):
        import daqp
        G = np.asarray(G, dtype=float)
        self.k, self.m = G.shape
        self.u_max, self.u_min = box_bounds(u_max, u_min, self.m)
        F = np.zeros((self.k, 0)) if F is None else np.asarray(F, dtype=float)
        self.p = p = F.shape[1]
        r_lo = np.full(p, -np.inf) if rho_min is None else np.asarray(rho_min, dtype=float)
        r_hi = np.full(p, np.inf) if rho_max is None else np.asarray(rho_max, dtype=float)
        lo, hi = np.concatenate([self.u_min, r_lo]), np.concatenate([self.u_max, r_hi])
        finite = np.isfinite(lo) & np.isfinite(hi)
        # z = (v - centre) / half_width for a bounded variable, z = v otherwise
        self._centre = np.where(finite, (lo + hi) / 2.0, 0.0)
        self._half = np.where(finite & (hi > lo), (hi - lo) / 2.0, 1.0)
        z_lo = np.where(np.isfinite(lo), (lo - self._centre) / self._half, -1e30)
        z_hi = np.where(np.isfinite(hi), (hi - self._centre) / self._half, 1e30)
        M = np.hstack([G, F])
        self._row_offset = M @ self._centre          # b in z units: b - M centre
        Mz = M * self._half
        u_scale = float(np.mean(self._half[:self.m] ** 2))
        self._hdiag = np.concatenate([self._half[:self.m] ** 2, np.full(p, rho_weight * u_scale)])
        self._w = float(rho_weight) * u_scale
        self._f = np.zeros(self.m + p)
        self._bu = np.concatenate([z_hi, np.zeros(self.k)])
        self._bl = np.concatenate([z_lo, np.full(self.k, -1e30)])
        self._rho_c = self._centre[self.m:]
        self._model = daqp.Model()
        flag, _ = self._model.setup(np.diag(self._hdiag), self._f, np.ascontiguousarray(Mz), self._bu.copy(),
                                    self._bl.copy())
        if flag < 0:
            raise RuntimeError(f"daqp setup failed with exit flag {flag}")
        self._model.settings = {"primal_tol": primal_tol}
        self._G = G

    def solve(self, u: np.ndarray, b: np.ndarray, rho_ref=None):
        """``(ũ, active (k + 2m), feasible)`` for one raw action and right-hand side (``rho_ref``: the
        reference variables' target, default the box centre)."""
        m, p = self.m, self.p
        half, centre = self._half, self._centre
        # ½ h_u (z - (u - c)/s)² per input: linear term -h_u (u - c)/s = -s (u - c)
        np.multiply(-half[:m], u - centre[:m], out=self._f[:m])
        if p:
            target = self._rho_c if rho_ref is None else rho_ref
            self._f[m:] = -self._w * (target - centre[m:]) / half[m:]
        self._bu[m + p:] = b - self._row_offset
        self._model.update(f=self._f, bupper=self._bu)
        z, _, flag, info = self._model.solve()
        if flag < 1:
            return np.clip(u, self.u_min, self.u_max), np.zeros(self.k + 2 * m, bool), False
        lam = info["lam"]
        active = np.empty(self.k + 2 * m, dtype=bool)
        active[:self.k] = lam[m + p:] > 0.0
        active[self.k:self.k + m] = lam[:m] > 0.0
        active[self.k + m:] = lam[:m] < 0.0
        # daqp meets the simple bounds to its own tolerance; the actuator box is exact, and the
        # clip moves ũ by no more than that tolerance
        return np.clip(centre[:m] + half[:m] * z[:m], self.u_min, self.u_max), active, True

    def solve_shifted(self, u: np.ndarray, b: np.ndarray, shifts, rho_ref=None):
        """``solve(u, b + shift)`` for each shift in turn until one is feasible; the last
        result (infeasible) if none is."""
        for shift in shifts:
            out = self.solve(u, b + shift, rho_ref)
            if out[2]:
                break
        return out


class DaqpBatch:
    """The projection for batches with a general ``G`` (and free reference variables): one
    warm-started daqp solve per row (C calls), the same call and result as ``IntervalBatch``."""

    def __init__(self, G: np.ndarray, u_max, scale: float = 1.0, u_min=None, F=None, rho_min=None, rho_max=None):
        self.qp = DaqpProjection(G, u_max, u_min, F=F, rho_min=rho_min, rho_max=rho_max)
        self.k, self.m = G.shape
        self.scale = scale

    def __call__(self, u: torch.Tensor, b: torch.Tensor, dtype=None):
        # exact first, then outward within the dtype's slack, as the closed form's feasibility
        # test (no inward margin: the output must be the projection)
        tol = tolerances_for(state_dtype(b) if dtype is None else dtype, self.scale)
        shifts = [s for s in qp_shifts(tol) if s >= 0.0]
        un = u.detach().to(torch.float64).numpy()
        bn = b.detach().to(torch.float64).numpy()
        out = [self.qp.solve_shifted(ui, bi, shifts) for ui, bi in zip(un, bn)]
        ut = torch.as_tensor(np.stack([o[0] for o in out]), dtype=u.dtype)
        active = torch.as_tensor(np.stack([o[1] for o in out]))
        feasible = torch.as_tensor(np.array([o[2] for o in out]))
        return ut, active, feasible


def box_bounds(u_max, u_min, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``(u_max, u_min)`` as arrays of ``m`` (a scalar ``u_max`` without ``u_min``: ``|u| <= u_max``)."""
    hi = np.array(np.broadcast_to(np.asarray(u_max, dtype=float), (m,)), dtype=float)
    lo = -hi if u_min is None else np.array(np.broadcast_to(np.asarray(u_min, dtype=float), (m,)), dtype=float)
    return hi, lo


def batch_solver(safe_set: SafeActionSet, solver: str = "auto"):
    """``(solve, name)``: the batched projection of ``safe_set`` (``IntervalBatch`` when its
    rows are separable or ``solver="closed_form"``, else ``DaqpBatch``)."""
    if solver == "auto":
        solver = "closed_form" if safe_set.separable else "daqp"
    G, scale = np.asarray(safe_set.G, dtype=float), tolerance_scale(safe_set)
    if solver == "closed_form":
        return IntervalBatch(G, safe_set.u_max, scale, safe_set.u_min), solver
    if solver == "daqp":
        return DaqpBatch(G, safe_set.u_max, scale, safe_set.u_min, F=safe_set.F, rho_min=safe_set.rho_min,
                         rho_max=safe_set.rho_max), solver
    raise ValueError(f"solver must be auto, closed_form or daqp, got {solver!r}")


def project_batch(safe_set: SafeActionSet, x: np.ndarray, u: np.ndarray):
    """Batched projection (numpy) for states already in the set: ``(ũ, active, feasible)``.

    ``batch_solver``'s projection, exact (no inward margin); the feasibility slack follows
    ``x``'s dtype (float32 states on the boundary stay feasible).
    """
    dtype = state_dtype(x)
    b = safe_set.rhs(np.asarray(x, dtype=float))
    u = np.asarray(u, dtype=float)
    solve, _ = batch_solver(safe_set)
    lead, m = u.shape[:-1], u.shape[-1]
    ut, active, feasible = solve(torch.from_numpy(np.ascontiguousarray(u.reshape(-1, m))),
                                 torch.from_numpy(np.ascontiguousarray(b.reshape(-1, b.shape[-1]))), dtype)
    return (ut.numpy().reshape(u.shape), active.numpy().reshape(lead + (-1,)), feasible.numpy().reshape(lead))
