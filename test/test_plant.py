"""scpo_ros.plant: plant_from_params builds the system, backup, region and safe set the nodes
built themselves before, and refuses bad values naming the parameter."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scpo_ros.backup import InitialSet, LQRBackup
from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.params import BACKUP_PARAMS, PLANT_PARAMS, REGION_PARAMS
from scpo_ros.plant import Plant, plant_from_params
from scpo_ros.safeguard.invariant_set import safe_set_for

DEFAULTS = {s.name: s.default for table in (PLANT_PARAMS, BACKUP_PARAMS, REGION_PARAMS) for s in table}


def node_built(v: dict):
    """What the safety node's ``build_model`` and the learner built from their parameters."""
    system = DoubleIntegrator(dof=int(v["dof"]), dt=v["dt"], p_max=v["p_max"], v_max=v["v_max"], u_max=v["u_max"])
    backup = LQRBackup(system, q_pos=v["q_pos"], q_vel=v["q_vel"], r_act=v["r_act"])
    region = InitialSet(p0_max=v["p0_max"], v0_max=v["v0_max"], r_max=v["r_max"])
    return system, backup, region


def assert_same(plant: Plant, v: dict):
    system, backup, region = node_built(v)
    assert plant.system == system
    assert plant.region == region
    assert plant.backup_weights == (v["q_pos"], v["q_vel"], v["r_act"])
    b = plant.backup()
    np.testing.assert_array_equal(b.K, backup.K)
    np.testing.assert_array_equal(b.P, backup.P)


def test_defaults_build_the_default_plant():
    plant = plant_from_params(DEFAULTS)
    assert plant.system == DoubleIntegrator()
    assert plant.region == InitialSet()
    assert_same(plant, DEFAULTS)
    assert plant.safe_set().late_commands == 1          # the nodes' default


@pytest.mark.parametrize(("change", "late"), [({}, 0), ({}, 1), ({"dof": 2, "dt": 0.02}, 1),
                                              ({"p_max": 2.0, "v_max": 0.5, "u_max": 3.0}, 1)])
def test_the_safe_set_is_the_one_the_nodes_built(change, late):
    v = {**DEFAULTS, **change}
    ours, theirs = plant_from_params(v).safe_set(late), safe_set_for(node_built(v)[0], late_commands=late)
    for a, c in zip(ours.affine_rows(), theirs.affine_rows(), strict=True):
        np.testing.assert_array_equal(a, c)
    assert ours.u_max == theirs.u_max and ours.late_commands == late


@settings(max_examples=50, deadline=None)
@given(dof=st.integers(1, 3), dt=st.floats(0.01, 0.2), p_max=st.floats(0.5, 5.0), v_max=st.floats(0.5, 5.0),
       u_max=st.floats(0.5, 5.0), q_pos=st.floats(0.1, 100.0), q_vel=st.floats(0.0, 100.0),
       r_act=st.floats(0.01, 100.0), frac=st.floats(0.0, 1.0))
def test_plant_equals_what_the_nodes_built(dof, dt, p_max, v_max, u_max, q_pos, q_vel, r_act, frac):
    v = dict(dof=dof, dt=dt, p_max=p_max, v_max=v_max, u_max=u_max, q_pos=q_pos, q_vel=q_vel, r_act=r_act,
             p0_max=frac * p_max, v0_max=frac * v_max, r_max=frac * p_max)
    assert_same(plant_from_params(v), v)


def test_absent_backup_and_region_take_their_defaults():
    limits = {s.name: s.default for s in PLANT_PARAMS}
    plant = plant_from_params({**limits, "p_max": 0.5})   # the default region is not checked: not given
    assert plant.backup_weights == (1.0, 1.0, 10.0) and plant.region == InitialSet()


@pytest.mark.parametrize("name", [s.name for s in PLANT_PARAMS])
def test_a_missing_limit_is_refused_by_name(name):
    v = dict(DEFAULTS)
    del v[name]
    with pytest.raises(ValueError, match=f"parameter {name} is missing"):
        plant_from_params(v)


@pytest.mark.parametrize(("name", "value"), [("dt", 0.0), ("dt", math.nan), ("p_max", -1.0), ("u_max", math.inf),
                                             ("dof", 0), ("dof", 99), ("q_pos", -1.0), ("r_act", 0.0),
                                             ("p0_max", -0.1), ("r_max", math.nan)])
def test_out_of_range_values_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        plant_from_params({**DEFAULTS, name: value})


def test_a_fractional_dof_is_refused_by_name():
    with pytest.raises(ValueError, match="dof"):
        plant_from_params({**DEFAULTS, "dof": 1.5})


@pytest.mark.parametrize(("name", "value", "limit"), [("p0_max", 1.2, "p_max"), ("v0_max", 1.5, "v_max"),
                                                      ("r_max", 1.1, "p_max")])
def test_a_region_outside_the_limits_is_refused_by_name(name, value, limit):
    with pytest.raises(ValueError, match=f"{name} .* above {limit}"):
        plant_from_params({**DEFAULTS, name: value})


def test_the_plant_is_frozen_and_hashable_enough_to_compare():
    a, b = plant_from_params(DEFAULTS), plant_from_params(dict(DEFAULTS))
    assert a == b
    with pytest.raises(AttributeError):
        a.system = DoubleIntegrator(dof=2)
