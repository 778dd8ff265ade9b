"""φ_θ (``policy.py``): the flat layout, its fingerprint and the weight checks; the forms of φ_θ
and the folded control law agree with the module."""
import numpy as np
import pytest
import torch

from scpo_ros.backup import LQRBackup
from scpo_ros.plant import double_integrator_plant
from scpo_ros.policy import (
    MLPLayout,
    NumpyMLP,
    ResidualMLP,
    WeightsRejected,
    check_weights,
    fold_residual_policy,
    policy_inputs,
)


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
    backup = LQRBackup(double_integrator_plant(dof))
    layout = MLPLayout(3 * dof, dof, hidden)
    rng = np.random.default_rng(dof)
    theta = rng.standard_normal(layout.size) * 0.3
    gain = backup.input_gain()
    assert gain.shape == (dof, 3 * dof + 1) and np.all(gain[:, -1] == 0.0)   # no affine term: u_ss(0) = 0
    mats, alone = fold_residual_policy(gain[:, :-1], layout, theta), fold_residual_policy(gain[:, :-1], layout, None)
    assert len(alone) == 1 and (len(mats) == 1) == (not hidden)
    mlp = NumpyMLP(layout, theta)
    for _ in range(20):
        x, r = rng.uniform(-1, 1, 2 * dof), rng.uniform(-0.5, 0.5, dof)
        z = policy_inputs(x, r)
        np.testing.assert_allclose(_evaluate_folded(mats, z, dof), backup(x, r) + mlp(z), atol=1e-12)
        np.testing.assert_allclose(_evaluate_folded(alone, z, dof), backup(x, r), atol=1e-12)


def test_flat_roundtrip_fingerprint_and_weight_checks():
    layout = MLPLayout(3, 1, (16, 8))
    model = ResidualMLP(layout, seed=3)
    flat = model.flat().detach()
    assert flat.numel() == layout.size == 3 * 16 + 16 + 16 * 8 + 8 + 8 + 1
    # the last layer starts at zero: the residual policy is the backup
    assert torch.all(model(torch.randn(10, 3)) == 0)
    perturbed = flat + torch.randn_like(flat)
    model.load_flat(perturbed)
    torch.testing.assert_close(model.flat().detach(), perturbed)
    other = MLPLayout(3, 1, (6, 23))  # same number of weights, another network
    assert other.size == layout.size and other.fingerprint != layout.fingerprint
    assert MLPLayout(3, 1, (16, 8)).fingerprint == layout.fingerprint
    check_weights(layout, perturbed.numpy(), layout.fingerprint)
    with pytest.raises(WeightsRejected, match="fingerprint"):
        check_weights(layout, perturbed.numpy(), other.fingerprint)
    with pytest.raises(WeightsRejected, match="expected"):
        check_weights(layout, np.zeros(layout.size + 1))
    bad = perturbed.numpy().copy()
    bad[5] = np.nan
    with pytest.raises(WeightsRejected, match="NaN"):
        check_weights(layout, bad)
    bad[5] = np.inf
    with pytest.raises(WeightsRejected, match="NaN or Inf"):
        check_weights(layout, bad)


def test_three_evaluations_of_the_mlp_agree():
    layout = MLPLayout(6, 2, (32, 32))
    model = ResidualMLP(layout, seed=1)
    flat = model.flat().detach() + 0.3 * torch.randn(layout.size, generator=torch.Generator().manual_seed(0))
    model.load_flat(flat)
    x = torch.randn(7, 6)
    ref = model(x).detach()
    batched = layout.batched_forward(flat.unsqueeze(0).repeat(3, 1), x.unsqueeze(0).repeat(3, 1, 1))
    torch.testing.assert_close(batched[1], ref)
    np_mlp = NumpyMLP(layout, flat.numpy())
    np.testing.assert_allclose(np_mlp(x[2].double().numpy()), ref[2].numpy(), atol=1e-5)
