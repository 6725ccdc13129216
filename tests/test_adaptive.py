"""Tests for the adaptive Dormand-Prince GT solver (bespoke_fast/solvers/adaptive.py)."""
import math

import numpy as np
import pytest
import torch

from bespoke_fast.solvers.adaptive import default_knots, solve_adaptive

B, D = 8, 16


def make_problem(dtype=torch.float64):
    """u = -x + sin(3t) tanh(x W): nonlinear, time-dependent, batched [8, 16]."""
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(D, D, generator=g, dtype=torch.float64) / 2).to(dtype)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)

    def field(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        return -x + torch.sin(3 * t)[:, None] * torch.tanh(x @ W.to(x.dtype))

    return field, x0


class Counter:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, **kw):
        self.calls += 1
        return self.model(x, t, **kw)


T_EVAL = torch.linspace(0, 1, 6, dtype=torch.float64)


def test_matches_torchdiffeq_dopri5():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field, x0 = make_problem()
    ours = solve_adaptive(field, x0, T_EVAL, rtol=1e-8, atol=1e-8)
    ref = torchdiffeq.odeint(lambda t, x: field(x, t.expand(x.shape[0])), x0, T_EVAL,
                             rtol=1e-8, atol=1e-8, method="dopri5")
    assert ours.shape == (len(T_EVAL), B, D) and ours.dtype == torch.float64
    assert torch.equal(ours[0], x0)
    # measured: 2.5e-7 (each solver's own global error is ~1e-7)
    assert (ours - ref).abs().max().item() < 1e-6


def test_matches_scipy_dop853():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    field, x0 = make_problem()

    def rhs(t, y):
        x = torch.from_numpy(y).reshape(B, D)
        return field(x, torch.full((B,), t, dtype=torch.float64)).reshape(-1).numpy()

    sol = scipy_integrate.solve_ivp(rhs, (0.0, 1.0), x0.reshape(-1).numpy(), method="DOP853",
                                    t_eval=T_EVAL.numpy(), rtol=1e-12, atol=1e-12)
    ref = torch.from_numpy(np.ascontiguousarray(sol.y.T)).reshape(len(T_EVAL), B, D)
    ours = solve_adaptive(field, x0, T_EVAL, rtol=1e-9, atol=1e-9)
    # measured: 1.3e-8
    assert (ours - ref).abs().max().item() < 1e-6


def test_dense_output_matches_separate_solves():
    field, x0 = make_problem()
    ts = torch.cat([torch.linspace(0, 1, 21, dtype=torch.float64),
                    torch.tensor([0.013, 0.377, 0.991], dtype=torch.float64)]).sort().values
    dense = solve_adaptive(field, x0, ts, rtol=1e-8, atol=1e-8)
    worst = 0.0
    for i in range(1, len(ts)):
        end = solve_adaptive(field, x0, [0.0, float(ts[i])], rtol=1e-8, atol=1e-8)[-1]
        worst = max(worst, (dense[i] - end).abs().max().item())
    assert worst < 1e-6  # measured: 1.4e-7 (global error level at rtol 1e-8)


def test_output_times_do_not_change_the_steps():
    """Output times are served by the dense output, not by step clamping: same steps, same
    endpoint, whatever t_eval holds in between."""
    field, x0 = make_problem()
    a, sa = solve_adaptive(field, x0, [0.0, 1.0], rtol=1e-7, atol=1e-7, return_stats=True)
    b, sb = solve_adaptive(field, x0, torch.linspace(0, 1, 50), rtol=1e-7, atol=1e-7,
                           return_stats=True)
    assert torch.equal(a[-1], b[-1]) and sa == sb


def test_start_inside_the_interval():
    field, x0 = make_problem()
    full = solve_adaptive(field, x0, [0.0, 0.2, 0.7], rtol=1e-9, atol=1e-9)
    part = solve_adaptive(field, full[1], [0.2, 0.7], rtol=1e-9, atol=1e-9)
    assert part.shape == (2, B, D)
    assert (part[-1] - full[-1]).abs().max().item() < 1e-7


@pytest.mark.parametrize("rtol,bound", [(1e-6, 1e-4), (1e-9, 1e-7)])
def test_linear_ode_analytic(rtol, bound):
    """dx/dt = a(t) x, a(t) = 1 + 2 cos(4t): x(t) = x0 exp(t + sin(4t) / 2)."""
    x0 = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = torch.linspace(0, 1, 11, dtype=torch.float64)

    def model(x, t):
        return (1 + 2 * torch.cos(4 * t)).reshape(-1, 1, 1) * x

    ours = solve_adaptive(model, x0, ts, rtol=rtol, atol=rtol)
    exact = x0 * torch.exp(ts + 0.5 * torch.sin(4 * ts)).reshape(-1, 1, 1, 1)
    rel = ((ours - exact).abs().max() / exact.abs().max()).item()
    assert rel < bound  # measured: 6.8e-6 (rtol 1e-6), 8.7e-9 (rtol 1e-9)


def test_float32_close_to_float64():
    field, x0 = make_problem()
    out = solve_adaptive(field, x0.float(), T_EVAL.float())  # defaults rtol = atol = 1e-5
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    same_tol = solve_adaptive(field, x0, T_EVAL)  # float64, same tolerances
    assert (out.double() - same_tol).abs().max().item() < 1e-4  # measured: 1.7e-6
    exact = solve_adaptive(field, x0, T_EVAL, rtol=1e-10, atol=1e-10)
    assert (out.double() - exact).abs().max().item() < 3e-4  # measured: 7.6e-5 (rtol-limited)


def test_stats_count_model_calls_and_extras_pass_through():
    field, x0 = make_problem()
    seen = []

    def model(x, t, label):
        seen.append(label)
        return field(x, t)

    counted = Counter(model)
    states, st = solve_adaptive(counted, x0, T_EVAL, rtol=1e-7, atol=1e-7, return_stats=True,
                                label="cat")
    assert set(st) == {"nfe", "n_accepted", "n_rejected"}
    assert st["nfe"] == counted.calls > 0 and set(seen) == {"cat"}
    # 2 calls for f(t0) and the initial step guess, then 6 per attempted step (FSAL)
    assert st["nfe"] == 2 + 6 * (st["n_accepted"] + st["n_rejected"])
    counted.calls = 0
    _, st2 = solve_adaptive(counted, x0, T_EVAL, rtol=1e-7, atol=1e-7, first_step=0.05,
                            return_stats=True, label="cat")
    assert st2["nfe"] == counted.calls == 1 + 6 * (st2["n_accepted"] + st2["n_rejected"])
    assert torch.is_tensor(solve_adaptive(field, x0, T_EVAL))  # default: the tensor alone


def test_rejected_steps_are_counted():
    field, x0 = make_problem()
    _, st = solve_adaptive(field, x0, [0.0, 1.0], rtol=1e-8, atol=1e-8, first_step=0.5,
                           return_stats=True)
    assert st["n_rejected"] >= 1


def test_dense_knots_int():
    field, x0 = make_problem()
    counted = Counter(field)
    K = 9
    states, st = solve_adaptive(counted, x0, T_EVAL, rtol=1e-8, atol=1e-8, dense_knots=K)
    assert st["nfe_knots"] == K and counted.calls == st["nfe"] + K
    assert torch.equal(st["knots_t"], default_knots(K))
    assert st["knots_x"].shape == st["knots_u"].shape == (K, B, D)
    for k in range(K):
        t = torch.full((B,), float(st["knots_t"][k]), dtype=torch.float64)
        assert torch.equal(st["knots_u"][k], field(st["knots_x"][k], t))
    assert torch.equal(st["knots_x"][0], x0)
    assert torch.equal(st["knots_x"][-1], states[-1])
    # the knot states are the dense output: the same as asking for them as t_eval
    at_knots = solve_adaptive(field, x0, st["knots_t"], rtol=1e-8, atol=1e-8)
    assert (at_knots - st["knots_x"]).abs().max().item() < 1e-12


def test_dense_knots_tensor_and_range_check():
    field, x0 = make_problem()
    knots = torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    states, st = solve_adaptive(field, x0, [0.0, 1.0], rtol=1e-8, atol=1e-8, dense_knots=knots)
    assert torch.equal(st["knots_t"], knots)
    assert torch.equal(st["knots_x"][-1], states[-1])
    with pytest.raises(ValueError, match="dense_knots must lie within"):
        solve_adaptive(field, x0, [0.0, 0.5], dense_knots=knots)
    with pytest.raises(ValueError, match="dense_knots must be strictly increasing"):
        solve_adaptive(field, x0, [0.0, 1.0], dense_knots=[0.0, 0.5, 0.5, 1.0])


def test_default_knots():
    for K in (2, 3, 17, 100):
        t = default_knots(K)
        assert t.shape == (K,) and t[0].item() == 0.0 and t[-1].item() == 1.0
        assert bool((t[1:] > t[:-1]).all())
    d = torch.diff(default_knots(33))
    assert d[-1] < 0.6 * d[0] and bool((d[1:] <= d[:-1] + 1e-15).all())  # denser near t = 1
    assert default_knots(5, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="K must be an int >= 2"):
        default_knots(1)


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("t_eval,match", [
    ([0.0, 0.5, 0.5, 1.0], "t_eval must be strictly increasing"),
    ([1.0, 0.0], "t_eval must be strictly increasing"),
    ([0.0, 1.5], r"t_eval must lie in \[0, 1\]"),
    ([-0.1, 1.0], r"t_eval must lie in \[0, 1\]"),
    ([0.0], "t_eval must be .* length >= 2"),
    ([[0.0, 1.0]], "t_eval must be .* length >= 2"),
    ([0.0, float("nan")], "t_eval must be finite"),
    ("abc", "t_eval must be a 1-D sequence of floats"),
])
def test_bad_t_eval(t_eval, match):
    field, x0 = make_problem()
    with pytest.raises(ValueError, match=match):
        solve_adaptive(field, x0, t_eval)


def test_bad_x0_and_tolerances():
    field, x0 = make_problem()
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
        solve_adaptive(field, torch.ones(2, 3, dtype=torch.int64), [0.0, 1.0])
    for name in ("rtol", "atol"):
        for bad in (0.0, -1e-5, math.inf, "1e-5"):
            with pytest.raises(ValueError, match=f"{name} must be a positive finite float"):
                solve_adaptive(field, x0, [0.0, 1.0], **{name: bad})
    with pytest.raises(ValueError, match="first_step must be a positive finite float"):
        solve_adaptive(field, x0, [0.0, 1.0], first_step=0.0)


def test_model_wrong_shape():
    _, x0 = make_problem()
    with pytest.raises(ValueError, match="returned shape"):
        solve_adaptive(lambda x, t: x[:, :3], x0, [0.0, 1.0])


def test_model_returns_nan():
    field, x0 = make_problem()

    def model(x, t):
        u = field(x, t)
        return u * float("nan") if float(t[0]) > 0.5 else u

    with pytest.raises(FloatingPointError, match="non-finite"):
        solve_adaptive(model, x0, [0.0, 1.0])


def test_max_steps_exceeded():
    field, x0 = make_problem()
    with pytest.raises(RuntimeError, match=r"max_steps=3 exceeded at t=.*step size.*loosen"):
        solve_adaptive(field, x0, [0.0, 1.0], rtol=1e-10, atol=1e-10, max_steps=3)
