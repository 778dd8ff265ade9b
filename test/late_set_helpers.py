"""The plants and sets the late-command tests share (test_safeguard_invariant_set.py: the set
robust to one late or missed command, ``late_commands=1``; test_safeguard_projection.py: the
projector's levels around it), one projector per configuration, and the hypothesis strategies."""
import dataclasses
import functools

import numpy as np
import yaml
from hypothesis import strategies as st
from scipy.optimize import linprog

from scpo_ros.backup import LQRBackup, dlqr
from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.plant import double_integrator_plant, load_plant, plant_from_dict
from scpo_ros.safeguard.invariant_set import Polytope, linear_safe_set, safe_set_for
from scpo_ros.safeguard.projection import SafeguardProjector

TOL = 1e-9
CONFIGS = [(dof, dt, u_max) for dof in (1, 2) for dt in (0.02, 0.05, 0.1) for u_max in (0.6, 1.0)]
UNSTABLE = "unstable"
"""An open-loop unstable plant whose late set is strictly smaller than its nominal set (for
the double integrator the two sets coincide), so the nominal level of the projector is
exercised on states of the nominal set."""


def plant_of(system):
    """The generic ``Plant`` of a ``dynamics.DoubleIntegrator`` (through the node parameters'
    bridge) or a ``dynamics.Pendulum`` (the shipped file with the system's dt, params and
    limits): the tests simulate with the system and build sets and backups on the plant."""
    if isinstance(system, Pendulum):
        return _pendulum_plant(system.dt, system.g, system.tau_max, system.theta_max, system.theta_dot_max,
                               system.a_max)
    return _di_plant(system.dof, system.dt, system.p_max, system.v_max, system.u_max)


@functools.cache
def _di_plant(dof, dt, p_max, v_max, u_max):
    return double_integrator_plant(dof, dt, p_max, v_max, u_max)


@functools.cache
def _pendulum_plant(dt, g, tau_max, theta_max, theta_dot_max, a_max):
    d = yaml.safe_load(load_plant("pendulum").text)
    d.update(dt=dt, params={"g": g, "tau_max": tau_max}, x_min=[-theta_max, -theta_dot_max],
             x_max=[theta_max, theta_dot_max], u_min=[-a_max], u_max=[a_max])
    return plant_from_dict(d, "<pendulum of the test>")


def safe_set_of(system, late_commands: int = 0):
    """``safe_set_for`` of the system's plant (nominal by default, as the old system API)."""
    return safe_set_for(plant_of(system), late_commands=late_commands)


def backup_of(system):
    """The LQR backup of the system's plant."""
    return LQRBackup(plant_of(system))


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
        S = safe_set_of(sysm, late_commands=1)
        lqr = backup_of(sysm)
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


def emptiness(S, x) -> float:
    """``min over u, ρ in their boxes of max_i (G u + F ρ - b(x))_i`` (an LP): <= 0 iff U_safe(x) is
    not empty (test_safeguard_invariant_set.py, test_uncertainty.py)."""
    b = S.rhs(x)
    m, p = S.action_dim, S.rho_dim
    lp = linprog(np.r_[np.zeros(m + p), 1.0], A_ub=np.hstack([S.G, S.F, -np.ones((len(b), 1))]), b_ub=b,
                 bounds=list(zip(S.u_min, S.u_max)) + list(zip(S.rho_min, S.rho_max)) + [(None, None)],
                 method="highs")
    assert lp.status == 0
    return float(lp.fun)
