"""The vectorised environments (``envs.py``): the double integrator's and the pendulum's steps,
rewards, costs and resets, and the backup as a linear gain on their observations."""
import math

import numpy as np
import pytest
import torch

from scpo_ros.backup import LQRBackup
from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.envs import VecDoubleIntegrator, VecPendulum, make_env


def test_double_integrator_env_steps_all_envs_resets_and_costs():
    system = DoubleIntegrator(v_max=0.5)
    env = VecDoubleIntegrator(5, system=system, episode_length=3, seed=0)
    obs = env.reset()
    assert obs.shape == (5, 3)
    s = env.initial_set
    assert (obs[:, 0].abs() <= s.p0_max).all() and (obs[:, 1].abs() <= s.v0_max).all()
    assert (obs[:, 2].abs() <= s.r_max).all()
    x0 = torch.tensor([[0.0, 0.0], [0.0, 0.49], [0.99, 0.5], [0.0, 0.0], [0.0, 0.0]])
    r = torch.tensor([[0.5], [0.0], [0.0], [-0.5], [0.0]])
    obs = env.set_episodes(x0, r)
    u = torch.tensor([[5.0], [1.0], [0.0], [float("nan")], [-1.0]])   # 5 is clipped to 1, NaN to 0
    st = env.step(u)
    x1 = system.step(x0.numpy().astype(np.float64), np.array([[1.0], [1.0], [0.0], [0.0], [-1.0]]))
    assert np.allclose(st.obs[:, :2].numpy(), x1, atol=1e-6)
    assert st.cost.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]       # v > 0.5, then p > 1
    err = x1[:, 0] - r[:, 0].numpy()
    expected_reward = -(err**2 + 0.1 * np.array([1.0, 1.0, 0.0, 0.0, 1.0])) * system.dt
    assert np.allclose(st.reward.numpy(), expected_reward, atol=1e-6)
    assert not st.truncated.any() and not st.terminated.any()
    env.step(torch.zeros(5, 1))
    last = env.step(torch.zeros(5, 1))
    assert last.truncated.all(), "episode_length = 3 steps"
    assert torch.equal(last.final_obs[:, 2:], r), "final_obs is the finished episode's"
    assert (env.t == 0).all() and (last.obs[:, 0].abs() <= s.p0_max).all(), "reset into the initial set"


def test_backup_gain_reproduces_the_lqr_backup():
    system = DoubleIntegrator(dof=2)
    env = VecDoubleIntegrator(7, system=system, seed=3)
    backup = LQRBackup(system)
    obs = env.reset()
    W = env.backup_gain(backup)
    x, r = obs[:, :4].double().numpy(), obs[:, 4:].double().numpy()
    assert np.allclose((obs @ W.T).numpy(), backup(x, r), atol=1e-5)


def test_pendulum_env_reward_and_speed_cost():
    env = VecPendulum(3, seed=0)
    obs = env.reset()
    assert obs.shape == (3, 2) and (obs[:, 0].abs() <= math.pi / 2).all()
    env.x = torch.tensor([[0.1, 0.0], [0.0, 7.9], [0.0, -7.9]])
    st = env.step(torch.tensor([[0.5], [1.0], [0.0]]))
    expected = -(torch.tensor([0.01, 0.0, 0.0]) + 0.1 * torch.tensor([0.0, 7.9**2, 7.9**2])
                 + 0.001 * torch.tensor([0.25, 1.0, 0.0]))
    assert torch.allclose(st.reward, expected)
    assert st.cost.tolist() == [0.0, 1.0, 0.0], "only the pushed pendulum exceeds |θ'| = 8"
    K = env.backup_gain()
    assert K.shape == (1, 2)
    A, B = Pendulum().linearization()
    assert np.max(np.abs(np.linalg.eigvals(A + B @ K.double().numpy()))) < 1.0, "the pendulum LQR stabilises"
    with pytest.raises(ValueError):
        make_env("cartpole", 2)
