"""The C-TRPO / TRPO-Lag / TRPO / SE-RL comparison (``experiments/compare.py``): its summary, the
SE-RL wrapper, and its command line."""
import numpy as np
import pytest
import torch

from scpo_ros.dynamics import DoubleIntegrator
from scpo_ros.envs import VecDoubleIntegrator


def test_compare_summary_counts_regret_and_every_executed_episode():
    from scpo_ros.experiments.compare import CompareSettings, RunResult, summarize

    s = CompareSettings(cost_limit=2.0)
    curve = [{"env_steps": 100 * (i + 1), "ep_return": -1.0, "ep_cost": c, "violating_episodes": v, "episodes": 4}
             for i, (c, v) in enumerate([(0.0, 0), (3.5, 2), (2.0, 1), (5.0, 4)])]
    row = summarize(RunResult(curve, {"return": -0.5, "cost": 1.0, "unsafe_episodes": 3, "episodes": 12}, 1.0), s)
    assert row["regret"] == pytest.approx(1.5 + 0.0 + 3.0)
    assert row["viol_eps"] == 7 and row["episodes"] == 16 and row["env_steps"] == 400
    assert row["task_cost"] == pytest.approx(0.5) and row["eval_unsafe"] == pytest.approx(0.25)
    assert row["train_cost"] == pytest.approx(np.mean([0.0, 3.5, 2.0, 5.0]))


def test_se_rl_wrapper_keeps_an_adversarial_learner_inside_the_constraints():
    pytest.importorskip("scpo_ros.safeguard.projection")
    from scpo_ros.experiments.compare import SafeguardedEnv

    system = DoubleIntegrator(v_max=0.5)
    env = SafeguardedEnv(VecDoubleIntegrator(64, system=system, episode_length=60, seed=0, dtype=torch.float64))
    raw = VecDoubleIntegrator(64, system=system, episode_length=60, seed=0)
    obs, obs_raw = env.reset(), raw.reset()
    # the same episodes (drawn in float32 either way; the float64 env's corners round once more)
    assert obs.dtype == torch.float32 and torch.allclose(obs, obs_raw, atol=1e-6)
    cost_safe = cost_raw = 0.0
    for _ in range(60):
        push = torch.where(obs[:, :1] >= 0, 1.0, -1.0) * 5.0          # full throttle outwards
        step = env.step(push)
        cost_safe += float(step.cost.sum())
        assert (step.reward <= 0).all()
        raw_step = raw.step(torch.where(obs_raw[:, :1] >= 0, 1.0, -1.0) * 5.0)
        cost_raw += float(raw_step.cost.sum())
        obs, obs_raw = step.obs, raw_step.obs
    assert cost_raw > 0, "without the safeguard the same actions break the limits"
    assert cost_safe == 0.0 and env.fallbacks == 0 and env.interventions > 0
    assert env.safe_set.name.startswith("double_integrator explicit")     # the maximal invariant set


def test_every_method_runs_on_the_double_integrator_and_on_a_plant_file(tmp_path):
    """Smoke: one epoch of every method (SCPO and SE-RL included) on the default task, and the
    plant-file task; the SCPO rows commit only certified steps, so their evaluation is safe."""
    import json

    from scpo_ros.experiments import compare

    torch.set_num_threads(1)
    for env, methods in (("double_integrator", "scpo_imitation,scpo_rl,se_rl"),
                         ("mass_spring_damper", "c_trpo,scpo_imitation,se_rl")):
        out = tmp_path / f"{env}.json"
        rc = compare.main(["--env", env, "--methods", methods, "--seeds", "1", "--epochs", "1", "--num-envs", "4",
                           "--eval-episodes", "8", "--json", str(out), "--plot", ""])
        assert rc == 0
        data = json.loads(out.read_text())
        assert set(data["results"]) == set(methods.split(",")) and not data["skipped"]
        for name in ("scpo_imitation", "se_rl"):
            assert data["results"][name]["eval_cost"] == 0.0, (env, name)
    with pytest.raises(SystemExit):
        compare.main(["--env", "no_such_plant", "--methods", "c_trpo"])
    skipped = compare.available("se_rl", compare.CompareSettings(env="pendulum"))
    assert skipped == (False, "not defined on pendulum")


def test_compare_main_writes_table_json_and_plot(tmp_path):
    import json

    from scpo_ros.experiments import compare

    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    rc = compare.main(["--methods", "c_trpo,trpo", "--seeds", "1", "--epochs", "2", "--num-envs", "4",
                       "--eval-episodes", "8", "--json", str(out), "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"c_trpo", "trpo"}
    res = data["results"]["c_trpo"]
    assert res["episodes"] == 2 * 4 and len(res["curves"][0]) == 2
    assert "regret" in res and "viol_eps" in res and "wall_s" in res
    with pytest.raises(SystemExit):
        compare.main(["--methods", "no_such_method"])
