"""scpo_ros.control_law (ROS-free): the folded control law, its region, who acts, the
stale-state hold, the ``control`` diagnostic, compute times and rest detection."""
import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plant_strategies import random_plant
from scpo_ros import graph as g
from scpo_ros.backup import LQRBackup
from scpo_ros.control_law import (
    UNCONFIGURED,
    ComputeTimes,
    ControlCounts,
    ControlLaw,
    FoldedPolicy,
    HoldPredictor,
    RestDetector,
    command_view,
    control_status,
    make_law,
    select,
)
from scpo_ros.envelope import CommandEnvelope
from scpo_ros.params import MODEL_PARAMS, defaults
from scpo_ros.plant import double_integrator_plant, load_plant
from scpo_ros.policy import MLPLayout, NumpyMLP
from scpo_ros.residual_scpo import backup_weights
from scpo_ros.safety_model import Model, build_model


def model_values(**changes):
    return defaults(MODEL_PARAMS, **changes)


class Msg:
    """What ``command_view`` needs of a ``Float64MultiArray``: ``data``, an ``array.array('d')``."""

    def __init__(self, n):
        self.data = array.array("d", [0.0] * n)


def check_folded(plant, seed, hidden=(16, 8)):
    """The folded law equals ``backup(x, r) + φ([x, r])`` at random points of the region."""
    backup = LQRBackup(plant)
    n, nr, m = plant.n, plant.nr, plant.m
    layout = MLPLayout(n + nr, m, hidden)
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(layout.size) * 0.3
    gain = backup.input_gain()
    assert gain.shape == (m, n + nr + 1)
    folded, alone, mlp = FoldedPolicy(gain, layout, theta), FoldedPolicy(gain, None, None), NumpyMLP(layout, theta)
    flat_layout = MLPLayout(n + nr, m, ())
    theta_flat = rng.standard_normal(flat_layout.size)
    affine, affine_ref = FoldedPolicy(gain, flat_layout, theta_flat), NumpyMLP(flat_layout, theta_flat)
    out = np.zeros(m)
    lo, hi = plant.region.lower, plant.region.upper
    for _ in range(10):
        inp = rng.uniform(lo, hi)
        x, r = inp[:n], inp[n:]
        z = np.append(inp, 1.0)
        scale = 1.0 + np.abs(backup(x, r)).max()
        assert np.allclose(folded(z, out), backup(x, r) + mlp(inp), atol=1e-9 * scale)
        assert np.allclose(alone(z, out), backup(x, r), atol=1e-9 * scale)
        assert np.allclose(affine(z, out), backup(x, r) + affine_ref(inp), atol=1e-9 * scale)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), affine=st.booleans())
def test_folded_policy_of_random_plants(seed, affine):
    # an affine term c moves the equilibrium off the origin: the backup's gain gets a constant
    # column, which the fold must carry through the augmented input's 1
    plant = random_plant(seed, affine=affine)
    if affine:
        assert np.abs(LQRBackup(plant).input_gain()[:, -1]).max() > 0
    check_folded(plant, seed)


@pytest.mark.parametrize("dof", [1, 2])
def test_folded_policy_equals_backup_plus_mlp(dof):
    plant = double_integrator_plant(dof)
    backup = LQRBackup(plant)
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
    model = build_model(model_values(), double_integrator_plant(dof, p0_max=0.7, v0_max=0.15, r_max=0.4))
    law = make_law(model, None, 3)
    assert law.policy is None and law.version == 3 and not law.certifying
    assert law.upper == tuple([0.7] * dof + [0.15] * dof + [0.4] * dof)
    assert law.lower == tuple(-u for u in law.upper)
    assert len(law.upper) == model.plant.n + model.plant.nr
    law = make_law(model, backup_weights(model.layout).astype(float), 4, certifying=True)
    assert law.certifying and law.policy is not None
    # the backup's own weights: the law is the backup
    x, r = np.array([0.3] * dof + [-0.1] * dof), np.full(dof, 0.2)
    out = np.zeros(dof)
    law.policy(np.concatenate([x, r, [1.0]]), out)
    assert np.allclose(out, model.backup(x, r), atol=1e-6)


def test_make_law_region_of_any_plant():
    # the region is the plant's [x, r] box, asymmetric and without references alike
    plant = random_plant(7, n=3, m=2, nr=0, affine=True)
    backup = LQRBackup(plant)
    layout = MLPLayout(plant.n, plant.m, (8,))
    model = Model(plant, backup, layout, None, None, 8, 8, 0, 0)
    law = make_law(model, np.zeros(layout.size), 1)
    assert law.lower == tuple(plant.region.x_min) and law.upper == tuple(plant.region.x_max)
    z = list((plant.region.x_min + plant.region.x_max) / 2)
    assert select(law, z, "waiting_for_state", 0, 3) == ("policy", 1)
    out = np.zeros(plant.m)
    law.policy(np.append(z, 1.0), out)
    assert np.allclose(out, backup(np.array(z)), atol=1e-9)


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


def test_select_answers_only_modes_of_the_graph():
    seen = set()
    for lw in (law(), law(policy=False), law(certifying=True)):
        for z in ([0.1, 0.0, 0.0], [1.5, 0.0, 0.0]):
            for mode in ("policy", "backup_region", "waiting_for_state"):
                for q in (0, 4):
                    seen.add(select(lw, z, mode, q, 5)[0])
    assert seen == {"policy", "backup_region", "returning", "waiting_for_certificate", "backup_recertifying"}
    assert seen <= set(g.SAFETY_MODES)


# ----------------------------------------------------------------- stale-state hold

@pytest.fixture(scope="module")
def hold_model():
    model = build_model(model_values(plant_file="double_integrator_2axis"))
    return model, CommandEnvelope(model.safe_set(), model.backup)


def test_hold_predictor_dead_reckons_under_the_fallback(hold_model):
    model, envelope = hold_model
    plant = model.plant
    x0, r = np.array([0.5, -0.3, 0.4, 0.2]), np.array([0.1, -0.2])
    pred = HoldPredictor()
    x_start = x0.copy()
    pred.start(x_start, 10.0)
    x_start[:] = 9.0                                     # the node's buffer moves on: the hold keeps its copy
    # within the first period: the fallback for the last state itself
    res = pred.command(10.0 + 0.5 * plant.dt, plant, envelope, r, "backup_predicted")
    assert pred.steps == 0 and np.allclose(pred.x, x0)
    assert np.allclose(res.u, envelope.fallback(x0, r, "hold_stale").u) and res.reason == "hold_stale"
    # one model step per dt elapsed, each under the fallback for the predicted state
    expected = x0.copy()
    for _ in range(7):
        expected = plant.step(expected, envelope.fallback(expected, r, "hold_stale").u)
    pred.advance(10.0 + 3.2 * plant.dt, plant, envelope, r)         # incremental: 3 steps now, 4 later
    res = pred.command(10.0 + 7.5 * plant.dt, plant, envelope, r, "backup_predicted")
    assert pred.steps == 7 and np.allclose(pred.x, expected, atol=1e-12)
    assert not np.allclose(expected, x0)
    assert np.allclose(res.u, envelope.fallback(expected, r, "hold_stale").u)
    # zero: the envelope's filter of a zero candidate for the predicted state; a new start restarts
    res = pred.command(10.0 + 7.5 * plant.dt, plant, envelope, r, "zero")
    assert np.allclose(res.u, envelope.filter(expected, np.zeros(2), r).u)
    pred.start(x0, 20.0)
    assert pred.steps == 0 and np.allclose(pred.advance(20.0, plant, envelope, r), x0)


# ----------------------------------------------------------------- the control diagnostic

PARAMS = {"inactive_behavior": "fallback", "policy_return_steps": 5, "hold_mode": "zero"}


def test_control_status_levels_and_texts_of_every_mode():
    expected = {
        "inactive": (g.LEVEL_OK, "inactive: fallback"),
        "waiting_for_state": (g.LEVEL_WARN, "waiting for a state"),
        "waiting_for_certificate": (g.LEVEL_WARN, "fallback until the first certification of the weights"),
        "policy": (g.LEVEL_OK, "certified policy in force"),
        "backup_region": (g.LEVEL_WARN, "FALLBACK: state or reference outside the certified region"),
        "returning": (g.LEVEL_WARN, "fallback: 5 qualifying states before the policy acts"),
        "backup_recertifying": (g.LEVEL_WARN, "FALLBACK: re-certifying after a parameter change"),
        "hold_stale": (g.LEVEL_ERROR, "STALE STATE: hold command (zero)"),
        "shutting_down": (g.LEVEL_WARN, "shutting down: fallback until the plant is at rest"),
        "backup_model_mismatch": (g.LEVEL_ERROR, "MODEL MISMATCH: the plant left its declared uncertainty; the "
                                                 "fallback acts and no update is committed"),
    }
    assert set(expected) == set(g.SAFETY_MODES)
    for mode, want in expected.items():
        assert control_status(mode, PARAMS) == want
    assert control_status("inactive", {**PARAMS, "inactive_behavior": "silent"}, UNCONFIGURED) == \
        (g.LEVEL_OK, "unconfigured: silent")
    assert control_status("policy", PARAMS, UNCONFIGURED)[1] == "certified policy in force"
    assert set(g.FALLBACK_MODES) == {"backup_region", "backup_recertifying", "hold_stale", "backup_model_mismatch"}


def test_control_status_state_period_and_policy_interventions():
    assert control_status("policy", PARAMS, dt_measured=0.012, dt=0.01) == (g.LEVEL_OK, "certified policy in force")
    level, text = control_status("policy", PARAMS, dt_measured=0.0130, dt=0.01)
    assert level == g.LEVEL_WARN
    assert text == "certified policy in force; state period 0.0130 s differs from the model dt 0.01 s"
    assert control_status("policy", PARAMS, dt_measured=float("nan"), dt=0.01)[0] == g.LEVEL_WARN
    assert control_status("backup_region", PARAMS, dt_measured=0.05, dt=0.01)[1].startswith("FALLBACK") and \
        "period" not in control_status("backup_region", PARAMS, dt_measured=0.05, dt=0.01)[1]
    level, text = control_status("policy", PARAMS, dt_measured=0.05, policy_interventions=3, dt=0.01)
    assert level == g.LEVEL_ERROR and text.endswith("; ENVELOPE CHANGED 3 CERTIFIED-POLICY COMMANDS")
    assert "state period" in text
    assert control_status("inactive", PARAMS, policy_interventions=1)[0] == g.LEVEL_ERROR


def test_mode_reasons_of_a_state():
    assert g.mode_reason("policy") == "the certified policy acts"
    assert g.mode_reason("backup_region") == "state or reference outside the certified region"
    assert g.mode_reason("returning") == "back in the certified region"
    for mode in ("waiting_for_certificate", "backup_recertifying"):
        assert g.mode_reason(mode) == "state received"


# ----------------------------------------------------------------- compute times, rest

def test_compute_times_ring_buffer_median_and_p99():
    times = ComputeTimes(4)
    assert times.stats() == {"median": None, "p99": None}
    assert times.stats(empty=0.0) == {"median": 0.0, "p99": 0.0}
    times.add(10.0)
    assert times.stats() == {"median": 10.0, "p99": 10.0}
    for v in (1.0, 2.0, 3.0, 4.0, 100.0):
        times.add(v)
    assert times.count == 6 and sorted(times.values()) == [2.0, 3.0, 4.0, 100.0]   # the newest 4
    stats = times.stats()
    assert stats["median"] == 3.5
    assert stats["p99"] == pytest.approx(np.percentile([2.0, 3.0, 4.0, 100.0], 99))


def test_rest_detector_needs_every_state_still_for_states_in_a_row():
    # threshold per entry: speed × scale × dt = 0.01 × [1, 2] × 0.1 = [0.001, 0.002] per step
    rest = RestDetector([1.0, 2.0], dt=0.1, speed=0.01, states=3)
    assert rest.threshold == pytest.approx([1e-3, 2e-3])
    rest.update([0.5, -0.3])                        # the first state: nothing to compare with yet
    assert rest.count == 0
    for k in range(2):
        rest.update([0.5 + 0.0009 * (k + 1), -0.3 - 0.0019 * (k + 1)])
    assert rest.count == 2 and not rest.at_rest
    last = [0.5018, -0.3038]
    rest.update([last[0], last[1] + 0.0021])        # the second entry moved beyond its threshold: start over
    assert rest.count == 0
    for _ in range(3):
        rest.update(np.array([last[0], last[1] + 0.0021]))   # still, far from the origin: at rest all the same
    assert rest.at_rest
    rest.update([last[0] + 0.0011, last[1] + 0.0021])         # the first entry moved
    assert rest.count == 0 and not rest.at_rest


def test_rest_detector_restart_and_defaults():
    rest = RestDetector([1.0], dt=0.05, states=2)
    assert rest.speed == 2e-2 and RestDetector([1.0], 0.05).states == 5
    for _ in range(3):
        rest.update([0.2])
    assert rest.at_rest
    rest.restart()                                  # the shutdown hold counts again from here
    assert rest.count == 0 and not rest.at_rest
    rest.update([0.2])                              # the last state is kept: still counts at once
    rest.update([0.2])
    assert rest.at_rest


def test_rest_detector_for_plant_scales_by_the_region_at_the_plants_dt():
    plant = load_plant("double_integrator")         # region |p| <= 0.8, |v| <= 0.2, dt 0.05
    rest = RestDetector.for_plant(plant, states=1)
    assert rest.threshold == pytest.approx([0.8 * 2e-2 * 0.05, 0.2 * 2e-2 * 0.05])
    two = RestDetector.for_plant(double_integrator_plant(2, dt=0.1, p0_max=0.5, v0_max=0.1), speed=0.1)
    assert two.threshold == pytest.approx([0.005, 0.005, 0.001, 0.001]) and two.states == 5
    rest.update([0.3, 0.0])
    rest.update([0.3 + 0.0007, 0.0])                # below 0.0008
    assert rest.at_rest
    rest.update([0.3 + 0.0016, 0.0])                # 0.0009 > 0.0008
    assert not rest.at_rest


def test_control_counts_of_the_envelopes_part():
    from types import SimpleNamespace as Res
    counts = ControlCounts()
    assert not counts.command("backup", Res(changed=False, distance=0.0, violation=0.0), 1e-6)
    assert not counts.command("backup", Res(changed=True, distance=1e-9, violation=0.0), 1e-6)   # within tol
    assert counts.envelope_changes == 0
    assert not counts.command("backup", Res(changed=True, distance=0.1, violation=0.0), 1e-6)
    assert counts.command("hold", Res(changed=True, distance=0.0, violation=0.2), 1e-6)          # recovery
    assert counts.command("policy", Res(changed=True, distance=0.5, violation=0.3), 1e-6)        # counted apart
    assert (counts.envelope_changes, counts.recovery_commands) == (2, 2)
    assert counts.policy_changed() == 1 and counts.policy_changed() == 2
    assert (counts.policy_interventions, counts.envelope_changes) == (2, 4)
    values = counts.diag_values()
    assert "shutdown_commands" not in values and values["recovery_commands"] == 2
    assert list(values) == ["control_steps", "backup_steps", "hold_commands", "fallbacks", "policy_interventions",
                            "envelope_changes", "recovery_commands", "inactive_commands"]
