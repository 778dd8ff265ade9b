"""scpo_ros.params: the parameter tables (defaults from the dataclasses, one range per
parameter), ParamSpec.check, compose() and read_only()."""
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scpo_ros import params
from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.params import (
    BACKUP_PARAMS,
    ENVELOPE_PARAMS,
    LIFECYCLE_PARAMS,
    PLANT_PARAMS,
    POLICY_PARAMS,
    REGION_PARAMS,
    ROLLOUT_PARAMS,
    SCPO_PARAMS,
    SEED,
    STATE_INPUT_PARAMS,
    ParamSpec,
    compose,
    read_only,
)
from scpo_ros.plant import load_plant, plant_from_params
from scpo_ros.policy import MLPLayout
from scpo_ros.residual_scpo import ResidualSCPO
from scpo_ros.rollout import SafetySpec
from scpo_ros.scpo import SCPOConfig

TABLES = {"plant": PLANT_PARAMS, "backup": BACKUP_PARAMS, "region": REGION_PARAMS, "policy": POLICY_PARAMS,
          "rollout": ROLLOUT_PARAMS, "scpo": SCPO_PARAMS, "envelope": ENVELOPE_PARAMS,
          "state_input": STATE_INPUT_PARAMS, "lifecycle": LIFECYCLE_PARAMS}
ALL_SPECS = [spec for table in TABLES.values() for spec in table]
NUMERIC = [s for s in ALL_SPECS if s.type in ("int", "double", "int[]", "double[]") and s.min is not None]


def _field_default(cls, name):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.default


def _by_name(table):
    return {s.name: s for s in table}


def test_plant_defaults_are_the_double_integrator_defaults():
    for spec in PLANT_PARAMS:
        assert spec.default == _field_default(DoubleIntegrator, spec.name), spec.name
        assert type(spec.default) is type(_field_default(DoubleIntegrator, spec.name)), spec.name


def test_backup_and_region_defaults_are_the_shipped_double_integrator_file():
    # the tables carry the file's backup: and certified_region: until the nodes read plant_file;
    # the bridge's plant of the defaults is the shipped file's plant
    shipped = load_plant("double_integrator")
    bridged = plant_from_params(params.defaults(PLANT_PARAMS + BACKUP_PARAMS + REGION_PARAMS))
    b, r = _by_name(BACKUP_PARAMS), _by_name(REGION_PARAMS)
    assert shipped.backup_Q.tolist() == [b["q_pos"].default, b["q_vel"].default]
    assert shipped.backup_R.tolist() == [b["r_act"].default]
    assert shipped.region.x_max.tolist() == [r["p0_max"].default, r["v0_max"].default]
    assert shipped.region.r_max.tolist() == [r["r_max"].default]
    for name in ("A", "B", "c", "x_min", "x_max", "u_min", "u_max", "backup_Q", "backup_R"):
        np.testing.assert_allclose(getattr(bridged, name), getattr(shipped, name), atol=1e-12, err_msg=name)
    for name in ("x_min", "x_max", "r_min", "r_max"):
        np.testing.assert_array_equal(getattr(bridged.region, name), getattr(shipped.region, name))
    assert all(isinstance(spec.default, float) for spec in BACKUP_PARAMS + REGION_PARAMS)


def test_rollout_defaults_are_the_safety_spec_defaults():
    # ``horizon`` stays in steps: SafetySpec's horizon_s at the default dt
    specs, spec = _by_name(ROLLOUT_PARAMS), SafetySpec()
    dt = _by_name(PLANT_PARAMS)["dt"].default
    assert specs["horizon"].default == spec.steps(dt) and type(specs["horizon"].default) is int
    assert specs["horizon"].default * dt == pytest.approx(spec.horizon_s)
    for name in ("lyap_alpha", "lyap_eps"):
        assert specs[name].default == getattr(spec, name), name
    assert set(specs) == {"horizon", "lyap_alpha", "lyap_eps"}


def test_scpo_defaults_are_scpo_config_defaults():
    # the node's SCPO is the residual client's: its per-metric margins are the defaults
    config, specs = ResidualSCPO.default_config(), _by_name(SCPO_PARAMS)
    for f in dataclasses.fields(SCPOConfig):
        expected = getattr(config, f.name)
        got = specs[f.name].default
        if f.name in ("margins", "cert_margins"):
            assert got == [float(m) for m in np.atleast_1d(expected)], f.name
        else:
            assert got == expected, f.name
    # every SCPOConfig field is a parameter, plus the two state-sample counts
    assert set(specs) == {f.name for f in dataclasses.fields(SCPOConfig)} | {"n_sample_states", "n_cert_states"}


def test_policy_defaults_are_the_layout_defaults():
    specs = _by_name(POLICY_PARAMS)
    assert specs["hidden"].default == list(_field_default(MLPLayout, "hidden"))
    assert specs["seed"].read_only and specs["seed"].min == SEED.min and specs["seed"].max == SEED.max


def test_the_tables_name_every_parameter_once():
    composed = compose(*TABLES.values())
    assert len(composed) == len({s.name for s in composed}) == len(ALL_SPECS)


def test_every_table_is_a_tuple_of_specs():
    for name, table in TABLES.items():
        assert isinstance(table, tuple) and all(isinstance(s, ParamSpec) for s in table), name


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_every_default_passes_its_own_check(spec):
    assert spec.check(spec.default) is None
    assert spec.type in params.KINDS


@pytest.mark.parametrize("spec", NUMERIC, ids=lambda s: s.name)
def test_out_of_range_and_nan_are_refused_with_the_name(spec):
    array = spec.type.endswith("[]")

    def wrap(v):
        return [v] * max(1, spec.min_len) if array else v

    integer = spec.type.startswith("int")
    below = spec.min - 1 if integer else spec.min - 1e-9 * (1 + abs(spec.min))
    reason = spec.check(wrap(below))
    assert reason and spec.name in reason and "minimum" in reason
    if spec.max is not None:
        above = spec.max + 1 if integer else spec.max + 1e-9 * (1 + abs(spec.max))
        reason = spec.check(wrap(above))
        assert reason and spec.name in reason and "maximum" in reason
    if spec.type.startswith("double"):
        for bad in (math.nan, math.inf, -math.inf):
            reason = spec.check(wrap(bad))
            assert reason and spec.name in reason, bad


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_check_accepts_exactly_the_range(data):
    spec = data.draw(st.sampled_from([s for s in NUMERIC if s.type in ("int", "double")]))
    if spec.type == "int":
        value = data.draw(st.integers(spec.min - 10, spec.max + 10))
    else:
        span = spec.max - spec.min
        value = data.draw(st.floats(spec.min - span, spec.max + span, allow_nan=False))
    inside = spec.min <= value <= spec.max
    assert (spec.check(value) is None) == inside, (spec.name, value)


@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if s.type.endswith("[]")], ids=lambda s: s.name)
def test_array_lengths_are_checked(spec):
    element = spec.default[0] if spec.default else ""
    if spec.max_len is not None:
        reason = spec.check([element] * (spec.max_len + 1))
        assert reason and spec.name in reason and "entries" in reason
    if spec.min_len:
        reason = spec.check([element] * (spec.min_len - 1))
        assert reason and spec.name in reason


@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if s.choices], ids=lambda s: s.name)
def test_choices_are_checked(spec):
    for choice in spec.choices:
        assert spec.check(choice) is None
    reason = spec.check("no_such_choice")
    assert reason and spec.name in reason


def test_type_is_inferred_from_the_default_or_given():
    assert ParamSpec("a", True, "").type == "bool"
    assert ParamSpec("a", 1, "").type == "int"
    assert ParamSpec("a", 1.0, "").type == "double"
    assert ParamSpec("a", "x", "").type == "string"
    assert ParamSpec("a", [1], "").type == "int[]"
    assert ParamSpec("a", (1.0,), "").type == "double[]"
    assert ParamSpec("a", ["x"], "").type == "string[]"
    assert ParamSpec("a", [], "", ptype="double[]").type == "double[]"
    for bad in (ParamSpec("a", [], ""), ParamSpec("a", [True], ""), ParamSpec("a", None, ""),
                ParamSpec("a", [], "", ptype="float")):
        with pytest.raises(TypeError, match="a"):
            _ = bad.type


def test_compose_refuses_a_name_twice():
    with pytest.raises(ValueError, match="dt is declared twice"):
        compose(PLANT_PARAMS, (ParamSpec("dt", 0.02, "the simulator's own dt", 1e-4, 1.0),))
    with pytest.raises(ValueError, match="declared twice"):
        compose(PLANT_PARAMS, PLANT_PARAMS)


def test_compose_keeps_order_and_replaces_description_and_read_only():
    own = (ParamSpec("rate_hz", 20.0, "rate", 1.0, 1000.0),)
    dt = _by_name(PLANT_PARAMS)["dt"]
    new_dt = dataclasses.replace(dt, description="node-specific words", read_only=True)
    specs = compose(PLANT_PARAMS, own, dt=new_dt)
    assert [s.name for s in specs] == [s.name for s in PLANT_PARAMS] + ["rate_hz"]
    assert _by_name(specs)["dt"] is new_dt
    assert _by_name(PLANT_PARAMS)["dt"] is dt           # the table itself is untouched


@pytest.mark.parametrize("change", [{"default": 0.02}, {"min": 1e-3}, {"max": 2.0}, {"name": "dt2"},
                                    {"ptype": "double"}])
def test_compose_refuses_a_replacement_that_changes_value_or_range(change):
    dt = _by_name(PLANT_PARAMS)["dt"]
    with pytest.raises(ValueError, match="dt"):
        compose(PLANT_PARAMS, dt=dataclasses.replace(dt, **change))


def test_compose_refuses_replacing_an_unknown_name():
    with pytest.raises(ValueError, match="hidden"):
        compose(PLANT_PARAMS, hidden=POLICY_PARAMS[0])


def test_read_only_marks_every_spec_and_keeps_the_rest():
    frozen = read_only(PLANT_PARAMS)
    assert all(s.read_only for s in frozen)
    for a, b in zip(PLANT_PARAMS, frozen, strict=True):
        assert dataclasses.replace(a, read_only=True) == b


def test_params_is_ros_free():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(params))
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not names & {"rclpy", "rcl_interfaces", "std_msgs", "sensor_msgs"}, names
