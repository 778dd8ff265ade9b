"""scpo_ros.expert: the demonstrator of any plant (clean LQR tracker, malicious phases)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plant_strategies import random_plant
from scpo_ros.backup import LQRBackup
from scpo_ros.expert import Expert, ExpertConfig, expert_action, is_malicious, reference_at
from scpo_ros.plant import load_plant, shipped_plants


def region_points(plant, count, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.uniform(plant.region.lower, plant.region.upper, size=(count, plant.n + plant.nr))
    return z[:, :plant.n], z[:, plant.n:]


def test_config_is_checked():
    for bad in ({"references": ()}, {"references": (1.5,)}, {"u_limit": 1.2}, {"u_limit": 0.0},
                {"gain_q": -1.0}, {"malicious_duty": 1.5}, {"switch_period_s": float("nan")}):
        with pytest.raises(ValueError):
            ExpertConfig(**bad)


def test_malicious_schedule():
    cfg = ExpertConfig(malicious=True, malicious_period_s=20.0, malicious_duty=0.5)
    assert [is_malicious(t, cfg) for t in (0.0, 9.9, 10.0, 19.9, 20.0, 30.0)] == [False, False, True, True, False,
                                                                                     True]
    assert not is_malicious(15.0, ExpertConfig())


def test_reference_schedule_is_fractions_of_the_reference_box():
    plant = load_plant("double_integrator_2axis")         # r box ±0.5 per axis
    cfg = ExpertConfig(references=(1.0, -0.5, 0.0), switch_period_s=2.0)
    assert np.allclose(reference_at(0.0, cfg, plant), [0.5, -0.25])
    assert np.allclose(reference_at(2.5, cfg, plant), [-0.25, 0.0])   # axis 1 runs one entry ahead
    assert Expert(load_plant("cart_pole")).reference_at(3.0).shape == (0,)


@pytest.mark.parametrize("name", shipped_plants())
def test_clean_expert_of_every_shipped_plant(name):
    plant = load_plant(name)
    expert = Expert(plant)
    x, r = region_points(plant, 256)
    u = expert.action(x, r, False)
    assert u.shape == (256, plant.m)
    # within u_limit of the input set around u_ss: inside the box with room
    u_ss = plant.equilibrium(r)[1] if plant.nr else np.zeros(plant.m)
    assert np.all(u <= u_ss + 0.9 * (plant.u_max - u_ss) + 1e-12)
    assert np.all(u >= u_ss + 0.9 * (plant.u_min - u_ss) - 1e-12)
    # faster than the backup: its gain is larger
    assert np.linalg.norm(expert.lqr.K) > np.linalg.norm(LQRBackup(plant).K)
    # at the equilibrium of its reference the expert holds it
    if plant.linear:
        x_ss, u_ss = plant.equilibrium(r)
        assert np.allclose(expert.action(x_ss, r, False), u_ss, atol=1e-9)


@pytest.mark.parametrize("name", ["double_integrator", "mass_spring_damper", "dc_motor", "cart_pole"])
def test_malicious_expert_drives_out_of_the_limits(name):
    # closed loop under the malicious demonstrations: some state or input constraint breaks
    plant = load_plant(name)
    expert = Expert(plant, ExpertConfig(malicious=True))
    x, r = region_points(plant, 64, seed=1)
    broke = np.zeros(len(x), dtype=bool)
    for _ in range(int(5.0 / plant.dt)):
        u = expert.action(x, r, True)
        broke |= np.any(list(plant.violations(x, u).values()), axis=0)
        x = plant.step(x, u)
    assert broke.mean() > 0.9


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), g_rows=st.integers(0, 2))
def test_clean_expert_respects_the_input_set_of_random_plants(seed, g_rows):
    plant = random_plant(seed, g_rows=g_rows)
    expert = Expert(plant)
    x, r = region_points(plant, 128, seed)
    x = x * 3.0                                  # far states, where the LQR alone would saturate
    u = expert.action(x, r, False)
    _, u_ss = plant.equilibrium(r)
    lim = expert.cfg.u_limit
    assert np.all(u <= u_ss + lim * (plant.u_max - u_ss) + 1e-9)
    assert np.all(u >= u_ss + lim * (plant.u_min - u_ss) - 1e-9)
    if g_rows:
        assert np.all(u @ plant.G.T <= u_ss @ plant.G.T + lim * (plant.g - u_ss @ plant.G.T) + 1e-9)
    # functional form == method; a single state works like a batch
    assert np.allclose(expert_action(x[0], r[0], False, expert), u[0])


def test_unclipped_direction_is_kept_under_the_polytope():
    # scaling towards u_ss keeps the direction of the LQR action (no distortion by G)
    plant = random_plant(3, m=2, g_rows=2)
    expert = Expert(plant)
    x, r = region_points(plant, 64, 3)
    raw = np.clip(expert.lqr(x * 3.0, r), *(plant.equilibrium(r)[1] + 0.9 * (b - plant.equilibrium(r)[1])
                                             for b in (plant.u_min, plant.u_max)))
    u = expert.action(x * 3.0, r, False)
    _, u_ss = plant.equilibrium(r)
    d_raw, d = raw - u_ss, u - u_ss
    cross = d_raw[:, 0] * d[:, 1] - d_raw[:, 1] * d[:, 0]
    assert np.allclose(cross, 0.0, atol=1e-9)
