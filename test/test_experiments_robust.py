"""scpo_ros.experiments.robust: the independent check finds what it must, the nominal version
drops exactly the declaration, and a smoke run of the study (slow)."""
import json

import numpy as np
import pytest

from scpo_ros.backup import LQRBackup
from scpo_ros.experiments import robust
from scpo_ros.plant import load_plant
from scpo_ros.policy import MLPLayout
from scpo_ros.rollout import state_set

PLANT = load_plant(robust.STUDY_PLANT)


def test_the_study_plant_declares_what_its_file_says_and_its_nominal_version_nothing():
    u = PLANT.uncertainty
    assert u.declared and np.allclose(u.w_max, [0.000125, 0.005])
    assert u.B_delta[1, 0] == pytest.approx(1.05 * 0.3 * PLANT.dt, rel=1e-6)
    nominal = robust.nominal_version(PLANT)
    assert not nominal.uncertainty.declared
    assert np.array_equal(nominal.A, PLANT.A) and np.array_equal(nominal.B, PLANT.B)
    assert np.array_equal(nominal.region.x_max, PLANT.region.x_max)
    # the true plants of the check lie inside the declaration, those beyond outside it
    for gain in robust.TRUE_GAINS:
        assert abs(gain - 1.0) <= 0.3
    for gain, scale in robust.BEYOND:
        assert abs(gain - 1.0) > 0.3 and scale > 1.0


def test_disturbance_sequences_stay_in_their_box_and_are_what_they_are_named():
    w = np.array([0.1, 0.2])
    rng = np.random.default_rng(0)
    sw = robust.disturbance("switching", 50, 7, w, rng)
    assert np.allclose(np.abs(sw), w)                                  # corners
    const = robust.disturbance("constant", 50, 7, w, rng)
    assert np.allclose(const, const[0]) and np.allclose(np.abs(const), w)
    uni = robust.disturbance("uniform", 50, 7, w, rng)
    assert np.all(np.abs(uni) <= w) and not np.allclose(np.abs(uni), w)


def test_the_independent_check_passes_the_backup_and_catches_an_unsafe_policy():
    backup = LQRBackup(PLANT)
    layout = MLPLayout(3, 1, (8,))
    x0, r = state_set(PLANT, 64, np.random.default_rng(0))
    steps = 100
    safe = robust.true_plant_check(PLANT, backup, layout, layout.initial_parameters(0).numpy(), x0, r, steps)
    assert safe["unsafe_states"] == 0 and safe["states"] == 64 and safe["worst_excess"] < 0.0
    # a residual that adds a constant push of 0.9: the plant leaves its box, the input its limit
    theta = layout.initial_parameters(0).numpy()
    theta[-1] = 0.9                                                    # the last bias: φ ≡ 0.9
    bad = robust.true_plant_check(PLANT, backup, layout, theta, x0, r, steps)
    assert bad["unsafe_states"] > 32 and bad["worst_excess"] > 0.0


@pytest.mark.slow
def test_smoke_study_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "robust.json"
    assert robust.main(["--seeds", "1", "--updates", "6", "--eval-states", "64", "--monitor-episodes", "1",
                        "--no-progress", "--plot", str(tmp_path / "robust.png"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for method in robust.METHODS:
        res = data[method]
        assert res["updates"] == 6 and 0 <= res["accepted"] <= 6
        assert len(res["per_seed"][0]["history"]["loss"]) == 7
    assert "corners" in data["robust"]["per_seed"][0]["covers"]
    assert "no uncertainty declared" in data["nominal"]["per_seed"][0]["covers"]
    cases = data["monitor"]["cases"]
    beyond = [c for c in cases if c["case"] == "beyond" and c["monitor"]]
    assert beyond and all(c["detected_episodes"] == c["episodes"] for c in beyond)
    assert all(c["trips"] == 0 for c in cases if c["case"] == "inside")
    assert (tmp_path / "robust.png").stat().st_size > 1000
    assert "model monitor" in capsys.readouterr().out


def test_a_nominal_certificate_on_the_nominal_models_own_region_is_caught_by_the_check(tmp_path):
    """``--methods nominal --nominal-plant double_integrator``: the nominal model's own region and
    backup, certified nominally: its committed iterates break limits on the true plants (the
    backup itself happens to survive them)."""
    out = tmp_path / "nominal.json"
    assert robust.main(["--methods", "nominal", "--nominal-plant", "double_integrator", "--seeds", "1", "--updates",
                        "3", "--eval-states", "64", "--no-progress", "--plot", "", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"nominal"} and "robust" not in data
    seed = data["nominal"]["per_seed"][0]
    assert seed["accepted"] >= 1 and seed["unsafe_committed"] >= 1
    with pytest.raises(SystemExit, match="not the same model"):
        robust.main(["--methods", "nominal", "--nominal-plant", "mass_spring_damper", "--seeds", "1"])
    with pytest.raises(SystemExit, match="subset"):
        robust.main(["--methods", "bogus", "--seeds", "1"])
