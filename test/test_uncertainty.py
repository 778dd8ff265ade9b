"""Declared model uncertainty (``uncertainty:`` in a plant file, ``scpo_ros.uncertainty``) and the
robust safe sets built against it: a bad block is refused by key; the additive bound and the
monitor's state-dependent bound cover every plant the file allows (drawn at random, not only
its corners); a robust set keeps its promise on the *uncertain* plant (a hostile command
projected, then worst-case and random disturbances, on time and with a held command), it lies
inside the nominal set, and a declared uncertainty the backup cannot survive is refused."""
import copy

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from late_set_helpers import emptiness
from plant_strategies import random_plant_dict
from scpo_ros.backup import LQRBackup
from scpo_ros.plant import PlantError, load_plant, plant_from_dict, zoh
from scpo_ros.safeguard.invariant_set import safe_set_at_most, safe_set_for
from scpo_ros.safeguard.projection import SafeguardProjector
from scpo_ros.uncertainty import ModelBound, additive_bound, describe, measured_state_rows, parameter_vertices


def _file(name: str) -> dict:
    return yaml.safe_load(load_plant(name).text)


def _with(name: str, **unc) -> dict:
    d = _file(name)
    d["uncertainty"] = unc
    return d


# ------------------------------------------------------------------ the file

@pytest.mark.parametrize("name,unc,key", [
    ("double_integrator", {"w_max": [0.1]}, "uncertainty.w_max"),
    ("double_integrator", {"w_max": [0.1, -0.1]}, "uncertainty.w_max"),
    ("double_integrator", {"w_max": [0.1, float("nan")]}, "uncertainty.w_max"),
    ("double_integrator", {"measurement_noise": [0.0, -1.0]}, "uncertainty.measurement_noise"),
    ("double_integrator", {"A_delta": [[0.1, 0.0]]}, "uncertainty.A_delta"),
    ("double_integrator", {"B_delta": [[-0.1], [0.0]]}, "uncertainty.B_delta"),
    ("double_integrator", {"params": {"mass": [1, 2]}}, "uncertainty.params"),
    ("double_integrator", {"input_delay_steps": 2}, "uncertainty.input_delay_steps"),
    ("double_integrator", {"input_delay_steps": True}, "uncertainty.input_delay_steps"),
    ("double_integrator", {"wmax": [0.1, 0.1]}, "uncertainty.wmax"),
    ("pendulum", {"A_delta": [[0, 0], [0, 0]]}, "uncertainty.A_delta"),
    ("pendulum", {"params": {"mass": [1, 2]}}, "uncertainty.params.mass"),
    ("pendulum", {"params": {"g": [10.0, 11.0]}}, "uncertainty.params.g"),
    ("pendulum", {"params": {"g": [9.0]}}, "uncertainty.params.g"),
])
def test_a_bad_uncertainty_block_is_refused_by_its_key(name, unc, key):
    with pytest.raises(PlantError) as err:
        plant_from_dict(_with(name, **unc))
    assert err.value.key == key, str(err.value)
    assert key in str(err.value)


def test_uncertainty_must_be_a_mapping():
    d = _file("double_integrator")
    d["uncertainty"] = [0.1, 0.1]
    with pytest.raises(PlantError, match="key 'uncertainty'"):
        plant_from_dict(d)


def test_no_block_is_the_nominal_plant_and_its_sets_are_unchanged():
    plant = load_plant("double_integrator")
    assert not plant.uncertainty.declared
    assert not additive_bound(plant).any()
    S = safe_set_for(plant)
    assert S.w_max is None and "robust" not in S.name
    zero = plant_from_dict(_with("double_integrator", w_max=[0.0, 0.0]))
    assert not zero.uncertainty.declared
    assert np.array_equal(safe_set_for(zero).f, S.f)
    assert describe(plant) == {"declared": False, "covers": "the nominal model only"}


def test_continuous_deltas_become_discrete_bounds_of_about_dt_times_them():
    """The double integrator ``continuous: B = [[0], [1]]`` with ``B_delta = 0.3``: the discrete
    ``B`` is ``[dt²/2, dt]``, so its bound is 0.3 of that (within the 5 % widening)."""
    plant = plant_from_dict(_with("double_integrator", B_delta=[[0.0], [0.3]]))
    dt = plant.dt
    dB = plant.uncertainty.B_delta[:, 0]
    assert np.allclose(dB, 1.05 * 0.3 * np.array([dt * dt / 2, dt]), rtol=1e-9)
    assert not plant.uncertainty.A_delta.any()
    assert plant.uncertainty.continuous_deltas[1][1, 0] == 0.3
    assert plant.describe()["uncertainty"]["B_delta"][1][0] == pytest.approx(dB[1])


# ------------------------------------------------------------------ the bounds cover the declared plants

def _true_linear(plant, rng):
    """A plant the declaration allows: ``A ± A_delta``, ``B ± B_delta`` entrywise (uniform, not corners)."""
    u = plant.uncertainty
    A = plant.A + rng.uniform(-1, 1, plant.A.shape) * u.A_delta
    B = plant.B + rng.uniform(-1, 1, plant.B.shape) * u.B_delta
    return A, B


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), frac=st.floats(0.0, 0.5), noise=st.floats(0.0, 0.05))
def test_bounds_cover_every_linear_plant_the_file_allows(seed, frac, noise):
    d = random_plant_dict(seed, n=int(np.random.default_rng(seed).integers(1, 5)), m=2, unbounded=0)
    plant0 = plant_from_dict(d)
    rng = np.random.default_rng(seed)
    n, m = plant0.n, plant0.m
    d["uncertainty"] = {"w_max": (frac * rng.uniform(0, 0.1, n)).tolist(),
                        "A_delta": (frac * np.abs(rng.normal(size=(n, n)))).tolist(),
                        "B_delta": (frac * np.abs(rng.normal(size=(n, m)))).tolist(),
                        "measurement_noise": [noise] * n}
    plant = plant_from_dict(d)
    w_eff = additive_bound(plant)
    bound = ModelBound(plant)
    u = plant.uncertainty
    for _ in range(20):
        A, B = _true_linear(plant, rng)
        x = rng.uniform(plant.x_min, plant.x_max)
        uu = rng.uniform(plant.u_min, plant.u_max)
        w = rng.uniform(-1, 1, n) * u.w_max
        n0, n1 = (rng.uniform(-1, 1, n) * u.measurement_noise for _ in range(2))
        x_next = A @ x + B @ uu + plant.c + w
        y, y_next = x + n0, x_next + n1                   # what the monitor measures
        residual = np.abs(y_next - plant.step(y, uu))
        assert np.all(residual <= bound.at(y, uu) + 1e-9)
        # the additive bound covers it over the whole set (the measured state may sit up to the
        # noise outside the box: the bound is on the true state's box, the noise added on top)
        assert np.all(np.abs(x_next - plant.step(x, uu)) <= w_eff + 1e-9)
        assert np.all(residual <= w_eff + 1e-9 + np.abs(u.A_delta) @ np.abs(n0))


def test_the_model_bound_covers_a_pendulum_anywhere_in_its_parameter_box():
    d = _with("pendulum", params={"g": [9.0, 10.5], "tau_max": [27.0, 33.0]}, w_max=[0.0, 0.01])
    plant = plant_from_dict(d)
    assert len(parameter_vertices(plant)) == 4
    bound, w_eff = ModelBound(plant), additive_bound(plant)
    rng = np.random.default_rng(3)
    cls = type(plant.model)
    for _ in range(200):
        true = cls(dt=plant.dt, g=rng.uniform(9.0, 10.5), tau_max=rng.uniform(27.0, 33.0))
        x = rng.uniform(plant.x_min, plant.x_max)
        u = rng.uniform(plant.u_min, plant.u_max)
        x_next = np.asarray(true.step(x[None], u[None]))[0] + rng.uniform(-1, 1, 2) * np.array([0.0, 0.01])
        residual = np.abs(x_next - np.asarray(plant.step(x[None], u[None]))[0])
        assert np.all(residual <= bound.at(x, u) + 1e-9)
        assert np.all(residual <= w_eff + 1e-9)
    assert "sampled" in describe(plant)["covers"]


def test_an_uncertain_column_on_an_unbounded_state_has_no_bound_over_the_set():
    d = random_plant_dict(5, n=3, m=1, nr=0, unbounded=1)
    plant0 = plant_from_dict(d)
    free = int(np.flatnonzero(~np.isfinite(plant0.x_max))[0])
    dA = np.zeros((3, 3))
    dA[0, free] = 0.01
    d["uncertainty"] = {"A_delta": dA.tolist()}
    with pytest.raises(ValueError, match=plant0.states[free]):
        additive_bound(plant_from_dict(d))


# ------------------------------------------------------------------ robust sets keep their promise

def _disturbances(w, rng, k=12):
    """Corners of the box (the worst case for a polytope row is a corner) and random points."""
    n = len(w)
    corners = rng.choice([-1.0, 1.0], size=(k, n)) * w
    return np.vstack([corners, rng.uniform(-1, 1, (k, n)) * w])


def _check_robust_promise(plant, seed, states=30):
    backup = LQRBackup(plant)
    S = safe_set_for(plant, backup, late_commands=1)
    assert S.w_max is not None and "robust" in S.name
    w = S.w_max
    P = SafeguardProjector(S, backup=backup)
    rng = np.random.default_rng(seed)
    reg = plant.region
    x = rng.uniform(reg.x_min, reg.x_max, (300, plant.n))
    r = rng.uniform(reg.r_min, reg.r_max, (300, plant.nr))
    inside = np.array([bool(S.contains(xi, ri)) for xi, ri in zip(x, r)])
    if inside.sum() < 5:
        return 0
    nominal_set = safe_set_for(plant, backup, late_commands=1, robust=False)
    checked = 0
    for xi, ri in list(zip(x[inside], r[inside]))[:states]:
        assert nominal_set.contains(xi, ri, tol=1e-7), "a robust set's state outside the nominal set"
        u_raw = rng.uniform(2.0 * plant.u_min - plant.u_max, 2.0 * plant.u_max - plant.u_min)
        res = P.project(xi, u_raw, ri)
        assert not res.fallback, (S.name, res.reason)
        for wi in _disturbances(w, rng):
            x1 = plant.step(xi, res.u) + wi
            assert not any(v.any() for v in plant.violations(x1, tol=1e-9).values())
            assert emptiness(S, x1) <= 1e-8, "U_safe empty after a disturbance"
            if S.late_commands and "held block on the nominal set" not in S.name:
                x2 = plant.step(x1, res.u) + _disturbances(w, rng, 1)[0]
                assert not any(v.any() for v in plant.violations(x2, tol=1e-9).values())
                assert emptiness(S, x2) <= 1e-8, "U_safe empty after a held command and disturbances"
        checked += 1
    return checked


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(seed=st.integers(0, 2**16), n=st.integers(1, 2), frac=st.floats(0.005, 0.05))
def test_random_robust_explicit_sets_keep_their_promise_under_disturbances(seed, n, frac):
    d = random_plant_dict(seed, n=n, m=1, unbounded=0, h_rows=0)
    plant0 = plant_from_dict(d)
    d["uncertainty"] = {"w_max": (frac * (plant0.x_max - plant0.x_min)).tolist()}
    plant = plant_from_dict(d)
    try:
        S = safe_set_for(plant, LQRBackup(plant), late_commands=1)
    except ValueError:
        assume(False)         # this much disturbance leaves no robust set for this draw
    assume(S.kind == "explicit")
    assume(_check_robust_promise(plant, seed) >= 5)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(seed=st.integers(0, 2**16))
def test_random_robust_implicit_sets_keep_their_promise_under_disturbances(seed):
    d = random_plant_dict(seed, n=4, m=1, stable=True, h_rows=0, region_frac=0.2)
    plant0 = plant_from_dict(d)
    d["uncertainty"] = {"w_max": (0.002 * (plant0.x_max - plant0.x_min)).tolist()}
    plant = plant_from_dict(d)
    try:
        S = safe_set_for(plant, LQRBackup(plant), late_commands=1)
    except ValueError:
        assume(False)
    assert S.kind == "implicit"
    assume(_check_robust_promise(plant, seed, states=15) >= 5)


@pytest.mark.parametrize("name", ["double_integrator", "mass_spring_damper", "dc_motor"])
def test_shipped_plants_with_mass_uncertainty_and_a_disturbance_keep_the_promise(name):
    """The study's kind of declaration: the input gain ±30 % (a mass ±30 %) and a disturbance of
    10 % of what the input moves per step."""
    p = load_plant(name)
    d = _file(name)
    src = np.asarray(d["continuous"]["B"] if "continuous" in d else d["B"])
    d["uncertainty"] = {"B_delta": (0.3 * np.abs(src)).tolist(), "w_max": (0.1 * np.abs(p.B) @ p.u_max).tolist()}
    assert _check_robust_promise(plant_from_dict(d), 7) >= 5


def test_the_robust_set_shrinks_with_the_disturbance_and_too_much_is_refused():
    sizes = []
    for w in (0.0, 0.0005, 0.002):
        plant = plant_from_dict(_with("double_integrator", w_max=[w, 10 * w]))
        S = safe_set_for(plant)
        sizes.append(S.invariant.contains(np.random.default_rng(0).uniform(-1, 1, (4000, 2))).mean())
    assert sizes[0] > sizes[1] > sizes[2] > 0.2
    huge = plant_from_dict(_with("double_integrator", w_max=[0.0, 0.2]))
    with pytest.raises(ValueError, match="robust"):
        safe_set_for(huge)


def test_too_much_uncertainty_for_the_backup_is_refused_with_the_reason():
    d = random_plant_dict(11, n=4, m=1, stable=True, h_rows=0, region_frac=0.2)
    plant0 = plant_from_dict(d)
    d["uncertainty"] = {"w_max": (0.3 * (plant0.x_max - plant0.x_min)).tolist()}
    with pytest.raises(ValueError, match="not robustly safe"):
        safe_set_for(plant_from_dict(d), late_commands=0)


def test_measurement_noise_tightens_the_state_rows_on_the_measured_state():
    plant = plant_from_dict(_with("double_integrator", measurement_noise=[0.002, 0.004]))
    F, f, _ = measured_state_rows(plant)
    F0, f0, _ = plant.state_rows()
    assert np.allclose(f0 - f, np.abs(F0) @ np.array([0.002, 0.004]))
    S = safe_set_for(plant)
    assert np.all(S.invariant.vertices()[:, 0] <= 1.0 - 0.002 + 1e-9)


def test_a_declared_input_delay_makes_the_set_absorb_a_late_command():
    plant = plant_from_dict(_with("double_integrator", input_delay_steps=1))
    S, late = safe_set_at_most(plant, late_commands=0)
    assert late == 1 and S.late_commands == 1


def test_the_robust_pendulum_set_keeps_the_true_pendulum_safe():
    d = _with("pendulum", params={"tau_max": [28.5, 31.5]}, w_max=[0.0, 0.005])
    plant = plant_from_dict(d)
    S, late = safe_set_at_most(plant)
    assert late == 0 and S.w_max is not None
    P = SafeguardProjector(S)
    cls = type(plant.model)
    rng = np.random.default_rng(2)
    kept = 0
    for _ in range(40):
        x = rng.uniform(-1, 1, 2) * np.array([0.6, 1.0])
        if not S.contains(x):
            continue
        true = cls(dt=plant.dt, g=9.81, tau_max=rng.uniform(28.5, 31.5))
        for _ in range(60):
            res = P.project(x, rng.uniform(-2, 2, 1))
            assert not res.fallback
            x = np.asarray(true.step(x[None], res.u[None]))[0] + rng.uniform(-1, 1, 2) * np.array([0.0, 0.005])
            assert S.contains(x, tol=1e-7)
        kept += 1
    assert kept >= 10


def test_the_record_carries_the_uncertainty():
    from scpo_ros.plant import plant_from_record, plant_record
    plant = plant_from_dict(_with("double_integrator", w_max=[0.001, 0.01]), "x.yaml",
                            text=yaml.safe_dump(_with("double_integrator", w_max=[0.001, 0.01])))
    back = plant_from_record(copy.deepcopy(plant_record(plant)))
    assert np.array_equal(back.uncertainty.w_max, [0.001, 0.01])
    assert plant_record(plant)["description"]["uncertainty"]["w_max"] == [0.001, 0.01]


def test_zoh_of_the_test_is_the_plants():
    # the continuous-delta test relies on zoh's discretisation of the double integrator
    A, B, _ = zoh(np.array([[0.0, 1.0], [0.0, 0.0]]), np.array([[0.0], [1.0]]), np.zeros(2), 0.05)
    assert np.allclose(B[:, 0], [0.05 ** 2 / 2, 0.05])


# ------------------------------------------------------------------ robust rollouts

def _robust_plant(seed, w_frac=0.002, b_frac=0.1, n=None):
    import numpy as _np
    d = random_plant_dict(seed, n=n or int(_np.random.default_rng(seed).integers(1, 4)), m=1, unbounded=0,
                          stable=True, h_rows=0)
    p0 = plant_from_dict(d)
    d["uncertainty"] = {"w_max": (w_frac * (p0.x_max - p0.x_min)).tolist()}
    if b_frac:
        d["uncertainty"]["B_delta"] = (b_frac * np.abs(np.asarray(d["continuous"]["B"] if "continuous" in d
                                                                  else d["B"]))).tolist()
    return plant_from_dict(d)


def _reference_metrics(engine, plant, theta, x0, r, w_seq, corner_of):
    """The true uncertain closed loop, simulated directly in float64: each state on its parameter
    corner, its disturbance sequence added; the normalised rows on the actual x and u."""
    from scpo_ros.policy import NumpyMLP
    rows, K = engine.rows, np.asarray(engine.backup.K)
    phi = NumpyMLP(engine.layout, np.asarray(theta, dtype=np.float64))
    out = np.full((len(x0), 3), -np.inf)
    for i in range(len(x0)):
        dA, dB = engine.corners[corner_of[i]] if engine.corners else (0.0, 0.0)
        A, B = plant.A + dA, plant.B + dB
        x, ri = x0[i].astype(float), r[i].astype(float)
        xs, us = plant.equilibrium(ri)
        rho = np.tile(ri, rows.blocks)
        out[i, 0] = max(out[i, 0], np.max(rows.Fs @ x - rows.fs, initial=-np.inf))
        for t in range(engine.steps):
            u = us - K @ (x - xs) + phi(np.concatenate([x, ri])[None])[0]
            vals_u = rows.Fu @ u - rows.fu
            vals_s = rows.E @ x + rows.G @ u + rows.F @ rho - rows.f
            x = A @ x + B @ u + plant.c + w_seq[t, i]
            out[i, 0] = max(out[i, 0], np.max(rows.Fs @ x - rows.fs, initial=-np.inf))
            out[i, 1] = max(out[i, 1], np.max(vals_u, initial=-np.inf))
            out[i, 2] = max(out[i, 2], np.max(vals_s, initial=-np.inf))
    return out


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.0, 0.3))
def test_robust_rollouts_bound_the_true_uncertain_plant_for_any_weights(seed, scale):
    """The robust metrics (corner simulated, the disturbance as the exact tube) are never below
    what the true plant does on the same corner under the same disturbance sequence: for any
    weights, a random residual among them."""
    from scpo_ros.policy import MLPLayout
    from scpo_ros.rollout import PlantRollout, disturbance_sequences, state_set
    plant = _robust_plant(seed)
    backup = LQRBackup(plant)
    layout = MLPLayout(plant.n + plant.nr, plant.m, (8,))
    try:
        S = safe_set_for(plant, backup, late_commands=1)
    except ValueError:
        assume(False)
    engine = PlantRollout(plant, backup, layout, safe_rows=S, dtype=torch.float64, seed=seed)
    assert engine.robust and engine.corners
    theta = layout.initial_parameters(seed).numpy() + scale * np.random.default_rng(seed).normal(size=layout.size)
    x0, r = state_set(plant, 12, np.random.default_rng(seed))
    state_before = copy.deepcopy(engine._seq_rng.bit_generator.state)
    res = engine.evaluate(theta, x0, r, per_state=True)
    rng = np.random.default_rng()
    rng.bit_generator.state = state_before
    w_seq = disturbance_sequences(len(x0), engine.steps, engine.w, np.asarray(backup.A_cl), engine._row_dirs, rng)
    assert np.all(np.abs(w_seq) <= engine.w + 1e-12)
    # The engine's residual saw x = x_ss + ē + d, d the Φ-response to w_seq. The true plant on
    # corner v reaches the same d under w_t = w_seq_t - (dA - dB K) d_t: drive it with that.
    Phi, K = np.asarray(backup.A_cl), np.asarray(backup.K)
    corner_of = np.arange(len(x0)) % len(engine.corners)
    w_true = np.zeros_like(w_seq)
    for i in range(len(x0)):
        dA, dB = engine.corners[corner_of[i]]
        d = np.zeros(plant.n)
        for t in range(engine.steps):
            w_true[t, i] = w_seq[t, i] - (dA - dB @ K) @ d
            d = Phi @ d + w_seq[t, i]
    ref = _reference_metrics(engine, plant, theta, x0, r, w_true, corner_of)
    robust = res.g_per_state[0].numpy()[:, [0, 1, 3]]
    assert np.all(robust >= ref - 1e-7), (robust - ref).min()


def test_the_tube_is_exact_for_the_backup_its_worst_sequence_attains_it():
    """Without parameter uncertainty and with the backup alone (φ = 0), the robust state metric is
    attained: the sequence ``w ⊙ sign(a Φ^{T-1-j})`` of the worst row and time reaches it."""
    from scpo_ros.policy import MLPLayout
    from scpo_ros.rollout import PlantRollout, state_set
    plant = _robust_plant(3, w_frac=0.003, b_frac=0.0, n=2)
    backup = LQRBackup(plant)
    layout = MLPLayout(plant.n + plant.nr, plant.m, (8,))
    engine = PlantRollout(plant, backup, layout, safe_rows=(), dtype=torch.float64)
    theta = layout.initial_parameters(0).numpy()
    # from an equilibrium: the nominal part stays, the tube grows: the maximum is late
    _, r = state_set(plant, 1, np.random.default_rng(1))
    x0 = plant.equilibrium(r)[0]
    g = engine.evaluate(theta, x0, r, per_state=True).g_per_state[0, 0, 0].item()
    # the nominal trajectory and the row/time of the maximum, then the worst sequence for it
    Phi, rows = np.asarray(backup.A_cl), engine.rows
    xs, us = plant.equilibrium(r[0])
    e, best = x0[0] - xs, (np.max(engine.rows.Fs @ x0[0] - engine.rows.fs), None, 0)
    for t in range(engine.steps):
        e = Phi @ e
        tube = [sum(np.abs(rows.Fs[i] @ np.linalg.matrix_power(Phi, j)) @ engine.w for j in range(t + 1))
                for i in range(len(rows.fs))]
        vals = rows.Fs @ (e + xs) - rows.fs + np.array(tube)
        i = int(np.argmax(vals))
        if vals[i] > best[0]:
            best = (vals[i], i, t + 1)
    assert g == pytest.approx(best[0], abs=1e-9)
    _, i, T = best
    assert T > 1
    a = rows.Fs[i]
    x = x0[0].copy()
    for j in range(T):
        u = us - backup.K @ (x - xs)
        w = engine.w * np.sign(a @ np.linalg.matrix_power(Phi, T - 1 - j))
        x = plant.A @ x + plant.B @ u + plant.c + w
    assert a @ x - rows.fs[i] == pytest.approx(g, abs=1e-9)


def test_covers_says_what_a_certificate_is_about():
    from scpo_ros.policy import MLPLayout
    from scpo_ros.rollout import PlantRollout
    plant = plant_from_dict(_with("double_integrator", B_delta=[[0.0], [0.3]], w_max=[0.0001, 0.001]))
    layout = MLPLayout(3, 1, (8,))
    eng = PlantRollout(plant, LQRBackup(plant), layout, safe_rows=())
    assert "4 corners" in eng.covers and "disturbance" in eng.covers
    assert "nominal" in PlantRollout(plant, LQRBackup(plant), layout, safe_rows=(), robust=False).covers
    nominal = load_plant("double_integrator")
    assert "no uncertainty declared" in PlantRollout(nominal, LQRBackup(nominal), layout, safe_rows=()).covers
    too_much = plant_from_dict(_with("double_integrator", B_delta=[[0.0], [3.0]], w_max=[0.0001, 0.001]))
    with pytest.raises(ValueError, match="destabilises"):
        PlantRollout(too_much, LQRBackup(too_much), layout, safe_rows=())


def test_a_backup_that_is_not_robustly_safe_on_the_region_is_refused_with_the_reason():
    """The nominal double integrator's region (p up to 0.8, its slow backup) under the study's
    declaration: a held disturbance of 10 % of u_max drives the backup past p = 1."""
    from scpo_ros.backup import BackupCertificationError
    from scpo_ros.params import MODEL_PARAMS, defaults
    from scpo_ros.safety_model import build_model
    d = _file("double_integrator")
    d["uncertainty"] = {"B_delta": [[0.0], [0.3]], "w_max": [0.000125, 0.005]}
    plant = plant_from_dict(d)
    with pytest.raises(BackupCertificationError, match="robust"):
        build_model(defaults(MODEL_PARAMS), plant)
    study = load_plant("double_integrator_uncertain")           # the same declaration, a region it survives
    assert build_model(defaults(MODEL_PARAMS), study).plant is study
