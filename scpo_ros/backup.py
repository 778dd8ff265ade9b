"""The stabilising backup controller: discrete LQR on the tracking error.

``u = -K (x - x_ref)`` with ``x_ref = [r, 0]`` (position reference r, zero velocity).
``P`` from the discrete algebraic Riccati equation gives the Lyapunov function
``V(e) = eᵀ P e`` that the SCPO stability metric uses.

``LQRBackup.certify`` checks the promise the whole method rests on: from every
state of the certified initial set the backup alone keeps every constraint. For a
linear closed loop the trajectory is linear in ``(x0, r)``, so the worst case over
the initial box is attained at one of its vertices: simulating the vertices is an
exact check, not a sample.

``LQRBackup.__call__`` is the one definition of the backup action; ``input_gain`` is the
same map as a matrix on the policy input ``[x, r]``, from which the fused forms (the
control path's folded law, the base gain of the RL policies) are built. ``PendulumLQR`` is
the pendulum's counterpart (no reference).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg

from .dynamics import DoubleIntegrator, Pendulum


class BackupCertificationError(ValueError):
    """The backup controller cannot keep the certified initial set safe."""


def dlqr(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Infinite-horizon discrete LQR gain ``K`` and Riccati solution ``P``."""
    P = scipy.linalg.solve_discrete_are(A, B, Q, R)
    K = np.linalg.solve(B.T @ P @ B + R, B.T @ P @ A)
    return K, P


def diagonal_lqr(A: np.ndarray, B: np.ndarray, q_pos: float, q_vel: float, r_act: float):
    """``dlqr`` with ``Q = diag(q_pos.., q_vel..)`` (one of each per axis of ``B``) and
    ``R = r_act I``: the backups' weights, checked. Returns ``K, P, Q, R``."""
    if min(q_pos, q_vel) < 0 or r_act <= 0:
        raise ValueError("LQR weights need q_pos, q_vel >= 0 and r_act > 0")
    n = B.shape[1]
    Q = np.diag([q_pos] * n + [q_vel] * n)
    R = r_act * np.eye(n)
    K, P = dlqr(A, B, Q, R)
    return K, P, Q, R


@dataclass(frozen=True)
class InitialSet:
    """Box of initial states and references the certificate covers (per axis).

    ``|p0| <= p0_max``, ``|v0| <= v0_max``, ``|r| <= r_max``.
    """

    p0_max: float = 0.8
    v0_max: float = 0.2
    r_max: float = 0.5

    def vertices(self, dof: int) -> tuple[np.ndarray, np.ndarray]:
        """All vertices of the (x0, r) box: states ``(V, 2 dof)`` and references ``(V, dof)``."""
        per_axis = [(p, v, r) for p in (-self.p0_max, self.p0_max)
                    for v in (-self.v0_max, self.v0_max) for r in (-self.r_max, self.r_max)]
        combos = np.array(list(itertools.product(per_axis, repeat=dof)))  # (V, dof, 3)
        x0 = np.concatenate([combos[..., 0], combos[..., 1]], axis=-1)
        return x0, combos[..., 2].copy()

    def contains(self, x: np.ndarray, r: np.ndarray, dof: int, slack: float = 0.0) -> np.ndarray:
        x, r = np.asarray(x), np.asarray(r)
        return ((np.abs(x[..., :dof]) <= self.p0_max + slack).all(-1)
                & (np.abs(x[..., dof:]) <= self.v0_max + slack).all(-1)
                & (np.abs(r) <= self.r_max + slack).all(-1))


@dataclass
class _DiagonalLQR:
    """What both backups share: ``K, P`` of the discrete LQR with ``Q = diag(q_pos.., q_vel..)``
    and ``R = r_act I`` (``diagonal_lqr``) on the plant's ``A, B`` (``_plant_matrices``)."""

    system: Any
    q_pos: float = 1.0
    q_vel: float = 1.0
    r_act: float = 10.0
    K: np.ndarray = field(init=False, repr=False)
    P: np.ndarray = field(init=False, repr=False)

    def _plant_matrices(self) -> tuple[np.ndarray, np.ndarray]:
        return self.system.A, self.system.B

    def __post_init__(self):
        self.K, self.P, self.Q, self.R = diagonal_lqr(*self._plant_matrices(), self.q_pos, self.q_vel, self.r_act)


@dataclass
class LQRBackup(_DiagonalLQR):
    """LQR tracking controller for a ``DoubleIntegrator`` with per-axis weights.

    ``q_pos``, ``q_vel``, ``r_act``: diagonal weights of Q and R (the same on every
    axis). The defaults (Q = I, R = 10) give a gentle controller that keeps the
    default initial set inside the unit box with |u| <= 0.58.
    """

    system: DoubleIntegrator

    def __post_init__(self):
        super().__post_init__()
        self.A_cl = self.system.A - self.system.B @ self.K

    def reference_state(self, r):
        """``x_ref = [r, 0]`` for references ``r (..., dof)`` (numpy or torch)."""
        if isinstance(r, np.ndarray):
            return np.concatenate([r, np.zeros_like(r)], axis=-1)
        import torch
        return torch.cat([r, torch.zeros_like(r)], dim=-1)

    def __call__(self, x, r):
        """Backup action for states ``x (..., 2 dof)`` and references ``r (..., dof)``."""
        e = x - self.reference_state(r)
        if isinstance(e, np.ndarray):
            return -e @ self.K.T
        import torch
        return -e @ torch.as_tensor(self.K.T, dtype=e.dtype, device=e.device)

    def input_gain(self) -> np.ndarray:
        """``W (dof, 3 dof)`` with ``W [x, r] = -K (x - [r, 0])``: ``W = [-K, K_p]`` (``K_p``:
        the position columns of K), the backup as a linear map of ``policy_inputs(x, r)``."""
        return np.concatenate([-self.K, self.K[:, :self.system.dof]], axis=1)

    def spectral_radius(self) -> float:
        return float(np.max(np.abs(np.linalg.eigvals(self.A_cl))))

    def worst_case(self, initial_set: InitialSet, horizon: int = 600) -> dict:
        """Exact worst case of |p|, |v|, |u| over the initial box (vertex simulation)."""
        x0, r = initial_set.vertices(self.system.dof)
        n = self.system.dof
        e = x0 - self.reference_state(r)
        worst = {"p": 0.0, "v": 0.0, "u": 0.0}
        for _ in range(horizon):
            u = -e @ self.K.T
            x = e + self.reference_state(r)
            worst["p"] = max(worst["p"], float(np.abs(x[:, :n]).max()))
            worst["v"] = max(worst["v"], float(np.abs(x[:, n:]).max()))
            worst["u"] = max(worst["u"], float(np.abs(u).max()))
            e = e @ self.A_cl.T
        return worst

    def certify(self, initial_set: InitialSet, horizon: int = 600) -> dict:
        """Raise ``BackupCertificationError`` unless the backup is stable and keeps the
        constraints from every state of ``initial_set``; return the worst case."""
        rho = self.spectral_radius()
        if not rho < 1.0:
            raise BackupCertificationError(f"backup closed loop is not stable (spectral radius {rho:.4f})")
        sysm = self.system
        if initial_set.r_max > sysm.p_max or initial_set.p0_max > sysm.p_max or initial_set.v0_max > sysm.v_max:
            raise BackupCertificationError(
                f"initial set {initial_set} is not inside the constraint box "
                f"(p_max={sysm.p_max}, v_max={sysm.v_max})")
        worst = self.worst_case(initial_set, horizon)
        limits = {"p": sysm.p_max, "v": sysm.v_max, "u": sysm.u_max}
        broken = [f"max|{k}| = {worst[k]:.4f} > {k}_max = {limits[k]}" for k in worst if worst[k] > limits[k]]
        if broken:
            raise BackupCertificationError(
                f"backup LQR (q_pos={self.q_pos:g}, q_vel={self.q_vel:g}, r_act={self.r_act:g}) cannot keep "
                f"the initial set {initial_set} safe: {'; '.join(broken)}")
        worst["spectral_radius"] = rho
        return worst


@dataclass
class PendulumLQR(_DiagonalLQR):
    """LQR on the pendulum's upright linearisation, ``u = -K x`` (the reference is ignored).

    ``q_pos``, ``q_vel``, ``r_act``: the weights of θ, θ' and the action.
    """

    system: Pendulum
    q_vel: float = 0.1
    r_act: float = 1.0

    def _plant_matrices(self) -> tuple[np.ndarray, np.ndarray]:
        return self.system.linearization()

    def __call__(self, x, r=None):
        """Backup action for states ``x (..., 2)`` (numpy or torch)."""
        if isinstance(x, np.ndarray):
            return -x @ self.K.T
        import torch
        return -x @ torch.as_tensor(self.K.T, dtype=x.dtype, device=x.device)

    def input_gain(self) -> np.ndarray:
        """``-K (1, 2)``: the backup as a linear map of the state."""
        return -self.K
