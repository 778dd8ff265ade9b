"""Projection benchmark: per-step solver time and the batched layer vs cvxpylayers.

Per step (double integrator, dof 1 and 2, states of the invariant set, raw actions
up to 2.5 u_max so most steps project):
- ``closed_form``: ``SafeguardProjector.project`` (the default for these plants), whole step
  (input checks, membership, right-hand side, projection, active set, distance);
- ``daqp_warm``: the same step through the daqp workspace set up once, warm-started;
- ``daqp_cold``: a fresh daqp workspace every step (setup + solve);
- ``cvxpy``: a parametrised cvxpy problem (Clarabel), built once, solved per step.
The closed form and warm daqp steps are also timed for the set robust to one late command
(``late_commands=1``: next-state and held-command rows), on the same states and actions.

Layer (batch 256, dof 2: 2 actions, 88 + 4 constraint rows): forward + backward of
``ProjectionLayer`` (closed form and daqp forward) vs cvxpylayers (SCS at eps 1e-10; its
backward solves diffcp's derivative system densely, ``mode="dense"``: the default iterative
LSQR solve stops at ~3e-5 on a sample with a nearly active row, which is the reference's
error, not ours), with the largest gradient difference. Everything is reported as ratios
measured in one run.

    python bench/bench_projection.py [--steps 3000] [--repeats 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scpo_ros.plant import double_integrator_plant  # noqa: E402
from scpo_ros.safeguard.invariant_set import safe_set_for  # noqa: E402
from scpo_ros.safeguard.layer import ProjectionLayer  # noqa: E402
from scpo_ros.safeguard.projection import DaqpProjection, SafeguardProjector  # noqa: E402


def di_safe_set(dof: int, late_commands: int = 0):
    """The explicit safe set of the ``dof``-axis double integrator (unit limits, dt 0.05)."""
    plant = double_integrator_plant(dof)
    return safe_set_for(plant, late_commands=late_commands)


def sample(S, n: int, seed: int, spread: float = 2.5):
    rng = np.random.default_rng(seed)
    dim = S.state_dim
    x = rng.uniform(-1.0, 1.0, (8 * n, dim))
    x = x[S.invariant.contains(x, tol=-1e-6)][:n]
    u = rng.uniform(-spread, spread, (len(x), S.action_dim)) * S.u_max
    return x, u


def per_call_us(fn, args_list) -> float:
    """Median wall time of ``fn(*args)`` over the list, in µs."""
    times = []
    for args in args_list:
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def bench_per_step(dof: int, steps: int) -> dict:
    S = di_safe_set(dof)
    x, u = sample(S, steps, seed=dof)
    b = S.rhs(x)
    cf = SafeguardProjector(S, solver="closed_form")
    warm = SafeguardProjector(S, solver="daqp")
    out = {"constraints": int(S.G.shape[0] + 2 * S.action_dim), "actions": S.action_dim}
    out["closed_form_us"] = per_call_us(cf.project, list(zip(x, u)))
    out["daqp_warm_us"] = per_call_us(warm.project, list(zip(x, u)))
    # The late set is the nominal set for the double integrator: the same states are in it.
    late = di_safe_set(dof, late_commands=1)
    out["late_constraints"] = int(late.G.shape[0] + 2 * late.action_dim)
    cf_late = SafeguardProjector(late, solver="closed_form")
    warm_late = SafeguardProjector(late, solver="daqp")
    out["closed_form_late_us"] = per_call_us(cf_late.project, list(zip(x, u)))
    out["daqp_warm_late_us"] = per_call_us(warm_late.project, list(zip(x, u)))
    out["late_fallbacks"] = int(sum(cf_late.project(xi, ui).fallback for xi, ui in zip(x, u)))

    def cold(ui, bi):
        DaqpProjection(S.G, S.u_max).solve(ui, bi)
    out["daqp_cold_qp_us"] = per_call_us(cold, list(zip(u, b)))
    qp = warm._qp
    out["daqp_warm_qp_us"] = per_call_us(qp.solve, list(zip(u, b)))
    try:
        import cvxpy as cp
        z, up, bp = cp.Variable(S.action_dim), cp.Parameter(S.action_dim), cp.Parameter(S.G.shape[0])
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(z - up)), [S.G @ z <= bp, cp.abs(z) <= S.u_max])

        def solve_cvxpy(ui, bi):
            up.value, bp.value = ui, bi
            prob.solve(solver=cp.CLARABEL)
        n_cvx = min(len(u), 300)
        out["cvxpy_qp_us"] = per_call_us(solve_cvxpy, list(zip(u[:n_cvx], b[:n_cvx])))
        out["cvxpy_over_closed_form"] = out["cvxpy_qp_us"] / out["closed_form_us"]
        out["cvxpy_over_daqp_warm"] = out["cvxpy_qp_us"] / out["daqp_warm_us"]
    except ImportError:
        out["cvxpy_qp_us"] = None
    out["daqp_cold_over_warm_qp"] = out["daqp_cold_qp_us"] / out["daqp_warm_qp_us"]
    # Exactness of what was timed: the two solvers agree.
    out["max_abs_diff_closed_form_vs_daqp"] = float(max(
        np.abs(cf.project(xi, ui).u - warm.project(xi, ui).u).max() for xi, ui in zip(x[:500], u[:500])))
    return out


def bench_layer(batch: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    S = di_safe_set(2)
    x, u = sample(S, batch, seed=42)
    u = torch.tensor(u)
    b = S.rhs(torch.tensor(x))
    w = torch.randn(u.shape, dtype=u.dtype, generator=torch.Generator().manual_seed(0))

    def run(fn):
        uu, bb = u.clone().requires_grad_(True), b.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = fn(uu, bb)
        (out * w).sum().backward()
        return time.perf_counter() - t0, out.detach(), uu.grad, bb.grad

    res = {"batch": len(u), "constraints": int(S.G.shape[0] + 4)}
    ours = {}
    for solver in ("closed_form", "daqp"):
        layer = ProjectionLayer(S, solver=solver)
        run(layer.project)  # warm-up
        timings = [run(layer.project) for _ in range(max(repeats, 5))]
        res[f"layer_{solver}_ms"] = statistics.median(t[0] for t in timings) * 1e3
        ours[solver] = timings[-1]
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
    except ImportError:
        return res
    G = S.G
    z, up, bp = cp.Variable(2), cp.Parameter(2), cp.Parameter(G.shape[0])
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(z - up)), [G @ z <= bp, cp.abs(z) <= S.u_max])
    ref = CvxpyLayer(prob, parameters=[up, bp], variables=[z])
    fn = lambda uu, bb: ref(uu, bb, solver_args={"eps": 1e-10, "max_iters": 100000, "mode": "dense"})[0]  # noqa: E731
    timings = [run(fn) for _ in range(repeats)]
    res["cvxpylayers_ms"] = statistics.median(t[0] for t in timings) * 1e3
    _, ref_out, ref_gu, ref_gb = timings[-1]
    for solver, (_, out, gu, gb) in ours.items():
        res[f"cvxpylayers_over_{solver}"] = res["cvxpylayers_ms"] / res[f"layer_{solver}_ms"]
        res[f"max_grad_diff_{solver}"] = float(max((gu - ref_gu).abs().max(), (gb - ref_gb).abs().max()))
        # Gradients w.r.t. b are ~1/|G_ij| ~ 20 in size: also report |Δ| / max(1, |g_ref|).
        res[f"max_grad_rel_diff_{solver}"] = float(max(((gu - ref_gu).abs() / ref_gu.abs().clamp(min=1)).max(),
                                                       ((gb - ref_gb).abs() / ref_gb.abs().clamp(min=1)).max()))
        res[f"max_output_diff_{solver}"] = float((out - ref_out).abs().max())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000, help="projections timed per solver")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="cvxpylayers calls timed")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    results = {"per_step": {f"dof{d}": bench_per_step(d, args.steps) for d in (1, 2)},
               "layer": bench_layer(args.batch, args.repeats)}
    for name, r in results["per_step"].items():
        print(f"per step, double integrator {name} ({r['actions']} actions, {r['constraints']} rows): "
              f"closed form {r['closed_form_us']:.1f} µs, daqp warm {r['daqp_warm_us']:.1f} µs "
              f"(QP alone {r['daqp_warm_qp_us']:.1f}), daqp cold QP {r['daqp_cold_qp_us']:.1f} µs, "
              f"cvxpy QP {r['cvxpy_qp_us'] or float('nan'):.0f} µs")
        print(f"  late_commands=1 ({r['late_constraints']} rows): closed form {r['closed_form_late_us']:.1f} µs, "
              f"daqp warm {r['daqp_warm_late_us']:.1f} µs ({r['late_fallbacks']} fallbacks)")
        if r.get("cvxpy_qp_us"):
            print(f"  ratios: cvxpy/closed form {r['cvxpy_over_closed_form']:.0f}x, "
                  f"cvxpy/daqp warm {r['cvxpy_over_daqp_warm']:.0f}x, "
                  f"daqp cold/warm {r['daqp_cold_over_warm_qp']:.2f}x; "
                  f"solver agreement {r['max_abs_diff_closed_form_vs_daqp']:.1e}")
    lr = results["layer"]
    ref = f", cvxpylayers {lr['cvxpylayers_ms']:.0f} ms" if "cvxpylayers_ms" in lr else ""
    print(f"layer fwd+bwd, batch {lr['batch']}: closed form {lr['layer_closed_form_ms']:.2f} ms, "
          f"daqp {lr['layer_daqp_ms']:.2f} ms" + ref)
    if "cvxpylayers_ms" in lr:
        print(f"  ratios: cvxpylayers/closed form {lr['cvxpylayers_over_closed_form']:.0f}x, "
              f"cvxpylayers/daqp {lr['cvxpylayers_over_daqp']:.0f}x; max gradient difference "
              f"{lr['max_grad_diff_closed_form']:.1e} (closed form), {lr['max_grad_diff_daqp']:.1e} (daqp); "
              f"relative {lr['max_grad_rel_diff_closed_form']:.1e}, {lr['max_grad_rel_diff_daqp']:.1e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
