"""The forms of φ_θ (policy.py) and the folded control law agree with the module."""
import numpy as np
import pytest
import torch

from scpo_ros.backup import LQRBackup
from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.policy import MLPLayout, NumpyMLP, ResidualMLP, fold_residual_policy, policy_inputs


def _evaluate_folded(mats, z, d):
    """Reference evaluation of ``fold_residual_policy``'s contract."""
    h = np.append(z, 1.0)
    for M in mats[:-1]:
        h = M @ h
        h[:h.size - 1 - d] = np.tanh(h[:h.size - 1 - d])
    return mats[-1] @ h


def test_numpy_form_takes_batches_and_matches_the_module():
    layout = MLPLayout(6, 2, (16, 8))
    model = ResidualMLP(layout, seed=2)
    flat = model.flat().detach() + 0.3 * torch.randn(layout.size, generator=torch.Generator().manual_seed(1))
    model.load_flat(flat)
    x = torch.randn(5, 6, dtype=torch.float64)
    ref = model.double()(x).detach().numpy()
    np.testing.assert_allclose(NumpyMLP(layout, flat.numpy())(x.numpy()), ref, atol=1e-12)


@pytest.mark.parametrize("dof,hidden", [(1, (16, 8)), (2, (8,)), (1, ()), (2, (4, 4, 4))])
def test_folded_law_is_backup_plus_mlp(dof, hidden):
    backup = LQRBackup(DoubleIntegrator(dof=dof))
    layout = MLPLayout(3 * dof, dof, hidden)
    rng = np.random.default_rng(dof)
    theta = rng.standard_normal(layout.size) * 0.3
    mats, alone = fold_residual_policy(backup.input_gain(), layout, theta), \
        fold_residual_policy(backup.input_gain(), layout, None)
    assert len(alone) == 1 and (len(mats) == 1) == (not hidden)
    mlp = NumpyMLP(layout, theta)
    for _ in range(20):
        x, r = rng.uniform(-1, 1, 2 * dof), rng.uniform(-0.5, 0.5, dof)
        z = policy_inputs(x, r)
        np.testing.assert_allclose(_evaluate_folded(mats, z, dof), backup(x, r) + mlp(z), atol=1e-12)
        np.testing.assert_allclose(_evaluate_folded(alone, z, dof), backup(x, r), atol=1e-12)
