"""Differentiable action projection for batches (the SP-RL safeguard layer).

Forward: ``projection.batch_solver``'s exact solvers (closed form when the constraints
are separable, daqp otherwise), on a batch of raw actions ``u (B, m)`` and
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

Sets with free reference variables ``ρ`` (the implicit sets, ``rho_dim > 0``) are refused with a
``ValueError``: their projection is a QP in ``(ũ, ρ)`` whose derivative this layer does not form.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .invariant_set import SafeActionSet
from .projection import batch_solver

EIG_TOL = 1e-9
"""Relative eigenvalue cut of ``A_Wᵀ A_W`` for float64; lower precisions use ``eig_tol``."""


def eig_tol(dtype: torch.dtype) -> float:
    """Eigenvalues below this (relative) are rounding: a float32 Gram matrix of dependent rows
    has ~1e-7 relative eigenvalues that a 1e-9 cut would invert into huge gradients."""
    return max(EIG_TOL, 100.0 * torch.finfo(dtype).eps)


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
        if safe_set.rho_dim:
            # The backward pass differentiates the projection onto {G ũ <= b}; with free reference
            # variables the active rows are rows of [G F] in (ũ, ρ) and their gradient is another
            # formula (and the ρ weight would enter it). Refused rather than silently wrong.
            raise ValueError(f"ProjectionLayer: {safe_set.name or 'this set'} has {safe_set.rho_dim} free "
                             f"reference variables (an implicit set); the differentiable layer supports "
                             f"sets without them (explicit or model sets) only")
        self.safe_set = safe_set
        G = np.asarray(safe_set.G, dtype=float)
        self.k, self.m = G.shape
        self._solver, self.solver = batch_solver(safe_set, solver)
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
