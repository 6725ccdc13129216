"""The Levenberg-Marquardt warm-up (``bespoke_fast.fitting.gauss_newton``): its gradient is the
loss's, its steps lower the loss, it stops on NaN and when no step helps."""
import math

import pytest
import torch

from bespoke_fast.fitting.common import in_dtype
from bespoke_fast.fitting.gauss_newton import LevenbergMarquardt, gauss_newton_system, lm_step
from bespoke_fast.fitting.loop import Phase, Stopping, run_phases
from bespoke_fast.solvers.bespoke import BespokeSolver

from .helpers import gmm_trajectories


@pytest.fixture(scope="module")
def gmm_gt(tmp_path_factory):
    return gmm_trajectories(tmp_path_factory.mktemp("gn") / "gt", 48, 48)


def _endpoints(solver, model):
    def endpoints(part):
        return solver.sample(in_dtype(model, part.x0.dtype), part.x0.to(torch.float64),
                             **part.extras)
    return endpoints


def _loss_and_grad(solver, model, data):
    """mean_i log m_i and its autograd gradient (the loss the warm-up minimises)."""
    for p in solver.parameters():
        p.grad = None
    x_n = solver.sample(in_dtype(model, data.x0.dtype), data.x0.to(torch.float64))
    loss = (x_n - data.x1.to(torch.float64)).flatten(1).pow(2).mean(1).add(1e-20).log().mean()
    loss.backward()
    return float(loss), torch.cat([p.grad.reshape(-1) for p in solver.parameters()]).double()


def test_the_gauss_newton_gradient_is_the_loss_gradient(gmm_gt):
    model, gt = gmm_gt
    solver = BespokeSolver("rk2", 3)
    with torch.no_grad():          # away from the identity solver, where some terms vanish
        for p in solver.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    data = gt.subset(range(16))
    before = [p.detach().clone() for p in solver.parameters()]
    loss, g, H = gauss_newton_system(_endpoints(solver, model), solver.parameters(), data, chunk=7)
    want_loss, want_g = _loss_and_grad(solver, model, data)
    assert loss == pytest.approx(want_loss, rel=1e-6)     # float32 model: batch-size rounding
    assert torch.allclose(g, want_g, rtol=2e-2, atol=1e-3 * float(want_g.abs().max()))
    assert torch.allclose(H, H.T) and float(torch.linalg.eigvalsh(H).min()) > -1e-9
    assert all(torch.equal(p, q) for p, q in zip(solver.parameters(), before))  # left as found


def _run(solver, model, gt, endpoints, cap=4):
    train, val = gt.split(16)
    phase = Phase("warmup", cap, lambda: LevenbergMarquardt(solver.parameters()),
                  lm_step(train, endpoints, chunk=32, cost=0), val_every=1)
    return run_phases(solver, model, val, [phase], config={}, gen=torch.Generator(),
                      stopping=Stopping(max_iters=cap), checkpoint=None, progress=False,
                      validate_start=True)


def test_each_step_lowers_the_loss_and_the_fit_beats_its_start(gmm_gt):
    model, gt = gmm_gt
    solver = BespokeSolver("rk2", 3)
    state = _run(solver, model, gt, _endpoints(solver, model))
    losses = [r["loss"] for r in state.curve if r["loss"] is not None]
    assert len(losses) >= 2 and all(b < a for a, b in zip(losses, losses[1:]))
    assert state.selection.best_record["psnr"] > state.init_record["psnr"] + 3


def test_a_nan_endpoint_stops_the_phase_with_finite_parameters(gmm_gt):
    model, gt = gmm_gt
    solver = BespokeSolver("rk2", 3)
    state = _run(solver, model, gt, lambda part: torch.full_like(part.x1, math.nan, dtype=torch.float64))
    assert state.stop_reason == "nonfinite"
    assert state.events and state.events[0]["phase"] == "warmup"
    assert all(bool(torch.isfinite(p).all()) for p in solver.parameters())


def test_no_step_that_lowers_the_loss_means_converged(gmm_gt):
    model, gt = gmm_gt
    solver = BespokeSolver("rk2", 3)
    start = [p.detach().clone() for p in solver.parameters()]
    # endpoints that do not depend on the parameters: zero gradient, no trial can help
    state = _run(solver, model, gt, lambda part: part.x1.to(torch.float64) + 0.1)
    assert state.stop_reason == "converged" and state.iteration == 1
    assert all(torch.equal(p, q) for p, q in zip(solver.parameters(), start))


def test_the_state_round_trips_through_a_checkpoint():
    opt = LevenbergMarquardt([torch.zeros(3, requires_grad=True)])
    opt.lam, opt.n_iter = 0.25, 7
    again = LevenbergMarquardt([torch.zeros(3, requires_grad=True)])
    again.load_state_dict(opt.state_dict())
    assert (again.lam, again.n_iter) == (0.25, 7)


def test_a_jacobian_too_large_for_memory_is_built_in_smaller_chunks(gmm_gt, monkeypatch):
    import bespoke_fast.fitting.gauss_newton as gn
    model, gt = gmm_gt
    solver = BespokeSolver("rk2", 3)
    data = gt.subset(range(16))
    whole = gauss_newton_system(_endpoints(solver, model), solver.parameters(), data, chunk=16)
    calls = []

    def counted(part):
        calls.append(len(part))
        return _endpoints(solver, model)(part)
    monkeypatch.setattr(gn, "JACOBIAN_BYTES", 3 * 24 * 8 * 16)   # 3 rows of D = 16, P = 24
    parts = gauss_newton_system(counted, solver.parameters(), data, chunk=16)
    assert max(calls) == 3
    # the same sums over rows; only the model's float32 rounding at another batch size differs
    assert parts[0] == pytest.approx(whole[0], rel=1e-6)
    for got, want in zip(parts[1:], whole[1:]):
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-3 * float(want.abs().max()))



@pytest.mark.parametrize("budget", [5_000, 5_300, 6_000, 9_000, 12_000])
def test_the_warm_up_never_spends_past_its_budget(gmm_gt, budget):
    """Neither an iteration (its Jacobian) nor a damping trial starts where it would not fit."""
    from bespoke_fast.fitting.evals import EvalLedger
    model, gt = gmm_gt
    solver = BespokeSolver("rk2", 3)
    ledger = EvalLedger()
    counted = ledger.wrap(model)
    train, val = gt.split(16)
    phase = Phase("warmup", 50, lambda: LevenbergMarquardt(solver.parameters()),
                  lm_step(train, _endpoints(solver, counted), chunk=32, cost=0), val_every=1)
    state = run_phases(solver, model, val, [phase], config={}, gen=torch.Generator(),
                       stopping=Stopping(max_iters=50, budget_evals=budget), checkpoint=None,
                       progress=False, ledger=ledger)
    assert ledger.equivalent() <= budget
    assert state.stop_reason == "budget"
