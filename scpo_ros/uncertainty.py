"""What a plant file's ``uncertainty:`` block means for the sets, the certificates and the monitor.

The file declares how the true robot may differ from its model (``plant.Uncertainty``):
an additive disturbance box, entrywise bounds on ``A`` and ``B`` (linear plants) or ranges of a
model class's parameters, an input delay of up to one period, and measurement noise. Two
bounds follow from it, both per state and per control period, both sound for what is declared:

- ``additive_bound(plant)``: one box ``W = {|w| <= w_eff}`` that covers every declared
  difference on the whole constraint set, ``x+ - f(x, u) ∈ W`` for every ``x`` in the state
  box and ``u`` in the input box (the "equivalent additive bound over the set"). The robust
  safe sets are built against it (``safeguard.invariant_set``).
- ``ModelBound.at(x, u)``: the state-dependent bound the runtime model monitor checks a
  measured one-step residual against, tighter than ``W`` away from the limits.

How each part enters, per step (``v`` the measurement-noise bound, ``|M|`` entrywise):

- disturbance:            ``w_max``;
- ``A_delta``, ``B_delta``: ``A_delta |x| + B_delta |u|`` (over the set: ``|x|``, ``|u|`` at their
  largest over the boxes; every state an uncertain column touches must be bounded);
- model ``params``:       ``max_v |f_v(x, u) - f(x, u)|`` over the corners ``v`` of the parameter box
  (over the set: also over 4 096 sampled states and inputs and the box corners: sampled,
  and said so in ``describe``);
- measurement noise:      the measured state ``y = x + n`` obeys ``y+ = f(y, u) + w + n+ - (f(y, u) -
  f(y - n, u))``, so ``(I + |A|) v`` joins the disturbance (``A`` the linearisation for a model
  plant), and every state constraint is tightened by ``|F_i| v`` on the measured state
  (``measured_state_rows``).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from .plant import Plant

PARAMETER_VERTEX_LIMIT = 8
"""A model plant may declare ranges for at most this many parameters (``2**8`` corner models)."""
SET_SAMPLES = 4096
"""States × inputs sampled for a model plant's parameter bound over the set."""


def parameter_vertices(plant: Plant) -> list[dict]:
    """The corners of a model plant's declared parameter box, as full ``params`` mappings (the
    nominal values for the parameters without a range); ``[]`` when none is declared."""
    ranges = plant.uncertainty.params
    if not ranges:
        return []
    if len(ranges) > PARAMETER_VERTEX_LIMIT:
        raise ValueError(f"{plant.name}: {len(ranges)} uncertain parameters; at most {PARAMETER_VERTEX_LIMIT} "
                         f"(each adds a factor of two of corner models)")
    names = list(ranges)
    return [{**plant.params, **dict(zip(names, corner))}
            for corner in itertools.product(*(ranges[k] for k in names))]


def vertex_models(plant: Plant) -> list:
    """One model instance per corner of the parameter box (``parameter_vertices``)."""
    cls = type(plant.model)
    return [cls(dt=plant.dt, **params) for params in parameter_vertices(plant)]


def _abs_limits(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(lo), np.abs(hi))


def additive_bound(plant: Plant) -> np.ndarray:
    """``w_eff (n,)``: a per-step box that every declared difference stays in over the constraint
    set (module docstring). Zeros when nothing is declared. ``ValueError`` when an uncertain
    matrix column touches a state without finite limits (no bound over the set exists)."""
    u = plant.uncertainty
    w = np.array(u.w_max, dtype=float)
    if not u.declared:
        return w
    x_abs = _abs_limits(plant.x_min, plant.x_max)
    u_abs = _abs_limits(plant.u_min, plant.u_max)
    if plant.linear:
        cols = np.flatnonzero((u.A_delta > 0).any(axis=0) & ~np.isfinite(x_abs))
        if cols.size:
            raise ValueError(f"{plant.name}: uncertainty.A_delta has entries in the column of "
                             f"'{plant.states[int(cols[0])]}', which has no finite limits: no additive bound "
                             f"over the set; bound that state or set those entries to 0")
        w += u.A_delta @ np.where(np.isfinite(x_abs), x_abs, 0.0) + u.B_delta @ u_abs
    elif u.params:
        w += _model_bound_over_set(plant)
    noise = np.asarray(u.measurement_noise, dtype=float)
    if noise.any():
        w += noise + np.abs(plant.A) @ noise
    return w


def _model_bound_over_set(plant: Plant) -> np.ndarray:
    """``max |f_v - f|`` over the parameter corners and sampled (state, input) pairs of the boxes
    (their corners among them): sampled, not proven (``describe`` says so)."""
    if not (np.isfinite(plant.x_min).all() and np.isfinite(plant.x_max).all()):
        raise ValueError(f"{plant.name}: a model plant's parameter ranges are bounded over the state box, which "
                         f"must then be finite")
    rng = np.random.default_rng(0)
    lo = np.concatenate([plant.x_min, plant.u_min])
    hi = np.concatenate([plant.x_max, plant.u_max])
    d = len(lo)
    corners = np.array(list(itertools.product(*zip(lo, hi)))) if d <= 12 else np.empty((0, d))
    z = np.vstack([corners, rng.uniform(lo, hi, size=(SET_SAMPLES, d))])
    x, uu = z[:, :plant.n], z[:, plant.n:]
    nominal = np.asarray(plant.step(x, uu), dtype=float)
    out = np.zeros(plant.n)
    for model in vertex_models(plant):
        np.maximum(out, np.abs(np.asarray(model.step(x, uu), dtype=float) - nominal).max(axis=0), out=out)
    return out


def measured_state_rows(plant: Plant) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``plant.state_rows()`` on the *measured* state: each right-hand side less ``|F_i| v`` (the
    measurement-noise bound), so that a measured state inside keeps the true one inside."""
    F, f, names = plant.state_rows()
    noise = np.asarray(plant.uncertainty.measurement_noise, dtype=float)
    return F, f - np.abs(F) @ noise, names


@dataclass(frozen=True, eq=False)
class ModelBound:
    """The state-dependent residual bound of ``plant``'s declared uncertainty (``at``)."""

    plant: Plant

    def __post_init__(self):
        object.__setattr__(self, "_models", vertex_models(self.plant) if not self.plant.linear else [])
        noise = np.asarray(self.plant.uncertainty.measurement_noise, dtype=float)
        object.__setattr__(self, "_const", np.asarray(self.plant.uncertainty.w_max, dtype=float)
                           + noise + np.abs(self.plant.A) @ noise)

    def at(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        """``(n,)``: how far ``x+`` may lie from ``plant.step(x, u)`` per state, for the measured
        state ``x`` and the applied input ``u``."""
        unc = self.plant.uncertainty
        out = self._const.copy()
        if self.plant.linear:
            out += unc.A_delta @ np.abs(x) + unc.B_delta @ np.abs(u)
        elif self._models:
            nominal = np.asarray(self.plant.step(x[None], u[None]), dtype=float)[0]
            for model in self._models:
                np.maximum(out, self._const + np.abs(np.asarray(model.step(x[None], u[None]), dtype=float)[0]
                                                     - nominal), out=out)
        return out


def describe(plant: Plant) -> dict:
    """What the robust constructions assume, in words and numbers (for certificates and logs)."""
    u = plant.uncertainty
    if not u.declared:
        return {"declared": False, "covers": "the nominal model only"}
    parts = []
    if np.any(u.w_max > 0):
        parts.append("additive disturbance |w| <= w_max")
    if np.any(u.A_delta > 0) or np.any(u.B_delta > 0):
        parts.append("entrywise |A - A_true| <= A_delta, |B - B_true| <= B_delta (as an additive bound over "
                     "the constraint set)")
    if u.params:
        parts.append(f"model parameters in {dict(u.params)} (corner models, bound over the set sampled)")
    if u.input_delay_steps:
        parts.append(f"commands up to {u.input_delay_steps} period late")
    if np.any(u.measurement_noise > 0):
        parts.append("measurement noise |n| <= measurement_noise")
    return {"declared": True, "covers": "; ".join(parts), "w_eff": additive_bound(plant).tolist()}


def mismatched_plant(plant: Plant, mismatch: float, seed: int = 0) -> Plant:
    """A "true" plant that differs from ``plant``'s model by ``mismatch`` times its declared
    uncertainty: every uncertain matrix entry (linear plants) moved by ``mismatch × delta`` with
    a random sign, or every ranged model parameter moved from its nominal value ``mismatch`` of
    the way to a randomly chosen end of its range (beyond it for ``mismatch > 1``). ``mismatch``
    <= 1 stays inside the declared set (the robust certificates cover it), > 1 leaves it (the
    model monitor's case). The limits, joints and region stay the file's. For the simulator."""
    if not (np.isfinite(mismatch) and mismatch >= 0.0):
        raise ValueError(f"mismatch must be a finite number >= 0, got {mismatch!r}")
    u = plant.uncertainty
    rng = np.random.default_rng(seed)
    if plant.linear:
        A = plant.A + mismatch * rng.choice([-1.0, 1.0], size=plant.A.shape) * u.A_delta
        B = plant.B + mismatch * rng.choice([-1.0, 1.0], size=plant.B.shape) * u.B_delta
        return _replace(plant, A=A, B=B, name=f"{plant.name} (mismatch {mismatch:g})")
    params = dict(plant.params)
    for name, (lo, hi) in u.params.items():
        nominal = float(plant.params[name])
        end = hi if rng.random() < 0.5 else lo
        params[name] = nominal + mismatch * (end - nominal)
    model = type(plant.model)(dt=plant.dt, **params)
    return _replace(plant, model=model, params=params, name=f"{plant.name} (mismatch {mismatch:g})")


def _replace(plant: Plant, **changes) -> Plant:
    for k in ("A", "B"):
        if k in changes:
            a = np.array(changes[k], dtype=float)
            a.flags.writeable = False
            changes[k] = a
    return dataclasses.replace(plant, **changes)


def disturbance_bound(plant: Plant) -> np.ndarray:
    """``(n,)``: the per-step additive part of the declared uncertainty alone (``w_max`` and the
    measurement noise's ``(I + |A|) v``), without the parameter ranges: what robust rollouts add
    as a disturbance while they simulate the parameter corners themselves."""
    u = plant.uncertainty
    noise = np.asarray(u.measurement_noise, dtype=float)
    return np.asarray(u.w_max, dtype=float) + noise + np.abs(plant.A) @ noise


MATRIX_CORNER_LIMIT = 16
"""Robust rollouts simulate at most this many corners of a linear plant's ``(A, B)`` box (all of
them up to four uncertain entries, else as many drawn at random, the all-plus and all-minus
corners among them)."""


def matrix_corners(plant: Plant, rng: np.random.Generator | None = None,
                   limit: int = MATRIX_CORNER_LIMIT) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(dA, dB), ...]``: corners of a linear plant's declared ``A``/``B`` box, as deviations
    from the model (``A_true = A + dA``); ``[]`` when none is declared."""
    u = plant.uncertainty
    delta = np.concatenate([u.A_delta.ravel(), u.B_delta.ravel()])
    idx = np.flatnonzero(delta > 0)
    if not plant.linear or not idx.size:
        return []
    k = len(idx)
    if 2 ** k <= limit:
        signs = np.array(list(itertools.product([-1.0, 1.0], repeat=k)))
    else:
        rng = rng if rng is not None else np.random.default_rng(0)
        signs = np.vstack([np.ones(k), -np.ones(k), rng.choice([-1.0, 1.0], size=(limit - 2, k))])
    n, m = plant.n, plant.m
    out = []
    for sgn in signs:
        flat = np.zeros(n * n + n * m)
        flat[idx] = sgn * delta[idx]
        out.append((flat[:n * n].reshape(n, n), flat[n * n:].reshape(n, m)))
    return out
