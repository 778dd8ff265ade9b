"""Imitation with a malicious expert on any plant: unconstrained imitation vs SCPO.

The learner fits the residual policy to expert demonstrations (``expert.Expert``: the
plant's fast LQR tracker, malicious in phases) with Adam. In the malicious phases the expert
demonstrates actions that leave the constraints. The unconstrained learner applies every
Adam step; SCPO passes each one through the certified projection. After every update the
committed weights are checked for violations on held-out initial conditions of the certified
region (fresh rollouts, ≥ 1000 states: uniform random plus the structured worst cases),
with the certificate's own metrics (every constraint row, the Lyapunov decrease, the safe
set), so ``unsafe`` counts committed iterates that break any of them on any held-out state.

Everything comes from the plant file (``--plant NAME|PATH``, default the double integrator):
dimensions, limits, backup, certified region, the expert's gains and references.

    python -m scpo_ros.experiments imitation [--plant NAME|PATH] [--seeds 3] [--updates 250]
        [--json PATH] [--plot PATH]
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..backup import LQRBackup
from ..expert import Expert, ExpertConfig, is_malicious
from ..learners import ImitationLearner, residual_targets
from ..plant import Plant, Region, load_plant
from ..policy import MLPLayout
from ..residual_scpo import ResidualSCPO
from ..rollout import METRICS, PlantRollout, random_states, state_set, structured_states
from ..scpo import COMMITTED, STATUSES
from .report import print_table, run_methods, scpo_experiment_parser, shade_updates, write_json


@dataclass
class ImitationSettings:
    plant: str = "double_integrator"
    """A shipped plant's name or a plant file's path (``plant.load_plant``)."""
    seeds: int = 3
    updates: int = 250
    hidden: tuple[int, ...] = (32, 32)
    lr: float = 1e-3
    batch: int = 256
    update_period_s: float = 0.2
    """Expert time per update: with the expert's 20 s cycle, 50 clean then 50 malicious updates."""
    eval_states: int = 1024
    clean_states: int = 4096
    n_samples: int = 64
    n_sample_states: int = 256
    n_cert_states: int = 1024
    demo_spread: float = 0.5
    """Demonstration states fill the certified region widened by this fraction of the way to
    the state limits (by this fraction of its half-width where a state is unbounded): where
    the closed loop actually goes from the region, not just the region itself (the double
    integrator: |p| <= 0.9, |v| <= 0.6)."""


def demo_region(plant: Plant, spread: float) -> Region:
    """The box the demonstrations are drawn from (``ImitationSettings.demo_spread``); references
    stay in the certified reference box."""
    reg = plant.region
    half = (reg.x_max - reg.x_min) / 2.0
    lo = np.where(np.isfinite(plant.x_min), reg.x_min + spread * (plant.x_min - reg.x_min), reg.x_min - spread * half)
    hi = np.where(np.isfinite(plant.x_max), reg.x_max + spread * (plant.x_max - reg.x_max), reg.x_max + spread * half)
    return Region(lo, hi, reg.r_min, reg.r_max)


def make_learner(layout: MLPLayout, backup: LQRBackup, theta: np.ndarray, s: ImitationSettings,
                 seed: int) -> ImitationLearner:
    """The learner node's ``ImitationLearner``, started from the weights ``theta``."""
    learner = ImitationLearner(backup, layout, lr=s.lr, batch_size=s.batch, seed=seed)
    learner.load(theta)
    return learner


def imitation_step(learner: ImitationLearner, k: int, s: ImitationSettings, demos: Region, expert: Expert,
                   rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
    """One ``learner.fit`` step on a fresh batch of demonstrations drawn from ``demos``,
    malicious or not by the expert's schedule at update ``k``. Returns ``(raw weight change,
    malicious)``; the learner is left at the stepped weights (SCPO then decides what is
    committed)."""
    mal = is_malicious(k * s.update_period_s, expert.cfg)
    x, r = random_states(demos, s.batch, rng)
    before = learner.model.flat().detach().clone()
    learner.fit(*residual_targets(learner.backup, x, r, expert.action(x, r, mal)))
    return learner.model.flat().detach() - before, mal


def envelope_safe_set(plant: Plant, backup: LQRBackup):
    """The safe set the certificate's ``safe_set`` metric uses (``rollout.PlantRollout``'s
    default): robust to one late command, or the nominal set of a model plant whose set
    cannot absorb one. Built once per run and shared by SCPO and the held-out check."""
    from ..safeguard.invariant_set import safe_set_at_most
    return safe_set_at_most(plant, backup, late_commands=1)[0]


class Run:
    """What one seed of one method works with: the plant, its backup, SCPO, the learner, the
    expert, the held-out check and the clean-data loss."""

    def __init__(self, seed: int, s: ImitationSettings, plant: Plant, safe_set):
        self.plant, self.s = plant, s
        self.backup = backup = LQRBackup(plant)
        self.layout = MLPLayout(plant.n + plant.nr, plant.m, s.hidden)
        self.expert = Expert(plant, ExpertConfig(malicious=True))
        self.rng = np.random.default_rng(10_000 + seed)
        self.scpo = ResidualSCPO(plant, backup, self.layout, ResidualSCPO.default_config(n_samples=s.n_samples),
                                 n_sample_states=s.n_sample_states, n_cert_states=s.n_cert_states, seed=seed,
                                 safe_set=safe_set)
        self.learner = make_learner(self.layout, backup, self.scpo.theta, s, seed)
        self.held_out_g = held_out_check(plant, backup, self.layout, self.scpo, safe_set, s, seed)
        self.demos = demo_region(plant, s.demo_spread)
        cx, cr = random_states(self.demos, s.clean_states, np.random.default_rng(40_000 + seed))
        self.clean_in, self.clean_target = (torch.as_tensor(a) for a in
                                            residual_targets(backup, cx, cr, self.expert.action(cx, cr, False)))

    def clean_loss(self) -> float:
        with torch.no_grad():
            return float(((self.learner.model(self.clean_in) - self.clean_target) ** 2).sum(-1).mean())

    def unsafe(self) -> tuple[bool, np.ndarray]:
        g = self.held_out_g(self.learner.model.flat().detach())
        return bool((g > 0).any()), g


def run_seed(method: str, seed: int, s: ImitationSettings, progress: bool = True, plant: Plant | None = None,
             safe_set=None) -> dict:
    torch.manual_seed(seed)
    plant = plant if plant is not None else load_plant(s.plant)
    if safe_set is None:
        safe_set = envelope_safe_set(plant, LQRBackup(plant))
    run = Run(seed, s, plant, safe_set)
    violations = []  # (update, held-out metrics) of every unsafe committed iterate
    loss_hist, decisions, malicious_hist, unsafe_hist, step_ms = [run.clean_loss()], [], [], [], []
    unsafe_count, committed = 0, 0
    unsafe_now = run.unsafe()[0]
    bar = tqdm(range(s.updates), desc=f"imitation {plant.name} {method} seed {seed}", disable=not progress,
               leave=False)
    for k in bar:
        delta, mal = imitation_step(run.learner, k, s, run.demos, run.expert, run.rng)
        if method == "scpo":
            t0 = time.perf_counter()
            decision = run.scpo.propose_step(delta.numpy())
            step_ms.append(1e3 * (time.perf_counter() - t0))
            run.learner.load(run.scpo.theta)
            status = decision.status
        else:
            status = "accepted"
        changed = status in COMMITTED
        committed += changed
        if changed:
            unsafe_now, g = run.unsafe()
            if unsafe_now:
                violations.append({"update": k, "status": status, "malicious": mal,
                                   "g_held_out": dict(zip(METRICS, g.tolist()))})
        unsafe_count += int(changed and unsafe_now)
        decisions.append(status)
        malicious_hist.append(mal)
        unsafe_hist.append(bool(unsafe_now))
        loss_hist.append(run.clean_loss())
        bar.set_postfix(loss=f"{loss_hist[-1]:.4f}", unsafe=unsafe_count, committed=committed)
    return summary(s, loss_hist, decisions, malicious_hist, unsafe_hist, unsafe_count, step_ms, violations)


def summary(s: ImitationSettings, loss_hist, decisions, malicious_hist, unsafe_hist, unsafe_count, step_ms,
            violations) -> dict:
    """The per-seed record: counts, losses, commit rates per phase, the histories."""
    mal_arr = np.array(malicious_hist, dtype=bool)
    ok = np.array([d in COMMITTED for d in decisions], dtype=bool)
    return {
        "updates": s.updates,
        "accepted": int(ok.sum()),
        "unsafe_committed": unsafe_count,
        "loss_initial": loss_hist[0],
        "loss_final": loss_hist[-1],
        "loss_change": loss_hist[-1] / loss_hist[0] - 1.0 if loss_hist[0] > 0 else float("nan"),
        "accept_rate_clean": float(ok[~mal_arr].mean()) if (~mal_arr).any() else float("nan"),
        "accept_rate_malicious": float(ok[mal_arr].mean()) if mal_arr.any() else float("nan"),
        "decisions": {st: decisions.count(st) for st in STATUSES},
        "step_ms_median": float(np.median(step_ms)) if step_ms else None,
        "violations": violations,
        "history": {"loss": loss_hist, "decision": decisions, "malicious": malicious_hist, "unsafe": unsafe_hist},
    }


def held_out_check(plant: Plant, backup: LQRBackup, layout: MLPLayout, scpo: ResidualSCPO, safe_set,
                   s: ImitationSettings, seed: int):
    """``theta -> g`` on held-out initial conditions of the certified region (uniform random
    plus the structured worst-case points, seeds apart from SCPO's), with fresh rollouts of
    the certificate's metrics: the experiment's own check of every iterate."""
    structured = structured_states(plant, max_points=256, seed=30_000 + seed)
    eval_x, eval_r = state_set(plant, s.eval_states + len(structured[0]), np.random.default_rng(20_000 + seed),
                               structured)
    checker = PlantRollout(plant, backup, layout, scpo.safety, safe_rows=safe_set)
    return lambda theta: checker.evaluate(torch.as_tensor(theta, dtype=torch.float32), eval_x, eval_r).g[0].numpy()


def plot(results: dict, path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dec) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=[2, 1])
    colors = {"scpo": "tab:blue", "unconstrained": "tab:red"}
    for method, res in results.items():
        losses = np.array([p["history"]["loss"] for p in res["per_seed"]])
        ax_loss.plot(losses.mean(0), color=colors[method], label=f"{method} (clean-data loss, mean of seeds)")
        for i, p in enumerate(res["per_seed"]):
            unsafe = np.flatnonzero(p["history"]["unsafe"])
            ax_loss.plot(unsafe + 1, losses[i][unsafe + 1], "x", color=colors[method], ms=3,
                         label=f"{method}: unsafe iterate" if i == 0 and len(unsafe) else None)
    shade_updates((ax_loss, ax_dec), results["scpo"]["per_seed"][0]["history"]["malicious"])
    ax_loss.set_ylabel("imitation loss on clean data")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    ax_loss.set_title(f"{title}: imitation, malicious expert (grey: malicious phases)")
    levels = {st: i for i, st in enumerate(reversed(STATUSES))}
    for i, p in enumerate(results["scpo"]["per_seed"]):
        y = [levels[d] + 0.12 * (i - 1) for d in p["history"]["decision"]]
        ax_dec.plot(np.arange(1, len(y) + 1), y, ".", ms=3, label=f"seed {i}")
    ax_dec.set_yticks(list(levels.values()), list(levels.keys()))
    ax_dec.set_xlabel("update")
    ax_dec.set_title("SCPO decisions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = scpo_experiment_parser("imitation", __doc__)
    ap.add_argument("--plant", default="double_integrator", help="a shipped plant's name or a plant file's path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = ImitationSettings(plant=args.plant, seeds=args.seeds, updates=args.updates)
    plant = load_plant(s.plant)              # a bad file: PlantError naming the key, before any work
    t0 = time.perf_counter()
    safe_set = envelope_safe_set(plant, LQRBackup(plant))
    print(f"plant {plant.name}: n={plant.n} m={plant.m} nr={plant.nr}, safe set {getattr(safe_set, 'name', '?')} "
          f"built in {time.perf_counter() - t0:.2f} s")
    results = run_methods(lambda *a, **k: run_seed(*a, plant=plant, safe_set=safe_set, **k), s,
                          progress=not args.no_progress)
    print_table(f"imitation, {plant.name}, {s.seeds} seeds x {s.updates} updates", results, [
        ("updates", "updates"), ("accepted", "committed"), ("unsafe_committed", "unsafe"),
        ("loss_initial", "loss_initial"), ("loss_final", "loss_final"), ("loss_change", "loss_change"),
        ("accept_rate_clean", "acc_clean"), ("accept_rate_malicious", "acc_malicious"),
        ("step_ms_median", "step_ms")])
    if args.plot:
        plot(results, args.plot, plant.name)
        print(f"plot: {args.plot}")
    write_json(args.json, {"experiment": "imitation", "plant": plant.describe(), "settings": asdict(s), **results})
    return 0
