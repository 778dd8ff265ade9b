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
  from the recorded states and commands against the limits.
- ``min_constraint_margin``: smallest ``limit - |value|`` over the recorded states and
  commands (overall and per kind: ``position``, ``velocity``, ``actuation`` of the double
  integrator's boxes, in their units); negative means a violation.
- ``updates``: SCPO decisions on proposals by status (``accepted``, ``backtracked``,
  ``rejected``, ``infeasible``); malformed proposals count as ``rejected``;
  ``recertifications`` counts the re-checks after parameter changes. The decisions'
  ``margins_after`` (plotted per metric) are keyed by ``rollout.METRICS`` (``state``,
  ``input``, ``lyapunov``, ``safe_set``), each a fraction of its constraint's range.
- ``updates_shrunk``: committed updates shorter than proposed (projection or backtracking).
- ``fallbacks``: switches of the safety node to the backup alone or to the hold command.
- ``tracking_cost``: mean over states of ``Σ_axes (p - r)²`` (r: the expert's reference).
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
Limits come from the simulator's diagnostics in the bag, else from the arguments.

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
from .scpo import COMMITTED, STATUSES


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
    sim_diag: dict = field(default_factory=dict)
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


def load_series(path: str | Path, namespace: str | None = None, messages: list | None = None) -> Series:
    """The series of one pipeline: of ``namespace`` (plus ``/diagnostics`` of its nodes) if
    given, else of the busiest topic per base name. ``messages``: already read from ``path``."""
    s = Series()
    per_topic: dict[str, Counter] = {}
    buckets: dict[str, list] = {}
    ns = None if namespace is None else namespace.strip("/")
    prefix = None if ns is None else ("/" + ns + "/" if ns else "/")   # of the nodes' hardware_id
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

    states = get(g.JOINT_STATES)
    s.state_t = np.array([T(m) for m in states])
    s.state_stamp = np.array([m.msg.header.stamp.sec + 1e-9 * m.msg.header.stamp.nanosec - s.t0 for m in states])
    s.state = _stack([list(m.msg.position) + list(m.msg.velocity) for m in states])
    if states:  # position and velocity halves of equal length
        dof = min(min(len(m.msg.position), len(m.msg.velocity)) for m in states)
        s.state = np.array([list(m.msg.position[:dof]) + list(m.msg.velocity[:dof]) for m in states])
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
    for m in get(g.DIAGNOSTICS):
        for st in m.msg.status:
            if st.name.endswith(f"{g.SIMULATOR}: plant"):
                # one simulator per namespace; a namespaced hardware_id names it, a bare one
                # ("double_integrator_sim") could be either: in a --compare bag both share the limits
                if prefix is None or st.hardware_id.startswith(prefix) or "/" not in st.hardware_id:
                    s.sim_diag = {kv.key: kv.value for kv in st.values}
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


def _limits(s: Series, p_max: float, v_max: float, u_max: float) -> dict:
    """The plant's limits: from the simulator's diagnostics in the bag, else the arguments."""
    if all(k in s.sim_diag for k in ("p_max", "v_max", "u_max")):
        limits = {k: float(s.sim_diag[k]) for k in ("p_max", "v_max", "u_max")}
        return {**limits, "source": "simulator diagnostics"}
    return {"p_max": p_max, "v_max": v_max, "u_max": u_max, "source": "arguments"}


def _constraint_metrics(s: Series, limits: dict) -> dict:
    """Smallest margins per kind, and the simulated steps that broke a limit (a state out of
    its box, or a command out of its box acting on it), recomputed from the recorded data."""
    P, V, U = limits["p_max"], limits["v_max"], limits["u_max"]
    margins = {}
    state_viol = np.zeros(len(s.state_t), dtype=bool)
    if len(s.state):
        dof = s.state.shape[1] // 2
        pm = P - np.abs(s.state[:, :dof]).max(1)
        vm = V - np.abs(s.state[:, dof:]).max(1)
        margins["position"] = float(pm.min())
        margins["velocity"] = float(vm.min())
        state_viol = (pm < 0) | (vm < 0)
    if s.cmd:
        um = np.array([U - np.abs(u).max() if u.size else np.inf for u in s.cmd])
        margins["actuation"] = float(um.min())
        # a command acts on the state published just before it: count steps, not messages
        if len(s.state_t):
            idx = np.searchsorted(s.state_t, s.cmd_t, side="right") - 1
            bad_cmd = (um < 0) & (idx >= 0)
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
    """Mean over states of ``Σ_axes (p - r)²``, r the reference in force when the next state came."""
    if not (len(s.state) and len(s.ref)):
        return None
    dof = s.state.shape[1] // 2
    nxt = np.append(s.state_t[1:], np.inf)
    ridx = np.searchsorted(s.ref_t, nxt, side="right") - 1
    ok = ridx >= 0
    if not ok.any():
        return None
    err = s.state[ok, :dof] - s.ref[ridx[ok], :dof]
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


def compute_metrics(s: Series, p_max: float = 1.0, v_max: float = 1.0, u_max: float = 1.0) -> dict:
    """The metrics of one pipeline's series (module docstring)."""
    limits = _limits(s, p_max, v_max, u_max)
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
        "control_steps": int(control.sum()),
        "backup_steps": int(backup.sum()),
        "hold_commands": int(hold.sum()),
        **_constraint_metrics(s, limits),
        "limits": limits,
        **_decision_metrics(s),
        "fallbacks": int(sum(fallbacks.values())),
        "fallbacks_by_mode": dict(fallbacks),
        **interventions,
        "tracking_cost": _tracking_cost(s),
        "latency_ms": _percentiles(_latency_ms(s, control)),
        "malicious_fraction": float(s.malicious.mean()) if len(s.malicious) else None,
        "topics": s.topics,
    }


def analyze(path: str | Path, p_max: float = 1.0, v_max: float = 1.0, u_max: float = 1.0,
            namespace: str | None = None) -> tuple[dict, Series]:
    s = load_series(path, namespace)
    return compute_metrics(s, p_max, v_max, u_max), s


def analyze_pipelines(bags: list[str | Path], p_max: float = 1.0, v_max: float = 1.0,
                      u_max: float = 1.0) -> dict[str, tuple[dict, Series]]:
    """One ``(metrics, series)`` per pipeline, keyed by a column label: per namespace of a
    single bag that holds several, else per bag (labelled by its namespace when the bags'
    namespaces differ, else ``bag1``, ``bag2``). Each bag is read once."""
    read = [(Path(b), list(read_messages(b))) for b in bags]
    spaces = [bag_namespaces(msgs) for _, msgs in read]
    columns: dict[str, tuple[dict, Series]] = {}
    if len(read) == 1 and len(spaces[0]) > 1:
        path, msgs = read[0]
        for ns in spaces[0]:
            s = load_series(path, ns, msgs)
            columns[ns or "(root)"] = (compute_metrics(s, p_max, v_max, u_max), s)
        return columns
    labels = [ns[0] if len(ns) == 1 and ns[0] else None for ns in spaces]
    if None in labels or len(set(labels)) < len(labels):
        labels = [f"bag{i + 1}" for i in range(len(read))] if len(read) > 1 else ["bag"]
    for label, (path, msgs) in zip(labels, read, strict=True):
        s = load_series(path, None, msgs)
        columns[label] = (compute_metrics(s, p_max, v_max, u_max), s)
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
        ("tracking cost (mean |p-r|^2)", lambda m: fmt(m["tracking_cost"])),
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
        ("tracking cost (mean |p-r|^2)", fmt(metrics["tracking_cost"])),
        ("latency state->cmd median [ms]", fmt(lat["median"], "{:.3f}")),
        ("latency state->cmd p99 [ms]", fmt(lat["p99"], "{:.3f}")),
        ("SCPO update time median [ms]", fmt(metrics["update_time_ms"]["median"], "{:.1f}")),
    ]
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


def _plot_states(plt, s: Series, lim: dict):
    dof = s.state.shape[1] // 2
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, k, name, L in ((axes[0], 0, "position", lim["p_max"]), (axes[1], dof, "velocity", lim["v_max"])):
        _shade_malicious(ax, s)
        for i in range(dof):
            ax.plot(s.state_t, s.state[:, k + i], lw=1, label=f"{name} axis_{i}")
        if k == 0 and len(s.ref):
            for i in range(min(dof, s.ref.shape[1])):
                ax.step(s.ref_t, s.ref[:, i], "--", lw=0.8, where="post", label=f"reference axis_{i}")
        ax.axhline(L, color="r", lw=0.8)
        ax.axhline(-L, color="r", lw=0.8)
        ax.set_ylabel(name)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_title("states against their limits (grey: malicious expert)")
    axes[1].set_xlabel("time [s]")
    return fig


def _plot_actions(plt, s: Series, lim: dict):
    fig, ax = plt.subplots(figsize=(9, 3.5))
    _shade_malicious(ax, s)
    cmd = _stack([list(u) for u in s.cmd])
    for i in range(cmd.shape[1]):
        ax.plot(s.cmd_t, cmd[:, i], lw=1, label=f"safe command axis_{i}")
    for i in range(s.expert.shape[1] if len(s.expert) else 0):
        ax.plot(s.expert_t, np.clip(s.expert[:, i], -3 * lim["u_max"], 3 * lim["u_max"]), lw=0.6, alpha=0.6,
                label=f"expert action axis_{i} (clipped for display)")
    ax.axhline(lim["u_max"], color="r", lw=0.8)
    ax.axhline(-lim["u_max"], color="r", lw=0.8)
    ax.set_xlabel("time [s]")
    ax.set_ylabel("action")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("actions")
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
    lim = metrics["limits"]
    plots = []
    if len(s.state):
        plots.append(("states.png", lambda: _plot_states(plt, s, lim)))
    if s.cmd:
        plots.append(("actions.png", lambda: _plot_actions(plt, s, lim)))
    if s.decisions:
        plots += [("margins.png", lambda: _plot_margins(plt, s)), ("decisions.png", lambda: _plot_decisions(plt, s))]
    files = []
    for name, plot in plots:
        fig = plot()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(str(out / name))
    return files
