"""The command envelope as a pure function (hypothesis): whatever the state, reference and
candidate, the command is finite and inside the actuator box; from every state of the safe
set the next state stays in it (also when the plant applies the command a period late),
with the certified policy, a hostile candidate or the fallback."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from late_set_helpers import backup_of, safe_set_of
from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.envelope import CommandEnvelope

PLANTS = {
    "dof1": DoubleIntegrator(dof=1, dt=0.05),
    "dof2": DoubleIntegrator(dof=2, dt=0.05),
    "tight_u": DoubleIntegrator(dof=1, dt=0.05, u_max=0.6),
    "slow": DoubleIntegrator(dof=1, dt=0.1, p_max=0.5, v_max=2.0),
}
_ENVELOPES = {}


def envelope(name: str) -> tuple[DoubleIntegrator, CommandEnvelope]:
    if name not in _ENVELOPES:
        system = PLANTS[name]
        _ENVELOPES[name] = (system, CommandEnvelope(safe_set_of(system, late_commands=1), backup_of(system)))
    return _ENVELOPES[name]


def members(poly, x, tol=1e-7):
    return bool(np.all(poly.H @ x <= poly.h + tol))


finite = st.floats(-1e6, 1e6, allow_nan=False)
anything = st.one_of(st.floats(allow_nan=True, allow_infinity=True), finite, st.floats(-2.0, 2.0))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


def state_in(system, draw_unit):
    """A point of the state box from unit coordinates in [-1, 1]."""
    lim = np.array([system.p_max] * system.dof + [system.v_max] * system.dof)
    return np.asarray(draw_unit) * lim


@SETTINGS
@given(name=st.sampled_from(sorted(PLANTS)), data=st.data())
def test_every_command_is_finite_and_inside_the_actuator_box(name, data):
    system, env = envelope(name)
    n, m = 2 * system.dof, system.dof
    x = np.array(data.draw(st.lists(anything, min_size=n, max_size=n)))
    u = np.array(data.draw(st.lists(anything, min_size=m, max_size=m)))
    r = np.array(data.draw(st.lists(anything, min_size=m, max_size=m)))
    for res in (env.filter(x, u, r), env.fallback(x, r, "test"), env.filter(x[:-1], u), env.filter(x, u[:0])):
        assert res.u.shape == (m,)
        assert np.all(np.isfinite(res.u))
        assert np.all(np.abs(res.u) <= system.u_max)


@SETTINGS
@given(name=st.sampled_from(sorted(PLANTS)), data=st.data())
def test_from_the_safe_set_the_next_state_stays_in_it_even_with_a_late_command(name, data):
    system, env = envelope(name)
    S = env.safe_set.invariant
    n, m = 2 * system.dof, system.dof
    unit = data.draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n))
    x = state_in(system, unit)
    if not members(S, x, 0.0):
        # pull it into the set along the ray to the origin (the origin is inside S)
        for scale in np.linspace(1.0, 0.0, 41):
            if members(S, scale * x, 0.0):
                x = scale * x
                break
    assert members(S, x, 0.0)
    u_raw = np.array(data.draw(st.lists(st.one_of(finite, st.floats(-3, 3)), min_size=m, max_size=m)))
    r = np.array(data.draw(st.lists(st.floats(-0.5, 0.5), min_size=m, max_size=m)))
    A, B = system.A, system.B
    for res in (env.filter(x, u_raw, r), env.fallback(x, r, "test")):
        u = res.u
        assert np.all(np.abs(u) <= system.u_max)
        x1 = A @ x + B @ u
        x_late = A @ x1 + B @ u            # the plant held the command one period longer
        assert members(S, x1), (x, u, S.H @ x1 - S.h)
        assert members(S, x_late), (x, u, S.H @ x_late - S.h)
        assert res.violation == 0.0 and res.in_set


@SETTINGS
@given(name=st.sampled_from(sorted(PLANTS)), data=st.data())
def test_from_the_nominal_set_the_next_state_stays_in_the_nominal_set(name, data):
    system, env = envelope(name)
    C = env.safe_set.nominal
    n, m = 2 * system.dof, system.dof
    x = state_in(system, data.draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n)))
    if not members(C, x, 0.0):
        return      # outside the recoverable set: covered by the recovery test
    u_raw = np.array(data.draw(st.lists(st.floats(-5, 5), min_size=m, max_size=m)))
    res = env.filter(x, u_raw)
    assert members(C, system.A @ x + system.B @ res.u)


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_closed_loop_with_a_policy_pushing_into_the_walls_and_late_commands_never_violates(name):
    """A long run on the model: a hostile candidate every step, 30 % of the commands applied a
    period late (never twice in a row), from states all over the safe set."""
    system, env = envelope(name)
    S = env.safe_set.invariant
    rng = np.random.default_rng(1)
    A, B, m = system.A, system.B, system.dof
    lim = np.array([system.p_max] * m + [system.v_max] * m)
    starts = [x for x in rng.uniform(-1, 1, (400, 2 * m)) * lim if members(S, x, 0.0)][:20]
    assert len(starts) >= 5
    for x in starts:
        held, late_before = np.zeros(m), False
        for _ in range(150):
            cand = np.sign(x[:m] + 1e-3) * system.u_max * 3.0       # accelerate towards the nearer wall
            u = env.filter(x, cand).u
            late = (not late_before) and rng.random() < 0.3
            x = A @ x + B @ (held if late else u)
            held = held if late else u
            late_before = late
            assert np.all(np.abs(x) <= lim + 1e-9), x
            assert members(S, x, 1e-7)


def test_certified_policy_commands_pass_unchanged():
    """Inside the set, a candidate already in U_safe(x) (the backup well inside) is not changed."""
    system, env = envelope("dof1")
    backup = backup_of(system)
    for x in ([0.0, 0.0], [0.3, -0.1], [-0.5, 0.2]):
        x = np.array(x)
        u = backup(x, np.zeros(1))
        res = env.filter(x, u)
        assert not res.changed and res.reason == "" and np.allclose(res.u, u)
    res = env.filter(np.array([0.9, 0.9]), np.array([1.0]))   # driving into the wall: changed
    assert res.changed and res.u[0] < 0.0


def test_outside_the_recoverable_set_the_recovery_action_brakes_hardest_and_reports():
    system, env = envelope("dof1")
    x = np.array([0.99, 0.99])        # no admissible command avoids leaving the box
    res = env.filter(x, np.array([1.0]))
    assert res.u[0] == pytest.approx(-system.u_max)
    assert res.violation > 0.0 and not res.in_set and res.changed
    res = env.fallback(np.array([math.nan, 0.0]))
    assert np.all(np.isfinite(res.u)) and res.changed


def test_backup_from_the_certified_region_passes_the_envelope_unchanged():
    """The node's first certified law (the backup, zero residual) from the certified region of
    [x, r] (|p| <= 0.8, |v| <= 0.2, |r| <= 0.5) and along its trajectories is never changed: the
    certificate and the envelope agree on the safe set."""
    system, env = envelope("dof2")
    backup = backup_of(system)
    rng = np.random.default_rng(0)
    for _ in range(40):
        x = rng.uniform(-1, 1, 4) * np.array([0.8, 0.8, 0.2, 0.2])
        r = rng.uniform(-0.5, 0.5, 2)
        for _ in range(60):
            u = backup(x, r)
            res = env.filter(x, u, r)
            assert not res.changed, (x, r, u, res.u)
            x = system.A @ x + system.B @ u
