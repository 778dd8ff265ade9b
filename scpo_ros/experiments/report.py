"""Small helpers the experiments share: aggregate per-seed results, print a table, write JSON."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

SUMMED = ("updates", "accepted", "unsafe_committed")
METHODS = ("scpo", "unconstrained")


def scpo_experiment_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The options every SCPO-vs-unconstrained experiment shares."""
    ap = argparse.ArgumentParser(prog=f"python -m scpo_ros.experiments {name}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--updates", type=int, default=250)
    ap.add_argument("--json", help="write the metrics here")
    ap.add_argument("--plot", default=f"{name}.png", help="PNG plot path ('' for none)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is robust when other processes share the cores)")
    return ap


def run_methods(run_seed: Callable[..., dict], settings, progress: bool) -> dict:
    """``run_seed(method, seed, settings, progress=...)`` for both methods and every seed, aggregated."""
    return {method: aggregate([run_seed(method, seed, settings, progress=progress)
                               for seed in range(settings.seeds)]) for method in METHODS}


def aggregate(per_seed: list[dict]) -> dict:
    """Counts summed over seeds, everything else averaged; ``per_seed`` kept as is."""
    out: dict = {}
    for key in per_seed[0]:
        values = [s[key] for s in per_seed]
        if not all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
            continue
        out[key] = int(sum(values)) if key in SUMMED else float(np.mean(values))
    out["per_seed"] = per_seed
    return out


def shade_updates(axes, mask, color: str = "0.9") -> None:
    """Grey bands over the updates where ``mask`` is true (the malicious phases), on every axis."""
    for ax in axes:
        for k in np.flatnonzero(mask):
            ax.axvspan(k + 0.5, k + 1.5, color=color, lw=0)


def print_table(title: str, results: dict, columns: list[tuple[str, str]]) -> str:
    """One row per method; ``columns`` = [(key, header)]."""
    header = ["method"] + [h for _, h in columns]
    rows = [[name] + [_fmt(res.get(key)) for key, _ in columns] for name, res in results.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    text = "\n".join([title, line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
    print(text)
    return text


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, float) and (abs(v) >= 1e4 or (0 < abs(v) < 1e-3)):
        return f"{v:.3e}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, default=_jsonable))


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
