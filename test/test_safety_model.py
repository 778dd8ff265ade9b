"""scpo_ros.safety_model (ROS-free): the safety node's model and the safeguard's envelope on the
generic plant, and the reasons a model is refused."""
import dataclasses
import pickle

import numpy as np
import pytest

from scpo_ros.backup import BackupCertificationError
from scpo_ros.params import MODEL_PARAMS, defaults
from scpo_ros.plant import PlantError
from scpo_ros.rollout import METRICS
from scpo_ros.safety_model import build_model, check_backup_in_safe_set, safeguard_envelope, safety_spec


def values(**changes):
    return defaults(MODEL_PARAMS, **changes)


def test_build_model_from_the_tables_defaults():
    model = build_model(values(hidden=[16, 8], seed=3, n_samples=32, margins=[0.01], late_commands=0))
    plant = model.plant
    assert (plant.n, plant.m, plant.nr) == (2, 1, 1) and plant.region.x_max[0] == 0.8
    assert model.layout.sizes == (3, 16, 8, 1)
    assert model.config.n_samples == 32 and model.config.margins == (0.01,)
    assert model.seed == 3 and model.late_commands == 0
    assert model.safe_set() is model.safe_set()           # built once per process
    two = build_model(values(dof=2))
    assert two.layout.sizes[0] == 6 and two.layout.sizes[-1] == 2


def test_build_model_reads_a_plant_file_and_the_horizon_in_seconds():
    model = build_model(values(plant_file="mass_spring_damper", hidden=[8]))
    assert model.plant.name == "mass_spring_damper" and model.layout.sizes == (3, 8, 1)
    assert model.safety.steps(model.plant.dt) == int(round(model.safety.horizon_s / model.plant.dt))
    # a table that still holds the horizon in steps is read in seconds of the plant's dt
    legacy = {k: v for k, v in values().items() if k != "horizon_s"}
    assert safety_spec({**legacy, "horizon": 40}, model.plant).horizon_s == pytest.approx(40 * model.plant.dt)
    with pytest.raises(PlantError, match="no_such_plant"):
        build_model(values(plant_file="no_such_plant"))


def test_build_model_is_picklable():
    model = build_model(values(dof=2))
    again = pickle.loads(pickle.dumps(model))
    assert again.plant.digest == model.plant.digest and again.layout == model.layout
    np.testing.assert_array_equal(again.backup.K, model.backup.K)
    E, G, F, f = again.safe_set().affine_rows()
    np.testing.assert_allclose(f, model.safe_set().affine_rows()[3])


@pytest.mark.parametrize("changes, error, words", [
    ({"p0_max": 5.0}, ValueError, "p0_max"),                                    # region outside the limits
    ({"p0_max": 0.99, "v0_max": 0.9}, BackupCertificationError, ""),           # the backup cannot certify it
    ({"margins": [0.01, 0.02]}, ValueError, "margins needs 1 or"),
    ({"cert_margins": [0.0] * (len(METRICS) + 1)}, ValueError, "cert_margins"),
    ({"r_act": -1.0}, ValueError, "r_act"),
])
def test_build_model_refuses_with_the_reason(changes, error, words):
    with pytest.raises(error) as exc:
        build_model(values(**changes))
    assert words in str(exc.value)


def test_build_model_refuses_a_missing_limit():
    v = values()
    del v["p_max"]
    with pytest.raises(ValueError, match="p_max"):
        build_model(v)


class _Leaving:
    """A rollout whose backup leaves the safe set (its ``safe_set`` metric is positive)."""

    def __init__(self, *args, **kwargs):
        pass

    def evaluate(self, theta, x0, r):
        class R:
            g = np.array([[-1.0 if m != "safe_set" else 0.01 for m in METRICS]])
        return R()


def test_backup_without_or_leaving_the_safe_set_is_refused(monkeypatch):
    model = build_model(values())
    check_backup_in_safe_set(model)             # the defaults pass

    class NoSafeSet(type(model)):
        def safe_set(self):
            raise ValueError("the maximal control-invariant set is empty")

    broken = NoSafeSet(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})
    with pytest.raises(BackupCertificationError, match="no safe set"):
        check_backup_in_safe_set(broken)
    from scpo_ros import safety_model
    monkeypatch.setattr(safety_model, "PlantRollout", _Leaving)
    with pytest.raises(BackupCertificationError, match="leaves the safe set"):
        check_backup_in_safe_set(model)


def test_safeguard_envelope_of_the_parameters_a_plant_file_and_the_pendulum():
    v = values(plant="double_integrator", solver="auto", boundary_margin=1e-6)
    env = safeguard_envelope(v)
    x = np.array([0.2, -0.1])
    assert np.allclose(env.fallback(x, np.zeros(1)).u, np.clip(build_model(values()).backup(x, np.zeros(1)), -1, 1))
    msd = safeguard_envelope({**v, "plant_file": "mass_spring_damper"})
    assert msd.m == 1
    pend = safeguard_envelope({**v, "plant": "pendulum", "late_commands": 0})
    assert pend.m == 1 and "pendulum" in pend.safe_set.name.lower()
    with pytest.raises(ValueError, match="dof must be 1"):
        safeguard_envelope({**v, "plant": "pendulum", "dof": 2})
