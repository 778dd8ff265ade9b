"""The differentiable projection layer: forward = the per-step projector, gradients =
finite differences and the reference layer (cvxpylayers), rank = active constraints."""
import numpy as np
import pytest
import torch

from scpo_ros.dynamics import DoubleIntegrator, Pendulum
from scpo_ros.safeguard.invariant_set import safe_set_for
from scpo_ros.safeguard.layer import ProjectionLayer
from scpo_ros.safeguard.projection import SafeguardProjector

from test_safeguard_projection import coupled_safe_set

torch.set_num_threads(1)


def batch(S, limits, n, seed, spread=2.5):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (8 * n, len(limits))) * np.asarray(limits)
    x = x[S.invariant.contains(x, tol=-1e-6)][:n]
    u = rng.uniform(-spread, spread, (len(x), S.action_dim)) * S.u_max
    return torch.tensor(x), torch.tensor(u)


CASES = [("di2", lambda: safe_set_for(DoubleIntegrator(dof=2)), [1.0] * 4, "closed_form"),
         ("di2-daqp", lambda: safe_set_for(DoubleIntegrator(dof=2)), [1.0] * 4, "daqp"),
         ("pendulum", lambda: safe_set_for(Pendulum()), [np.pi, 8.0], "closed_form"),
         ("coupled", coupled_safe_set, [1.0, 1.0], "daqp")]


@pytest.mark.parametrize("name,make,limits,solver", CASES, ids=[c[0] for c in CASES])
def test_forward_equals_projector_and_gradients_match_finite_differences(name, make, limits, solver):
    S = make()
    layer = ProjectionLayer(S, solver=solver)
    x, u = batch(S, limits, 64, seed=11)
    b = S.rhs(x).clone().requires_grad_(True)
    u = u.clone().requires_grad_(True)
    ut = layer.project(u, b)
    assert layer.last_feasible.all()
    proj = SafeguardProjector(S, solver=solver)
    for i in range(len(x)):
        res = proj.project(x[i].numpy(), u[i].detach().numpy())
        np.testing.assert_allclose(ut[i].detach().numpy(), res.u, atol=1e-12)
        assert np.array_equal(layer.last_active[i].numpy(), res.active)
    # Gradient of a random linear functional, against central finite differences.
    w = torch.randn(ut.shape, dtype=ut.dtype, generator=torch.Generator().manual_seed(0))
    (ut * w).sum().backward()
    eps = 1e-7
    for wrt, grad in ((u, u.grad), (b, b.grad)):
        fd = torch.zeros_like(wrt)
        for j in range(wrt.shape[1]):
            d = torch.zeros_like(wrt)
            d[:, j] = eps
            with torch.no_grad():
                if wrt is u:
                    plus, minus = layer.project(u + d, b), layer.project(u - d, b)
                else:
                    plus, minus = layer.project(u, b + d), layer.project(u, b - d)
            fd[:, j] = ((plus - minus) * w).sum(-1) / (2 * eps)
        np.testing.assert_allclose(grad.numpy(), fd.numpy(), atol=1e-6)
    assert (u.grad.abs() < 1e-12).any(), "some aliased direction must have a zero gradient"


def test_jacobian_rank_drops_by_the_number_of_active_constraints():
    S = safe_set_for(DoubleIntegrator(dof=2))
    layer = ProjectionLayer(S)
    x, u = batch(S, [1.0] * 4, 200, seed=5)
    ut = layer(x, u)
    J = layer.jacobian()
    n_active = layer.last_active.sum(-1)
    deficiency = layer.rank_deficiency()
    # Separable constraints: one active row per clamped coordinate, independent rows.
    assert torch.equal(deficiency, n_active)
    assert torch.equal(torch.linalg.matrix_rank(J), 2 - n_active)
    assert set(n_active.tolist()) >= {0, 1, 2}
    # The aliasing is real: moving u along an active row's normal does not move ũ.
    one = (n_active == 1).nonzero()[0, 0]
    row = layer.A_full[layer.last_active[one]][0]
    shifted = layer(x[one:one + 1], u[one:one + 1] + 0.01 * row)   # further outside along the normal
    torch.testing.assert_close(shifted[0], ut[one], atol=1e-12, rtol=0)
    # Gradients flow to x through b(x) as well (the policy is not the only input).
    xg = x.clone().requires_grad_(True)
    layer(xg, u).sum().backward()
    on_state_rows = layer.last_active[:, :layer.k].any(-1)        # an invariant-set row, not the box
    assert on_state_rows.sum() > 10
    assert torch.isfinite(xg.grad).all() and (xg.grad.abs().sum(-1)[on_state_rows] > 0).all()
    assert (xg.grad[n_active == 0] == 0).all()


def test_gradients_match_cvxpylayers():
    cp = pytest.importorskip("cvxpy")
    cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch")
    S = safe_set_for(DoubleIntegrator(dof=2))
    G = S.G
    k, m = G.shape
    z, up, bp = cp.Variable(m), cp.Parameter(m), cp.Parameter(k)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(z - up)), [G @ z <= bp, cp.abs(z) <= S.u_max])
    reference = cvxpylayers_torch.CvxpyLayer(prob, parameters=[up, bp], variables=[z])
    x, u = batch(S, [1.0] * 4, 24, seed=9)
    b = S.rhs(x)
    w = torch.randn(len(x), m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda uu, bb: reference(uu, bb, solver_args={"eps": 1e-11, "max_iters": 100000})[0],
               lambda uu, bb: ProjectionLayer(S).project(uu, bb)):
        uu, bb = u.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out = fn(uu, bb)
        (out * w).sum().backward()
        grads.append((out.detach(), uu.grad, bb.grad))
    (ref_out, ref_gu, ref_gb), (out, gu, gb) = grads
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(gu, ref_gu, atol=1e-6, rtol=0)
    torch.testing.assert_close(gb, ref_gb, atol=1e-6, rtol=0)
