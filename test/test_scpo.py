"""SCPOProjector, the generic core: its geometry on a toy constraint, its decisions, its config."""
import subprocess
import sys

import pytest
import torch

from scpo_ros.scpo import COMMITTED, STATUSES, Decision, SCPOConfig, SCPOProjector


def norm_constraint(P):
    """g(θ) = ||θ||² - 1, a black box to the projector."""
    return (P.double() ** 2).sum(1, keepdim=True) - 1.0


def toy_projector(**cfg):
    cfg = {"n_samples": 16, "sample_radius": 0.5, "margins": (0.0,), "cert_margins": (0.0,),
           "n_random_directions": 1, **cfg}
    return SCPOProjector(norm_constraint, norm_constraint, SCPOConfig(**cfg), ["norm"], seed=0)


def test_generic_projector_on_a_toy_constraint_matches_its_geometry():
    """Around any black-box constraint: g(θ) = ||θ||² - 1 (no gradient given)."""
    proj = toy_projector()
    theta = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    new, d = proj.step(theta, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert d.committed and float(new.norm()) <= 1.0 and float(new[0]) > 0.6
    # a step that stays inside is taken (up to the trust radius) in full
    new2, d2 = proj.step(theta, torch.tensor([0.0, 0.2, 0.0], dtype=torch.float64))
    assert d2.status == "accepted"
    torch.testing.assert_close(new2, theta + torch.tensor([0.0, 0.2, 0.0], dtype=torch.float64))


def test_config_validation():
    with pytest.raises(ValueError):
        SCPOConfig(safety_factor=0.5)
    with pytest.raises(ValueError):
        SCPOConfig(margins=(-1.0,))
    with pytest.raises(ValueError):
        SCPOConfig(sample_radius=float("nan"))


def test_recertify_checks_the_parameters_themselves_without_a_step():
    proj = toy_projector()
    inside = proj.recertify(torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64))
    assert inside.status == "accepted" and inside.committed and set(inside.margins_after) == {"norm"}
    assert proj.steps == 0
    proj.step(torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64))
    assert proj.prev_gradients is not None
    outside = proj.recertify(torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64))
    assert outside.status == "rejected" and not outside.committed
    assert proj.prev_gradients is None     # the caller moves elsewhere: the old gradients say nothing there


def test_one_margin_broadcasts_to_every_metric():
    two = lambda P: torch.stack([P[:, 0] - 1.0, -P[:, 0] - 1.0], 1).double()  # noqa: E731  |θ_0| <= 1
    proj = SCPOProjector(two, two, SCPOConfig(n_samples=16, sample_radius=0.5, margins=(0.1,), cert_margins=(0.05,)),
                         seed=0)
    new, d = proj.step(torch.zeros(3, dtype=torch.float64), torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64))
    assert d.committed and set(d.margins_after) == {"g0", "g1"}
    assert float(new[0]) <= 1.0 - 0.05 + 1e-9
    bad = SCPOProjector(two, two, SCPOConfig(n_samples=16, margins=(0.1, 0.1, 0.1)), seed=0)
    with pytest.raises(ValueError, match="margins"):
        bad.step(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))


def test_statuses_and_committed():
    assert COMMITTED == ("accepted", "backtracked") and STATUSES[:2] == COMMITTED
    assert set(STATUSES) == {"accepted", "backtracked", "rejected", "infeasible"}
    assert [Decision(status=s).committed for s in STATUSES] == [True, True, False, False]


def test_the_core_depends_only_on_numpy_torch_and_the_qcqp():
    code = ("import sys, scpo_ros.scpo; "
            "print(sorted(m for m in sys.modules if m.startswith('scpo_ros')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["scpo_ros", "scpo_ros.qcqp", "scpo_ros.scpo"]
