"""One constrained task, every method: C-TRPO, TRPO-Lagrangian, TRPO, SCPO, SE-RL safeguard.

Task (default: the double integrator, one axis): track a reference held for a 5 s episode
(100 steps); reward ``-(|p - r|² + 0.1 u²)·dt`` (the return is minus the SCPO task cost); cost 1
for every step outside the box ``|p| <= 1``, ``|v| <= v_max`` (default 0.5: a speed limit the
certified LQR backup keeps, with margin, and a fast tracker breaks); cost limit ``b`` on
the expected episode cost. Initial states and references from the certified region.
``--env pendulum`` is the SafeGBPO pendulum (its own reward; the RL methods only); any other
``--env`` is a plant file (a shipped name or a path, ``plant.load_plant``): the same tracking
task on that plant (``envs.VecPlantEnv``), every method included.

Same budget for every method: ``epochs`` epochs, each executing ``num_envs`` whole
episodes with the method's *current deployed* policy (the stochastic policy for the RL
learners, the committed certified policy for SCPO, the safeguarded policy for SE-RL).
Every executed episode counts in the violation and regret columns. SCPO additionally
simulates rollouts to certify its steps (model-based; not executed, not counted).

Each method is one entry of ``RUNNERS``: ``runner(seed, settings) -> RunResult``.

    python -m scpo_ros.experiments compare [--seeds 3] [--epochs 60] [--methods c_trpo,trpo]
        [--json PATH] [--plot PATH] [--env double_integrator|pendulum|PLANT]

Columns: ``return`` / ``task_cost`` of the final deployed policy (deterministic, on a fixed
evaluation set of initial states), its ``eval_cost`` (mean episode cost) and
``eval_unsafe`` (fraction of evaluation episodes with any unsafe step); ``train_cost``:
mean executed episode cost over the last 10 epochs; ``regret``: Σ over epochs of
``max(EpCost - b, 0)``; ``viol_eps``: executed training episodes with an unsafe step (per
seed, out of ``episodes``); ``wall_s`` per seed.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from ..backup import LQRBackup
from ..ctrpo import CTRPOConfig, CTRPOLearner, evaluate_policy, train
from ..dynamics import DoubleIntegrator, Pendulum
from ..envs import VecDoubleIntegrator, VecPendulum, VecPlantEnv
from ..expert import Expert, ExpertConfig
from ..plant import Plant, double_integrator_plant, load_plant
from ..policy import MLPLayout, ResidualMLP
from ..residual_scpo import ResidualSCPO
from ..safeguard.invariant_set import safe_set_for
from ..safeguard.projection import project_batch
from ..scpo import COMMITTED
from .imitation import ImitationSettings, demo_region, envelope_safe_set, imitation_step, make_learner
from .report import aggregate, print_table, write_json


@dataclass(frozen=True)
class CompareSettings:
    env: str = "double_integrator"
    """``double_integrator`` (the bridge's, with ``v_max``), ``pendulum`` or a plant file."""
    seeds: int = 3
    epochs: int = 60
    num_envs: int = 32
    episode_length: int = 100
    v_max: float = 0.5
    """Speed limit of the double-integrator task (the constraint that binds; that task only)."""
    cost_limit: float = 2.0
    """b, in unsafe steps per episode."""
    hidden: tuple[int, ...] = (64, 64)
    """Policy and critics of the RL learners (the official C-TRPO default)."""
    scpo_hidden: tuple[int, ...] = (32, 32)
    """Residual network of the SCPO runners (the SCPO default; its sampling cost grows with it)."""
    scpo_updates_per_epoch: int = 2
    """SCPO imitation: projected Adam steps between two deployment epochs."""
    eval_episodes: int = 1024
    eval_seed: int = 12345


@dataclass
class RunResult:
    curve: list[dict]
    """Per epoch: env_steps, ep_return, ep_cost, violating_episodes, episodes."""
    final: dict
    """Deterministic evaluation of the final deployed policy (return, cost, unsafe_episodes, episodes)."""
    wall_s: float
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------ shared pieces

def di_system(s: CompareSettings) -> DoubleIntegrator:
    return DoubleIntegrator(dof=1, v_max=s.v_max)


def task_plant(s: CompareSettings) -> Plant:
    """The plant of the task: the bridge's double integrator with the task's ``v_max`` (the
    parameter tables' backup and certified region), or the plant file ``s.env``."""
    if s.env == "double_integrator":
        d = di_system(s)
        return double_integrator_plant(d.dof, d.dt, d.p_max, d.v_max, d.u_max)
    if s.env == "pendulum":
        raise ValueError("the pendulum task has no plant of its own here (its env: envs.VecPendulum)")
    return load_plant(s.env)


def make_env(s: CompareSettings, seed: int, num_envs: int | None = None, dtype: torch.dtype = torch.float32):
    n = num_envs or s.num_envs
    if s.env == "double_integrator":
        return VecDoubleIntegrator(n, system=di_system(s), episode_length=s.episode_length, seed=seed, dtype=dtype)
    if s.env == "pendulum":
        return VecPendulum(n, system=Pendulum(), episode_length=s.episode_length, seed=seed)
    return VecPlantEnv(task_plant(s), n, episode_length=s.episode_length, seed=seed, dtype=dtype)


def final_evaluation(s: CompareSettings, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """The same fixed evaluation episodes for every method and seed."""
    env = make_env(s, seed=s.eval_seed, num_envs=s.eval_episodes)
    return evaluate_policy(env, act_fn, obs=env.reset())


def deploy_epoch(env, act_fn) -> dict:
    """Execute one epoch (``num_envs`` whole episodes) with a deterministic deployed policy."""
    ev = evaluate_policy(env, act_fn, obs=env.reset())
    return {"ep_return": ev["return"], "ep_cost": ev["cost"], "violating_episodes": ev["unsafe_episodes"],
            "episodes": ev["episodes"]}


def _curve_from_history(history) -> list[dict]:
    return [{"env_steps": h.env_steps, "ep_return": h.ep_return, "ep_cost": h.ep_cost,
             "violating_episodes": h.violating_episodes, "episodes": h.episodes} for h in history]


def _base_gain(env):
    return env.backup_gain()


# ------------------------------------------------------------------ runners: C-TRPO, TRPO-Lag, TRPO

def rl_runner(algorithm: str) -> Callable[[int, CompareSettings], RunResult]:
    def run(seed: int, s: CompareSettings) -> RunResult:
        torch.manual_seed(seed)
        env = make_env(s, seed)
        cfg = CTRPOConfig(algorithm=algorithm, cost_limit=s.cost_limit, hidden=s.hidden)
        t0 = time.perf_counter()
        res = train(env, cfg, s.epochs, seed=seed, base_gain=_base_gain(env))
        wall = time.perf_counter() - t0
        learner = res.learner
        final = final_evaluation(s, lambda o: learner.act(o, deterministic=True)[0])
        hist = res.history
        return RunResult(_curve_from_history(hist), final, wall, extra={
            "recovery_epochs": int(sum(h.recovering for h in hist)),
            "final_lagrange": float(hist[-1].lagrange),
            "rejected_steps": int(sum(h.accepted_at == 0 for h in hist))})
    return run


# ------------------------------------------------------------------ runners: SCPO

def _scpo_parts(s: CompareSettings, seed: int):
    """The SCPO client of the imitation experiment, with its settings and its safe set (robust
    to one late command), on this task's plant."""
    plant = task_plant(s)
    backup = LQRBackup(plant)
    layout = MLPLayout(plant.n + plant.nr, plant.m, s.scpo_hidden)
    im = ImitationSettings(plant=s.env)
    scpo = ResidualSCPO(plant, backup, layout, ResidualSCPO.default_config(n_samples=im.n_samples),
                        n_sample_states=im.n_sample_states, n_cert_states=im.n_cert_states, seed=seed,
                        safe_set=envelope_safe_set(plant, backup))
    return plant, backup, layout, im, scpo


def _committed_policy(env, layout, theta):
    """Deterministic deployed policy: backup + residual with the committed weights (the env
    adds the backup's constant part, ``action_offset``, to every action)."""
    net = ResidualMLP(layout)
    net.load_flat(theta)
    W = env.backup_gain()

    @torch.no_grad()
    def act(obs):
        return obs @ W.T + net(obs)
    return act


def run_scpo_imitation(seed: int, s: CompareSettings) -> RunResult:
    """SCPO imitation of the malicious expert (as in ``experiments.imitation``); the committed
    policy is deployed for one epoch of episodes after every ``scpo_updates_per_epoch`` steps."""
    torch.manual_seed(seed)
    plant, backup, layout, im, scpo = _scpo_parts(s, seed)
    env = make_env(s, seed)
    expert = Expert(plant, ExpertConfig(malicious=True))
    demos = demo_region(plant, im.demo_spread)
    rng = np.random.default_rng(10_000 + seed)
    learner = make_learner(layout, backup, scpo.theta, im, seed)
    curve, statuses, k = [], [], 0
    t0 = time.perf_counter()
    for epoch in range(s.epochs):
        for _ in range(s.scpo_updates_per_epoch):
            delta, _ = imitation_step(learner, k, im, demos, expert, rng)
            decision = scpo.propose_step(delta.numpy())
            learner.load(scpo.theta)
            statuses.append(decision.status)
            k += 1
        row = deploy_epoch(env, _committed_policy(env, layout, scpo.theta))
        row["env_steps"] = (epoch + 1) * env.num_envs * env.episode_length
        curve.append(row)
    wall = time.perf_counter() - t0
    final = final_evaluation(s, _committed_policy(env, layout, scpo.theta))
    return RunResult(curve, final, wall, extra={
        "scpo_steps": len(statuses), "committed": sum(st in COMMITTED for st in statuses)})


def run_scpo_rl(seed: int, s: CompareSettings) -> RunResult:
    """TRPO proposes, SCPO commits: after every TRPO update the mean network's new weights go
    through ``ResidualSCPO.propose_weights``; the learner continues from what was
    committed. Exploration noise (the Gaussian policy's σ) is executed on top of the
    certified mean: it is outside the SCPO certificate and its violations are counted."""
    torch.manual_seed(seed)
    plant, backup, layout, im, scpo = _scpo_parts(s, seed)
    env = make_env(s, seed)
    cfg = CTRPOConfig(algorithm="trpo", cost_limit=s.cost_limit, hidden=s.scpo_hidden)
    learner = CTRPOLearner(env.obs_dim, env.act_dim, cfg, base_gain=env.backup_gain(), seed=seed)
    learner.load_mean_weights(scpo.theta)
    statuses = []

    def through_scpo(lrn: CTRPOLearner, info: dict) -> None:
        decision = scpo.propose_weights(lrn.mean_weights())
        statuses.append(decision.status)
        lrn.load_mean_weights(scpo.theta)

    t0 = time.perf_counter()
    res = train(env, cfg, s.epochs, learner=learner, after_update=through_scpo)
    wall = time.perf_counter() - t0
    final = final_evaluation(s, _committed_policy(env, layout, scpo.theta))
    return RunResult(_curve_from_history(res.history), final, wall, extra={
        "scpo_steps": len(statuses), "committed": sum(st in COMMITTED for st in statuses)})


# ------------------------------------------------------------------ runner: SE-RL (the safeguard package)

class SafeguardedEnv:
    """SE-RL: the action projection ``Φ(x, u)`` is part of the environment.

    The learner acts with raw actions ``u`` (its log-probabilities, critics and updates
    all see ``u``); the plant receives ``Φ(x, u)`` from ``scpo_ros.safeguard``'s batched
    projection onto the plant's safe action set (``safe_set_for(plant, late_commands=0)``:
    the maximal control-invariant set of the double integrator). The reward is penalised by
    ``penalty·|u - Φ(x, u)|²·dt`` (the SE-RL mitigation of arXiv 2509.12833). States outside
    the invariant set (none are expected: the certified region lies inside it) get the backup
    action instead, clipped to the input box. The plant runs in float64: the projection puts
    the next state *on* the invariant set's boundary, and a float32 step lands up to ~1e-7
    outside it, beyond the projector's 1e-9 membership slack. Observations go to the learner
    in float32. Actions are absolute here (the env's ``action_offset`` added before the
    projection and taken off again for the env, which adds it back).
    """

    def __init__(self, env: VecPlantEnv, penalty: float = 1.0):
        self.env, self.penalty = env, float(penalty)
        self.safe_set = safe_set_for(env.plant, env.backup, late_commands=0)
        self.obs_dim, self.act_dim, self.num_envs = env.obs_dim, env.act_dim, env.num_envs
        self.episode_length, self.action_limit = env.episode_length, env.action_limit
        self._backup_gain = env.backup_gain()
        self.interventions = 0
        self.fallbacks = 0

    def reset(self):
        return self.env.reset().float()

    def step(self, action):
        env = self.env
        u = torch.nan_to_num(torch.as_tensor(action, dtype=env.dtype)).reshape(self.num_envs, self.act_dim)
        u = u + env.action_offset
        x = env.x.double().numpy()
        safe, _, feasible = project_batch(self.safe_set, x, torch.clamp(u.double(), env.u_min.double(),
                                                                       env.u_max.double()).numpy())
        safe = torch.as_tensor(safe, dtype=env.dtype)
        feasible = torch.as_tensor(np.asarray(feasible, dtype=bool))
        if not bool(feasible.all()):
            obs = torch.cat([env.x, env.r], dim=-1)
            fallback = torch.clamp(obs @ self._backup_gain.T + env.action_offset, env.u_min, env.u_max)
            safe = torch.where(feasible.unsqueeze(-1), safe, fallback)
            self.fallbacks += int((~feasible).sum())
        gap = ((u - safe) ** 2).sum(-1)
        self.interventions += int((gap > 1e-12).sum())
        result = env.step(safe - env.action_offset)
        result.reward = (result.reward - self.penalty * gap * env.plant.dt).float()
        result.cost = result.cost.float()
        result.obs, result.final_obs = result.obs.float(), result.final_obs.float()
        return result


def run_se_rl(seed: int, s: CompareSettings) -> RunResult:
    """TRPO (the same learner as the other RL rows) behind the SE-RL safeguard."""
    torch.manual_seed(seed)
    base = make_env(s, seed, dtype=torch.float64)
    env = SafeguardedEnv(base)
    base_gain = base.backup_gain().float()
    cfg = CTRPOConfig(algorithm="trpo", cost_limit=s.cost_limit, hidden=s.hidden)
    t0 = time.perf_counter()
    res = train(env, cfg, s.epochs, seed=seed, base_gain=base_gain)
    wall = time.perf_counter() - t0
    # Evaluated without the penalty: the return is the task reward alone, as for every other row.
    eval_env = SafeguardedEnv(make_env(s, seed=s.eval_seed, num_envs=s.eval_episodes, dtype=torch.float64),
                              penalty=0.0)
    learner = res.learner
    final = evaluate_policy(eval_env, lambda o: learner.act(o, deterministic=True)[0], obs=eval_env.reset())
    return RunResult(_curve_from_history(res.history), final, wall, extra={
        "interventions": env.interventions, "fallbacks": env.fallbacks})


# ------------------------------------------------------------------ the table of runners

@dataclass(frozen=True)
class Method:
    runner: Callable[[int, CompareSettings], RunResult]
    envs: tuple[str, ...] | None = None
    """Tasks the method is defined on (None: every task). The SCPO and SE-RL runners need a
    ``Plant`` (every task but the pendulum's, whose env has its own reward)."""


_PLANT_TASKS = ("double_integrator", "plant file")


def task_kind(env: str) -> str:
    """``double_integrator``, ``pendulum`` or ``plant file`` (what ``Method.envs`` lists)."""
    return env if env in ("double_integrator", "pendulum") else "plant file"


RUNNERS: dict[str, Method] = {
    "c_trpo": Method(rl_runner("c_trpo")),
    "trpo_lag": Method(rl_runner("trpo_lag")),
    "trpo": Method(rl_runner("trpo")),
    "scpo_imitation": Method(run_scpo_imitation, _PLANT_TASKS),
    "scpo_rl": Method(run_scpo_rl, _PLANT_TASKS),
    "se_rl": Method(run_se_rl, _PLANT_TASKS),
}


def available(name: str, s: CompareSettings) -> tuple[bool, str]:
    envs = RUNNERS[name].envs
    if envs is not None and task_kind(s.env) not in envs:
        return False, f"not defined on {s.env}"
    return True, ""


def summarize(run: RunResult, s: CompareSettings) -> dict:
    costs = np.array([c["ep_cost"] for c in run.curve])
    return {
        "return": run.final["return"],
        "task_cost": -run.final["return"],
        "eval_cost": run.final["cost"],
        "eval_unsafe": run.final["unsafe_episodes"] / max(run.final["episodes"], 1),
        "train_cost": float(np.nanmean(costs[-10:])),
        "regret": float(np.clip(np.nan_to_num(costs) - s.cost_limit, 0.0, None).sum()),
        "viol_eps": int(sum(c["violating_episodes"] for c in run.curve)),
        "episodes": int(sum(c["episodes"] for c in run.curve)),
        "env_steps": int(run.curve[-1]["env_steps"]) if run.curve else 0,
        "wall_s": run.wall_s,
    }


COLUMNS = [("return", "return"), ("task_cost", "task_cost"), ("eval_cost", "eval_cost"),
           ("eval_unsafe", "eval_unsafe"), ("train_cost", "train_cost"), ("regret", "regret"),
           ("viol_eps", "viol_eps/seed"), ("episodes", "episodes/seed"), ("wall_s", "wall_s")]


def plot(results: dict, s: CompareSettings, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, res in results.items():
        curves = res["curves"]
        x = np.array([c["env_steps"] for c in curves[0]]) / 1e3
        for ax, key, cumulative in ((axes[0], "ep_return", False), (axes[1], "ep_cost", False),
                                    (axes[2], "violating_episodes", True)):
            y = np.array([[c[key] for c in cur] for cur in curves], dtype=float)
            if cumulative:
                y = np.cumsum(y, axis=1)
            line, = ax.plot(x, np.nanmean(y, 0), label=name)
            ax.fill_between(x, np.nanmin(y, 0), np.nanmax(y, 0), color=line.get_color(), alpha=0.15, lw=0)
    axes[1].axhline(s.cost_limit, color="k", ls="--", lw=1, label="cost limit b")
    axes[0].set_ylabel("episode return (executed)")
    axes[1].set_ylabel("episode cost (executed)")
    axes[2].set_ylabel("episodes with a violation (cumulative)")
    for ax in axes:
        ax.set_xlabel("environment steps [k]")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{s.env}: mean of {s.seeds} seeds (band: min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scpo_ros.experiments compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = CompareSettings()
    ap.add_argument("--methods", default=",".join(RUNNERS), help="comma-separated subset of %(default)s")
    ap.add_argument("--env", default=d.env, help="double_integrator (default), pendulum, or a plant file: a "
                                                 "shipped plant's name or a path")
    ap.add_argument("--seeds", type=int, default=d.seeds)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--num-envs", type=int, default=d.num_envs)
    ap.add_argument("--cost-limit", type=float, default=d.cost_limit)
    ap.add_argument("--v-max", type=float, default=d.v_max)
    ap.add_argument("--eval-episodes", type=int, default=d.eval_episodes)
    ap.add_argument("--json", help="write the table, per-seed metrics and curves here")
    ap.add_argument("--plot", default="compare.png", help="PNG learning curves ('' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    s = replace(d, env=args.env, seeds=args.seeds, epochs=args.epochs, num_envs=args.num_envs,
                cost_limit=args.cost_limit, v_max=args.v_max, eval_episodes=args.eval_episodes)
    if task_kind(s.env) == "plant file":
        try:
            load_plant(s.env)            # a bad file: its PlantError (naming the key) before any work
        except ValueError as exc:
            ap.error(str(exc))
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in RUNNERS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(RUNNERS)}")

    results, skipped = {}, {}
    for name in names:
        ok, why = available(name, s)
        if not ok:
            skipped[name] = why
            print(f"skipping {name}: {why}")
            continue
        per_seed, curves = [], []
        for seed in range(s.seeds):
            run = RUNNERS[name].runner(seed, s)
            row = summarize(run, s)
            row.update({k: v for k, v in run.extra.items() if isinstance(v, (int, float))})
            per_seed.append(row)
            curves.append(run.curve)
            print(f"{name} seed {seed}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in row.items()), flush=True)
        results[name] = aggregate(per_seed)
        results[name]["curves"] = curves
    if not results:
        return 1
    title = (f"{s.env}: {s.seeds} seeds x {s.epochs} epochs x {s.num_envs} episodes of {s.episode_length} steps, "
             f"cost limit b = {s.cost_limit:g}" + (f", v_max = {s.v_max:g}" if s.env == "double_integrator" else ""))
    table = print_table(title, results, COLUMNS)
    if args.plot:
        plot(results, s, args.plot)
        print(f"learning curves: {args.plot}")
    write_json(args.json, {"settings": asdict(s), "table": table, "skipped": skipped, "results": results})
    return 0
