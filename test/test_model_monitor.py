"""The runtime model monitor (``scpo_ros.model_monitor``): a plant inside its declared uncertainty
never trips it, whatever it draws inside (hypothesis); one outside trips it within the trip
rule's count and says after how many transitions; a glitch, a late command or a lost message
is not a model error; it clears after its clear count; the settings refuse nonsense."""
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from plant_strategies import random_plant_dict
from scpo_ros.model_monitor import ModelMonitor, MonitorSettings
from scpo_ros.plant import load_plant, plant_from_dict
from scpo_ros.uncertainty import additive_bound, mismatched_plant


def _declared(seed: int, scale: float = 0.05):
    d = random_plant_dict(seed, n=int(np.random.default_rng(seed).integers(1, 5)), m=2, unbounded=0)
    p0 = plant_from_dict(d)
    rng = np.random.default_rng(seed + 1)
    n, m = p0.n, p0.m
    d["uncertainty"] = {"w_max": (scale * 0.1 * (p0.x_max - p0.x_min)).tolist(),
                        "A_delta": (scale * np.abs(rng.normal(size=(n, n)))).tolist(),
                        "B_delta": (scale * np.abs(rng.normal(size=(n, m)))).tolist()}
    return plant_from_dict(d)


def _run(monitor, true_step, plant, rng, steps, w_scale=1.0, x0=None):
    """Closed loop of random inputs on ``true_step`` (kept inside the box), fed to the monitor."""
    x = rng.uniform(plant.region.x_min, plant.region.x_max) if x0 is None else x0
    changes = []
    for _ in range(steps):
        u = rng.uniform(plant.u_min, plant.u_max)
        w = rng.choice([-1.0, 1.0], size=plant.n) * plant.uncertainty.w_max * w_scale
        x_next = np.clip(true_step(x, u) + w, plant.region.x_min, plant.region.x_max)
        # the clip is the experiment's, not the plant's: judge the unclipped transition
        change = monitor.observe(x, [u], true_step(x, u) + w, plant.dt)
        changes.append(change)
        x = x_next
    return changes


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), mismatch=st.floats(0.0, 1.0))
def test_a_plant_inside_its_declared_uncertainty_never_trips_the_monitor(seed, mismatch):
    plant = _declared(seed)
    true = mismatched_plant(plant, mismatch, seed)
    mon = ModelMonitor(plant, MonitorSettings(tolerance=0.0, trip_count=1, window=1))
    _run(mon, lambda x, u: true.step(x, u), plant, np.random.default_rng(seed), 60)
    assert mon.counts.out_of_bounds == 0 and not mon.tripped and mon.counts.max_ratio <= 1.0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_far_outside_the_declared_uncertainty_trips_within_the_trip_count(seed):
    """A residual twice the declared bound over the whole set (``additive_bound``) on every step:
    out of bounds every time, so it trips at the third transition exactly."""
    plant = _declared(seed)
    offset = 2.0 * additive_bound(plant) + 1e-3
    mon = ModelMonitor(plant, MonitorSettings(window=5, trip_count=3))
    rng = np.random.default_rng(seed)
    changes = _run(mon, lambda x, u: plant.step(x, u) + offset, plant, rng, 30, w_scale=0.0)
    assert mon.counts.out_of_bounds == mon.counts.transitions
    assert mon.tripped and True in changes
    assert changes.index(True) == 2 and mon.counts.detection_delay == 2


def test_nominal_plant_exact_transitions_pass_and_a_small_model_error_trips():
    plant = load_plant("double_integrator")
    rng = np.random.default_rng(0)
    mon = ModelMonitor(plant)
    _run(mon, lambda x, u: plant.step(x, u), plant, rng, 100)
    assert mon.counts.out_of_bounds == 0 and mon.counts.max_ratio < 1e-6
    d = yaml.safe_load(plant.text)
    d["continuous"]["B"] = [[0.0], [1.3]]          # a mass 30 % lighter than the model's
    true = plant_from_dict(d)
    mon = ModelMonitor(plant)
    _run(mon, lambda x, u: true.step(x, u), plant, rng, 20)
    assert mon.tripped


def test_glitches_late_commands_and_lost_messages_are_not_model_errors():
    plant = load_plant("double_integrator")
    mon = ModelMonitor(plant, MonitorSettings(window=10, trip_count=3, clear_steps=5))
    x = np.array([0.2, -0.1])
    u_old, u_new = np.array([0.5]), np.array([-0.7])
    # the command sent for x arrived late: the plant applied the previous one
    assert mon.observe(x, [u_new, u_old], plant.step(x, u_old), plant.dt) is None
    assert mon.counts.out_of_bounds == 0
    # a reset (an episode) once, twice: no trip; and a transition whose stamps are two periods
    # apart is skipped, not judged
    jump = np.array([0.7, 0.3])
    for _ in range(2):
        mon.observe(x, [u_new], jump, plant.dt)
    assert mon.counts.out_of_bounds == 2 and not mon.tripped
    assert mon.observe(x, [u_new], jump, 2.0 * plant.dt) is None and mon.counts.skipped == 1
    assert mon.observe(x, [], jump, plant.dt) is None and mon.counts.skipped == 2
    # the third in the window trips it; clear_steps good transitions clear it
    assert mon.observe(x, [u_new], jump, plant.dt) is True and mon.tripped
    for k in range(5):
        change = mon.observe(x, [u_new], plant.step(x, u_new), plant.dt)
        assert change is (False if k == 4 else None)
    assert not mon.tripped and mon.counts.trips == 1 and mon.counts.clears == 1
    rec = mon.record()
    assert rec["trips"] == 1 and rec["declared"] is False and rec["max_ratio"] > 1.0


def test_non_finite_states_are_out_of_bounds():
    plant = load_plant("double_integrator")
    mon = ModelMonitor(plant, MonitorSettings(window=1, trip_count=1))
    assert mon.observe(np.zeros(2), [np.zeros(1)], np.array([np.nan, 0.0]), plant.dt) is True
    assert mon.record()["max_ratio"] is None


@pytest.mark.parametrize("kwargs,match", [
    ({"tolerance": -0.1}, "tolerance"), ({"floor": 0.0}, "floor"), ({"window": 3, "trip_count": 4}, "trip_count"),
    ({"trip_count": 0}, "trip_count"), ({"clear_steps": 0}, "clear_steps"), ({"tolerance": float("nan")}, "tolerance"),
])
def test_settings_refuse_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MonitorSettings(**kwargs)


def test_pendulum_parameter_mismatch_inside_and_outside_its_range():
    d = yaml.safe_load(load_plant("pendulum").text)
    d["uncertainty"] = {"params": {"tau_max": [27.0, 33.0]}}
    plant = plant_from_dict(d)
    rng = np.random.default_rng(1)
    for mismatch, trips in ((1.0, False), (3.0, True)):
        true = mismatched_plant(plant, mismatch, 4)
        mon = ModelMonitor(plant, MonitorSettings(tolerance=0.0))
        x = np.array([0.3, -0.5])
        for _ in range(40):
            u = rng.uniform(-1, 1, 1)
            x_next = np.asarray(true.step(x[None], u[None]))[0]
            mon.observe(x, [u], x_next, plant.dt)
            x = np.clip(x_next, [-0.5, -1.0], [0.5, 1.0])
        assert mon.tripped is trips, (mismatch, mon.record())
