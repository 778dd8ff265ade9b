"""The safe set robust to one late or missed command (``late_commands=1``) and the projector's
levels around it: S (late set) ⊆ nominal set, projection keeps the next state and the state
one held command later in S, the nominal set's guarantee where U_safe(x) is empty, the
recovery beyond that, and a closed loop whose plant holds the previous command at random."""
import dataclasses
import functools

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from scpo_ros.backup import LQRBackup, dlqr
from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.safeguard.invariant_set import (
    Polytope,
    SafeActionSet,
    contains_polytope,
    late_blocks,
    linear_safe_set,
    maximal_control_invariant_set,
    pre_set,
    safe_set_for,
)
from scpo_ros.safeguard.projection import SafeguardProjector

TOL = 1e-9
CONFIGS = [(dof, dt, u_max) for dof in (1, 2) for dt in (0.02, 0.05, 0.1) for u_max in (0.6, 1.0)]
UNSTABLE = "unstable"
"""An open-loop unstable plant whose late set is strictly smaller than its nominal set (for
the double integrator the two sets coincide), so the nominal level of the projector is
exercised on states of the nominal set."""


@dataclasses.dataclass(frozen=True)
class LinearPlant:
    A: np.ndarray
    B: np.ndarray
    u_max: float
    dof: int

    def step(self, x, u):
        return self.A @ x + self.B @ u


@functools.cache
def setup(*cfg):
    """Plant, late set, LQR backup and the late-set projector (one per configuration)."""
    if cfg == (UNSTABLE,):
        A, B = np.array([[1.1, 0.1], [0.0, 1.05]]), np.array([[0.0], [0.1]])
        sysm = LinearPlant(A, B, 1.0, 1)
        S = linear_safe_set(A, B, [1.0, 1.0], 1.0, late_commands=1)
        K, _ = dlqr(A, B, np.eye(2), np.eye(1))
        backup = lambda x, r: -K @ x   # noqa: E731
    else:
        dof, dt, u_max = cfg
        sysm = DoubleIntegrator(dof=dof, dt=dt, u_max=u_max)
        S = safe_set_for(sysm, late_commands=1)
        lqr = LQRBackup(sysm)
        backup = lambda x, r: lqr(x, np.zeros(dof))   # noqa: E731
    return sysm, S, backup, SafeguardProjector(S, backup=backup)


@functools.cache
def daqp_projector(*cfg):
    _, S, backup, _ = setup(*cfg)
    return SafeguardProjector(S, backup=backup, solver="daqp")


def max_violation(P: Polytope, x) -> float:
    return float((P.H @ x - P.h).max())


def boundary_state(P: Polytope, direction: np.ndarray, shrink: float) -> np.ndarray:
    """The point of ``P``'s boundary on the ray from the origin along ``direction``, pulled in by
    the factor ``1 - shrink`` (the origin is inside every set here)."""
    hd = P.H @ direction
    with np.errstate(over="ignore"):         # a component of ~1e-310 in the direction
        t = np.min(P.h[hd > 0] / hd[hd > 0])
    return (1.0 - shrink) * t * direction


config = st.sampled_from(CONFIGS)
direction = st.lists(st.floats(-1.0, 1.0), min_size=4, max_size=4)
raw_action = st.one_of(st.floats(-3.0, 3.0), st.floats(-1e12, 1e12), st.just(float("nan")),
                       st.sampled_from([float("inf"), -float("inf"), 1e300, -1e300]))


# ------------------------------------------------------------------ the set


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] == 1] + [(UNSTABLE,)], ids=str)
def test_late_set_is_inside_the_nominal_set_and_robust_to_one_held_command(cfg):
    sysm, S, _, _ = setup(*cfg)
    A, B, u_max = sysm.A, sysm.B, sysm.u_max
    assert S.late_commands == 1
    assert S.invariant.contains(np.zeros(2)) and np.all(S.invariant.h > 0.0)   # non-empty, origin inside
    assert contains_polytope(S.nominal, S.invariant, TOL)
    if cfg == (UNSTABLE,):
        # Strictly smaller: some vertex of the nominal set is not robust to a held command.
        assert not S.invariant.contains(S.nominal.vertices(), tol=1e-6).all()
    else:
        # The double integrator's late set is its nominal set (module docstring of invariant_set):
        # what differs is U_safe(x), below.
        assert contains_polytope(S.invariant, S.nominal, TOL)
    # Invariance with a held command, exactly: every vertex of S has an admissible u with
    # A x + B u and A² x + (A + I) B u in S (an LP per vertex; the lifted set is convex, so
    # the vertices' actions cover every state of S).
    E, G = late_blocks(S.invariant.H, A, B, 1)
    f = np.concatenate([S.invariant.h, S.invariant.h])
    for v in S.invariant.vertices():
        lp = linprog(np.zeros(1), A_ub=G, b_ub=f - E @ v + TOL, bounds=[(-u_max, u_max)], method="highs")
        assert lp.status == 0, f"vertex {v} of S has no action robust to a held command"
    # Maximal: states of the nominal set outside S (by a margin) have no such action.
    pre = pre_set(S.invariant, A, B, u_max, late_commands=1)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (20000, 2))
    outside = ~S.invariant.contains(x, tol=1e-6)
    assert outside.sum() > 1000
    assert not pre.contains(x[outside], tol=-1e-7).any()
    if cfg == (UNSTABLE,):
        assert (outside & S.nominal.contains(x)).sum() > 50


def test_facet_and_iteration_counts_of_the_reported_setting():
    """dof 1, dt 0.05, u_max 1: the numbers the report quotes (a changed construction shows here)."""
    sysm = DoubleIntegrator(dt=0.05)
    nominal, k0 = maximal_control_invariant_set(sysm.A, sysm.B, [1.0, 1.0], 1.0)
    late, k1 = maximal_control_invariant_set(sysm.A, sysm.B, [1.0, 1.0], 1.0, late_commands=1)
    S = safe_set_for(sysm, late_commands=1)
    assert (len(nominal.h), k0) == (44, 21)
    assert (len(late.h), k1) == (44, 11)
    assert S.G.shape == (48, 1)       # 4 next-state rows + 44 held-command rows survive the pruning
    np.testing.assert_allclose(S.invariant.h, late.h)
    np.testing.assert_allclose(S.nominal.h, nominal.h)


def test_dof2_set_is_the_product_of_the_axis_sets():
    S1, S2 = setup(1, 0.05, 1.0)[1], setup(2, 0.05, 1.0)[1]
    assert len(S2.invariant.h) == 2 * len(S1.invariant.h) and S2.G.shape == (2 * S1.G.shape[0], 2)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.0, 1.0, (3000, 4))
    both = S1.invariant.contains(x[:, [0, 2]]) & S1.invariant.contains(x[:, [1, 3]])
    np.testing.assert_array_equal(S2.invariant.contains(x), both)
    np.testing.assert_array_equal(S2.nominal.contains(x), S1.nominal.contains(x[:, [0, 2]])
                                  & S1.nominal.contains(x[:, [1, 3]]))


@pytest.mark.parametrize("dof,dt,u_max", [(1, 0.05, 1.0), (2, 0.1, 0.6), (1, 0.02, 0.6)])
def test_pruned_rows_give_the_same_safe_action_set(dof, dt, u_max):
    """Dropping the redundant rows changes U_safe(x) nowhere: the same projection (or the same
    emptiness) as with every stacked row, inside S and outside it."""
    sysm, S, _, P = setup(dof, dt, u_max)
    full = dataclasses.replace(S, row_mask=None)
    assert full.G.shape[0] == 2 * len(S.invariant.h) > S.G.shape[0]
    Pfull = SafeguardProjector(full)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1.2, 1.2, (1500, 2 * dof))
    n_empty = 0
    for xi in x:
        u = rng.uniform(-3.0, 3.0, dof) * u_max
        a, b = P.project(xi, u), Pfull.project(xi, u)
        assert a.fallback == b.fallback
        np.testing.assert_allclose(a.u, b.u, atol=1e-9)
        n_empty += a.fallback
    assert 50 < n_empty < len(x) - 50


def test_affine_rows_and_the_nominal_one_step_set():
    sysm, S, _, _ = setup(2, 0.05, 1.0)
    E, G, f = S.affine_rows()
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.0, 1.0, (50, 4))
    np.testing.assert_allclose(f - x @ E.T, S.rhs(x), atol=1e-12)
    assert np.array_equal(G, S.G)
    N = S.nominal_set()
    assert N.late_commands == 0 and N.invariant is S.nominal and N.nominal is S.nominal
    En, Gn, fn = N.affine_rows()
    np.testing.assert_allclose(Gn, S.nominal.H @ sysm.B)
    np.testing.assert_allclose(En, S.nominal.H @ sysm.A)
    np.testing.assert_allclose(fn, S.nominal.h)
    nominal0 = safe_set_for(sysm)
    assert nominal0.late_commands == 0 and nominal0.nominal is nominal0.invariant
    np.testing.assert_allclose(nominal0.invariant.h, S.nominal.h)


def test_late_commands_need_a_linear_plant():
    with pytest.raises(ValueError, match="pendulum supports late_commands=0 only"):
        safe_set_for(Pendulum(), late_commands=1)
    assert safe_set_for(Pendulum(), late_commands=0).late_commands == 0
    with pytest.raises(ValueError, match="late_commands must be 0 or 1"):
        safe_set_for(DoubleIntegrator(), late_commands=2)
    S = safe_set_for(Pendulum())
    with pytest.raises(ValueError, match="linear plant"):
        dataclasses.replace(S, late_commands=1)
    with pytest.raises(ValueError, match="nonlinear drift"):
        S.affine_rows()


# ------------------------------------------------------------------ the projector's levels


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # raw actions of 1e300
@settings(max_examples=150, deadline=None)
@given(cfg=config, d=direction, shrink=st.one_of(st.just(0.0), st.floats(0.0, 1e-6), st.floats(0.0, 1.0)),
       u=st.lists(raw_action, min_size=2, max_size=2))
def test_projection_from_S_keeps_next_and_held_state_in_S(cfg, d, shrink, u):
    """(a) From every state of S (its boundary, near it, and inside), whatever the raw action
    (huge, infinite, NaN: the bad_input fallback), the command is in the box and keeps both the
    next state and the state after the same command once more in S."""
    sysm, S, _, P = setup(*cfg)
    dof = cfg[0]
    d, u = np.asarray(d[:2 * dof]), np.asarray(u[:dof])
    assume(np.linalg.norm(d) > 1e-3)
    x = boundary_state(S.invariant, d, shrink)
    res = P.project(x, u)
    assert res.in_set
    assert np.all(np.isfinite(res.u)) and np.all(np.abs(res.u) <= sysm.u_max)
    if not np.isfinite(u).all():
        assert res.fallback and res.reason == "bad_input"
    elif np.abs(u).max() < 1e100:                   # beyond that u·u overflows: bad_input as well
        assert not res.fallback
    x1 = sysm.step(x, res.u)
    x2 = sysm.step(x1, res.u)
    assert max_violation(S.invariant, x1) <= TOL
    assert max_violation(S.invariant, x2) <= TOL
    np.testing.assert_allclose(x2, S.held_state(x, res.u), atol=1e-15)


@settings(max_examples=150, deadline=None)
@given(cfg=st.one_of(config, st.just((UNSTABLE,))), d=direction,
       shrink=st.one_of(st.just(0.0), st.floats(0.0, 1e-3), st.floats(0.0, 0.3)),
       u=st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2))
def test_projection_from_the_nominal_set_keeps_the_next_state_in_it(cfg, d, shrink, u):
    """(b) From every state of the nominal set (its boundary, where the unstable plant's states
    lie outside S), the command keeps A x + B u in the nominal set; where U_safe(x) w.r.t. S is
    empty, the result is the nominal one-step projection (fallback, no violation)."""
    sysm, S, _, P = setup(*cfg)
    dof = sysm.dof
    d = np.asarray(d[:2 * dof])
    assume(np.linalg.norm(d) > 1e-3)
    x = boundary_state(S.nominal, d, shrink)
    res = P.project(x, np.asarray(u[:dof]))
    assert np.all(np.abs(res.u) <= sysm.u_max)
    assert max_violation(S.nominal, sysm.step(x, res.u)) <= TOL
    assert res.violation == 0.0
    assert res.in_set == bool(S.invariant.contains(x))
    if res.fallback:
        assert res.reason == "outside_invariant_set" and not res.in_set
        assert len(res.active) == P.num_rows and not res.active[:P.k].any()
        ref = SafeguardProjector(S.nominal_set()).project(x, np.asarray(u[:dof]))
        assert not ref.fallback
        np.testing.assert_allclose(res.u, ref.u, atol=1e-12)
    else:
        assert max_violation(S.invariant, sysm.step(x, res.u)) <= TOL
        assert max_violation(S.invariant, sysm.step(sysm.step(x, res.u), res.u)) <= TOL


def least_nominal_violation(S: SafeActionSet, sysm, x) -> float:
    """``min_u max_i (H_i (A x + B u) - h_i)`` over the box for the nominal set (an LP)."""
    N = S.nominal
    m = sysm.dof
    G, b = N.H @ sysm.B, N.h - N.H @ sysm.A @ x
    lp = linprog(np.r_[np.zeros(m), 1.0], A_ub=np.hstack([G, -np.ones((len(b), 1))]), b_ub=b,
                 bounds=[(-sysm.u_max, sysm.u_max)] * m + [(None, None)], method="highs")
    assert lp.status == 0
    return lp.fun


@settings(max_examples=120, deadline=None)
@given(cfg=config, x=st.lists(st.floats(-1.6, 1.6), min_size=4, max_size=4),
       u=st.lists(st.floats(-5.0, 5.0), min_size=2, max_size=2))
@example(cfg=(2, 0.02, 0.6), x=[-1.0, 1.0, 1.1920928955078125e-07, 0.0], u=[0.0, 0.0])   # recovery, 3.7e-5 apart
def test_states_outside_the_nominal_set_never_do_worse_than_the_backup(cfg, x, u):
    """(c) Outside the nominal set: the command is in the box, its next state violates the
    nominal set's facets no more than the LQR backup's does (the recovery's optimum where no
    admissible action reaches the set), and the caller's fallback agrees."""
    sysm, S, backup, P = setup(*cfg)
    dof = cfg[0]
    x = np.asarray(x[:2 * dof])
    if S.nominal.contains(x, tol=1e-6):
        x = boundary_state(S.nominal, x if np.linalg.norm(x) > 1e-3 else np.ones(2 * dof), -0.05)
    u = np.asarray(u[:dof])
    res, qp = P.project(x, u), daqp_projector(*cfg).project(x, u)   # the two solvers, every level
    assert (res.fallback, res.reason) == (qp.fallback, qp.reason)
    assert qp.violation == pytest.approx(res.violation, abs=1e-7)
    if res.violation == 0.0:
        np.testing.assert_allclose(qp.u, res.u, atol=1e-6)
    else:
        # the recovery level: the LP's optimum s* is found to ~1e-7, and the relaxed set
        # {G u <= b + s*} it projects onto is then ~1e-7 / |G_ij| wide (G = H B ~ dt²): the
        # two solvers' actions may differ by ~1e-4 there, their next-state violations may not
        worst = [max_violation(S.nominal, sysm.step(x, r.u)) for r in (res, qp)]
        assert worst[0] == pytest.approx(worst[1], abs=1e-7)
    for case in (res, P.fallback(x, u, None, "stale_state")):
        res = case
        assert not res.in_set
        assert np.all(np.abs(res.u) <= sysm.u_max)
        ours = max_violation(S.nominal, sysm.step(x, res.u))
        lqr = max_violation(S.nominal, sysm.step(x, np.clip(backup(x, None), -sysm.u_max, sysm.u_max)))
        assert max(ours, 0.0) <= max(lqr, 0.0) + 1e-9
        best = least_nominal_violation(S, sysm, x)
        if best > 1e-7:                               # no admissible action reaches the nominal set
            assert res.violation == pytest.approx(best, abs=1e-7)
            assert ours <= best + 1e-7
        elif best < -1e-7:                            # it does: a projection (level 1 or 2)
            assert res.violation == 0.0 and ours <= TOL
        if not res.fallback:                          # level 1: U_safe(x) w.r.t. S is not empty
            assert max_violation(S.invariant, sysm.step(sysm.step(x, res.u), res.u)) <= TOL


def test_recovery_false_replaces_only_the_last_level_by_the_backup():
    sysm, S, backup, P = setup(UNSTABLE)
    old = SafeguardProjector(S, backup=backup, recovery=False)
    rng = np.random.default_rng(4)
    x = rng.uniform(-1.0, 1.0, (20000, 2))
    between = x[S.nominal.contains(x) & ~S.invariant.contains(x, tol=1e-6)]
    assert len(between) > 50
    for xi in between[:50]:                                       # level 2 either way
        a, b = P.project(xi, np.array([3.0])), old.project(xi, np.array([3.0]))
        assert a.fallback and b.fallback and a.violation == b.violation == 0.0
        np.testing.assert_allclose(a.u, b.u)
        assert max_violation(S.nominal, sysm.step(xi, a.u)) <= TOL
    S = setup(1, 0.05, 1.0)[1]
    coast = lambda x, r: np.array([0.2])   # noqa: E731  (a backup the recovery visibly differs from)
    P, old = (SafeguardProjector(S, backup=coast, recovery=rec) for rec in (True, False))
    x = np.array([0.99, 0.9])                                     # no action reaches the nominal set: level 3
    a, b = P.project(x, np.array([0.3])), old.project(x, np.array([0.3]))
    assert a.fallback and b.fallback and a.reason == b.reason == "outside_invariant_set"
    assert a.violation > 0.0 and b.violation == 0.0
    np.testing.assert_allclose(a.u, [-1.0])                       # the hardest braking
    np.testing.assert_allclose(b.u, [0.2])


# ------------------------------------------------------------------ closed loop


def run_late_plant(late_commands: int, dt: float, episodes: int = 20, steps: int = 200, p_late: float = 0.3):
    """A policy that drives into the walls, projected; at each step with probability ``p_late``
    (never twice in a row) the plant applies the previous command once more. Returns
    (state-box violations, fallbacks)."""
    sysm = DoubleIntegrator(dt=dt)
    lqr = LQRBackup(sysm)
    P = SafeguardProjector(safe_set_for(sysm, late_commands=late_commands), backup=lambda x, r: lqr(x, np.zeros(1)))
    rng = np.random.default_rng(0)
    violations = fallbacks = 0
    for _ in range(episodes):
        x = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3)])
        u_prev, sign, was_late = np.zeros(1), 1.0, False
        for t in range(steps):
            sign = -sign if t % 50 == 0 else sign
            res = P.project(x, np.array([3.0 * sign]))
            fallbacks += res.fallback
            late = not was_late and rng.random() < p_late
            x = sysm.step(x, u_prev if late else res.u)
            was_late, u_prev = late, res.u
            violations += bool(sysm.violation(x))
    return violations, fallbacks


@pytest.mark.parametrize("dt", [0.05, 0.1])
def test_closed_loop_with_late_commands_stays_in_the_box_only_with_the_late_set(dt):
    violations, fallbacks = run_late_plant(1, dt)
    assert violations == 0 and fallbacks == 0       # the state never even leaves S
    violations, fallbacks = run_late_plant(0, dt)
    assert violations > 100 and fallbacks > 100, "the scenario must break the nominal set, or it tests nothing"
