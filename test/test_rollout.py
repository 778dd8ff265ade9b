"""The rollout engine (``rollout.py``): batched closed-loop rollouts against a float64 reference,
the safety metrics, and the samplers of the certified region."""
import numpy as np
import pytest
import torch

from scpo_ros.backup import InitialSet, LQRBackup
from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.envs import VecDoubleIntegrator
from scpo_ros.policy import MLPLayout, ResidualMLP
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
