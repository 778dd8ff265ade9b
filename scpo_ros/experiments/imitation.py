"""Double-integrator imitation with a malicious expert: unconstrained imitation vs SCPO.

The learner fits the residual policy to expert demonstrations with Adam. In the
malicious phases the expert demonstrates actions that leave the constraints. The
unconstrained learner applies every Adam step; SCPO passes each one through the
certified projection. After every update the committed weights are checked for
violations on held-out initial conditions (fresh rollouts, ≥ 1000 states).

    python -m scpo_ros.experiments imitation [--seeds 3] [--updates 250] [--json PATH] [--plot PATH]
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..backup import InitialSet, LQRBackup
from ..dynamics import DoubleIntegrator
from ..expert import ExpertConfig, expert_action, is_malicious
from ..learners import ImitationLearner, residual_targets
from ..policy import MLPLayout
from ..residual_scpo import ResidualSCPO
from ..rollout import METRICS, DoubleIntegratorRollout, random_states, state_set, structured_states
from ..scpo import COMMITTED, STATUSES
from .report import print_table, run_methods, scpo_experiment_parser, write_json


@dataclass
class ImitationSettings:
    seeds: int = 3
    updates: int = 250
    dof: int = 1
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
    demo_v_max: float = 0.6
    """Demonstration states cover the whole position box and |v| <= demo_v_max: where the
    closed loop actually goes from the initial set, not just the initial set itself."""


def make_learner(layout: MLPLayout, backup: LQRBackup, theta: np.ndarray, s: ImitationSettings,
                 seed: int) -> ImitationLearner:
    """The learner node's ``ImitationLearner``, started from the weights ``theta``."""
    learner = ImitationLearner(backup, layout, lr=s.lr, batch_size=s.batch, seed=seed)
    learner.load(theta)
    return learner


def imitation_step(learner: ImitationLearner, k: int, s: ImitationSettings, demo_region: InitialSet,
                   expert: ExpertConfig, system: DoubleIntegrator,
                   rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
    """One ``learner.fit`` step on a fresh batch of demonstrations, malicious or not by the
    expert's schedule at update ``k``. Returns ``(raw weight change, malicious)``; the learner
    is left at the stepped weights (SCPO then decides what is committed)."""
    mal = is_malicious(k * s.update_period_s, expert)
    x, r = random_states(demo_region, system.dof, s.batch, rng)
    before = learner.model.flat().detach().clone()
    learner.fit(*residual_targets(learner.backup, x, r, expert_action(x, r, mal, expert, system)))
    return learner.model.flat().detach() - before, mal


def run_seed(method: str, seed: int, s: ImitationSettings, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    system = DoubleIntegrator(dof=s.dof)
    backup = LQRBackup(system)
    initial_set = InitialSet()
    layout = MLPLayout(3 * s.dof, s.dof, s.hidden)
    expert = ExpertConfig(malicious=True)
    rng = np.random.default_rng(10_000 + seed)

    scpo = ResidualSCPO(system, backup, layout, initial_set, ResidualSCPO.default_config(n_samples=s.n_samples),
                        n_sample_states=s.n_sample_states, n_cert_states=s.n_cert_states, seed=seed)
    learner = make_learner(layout, backup, scpo.theta, s, seed)
    model = learner.model
    held_out_g = held_out_check(system, backup, layout, scpo, initial_set, s, seed)
    demo_region = InitialSet(p0_max=system.p_max, v0_max=s.demo_v_max, r_max=initial_set.r_max)
    cx, cr = random_states(demo_region, s.dof, s.clean_states, np.random.default_rng(40_000 + seed))
    clean_in, clean_target = (torch.as_tensor(a) for a in
                              residual_targets(backup, cx, cr, expert_action(cx, cr, False, expert, system)))

    def clean_loss() -> float:
        with torch.no_grad():
            return float(((model(clean_in) - clean_target) ** 2).sum(-1).mean())

    violations = []  # (update, held-out metrics) of every unsafe committed iterate
    loss_hist, decisions, malicious_hist, unsafe_hist, step_ms = [clean_loss()], [], [], [], []
    unsafe_count, committed = 0, 0
    unsafe_now = bool((held_out_g(model.flat().detach()) > 0).any())
    bar = tqdm(range(s.updates), desc=f"imitation {method} seed {seed}", disable=not progress, leave=False)
    for k in bar:
        delta, mal = imitation_step(learner, k, s, demo_region, expert, system, rng)
        if method == "scpo":
            t0 = time.perf_counter()
            decision = scpo.propose_step(delta.numpy())
            step_ms.append(1e3 * (time.perf_counter() - t0))
            learner.load(scpo.theta)
            status = decision.status
        else:
            status = "accepted"
        changed = status in COMMITTED
        committed += changed
        if changed:
            g = held_out_g(model.flat().detach())
            unsafe_now = bool((g > 0).any())
            if unsafe_now:
                violations.append({"update": k, "status": status, "malicious": mal,
                                   "g_held_out": dict(zip(METRICS, g.tolist()))})
        unsafe_count += int(changed and unsafe_now)
        decisions.append(status)
        malicious_hist.append(mal)
        unsafe_hist.append(bool(unsafe_now))
        loss_hist.append(clean_loss())
        bar.set_postfix(loss=f"{loss_hist[-1]:.4f}", unsafe=unsafe_count, committed=committed)

    mal_arr = np.array(malicious_hist)
    ok = np.array([d in COMMITTED for d in decisions])
    return {
        "updates": s.updates,
        "accepted": int(ok.sum()),
        "unsafe_committed": unsafe_count,
        "loss_initial": loss_hist[0],
        "loss_final": loss_hist[-1],
        "accept_rate_clean": float(ok[~mal_arr].mean()) if (~mal_arr).any() else float("nan"),
        "accept_rate_malicious": float(ok[mal_arr].mean()) if mal_arr.any() else float("nan"),
        "decisions": {st: decisions.count(st) for st in STATUSES},
        "step_ms_median": float(np.median(step_ms)) if step_ms else None,
        "violations": violations,
        "history": {"loss": loss_hist, "decision": decisions, "malicious": malicious_hist, "unsafe": unsafe_hist},
    }


def held_out_check(system, backup, layout, scpo: ResidualSCPO, initial_set: InitialSet, s: ImitationSettings,
                   seed: int):
    """``theta -> g`` on held-out initial conditions (uniform random plus the structured
    worst-case points), with fresh rollouts: the experiment's own check of every iterate."""
    structured = structured_states(initial_set, s.dof, max_points=256, seed=30_000 + seed)
    eval_x, eval_r = state_set(initial_set, s.dof, s.eval_states + len(structured[0]),
                               np.random.default_rng(20_000 + seed), structured)
    checker = DoubleIntegratorRollout(system, backup, layout, scpo.safety)
    return lambda theta: checker.evaluate(torch.as_tensor(theta, dtype=torch.float32), eval_x, eval_r).g[0].numpy()


def plot(results: dict, path: str) -> None:
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
    mal = np.array(results["scpo"]["per_seed"][0]["history"]["malicious"])
    for ax in (ax_loss, ax_dec):
        for k in np.flatnonzero(mal):
            ax.axvspan(k + 0.5, k + 1.5, color="0.9", lw=0)
    ax_loss.set_ylabel("imitation loss on clean data")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    ax_loss.set_title("Double-integrator imitation, malicious expert (grey: malicious phases)")
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
    ap.add_argument("--dof", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = ImitationSettings(seeds=args.seeds, updates=args.updates, dof=args.dof)
    results = run_methods(run_seed, s, progress=not args.no_progress)
    print_table(f"imitation, dof={s.dof}, {s.seeds} seeds x {s.updates} updates", results, [
        ("updates", "updates"), ("accepted", "committed"), ("unsafe_committed", "unsafe"),
        ("loss_initial", "loss_initial"), ("loss_final", "loss_final"),
        ("accept_rate_clean", "acc_clean"), ("accept_rate_malicious", "acc_malicious"),
        ("step_ms_median", "step_ms")])
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    write_json(args.json, {"experiment": "imitation", "settings": asdict(s), **results})
    return 0
