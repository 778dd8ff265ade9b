"""Invariant sets (``safeguard/invariant_set.py``): structure, the invariance property of the
projected closed loop, and the set robust to one late or missed command (``late_commands=1``):
S (late set) ⊆ nominal set, exact and maximal, its pruned rows, and a closed loop whose plant
holds the previous command at random."""
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from late_set_helpers import CONFIGS, TOL, UNSTABLE, backup_of, emptiness, safe_set_of, setup
from plant_strategies import plants, random_plant
from scpo_ros.backup import LQRBackup
from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.safeguard.invariant_set import (
    _explicit_rows,
    box,
    contains_polytope,
    late_blocks,
    maximal_control_invariant_set,
    pendulum_safe_set,
    pre_set,
    safe_set_for,
)
from scpo_ros.safeguard.projection import SafeguardProjector, project_batch


def _states_in_set(safe_set, limits, n, rng):
    x = rng.uniform(-1.0, 1.0, (n, len(limits))) * limits
    # Plus points on the boundary: the hardest states, where U_safe is a single point.
    vertices = safe_set.invariant.vertices() if safe_set.state_dim == 2 else np.empty((0, safe_set.state_dim))
    x = np.vstack([x, vertices])
    return x[safe_set.invariant.contains(x)]


@pytest.mark.parametrize("dof", [1, 2])
def test_double_integrator_set_is_control_invariant_and_inside_the_box(dof):
    sysm = DoubleIntegrator(dof=dof)
    S = safe_set_of(sysm)
    C = S.invariant
    # Inside the box, strictly smaller than it (braking), and containing the origin.
    limits = np.array([sysm.p_max] * dof + [sysm.v_max] * dof)
    assert C.contains(np.zeros(2 * dof))
    corner = np.concatenate([np.full(dof, 0.99 * sysm.p_max), np.full(dof, 0.99 * sysm.v_max)])
    assert not C.contains(corner), "a state racing into the wall at full speed cannot be in the set"
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.5, 1.5, (20000, 2 * dof)) * limits
    inside = C.contains(x)
    assert not sysm.violation(x[inside]).any()
    # Invariance: every projected action (raw actions far outside the box too) keeps
    # the next state in the set, for thousands of random states of the set.
    x = _states_in_set(S, limits, 4000, rng)
    assert len(x) > 1000
    u = rng.uniform(-3.0, 3.0, (len(x), dof)) * sysm.u_max
    ut, _, feasible = project_batch(S, x, u)
    assert feasible.all()
    assert np.all(np.abs(ut) <= sysm.u_max + 1e-12)
    nxt = sysm.step(x, ut)
    assert C.contains(nxt, tol=1e-9).all()
    assert not sysm.violation(nxt).any()


def test_set_is_maximal_states_outside_cannot_be_kept_safe():
    """Outside the set there is no action keeping the next state in it: the set is the
    fixed point C = Pre(C) ∩ X, and the backup fallback is the only option there."""
    sysm = DoubleIntegrator(dof=1)
    S = safe_set_of(sysm)
    pre = pre_set(S.invariant, sysm.A, sysm.B, sysm.u_max)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.0, 1.0, (5000, 2))
    outside = ~S.invariant.contains(x, tol=1e-6)
    assert outside.sum() > 100
    assert not pre.contains(x[outside], tol=-1e-7).any()


def test_pre_set_iteration_matches_the_braking_condition():
    """For one axis the set is the discrete braking condition: from (p, v) with v > 0 the
    largest position reached while braking at u_max must stay <= p_max."""
    sysm = DoubleIntegrator(dof=1)
    C = safe_set_of(sysm).invariant
    rng = np.random.default_rng(2)
    x = rng.uniform([-1.0, 0.0], [1.0, 1.0], (3000, 2))
    # Brake with full force until the velocity is 0 (then hold): max position reached.
    p, v = x[:, 0].copy(), x[:, 1].copy()
    reach = p.copy()
    for _ in range(60):
        u = -np.minimum(v / sysm.dt, sysm.u_max)      # full braking, no overshoot below 0
        p = p + sysm.dt * v + 0.5 * sysm.dt**2 * u
        v = v + sysm.dt * u
        reach = np.maximum(reach, p)
    can_stop = reach <= sysm.p_max + 1e-9
    inside = C.contains(x, tol=1e-9)
    assert np.all(can_stop[inside]), "a state of the set cannot brake in time"
    # Maximal: away from the boundary (discretisation of the braking curve), every state
    # that can stop is in the set.
    near_boundary = C.contains(x, tol=1e-3) & ~C.contains(x, tol=-1e-3)
    assert np.all(inside[can_stop & ~near_boundary])


def test_iteration_converges_to_the_box_when_the_box_is_invariant():
    # With huge actuation every state of the box can stop in one step: C = X.
    A = np.array([[1.0, 0.05], [0.0, 1.0]])
    B = np.array([[0.00125], [0.05]])
    C, iters = maximal_control_invariant_set(A, B, [1.0, 0.01], 100.0)
    assert iters <= 3
    X = box([1.0, 0.01])
    assert np.allclose(np.sort(C.h), np.sort(X.h))


def test_pendulum_set_keeps_the_true_nonlinear_pendulum_safe():
    sysm = Pendulum()
    S = pendulum_safe_set(sysm)
    rng = np.random.default_rng(3)
    limits = np.array([sysm.theta_max, sysm.theta_dot_max])
    x = _states_in_set(S, limits, 5000, rng)
    assert len(x) > 2000
    a = rng.uniform(-3.0, 3.0, (len(x), 1))
    ut, _, feasible = project_batch(S, x, a)
    assert feasible.all()
    assert np.all(np.abs(ut) <= sysm.a_max + 1e-12)
    nxt = sysm.step(x, ut)                      # the nonlinear plant, not the model of the set
    assert S.invariant.contains(nxt, tol=1e-9).all()
    assert not sysm.violation(nxt).any()
    # Closed loop over many steps with adversarial raw actions: never leaves the set.
    x = x[:500]
    for _ in range(200):
        a = np.where(rng.random((len(x), 1)) < 0.5, 5.0, -5.0) * np.sign(x[:, 1:2] + 1e-12)
        ut, _, feasible = project_batch(S, x, a)
        assert feasible.all()
        x = sysm.step(x, ut)
        assert not sysm.violation(x).any()


# ------------------------------------------------------------------ the set robust to one late command

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
    S = safe_set_of(sysm, late_commands=1)
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
    # every stacked row (next state and held state in S), before the pruning
    full = dataclasses.replace(S, **_explicit_rows(S.invariant, S.drift_matrix, S.B, S.drift_offset,
                                                   np.zeros((0, dof)), np.zeros(0), 1, None))
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
    E, G, F, f = S.affine_rows()
    assert F.shape == (len(f), 0)
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.0, 1.0, (50, 4))
    np.testing.assert_allclose(f - x @ E.T, S.rhs(x), atol=1e-12)
    assert np.array_equal(G, S.G)
    N = S.nominal_set()
    assert N.late_commands == 0 and N.invariant is S.nominal and N.nominal is S.nominal
    En, Gn, _, fn = N.affine_rows()
    np.testing.assert_allclose(Gn, S.nominal.H @ sysm.B)
    np.testing.assert_allclose(En, S.nominal.H @ sysm.A)
    np.testing.assert_allclose(fn, S.nominal.h)
    nominal0 = safe_set_of(sysm)
    assert nominal0.late_commands == 0 and nominal0.nominal is nominal0.invariant
    np.testing.assert_allclose(nominal0.invariant.h, S.nominal.h)


def test_late_commands_need_a_linear_plant():
    with pytest.raises(ValueError, match="pendulum supports late_commands=0 only"):
        safe_set_of(Pendulum(), late_commands=1)
    assert safe_set_of(Pendulum(), late_commands=0).late_commands == 0
    with pytest.raises(ValueError, match="late_commands must be 0 or 1"):
        safe_set_of(DoubleIntegrator(), late_commands=2)
    S = safe_set_of(Pendulum())
    with pytest.raises(ValueError, match="linear plant"):
        dataclasses.replace(S, late_commands=1)
    with pytest.raises(ValueError, match="nonlinear drift"):
        S.affine_rows()


# ------------------------------------------------------------------ closed loop with late commands

def run_late_plant(late_commands: int, dt: float, episodes: int = 20, steps: int = 200, p_late: float = 0.3):
    """A policy that drives into the walls, projected; at each step with probability ``p_late``
    (never twice in a row) the plant applies the previous command once more. Returns
    (state-box violations, fallbacks)."""
    sysm = DoubleIntegrator(dt=dt)
    lqr = backup_of(sysm)
    P = SafeguardProjector(safe_set_of(sysm, late_commands=late_commands), backup=lambda x, r: lqr(x, np.zeros(1)))
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


# ------------------------------------------------------------------ random plants (both constructions)

def _check_safe_set_on_random_plant(plant, kind, seed):
    """The safe-set promises on states of the set drawn from the certified region: U_safe non-empty
    (the projection of a hostile command is no fallback), the backup's command in U_safe, the
    projected command inside the input set and the rows, and recursive feasibility: U_safe of the
    next state non-empty again, and (late_commands=1) after holding the command once more too (the
    nominal set's where the implicit set's held block is on the nominal set, module docstring)."""
    backup = LQRBackup(plant)
    try:
        S = safe_set_for(plant, backup, late_commands=1)
    except ValueError:   # implicit (or an explicit draw falling back): a loop that does not contract
        assume(False)
    # an explicit construction qhull cannot finish (near-degenerate facets) falls back to the implicit set
    assert S.kind == kind or (kind == "explicit" and S.kind == "implicit")
    kind = S.kind
    P = SafeguardProjector(S, backup=backup)
    reg = plant.region
    rng = np.random.default_rng(seed)
    x = rng.uniform(reg.x_min, reg.x_max, (400, plant.n))
    r = rng.uniform(reg.r_min, reg.r_max, (400, plant.nr))
    inside = S.contains(x, r) if plant.nr == 0 else np.array([S.contains(xi, ri) for xi, ri in zip(x, r)])
    assume(inside.sum() >= 5)
    held_on_nominal = "held block on the nominal set" in S.name
    # The implicit set is built around the backup: its command is in U_safe on the whole set. The
    # explicit set is not; there the promise holds where the backup certifies, in the nominal set.
    try:
        backup.certify()
        certified = True
    except ValueError:
        certified = False
    for xi, ri in list(zip(x[inside], r[inside]))[:40]:
        ub = backup(xi, ri)
        b = S.rhs(xi)
        if kind == "implicit":
            assert np.all(S.G @ ub + S.F @ S.rho_of(ri) <= b + 1e-7), "the backup's command is not in U_safe"
            assert np.all(ub >= S.u_min - 1e-9) and np.all(ub <= S.u_max + 1e-9)
        elif certified and reg.contains(xi, ri):
            Nn = S.nominal_set()
            assert np.all(Nn.G @ ub <= Nn.rhs(xi) + 1e-7), "the certified backup's command is not in U_safe"
        u_raw = rng.uniform(2.0 * plant.u_min - plant.u_max, 2.0 * plant.u_max - plant.u_min)
        res = P.project(xi, u_raw, ri)
        assert not res.fallback, (S.name, xi, ri, res.reason)
        assert np.all(res.u >= S.u_min - 1e-12) and np.all(res.u <= S.u_max + 1e-12)
        Fi, fi, _ = plant.input_rows()
        assert np.all(Fi @ res.u <= fi + 1e-9)
        if not S.rho_dim:
            assert np.all(S.G @ res.u <= b + 1e-8)
        else:   # some reference variables witness the command (an LP)
            lp = linprog(np.zeros(S.rho_dim), A_ub=S.F, b_ub=b - S.G @ res.u + 1e-8,
                         bounds=list(zip(S.rho_min, S.rho_max)), method="highs")
            assert lp.status == 0
        x1 = plant.step(xi, res.u)
        assert not any(v.any() for v in plant.violations(x1).values())
        # non-empty up to the sets' fixed-point precision (~1e-10 in row units: a state the
        # projection put on the boundary may come back that far outside, and the projector then
        # takes its nominal level, which the test of the projector covers)
        assert emptiness(S, x1) <= 1e-8, "U_safe of the next state is empty"
        x2 = plant.step(x1, res.u)                       # the command held one period longer
        assert not any(v.any() for v in plant.violations(x2).values())
        assert emptiness(S.nominal_set() if held_on_nominal else S, x2) <= 1e-8, \
            "U_safe after a held command is empty"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(plant=plants(n=st.integers(1, 2), m=st.just(1), unbounded=0), seed=st.integers(0, 2**16))
def test_random_explicit_sets_keep_their_promises(plant, seed):
    _check_safe_set_on_random_plant(plant, "explicit", seed)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(plant=plants(n=st.just(4), m=st.just(1), stable=True, h_rows=0, region_frac=0.2),
       seed=st.integers(0, 2**16))
def test_random_implicit_sets_keep_their_promises(plant, seed):
    _check_safe_set_on_random_plant(plant, "implicit", seed)


def test_implicit_sets_are_cached_and_their_pruned_rows_give_the_same_projection():
    """The cache hands back the same object; the LP-pruned rows give the projection of every row."""
    from scpo_ros.safeguard import invariant_set as inv
    plant = random_plant(3, n=4, m=1, nr=1, stable=True, h_rows=0, region_frac=0.2)
    backup = LQRBackup(plant)
    S = safe_set_for(plant, backup, late_commands=0)
    assert safe_set_for(plant, backup, late_commands=0) is S
    assert not S.G.flags.writeable
    O_L = S.invariant
    D, G, F, f = inv._implicit_rows(plant, O_L, S.drift_matrix, S.B, S.drift_offset, 0)
    assert len(f) > len(S.f)
    full = dataclasses.replace(S, D=D, G=G, F=F, f=f)
    P, Pf = SafeguardProjector(full), SafeguardProjector(S)
    rng = np.random.default_rng(0)
    reg = plant.region
    for _ in range(200):
        x, r = rng.uniform(reg.x_min, reg.x_max), rng.uniform(reg.r_min, reg.r_max)
        u = rng.uniform(plant.u_min * 2, plant.u_max * 2)
        a, b = P.project(x, u, r), Pf.project(x, u, r)
        assert a.fallback == b.fallback
        np.testing.assert_allclose(a.u, b.u, atol=1e-7)
