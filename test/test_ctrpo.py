"""C-TRPO, TRPO-Lagrangian and TRPO (``ctrpo.py``, no ROS needed)."""
import math

import numpy as np
import pytest
import torch

from scpo_ros.backup import LQRBackup
from scpo_ros.ctrpo import (
    Batch,
    Collector,
    CTRPOConfig,
    CTRPOLearner,
    Hysteresis,
    RolloutBuffer,
    backtracking_line_search,
    barrier_term,
    conjugate_gradient,
    evaluate_policy,
    gae,
    gaussian_log_prob,
    train,
)
from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.envs import VecDoubleIntegrator
from scpo_ros.policy import NumpyMLP, policy_inputs

torch.set_num_threads(1)


# ---------------------------------------------------------------- the constrained divergence

@pytest.mark.parametrize("form", ["entropy", "barrier"])
def test_barrier_term_finite_inside_infinite_at_and_beyond_the_boundary(form):
    delta_b = 0.5
    inside = torch.tensor([-3.0, -0.2, 0.0, 0.2, 0.49, 0.4999])
    values = torch.stack([barrier_term(a, delta_b, form) for a in inside])
    assert torch.isfinite(values).all()
    assert (values >= -1e-7).all(), "a Bregman divergence is non-negative"
    assert float(barrier_term(torch.tensor(0.0), delta_b, form)) == 0.0
    # Grows without bound towards the boundary ...
    near, further = barrier_term(torch.tensor(0.4999), delta_b, form), barrier_term(torch.tensor(0.4), delta_b, form)
    assert float(near) > float(further)
    # ... and is +inf at and beyond it, and everywhere when no budget is left.
    for a in (0.5, 0.5001, 3.0):
        assert barrier_term(torch.tensor(a), delta_b, form) == math.inf
    for budget in (0.0, -1.0):
        assert barrier_term(torch.tensor(-1.0), budget, form) == math.inf


@pytest.mark.parametrize("form,phi2", [("entropy", lambda d: 1.0 / d), ("barrier", lambda d: 1.0 / d**2)])
def test_barrier_term_is_the_bregman_term_of_phi(form, phi2):
    """Zero slope at α = 0 and curvature φ''(δ_b): the term the CG matrix adds to the Fisher."""
    delta_b = 0.7
    a = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(barrier_term(a, delta_b, form), a, create_graph=True)
    (h,) = torch.autograd.grad(g, a)
    assert abs(float(g.detach())) < 1e-12
    assert float(h) == pytest.approx(phi2(delta_b), rel=1e-9)
    # Against the definition φ(δ_b - α) - φ(δ_b) + φ'(δ_b) α at a finite α.
    phi = {"entropy": lambda x: x * math.log(x), "barrier": lambda x: -math.log(x)}[form]
    dphi = {"entropy": lambda x: math.log(x) + 1.0, "barrier": lambda x: -1.0 / x}[form]
    alpha = 0.3
    expected = phi(delta_b - alpha) - phi(delta_b) + dphi(delta_b) * alpha
    assert float(barrier_term(torch.tensor(alpha, dtype=torch.float64), delta_b, form)) == pytest.approx(expected)


def test_line_search_never_accepts_an_infinite_divergence():
    # The full step and the next two shrinks cross the boundary (D = +inf) although they
    # would improve the loss most; the first finite trial within the bound is taken.
    trials = []

    def evaluate(frac):
        trials.append(frac)
        return -frac, (math.inf if frac > 0.6 else 0.5 * frac)

    res = backtracking_line_search(evaluate, loss_before=0.0, max_divergence=0.4, steps=15, decay=0.8)
    assert res.accepted_at == 4 and res.step_fraction == pytest.approx(0.8**3)
    assert math.isfinite(res.divergence) and res.divergence <= 0.4
    assert trials[:3] == pytest.approx([1.0, 0.8, 0.64])

    # Never finite -> no step at all.
    res = backtracking_line_search(lambda f: (-f, math.inf), 0.0, 0.4, steps=15, decay=0.8)
    assert res.accepted_at == 0 and res.step_fraction == 0.0
    # A worse loss or a NaN loss is not accepted either.
    assert backtracking_line_search(lambda f: (1.0, 0.0), 0.0, 0.4, steps=5).step_fraction == 0.0
    assert backtracking_line_search(lambda f: (math.nan, 0.0), 0.0, 0.4, steps=5).step_fraction == 0.0


def _risky_batch(n=2048, seed=0):
    """A batch where raising the reward means raising the cost: A_c is proportional to A_r."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 3, generator=g)
    act = 0.6 * torch.randn(n, 1, generator=g)
    adv_r = act[:, 0] + 0.1 * torch.randn(n, generator=g)
    return obs, act, adv_r, 5.0 * adv_r


def test_ctrpo_update_stays_inside_the_cost_budget_where_trpo_does_not():
    """With 0.05 of cost budget left, the accepted C-TRPO step keeps the cost surrogate
    below δ_b; plain TRPO on the same data predicts a cost increase beyond it."""
    obs, act, adv_r, adv_c = _risky_batch()
    predicted = {}
    for algorithm in ("c_trpo", "trpo"):
        cfg = CTRPOConfig(algorithm=algorithm, cost_limit=1.0, hidden=(16, 16), critic_epochs=0)
        learner = CTRPOLearner(3, 1, cfg, seed=0)
        with torch.no_grad():
            mu, log_std = learner.policy(obs)
            logp = gaussian_log_prob(mu, log_std, act)
        batch = Batch(obs, act, logp, adv_r, adv_c, torch.zeros(len(obs)), torch.zeros(len(obs)))
        info = learner.update(batch, episode_costs=[0.95])
        assert not info["recovering"]
        assert info["accepted_at"] >= 1, "some step must be accepted"
        assert math.isfinite(info["divergence"]) and info["divergence"] <= cfg.target_kl + 1e-9
        with torch.no_grad():
            mu, log_std = learner.policy(obs)
            ratio = torch.exp(gaussian_log_prob(mu, log_std, act) - logp)
            centred = adv_c - adv_c.mean()
            predicted[algorithm] = float(((ratio - 1) * centred).mean() / (1 - cfg.gamma))
    budget = 1.0 - 0.95
    assert predicted["c_trpo"] < budget
    assert predicted["trpo"] > budget
    assert predicted["c_trpo"] > 0.0, "C-TRPO still improves the reward (and so uses some budget)"


# ---------------------------------------------------------------- hysteresis, CG, GAE

def test_hysteresis_switches_at_b_and_back_at_b_h():
    h = Hysteresis(cost_limit=10.0, fraction=0.8)
    assert h.recovery_threshold == pytest.approx(8.0)
    seq = [(5.0, False), (9.99, False), (10.0, True), (12.0, True), (9.0, True), (8.0, True),
           (7.99, False), (9.5, False), (10.5, True), (3.0, False)]
    for cost, recovering in seq:
        assert h.update(cost) is recovering, f"at J_c = {cost}"


def test_ctrpo_learner_enters_recovery_and_minimises_cost():
    obs, act, adv_r, adv_c = _risky_batch()
    cfg = CTRPOConfig(algorithm="c_trpo", cost_limit=1.0, hidden=(16, 16), critic_epochs=0)
    learner = CTRPOLearner(3, 1, cfg, seed=0)
    with torch.no_grad():
        mu, log_std = learner.policy(obs)
        logp = gaussian_log_prob(mu, log_std, act)
    batch = Batch(obs, act, logp, adv_r, adv_c, torch.zeros(len(obs)), torch.zeros(len(obs)))
    info = learner.update(batch, episode_costs=[1.5])
    assert info["recovering"] and info["accepted_at"] >= 1
    with torch.no_grad():
        mu, log_std = learner.policy(obs)
        ratio = torch.exp(gaussian_log_prob(mu, log_std, act) - logp)
    assert float((ratio * (adv_c - adv_c.mean())).mean()) < 0.0, "the recovery step lowers the cost surrogate"


def test_conjugate_gradient_solves_a_known_spd_system():
    g = torch.Generator().manual_seed(0)
    n = 12
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = M @ M.T + n * torch.eye(n, dtype=torch.float64)
    x_true = torch.randn(n, generator=g, dtype=torch.float64)
    b = A @ x_true
    x = conjugate_gradient(lambda v: A @ v, b, iters=n)
    assert torch.allclose(x, x_true, atol=1e-8)
    # Only matrix-vector products are used, and few iterations already point the right way.
    x3 = conjugate_gradient(lambda v: A @ v, b, iters=3)
    assert float(torch.dot(x3, x_true) / (x3.norm() * x_true.norm())) > 0.9


def test_gae_matches_a_per_step_reference():
    g = torch.Generator().manual_seed(1)
    T, N, gamma, lam = 7, 3, 0.9, 0.8
    r, v = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    done = torch.zeros(T, N)
    done[3, 1] = 1.0
    last = torch.randn(N, generator=g)
    adv, ret = gae(r, v, done, last, gamma, lam)
    for n in range(N):
        expect, running = [0.0] * T, 0.0
        for t in reversed(range(T)):
            nv = last[n] if t == T - 1 else v[t + 1, n]
            live = 1.0 - float(done[t, n])
            delta = float(r[t, n] + gamma * nv * live - v[t, n])
            running = delta + gamma * lam * live * running
            expect[t] = running
        assert torch.allclose(adv[:, n], torch.tensor(expect), atol=1e-5)
    assert torch.allclose(ret, adv + v)


def test_rollout_buffer_refuses_overflow_and_flattens():
    buf = RolloutBuffer(2, 4, 3, 1)
    for _ in range(2):
        buf.add(torch.zeros(4, 3), torch.zeros(4, 1), torch.zeros(4), torch.ones(4), torch.zeros(4),
                torch.zeros(4), torch.zeros(4), torch.zeros(4))
    with pytest.raises(RuntimeError):
        buf.add(torch.zeros(4, 3), torch.zeros(4, 1), torch.zeros(4), torch.ones(4), torch.zeros(4),
                torch.zeros(4), torch.zeros(4), torch.zeros(4))
    batch = buf.finish(torch.zeros(4), torch.zeros(4), 0.5, 1.0)
    assert batch.obs.shape == (8, 3) and batch.adv_r.shape == (8,)
    assert torch.allclose(batch.ret_r[:4], torch.full((4,), 1.5))   # 1 + 0.5·1
    assert not buf.full


def test_config_rejects_bad_values():
    for bad in ({"algorithm": "ppo"}, {"divergence": "kl"}, {"cost_limit": 0.0}, {"hysteresis": 1.5},
                {"gamma": 1.0}, {"line_search_decay": 1.0}):
        with pytest.raises(ValueError):
            CTRPOConfig(**bad)


# ---------------------------------------------------------------- the mean weights

def test_mean_weights_are_the_residual_layout_of_the_scpo_policy():
    env = VecDoubleIntegrator(4, seed=0)
    learner = CTRPOLearner(env.obs_dim, env.act_dim, CTRPOConfig(hidden=(8, 8)), base_gain=env.backup_gain())
    flat = learner.mean_weights()
    assert flat.shape == (learner.layout.size,)
    assert np.all(flat[-(8 + 1):] == 0.0), "last layer starts at zero: the initial mean is the backup"
    with torch.no_grad():
        learner.policy.residual.net[-1].bias.fill_(0.3)      # move it, then read it back through numpy
    obs = env.reset()
    mlp = NumpyMLP(learner.layout, learner.mean_weights())
    backup = LQRBackup(env.plant)     # the env's plant: the bridge's double integrator
    x, r = obs[0, :2].double().numpy(), obs[0, 2:].double().numpy()
    expected = backup(x, r) + mlp(policy_inputs(x, r))
    mean = learner.act(obs, deterministic=True)[0][0].double().numpy()
    assert np.allclose(mean, expected, atol=1e-5)
    other = CTRPOLearner(env.obs_dim, env.act_dim, CTRPOConfig(hidden=(8, 8)), base_gain=env.backup_gain(), seed=5)
    other.load_mean_weights(learner.mean_weights())
    assert np.allclose(other.mean_weights(), learner.mean_weights())


# ---------------------------------------------------------------- training

def test_short_ctrpo_run_brings_episode_cost_under_the_limit():
    """Start from an unsafe policy (the backup plus a constant push that drives the cart out
    of the position box): recovery, then the barrier, keep the episode cost under b."""
    system = DoubleIntegrator(v_max=0.5)
    cfg = CTRPOConfig(algorithm="c_trpo", cost_limit=5.0, hidden=(32, 32), cost_window=32, log_std_init=-1.0)
    env = VecDoubleIntegrator(32, system=system, seed=0)

    learner = CTRPOLearner(env.obs_dim, env.act_dim, cfg, base_gain=env.backup_gain(), seed=0)
    with torch.no_grad():
        learner.policy.residual.net[-1].bias.fill_(0.4)
    res = train(env, cfg, epochs=20, learner=learner)
    costs = np.array([h.ep_cost for h in res.history])
    assert costs[0] > 2 * cfg.cost_limit, "the start must be clearly unsafe for this test to mean anything"
    assert res.history[0].recovering
    assert costs[-5:].mean() < cfg.cost_limit
    eval_env = VecDoubleIntegrator(256, system=system, seed=123)
    ev = evaluate_policy(eval_env, lambda o: res.learner.act(o, deterministic=True)[0])
    assert ev["cost"] < cfg.cost_limit
    assert sum(h.episodes for h in res.history) == 20 * 32


def test_update_refuses_non_finite_data_and_keeps_the_policy():
    obs, act, adv_r, adv_c = _risky_batch(n=256)
    learner = CTRPOLearner(3, 1, CTRPOConfig(hidden=(8, 8), critic_epochs=1), seed=0)
    before = torch.cat([p.detach().flatten().clone() for p in learner.policy.parameters()])
    adv_r = adv_r.clone()
    adv_r[7] = float("nan")
    batch = Batch(obs, act, torch.zeros(len(obs)), adv_r, adv_c, torch.zeros(len(obs)), torch.zeros(len(obs)))
    info = learner.update(batch, episode_costs=[0.0])
    assert "adv_r" in info["skipped"] and info["accepted_at"] == 0
    after = torch.cat([p.detach().flatten() for p in learner.policy.parameters()])
    assert torch.equal(before, after)
    info = learner.update(Batch(obs, act, torch.zeros(len(obs)), adv_r.nan_to_num(), adv_c, torch.zeros(len(obs)),
                                torch.zeros(len(obs))), episode_costs=[float("inf")])
    assert "episode_costs" in info["skipped"]


@pytest.mark.parametrize("algorithm", ["c_trpo", "trpo_lag"])
def test_training_is_reproducible_for_a_seed(algorithm):
    def run(seed):
        env = VecDoubleIntegrator(4, system=DoubleIntegrator(v_max=0.3), episode_length=20, seed=seed)
        cfg = CTRPOConfig(algorithm=algorithm, hidden=(8, 8), cost_limit=1.0, critic_epochs=2)
        res = train(env, cfg, epochs=3, seed=seed, base_gain=env.backup_gain())
        return [(h.ep_return, h.ep_cost, h.accepted_at) for h in res.history], res.learner.mean_weights()

    (h0, w0), (h1, w1), (h2, _) = run(0), run(0), run(1)
    assert h0 == h1 and np.array_equal(w0, w1)
    assert h0 != h2


def test_run_epoch_is_the_epoch_of_train():
    """``train`` and the learner node's proposer both run their epochs with ``Collector.run_epoch``:
    two epochs by hand give the weights of ``train(epochs=2)``."""
    cfg = CTRPOConfig(hidden=(8, 8), critic_epochs=1)
    env = VecDoubleIntegrator(4, episode_length=20, seed=3)
    trained = train(env, cfg, 2, seed=3, base_gain=env.backup_gain()).learner
    env = VecDoubleIntegrator(4, episode_length=20, seed=3)
    learner = CTRPOLearner(env.obs_dim, env.act_dim, cfg, base_gain=env.backup_gain(), seed=3)
    collector = Collector(learner, 20, env.num_envs)
    obs = env.reset()
    for _ in range(2):
        obs, info, rets, costs = collector.run_epoch(env, obs)
        assert len(rets) == len(costs) == env.num_envs and "kl" in info   # horizon = episode: every env finished one
    assert obs.shape == (4, env.obs_dim)
    np.testing.assert_array_equal(learner.mean_weights(), trained.mean_weights())
