"""The learner's algorithms (``learners.py``, ROS-free): the C-TRPO proposer proposes finite,
layout-true weights that change as it trains in its own simulation, starts as the backup, and
re-bases on certified weights; the imitation learner fits the residual of the demonstrations."""
import numpy as np
import pytest
import torch

from scpo_ros.backup import LQRBackup
from scpo_ros.ctrpo import CTRPOConfig
from scpo_ros.learners import CTRPOProposer, ImitationLearner
from scpo_ros.plant import Region, load_plant
from scpo_ros.policy import MLPLayout, NumpyMLP, check_weights, policy_inputs

PLANT = load_plant("double_integrator")
BACKUP = LQRBackup(PLANT)
HIDDEN = (16, 16)
LAYOUT = MLPLayout(3, 1, HIDDEN)


def small_proposer(seed: int = 0, **kwargs) -> CTRPOProposer:
    torch.set_num_threads(1)
    config = CTRPOConfig(algorithm="c_trpo", cost_limit=1.0, hidden=HIDDEN, critic_epochs=2)
    return CTRPOProposer(PLANT, BACKUP, LAYOUT, None, config, num_envs=8, horizon=25, seed=seed, **kwargs)


def test_ctrpo_proposer_starts_as_the_backup_and_proposes_changing_layout_true_weights():
    prop = small_proposer()
    assert not prop.needs_demonstrations and prop.ready(10**9)
    w0 = prop.weights()
    # the safety node's initial weights for the same seed: φ ≡ 0, i.e. the policy is the backup
    assert np.array_equal(w0, LAYOUT.initial_parameters(0).double().numpy())
    proposals, all_stats = [w0], []
    for _ in range(3):
        stats = prop.update(2)
        all_stats.append(stats)
        w = prop.weights()
        assert w.dtype == np.float64 and w.shape == (LAYOUT.size,)
        check_weights(LAYOUT, w, LAYOUT.fingerprint)           # size, fingerprint, finite
        proposals.append(w)
    assert prop.count == 3 * 2 * 25 * 8 and stats["epochs"] == 6
    # 150 steps per env: the 100-step episodes of all 8 envs finished during the second call,
    # with a cost (unsafe steps) in [0, 100]
    assert [s["episodes"] for s in all_stats] == [0, 8, 0]
    assert np.isnan(all_stats[0]["ep_cost"])
    assert 0.0 <= all_stats[1]["ep_cost"] <= 100.0 and np.isfinite(all_stats[1]["ep_return"])
    assert all_stats[2]["ep_return"] == all_stats[1]["ep_return"]     # the latest finished episodes
    steps = [np.linalg.norm(b - a) for a, b in zip(proposals[:-1], proposals[1:], strict=True)]
    assert all(s > 0 for s in steps), steps                  # every update moved the proposal


def test_ctrpo_proposer_rebases_on_certified_weights():
    prop = small_proposer()
    prop.update(1)
    rng = np.random.default_rng(3)
    certified = LAYOUT.initial_parameters(7).double().numpy() + 0.01 * rng.standard_normal(LAYOUT.size)
    prop.load(certified)
    np.testing.assert_allclose(prop.weights(), certified, atol=1e-6)   # float32 inside
    # the proposer's mean action is the safety node's law for these weights: backup + φ_θ
    x, r = np.array([0.3, -0.1]), np.array([0.2])
    mean = prop.learner.act(torch.tensor(policy_inputs(x, r), dtype=torch.float32)[None], deterministic=True)[0]
    law = BACKUP(x, r) + NumpyMLP(LAYOUT, certified)(policy_inputs(x, r))
    np.testing.assert_allclose(mean.numpy()[0], law, atol=1e-5)
    # training goes on from the certified weights, not from where it was before
    prop.update(1)
    after = prop.weights()
    assert 0 < np.linalg.norm(after - certified) < np.linalg.norm(after - LAYOUT.initial_parameters(0).numpy())


def test_ctrpo_proposer_refuses_a_mismatched_setup():
    with pytest.raises(ValueError, match="hidden"):
        CTRPOProposer(PLANT, BACKUP, MLPLayout(3, 1, (32, 32)), config=CTRPOConfig(hidden=HIDDEN))
    with pytest.raises(ValueError, match="does not fit the plant double_integrator"):
        CTRPOProposer(PLANT, BACKUP, MLPLayout(6, 2, HIDDEN), config=CTRPOConfig(hidden=HIDDEN))
    # episodes starting outside the limits (|p| <= 1.2 > p_max), or references whose
    # equilibrium breaks them, would carry cost from their first step
    wide = Region(np.array([-1.2, -0.2]), np.array([1.2, 0.2]), np.array([-0.5]), np.array([0.5]))
    with pytest.raises(ValueError, match="inside the constraint box.*position"):
        CTRPOProposer(PLANT, BACKUP, LAYOUT, wide, config=CTRPOConfig(hidden=HIDDEN))
    far = Region(np.array([-0.8, -0.2]), np.array([0.8, 0.2]), np.array([-1.5]), np.array([1.5]))
    with pytest.raises(ValueError, match="inside the constraint box"):
        CTRPOProposer(PLANT, BACKUP, LAYOUT, far, config=CTRPOConfig(hidden=HIDDEN))


def test_ctrpo_proposer_trains_on_any_plant():
    # four states and no tracked state (references of shape (0,)): the mean starts as its backup
    torch.set_num_threads(1)
    plant = load_plant("cart_pole")
    layout = MLPLayout(plant.n + plant.nr, plant.m, HIDDEN)
    config = CTRPOConfig(algorithm="c_trpo", cost_limit=1.0, hidden=HIDDEN, critic_epochs=2)
    prop = CTRPOProposer(plant, None, layout, None, config, num_envs=4, horizon=10, seed=1)
    assert np.array_equal(prop.weights(), layout.initial_parameters(1).double().numpy())
    backup = LQRBackup(plant)
    x = 0.5 * (plant.region.x_min + plant.region.x_max) + 0.01
    r = 0.5 * (plant.region.r_min + plant.region.r_max)
    obs = torch.tensor(policy_inputs(x, r), dtype=torch.float32)[None]
    mean = prop.learner.act(obs, deterministic=True)[0].numpy()[0] + prop.env.action_offset.numpy()
    np.testing.assert_allclose(mean, backup(x, r), atol=1e-5)
    stats = prop.update(1)
    assert stats["env_steps"] == 40 and np.all(np.isfinite(prop.weights()))


def test_ctrpo_proposer_runtime_settings_reach_the_critics():
    prop = small_proposer()
    prop.set_lr(3e-4)
    prop.batch_size = 64
    assert all(g["lr"] == 3e-4 for g in prop.learner.critic_opt.param_groups)
    assert prop.learner.config.critic_batch == 64 and prop.batch_size == 64
    prop.update(1)                                             # still trains with the replaced config


def test_imitation_learner_fits_the_residual_of_the_demonstrations():
    torch.set_num_threads(1)
    learner = ImitationLearner(BACKUP, LAYOUT, lr=5e-3, batch_size=64, buffer_size=512, seed=0)
    assert learner.needs_demonstrations and not learner.ready(1)
    rng = np.random.default_rng(0)
    for _ in range(256):                                       # the expert = backup + 0.2
        x, r = rng.uniform(-0.5, 0.5, 2), rng.uniform(-0.5, 0.5, 1)
        learner.observe(x, r, BACKUP(x, r) + 0.2)
    assert learner.ready(256)
    first = learner.update(1)["loss"]
    last = learner.update(200)["loss"]
    assert first == pytest.approx(0.04, rel=0.05)              # φ ≡ 0 at start: error 0.2²
    assert last < 0.1 * first
