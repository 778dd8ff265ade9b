"""scpo_ros.experiments.imitation: the malicious-expert experiment on any plant (smoke runs)."""
import numpy as np
import pytest

from scpo_ros.experiments import imitation
from scpo_ros.plant import PlantError, load_plant, shipped_plants


def tiny(plant="double_integrator", **changes):
    base = dict(plant=plant, seeds=1, updates=6, hidden=(8,), batch=32, eval_states=64, clean_states=128,
                n_samples=8, n_sample_states=16, n_cert_states=32, update_period_s=2.0)
    return imitation.ImitationSettings(**{**base, **changes})


def test_demo_region_widens_the_certified_region_towards_the_limits():
    di = load_plant("double_integrator")
    reg = imitation.demo_region(di, 0.5)
    assert np.allclose(reg.x_max, [0.9, 0.6]) and np.allclose(reg.x_min, [-0.9, -0.6])
    assert np.allclose(reg.r_max, di.region.r_max)
    cart = load_plant("cart_pole")                           # unbounded rail: widened by half-widths
    reg = imitation.demo_region(cart, 0.5)
    assert np.isfinite(reg.x_max).all() and reg.x_max[0] == pytest.approx(1.5 * cart.region.x_max[0])


def test_run_seed_records_what_the_table_prints():
    s = tiny()
    for method in ("scpo", "unconstrained"):
        res = imitation.run_seed(method, 0, s, progress=False)
        assert res["updates"] == s.updates and len(res["history"]["loss"]) == s.updates + 1
        assert 0 <= res["accepted"] <= s.updates
        assert sum(res["decisions"].values()) == s.updates
        # with the 2 s update period the 20 s cycle is malicious from update 5 on
        assert res["history"]["malicious"] == [False] * 5 + [True]
    assert res["accepted"] == s.updates                      # the unconstrained learner commits all


def test_main_refuses_a_bad_plant_file_by_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndt: 0.1\nstates: [a]\ninputs: [u]\nA: [[1.0]]\nB: [[0.1]]\n"
                   "u_min: [-1]\nu_max: [1]\njoints: {a: {joint: j, field: position}}\nbogus: 1\n")
    with pytest.raises(PlantError, match="bogus"):
        imitation.main(["--plant", str(bad), "--seeds", "1", "--updates", "1", "--plot", "", "--no-progress"])


@pytest.mark.slow
@pytest.mark.parametrize("name", shipped_plants())
def test_smoke_every_shipped_plant(name):
    # the acceptance's safety half on a short run: SCPO commits nothing unsafe
    s = tiny(name, updates=12)
    res = imitation.run_seed("scpo", 0, s, progress=False)
    assert res["unsafe_committed"] == 0
