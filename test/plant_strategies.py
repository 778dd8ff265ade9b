"""Random valid plants for the tests: a seeded numpy generator and hypothesis strategies.

``random_plant_dict(seed, n, m, ...)`` makes the mapping of a plant file (what
``scpo_ros.plant.plant_from_dict`` reads) that always loads: a controllable pair (with a
margin: every mode's PBH matrix is well conditioned, so an LQR of it is sane), boxes of states
and inputs around an equilibrium, the certified region strictly inside the state box, the
reference box small enough that its equilibria and their inputs keep a margin to every limit,
optional ``H``/``G`` rows that the region and those equilibria satisfy, optional affine term.

It is drawn as a continuous system ``x' = Ac x + Bc u + cc`` (eigenvalues with real parts in
[-1.5, 1.5] per second: stable or unstable, the way robots are) and written either as the
file's ``continuous:`` block or, discretised here, as ``A``, ``B``, ``c``. Every argument left
None is drawn from the seeded generator; ``plant_dicts``/``plants`` are the hypothesis
strategies over the same generator (hypothesis draws the sizes and the seed; any keyword may be
a strategy too). Shared by the plant, backup, safe-set and rollout tests.
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from scpo_ros.plant import Plant, PlantError, plant_from_dict, zoh

__all__ = ["plant_dicts", "plants", "random_plant", "random_plant_dict"]


def random_plant_dict(seed: int | np.random.Generator = 0, n: int | None = None, m: int | None = None, *,
                      nr: int | None = None, dt: float | None = None, stable: bool | None = None,
                      affine: bool | None = None, h_rows: int | None = None, g_rows: int = 0,
                      region_frac: float | None = None, unbounded: int = 0, continuous: bool | None = None,
                      Q: list | None = None, R: list | None = None, tries: int = 50) -> dict:
    """A valid plant file's mapping. ``n`` in 1..6 and ``m`` in 1..3 when None; ``nr`` tracked
    states (``<= min(n, m)``, so their references are reachable); ``stable``: every continuous
    eigenvalue in the left half plane (None: either); ``affine``: a nonzero ``c`` (the
    equilibrium moves off the origin); ``h_rows``/``g_rows``: polytope rows; ``region_frac``:
    the region's half-widths as a fraction of the state box's; ``unbounded``: that many
    untracked states get ±inf limits; ``continuous``: the file gives ``continuous:`` (else
    ``A``/``B``/``c``). Redraws (up to ``tries``) until ``plant_from_dict`` accepts it."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n = int(rng.integers(1, 7)) if n is None else int(n)
    m = int(rng.integers(1, 4)) if m is None else int(m)
    last = None
    for _ in range(tries):
        d = _draw(rng, n, m, nr=nr, dt=dt, stable=stable, affine=affine, h_rows=h_rows, g_rows=g_rows,
                  region_frac=region_frac, unbounded=unbounded, continuous=continuous, Q=Q, R=R)
        if d is None:
            continue
        try:
            plant_from_dict(d)
        except PlantError as exc:   # a rare ill-conditioned draw: draw again
            last = exc
            continue
        return d
    raise RuntimeError(f"no valid random plant with n={n}, m={m} in {tries} draws (last: {last})")


def random_plant(seed: int | np.random.Generator = 0, n: int | None = None, m: int | None = None,
                 **kwargs) -> Plant:
    """``plant_from_dict(random_plant_dict(seed, n, m, **kwargs))``."""
    return plant_from_dict(random_plant_dict(seed, n, m, **kwargs), f"<random plant {seed}>")


N_STATES, N_INPUTS = st.integers(1, 6), st.integers(1, 3)
"""The sizes the random plants range over by default."""


@st.composite
def plant_dicts(draw, n=N_STATES, m=N_INPUTS, **kwargs):
    """Hypothesis strategy of valid plant mappings; ``n``, ``m`` and any keyword of
    ``random_plant_dict`` may be a value or a strategy."""
    def val(v):
        return draw(v) if isinstance(v, st.SearchStrategy) else v
    seed = draw(st.integers(0, 2**32 - 1))
    return random_plant_dict(seed, val(n), val(m), **{k: val(v) for k, v in kwargs.items()})


def plants(n=N_STATES, m=N_INPUTS, **kwargs):
    """Hypothesis strategy of valid ``Plant``s (``plant_dicts`` loaded)."""
    return plant_dicts(n, m, **kwargs).map(lambda d: plant_from_dict(d, "<random plant>"))


# ---------------------------------------------------------------------------------------- drawing

def _draw(rng, n, m, *, nr, dt, stable, affine, h_rows, g_rows, region_frac, unbounded, continuous, Q, R):
    dt = float(rng.uniform(0.01, 0.1)) if dt is None else float(dt)
    stable = bool(rng.integers(2)) if stable is None else stable
    affine = bool(rng.integers(2)) if affine is None else affine
    continuous = bool(rng.integers(2)) if continuous is None else continuous
    nr = int(rng.integers(0, min(n, m) + 1)) if nr is None else int(nr)
    if nr > min(n, m):
        raise ValueError(f"nr = {nr} > min(n, m) = {min(n, m)}: those references are unreachable")
    Ac, Bc = _pair(rng, n, m, stable)
    if Ac is None:
        return None
    cc = rng.normal(size=n) if affine else np.zeros(n)
    A, B, c = zoh(Ac, Bc, cc, dt)
    tracked = sorted(rng.choice(n, size=nr, replace=False).tolist())
    eq = _equilibrium_map(A, B, c, tracked)
    if eq is None:
        return None
    Mx, mx, Mu, mu = eq
    # the boxes are centred on the equilibrium of a reference r_c (affine: off the origin)
    r_c = rng.uniform(-0.5, 0.5, size=nr) if affine else np.zeros(nr)
    x_c, u_c = Mx @ r_c + mx, Mu @ r_c + mu
    X, U = rng.uniform(0.5, 2.0, size=n), rng.uniform(0.5, 2.0, size=m)
    frac = float(rng.uniform(0.1, 0.6)) if region_frac is None else float(region_frac)
    # reference half-widths: the equilibria of the reference box stay within half the boxes
    rw = np.zeros(nr)
    if nr:
        reach = np.concatenate([np.abs(Mx).sum(1) / (0.5 * X), np.abs(Mu).sum(1) / (0.5 * U)])
        rw = np.full(nr, 1.0 / max(reach.max(), 1e-9)) * rng.uniform(0.3, 1.0)
    spread = max(frac, 0.5) * X   # the region and the equilibria of the reference box both lie in x_c ± spread
    x_min, x_max = (x_c - X).tolist(), (x_c + X).tolist()
    free = [i for i in range(n) if i not in tracked]
    for i in rng.permutation(free)[:unbounded]:
        x_min[i], x_max[i] = -math.inf, math.inf
    d = {"name": f"random_{n}x{m}", "description": "random plant (test/plant_strategies.py)", "dt": dt,
         "states": [f"x{i}" for i in range(n)], "inputs": [f"u{j}" for j in range(m)],
         "x_min": x_min, "x_max": x_max, "u_min": (u_c - U).tolist(), "u_max": (u_c + U).tolist(),
         "tracked": [f"x{i}" for i in tracked],
         "joints": {f"x{i}": {"joint": f"j{i}", "field": "position"} for i in range(n)},
         "backup": {"Q": list(Q) if Q is not None else [1.0] * n, "R": list(R) if R is not None else [1.0] * m},
         "certified_region": {"x_min": (x_c - frac * X).tolist(), "x_max": (x_c + frac * X).tolist()}}
    if nr:
        d["certified_region"].update(r_min=(r_c - rw).tolist(), r_max=(r_c + rw).tolist())
    if continuous:
        d["continuous"] = {"A": Ac.tolist(), "B": Bc.tolist(), "c": cc.tolist()}
    else:
        d.update(A=A.tolist(), B=B.tolist(), c=c.tolist())
    k = int(rng.integers(0, 3)) if h_rows is None else int(h_rows)
    if k:
        d["H"], d["h"] = _cut(rng, k, x_c, 1.2 * spread)
    if g_rows:
        d["G"], d["g"] = _cut(rng, g_rows, u_c, 1.3 * 0.5 * U)
    return d


def _pair(rng, n, m, stable):
    """A continuous pair ``(Ac, Bc)``, controllable with a margin (None: this draw is not)."""
    M = rng.normal(size=(n, n)) / math.sqrt(n)
    top = float(rng.uniform(-1.5, -0.1) if stable else rng.uniform(0.1, 1.5))
    Ac = M - (np.linalg.eigvals(M).real.max() - top) * np.eye(n)
    Bc = rng.normal(size=(n, m))
    for lam in np.linalg.eigvals(Ac):   # PBH: each mode reachable, well away from rank loss
        s = np.linalg.svd(np.hstack([Ac - lam * np.eye(n), Bc]), compute_uv=False)
        if s[-1] < 1e-2 * s[0]:
            return None, None
    return Ac, Bc


def _equilibrium_map(A, B, c, tracked):
    """The least-norm equilibrium map the plant solves (``Plant.equilibrium_map``), to centre the
    boxes; None when badly conditioned."""
    n, m, nr = B.shape[0], B.shape[1], len(tracked)
    S = np.zeros((nr, n))
    S[np.arange(nr), tracked] = 1.0
    K = np.block([[A - np.eye(n), B], [S, np.zeros((nr, m))]])
    if np.linalg.svd(K, compute_uv=False)[n + nr - 1] < 1e-6 * np.abs(K).max():
        return None
    P = np.linalg.pinv(K)
    sol_c = P @ np.concatenate([-c, np.zeros(nr)])
    sol_r = P @ np.vstack([np.zeros((n, nr)), np.eye(nr)])
    return sol_r[:n], sol_c[:n], sol_r[n:], sol_c[n:]


def _cut(rng, k, centre, half):
    """``k`` random unit rows ``M z <= v`` that hold on the box ``centre ± half`` (with the
    slack already in ``half``): they cut the limits' box, never the region."""
    M = rng.normal(size=(k, len(centre)))
    M /= np.linalg.norm(M, axis=1, keepdims=True)
    return M.tolist(), (M @ centre + np.abs(M) @ half).tolist()
