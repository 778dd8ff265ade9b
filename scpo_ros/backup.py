"""The stabilising backup controller: discrete LQR on the tracking error of any plant.

``u = u_ss(r) - K (x - x_ss(r))``: the plant's equilibrium ``(x_ss(r), u_ss(r))`` of the
reference ``r`` of its tracked states (``Plant.equilibrium_map``, affine in ``r``, with a
constant part when the plant has an affine term ``c``) plus the LQR feedback on the error
``e = x - x_ss(r)``. ``K`` and ``P`` come from the discrete algebraic Riccati equation of the
plant's ``(A, B)`` (a model plant: its linearisation) with the file's diagonal weights
``backup: {Q, R}``; ``V(e) = eᵀ P e`` is the Lyapunov function the SCPO stability metric uses.
The error obeys ``e+ = Φ e`` with ``Φ = A - B K`` (``A_cl``) on a linear plant, because
``x_ss(r) = A x_ss(r) + B u_ss(r) + c``.

``LQRBackup.certify`` checks the promise the whole method rests on: from every state of the
certified region (a box of states and references, ``plant.region``) the backup alone keeps
every constraint row of the plant (state box, ``H``, input box, ``G``) forever.

Linear plants: exact, without vertex enumeration. The trajectory is affine in ``z = (x0, r)``:
``x_t = x_ss(r) + Φᵗ (x0 - x_ss(r))``, ``u_t = u_ss(r) - K Φᵗ (x0 - x_ss(r))``, so a row
``a·x_t <= b`` at step ``t`` is an affine function of ``z`` whose maximum over the box is its
centre value plus ``|coefficients| · half-widths`` (the support function of a box). That is
computed for ``t = 0, 1, ...`` until the *tail bound* proves every later step safe: with
``P_L`` the Lyapunov matrix ``Φᵀ P_L Φ = P_L - I``, ``W(e) = eᵀ P_L e`` never increases along
the closed loop and ``|a·e| <= ||P_L^{-1/2} a|| sqrt(W(e))`` (Cauchy–Schwarz), so once
``max_r a·x_ss(r) + ||P_L^{-1/2} a|| max_z sqrt(W(e_t))`` is below ``b`` for every row it stays
below for every ``t' >= t``. ``sqrt(W)`` is a norm, so its maximum over the box image is
bounded by the centre's norm plus the half-width-weighted norms of the generators. The tail
bound shrinks geometrically (``Φ`` is stable), so the loop ends as soon as the equilibria of
the reference box have strict slack; ``horizon_s`` (seconds) caps it. The steps before are
the exact worst case, not a bound: a row that fails there fails at a corner of the region.

Model plants (nonlinear): the model is simulated from the region's corners and random
states (``certify`` says ``"sampled"``: a check, not a proof; the safe set carries the proof).

``LQRBackup.__call__`` is the one definition of the backup action; ``input_gain`` is the same
map as a matrix on ``[x, r, 1]``, from which the fused forms (the control path's folded law,
the base gain of the RL policies) are built.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg

CERTIFY_HORIZON_S = 120.0
"""Longest closed-loop time the exact certificate unrolls before the tail bound must hold
(seconds; the tail bound usually closes after a few closed-loop time constants)."""


class BackupCertificationError(ValueError):
    """The backup controller cannot keep the certified region safe."""


def dlqr(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Infinite-horizon discrete LQR gain ``K`` and Riccati solution ``P``."""
    P = scipy.linalg.solve_discrete_are(A, B, Q, R)
    K = np.linalg.solve(B.T @ P @ B + R, B.T @ P @ A)
    return K, P


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


class LQRBackup:
    """LQR tracking controller of a ``Plant`` (``scpo_ros.plant``) with its file's weights.

    ``Q = diag(plant.backup_Q)``, ``R = diag(plant.backup_R)``; ``Q``/``R`` override them (the
    tuning tools). ``K (m, n)``, ``P (n, n)``, ``A_cl = A - B K`` (the error dynamics).
    """

    def __init__(self, plant, Q=None, R=None):
        self.plant = plant
        Q = np.diag(np.asarray(plant.backup_Q if Q is None else Q, dtype=float))
        R = np.diag(np.asarray(plant.backup_R if R is None else R, dtype=float))
        if np.any(np.diag(Q) < 0) or np.any(np.diag(R) <= 0):
            raise ValueError("LQR weights need Q >= 0 and R > 0")
        self.A, self.B = np.asarray(plant.A, dtype=float), np.asarray(plant.B, dtype=float)
        self.Q, self.R = Q, R
        try:
            self.K, self.P = dlqr(self.A, self.B, Q, R)
        except (ValueError, np.linalg.LinAlgError) as exc:
            raise BackupCertificationError(f"backup LQR of {plant.name}: the Riccati equation has no "
                                           f"stabilising solution for Q={np.diag(Q).tolist()}, "
                                           f"R={np.diag(R).tolist()} ({exc})") from None
        self.A_cl = self.A - self.B @ self.K
        self.Mx, self.mx, self.Mu, self.mu = (np.asarray(a, dtype=float) for a in plant.equilibrium_map())
        self.n, self.m, self.nr = self.B.shape[0], self.B.shape[1], self.Mx.shape[1]

    # ------------------------------------------------------------------ the action
    def equilibrium(self, r):
        """``(x_ss(r), u_ss(r))`` for references ``r (..., nr)`` (numpy or torch; None: no reference)."""
        if r is None:
            r = np.zeros(self.nr)
        if _is_torch(r):
            import torch

            def t(a):
                return torch.as_tensor(np.array(a), dtype=r.dtype, device=r.device)
            return r @ t(self.Mx.T) + t(self.mx), r @ t(self.Mu.T) + t(self.mu)
        r = np.asarray(r, dtype=float)
        return r @ self.Mx.T + self.mx, r @ self.Mu.T + self.mu

    def error(self, x, r):
        """``e = x - x_ss(r)`` (batched, numpy or torch)."""
        return x - self.equilibrium(self._ref(x, r))[0]

    def __call__(self, x, r=None):
        """Backup action for states ``x (..., n)`` and references ``r (..., nr)`` (numpy or torch)."""
        x_ss, u_ss = self.equilibrium(self._ref(x, r))
        e = x - x_ss
        if _is_torch(e):
            import torch
            return u_ss - e @ torch.as_tensor(self.K.T, dtype=e.dtype, device=e.device)
        return u_ss - np.asarray(e) @ self.K.T

    def _ref(self, x, r):
        """``r`` as an array of the batch's shape; without tracked states an empty reference."""
        if r is None or self.nr == 0:
            if _is_torch(x):
                return x.new_zeros(x.shape[:-1] + (self.nr,))
            return np.zeros(np.shape(x)[:-1] + (self.nr,))
        return r

    def input_gain(self) -> np.ndarray:
        """``W (m, n + nr + 1)`` with ``u = W [x, r, 1]``: ``[-K, Mu + K Mx, mu + K mx]`` (the last
        column is the constant part of ``u_ss``, nonzero for a plant with an affine term)."""
        return np.hstack([-self.K, self.Mu + self.K @ self.Mx, (self.mu + self.K @ self.mx)[:, None]])

    def spectral_radius(self) -> float:
        return float(np.max(np.abs(np.linalg.eigvals(self.A_cl))))

    # ------------------------------------------------------------------ the certificate
    def certify(self, region=None, horizon_s: float = CERTIFY_HORIZON_S, samples: int = 2000,
                seed: int = 0) -> dict:
        """Raise ``BackupCertificationError`` unless the backup is stable and keeps every constraint
        row from every point of ``region`` (default ``plant.region``); return the worst case:
        ``rows`` (name -> (worst value of the row, its bound)), ``spectral_radius``, ``steps`` (the
        steps unrolled), ``method`` (``exact`` or ``sampled``)."""
        region = self.plant.region if region is None else region
        rho = self.spectral_radius()
        if not rho < 1.0:
            raise BackupCertificationError(f"backup of {self.plant.name}: the closed loop is not stable "
                                           f"(spectral radius {rho:.4f})")
        lo, hi = np.asarray(region.lower, dtype=float), np.asarray(region.upper, dtype=float)
        rows, names = self._rows()
        if self.plant.linear:
            worst, steps = self._worst_exact(rows, lo, hi, horizon_s)
            method = "exact"
        else:
            worst, steps = self._worst_sampled(rows, lo, hi, horizon_s, samples, seed), None
            method = "sampled"
        bound = rows[2]
        broken = np.flatnonzero(worst > bound + 1e-9 * np.maximum(1.0, np.abs(bound)))
        if broken.size:
            parts = [f"{names[i]}: worst {worst[i]:.6g} > {bound[i]:.6g}" for i in broken]
            raise BackupCertificationError(
                f"backup LQR of {self.plant.name} (Q={np.diag(self.Q).tolist()}, R={np.diag(self.R).tolist()}) "
                f"cannot keep the certified region safe ({method}): {'; '.join(parts)}")
        return {"rows": {names[i]: (float(worst[i]), float(bound[i])) for i in range(len(names))},
                "spectral_radius": rho, "steps": steps, "method": method}

    def _rows(self):
        """Every constraint row on the closed loop as ``(Fx, Fu, f)``: a state row ``F x <= f`` has
        ``Fu = 0``, an input row ``F u <= f`` has ``Fx = 0``; with the rows' names."""
        Fs, fs, ns = self.plant.state_rows()
        Fi, fi, ni = self.plant.input_rows()
        Fx = np.vstack([Fs, np.zeros((len(fi), self.n))])
        Fu = np.vstack([np.zeros((len(fs), self.m)), Fi])
        return (Fx, Fu, np.concatenate([fs, fi])), tuple(ns) + tuple(ni)

    def _worst_exact(self, rows, lo, hi, horizon_s):
        """Exact worst case of every row over the box ``[lo, hi]`` of ``z = (x0, r)`` and all time
        (module docstring): the affine trajectory's support function per step, then the tail bound."""
        Fx, Fu, f = rows
        n = self.n
        # Row on the error: a_e = Fx - Fu K (state rows read x, input rows read -K e); the
        # equilibrium part is a_ss(r) = Fx x_ss(r) + Fu u_ss(r).
        a_e = Fx - Fu @ self.K
        ss_r = Fx @ self.Mx + Fu @ self.Mu                                   # (k, nr)
        ss_c = Fx @ self.mx + Fu @ self.mu                                   # (k,)
        c, w = (lo + hi) / 2.0, (hi - lo) / 2.0
        # e0 = L z + l0 with L = [I, -Mx], l0 = -mx
        L = np.hstack([np.eye(n), -self.Mx])
        l0 = -self.mx
        ss_max = ss_c + ss_r @ c[n:] + np.abs(ss_r) @ w[n:]                 # max over r of a_ss(r)
        W = scipy.linalg.solve_discrete_lyapunov(self.A_cl.T, np.eye(n))     # Φᵀ W Φ = W - I
        W = (W + W.T) / 2.0
        Wh = np.linalg.cholesky(W).T                                         # W = Whᵀ Wh
        # ||W^{-1/2} a|| = sqrt(a W^{-1} a)
        gain = np.sqrt(np.einsum("ij,ij->i", a_e, np.linalg.solve(W, a_e.T).T))
        worst = np.full(len(f), -np.inf)
        M = np.eye(n)                                                        # Φᵗ
        steps = max(1, int(math.ceil(horizon_s / self.plant.dt)))
        for t in range(steps + 1):
            Et, et = M @ L, M @ l0                                           # e_t = Et z + et
            coef = np.hstack([np.zeros((len(f), n)), ss_r]) + a_e @ Et       # row value = coef z + const
            const = ss_c + a_e @ et
            worst = np.maximum(worst, const + coef @ c + np.abs(coef) @ w)
            tail = np.linalg.norm(Wh @ (Et @ c + et)) + np.linalg.norm(Wh @ Et, axis=0) @ w
            if np.all(ss_max + gain * tail <= f) and np.all(worst <= f):
                return np.maximum(worst, ss_max), t
            if np.any(worst > f + 1e-9 * np.maximum(1.0, np.abs(f))):
                return worst, t                                              # a true violation: stop
            M = self.A_cl @ M
        raise BackupCertificationError(
            f"backup of {self.plant.name}: not certified within {horizon_s:g} s: the transient bound does "
            f"not fall below the slack of {self._tightest(rows, ss_max)} (an equilibrium of the reference "
            f"box on or too near a constraint, or a very slow closed loop)")

    def _tightest(self, rows, ss_max) -> str:
        names = self._rows()[1]
        i = int(np.argmin(rows[2] - ss_max))
        return f"{names[i]} (slack {rows[2][i] - ss_max[i]:.3g})"

    def _worst_sampled(self, rows, lo, hi, horizon_s, samples, seed):
        """Worst case of every row along model rollouts from the box's corners and random points."""
        from .plant import _corners  # the corners (subsampled for many dimensions), as the loader's
        Fx, Fu, f = rows
        n = self.n
        rng = np.random.default_rng(seed)
        z = np.vstack([_corners(lo, hi), rng.uniform(lo, hi, (samples, len(lo)))])
        x, r = z[:, :n], z[:, n:]
        worst = np.full(len(f), -np.inf)
        for _ in range(max(1, int(math.ceil(horizon_s / self.plant.dt))) + 1):
            u = self(x, r)
            worst = np.maximum(worst, (x @ Fx.T + u @ Fu.T).max(0))
            x = np.asarray(self.plant.step(x, u), dtype=float)
            if not np.isfinite(x).all():
                break
        return worst
