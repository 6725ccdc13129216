"""The learned-grid peers of bench/quality.py (bench/peers_learned.py).

* On diffusers' own grid, our DPM-Solver++(2M) and UniPC (bh2) equal diffusers' flow schedulers
  driven by the same velocity model (float64), so the learned-grid versions are those solvers.
* iPNDM and the midpoint rule on the uniform grid converge at their orders; midpoint equals
  ``bespoke_fast.solve``.
* Fitting the grid (LD3) improves the validation PSNR; the GITS DP beats the uniform grid on
  the training trajectories' local errors and returns a valid grid.
"""
from __future__ import annotations

import pytest
import torch

import bespoke_fast as bf
from bench import peers_learned as pl
from bench.harness import Counted
from bench.peers import diffusers_sample, diffusers_scheduler
from tests.helpers import smooth_gmm


def smooth_velocity(x, t):
    tt = t.reshape(-1, *([1] * (x.dim() - 1)))
    return 0.5 * torch.sin(3 * tt + 1) * x - 0.3 * torch.tanh(x) + tt


@pytest.fixture(scope="module")
def x0():
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("name,method", [("dpm++2m", "dpm++2m"), ("unipc", "unipc")])
@pytest.mark.parametrize("nfe", [4, 7, 10])
def test_multistep_solvers_equal_diffusers_on_its_grid(x0, name, method, nfe):
    pytest.importorskip("diffusers")
    sched = diffusers_scheduler(name, nfe)
    grid = (1.0 - sched.sigmas.to(torch.float64))           # t = 1 - sigma, ends at 1
    c = Counted(smooth_velocity)
    got = pl.sample_on_grid(c, x0, method, grid)
    want = diffusers_sample(smooth_velocity, x0, name, nfe)
    assert c.calls == nfe
    # diffusers keeps its sigmas and coefficients in float32: agreement to float32 rounding
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)


def test_midpoint_and_ipndm_on_the_uniform_grid(x0):
    ref = bf.solve(smooth_velocity, x0, "rk4", n_steps=200)
    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    torch.testing.assert_close(pl.sample_on_grid(smooth_velocity, x0, "midpoint", t),
                               bf.solve(smooth_velocity, x0, "midpoint", n_steps=5), rtol=0, atol=1e-12)
    errs = []
    for n in (8, 16, 32):
        t = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        errs.append(float((pl.sample_on_grid(smooth_velocity, x0, "ipndm", t) - ref).abs().max()))
    # the Euler warm-up step limits the global order to 2 (Euler alone would give ratios of 2)
    assert errs[0] / errs[1] > 3.2 and errs[1] / errs[2] > 3.2, errs


def test_learned_grid_solver_starts_uniform_and_keeps_nfe(x0):
    for method, nfe in (("ipndm", 6), ("dpm++2m", 6), ("unipc", 6), ("midpoint", 6)):
        s = pl.LearnedGridSolver(method, nfe)
        c = Counted(smooth_velocity)
        s.sample(c, x0)
        assert c.calls == nfe
        t, tm = (v.detach() for v in s.times())
        assert float(t[-1]) == 1.0 and (t[1:] > t[:-1]).all() and tm.shape == (nfe,)
    with pytest.raises(ValueError, match="unknown method"):
        pl.LearnedGridSolver("rk4", 4)


@pytest.fixture(scope="module")
def gmm_gt(tmp_path_factory):
    flow = smooth_gmm(dim=8, k=4, std_range=(0.1, 0.3))
    out = tmp_path_factory.mktemp("lg") / "gt"
    bf.generate_trajectories(flow, 96, (8,), out, batch_size=96, progress=False,
                             measure_interpolation=0)
    return flow, bf.load_trajectories(out)


@pytest.mark.parametrize("method", ["dpm++2m", "unipc"])
def test_ld3_fit_improves_validation(gmm_gt, method):
    flow, gt = gmm_gt
    train, val = gt.split(32)
    solver, rep = pl.fit_ld3(flow, method, 4, train, val, iters=40, batch_size=32, val_every=10,
                             budget_seconds=None, patience=None)
    assert rep["best"]["psnr"] > rep["curve"][0]["psnr"] + 1, rep["curve"]
    assert rep["stop_reason"] == "max_iters" and rep["iterations"] == 40


def test_ld3_soft_teacher_runs(gmm_gt):
    flow, gt = gmm_gt
    train, val = gt.split(32)
    _, rep = pl.fit_ld3(flow, "ipndm", 4, train, val, iters=10, batch_size=16, val_every=5,
                        prior_bound=0.1, budget_seconds=None, patience=None)
    assert rep["best"]["psnr"] >= rep["curve"][0]["psnr"]


def test_gits_midpoint_beats_the_uniform_grid(gmm_gt):
    flow, gt = gmm_gt
    train, val = gt.split(32)
    solver, rep = pl.fit_gits_midpoint(flow, 6, train, candidates=24, batch=32)
    t = torch.tensor(rep["grid"])
    assert t[0] == 0 and t[-1] == 1 and len(t) == 4 and (t[1:] > t[:-1]).all()
    ours = bf.evaluate(flow, solver, val, intervals=False)["psnr"]
    assert ours > bf.evaluate(flow, "midpoint@6", val, intervals=False)["psnr"]


@pytest.mark.parametrize("base,method", [("rk1", "euler"), ("rk2", "midpoint")])
def test_searched_solver_is_the_base_solver_on_the_searched_grid(gmm_gt, base, method):
    from bespoke_fast.fitting.grid_search import search_grid, searched_solver
    flow, gt = gmm_gt
    train, val = gt.split(32)
    grid = search_grid(flow, train, 3, method, candidates=12, batch=16)
    solver = searched_solver(flow, train, base, 3, candidates=12, batch=16)
    x = x0 = val.x0.double()
    for i in range(3):          # the base method on the searched grid, written out
        t, h = grid[i], grid[i + 1] - grid[i]
        u = flow(x, t.expand(len(x)))
        if method == "midpoint":
            u = flow(x + h / 2 * u, (t + h / 2).expand(len(x)))
        x = x + h * u
    torch.testing.assert_close(solver.sample(flow, x0), x, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs at least as many candidates"):
        search_grid(flow, train, 20, method, candidates=8)


def test_trainer_starts_from_the_searched_grid_or_the_identity(gmm_gt):
    flow, gt = gmm_gt
    kw = dict(base="rk2", n_steps=2, iters=1, finetune_iters=0, polish_iters=0, lr=1e-12, val=32,
              val_every=1, budget_seconds=None, progress=False)
    searched, _ = bf.train(flow, gt, init="searched", **kw)
    identity, _ = bf.train(flow, gt, init="identity", **kw)
    t_id = identity.tables()["t"].detach()
    torch.testing.assert_close(t_id, torch.linspace(0, 1, 5, dtype=t_id.dtype), rtol=0, atol=1e-9)
    assert not torch.allclose(searched.tables()["t"].detach(), t_id)
    with pytest.raises(ValueError, match="init must be"):
        bf.train(flow, gt, init="random", **kw)


def test_auto_init_starts_from_the_start_whose_trial_scores_best(gmm_gt):
    from bespoke_fast.fitting.bespoke import SCREEN_ITERS, SEARCH_BATCH, screen_starts
    from bespoke_fast.fitting.common import validate_solver
    from bespoke_fast.fitting.grid_search import GRID_FAMILIES, candidate_starts
    flow, gt = gmm_gt
    train, val = gt.split(32)
    # the screening: every start's trial trains it (its score beats the start's own), and the
    # start of the best trial is returned untrained
    start, record = screen_starts(flow, train, val, "rk2", 2)
    starts = candidate_starts(flow, train, "rk2", 2, candidates=32, batch=SEARCH_BATCH)
    assert [c["start"] for c in record["candidates"]] == ["searched", *GRID_FAMILIES] == list(starts)
    for c in record["candidates"]:
        assert c["iterations"] == SCREEN_ITERS
        assert c["psnr"] > validate_solver(starts[c["start"]], flow, val)["psnr"], c
    scores = {c["start"]: c["score"] for c in record["candidates"]}
    assert record["chosen"] == max(scores, key=scores.get)
    assert start.state_dict().keys() == starts[record["chosen"]].state_dict().keys()
    for k, v in start.state_dict().items():
        torch.testing.assert_close(v, starts[record["chosen"]].state_dict()[k], rtol=0, atol=0)
    assert record["nfe"] == len(starts) * (SCREEN_ITERS * 128 * 4 + 32 * 4)
    # the trainer's init="auto" runs exactly this screening and starts from its choice
    kw = dict(base="rk2", n_steps=2, iters=1, finetune_iters=0, polish_iters=0, lr=1e-12, val=32,
              budget_seconds=None, budget_evals=None, init="auto", progress=False)
    solver, report = bf.train(flow, gt, **kw)
    _, same = screen_starts(flow, train, val, "rk2", 2, iters=1, lr=1e-12)
    assert report["start"]["candidates"] == [dict(c, seconds=r["seconds"]) for c, r in
                                             zip(same["candidates"], report["start"]["candidates"])]
    chosen = starts[report["start"]["chosen"]]
    torch.testing.assert_close(solver.tables()["t"].detach(), chosen.tables()["t"], rtol=0,
                               atol=1e-9)
    # the screening's trials and validations, then one bound iteration of 128 x 4 rows
    assert report["evaluations"]["start"]["forward"] > report["start"]["nfe"]   # + the grid search
    assert report["evaluations"]["bound"]["forward"] == report["evaluations"]["bound"]["backward"] == 128 * 4
    # a trial ends early when its share of the time runs out
    _, quick = screen_starts(flow, train, val, "rk2", 2, iters=10_000, seconds=0.5)
    assert all(c["iterations"] < 10_000 for c in quick["candidates"])
