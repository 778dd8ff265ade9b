"""The differentiable projection layer: forward = the per-step projector, gradients =
finite differences and the reference layer (cvxpylayers), rank = active constraints."""
import numpy as np
import pytest
import torch

from late_set_helpers import safe_set_of
from scpo_ros.dynamics import DoubleIntegrator, Pendulum
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


CASES = [("di2", lambda: safe_set_of(DoubleIntegrator(dof=2)), [1.0] * 4, "closed_form"),
         ("di2-daqp", lambda: safe_set_of(DoubleIntegrator(dof=2)), [1.0] * 4, "daqp"),
         ("di2-late", lambda: safe_set_of(DoubleIntegrator(dof=2), late_commands=1), [1.0] * 4, "closed_form"),
         ("di2-late-daqp", lambda: safe_set_of(DoubleIntegrator(dof=2, dt=0.1), late_commands=1), [1.0] * 4, "daqp"),
         ("pendulum", lambda: safe_set_of(Pendulum()), [np.pi, 8.0], "closed_form"),
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
    S = safe_set_of(DoubleIntegrator(dof=2))
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


@pytest.mark.filterwarnings("ignore::DeprecationWarning:cvxpylayers")   # its numpy-2 copy= warnings
@pytest.mark.parametrize("late_commands", [0, 1])
def test_gradients_match_cvxpylayers(late_commands):
    cp = pytest.importorskip("cvxpy")
    cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch")
    S = safe_set_of(DoubleIntegrator(dof=2), late_commands=late_commands)
    G = S.G
    k, m = G.shape
    z, up, bp = cp.Variable(m), cp.Parameter(m), cp.Parameter(k)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(z - up)), [G @ z <= bp, cp.abs(z) <= S.u_max])
    reference = cvxpylayers_torch.CvxpyLayer(prob, parameters=[up, bp], variables=[z])
    x, u = batch(S, [1.0] * 4, 128, seed=9)
    b = S.rhs(x)
    w = torch.randn(len(x), m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    # diffcp's dense derivative solve: its default (LSQR, iterative) is off by ~3e-5 on
    # samples with a nearly active row
    for fn in (lambda uu, bb: reference(uu, bb, solver_args={"eps": 1e-11, "max_iters": 100000, "mode": "dense"})[0],
               lambda uu, bb: ProjectionLayer(S).project(uu, bb)):
        uu, bb = u.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out = fn(uu, bb)
        (out * w).sum().backward()
        grads.append((out.detach(), uu.grad, bb.grad))
    (ref_out, ref_gu, ref_gb), (out, gu, gb) = grads
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(gu, ref_gu, atol=1e-6, rtol=0)
    torch.testing.assert_close(gb, ref_gb, atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", ["closed_form", "daqp"])
def test_float32_states_on_the_boundary_stay_feasible_with_float64_gradients(solver):
    """States on the invariant set's boundary (where every active projection puts the next
    state) rounded to float32 lie up to ~1e-7 outside it: the layer must still call them
    feasible, and its float32 gradients must be the float64 ones, not 1/eps blow-ups of
    rounding-level eigenvalues."""
    sysm = DoubleIntegrator(dof=2)
    S = safe_set_of(sysm)
    P = SafeguardProjector(S)
    rng = np.random.default_rng(4)
    xs, x = [], np.zeros(4)
    for t in range(400):                      # pushed into the walls: mostly boundary states
        x = sysm.step(x, P.project(x, rng.uniform(-3, 3, 2) + 2.0 * np.sign(np.sin([0.05 * t, 0.03 * t]))).u)
        xs.append(x)
    x64 = torch.tensor(np.array(xs))
    on_boundary = (S.invariant.H @ x64.numpy().T - S.invariant.h[:, None]).max(0) > -1e-9
    assert on_boundary.sum() > 100
    u64 = torch.tensor(rng.uniform(-2.5, 2.5, (len(xs), 2)))
    w = torch.randn(u64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = {}
    for dtype in (torch.float64, torch.float32):
        layer = ProjectionLayer(S, solver=solver)
        u = u64.to(dtype).detach().requires_grad_(True)
        out = layer(x64.to(dtype), u)
        (out * w.to(dtype)).sum().backward()
        results[dtype] = (out.detach().double(), u.grad.double(), layer.last_feasible, layer.rank_deficiency())
    out64, g64, feas64, def64 = results[torch.float64]
    out32, g32, feas32, def32 = results[torch.float32]
    assert feas64.all() and feas32.all()
    # b(x) in float32 is off by ~eps32 |b|, and a bound is b / G_ij with |G_ij| down to
    # dt²/2 = 1.25e-3: ~2e-4 in action units is float32's own resolution here
    torch.testing.assert_close(out32, out64, atol=5e-4, rtol=0)
    same = def32 == def64                     # the active set may flip only where a row is tight to rounding
    assert same.float().mean() > 0.95
    torch.testing.assert_close(g32[same], g64[same], atol=1e-5, rtol=0)
    # ∂ũ/∂u is an orthogonal projector: it never lengthens the upstream gradient
    assert (g32.norm(dim=-1) <= w.norm(dim=-1) + 1e-5).all()


def test_sets_with_free_reference_variables_are_refused():
    """An implicit set (ρ columns) would get wrong gradients from the (ũ)-only KKT system: refused."""
    from plant_strategies import random_plant
    from scpo_ros.safeguard.invariant_set import safe_set_for
    plant = random_plant(3, n=4, m=1, nr=1, stable=True, h_rows=0, region_frac=0.2)   # n + m > 4: implicit
    S = safe_set_for(plant, late_commands=0)
    assert S.kind == "implicit" and S.rho_dim == 1
    with pytest.raises(ValueError, match="free reference variables"):
        ProjectionLayer(S)
