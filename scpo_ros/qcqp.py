"""SCPO's weight-space projection: a small convex QCQP solved exactly through its dual.

Problem (``d`` parameters, ``m`` constraints, usually 1-8)::

    minimise_Δ  ||Δ - Δ_raw||²
    s.t.        g_i(Δ) = c_i + a_iᵀΔ + e_i ||Δ|| + (L_i/2) ||Δ||²  <= 0     (e_i, L_i >= 0)
                ||Δ||² <= r²

Every function is convex, so this is a convex program with a strongly convex objective:
the optimum Δ* is unique when the feasible set is non-empty.

Dual. For multipliers y = (λ, μ) >= 0 the Lagrangian is, with
``w = 2Δ_raw - Aᵀλ``, ``α = 1 + ½Lᵀλ + μ``, ``β = eᵀλ``,

    ℒ(Δ, y) = α||Δ||² - wᵀΔ + β||Δ|| + ||Δ_raw||² + cᵀλ - μr².

Its minimiser points along ``w``; with ``n = ||w||`` its length minimises
``α t² - (n - β) t`` over ``t >= 0``::

    Δ(y) = t w / n,   t = max(0, n - β) / (2α)          (Δ = 0 when n <= β)
    q(y) = ||Δ_raw||² + cᵀλ - μr² - max(0, n - β)² / (4α)

``q`` is concave and continuously differentiable; by the envelope theorem its gradient is
the vector of constraint values at ``Δ(y)``, ``∂q/∂y = (g(Δ(y)), ||Δ(y)||² - r²)``, and where
``n > β`` its Hessian is::

    ∇²q = -v vᵀ / (2α) - (t/n) [[Aᵀ(I - uuᵀ)A, 0], [0, 0]],   u = w/n,
    v_j = a_jᵀu + e_j + L_j t   (the ball as constraint j = m+1 with a = 0, e = 0, L = 2).

Why the dual is exact. Weak duality ``q(y) <= ||Δ* - Δ_raw||²`` always holds. When a strictly
feasible point exists (Slater's condition), strong duality holds and a maximising y* is
attained; Δ(y*) is then the primal optimum (KKT: Δ(y*) minimises ℒ(·, y*), is feasible,
and complementary slackness holds). The solver stops only on a checked primal-dual
certificate: Δ(y) feasible to ``tol`` and duality gap ``-Σ y_j g_j`` below ``tol``; the
objective's strong convexity then bounds the distance to Δ*.

Infeasibility. The ball is compact, so the problem is infeasible exactly when some λ >= 0
gives ``min_{||Δ||<=r} λᵀg(Δ) > 0`` (minimax theorem); that minimum has a closed form
(one dimension along ``-Aᵀλ``), so every claim "infeasible" comes with such a certificate
checked in full precision. On an infeasible instance the dual is unbounded and the
Newton iterates' λ direction converges to a certificate.

Algorithm. Everything depends on A only through the Gram matrix of
``[Δ_raw, a_1 .. a_m]`` (one O(d m²) product). Constraints are first rescaled to unit size
and Δ to the unit ball, so tolerances are relative. A projected, Levenberg-Marquardt-damped
Newton method on the m+1 multipliers (bounds y >= 0 by an active set, a ratio test on
the true dual increase) runs on a (m+1)-dimensional factor of the Gram matrix; once it has
converged there, the same iteration continues with exact O(d m) evaluations in the full
space until the certificate holds in full precision (typically 0-1 more steps). The
iteration count is independent of d.

Statuses: "optimal" (certified), "infeasible" (certified, Δ = 0), "max_iter" (neither
certificate within ``max_iter`` iterations, Δ = 0; happens e.g. when the feasible set is a
single point and Slater fails). Callers must treat anything but "optimal" as "no step".
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class QCQPResult:
    status: str  # "optimal" | "infeasible" | "max_iter"
    delta: np.ndarray  # (d,) the solution; zeros unless optimal
    multipliers: np.ndarray  # (m+1,) λ_1..λ_m and μ for ||Δ||² <= r²; if infeasible: the certificate λ (sum 1), μ = 0
    constraint_values: np.ndarray  # (m,) c + AΔ + e||Δ|| + L/2||Δ||² at the returned Δ
    iterations: int
    solve_time_s: float


def constraint_values(delta: np.ndarray, A: np.ndarray, c: np.ndarray, e: np.ndarray, L: np.ndarray) -> np.ndarray:
    """``g(Δ) = c + AΔ + e||Δ|| + L/2 ||Δ||²`` for every constraint."""
    norm = float(np.linalg.norm(delta))
    return c + A @ delta + e * norm + 0.5 * L * norm * norm


def solve_qcqp(delta_raw, A, c, e, L, radius, tol: float = 1e-10, max_iter: int = 100) -> QCQPResult:
    """Project ``delta_raw`` onto ``{Δ : g(Δ) <= 0, ||Δ|| <= radius}`` (see the module docstring).

    ``tol`` is relative: constraint j is satisfied to ``tol * (|c_j| + (||a_j|| + e_j) r + L_j r²/2)``,
    the ball to ``tol * r``. Raises ValueError on NaN/Inf, mismatched shapes, negative e or L,
    or a radius that is not positive.
    """
    start = time.perf_counter()
    delta_raw, A, c, e, L, r = _validated(delta_raw, A, c, e, L, radius, tol, max_iter)
    m, d = A.shape

    def result(status, delta, multipliers, iterations):
        return QCQPResult(status, delta, multipliers, constraint_values(delta, A, c, e, L),
                          iterations, time.perf_counter() - start)

    raw_norm = float(np.linalg.norm(delta_raw))
    A_raw = A @ delta_raw
    if raw_norm <= r and np.all(c + A_raw + e * raw_norm + 0.5 * L * raw_norm**2 <= 0.0):
        return result("optimal", delta_raw.copy(), np.zeros(m + 1), 0)

    dual = _ScaledDual(delta_raw, A, c, e, L, r, A_raw)
    status, y, w, iterations = _maximise_dual(dual, tol, max_iter)
    if status == "infeasible":
        lam = y[:m] / dual.sigma  # certificate in the caller's units (any positive scaling works)
        return result("infeasible", np.zeros(d), np.append(lam / lam.sum(), 0.0), iterations)
    if status != "optimal":
        return result(status, np.zeros(d), np.zeros(m + 1), iterations)

    # Δ(y) in the full space from the exact w of the last iteration.
    n = float(np.linalg.norm(w))
    t = max(0.0, n - float(dual.e @ y[:m])) / (2.0 * dual.alpha(y))
    delta = (r * t / n) * w if t > 0.0 else np.zeros(d)
    delta = _shrink_into_feasible(delta, A, c, e, L, r)
    if np.linalg.norm(delta) <= tol * r and np.all(c <= 0.0):
        delta = np.zeros(d)  # within tolerance of the optimum, and feasible exactly rather than to tol
    multipliers = np.append(y[:m] * r * r / dual.sigma, y[m])
    g = constraint_values(delta, A, c, e, L)
    if np.any(g > tol * dual.sigma) or np.linalg.norm(delta) > r * (1.0 + tol):
        return result("max_iter", np.zeros(d), np.zeros(m + 1), iterations)
    return result("optimal", delta, multipliers, iterations)


def _validated(delta_raw, A, c, e, L, radius, tol, max_iter):
    delta_raw = np.asarray(delta_raw, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    c, e, L = (np.asarray(v, dtype=np.float64) for v in (c, e, L))
    if delta_raw.ndim != 1 or delta_raw.size == 0:
        raise ValueError(f"delta_raw must be a non-empty 1-D array, got shape {delta_raw.shape}")
    d = delta_raw.shape[0]
    if A.ndim != 2 or A.shape[1] != d:
        raise ValueError(f"A must have shape (m, {d}) to match delta_raw, got {A.shape}")
    m = A.shape[0]
    for name, v in (("c", c), ("e", e), ("L", L)):
        if v.shape != (m,):
            raise ValueError(f"{name} must have shape ({m},) to match A, got {v.shape}")
    for name, v in (("delta_raw", delta_raw), ("A", A), ("c", c), ("e", e), ("L", L)):
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} contains NaN or Inf")
    if np.any(e < 0) or np.any(L < 0):
        raise ValueError("e and L must be >= 0 (otherwise the constraints are not convex)")
    radius = float(radius)
    if not np.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be finite and > 0, got {radius}")
    if not (np.isfinite(tol) and tol > 0) or int(max_iter) < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    return delta_raw, A, c, e, L, radius


class _ScaledDual:
    """The dual of the rescaled problem: Δ = r x, constraint j divided by σ_j.

    σ_j = |c_j| + (||a_j|| + e_j) r + L_j r²/2 makes every constraint's terms at most 1 on the
    unit ball, so one tolerance fits all. The ball ||x||² <= 1 is constraint m (c = -1, L = 2).
    Multipliers here relate to the caller's as λ_j = ŷ_j r²/σ_j, μ = ŷ_m.
    """

    def __init__(self, delta_raw, A, c, e, L, r, A_raw):
        m = A.shape[0]
        sigma = np.abs(c) + (np.linalg.norm(A, axis=1) + e) * r + 0.5 * L * r * r
        self.sigma = np.where(sigma > 0, sigma, 1.0)  # σ = 0: the constraint reads 0 <= 0
        self.m, self.r, self.A, self.delta_raw = m, r, A, delta_raw
        self.col_scale = r / self.sigma  # â_j = a_j r / σ_j
        self.c_aug = np.append(c / self.sigma, -1.0)
        self.e = e * r / self.sigma
        self.L_aug = np.append(L * r * r / self.sigma, 2.0)
        self.raw_sq = float(delta_raw @ delta_raw) / (r * r)
        # Gram matrix of [x_raw, â_1..â_m] and a (k, m+1) factor F with FᵀF = Gram.
        gram = np.empty((m + 1, m + 1))
        gram[0, 0] = self.raw_sq
        gram[0, 1:] = gram[1:, 0] = A_raw / self.sigma
        gram[1:, 1:] = (A @ A.T) * np.outer(self.col_scale, self.col_scale)
        self.gram_A = gram[1:, 1:]
        eigval, eigvec = np.linalg.eigh(gram)
        keep = eigval > eigval[-1] * 1e-15 if eigval[-1] > 0 else np.zeros(m + 1, bool)
        self.factor = np.sqrt(eigval[keep])[:, None] * eigvec[:, keep].T

    def alpha(self, y):
        return 1.0 + 0.5 * float(self.L_aug @ y)

    # w = 2 x_raw - Âᵀλ and Âw, in the factor's coordinates (cheap) or the full space (exact).
    def w_reduced(self, lam):
        return 2.0 * self.factor[:, 0] - self.factor[:, 1:] @ lam

    def Aw_reduced(self, w):
        return self.factor[:, 1:].T @ w

    def w_exact(self, lam):
        return (2.0 / self.r) * self.delta_raw - self.A.T @ (lam * self.col_scale)

    def Aw_exact(self, w):
        return self.col_scale * (self.A @ w)

    def evaluate(self, y, exact: bool) -> _DualPoint:
        m, lam = self.m, y[: self.m]
        w = self.w_exact(lam) if exact else self.w_reduced(lam)
        n = float(np.linalg.norm(w))
        alpha = self.alpha(y)
        h = n - float(self.e @ lam)
        if h <= 0.0 or n == 0.0:  # Δ(y) = 0: q is linear here
            return _DualPoint(y, float(self.raw_sq + self.c_aug @ y), self.c_aug.copy(),
                              np.zeros((m + 1, m + 1)), w)
        t = h / (2.0 * alpha)
        Au = (self.Aw_exact(w) if exact else self.Aw_reduced(w)) / n
        p = np.append(Au + self.e, 0.0)
        g = self.c_aug + t * p + 0.5 * self.L_aug * t * t
        v = p + self.L_aug * t
        H = np.outer(v, v) / (-2.0 * alpha)
        H[:m, :m] -= (t / n) * (self.gram_A - np.outer(Au, Au))
        q = self.raw_sq + float(self.c_aug @ y) - h * h / (4.0 * alpha)
        return _DualPoint(y, q, g, H, w)

    def certifies_infeasibility(self, lam, margin: float) -> bool:
        """Whether ``min_{||x||<=1} Σ λ_j ĝ_j(x) > margin Σλ`` (exact, in the full space)."""
        total = float(lam.sum())
        if total <= 0.0:
            return False

        def min_over_ball(norm_Alam):
            slope = norm_Alam - float(self.e @ lam)  # decrease per unit length along -Âᵀλ
            curv = 0.5 * float(self.L_aug[: self.m] @ lam)
            t = 0.0 if slope <= 0 else (1.0 if curv <= slope / 2 else slope / (2 * curv))
            return float(self.c_aug[: self.m] @ lam) - slope * t + curv * t * t

        # cheap screen with the Gram matrix, confirmation without its round-off
        if min_over_ball(np.sqrt(max(0.0, lam @ self.gram_A @ lam))) <= margin * total:
            return False
        return min_over_ball(float(np.linalg.norm(self.A.T @ (lam * self.col_scale)))) > margin * total


@dataclass
class _DualPoint:
    y: np.ndarray  # (m+1,) multipliers (scaled problem)
    q: float  # dual value
    g: np.ndarray  # gradient = scaled constraint values at Δ(y), ball last
    H: np.ndarray  # Hessian (negative semidefinite)
    w: np.ndarray  # 2 x_raw - Âᵀλ (reduced or full-space coordinates)


def _maximise_dual(dual: _ScaledDual, tol: float, max_iter: int):
    """Projected LM-damped Newton ascent on q over y >= 0. Returns (status, y, w_exact, iterations)."""
    m = dual.m
    gap_scale = 1.0 + dual.raw_sq

    def kkt_residual(pt: _DualPoint) -> float:
        # primal infeasibility and duality gap, both relative
        return max(float(pt.g.max()), float(pt.y @ np.abs(pt.g)) / gap_scale, 0.0)

    # Any single constraint that cannot be met inside the ball settles it at once.
    for j in range(m):
        unit = np.zeros(m)
        unit[j] = 1.0
        if dual.certifies_infeasibility(unit, tol):
            return "infeasible", np.append(unit, 0.0), None, 0

    may_be_infeasible = bool(np.any(dual.c_aug[:m] > 0.0))  # otherwise Δ = 0 is feasible

    # Start from the pure ball projection's multiplier.
    y = np.zeros(m + 1)
    y[m] = max(0.0, np.sqrt(dual.raw_sq) - 1.0)
    exact = False
    pt = dual.evaluate(y, exact)
    damping = 1e-6
    for iteration in range(1, max_iter + 1):
        if kkt_residual(pt) <= tol:
            if exact:
                return "optimal", pt.y, pt.w, iteration - 1
            exact = True  # converged on the Gram factor: confirm/polish in full precision
            pt = dual.evaluate(pt.y, exact)
            if kkt_residual(pt) <= tol:
                return "optimal", pt.y, pt.w, iteration - 1
        if may_be_infeasible and dual.certifies_infeasibility(pt.y[:m], tol):
            return "infeasible", pt.y, None, iteration - 1

        step = _projected_newton_step(pt, damping)
        y_new = np.maximum(pt.y + step, 0.0)
        step = y_new - pt.y
        predicted = float(pt.g @ step + 0.5 * step @ pt.H @ step)
        trial = dual.evaluate(y_new, exact)
        actual = trial.q - pt.q
        if predicted <= 1e-14 * (abs(pt.q) + 1.0):
            # round-off level: judge the step by the optimality residual instead
            accept = kkt_residual(trial) < kkt_residual(pt)
            good = accept
        else:
            accept = actual >= 1e-4 * predicted
            good = actual >= 0.5 * predicted
        if accept:
            pt = trial
        damping = max(damping / 10.0, 1e-12) if good else min(damping * 10.0, 1e12)
    return "max_iter", pt.y, None, max_iter


def _projected_newton_step(pt: _DualPoint, damping: float) -> np.ndarray:
    """Damped Newton step for max q s.t. y >= 0 on a face of the bounds.

    Variables at their bound whose gradient points outwards stay there; a variable the step
    would push below zero is pinned at zero and the others are solved again, so the step
    maximises the (damped) quadratic model on that face and needs no clipping.
    """
    fixed = (pt.y <= 0.0) & (pt.g < 0.0)
    step = np.zeros_like(pt.y)
    while True:
        step[fixed] = -pt.y[fixed]
        free = ~fixed
        if not free.any():
            return step
        H_free = pt.H[free]
        neg_H = -H_free[:, free]
        scale = float(neg_H.diagonal().max())
        scale = scale if scale > 0.0 else 1.0  # q linear here (Δ(y) = 0)
        rhs = pt.g[free] + H_free[:, fixed] @ step[fixed]
        step[free] = np.linalg.solve(neg_H + damping * scale * np.eye(neg_H.shape[0]), rhs)
        leaving = free & (pt.y + step < 0.0)
        if not leaving.any():
            return step
        fixed |= leaving


def _shrink_into_feasible(delta, A, c, e, L, r):
    """Remove round-off violations by moving Δ towards 0 (safe where g_j(0) = c_j < 0).

    Each g_j is convex, so g_j(sΔ) <= (1 - s) c_j + s g_j(Δ): the factor below makes every
    violated constraint with c_j < 0 (and the ball) hold. The move is of round-off size.
    """
    g = constraint_values(delta, A, c, e, L)
    factor = 1.0
    fixable = (g > 0) & (c < 0)
    if fixable.any():
        factor = float(np.min(c[fixable] / (c[fixable] - g[fixable])))
    norm = float(np.linalg.norm(delta))
    if norm * factor > r:
        factor = r / norm
    return delta * factor if factor < 1.0 else delta
