"""Differentiable action projection for batches (the SP-RL safeguard layer).

Forward: the same exact solvers as the per-step projector (closed form when the
constraints are separable, daqp otherwise), on a batch of raw actions ``u (B, m)`` and
right-hand sides ``b (B, k)`` of ``G ũ <= b``, ``|ũ| <= u_max``.

Backward: implicit differentiation of the KKT system. With the strictly active rows
``A_W`` (multiplier > 0) of ``A = [G; I; -I]``, the solution is locally the projection
onto the affine set ``{ũ : A_W ũ = b_W}``:

    ũ = u - A_W⁺ (A_W u - b_W),   ∂ũ/∂u = I - A_W⁺ A_W,   ∂ũ/∂b_W = A_W⁺,

with ``A_W⁺ = (A_Wᵀ A_W)⁺ A_Wᵀ`` (a pseudo-inverse, so linearly dependent active rows are
fine). ``∂ũ/∂u`` is the orthogonal projector onto the null space of ``A_W``: its rank is
``m - rank(A_W)``. That rank drop is *action aliasing*: raw actions that differ along
the active rows' span all map to the same safe action, and the policy gradient of
SP-RL loses those directions. ``rank_deficiency(active)`` reports ``rank(A_W)``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .invariant_set import SafeActionSet
from .projection import DaqpProjection, IntervalForm, qp_shifts, state_dtype, tolerance_scale, tolerances_for

EIG_TOL = 1e-9
"""Relative eigenvalue cut of ``A_Wᵀ A_W`` for float64; lower precisions use ``eig_tol``."""


def eig_tol(dtype: torch.dtype) -> float:
    """Eigenvalues below this (relative) are rounding: a float32 Gram matrix of dependent rows
    has ~1e-7 relative eigenvalues that a 1e-9 cut would invert into huge gradients."""
    return max(EIG_TOL, 100.0 * torch.finfo(dtype).eps)


def interval_slack(b: torch.Tensor, scale: float) -> float:
    """Feasibility slack (b units) for the right-hand sides ``b``: the projector's for their dtype."""
    return tolerances_for(state_dtype(b), scale).interval


class _ClosedForm:
    """Batched torch version of the interval projection (separable constraints)."""

    def __init__(self, G: np.ndarray, u_max: float, scale: float = 1.0):
        self.scale = scale
        form = IntervalForm(G, u_max)
        k, m = G.shape
        self.k, self.m, self.u_max = k, m, float(u_max)
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

    def __call__(self, u: torch.Tensor, b: torch.Tensor):
        k, m = self.k, self.m
        inv = torch.as_tensor(self.inv, dtype=b.dtype)
        ratio = (b * inv).unsqueeze(1)                                          # (B, 1, k)
        inf = torch.tensor(float("inf"), dtype=b.dtype)
        hi_g, hi_idx = torch.where(self.up, ratio, inf).min(-1)                # (B, m)
        lo_g, lo_idx = torch.where(self.lo, ratio, -inf).max(-1)
        hi = hi_g.clamp(max=self.u_max)
        lo = lo_g.clamp(min=-self.u_max)
        # feasible: the intervals of G ũ <= b + slack are non-empty (slack in b units: a rounding
        # error of b(x) is amplified by 1/G_ij in u units, ~1e3 for the double integrator)
        slack = interval_slack(b, self.scale)
        ratio_w = ((b + slack) * inv).unsqueeze(1)
        hi_w = torch.where(self.up, ratio_w, inf).min(-1).values.clamp(max=self.u_max)
        lo_w = torch.where(self.lo, ratio_w, -inf).max(-1).values.clamp(min=-self.u_max)
        feasible = (lo_w <= hi_w).all(-1)
        if len(self.const):
            feasible &= (b[:, self.const] >= -slack).all(-1)
        hi = torch.maximum(hi, lo)
        ut = torch.minimum(torch.maximum(u, lo), hi)
        cols = torch.arange(m)
        hi_row = torch.where(hi_g < self.u_max, hi_idx, k + cols)
        lo_row = torch.where(lo_g > -self.u_max, lo_idx, k + m + cols)
        over, under = u > hi, u < lo
        active = torch.zeros(u.shape[0], k + 2 * m, dtype=torch.bool)
        active.scatter_(1, torch.where(over, hi_row, lo_row), over | under)
        return ut, active, feasible


class _DaqpBatch:
    """One warm-started daqp solve per row of the batch (C calls; general ``G``)."""

    def __init__(self, G: np.ndarray, u_max: float, scale: float = 1.0):
        self.qp = DaqpProjection(G, u_max)
        self.k, self.m = G.shape
        self.scale = scale

    def __call__(self, u: torch.Tensor, b: torch.Tensor):
        # exact first, then outward within the dtype's slack, as the closed form's feasibility
        # test (the layer does not aim inside: its output must be the projection, for its gradients)
        shifts = [s for s in qp_shifts(tolerances_for(state_dtype(b), self.scale)) if s >= 0.0]
        un = u.detach().to(torch.float64).numpy()
        bn = b.detach().to(torch.float64).numpy()
        out = [self.qp.solve_shifted(ui, bi, shifts) for ui, bi in zip(un, bn)]
        ut = torch.as_tensor(np.stack([o[0] for o in out]), dtype=u.dtype)
        active = torch.as_tensor(np.stack([o[1] for o in out]))
        feasible = torch.as_tensor(np.array([o[2] for o in out]))
        return ut, active, feasible


def _active_rows_solve(A_full: torch.Tensor, active: torch.Tensor):
    """The active rows ``A_W = D Â`` (``D``: row norms, ``Â``: unit rows) of each sample:
    returns ``Â / D`` and ``N̂⁺ = (Âᵀ Â)⁺`` (so ``(A_W⁺)ᵀ g = (Â / D) N̂⁺ g``, the b-gradient),
    the range projector ``Â⁺ Â = A_W⁺ A_W`` (B, m, m) and the rank of ``A_W``. Rows are
    normalised first: the double integrator's rows of ``G`` have norm ~1e-3 beside the box
    rows' 1, and an eigenvalue cut relative to the largest would drop them in float32."""
    norms = A_full.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(A_full.dtype).tiny)
    A_hat = (A_full / norms).unsqueeze(0) * active.unsqueeze(-1).to(A_full.dtype)     # (B, K, m)
    N = A_hat.transpose(1, 2) @ A_hat
    e, V = torch.linalg.eigh(N)
    keep = e > eig_tol(e.dtype) * e.abs().amax(-1, keepdim=True).clamp(min=1.0)
    inv_e = torch.where(keep, 1.0 / torch.where(keep, e, torch.ones_like(e)), torch.zeros_like(e))
    Np = (V * inv_e.unsqueeze(1)) @ V.transpose(1, 2)
    P_range = (V * keep.to(V.dtype).unsqueeze(1)) @ V.transpose(1, 2)
    return A_hat / norms.unsqueeze(0), Np, P_range, keep.sum(-1)


class _ProjectQP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, b, solver, A_full, k):
        ut, active, feasible = solver(u, b)
        ctx.save_for_backward(active, A_full)
        ctx.k = k
        ctx.mark_non_differentiable(active, feasible)
        return ut, active, feasible

    @staticmethod
    def backward(ctx, grad_ut, _grad_active, _grad_feasible):
        active, A_full = ctx.saved_tensors
        A_b, Np, P_range, _ = _active_rows_solve(A_full.to(grad_ut.dtype), active)
        g = grad_ut.unsqueeze(-1)
        grad_u = (g - P_range @ g).squeeze(-1)
        grad_b = (A_b @ (Np @ g)).squeeze(-1)[:, :ctx.k]      # (A_W⁺)ᵀ g
        return grad_u, grad_b, None, None, None


class ProjectionLayer(nn.Module):
    """``Φ(x, u)`` for batches, differentiable in ``u`` and (through ``b(x)``) in ``x``.

    ``forward(x, u)`` returns the safe actions; ``project(u, b)`` takes the right-hand
    side directly. The last call's active mask and feasibility stay on the module
    (``last_active (B, k + 2m)``, ``last_feasible (B,)``): rows where ``x`` was outside
    the set are infeasible and their output is the raw action clipped to the box, so
    callers must check ``last_feasible`` (the study never leaves the set).
    """

    def __init__(self, safe_set: SafeActionSet, solver: str = "auto"):
        super().__init__()
        self.safe_set = safe_set
        G = np.asarray(safe_set.G, dtype=float)
        self.k, self.m = G.shape
        if solver == "auto":
            solver = "closed_form" if safe_set.separable else "daqp"
        scale = tolerance_scale(safe_set)
        if solver == "closed_form":
            self._solver = _ClosedForm(G, safe_set.u_max, scale)
        elif solver == "daqp":
            self._solver = _DaqpBatch(G, safe_set.u_max, scale)
        else:
            raise ValueError(f"solver must be auto, closed_form or daqp, got {solver!r}")
        self.solver = solver
        eye = np.eye(self.m)
        self.register_buffer("A_full", torch.as_tensor(np.vstack([G, eye, -eye])), persistent=False)
        self.last_active: torch.Tensor | None = None
        self.last_feasible: torch.Tensor | None = None

    def project(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ut, active, feasible = _ProjectQP.apply(u, b, self._solver, self.A_full, self.k)
        self.last_active, self.last_feasible = active, feasible
        return ut

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.project(u, self.safe_set.rhs(x))

    def jacobian(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """``∂ũ/∂u (B, m, m)`` at the active sets ``active`` (default: the last call's)."""
        active = self.last_active if active is None else active
        _, _, P_range, _ = _active_rows_solve(self.A_full, active)
        return torch.eye(self.m, dtype=P_range.dtype) - P_range

    def rank_deficiency(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """``m - rank(∂ũ/∂u)`` per sample (B,): how many action directions are aliased."""
        active = self.last_active if active is None else active
        return _active_rows_solve(self.A_full, active)[3]
