"""scpo_ros.envs: the vectorised C-TRPO environment of any plant."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plant_strategies import random_plant
from scpo_ros.backup import LQRBackup
from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.envs import VecDoubleIntegrator, VecPendulum, VecPlantEnv, make_env
from scpo_ros.plant import load_plant


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), affine=st.booleans(), g_rows=st.integers(0, 1))
def test_step_is_the_plant_under_the_backup_plus_residual(seed, affine, g_rows):
    # the policy mean base_gain·obs (+ the env's offset) is exactly the backup: the env's
    # action convention matches the residual law that SCPO certifies
    plant = random_plant(seed, affine=affine, g_rows=g_rows)
    env = VecPlantEnv(plant, 16, seed=seed, dtype=torch.float64, episode_length=1000)
    backup = LQRBackup(plant)
    obs = env.reset()
    assert obs.shape == (16, plant.n + plant.nr)
    lo, hi = torch.as_tensor(plant.region.lower), torch.as_tensor(plant.region.upper)
    assert bool(((obs >= lo - 1e-12) & (obs <= hi + 1e-12)).all())
    W = env.backup_gain()
    x, r = obs[:, :plant.n].numpy(), obs[:, plant.n:].numpy()
    u_backup = backup(x, r)
    res = env.step(obs @ W.T)
    expected = plant.step(x, np.clip(u_backup, plant.u_min, plant.u_max))
    assert np.allclose(env.x.numpy(), expected, atol=1e-9)
    assert res.reward.shape == (16,) and bool((res.reward <= 0).all())


@pytest.mark.parametrize("name", ["double_integrator", "dc_motor", "cart_pole", "coupled_two_input", "pendulum"])
def test_shipped_plants_run_and_clip(name):
    env = make_env(name, 8, seed=0)
    obs = env.reset()
    res = env.step(torch.full((8, env.act_dim), 1e6))          # far beyond the input box
    assert torch.allclose(env.x, torch.as_tensor(
        env.plant.step(obs[:, :env.plant.n].double().numpy(), np.broadcast_to(env.plant.u_max, (8, env.plant.m))),
        dtype=env.dtype), atol=1e-4)
    assert res.cost.shape == (8,) and res.obs.shape == (8, env.obs_dim)
    env.step(torch.full((8, env.act_dim), float("nan")))       # NaN reads as 0, never poisons the state
    assert bool(torch.isfinite(env.x).all())


def test_cost_counts_state_rows_of_the_next_state():
    env = make_env("double_integrator", 2, seed=0, episode_length=500)
    env.set_episodes(torch.tensor([[0.99, 1.0], [0.0, 0.0]]), torch.zeros(2, 1))
    res = env.step(torch.tensor([[1.0], [0.0]]))
    assert res.cost.tolist() == [1.0, 0.0]


def test_auto_reset_and_final_obs():
    env = make_env("mass_spring_damper", 4, seed=3, episode_length=3)
    obs = env.reset()
    for _ in range(2):
        res = env.step(torch.zeros(4, 1))
        assert not bool(res.truncated.any())
    res = env.step(torch.zeros(4, 1))
    assert bool(res.truncated.all())
    assert not torch.equal(res.final_obs, res.obs)          # the finished episodes' last observation
    assert bool((env.t == 0).all())
    del obs


def test_seed_decides_the_episodes_across_dtypes():
    a = VecPlantEnv(load_plant("dc_motor"), 5, seed=7, dtype=torch.float32).reset()
    b = VecPlantEnv(load_plant("dc_motor"), 5, seed=7, dtype=torch.float64).reset()
    assert torch.allclose(a.double(), b, atol=1e-5)
    c = VecPlantEnv(load_plant("dc_motor"), 5, seed=8).reset()
    assert not torch.allclose(a, c)


def test_parameter_era_envs():
    env = VecDoubleIntegrator(4, DoubleIntegrator(dof=2, u_max=0.5))
    assert (env.obs_dim, env.act_dim, env.action_limit) == (6, 2, 0.5)
    assert env.backup_gain().shape == (2, 6)

    class OldRegion:                                        # the parameter era's field names
        p0_max, v0_max, r_max = 0.3, 0.1, 0.2
    env = VecDoubleIntegrator(64, DoubleIntegrator(), OldRegion())
    assert float(env.x[:, 0].abs().max()) <= 0.3 and float(env.r.abs().max()) <= 0.2
    assert env.plant.region.x_max.tolist() == [0.3, 0.1] and env.plant.region.r_max.tolist() == [0.2]

    class WideRegion:                                       # beyond the limits: shrunk into them, not refused
        p0_max, v0_max, r_max = 5.0, 3.0, 2.0
    wide = VecDoubleIntegrator(64, DoubleIntegrator(p_max=0.5, v_max=0.4), WideRegion())
    assert wide.plant.region.x_max.tolist() == [0.5, 0.4] and wide.plant.region.r_max.tolist() == [0.5]
    assert float(wide.x[:, 0].abs().max()) <= 0.5 and float(wide.x[:, 1].abs().max()) <= 0.4
    # no region: the shipped file's certified region
    from scpo_ros.plant import load_plant as load
    default = VecDoubleIntegrator(4).plant
    assert default.region.x_max.tolist() == load("double_integrator").region.x_max.tolist()
    pend = VecPendulum(8, theta0_max=0.5, omega0_max=0.2)
    assert (pend.obs_dim, pend.act_dim) == (2, 1)
    assert float(pend.x[:, 0].abs().max()) <= 0.5
    res = pend.step(torch.zeros(8, 1))
    assert bool((res.reward <= 0).all())
    with pytest.raises(ValueError):
        VecPendulum(2, theta0_max=4.0)


def test_bad_arguments():
    plant = load_plant("double_integrator")
    for kwargs in ({"num_envs": 0}, {"episode_length": 0}, {"action_weight": math.nan}):
        args = {"num_envs": 2, **kwargs}
        with pytest.raises(ValueError):
            VecPlantEnv(plant, args.pop("num_envs"), **args)
