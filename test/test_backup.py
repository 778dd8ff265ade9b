"""The backup (``backup.py``): its certificate on the initial set, and its matrix forms are its action."""
import numpy as np
import pytest
import torch

from scpo_ros.backup import BackupCertificationError, InitialSet, LQRBackup, PendulumLQR, dlqr
from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.policy import policy_inputs
from scpo_ros.rollout import random_states


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


@pytest.mark.parametrize("dof", [1, 2])
def test_backup_is_certified_on_default_set_and_worst_case_is_exact(dof):
    sys_ = DoubleIntegrator(dof=dof)
    backup = LQRBackup(sys_)
    worst = backup.certify(InitialSet())
    assert worst["spectral_radius"] < 1.0
    assert worst["p"] <= 1.0 and worst["u"] <= 1.0
    # random initial conditions never exceed the vertex worst case (linearity)
    rng = np.random.default_rng(0)
    x, r = random_states(InitialSet(), dof, 2000, rng)
    e = x - np.concatenate([r, 0 * r], 1)
    for _ in range(300):
        u = -e @ backup.K.T
        assert np.abs(u).max() <= worst["u"] + 1e-9
        assert np.abs(e[:, :dof] + r).max() <= worst["p"] + 1e-9
        e = e @ backup.A_cl.T


def test_backup_refuses_an_initial_set_it_cannot_keep_safe():
    sys_ = DoubleIntegrator()
    with pytest.raises(BackupCertificationError, match="cannot keep"):
        LQRBackup(sys_).certify(InitialSet(p0_max=0.8, v0_max=0.6, r_max=0.5))
    with pytest.raises(BackupCertificationError, match="actuation|max\\|u\\|"):
        LQRBackup(sys_, r_act=0.1).certify(InitialSet())
