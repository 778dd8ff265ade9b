"""SCPO: sampling-based, certified weight-space projection (arXiv 2512.13788, our design where noted).

``SCPOProjector.step(θ_k, Δ_raw)`` turns a raw update proposed by *any* optimiser or
learner into a certified one. It only needs two black-box functions of a batch of
flat parameter vectors: ``sample_constraints`` (the safety metrics ``g`` on the
sampling states) and ``certify_constraints`` (the same metrics on fresh, held-out
states). ``g ≤ 0`` is safe. One step:

1. Subspace (ours). ``K < d`` samples recover only ~K/d of a full-space gradient, so
   the step is restricted to ``U = orth[Δ_raw, previous ĝ_1..ĝ_m, a few random
   directions]``; with ``||Δ|| = ||z||`` for ``Δ = U z``.
2. Sample ``K`` perturbations ``δ_j = U z_j`` at two radii (σ and σ/4) and evaluate
   ``g(θ_k)`` and every ``g(θ_k + δ_j)`` in one batched call.
3. Fit ``ĝ_i`` by least squares on ``g_i(θ_k+δ_j) - g_i(θ_k) ≈ ĝ_iᵀ z_j``; bound the
   misfit by ``e_i ρ + (L_i/2) ρ²`` through its maxima at both radii, times the safety
   factor ``κ`` (ours: the paper's recipe is unknown; κ = 2 per the feasibility study).
4. Project (the paper's QCQP):
   ``min ||z - z_raw||²  s.t.  g_i + ĝ_iᵀz + e_i||z|| + (L_i/2)||z||² ≤ target_i, ||z|| ≤ σ``
   with ``target_i = max(-m_i, min(g_i, 0))``: outside the margin band keep the margin,
   inside it only forbid getting worse, so ``z = 0`` stays feasible whenever θ_k is
   safe on the sampling states (ours).
5. Certify (ours): ``θ_k + Δ*`` is committed only if every ``g_i ≤ -c_i`` on the
   certification states; otherwise ``Δ*/2, Δ*/4, ...`` are tried (one batched call),
   otherwise nothing is committed. No uncertified vector is ever returned.

The projector knows nothing about what the metrics measure: it depends on numpy, torch
and the QCQP only. ``residual_scpo.ResidualSCPO`` is its client for the residual policy
of a double integrator (the metrics, their margins, the sampling states).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .qcqp import solve_qcqp

ConstraintFn = Callable[[torch.Tensor], torch.Tensor]
"""Flat parameter vectors ``(N, d)`` → safety metrics ``(N, m)``, ≤ 0 safe."""

COMMITTED = ("accepted", "backtracked")
"""Statuses of a decision that committed new parameters (``Decision.committed``)."""
STATUSES = COMMITTED + ("rejected", "infeasible")
"""Every status a decision can have."""


@dataclass(frozen=True)
class SCPOConfig:
    n_samples: int = 64
    """K: parameter perturbations evaluated per step (one batched rollout)."""
    sample_radius: float = 0.05
    """σ: outer sampling radius in weight space; also the largest step taken (trust radius)."""
    inner_radius_ratio: float = 0.25
    """Second sampling radius as a fraction of σ (two radii separate the linear and the curvature term)."""
    n_random_directions: int = 4
    """Random directions added to the step subspace each step."""
    safety_factor: float = 2.0
    """κ ≥ 1 multiplying the fitted error and curvature bounds."""
    margins: tuple[float, ...] = (0.02,)
    """m_i: margin each metric must keep below 0 in the projection: one value for every metric,
    or one per metric (a client whose metrics have different scales sets one per metric)."""
    cert_margins: tuple[float, ...] = (0.005,)
    """c_i: certification requires g_i ≤ -c_i on the held-out states (one value, or one per metric)."""
    max_backtracks: int = 3
    """Halvings of the projected step tried when it fails certification."""
    ridge: float = 1e-9
    """Tikhonov term of the gradient fit (relative to the sample scale)."""

    def __post_init__(self):
        object.__setattr__(self, "margins", _as_tuple(self.margins))
        object.__setattr__(self, "cert_margins", _as_tuple(self.cert_margins))
        checks = [
            (self.n_samples >= 2, "n_samples must be >= 2"),
            (np.isfinite(self.sample_radius) and self.sample_radius > 0, "sample_radius must be > 0"),
            (0.0 < self.inner_radius_ratio < 1.0, "inner_radius_ratio must lie in (0, 1)"),
            (self.n_random_directions >= 0, "n_random_directions must be >= 0"),
            (np.isfinite(self.safety_factor) and self.safety_factor >= 1.0, "safety_factor must be >= 1"),
            (all(np.isfinite(m) and m >= 0 for m in self.margins), "margins must be finite and >= 0"),
            (all(np.isfinite(c) and c >= 0 for c in self.cert_margins), "cert_margins must be finite and >= 0"),
            (0 <= self.max_backtracks <= 20, "max_backtracks must lie in [0, 20]"),
            (self.ridge >= 0, "ridge must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def _as_tuple(value) -> tuple[float, ...]:
    if np.isscalar(value):
        return (float(value),)
    return tuple(float(v) for v in value)


def _certified(g: torch.Tensor, cert_margins: np.ndarray) -> torch.Tensor:
    """Which rows of ``g (N, m)`` pass certification: finite and ``g_i <= -c_i`` for all i."""
    return torch.isfinite(g).all(1) & (g <= -torch.as_tensor(cert_margins, dtype=g.dtype)).all(1)


def _broadcast(values: tuple[float, ...], m: int, name: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(m, values[0])
    if len(values) != m:
        raise ValueError(f"{name} has {len(values)} entries for {m} constraints")
    return np.asarray(values, dtype=float)


@dataclass
class Decision:
    """What one SCPO step did, for logs, topics and bags."""

    status: str
    reason: str = ""
    step: int = 0
    margins_before: dict = field(default_factory=dict)
    """g(θ_k) on the sampling states, per metric (≤ 0 safe)."""
    margins_after: dict = field(default_factory=dict)
    """g on the certification states of the committed vector (or of the last failed candidate)."""
    predicted: dict = field(default_factory=dict)
    """The QCQP's upper bound on g at the projected step."""
    raw_step_norm: float = 0.0
    projected_step_norm: float = 0.0
    committed_step_norm: float = 0.0
    backtracks: int = 0
    times_ms: dict = field(default_factory=dict)
    covers: str = ""
    """What the certificate is about (the caller's: ``rollout.PlantRollout.covers``)."""

    @property
    def committed(self) -> bool:
        return self.status in COMMITTED

    def to_dict(self) -> dict:
        return asdict(self)


class SCPOProjector:
    """Certified projection of raw updates for any flat-parameter model and black-box constraints."""

    def __init__(self, sample_constraints: ConstraintFn, certify_constraints: ConstraintFn,
                 config: SCPOConfig = SCPOConfig(), names: Sequence[str] | None = None, seed: int = 0):
        self.sample_constraints = sample_constraints
        self.certify_constraints = certify_constraints
        self.config = config
        self.names = tuple(names) if names is not None else None
        self.generator = torch.Generator().manual_seed(seed)
        self.prev_gradients: torch.Tensor | None = None  # (m, d) full-space ĝ of the last step
        self.steps = 0

    def _named(self, values) -> dict:
        values = [float(v) for v in np.asarray(values).reshape(-1)]
        names = self.names if self.names is not None and len(self.names) == len(values) else \
            tuple(f"g{i}" for i in range(len(values)))
        return dict(zip(names, values))

    def _subspace(self, delta_raw: torch.Tensor) -> torch.Tensor:
        """Orthonormal basis ``U (d, k)`` of the step subspace."""
        cols = []
        if float(delta_raw.norm()) > 0:
            cols.append(delta_raw)
        if self.prev_gradients is not None:
            cols.extend(self.prev_gradients)
        d = delta_raw.numel()
        for _ in range(self.config.n_random_directions):
            cols.append(torch.randn(d, generator=self.generator, dtype=delta_raw.dtype))
        M = torch.stack(cols, 1).double()
        M = M / M.norm(dim=0, keepdim=True).clamp_min(1e-300)
        Q, R = torch.linalg.qr(M)
        keep = R.diagonal().abs() > 1e-8  # drop directions already spanned
        return Q[:, keep]

    def _sample_offsets(self, k: int) -> torch.Tensor:
        """``K`` subspace offsets ``z_j``: half at radius σ, half at σ·ratio, random directions."""
        cfg = self.config
        z = torch.randn(cfg.n_samples, k, generator=self.generator, dtype=torch.float64)
        z = z / z.norm(dim=1, keepdim=True)
        radii = torch.full((cfg.n_samples, 1), cfg.sample_radius, dtype=torch.float64)
        radii[cfg.n_samples // 2:] *= cfg.inner_radius_ratio
        return z * radii

    def _fit(self, z: torch.Tensor, dg: torch.Tensor):
        """Least-squares ``ĝ (m, k)`` and misfit bounds ``e, L`` from two sampling radii."""
        cfg = self.config
        k = z.shape[1]
        gram = z.T @ z + cfg.ridge * cfg.sample_radius**2 * torch.eye(k, dtype=z.dtype)
        grad = torch.linalg.solve(gram, z.T @ dg).T                      # (m, k)
        resid = (dg - z @ grad.T).abs()                                   # (K, m)
        half = cfg.n_samples // 2
        rho1, rho2 = cfg.sample_radius * cfg.inner_radius_ratio, cfg.sample_radius
        R1, R2 = resid[half:].amax(0).numpy(), resid[:half].amax(0).numpy()
        # e ρ + L/2 ρ² through both points; clamp to the non-negative fit that still covers both.
        det = rho1 * rho2 * (rho2 - rho1) / 2.0
        L = 2.0 * (R2 * rho1 - R1 * rho2) / (rho1 * rho2 * (rho2 - rho1))
        e = (R1 * rho2**2 - R2 * rho1**2) / (2.0 * det)
        neg_L, neg_e = L < 0, e < 0
        L = np.where(neg_L, 0.0, L)
        e = np.where(neg_L, np.maximum(R1 / rho1, R2 / rho2), e)
        e = np.where(neg_e & ~neg_L, 0.0, e)
        L = np.where(neg_e & ~neg_L, 2.0 * np.maximum(R1 / rho1**2, R2 / rho2**2), L)
        return grad, cfg.safety_factor * e, cfg.safety_factor * L

    def step(self, theta: torch.Tensor, delta_raw: torch.Tensor) -> tuple[torch.Tensor, Decision]:
        """One certified step from the certified ``theta`` towards ``theta + delta_raw``.

        Returns the new certified parameters (``theta`` itself unless the step commits)
        and the decision record. Non-finite or mis-sized input is refused as "rejected".
        """
        t_start = time.perf_counter()
        self.steps += 1
        theta = torch.as_tensor(theta).detach().reshape(-1)
        delta_raw = torch.as_tensor(delta_raw, dtype=theta.dtype).detach().reshape(-1)
        decision = Decision(status="rejected", step=self.steps,
                            raw_step_norm=float(delta_raw.norm()) if torch.isfinite(delta_raw).all() else float("nan"))
        decision.reason = _refusal(theta, delta_raw)
        if decision.reason:
            return theta, decision
        times: dict = {}
        lin = self._sample_and_fit(theta, delta_raw, decision, times)
        step = None if lin is None else self._project(theta, delta_raw, lin, decision, times)
        new_theta = theta if step is None else self._certify(theta, step, lin.cert_margins, decision, times)
        times["total"] = 1e3 * (time.perf_counter() - t_start)
        decision.times_ms = times
        return new_theta, decision

    def _sample_and_fit(self, theta: torch.Tensor, delta_raw: torch.Tensor, decision: Decision,
                        times: dict) -> _Linearisation | None:
        """Steps 1-3: the subspace, one batched evaluation of θ_k and all samples, the fit.
        ``None`` (with the reason in ``decision``) when the evaluation is not finite."""
        t0 = time.perf_counter()
        U = self._subspace(delta_raw)
        z = self._sample_offsets(U.shape[1])
        batch = torch.cat([theta.unsqueeze(0), theta.unsqueeze(0) + (z @ U.T).to(theta.dtype)])
        g_all = self.sample_constraints(batch).double().cpu()
        t1 = time.perf_counter()
        times["sample"] = 1e3 * (t1 - t0)
        g0, dg = g_all[0], g_all[1:] - g_all[0]
        m = g0.numel()
        decision.margins_before = self._named(g0)
        margins = _broadcast(self.config.margins, m, "margins")
        cert_margins = _broadcast(self.config.cert_margins, m, "cert_margins")
        if not torch.isfinite(g_all).all():
            decision.reason = "constraint evaluation returned NaN/Inf"
            return None
        grad, e, L = self._fit(z, dg)
        times["fit"] = 1e3 * (time.perf_counter() - t1)
        self.prev_gradients = (grad @ U.T).to(theta.dtype)
        return _Linearisation(U, g0, grad, e, L, margins, cert_margins)

    def _project(self, theta: torch.Tensor, delta_raw: torch.Tensor, lin: _Linearisation,
                 decision: Decision, times: dict) -> torch.Tensor | None:
        """Step 4: the QCQP in subspace coordinates (``U`` has orthonormal columns).
        Returns the full-space step, or ``None`` (reason in ``decision``) when there is none."""
        t2 = time.perf_counter()
        g0n = lin.g0.numpy()
        target = np.maximum(-lin.margins, np.minimum(g0n, 0.0))
        z_raw = (lin.U.T @ delta_raw.double()).numpy()
        sol = solve_qcqp(z_raw, lin.grad.numpy(), g0n - target, lin.e, lin.L, self.config.sample_radius)
        times["qcqp"] = 1e3 * (time.perf_counter() - t2)
        if sol.status == "optimal":
            z_star = torch.as_tensor(sol.delta)
            decision.predicted = self._named(sol.constraint_values + target)
            decision.projected_step_norm = float(z_star.norm())
            if decision.projected_step_norm <= 1e-12 * max(1.0, float(theta.norm())):
                decision.reason = "projection left no safe step in the proposed direction"
        else:
            decision.status = "infeasible"
            decision.reason = f"projection {sol.status}: no step keeps the predicted margins"
        if decision.reason:  # nothing to certify
            times["certify"] = 0.0
            return None
        return (lin.U @ z_star).to(theta.dtype)

    def _certify(self, theta: torch.Tensor, step: torch.Tensor, cert_margins: np.ndarray,
                 decision: Decision, times: dict) -> torch.Tensor:
        """Step 5: certify on fresh states, the full step first, the halvings (one batched
        call) only if it fails. Returns the committed parameters (``theta`` if none passed)."""
        cfg = self.config
        t3 = time.perf_counter()
        new_theta = theta
        g_cert = self.certify_constraints((theta + step).unsqueeze(0)).double().cpu()
        ok = _certified(g_cert, cert_margins)
        if bool(ok[0]):
            new_theta, decision.status, decision.backtracks = theta + step, "accepted", 0
            decision.margins_after = self._named(g_cert[0])
        elif cfg.max_backtracks > 0:
            scales = 0.5 ** torch.arange(1, cfg.max_backtracks + 1, dtype=theta.dtype)
            cands = theta.unsqueeze(0) + scales.unsqueeze(1) * step.unsqueeze(0)
            g_cert = self.certify_constraints(cands).double().cpu()
            ok = _certified(g_cert, cert_margins)
            if bool(ok.any()):
                j = int(torch.nonzero(ok)[0])
                new_theta, decision.status, decision.backtracks = cands[j], "backtracked", j + 1
                decision.margins_after = self._named(g_cert[j])
            else:
                decision.margins_after = self._named(g_cert[-1])
                decision.reason = f"certification failed after {cfg.max_backtracks} halvings"
        else:
            decision.margins_after = self._named(g_cert[0])
            decision.reason = "certification failed"
        if decision.committed:
            decision.committed_step_norm = float((new_theta - theta).norm())
        times["certify"] = 1e3 * (time.perf_counter() - t3)
        return new_theta

    def recertify(self, theta: torch.Tensor) -> Decision:
        """Certify ``theta`` itself on fresh certification states, without a step (e.g. after
        the constraints changed): "accepted" if it passes, "rejected" otherwise.

        A failed check also drops the previous step's gradients: the caller must move to other
        parameters (it may not keep uncertified ones), where those gradients say nothing.
        """
        t0 = time.perf_counter()
        theta = torch.as_tensor(theta).detach().reshape(-1)
        g = self.certify_constraints(theta.unsqueeze(0))[0].double().cpu()
        ok = bool(_certified(g.unsqueeze(0), _broadcast(self.config.cert_margins, g.numel(), "cert_margins"))[0])
        decision = Decision(status="accepted" if ok else "rejected", step=self.steps, margins_after=self._named(g),
                            reason="re-certification" if ok else "re-certification failed")
        if not ok:
            self.prev_gradients = None
        certify_ms = 1e3 * (time.perf_counter() - t0)
        decision.times_ms = {"certify": certify_ms, "total": certify_ms}
        return decision


@dataclass
class _Linearisation:
    """What steps 1-3 found at θ_k, in the subspace ``U``: the model the QCQP uses."""

    U: torch.Tensor
    """(d, k) orthonormal basis of the step subspace."""
    g0: torch.Tensor
    """(m,) the metrics at θ_k on the sampling states."""
    grad: torch.Tensor
    """(m, k) fitted gradients ĝ_i."""
    e: np.ndarray
    """(m,) error-bound coefficients (× κ)."""
    L: np.ndarray
    """(m,) curvature-bound coefficients (× κ)."""
    margins: np.ndarray
    """(m,) m_i, broadcast from the config."""
    cert_margins: np.ndarray
    """(m,) c_i, broadcast from the config."""


def _refusal(theta: torch.Tensor, delta_raw: torch.Tensor) -> str:
    """Why a raw update cannot be stepped along at all ("" if it can)."""
    if delta_raw.shape != theta.shape:
        return f"raw update has {delta_raw.numel()} entries, parameters have {theta.numel()}"
    if not torch.isfinite(delta_raw).all():
        return "raw update contains NaN or Inf"
    if float(delta_raw.norm()) == 0.0:
        return "empty update"
    return ""
