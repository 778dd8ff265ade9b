"""``scpo-ros``: the one-command demo and the bag analysis.

    scpo-ros demo [--duration 30] [--bag runs/demo] [--params config/scpo.yaml]
                  [--no-malicious] [--plant NAME|FILE] [--namespace NS] [--overwrite]
    scpo-ros demo --compare [--bag runs/compare] [--safeguard-params config/safeguard.yaml] ...
    scpo-ros analyze BAG [BAG2] [--json PATH] [--plots DIR]

``analyze`` with two bags, or one bag holding several namespaces (``demo --compare``),
prints one comparison table, a column per pipeline; ``--json`` then writes
``{"pipelines": {label: metrics}}`` (two bags: also ``"bags": {path: metrics}``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_analyze(args) -> int:
    from .analysis import analyze_pipelines, format_comparison, format_table, write_plots

    for bag in args.bags:
        if not Path(bag).exists():
            print(f"error: no bag at {bag}", file=sys.stderr)
            return 2
    try:
        columns = analyze_pipelines(args.bags, args.plant)
    except ValueError as exc:   # PlantError: a bad --plant
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(columns) == 1:
        (metrics, series), = columns.values()
        print(format_table(metrics, title=f"bag {args.bags[0]}"))
        payload = metrics
    else:
        print(format_comparison({label: m for label, (m, _) in columns.items()},
                                title="bags " + ", ".join(map(str, args.bags))))
        payload = {"pipelines": {label: m for label, (m, _) in columns.items()}}
        if len(args.bags) > 1:
            payload["bags"] = {str(bag): m for bag, (m, _) in zip(args.bags, columns.values(), strict=True)}
    if args.plots:
        for label, (metrics, series) in columns.items():
            out = Path(args.plots) if len(columns) == 1 else Path(args.plots) / label
            files = write_plots(series, metrics, out)
            print("plots: " + ", ".join(files))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"json: {args.json}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scpo-ros", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    an = sub.add_parser("analyze", help="metrics table, JSON and plots of one or two bags (MCAP or sqlite3); "
                                        "two bags or namespaces: one comparison table")
    an.add_argument("bags", nargs="+", metavar="BAG", help="bag directory (one or two)")
    an.add_argument("--json", help="write the metrics as JSON here")
    an.add_argument("--plots", help="write PNG plots into this directory")
    an.add_argument("--plant", help="plant NAME or FILE for a bag that carries no plant topic (default: the "
                                    "bag's, else double_integrator)")
    an.set_defaults(func=cmd_analyze)

    from .demo import add_demo_arguments
    dm = sub.add_parser("demo", help="start the whole graph with real DDS, record a bag, print a summary")
    add_demo_arguments(dm)
    dm.set_defaults(func=cmd_demo)

    args = ap.parse_args(argv)
    if args.command == "analyze" and len(args.bags) > 2:
        ap.error("analyze takes one or two bags")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
