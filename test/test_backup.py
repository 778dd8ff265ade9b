"""The backup's matrix forms are its action."""
import numpy as np
import pytest
import torch

from scpo_ros.backup import LQRBackup, PendulumLQR, dlqr
from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.policy import policy_inputs


@pytest.mark.parametrize("dof", [1, 2])
def test_input_gain_is_the_backup_action(dof):
    backup = LQRBackup(DoubleIntegrator(dof=dof))
    rng = np.random.default_rng(0)
    x, r = rng.uniform(-1, 1, (50, 2 * dof)), rng.uniform(-0.5, 0.5, (50, dof))
    np.testing.assert_allclose(policy_inputs(x, r) @ backup.input_gain().T, backup(x, r), atol=1e-14)
    xt, rt = torch.as_tensor(x), torch.as_tensor(r)
    np.testing.assert_allclose(backup(xt, rt).numpy(), backup(x, r), atol=1e-14)


def test_pendulum_lqr_is_the_upright_dlqr():
    system = Pendulum()
    lqr = PendulumLQR(system, q_pos=1.0, q_vel=1.0, r_act=10.0)
    K, _ = dlqr(*system.linearization(), np.diag([1.0, 1.0]), np.array([[10.0]]))
    x = np.random.default_rng(1).uniform(-1, 1, (20, 2))
    for xi in x:
        assert np.array_equal(lqr(xi), -K @ xi)
    np.testing.assert_allclose(lqr(torch.as_tensor(x)).numpy(), x @ lqr.input_gain().T, atol=1e-14)
    with pytest.raises(ValueError):
        PendulumLQR(system, r_act=0.0)
