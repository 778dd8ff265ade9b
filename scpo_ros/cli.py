"""``scpo-ros``: the one-command demo and the bag analysis.

    scpo-ros demo [--duration 30] [--bag runs/demo] [--params config/scpo_double_integrator.yaml]
                  [--no-malicious] [--dof 1] [--namespace NS] [--overwrite]
    scpo-ros analyze BAG [BAG2] [--json PATH] [--plots DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_analyze(args) -> int:
    from .analysis import analyze, format_table, write_plots

    results = {}
    for i, bag in enumerate(args.bags):
        if not Path(bag).exists():
            print(f"error: no bag at {bag}", file=sys.stderr)
            return 2
        metrics, series = analyze(bag, args.p_max, args.v_max, args.u_max)
        print(format_table(metrics, title=f"bag {bag}"))
        if args.plots:
            out = Path(args.plots) if len(args.bags) == 1 else Path(args.plots) / f"bag{i + 1}"
            files = write_plots(series, metrics, out)
            print("plots: " + ", ".join(files))
        results[str(bag)] = metrics
    if args.json:
        payload = next(iter(results.values())) if len(results) == 1 else {"bags": results}
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

    an = sub.add_parser("analyze", help="metrics table, JSON and plots of one or two bags (MCAP or sqlite3)")
    an.add_argument("bags", nargs="+", metavar="BAG", help="bag directory (one or two)")
    an.add_argument("--json", help="write the metrics as JSON here")
    an.add_argument("--plots", help="write PNG plots into this directory")
    an.add_argument("--p-max", type=float, default=1.0, help="position limit if the bag has no sim diagnostics")
    an.add_argument("--v-max", type=float, default=1.0)
    an.add_argument("--u-max", type=float, default=1.0)
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
