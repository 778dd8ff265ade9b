"""The projection equals a reference QP (cvxpy) to 1e-6, for both solvers and all plants."""
import numpy as np
import pytest
import torch

from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.safeguard.invariant_set import Polytope, SafeActionSet, safe_set_for
from scpo_ros.safeguard.projection import SafeguardProjector

cp = pytest.importorskip("cvxpy")


class ReferenceProjection:
    """The projection QP in cvxpy (Clarabel, tight tolerances), built once with parameters."""

    def __init__(self, safe_set):
        self.safe_set = safe_set
        self.z = cp.Variable(safe_set.action_dim)
        self.u = cp.Parameter(safe_set.action_dim)
        self.b = cp.Parameter(safe_set.G.shape[0])
        self.prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(self.z - self.u)),
                               [safe_set.G @ self.z <= self.b, cp.abs(self.z) <= safe_set.u_max])

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
    return SafeActionSet(Polytope(H, h), B, 1.0, lambda x: x @ A.T,
                         lambda x: x @ torch.as_tensor(A.T, dtype=x.dtype), name="coupled", drift_matrix=A)


CASES = [("di1", lambda: safe_set_for(DoubleIntegrator(dof=1)), [1.0, 1.0]),
         ("di2", lambda: safe_set_for(DoubleIntegrator(dof=2)), [1.0, 1.0, 1.0, 1.0]),
         ("pendulum", lambda: safe_set_for(Pendulum()), [np.pi, 8.0]),
         ("coupled", coupled_safe_set, [1.0, 1.0])]


LATE_CASES = [("di1-late", lambda: safe_set_for(DoubleIntegrator(dof=1), late_commands=1), [1.0, 1.0]),
              ("di2-late", lambda: safe_set_for(DoubleIntegrator(dof=2, dt=0.1, u_max=0.6), late_commands=1),
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
            b_full = np.concatenate([S.rhs(xi), np.full(2 * S.action_dim, S.u_max)])
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
    S = safe_set_for(sysm)
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
                 bounds=[(-S.u_max, S.u_max)] * m + [(None, None)], method="highs")
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
    from scpo_ros.backup import LQRBackup
    true = DoubleIntegrator()
    tight = DoubleIntegrator(p_max=0.95, v_max=0.9)
    S = safe_set_for(tight)
    lqr = LQRBackup(tight)
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
    S = safe_set_for(DoubleIntegrator(dof=dof), late_commands=late)
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
