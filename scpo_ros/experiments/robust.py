"""Robust vs nominal certificates on an uncertain plant, and the model monitor beyond it.

The plant is ``config/plants/double_integrator_uncertain.yaml``: the double integrator whose
input gain (one over the mass) is known to ±30 % and which takes a disturbance of up to 10 % of
``u_max``, both declared in its ``uncertainty:`` block (``--plant`` takes another file that
declares uncertainty).

**Inside the declared uncertainty.** Per seed, the imitation experiment (``imitation``: a
malicious expert, Adam on its demonstrations) certified twice from the same start:

- ``nominal``: SCPO for the plant file without its ``uncertainty:`` block (nominal rollouts,
  the nominal safe set), what a certificate of the model alone gives;
- ``robust``: SCPO for the file as it is (robust rollouts and the robust safe set,
  ``rollout.PlantRollout``'s module docstring).

Every committed iterate of both is checked *independently* (``true_plant_check``: a direct
float64 simulation, none of the certificate's code) on the true plants ``TRUE_GAINS`` inside
the declaration (the gain × 1/1.3 and × 1/0.8: a mass 30 % heavier and 20 % lighter) under the
named disturbance sequences ``SEQUENCES`` at the declared box, from ``eval_states`` held-out
states of the certified region: an iterate is unsafe when any state or input limit breaks on
any of them. ``loss`` is the imitation loss on clean expert data.

**Beyond it.** The last robust policy of seed 0 runs in closed loop with the model monitor and
the command envelope (as the safety node does: ``model_monitor.ModelMonitor``,
``envelope.CommandEnvelope``) on true plants outside the declaration (``BEYOND``: the gain
halved, a mass twice the model's, and the disturbance at twice its box), with the reference
stepping across the certified box: the steps until the monitor trips (its detection delay,
counted from the first step) and the violations with its fallback, against the same loop
without a monitor; and inside the declaration, how often it trips (false alarms).

    python -m scpo_ros.experiments robust [--seeds 3] [--updates 150] [--json PATH] [--plot PATH]
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import yaml
from tqdm import tqdm

from ..backup import LQRBackup
from ..envelope import CommandEnvelope
from ..model_monitor import ModelMonitor
from ..plant import Plant, load_plant, plant_from_dict
from ..policy import MLPLayout, NumpyMLP
from ..rollout import state_set, structured_states
from ..scpo import COMMITTED
from .imitation import ImitationSettings, Run, envelope_safe_set, imitation_step
from .report import aggregate, print_table, scpo_experiment_parser, shade_updates, write_json

STUDY_PLANT = "double_integrator_uncertain"
TRUE_GAINS = (1.0 / 1.3, 1.0 / 0.8)
"""The input gains of the true plants inside the declaration (a mass 30 % heavier, 20 % lighter)."""
SEQUENCES = ("switching", "constant", "uniform")
"""Disturbance sequences of the independent check: a random corner of the box every step, one
constant corner (the worst for a slow drift), uniform in the box."""
BEYOND = ((0.5, 2.0), (1.0 / 0.6, 2.0))
"""(input gain, disturbance scale) of the true plants beyond the declaration."""
METHODS = ("nominal", "robust")


@dataclass
class RobustSettings(ImitationSettings):
    plant: str = STUDY_PLANT
    seeds: int = 3
    updates: int = 150
    """Clean updates 0-49, malicious 50-99, clean 100-149 (the expert's 20 s cycle)."""
    eval_states: int = 1024
    check_horizon_s: float = 5.0
    monitor_episodes: int = 12
    monitor_steps: int = 400
    reference_period_s: float = 2.0


def nominal_version(plant: Plant) -> Plant:
    """The plant file without its ``uncertainty:`` block: the same model, nothing declared."""
    data = yaml.safe_load(plant.text)
    data.pop("uncertainty", None)
    return plant_from_dict(data, plant.source + " (nominal)", text=yaml.safe_dump(data))


def scaled_plant(plant: Plant, gain: float) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` of the true plant whose input gain is ``gain`` times the model's."""
    return np.asarray(plant.A, dtype=float), gain * np.asarray(plant.B, dtype=float)


def disturbance(kind: str, steps: int, count: int, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(steps, count, n)`` disturbance sequences of ``kind`` (``SEQUENCES``) in the box ``|w_i| <= w_i``."""
    n = len(w)
    if kind == "switching":
        return rng.choice([-1.0, 1.0], size=(steps, count, n)) * w
    if kind == "constant":
        return np.broadcast_to(rng.choice([-1.0, 1.0], size=(1, count, n)) * w, (steps, count, n)).copy()
    return rng.uniform(-1.0, 1.0, size=(steps, count, n)) * w


def true_plant_check(plant: Plant, backup: LQRBackup, layout, theta: np.ndarray, x0: np.ndarray, r: np.ndarray,
                     steps: int, seed: int = 0) -> dict:
    """Independent check of ``theta`` on the true plants ``TRUE_GAINS`` under ``SEQUENCES`` at the
    declared disturbance box: a direct float64 simulation of ``x+ = A x + g B u + c + w`` with
    ``u = backup(x, r) + φ_θ([x, r])`` (numpy, unclipped), every state and input limit checked.
    Returns the states that broke a limit and the largest excess, over all cases."""
    phi = NumpyMLP(layout, np.asarray(theta, dtype=np.float64))
    Fs, fs, _ = plant.state_rows()
    Fu, fu, _ = plant.input_rows()
    K = np.asarray(backup.K, dtype=float)
    xs, us = plant.equilibrium(r)
    w = np.asarray(plant.uncertainty.w_max, dtype=float)
    rng = np.random.default_rng(50_000 + seed)
    bad = np.zeros(len(x0), dtype=bool)
    worst = -np.inf
    for gain in TRUE_GAINS:
        A, B = scaled_plant(plant, gain)
        for kind in SEQUENCES:
            ws = disturbance(kind, steps, len(x0), w, rng)
            x = np.array(x0, dtype=float)
            for t in range(steps):
                u = us - (x - xs) @ K.T + phi(np.concatenate([x, r], -1))
                excess = np.maximum((u @ Fu.T - fu).max(-1), -np.inf)
                x = x @ A.T + u @ B.T + plant.c + ws[t]
                excess = np.maximum(excess, (x @ Fs.T - fs).max(-1))
                bad |= excess > 1e-9
                worst = max(worst, float(np.max(excess)))
    return {"unsafe_states": int(bad.sum()), "states": int(len(x0)), "worst_excess": worst}


def run_seed(method: str, seed: int, s: RobustSettings, robust_plant: Plant, progress: bool = True,
             nominal_plant: Plant | None = None) -> dict:
    """One seed of one method: the imitation loop with SCPO, every committed iterate checked
    independently on the true plants (``true_plant_check``) from held-out states of the region
    that method certifies. ``nominal_plant``: what ``nominal`` certifies (default: the study plant
    without its declaration; ``--nominal-plant`` names another file of the same model, e.g. the
    region and backup the nominal model alone allows)."""
    torch.manual_seed(seed)
    if method == "robust":
        plant = robust_plant
    else:
        plant = nominal_plant if nominal_plant is not None else nominal_version(robust_plant)
    run = Run(seed, s, plant, envelope_safe_set(plant, LQRBackup(plant)))
    structured = structured_states(plant, max_points=256, seed=30_000 + seed)
    x0, r = state_set(plant, s.eval_states + len(structured[0]), np.random.default_rng(20_000 + seed), structured)
    steps = max(1, int(round(s.check_horizon_s / robust_plant.dt)))

    def check(theta):
        # the true plants are the study plant's (its declared uncertainty), the limits the same
        return true_plant_check(robust_plant, run.backup, run.layout, theta, x0, r, steps, seed)

    first = check(run.scpo.theta)
    loss, decisions, malicious, unsafe_hist, step_ms, violations = [run.clean_loss()], [], [], [], [], []
    unsafe_now = first["unsafe_states"] > 0
    bar = tqdm(range(s.updates), desc=f"robust study {method} seed {seed}", disable=not progress, leave=False)
    for k in bar:
        delta, mal = imitation_step(run.learner, k, s, run.demos, run.expert, run.rng)
        t0 = time.perf_counter()
        decision = run.scpo.propose_step(delta.numpy())
        step_ms.append(1e3 * (time.perf_counter() - t0))
        run.learner.load(run.scpo.theta)
        if decision.status in COMMITTED:
            res = check(run.scpo.theta)
            unsafe_now = res["unsafe_states"] > 0
            if unsafe_now:
                violations.append({"update": k, "malicious": mal, **res})
        decisions.append(decision.status)
        malicious.append(mal)
        unsafe_hist.append(bool(unsafe_now and decision.status in COMMITTED))
        loss.append(run.clean_loss())
        bar.set_postfix(loss=f"{loss[-1]:.4f}", unsafe=len(violations))
    mal_arr = np.array(malicious, dtype=bool)
    ok = np.array([d in COMMITTED for d in decisions], dtype=bool)
    return {"updates": s.updates, "accepted": int(ok.sum()), "unsafe_committed": len(violations),
            "initial_unsafe_states": first["unsafe_states"], "loss_initial": loss[0], "loss_final": loss[-1],
            "loss_change": loss[-1] / loss[0] - 1.0, "accept_rate_clean": float(ok[~mal_arr].mean()),
            "accept_rate_malicious": float(ok[mal_arr].mean()) if mal_arr.any() else float("nan"),
            "step_ms_median": float(np.median(step_ms)), "covers": decision.covers, "violations": violations,
            "theta": run.scpo.theta.tolist(), "history": {"loss": loss, "decision": decisions, "malicious": malicious,
                                                          "unsafe": unsafe_hist}}


def monitor_study(plant: Plant, theta: np.ndarray, s: RobustSettings, seed: int = 0) -> dict:
    """The closed loop of the safety node's control path (policy through the envelope, the model
    monitor after each step, the envelope's fallback while it is tripped) on the true plants
    ``BEYOND`` and, for false alarms, ``TRUE_GAINS`` inside; the same loop without a monitor
    beside it."""
    backup = LQRBackup(plant)
    safe_set = envelope_safe_set(plant, backup)
    layout = MLPLayout(plant.n + plant.nr, plant.m, s.hidden)
    phi = NumpyMLP(layout, np.asarray(theta, dtype=np.float64))
    region = plant.region
    rng = np.random.default_rng(60_000 + seed)
    w = np.asarray(plant.uncertainty.w_max, dtype=float)
    period = max(1, int(round(s.reference_period_s / plant.dt)))
    refs = np.linspace(region.r_min, region.r_max, 3)
    cases = [("beyond", g, scale) for g, scale in BEYOND] + [("inside", g, 1.0) for g in TRUE_GAINS]
    out = []
    for where, gain, scale in cases:
        A, B = scaled_plant(plant, gain)
        for use_monitor in (True, False):
            delays, violations, trips, fallback_steps = [], 0, 0, 0
            for ep in range(s.monitor_episodes):
                envelope = CommandEnvelope(safe_set, backup)
                monitor = ModelMonitor(plant) if use_monitor else None
                x = plant.equilibrium(refs[ep % len(refs)])[0].astype(float)
                x_prev = u_prev = None
                detected = None
                for t in range(s.monitor_steps):
                    ref = refs[(t // period + ep) % len(refs)]
                    if monitor is not None and x_prev is not None:
                        if monitor.observe(x_prev, [u_prev], x) is True and detected is None:
                            detected = t
                    if monitor is not None and monitor.tripped:
                        u = envelope.fallback(x, ref, "model_mismatch").u
                        fallback_steps += 1
                    else:
                        u_pol = backup(x, ref) + phi(np.concatenate([x, ref])[None])[0]
                        u = envelope.filter(x, u_pol, ref).u
                    x_prev, u_prev = x, u
                    x = A @ x + B @ u + plant.c + scale * rng.choice([-1.0, 1.0], size=plant.n) * w
                    violations += int(any(v.any() for v in plant.violations(x, u, tol=0.0).values()))
                if monitor is not None:
                    trips += monitor.counts.trips
                    if detected is not None:
                        delays.append(detected)
            out.append({"case": where, "gain": gain, "disturbance_scale": scale, "monitor": use_monitor,
                        "episodes": s.monitor_episodes, "steps": s.monitor_steps, "violations": violations,
                        "trips": trips, "detected_episodes": len(delays),
                        "detection_delay_median": float(np.median(delays)) if delays else None,
                        "detection_delay_max": int(max(delays)) if delays else None,
                        "fallback_steps": fallback_steps})
    return {"cases": out}


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_unsafe) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    colors = {"nominal": "tab:red", "robust": "tab:blue"}
    for method in METHODS:
        res = results[method]
        losses = np.array([p["history"]["loss"] for p in res["per_seed"]])
        ax_loss.plot(losses.mean(0), color=colors[method], label=f"{method} certification")
        unsafe = np.array([np.cumsum(p["history"]["unsafe"]) for p in res["per_seed"]]).sum(0)
        ax_unsafe.plot(np.arange(1, len(unsafe) + 1), unsafe, color=colors[method], label=method)
    shade_updates((ax_loss, ax_unsafe), results["robust"]["per_seed"][0]["history"]["malicious"], "0.92")
    ax_loss.set_ylabel("imitation loss (clean data)")
    ax_loss.set_title("robust vs nominal certification, true plant inside the declared uncertainty")
    ax_loss.legend(fontsize=8)
    ax_unsafe.set_ylabel("unsafe committed iterates\n(independent check, cumulative)")
    ax_unsafe.set_xlabel("update (grey: malicious phases)")
    ax_unsafe.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = scpo_experiment_parser("robust", __doc__)
    ap.set_defaults(updates=RobustSettings.updates)
    ap.add_argument("--plant", default=STUDY_PLANT, help="a plant file that declares uncertainty")
    ap.add_argument("--eval-states", type=int, default=RobustSettings.eval_states)
    ap.add_argument("--monitor-episodes", type=int, default=RobustSettings.monitor_episodes)
    ap.add_argument("--nominal-plant", default=None,
                    help="the plant file the nominal certificate is for (same model; default: --plant without its "
                         "uncertainty: block)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of nominal,robust")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = RobustSettings(plant=args.plant, seeds=args.seeds, updates=args.updates, eval_states=args.eval_states,
                       monitor_episodes=args.monitor_episodes)
    plant = load_plant(s.plant)
    if not plant.uncertainty.declared:
        raise SystemExit(f"{plant.name} declares no uncertainty: the study compares certificates under it")
    nominal_plant = load_plant(args.nominal_plant) if args.nominal_plant else None
    same = nominal_plant is None or (np.allclose(nominal_plant.A, plant.A) and np.allclose(nominal_plant.B, plant.B)
                                     and np.array_equal(nominal_plant.x_max, plant.x_max)
                                     and np.array_equal(nominal_plant.x_min, plant.x_min))
    if not same:
        raise SystemExit(f"--nominal-plant {nominal_plant.name} is not the same model and limits as {plant.name}")
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - set(METHODS):
        raise SystemExit(f"--methods takes a subset of {','.join(METHODS)}")
    results = {}
    for method in methods:
        results[method] = aggregate([run_seed(method, seed, s, plant, progress=not args.no_progress,
                                              nominal_plant=nominal_plant) for seed in range(s.seeds)])
    print_table(f"robust study, {plant.name}, {s.seeds} seeds x {s.updates} updates (unsafe: independent check on "
                f"{len(TRUE_GAINS)} true plants x {len(SEQUENCES)} disturbance sequences)", results, [
                    ("updates", "updates"), ("accepted", "committed"), ("unsafe_committed", "unsafe"),
                    ("loss_initial", "loss_initial"), ("loss_final", "loss_final"), ("loss_change", "loss_change"),
                    ("accept_rate_clean", "acc_clean"), ("accept_rate_malicious", "acc_malicious"),
                    ("step_ms_median", "step_ms")])
    if "robust" not in results:
        write_json(args.json, {"experiment": "robust", "plant": plant.describe(), "settings": asdict(s), **results})
        return 0
    theta = np.asarray(results["robust"]["per_seed"][0]["theta"])
    mon = monitor_study(plant, theta, s)
    print("\nmodel monitor (the last robust policy of seed 0; delays in steps from the first):")
    for c in mon["cases"]:
        print(f"  {c['case']:6s} gain {c['gain']:.3f} disturbance x{c['disturbance_scale']:g} "
              f"{'monitor ' if c['monitor'] else 'no monitor'}: violations {c['violations']}, trips {c['trips']}, "
              f"detected {c['detected_episodes']}/{c['episodes']}, delay median {c['detection_delay_median']} "
              f"max {c['detection_delay_max']}, fallback steps {c['fallback_steps']}")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    write_json(args.json, {"experiment": "robust", "plant": plant.describe(), "settings": asdict(s), **results,
                           "monitor": mon})
    return 0
