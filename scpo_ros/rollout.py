"""Batched closed-loop rollouts of the residual policy on any plant, and the SCPO safety metrics.

One call simulates ``N`` weight vectors × ``M`` initial states × ``H`` steps as a handful of
batched matmuls per time step (the only Python loop is over time). The closed loop is
``u = backup(x, r) + φ_θ([x, r])``; nothing is clipped: the metrics must see what the policy
would command.

Safety metrics ``g`` (≤ 0 is safe), each a maximum over initial states and time, every one a
*fraction* so that one margin fits every plant (``residual_scpo`` sets them):

- ``state``:    max_i (F_i x - f_i) / range_i over the state rows ``plant.state_rows()`` (finite
  box bounds, then ``H``), on x_0 .. x_H; ``range_i = f_i - min_{x in region} F_i x``: the room
  the certified region leaves below that limit.
- ``input``:    the same for the input rows ``plant.input_rows()`` on u_0 .. u_{H-1}, with
  ``range_i = f_i - min_{u in U} F_i u`` (the extent of the input set along the row).
- ``lyapunov``: max_t (V(e⁺) - max((1-α) V(e), ε)) / (δ ε) on the error ``e = x - x_ss(r)``, with the
  backup's ``V(e) = eᵀ P e``: V must shrink by α per step unless the next state lies in the
  ε-sublevel set. This keeps every trajectory in {V ≤ max(V(e_0), ε)} and drives it into
  {V ≤ ε} (practical stability). We chose it over the additive form V(e⁺) ≤ (1-α)V(e) + αε,
  whose slack of only αε at equilibrium made the metric quadratic-degenerate there.
  Scale-free: ε = ``lyap_eps`` × max of V(e_0) over the region box, and α = ``lyap_alpha`` × δ,
  δ the backup's own worst-case decrease ``1 - max_e V(Φe)/V(e)`` per step, so a slow plant is
  not asked for a decrease its backup cannot give, nor a fast one let off. The unit δ ε puts
  the backup's own value near -(1 - ``lyap_alpha``) on every plant, whatever its dt and speed
  (in units of ε alone it is about -0.7 δ: -0.024 for the double integrator, -0.0017 for the
  DC motor at dt = 0.01, where a margin fixed in ε would leave no room to learn).
- ``safe_set``: max_i (E_i x + G_i u + F_i ρ - f_i) / range_i over the rows of the envelope's
  safe set (``safeguard.invariant_set.safe_set_for(plant, backup, late_commands=1)``;
  ``ρ = (r, r, ...)``: the rollout's own reference in every block, which implies membership),
  ``range_i`` the row's room over the region box, the input box and the reference box.
  Certifying this metric is what lets the envelope pass the certified policy's commands
  unchanged.

Linear plants take a fused path: in the error form ``e⁺ = Φ e + B φ`` (``Φ = A - B K``; the
equilibrium absorbs ``c`` and the references), every row above is affine in ``(e, φ)`` with a
per-state constant, so one matmul pair per step yields the next error, ``P e⁺``, the input
deviation and every row; the constants are added once, after the running maxima. Model
plants step ``plant.step`` (torch) and evaluate the rows directly (``_evaluate_model``, also
the reference the fused path is tested against).

**Robust rollouts** (a plant file that declares ``uncertainty:``, linear plants; ``robust=True``,
the default). The parameter box is simulated, not bounded: each initial state runs on one corner
``(A + dA, B + dB)`` of the declared box (``uncertainty.matrix_corners``: every corner up to 16,
assigned in turn), the deviation ``dA x + dB u`` added to the next state from the actual ``x``
and ``u``. The additive part ``|w| <= w`` (``uncertainty.disturbance_bound``: ``w_max`` and the
measurement noise) is split off: ``e = ē + d`` with ``ē⁺ = Φ ē + B φ(x) + dA (x_ss + ē) + dB
(u_ss - K ē + φ)`` (the corner plant, its residual acting at the *disturbed* state ``x = x_ss +
ē + d``) and ``d⁺ = Φ d + w + (dA - dB K) d`` (the disturbance's response; their sum is the
true plant). The second is bounded, not simulated: with ``S = Σ_{j<H} |Φ^j|`` and ``δ`` the
largest ``|dA - dB K|`` of the corners, ``|d_t| <= d_sup = (I - S δ)⁻¹ S w`` on the horizon (by
induction, when the spectral radius of ``S δ`` is below 1; otherwise the parameter box
destabilises the backup's disturbance response and the rollouts refuse to be built), so it is
the response of ``Φ`` to a disturbance ``|w̃| <= w + δ d_sup``. Every row is affine in ``(e, φ)``,
so its worst case over all those sequences is exact in ``d``: the row on ``ē`` plus
``Σ_{j<t} |a Φ^j| w̃`` (``tube_tightening``; ``a`` the row's coefficients of ``d``: input rows
through ``-K``, safe-set rows through ``E - G K``). The residual's reaction to the disturbance is sampled: each initial
state carries one disturbance sequence (``disturbance_sequences``: corners switching at random, a
constant corner, and sequences that maximise one row's linear response at a random time), shared
by all weight vectors of the call. The Lyapunov metric is taken on ``ē`` (the policy must not
destabilise the nominal part; ``d`` is bounded by Φ alone). ``PlantRollout.covers`` says what a
certificate covers. Model plants are rolled out nominally (``covers`` says so).

V is computed afresh at every step from e⁺, never accumulated: in float32 its error is
~1e-7·V, far below the certification margin near the shell V ≈ ε where the maximum sits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from .policy import MLPLayout

METRICS = ("state", "input", "lyapunov", "safe_set")

_NONFINITE = 1e6
"""What a non-finite metric (a diverging rollout) reads as: clearly unsafe, and finite so the
projector's fit of the metrics stays defined."""
_EMPTY_GROUP = -1.0
"""A metric without rows (no safe-set rows given): a full range inside."""
SEQUENCE_KINDS = ("switching", "constant", "row_worst")
"""The disturbance sequences of robust rollouts, assigned to the initial states in turn."""


@dataclass(frozen=True)
class SafetySpec:
    horizon_s: float = 5.0
    """Certification horizon in seconds (``steps(dt)`` steps of the plant)."""
    lyap_alpha: float = 0.3
    """Required decrease of V per step, as a fraction of the backup's own worst-case decrease
    ``1 - max V(Φe)/V(e)`` (the double integrator's backup: 0.034, so α = 0.0103 per step)."""
    lyap_eps: float = 0.004
    """ε, the V-level of the terminal set where decrease is no longer required, as a fraction
    of the largest V(e_0) over the certified region (the double integrator: ε ≈ 0.53)."""
    cost_action_weight: float = 0.1
    """Task cost: mean over states of Σ_t (|x_tracked - r|² + w |u - u_ss|²) dt (without tracked
    states: |e|² in place of the tracking error)."""

    def __post_init__(self):
        if not (math.isfinite(self.horizon_s) and self.horizon_s > 0.0):
            raise ValueError("horizon_s must be a finite number of seconds > 0")
        if not 0.0 <= self.lyap_alpha < 1.0:
            raise ValueError("lyap_alpha must lie in [0, 1)")
        if not (math.isfinite(self.lyap_eps) and self.lyap_eps > 0.0):
            # the metric is divided by ε: a zero level would make it unbounded
            raise ValueError("lyap_eps must be a finite fraction > 0")

    def steps(self, dt: float) -> int:
        """Rollout length in steps of ``dt``: ``ceil(horizon_s / dt)`` (at least 1)."""
        # the 1e-9 keeps 5.0 / 0.05 = 100.00000000000001 at 100 steps
        return max(1, math.ceil(self.horizon_s / dt - 1e-9))


@dataclass
class RolloutResult:
    g: torch.Tensor
    """(N, len(METRICS)) safety metrics per weight vector (max over states and time)."""
    cost: torch.Tensor | None
    """(N,) task cost per weight vector (with ``with_cost=True``)."""
    g_per_state: torch.Tensor | None = None
    """(N, M, len(METRICS)) per initial state, when asked for."""


# ====================================================================== the metric rows

@dataclass(frozen=True)
class MetricRows:
    """The constraint rows of the metrics, normalised, in float64 numpy.

    ``state``: ``(Fs, fs)`` on x; ``input``: ``(Fu, fu)`` on u; ``safe``: ``(E, G, F, f)`` on
    ``(x, u, ρ)``. Every row is already divided by its range, so ``row · z - rhs`` is the
    metric's fraction. ``blocks``: how many times ρ repeats r.
    """

    Fs: np.ndarray
    fs: np.ndarray
    Fu: np.ndarray
    fu: np.ndarray
    E: np.ndarray
    G: np.ndarray
    F: np.ndarray
    f: np.ndarray
    blocks: int


def metric_rows(plant, safe_rows) -> MetricRows:
    """The normalised rows of ``plant`` and of the safe set's ``(E, G, F, f)`` (or ``(E, G, f)``)."""
    region = plant.region
    xlo, xhi = np.asarray(region.x_min, float), np.asarray(region.x_max, float)
    ulo, uhi = np.asarray(plant.u_min, float), np.asarray(plant.u_max, float)
    Fs, fs, _ = plant.state_rows()
    Fu, fu, _ = plant.input_rows()
    s_range = fs - _box_min(Fs, xlo, xhi)
    u_range = fu - _input_set_min(Fu, plant)
    E, G, F, f = _safe_rows(safe_rows, plant)
    blocks = F.shape[1] // plant.nr if plant.nr else 0
    rlo, rhi = np.tile(region.r_min, blocks), np.tile(region.r_max, blocks)
    f_range = f - _box_min(E, xlo, xhi) - _box_min(G, ulo, uhi) - _box_min(F, rlo, rhi)
    ss, su, sf = (_floor(rng, rhs) for rng, rhs in ((s_range, fs), (u_range, fu), (f_range, f)))
    return MetricRows(Fs / ss[:, None], fs / ss, Fu / su[:, None], fu / su,
                      E / sf[:, None], G / sf[:, None], F / sf[:, None], f / sf, blocks)


def nonlinear_safe_scale(safe_set, plant, count: int = 2048, seed: int = 0) -> np.ndarray:
    """Ranges of the rows ``G u <= rhs(x)`` of a safe set with a nonlinear drift (a model
    plant's): ``max_x rhs_i(x) - min_{u in box} G_i u``, the maximum *sampled* over the region's
    corners and ``count`` uniform states (no closed form for a nonlinear ``rhs``)."""
    region = plant.region
    xlo, xhi = np.asarray(region.x_min, float), np.asarray(region.x_max, float)
    rng = np.random.default_rng(seed)
    xs = np.concatenate([box_corners(xlo, xhi, 1024, seed), rng.uniform(xlo, xhi, size=(count, len(xlo)))])
    top = np.asarray(safe_set.rhs(xs), dtype=float).max(0)
    G = np.asarray(safe_set.G, dtype=float)
    return _floor(top - _box_min(G, np.asarray(plant.u_min, float), np.asarray(plant.u_max, float)), top)


def _safe_rows(safe_rows, plant):
    n, m, nr = plant.n, plant.m, plant.nr
    if safe_rows is None or len(safe_rows) == 0:
        return np.zeros((0, n)), np.zeros((0, m)), np.zeros((0, 0)), np.zeros(0)
    if len(safe_rows) == 3:      # (E, G, f): a set without reference variables
        E, G, f = safe_rows
        F = np.zeros((len(f), 0))
    else:
        E, G, F, f = safe_rows
    E, G, F, f = (np.asarray(a, dtype=np.float64) for a in (E, G, F, f))
    R = len(f)
    F = F.reshape(R, -1)
    if E.shape != (R, n) or G.shape != (R, m):
        raise ValueError(f"safe-set rows: E {E.shape} and G {G.shape} do not fit n={n}, m={m} with {R} rows")
    if F.shape[1] and (nr == 0 or F.shape[1] % nr):
        raise ValueError(f"safe-set rows: F has {F.shape[1]} columns, not a whole number of reference "
                         f"blocks of nr={nr}")
    return E, G, F, f


def _box_min(F: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``min_{lo <= z <= hi} F_i z`` per row (the support function of a box)."""
    if F.shape[1] == 0:
        return np.zeros(len(F))
    c, w = (lo + hi) / 2.0, (hi - lo) / 2.0
    return F @ c - np.abs(F) @ w


def _input_set_min(Fu: np.ndarray, plant) -> np.ndarray:
    """``min_{u in U} F_i u`` per input row: the box's closed form, an LP where ``G`` cuts it."""
    lo, hi = np.asarray(plant.u_min, float), np.asarray(plant.u_max, float)
    out = _box_min(Fu, lo, hi)
    Gp, gp = np.asarray(plant.G, float), np.asarray(plant.g, float)
    if len(gp):
        from scipy.optimize import linprog
        bounds = list(zip(lo, hi))
        for i, row in enumerate(Fu):
            res = linprog(row, A_ub=Gp, b_ub=gp, bounds=bounds, method="highs")
            if res.status == 0:
                out[i] = res.fun
    return out


def _floor(rng: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Ranges kept positive: a region touching a limit leaves that row no room (range 0);
    a tiny floor keeps the fraction finite there (and its sign, which is what safety reads)."""
    return np.maximum(rng, 1e-6 * (1.0 + np.abs(rhs)))


def backup_decrease(backup) -> float:
    """``1 - max_e V(Φe)/V(e)``: the backup's guaranteed relative decrease of ``V = eᵀPe`` per
    step (the generalised eigenvalue of ``(ΦᵀPΦ, P)``)."""
    P = np.asarray(backup.P, dtype=np.float64)
    Phi = np.asarray(backup.A_cl, dtype=np.float64)
    top = scipy.linalg.eigh(Phi.T @ P @ Phi, P, eigvals_only=True).max()
    return float(1.0 - top)


def max_region_lyapunov(plant, P: np.ndarray, limit: int = 4096, seed: int = 0) -> float:
    """Largest ``V(x - x_ss(r))`` over the region's [x, r] box: a convex function of (x, r), so
    its maximum sits at a corner (every corner up to ``limit``, a random sample of them beyond)."""
    z = box_corners(plant.region.lower, plant.region.upper, limit, seed)
    x, r = z[:, :plant.n], z[:, plant.n:]
    xs, _ = plant.equilibrium(r if plant.nr else None)
    e = x - xs
    return float(np.einsum("bi,ij,bj->b", e, P, e).max())


def box_corners(lo: np.ndarray, hi: np.ndarray, limit: int = 4096, seed: int = 0) -> np.ndarray:
    """The corners of the box ``[lo, hi]`` (``(2^d, d)``), or ``limit`` random distinct ones."""
    d = len(lo)
    if 2 ** d <= limit:
        pick = ((np.arange(2 ** d)[:, None] >> np.arange(d)) & 1).astype(bool)
    else:
        pick = np.unique(np.random.default_rng(seed).integers(0, 2, size=(limit, d)).astype(bool), axis=0)
    return np.where(pick, hi, lo)


# ====================================================================== the engine

class PlantRollout:
    """Closed loop ``u = backup(x, r) + φ_θ([x, r])`` of any ``Plant`` under its backup.

    ``backup``: the plant's ``LQRBackup`` (``K``, ``P``, ``A_cl``, callable on torch batches).
    ``safe_rows``: ``(E, G, F, f)`` of the envelope's safe set (``SafeActionSet.affine_rows()``),
    ``(E, G, f)`` for a set without reference variables, ``()`` for none (the ``safe_set``
    metric then reads -1); ``None``: ``safe_set_for(plant, backup, late_commands=1)``, the set
    the safety node's envelope uses.
    """

    def __init__(self, plant, backup, layout: MLPLayout, spec: SafetySpec = SafetySpec(),
                 safe_rows: tuple | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, robust: bool = True, seed: int = 0):
        n, m, nr = plant.n, plant.m, plant.nr
        if layout.in_dim != n + nr or layout.out_dim != m:
            raise ValueError(f"layout {layout.sizes} does not fit the plant {plant.name} "
                             f"(need in_dim = n + nr = {n + nr}, out_dim = m = {m})")
        self.plant, self.backup, self.layout, self.spec = plant, backup, layout, spec
        self.device, self.dtype = torch.device(device), dtype
        self.steps = spec.steps(plant.dt)
        self.rows, self._nonlinear_set = _resolve_safe_rows(plant, backup, safe_rows)
        P = np.asarray(backup.P, dtype=np.float64)
        decrease = backup_decrease(backup)
        self.alpha = spec.lyap_alpha * max(0.0, decrease)
        self.eps = spec.lyap_eps * max_region_lyapunov(plant, P)
        if not self.eps > 0.0:
            raise ValueError("the certified region is a single equilibrium point: no Lyapunov scale")
        # the metric's unit (module docstring); a backup without a guaranteed decrease (never
        # one that certified) keeps the unit ε
        self.lyap_unit = self.eps * (decrease if decrease > 1e-9 else 1.0)
        self.w, self.corners = None, []
        if robust and plant.uncertainty.declared and plant.linear:
            from .uncertainty import disturbance_bound, matrix_corners
            self.corners = matrix_corners(plant, np.random.default_rng([int(seed), 8]))
            w = disturbance_bound(plant)
            self.w = self._tube_disturbance(w) if w.any() else None
        self._seq_rng = np.random.default_rng([int(seed), 7])
        self._build_tensors(P)

    def _tube_disturbance(self, w: np.ndarray) -> np.ndarray:
        """``w̃ = w + δ d_sup`` (module docstring): the disturbance of the tube once the parameter
        corners' coupling ``(dA - dB K) d`` is folded in; ``w`` itself without corners."""
        if not self.corners:
            return w
        K = np.asarray(self.backup.K, dtype=np.float64)
        Phi = np.asarray(self.backup.A_cl, dtype=np.float64)
        delta = np.max([np.abs(dA - dB @ K) for dA, dB in self.corners], axis=0)
        S, power = np.zeros_like(Phi), np.eye(len(Phi))
        for _ in range(self.steps):
            S += np.abs(power)
            power = power @ Phi
        SD = S @ delta
        if not float(np.max(np.abs(np.linalg.eigvals(SD)))) < 1.0:
            raise ValueError(f"{self.plant.name}: the declared (A, B) box destabilises the backup's response to the "
                             f"declared disturbance (spectral radius of S δ >= 1): no robust certificate; declare less "
                             f"uncertainty or make the backup faster")
        d_sup = np.linalg.solve(np.eye(len(Phi)) - SD, S @ w)
        return w + delta @ d_sup

    def _t(self, a) -> torch.Tensor:
        return torch.as_tensor(np.array(a, dtype=np.float64), dtype=self.dtype, device=self.device)

    def _build_tensors(self, P: np.ndarray) -> None:
        plant, rows, K = self.plant, self.rows, np.asarray(self.backup.K, dtype=np.float64)
        n, m = plant.n, plant.m
        Mx, mx, Mu, mu = (np.asarray(a, dtype=np.float64) for a in plant.equilibrium_map())
        self._Mx, self._mx, self._Mu, self._mu, self._P = (self._t(a) for a in (Mx, mx, Mu, mu, P))
        self._K = self._t(K)
        self._Fs, self._fs, self._Fu, self._fu = (self._t(a) for a in (rows.Fs, rows.fs, rows.Fu, rows.fu))
        self._E, self._G, self._F, self._f = (self._t(a) for a in (rows.E, rows.G, rows.F, rows.f))
        if self._nonlinear_set is not None:
            self._safe_scale = self._t(1.0 / nonlinear_safe_scale(self._nonlinear_set, plant))
        self._track = torch.as_tensor(plant.tracked_index if plant.nr else np.arange(n), device=self.device)
        self.group_sizes = (len(rows.fs), len(rows.fu), len(rows.f))
        # per-state constants of every row, affine in r: const(r) = r Cᵀ + c0
        Fsum = sum((rows.F[:, b * plant.nr:(b + 1) * plant.nr] for b in range(rows.blocks)),
                   np.zeros((len(rows.f), plant.nr)))
        C = np.vstack([rows.Fs @ Mx, rows.Fu @ Mu, rows.E @ Mx + rows.G @ Mu + Fsum])
        c0 = np.concatenate([rows.Fs @ mx - rows.fs, rows.Fu @ mu - rows.fu, rows.E @ mx + rows.G @ mu - rows.f])
        self._C, self._c0 = self._t(C), self._t(c0)
        if not plant.linear:
            return
        # The fused path: out = e G_e + φ G_φ = [e+ | P e+ | u - u_ss | state rows of x+ |
        # input rows of u | safe rows of (x, u)], each row without its per-state constant.
        A, B = np.asarray(plant.A, dtype=np.float64), np.asarray(plant.B, dtype=np.float64)
        Phi = A - B @ K
        self._G_e = self._t(np.hstack([Phi.T, Phi.T @ P, -K.T, (rows.Fs @ Phi).T, (-rows.Fu @ K).T,
                                       (rows.E - rows.G @ K).T]))
        self._G_phi = self._t(np.hstack([B.T, B.T @ P, np.eye(m), (rows.Fs @ B).T, rows.Fu.T, rows.G.T]))
        if self.w is not None:
            self._tube = self._t(tube_tightening(Phi, K, rows, self.w, self.steps))
            self._row_dirs = np.vstack([rows.Fs, -rows.Fu @ K, rows.E - rows.G @ K])   # rows' d-coefficients
        if self.corners:
            # dA x + dB u for a state on corner v, as one matmul: [x ⊗ onehot_v, u ⊗ onehot_v] @ D
            self._D_corner = self._t(np.vstack([dA.T for dA, _ in self.corners] + [dB.T for _, dB in self.corners]))
            self._state_rows_T = self._t(rows.Fs.T)

    @property
    def robust(self) -> bool:
        return self.w is not None or bool(self.corners)

    @property
    def covers(self) -> str:
        """What a certificate from these rollouts is about (for logs and decision records)."""
        if self.robust:
            parts = []
            if self.corners:
                parts.append(f"the {len(self.corners)} corners of the declared (A, B) box (one per initial state, "
                             f"in turn)")
            if self.w is not None:
                parts.append(f"every disturbance |w| <= {np.round(self.w, 6).tolist()} per step (exact for the "
                             f"backup's linear response, sampled for the residual's reaction)")
            return f"the declared uncertainty of {self.plant.name}: " + "; ".join(parts)
        if self.plant.uncertainty.declared:
            return f"the nominal model of {self.plant.name} (its declared uncertainty is not rolled out: a model plant)"
        return f"the nominal model of {self.plant.name} (no uncertainty declared)"

    def equilibrium(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_ss(r), u_ss(r))`` of a batch of references (torch)."""
        return r @ self._Mx.T + self._mx, r @ self._Mu.T + self._mu

    @torch.no_grad()
    def evaluate(self, params, x0, r, per_state: bool = False, with_cost: bool = False) -> RolloutResult:
        """Roll out ``params (N, d)`` from every ``x0 (M, n)`` with references ``r (M, nr)``."""
        params = torch.as_tensor(params, dtype=self.dtype, device=self.device)
        if params.ndim == 1:
            params = params.unsqueeze(0)
        x0 = torch.as_tensor(np.asarray(x0) if not torch.is_tensor(x0) else x0, dtype=self.dtype,
                             device=self.device).reshape(-1, self.plant.n)
        r = torch.as_tensor(np.asarray(r) if not torch.is_tensor(r) else r, dtype=self.dtype,
                            device=self.device).reshape(len(x0), self.plant.nr)
        N, M = params.shape[0], x0.shape[0]
        if self.plant.linear:
            row_max, lyap, cost = self._evaluate_linear(params, x0, r, with_cost, self._disturbance_response(M),
                                                        self._corner_of(M))
        else:
            row_max, lyap, cost = self._evaluate_model(params, x0, r, with_cost)
        const = (r @ self._C.T + self._c0).repeat(N, 1)   # per state: added once, after the max
        state, inputs, safe = self._group_max(row_max + const).unbind(-1)
        per = torch.stack([state, inputs, lyap / self.lyap_unit, safe], -1).view(N, M, len(METRICS))
        per = torch.nan_to_num(per, nan=_NONFINITE, posinf=_NONFINITE, neginf=-_NONFINITE)
        g = per.amax(1)
        if with_cost:
            cost = cost.view(N, M).mean(1) * self.plant.dt
        return RolloutResult(g=g, cost=cost, g_per_state=per if per_state else None)

    def _group_max(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B, 3)``: the state, input and safe-set maxima of the row columns."""
        out, i = [], 0
        for size in self.group_sizes:
            if size:
                out.append(rows[:, i:i + size].amax(-1))
            else:
                out.append(torch.full((rows.shape[0],), _EMPTY_GROUP, dtype=rows.dtype, device=rows.device))
            i += size
        return torch.stack(out, -1)

    def _layers(self, params: torch.Tensor):
        """Per-layer ``(Wᵀ (N, in, out), b (N, 1, out))``, laid out for ``baddbmm``."""
        return [(W.transpose(-1, -2).contiguous(), b.unsqueeze(-2).contiguous())
                for W, b in self.layout.unflatten(params)]

    def _initial_rows(self, e0: torch.Tensor) -> torch.Tensor:
        """Running maxima of the rows at the start: the state rows of x_0 (the constant comes
        later), the input and safe-set rows not yet seen."""
        rest = sum(self.group_sizes[1:])
        return torch.cat([e0 @ self._Fs.T, torch.full((len(e0), rest), -torch.inf, dtype=self.dtype,
                                                      device=self.device)], -1)

    def _disturbance_response(self, M: int) -> torch.Tensor | None:
        """``d_t (H, M, n)`` of one fresh disturbance sequence per initial state (robust rollouts;
        None otherwise): ``d_0 = 0``, ``d_{t+1} = Φ d_t + w_t``."""
        if self.w is None:
            return None
        Phi = np.asarray(self.backup.A_cl, dtype=np.float64)
        w = disturbance_sequences(M, self.steps, self.w, Phi, self._row_dirs, self._seq_rng)   # (H, M, n)
        d = np.zeros((self.steps, M, self.plant.n))
        for t in range(self.steps - 1):
            d[t + 1] = d[t] @ Phi.T + w[t]
        return torch.as_tensor(d, dtype=self.dtype, device=self.device)

    def _corner_of(self, M: int) -> torch.Tensor | None:
        """``(M, V)`` one-hot: the parameter corner each initial state runs on (in turn)."""
        if not self.corners:
            return None
        V = len(self.corners)
        return torch.nn.functional.one_hot(torch.arange(M, device=self.device) % V, V).to(self.dtype)

    def _evaluate_linear(self, params, x0, r, with_cost, d=None, corner=None):
        """The fused error-form loop: a fixed, short list of batched kernels per step writing into
        buffers allocated once per call (the MLP, then one matmul pair ``e G_e + φ G_φ``). With
        ``d`` (robust rollouts, ``_disturbance_response``) ``e`` is the nominal part ``ē``: the MLP
        sees ``ē + d_t`` and every row gets its tube tightening at ``t``. With ``corner`` (the
        parameter corner of each state) ``dA x + dB u`` joins the next ``ē``."""
        n, m = self.plant.n, self.plant.m
        N, M = params.shape[0], x0.shape[0]
        Bsz = N * M
        layers = self._layers(params)
        (W0T, b0), hidden, (WLT, bL) = layers[0], layers[1:-1], layers[-1]
        xs, _ = self.equilibrium(r)
        # x = e + x_ss(r) and r are constant offsets of the input [x, r]: they fold into layer 0's bias
        W0eT = W0T[:, :n]
        bias0 = torch.matmul(torch.cat([xs, r], -1).unsqueeze(0), W0T) + b0        # (N, M, h0)
        G_e, G_phi = self._G_e, self._G_phi
        width = G_e.shape[1]
        out = torch.empty(Bsz, width, dtype=self.dtype, device=self.device)
        tmp = torch.empty_like(out)
        hbufs = [torch.empty(N, M, W.shape[-1], dtype=self.dtype, device=self.device)
                 for W, _ in [(W0T, None)] + hidden]
        phi = torch.empty(N, M, m, dtype=self.dtype, device=self.device)
        phi2 = phi.view(Bsz, m)
        e_bufs = [(x0 - xs).repeat(N, 1), torch.empty(Bsz, n, dtype=self.dtype, device=self.device)]
        e = e_bufs[0]
        e_in = torch.empty(N, M, n, dtype=self.dtype, device=self.device) if d is not None else None
        if corner is not None:
            onehot = corner.repeat(N, 1).unsqueeze(-1)                               # (Bsz, V, 1)
            xs_b, us_b = xs.repeat(N, 1), self.equilibrium(r)[1].repeat(N, 1)
        row_max = self._initial_rows(e)
        lyap = torch.full((Bsz,), -torch.inf, dtype=self.dtype, device=self.device)
        V = ((e @ self._P) * e).sum(-1)
        cost = torch.zeros(Bsz, dtype=self.dtype, device=self.device) if with_cost else None
        eps, alpha, w_u = self.eps, self.alpha, self.spec.cost_action_weight
        for t in range(self.steps):
            e_mlp = e.view(N, M, n) if d is None else torch.add(e.view(N, M, n), d[t], out=e_in)
            h = torch.baddbmm(bias0, e_mlp, W0eT, out=hbufs[0]).tanh_()
            for (WT, b), hb in zip(hidden, hbufs[1:]):
                h = torch.baddbmm(b, h, WT, out=hb).tanh_()
            torch.matmul(h, WLT, out=phi).add_(bL)
            torch.mm(phi2, G_phi, out=tmp)
            torch.addmm(tmp, e, G_e, out=out)
            if corner is not None:
                # the corner's deviation on the nominal part (x_ss + ē, u_ss - K ē + φ); its
                # coupling to d is in the tube's disturbance (module docstring)
                x_nom = xs_b + e
                u_nom = us_b + out[:, 2 * n:2 * n + m]
                z = torch.cat([(x_nom.unsqueeze(1) * onehot).reshape(Bsz, -1),
                               (u_nom.unsqueeze(1) * onehot).reshape(Bsz, -1)], -1)
                pert = z @ self._D_corner
                out[:, :n] += pert
                out[:, n:2 * n] += pert @ self._P
                out[:, 2 * n + m:2 * n + m + self.group_sizes[0]] += pert @ self._state_rows_T
            rows_t = out[:, 2 * n + m:]
            if d is not None:
                rows_t.add_(self._tube[t])
            torch.maximum(row_max, rows_t, out=row_max)
            e_next = out[:, :n]
            V_next = (out[:, n:2 * n] * e_next).sum(-1)
            # min(V+ - (1-α)V, V+ - ε) = V+ - max((1-α)V, ε)
            torch.maximum(lyap, V_next - V.mul_(1.0 - alpha).clamp_min_(eps), out=lyap)
            V = V_next
            if with_cost:
                du = out[:, 2 * n:2 * n + m]
                cost += e[:, self._track].square().sum(-1) + w_u * du.square().sum(-1)
            e = e_bufs[(t + 1) % 2].copy_(e_next)
        return row_max, lyap, cost

    def _safe_rows_direct(self, x, u, rho):
        if self._nonlinear_set is None:
            return x @ self._E.T + u @ self._G.T + rho @ self._F.T - self._f
        # U_safe(x) = {u : G u <= rhs(x)}: the row's value is G u - rhs(x), over its range
        rhs = torch.as_tensor(self._nonlinear_set.rhs(x), dtype=self.dtype, device=self.device)
        return (u @ self._G.T) - rhs * self._safe_scale

    def _evaluate_model(self, params, x0, r, with_cost):
        """The direct loop: ``plant.step`` on ``x``, every row evaluated from ``(x, u, ρ)``
        (the model plants' path; for a linear plant the reference of the fused one)."""
        N, M = params.shape[0], x0.shape[0]
        rr = r.repeat(N, 1)
        xs, us = self.equilibrium(rr)
        rho = rr.repeat(1, self.rows.blocks)
        x = x0.repeat(N, 1)
        e = x - xs
        row_max = self._initial_rows(e)
        # the direct rows carry their constants: take them out so `evaluate` adds them once
        const = rr @ self._C.T + self._c0
        lyap = torch.full((len(x),), -torch.inf, dtype=self.dtype, device=self.device)
        V = ((e @ self._P) * e).sum(-1)
        cost = torch.zeros(len(x), dtype=self.dtype, device=self.device) if with_cost else None
        for _ in range(self.steps):
            inputs = torch.cat([x, rr], -1).view(N, M, -1)
            # the backup u_ss(r) - K e, from its tensors (one matmul; LQRBackup.__call__ is the same map)
            u = us - e @ self._K.T + self.layout.batched_forward(params, inputs).reshape(len(x), -1)
            x_next = self.plant.step(x, u)
            rows = torch.cat([x_next @ self._Fs.T - self._fs, u @ self._Fu.T - self._fu,
                              self._safe_rows_direct(x, u, rho)], -1)
            torch.maximum(row_max, rows - const, out=row_max)
            e_next = x_next - xs
            V_next = ((e_next @ self._P) * e_next).sum(-1)
            lyap = torch.maximum(lyap, V_next - torch.clamp_min((1.0 - self.alpha) * V, self.eps))
            if with_cost:
                du = u - us
                cost += e[:, self._track].square().sum(-1) + self.spec.cost_action_weight * du.square().sum(-1)
            x, e, V = x_next, e_next, V_next
        return row_max, lyap, cost


def tube_tightening(Phi: np.ndarray, K: np.ndarray, rows: MetricRows, w: np.ndarray, steps: int) -> np.ndarray:
    """``(steps, rows)``: how much each metric row at step ``t`` of the fused loop can grow by the
    disturbance's linear response ``d_t = Σ_{j<t} Φ^{t-1-j} w_j``, over every sequence with
    ``|w_j| <= w``: ``Σ_{j<k} |a Φ^j| w`` for the row's ``d``-coefficients ``a`` (state rows of
    ``x_{t+1}``: ``k = t + 1``; input rows ``F_u (-K)`` and safe-set rows ``E - G K`` of ``(x_t,
    u_t)``: ``k = t``). Exact: the sequence ``w_j = w ⊙ sign(a Φ^{k-1-j})`` attains it."""
    S, In, F = rows.Fs, -rows.Fu @ K, rows.E - rows.G @ K
    out = np.zeros((steps, len(S) + len(In) + len(F)))
    acc = [np.zeros(len(S)), np.zeros(len(In)), np.zeros(len(F))]
    power = np.eye(len(Phi))
    s_next = np.abs(S @ power) @ w                       # the state rows see one more disturbance
    for t in range(steps):
        out[t] = np.concatenate([acc[0] + s_next, acc[1], acc[2]])
        acc[0] = acc[0] + s_next
        acc[1] = acc[1] + np.abs(In @ power) @ w
        acc[2] = acc[2] + np.abs(F @ power) @ w
        power = power @ Phi
        s_next = np.abs(S @ power) @ w
    return out


def disturbance_sequences(M: int, steps: int, w: np.ndarray, Phi: np.ndarray, row_dirs: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
    """``(steps, M, n)``: one disturbance sequence per initial state, in ``|w_t| <= w``, of the
    kinds ``SEQUENCE_KINDS`` in turn: corners switching at random every step; one constant
    corner; the sequence that maximises one random row ``a`` (of ``row_dirs``) of the linear
    response at a random time ``T``: ``w_j = w ⊙ sign(a Φ^{T-1-j})`` for ``j < T``, a random
    corner after."""
    n = len(w)
    seqs = rng.choice([-1.0, 1.0], size=(steps, M, n))              # switching
    kind = np.arange(M) % len(SEQUENCE_KINDS)
    const = kind == 1
    seqs[:, const] = seqs[0, const][None]
    worst = np.flatnonzero(kind == 2)
    if worst.size and len(row_dirs):
        powers = [np.eye(n)]
        for _ in range(steps - 1):
            powers.append(powers[-1] @ Phi)
        powers = np.stack(powers)                                    # (steps, n, n): Φ^k
        picks = rng.integers(0, len(row_dirs), size=worst.size)
        T = rng.integers(1, steps + 1, size=worst.size)
        for i, a_idx, t_end in zip(worst, picks, T):
            a = row_dirs[a_idx]
            k = t_end - 1 - np.arange(t_end)                         # Φ^{T-1-j} for j < T
            signs = np.sign(np.einsum("i,kij->kj", a, powers[k]))
            seqs[:t_end, i] = np.where(signs == 0, 1.0, signs)
    return seqs * w


def _resolve_safe_rows(plant, backup, safe_rows):
    """``(MetricRows, nonlinear set or None)`` of the ``safe_rows`` argument of ``PlantRollout``:
    a tuple of rows, ``()``, a safe set (its ``affine_rows()``; a model plant's set with a
    nonlinear drift is kept whole: its rows ``G u <= rhs(x)`` are evaluated per step), or None
    (the default set: ``late_commands=1``; a model plant whose set cannot absorb a late
    command, like the pendulum's, gets its nominal set)."""
    if safe_rows is None:
        from .safeguard.invariant_set import safe_set_at_most  # lazy: only for the default
        safe_rows = safe_set_at_most(plant, backup, late_commands=1)[0]
    if isinstance(safe_rows, (tuple, list)):
        return metric_rows(plant, safe_rows), None
    try:
        return metric_rows(plant, safe_rows.affine_rows()), None
    except ValueError:
        if plant.linear:
            raise
    rows = metric_rows(plant, ())
    G = np.asarray(safe_rows.G, dtype=np.float64)
    scale = nonlinear_safe_scale(safe_rows, plant)
    zeros = np.zeros(len(G))
    return MetricRows(rows.Fs, rows.fs, rows.Fu, rows.fu, np.zeros((len(G), plant.n)), G / scale[:, None],
                      np.zeros((len(G), 0)), zeros, 0), safe_rows


# ====================================================================== initial conditions

def _box(region) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(region.lower, dtype=float), np.asarray(region.upper, dtype=float)


def _split(plant_or_region, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(_region_of(plant_or_region).x_min)
    return pts[:, :n].copy(), pts[:, n:].copy()


def _region_of(plant_or_region):
    return getattr(plant_or_region, "region", plant_or_region)


def structured_states(region, max_points: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic initial conditions where the metrics are tightest: ``(x (P, n), r (P, nr))``.

    ``region``: a ``plant.Region`` or a ``Plant`` (its region; then the points near equilibrium
    sit around ``x_ss(r)``, else around the centre of the state box). The [x, r] box's corners
    (the worst case of any linear closed loop sits there; every one when they fit in
    ``max_points``, else a random half of it), centres of its edges and faces (points of {-1, 0, 1}^d with
    a zero, drawn at random: 3^d is never enumerated), and states near equilibrium at three
    scales, where the Lyapunov condition is tightest.
    """
    reg = _region_of(region)
    lo, hi = _box(reg)
    d, nx = len(lo), len(reg.x_min)
    rng = np.random.default_rng(seed)
    near = _near_equilibrium(region, reg, rng, count=min(24, max(1, max_points // 8)))
    room = max(1, max_points - len(near))
    # every corner when they fit, else a random half of the room (the rest: edges and faces)
    corners = box_corners(lo, hi, limit=room if 2 ** d <= room else max(1, room // 2), seed=seed)
    budget = max(0, max_points - len(corners) - len(near))
    if budget and d:
        unit = rng.integers(-1, 2, size=(budget, d)).astype(float)
        unit[np.arange(budget), rng.integers(0, d, size=budget)] = 0.0   # off the corners
        centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0
        others = centre + unit * half
    else:
        others = np.zeros((0, d))
    pts = np.concatenate([corners, others, near])[:max_points]
    pts = np.clip(pts, lo, hi)
    return pts[:, :nx].copy(), pts[:, nx:].copy()


def _near_equilibrium(source, reg, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` points ``[x_ss(r) + δ, r]`` with δ at the scales 1e-3, 1e-2, 5e-2 of the box."""
    lo, hi = _box(reg)
    nx = len(reg.x_min)
    half = (hi - lo) / 2.0
    per = max(1, count // 3)
    out = []
    for scale in (1e-3, 1e-2, 5e-2):
        r = rng.uniform(reg.r_min, reg.r_max, size=(per, len(reg.r_min)))
        if hasattr(source, "equilibrium") and len(reg.r_min):
            xs, _ = source.equilibrium(r)
        elif hasattr(source, "equilibrium"):
            xs = np.broadcast_to(source.equilibrium()[0], (per, nx))
        else:
            xs = np.broadcast_to((lo[:nx] + hi[:nx]) / 2.0, (per, nx))
        x = xs + rng.standard_normal((per, nx)) * scale * half[:nx]
        out.append(np.concatenate([x, r], 1))
    return np.concatenate(out)[:count]


def random_states(region, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uniform initial states and references in the region's [x, r] box."""
    lo, hi = _box(_region_of(region))
    pts = rng.uniform(lo, hi, size=(count, len(lo)))
    return _split(region, pts)


def state_set(region, count: int, rng: np.random.Generator,
              structured: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` initial conditions: the structured points first, the rest uniform random."""
    if structured is None:
        structured = structured_states(region, max_points=count // 2)
    xs, rs = structured
    xr, rr = random_states(region, max(0, count - len(xs)), rng)
    return np.concatenate([xs, xr])[:count], np.concatenate([rs, rr])[:count]

