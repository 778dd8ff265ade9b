"""Input validation (scpo_ros/inputs.py): joints by name, state stamps, the reference rule.

Written as an attacker would feed a node: permuted and extra joints, duplicated names,
short arrays, NaN, replayed/old/future stamps, clock jumps, references outside the box.
"""
import array
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scpo_ros.inputs import (
    BAD_LENGTHS,
    BAD_SIZE,
    CLAMPED,
    FUTURE_STAMP,
    MISSING_JOINT,
    NON_FINITE,
    NON_INCREASING_STAMP,
    STALE_STAMP,
    InputMonitor,
    JointMap,
    ReferenceGate,
    StampPeriod,
    StateGate,
    reference_text,
    reject_text,
)

FAST = settings(max_examples=150, deadline=None)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
joint_name = st.text(alphabet="abcdefghij_0123", min_size=1, max_size=6)


def test_module_is_ros_free():
    code = "import sys, scpo_ros.inputs; sys.exit(1 if any(m.startswith('rclpy') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------------- JointMap

@st.composite
def joint_message(draw):
    """(dof, needed joint names, p, v, message names, message positions, velocities):
    the needed joints in a random order among random extra joints."""
    dof = draw(st.integers(1, 4))
    names = draw(st.lists(joint_name, min_size=dof, max_size=dof, unique=True))
    extras = draw(st.lists(joint_name.filter(lambda n: n not in names), max_size=5, unique=True))
    p = draw(st.lists(finite, min_size=dof, max_size=dof))
    v = draw(st.lists(finite, min_size=dof, max_size=dof))
    table = {n: (p[i], v[i]) for i, n in enumerate(names)}
    table.update({n: (draw(finite), draw(finite)) for n in extras})
    order = draw(st.permutations(list(table)))
    return (dof, names, p, v, list(order), array.array("d", [table[n][0] for n in order]),
            array.array("d", [table[n][1] for n in order]))


@FAST
@given(joint_message())
def test_read_by_name_any_order_extra_joints(case):
    dof, names, p, v, msg_names, pos, vel = case
    jm = JointMap.for_axes(dof, names)
    out = np.full(2 * dof, np.nan)
    assert jm.read(msg_names, pos, vel, out) is None
    np.testing.assert_array_equal(out, np.array(p + v))
    # canonical order reads the same
    canon = np.full(2 * dof, np.nan)
    assert jm.read(names, array.array("d", p), array.array("d", v), canon) is None
    np.testing.assert_array_equal(out, canon)


@FAST
@given(joint_message(), st.data())
def test_a_missing_joint_is_always_rejected(case, data):
    dof, names, p, v, msg_names, pos, vel = case
    drop = data.draw(st.sampled_from(names))
    k = msg_names.index(drop)
    del msg_names[k]
    del pos[k]
    del vel[k]
    out = np.zeros(2 * dof)
    assert JointMap.for_axes(dof, names).read(msg_names, pos, vel, out) == MISSING_JOINT
    assert not out.any()


@FAST
@given(joint_message(), st.data(), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_needed_value_rejected_and_out_untouched(case, data, bad):
    dof, names, p, v, msg_names, pos, vel = case
    target = data.draw(st.sampled_from(["position", "velocity"]))
    k = msg_names.index(data.draw(st.sampled_from(names)))
    (pos if target == "position" else vel)[k] = bad
    out = np.arange(2.0 * dof)
    assert JointMap.for_axes(dof, names).read(msg_names, pos, vel, out) == NON_FINITE
    np.testing.assert_array_equal(out, np.arange(2.0 * dof))


@FAST
@given(joint_message(), st.sampled_from([math.nan, math.inf]))
def test_non_finite_extra_joint_is_ignored(case, bad):
    dof, names, p, v, msg_names, pos, vel = case
    msg_names.append("zz_extra")
    pos.append(bad)
    vel.append(bad)
    out = np.zeros(2 * dof)
    assert JointMap.for_axes(dof, names).read(msg_names, pos, vel, out) is None
    np.testing.assert_array_equal(out, np.array(p + v))


@FAST
@given(joint_message(), st.data())
def test_short_or_long_arrays_rejected(case, data):
    dof, names, p, v, msg_names, pos, vel = case
    which = data.draw(st.sampled_from(["pos_short", "vel_short", "pos_long", "vel_long", "vel_empty"]))
    if which == "pos_short":
        pos.pop()
    elif which == "vel_short":
        vel.pop()
    elif which == "pos_long":
        pos.append(0.0)
    elif which == "vel_long":
        vel.append(0.0)
    else:
        vel = array.array("d")
    out = np.zeros(2 * dof)
    assert JointMap.for_axes(dof, names).read(msg_names, pos, vel, out) == BAD_LENGTHS
    assert not out.any()


def test_duplicated_needed_joint_rejected_duplicated_extra_ignored():
    jm = JointMap.for_axes(2)
    out = np.zeros(4)
    # axis_0 twice with different values: which one is the state? reject
    assert jm.read(["axis_0", "axis_1", "axis_0"], [1.0, 2.0, 9.0], [3.0, 4.0, 9.0], out) == BAD_LENGTHS
    assert jm.read(["axis_1", "w", "axis_0", "w"], [2.0, 0.0, 1.0, 5.0], [4.0, 0.0, 3.0, 5.0], out) is None
    np.testing.assert_array_equal(out, [1.0, 2.0, 3.0, 4.0])


def test_default_axis_names_and_swapped_order():
    jm = JointMap.for_axes(2, [])
    assert jm.joints == ("axis_0", "axis_1")
    out = np.zeros(4)
    assert jm.read(["axis_1", "axis_0"], array.array("d", [0.2, 0.1]), array.array("d", [-2.0, -1.0]), out) is None
    np.testing.assert_array_equal(out, [0.1, 0.2, -1.0, -2.0])
    # positional reading (the old behaviour) would have swapped the axes
    assert jm.read(["joint_a", "joint_b"], [0.1, 0.2], [0.0, 0.0], out) == MISSING_JOINT
    assert jm.read([], [], [], out) == MISSING_JOINT


def test_cache_reused_for_the_same_names_and_redone_when_they_change():
    jm = JointMap.for_axes(2, ["a", "b"])
    out = np.zeros(4)
    for k in range(5):
        # a fresh list object with equal content every time, as rclpy delivers it
        assert jm.read(list(["b", "x", "a"]), [1.0 + k, 0.0, 2.0], [3.0, 0.0, 4.0], out) is None
    assert jm.lookups == 1
    np.testing.assert_array_equal(out, [2.0, 5.0, 4.0, 3.0])
    assert jm.read(("a", "b"), (7.0, 8.0), (9.0, 10.0), out) is None   # tuple, new order
    np.testing.assert_array_equal(out, [7.0, 8.0, 9.0, 10.0])
    assert jm.lookups == 2
    # the cached names are a copy: mutating the caller's list after a read does not poison the cache
    names = ["a", "b"]
    assert jm.read(names, [1.0, 2.0], [3.0, 4.0], out) is None
    names[0], names[1] = "b", "a"
    assert jm.read(names, [1.0, 2.0], [3.0, 4.0], out) is None
    np.testing.assert_array_equal(out, [2.0, 1.0, 4.0, 3.0])
    # a cached rejection stays a rejection
    assert jm.read(["a"], [1.0], [1.0], out) == MISSING_JOINT
    assert jm.read(["a"], [1.0], [1.0], out) == MISSING_JOINT


def test_general_entries_effort_and_read_msg():
    # a plant whose state is (q1 position, q1 effort, q0 velocity): the plant file's joints: map
    jm = JointMap([("q1", "position"), ("q1", "effort"), ("q0", "velocity")])
    assert jm.fields == ("position", "velocity", "effort")

    class Msg:   # JointState-like, no rclpy needed
        name = ["q0", "q1"]
        position = array.array("d", [1.0, 2.0])
        velocity = array.array("d", [3.0, 4.0])
        effort = array.array("d", [5.0, 6.0])

    out = np.zeros(3)
    assert jm.read_msg(Msg, out) is None
    np.testing.assert_array_equal(out, [2.0, 6.0, 3.0])
    Msg.effort = array.array("d")        # effort needed but empty
    assert jm.read_msg(Msg, out) == BAD_LENGTHS
    # effort not needed: an empty effort array is fine
    out4 = np.zeros(4)
    assert JointMap.for_axes(2, ["q0", "q1"]).read_msg(Msg, out4) is None


@pytest.mark.parametrize("name", ["double_integrator", "double_integrator_2axis", "mass_spring_damper", "pendulum",
                                  "cart_pole", "coupled_two_input", "dc_motor"])
def test_for_plant_reads_the_plant_files_joints_map(name):
    from scpo_ros.plant import load_plant
    plant = load_plant(name)
    jm = JointMap.for_plant(plant)
    assert jm.entries == tuple(plant.joints) and jm.size == plant.n
    # a message of the plant's joints, in reverse order with an extra joint: each entry from its joint's field
    joints = list(dict.fromkeys(j for j, _ in plant.joints))[::-1] + ["extra"]
    value = {(j, f): 10.0 * i + k for i, j in enumerate(joints) for k, f in enumerate(("position", "velocity",
                                                                                       "effort"))}
    arrays = [array.array("d", [value[(j, f)] for j in joints]) for f in ("position", "velocity", "effort")]
    out = np.full(plant.n, np.nan)
    assert jm.read(joints, arrays[0], arrays[1], out, arrays[2]) is None
    np.testing.assert_array_equal(out, [value[e] for e in plant.joints])
    assert jm.read(joints[1:], arrays[0][1:], arrays[1][1:], out, arrays[2][1:]) == MISSING_JOINT


def test_for_plant_of_the_double_integrator_is_for_axes():
    from scpo_ros.plant import double_integrator_plant, load_plant
    assert JointMap.for_plant(load_plant("double_integrator")).entries == JointMap.for_axes(1).entries
    for dof in (1, 2, 3):
        assert JointMap.for_plant(double_integrator_plant(dof)).entries == JointMap.for_axes(dof).entries


@pytest.mark.parametrize("dof,names,match", [
    (2, ["a"], "1 entries"), (1, ["a", "b"], "2 entries"), (2, ["a", "a"], "more than once"),
    (0, [], "positive"), (2, ["a", ""], "non-empty"),
])
def test_for_axes_validation(dof, names, match):
    with pytest.raises(ValueError, match=match):
        JointMap.for_axes(dof, names)


@pytest.mark.parametrize("entries,match", [
    ([], "at least one"), ([("a", "torque")], "field must be one of"),
    ([("a", "position"), ("a", "position")], "more than one state entry"), ([("a",)], "expected"),
])
def test_entries_validation(entries, match):
    with pytest.raises(ValueError, match=match):
        JointMap(entries)


# ------------------------------------------------------------------------ StateGate

increments = st.lists(st.floats(min_value=1e-4, max_value=0.2), min_size=1, max_size=40)


@FAST
@given(st.floats(min_value=0.0, max_value=1e6), increments, st.floats(min_value=0.0, max_value=0.04))
def test_increasing_fresh_stamps_all_accepted(t0, steps, latency):
    gate = StateGate(max_age=0.5, future_tolerance=0.05)
    t = t0
    for dt in steps:
        t += dt
        assert gate.check(t, t + latency) is None
    assert gate.accepted == len(steps) and sum(gate.rejected.values()) == 0 and gate.jumps == 0


@FAST
@given(st.floats(min_value=0.0, max_value=1e3), increments, st.data(),
       st.sampled_from([0.0, 0.5]), st.booleans())
def test_any_replay_of_an_earlier_stamp_rejected(t0, steps, data, max_age, clock_valid):
    gate = StateGate(max_age=max_age, future_tolerance=0.05)
    stamps = list(np.cumsum([t0] + steps))
    now = stamps[-1]
    for s in stamps:
        assert gate.check(s, s if clock_valid else None) is None
    replay = data.draw(st.sampled_from(stamps))
    accepted = gate.accepted
    reason = gate.check(replay, now if clock_valid else None)
    assert reason in (NON_INCREASING_STAMP, STALE_STAMP)
    assert gate.accepted == accepted and gate.last_stamp == stamps[-1]
    # the next genuine state goes through: the replay left no trace in the history
    assert gate.check(now + 0.01, now + 0.01 if clock_valid else None) is None


@FAST
@given(st.floats(min_value=0.0, max_value=1e6), st.floats(min_value=0.1, max_value=5.0),
       st.floats(min_value=1e-3, max_value=1e4))
def test_stale_and_future_stamps(now, max_age, beyond):
    gate = StateGate(max_age=max_age, future_tolerance=0.05)
    assert gate.check(now - max_age - beyond, now) == STALE_STAMP
    assert gate.check(now + 0.05 + beyond, now) == FUTURE_STAMP
    assert gate.accepted == 0
    assert gate.rejected[STALE_STAMP] == 1 and gate.rejected[FUTURE_STAMP] == 1
    # just inside the bounds is accepted (stamps increasing; 1e-6 absorbs the rounding of now -+ bound)
    assert gate.check(now - max_age + 1e-6, now) is None
    assert gate.check(now + 0.05 - 1e-6, now) is None


def test_age_check_disabled_and_clock_not_valid():
    gate = StateGate(max_age=0.0, future_tolerance=0.05)
    assert gate.check(1.0, 1e6) is None          # very old but increasing: max_age 0 accepts
    assert gate.check(1e6 + 1.0, 1e6) == FUTURE_STAMP   # the future check still applies
    gate = StateGate(max_age=0.5, future_tolerance=0.05)
    assert gate.check(123.0, None) is None       # use_sim_time, no /clock yet: ordering only
    assert gate.check(123.0, None) == NON_INCREASING_STAMP
    assert gate.check(123.5, float("nan")) is None   # a non-finite now counts as not valid


@FAST
@given(st.floats(min_value=10.0, max_value=1e5), st.floats(min_value=1e-3, max_value=9.0), increments)
def test_receiving_clock_backwards_resets_and_fresh_states_are_accepted(t_end, back, steps):
    """A bag loop or a simulator restart with /clock: the receiving clock and the stamps
    go back together; the gate resets instead of rejecting every state from then on."""
    gate = StateGate(max_age=0.5, future_tolerance=0.05)
    assert gate.check(t_end, t_end) is None
    t = t_end - back
    for k, dt in enumerate(steps):
        t += min(dt, back / (len(steps) + 1))     # stay below the old stamps
        assert t < t_end
        assert gate.check(t, t) is None
        if k == 0:
            assert gate.jumps == 1 and gate.last_jump == pytest.approx(t - t_end)
            assert gate.last_jump_source == "receive_clock"
    assert gate.jumps == 1 and gate.accepted == 1 + len(steps)


def test_clock_jump_does_not_let_stale_replays_in():
    gate = StateGate(max_age=0.5, future_tolerance=0.05)
    assert gate.check(100.0, 100.0) is None
    # clock went back to 10: a message stamped from before (old epoch, 99) is future, one at 5 is stale
    assert gate.check(99.0, 10.0) == FUTURE_STAMP
    assert gate.jumps == 1
    assert gate.check(5.0, 10.0) == STALE_STAMP
    assert gate.check(10.0, 10.0) is None
    assert gate.check(10.0, 10.01) == NON_INCREASING_STAMP   # history restarted at 10: a duplicate
    assert gate.jumps == 1


def test_stamp_stream_restart_without_age_check_recovers_but_single_replay_does_not():
    gate = StateGate(max_age=0.0, future_tolerance=0.05, jump_threshold=1.0, restart_confirm=3)
    for s in (50.0, 50.1, 50.2):
        assert gate.check(s, None) is None
    # one stray old message (a replay) is rejected, the stream goes on
    assert gate.check(3.0, None) == NON_INCREASING_STAMP
    assert gate.check(50.3, None) is None
    # the publisher restarts its clock: two states rejected, the third starts the new stream
    assert gate.check(0.1, None) == NON_INCREASING_STAMP
    assert gate.check(0.2, None) == NON_INCREASING_STAMP
    assert gate.check(0.3, None) is None
    assert gate.jumps == 1 and gate.last_jump == pytest.approx(0.3 - 50.3) and gate.last_jump_source == "stamp_stream"
    assert gate.check(0.4, None) is None
    assert gate.check(50.3, None) is None   # the old epoch is now simply "later"


def test_far_future_stamp_cannot_block_the_stream_forever():
    """With no valid clock a single stamp far in the future is accepted (nothing to compare
    with), but the genuine stream takes over after restart_confirm states."""
    gate = StateGate(max_age=0.5, future_tolerance=0.05)
    assert gate.check(1.0, None) is None
    assert gate.check(1e12, None) is None
    results = [gate.check(1.0 + 0.01 * k, None) for k in range(1, 6)]
    assert results == [NON_INCREASING_STAMP, NON_INCREASING_STAMP, None, None, None]


def test_small_backward_steps_of_stamps_never_restart():
    gate = StateGate(max_age=0.0, future_tolerance=0.05, jump_threshold=1.0)
    assert gate.check(10.0, None) is None
    # increasing among themselves but within jump_threshold of the last accepted: reordering, rejected
    assert [gate.check(s, None) for s in (9.5, 9.6, 9.7, 9.8, 9.9, 10.0)] == [NON_INCREASING_STAMP] * 6
    assert gate.jumps == 0 and gate.rejected[NON_INCREASING_STAMP] == 6


def test_reset_forgets_history_keeps_counters():
    gate = StateGate(max_age=0.5, future_tolerance=0.05)
    assert gate.check(5.0, 5.0) is None
    assert gate.check(5.0, 5.0) == NON_INCREASING_STAMP
    gate.reset()
    assert gate.last_stamp is None
    assert gate.check(4.9, 4.9) is None     # and no clock jump reported for the earlier now
    assert gate.jumps == 0 and gate.accepted == 2 and gate.rejected[NON_INCREASING_STAMP] == 1


@pytest.mark.parametrize("kwargs", [dict(max_age=-1.0, future_tolerance=0.05),
                                    dict(max_age=0.5, future_tolerance=math.nan),
                                    dict(max_age=0.5, future_tolerance=0.05, restart_confirm=0)])
def test_state_gate_validation(kwargs):
    with pytest.raises(ValueError):
        StateGate(**kwargs)


# -------------------------------------------------------------------- ReferenceGate

@st.composite
def box_and_reference(draw):
    dof = draw(st.integers(1, 4))
    lo = np.array(draw(st.lists(st.floats(-10, 10), min_size=dof, max_size=dof)))
    width = np.array(draw(st.lists(st.floats(0, 10), min_size=dof, max_size=dof)))
    r = draw(st.lists(st.floats(-1e9, 1e9), min_size=dof, max_size=dof))
    return lo, lo + width, r


@FAST
@given(box_and_reference())
def test_reference_clamped_into_the_box(case):
    lo, hi, r = case
    gate = ReferenceGate(lo, hi)
    out = np.full(lo.size, np.nan)
    reason = gate.apply(array.array("d", r), out)
    assert np.all((lo <= out) & (out <= hi))
    inside = bool(np.all((lo <= np.array(r)) & (np.array(r) <= hi)))
    assert reason == (None if inside else CLAMPED)
    assert gate.clamped == (0 if inside else 1)
    if inside:
        np.testing.assert_array_equal(out, r)
    # a clamp is the nearest point of the box: each entry moves only to its violated bound
    np.testing.assert_array_equal(out, np.clip(r, lo, hi))


@FAST
@given(box_and_reference(), st.data())
def test_bad_reference_keeps_the_last_valid(case, data):
    lo, hi, r = case
    gate = ReferenceGate(lo, hi)
    out = np.zeros(lo.size)
    gate.apply(r, out)
    last = out.copy()
    bad = list(r)
    kind = data.draw(st.sampled_from(["nan", "inf", "short", "long"]))
    if kind in ("nan", "inf"):
        bad[data.draw(st.integers(0, len(bad) - 1))] = math.nan if kind == "nan" else -math.inf
        expected = NON_FINITE
    elif kind == "short":
        bad = bad[:-1]
        expected = BAD_SIZE
    else:
        bad = bad + [0.0]
        expected = BAD_SIZE
    assert gate.apply(bad, out) == expected
    np.testing.assert_array_equal(out, last)
    assert gate.rejected[expected] == 1 and gate.accepted == 1


def test_reference_attack_values():
    gate = ReferenceGate([-0.8], [0.8])
    out = np.zeros(1)
    assert gate.apply([-5.0], out) == CLAMPED and out[0] == -0.8
    assert gate.apply([0.3], out) is None and out[0] == 0.3
    assert gate.apply(["x"], out) == BAD_SIZE and out[0] == 0.3
    assert gate.apply(None, out) == BAD_SIZE
    assert gate.apply([1e308 * 10], out) == NON_FINITE and out[0] == 0.3
    assert gate.clamped == 1 and gate.accepted == 2


@pytest.mark.parametrize("lo,hi", [([0.0], [-1.0]), ([0.0, 0.0], [1.0]), ([math.nan], [1.0])])
def test_reference_gate_validation(lo, hi):
    with pytest.raises(ValueError):
        ReferenceGate(lo, hi)


def test_reference_gate_of_a_plant_without_tracked_states_takes_only_the_empty_reference():
    gate, out = ReferenceGate([], []), np.zeros(0)
    assert gate.apply([], out) is None and gate.accepted == 1
    assert gate.apply([0.0], out) == BAD_SIZE and gate.apply([math.nan], out) == BAD_SIZE
    assert gate.contains([]) and not gate.contains([0.0])


# --------------------------------------------------------------------- texts, the stream

def test_reject_and_reference_texts():
    texts = {reason: reject_text(reason, ("a", "b"), 0.25, 0.05) for reason in
             (MISSING_JOINT, BAD_LENGTHS, NON_FINITE, NON_INCREASING_STAMP, STALE_STAMP, FUTURE_STAMP)}
    assert texts == {MISSING_JOINT: "needs joints ('a', 'b')",
                     BAD_LENGTHS: "a needed field (position, velocity, effort) does not match the names, "
                                  "or a joint is named twice",
                     NON_FINITE: "NaN or Inf", NON_INCREASING_STAMP: "stamp not newer than the last accepted one",
                     STALE_STAMP: "stamp older than max_state_age = 0.25 s",
                     FUTURE_STAMP: "stamp more than future_tolerance = 0.05 s ahead"}
    assert reject_text("bad_stamp", ("a",), 0.25, 0.05) == "bad_stamp"
    assert reference_text(CLAMPED, array.array("d", [2.0, 0.1]), [-0.5, -0.25], [0.5, 0.75]) == \
        "reference [2.0, 0.1]: clamped (clamped into the certified reference box [-0.5, 0.5], [-0.25, 0.75])"
    assert reference_text(BAD_SIZE, list(range(10)), (-0.5,), (0.5,)) == \
        "reference [0, 1, 2, 3, 4, 5, 6, 7]: bad_size (kept the last valid, in the certified reference box [-0.5, 0.5])"


def monitor():
    gate = StateGate(0.25, 0.05)
    refs = ReferenceGate([-0.5, -0.5], [0.5, 0.5])
    return InputMonitor(JointMap.for_axes(2), gate, refs), gate, refs


def test_input_monitor_reports_a_new_reason_at_once_and_counts_at_most_at_2_hz():
    mon, _, _ = monitor()
    assert mon.reject(MISSING_JOINT, 100.0) and mon.last_reason == MISSING_JOINT
    mon.status(100.0, False)                       # reported
    assert not mon.reject(MISSING_JOINT, 100.2)          # the same reason within 0.5 s: counted only
    assert mon.reject(NON_FINITE, 100.3) and mon.last_reason == NON_FINITE   # a new reason: at once
    mon.status(100.3, False)
    assert not mon.reject(MISSING_JOINT, 100.5) and mon.last_reason == NON_FINITE
    assert mon.reject(MISSING_JOINT, 100.8) and mon.last_reason == MISSING_JOINT
    assert mon.bad_states == 5 and mon.rejected == {MISSING_JOINT: 4, NON_FINITE: 1}
    assert mon.counts()["rejected_states"] == {MISSING_JOINT: 4, NON_FINITE: 1}


def test_input_monitor_status_texts():
    mon, gate, refs = monitor()
    assert mon.status(0.0, False) == (0, "inputs valid")
    assert mon.counts() == {"rejected_states": {}, "clamped_references": 0, "bad_references": 0, "clock_jumps": 0}
    assert mon.status(0.0, True) == \
        (1, "use_sim_time is set but no /clock has arrived: stamp ages are not checked")
    out = np.zeros(2)
    refs.apply([0.9, 0.0], out)
    refs.apply([math.nan, 0.0], out)
    assert mon.status(0.0, False) == \
        (1, "1 references clamped into the certified reference box, 1 malformed kept the last valid")
    mon.reject(STALE_STAMP, 1.0)
    level, text = mon.status(1.0, False)
    assert level == 1 and text == ("1 joint_states rejected (last: stale_stamp: stamp older than max_state_age = "
                                   "0.25 s); 1 references clamped into the certified reference box, 1 malformed kept "
                                   "the last valid")
    gate.max_age = 0.5                                   # the gate's settings, as they are now
    gate.check(100.0, 100.0)
    gate.check(50.0, 50.0)                              # the receiving clock jumped back
    assert gate.jumps == 1
    level, text = mon.status(2.0, False)
    assert text.startswith("1 joint_states rejected (last: stale_stamp: stamp older than max_state_age = 0.5 s)")
    assert text.endswith("; 1 clock jumps (stamp history reset)")
    assert mon.counts() == {"rejected_states": {STALE_STAMP: 1}, "clamped_references": 1, "bad_references": 1,
                            "clock_jumps": 1}


def test_stamp_period_is_an_average_of_increasing_stamps():
    period = StampPeriod()
    period.update(1.0)
    assert period.value is None
    period.update(1.01)
    assert period.value == pytest.approx(0.01)
    period.update(1.01)                                  # not newer: no change
    assert period.value == pytest.approx(0.01)
    period.update(1.05)
    assert period.value == pytest.approx(0.95 * 0.01 + 0.05 * 0.04)
    period.update(0.5)                                   # backwards: ignored, but the next gap counts from it
    period.update(0.51)
    assert period.value == pytest.approx(0.95 * (0.95 * 0.01 + 0.05 * 0.04) + 0.05 * 0.01)
