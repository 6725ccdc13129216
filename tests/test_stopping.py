"""Training that stops when validation stops improving (bespoke_fast.fitting.stopping), the BNS
optimizer that goes on with Adam when L-BFGS stops, and the CLI saying why training stopped."""
from __future__ import annotations

import math
import time

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast.fitting.bns import train_bns
from bespoke_fast.cli import main
from bespoke_fast.fitting.stopping import (describe_stop, new_state, observe, phase_horizon,
                                   selection_score, stop_reason)
from tests.helpers import gmm_trajectories


class _Params(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


def test_selection_scores_are_db_and_higher_is_better():
    rec = {"psnr": 40.0, "psnr_set": 30.0, "rmse": 0.02, "data_range": 2.0}
    assert selection_score(rec, "per-sample") == 40.0
    assert selection_score(rec, "set") == 30.0
    assert selection_score(rec, "rmse") == pytest.approx(20 * math.log10(2 / 0.02))
    with pytest.raises(ValueError, match="unknown select"):
        selection_score(rec, "fid")


def test_observe_keeps_the_best_and_counts_validations_without_improvement():
    state, p = new_state(), _Params()
    for i, psnr in enumerate([10.0, 12.0, 12.01, 11.0, 12.5]):
        with torch.no_grad():
            p.w.fill_(i)
        observe(state, {"iteration": i, "psnr": psnr}, p, "per-sample", min_delta=0.05)
    # 12.01 is a new best (kept) but not a significant improvement; 11 is worse; 12.5 resets
    assert state["best_record"]["iteration"] == 4 and state["bad_evals"] == 0
    assert torch.equal(state["best"]["w"], torch.full((2,), 4.0))
    state["bad_evals"] = 3
    assert stop_reason(state, 10, 100, 3, None, 0.0, True) == "patience"
    assert stop_reason(state, 10, 100, 3, None, 0.0, False) is None      # only after a validation
    assert stop_reason(state, 100, 100, None, None, 0.0, False) == "max_iters"
    assert stop_reason(state, 10, 100, None, 5.0, 6.0, False) == "budget"


def test_phase_horizon_fits_the_schedule_into_the_time_left():
    assert phase_horizon(1000, 50, 5.0, None) == 1000               # no budget: the cap
    assert phase_horizon(1000, 50, 5.0, 10.0) == 150                # 0.1 s / it, 10 s left
    assert phase_horizon(100, 50, 5.0, 1000.0) == 100


@pytest.fixture(scope="module")
def gmm_gt(tmp_path_factory):
    return gmm_trajectories(tmp_path_factory.mktemp("stop_gt"), 160, 80)


def test_bespoke_training_stops_on_patience_and_keeps_the_best(gmm_gt):
    flow, gt = gmm_gt
    # a learning rate so small that nothing improves by min_delta: patience ends both phases
    solver, report = bf.train(flow, gt, base="rk2", n_steps=3, iters=200, finetune_iters=200,
                              polish_iters=0, lr=1e-7, batch_size=32, val=48, val_every=5,
                              patience=2, min_delta=0.5, budget_seconds=None, progress=False)
    assert report["bound_stop_reason"] == "patience" and report["stop_reason"] == "patience"
    # bound: the first validation improves (from nothing), two more do not; the fine-tune
    # starts from the best bound iterate, so its first two validations already do not
    assert report["iterations"] == 25
    assert [r["phase"] for r in report["curve"]] == ["bound"] * 3 + ["finetune"] * 2
    best = max(report["curve"], key=lambda r: r["psnr"])
    assert report["best"]["iteration"] == best["iteration"]
    assert "validation per-sample score did not improve" in describe_stop(report)


def test_bespoke_training_stops_on_the_budget_and_on_max_iters(gmm_gt, monkeypatch):
    flow, gt = gmm_gt
    # a clock that counts model evaluations, 50 us each: the 0.5 s budget is 10,000 sample-
    # evaluations, the same on an idle or a loaded machine (the wall clock made this test flaky)
    evaluations = [0]
    hook = flow.register_forward_pre_hook(lambda m, args: evaluations.__setitem__(
        0, evaluations[0] + args[0].shape[0]))
    monkeypatch.setattr(time, "perf_counter", lambda: evaluations[0] * 5e-5)
    try:
        _, report = bf.train(flow, gt, base="rk1", n_steps=3, iters=10 ** 6,
                             finetune_iters=10 ** 6, batch_size=16, val=48, val_every=10 ** 6,
                             budget_seconds=0.5, budget_evals=None, init="identity", patience=None,
                             progress=False)
    finally:
        hook.remove()
    # each phase ends at its share of the budget; the polish (one timed L-BFGS iteration) at all of it
    assert report["stop_reason"] == "budget" and report["bound_stop_reason"] == "budget"
    assert report["phase_stop_reasons"] == {"bound": "budget", "finetune": "budget",
                                            "warmup": "budget", "polish": "budget"}
    assert report["wall_seconds"] < 30 and report["curve"][-1]["phase"] == "polish"
    monkeypatch.undo()
    _, report = bf.train(flow, gt, base="rk1", n_steps=3, iters=6, finetune_iters=100,
                         max_iters=9, batch_size=16, val=48, val_every=4, budget_seconds=None,
                         progress=False)
    assert report["stop_reason"] == "max_iters" and report["iterations"] == 9
    assert [r["iteration"] for r in report["curve"]] == [4, 6, 8, 9]


def test_selection_by_set_level_psnr_keeps_the_best_set_level_iterate(gmm_gt):
    flow, gt = gmm_gt
    _, report = bf.train(flow, gt, base="rk1", n_steps=3, iters=40, finetune_iters=0,
                         batch_size=16, val=48, val_every=5, budget_seconds=None,
                         select="set", progress=False)
    best = max(report["curve"], key=lambda r: r["psnr_set"])
    assert report["best"]["iteration"] == best["iteration"] and report["config"]["select"] == "set"
    with pytest.raises(ValueError, match="unknown select"):
        bf.train(flow, gt, select="median", progress=False)
    with pytest.raises(ValueError, match="patience must be"):
        bf.train(flow, gt, patience=0, progress=False)


# ----------------------------------------------------------------------------- BNS on a zoo MLP
@pytest.fixture(scope="module")
def mlp_gt(tmp_path_factory):
    """GT of the trained float32 digits MLP (a zoo network, not an exact flow)."""
    zm = bf.zoo.load("digits-fmot")
    out = tmp_path_factory.mktemp("mlp_gt")
    bf.generate_trajectories(zm.model, 64, zm.shape, out, seed=0, batch_size=64, progress=False,
                             measure_interpolation=0, model_name="digits-fmot")
    return zm.model, bf.load_trajectories(out)


def test_bns_auto_goes_on_with_adam_when_lbfgs_stops_on_a_zoo_mlp(mlp_gt, tmp_path):
    model, gt = mlp_gt
    kw = dict(n_steps=4, init="midpoint", optimizer="auto", iters=4, adam_iters=12, num_train=32, num_val=32,
              val_every=4, checkpoint_every=4, budget_seconds=None, patience=None,
              progress=False, model_name="digits-fmot")
    solver, report = train_bns(model, gt, **kw)
    assert report["lbfgs_stop_reason"] in ("max_iters", "converged", "patience")
    assert report["switched_to_adam_at"] is not None and report["switched_to_adam_at"] <= 4
    assert {r["optimizer"] for r in report["curve"]} == {"lbfgs", "adam"}
    assert report["stop_reason"] == "max_iters"
    assert report["best"]["psnr"] > report["init"]["psnr"]
    # resuming across the switch ends with the same parameters
    def stop(it, record):
        if record["optimizer"] == "adam" and it >= report["switched_to_adam_at"] + 4:
            raise KeyboardInterrupt
    ckpt = tmp_path / "bns.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_bns(model, gt, checkpoint=ckpt, callback=stop, **kw)
    resumed, _ = train_bns(model, gt, checkpoint=ckpt, **kw)
    for name, p in solver.named_parameters():
        assert torch.equal(p, getattr(resumed, name)), name


def test_cli_train_says_why_it_stopped_and_eval_warns_on_training_noises(tmp_path, capsys):
    gt_dir, test_dir = tmp_path / "gt", tmp_path / "gt_test"
    for d, seed in ((gt_dir, "0"), (test_dir, "1")):
        assert main(["gt", "--model", "gmm-64", "--num", "64", "--out", str(d), "--seed", seed,
                     "--quiet", "--device", "cpu"]) == 0
    out = tmp_path / "bns.json"
    assert main(["train", "--model", "gmm-64", "--gt", str(gt_dir), "--solver", "bns", "--nfe", "4",
                 "--optimizer", "adam", "--max-iters", "6", "--budget-seconds", "60",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert "stopped after 6 iterations: iteration cap reached" in capsys.readouterr().out
    assert main(["eval", "--model", "gmm-64", "--gt", str(gt_dir), str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "was trained on GT with noise seed 0" in captured.err and "mode flips" in captured.out
    assert main(["eval", "--model", "gmm-64", "--gt", str(test_dir), str(out), "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
