"""Regression with harmful supervision: unconstrained fitting vs SCPO.

A tanh MLP ``f_θ: R -> R`` is fitted to noisy samples of ``f*(x) = 0.9 sin(1.5 x)`` on
``[-2, 2]``, except that on ``[0.4, 1.4]`` the labels are harmful: ``1.5``, outside the
safe output band ``|f(x)| <= 1``. The band can only be checked by sampling inputs
(a black-box constraint with no usable gradient: a maximum over samples). Both
learners take the same Adam steps; SCPO projects and certifies each one.

    python -m scpo_ros.experiments regression [--seeds 3] [--updates 250] [--json PATH] [--plot PATH]
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..policy import MLPLayout, ResidualMLP
from ..scpo import COMMITTED, STATUSES, SCPOConfig, SCPOProjector
from .report import print_table, run_methods, scpo_experiment_parser, write_json

X_MIN, X_MAX = -2.0, 2.0
HARM_LO, HARM_HI, HARM_LABEL = 0.4, 1.4, 1.5


def clean_function(x: np.ndarray) -> np.ndarray:
    return 0.9 * np.sin(1.5 * x)


@dataclass
class RegressionSettings:
    seeds: int = 3
    updates: int = 250
    hidden: tuple[int, ...] = (32, 32)
    lr: float = 3e-3
    batch: int = 128
    band: float = 1.0
    label_noise: float = 0.05
    train_points: int = 2048
    n_samples: int = 64
    n_sample_inputs: int = 256
    n_cert_inputs: int = 1024
    eval_inputs: int = 2048


class BandConstraint:
    """``g(θ) = [max f_θ(x) - band, max -f_θ(x) - band]`` over freshly sampled inputs."""

    names = ("upper", "lower")

    def __init__(self, layout: MLPLayout, band: float, count: int, rng: np.random.Generator):
        self.layout, self.band, self.count, self.rng = layout, band, count, rng

    def on_inputs(self, params: torch.Tensor, x: np.ndarray) -> torch.Tensor:
        params = torch.as_tensor(params, dtype=torch.float32)
        xs = torch.as_tensor(x, dtype=torch.float32).reshape(1, -1, 1).expand(params.shape[0], -1, -1)
        y = self.layout.batched_forward(params, xs)[..., 0]
        return torch.stack([y.amax(1) - self.band, (-y).amax(1) - self.band], 1)

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        # the interval's ends plus uniform samples, new ones on every call
        x = np.concatenate([[X_MIN, X_MAX], self.rng.uniform(X_MIN, X_MAX, self.count - 2)])
        return self.on_inputs(params, x)


def run_seed(method: str, seed: int, s: RegressionSettings, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    layout = MLPLayout(1, 1, s.hidden)
    model = ResidualMLP(layout, seed=seed)  # last layer zero: f ≡ 0, inside the band
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)

    x_train = rng.uniform(X_MIN, X_MAX, s.train_points)
    harmful = (x_train >= HARM_LO) & (x_train <= HARM_HI)
    y_train = (np.where(harmful, HARM_LABEL, clean_function(x_train))
               + s.label_noise * rng.standard_normal(s.train_points))
    x_t = torch.as_tensor(x_train, dtype=torch.float32).unsqueeze(1)
    y_t = torch.as_tensor(y_train, dtype=torch.float32).unsqueeze(1)
    x_clean = np.linspace(X_MIN, X_MAX, 1001)
    xc_t = torch.as_tensor(x_clean, dtype=torch.float32).unsqueeze(1)
    yc_t = torch.as_tensor(clean_function(x_clean), dtype=torch.float32).unsqueeze(1)
    x_eval = np.concatenate([np.linspace(X_MIN, X_MAX, s.eval_inputs // 2),
                             np.random.default_rng(50_000 + seed).uniform(X_MIN, X_MAX, s.eval_inputs // 2)])

    sampler = BandConstraint(layout, s.band, s.n_sample_inputs, np.random.default_rng(60_000 + seed))
    certifier = BandConstraint(layout, s.band, s.n_cert_inputs, np.random.default_rng(70_000 + seed))
    projector = SCPOProjector(sampler, certifier, SCPOConfig(n_samples=s.n_samples, margins=(0.02,),
                                                             cert_margins=(0.0,)), BandConstraint.names, seed=seed)

    def clean_loss() -> float:
        with torch.no_grad():
            return float(((model(xc_t) - yc_t) ** 2).mean())

    def unsafe() -> bool:
        return bool((sampler.on_inputs(model.flat().detach().unsqueeze(0), x_eval) > 0).any())

    loss_hist, decisions, unsafe_hist, step_ms = [clean_loss()], [], [], []
    unsafe_count, unsafe_now = 0, unsafe()
    bar = tqdm(range(s.updates), desc=f"regression {method} seed {seed}", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.as_tensor(rng.integers(0, s.train_points, s.batch))
        theta_before = model.flat().detach().clone()
        opt.zero_grad()
        loss = ((model(x_t[idx]) - y_t[idx]) ** 2).mean()
        loss.backward()
        opt.step()
        if method == "scpo":
            t0 = time.perf_counter()
            new_theta, decision = projector.step(theta_before, model.flat().detach() - theta_before)
            step_ms.append(1e3 * (time.perf_counter() - t0))
            model.load_flat(new_theta)
            status = decision.status
        else:
            status = "accepted"
        changed = status in COMMITTED
        if changed:
            unsafe_now = unsafe()
        unsafe_count += int(changed and unsafe_now)
        decisions.append(status)
        unsafe_hist.append(bool(unsafe_now))
        loss_hist.append(clean_loss())
        bar.set_postfix(loss=f"{loss_hist[-1]:.4f}", unsafe=unsafe_count)

    with torch.no_grad():
        curve = model(xc_t)[:, 0].numpy().tolist()
    committed = sum(d in COMMITTED for d in decisions)
    return {
        "updates": s.updates,
        "accepted": committed,
        "unsafe_committed": unsafe_count,
        "loss_initial": loss_hist[0],
        "loss_final": loss_hist[-1],
        "accept_rate": committed / s.updates,
        "decisions": {st: decisions.count(st) for st in STATUSES},
        "step_ms_median": float(np.median(step_ms)) if step_ms else None,
        "history": {"loss": loss_hist, "decision": decisions, "unsafe": unsafe_hist},
        "final_curve": curve,
    }


def plot(results: dict, s: RegressionSettings, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fit, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.linspace(X_MIN, X_MAX, 1001)
    ax_fit.axhspan(-s.band, s.band, color="tab:green", alpha=0.08, label="safe band")
    ax_fit.axvspan(HARM_LO, HARM_HI, color="tab:red", alpha=0.08, label="harmful labels")
    ax_fit.plot(x, clean_function(x), "k--", lw=1, label="clean target")
    colors = {"scpo": "tab:blue", "unconstrained": "tab:red"}
    for method, res in results.items():
        ax_fit.plot(x, res["per_seed"][0]["final_curve"], color=colors[method], label=f"{method} (seed 0)")
        losses = np.array([p["history"]["loss"] for p in res["per_seed"]])
        ax_loss.plot(losses.mean(0), color=colors[method], label=method)
    ax_fit.set_title("final fit")
    ax_fit.legend(fontsize=7)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("update")
    ax_loss.set_ylabel("loss on clean labels (mean of seeds)")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = scpo_experiment_parser("regression", __doc__).parse_args(argv)
    torch.set_num_threads(args.threads)
    s = RegressionSettings(seeds=args.seeds, updates=args.updates)
    results = run_methods(run_seed, s, progress=not args.no_progress)
    print_table(f"regression with harmful supervision, {s.seeds} seeds x {s.updates} updates", results, [
        ("updates", "updates"), ("accepted", "committed"), ("unsafe_committed", "unsafe"),
        ("loss_initial", "loss_initial"), ("loss_final", "loss_final"), ("step_ms_median", "step_ms")])
    if args.plot:
        plot(results, s, args.plot)
        print(f"plot: {args.plot}")
    write_json(args.json, {"experiment": "regression", "settings": asdict(s), **results})
    return 0
