"""Model evaluations are counted exactly (against a model that counts its own rows), budgets in
evaluations hold, and a phase that turns NaN stops at once with its best parameters restored."""
import math

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast.fitting.bns import train_bns
from bespoke_fast.fitting.evals import EvalLedger, forward_equivalent, summary
from bespoke_fast.fitting.stopping import describe_stop

from .helpers import smooth_gmm


class _CountRows(torch.autograd.Function):
    """Identity whose backward adds the rows it carries to ``calls["backward"]``."""

    @staticmethod
    def forward(ctx, u, calls):
        ctx.calls, ctx.rows = calls, u.shape[0]
        return u.view_as(u)

    @staticmethod
    def backward(ctx, grad):
        ctx.calls["backward"] += ctx.rows
        return grad, None


class CountingModel(torch.nn.Module):
    """A velocity model that counts its own forward rows and the rows its backward carries;
    ``nan_rows``: return NaN for grad-enabled calls on more rows than this (a model that makes
    a full-batch phase diverge while the smaller warm-up runs clean)."""

    def __init__(self, inner, nan_rows=None):
        super().__init__()
        self.inner, self.nan_rows = inner, nan_rows
        self.calls = {"forward": 0, "backward": 0}

    def forward(self, x, t, **extras):
        self.calls["forward"] += x.shape[0]
        u = self.inner(x, t, **extras)
        if self.nan_rows is not None and torch.is_grad_enabled() and x.shape[0] > self.nan_rows:
            u = u * float("nan")
        return _CountRows.apply(u, self.calls) if u.requires_grad else u

    def reset(self):
        self.calls.update(forward=0, backward=0)


@pytest.fixture(scope="module")
def counted_gt(tmp_path_factory):
    model = CountingModel(smooth_gmm(dim=16, k=6, std_range=(0.1, 0.3)))
    out = tmp_path_factory.mktemp("evals") / "gt"
    manifest = bf.generate_trajectories(model, 96, (16,), out, batch_size=48, progress=False,
                                        measure_interpolation=4)
    return model, bf.load_trajectories(out), manifest


def test_the_ledger_counts_forward_and_backward_rows_by_stage():
    ledger = EvalLedger()
    model = CountingModel(smooth_gmm(dim=4, k=2))
    counted = ledger.wrap(model)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    with ledger.charging("polish"):
        counted(x, torch.full((5,), 0.3, dtype=torch.float64)).sum().backward()
    with ledger.charging("validation"), torch.no_grad():
        counted(x[:3], torch.full((3,), 0.3, dtype=torch.float64))
    assert ledger.counts == {"polish": [5, 5], "validation": [3, 0]}
    assert ledger.equivalent() == 5 + 2 * 5 + 3 == forward_equivalent(8, 5)
    assert summary(ledger.counts)["total"] == {"forward": 8, "backward": 5, "forward_equivalent": 18}
    assert model.calls == {"forward": 8, "backward": 5}
    assert ledger.wrap(counted) is counted


def test_the_gt_manifest_counts_every_model_row(counted_gt, tmp_path):
    model, _, _ = counted_gt
    model.reset()
    manifest = bf.generate_trajectories(model, 40, (16,), tmp_path / "gt", batch_size=16,
                                        progress=False, measure_interpolation=4)
    assert model.calls["backward"] == 0
    assert model.calls["forward"] == (manifest["nfe"]["total"]
                                      + manifest["interpolation"]["evaluations"])


@pytest.mark.parametrize("options", [
    {},                                                            # the default recipe
    {"init": "auto", "finetune_iters": 4, "iters": 4, "batch_size": 16, "val_every": 2,
     "micro_batch": 8, "activation_checkpointing": True},         # every phase, recomputed forwards
])
def test_the_bespoke_report_counts_exactly_what_the_model_ran(counted_gt, options):
    model, gt, _ = counted_gt
    model.reset()
    solver, report = bf.train(model, gt, base="rk2", n_steps=2, val=24, budget_evals=60_000,
                              progress=False, **options)
    total = report["evaluations"]["total"]
    assert (total["forward"], total["backward"]) == (model.calls["forward"], model.calls["backward"])
    assert total["forward_equivalent"] == model.calls["forward"] + 2 * model.calls["backward"]
    assert total["forward_equivalent"] <= 60_000
    stages = set(report["evaluations"]) - {"total"}
    assert {"start", "validation", "polish"} <= stages
    assert report["nfe"]["validation"] == report["evaluations"]["validation"]["forward"]
    if options:
        assert {"bound", "finetune"} <= stages
        # recomputed in the backward: more forward rows than backward ones in the gradient phases
        assert report["evaluations"]["bound"]["forward"] == 2 * report["evaluations"]["bound"]["backward"]


def test_the_bns_report_counts_its_bespoke_start_too(counted_gt):
    model, gt, _ = counted_gt
    model.reset()
    solver, report = train_bns(model, gt, n_steps=4, val=24, budget_evals=80_000, iters=40,
                               progress=False)
    total = report["evaluations"]["total"]
    assert (total["forward"], total["backward"]) == (model.calls["forward"], model.calls["backward"])
    assert total["forward_equivalent"] <= 80_000
    assert any(name.startswith("bespoke-") for name in report["evaluations"])
    assert report["config"]["budget_evals"] == 80_000
    # the warm-up's share counts from where BNS starts, not from the Bespoke stage's start
    assert report["evaluations"]["warmup"]["forward"] > 0


@pytest.mark.parametrize("budget", [30_000, 60_000])
def test_an_evaluation_budget_ends_the_fit_within_it(counted_gt, budget):
    model, gt, _ = counted_gt
    solver, report = bf.train(model, gt, base="rk2", n_steps=2, val=24, budget_evals=budget,
                              progress=False)
    spent = report["evaluations"]["total"]["forward_equivalent"]
    assert budget * 0.7 <= spent <= budget
    assert report["stop_reason"] == "budget"
    assert "model evaluations" in describe_stop(report)


def test_budget_evals_must_be_a_whole_positive_number(counted_gt):
    model, gt, _ = counted_gt
    for bad in (0, -5, 1.5, True):
        with pytest.raises(bf.InvalidArgumentError, match="budget_evals"):
            bf.train(model, gt, n_steps=2, val=24, budget_evals=bad, progress=False)


def test_a_diverging_polish_stops_at_once_and_keeps_the_best(counted_gt):
    model, gt, _ = counted_gt
    # the warm-up's 16 pairs run clean; the polish's full batch (72 rows per call) turns NaN
    diverging = CountingModel(model.inner, nan_rows=40)
    diverging.load_state_dict(model.state_dict())
    solver, report = bf.train(diverging, gt, base="rk2", n_steps=2, val=24, warmup_pairs=16,
                              budget_evals=60_000, progress=False)
    assert report["phase_stop_reasons"]["polish"] == "nonfinite"
    assert report["stop_reason"] == "nonfinite"
    [event] = report["events"]
    assert event["phase"] == "polish" and "non-finite" in event["event"]
    assert event["restored_iteration"] == report["best"]["iteration"]
    # stopped at the first NaN: one loss evaluation of the polish, nothing more
    polish = report["evaluations"]["polish"]
    assert polish["forward"] == (len(gt) - 24) * solver.nfe
    assert all(bool(torch.isfinite(p).all()) for p in solver.parameters())
    assert math.isfinite(report["best"]["psnr"])
    assert report["best"]["phase"] == "warmup"
    assert "non-finite" in describe_stop(report)
    # the kept solver is the best validated one: it samples what the record says
    again = bf.evaluate(model, solver, gt.split(24)[1])
    assert again["psnr"] == pytest.approx(report["best"]["psnr"], abs=1e-6)


def test_a_diverging_bns_phase_hands_over_with_the_best_parameters(counted_gt):
    model, gt, _ = counted_gt
    diverging = CountingModel(model.inner, nan_rows=40)
    diverging.load_state_dict(model.state_dict())
    solver, report = train_bns(diverging, gt, n_steps=4, val=24, init="midpoint",
                               warmup_pairs=16, iters=20, budget_evals=60_000, progress=False)
    # the warm-up (no gradients: it runs clean) ends on its cap; L-BFGS on all pairs turns NaN
    # at once, and so does the Adam that takes over from its best
    assert report["phase_stop_reasons"] == {"warmup": "max_iters", "lbfgs": "nonfinite",
                                            "adam": "nonfinite"}
    assert [e["phase"] for e in report["events"]] == ["lbfgs", "adam"]
    assert report["stop_reason"] == "nonfinite"
    assert all(bool(torch.isfinite(p).all()) for p in solver.parameters())
    assert math.isfinite(report["best"]["psnr"]) and report["best"]["psnr"] >= report["init"]["psnr"]
