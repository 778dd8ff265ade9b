"""The plant: one YAML file per robot, read and validated into one ``Plant`` dataclass.

Everything that knows the robot (simulator, backup, rollouts, certified region, safe set,
expert, analysis) takes a ``Plant``; nothing else describes the robot. The file format is
``docs/plants.md``; the shipped files are ``config/plants/*.yaml``.

Two kinds of plant:

- **linear** (``A``, ``B``, optional ``c``: ``x+ = A x + B u + c``; or ``continuous:``
  ``{A, B, c}``, discretised here with zero-order hold over ``dt``);
- **model** (``model: NAME`` or ``model: package.module:Class``, parameters under
  ``params:``): a class with a batched ``step(x, u)`` and a ``linearize()`` at its
  equilibrium; the backup is the LQR of that linearisation. A bare name is an entry point
  of the group ``scpo_ros.plants`` (the built-in ones are registered there too); the file
  therefore runs code, and ``plant_file`` is read-only in every node.

Constraints are boxes on states (``x_min``/``x_max``, ±inf allowed) and inputs
(``u_min``/``u_max``, finite), plus optional polytopes ``H x <= h`` and ``G u <= g``. The
equilibrium ``(x_ss(r), u_ss(r))`` of a reference ``r`` of the ``tracked`` states is affine in
``r`` and solved once here (``Plant.equilibrium_map``).

``load_plant`` refuses a bad file with ``PlantError``, whose message names the key; nothing
here imports rclpy. ``double_integrator_plant`` builds the double integrator of given limits
in code (the experiments sweep them).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import yaml

from .inputs import JOINT_FIELDS  # the JointState arrays a state can be read from

ENTRY_POINT_GROUP = "scpo_ros.plants"
"""Where ``model: NAME`` is looked up."""
PACKAGE_PREFIX = "package://"
_KEYS = ("name", "dt", "states", "inputs", "A", "B", "c", "continuous", "x_min", "x_max", "u_min", "u_max",
         "H", "h", "G", "g", "tracked", "joints", "commands", "backup", "certified_region", "model", "params",
         "description", "uncertainty")
_UNCERTAINTY_KEYS = ("w_max", "A_delta", "B_delta", "params", "input_delay_steps", "measurement_noise")
MAX_INPUT_DELAY_STEPS = 1
"""The longest input delay a plant file may declare: the safe sets absorb one late command
(``safeguard.invariant_set``'s ``late_commands``), no more."""


class PlantError(ValueError):
    """A plant file that cannot be used; ``key`` is the offending key (``""`` for the file)."""

    def __init__(self, key: str, message: str, source: str = ""):
        self.key, self.source = key, source
        where = f"plant file {source}: " if source else "plant: "
        super().__init__(f"{where}key '{key}': {message}" if key else f"{where}{message}")


@dataclass(frozen=True)
class Region:
    """The certified region: a box of states ``[x_min, x_max]`` and references ``[r_min, r_max]``
    (of the tracked states; empty without tracked states)."""

    x_min: np.ndarray
    x_max: np.ndarray
    r_min: np.ndarray
    r_max: np.ndarray

    @property
    def lower(self) -> np.ndarray:
        """``[x_min, r_min]``: the lower corner of the ``[x, r]`` box."""
        return np.concatenate([self.x_min, self.r_min])

    @property
    def upper(self) -> np.ndarray:
        return np.concatenate([self.x_max, self.r_max])

    def contains(self, x, r, slack: float = 0.0):
        """Boolean mask over a batch of states ``x (..., n)`` and references ``r (..., nr)``."""
        x, r = np.asarray(x, dtype=float), np.asarray(r, dtype=float)
        ok = ((x >= self.x_min - slack) & (x <= self.x_max + slack)).all(-1)
        if self.r_max.size:
            ok = ok & ((r >= self.r_min - slack) & (r <= self.r_max + slack)).all(-1)
        return ok


@dataclass(frozen=True, eq=False)
class Uncertainty:
    """What the plant file declares the true robot may differ by (``uncertainty:``; all optional,
    zero by default). Everything is per control period, on the discrete model ``x+ = A x + B u + c``:

    - ``w_max (n,)``: an additive disturbance ``|w_i| <= w_max_i`` on every step;
    - ``A_delta (n, n)``, ``B_delta (n, m)``: entrywise bounds ``|A_true - A| <= A_delta``,
      ``|B_true - B| <= B_delta`` (a ``continuous:`` file gives them on its continuous matrices; they
      are carried to the discrete ones here, ``_discrete_deltas``);
    - ``params``: ``{name: (lo, hi)}`` ranges of a model class's parameters (``model:`` plants);
    - ``input_delay_steps``: a command may take effect up to this many periods late (0 or 1);
    - ``measurement_noise (n,)``: ``|x_measured - x| <= measurement_noise``.

    ``scpo_ros.uncertainty`` turns these into the bounds that the safe sets, the certification and
    the model monitor use."""

    w_max: np.ndarray
    A_delta: np.ndarray
    B_delta: np.ndarray
    params: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    input_delay_steps: int = 0
    measurement_noise: np.ndarray | None = None
    continuous_deltas: tuple[np.ndarray, np.ndarray] | None = None
    """The file's continuous-time ``(A_delta, B_delta)`` when it gave ``continuous:`` (for the record)."""

    @property
    def declared(self) -> bool:
        """Whether the file declares any uncertainty at all (else every certificate is nominal)."""
        return bool(np.any(self.w_max > 0) or np.any(self.A_delta > 0) or np.any(self.B_delta > 0)
                    or self.params or self.input_delay_steps or np.any(self.measurement_noise > 0))

    def describe(self) -> dict:
        def arr(a):
            return [[_num(v) for v in row] for row in a] if a.ndim == 2 else [_num(v) for v in a]
        return {"w_max": arr(self.w_max), "A_delta": arr(self.A_delta), "B_delta": arr(self.B_delta),
                "params": {k: list(v) for k, v in self.params.items()},
                "input_delay_steps": self.input_delay_steps, "measurement_noise": arr(self.measurement_noise)}


def no_uncertainty(n: int, m: int) -> Uncertainty:
    """The nominal plant's (nothing declared)."""
    return Uncertainty(_frozen(np.zeros(n)), _frozen(np.zeros((n, n))), _frozen(np.zeros((n, m))),
                       measurement_noise=_frozen(np.zeros(n)))


@dataclass(frozen=True, eq=False)
class Plant:
    """A validated plant file. Arrays are float64 and read-only; ``model`` is the model-class
    instance of a nonlinear plant (None for a linear one), whose linearisation ``A``, ``B``,
    ``c`` then hold."""

    name: str
    dt: float
    states: tuple[str, ...]
    inputs: tuple[str, ...]
    A: np.ndarray
    B: np.ndarray
    c: np.ndarray
    x_min: np.ndarray
    x_max: np.ndarray
    u_min: np.ndarray
    u_max: np.ndarray
    H: np.ndarray
    h: np.ndarray
    G: np.ndarray
    g: np.ndarray
    tracked: tuple[str, ...]
    joints: tuple[tuple[str, str], ...]
    """Per state (in ``states`` order): ``(joint name, JointState field)``."""
    commands: tuple[tuple[str, str], ...] | None
    """Per input: ``(joint name, field)`` when the file maps commands; None: Float64MultiArray."""
    backup_Q: np.ndarray
    backup_R: np.ndarray
    region: Region
    model: Any = None
    model_name: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    uncertainty: Uncertainty | None = None
    """What the file declares the true robot may differ by (``Uncertainty``; None: nothing)."""
    source: str = ""
    """Where the file came from (path), for messages."""
    text: str = field(default="", repr=False)
    """The file's text (what the latched plant topic and the bags carry)."""

    # ------------------------------------------------------------------ sizes
    @property
    def n(self) -> int:
        return len(self.states)

    @property
    def m(self) -> int:
        return len(self.inputs)

    @property
    def nr(self) -> int:
        return len(self.tracked)

    @property
    def linear(self) -> bool:
        return self.model is None

    @property
    def tracked_index(self) -> np.ndarray:
        return np.array([self.states.index(s) for s in self.tracked], dtype=int)

    @property
    def digest(self) -> str:
        """sha256 of the file's text (or of the description for a plant built in code)."""
        return hashlib.sha256((self.text or json.dumps(self.describe(), sort_keys=True)).encode()).hexdigest()

    # ------------------------------------------------------------------ dynamics
    def step(self, x, u):
        """Next states of batches ``x (..., n)``, ``u (..., m)`` (numpy arrays or torch tensors)."""
        if self.model is not None:
            return self.model.step(x, u)
        if _is_torch(x):
            At, Bt, ct = self._torch(x, "A_T", "B_T", "c")
            return x @ At + u @ Bt + ct
        return np.asarray(x) @ self.A.T + np.asarray(u) @ self.B.T + self.c

    # ------------------------------------------------------------------ constraints
    def state_rows(self) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """``(F, f, names)``: every state constraint as ``F x <= f`` (the finite box bounds, then
        the ``H`` rows), with a name per row."""
        return _box_rows(self.x_min, self.x_max, self.states, self.H, self.h, "H")

    def input_rows(self) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """``(F, f, names)``: every input constraint as ``F u <= f`` (the box, then ``G``)."""
        return _box_rows(self.u_min, self.u_max, self.inputs, self.G, self.g, "G")

    def violations(self, x, u=None, tol: float = 1e-9) -> dict:
        """Per state and input name (and ``H``/``G`` for the polytopes): boolean masks over the
        batch of states (and actions) that break that constraint by more than ``tol``."""
        out = {}
        for rows, vec in ((self.state_rows(), x), (self.input_rows(), u)):
            if vec is None:
                continue
            F, f, row_names = rows
            if _is_torch(vec):
                import torch
                bad = vec @ torch.tensor(F.T, dtype=vec.dtype, device=vec.device) \
                    > torch.tensor(f, dtype=vec.dtype, device=vec.device) + tol
            else:
                bad = np.asarray(vec, dtype=float) @ F.T > f + tol
            for name in dict.fromkeys(constraint_name(n) for n in row_names):
                cols = [i for i, rn in enumerate(row_names) if constraint_name(rn) == name]
                out[name] = bad[..., cols].any(-1)
        return out

    # ------------------------------------------------------------------ equilibrium
    def equilibrium_map(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(Mx, mx, Mu, mu)`` with ``x_ss(r) = Mx r + mx`` and ``u_ss(r) = Mu r + mu``."""
        return self._equilibrium

    def equilibrium(self, r=None):
        """``(x_ss, u_ss)`` of references ``r (..., nr)`` (numpy or torch; batched like ``r``; an
        ``r`` of shape ``(..., 0)`` without tracked states gives the one equilibrium broadcast).
        None: the equilibrium of the zero reference, shapes ``(n,)`` and ``(m,)``."""
        Mx, mx, Mu, mu = self._equilibrium
        if r is None:
            return mx.copy(), mu.copy()
        if _is_torch(r):
            MxT, mxt, MuT, mut = self._torch(r, "Mx_T", "mx", "Mu_T", "mu")
            return r @ MxT + mxt, r @ MuT + mut
        r = np.asarray(r, dtype=float)
        if r.shape[-1:] != (self.nr,):
            raise ValueError(f"references of shape {r.shape}: expected (..., {self.nr}) for {list(self.tracked)}")
        return r @ Mx.T + mx, r @ Mu.T + mu

    def __post_init__(self):
        if self.uncertainty is None:
            object.__setattr__(self, "uncertainty", no_uncertainty(len(self.states), len(self.inputs)))
        object.__setattr__(self, "_equilibrium", _solve_equilibrium(self))
        object.__setattr__(self, "_tensors", {})

    def __setstate__(self, state):
        # unpickled (a worker process): the arrays come back writable; freeze them again
        for k, v in state.items():
            object.__setattr__(self, k, _frozen(v) if isinstance(v, np.ndarray) else v)
        reg = self.region
        object.__setattr__(self, "region", Region(*(_frozen(a) for a in (reg.x_min, reg.x_max, reg.r_min, reg.r_max))))
        object.__setattr__(self, "_equilibrium", tuple(_frozen(a) for a in self._equilibrium))
        object.__setattr__(self, "_tensors", {})

    def _torch(self, like, *names):
        """The plant's matrices as tensors of ``like``'s dtype and device, made once per kind: a
        rollout steps the plant every period, and a read-only array cannot be shared with torch."""
        import torch
        key = (like.dtype, like.device)
        cache = self._tensors.get(key)
        if cache is None:
            Mx, mx, Mu, mu = self._equilibrium
            arrays = {"A_T": self.A.T, "B_T": self.B.T, "c": self.c, "Mx_T": Mx.T, "mx": mx, "Mu_T": Mu.T, "mu": mu}
            cache = {k: torch.tensor(np.array(a), dtype=like.dtype, device=like.device) for k, a in arrays.items()}
            self._tensors[key] = cache
        return tuple(cache[n] for n in names)

    # ------------------------------------------------------------------ description
    def describe(self) -> dict:
        """The plant as plain data (what the latched ``plant`` topic publishes, with ``digest``)."""
        def arr(a):
            return [[_num(v) for v in row] for row in a] if a.ndim == 2 else [_num(v) for v in a]
        return {"name": self.name, "dt": self.dt, "states": list(self.states), "inputs": list(self.inputs),
                "A": arr(self.A), "B": arr(self.B), "c": arr(self.c), "x_min": arr(self.x_min),
                "x_max": arr(self.x_max), "u_min": arr(self.u_min), "u_max": arr(self.u_max),
                "H": arr(self.H), "h": arr(self.h), "G": arr(self.G), "g": arr(self.g),
                "tracked": list(self.tracked), "joints": {s: {"joint": j, "field": f}
                                                          for s, (j, f) in zip(self.states, self.joints)},
                "region": {"x_min": arr(self.region.x_min), "x_max": arr(self.region.x_max),
                           "r_min": arr(self.region.r_min), "r_max": arr(self.region.r_max)},
                "model": self.model_name, "uncertainty": self.uncertainty.describe(), "source": self.source}

    def with_limits(self, x_min=None, x_max=None, u_min=None, u_max=None) -> Plant:
        """The plant with tightened box limits (the runtime ``*_tight`` parameters; an infinite entry
        on the loose side keeps the file's bound). Refuses, naming the key, a bound that would
        loosen the file's or leave the certified region outside."""
        new = {}
        for key, val, old, tighter in (("x_min", x_min, self.x_min, np.greater_equal),
                                       ("x_max", x_max, self.x_max, np.less_equal),
                                       ("u_min", u_min, self.u_min, np.greater_equal),
                                       ("u_max", u_max, self.u_max, np.less_equal)):
            if val is None or len(val) == 0:
                new[key] = old
                continue
            v = _vector(val, len(old), f"{key}_tight", self.source, allow_inf=True)
            # ±inf on the loose side is "the file's bound" (a parameter array must give every entry)
            v = np.where(np.isinf(v) & ((v > 0) == key.endswith("_max")), old, v)
            if not np.all(tighter(v, old)):
                raise PlantError(f"{key}_tight", f"{v.tolist()} would loosen the plant file's {key} "
                                 f"{old.tolist()}: runtime limits can only tighten", self.source)
            new[key] = _frozen(v)
        plant = Plant(**{**{f: getattr(self, f) for f in _FIELDS}, **new})
        _check_limits(plant)
        return plant


_FIELDS = [f for f in Plant.__dataclass_fields__]


# ====================================================================== loading

def resolve_source(source: str | Path) -> Path:
    """A plant file's path from a path, ``package://scpo_ros/config/plants/NAME.yaml`` or a shipped
    plant's bare ``NAME``."""
    s = str(source)
    if s.startswith(PACKAGE_PREFIX):
        pkg, _, rel = s[len(PACKAGE_PREFIX):].partition("/")
        return _package_share(pkg) / rel
    p = Path(s).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in s:
        return p
    return _package_share("scpo_ros") / "config" / "plants" / f"{s}.yaml"


def shipped_plants() -> list[str]:
    """Names of the plant files shipped in ``config/plants``."""
    folder = _package_share("scpo_ros") / "config" / "plants"
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_plant(source: str | Path) -> Plant:
    """Read and validate a plant file (``resolve_source``); ``PlantError`` names the bad key."""
    path = resolve_source(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlantError("", f"cannot read {path}: {exc.strerror or exc}", str(source)) from None
    return plant_from_text(text, str(path))


def plant_from_text(text: str, source: str = "<text>") -> Plant:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlantError("", f"not valid YAML: {exc}", source) from None
    return plant_from_dict(data, source, text)


def plant_from_dict(data: Any, source: str = "<dict>", text: str = "") -> Plant:
    """Validate a plant given as the file's mapping (``text``: the file it came from, if any)."""
    if not isinstance(data, Mapping):
        raise PlantError("", f"expected a mapping of keys, got {type(data).__name__}", source)
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        raise PlantError(str(unknown[0]), f"unknown key (known: {', '.join(_KEYS)})", source)
    d = dict(data)
    name = _req(d, "name", source)
    if not isinstance(name, str) or not name:
        raise PlantError("name", "must be a non-empty string", source)
    description = d.get("description", "")
    if not isinstance(description, str):
        raise PlantError("description", f"must be a string, got {description!r}", source)
    dt = _positive(_req(d, "dt", source), "dt", source)
    states = _names(_req(d, "states", source), "states", source)
    inputs = _names(_req(d, "inputs", source), "inputs", source)
    n, m = len(states), len(inputs)
    A, B, c, model, model_name, params = _dynamics(d, dt, n, m, source)
    x_min = _vector(d.get("x_min", [-math.inf] * n), n, "x_min", source, allow_inf=True)
    x_max = _vector(d.get("x_max", [math.inf] * n), n, "x_max", source, allow_inf=True)
    u_min = _vector(_req(d, "u_min", source), m, "u_min", source)
    u_max = _vector(_req(d, "u_max", source), m, "u_max", source)
    H, h = _polytope(d, "H", "h", n, source)
    G, g = _polytope(d, "G", "g", m, source)
    tracked = _names(d.get("tracked", []), "tracked", source, allow_empty=True)
    for s in tracked:
        if s not in states:
            raise PlantError("tracked", f"'{s}' is not a state (states: {list(states)})", source)
    joints = _joint_map(_req(d, "joints", source), states, "joints", source, every=True)
    commands = _joint_map(d["commands"], inputs, "commands", source, every=True) if "commands" in d else None
    Q, R = _backup_weights(d.get("backup"), n, m, source)
    region = _region(_req(d, "certified_region", source), x_min, x_max, len(tracked), source)
    uncertainty = _uncertainty(d.get("uncertainty"), d, dt, n, m, params, source)
    plant = Plant(name=name, dt=dt, states=states, inputs=inputs, A=_frozen(A), B=_frozen(B), c=_frozen(c),
                  x_min=_frozen(x_min), x_max=_frozen(x_max), u_min=_frozen(u_min), u_max=_frozen(u_max),
                  H=_frozen(H), h=_frozen(h), G=_frozen(G), g=_frozen(g), tracked=tracked, joints=joints,
                  commands=commands, backup_Q=_frozen(Q), backup_R=_frozen(R), region=region, model=model,
                  model_name=model_name, params=params, description=description, uncertainty=uncertainty,
                  source=source, text=text)
    _check_limits(plant)
    _check_stabilisable(plant)
    return plant


def _dynamics(d: dict, dt: float, n: int, m: int, source: str):
    """``(A, B, c, model, model_name, params)`` of the three ways a file gives its dynamics:
    ``model:`` (+ ``params:``), ``continuous:`` (discretised here), or discrete ``A``/``B``/``c``."""
    if "model" in d:
        for key in ("A", "B", "c", "continuous"):
            if key in d:
                raise PlantError(key, "a plant with model: takes its dynamics from the model class", source)
        model_name = d["model"]
        if not isinstance(model_name, str) or not model_name:
            raise PlantError("model", "must be a model name or 'package.module:Class'", source)
        params = d.get("params") or {}
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise PlantError("params", f"expected a mapping of parameter names to values, got {params!r}", source)
        params = dict(params)
        model = _make_model(model_name, dt, params, n, m, source)
        try:
            A, B, c = (np.asarray(a, dtype=float) for a in model.linearize())
        except Exception as exc:   # noqa: BLE001 -- user code: report, never a traceback
            raise PlantError("model", f"{model_name}.linearize() failed: {exc}", source) from None
        return (_matrix(A, n, n, "model", source), _matrix(B, n, m, "model", source),
                _vector(c.reshape(-1).tolist(), n, "model", source), model, model_name, params)
    if "params" in d:
        raise PlantError("params", "only a plant with model: takes params", source)
    if "continuous" in d:
        for key in ("A", "B", "c"):
            if key in d:
                raise PlantError(key, "give the model either discrete (A, B, c) or continuous:, not both", source)
        cont = d["continuous"]
        if not isinstance(cont, Mapping) or not {"A", "B"} <= set(cont) or set(cont) - {"A", "B", "c"}:
            raise PlantError("continuous", "needs A and B (and optionally c), nothing else", source)
        Ac = _matrix(cont["A"], n, n, "continuous.A", source)
        Bc = _matrix(cont["B"], n, m, "continuous.B", source)
        cc = _vector(cont.get("c", [0.0] * n), n, "continuous.c", source)
        return (*zoh(Ac, Bc, cc, dt), None, "", {})
    if "A" not in d or "B" not in d:
        raise PlantError("A" if "A" not in d else "B", "missing: give A and B (discrete), continuous:, "
                         "or model:", source)
    return (_matrix(d["A"], n, n, "A", source), _matrix(d["B"], n, m, "B", source),
            _vector(d.get("c", [0.0] * n), n, "c", source), None, "", {})


def _backup_weights(backup: Any, n: int, m: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The backup LQR's diagonal weights ``(Q, R)`` (default: ones)."""
    backup = backup or {}
    if not isinstance(backup, Mapping) or set(backup) - {"Q", "R"}:
        raise PlantError("backup", "needs Q (n diagonal weights) and R (m diagonal weights), nothing else",
                         source)
    Q = _vector(backup.get("Q", [1.0] * n), n, "backup.Q", source)
    R = _vector(backup.get("R", [1.0] * m), m, "backup.R", source)
    if np.any(Q < 0):
        raise PlantError("backup.Q", f"weights must be >= 0, got {Q.tolist()}", source)
    if np.any(R <= 0):
        raise PlantError("backup.R", f"weights must be > 0, got {R.tolist()}", source)
    return Q, R


def _region(reg: Any, x_min: np.ndarray, x_max: np.ndarray, nr: int, source: str) -> Region:
    """The certified region (a finite box: its state bounds default to finite limits only)."""
    if not isinstance(reg, Mapping) or set(reg) - {"x_min", "x_max", "r_min", "r_max"}:
        raise PlantError("certified_region", "takes x_min, x_max (states) and r_max, r_min (references)", source)
    bounds = {}
    for key, limit in (("x_min", x_min), ("x_max", x_max)):
        if key not in reg and not np.all(np.isfinite(limit)):
            raise PlantError(f"certified_region.{key}", f"missing: the limits {key} are not all finite, and the "
                             f"certified region must be a bounded box", source)
        bounds[key] = _vector(reg.get(key, limit.tolist()), len(limit), f"certified_region.{key}", source)
    if nr and "r_max" not in reg:
        raise PlantError("certified_region.r_max", f"missing: {nr} tracked states need a reference box", source)
    if not nr and ("r_max" in reg or "r_min" in reg):
        raise PlantError("certified_region.r_max", "no tracked states: there is no reference", source)
    r_max = _vector(reg.get("r_max", []), nr, "certified_region.r_max", source)
    r_min = _vector(reg.get("r_min", (-r_max).tolist()), nr, "certified_region.r_min", source)
    return Region(*(_frozen(a) for a in (bounds["x_min"], bounds["x_max"], r_min, r_max)))


def _uncertainty(u: Any, d: Mapping, dt: float, n: int, m: int, params: Mapping, source: str) -> Uncertainty:
    """The ``uncertainty:`` block (``Uncertainty``): sizes, signs, and what fits the kind of plant."""
    if u is None:
        return no_uncertainty(n, m)
    if not isinstance(u, Mapping):
        raise PlantError("uncertainty", f"expected a mapping of {', '.join(_UNCERTAINTY_KEYS)}, got {u!r}", source)
    unknown = [k for k in u if k not in _UNCERTAINTY_KEYS]
    if unknown:
        raise PlantError(f"uncertainty.{unknown[0]}", f"unknown key (known: {', '.join(_UNCERTAINTY_KEYS)})",
                         source)

    def nonneg(v, key):
        if v.size and np.any(v < 0):
            raise PlantError(f"uncertainty.{key}", f"bounds must be >= 0, got {v.tolist()}", source)
        return v

    w_max = nonneg(_vector(u.get("w_max", [0.0] * n), n, "uncertainty.w_max", source), "w_max")
    noise = nonneg(_vector(u.get("measurement_noise", [0.0] * n), n, "uncertainty.measurement_noise", source),
                   "measurement_noise")
    model = "model" in d
    for key in ("A_delta", "B_delta"):
        if model and key in u:
            raise PlantError(f"uncertainty.{key}", "a model plant declares the ranges of its parameters under "
                             "uncertainty.params, not matrix bounds", source)
    dA = nonneg(_matrix(u.get("A_delta", np.zeros((n, n))), n, n, "uncertainty.A_delta", source), "A_delta")
    dB = nonneg(_matrix(u.get("B_delta", np.zeros((n, m))), n, m, "uncertainty.B_delta", source), "B_delta")
    continuous_deltas = None
    if "continuous" in d and (dA.any() or dB.any()):
        continuous_deltas = (_frozen(dA), _frozen(dB))
        dA, dB = _discrete_deltas(d["continuous"], dA, dB, dt, n, m, source)
    ranges = u.get("params") or {}
    if ranges and not model:
        raise PlantError("uncertainty.params", "only a plant with model: has parameters; a linear plant declares "
                         "A_delta / B_delta", source)
    if not isinstance(ranges, Mapping):
        raise PlantError("uncertainty.params", f"expected a mapping name -> [lo, hi], got {ranges!r}", source)
    checked = {}
    for name, rng in ranges.items():
        key = f"uncertainty.params.{name}"
        if name not in params:
            raise PlantError(key, f"'{name}' is not among the model's params (params: {sorted(params)}); give its "
                             f"nominal value under params: too", source)
        if not isinstance(rng, (list, tuple)) or len(rng) != 2:
            raise PlantError(key, f"expected [lo, hi], got {rng!r}", source)
        lo, hi = (_number(v, key, source, False) for v in rng)
        nominal = params[name]
        if isinstance(nominal, bool) or not isinstance(nominal, (int, float)) or not lo <= float(nominal) <= hi:
            raise PlantError(key, f"the range [{lo:g}, {hi:g}] must contain the nominal value {nominal!r}", source)
        checked[str(name)] = (lo, hi)
    delay = u.get("input_delay_steps", 0)
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay <= MAX_INPUT_DELAY_STEPS:
        raise PlantError("uncertainty.input_delay_steps", f"must be an integer in [0, {MAX_INPUT_DELAY_STEPS}] "
                         f"(the safe sets absorb at most one late command), got {delay!r}", source)
    return Uncertainty(_frozen(w_max), _frozen(dA), _frozen(dB), checked, int(delay), _frozen(noise),
                       continuous_deltas)


DELTA_VERTEX_LIMIT = 10
"""Continuous deltas with more uncertain entries than this are carried to discrete time on
sampled vertices (``2**10`` vertices at most), not all of them."""


def _discrete_deltas(cont: Mapping, dA: np.ndarray, dB: np.ndarray, dt: float, n: int, m: int, source: str):
    """Entrywise bounds on the discrete ``(A, B)`` of the continuous box ``Ac ± dA``, ``Bc ± dB``: the
    largest deviation of the zero-order-hold images of the box's vertices (all of them up to
    ``2**DELTA_VERTEX_LIMIT``, else as many sampled) and of 256 interior points, widened by 5 %
    (the map is smooth: to first order in ``dt`` it is ``dt · (dA, dB)``, which this covers)."""
    Ac = _matrix(cont["A"], n, n, "continuous.A", source)
    Bc = _matrix(cont["B"], n, m, "continuous.B", source)
    cc = _vector(cont.get("c", [0.0] * n), n, "continuous.c", source)
    Ad, Bd, _ = zoh(Ac, Bc, cc, dt)
    delta = np.concatenate([dA.ravel(), dB.ravel()])
    idx = np.flatnonzero(delta > 0)
    rng = np.random.default_rng(0)
    k = len(idx)
    if k <= DELTA_VERTEX_LIMIT:
        signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * k, indexing="ij")).reshape(k, -1).T
    else:
        signs = rng.choice([-1.0, 1.0], size=(2 ** DELTA_VERTEX_LIMIT, k))
    points = np.vstack([signs, rng.uniform(-1.0, 1.0, size=(256, k))])
    base = np.concatenate([Ac.ravel(), Bc.ravel()])
    out_A, out_B = np.zeros((n, n)), np.zeros((n, m))
    for p in points:
        theta = base.copy()
        theta[idx] += p * delta[idx]
        A_v, B_v, _ = zoh(theta[:n * n].reshape(n, n), theta[n * n:].reshape(n, m), cc, dt)
        np.maximum(out_A, np.abs(A_v - Ad), out=out_A)
        np.maximum(out_B, np.abs(B_v - Bd), out=out_B)
    return 1.05 * out_A, 1.05 * out_B


def zoh(Ac: np.ndarray, Bc: np.ndarray, cc: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-order-hold discretisation of ``x' = Ac x + Bc u + cc`` over ``dt`` (one matrix exponential)."""
    n, m = Bc.shape
    M = np.zeros((n + m + 1, n + m + 1))
    M[:n, :n], M[:n, n:n + m], M[:n, -1] = Ac, Bc, cc
    E = scipy.linalg.expm(M * dt)
    return E[:n, :n], E[:n, n:n + m], E[:n, -1]


# ====================================================================== checks

def _check_limits(p: Plant) -> None:
    src = p.source
    for lo, hi, key in ((p.x_min, p.x_max, "x_max"), (p.u_min, p.u_max, "u_max")):
        bad = np.flatnonzero(~(lo < hi))
        if bad.size:
            i = int(bad[0])
            raise PlantError(key, f"entry {i}: the lower bound {lo[i]:g} is not below the upper {hi[i]:g}", src)
    reg = p.region
    for key, lo, hi in (("x_max", reg.x_min, reg.x_max), ("r_max", reg.r_min, reg.r_max)):
        bad = np.flatnonzero(~(lo <= hi))
        if bad.size:
            raise PlantError(f"certified_region.{key}", f"entry {int(bad[0])}: lower bound above upper", src)
    for key, lo, hi, names in (("x_min", reg.x_min, p.x_min, p.states), ("x_max", p.x_max, reg.x_max, p.states)):
        bad = np.flatnonzero(lo < hi)
        if bad.size:
            i = int(bad[0])
            raise PlantError(f"certified_region.{key}", f"state {names[i]}: the certified region reaches "
                             f"{reg.x_min[i] if key == 'x_min' else reg.x_max[i]:g}, beyond the limit "
                             f"{p.x_min[i] if key == 'x_min' else p.x_max[i]:g}", src)
    # the state and input sets must be non-empty, the input set bounded (a box: always)
    F, f, _ = p.state_rows()
    if _empty(F, f, p.region.x_min, p.region.x_max):
        raise PlantError("H", "the certified region violates the state polytope H x <= h", src)
    Fu, fu, _ = p.input_rows()
    if _empty(Fu, fu, p.u_min, p.u_max, full=False):
        raise PlantError("G", "the input constraints u_min <= u <= u_max, G u <= g leave no input", src)
    # equilibria of the reference box inside the limits, with the input inside its set
    if p.nr:
        corners = _corners(p.region.r_min, p.region.r_max)
    else:
        corners = np.zeros((1, 0))
    xs, us = p.equilibrium(corners if p.nr else None)
    xs, us = np.atleast_2d(xs), np.atleast_2d(us)
    if np.any(xs @ F.T > f + 1e-9):
        raise PlantError("certified_region.r_max", "a reference of the certified box has its equilibrium "
                         "outside the state constraints", src)
    if np.any(us @ Fu.T > fu + 1e-9):
        raise PlantError("certified_region.r_max", f"a reference of the certified box needs an equilibrium input "
                         f"{us.tolist()} outside the input constraints", src)


def _check_stabilisable(p: Plant) -> None:
    """PBH test: every mode with |λ| >= 1 must be reachable from the inputs."""
    n = p.n
    for lam in np.linalg.eigvals(p.A):
        if abs(lam) >= 1.0 - 1e-9:
            M = np.hstack([p.A - lam * np.eye(n), p.B])
            if np.linalg.matrix_rank(M, tol=1e-8) < n:
                raise PlantError("B" if p.linear else "model",
                                 f"(A, B) is not stabilisable: the mode with eigenvalue {complex(lam):.4g} is "
                                 f"not reachable from the inputs, so no backup can stabilise it", p.source)


def _solve_equilibrium(p: Plant):
    """``(Mx, mx, Mu, mu)``: the least-norm solution of ``(A - I) x + B u = -c``, ``x[tracked] = r``."""
    n, m, nr = p.n, p.m, p.nr
    S = np.zeros((nr, n))
    S[np.arange(nr), p.tracked_index] = 1.0
    M = np.block([[p.A - np.eye(n), p.B], [S, np.zeros((nr, m))]])
    rhs_c = np.concatenate([-p.c, np.zeros(nr)])
    rhs_r = np.vstack([np.zeros((n, nr)), np.eye(nr)])
    Mp = np.linalg.pinv(M)
    sol_c, sol_r = Mp @ rhs_c, Mp @ rhs_r
    tol = 1e-8 * max(1.0, np.abs(M).max())
    if np.abs(M @ sol_c - rhs_c).max(initial=0.0) > tol * max(1.0, np.abs(rhs_c).max()):
        raise PlantError("c", "the plant has no equilibrium: (A - I) x + B u = -c has no solution", p.source)
    if nr and np.abs(M @ sol_r - rhs_r).max() > tol:
        raise PlantError("tracked", f"the references of {list(p.tracked)} are unreachable: no equilibrium "
                         f"(A - I) x + B u + c = 0 holds every tracked state at an arbitrary reference "
                         f"(track fewer states, or ones the inputs can hold)", p.source)
    return tuple(_frozen(a) for a in (sol_r[:n], sol_c[:n], sol_r[n:], sol_c[n:]))


def _empty(F, f, lo, hi, full: bool = True) -> bool:
    """Whether ``{z : F z <= f, lo <= z <= hi}`` is empty (``full``: must contain the box ``[lo, hi]``
    entirely, else only intersect it)."""
    if not len(f):
        return False
    if full:   # every corner satisfies every row: the support function of the box
        c, w = (lo + hi) / 2.0, (hi - lo) / 2.0
        return bool(np.any(F @ c + np.abs(F) @ w > f + 1e-9))
    from scipy.optimize import linprog
    res = linprog(np.zeros(F.shape[1]), A_ub=F, b_ub=f, bounds=list(zip(lo, hi)), method="highs")
    return res.status != 0


def _corners(lo: np.ndarray, hi: np.ndarray, limit: int = 4096) -> np.ndarray:
    k = len(lo)
    if 2 ** k > limit:
        rng = np.random.default_rng(0)
        pick = rng.integers(0, 2, size=(limit, k)).astype(bool)
    else:
        pick = ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1).astype(bool)
    return np.where(pick, hi, lo)


# ====================================================================== parsing helpers

def _req(d, key, src):
    if key not in d or d[key] is None:
        raise PlantError(key, "missing (required)", src)
    return d[key]


def _positive(v, key, src) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise PlantError(key, f"must be a finite number > 0, got {v!r}", src)
    return float(v)


def _names(v, key, src, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        raise PlantError(key, f"must be a list of names, got {v!r}", src)
    if not v and not allow_empty:
        raise PlantError(key, "must name at least one", src)
    if len(set(v)) != len(v):
        dup = next(s for s in v if list(v).count(s) > 1)
        raise PlantError(key, f"'{dup}' appears twice", src)
    return tuple(v)


def _number(v, key, src, allow_inf: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PlantError(key, f"expected a number, got {v!r}", src)
    v = float(v)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise PlantError(key, f"expected a finite number, got {v!r}", src)
    return v


def _vector(v, size, key, src, allow_inf: bool = False) -> np.ndarray:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise PlantError(key, f"expected a list of {size} numbers, got {v!r}", src)
    if len(v) != size:
        raise PlantError(key, f"expected {size} entries, got {len(v)}", src)
    return np.array([_number(x, key, src, allow_inf) for x in v], dtype=float)


def _matrix(v, rows, cols, key, src) -> np.ndarray:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in v):
        raise PlantError(key, f"expected a {rows}x{cols} matrix (a list of rows), got {v!r}", src)
    shape = (len(v), len(v[0]) if v else 0)
    if len(v) != rows or any(len(r) != cols for r in v):
        raise PlantError(key, f"expected a {rows}x{cols} matrix, got {shape[0]}x{shape[1]}", src)
    return np.array([[_number(x, key, src, False) for x in r] for r in v], dtype=float).reshape(rows, cols)


def _polytope(d, mk, vk, cols, src) -> tuple[np.ndarray, np.ndarray]:
    if (mk in d) != (vk in d):
        raise PlantError(mk if mk not in d else vk, f"{mk} and {vk} come together", src)
    if mk not in d:
        return np.zeros((0, cols)), np.zeros(0)
    rows = d[mk]
    if not isinstance(rows, (list, tuple)) or not rows:
        raise PlantError(mk, "expected a non-empty list of rows", src)
    M = _matrix(rows, len(rows), cols, mk, src)
    v = _vector(d[vk], len(rows), vk, src)
    if np.any(np.linalg.norm(M, axis=1) < 1e-12):
        raise PlantError(mk, "a row is zero", src)
    return M, v


def _joint_map(v, names, key, src, every: bool) -> tuple[tuple[str, str], ...]:
    if not isinstance(v, Mapping):
        raise PlantError(key, f"expected a mapping name -> {{joint, field}}, got {v!r}", src)
    for k in v:
        if k not in names:
            raise PlantError(key, f"'{k}' names no {'state' if key == 'joints' else 'input'} "
                             f"(known: {list(names)})", src)
    out, seen = [], set()
    for s in names:
        if s not in v:
            if every:
                raise PlantError(key, f"'{s}' is not mapped: every {'state' if key == 'joints' else 'input'} "
                                 f"needs a joint and a field (full-state feedback, no observer)", src)
            continue
        e = v[s]
        if not isinstance(e, Mapping) or set(e) != {"joint", "field"}:
            raise PlantError(f"{key}.{s}", "expected {joint: NAME, field: position|velocity|effort}", src)
        joint, fld = e["joint"], e["field"]
        if not isinstance(joint, str) or not joint:
            raise PlantError(f"{key}.{s}", f"joint must be a non-empty name, got {joint!r}", src)
        if fld not in JOINT_FIELDS:
            raise PlantError(f"{key}.{s}", f"field must be one of {JOINT_FIELDS}, got {fld!r}", src)
        if (joint, fld) in seen:
            raise PlantError(f"{key}.{s}", f"({joint}, {fld}) is already mapped to another name", src)
        seen.add((joint, fld))
        out.append((joint, fld))
    return tuple(out)


def _make_model(name: str, dt: float, params: dict, n: int, m: int, src: str):
    cls = model_class(name, src)
    try:
        model = cls(dt=dt, **params)
    except Exception as exc:   # noqa: BLE001 -- user code refusing its params: report, never a traceback
        raise PlantError("params", f"{name}({', '.join(map(str, ['dt', *params]))}): {exc}", src) from None
    if getattr(model, "state_dim", n) != n or getattr(model, "action_dim", m) != m:
        raise PlantError("states", f"model {name} has {model.state_dim} states and {model.action_dim} inputs, "
                         f"the file names {n} and {m}", src)
    for attr in ("step", "linearize"):
        if not callable(getattr(model, attr, None)):
            raise PlantError("model", f"{name} has no {attr}() method", src)
    return model


def model_class(name: str, src: str = ""):
    """The model class of ``model: NAME`` (entry point) or ``model: package.module:Class``."""
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise PlantError("model", f"cannot import {name}: {exc}", src) from None
    from importlib.metadata import entry_points
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    target = found[name].value if name in found else _BUILTIN_MODELS.get(name)   # builtin: a bare source tree
    if target is not None:
        mod, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(mod.strip()), attr.strip())
        except (ImportError, AttributeError) as exc:
            raise PlantError("model", f"the entry point {name} = {target} cannot be loaded: {exc}", src) from None
    raise PlantError("model", f"no model named '{name}' (entry points of {ENTRY_POINT_GROUP}: "
                     f"{sorted(set(found) | set(_BUILTIN_MODELS))}; or give package.module:Class)", src)


_BUILTIN_MODELS = {"pendulum": "scpo_ros.dynamics:Pendulum"}


def _package_share(pkg: str) -> Path:
    """The share directory of ``pkg``. For ``scpo_ros`` the source tree this module runs from
    comes first (a checkout or a symlink install: the files that match this code), then the
    ament index (an installed package); without either, a ``PlantError``."""
    if pkg == "scpo_ros":
        here = Path(__file__).resolve().parent.parent
        if (here / "config" / "plants").is_dir():
            return here
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        get_package_share_directory = None
    if get_package_share_directory is not None:
        try:
            return Path(get_package_share_directory(pkg))
        except (PackageNotFoundError, OSError):   # OSError: AMENT_PREFIX_PATH unset
            pass
    raise PlantError("", f"package://{pkg}: package not found (no ament index entry)")


def _box_rows(lo, hi, names, M, v, poly_name):
    n = len(lo)
    rows, rhs, row_names = [], [], []
    for i in range(n):
        if math.isfinite(hi[i]):
            e = np.zeros(n)
            e[i] = 1.0
            rows.append(e)
            rhs.append(hi[i])
            row_names.append(f"{names[i]}<=max")
        if math.isfinite(lo[i]):
            e = np.zeros(n)
            e[i] = -1.0
            rows.append(e)
            rhs.append(-lo[i])
            row_names.append(f"{names[i]}>=min")
    for j in range(len(v)):
        rows.append(M[j])
        rhs.append(v[j])
        row_names.append(f"{poly_name}[{j}]")
    F = np.array(rows).reshape(len(rows), n)
    return F, np.array(rhs, dtype=float), tuple(row_names)


def constraint_name(row_name: str) -> str:
    """The constraint a row of ``state_rows``/``input_rows`` belongs to: ``position<=max`` ->
    ``position``, ``H[2]`` -> ``H`` (the names ``Plant.violations`` and the analysis report)."""
    return row_name.split("<=")[0].split(">=")[0].split("[")[0]


def _frozen(a) -> np.ndarray:
    a = np.array(a, dtype=float)
    a.flags.writeable = False
    return a


def _num(v: float):
    return float(v) if math.isfinite(v) else (".inf" if v > 0 else "-.inf")


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")



# ====================================================================== the plant on the graph

def plant_record(plant: Plant) -> dict:
    """What the latched ``plant`` topic carries (so that a bag carries it): the file's name,
    digest, source and text, and ``description`` (``Plant.describe``: the limits in force,
    after any runtime tightening). ``plant_from_record`` reads it back."""
    return {"name": plant.name, "digest": plant.digest, "source": plant.source, "text": plant.text,
            "description": plant.describe()}


def plant_from_record(record: Mapping[str, Any]) -> Plant:
    """The plant of a ``plant_record`` (a bag's ``plant`` message): the file's text validated
    again, with the recorded limits in force (tightened ones included). ``PlantError`` when
    the record carries no text or the text is not a valid plant file."""
    if not isinstance(record, Mapping) or not isinstance(record.get("text"), str) or not record["text"].strip():
        raise PlantError("text", "the plant record carries no plant file text", str(record.get("source", "")
                                                                                   if isinstance(record, Mapping)
                                                                                   else ""))
    plant = plant_from_text(record["text"], str(record.get("source", "<record>")))
    desc = record.get("description") or {}
    limits = {k: desc[k] for k in ("x_min", "x_max", "u_min", "u_max") if k in desc}
    if limits:
        # describe() writes an infinite bound as YAML's ".inf" / "-.inf" (JSON has no infinity)
        limits = {k: [(-math.inf if v.startswith("-") else math.inf) if isinstance(v, str) else v
                      for v in vals] for k, vals in limits.items()}
        plant = plant.with_limits(**limits)
    return plant


# ====================================================================== the double integrator in code

def double_integrator_plant(dof: int = 1, dt: float = 0.05, p_max: float = 1.0, v_max: float = 1.0,
                            u_max: float = 1.0, q_pos: float = 1.0, q_vel: float = 1.0, r_act: float = 10.0,
                            p0_max: float = 0.8, v0_max: float = 0.2, r_max: float = 0.5) -> Plant:
    """The ``dof``-axis double integrator with symmetric box limits, as a ``Plant`` (what the
    shipped ``double_integrator*.yaml`` files hold at the defaults): for the experiments and
    tests that sweep its limits. The certified region (``p0_max``, ``v0_max``, ``r_max``) is
    shrunk into the limits. ``PlantError`` as for a file."""
    data = double_integrator_file(dof, dt, p_max, v_max, u_max, q_pos, q_vel, r_act, p0_max, v0_max, r_max)
    return plant_from_dict(data, f"<double integrator dof={int(dof)}>")


def double_integrator_file(dof: int = 1, dt: float = 0.05, p_max: float = 1.0, v_max: float = 1.0,
                           u_max: float = 1.0, q_pos: float = 1.0, q_vel: float = 1.0, r_act: float = 10.0,
                           p0_max: float = 0.8, v0_max: float = 0.2, r_max: float = 0.5) -> dict:
    """The plant file (the mapping ``yaml.safe_dump`` writes) of ``double_integrator_plant``'s
    double integrator: for a node that must read it from a file."""
    if isinstance(dof, bool) or int(dof) != dof or dof < 1:
        raise PlantError("states", f"dof must be a positive integer, got {dof!r}")
    return _di_dict(dict(dof=int(dof), dt=dt, p_max=p_max, v_max=v_max, u_max=u_max, q_pos=q_pos, q_vel=q_vel,
                         r_act=r_act, p0_max=min(p0_max, p_max), v0_max=min(v0_max, v_max),
                         r_max=min(r_max, p_max)))


def _di_dict(v: Mapping[str, Any]) -> dict:
    """The plant file (as a mapping) of the ``dof``-axis double integrator of checked values ``v``."""
    d = int(v["dof"])
    sfx = [""] if d == 1 else [f"_{i}" for i in range(d)]
    pos, vel = [f"position{s}" for s in sfx], [f"velocity{s}" for s in sfx]
    eye, zero = np.eye(d), np.zeros((d, d))
    p_max, v_max, u_max = float(v["p_max"]), float(v["v_max"]), float(v["u_max"])
    p0, v0, r0 = float(v["p0_max"]), float(v["v0_max"]), float(v["r_max"])
    joints = {s: {"joint": f"axis_{i}", "field": "position"} for i, s in enumerate(pos)}
    joints.update({s: {"joint": f"axis_{i}", "field": "velocity"} for i, s in enumerate(vel)})
    return {
        "name": "double_integrator" if d == 1 else f"double_integrator_{d}axis",
        "description": f"{d}-axis double integrator",
        "dt": float(v["dt"]), "states": pos + vel, "inputs": [f"acceleration{s}" for s in sfx],
        "continuous": {"A": np.block([[zero, eye], [zero, zero]]).tolist(), "B": np.vstack([zero, eye]).tolist()},
        "x_min": [-p_max] * d + [-v_max] * d, "x_max": [p_max] * d + [v_max] * d,
        "u_min": [-u_max] * d, "u_max": [u_max] * d, "tracked": pos, "joints": joints,
        "backup": {"Q": [float(v["q_pos"])] * d + [float(v["q_vel"])] * d, "R": [float(v["r_act"])] * d},
        "certified_region": {"x_min": [-p0] * d + [-v0] * d, "x_max": [p0] * d + [v0] * d, "r_max": [r0] * d},
    }
