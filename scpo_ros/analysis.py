"""Bag -> metrics, JSON and PNG plots (``scpo-ros analyze``).

Works on bags of our ``bag_recorder`` and of ``ros2 bag record`` (MCAP or sqlite3).
Topics are found by their base name (``joint_states``, ``cmd``, ...), whatever the
namespace; a bag of another controller simply lacks some of them.

Metrics (keys of the JSON):
- ``control_steps``: commands sent in answer to a state (``cmd`` messages whose
  ``layout.dim[0].label`` is not ``hold``; see the safety node); ``hold_commands``: the
  stale-state hold commands; ``backup_steps``: commands of the backup alone.
- ``constraint_violations``: the simulator's violation reports (one per simulated step
  that breaks a limit); ``constraint_violations_from_states``: the same count recomputed
  from the recorded states and commands against the plant's constraints.
- ``min_constraint_margin``: smallest margin ``f_i - F_i x`` of a constraint row over the
  recorded states and commands, in the constraint's units; ``min_margin_by_kind`` per
  constraint name (the plant file's state and input names, ``H`` and ``G`` for its
  polytopes, as ``Plant.violations`` names them); negative means a violation.
- ``updates``: SCPO decisions on proposals by status (``accepted``, ``backtracked``,
  ``rejected``, ``infeasible``); malformed proposals count as ``rejected``;
  ``recertifications`` counts the re-checks after parameter changes. The decisions'
  ``margins_after`` (plotted per metric) are keyed by ``rollout.METRICS`` (``state``,
  ``input``, ``lyapunov``, ``safe_set``), each a fraction of its constraint's range.
- ``updates_shrunk``: committed updates shorter than proposed (projection or backtracking).
- ``fallbacks``: switches of the safety node to the backup alone or to the hold command.
- ``tracking_cost``: mean over states of ``Σ (x_tracked - r)²`` (r: the expert's reference).
- ``latency_ms``: state -> command latency, ``median``/``p99``/``mean``/``max``: for every
  command (hold commands excluded), its log time (the recorder's receipt) minus the header
  stamp of the last state stamped before it (the simulator stamps a state as it publishes
  it), so it includes both transport hops and the safety node. Bags whose stamps are not on
  the recorder's clock (zero, sim time, another machine) use the states' log times instead.
- ``pipeline``: ``scpo`` (the bag has SCPO decisions / safety modes), ``safeguard`` (it has
  ``intervention`` records of ``action_safeguard``) or ``unknown``.
- ``interventions``: safeguard commands that differ from the raw action (projections that
  moved it, and fallbacks); ``intervention_rate`` = interventions / control steps;
  ``projection_distance_mean`` / ``_max``: ``||ũ - u||`` over the projections that moved
  the action (fallbacks excluded). For a safeguard bag ``fallbacks`` counts its backup
  commands (``fallbacks_by_mode`` by reason), for an SCPO bag the switches into a fallback
  mode.
The plant (names, joints, limits) comes from the bag's latched ``plant`` topic
(``plant.plant_record``; the simulator's record first: the plant's own limits, then a
controller's), else from the ``plant`` argument, else it is the shipped double integrator
(a bag of another graph); ``limits["source"]`` says which (``plant topic``, ``argument``,
``default``). States are read through the plant's ``joints:`` map; a state message that
does not carry them is counted in ``unreadable_states``.

Side by side: a bag holding several namespaces (``scpo-ros demo --compare`` records
``/scpo`` and ``/safeguard`` into one bag), or two bags, give one column per pipeline
(``analyze_pipelines``, ``format_comparison``); the bag is read once.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import graph as g
from .bag import read_messages
from .inputs import JointMap
from .plant import Plant, PlantError, constraint_name, load_plant, plant_from_record
from .scpo import COMMITTED, STATUSES

DEFAULT_PLANT = "double_integrator"
"""The plant of a bag that carries none and is analysed without ``plant``."""
LIMITS_FROM_BAG, LIMITS_FROM_ARGUMENT, LIMITS_DEFAULT = "plant topic", "argument", "default"


@dataclass
class Series:
    """Time series pulled out of a bag (times in s since the first message)."""

    t0: float = 0.0
    state_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    state_stamp: np.ndarray = field(default_factory=lambda: np.zeros(0))   # header stamps, same time base
    state: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    cmd_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cmd: list = field(default_factory=list)
    cmd_label: list = field(default_factory=list)
    ref_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ref: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    expert_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    expert: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    malicious_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    malicious: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    decisions: list = field(default_factory=list)   # (t, dict)
    modes: list = field(default_factory=list)       # (t, dict)
    violations: list = field(default_factory=list)  # (t, dict)
    interventions: list = field(default_factory=list)  # (t, dict), action_safeguard records
    monitor: list = field(default_factory=list)     # (t, dict), the safety node's model monitor records
    plant: Plant | None = None
    plant_source: str = LIMITS_DEFAULT    # where ``plant`` came from (LIMITS_*)
    unreadable_states: int = 0            # joint_states without the plant's joints/fields
    topics: dict = field(default_factory=dict)


def _stack(rows: list, width: int | None = None) -> np.ndarray:
    if not rows:
        return np.zeros((0, width or 0))
    n = min(len(r) for r in rows)
    return np.array([r[:n] for r in rows], dtype=float)


def _namespace(topic: str) -> str:
    return topic.rsplit("/", 1)[0].strip("/")


def bag_namespaces(messages: list) -> list[str]:
    """Namespaces (without slashes, "" for none) that hold a ``joint_states`` topic."""
    return sorted({_namespace(m.topic) for m in messages if g.base_name(m.topic) == g.JOINT_STATES})


def _bag_plant(records: list[dict], plant: Plant | str | Path | None) -> tuple[Plant, str]:
    """The plant of the bag's ``plant`` records (the simulator's first), else ``plant`` (a
    ``Plant`` or what ``load_plant`` reads), else ``DEFAULT_PLANT``."""
    order = sorted(records, key=lambda r: r.get("node") != g.SIMULATOR)
    for rec in order:
        try:
            return plant_from_record(rec), LIMITS_FROM_BAG
        except (PlantError, ValueError, TypeError, KeyError):
            continue   # a record of another version or a damaged one: the next, or the argument
    if plant is not None:
        return (plant if isinstance(plant, Plant) else load_plant(plant)), LIMITS_FROM_ARGUMENT
    return load_plant(DEFAULT_PLANT), LIMITS_DEFAULT


def load_series(path: str | Path, namespace: str | None = None, messages: list | None = None,
                plant: Plant | str | Path | None = None) -> Series:
    """The series of one pipeline: of ``namespace`` (plus ``/diagnostics`` of its nodes) if
    given, else of the busiest topic per base name. ``messages``: already read from ``path``;
    ``plant``: the plant when the bag carries none (module docstring)."""
    s = Series()
    per_topic: dict[str, Counter] = {}
    buckets: dict[str, list] = {}
    ns = None if namespace is None else namespace.strip("/")
    for m in (read_messages(path) if messages is None else messages):
        base = g.base_name(m.topic)
        if ns is not None and _namespace(m.topic) != ns and base != g.DIAGNOSTICS:
            continue
        per_topic.setdefault(base, Counter())[m.topic] += 1
        buckets.setdefault(base, []).append(m)
    # one namespace per base name: the topic with most messages
    chosen = {b: c.most_common(1)[0][0] for b, c in per_topic.items()}
    s.topics = {topic: n for c in per_topic.values() for topic, n in c.items()}

    def get(base):
        return [m for m in buckets.get(base, []) if m.topic == chosen.get(base)]

    all_t = [m.log_time_ns for ms in buckets.values() for m in ms]
    s.t0 = min(all_t) * 1e-9 if all_t else 0.0
    T = lambda m: m.log_time_ns * 1e-9 - s.t0  # noqa: E731

    records = []
    for m in get(g.PLANT):
        try:
            records.append(json.loads(m.msg.data))
        except (TypeError, ValueError):
            continue
    s.plant, s.plant_source = _bag_plant([r for r in records if isinstance(r, dict)], plant)
    joint_map = JointMap.for_plant(s.plant)
    states, rows = [], []
    x = np.zeros(s.plant.n)
    recorded = get(g.JOINT_STATES)
    for m in recorded:
        if joint_map.read_msg(m.msg, x) is None:
            states.append(m)
            rows.append(x.copy())
    s.unreadable_states = len(recorded) - len(states)
    s.state_t = np.array([T(m) for m in states])
    s.state_stamp = np.array([m.msg.header.stamp.sec + 1e-9 * m.msg.header.stamp.nanosec - s.t0 for m in states])
    s.state = np.array(rows) if rows else np.zeros((0, s.plant.n))
    cmds = get(g.CMD)
    s.cmd_t = np.array([T(m) for m in cmds])
    s.cmd = [np.asarray(m.msg.data, dtype=float) for m in cmds]
    s.cmd_label = [m.msg.layout.dim[0].label if len(m.msg.layout.dim) else "" for m in cmds]
    refs = get(g.REFERENCE)
    s.ref_t = np.array([T(m) for m in refs])
    s.ref = _stack([list(m.msg.data) for m in refs])
    ex = get(g.EXPERT_ACTION)
    s.expert_t = np.array([T(m) for m in ex])
    s.expert = _stack([list(m.msg.data) for m in ex])
    mal = get(g.MALICIOUS)
    s.malicious_t = np.array([T(m) for m in mal])
    s.malicious = np.array([bool(m.msg.data) for m in mal], dtype=bool)
    s.decisions = [(T(m), json.loads(m.msg.data)) for m in get(g.SCPO_DECISION)]
    s.modes = [(T(m), json.loads(m.msg.data)) for m in get(g.SAFETY_MODE)]
    s.violations = [(T(m), json.loads(m.msg.data)) for m in get(g.CONSTRAINT_VIOLATION)]
    s.interventions = [(T(m), json.loads(m.msg.data)) for m in get(g.INTERVENTION)]
    s.monitor = [(T(m), json.loads(m.msg.data)) for m in get(g.MODEL_MONITOR)]
    return s


def _state_times(s: Series) -> np.ndarray:
    """When each state left the simulator: its header stamp where the stamps run on the
    recorder's clock (ordered, within 1 s of the log times), else its log time. A recorder
    may log a command a hair before the state it answers (two topics, two subscriptions):
    matched by log time, that command would count against the previous state (~one period
    of latency); matched by stamp, it counts against its own."""
    st = s.state_stamp
    if (len(st) == len(s.state_t) and np.isfinite(st).all() and (np.diff(st) >= 0).all()
            and np.all(np.abs(st - s.state_t) < 1.0)):
        return st
    return s.state_t


def _percentiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"median": None, "p99": None, "mean": None, "max": None, "n": 0}
    return {"median": float(np.median(values)), "p99": float(np.percentile(values, 99)),
            "mean": float(values.mean()), "max": float(values.max()), "n": int(values.size)}


def _json_bounds(a: np.ndarray) -> list:
    return [float(v) if np.isfinite(v) else None for v in a]   # None: unbounded (JSON has no inf)


def _limits(s: Series) -> dict:
    """The plant the constraints were counted against, and where it came from."""
    p = s.plant
    return {"source": s.plant_source, "plant": p.name, "digest": p.digest, "states": list(p.states),
            "inputs": list(p.inputs), "x_min": _json_bounds(p.x_min), "x_max": _json_bounds(p.x_max),
            "u_min": _json_bounds(p.u_min), "u_max": _json_bounds(p.u_max), "polytopes": int(len(p.h) + len(p.g))}


def _row_margins(rows: tuple, values: np.ndarray) -> dict[str, np.ndarray]:
    """Per constraint name: the smallest margin ``f_i - F_i v`` of its rows, per value."""
    F, f, names = rows
    if not len(f) or not len(values):
        return {}
    margin = f - values @ F.T
    out = {}
    for i, name in enumerate(names):
        owner = constraint_name(name)
        out[owner] = margin[:, i] if owner not in out else np.minimum(out[owner], margin[:, i])
    return out


def _constraint_metrics(s: Series) -> dict:
    """Smallest margins per constraint, and the simulated steps that broke one (a state out of
    its set, or a command out of its set acting on it), recomputed from the recorded data."""
    plant = s.plant
    margins = {}
    state_viol = np.zeros(len(s.state_t), dtype=bool)
    for name, mg in _row_margins(plant.state_rows(), s.state).items():
        margins[name] = float(mg.min())
        state_viol |= mg < 0
    keep = np.array([u.size == plant.m and np.isfinite(u).all() for u in s.cmd], dtype=bool)
    if keep.any():
        um = _row_margins(plant.input_rows(), np.array([u for u, k in zip(s.cmd, keep) if k]))
        worst = np.full(len(s.cmd), np.inf)
        for name, mg in um.items():
            margins[name] = float(mg.min())
            worst[keep] = np.minimum(worst[keep], mg)
        # a command acts on the state published just before it: count steps, not messages
        if len(s.state_t):
            idx = np.searchsorted(s.state_t, s.cmd_t, side="right") - 1
            bad_cmd = (worst < 0) & (idx >= 0)
            state_viol[np.unique(idx[bad_cmd])] = True
    return {"constraint_violations": len(s.violations),
            "constraint_violations_from_states": int(state_viol.sum()),
            "min_constraint_margin": min(margins.values()) if margins else None,
            "min_margin_by_kind": margins}


def _latency_ms(s: Series, control: np.ndarray) -> np.ndarray:
    """Per control command: its log time minus the time its state left the simulator."""
    if not (len(s.cmd_t) and len(s.state_t)):
        return np.zeros(0)
    ref = _state_times(s)
    idx = np.searchsorted(ref, s.cmd_t, side="right") - 1
    ok = (idx >= 0) & control
    return 1e3 * (s.cmd_t[ok] - ref[idx[ok]])


def _tracking_cost(s: Series) -> float | None:
    """Mean over states of ``Σ (x_tracked - r)²``, r the reference in force when the next state came."""
    idx = s.plant.tracked_index
    if not (len(s.state) and len(s.ref) and idx.size) or s.ref.shape[1] < idx.size:
        return None
    nxt = np.append(s.state_t[1:], np.inf)
    ridx = np.searchsorted(s.ref_t, nxt, side="right") - 1
    ok = ridx >= 0
    if not ok.any():
        return None
    err = s.state[ok][:, idx] - s.ref[ridx[ok], :idx.size]
    return float((err ** 2).sum(1).mean())


def _decision_metrics(s: Series) -> dict:
    """SCPO decisions: updates by status, re-certifications, shrunk steps, step norms, times."""
    updates = {k: 0 for k in STATUSES}
    recert = Counter()
    for _, d in s.decisions:
        if d.get("kind") == "recertify":
            recert[d.get("status", "?")] += 1
        elif d.get("status") in updates:
            updates[d["status"]] += 1
    # committed, but shorter than proposed: the projection or a backtrack cut the step
    shrunk = sum(1 for _, d in s.decisions if d.get("kind") == "proposal" and d.get("status") in COMMITTED
                 and d.get("committed_step_norm", 0.0) < 0.99 * (d.get("raw_step_norm") or 0.0))
    step_norms = [d.get("committed_step_norm", 0.0) for _, d in s.decisions
                  if d.get("status") in COMMITTED and d.get("kind") != "recertify"]
    times = [d.get("times_ms", {}).get("total") for _, d in s.decisions if d.get("kind") == "proposal"]
    return {"updates": updates,
            "updates_total": int(sum(updates.values())),
            "updates_shrunk": int(shrunk),
            "recertifications": dict(recert),
            "update_time_ms": _percentiles(np.array([t for t in times if t is not None], dtype=float)),
            "committed_step_norm_total": float(np.sum(step_norms)) if step_norms else 0.0}


def _intervention_metrics(s: Series, control_steps: int) -> tuple[dict, Counter]:
    """The safeguard's records (every command that differs from the raw action), and its
    fallbacks by reason."""
    records = [d for _, d in s.interventions]
    distances = np.array([d["distance"] for d in records if not d.get("fallback") and d.get("distance") is not None],
                         dtype=float)
    fallbacks = Counter(d.get("reason") or "fallback" for d in records if d.get("fallback"))
    return {"interventions": len(records),
            "intervention_rate": len(records) / control_steps if control_steps else None,
            "projection_distance_mean": float(distances.mean()) if distances.size else None,
            "projection_distance_max": float(distances.max()) if distances.size else None}, fallbacks


def _pipeline(s: Series) -> str:
    bases = {g.base_name(t) for t in s.topics}
    if bases & {g.SCPO_DECISION, g.SAFETY_MODE}:
        return g.NS_SCPO
    return g.NS_SAFEGUARD if g.INTERVENTION in bases else "unknown"


def compute_metrics(s: Series) -> dict:
    """The metrics of one pipeline's series (module docstring)."""
    hold = np.array([lab == g.LABEL_HOLD for lab in s.cmd_label], dtype=bool)
    backup = np.array([lab == g.LABEL_BACKUP for lab in s.cmd_label], dtype=bool)
    control = ~hold
    fallbacks = Counter(m.get("mode") for _, m in s.modes if m.get("mode") in g.FALLBACK_MODES)
    interventions, guard_fallbacks = _intervention_metrics(s, int(control.sum()))
    fallbacks.update(guard_fallbacks)
    return {
        "pipeline": _pipeline(s),
        "duration_s": float(max([s.state_t[-1] if len(s.state_t) else 0.0,
                                 s.cmd_t[-1] if len(s.cmd_t) else 0.0])),
        "states": int(len(s.state_t)),
        "unreadable_states": int(s.unreadable_states),
        "control_steps": int(control.sum()),
        "backup_steps": int(backup.sum()),
        "hold_commands": int(hold.sum()),
        **_constraint_metrics(s),
        "limits": _limits(s),
        **_decision_metrics(s),
        "fallbacks": int(sum(fallbacks.values())),
        "fallbacks_by_mode": dict(fallbacks),
        **interventions,
        "tracking_cost": _tracking_cost(s),
        "latency_ms": _percentiles(_latency_ms(s, control)),
        "malicious_fraction": float(s.malicious.mean()) if len(s.malicious) else None,
        "model_monitor": _monitor_metrics(s),
        "topics": s.topics,
    }


def _monitor_metrics(s: Series) -> dict | None:
    """The model monitor's last record in the bag (trips, detection delay, ...), None without one."""
    recs = [r for _, r in s.monitor if r.get("enabled", True)]
    if not recs:
        return None
    last = recs[-1]
    return {k: last.get(k) for k in ("tripped", "trips", "clears", "transitions", "out_of_bounds",
                                     "detection_delay", "max_ratio", "declared", "held_back")}


def transition_residuals(s: Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t, residual, bound)``: per recorded state transition ``x_{k-1} -> x_k`` whose command is
    in the bag (the last one sent between the two states), ``|x_k - f(x_{k-1}, u)|`` per state and
    the declared bound at that state and input (``uncertainty.ModelBound``). What the model
    monitor judges, recomputed offline (it also tries the two commands before, for late ones)."""
    from .uncertainty import ModelBound
    p = s.plant
    if len(s.state) < 2 or not s.cmd:
        return np.zeros(0), np.zeros((0, p.n)), np.zeros((0, p.n))
    bound = ModelBound(p)
    times = _state_times(s)
    cmd_t = np.asarray(s.cmd_t)
    out_t, res, bnd = [], [], []
    for k in range(1, len(s.state)):
        i = int(np.searchsorted(cmd_t, times[k], side="right")) - 1
        if i < 0 or cmd_t[i] < times[k - 1] - 1e-9 or s.cmd[i].size != p.m:
            continue
        u = s.cmd[i]
        x0 = s.state[k - 1]
        res.append(np.abs(s.state[k] - np.asarray(p.step(x0, u), dtype=float)))
        bnd.append(bound.at(x0, u))
        out_t.append(s.state_t[k])
    if not res:
        return np.zeros(0), np.zeros((0, p.n)), np.zeros((0, p.n))
    return np.array(out_t), np.array(res), np.array(bnd)


def analyze(path: str | Path, namespace: str | None = None,
            plant: Plant | str | Path | None = None) -> tuple[dict, Series]:
    """``(metrics, series)`` of one bag (``plant``: used when the bag carries none)."""
    s = load_series(path, namespace, plant=plant)
    return compute_metrics(s), s


def analyze_pipelines(bags: list[str | Path],
                      plant: Plant | str | Path | None = None) -> dict[str, tuple[dict, Series]]:
    """One ``(metrics, series)`` per pipeline, keyed by a column label: per namespace of a
    single bag that holds several, else per bag (labelled by its namespace when the bags'
    namespaces differ, else ``bag1``, ``bag2``). Each bag is read once."""
    read = [(Path(b), list(read_messages(b))) for b in bags]
    spaces = [bag_namespaces(msgs) for _, msgs in read]
    columns: dict[str, tuple[dict, Series]] = {}
    if len(read) == 1 and len(spaces[0]) > 1:
        path, msgs = read[0]
        for ns in spaces[0]:
            s = load_series(path, ns, msgs, plant)
            columns[ns or "(root)"] = (compute_metrics(s), s)
        return columns
    labels = [ns[0] if len(ns) == 1 and ns[0] else None for ns in spaces]
    if None in labels or len(set(labels)) < len(labels):
        labels = [f"bag{i + 1}" for i in range(len(read))] if len(read) > 1 else ["bag"]
    for label, (path, msgs) in zip(labels, read, strict=True):
        s = load_series(path, None, msgs, plant)
        columns[label] = (compute_metrics(s), s)
    return columns


def format_comparison(columns: dict[str, dict], title: str = "") -> str:
    """One table, one column per pipeline (``label -> metrics``); ``-`` where a row does
    not apply to a pipeline (SCPO updates of the safeguard, interventions of SCPO)."""
    fmt = lambda v, f="{:.4g}": "-" if v is None else f.format(v)  # noqa: E731
    scpo_only = lambda m, v: v if m["pipeline"] != g.NS_SAFEGUARD else None  # noqa: E731
    guard_only = lambda m, v: v if m["pipeline"] == g.NS_SAFEGUARD else None  # noqa: E731
    rows = [
        ("pipeline", lambda m: m["pipeline"]),
        ("constraint violations (sim)", lambda m: m["constraint_violations"]),
        ("constraint violations (states)", lambda m: m["constraint_violations_from_states"]),
        ("min constraint margin", lambda m: fmt(m["min_constraint_margin"])),
        ("control steps", lambda m: m["control_steps"]),
        ("  of which backup alone", lambda m: m["backup_steps"]),
        ("hold commands (stale state)", lambda m: m["hold_commands"]),
        ("interventions", lambda m: fmt(guard_only(m, m["interventions"]), "{}")),
        ("intervention rate", lambda m: fmt(guard_only(m, m["intervention_rate"]), "{:.3f}")),
        ("mean projection distance", lambda m: fmt(guard_only(m, m["projection_distance_mean"]))),
        ("SCPO updates accepted", lambda m: fmt(scpo_only(m, m["updates"]["accepted"]), "{}")),
        ("SCPO updates backtracked", lambda m: fmt(scpo_only(m, m["updates"]["backtracked"]), "{}")),
        ("  committed but shrunk", lambda m: fmt(scpo_only(m, m["updates_shrunk"]), "{}")),
        ("SCPO updates rejected", lambda m: fmt(scpo_only(m, m["updates"]["rejected"]), "{}")),
        ("SCPO updates infeasible", lambda m: fmt(scpo_only(m, m["updates"]["infeasible"]), "{}")),
        ("fallbacks", lambda m: m["fallbacks"]),
        ("tracking cost (mean |x-r|^2)", lambda m: fmt(m["tracking_cost"])),
        ("latency state->cmd median [ms]", lambda m: fmt(m["latency_ms"]["median"], "{:.3f}")),
        ("latency state->cmd p99 [ms]", lambda m: fmt(m["latency_ms"]["p99"], "{:.3f}")),
    ]
    labels = list(columns)
    cells = [[str(get(columns[label])) for label in labels] for _, get in rows]
    w0 = max(len(name) for name, _ in rows)
    widths = [max(len(label), *(len(c[i]) for c in cells)) for i, label in enumerate(labels)]
    lines = [title] if title else []
    lines.append("  " + " " * w0 + "".join(f"  {label:>{w}}" for label, w in zip(labels, widths, strict=True)))
    lines += ["  " + f"{name:<{w0}}" + "".join(f"  {c:>{w}}" for c, w in zip(row, widths, strict=True))
              for (name, _), row in zip(rows, cells, strict=True)]
    return "\n".join(lines)


def format_table(metrics: dict, title: str = "") -> str:
    lat = metrics["latency_ms"]
    up = metrics["updates"]
    fmt = lambda v, f="{:.4g}": "-" if v is None else f.format(v)  # noqa: E731
    rows = [
        ("plant", f"{metrics['limits']['plant']} ({metrics['limits']['source']})"),
        ("control steps", metrics["control_steps"]),
        ("  of which backup alone", metrics["backup_steps"]),
        ("hold commands (stale state)", metrics["hold_commands"]),
        ("constraint violations (sim)", metrics["constraint_violations"]),
        ("constraint violations (states)", metrics["constraint_violations_from_states"]),
        ("min constraint margin", fmt(metrics["min_constraint_margin"])),
        ("updates accepted", up["accepted"]),
        ("updates backtracked", up["backtracked"]),
        ("committed but shrunk (projection)", metrics["updates_shrunk"]),
        ("updates rejected", up["rejected"]),
        ("updates infeasible", up["infeasible"]),
        ("fallbacks", metrics["fallbacks"]),
        ("tracking cost (mean |x-r|^2)", fmt(metrics["tracking_cost"])),
        ("latency state->cmd median [ms]", fmt(lat["median"], "{:.3f}")),
        ("latency state->cmd p99 [ms]", fmt(lat["p99"], "{:.3f}")),
        ("SCPO update time median [ms]", fmt(metrics["update_time_ms"]["median"], "{:.1f}")),
    ]
    mon = metrics.get("model_monitor")
    if mon:
        rows.append(("model monitor trips", f"{mon['trips']} ({mon['out_of_bounds']} of {mon['transitions']} "
                                            f"transitions out of bounds, detection delay {mon['detection_delay']})"))
    w = max(len(r[0]) for r in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _shade_malicious(ax, s: Series) -> None:
    """Grey bands where the expert was malicious."""
    if len(s.malicious_t) and s.malicious.any():
        on = s.malicious.astype(int)
        edges = np.flatnonzero(np.diff(np.r_[0, on, 0]))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            ax.axvspan(s.malicious_t[a], s.malicious_t[min(b, len(s.malicious_t) - 1)], color="0.9", lw=0)


def _limit_lines(ax, lo: float, hi: float) -> None:
    for v in (lo, hi):
        if np.isfinite(v):
            ax.axhline(v, color="r", lw=0.8)


MAX_PLOTTED = 8
"""States (inputs) per plot: a larger plant shows its first ones."""


def _plot_states(plt, s: Series):
    p = s.plant
    n = min(p.n, MAX_PLOTTED)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.0 + 1.6 * n), sharex=True, squeeze=False)
    tracked = list(p.tracked_index)
    for i, ax in enumerate(axes[:, 0]):
        _shade_malicious(ax, s)
        ax.plot(s.state_t, s.state[:, i], lw=1, label=p.states[i])
        if i in tracked and len(s.ref) and s.ref.shape[1] > tracked.index(i):
            ax.step(s.ref_t, s.ref[:, tracked.index(i)], "--", lw=0.8, where="post", label="reference")
        _limit_lines(ax, p.x_min[i], p.x_max[i])
        ax.axhspan(p.region.x_min[i], p.region.x_max[i], color="tab:green", alpha=0.08, lw=0,
                   label="certified region" if i == 0 else None)
        ax.set_ylabel(p.states[i], fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[0, 0].set_title(f"{p.name}: states against their limits (grey: malicious expert)")
    axes[-1, 0].set_xlabel("time [s]")
    return fig


def _plot_phase(plt, s: Series):
    """The first two states: the trajectory, the limits, the certified region and the safe set's
    polygon (explicit sets of two-state plants: the robust one where the plant declares
    uncertainty, the nominal one dashed beside it)."""
    from .safeguard.invariant_set import safe_set_at_most
    p = s.plant
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.plot(s.state[:, 0], s.state[:, 1], lw=0.6, color="tab:blue", label="trajectory")
    reg = p.region
    ax.add_patch(plt.Rectangle((reg.x_min[0], reg.x_min[1]), reg.x_max[0] - reg.x_min[0], reg.x_max[1] - reg.x_min[1],
                               fill=False, color="tab:green", lw=1.2, label="certified region"))
    if np.isfinite([p.x_min[0], p.x_max[0], p.x_min[1], p.x_max[1]]).all():
        ax.add_patch(plt.Rectangle((p.x_min[0], p.x_min[1]), p.x_max[0] - p.x_min[0], p.x_max[1] - p.x_min[1],
                                   fill=False, color="r", lw=0.8, label="limits"))
    if p.n == 2:
        for robust, style, label in ((True, "-", "safe set"), (False, "--", "nominal safe set")):
            if not robust and not p.uncertainty.declared:
                continue
            try:
                S = safe_set_at_most(p, robust=robust)[0]
            except ValueError:
                continue
            if S.kind not in ("explicit", "model") or S.invariant.dim != 2:
                continue
            v = S.invariant.vertices()
            order = np.argsort(np.arctan2(v[:, 1] - v[:, 1].mean(), v[:, 0] - v[:, 0].mean()))
            v = np.vstack([v[order], v[order][:1]])
            ax.plot(v[:, 0], v[:, 1], style, color="k", lw=1.0,
                    label=f"{'robust ' if S.w_max is not None else ''}{label}")
    ax.set_xlabel(p.states[0])
    ax.set_ylabel(p.states[1])
    ax.set_title(f"{p.name}: phase plane")
    ax.legend(fontsize=7, loc="upper right")
    return fig


def _plot_residuals(plt, s: Series):
    """Per state: the one-step model residual of every recorded transition against the plant
    file's declared bound (what the model monitor checks), and the monitor's trips."""
    p = s.plant
    t, res, bnd = transition_residuals(s)
    n = min(p.n, MAX_PLOTTED)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.2 + 1.6 * n), sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        if len(t):
            ax.plot(t, res[:, i], ".", ms=2, label=f"|residual| {p.states[i]}")
            ax.plot(t, bnd[:, i], lw=0.8, color="r", label="declared bound" if p.uncertainty.declared else
                    "declared bound (nothing declared: 0)")
        for tt, rec in s.monitor:
            if rec.get("tripped"):
                ax.axvline(tt, color="tab:orange", lw=0.6)
        ax.set_ylabel(p.states[i], fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[0, 0].set_title(f"{p.name}: one-step residual vs the declared bound (orange: monitor tripped)")
    axes[-1, 0].set_xlabel("time [s]")
    return fig


def _plot_actions(plt, s: Series):
    p = s.plant
    m = min(p.m, MAX_PLOTTED)
    fig, axes = plt.subplots(m, 1, figsize=(9, 1.5 + 2.0 * m), sharex=True, squeeze=False)
    cmd = _stack([list(u) for u in s.cmd if u.size == p.m])
    cmd_t = np.array([t for t, u in zip(s.cmd_t, s.cmd, strict=True) if u.size == p.m])
    span = p.u_max - p.u_min
    for i, ax in enumerate(axes[:, 0]):
        _shade_malicious(ax, s)
        if len(cmd):
            ax.plot(cmd_t, cmd[:, i], lw=1, label=f"safe command {p.inputs[i]}")
        if len(s.expert) and s.expert.shape[1] > i:
            ax.plot(s.expert_t, np.clip(s.expert[:, i], p.u_min[i] - span[i], p.u_max[i] + span[i]), lw=0.6,
                    alpha=0.6, label="expert action (clipped for display)")
        _limit_lines(ax, p.u_min[i], p.u_max[i])
        ax.set_ylabel(p.inputs[i], fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[0, 0].set_title("actions")
    axes[-1, 0].set_xlabel("time [s]")
    return fig


def _plot_margins(plt, s: Series):
    fig, ax = plt.subplots(figsize=(9, 3.5))
    props = [(t, d) for t, d in s.decisions if d.get("margins_after")]
    for k in sorted({k for _, d in props for k in d["margins_after"]}):
        pts = [(t, d["margins_after"][k]) for t, d in props if k in d["margins_after"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", ms=3, label=f"g_{k} (certification)")
    ax.axhline(0.0, color="r", lw=0.8)
    ax.set_xlabel("time [s]")
    ax.set_ylabel("g (<= 0 safe; fraction of range)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("SCPO certification margins")
    return fig


def _plot_decisions(plt, s: Series):
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 4.5), sharex=True)
    levels = {st: i for i, st in enumerate(reversed(STATUSES))}
    for st in STATUSES:
        ts = [t for t, d in s.decisions if d.get("status") == st and d.get("kind") != "recertify"]
        ax1.plot(ts, [levels[st]] * len(ts), "|", ms=10, label=st)
    ax1.set_yticks(list(levels.values()), list(levels.keys()))
    ax1.set_title("SCPO decisions over time")
    for key in ("raw_step_norm", "projected_step_norm", "committed_step_norm"):
        pts = [(t, d.get(key)) for t, d in s.decisions if d.get("kind") == "proposal"
               and d.get(key) is not None and np.isfinite(d.get(key))]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], ".", ms=3, label=key)
    ax2.set_yscale("symlog", linthresh=1e-4)
    ax2.set_xlabel("time [s]")
    ax2.legend(fontsize=7)
    return fig


def write_plots(s: Series, metrics: dict, out_dir: str | Path) -> list[str]:
    """PNG plots: states vs limits, actions, margins, decisions over time (those the series has data for)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if len(s.state):
        plots.append(("states.png", lambda: _plot_states(plt, s)))
    if s.cmd:
        plots.append(("actions.png", lambda: _plot_actions(plt, s)))
    if s.decisions:
        plots += [("margins.png", lambda: _plot_margins(plt, s)), ("decisions.png", lambda: _plot_decisions(plt, s))]
    if len(s.state) and s.plant.n >= 2:
        plots.append(("phase.png", lambda: _plot_phase(plt, s)))
    if len(s.state) > 1 and s.cmd:
        plots.append(("residuals.png", lambda: _plot_residuals(plt, s)))
    files = []
    for name, plot in plots:
        fig = plot()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(str(out / name))
    return files
