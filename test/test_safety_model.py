"""scpo_ros.safety_model (ROS-free): the safety node's model and the safeguard's envelope on the
generic plant (its ``plant_file`` with the runtime ``*_tight`` limits), and the reasons a model is
refused."""
import dataclasses
import math
import pickle

import numpy as np
import pytest

from scpo_ros.backup import BackupCertificationError
from scpo_ros.params import MODEL_PARAMS, defaults
from scpo_ros.plant import PlantError, load_plant
from scpo_ros.rollout import METRICS
from scpo_ros.safety_model import build_model, check_backup_in_safe_set, safeguard_envelope, safety_spec


def values(**changes):
    return defaults(MODEL_PARAMS, **changes)


def test_build_model_from_the_tables_defaults():
    model = build_model(values(hidden=[16, 8], seed=3, n_samples=32, margins=[0.01], late_commands=0))
    plant = model.plant
    assert plant.digest == load_plant("double_integrator").digest       # the default plant_file
    assert (plant.n, plant.m, plant.nr) == (2, 1, 1) and plant.region.x_max[0] == 0.8
    assert model.layout.sizes == (3, 16, 8, 1)
    assert model.config.n_samples == 32 and model.config.margins == (0.01,)
    assert model.seed == 3 and model.late_commands == 0
    assert model.safe_set() is model.safe_set()           # built once per process
    two = build_model(values(plant_file="double_integrator_2axis"))
    assert two.layout.sizes[0] == 6 and two.layout.sizes[-1] == 2


def test_build_model_reads_a_plant_file_and_the_horizon_in_seconds():
    model = build_model(values(plant_file="mass_spring_damper", hidden=[8]))
    assert model.plant.name == "mass_spring_damper" and model.layout.sizes == (3, 8, 1)
    assert model.safety.steps(model.plant.dt) == int(round(model.safety.horizon_s / model.plant.dt))
    # horizon_s is seconds whatever the plant's dt; the old ``horizon`` (steps) is not read any more
    spec = safety_spec(values(horizon_s=2.5), model.plant)
    assert spec.horizon_s == 2.5 and spec.steps(model.plant.dt) == int(round(2.5 / model.plant.dt))
    assert build_model(values(horizon_s=1.25)).safety.horizon_s == 1.25
    legacy = {k: v for k, v in values().items() if k != "horizon_s"}
    with pytest.raises(KeyError, match="horizon_s"):
        safety_spec({**legacy, "horizon": 40}, model.plant)
    with pytest.raises(PlantError, match="no_such_plant"):
        build_model(values(plant_file="no_such_plant"))


def test_build_model_tightens_the_plant_and_uses_the_base_it_is_given():
    tight = build_model(values(u_max_tight=[0.9], u_min_tight=[-math.inf], x_max_tight=[0.95, math.inf]))
    assert tight.plant.u_max.tolist() == [0.9] and tight.plant.u_min.tolist() == [-1.0]
    assert tight.plant.x_max.tolist() == [0.95, 1.0] and tight.plant.x_min.tolist() == [-1.0, -1.0]
    # the digest stays the file's (tightening keeps its text); the safe set is the tightened plant's
    default = build_model(values())
    assert tight.plant.digest == default.plant.digest
    assert tight.safe_set() is not default.safe_set()
    assert np.max(tight.safe_set().affine_rows()[3]) != np.max(default.safe_set().affine_rows()[3]) or \
        not np.array_equal(tight.safe_set().affine_rows()[2], default.safe_set().affine_rows()[2])
    # a node reads its file once and passes it as ``base``: plant_file is not read again
    base = load_plant("mass_spring_damper")
    model = build_model(values(plant_file="no_such_plant"), base)
    assert model.plant is base
    half = 0.9 * float(base.u_max[0])
    assert build_model(values(plant_file="no_such_plant", u_max_tight=[half]), base).plant.u_max.tolist() == [half]


def test_build_model_is_picklable():
    model = build_model(values(plant_file="double_integrator_2axis"))
    again = pickle.loads(pickle.dumps(model))
    assert again.plant.digest == model.plant.digest and again.layout == model.layout
    np.testing.assert_array_equal(again.backup.K, model.backup.K)
    E, G, F, f = again.safe_set().affine_rows()
    np.testing.assert_allclose(f, model.safe_set().affine_rows()[3])


@pytest.mark.parametrize("changes, error, words", [
    ({"x_max_tight": [0.7, math.inf]}, PlantError, "certified region"),          # region outside the tightened box
    ({"u_max_tight": [2.0]}, PlantError, "u_max_tight"),                          # loosening
    ({"x_min_tight": [-1.0, math.nan]}, PlantError, "x_min_tight"),              # a NaN
    ({"u_min_tight": [-0.5, -0.5]}, PlantError, "u_min_tight"),                  # wrong length
    ({"u_max_tight": [0.2], "u_min_tight": [-0.2]}, BackupCertificationError, "cannot keep the certified region"),
    ({"x_max_tight": [0.8, 0.2], "x_min_tight": [-0.8, -0.2]}, BackupCertificationError, "position<=max"),
    ({"margins": [0.01, 0.02]}, ValueError, "margins needs 1 or"),
    ({"cert_margins": [0.0] * (len(METRICS) + 1)}, ValueError, "cert_margins"),
])
def test_build_model_refuses_with_the_reason(changes, error, words):
    with pytest.raises(error) as exc:
        build_model(values(**changes))
    assert words in str(exc.value)


class _Leaving:
    """A rollout whose backup leaves the safe set (its ``safe_set`` metric is positive)."""

    robust = False

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


def test_safeguard_envelope_of_a_plant_file_a_tightened_plant_and_the_pendulum():
    from scpo_ros.params import plant_of
    v = values(solver="auto", boundary_margin=1e-6)
    env = safeguard_envelope(v, plant_of(v))
    x = np.array([0.2, -0.1])
    assert np.allclose(env.fallback(x, np.zeros(1)).u, np.clip(build_model(values()).backup(x, np.zeros(1)), -1, 1))
    msd = safeguard_envelope(v, load_plant("mass_spring_damper"))
    assert msd.m == 1
    pend = safeguard_envelope({**v, "late_commands": 0}, load_plant("pendulum"))
    assert pend.m == 1 and "pendulum" in pend.safe_set.name.lower()
    # the envelope is the tightened plant's: its commands keep the tightened input box
    t = {**v, "u_max_tight": [0.5], "u_min_tight": [-0.5]}
    tight = safeguard_envelope(t, plant_of(t))
    far = np.array([0.0, -0.9])
    u = tight.fallback(far, np.zeros(1)).u
    assert np.all(np.abs(u) <= 0.5 + 1e-9)
    assert tight.safe_set is not env.safe_set
