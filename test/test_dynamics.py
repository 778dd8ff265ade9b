"""The plant's per-constraint violation check."""
import numpy as np
import torch

from scpo_ros.dynamics import DoubleIntegrator


def test_violations_name_each_broken_box_and_violation_is_their_union():
    s = DoubleIntegrator(dof=2)
    x = np.array([[0.0, 0.0, 0.0, 0.0], [1.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.2], [1.0, -1.0, 1.0, 1.0]])
    u = np.array([[0.0, 1.5], [0.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    v = s.violations(x, u)
    assert v["position"].tolist() == [False, True, False, False]
    assert v["velocity"].tolist() == [False, False, True, False]
    assert v["actuation"].tolist() == [True, False, False, False]
    assert s.violation(x, u).tolist() == [True, True, True, False]
    assert set(s.violations(x)) == {"position", "velocity"}
    assert s.violation(torch.as_tensor(x)).tolist() == [False, True, True, False]
    assert s.violations(x[3], u[3], tol=0.0) == {"position": False, "velocity": False, "actuation": False}
