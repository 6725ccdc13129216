import math

import pytest
import torch

import bespoke_fast as bf
from tests.helpers import noise, smooth_gmm

torchdiffeq = pytest.importorskip("torchdiffeq")


@pytest.mark.parametrize("method,tdq", [("euler", "euler"), ("midpoint", "midpoint"), ("heun", "heun2")])
def test_fixed_grid_solvers_agree_with_torchdiffeq(method, tdq):
    flow = smooth_gmm()
    x0 = noise(16, 8)
    grid = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.6, 0.8, 0.9, 1.0], dtype=torch.float64)
    ours = bf.solve(flow, x0, method, t_grid=grid, return_trajectory=True)
    theirs = torchdiffeq.odeint(bf.to_torchdiffeq(flow), x0, grid, method=tdq)
    assert (ours - theirs).abs().max() < 1e-12


def test_rk4_is_the_classic_tableau_and_close_to_torchdiffeq():
    # one classic RK4 step on dx/dt = t x by hand
    model = bf.from_torchdiffeq(lambda t, x: t * x)
    x0, h = torch.ones(1, 1, dtype=torch.float64), 1.0
    k1 = 0.0
    k2 = 0.5 * (1 + h / 2 * k1)
    k3 = 0.5 * (1 + h / 2 * k2)
    k4 = 1.0 * (1 + h * k3)
    assert bf.solve(model, x0, "rk4", n_steps=1).item() == pytest.approx(1 + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4),
                                                                        abs=1e-15)
    # torchdiffeq's "rk4" is the 3/8 rule: a different tableau of the same order, so both have
    # errors of the same size against a fine reference, and they differ by no more than that
    flow = smooth_gmm()
    x0 = noise(16, 8)
    ref = bf.solve(flow, x0, "rk4", n_steps=1024)
    ours = bf.solve(flow, x0, "rk4", n_steps=20)
    theirs = torchdiffeq.odeint(bf.to_torchdiffeq(flow), x0, torch.linspace(0, 1, 21, dtype=torch.float64),
                                method="rk4")[-1]
    err_ours, err_theirs = (ours - ref).abs().max(), (theirs - ref).abs().max()
    assert 0.2 < err_ours / err_theirs < 5, (err_ours, err_theirs)
    assert (ours - theirs).abs().max() < 2 * max(err_ours, err_theirs)


def _errors(solve_fn, flow, x0, ref, ns):
    return [float((solve_fn(n) - ref).pow(2).mean().sqrt()) for n in ns]


def _orders(errors):
    return [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]


@pytest.mark.parametrize("method,ratio", [("euler", 2), ("midpoint", 4), ("heun", 4), ("rk4", 16)])
def test_base_solver_convergence_order(method, ratio):
    flow = smooth_gmm()
    x0 = noise(8, 8)
    ref = bf.solve(flow, x0, "rk4", n_steps=1024)
    ratios = _orders(_errors(lambda n: bf.solve(flow, x0, method, n_steps=n), flow, x0, ref, [8, 16, 32]))
    assert all(abs(r / ratio - 1) < 0.25 for r in ratios), ratios


def smooth_transform(base, n, a=1.2, eps=0.25):
    """A fixed smooth non-identity scale-time transform sampled on the solver's r grid:
    t(r) = (e^{a r} - 1)/(e^a - 1), s(r) = 1 + eps sin(pi r) (s_1 = 1 + 0 = 1 but s varies)."""
    m = n if base == "rk1" else 2 * n
    r = torch.arange(m + 1, dtype=torch.float64) / m
    t = torch.expm1(a * r) / math.expm1(a)
    t[-1] = 1.0
    tdot = a * torch.exp(a * r) / math.expm1(a)
    s = 1 + eps * torch.sin(math.pi * r) + 0.3 * r
    sdot = eps * math.pi * torch.cos(math.pi * r) + 0.3
    return bf.BespokeSolver.from_tables(base, t, tdot[:-1], s, sdot[:-1])


@pytest.mark.parametrize("base,ratio", [("rk1", 2), ("rk2", 4)])
def test_bespoke_step_keeps_the_base_order_under_a_smooth_transform(base, ratio):
    flow = smooth_gmm()
    x0 = noise(8, 8)
    ref = bf.solve(flow, x0, "rk4", n_steps=1024)
    errs = _errors(lambda n: smooth_transform(base, n).sample(flow, x0), flow, x0, ref, [8, 16, 32, 64])
    ratios = _orders(errs)
    assert all(abs(r / ratio - 1) < 0.25 for r in ratios[1:]), (errs, ratios)
    # and it is a genuinely different solver from the plain base one
    plain = bf.solve(flow, x0, "euler" if base == "rk1" else "midpoint", n_steps=16)
    assert (smooth_transform(base, 16).sample(flow, x0) - plain).abs().max() > 1e-4


def _random_solver(base, n, seed=0):
    solver = bf.BespokeSolver(base, n)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return solver


@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_x_step_equals_the_base_step_on_the_transformed_field(base):
    """Bespoke step in x == Euler/midpoint on ubar(r, xbar) = (sdot/s) xbar + tdot s u(t, xbar/s)
    in xbar = s x coordinates, followed by division by s at the end of the step."""
    flow, n = smooth_gmm(), 4
    solver = _random_solver(base, n)
    tb = {k: v.detach() for k, v in solver.tables().items()}
    t, tdot, s, sdot = tb["t"], tb["tdot"], tb["s"], tb["sdot"]
    h = 1.0 / n

    def ubar(k, xbar):
        tk = t[k].expand(xbar.shape[0])
        return sdot[k] / s[k] * xbar + tdot[k] * s[k] * flow(xbar / s[k], tk)

    x = noise(6, 8)
    for i in range(n):
        with torch.no_grad():
            got = solver.step(flow, x, i)
        if base == "rk1":
            xbar = s[i] * x
            want = (xbar + h * ubar(i, xbar)) / s[i + 1]
        else:
            k0, km, k1 = 2 * i, 2 * i + 1, 2 * i + 2
            xbar = s[k0] * x
            xbar_mid = xbar + (h / 2) * ubar(k0, xbar)
            want = (xbar + h * ubar(km, xbar_mid)) / s[k1]
        assert (got - want).abs().max() < 1e-13
        x = got


@pytest.mark.parametrize("base,method", [("rk1", "euler"), ("rk2", "midpoint")])
def test_identity_bespoke_equals_base_solver_bitwise(base, method):
    flow = smooth_gmm()
    x0 = noise(8, 8)
    for n in (1, 3, 10):
        assert torch.equal(bf.BespokeSolver(base, n).sample(flow, x0), bf.solve(flow, x0, method, n_steps=n))


def test_identity_coefficients_and_parameter_count():
    s = bf.BespokeSolver("rk2", 10)
    c = s.coefficients()
    assert torch.equal(c["A"], torch.ones(10, dtype=torch.float64))
    assert torch.allclose(c["B"], torch.full((10,), 0.05, dtype=torch.float64))
    assert torch.equal(c["D"], torch.zeros(10, dtype=torch.float64))
    assert s.num_parameters == 79 and s.nfe == 20
    r1 = bf.BespokeSolver("rk1", 10)
    assert r1.num_parameters == 39 and r1.nfe == 10
    assert torch.allclose(r1.coefficients()["b"], torch.full((10,), 0.1, dtype=torch.float64))
    assert sum(p.numel() for p in s.parameters()) == 80  # theta_t's overall scale is not free


def test_bespoke_sample_is_differentiable_and_batch_invariant():
    flow = smooth_gmm()
    solver = _random_solver("rk2", 3)
    x0 = noise(6, 8)
    out = solver.sample(flow, x0)
    out.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in solver.parameters())
    with torch.no_grad():
        assert torch.allclose(solver.sample(flow, x0[:2]), out[:2].detach(), atol=1e-14)


# ---------------------------------------------------------------------------- bad input
def test_bad_solver_arguments():
    flow = smooth_gmm()
    with pytest.raises(ValueError, match="n_steps must be an int >= 1, got 0"):
        bf.BespokeSolver("rk2", 0)
    with pytest.raises(TypeError, match="n_steps must be an int"):
        bf.BespokeSolver("rk2", 2.5)
    with pytest.raises(ValueError, match="unknown base 'rk3'"):
        bf.BespokeSolver("rk3", 4)
    with pytest.raises(ValueError, match="unknown method 'rk45'"):
        bf.solve(flow, noise(2, 8), "rk45", n_steps=4)
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
        bf.solve(flow, torch.zeros(2, 8, dtype=torch.long), "euler", n_steps=4)
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
        bf.BespokeSolver("rk1", 2).sample(flow, torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="give exactly one of n_steps"):
        bf.solve(flow, noise(2, 8), "euler")
    with pytest.raises(ValueError, match="t_grid must be finite and strictly increasing"):
        bf.solve(flow, noise(2, 8), "euler", t_grid=[0.0, 0.5, 0.4, 1.0])


def test_bad_model_outputs_are_named():
    x0 = noise(2, 8)
    with pytest.raises(ValueError, match=r"the model returned shape \(2, 4\)"):
        bf.solve(lambda x, t: x[:, :4], x0, "euler", n_steps=2)
    with pytest.raises(TypeError, match="the model returned dtype torch.float32"):
        bf.BespokeSolver("rk2", 2).sample(lambda x, t: x.float(), x0)
    with pytest.raises(FloatingPointError, match="non-finite velocity"):
        bf.solve(lambda x, t: x / 0.0, x0, "midpoint", n_steps=2, check_finite=True)
