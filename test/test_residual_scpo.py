"""ResidualSCPO, the SCPO client of any plant: it never commits an unsafe iterate, and it still
lets safe learning through."""
import numpy as np
import pytest
import torch

from scpo_ros.backup import BackupCertificationError, LQRBackup, dlqr
from scpo_ros.plant import load_plant
from scpo_ros.policy import MLPLayout, ResidualMLP, policy_inputs
from scpo_ros.residual_scpo import DEFAULT_CERT_MARGINS, DEFAULT_MARGINS, ResidualSCPO, backup_weights
from scpo_ros.rollout import METRICS, PlantRollout, SafetySpec, random_states, structured_states
from scpo_ros.scpo import COMMITTED, SCPOConfig


def make_scpo(plant="double_integrator", seed=0, **cfg):
    plant = load_plant(plant) if isinstance(plant, str) else plant
    backup = LQRBackup(plant)
    layout = MLPLayout(plant.n + plant.nr, plant.m, (16, 16))
    config = ResidualSCPO.default_config(n_samples=24, **cfg)
    # a 3 s horizon and fewer states than the defaults keep the suite fast; the logic is the same
    return ResidualSCPO(plant, backup, layout, config, safety=SafetySpec(horizon_s=3.0),
                        n_sample_states=96, n_cert_states=256, seed=seed)


class Experts:
    """Test experts of any plant (independent of ``scpo_ros.expert``): a fast LQR clipped into the
    input box (clean), and one that drives towards a target past every finite state limit with
    the gain tripled and no clipping (malicious)."""

    def __init__(self, plant, backup):
        self.plant, self.backup = plant, backup
        self.K, _ = dlqr(plant.A, plant.B, np.diag(plant.backup_Q) * 10, np.diag(plant.backup_R) * 0.1)
        self.beyond = np.where(np.isfinite(plant.x_max), 1.5 * plant.x_max - 0.5 * plant.x_min, 0.0)

    def __call__(self, x, r, malicious):
        x_ss, u_ss = self.backup.equilibrium(r)
        if malicious:
            return u_ss - 3.0 * (x - self.beyond) @ self.K.T
        mid, half = (self.plant.u_max + self.plant.u_min) / 2, (self.plant.u_max - self.plant.u_min) / 2
        return np.clip(u_ss - (x - x_ss) @ self.K.T, mid - 0.9 * half, mid + 0.9 * half)


class Imitator:
    """Adam on the residual's imitation loss (what ``learners.ImitationLearner.fit`` does; kept
    here so that this test depends on the SCPO client alone)."""

    def __init__(self, scpo, lr=1e-3):
        self.backup, self.model = scpo.backup, ResidualMLP(scpo.layout)
        self.model.load_flat(torch.as_tensor(scpo.theta))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)

    def targets(self, x, r, u_expert):
        return (torch.as_tensor(policy_inputs(x, r), dtype=torch.float32),
                torch.as_tensor(u_expert - self.backup(x, r), dtype=torch.float32))

    def loss(self, inputs, targets):
        return ((self.model(inputs) - targets) ** 2).mean()

    def fit(self, inputs, targets):
        self.opt.zero_grad()
        self.loss(inputs, targets).backward()
        self.opt.step()

    def load(self, flat):
        self.model.load_flat(torch.as_tensor(flat))


def held_out_checker(scpo, seed):
    """Fresh states the projector never saw: 1000 uniform + the structured worst cases."""
    x, r = random_states(scpo.plant, 1000, np.random.default_rng(10_000 + seed))
    sx, sr = structured_states(scpo.plant, max_points=256, seed=99)
    x, r = np.concatenate([x, sx]), np.concatenate([r, sr])
    engine = PlantRollout(scpo.plant, scpo.backup, scpo.layout, scpo.safety)
    return lambda theta: engine.evaluate(torch.as_tensor(theta), x, r).g[0]


def _malicious_delta(scpo, model, experts, rng):
    """A gradient step towards the malicious expert, scaled up."""
    model.load_flat(torch.as_tensor(scpo.theta))
    x, r = random_states(scpo.plant, 256, rng)
    target = torch.as_tensor(experts(x, r, True) - scpo.backup(x, r), dtype=torch.float32)
    loss = ((model(torch.as_tensor(policy_inputs(x, r), dtype=torch.float32)) - target) ** 2).mean()
    grad = torch.autograd.grad(loss, list(model.parameters()))
    delta = -torch.cat([g.reshape(-1) for g in grad])
    return 0.3 * delta / delta.norm()


@pytest.mark.parametrize("plant", ["double_integrator", "mass_spring_damper"])
def test_falsification_adversarial_updates_never_commit_unsafe_weights(plant):
    """Many SCPO steps against raw updates built to break safety; every committed iterate is
    checked on held-out initial states with fresh rollouts."""
    scpo = make_scpo(plant, seed=1)
    check = held_out_checker(scpo, 1)
    rng = np.random.default_rng(0)
    layout = scpo.layout
    model = ResidualMLP(layout)
    experts = Experts(scpo.plant, scpo.backup)
    committed = unsafe_proposals = 0
    for k in range(24):
        theta = torch.as_tensor(scpo.theta)
        kind = k % 3
        if kind == 0:      # large random jump
            delta = torch.randn(layout.size, generator=torch.Generator().manual_seed(k)) * 0.2
        elif kind == 1:    # push the output layer bias: a constant force on the plant
            delta = torch.zeros(layout.size)
            delta[-scpo.plant.m:] = float(rng.choice([-1.0, 1.0])) * 0.5 * float(np.max(scpo.plant.u_max))
        else:
            delta = _malicious_delta(scpo, model, experts, rng)
        unsafe_proposals += bool((check(theta + delta) > 0).any())
        before = scpo.theta.copy()
        decision = scpo.propose_step(delta.numpy())
        if decision.committed:
            committed += 1
            g = check(scpo.theta)
            assert torch.all(g <= 0), f"step {k} ({decision.status}) committed unsafe weights: {g}"
        else:
            np.testing.assert_array_equal(scpo.theta, before)
    assert unsafe_proposals >= 14  # the attack is real: most raw proposals were unsafe
    assert committed >= 3          # and SCPO still found safe fractions of some of them


def test_clean_updates_are_committed_and_reduce_the_loss():
    scpo = make_scpo(seed=2)
    plant = scpo.plant
    experts = Experts(plant, scpo.backup)
    learner = Imitator(scpo, lr=3e-3)
    rng = np.random.default_rng(3)
    cx, cr = random_states(plant, 2048, np.random.default_rng(4))
    clean = learner.targets(cx, cr, experts(cx, cr, False))
    with torch.no_grad():
        loss0 = float(learner.loss(*clean))
    statuses = []
    for _ in range(24):
        x, r = random_states(plant, 256, rng)
        before = learner.model.flat().detach().clone()
        learner.fit(*learner.targets(x, r, experts(x, r, False)))
        d = scpo.propose_step((learner.model.flat().detach() - before).numpy())
        statuses.append(d.status)
        learner.load(scpo.theta)
        assert set(d.times_ms) >= {"sample", "fit", "qcqp", "certify", "total"}
    with torch.no_grad():
        loss1 = float(learner.loss(*clean))
    assert sum(s in COMMITTED for s in statuses) >= 12
    # (the unconstrained learner gets to ~0.6 here: the projection shortens clean steps near the
    # Lyapunov margin, as it did with the former absolute margins)
    assert loss1 < 0.97 * loss0


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


def test_tightened_limits_recertify_and_revert_to_the_backup():
    scpo = make_scpo(seed=4)
    flat = scpo.theta.copy()
    flat[-1] = 0.01  # a small constant residual: safe with u_max = 1
    scpo.theta = flat.astype(np.float32)
    assert scpo.recertify().status == "accepted"
    # the same weights on the plant with a much tighter input box fail: back to the backup
    tight = scpo.plant.with_limits(u_min=[-0.58], u_max=[0.58])   # the backup needs 0.5715
    d = scpo.use_plant(tight)
    assert d.status == "rejected" and "backup" in d.reason
    np.testing.assert_array_equal(scpo.theta, scpo.backup_theta)
    assert set(d.times_ms) == {"certify", "total"} and set(d.margins_after) == set(METRICS)
    assert scpo.plant is tight
    # a limit the backup itself cannot keep is refused before anything changes
    with pytest.raises(BackupCertificationError):
        scpo.use_plant(scpo.plant.with_limits(u_min=[-0.2], u_max=[0.2]))
    assert scpo.plant is tight


def test_refuses_a_backup_that_does_not_certify_the_region():
    plant = load_plant("double_integrator")
    weak = LQRBackup(plant, R=[1e-3])     # aggressive: its first command leaves the input box
    with pytest.raises(BackupCertificationError):
        ResidualSCPO(plant, weak, MLPLayout(3, 1, (8,)), safe_set=())


def test_default_config_sets_one_margin_per_metric_unless_given():
    cfg = ResidualSCPO.default_config(n_samples=8)
    assert cfg.n_samples == 8
    assert len(DEFAULT_MARGINS) == len(DEFAULT_CERT_MARGINS) == len(METRICS)
    assert cfg.margins == DEFAULT_MARGINS and cfg.cert_margins == DEFAULT_CERT_MARGINS
    assert all(0 < c < m < 0.5 for m, c in zip(DEFAULT_MARGINS, DEFAULT_CERT_MARGINS))   # fractions
    assert ResidualSCPO.default_config(margins=(0.1,)).margins == (0.1,)
    # the generic defaults of the projector are one value for every metric
    assert len(SCPOConfig().margins) == len(SCPOConfig().cert_margins) == 1
    scpo = make_scpo()
    assert scpo.config.margins == DEFAULT_MARGINS           # config=None: default_config()
    assert scpo.region is scpo.plant.region


def test_backup_weights_make_the_residual_zero():
    layout = MLPLayout(3, 1, (8, 8))
    net = ResidualMLP(layout)
    net.load_flat(backup_weights(layout, seed=3))
    assert backup_weights(layout, seed=3).dtype == np.float32
    with torch.no_grad():
        assert float(net(torch.randn(5, 3)).abs().max()) == 0.0
