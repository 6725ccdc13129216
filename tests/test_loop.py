"""The one training loop (bespoke_fast.fitting.loop) and the trainer interface
(bespoke_fast.fitting.trainers): the checkpointed TrainState, stale checkpoints, the options and
what a kind lacks, derived from the Options dataclasses."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast._checks import InvalidArgumentError, InvalidFileError, InvalidTypeError
from bespoke_fast.fitting import options_lacking, trainer_for
from bespoke_fast.fitting.loop import TrainState
from bespoke_fast.fitting.stopping import Selection
from bespoke_fast.fitting.trainers import TRAINERS, option_names
from bespoke_fast.fitting.trajectories import Trajectories, fingerprint
from bespoke_fast.solvers.registry import kinds
from tests.helpers import gmm_trajectories


@pytest.fixture(scope="module")
def gt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loop_gt")


@pytest.fixture(scope="module")
def gmm_gt(gt_dir):
    return gmm_trajectories(gt_dir, 96, 48)


def test_every_kind_has_a_trainer_and_every_option_says_its_default():
    assert set(TRAINERS) == set(kinds())
    for kind in kinds():
        trainer = trainer_for(kind)
        assert trainer.kind == kind and trainer.title
        for f in dataclasses.fields(trainer.Options):
            text = f.metadata.get("help", "")
            assert "default" in text, (kind, f.name, text)


def test_what_a_kind_lacks_is_derived_from_the_options():
    for kind in kinds():
        others = {n for k in kinds() if k != kind for n in option_names(k)}
        assert set(options_lacking(kind)) == others - set(option_names(kind))
        assert set(trainer_for(kind).lacks) <= set(options_lacking(kind)), kind
    assert "finetune_iters" in options_lacking("bns") and "optimizer" in options_lacking("bespoke")


def test_train_state_round_trips_and_a_stale_one_is_one_line():
    state = TrainState(iteration=7, phase="adam", curve=[{"iteration": 5, "psnr": 30.0}],
                       selection=Selection(best={"w": torch.ones(2)}, best_score=30.0))
    back = TrainState.from_dict(state.to_dict())
    assert back.iteration == 7 and back.curve == state.curve and back.selection.best_score == 30.0
    assert torch.equal(back.selection.best["w"], torch.ones(2))
    old = {"iteration": 7, "curve": [], "best": None, "phase": "adam"}     # the old string-keyed dict
    with pytest.raises(InvalidFileError, match="another bespoke_fast version") as e:
        TrainState.from_dict(old, "ck.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidFileError, match="damaged training checkpoint"):
        TrainState.from_dict({**state.to_dict(), "nonsense": 1}, "ck.pt")


def test_a_checkpoint_of_the_old_format_is_refused_in_one_line(gmm_gt, tmp_path):
    flow, gt = gmm_gt
    kw = dict(base="rk1", n_steps=3, iters=4, finetune_iters=0, batch_size=16, val=32, val_every=2,
              init="identity", budget_seconds=None, progress=False)
    ckpt = tmp_path / "ck.pt"
    bf.train(flow, gt, checkpoint=ckpt, **kw)
    saved = torch.load(ckpt, weights_only=True)
    saved["state"] = {"iteration": 4, "curve": [], "best": None}        # as an older release wrote
    torch.save(saved, ckpt)
    with pytest.raises(InvalidFileError, match="another bespoke_fast version"):
        bf.train(flow, gt, checkpoint=ckpt, **kw)


def test_the_trainer_interface_runs_a_fit_as_the_keywords_do(gmm_gt):
    flow, gt = gmm_gt
    trainer = trainer_for("bespoke")
    opts = trainer.Options(base="rk1", n_steps=3, iters=6, finetune_iters=0, polish_iters=0,
                           batch_size=16, val=32, val_every=3, init="identity",
                           budget_seconds=None)
    a, report = trainer.train(flow, gt, opts, progress=False)
    b, _ = bf.train(flow, gt, progress=False, **dataclasses.asdict(opts))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [r["iteration"] for r in report["curve"]] == [3, 6]
    with pytest.raises(InvalidTypeError, match="options must be BespokeOptions"):
        trainer.train(flow, gt, {"iters": 3})
    with pytest.raises(InvalidTypeError, match="unexpected keyword argument"):
        bf.train(flow, gt, iterations=3)
    # the plan is an upper bound on what the fit spends, and the budget caps it
    planned = trainer.planned_evaluations(opts, len(gt) - 32, 32, 3)
    assert report["evaluations"]["total"]["forward_equivalent"] <= planned
    assert trainer.planned_evaluations(dataclasses.replace(opts, budget_evals=1000),
                                       len(gt) - 32, 32, 3) == 1000


def test_bns_takes_val_and_num_val_as_one_option(gmm_gt):
    from bespoke_fast.fitting.bns import train_bns
    flow, gt = gmm_gt
    kw = dict(n_steps=4, init="midpoint", optimizer="lbfgs", iters=2, num_train=32,
              budget_seconds=None, progress=False)
    _, a = train_bns(flow, gt, val=32, **kw)
    _, b = train_bns(flow, gt, num_val=32, **kw)
    assert a["config"]["num_val"] == b["config"]["num_val"] == 32 and a["best"] == b["best"]
    with pytest.raises(InvalidArgumentError, match="num_val=16 and val=32 both set val"):
        train_bns(flow, gt, val=32, num_val=16, **kw)


def test_one_fingerprint_for_the_loaded_and_the_streamed_set(gmm_gt, gt_dir):
    flow, gt = gmm_gt
    streamed = bf.load_trajectories(gt_dir, stream=True)
    assert isinstance(gt, Trajectories) and isinstance(streamed, Trajectories)
    whole = gt.fingerprint()
    assert fingerprint(len(gt), lambda lo, hi: gt.subset(range(lo, hi)), chunk=7) == whole
    assert streamed.fingerprint(chunk=5) == whole and len(whole) == 16
    assert gt.subset(range(3)).fingerprint() != whole


def test_bns_trains_on_a_streamed_set_as_on_the_loaded_one(gmm_gt, gt_dir):
    from bespoke_fast.fitting.bns import train_bns
    flow, gt = gmm_gt
    kw = dict(n_steps=4, init="midpoint", optimizer="lbfgs", iters=3, num_train=32, val=32,
              budget_seconds=None, progress=False)
    loaded, _ = train_bns(flow, gt, **kw)
    streamed, _ = train_bns(flow, bf.load_trajectories(gt_dir, stream=True), **kw)
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), streamed.parameters()))
    with pytest.raises(TypeError, match="trajectories must be a TrajectorySet"):
        train_bns(flow, {"x0": gt.x0}, **kw)


def test_a_share_counted_from_the_phase_start_never_passes_the_whole_budget():
    from bespoke_fast.fitting.loop import Phase, Stopping, _deadlines
    phase = Phase("warmup", 10, None, None, budget_share=0.5, budget_from_start=True)
    state = TrainState(phase_evals=150_000, phase_wall=80.0)
    seconds, evals = _deadlines(phase, state, Stopping(max_iters=10, budget_seconds=100.0,
                                                       budget_evals=200_000))
    assert (seconds, evals) == (100.0, 200_000)        # not 130 s and 250,000
    state = TrainState(phase_evals=20_000, phase_wall=10.0)
    assert _deadlines(phase, state, Stopping(max_iters=10, budget_seconds=100.0,
                                             budget_evals=200_000)) == (60.0, 120_000)
