"""Benchmark of the SCPO core: batched rollouts, one full SCPO step, the QCQP solver.

    python bench/bench_scpo.py [--plant NAME|PATH] [--threads 2] [--steps 15] [--json PATH]

1. Rollout throughput (residual [x, r]-32-32-m policy, H = the certification horizon: 100
   steps for the double integrator): the batched engine (``rollout.PlantRollout``) on K+1 = 65
   weight vectors × M = 256 initial states, against a per-sample Python loop (one weight
   vector and one initial state at a time, numpy MLP per step).
2. One full SCPO step (sample + fit + QCQP + certify on 1024 held-out states) at
   K = 64 and 256, M = 256, on raw updates from the imitation learner (clean expert,
   ``expert.Expert``; demonstrations from the imitation experiment's ``demo_region``).
3. The QCQP: our dual Newton solver vs cvxpy + Clarabel at d = 10 000, m = 4.
All numbers come from one run; compare the ratios (this VM jitters by ±30 %).
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: idle BLAS threads steal torch's cores

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scpo_ros.backup import LQRBackup  # noqa: E402
from scpo_ros.experiments.imitation import ImitationSettings, demo_region  # noqa: E402
from scpo_ros.expert import Expert, ExpertConfig  # noqa: E402
from scpo_ros.learners import ImitationLearner, residual_targets  # noqa: E402
from scpo_ros.plant import load_plant  # noqa: E402
from scpo_ros.policy import MLPLayout, NumpyMLP  # noqa: E402
from scpo_ros.residual_scpo import ResidualSCPO  # noqa: E402
from scpo_ros.rollout import PlantRollout, random_states, state_set  # noqa: E402
from scpo_ros.scpo import COMMITTED  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qcqp import run_qcqp_benchmark  # noqa: E402


def loop_rollout(plant, backup, layout, theta: np.ndarray, x0: np.ndarray, r: np.ndarray, horizon: int) -> float:
    """The naive way: one trajectory, one state at a time; returns the worst state row ``F x - f``."""
    mlp = NumpyMLP(layout, theta)
    F, f, _ = plant.state_rows()
    x, worst = x0.copy(), -np.inf
    for _ in range(horizon):
        u = backup(x, r) + mlp(np.concatenate([x, r]))
        x = plant.step(x, u)
        worst = max(worst, float((F @ x - f).max()))
    return worst


def bench_rollouts(engine: PlantRollout, n_loop: int, repeats: int) -> dict:
    plant, backup, layout = engine.plant, engine.backup, engine.layout
    theta = layout.initial_parameters(0)
    params = theta.unsqueeze(0) + 0.01 * torch.randn(65, layout.size, generator=torch.Generator().manual_seed(0))
    x0, r = state_set(plant, 256, np.random.default_rng(0))
    engine.evaluate(params, x0, r)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.evaluate(params, x0, r)
        times.append(time.perf_counter() - t0)
    batched = 65 * 256 / float(np.median(times))
    p64 = params.double().numpy()
    t0 = time.perf_counter()
    for i in range(n_loop):
        loop_rollout(plant, backup, layout, p64[i % 65], x0[i % 256], r[i % 256], engine.steps)
    looped = n_loop / (time.perf_counter() - t0)
    return {"batched_rollouts_per_s": batched, "loop_rollouts_per_s": looped, "ratio": batched / looped,
            "batched_call_ms_median": 1e3 * float(np.median(times))}


def bench_scpo_step(plant, K: int, steps: int) -> dict:
    backup = LQRBackup(plant)
    layout = MLPLayout(plant.n + plant.nr, plant.m, (32, 32))
    scpo = ResidualSCPO(plant, backup, layout, ResidualSCPO.default_config(n_samples=K),
                        n_sample_states=256, n_cert_states=1024, seed=0)
    learner = ImitationLearner(backup, layout, lr=1e-3)
    learner.load(scpo.theta)
    model = learner.model
    expert = Expert(plant, ExpertConfig())
    rng = np.random.default_rng(1)
    region = demo_region(plant, ImitationSettings().demo_spread)
    records = []
    for k in range(steps + 1):
        x, r = random_states(region, 256, rng)
        before = model.flat().detach().clone()
        learner.fit(*residual_targets(backup, x, r, expert.action(x, r, False)))
        t0 = time.perf_counter()
        d = scpo.propose_step((model.flat().detach() - before).numpy())
        wall = 1e3 * (time.perf_counter() - t0)
        learner.load(scpo.theta)
        if k > 0:  # the first step pays one-off allocations
            records.append((wall, d.times_ms, d.status))
    walls = np.array([w for w, _, _ in records])
    parts = {key: float(np.median([t.get(key, 0.0) for _, t, _ in records]))
             for key in ("sample", "fit", "qcqp", "certify")}
    statuses = [s for _, _, s in records]
    return {"K": K, "M": 256, "H": scpo.engine.steps, "cert_states": 1024, "params": layout.size,
            "median_ms": float(np.median(walls)), "p90_ms": float(np.percentile(walls, 90)),
            "parts_median_ms": parts, "committed": sum(s in COMMITTED for s in statuses),
            "steps": len(statuses)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plant", default="double_integrator", help="a shipped plant's name or a plant file's path")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--steps", type=int, default=15, help="SCPO steps timed per K")
    ap.add_argument("--loop-rollouts", type=int, default=60, help="rollouts timed in the per-sample loop")
    ap.add_argument("--qcqp-instances", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    plant = load_plant(args.plant)
    backup = LQRBackup(plant)
    layout = MLPLayout(plant.n + plant.nr, plant.m, (32, 32))
    engine = PlantRollout(plant, backup, layout)
    H = engine.steps
    roll = bench_rollouts(engine, args.loop_rollouts, repeats=7)
    steps = [bench_scpo_step(plant, K, args.steps) for K in (64, 256)]
    qcqp = run_qcqp_benchmark(ds=(10000,), ms=(4,), n=args.qcqp_instances, repeats=5, clarabel_direct=False)[0]

    print(f"plant {plant.name}, torch threads: {args.threads}, policy {'-'.join(map(str, layout.sizes))} "
          f"({layout.size} parameters), H = {H}")
    print("\nRollout throughput")
    print(f"  batched engine (65 x 256 per call): {roll['batched_rollouts_per_s']:10.0f} rollouts/s "
          f"({roll['batched_call_ms_median']:.1f} ms per call)")
    print(f"  per-sample Python loop            : {roll['loop_rollouts_per_s']:10.0f} rollouts/s")
    print(f"  ratio                             : {roll['ratio']:10.0f} x")
    print(f"\nFull SCPO step (sample + fit + QCQP + certify on 1024 held-out states), M = 256, H = {H}")
    print(f"  {'K':>4} {'median ms':>10} {'p90 ms':>8} {'sample':>8} {'fit':>6} {'qcqp':>6} {'certify':>8} "
          f"{'committed':>10}")
    for s in steps:
        p = s["parts_median_ms"]
        print(f"  {s['K']:>4} {s['median_ms']:10.1f} {s['p90_ms']:8.1f} {p['sample']:8.1f} {p['fit']:6.2f} "
              f"{p['qcqp']:6.2f} {p['certify']:8.1f} {s['committed']:>5}/{s['steps']}")
    print("\nQCQP at d = 10 000, m = 4 (median over instances)")
    print(f"  ours {qcqp['ours_ms']:.3f} ms, cvxpy + Clarabel {qcqp['cvxpy_ms']:.1f} ms: "
          f"{qcqp['ratio_cvxpy']:.0f} x faster; max |Δ_ours - Δ_cvxpy| / |Δ_raw| = {qcqp['max_err_vs_cvxpy']:.1e} "
          f"({qcqp['max_err_vs_cvxpy_optimal']:.1e} where cvxpy reports 'optimal')")
    if args.json:
        Path(args.json).write_text(json.dumps({"plant": plant.name, "threads": args.threads, "rollouts": roll,
                                               "scpo_step": steps, "qcqp": qcqp}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
