"""rollout: batched closed-loop rollouts of any plant and its normalised safety metrics, and the
certified region's initial conditions."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plant_strategies import random_plant_dict
from scpo_ros.backup import LQRBackup
from scpo_ros.plant import load_plant, plant_from_dict
from scpo_ros.policy import MLPLayout, NumpyMLP
from scpo_ros.residual_scpo import backup_weights
from scpo_ros.rollout import (
    METRICS,
    PlantRollout,
    SafetySpec,
    box_corners,
    random_states,
    state_set,
    structured_states,
)

# ------------------------------------------------------------------ an independent reference


def _corners(lo, hi):
    return np.array(list(itertools.product(*zip(lo, hi)))).reshape(-1, len(lo))


def _row_min(F, lo, hi):
    """Minimum of each row over the box, by its corners (not the support-function formula)."""
    if F.shape[1] == 0:
        return np.zeros(len(F))
    return (_corners(lo, hi) @ F.T).min(0)


def reference_metrics(plant, backup, layout, spec, safe, flat, x0, r):
    """The metrics of one weight vector by a plain float64 simulation of ``plant.step`` under
    ``backup(x, r) + φ([x, r])``: what the fused loop must reproduce, ``(M, 4)`` and the cost."""
    reg = plant.region
    Fs, fs, _ = plant.state_rows()
    Fu, fu, _ = plant.input_rows()
    E, G, F, f = (np.asarray(a, dtype=float) for a in safe)
    k = F.shape[1] // plant.nr if plant.nr else 0
    s_rng = fs - _row_min(Fs, reg.x_min, reg.x_max)
    u_rng = fu - _row_min(Fu, plant.u_min, plant.u_max)
    f_rng = (f - _row_min(E, reg.x_min, reg.x_max) - _row_min(G, plant.u_min, plant.u_max)
             - _row_min(F, np.tile(reg.r_min, k), np.tile(reg.r_max, k)))
    P, Phi = backup.P, backup.A_cl
    decrease = 1.0 - np.linalg.eigvals(np.linalg.solve(P, Phi.T @ P @ Phi)).real.max()
    alpha = spec.lyap_alpha * decrease
    z = _corners(reg.lower, reg.upper)
    e0 = z[:, :plant.n] - backup.equilibrium(z[:, plant.n:])[0]
    eps = spec.lyap_eps * np.einsum("bi,ij,bj->b", e0, P, e0).max()
    mlp = NumpyMLP(layout, np.asarray(flat, dtype=np.float64))
    x = np.asarray(x0, dtype=float)
    xs, us = backup.equilibrium(r)
    rho = np.tile(r, (1, k))
    V = lambda e: np.einsum("bi,ij,bj->b", e, P, e)  # noqa: E731
    worst = np.full((len(x), 4), -np.inf)
    worst[:, 0] = ((x @ Fs.T - fs) / s_rng).max(-1)
    cost = np.zeros(len(x))
    track = plant.tracked_index if plant.nr else np.arange(plant.n)
    for _ in range(spec.steps(plant.dt)):
        u = backup(x, r) + mlp(np.concatenate([x, r], 1))
        xn = plant.step(x, u)
        vals = [((xn @ Fs.T - fs) / s_rng).max(-1), ((u @ Fu.T - fu) / u_rng).max(-1),
                (V(xn - xs) - np.maximum((1 - alpha) * V(x - xs), eps)) / (decrease * eps),
                ((x @ E.T + u @ G.T + rho @ F.T - f) / f_rng).max(-1) if len(f) else np.full(len(x), -1.0)]
        worst = np.maximum(worst, np.stack(vals, -1))
        cost += ((x - xs)[:, track] ** 2).sum(-1) + spec.cost_action_weight * ((u - us) ** 2).sum(-1)
        x = xn
    return worst, cost.mean() * plant.dt


def random_safe_rows(rng, plant, rows=5, blocks=1):
    """Rows ``E x + G u + F ρ <= f`` in general position (what the metric must evaluate, whatever
    the set's construction), with ``f`` between the rows' minimum and maximum over the region,
    input and reference boxes: each row has room there, and can be broken."""
    E, G = rng.normal(size=(rows, plant.n)), rng.normal(size=(rows, plant.m))
    F = rng.normal(size=(rows, plant.nr * blocks))
    reg = plant.region
    boxes = [(E, reg.x_min, reg.x_max), (G, plant.u_min, plant.u_max),
             (F, np.tile(reg.r_min, blocks), np.tile(reg.r_max, blocks))]
    lo = sum(_row_min(M, a, b) for M, a, b in boxes)
    hi = -sum(_row_min(-M, a, b) for M, a, b in boxes)
    return E, G, F, lo + rng.uniform(0.3, 1.2, rows) * (hi - lo)


def perturbed(layout, count, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return layout.initial_parameters(seed).unsqueeze(0) + scale * torch.randn(count, layout.size, generator=gen)


def _check_against_reference(plant, safe, spec, seed, count=12, dtype=torch.float32, tol=2e-3):
    backup = LQRBackup(plant)
    layout = MLPLayout(plant.n + plant.nr, plant.m, (8, 8))
    engine = PlantRollout(plant, backup, layout, spec, safe_rows=safe, dtype=dtype)
    params = perturbed(layout, 2, 0.3, seed)
    x0, r = random_states(plant, count, np.random.default_rng(seed))
    res = engine.evaluate(params, x0, r, per_state=True, with_cost=True)
    assert res.g.shape == (2, len(METRICS)) and res.g_per_state.shape == (2, count, len(METRICS))
    for i in range(2):
        ref, cost = reference_metrics(plant, backup, layout, spec, safe, params[i].double().numpy(), x0, r)
        scale = 1.0 + np.abs(ref)
        np.testing.assert_array_less(np.abs(res.g_per_state[i].double().numpy() - ref), tol * scale)
        assert float(res.cost[i]) == pytest.approx(cost, rel=tol, abs=1e-9)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), m=st.integers(1, 2), blocks=st.integers(1, 2))
def test_fused_rollout_of_random_plants_matches_a_float64_simulation(seed, n, m, blocks):
    """Any linear plant (affine term, asymmetric boxes, H rows, references): the error-form fused
    loop gives the metrics of the plain simulation of ``plant.step`` (in float64: a random
    plant's P may be ill-conditioned, where float32 V-differences carry 1e-2 of ε)."""
    rng = np.random.default_rng(seed)
    plant = plant_from_dict(random_plant_dict(rng, n, m))
    spec = SafetySpec(horizon_s=25 * plant.dt, lyap_alpha=0.3, lyap_eps=0.01)
    _check_against_reference(plant, random_safe_rows(rng, plant, blocks=blocks), spec, seed,
                             dtype=torch.float64, tol=1e-8)


def test_fused_float32_rollout_of_the_two_axis_double_integrator_matches():
    plant = load_plant("double_integrator_2axis")
    rng = np.random.default_rng(1)
    _check_against_reference(plant, random_safe_rows(rng, plant, blocks=2), SafetySpec(horizon_s=2.0), seed=1)


def test_model_plant_rollout_matches_a_float64_simulation():
    """The pendulum (a model plant, no references) steps its nonlinear model."""
    plant = load_plant("pendulum")
    rng = np.random.default_rng(0)
    safe = (rng.normal(size=(4, 2)), rng.normal(size=(4, 1)), np.zeros((4, 0)), rng.uniform(1, 3, 4))
    _check_against_reference(plant, safe, SafetySpec(horizon_s=1.0), seed=3)


def test_model_plant_with_a_nonlinear_safe_set_evaluates_its_rows_per_state():
    """A safe set whose ``U_safe(x) = {u : G u <= rhs(x)}`` has a nonlinear right-hand side (the
    pendulum's): the metric is ``max (G u - rhs(x)) / range``, no affine rows needed."""
    plant = load_plant("pendulum")

    class NonlinearSet:
        G = np.array([[1.0], [-1.0]])

        def affine_rows(self):
            raise ValueError("nonlinear drift")

        def rhs(self, x):
            lib = torch if torch.is_tensor(x) else np
            s = lib.sin(x[..., :1])
            return lib.cat([0.5 - s, 0.5 + s], -1) if lib is torch else np.concatenate([0.5 - s, 0.5 + s], -1)

    backup = LQRBackup(plant)
    layout = MLPLayout(2, 1, (8,))
    engine = PlantRollout(plant, backup, layout, SafetySpec(horizon_s=0.05), safe_rows=NonlinearSet())
    x0 = np.array([[0.3, 0.0], [-0.2, 0.5]])
    flat = layout.initial_parameters(0).clone()
    g = engine.evaluate(flat, x0, np.zeros((2, 0)), per_state=True).g_per_state[0]
    u = backup(x0)
    rhs = NonlinearSet().rhs(x0)
    corners = np.array([[a, b] for a in (-0.5, 0.5) for b in (-1.0, 1.0)])
    grid = np.concatenate([corners, np.random.default_rng(0).uniform([-0.5, -1], [0.5, 1], (2048, 2))])
    top = NonlinearSet().rhs(grid).max(0) + 1.0       # max rhs - min over |u| <= 1 of ±u
    want = ((u @ NonlinearSet.G.T - rhs) / top).max(-1)
    np.testing.assert_allclose(g[:, METRICS.index("safe_set")].numpy(), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ what the metrics mean


def _di_engine(**spec):
    plant = load_plant("double_integrator")
    backup = LQRBackup(plant)
    layout = MLPLayout(3, 1, (8,))
    return plant, backup, layout, PlantRollout(plant, backup, layout, SafetySpec(**spec))


def test_zero_residual_is_safe_and_each_metric_sees_its_violation():
    """The backup alone (a residual of exactly zero) is safe on the region's worst cases with
    the envelope's default safe set; a constant push breaks state, input, Lyapunov and safe set."""
    plant, backup, layout, engine = _di_engine()
    x0, r = structured_states(plant, max_points=64)
    g = engine.evaluate(layout.initial_parameters(0), x0, r).g[0]
    assert torch.all(g < 0), g
    flat = layout.initial_parameters(0).clone()
    flat[-1] = 0.8
    assert torch.all(engine.evaluate(flat, x0, r).g[0] > 0)


def test_metrics_are_fractions_of_each_rows_range():
    """The same constant residual on one state: the input metric is (u - u_max) / (u_max - u_min)
    and the state metric (x+ - x_max) / (x_max - region x_min), exactly."""
    plant, backup, layout, engine = _di_engine(horizon_s=0.05)   # one step
    flat = layout.initial_parameters(0).clone()
    flat[-1] = 3.0
    x0, r = np.array([[0.8, 0.2]]), np.array([[0.5]])
    g = engine.evaluate(flat, x0, r).g[0].double().numpy()
    u = float(backup(x0, r)[0, 0]) + 3.0
    xn = plant.step(x0, np.array([[u]]))[0]
    assert g[METRICS.index("input")] == pytest.approx((u - 1.0) / 2.0, abs=1e-5)
    assert g[METRICS.index("state")] == pytest.approx(max((xn[0] - 1) / 1.8, (xn[1] - 1) / 1.2), abs=1e-5)


def _scaled_plant(d, s, su):
    """The plant of ``d`` in other units: states ``x' = s x``, inputs ``u' = su u``."""
    S, Su = np.diag(s), np.diag(su)
    Si, Sui = np.linalg.inv(S), np.linalg.inv(Su)
    base = plant_from_dict(d)
    track = base.tracked_index
    out = {k: v for k, v in d.items() if k not in ("continuous", "A", "B", "c")}
    out.update(A=(S @ base.A @ Si).tolist(), B=(S @ base.B @ Sui).tolist(), c=(S @ base.c).tolist(),
               x_min=(s * base.x_min).tolist(), x_max=(s * base.x_max).tolist(),
               u_min=(su * base.u_min).tolist(), u_max=(su * base.u_max).tolist(),
               backup={"Q": (base.backup_Q / s ** 2).tolist(), "R": (base.backup_R / su ** 2).tolist()})
    reg = base.region
    out["certified_region"] = {"x_min": (s * reg.x_min).tolist(), "x_max": (s * reg.x_max).tolist()}
    if base.nr:
        out["certified_region"].update(r_min=(s[track] * reg.r_min).tolist(), r_max=(s[track] * reg.r_max).tolist())
    if len(base.h):
        out["H"] = (base.H @ Si).tolist()
    return plant_from_dict(out)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 3), m=st.integers(1, 2))
def test_metrics_do_not_depend_on_the_units(seed, n, m):
    """Scale-free: the same robot written in other units (every state and input rescaled, the
    policy rewritten to the same function) gets the same metrics, so one margin fits all. (As
    many references as inputs: the equilibrium is then unique, not a least-norm choice that
    depends on the units.)"""
    rng = np.random.default_rng(seed)
    d = random_plant_dict(rng, n, m, nr=m, g_rows=0)
    s, su = np.exp(rng.uniform(-2, 2, n)), np.exp(rng.uniform(-2, 2, m))
    plants = [plant_from_dict(d), _scaled_plant(d, s, su)]
    layout = MLPLayout(n + plants[0].nr, m, (8,))
    flat = perturbed(layout, 1, 0.3, seed)[0]
    (W0, b0), (W1, b1) = layout.unflatten(flat)
    sr = s[plants[0].tracked_index]
    flat2 = torch.cat([(W0 / torch.as_tensor(np.concatenate([s, sr]), dtype=W0.dtype)).reshape(-1), b0,
                       (W1 * torch.as_tensor(su, dtype=W1.dtype)[:, None]).reshape(-1),
                       b1 * torch.as_tensor(su, dtype=b1.dtype)])
    E, G, F, f = random_safe_rows(rng, plants[0])
    safes = [(E, G, F, f), (E / s, G / su, F / sr, f)]
    x0, r = random_states(plants[0], 16, rng)
    spec = SafetySpec(horizon_s=20 * plants[0].dt)
    g = [PlantRollout(p, LQRBackup(p), layout, spec, safe_rows=sf, dtype=torch.float64).evaluate(th, xx, rr).g[0]
         for p, sf, th, xx, rr in zip(plants, safes, (flat, flat2), (x0, x0 * s), (r, r * sr))]
    np.testing.assert_allclose(g[1].numpy(), g[0].numpy(), rtol=1e-6, atol=1e-6)


def test_input_polytope_rows_use_their_range_over_the_input_set():
    """An input row of ``G`` is divided by ``g - min over U`` (an LP), not by the box's range."""
    d = random_plant_dict(5, 2, 2, g_rows=1, nr=0)
    plant = plant_from_dict(d)
    from scpo_ros.rollout import metric_rows
    rows = metric_rows(plant, ())
    Gp, gp = plant.G[0], plant.g[0]
    grid = np.random.default_rng(0).uniform(plant.u_min, plant.u_max, size=(200_000, 2))
    grid = grid[grid @ plant.G.T[:, 0] <= gp]
    want = gp - (grid @ Gp).min()
    got = gp / rows.fu[-1]
    assert got == pytest.approx(want, rel=1e-2)


def test_diverging_rollouts_read_as_unsafe_and_finite():
    plant, backup, layout, engine = _di_engine(horizon_s=0.2)
    flat = layout.initial_parameters(0).clone()
    flat[-1] = 3e38     # the command overflows float32
    g = engine.evaluate(flat, np.zeros((2, 2)), np.zeros((2, 1))).g[0]
    assert torch.all(torch.isfinite(g)) and g[METRICS.index("input")] >= 1e5


def test_refuses_a_layout_or_rows_that_do_not_fit():
    plant = load_plant("double_integrator")
    backup = LQRBackup(plant)
    with pytest.raises(ValueError, match="in_dim = n \\+ nr = 3"):
        PlantRollout(plant, backup, MLPLayout(2, 1, (4,)), safe_rows=())
    G, f = np.zeros((2, 1)), np.ones(2)
    two = load_plant("double_integrator_2axis")     # nr = 2: ρ of 3 columns is no whole block
    with pytest.raises(ValueError, match="whole number"):
        PlantRollout(two, LQRBackup(two), MLPLayout(6, 2, (4,)),
                     safe_rows=(np.zeros((2, 4)), np.zeros((2, 2)), np.zeros((2, 3)), f))
    with pytest.raises(ValueError, match="do not fit"):
        PlantRollout(plant, backup, MLPLayout(3, 1, (4,)), safe_rows=(np.zeros((2, 3)), G, f))


def test_safety_spec_horizon_is_in_seconds():
    spec = SafetySpec(horizon_s=5.0)
    assert spec.steps(0.05) == 100 and spec.steps(0.02) == 250 and spec.steps(0.03) == 167
    assert SafetySpec(horizon_s=0.001).steps(0.05) == 1
    for bad in ({"horizon_s": 0.0}, {"horizon_s": math.inf}, {"lyap_alpha": 1.0}, {"lyap_eps": 0.0}):
        with pytest.raises(ValueError):
            SafetySpec(**bad)


def test_lyapunov_scale_is_a_fraction_of_the_region():
    """ε = lyap_eps × max V(e_0) over the region, α = lyap_alpha × the backup's decrease: the
    defaults reproduce the double integrator's former absolute values (ε = 0.5, α = 0.01)."""
    _, backup, _, engine = _di_engine()
    assert engine.eps == pytest.approx(0.5, rel=0.1)
    assert engine.alpha == pytest.approx(0.01, rel=0.05)
    # the metric's unit: ε times the backup's decrease, so the backup itself sits near -(1 - α)
    assert engine.lyap_unit == pytest.approx(engine.eps * engine.alpha / SafetySpec().lyap_alpha)


@pytest.mark.parametrize("name", ["double_integrator", "dc_motor", "cart_pole", "pendulum"])
def test_the_backups_own_lyapunov_value_is_plant_independent(name):
    """In units of δ ε the backup's own Lyapunov value is about -(1 - lyap_alpha) on every
    plant (a fast pendulum at dt 0.05, a slow motor at dt 0.01), so one margin fits all."""
    plant = load_plant(name)
    backup = LQRBackup(plant)
    layout = MLPLayout(plant.n + plant.nr, plant.m, (8,))
    engine = PlantRollout(plant, backup, layout, SafetySpec())
    x, r = random_states(plant, 256, np.random.default_rng(0))
    g = engine.evaluate(backup_weights(layout, 0), x, r).g[0]
    lyap = float(g[METRICS.index("lyapunov")])
    assert -1.5 <= lyap <= -0.5, (name, lyap)   # δ is the worst case: a state may shrink faster


# ------------------------------------------------------------------ initial conditions


def test_structured_states_hold_every_corner_and_points_near_equilibrium():
    plant = load_plant("double_integrator_2axis")
    x, r = structured_states(plant, max_points=200)
    reg = plant.region
    pts = np.concatenate([x, r], 1)
    assert len(pts) <= 200 and reg.contains(x, r, slack=1e-12).all()
    for corner in box_corners(reg.lower, reg.upper):
        assert np.any(np.all(np.isclose(pts, corner), axis=1))
    xs, _ = plant.equilibrium(r)
    err = np.abs(x - xs) / (reg.x_max - reg.x_min)
    assert (err.max(1) < 0.2).sum() >= 20     # near-equilibrium points, where V is tightest


def test_structured_states_of_a_large_box_sample_corners_without_enumerating():
    plant = plant_from_dict(random_plant_dict(7, 6, 3, nr=3))
    x, r = structured_states(plant, max_points=128, seed=1)
    assert x.shape == (128, 6) and r.shape == (128, 3)
    lo, hi = plant.region.lower, plant.region.upper
    z = np.concatenate([x, r], 1)
    at_corner = np.all(np.isclose(z, lo) | np.isclose(z, hi), axis=1)
    assert at_corner.sum() >= 40 and plant.region.contains(x, r, slack=1e-12).all()
    # deterministic per seed
    np.testing.assert_array_equal(structured_states(plant, max_points=128, seed=1)[0], x)


def test_random_states_and_state_set_fill_the_box():
    plant = load_plant("dc_motor")
    reg = plant.region
    x, r = random_states(plant.region, 4000, np.random.default_rng(0))
    z = np.concatenate([x, r], 1)
    assert np.all(z >= reg.lower) and np.all(z <= reg.upper)
    assert np.all(z.min(0) < reg.lower + 0.05 * (reg.upper - reg.lower))
    xs, rs = state_set(plant, 300, np.random.default_rng(1))
    assert len(xs) == len(rs) == 300 and reg.contains(xs, rs).all()
    xn, rn = random_states(load_plant("cart_pole"), 5, np.random.default_rng(0))
    assert rn.shape == (5, 0)
