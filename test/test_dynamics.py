"""The plants (``dynamics.py``): the double integrator's step and its checks, the per-constraint
violation check."""
import numpy as np
import pytest
import torch

from scpo_ros.dynamics import DoubleIntegrator


def test_violations_name_each_broken_box_and_violation_is_their_union():
    s = DoubleIntegrator(dof=2)
    x = np.array([[0.0, 0.0, 0.0, 0.0], [1.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.2], [1.0, -1.0, 1.0, 1.0]])
    u = np.array([[0.0, 1.5], [0.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    v = s.violations(x, u)
    assert v["position"].tolist() == [False, True, False, False]
    assert v["velocity"].tolist() == [False, False, True, False]
    assert v["actuation"].tolist() == [True, False, False, False]
    assert s.violation(x, u).tolist() == [True, True, True, False]
    assert set(s.violations(x)) == {"position", "velocity"}
    assert s.violation(torch.as_tensor(x)).tolist() == [False, True, True, False]
    assert s.violations(x[3], u[3], tol=0.0) == {"position": False, "velocity": False, "actuation": False}


@pytest.mark.parametrize("dof", [1, 2])
def test_double_integrator_step_matches_kinematics(dof):
    sys_ = DoubleIntegrator(dof=dof, dt=0.1)
    rng = np.random.default_rng(0)
    x, u = rng.normal(size=(5, 2 * dof)), rng.normal(size=(5, dof))
    nxt = sys_.step(x, u)
    p, v = x[:, :dof], x[:, dof:]
    np.testing.assert_allclose(nxt[:, :dof], p + 0.1 * v + 0.005 * u)
    np.testing.assert_allclose(nxt[:, dof:], v + 0.1 * u)
    # torch path gives the same numbers
    nxt_t = sys_.step(torch.as_tensor(x), torch.as_tensor(u))
    np.testing.assert_allclose(nxt_t.numpy(), nxt)


def test_double_integrator_rejects_bad_config_and_noise_is_on_velocity():
    with pytest.raises(ValueError):
        DoubleIntegrator(dof=0)
    with pytest.raises(ValueError):
        DoubleIntegrator(u_max=float("nan"))
    noisy = DoubleIntegrator(noise_std=1.0)
    x = np.zeros((1000, 2))
    nxt = noisy.step(x, np.zeros((1000, 1)), np.random.default_rng(1))
    assert np.all(nxt[:, 0] == 0.0) and nxt[:, 1].std() > 0.01
