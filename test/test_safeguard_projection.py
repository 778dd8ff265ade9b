"""The projection (``safeguard/projection.py``) equals a reference QP (cvxpy) to 1e-6, for both
solvers and all plants; its levels around the late-command set, the fallback outside the set,
and float32 states on the boundary."""
import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from late_set_helpers import (
    TOL,
    UNSTABLE,
    backup_of,
    boundary_state,
    config,
    daqp_projector,
    direction,
    max_violation,
    raw_action,
    safe_set_of,
    setup,
)
from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.safeguard.invariant_set import Polytope, SafeActionSet
from scpo_ros.safeguard.projection import SafeguardProjector, project_batch

cp = pytest.importorskip("cvxpy")


class ReferenceProjection:
    """The projection QP in cvxpy (Clarabel, tight tolerances), built once with parameters."""

    def __init__(self, safe_set):
        self.safe_set = safe_set
        self.z = cp.Variable(safe_set.action_dim)
        self.u = cp.Parameter(safe_set.action_dim)
        self.b = cp.Parameter(safe_set.G.shape[0])
        centre = (safe_set.u_max + safe_set.u_min) / 2.0   # the box as |z - centre| <= half-width
        self.prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(self.z - self.u)),
                               [safe_set.G @ self.z <= self.b,
                                cp.abs(self.z - centre) <= (safe_set.u_max - safe_set.u_min) / 2.0])

    def __call__(self, x, u):
        self.u.value, self.b.value = u, self.safe_set.rhs(x)
        self.prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        assert self.prob.status == cp.OPTIMAL
        return self.z.value


def coupled_safe_set():
    """A non-separable U_safe: a rotated box as the invariant set of a 2-input plant
    (rows of G = H B touch both action coordinates), to exercise the QP path."""
    th = 0.4
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    H = np.vstack([R, -R, [[1.0, 1.0]], [[1.0, -2.0]]])
    H = H / np.linalg.norm(H, axis=1, keepdims=True)
    h = np.array([1.0, 1.0, 1.0, 1.0, 1.2, 1.5])
    A = np.array([[1.0, 0.1], [0.0, 1.0]])
    B = np.array([[0.3, 0.1], [0.05, 0.4]])
    return SafeActionSet(Polytope(H, h), B, -1.0, 1.0, D=H, G=H @ B, F=np.zeros((len(h), 0)), f=h,
                         drift_np=lambda x: x @ A.T, drift_torch=lambda x: x @ torch.as_tensor(A.T, dtype=x.dtype),
                         name="coupled", drift_matrix=A)


CASES = [("di1", lambda: safe_set_of(DoubleIntegrator(dof=1)), [1.0, 1.0]),
         ("di2", lambda: safe_set_of(DoubleIntegrator(dof=2)), [1.0, 1.0, 1.0, 1.0]),
         ("pendulum", lambda: safe_set_of(Pendulum()), [np.pi, 8.0]),
         ("coupled", coupled_safe_set, [1.0, 1.0])]


LATE_CASES = [("di1-late", lambda: safe_set_of(DoubleIntegrator(dof=1), late_commands=1), [1.0, 1.0]),
              ("di2-late", lambda: safe_set_of(DoubleIntegrator(dof=2, dt=0.1, u_max=0.6), late_commands=1),
               [1.0] * 4)]


@pytest.mark.parametrize("name,make,limits", CASES + LATE_CASES, ids=[c[0] for c in CASES + LATE_CASES])
def test_projection_matches_reference_qp(name, make, limits):
    S = make()
    assert S.separable == (name != "coupled")
    solvers = ["closed_form", "daqp"] if S.separable else ["daqp"]
    projectors = [SafeguardProjector(S, solver=s) for s in solvers]
    rng = np.random.default_rng(7)
    limits = np.asarray(limits)
    x = rng.uniform(-1.0, 1.0, (400, len(limits))) * limits
    x = x[S.invariant.contains(x)][:60]
    assert len(x) >= 40
    n_active = 0
    reference_projection = ReferenceProjection(S)
    for xi in x:
        u = rng.uniform(-2.5, 2.5, S.action_dim) * S.u_max
        ref = reference_projection(xi, u)
        for p in projectors:
            res = p.project(xi, u)
            assert not res.fallback
            np.testing.assert_allclose(res.u, ref, atol=1e-6, err_msg=f"{p.solver} at x={xi}, u={u}")
            assert res.distance == pytest.approx(np.linalg.norm(ref - u), abs=1e-6)
            # The active rows are tight at the solution; the others hold.
            A_full = np.vstack([S.G, np.eye(S.action_dim), -np.eye(S.action_dim)])
            b_full = np.concatenate([S.rhs(xi), S.u_max, -S.u_min])
            slack = b_full - A_full @ res.u
            assert np.all(slack >= -1e-9)
            assert np.all(np.abs(slack[res.active]) <= 1e-8)
            assert res.active.any() == (res.distance > 1e-9)
        n_active += res.active.any()
    assert n_active > 10, "the sample must exercise active constraints"


def test_warm_started_qp_agrees_with_closed_form_over_a_trajectory():
    """Warm starts carry the previous active set: along a closed loop (consecutive,
    correlated problems) the daqp answer must still equal the closed form exactly."""
    sysm = DoubleIntegrator(dof=2)
    S = safe_set_of(sysm)
    cf, qp = SafeguardProjector(S, solver="closed_form"), SafeguardProjector(S, solver="daqp")
    rng = np.random.default_rng(3)
    x = np.array([0.2, -0.3, 0.5, 0.4])
    for t in range(300):
        u = np.array([2.0 * np.sin(0.05 * t), -2.0 * np.cos(0.03 * t)]) + 0.3 * rng.standard_normal(2)
        a, b = cf.project(x, u), qp.project(x, u)
        assert not a.fallback and not b.fallback
        np.testing.assert_allclose(a.u, b.u, atol=1e-9)
        assert np.array_equal(a.active, b.active)
        x = sysm.step(x, a.u)
        assert S.invariant.contains(x, tol=1e-9)


def least_violation(S, x):
    """Reference for the recovery: ``min_u max_i (G u - b(x))_i`` over the actuator box (an LP)."""
    from scipy.optimize import linprog
    k, m = S.G.shape
    c = np.zeros(m + 1)
    c[-1] = 1.0
    lp = linprog(c, A_ub=np.hstack([S.G, -np.ones((k, 1))]), b_ub=S.rhs(x),
                 bounds=list(zip(S.u_min, S.u_max)) + [(None, None)], method="highs")
    assert lp.status == 0
    return lp.fun


def facet_violation(S, x, u):
    return float((S.G @ u - S.rhs(x)).max())


@pytest.mark.parametrize("name,make,limits", CASES, ids=[c[0] for c in CASES])
def test_states_outside_the_set_are_projected_or_recovered(name, make, limits):
    """Outside the invariant set: where ``U_safe(x)`` is not empty the result is still the exact
    projection (next state back in the set, no fallback); where it is empty, the recovery
    action, whose next state is as close to the set as any admissible action can bring it
    (the LP optimum), and never farther than the backup's."""
    S = make()
    solvers = ["closed_form", "daqp"] if S.separable else ["daqp"]
    backup = lambda x, r: -0.5 * x[: S.action_dim]   # noqa: E731  (any stabilising-looking law)
    projectors = [SafeguardProjector(S, backup=backup, solver=s) for s in solvers]
    old = SafeguardProjector(S, backup=backup, solver=solvers[0], recovery=False)
    ref = ReferenceProjection(S)
    rng = np.random.default_rng(11)
    limits = np.asarray(limits)
    x = rng.uniform(-1.3, 1.3, (3000, len(limits))) * limits
    x = x[~S.invariant.contains(x, tol=1e-6)][:300]
    n_projected = n_recovered = 0
    for xi in x:
        u = rng.uniform(-2.0, 2.0, S.action_dim) * S.u_max
        best = least_violation(S, xi)
        for p in projectors:
            res = p.project(xi, u)
            assert not res.in_set
            assert np.all(np.abs(res.u) <= S.u_max + 1e-12)
            if best <= -1e-7:                                # U_safe(x) has an interior
                assert not res.fallback, (p.solver, xi, u)
                np.testing.assert_allclose(res.u, ref(xi, u), atol=1e-6)
                assert S.invariant.contains(S.next_state(xi, res.u), tol=1e-9)
                n_projected += p is projectors[0]
            elif best >= 1e-7:                               # U_safe(x) empty
                assert res.fallback and res.reason == "outside_invariant_set"
                assert res.violation == pytest.approx(best, abs=1e-7)
                assert facet_violation(S, xi, res.u) <= best + 1e-7
                assert facet_violation(S, xi, res.u) <= facet_violation(S, xi, old.project(xi, u).u) + 1e-9
                n_recovered += p is projectors[0]
        if len(projectors) == 2 and abs(best) >= 1e-7:
            np.testing.assert_allclose(projectors[0].project(xi, u).u, projectors[1].project(xi, u).u, atol=1e-6)
    assert n_projected > 10 and n_recovered > 10, (n_projected, n_recovered)


def test_recovery_keeps_a_plant_with_late_commands_inside_its_limits():
    """The failure the recovery action exists for: the safeguard uses an invariant set for
    tightened limits, the plant applies the previous command instead of the new one at
    random steps (20 %), and the raw policy drives into the walls. Recovery (hardest
    admissible braking once U_safe is empty) keeps every true limit; the LQR backup as the
    fallback (the former behaviour) does not."""
    true = DoubleIntegrator()
    tight = DoubleIntegrator(p_max=0.95, v_max=0.9)
    S = safe_set_of(tight)
    lqr = backup_of(tight)
    violations = {}
    for recovery in (True, False):
        P = SafeguardProjector(S, backup=lambda x, r: lqr(x, np.zeros(1)), recovery=recovery)
        rng = np.random.default_rng(0)
        violations[recovery] = 0
        for _ in range(20):
            x = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3)])
            u_prev, sign = np.zeros(1), 1.0
            for t in range(200):
                sign = -sign if t % 50 == 0 else sign
                res = P.project(x, np.array([3.0 * sign]))
                x = true.step(x, u_prev if rng.random() < 0.2 else res.u)
                u_prev = res.u
                violations[recovery] += bool(true.violation(x))
    assert violations[True] == 0
    assert violations[False] > 100, "the scenario must break the backup fallback, or it tests nothing"


@pytest.mark.parametrize("dof,late", [(1, 0), (2, 0), (1, 1), (2, 1)])
def test_per_step_closed_form_is_the_batched_interval_projection(dof, late):
    """``SafeguardProjector``'s closed form is a fused form of ``IntervalBatch``."""
    import torch

    from scpo_ros.safeguard.projection import IntervalBatch
    S = safe_set_of(DoubleIntegrator(dof=dof), late_commands=late)
    rng = np.random.default_rng(dof + 2 * late)
    x = rng.uniform(-1.0, 1.0, (4000, 2 * dof))
    x = x[S.invariant.contains(x, tol=-1e-6)][:300]
    u = rng.uniform(-2.5, 2.5, (len(x), dof)) * S.u_max
    batch = IntervalBatch(S.G, S.u_max)
    ut, active, feasible = batch(torch.as_tensor(u), torch.as_tensor(S.rhs(x)))
    P = SafeguardProjector(S, solver="closed_form")
    for i in range(len(x)):
        res = P.project(x[i], u[i])
        assert feasible[i] and not res.fallback
        np.testing.assert_allclose(res.u, ut[i].numpy(), atol=1e-12)
        assert np.array_equal(res.active, active[i].numpy())


# ------------------------------------------------------------------ float32 plant on the boundary

@pytest.mark.parametrize("dof", [1, 2])
@pytest.mark.parametrize("solver", ["closed_form", "daqp"])
def test_float32_plant_driven_into_the_walls_never_falls_back(dof, solver):
    """A float32 plant under raw actions that push into the limits: every active
    projection puts x+ on the invariant set's boundary and float32 rounding lands a hair
    around it. Before the fix ~half of these steps fell back (outside_invariant_set) and the
    backup-less plant left the box."""
    sysm = DoubleIntegrator(dof=dof)
    S = safe_set_of(sysm)
    A, B = sysm.A.astype(np.float32), sysm.B.astype(np.float32)
    P = SafeguardProjector(S, solver=solver)
    rng = np.random.default_rng(dof)
    pushed_to_wall = 0
    for _episode in range(5):
        x = np.zeros(2 * dof, np.float32)
        for t in range(160):
            side = 1.0 if (t // 40) % 2 == 0 else -1.0
            u = side * rng.uniform(2.0, 4.0, dof)
            res = P.project(x, u)
            assert not res.fallback, f"spurious fallback ({res.reason}) at x={x}"
            assert np.all(np.abs(res.u) <= S.u_max)
            x = (A @ x + B @ res.u.astype(np.float32)).astype(np.float32)
            assert np.all(np.abs(x[:dof]) <= sysm.p_max) and np.all(np.abs(x[dof:]) <= sysm.v_max), x
            pushed_to_wall += bool(np.abs(x[:dof]).max() > 0.99 * sysm.p_max)
    assert pushed_to_wall >= 25, "the raw actions must drive the plant to its position limits"


def test_float32_states_on_the_boundary_are_members_and_float64_stays_exact():
    S = safe_set_of(DoubleIntegrator(dof=1))
    P = SafeguardProjector(S)
    # points on the invariant set's facets (vertices and midpoints), rounded to float32 outward or inward
    V = S.invariant.vertices()
    on_boundary = np.vstack([V, 0.5 * (V + np.roll(V, 1, axis=0))])
    outward = on_boundary * (1 + 1e-7)
    for x in np.vstack([on_boundary, outward]).astype(np.float32):
        for u in (np.array([3.0]), np.array([-3.0]), np.array([0.0])):
            res = P.project(x, u)
            assert not res.fallback, (x, u, res.reason)
    # batched, float32: all feasible; float64 keeps the exact projection (no margin)
    X = np.vstack([on_boundary, outward]).astype(np.float32)
    U = np.resize(np.array([[3.0], [-3.0]]), (len(X), 1))
    _, _, feasible = project_batch(S, X, U)
    assert feasible.all()
    # a float64 state where pushing on sits on a state row (not only the actuator box)
    grid = np.stack(np.meshgrid(np.linspace(0.5, 0.99, 25), np.linspace(0.0, 0.6, 25)), -1).reshape(-1, 2)
    x64 = next(x for x in grid[S.invariant.contains(grid)] if P.project(x, np.array([3.0])).active[:S.G.shape[0]].any())
    exact = P.project(x64, np.array([3.0]))
    b = S.rhs(x64)
    assert np.min(b - S.G @ exact.u) == pytest.approx(0.0, abs=1e-12)   # on the boundary, exactly
    # a float32 state aims strictly inside
    res32 = P.project(x64.astype(np.float32), np.array([3.0]))
    assert np.min(S.rhs(x64.astype(np.float32).astype(float)) - S.G @ res32.u) > 0.0
    # an explicit margin applies to float64 states too (the ROS node's boundary_margin)
    Pm = SafeguardProjector(S, margin=1e-6)
    assert np.min(b - S.G @ Pm.project(x64, np.array([3.0])).u) >= 1e-6 - 1e-12
    with pytest.raises(ValueError):
        SafeguardProjector(S, margin=-1.0)


# ------------------------------------------------------------------ the levels around the late-command set

def test_projector_falls_back_to_the_backup_outside_the_set():
    sysm = DoubleIntegrator(dof=1)
    backup = backup_of(sysm)
    proj = SafeguardProjector(safe_set_of(sysm), backup=backup)
    x = np.array([0.99, 0.9])                   # cannot brake in time
    res = proj.project(x, np.array([0.3]), r=np.array([0.0]))
    assert res.fallback and res.reason == "outside_invariant_set"
    expected = np.clip(backup(x, np.array([0.0])), -1.0, 1.0)
    np.testing.assert_allclose(res.u, expected)
    for bad_x, bad_u, reason in [(np.array([np.nan, 0.0]), np.array([0.0]), "bad_input"),
                                 (np.array([0.0, 0.0]), np.array([np.inf]), "bad_input"),
                                 (np.array([0.0, 0.0, 0.0]), np.array([0.0]), "bad_input"),
                                 (np.array([0.0, 0.0]), np.array([0.0, 1.0]), "bad_input")]:
        res = proj.project(bad_x, bad_u, r=np.array([0.0]))
        assert res.fallback and res.reason == reason
        assert np.all(np.isfinite(res.u)) and np.all(np.abs(res.u) <= sysm.u_max)


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
