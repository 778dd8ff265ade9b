"""ResidualSCPO, the double integrator's SCPO client: it never commits an unsafe iterate,
and it still lets safe learning through."""
import numpy as np
import torch

from scpo_ros.backup import InitialSet, LQRBackup
from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.expert import ExpertConfig, expert_action
from scpo_ros.learners import ImitationLearner, residual_targets
from scpo_ros.policy import MLPLayout, ResidualMLP, policy_inputs
from scpo_ros.residual_scpo import DEFAULT_CERT_MARGINS, DEFAULT_MARGINS, ResidualSCPO, backup_weights
from scpo_ros.rollout import METRICS, DoubleIntegratorRollout, SafetySpec, random_states, structured_states
from scpo_ros.scpo import COMMITTED, SCPOConfig


def make_scpo(seed=0, **cfg):
    system = DoubleIntegrator()
    backup = LQRBackup(system)
    layout = MLPLayout(3, 1, (16, 16))
    config = ResidualSCPO.default_config(n_samples=24, **cfg)
    # shorter horizon and fewer states than the defaults keep the suite fast; the logic is the same
    return ResidualSCPO(system, backup, layout, InitialSet(), config, safety=SafetySpec(horizon=60),
                        n_sample_states=96, n_cert_states=256, seed=seed)


def held_out_checker(scpo, seed):
    """Fresh states the projector never saw: 1024 uniform + the structured worst cases."""
    iset, dof = scpo.initial_set, scpo.system.dof
    x, r = random_states(iset, dof, 1000, np.random.default_rng(10_000 + seed))
    sx, sr = structured_states(iset, dof, max_points=256, seed=99)
    x, r = np.concatenate([x, sx]), np.concatenate([r, sr])
    engine = DoubleIntegratorRollout(scpo.system, scpo.backup, scpo.layout, scpo.safety)
    return lambda theta: engine.evaluate(torch.as_tensor(theta), x, r).g[0]


def test_falsification_adversarial_updates_never_commit_unsafe_weights():
    """Many SCPO steps against raw updates built to break safety; every committed
    iterate is checked on held-out initial states with fresh rollouts."""
    scpo = make_scpo(seed=1)
    check = held_out_checker(scpo, 1)
    rng = np.random.default_rng(0)
    system, layout = scpo.system, scpo.layout
    model = ResidualMLP(layout)
    mal = ExpertConfig(malicious=True)
    committed = unsafe_proposals = 0
    for k in range(30):
        theta = torch.as_tensor(scpo.theta)
        kind = k % 3
        if kind == 0:      # large random jump
            delta = torch.randn(layout.size, generator=torch.Generator().manual_seed(k)) * 0.2
        elif kind == 1:    # push the output layer bias: a constant force on the plant
            delta = torch.zeros(layout.size)
            delta[-1] = float(rng.choice([-1.0, 1.0])) * 0.5
        else:              # gradient step towards a malicious expert, scaled up
            model.load_flat(theta)
            x, r = random_states(InitialSet(1.0, 0.6, 0.5), 1, 256, rng)
            target = torch.as_tensor(expert_action(x, r, True, mal, system) - scpo.backup(x, r), dtype=torch.float32)
            loss = ((model(torch.as_tensor(policy_inputs(x, r), dtype=torch.float32)) - target) ** 2).mean()
            grad = torch.autograd.grad(loss, list(model.parameters()))
            delta = -torch.cat([g.reshape(-1) for g in grad])
            delta = 0.3 * delta / delta.norm()
        unsafe_proposals += bool((check(theta + delta) > 0).any())
        before = scpo.theta.copy()
        decision = scpo.propose_step(delta.numpy())
        if decision.committed:
            committed += 1
            g = check(scpo.theta)
            assert torch.all(g <= 0), f"step {k} ({decision.status}) committed unsafe weights: {g}"
        else:
            np.testing.assert_array_equal(scpo.theta, before)
    assert unsafe_proposals >= 20  # the attack is real: most raw proposals were unsafe
    assert committed >= 3          # and SCPO still found safe fractions of some of them


def test_clean_updates_are_committed_and_reduce_the_loss():
    scpo = make_scpo(seed=2)
    system, layout = scpo.system, scpo.layout
    expert = ExpertConfig()
    learner = ImitationLearner(scpo.backup, layout, lr=1e-3)
    learner.load(scpo.theta)
    model = learner.model
    rng = np.random.default_rng(3)
    region = InitialSet(1.0, 0.6, 0.5)
    cx, cr = random_states(region, 1, 2048, np.random.default_rng(4))
    ci, ct = (torch.as_tensor(a) for a in
              residual_targets(scpo.backup, cx, cr, expert_action(cx, cr, False, expert, system)))
    loss0 = float(((model(ci) - ct) ** 2).mean().detach())
    statuses = []
    for _ in range(30):
        x, r = random_states(region, 1, 256, rng)
        before = model.flat().detach().clone()
        learner.fit(*residual_targets(scpo.backup, x, r, expert_action(x, r, False, expert, system)))
        d = scpo.propose_step((model.flat().detach() - before).numpy())
        statuses.append(d.status)
        learner.load(scpo.theta)
        assert set(d.times_ms) >= {"sample", "fit", "qcqp", "certify", "total"}
    loss1 = float(((model(ci) - ct) ** 2).mean().detach())
    assert sum(s in COMMITTED for s in statuses) >= 15
    assert loss1 < 0.95 * loss0


def test_nan_inf_and_wrong_size_updates_are_rejected_without_change():
    scpo = make_scpo()
    before = scpo.theta.copy()
    for bad in (np.full(scpo.theta.size, np.nan), np.r_[np.zeros(scpo.theta.size - 1), np.inf]):
        d = scpo.propose_step(bad)
        assert d.status == "rejected" and "NaN" in d.reason
    d = scpo.propose_weights(np.zeros(scpo.theta.size + 3))
    assert d.status == "rejected" and "expected" in d.reason
    d = scpo.propose_step(np.zeros(scpo.theta.size))
    assert d.status == "rejected" and "empty" in d.reason
    np.testing.assert_array_equal(scpo.theta, before)


def test_recertify_reverts_to_backup_when_limits_tighten():
    scpo = make_scpo(seed=4)
    flat = scpo.theta.copy()
    flat[-1] = 0.01  # a small constant residual: safe with u_max = 1
    scpo.theta = flat.astype(np.float32)
    assert scpo.recertify().status == "accepted"
    # re-create the engine with a much tighter actuation limit: the same weights fail
    tight = DoubleIntegrator(u_max=0.5)
    scpo.engine = DoubleIntegratorRollout(tight, scpo.backup, scpo.layout, scpo.safety)
    d = scpo.recertify()
    assert d.status == "rejected" and "backup" in d.reason
    np.testing.assert_array_equal(scpo.theta, scpo.backup_theta)
    assert set(d.times_ms) == {"certify", "total"} and set(d.margins_after) == set(METRICS)


def test_default_config_sets_one_margin_per_metric_unless_given():
    cfg = ResidualSCPO.default_config(n_samples=8)
    assert cfg.n_samples == 8
    assert len(DEFAULT_MARGINS) == len(DEFAULT_CERT_MARGINS) == len(METRICS)
    assert cfg.margins == DEFAULT_MARGINS and cfg.cert_margins == DEFAULT_CERT_MARGINS
    assert ResidualSCPO.default_config(margins=(0.1,)).margins == (0.1,)
    # the generic defaults of the projector are one value for every metric
    assert len(SCPOConfig().margins) == len(SCPOConfig().cert_margins) == 1
    scpo = make_scpo()
    assert scpo.config.margins == DEFAULT_MARGINS           # config=None: default_config()


def test_backup_weights_make_the_residual_zero():
    layout = MLPLayout(3, 1, (8, 8))
    net = ResidualMLP(layout)
    net.load_flat(backup_weights(layout, seed=3))
    assert backup_weights(layout, seed=3).dtype == np.float32
    with torch.no_grad():
        assert float(net(torch.randn(5, 3)).abs().max()) == 0.0
