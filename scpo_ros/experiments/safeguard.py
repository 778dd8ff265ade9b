"""SE-RL vs SP-RL: where to put the action-projection safeguard (arXiv 2509.12833).

One actor-critic algorithm (DDPG: deterministic actor, Q critic, target networks,
Gaussian exploration) trained four ways on the double integrator (reference
tracking) and the pendulum (hold upright), every run with the same safeguard
``Φ(x, u)``, the exact projection onto ``U_safe(x)`` of the control-invariant set:

- ``SE``: the safeguard is part of the environment. The actor's raw action ``u`` is
  what the critic sees; the plant gets ``Φ(x, u)``.
- ``SP``: the safeguard is the policy's last layer. The critic sees the safe action
  ``ũ = Φ(x, u)``; the actor's gradient flows through ``∂ũ/∂u`` (rank-deficient when
  constraints are active: action aliasing).
- ``SE+pen``: SE with the reward penalised by ``w ||u - Φ(x, u)||²``.
- ``SP+pen``: SP plus a penalty critic ``Q_pen(s, u)`` of the same penalty, trained on
  the raw action and added to the actor loss without back-propagating through ``Φ``.

Exploration is identical in all four (raw action = actor + noise, plant gets its
projection), so the runs differ only in what the critics see and how the actor's
gradient is formed. Table per task: final evaluation return (true reward, no
penalty), constraint violations of the plant state (must be 0), fallbacks (states
outside the invariant set, must be 0), intervention rate (steps whose action the
safeguard changed), mean Jacobian rank deficiency of ``Φ`` at the actor's actions
during actor updates.

    python -m scpo_ros.experiments safeguard [--seeds 3] [--steps 1000] [--json PATH] [--plot PREFIX]
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..dynamics import DoubleIntegrator, Pendulum
from ..envs import pendulum_plant
from ..plant import Plant, double_integrator_plant
from ..safeguard.invariant_set import SafeActionSet, safe_set_for
from ..safeguard.layer import ProjectionLayer
from .report import aggregate, print_table, write_json

METHODS = ("SE", "SP", "SE+pen", "SP+pen")
TASKS = ("double_integrator", "pendulum")
DTYPE = torch.float64   # plant states on the set's boundary: float32 rounding would read as violations


@dataclass
class StudySettings:
    seeds: int = 3
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = METHODS
    num_envs: int = 16
    steps: int = 1000
    """Vectorised environment steps per run (one gradient update each)."""
    episode_length: int = 100
    hidden: int = 64
    batch: int = 128
    gamma: float = 0.97
    tau: float = 0.01
    lr_actor: float = 1e-3
    lr_critic: float = 2e-3
    exploration_std: float = 0.3
    """Exploration noise, as a fraction of the actuator limit."""
    action_scale: float = 1.5
    """The actor's raw actions span ±action_scale·u_max: the actuator box can alias too."""
    penalty_weight: float = 1.0
    warmup_steps: int = 50
    eval_every: int = 100
    eval_states: int = 64


@dataclass
class Task:
    """A plant, its safe set, and the episode distribution/reward of one task."""

    name: str
    system: object
    safe_set: SafeActionSet
    obs_dim: int
    act_dim: int
    u_max: float
    reward_scale: float
    state_box: np.ndarray = field(repr=False)
    ref_max: float = 0.0

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` initial states inside the invariant set (rejection from a box) and references."""
        xs = []
        box = torch.as_tensor(self.state_box, dtype=DTYPE)
        while sum(len(x) for x in xs) < n:
            x = (2.0 * torch.rand(4 * n, len(box), generator=gen, dtype=DTYPE) - 1.0) * box
            xs.append(x[self.safe_set.invariant.contains(x, tol=-1e-6)])
        x = torch.cat(xs)[:n]
        r = (2.0 * torch.rand(n, self.act_dim, generator=gen, dtype=DTYPE) - 1.0) * self.ref_max
        return x, r

    def obs(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.name == "pendulum":
            return torch.stack([torch.sin(x[:, 0]), torch.cos(x[:, 0]), x[:, 1] / 8.0], -1)
        return torch.cat([x, r], -1)

    def reward(self, x: torch.Tensor, u: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.name == "pendulum":
            return -(x[:, 0] ** 2 + 0.1 * x[:, 1] ** 2 + 0.001 * u[:, 0] ** 2)
        n = self.act_dim
        e = x[:, :n] - r
        return -((e * e).sum(-1) + 0.1 * (u * u).sum(-1))

    def step(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.system.step(x, u)

    def violation(self, x: torch.Tensor) -> torch.Tensor:
        return self.system.violation(x)


def task_plant(name: str, system) -> Plant:
    """The generic ``Plant`` of a task's system: the double integrator of its limits, or the shipped
    pendulum file with the system's limits (``envs.pendulum_plant``)."""
    if name == "double_integrator":
        return double_integrator_plant(system.dof, system.dt, system.p_max, system.v_max, system.u_max)
    return pendulum_plant(system)


def make_task(name: str) -> Task:
    """The task's system (its dynamics and violation check, in float64) and the safe set of
    its plant without late commands (``safe_set_for``: the explicit maximal control-invariant
    set of the double integrator, the pendulum model's own)."""
    if name == "double_integrator":
        sysm = DoubleIntegrator(dof=1)
        return Task(name, sysm, safe_set_for(task_plant(name, sysm), late_commands=0), obs_dim=3, act_dim=1,
                    u_max=sysm.u_max, reward_scale=1.0, state_box=np.array([sysm.p_max, sysm.v_max]), ref_max=0.95)
    if name == "pendulum":
        sysm = Pendulum()
        return Task(name, sysm, safe_set_for(task_plant(name, sysm), late_commands=0), obs_dim=3, act_dim=1,
                    u_max=sysm.a_max, reward_scale=0.1, state_box=np.array([0.9 * math.pi, 4.0]))
    raise ValueError(f"unknown task {name!r} ({'|'.join(TASKS)})")


def mlp(inp: int, out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out)).to(DTYPE)


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int, limit: float):
        super().__init__()
        self.net, self.limit = mlp(obs_dim, act_dim, hidden), limit

    def forward(self, obs):
        return self.limit * torch.tanh(self.net(obs))


class Critic(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, tau)


class Replay:
    """Preallocated ring buffer of transitions (obs, x, raw u, safe ũ, reward, penalty, next)."""

    def __init__(self, capacity: int, obs_dim: int, state_dim: int, act_dim: int):
        z = lambda *s: torch.zeros(capacity, *s, dtype=DTYPE)  # noqa: E731
        self.obs, self.next_obs = z(obs_dim), z(obs_dim)
        self.x, self.next_x = z(state_dim), z(state_dim)
        self.u, self.ut = z(act_dim), z(act_dim)
        self.reward, self.penalty = z(), z()
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, **batch) -> None:
        n = len(batch["obs"])
        idx = (self.pos + torch.arange(n)) % self.capacity
        for key, value in batch.items():
            getattr(self, key)[idx] = value
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, gen: torch.Generator) -> dict:
        idx = torch.randint(0, self.size, (n,), generator=gen)
        return {k: getattr(self, k)[idx] for k in
                ("obs", "next_obs", "x", "next_x", "u", "ut", "reward", "penalty")}


def evaluate(task: Task, actor: Actor, layer: ProjectionLayer, x0, r, length: int) -> dict:
    """Deterministic policy from fixed initial states: mean return, violations, interventions."""
    x, ret, viol, interv, fallback = x0.clone(), torch.zeros(len(x0), dtype=DTYPE), 0, 0, 0
    with torch.no_grad():
        for _ in range(length):
            u = actor(task.obs(x, r))
            ut = layer(x, u)
            fallback += int((~layer.last_feasible).sum())
            interv += int(((ut - u).abs() > 1e-9).any(-1).sum())
            ret += task.reward(x, ut, r)
            x = task.step(x, ut)
            viol += int(task.violation(x).sum())
    return {"return": float(ret.mean()), "violations": viol, "fallbacks": fallback,
            "intervention_rate": interv / (length * len(x0))}


def run(task_name: str, method: str, seed: int, s: StudySettings, progress: bool = True) -> dict:
    """Train one (task, method, seed); return its metrics and learning curve."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} ({'|'.join(METHODS)})")
    task = make_task(task_name)
    sp, penalised = method.startswith("SP"), method.endswith("+pen")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    eval_x, eval_r = task.sample(s.eval_states, torch.Generator().manual_seed(12345))
    layer = ProjectionLayer(task.safe_set)
    limit = s.action_scale * task.u_max
    actor = Actor(task.obs_dim, task.act_dim, s.hidden, limit)
    critic = Critic(task.obs_dim, task.act_dim, s.hidden)
    actor_t, critic_t = copy.deepcopy(actor), copy.deepcopy(critic)
    pen_critic = Critic(task.obs_dim, task.act_dim, s.hidden) if (sp and penalised) else None
    pen_critic_t = copy.deepcopy(pen_critic) if pen_critic is not None else None
    opt_a = torch.optim.Adam(actor.parameters(), lr=s.lr_actor)
    critic_params = list(critic.parameters()) + (list(pen_critic.parameters()) if pen_critic else [])
    opt_c = torch.optim.Adam(critic_params, lr=s.lr_critic)
    buf = Replay(s.steps * s.num_envs, task.obs_dim, task.safe_set.state_dim, task.act_dim)

    x, r = task.sample(s.num_envs, gen)
    t_env = torch.zeros(s.num_envs, dtype=torch.long)
    counts = {"violations": 0, "fallbacks": 0, "interventions": 0, "env_steps": 0}
    rank_def_sum, rank_def_n = 0.0, 0
    curve = []
    started = time.perf_counter()
    bar = tqdm(range(s.steps), desc=f"{task_name} {method} seed {seed}", disable=not progress, leave=False)
    for step in bar:
        obs = task.obs(x, r)
        with torch.no_grad():
            if step < s.warmup_steps:
                u = (2.0 * torch.rand(s.num_envs, task.act_dim, generator=gen, dtype=DTYPE) - 1.0) * limit
            else:
                noise = torch.randn(s.num_envs, task.act_dim, generator=gen, dtype=DTYPE)
                u = (actor(obs) + s.exploration_std * task.u_max * noise).clamp(-limit, limit)
            ut = layer(x, u)
            feasible = layer.last_feasible
        counts["fallbacks"] += int((~feasible).sum())
        counts["interventions"] += int(((ut - u).abs() > 1e-9).any(-1).sum())
        counts["env_steps"] += s.num_envs
        x_next = task.step(x, ut)
        counts["violations"] += int(task.violation(x_next).sum())
        reward = task.reward(x, ut, r) * task.reward_scale
        penalty = ((u - ut) ** 2).sum(-1)
        buf.add(obs=obs, next_obs=task.obs(x_next, r), x=x, next_x=x_next, u=u, ut=ut,
                reward=reward, penalty=penalty)
        # Time-limit resets (no terminal states: the critic always bootstraps).
        t_env += 1
        x = x_next
        done = t_env >= s.episode_length
        if bool(done.any()):
            x0, r0 = task.sample(int(done.sum()), gen)
            x, r = x.clone(), r.clone()
            x[done], r[done] = x0, r0
            t_env[done] = 0

        if buf.size >= s.batch:
            rank_def = update(buf.sample(s.batch, gen), task, layer, actor, critic, actor_t, critic_t,
                              pen_critic, pen_critic_t, opt_a, opt_c, sp, penalised, s)
            rank_def_sum, rank_def_n = rank_def_sum + rank_def, rank_def_n + 1
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            ev = evaluate(task, actor, layer, eval_x, eval_r, s.episode_length)
            curve.append((step + 1, ev["return"]))
            bar.set_postfix(ret=f"{ev['return']:.2f}")
    final = evaluate(task, actor, layer, eval_x, eval_r, s.episode_length)
    return {
        "return": final["return"],
        "violations": counts["violations"] + final["violations"],
        "fallbacks": counts["fallbacks"] + final["fallbacks"],
        "intervention_rate": counts["interventions"] / counts["env_steps"],
        "eval_intervention_rate": final["intervention_rate"],
        "rank_deficiency": rank_def_sum / max(rank_def_n, 1),
        "train_s": time.perf_counter() - started,
        "curve": curve,
    }


def update(batch, task, layer, actor, critic, actor_t, critic_t, pen_critic, pen_critic_t,
           opt_a, opt_c, sp: bool, penalised: bool, s: StudySettings) -> float:
    """One critic and one actor step; returns the mean rank deficiency of ∂Φ/∂u at μ(s)."""
    obs, nobs = batch["obs"], batch["next_obs"]
    reward = batch["reward"]
    if penalised and not sp:
        reward = reward - s.penalty_weight * batch["penalty"]     # SE+pen: penalty in the reward
    with torch.no_grad():
        a_next = actor_t(nobs)
        if sp:
            a_next = layer(batch["next_x"], a_next)
        target = reward + s.gamma * critic_t(nobs, a_next)
        if pen_critic is not None:
            pen_target = batch["penalty"] + s.gamma * pen_critic_t(nobs, actor_t(nobs))
    act = batch["ut"] if sp else batch["u"]
    loss_c = ((critic(obs, act) - target) ** 2).mean()
    if pen_critic is not None:
        loss_c = loss_c + ((pen_critic(obs, batch["u"]) - pen_target) ** 2).mean()
    opt_c.zero_grad(set_to_none=True)
    loss_c.backward()
    opt_c.step()

    u = actor(obs)
    if sp:
        ut = layer(batch["x"], u)              # gradient flows through Φ
        loss_a = -critic(obs, ut).mean()
        if pen_critic is not None:
            loss_a = loss_a + s.penalty_weight * pen_critic(obs, u).mean()
    else:
        loss_a = -critic(obs, u).mean()
        with torch.no_grad():
            layer(batch["x"], u)               # only to measure the aliasing SE-RL would see
    rank_def = float(layer.rank_deficiency().to(DTYPE).mean())
    opt_a.zero_grad(set_to_none=True)
    loss_a.backward()
    opt_a.step()
    soft_update(actor_t, actor, s.tau)
    soft_update(critic_t, critic, s.tau)
    if pen_critic is not None:
        soft_update(pen_critic_t, pen_critic, s.tau)
    return rank_def


def plot(results: dict, path_prefix: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt
    Path(path_prefix).parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for task_name, by_method in results.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, res in by_method.items():
            curves = np.array([[ret for _, ret in seed["curve"]] for seed in res["per_seed"]])
            steps = [st for st, _ in res["per_seed"][0]["curve"]]
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(steps, mean, label=method)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("environment step (vectorised)")
        ax.set_ylabel("evaluation return")
        ax.set_title(f"{task_name}: SE-RL vs SP-RL ({len(res['per_seed'])} seeds)", fontsize=10)
        ax.legend()
        fig.tight_layout()
        path = f"{path_prefix}_{task_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scpo_ros.experiments safeguard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=StudySettings.seeds)
    ap.add_argument("--steps", type=int, default=StudySettings.steps)
    ap.add_argument("--num-envs", type=int, default=StudySettings.num_envs)
    ap.add_argument("--episode-length", type=int, default=StudySettings.episode_length)
    ap.add_argument("--penalty-weight", type=float, default=StudySettings.penalty_weight)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--eval-every", type=int, default=StudySettings.eval_every)
    ap.add_argument("--json", help="write the metrics here")
    ap.add_argument("--plot", default="runs/safeguard/safeguard",
                    help="learning-curve PNG prefix, one PNG per task ('' for none)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    methods = tuple(m for m in args.methods.split(",") if m)
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}")
    if args.seeds < 1 or args.steps < 1 or args.num_envs < 1 or args.episode_length < 1 or args.eval_every < 1:
        ap.error("seeds, steps, num-envs, episode-length and eval-every must be >= 1")
    s = StudySettings(seeds=args.seeds, steps=args.steps, num_envs=args.num_envs,
                      episode_length=args.episode_length, penalty_weight=args.penalty_weight,
                      tasks=tasks, methods=methods, eval_every=args.eval_every)
    torch.set_num_threads(1)
    results: dict = {}
    for task_name in tasks:
        results[task_name] = {}
        for method in methods:
            per_seed = [run(task_name, method, seed, s, progress=not args.no_progress) for seed in range(s.seeds)]
            agg = aggregate(per_seed)
            agg["return_std"] = float(np.std([p["return"] for p in per_seed]))
            agg["violations"] = int(sum(p["violations"] for p in per_seed))
            agg["fallbacks"] = int(sum(p["fallbacks"] for p in per_seed))
            results[task_name][method] = agg
        print_table(f"\n{task_name}: {s.seeds} seeds x {s.steps} steps x {s.num_envs} envs", results[task_name], [
            ("return", "return"), ("return_std", "±std"), ("violations", "violations"),
            ("fallbacks", "fallbacks"), ("intervention_rate", "interv_rate"),
            ("eval_intervention_rate", "eval_interv"), ("rank_deficiency", "rank_def"),
            ("train_s", "train_s")])
    if args.plot:
        for p in plot(results, args.plot):
            print(f"plot: {p}")
    write_json(args.json, {"experiment": "safeguard", "settings": asdict(s), "results": results})
    return 0
