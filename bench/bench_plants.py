"""Every plant over DDS: the SCPO graph and the action safeguard side by side, one run per plant.

For each plant (the shipped ones, or the files given) this runs ``scpo-ros demo --compare
--plant P`` (two namespaces, the same malicious expert, one bag) and prints one row per
plant: the simulators' violations (SCPO and safeguard), SCPO's decisions, the safeguard's
interventions, fallbacks, the state -> command latency and the control-callback compute
time of the safety node. Every number is read back from the run's JSON (the nodes' own
counts and the bag's analysis).

    python bench/bench_plants.py [--duration 30] [--plants NAME|FILE ...] [--out runs/plants] [--json PATH]

Exit code 1 when any simulator reported a violation or a node failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run_plant(plant: str, duration: float, out: Path, domain: int) -> dict:
    name = Path(plant).stem
    bag, js = out / f"{name}_bag", out / f"{name}.json"
    cmd = [sys.executable, "-m", "scpo_ros.cli", "demo", "--compare", "--plant", plant, "--duration", str(duration),
           "--bag", str(bag), "--overwrite", "--json", str(js)]
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if not js.exists():
        return {"plant": name, "error": (proc.stdout + proc.stderr)[-2000:], "exit": proc.returncode}
    result = json.loads(js.read_text())
    result["exit"] = proc.returncode
    result["plant"] = name
    return result


def row(r: dict) -> dict:
    if "error" in r:
        return {"plant": r["plant"], "error": r["error"][-300:]}
    nodes, bags = r["nodes"], r.get("bag_metrics", {})
    sim_s, sim_g = nodes["scpo"].get("plant_sim", {}), nodes["safeguard"].get("plant_sim", {})
    safety, guard = nodes["scpo"].get("scpo_safety_node", {}), nodes["safeguard"].get("action_safeguard", {})
    up = safety.get("updates", {})
    ms, mg = bags.get("scpo", {}), bags.get("safeguard", {})
    return {
        "plant": r["plant"], "exit": r["exit"],
        "scpo_steps": sim_s.get("steps"), "scpo_violations": sim_s.get("constraint_violations"),
        "safeguard_steps": sim_g.get("steps"), "safeguard_violations": sim_g.get("constraint_violations"),
        "accepted": up.get("accepted"), "backtracked": up.get("backtracked"), "rejected": up.get("rejected"),
        "infeasible": up.get("infeasible"), "fallbacks": safety.get("fallbacks"),
        "interventions": guard.get("interventions"),
        "latency_ms_scpo": (ms.get("latency_ms") or {}).get("median"),
        "latency_ms_safeguard": (mg.get("latency_ms") or {}).get("median"),
        "compute_us": (safety.get("compute_us") or {}).get("median"),
        "min_margin_scpo": ms.get("min_constraint_margin"), "min_margin_safeguard": mg.get("min_constraint_margin"),
        "limits_source": (ms.get("limits") or {}).get("source"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of simulation per plant")
    ap.add_argument("--plants", nargs="*", default=None, help="plant NAMEs or FILEs (default: every shipped plant)")
    ap.add_argument("--out", default="runs/plants", help="bags and per-plant JSON go here")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--domain", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "57")))
    args = ap.parse_args(argv)
    from scpo_ros.plant import shipped_plants

    plants = args.plants or shipped_plants()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cols = ("plant", "scpo_violations", "safeguard_violations", "accepted", "backtracked", "rejected", "infeasible",
            "fallbacks", "interventions", "latency_ms_scpo", "compute_us", "limits_source")
    print(" | ".join(cols))
    for plant in plants:
        r = row(run_plant(plant, args.duration, out, args.domain))
        rows.append(r)
        print(" | ".join(str(round(r[c], 3) if isinstance(r.get(c), float) else r.get(c, "-")) for c in cols)
              if "error" not in r else f"{r['plant']} | FAILED: {r['error']}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if "error" in r or r["exit"] != 0 or r["scpo_violations"] or r["safeguard_violations"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
