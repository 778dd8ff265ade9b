"""Plant, backup, policy and rollout engine: the pieces SCPO stands on."""
import numpy as np
import pytest
import torch

from scpo_ros.backup import BackupCertificationError, InitialSet, LQRBackup
from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.envs import VecDoubleIntegrator
from scpo_ros.policy import MLPLayout, NumpyMLP, ResidualMLP, WeightsRejected, check_weights
from scpo_ros.rollout import (
    DoubleIntegratorRollout,
    SafetySpec,
    random_states,
    region_bounds,
    state_set,
    structured_states,
)
from scpo_ros.safeguard.invariant_set import safe_set_for


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


@pytest.mark.parametrize("dof", [1, 2])
def test_batched_rollout_matches_a_float64_reference_simulation(dof):
    sys_ = DoubleIntegrator(dof=dof)
    backup = LQRBackup(sys_)
    layout = MLPLayout(3 * dof, dof, (16, 16))
    spec = SafetySpec(horizon=40)
    engine = DoubleIntegratorRollout(sys_, backup, layout, spec)
    gen = torch.Generator().manual_seed(0)
    params = layout.initial_parameters(0).unsqueeze(0) + 0.1 * torch.randn(3, layout.size, generator=gen)
    x0, r = random_states(InitialSet(), dof, 20, np.random.default_rng(0))
    res = engine.evaluate(params, x0, r, per_state=True, with_cost=True)
    assert res.g.shape == (3, 5) and res.g_per_state.shape == (3, 20, 5) and res.cost.shape == (3,)
    E, G, f = (torch.as_tensor(a, dtype=torch.float64) for a in safe_set_for(sys_, late_commands=1).affine_rows())

    P = torch.as_tensor(backup.P)

    def V(e):
        return ((e @ P) * e).sum(-1)

    for i in range(3):
        model = ResidualMLP(layout).double()
        model.load_flat(params[i])
        model.double()
        x = torch.as_tensor(x0, dtype=torch.float64)
        rt = torch.as_tensor(r, dtype=torch.float64)
        ref = torch.cat([rt, torch.zeros_like(rt)], -1)
        worst = torch.full((5,), -np.inf, dtype=torch.float64)
        cost = torch.zeros(len(x0), dtype=torch.float64)
        a, eps = spec.lyap_alpha, spec.lyap_eps
        for _ in range(spec.horizon):
            with torch.no_grad():
                u = backup(x, rt) + model(torch.cat([x, rt], -1))
            nxt = sys_.step(x, u)
            e, en = x - ref, nxt - ref
            lyap = torch.minimum(V(en) - (1 - a) * V(e), V(en) - eps)
            cost += ((e[:, :dof] ** 2).sum(-1) + spec.cost_action_weight * (u ** 2).sum(-1)) * sys_.dt
            safe = (x @ E.T + u @ G.T - f).max()     # u must stay in U_safe(x) of the envelope's set
            worst = torch.maximum(worst, torch.stack([
                x[:, :dof].abs().max() - 1, x[:, dof:].abs().max() - 1, u.abs().max() - 1, lyap.max(), safe]))
            x = nxt
        worst[0] = max(worst[0], x[:, :dof].abs().max() - 1)
        worst[1] = max(worst[1], x[:, dof:].abs().max() - 1)
        np.testing.assert_allclose(res.g[i].double().numpy(), worst.numpy(), atol=2e-4)
        np.testing.assert_allclose(float(res.cost[i]), float(cost.mean()), rtol=1e-4)


def test_zero_residual_is_safe_and_metrics_see_violations():
    sys_ = DoubleIntegrator()
    backup = LQRBackup(sys_)
    layout = MLPLayout(3, 1, (8,))
    engine = DoubleIntegratorRollout(sys_, backup, layout)
    x0, r = structured_states(InitialSet(), 1, max_points=64)
    g = engine.evaluate(layout.initial_parameters(0), x0, r).g[0]
    assert torch.all(g < 0)
    # a constant push of +0.8 breaks actuation, position and the Lyapunov condition
    flat = layout.initial_parameters(0).clone()
    flat[-1] = 0.8
    g_bad = engine.evaluate(flat, x0, r).g[0]
    assert g_bad[0] > 0 and g_bad[2] > 0 and g_bad[3] > 0 and g_bad[4] > 0


def test_structured_states_hold_the_box_vertices():
    iset = InitialSet(0.8, 0.2, 0.5)
    x, r = structured_states(iset, 2, max_points=200)
    pts = np.concatenate([x[:, :2], x[:, 2:], r], 1)
    vertices = np.array(iset.vertices(2)[0])
    assert len(pts) <= 200 and np.all(iset.contains(x, r, 2, slack=1e-12))
    for v_x, v_r in zip(*iset.vertices(2)):
        assert np.any(np.all(np.isclose(pts, np.concatenate([v_x[:2], v_x[2:], v_r])), axis=1))
    assert len(vertices) == 64


def test_every_sampler_of_initial_conditions_covers_the_same_box():
    """``region_bounds`` is the box: the rollouts' samplers and the RL env's episodes fill it."""
    iset, dof = InitialSet(p0_max=0.7, v0_max=0.3, r_max=0.4), 2
    bounds = region_bounds(iset, dof)
    np.testing.assert_array_equal(bounds, [0.7, 0.7, 0.3, 0.3, 0.4, 0.4])
    x, r = random_states(iset, dof, 4000, np.random.default_rng(0))
    pts = np.concatenate([x, r], 1)
    assert np.all(np.abs(pts) <= bounds) and np.all(np.abs(pts).max(0) > 0.95 * bounds)
    xs, rs = state_set(iset, dof, 300, np.random.default_rng(1))
    assert len(xs) == len(rs) == 300 and iset.contains(xs, rs, dof).all()
    env = VecDoubleIntegrator(4000, DoubleIntegrator(dof=dof), iset, seed=0)
    obs = env.reset().double().numpy()
    assert np.all(np.abs(obs) <= bounds + 1e-6) and np.all(np.abs(obs).max(0) > 0.95 * bounds)
