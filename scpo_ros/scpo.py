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
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .qcqp import solve_qcqp
from .rollout import METRICS, DoubleIntegratorRollout, SafetySpec, state_set, structured_states

ConstraintFn = Callable[[torch.Tensor], torch.Tensor]
"""Flat parameter vectors ``(N, d)`` → safety metrics ``(N, m)``, ≤ 0 safe."""

STATUSES = ("accepted", "backtracked", "rejected", "infeasible")


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
    margins: tuple[float, ...] = (0.02, 0.02, 0.02, 2e-3, 0.02)
    """m_i: margin each metric must keep below 0 in the projection (one value or one per metric)."""
    cert_margins: tuple[float, ...] = (0.005, 0.005, 0.005, 1e-3, 0.005)
    """c_i: certification requires g_i ≤ -c_i on the held-out states."""
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

    @property
    def committed(self) -> bool:
        return self.status in ("accepted", "backtracked")

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
        cfg = self.config
        t_start = time.perf_counter()
        self.steps += 1
        theta = torch.as_tensor(theta).detach().reshape(-1)
        delta_raw = torch.as_tensor(delta_raw, dtype=theta.dtype).detach().reshape(-1)
        decision = Decision(status="rejected", step=self.steps,
                            raw_step_norm=float(delta_raw.norm()) if torch.isfinite(delta_raw).all() else float("nan"))
        if delta_raw.shape != theta.shape:
            decision.reason = f"raw update has {delta_raw.numel()} entries, parameters have {theta.numel()}"
            return theta, decision
        if not torch.isfinite(delta_raw).all():
            decision.reason = "raw update contains NaN or Inf"
            return theta, decision
        if float(delta_raw.norm()) == 0.0:
            decision.reason = "empty update"
            return theta, decision

        # 1-2. subspace and one batched evaluation of θ_k and all samples
        t0 = time.perf_counter()
        U = self._subspace(delta_raw)
        z = self._sample_offsets(U.shape[1])
        batch = torch.cat([theta.unsqueeze(0), theta.unsqueeze(0) + (z @ U.T).to(theta.dtype)])
        g_all = self.sample_constraints(batch).double().cpu()
        t1 = time.perf_counter()
        g0, dg = g_all[0], g_all[1:] - g_all[0]
        m = g0.numel()
        decision.margins_before = self._named(g0)
        margins = _broadcast(cfg.margins, m, "margins")
        cert_margins = _broadcast(cfg.cert_margins, m, "cert_margins")
        if not torch.isfinite(g_all).all():
            decision.reason = "constraint evaluation returned NaN/Inf"
            decision.times_ms = {"sample": 1e3 * (t1 - t0), "total": 1e3 * (time.perf_counter() - t_start)}
            return theta, decision

        # 3. fit
        grad, e, L = self._fit(z, dg)
        t2 = time.perf_counter()
        self.prev_gradients = (grad @ U.T).to(theta.dtype)

        # 4. project (all in subspace coordinates; U has orthonormal columns)
        g0n = g0.numpy()
        target = np.maximum(-margins, np.minimum(g0n, 0.0))
        z_raw = (U.T @ delta_raw.double()).numpy()
        sol = solve_qcqp(z_raw, grad.numpy(), g0n - target, e, L, cfg.sample_radius)
        t3 = time.perf_counter()
        times = {"sample": 1e3 * (t1 - t0), "fit": 1e3 * (t2 - t1), "qcqp": 1e3 * (t3 - t2)}
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
            times.update(certify=0.0, total=1e3 * (time.perf_counter() - t_start))
            decision.times_ms = times
            return theta, decision
        step = (U @ z_star).to(theta.dtype)

        # 5. certify on fresh states: the full step first, the halvings only if it fails
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
        t4 = time.perf_counter()
        times["certify"] = 1e3 * (t4 - t3)
        times["total"] = 1e3 * (t4 - t_start)
        decision.times_ms = times
        return new_theta, decision


class DoubleIntegratorSCPO:
    """SCPO for the residual policy on a ``DoubleIntegrator``: the client the ROS node wraps.

    Holds the last certified flat weights in ``theta`` (float32 numpy). Every weight
    vector it ever holds has passed certification on ``n_cert_states`` fresh initial
    conditions (or is the backup itself: a residual with its last layer at zero).
    """

    def __init__(self, system, backup, layout, initial_set, config: SCPOConfig = SCPOConfig(),
                 safety=None, n_sample_states: int = 256, n_cert_states: int = 1024, seed: int = 0,
                 device: str = "cpu", safe_set=None):
        if n_sample_states < 8 or n_cert_states < 8:
            raise ValueError("n_sample_states and n_cert_states must be >= 8")
        self.worst_case_backup = backup.certify(initial_set)   # refuse a backup that is not safe
        self.system, self.backup, self.layout, self.initial_set = system, backup, layout, initial_set
        self.config = config
        self.safety = safety if safety is not None else SafetySpec()
        self.n_sample_states, self.n_cert_states = int(n_sample_states), int(n_cert_states)
        # safe_set: the envelope's (``safeguard.invariant_set.SafeActionSet``); None = the default
        # the rollout builds (robust to one late command)
        self.engine = DoubleIntegratorRollout(system, backup, layout, self.safety, device=device,
                                              safe_rows=None if safe_set is None else safe_set.affine_rows())
        self.rng = np.random.default_rng(seed)
        self.sample_structured = structured_states(initial_set, system.dof, max_points=self.n_sample_states // 2)
        self.cert_structured = structured_states(initial_set, system.dof, max_points=self.n_cert_states // 2,
                                                 seed=seed + 1)
        self.backup_theta = backup_weights(layout, seed)
        self.theta = self.backup_theta.copy()
        self.projector = SCPOProjector(self._sample_g, self._certify_g, config, METRICS, seed=seed)

    def _g_on_fresh_states(self, params, count, structured):
        x0, r = state_set(self.initial_set, self.system.dof, count, self.rng, structured)
        return self.engine.evaluate(params, x0, r).g

    def _sample_g(self, params):
        return self._g_on_fresh_states(params, self.n_sample_states, self.sample_structured)

    def _certify_g(self, params):
        return self._g_on_fresh_states(params, self.n_cert_states, self.cert_structured)

    def propose_step(self, delta_raw) -> Decision:
        """One SCPO step from ``theta`` along the raw update ``delta_raw``."""
        theta = torch.as_tensor(self.theta, dtype=torch.float32)
        new, decision = self.projector.step(theta, torch.as_tensor(np.asarray(delta_raw), dtype=torch.float32))
        if decision.committed:
            self.theta = new.numpy().astype(np.float32)
        return decision

    def propose_weights(self, theta_proposed) -> Decision:
        """One SCPO step from ``theta`` towards externally proposed weights."""
        theta_proposed = np.asarray(theta_proposed, dtype=np.float32).reshape(-1)
        if theta_proposed.shape != self.theta.shape:
            return Decision(status="rejected", step=self.projector.steps,
                            reason=f"expected {self.theta.size} weights, got {theta_proposed.size}")
        return self.propose_step(theta_proposed - self.theta)

    def recertify(self) -> Decision:
        """Re-check ``theta`` (e.g. after limits changed); fall back to the backup's weights if it fails."""
        t0 = time.perf_counter()
        g = self._certify_g(torch.as_tensor(self.theta).unsqueeze(0))[0].double()
        cert_margins = _broadcast(self.config.cert_margins, g.numel(), "cert_margins")
        names = self.projector._named
        ok = bool(_certified(g.unsqueeze(0), cert_margins)[0])
        decision = Decision(status="accepted" if ok else "rejected", step=self.projector.steps,
                            margins_after=names(g), reason="re-certification" if ok else
                            "re-certification failed: reverted to the backup")
        if not ok:
            self.theta = self.backup_theta.copy()
            self.projector.prev_gradients = None
        decision.times_ms = {"certify": 1e3 * (time.perf_counter() - t0)}
        decision.times_ms["total"] = decision.times_ms["certify"]
        return decision


def backup_weights(layout, seed: int = 0) -> np.ndarray:
    """Flat weights of a residual that outputs exactly zero (the policy is the backup)."""
    return layout.initial_parameters(seed).numpy().astype(np.float32)
