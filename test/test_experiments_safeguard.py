"""The SE-vs-SP study at tiny settings: runs end to end, never violates, measures aliasing."""
import json

import pytest
import torch

from scpo_ros.experiments import safeguard as study


def test_study_runs_all_four_methods_without_violations(tmp_path):
    out = tmp_path / "sg.json"
    code = study.main(["--seeds", "1", "--steps", "60", "--num-envs", "4", "--episode-length", "20",
                       "--eval-every", "30", "--no-progress", "--plot", str(tmp_path / "sg"),
                       "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    for task in study.TASKS:
        assert (tmp_path / f"sg_{task}.png").exists()
        res = data["results"][task]
        assert set(res) == set(study.METHODS)
        for method, r in res.items():
            assert r["violations"] == 0 and r["fallbacks"] == 0, (task, method)
            assert 0.0 < r["intervention_rate"] <= 1.0
            assert r["rank_deficiency"] >= 0.0
            assert len(r["per_seed"][0]["curve"]) == 2
        # Random warm-up actions span ±1.5 u_max: the safeguard is busy and aliases.
        assert res["SP"]["rank_deficiency"] > 0.0


def test_sp_actor_gradient_is_zero_along_aliased_directions():
    """In SP-RL the actor's gradient passes through ∂Φ/∂u: where the raw action is clamped
    (one action dimension), no gradient reaches the actor's output."""
    task = study.make_task("double_integrator")
    layer = study.ProjectionLayer(task.safe_set)
    x = torch.tensor([[0.95, 0.3], [0.0, 0.0]], dtype=study.DTYPE)   # near the wall / at rest
    u = torch.tensor([[1.2], [0.1]], dtype=study.DTYPE, requires_grad=True)
    layer(x, u).sum().backward()
    assert layer.last_active[0].any() and not layer.last_active[1].any()
    assert u.grad[0, 0] == 0.0 and u.grad[1, 0] == 1.0
    assert layer.rank_deficiency().tolist() == [1, 0]


def test_unknown_method_and_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        study.run("double_integrator", "XX", 0, study.StudySettings(steps=1))
    with pytest.raises(SystemExit):
        study.main(["--tasks", "cartpole"])
    with pytest.raises(SystemExit):
        study.main(["--steps", "0"])
