"""scpo_ros.control_law (ROS-free): the folded control law, its region, who acts."""
import array

import numpy as np
import pytest

from scpo_ros.backup import LQRBackup
from scpo_ros.control_law import ControlLaw, FoldedPolicy, command_view, make_law, select
from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.params import MODEL_PARAMS, defaults
from scpo_ros.policy import MLPLayout, NumpyMLP
from scpo_ros.residual_scpo import backup_weights
from scpo_ros.safety_model import build_model


def model_values(**changes):
    return defaults(MODEL_PARAMS, **changes)


class Msg:
    """What ``command_view`` needs of a ``Float64MultiArray``: ``data``, an ``array.array('d')``."""

    def __init__(self, n):
        self.data = array.array("d", [0.0] * n)


@pytest.mark.parametrize("dof", [1, 2])
def test_folded_policy_equals_backup_plus_mlp(dof):
    system = DoubleIntegrator(dof=dof, dt=0.05)
    backup = LQRBackup(system)
    layout = MLPLayout(3 * dof, dof, (16, 8))
    rng = np.random.default_rng(dof)
    theta = rng.standard_normal(layout.size) * 0.3
    gain = backup.input_gain()
    folded, alone, mlp = FoldedPolicy(gain, layout, theta), FoldedPolicy(gain, None, None), NumpyMLP(layout, theta)
    flat_layout = MLPLayout(3 * dof, dof, ())          # no hidden layer: φ affine
    theta_flat = rng.standard_normal(flat_layout.size)
    affine, affine_ref = FoldedPolicy(gain, flat_layout, theta_flat), NumpyMLP(flat_layout, theta_flat)
    # the node writes the command straight into the storage of the message it publishes
    msg = Msg(dof)
    out = command_view(msg)
    for _ in range(20):
        x, r = rng.uniform(-1, 1, 2 * dof), rng.uniform(-0.5, 0.5, dof)
        inp = np.concatenate([x, r])
        z = np.append(inp, 1.0)                            # the augmented input [x, r, 1]
        folded(z, out)
        assert np.allclose(list(msg.data), backup(x, r) + mlp(inp), atol=1e-12)
        assert np.allclose(alone(z, out), backup(x, r), atol=1e-12)
        assert np.allclose(list(msg.data), backup(x, r), atol=1e-12)
        assert np.allclose(affine(z, out), backup(x, r) + affine_ref(inp), atol=1e-12)


def test_command_view_refuses_a_copying_getter():
    class Copying:
        @property
        def data(self):
            return array.array("d", [0.0, 0.0])
    with pytest.raises(RuntimeError, match="not backed"):
        command_view(Copying())


@pytest.mark.parametrize("dof", [1, 2])
def test_make_law_region_is_the_certified_box(dof):
    model = build_model(model_values(dof=dof, p0_max=0.7, v0_max=0.15, r_max=0.4))
    law = make_law(model, None, 3)
    assert law.policy is None and law.version == 3 and not law.certifying
    assert law.upper == tuple([0.7] * dof + [0.15] * dof + [0.4] * dof)
    assert law.lower == tuple(-u for u in law.upper)
    law = make_law(model, backup_weights(model.layout).astype(float), 4, certifying=True)
    assert law.certifying and law.policy is not None
    # the backup's own weights: the law is the backup
    x, r = np.array([0.3] * dof + [-0.1] * dof), np.full(dof, 0.2)
    out = np.zeros(dof)
    law.policy(np.concatenate([x, r, [1.0]]), out)
    assert np.allclose(out, model.backup(x, r), atol=1e-6)


def law(policy=True, certifying=False):
    return ControlLaw(object() if policy else None, (-1.0, -1.0, -1.0), (1.0, 1.0, 1.0), 1, certifying)


def test_select_leaves_the_policy_at_once_and_returns_with_hysteresis():
    inside, outside = [0.1, 0.0, 0.0], [1.5, 0.0, 0.0]
    assert select(law(), inside, "waiting_for_state", 0, 5) == ("policy", 1)      # first use: at once
    assert select(law(), outside, "policy", 7, 5) == ("backup_region", 0)         # leaving: at once
    mode, q = "backup_region", 0
    modes = []
    for _ in range(6):
        mode, q = select(law(), inside, mode, q, 5)
        modes.append(mode)
    assert modes == ["returning"] * 4 + ["policy", "policy"]
    assert select(law(policy=False), inside, "waiting_for_state", 0, 5) == ("waiting_for_certificate", 0)
    assert select(law(certifying=True), inside, "policy", 3, 5) == ("backup_recertifying", 0)
    assert select(law(certifying=True), outside, "policy", 3, 5)[0] == "backup_recertifying"
    assert select(law(), [0.1, 0.0, float("nan")], "policy", 3, 5)[0] == "backup_region"   # NaN is outside
