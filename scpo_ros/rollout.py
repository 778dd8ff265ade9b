"""Batched closed-loop rollouts of the residual policy and the SCPO safety metrics.

One call simulates ``N`` weight vectors × ``M`` initial states × ``H`` steps as a
handful of batched matmuls per time step (the only Python loop is over time).

Safety metrics ``g`` (≤ 0 is safe), each a maximum over initial states and time:
- ``position``:  max |p| - p_max
- ``velocity``:  max |v| - v_max
- ``actuation``: max |u| - u_max   (the policy output itself; nothing is clipped)
- ``lyapunov``:  max min(V(e⁺) - (1-α) V(e),  V(e⁺) - ε)   on the tracking error
  e = x - [r, 0], with the backup's ``V(e) = eᵀ P e``: V must shrink by α per step
  unless the next state lies in the ε-sublevel set. This keeps every trajectory in
  {V ≤ max(V(e_0), ε)} and drives it into {V ≤ ε} (practical stability). We chose it
  over the additive form V(e⁺) ≤ (1-α)V(e) + αε, whose slack of only αε at
  equilibrium made the metric quadratic-degenerate there and throttled learning.

- ``safe_set``:  max_i (E_i x + G_i u - f_i): the command stays in ``U_safe(x)`` of the
  safe set the command envelope projects onto (``safeguard.invariant_set``; with
  ``late_commands=1`` also when the plant holds it one period longer). Certifying this
  metric is what lets the envelope pass the certified policy's commands unchanged; its
  rows have unit-norm state normals, so the metric is a distance.

V is computed afresh at every step from e⁺ (one matmul gives e⁺ and P e⁺), never
accumulated: in float32 its error is ~1e-7·V, and the metric's maximum sits near the
shell V ≈ ε where that is ~1e-7, far below the certification margin (1e-3).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .backup import InitialSet, LQRBackup
from .dynamics import DoubleIntegrator
from .policy import MLPLayout
from .safeguard.invariant_set import safe_set_for

METRICS = ("position", "velocity", "actuation", "lyapunov", "safe_set")


@dataclass(frozen=True)
class SafetySpec:
    horizon: int = 100
    """Rollout length H (steps of dt)."""
    lyap_alpha: float = 0.01
    """Required relative decrease of V per step (the backup itself achieves ≥ 0.034 with the defaults)."""
    lyap_eps: float = 0.5
    """V-level of the terminal set {V ≤ ε} where decrease is no longer required
    (with the default backup: |e_p| ≤ 0.13, |e_v| ≤ 0.07 inside it)."""
    cost_action_weight: float = 0.1
    """Task cost: mean over states of Σ_t (|p - r|² + w |u|²) dt."""

    def __post_init__(self):
        if self.horizon < 1:
            raise ValueError("horizon must be >= 1")
        if not 0.0 <= self.lyap_alpha < 1.0:
            raise ValueError("lyap_alpha must lie in [0, 1)")
        if self.lyap_eps < 0.0:
            raise ValueError("lyap_eps must be >= 0")


@dataclass
class RolloutResult:
    g: torch.Tensor
    """(N, 5) safety metrics (``METRICS``) per weight vector (max over states and time)."""
    cost: torch.Tensor | None
    """(N,) task cost per weight vector (with ``with_cost=True``)."""
    g_per_state: torch.Tensor | None = None
    """(N, M, 5) per initial state, when asked for."""


class DoubleIntegratorRollout:
    """Closed loop ``u = -K e + φ_θ([x, r])`` of a ``DoubleIntegrator`` under its LQR backup."""

    def __init__(self, system: DoubleIntegrator, backup: LQRBackup, layout: MLPLayout,
                 spec: SafetySpec = SafetySpec(), device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, safe_rows: tuple | None = None):
        """``safe_rows = (E, G, f)``: ``U_safe(x) = {u : G u <= f - E x}`` of the envelope's safe
        set (``SafeActionSet.affine_rows()``); default: the set ``safe_set_for(system,
        late_commands=1)`` that the safety node's envelope uses."""
        if layout.in_dim != 3 * system.dof or layout.out_dim != system.dof:
            raise ValueError(f"layout {layout.sizes} does not fit dof={system.dof} "
                             f"(need in_dim={3 * system.dof}, out_dim={system.dof})")
        self.system, self.backup, self.layout, self.spec = system, backup, layout, spec
        self.device, self.dtype = torch.device(device), dtype
        as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=self.device)  # noqa: E731
        # One matmul pair per step yields the next error, the action and P e+ (row-vector
        # form): out = e G_e + φ G_φ = [e+ | u | P e+], so V(e+) = e+ · (P e+).
        # The safe-set rows at step t, E x_t + G u_t - f with x_t = e_t + x_ref and
        # u_t = -K e_t + φ_t, are four more column blocks of the same pair:
        # e (E - G K)ᵀ + φ Gᵀ, plus a per-state constant x_ref Eᵀ - f.
        if safe_rows is None:
            safe_rows = safe_set_for(system, late_commands=1).affine_rows()
        E, G, f = (np.asarray(a, dtype=np.float64) for a in safe_rows)
        self._E, self._f = as_t(E), as_t(f)
        Acl, Bm, P = backup.A_cl, system.B, backup.P
        self._G_e = as_t(np.hstack([Acl.T, -backup.K.T, Acl.T @ P, (E - G @ backup.K).T]))
        self._G_phi = as_t(np.hstack([Bm.T, np.eye(system.dof), Bm.T @ P, G.T]))
        self._P = as_t(P)
        self.limits = (system.p_max, system.v_max, system.u_max)

    def _layers(self, params: torch.Tensor):
        """Per-layer ``(Wᵀ (N, in, out), b (N, 1, out))``, laid out for ``baddbmm``."""
        return [(W.transpose(-1, -2).contiguous(), b.unsqueeze(-2).contiguous())
                for W, b in self.layout.unflatten(params)]

    @torch.no_grad()
    def evaluate(self, params: torch.Tensor, x0: torch.Tensor, r: torch.Tensor,
                 per_state: bool = False, with_cost: bool = False) -> RolloutResult:
        """Roll out ``params (N, d)`` from every ``x0 (M, 2 dof)`` with references ``r (M, dof)``.

        The loop body is a fixed, short list of batched kernels writing into buffers
        allocated once per call: the MLP (3 matmuls, 2 in-place tanh), then one pair of
        matmuls ``out = e G_e + φ G_φ`` producing in one go the next error, the action,
        and the vectors the two Lyapunov quadratic forms need; running maxima/minima
        of e and u give the box metrics exactly at the end (r is constant).
        """
        params = torch.as_tensor(params, dtype=self.dtype, device=self.device)
        if params.ndim == 1:
            params = params.unsqueeze(0)
        x0 = torch.as_tensor(x0, dtype=self.dtype, device=self.device)
        r = torch.as_tensor(r, dtype=self.dtype, device=self.device)
        N, M, n = params.shape[0], x0.shape[0], self.system.dof
        B = N * M
        layers = self._layers(params)
        (W0T, b0), hidden, (WLT, bL) = layers[0], layers[1:-1], layers[-1]
        # The state is propagated as the tracking error e = x - x_ref; x_ref = [r, 0] and
        # r are constant along a rollout, so their part of layer 0 folds into its bias.
        x_ref = torch.cat([r, torch.zeros_like(r)], -1)
        W0eT = W0T[:, : 2 * n]
        bias0 = torch.matmul(torch.cat([x_ref, r], -1).unsqueeze(0), W0T) + b0   # (N, M, h0)
        G_e, G_phi = self._G_e, self._G_phi
        width = G_e.shape[1]
        out = torch.empty(B, width, dtype=self.dtype, device=self.device)
        tmp = torch.empty(B, width, dtype=self.dtype, device=self.device)
        hbufs = [torch.empty(N, M, W.shape[-1], dtype=self.dtype, device=self.device)
                 for W, _ in [(W0T, None)] + hidden]
        phi = torch.empty(N, M, n, dtype=self.dtype, device=self.device)
        # e lives in its own contiguous buffers: the layer-0 matmul is ~30 % faster on them
        # than on a column slice of `out`.
        e_bufs = [(x0 - x_ref).repeat(N, 1), torch.empty(B, 2 * n, dtype=self.dtype, device=self.device)]
        e = e_bufs[0]
        e_max, e_min = e.clone(), e.clone()
        u_max = torch.full((B, n), -torch.inf, dtype=self.dtype, device=self.device)
        u_min = torch.full((B, n), torch.inf, dtype=self.dtype, device=self.device)
        lyap = torch.full((B,), -torch.inf, dtype=self.dtype, device=self.device)
        safe_const = (x_ref @ self._E.T - self._f).repeat(N, 1)                  # (B, R)
        safe_max = torch.full_like(safe_const, -torch.inf)
        V = ((e @ self._P) * e).sum(-1)
        cost = torch.zeros(B, dtype=self.dtype, device=self.device) if with_cost else None
        eps, alpha, w_u = self.spec.lyap_eps, self.spec.lyap_alpha, self.spec.cost_action_weight
        phi2 = phi.view(B, n)
        for t in range(self.spec.horizon):
            h = torch.baddbmm(bias0, e.view(N, M, 2 * n), W0eT, out=hbufs[0]).tanh_()
            for (WT, b), hb in zip(hidden, hbufs[1:]):
                h = torch.baddbmm(b, h, WT, out=hb).tanh_()
            torch.matmul(h, WLT, out=phi).add_(bL)  # faster than baddbmm for one output column
            torch.mm(phi2, G_phi, out=tmp)
            torch.addmm(tmp, e, G_e, out=out)
            # columns of out: [e+ | u | P e+ | safe-set rows minus their constant]
            u = out[:, 2 * n: 3 * n]
            torch.maximum(safe_max, out[:, 5 * n:], out=safe_max)
            torch.maximum(u_max, u, out=u_max)
            torch.minimum(u_min, u, out=u_min)
            e_next = out[:, : 2 * n]
            V_next = (out[:, 3 * n: 5 * n] * e_next).sum(-1)
            # min(V+ - (1-α)V, V+ - ε) = V+ - max((1-α)V, ε)
            torch.maximum(lyap, V_next - V.mul_(1.0 - alpha).clamp_min_(eps), out=lyap)
            V = V_next
            if with_cost:
                cost += (e[:, :n] * e[:, :n]).sum(-1) + w_u * (u * u).sum(-1)
            e = e_bufs[(t + 1) % 2].copy_(e_next)
            torch.maximum(e_max, e, out=e_max)
            torch.minimum(e_min, e, out=e_min)
        rr = r.repeat(N, 1)
        p_bound = torch.maximum(e_max[:, :n] + rr, -(e_min[:, :n] + rr)).amax(-1)
        v_bound = torch.maximum(e_max[:, n:], -e_min[:, n:]).amax(-1)
        u_bound = torch.maximum(u_max, -u_min).amax(-1)
        limits = self.limits
        safe = (safe_max + safe_const).amax(-1)   # the constant is per state: add it once, after the max
        per = torch.stack([p_bound - limits[0], v_bound - limits[1], u_bound - limits[2], lyap, safe],
                          -1).view(N, M, len(METRICS))
        g = per.amax(1)
        if with_cost:
            cost = cost.view(N, M).mean(1) * self.system.dt
        return RolloutResult(g=g, cost=cost, g_per_state=per if per_state else None)


def region_bounds(initial_set: InitialSet, dof: int) -> np.ndarray:
    """Half-widths ``(3 dof,)`` of the (x0, r) box of ``initial_set``, in the order ``[p, v, r]``
    of ``policy_inputs`` (every sampler of initial conditions scales by these)."""
    return np.array([initial_set.p0_max] * dof + [initial_set.v0_max] * dof + [initial_set.r_max] * dof)


def structured_states(initial_set: InitialSet, dof: int, max_points: int = 256,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic initial conditions where the metrics are tightest.

    The (x0, r) box's vertices (the worst case of any linear closed loop sits there),
    centres of its edges and faces (the points of {-1, 0, 1}^(3 dof), subsampled
    when there are too many), and states near equilibrium at several scales, where
    the Lyapunov condition is tightest.
    """
    s = region_bounds(initial_set, dof)
    grid = np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=3 * dof)))
    is_vertex = np.all(grid != 0.0, axis=1)
    vertices, others = grid[is_vertex], grid[~is_vertex]
    rng = np.random.default_rng(seed)
    near = []
    for scale in (1e-3, 1e-2, 5e-2):
        r = rng.uniform(-1.0, 1.0, size=(8, dof)) * initial_set.r_max
        e = rng.standard_normal((8, 2 * dof)) * scale
        near.append(np.concatenate([(e[:, :dof] + r) / s[:dof], e[:, dof:] / s[dof:2 * dof], r / s[2 * dof:]], 1))
    near = np.clip(np.concatenate(near), -1.0, 1.0)
    budget = max(0, max_points - len(vertices) - len(near))
    if len(others) > budget:
        others = others[rng.choice(len(others), budget, replace=False)]
    unit = np.concatenate([vertices, others, near])
    pts = unit * s
    return pts[:, : 2 * dof], pts[:, 2 * dof:]


def random_states(initial_set: InitialSet, dof: int, count: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uniform initial states and references in the (x0, r) box."""
    s = region_bounds(initial_set, dof)
    pts = rng.uniform(-1.0, 1.0, size=(count, 3 * dof)) * s
    return pts[:, : 2 * dof], pts[:, 2 * dof:]


def state_set(initial_set: InitialSet, dof: int, count: int, rng: np.random.Generator,
              structured: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` initial conditions: the structured points first, the rest uniform random."""
    if structured is None:
        structured = structured_states(initial_set, dof, max_points=count // 2)
    xs, rs = structured
    xr, rr = random_states(initial_set, dof, max(0, count - len(xs)), rng)
    return np.concatenate([xs, xr])[:count], np.concatenate([rs, rr])[:count]
