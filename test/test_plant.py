"""scpo_ros.plant: the plant file is read into one validated ``Plant``; a bad file is refused by a
``PlantError`` naming its key (one test per class of bad file); the shipped files load; the
equilibrium, the dynamics and the constraint rows hold on random plants; the double integrator
built in code (``double_integrator_plant``) is the shipped double-integrator files' plant."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from plant_strategies import plant_dicts, plants, random_plant, random_plant_dict
from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.plant import (
    PlantError,
    double_integrator_plant,
    load_plant,
    plant_from_dict,
    plant_from_text,
    resolve_source,
    shipped_plants,
    zoh,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("cart_pole", "coupled_two_input", "dc_motor", "double_integrator", "double_integrator_2axis",
           "double_integrator_uncertain", "mass_spring_damper", "pendulum")

# the issue's example file (discrete form)
DI = {"name": "double_integrator", "dt": 0.05, "states": ["position", "velocity"], "inputs": ["acceleration"],
      "A": [[1.0, 0.05], [0.0, 1.0]], "B": [[0.00125], [0.05]], "x_min": [-1.0, -1.0], "x_max": [1.0, 1.0],
      "u_min": [-1.0], "u_max": [1.0], "tracked": ["position"],
      "joints": {"position": {"joint": "axis_0", "field": "position"},
                 "velocity": {"joint": "axis_0", "field": "velocity"}},
      "backup": {"Q": [1.0, 1.0], "R": [10.0]},
      "certified_region": {"x_min": [-0.8, -0.2], "x_max": [0.8, 0.2], "r_max": [0.5]}}


def edited(base=DI, drop=(), **changes):
    d = copy.deepcopy(base)
    for k in drop:
        d.pop(k, None)
    d.update(copy.deepcopy(changes))
    return d


def refused(data, key: str, match: str | None = None) -> PlantError:
    """The file is refused by a PlantError whose key is ``key`` and whose message names it."""
    with pytest.raises(PlantError, match=match) as info:
        plant_from_dict(data, "bad.yaml")
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and "bad.yaml" in str(info.value)
    return info.value


# ====================================================================== the good file

def test_the_issue_example_loads_with_its_fields():
    p = plant_from_dict(DI)
    assert (p.n, p.m, p.nr, p.linear) == (2, 1, 1, True)
    assert p.tracked_index.tolist() == [0]
    assert p.joints == (("axis_0", "position"), ("axis_0", "velocity")) and p.commands is None
    np.testing.assert_array_equal(p.region.lower, [-0.8, -0.2, -0.5])
    np.testing.assert_array_equal(p.region.upper, [0.8, 0.2, 0.5])
    with pytest.raises(ValueError):   # arrays are read-only: nothing downstream edits the plant
        p.A[0, 0] = 2.0
    F, f, names = p.state_rows()
    assert names == ("position<=max", "position>=min", "velocity<=max", "velocity>=min")
    np.testing.assert_array_equal(F @ np.array([0.3, -0.4]) - f, [0.3 - 1, -0.3 - 1, -0.4 - 1, 0.4 - 1])
    Fu, fu, unames = p.input_rows()
    assert unames == ("acceleration<=max", "acceleration>=min") and fu.tolist() == [1.0, 1.0]


def test_region_contains_batches_and_references():
    reg = plant_from_dict(DI).region
    x = np.array([[0.0, 0.0], [0.9, 0.0], [0.0, 0.0]])
    r = np.array([[0.5], [0.0], [0.6]])
    assert reg.contains(x, r).tolist() == [True, False, False]
    assert reg.contains(x, r, slack=0.15).tolist() == [True, True, True]


def test_defaults_unbounded_states_and_no_references():
    d = edited(drop=("x_min", "x_max", "tracked", "backup"), certified_region={"x_min": [-1, -1], "x_max": [1, 1]})
    p = plant_from_dict(d)
    assert np.isinf(p.x_max).all() and p.state_rows()[0].shape == (0, 2)
    assert p.nr == 0 and p.region.r_max.shape == (0,)
    np.testing.assert_array_equal(p.backup_Q, [1.0, 1.0])
    x_ss, u_ss = p.equilibrium(np.zeros((5, 0)))          # nr = 0: references of shape (..., 0)
    assert x_ss.shape == (5, 2) and u_ss.shape == (5, 1)


def test_violations_name_each_constraint():
    d = edited(H=[[1.0, 1.0]], h=[1.5], G=[[1.0]], g=[0.5])
    p = plant_from_dict(d)
    x = np.array([[0.0, 0.0], [1.2, 0.0], [0.9, 0.9], [0.0, -1.1]])
    u = np.array([[0.0], [0.7], [0.0], [-1.2]])
    v = p.violations(x, u)
    assert set(v) == {"position", "velocity", "H", "acceleration", "G"}
    assert v["position"].tolist() == [False, True, False, False]
    assert v["velocity"].tolist() == [False, False, False, True]
    assert v["H"].tolist() == [False, False, True, False]
    assert v["acceleration"].tolist() == [False, False, False, True]
    assert v["G"].tolist() == [False, True, False, False]
    vt = p.violations(torch.as_tensor(x), torch.as_tensor(u))
    assert {k: t.tolist() for k, t in vt.items()} == {k: a.tolist() for k, a in v.items()}
    assert set(p.violations(x)) == {"position", "velocity", "H"}


def test_describe_and_digest():
    text = yaml.safe_dump(DI)
    p = plant_from_text(text, "di.yaml")
    desc = p.describe()
    assert desc["name"] == "double_integrator" and desc["joints"]["velocity"] == {"joint": "axis_0",
                                                                                    "field": "velocity"}
    assert p.digest == plant_from_text(text).digest
    assert p.digest != plant_from_text(text + "\n# a comment\n").digest   # the digest is the file's
    q = plant_from_dict(edited(drop=("x_min", "x_max"), certified_region=DI["certified_region"]))
    assert q.describe()["x_max"] == [".inf", ".inf"] and len(q.digest) == 64   # JSON-safe infinities


def test_commands_map_mirrors_joints():
    p = plant_from_dict(edited(commands={"acceleration": {"joint": "axis_0", "field": "effort"}}))
    assert p.commands == (("axis_0", "effort"),)


# ====================================================================== one test per class of bad file

def test_unknown_key():
    refused(edited(x_maxx=[1.0, 1.0]), "x_maxx", "unknown key")


@pytest.mark.parametrize("key", ["name", "dt", "states", "inputs", "u_min", "u_max", "joints", "certified_region"])
def test_missing_required_key(key):
    refused(edited(drop=(key,)), key, "missing")


def test_missing_dynamics():
    refused(edited(drop=("A",)), "A", "missing")
    refused(edited(drop=("B",)), "B", "missing")


@pytest.mark.parametrize(("changes", "key"), [
    ({"A": [[1.0, 0.05]]}, "A"),
    ({"A": [[1.0, 0.05], [0.0]]}, "A"),
    ({"A": 1.0}, "A"),
    ({"B": [[0.0, 1.0], [0.0, 1.0]]}, "B"),
    ({"c": [0.0]}, "c"),
    ({"x_min": [-1.0]}, "x_min"),
    ({"u_max": 1.0}, "u_max"),
    ({"H": [[1.0, 0.0]], "h": [1.0, 2.0]}, "h"),
    ({"H": [[1.0, 0.0, 0.0]], "h": [1.0]}, "H"),
    ({"H": [[1.0, 0.0]]}, "h"),
    ({"G": [[0.0]], "g": [1.0]}, "G"),
    ({"joints": [["axis_0", "position"]]}, "joints"),
    ({"joints": {"position": {"joint": "a"}, "velocity": {"joint": "a", "field": "velocity"}}}, "joints.position"),
    ({"states": ["position", "position"]}, "states"),
    ({"states": []}, "states"),
    ({"continuous": {"A": [[0, 1], [0, 0]]}}, "continuous"),
    ({"backup": {"Q": [1.0], "R": [1.0]}}, "backup.Q"),
    ({"backup": {"Q": [1.0, 1.0], "S": [1.0]}}, "backup"),
    ({"certified_region": {"x_min": [-0.5, -0.2], "x_max": [0.5, 0.2], "r_max": [0.5, 0.5]}},
     "certified_region.r_max"),
    ({"certified_region": {"x_max": [0.5, 0.2], "r_max": [0.5], "p_max": 1}}, "certified_region"),
])
def test_wrong_shapes(changes, key):
    d = edited(**changes)
    if "continuous" in changes:
        d = edited(d, drop=("A", "B"))
    refused(d, key)


@pytest.mark.parametrize(("changes", "key"), [
    ({"A": [[1.0, math.nan], [0.0, 1.0]]}, "A"),
    ({"B": [[math.inf], [0.05]]}, "B"),
    ({"c": [0.0, math.nan]}, "c"),
    ({"dt": math.nan}, "dt"),
    ({"dt": 0.0}, "dt"),
    ({"dt": True}, "dt"),
    ({"x_max": [1.0, math.nan]}, "x_max"),
    ({"u_max": [math.inf]}, "u_max"),
    ({"h": [math.inf]}, "h"),
    ({"backup": {"Q": [1.0, math.nan], "R": [1.0]}}, "backup.Q"),
    ({"backup": {"Q": [1.0, -1.0], "R": [1.0]}}, "backup.Q"),
    ({"backup": {"Q": [1.0, 1.0], "R": [0.0]}}, "backup.R"),
    ({"certified_region": {"x_min": [-0.5, -math.inf], "x_max": [0.5, 0.2], "r_max": [0.5]}},
     "certified_region.x_min"),
    ({"A": [[1.0, "0.05"], [0.0, 1.0]]}, "A"),
])
def test_nan_inf_and_non_numbers_where_not_allowed(changes, key):
    d = edited(**changes)
    if "h" in changes:
        d["H"] = [[1.0, 0.0]]
    refused(d, key)


@pytest.mark.parametrize(("changes", "key"), [
    ({"x_min": [-1.0, 1.0]}, "x_max"),
    ({"x_min": [-1.0, 2.0], "certified_region": {"x_min": [-0.5, 2.0], "x_max": [0.5, 2.0], "r_max": [0.5]}},
     "x_max"),
    ({"u_min": [1.0]}, "u_max"),
    ({"certified_region": {"x_min": [0.5, -0.2], "x_max": [-0.5, 0.2], "r_max": [0.5]}}, "certified_region.x_max"),
    ({"certified_region": {"x_min": [-0.5, -0.2], "x_max": [0.5, 0.2], "r_min": [0.4], "r_max": [0.3]}},
     "certified_region.r_max"),
])
def test_lower_bound_not_below_upper(changes, key):
    refused(edited(**changes), key, "bound")


@pytest.mark.parametrize(("region", "key"), [
    ({"x_min": [-1.2, -0.2], "x_max": [0.8, 0.2], "r_max": [0.5]}, "certified_region.x_min"),
    ({"x_min": [-0.8, -0.2], "x_max": [0.8, 1.5], "r_max": [0.5]}, "certified_region.x_max"),
    ({"x_min": [-0.8, -0.2], "x_max": [0.8, 0.2], "r_max": [1.5]}, "certified_region.r_max"),
])
def test_region_outside_the_limits(region, key):
    refused(edited(certified_region=region), key)


def test_region_violating_the_state_polytope():
    refused(edited(H=[[1.0, 1.0]], h=[0.5]), "H", "certified region violates")


def test_reference_whose_equilibrium_breaks_the_polytope():
    # region fine (|p + v| <= 0.95 on it), but a reference up to 0.5 and the region's corners reach 1.0
    refused(edited(H=[[1.0, 0.0]], h=[0.9], certified_region={"x_min": [-0.8, -0.2], "x_max": [0.8, 0.2],
                                                             "r_max": [0.95]}), "certified_region.r_max")


def test_reference_needing_an_input_outside_the_input_set():
    # the mass-spring-damper holds r with force k r = 2 r: r = 0.8 needs 1.6 > u_max = 1
    d = edited(drop=("A", "B"), continuous={"A": [[0, 1], [-2, -0.5]], "B": [[0], [1]]},
               certified_region={"x_min": [-0.8, -0.2], "x_max": [0.8, 0.2], "r_max": [0.8]})
    refused(d, "certified_region.r_max", "equilibrium input")


def test_empty_input_set():
    refused(edited(G=[[1.0], [-1.0]], g=[-0.5, -0.5]), "G", "leave no input")


def test_zero_polytope_row():
    refused(edited(H=[[0.0, 0.0]], h=[1.0]), "H", "zero")


def test_unstabilisable_pair():
    # an unstable mode the input cannot reach: x2+ = 1.1 x2, untouched by u
    d = edited(A=[[1.0, 0.0], [0.0, 1.1]], B=[[1.0], [0.0]], tracked=[])
    d["certified_region"] = {"x_min": [-0.5, -0.1], "x_max": [0.5, 0.1]}
    refused(d, "B", "not stabilisable")


def test_stable_uncontrolled_mode_is_accepted():
    d = edited(A=[[1.0, 0.0], [0.0, 0.5]], B=[[1.0], [0.0]], tracked=[],
               certified_region={"x_min": [-0.5, -0.1], "x_max": [0.5, 0.1]})
    assert plant_from_dict(d).n == 2       # stabilisable, not controllable: still fine for an LQR


def test_unreachable_reference():
    # a double integrator cannot hold a nonzero velocity: tracking it has no equilibrium
    refused(edited(tracked=["velocity"]), "tracked", "unreachable")


def test_tracked_names_no_state():
    refused(edited(tracked=["speed"]), "tracked", "not a state")


def test_no_equilibrium():
    # a constant push on the double integrator's velocity cannot be held by an input that does not
    # reach the velocity... here B = 0 in the velocity row: c drives the velocity for ever
    d = edited(A=[[1.0, 0.05], [0.0, 1.0]], B=[[0.05], [0.0]], c=[0.0, 0.01], tracked=[],
               certified_region={"x_min": [-0.5, -0.1], "x_max": [0.5, 0.1]})
    refused(d, "c", "no equilibrium")


@pytest.mark.parametrize(("joints", "key", "match"), [
    ({"position": {"joint": "a", "field": "position"}, "velocity": {"joint": "a", "field": "velocity"},
      "speed": {"joint": "a", "field": "effort"}}, "joints", "names no state"),
    ({"position": {"joint": "a", "field": "position"}}, "joints", "not mapped"),
    ({"position": {"joint": "a", "field": "position"}, "velocity": {"joint": "a", "field": "position"}},
     "joints.velocity", "already mapped"),
    ({"position": {"joint": "a", "field": "position"}, "velocity": {"joint": "a", "field": "acceleration"}},
     "joints.velocity", "field must be one of"),
    ({"position": {"joint": "", "field": "position"}, "velocity": {"joint": "a", "field": "velocity"}},
     "joints.position", "joint must be"),
])
def test_bad_joint_maps(joints, key, match):
    refused(edited(joints=joints), key, match)


def test_bad_command_map():
    refused(edited(commands={"force": {"joint": "a", "field": "effort"}}), "commands", "names no input")


PENDULUM = {"name": "p", "dt": 0.05, "states": ["angle", "rate"], "inputs": ["torque"], "model": "pendulum",
            "params": {"g": 9.81, "tau_max": 30.0}, "x_min": [-math.pi, -8.0], "x_max": [math.pi, 8.0],
            "u_min": [-1.0], "u_max": [1.0],
            "joints": {"angle": {"joint": "p", "field": "position"}, "rate": {"joint": "p", "field": "velocity"}},
            "certified_region": {"x_min": [-0.5, -1.0], "x_max": [0.5, 1.0]}}


class WrongSizeModel:
    """A model whose sizes disagree with the file's names."""
    state_dim, action_dim = 3, 1

    def __init__(self, dt):
        self.dt = dt

    def step(self, x, u):
        return x

    def linearize(self):
        return np.eye(3), np.ones((3, 1)), np.zeros(3)


class FailingModel(WrongSizeModel):
    state_dim, action_dim = 2, 1

    def linearize(self):
        raise RuntimeError("no upright equilibrium here")


class NoStepModel:
    def __init__(self, dt):
        pass

    def linearize(self):
        return np.eye(2), np.ones((2, 1)), np.zeros(2)


@pytest.mark.parametrize(("changes", "key", "match"), [
    ({"model": "segway"}, "model", "no model named 'segway'"),
    ({"model": "scpo_ros.dynamics:Segway"}, "model", "cannot import"),
    ({"model": "no_such_package.mod:Thing"}, "model", "cannot import"),
    ({"model": ""}, "model", "must be a model name"),
    ({"params": {"g": 9.81, "mass": 2.0}}, "params", "mass"),
    ({"params": {"g": 9.81, "tau_max": -1.0}}, "params", "tau_max"),
    ({"params": [9.81]}, "params", "mapping"),
    ({"model": f"{__name__}:WrongSizeModel", "params": {}}, "states", "3 states"),
    ({"model": f"{__name__}:FailingModel", "params": {}}, "model", "no upright equilibrium"),
    ({"model": f"{__name__}:NoStepModel", "params": {}}, "model", "no step"),
])
def test_bad_models(changes, key, match):
    refused(edited(PENDULUM, **changes), key, match)


@pytest.mark.parametrize("key", ["A", "B", "c", "continuous"])
def test_model_with_dynamics_given(key):
    refused(edited(PENDULUM, **{key: DI.get(key, [0.0, 0.0]) if key != "continuous" else {"A": [], "B": []}}),
            key, "model class")


def test_params_without_model():
    refused(edited(params={"g": 9.81}), "params", "only a plant with model")


def test_discrete_and_continuous_together():
    refused(edited(continuous={"A": [[0, 1], [0, 0]], "B": [[0], [1]]}), "A", "not both")


def test_bad_yaml_and_non_mapping(tmp_path):
    for text, match in (("name: [unclosed\n", "not valid YAML"), ("- just\n- a list\n", "mapping"),
                        ("", "mapping")):
        with pytest.raises(PlantError, match=match) as info:
            plant_from_text(text, "bad.yaml")
        assert info.value.key == "" and "bad.yaml" in str(info.value)
    with pytest.raises(PlantError, match="cannot read"):
        load_plant(tmp_path / "absent.yaml")


def test_no_traceback_for_any_mangled_key():
    """Every key of the good file replaced by junk of each type: a PlantError, nothing else."""
    junk = (None, "x", 3, -1.0, [], [[]], {"a": 1}, [None], [["x"]], True)
    for base in (DI, PENDULUM):
        for key in base:
            for value in junk:
                try:
                    plant_from_dict(edited(base, **{key: value}))
                except PlantError:
                    pass


# ====================================================================== shipped files

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_loads_by_name_path_and_package_url(name):
    assert set(SHIPPED) <= set(shipped_plants())
    p = load_plant(name)
    assert p.name == name and Path(p.source) == REPO / "config" / "plants" / f"{name}.yaml"
    q = load_plant(f"package://scpo_ros/config/plants/{name}.yaml")
    assert q.digest == p.digest == load_plant(REPO / "config" / "plants" / f"{name}.yaml").digest
    assert p.region.contains(*np.split(0.5 * (p.region.lower + p.region.upper), [p.n]))


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "pendulum"])
def test_shipped_zoh_matches_scipy(name):
    p = load_plant(name)
    cont = yaml.safe_load(resolve_source(name).read_text())["continuous"]
    Ac, Bc = np.array(cont["A"], float), np.array(cont["B"], float)
    Ad, Bd, *_ = scipy.signal.cont2discrete((Ac, Bc, np.eye(p.n), np.zeros((p.n, p.m))), p.dt, method="zoh")
    np.testing.assert_allclose(p.A, Ad, atol=1e-12)
    np.testing.assert_allclose(p.B, Bd, atol=1e-12)


def test_zoh_of_the_affine_term_is_the_integral_of_the_flow():
    Ac, Bc, cc = np.array([[0.0, 1.0], [-2.0, -0.5]]), np.array([[0.0], [1.0]]), np.array([0.3, -1.0])
    A, B, c = zoh(Ac, Bc, cc, 0.1)
    # c = ∫_0^dt expm(Ac s) ds cc, the same integral as B's with cc as the input column
    ts = np.linspace(0.0, 0.1, 2001)
    integral = np.trapezoid([scipy.linalg.expm(Ac * t) @ cc for t in ts], ts, axis=0)
    np.testing.assert_allclose(c, integral, atol=1e-9)
    np.testing.assert_allclose(A, scipy.linalg.expm(Ac * 0.1), atol=1e-14)


def test_unknown_package_is_a_plant_error():
    with pytest.raises(PlantError, match="not found"):
        load_plant("package://no_such_pkg/config/plants/x.yaml")


def test_pendulum_is_the_model_plant():
    p = load_plant("pendulum")
    assert not p.linear and isinstance(p.model, Pendulum) and p.model_name == "pendulum"
    A, B = Pendulum().linearization()
    np.testing.assert_array_equal(p.A, A)
    np.testing.assert_array_equal(p.B, B)
    np.testing.assert_array_equal(p.c, [0.0, 0.0])
    x, u = np.array([[0.3, -1.0], [0.0, 0.0]]), np.array([[0.2], [0.0]])
    np.testing.assert_array_equal(p.step(x, u), Pendulum().step(x, u))
    np.testing.assert_allclose(p.step(torch.as_tensor(x), torch.as_tensor(u)).numpy(), p.step(x, u), atol=1e-15)


def test_model_by_module_path():
    p = plant_from_dict(edited(PENDULUM, model="scpo_ros.dynamics:Pendulum", params={"tau_max": 20.0}))
    assert p.model.tau_max == 20.0 and p.model.dt == 0.05


# ====================================================================== random plants

@settings(max_examples=60, deadline=None)
@given(plants())
def test_equilibrium_solves_the_plant_and_holds_the_references(p):
    rng = np.random.default_rng(p.n * 7 + p.m)
    r = rng.uniform(p.region.r_min, p.region.r_max, size=(6, p.nr))
    x_ss, u_ss = p.equilibrium(r)
    assert x_ss.shape == (6, p.n) and u_ss.shape == (6, p.m)
    residual = x_ss @ (p.A - np.eye(p.n)).T + u_ss @ p.B.T + p.c
    np.testing.assert_allclose(residual, 0.0, atol=1e-9)
    np.testing.assert_allclose(x_ss[:, p.tracked_index], r, atol=1e-9)
    np.testing.assert_allclose(p.step(x_ss, u_ss), x_ss, atol=1e-9)     # the equilibrium stays put
    Mx, mx, Mu, mu = p.equilibrium_map()
    assert Mx.shape == (p.n, p.nr) and mx.shape == (p.n,) and Mu.shape == (p.m, p.nr) and mu.shape == (p.m,)
    xt, ut = p.equilibrium(torch.as_tensor(r))
    np.testing.assert_allclose(xt.numpy(), x_ss, atol=1e-12)
    np.testing.assert_allclose(ut.numpy(), u_ss, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(plants(), st.integers(0, 2**16))
def test_step_numpy_equals_torch(p, seed):
    rng = np.random.default_rng(seed)
    x, u = rng.normal(size=(3, 4, p.n)), rng.normal(size=(3, 4, p.m))
    nxt = p.step(x, u)
    assert nxt.shape == (3, 4, p.n)
    np.testing.assert_allclose(nxt, x @ p.A.T + u @ p.B.T + p.c, atol=1e-12)
    np.testing.assert_allclose(p.step(torch.as_tensor(x), torch.as_tensor(u)).numpy(), nxt, atol=1e-12)
    f32 = p.step(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(u, dtype=torch.float32))
    assert f32.dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(plant_dicts(), st.integers(0, 2**16))
def test_random_plants_keep_their_promises(d, seed):
    """What the strategies promise the other tests: the region strictly inside the finite limits,
    inside H, the reference box's equilibria inside the limits and their inputs inside U."""
    p = plant_from_dict(d)
    finite = np.isfinite(p.x_max)
    assert np.all(p.region.x_max[finite] < p.x_max[finite]) and np.all(p.region.x_min[finite] > p.x_min[finite])
    rng = np.random.default_rng(seed)
    z = rng.uniform(p.region.lower, p.region.upper, size=(64, p.n + p.nr))
    x, r = z[:, :p.n], z[:, p.n:]
    assert not any(m.any() for m in p.violations(x).values())
    x_ss, u_ss = p.equilibrium(r)
    assert not any(m.any() for m in p.violations(x_ss, u_ss).values())


@settings(max_examples=40, deadline=None)
@given(plants(), st.sampled_from(["x_min", "x_max", "u_min", "u_max"]), st.floats(1e-3, 1.0))
def test_with_limits_tightens_and_refuses_loosening(p, key, amount):
    old = getattr(p, key)
    sign = 1.0 if key.endswith("max") else -1.0
    with pytest.raises(PlantError, match="only tighten") as info:
        p.with_limits(**{key: (old + sign * amount).tolist()})
    assert info.value.key == f"{key}_tight"
    # tightening halfway towards the region (inputs: a hair) is accepted and kept
    if key.startswith("x"):
        target = p.region.x_max if key == "x_max" else p.region.x_min
        new = np.where(np.isfinite(old), old + 0.5 * (target - old), old)
    else:
        new = old - sign * 1e-9
    q = p.with_limits(**{key: new.tolist()})
    np.testing.assert_array_equal(getattr(q, key), new)
    assert q.region == p.region and q.name == p.name
    np.testing.assert_array_equal(q.equilibrium_map()[0], p.equilibrium_map()[0])


def test_with_limits_refuses_a_region_left_outside():
    p = plant_from_dict(DI)
    with pytest.raises(PlantError, match="certified region"):
        p.with_limits(x_max=[0.7, 1.0])
    with pytest.raises(PlantError, match="equilibrium input"):   # an input bound the references need
        plant_from_dict(edited(drop=("A", "B"), continuous={"A": [[0, 1], [-2, -0.5]], "B": [[0], [1]]},
                               u_min=[-2.0], u_max=[2.0])).with_limits(u_max=[0.5])


def test_random_plant_generator_is_reproducible_and_honours_options():
    a, b = random_plant_dict(7), random_plant_dict(7)
    assert a == b
    p = random_plant(3, n=5, m=2, nr=2, affine=True, h_rows=2, g_rows=1, unbounded=1, continuous=False)
    assert (p.n, p.m, p.nr, len(p.h), len(p.g)) == (5, 2, 2, 2, 1)
    assert np.isinf(p.x_max).sum() == 1 and np.abs(p.c).max() > 0
    assert np.all(np.abs(np.linalg.eigvals(random_plant(4, stable=True).A)) < 1)
    assert np.any(np.abs(np.linalg.eigvals(random_plant(4, stable=False).A)) > 1)


# ====================================================================== the double integrator in code

@settings(max_examples=40, deadline=None)
@given(dof=st.integers(1, 3), dt=st.floats(0.01, 0.2), p_max=st.floats(0.5, 5.0), v_max=st.floats(0.5, 5.0),
       u_max=st.floats(0.5, 5.0), q_pos=st.floats(0.1, 100.0), q_vel=st.floats(0.0, 100.0),
       r_act=st.floats(0.01, 100.0), frac=st.floats(0.0, 1.5))
def test_double_integrator_plant_is_the_double_integrator(dof, dt, p_max, v_max, u_max, q_pos, q_vel, r_act, frac):
    # a region beyond the limits (frac > 1) is clipped into them, not refused
    p = double_integrator_plant(dof, dt, p_max, v_max, u_max, q_pos, q_vel, r_act, p0_max=frac * p_max,
                                v0_max=frac * v_max, r_max=frac * p_max)
    di = DoubleIntegrator(dof=dof, dt=dt, p_max=p_max, v_max=v_max, u_max=u_max)
    np.testing.assert_allclose(p.A, di.A, rtol=0, atol=1e-12)
    np.testing.assert_allclose(p.B, di.B, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(p.c, np.zeros(2 * dof))
    assert p.dt == dt
    np.testing.assert_array_equal(p.x_max, [p_max] * dof + [v_max] * dof)
    np.testing.assert_array_equal(p.x_min, [-p_max] * dof + [-v_max] * dof)
    np.testing.assert_array_equal(p.u_max, [u_max] * dof)
    np.testing.assert_array_equal(p.u_min, [-u_max] * dof)
    np.testing.assert_array_equal(p.backup_Q, [q_pos] * dof + [q_vel] * dof)
    np.testing.assert_array_equal(p.backup_R, [r_act] * dof)
    f = min(frac, 1.0)
    np.testing.assert_array_equal(p.region.x_max, [min(frac * p_max, p_max)] * dof + [min(frac * v_max, v_max)] * dof)
    np.testing.assert_array_equal(p.region.x_min, -p.region.x_max)
    np.testing.assert_allclose(p.region.r_max, [f * p_max] * dof, rtol=1e-15)
    np.testing.assert_array_equal(p.region.r_min, -p.region.r_max)
    assert p.nr == dof and p.tracked_index.tolist() == list(range(dof))
    x = np.random.default_rng(dof).normal(size=(5, 2 * dof))
    u = np.random.default_rng(dof + 1).normal(size=(5, dof))
    np.testing.assert_allclose(p.step(x, u), di.step(x, u), atol=1e-12)


def test_double_integrator_plant_names_and_joints():
    one = double_integrator_plant()
    assert one.states == ("position", "velocity") and one.inputs == ("acceleration",)
    assert one.name == "double_integrator" and one.joints == (("axis_0", "position"), ("axis_0", "velocity"))
    two = double_integrator_plant(2)
    assert two.name == "double_integrator_2axis"
    assert two.states == ("position_0", "position_1", "velocity_0", "velocity_1")
    assert two.inputs == ("acceleration_0", "acceleration_1") and two.tracked == two.states[:2]
    assert two.joints == (("axis_0", "position"), ("axis_1", "position"), ("axis_0", "velocity"),
                          ("axis_1", "velocity"))


@pytest.mark.parametrize(("dof", "name"), [(1, "double_integrator"), (2, "double_integrator_2axis")])
def test_double_integrator_plant_equals_the_shipped_files(dof, name):
    ours, shipped = double_integrator_plant(dof), load_plant(name)
    assert ours.name == shipped.name and ours.dt == shipped.dt
    assert (ours.n, ours.m, ours.nr) == (shipped.n, shipped.m, shipped.nr)
    for key in ("A", "B", "c", "x_min", "x_max", "u_min", "u_max", "backup_Q", "backup_R"):
        np.testing.assert_allclose(getattr(ours, key), getattr(shipped, key), rtol=0, atol=1e-15, err_msg=key)
        assert getattr(ours, key).shape == getattr(shipped, key).shape, key
    for key in ("x_min", "x_max", "r_min", "r_max"):
        np.testing.assert_array_equal(getattr(ours.region, key), getattr(shipped.region, key), err_msg=key)
    # the same joints in the same state order: a node reads the same joint_states either way
    assert [j for j in ours.joints] == [j for j in shipped.joints]
    assert ours.tracked_index.tolist() == shipped.tracked_index.tolist()
    from scpo_ros.backup import LQRBackup
    np.testing.assert_allclose(LQRBackup(ours).K, LQRBackup(shipped).K, atol=1e-12)


def test_double_integrator_plant_clips_the_region_into_the_limits():
    p = double_integrator_plant(p_max=0.5)
    np.testing.assert_array_equal(p.backup_Q, [1.0, 1.0])
    np.testing.assert_array_equal(p.backup_R, [10.0])
    assert (p.region.x_max.tolist(), p.region.r_max.tolist()) == ([0.5, 0.2], [0.5])   # p0 shrunk, r kept
    far = double_integrator_plant(2, p0_max=5.0, v0_max=3.0, r_max=2.0)            # no error any more: clipped
    assert far.region.x_max.tolist() == [1.0, 1.0, 1.0, 1.0] and far.region.r_max.tolist() == [1.0, 1.0]
    inner = double_integrator_plant(p0_max=0.3, v0_max=0.1, r_max=0.2)
    assert inner.region.x_max.tolist() == [0.3, 0.1] and inner.region.r_max.tolist() == [0.2]


@pytest.mark.parametrize("dof", [0, -1, 1.5, True, "2"])
def test_double_integrator_plant_refuses_a_dof_that_is_not_a_positive_integer(dof):
    with pytest.raises((PlantError, ValueError, TypeError), match="dof|invalid literal"):
        double_integrator_plant(dof)


@pytest.mark.parametrize(("changes", "key"), [({"dt": 0.0}, "dt"), ({"dt": math.nan}, "dt"), ({"p_max": -1.0}, "x_max"),
                                              ({"u_max": math.inf}, "u_min"), ({"q_pos": -1.0}, "backup.Q"),
                                              ({"r_act": 0.0}, "backup.R"),
                                              ({"p0_max": -0.1}, "certified_region.x_max"),
                                              ({"r_max": math.nan}, "certified_region.r_max")])
def test_double_integrator_plant_refuses_bad_values_naming_the_key(changes, key):
    with pytest.raises(PlantError) as err:
        double_integrator_plant(**changes)
    assert err.value.key == key


# ====================================================================== the pendulum model's safe set

def test_pendulum_safe_set_uses_the_file_limits():
    from scpo_ros.safeguard.invariant_set import pendulum_safe_set
    limits = {"x_min": [-1.0, -6.0], "x_max": [1.0, 6.0], "u_min": [-0.8], "u_max": [0.8]}
    p = plant_from_dict(edited(PENDULUM, **limits))
    ours = p.model.safe_set(p, 0)
    theirs = pendulum_safe_set(Pendulum(theta_max=1.0, theta_dot_max=6.0, a_max=0.8), 0)
    assert ours.name == theirs.name == "pendulum"
    np.testing.assert_array_equal(ours.invariant.H, theirs.invariant.H)
    np.testing.assert_array_equal(ours.invariant.h, theirs.invariant.h)
    np.testing.assert_array_equal(ours.B, theirs.B)
    np.testing.assert_array_equal(ours.u_max, theirs.u_max)
    x = np.random.default_rng(0).uniform([-1.0, -6.0], [1.0, 6.0], size=(16, 2))
    np.testing.assert_array_equal(ours.rhs(x), theirs.rhs(x))
    with pytest.raises(ValueError):    # nonlinear: no late-command set (as today)
        p.model.safe_set(p, 1)


@pytest.mark.parametrize(("changes", "key"), [({"x_min": [-1.0, -8.0], "x_max": [0.5, 8.0]}, "x_min"),
                                              ({"u_min": [-0.5], "u_max": [1.0]}, "u_min"),
                                              ({"H": [[1.0, 1.0]], "h": [9.0]}, "H")])
def test_pendulum_safe_set_refuses_what_its_construction_cannot_hold(changes, key):
    p = plant_from_dict(edited(PENDULUM, **changes))
    with pytest.raises(PlantError) as info:
        p.model.safe_set(p, 0)
    assert info.value.key == key and f"'{key}'" in str(info.value)


# ====================================================================== the documentation's files

def test_the_files_in_docs_plants_md_load():
    import re
    import textwrap
    text = (REPO / "docs" / "plants.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    files = [plant_from_text(b, "docs/plants.md") for b in blocks if b.lstrip().startswith("name:")]
    assert [p.name for p in files] == ["double_integrator", "lift"]
    np.testing.assert_allclose(files[0].A, load_plant("double_integrator").A, atol=1e-6)
    x_ss, u_ss = files[1].equilibrium([[1.0]])     # what the worked example says it prints
    np.testing.assert_allclose(x_ss, [[1.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(u_ss, [[19.62]], atol=1e-9)


def test_a_pickled_plant_is_the_same_read_only_plant():
    import pickle
    p = load_plant("cart_pole")
    p.step(torch.zeros(1, p.n), torch.zeros(1, p.m))          # fills the tensor cache
    q = pickle.loads(pickle.dumps(p))                         # what a worker process receives
    assert q.digest == p.digest and q.states == p.states
    for a in (q.A, q.x_max, q.region.x_max, *q.equilibrium_map()):
        assert not a.flags.writeable
    x, u = np.ones((2, p.n)), np.ones((2, p.m))
    np.testing.assert_allclose(q.step(torch.as_tensor(x), torch.as_tensor(u)).numpy(), p.step(x, u), atol=1e-12)
