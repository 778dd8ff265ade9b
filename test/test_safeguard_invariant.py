"""Invariant sets: structure, and the invariance property of the projected closed loop."""
import numpy as np
import pytest

from scpo_ros.backup import LQRBackup
from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.safeguard.invariant_set import (
    box,
    double_integrator_safe_set,
    maximal_control_invariant_set,
    pendulum_safe_set,
    pre_set,
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
    S = double_integrator_safe_set(sysm)
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
    S = double_integrator_safe_set(sysm)
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
    C = double_integrator_safe_set(sysm).invariant
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


def test_projector_falls_back_to_the_backup_outside_the_set():
    sysm = DoubleIntegrator(dof=1)
    backup = LQRBackup(sysm)
    proj = SafeguardProjector(double_integrator_safe_set(sysm), backup=backup)
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
