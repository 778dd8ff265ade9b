"""scpo_ros.params: the parameter tables (defaults from the dataclasses, one range per
parameter), ParamSpec.check, compose() and read_only()."""
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scpo_ros import params
from scpo_ros.params import (
    ENVELOPE_PARAMS,
    LIFECYCLE_PARAMS,
    MODEL_PARAMS,
    PLANT_FILE_DEFAULT,
    PLANT_PARAMS,
    POLICY_PARAMS,
    ROLLOUT_PARAMS,
    SCPO_PARAMS,
    SEED,
    STATE_INPUT_PARAMS,
    TIGHTENING,
    ParamSpec,
    compose,
    plant_of,
    read_only,
)
from scpo_ros.plant import PlantError, load_plant
from scpo_ros.policy import MLPLayout
from scpo_ros.residual_scpo import ResidualSCPO
from scpo_ros.rollout import SafetySpec
from scpo_ros.scpo import SCPOConfig

TABLES = {"plant": PLANT_PARAMS, "policy": POLICY_PARAMS, "rollout": ROLLOUT_PARAMS, "scpo": SCPO_PARAMS,
          "envelope": ENVELOPE_PARAMS, "state_input": STATE_INPUT_PARAMS, "lifecycle": LIFECYCLE_PARAMS}
ALL_SPECS = [spec for table in TABLES.values() for spec in table]
NUMERIC = [s for s in ALL_SPECS if s.type in ("int", "double", "int[]", "double[]") and s.min is not None]


def _field_default(cls, name):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.default


def _by_name(table):
    return {s.name: s for s in table}


def test_plant_params_are_the_plant_file_and_the_tightening_arrays():
    specs = _by_name(PLANT_PARAMS)
    assert list(specs) == ["plant_file", "x_min_tight", "x_max_tight", "u_min_tight", "u_max_tight"]
    assert TIGHTENING == ("x_min_tight", "x_max_tight", "u_min_tight", "u_max_tight")
    f = specs["plant_file"]
    assert f.default == PLANT_FILE_DEFAULT == "package://scpo_ros/config/plants/double_integrator.yaml"
    assert f.type == "string" and f.read_only        # read once at start-up: a file may name a model class
    assert load_plant(f.default).digest == load_plant("double_integrator").digest
    for name in TIGHTENING:
        spec = specs[name]
        assert spec.default == [] and spec.type == "double[]", name
        assert not spec.read_only and not spec.finite, name     # changed at run time; ±inf: the file's bound
        assert spec.min is None and spec.max is None, name     # the file's limits bound them, not the table


def test_the_old_plant_parameters_are_gone():
    names = {s.name for s in MODEL_PARAMS + STATE_INPUT_PARAMS + LIFECYCLE_PARAMS}
    gone = {"dof", "dt", "p_max", "v_max", "u_max", "q_pos", "q_vel", "r_act", "p0_max", "v0_max", "r_max",
            "joint_names", "horizon", "plant"}
    assert not names & gone, names & gone
    for table in ("BACKUP_PARAMS", "REGION_PARAMS"):
        assert not hasattr(params, table), table


def test_model_params_are_the_certificates_tables_in_order():
    assert MODEL_PARAMS == PLANT_PARAMS + POLICY_PARAMS + ROLLOUT_PARAMS + SCPO_PARAMS + ENVELOPE_PARAMS
    assert [s.name for s in compose(MODEL_PARAMS)] == [s.name for s in MODEL_PARAMS]


@pytest.mark.parametrize("name", TIGHTENING)
def test_tightening_arrays_accept_inf_and_refuse_nan_and_too_many_entries(name):
    spec = _by_name(PLANT_PARAMS)[name]
    assert spec.check([]) is None
    assert spec.check([math.inf, -math.inf, 0.5, -3.0]) is None         # ±inf: "the file's bound"
    reason = spec.check([0.5, math.nan])
    assert reason and name in reason and "finite" in reason
    reason = spec.check([0.0] * (spec.max_len + 1))
    assert reason and name in reason and "entries" in reason
    assert spec.check([0.0] * spec.max_len) is None


def test_a_finite_array_still_refuses_inf():
    # ``finite=False`` is the tightening arrays' alone: every other double array refuses ±inf
    margins = _by_name(SCPO_PARAMS)["margins"]
    assert margins.finite
    for bad in (math.inf, -math.inf):
        reason = margins.check([bad])
        assert reason and "margins" in reason and "finite" in reason
    assert ParamSpec("a", [], "", ptype="double[]", finite=False).check([math.inf]) is None


def test_rollout_defaults_are_the_safety_spec_defaults():
    # the horizon is in seconds (run in steps of the plant's dt)
    specs, spec = _by_name(ROLLOUT_PARAMS), SafetySpec()
    for name in ("horizon_s", "lyap_alpha", "lyap_eps"):
        assert specs[name].default == getattr(spec, name), name
        assert type(specs[name].default) is float, name
    assert set(specs) == {"horizon_s", "lyap_alpha", "lyap_eps"}


def test_horizon_s_range():
    h = _by_name(ROLLOUT_PARAMS)["horizon_s"]
    assert (h.min, h.max) == (1e-3, 600.0)
    for good in (1e-3, 0.05, SafetySpec().horizon_s, 600.0):
        assert h.check(good) is None, good
        SafetySpec(horizon_s=good)                     # every accepted horizon is a valid SafetySpec
    for bad, word in ((0.0, "minimum"), (-1.0, "minimum"), (600.5, "maximum"), (math.inf, "finite"),
                      (math.nan, "finite")):
        reason = h.check(bad)
        assert reason and "horizon_s" in reason and word in reason, (bad, reason)


# ------------------------------------------------------------------ plant_of


def _arrays(p):
    return {k: getattr(p, k).tolist() for k in ("x_min", "x_max", "u_min", "u_max")}


def test_plant_of_without_tightening_is_the_plant_file():
    shipped = load_plant("double_integrator")
    for values in (params.defaults(MODEL_PARAMS), {}, {"plant_file": ""},
                   params.defaults(PLANT_PARAMS, x_min_tight=[], u_max_tight=[])):
        p = plant_of(values)
        assert p.digest == shipped.digest and _arrays(p) == _arrays(shipped), values
    msd = plant_of(params.defaults(MODEL_PARAMS, plant_file="mass_spring_damper"))
    assert msd.digest == load_plant("mass_spring_damper").digest
    two = plant_of({"plant_file": "package://scpo_ros/config/plants/double_integrator_2axis.yaml"})
    assert (two.n, two.m) == (4, 2)
    with pytest.raises(PlantError, match="no_such_plant"):
        plant_of({"plant_file": "no_such_plant"})


def test_plant_of_uses_the_base_it_is_given():
    # a node reads its plant file once: ``base`` is that plant, ``plant_file`` is not read again
    base = load_plant("mass_spring_damper")
    assert plant_of({"plant_file": "no_such_plant"}, base) is base
    tight = plant_of({"plant_file": "no_such_plant", "u_max_tight": [0.5 * float(base.u_max[0])]}, base)
    assert tight.u_max.tolist() == [0.5 * float(base.u_max[0])]
    assert tight.u_min.tolist() == base.u_min.tolist() and tight.name == base.name


def test_plant_of_tightens_the_limits():
    shipped = load_plant("double_integrator")
    v = params.defaults(MODEL_PARAMS, x_max_tight=[0.9, math.inf], x_min_tight=[-math.inf, -0.5],
                        u_min_tight=[-0.6], u_max_tight=[0.7])
    p = plant_of(v)
    assert _arrays(p) == {"x_min": [-1.0, -0.5], "x_max": [0.9, 1.0], "u_min": [-0.6], "u_max": [0.7]}
    # the rest is the file's: dynamics, weights, certified region
    for name in ("A", "B", "c", "backup_Q", "backup_R"):
        np.testing.assert_array_equal(getattr(p, name), getattr(shipped, name), err_msg=name)
    for name in ("x_min", "x_max", "r_min", "r_max"):
        np.testing.assert_array_equal(getattr(p.region, name), getattr(shipped.region, name), err_msg=name)
    # the file's bound itself, and one array alone, are accepted
    assert plant_of({"x_max_tight": [1.0, 1.0]}).x_max.tolist() == [1.0, 1.0]
    only = plant_of({"u_max_tight": [0.25]})
    assert _arrays(only) == {**_arrays(shipped), "u_max": [0.25]}


@pytest.mark.parametrize(("name", "value"), [("x_max_tight", [1.1, 1.0]), ("x_min_tight", [-1.0, -1.01]),
                                             ("u_max_tight", [2.0]), ("u_min_tight", [-1.5])])
def test_plant_of_refuses_loosening_with_the_key_named(name, value):
    with pytest.raises(PlantError, match="loosen") as err:
        plant_of({name: value})
    assert err.value.key == name and name in str(err.value)


@pytest.mark.parametrize(("name", "value"), [("x_max_tight", [0.9]), ("x_min_tight", [-0.9, -0.9, -0.9]),
                                             ("u_max_tight", [0.5, 0.5]), ("x_max_tight", [0.9, math.nan]),
                                             ("u_min_tight", ["a"])])
def test_plant_of_refuses_a_wrong_length_or_value_with_the_key_named(name, value):
    with pytest.raises(PlantError) as err:
        plant_of({name: value})
    assert err.value.key == name and name in str(err.value)


def test_plant_of_refuses_a_region_outside_the_tightened_box():
    # the shipped region reaches |p| <= 0.8, |v| <= 0.2
    with pytest.raises(PlantError, match="certified region") as err:
        plant_of({"x_max_tight": [0.7, math.inf]})
    assert err.value.key == "certified_region.x_max"
    with pytest.raises(PlantError, match="certified region") as err:
        plant_of({"x_min_tight": [-math.inf, -0.1]})
    assert err.value.key == "certified_region.x_min"
    assert plant_of({"x_max_tight": [0.8, 0.2], "x_min_tight": [-0.8, -0.2]}).x_max.tolist() == [0.8, 0.2]


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
    with pytest.raises(ValueError, match="horizon_s is declared twice"):
        compose(ROLLOUT_PARAMS, (ParamSpec("horizon_s", 2.0, "a node's own horizon", 1e-3, 10.0),))
    with pytest.raises(ValueError, match="declared twice"):
        compose(PLANT_PARAMS, PLANT_PARAMS)


def test_compose_keeps_order_and_replaces_description_and_read_only():
    own = (ParamSpec("rate_hz", 20.0, "rate", 1.0, 1000.0),)
    h = _by_name(ROLLOUT_PARAMS)["horizon_s"]
    new_h = dataclasses.replace(h, description="node-specific words", read_only=True)
    specs = compose(PLANT_PARAMS, ROLLOUT_PARAMS, own, horizon_s=new_h)
    assert [s.name for s in specs] == [s.name for s in PLANT_PARAMS + ROLLOUT_PARAMS] + ["rate_hz"]
    assert _by_name(specs)["horizon_s"] is new_h
    assert _by_name(ROLLOUT_PARAMS)["horizon_s"] is h   # the table itself is untouched


@pytest.mark.parametrize("change", [{"default": 2.0}, {"min": 1e-2}, {"max": 60.0}, {"name": "horizon_s2"},
                                    {"ptype": "int"}])
def test_compose_refuses_a_replacement_that_changes_value_or_range(change):
    h = _by_name(ROLLOUT_PARAMS)["horizon_s"]
    with pytest.raises(ValueError, match="horizon_s"):
        compose(ROLLOUT_PARAMS, horizon_s=dataclasses.replace(h, **change))


def test_compose_may_not_change_the_plant_files_default():
    f = _by_name(PLANT_PARAMS)["plant_file"]
    with pytest.raises(ValueError, match="plant_file"):
        compose(PLANT_PARAMS, plant_file=dataclasses.replace(f, default="pendulum"))
    specs = compose(PLANT_PARAMS, plant_file=dataclasses.replace(f, description="the simulated plant"))
    assert _by_name(specs)["plant_file"].read_only and _by_name(specs)["plant_file"].default == PLANT_FILE_DEFAULT


def test_compose_refuses_replacing_an_unknown_name():
    with pytest.raises(ValueError, match="hidden"):
        compose(PLANT_PARAMS, hidden=POLICY_PARAMS[0])


def test_read_only_marks_every_spec_and_keeps_the_rest():
    frozen = read_only(PLANT_PARAMS + ROLLOUT_PARAMS)
    assert all(s.read_only for s in frozen)
    for a, b in zip(PLANT_PARAMS + ROLLOUT_PARAMS, frozen, strict=True):
        assert dataclasses.replace(a, read_only=True) == b


def test_params_is_ros_free():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(params))
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not names & {"rclpy", "rcl_interfaces", "std_msgs", "sensor_msgs"}, names
