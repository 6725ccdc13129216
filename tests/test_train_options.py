"""The trainers' options: one config per trainer, the same names and types where both kinds have
an option, and every kind of the solver registry has a trainer."""
import dataclasses
import inspect

import pytest
import torch

from bespoke_fast.fitting import trainer_for
from bespoke_fast.fitting.trainers import TRAINERS
from bespoke_fast.fitting.bespoke import BespokeOptions
from bespoke_fast.fitting.bns import BNSOptions
from bespoke_fast.solvers.base import kinds


@pytest.mark.parametrize("kind", kinds())
def test_every_kind_has_a_trainer_whose_keywords_default_to_its_options(kind):
    train, options = trainer_for(kind)
    params = inspect.signature(train).parameters
    for f in dataclasses.fields(options):
        assert f.name in params, (kind, f.name)
        assert params[f.name].default == getattr(options, f.name), (kind, f.name)


def test_shared_options_have_the_same_names_and_types():
    bespoke = {f.name: f.type for f in dataclasses.fields(BespokeOptions)}
    bns = {f.name: f.type for f in dataclasses.fields(BNSOptions)}
    shared = set(bespoke) & set(bns)
    assert {"iters", "batch_size", "lr", "val", "val_every", "budget_seconds", "patience",
            "select", "max_iters"} <= shared
    # the same type, or the same with None allowed (BNS picks some defaults itself)
    for name in shared:
        assert bns[name].replace(" | None", "") == bespoke[name].replace(" | None", ""), name


def test_trainer_for_an_unknown_kind_names_the_kinds():
    with pytest.raises(ValueError, match="no trainer for solver kind 'rk9'"):
        trainer_for("rk9")


def test_every_trainer_option_has_a_train_flag_made_from_its_metadata():
    """The train command's flags come from the Options dataclasses: one per option (besides
    --nfe and --seed), its help the field's, marked with the kinds that have it."""
    import argparse
    from bespoke_fast.cli.train import _train_options, trainer_flags
    p = argparse.ArgumentParser()
    trainer_flags(p)
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    for kind, trainer in TRAINERS.items():
        for f in dataclasses.fields(trainer.Options):
            if f.name in ("n_steps", "seed"):
                continue
            assert f.name in flags, f.name
            assert f.metadata["help"].split(";")[0][:40] in flags[f.name].help.replace("%%", "%")
    assert flags["finetune_iters"].help.startswith("bespoke only: ")
    assert flags["optimizer"].help.startswith("bns only: ") and flags["optimizer"].choices
    # values: a dtype name becomes the dtype, 0 gives None to an option that takes None
    args = p.parse_args(["--dtype", "float32", "--budget-evals", "0", "--patience", "0",
                         "--warmup-pairs", "0"])
    args.solver, args.base = "bns", None
    opts = _train_options(args)
    assert opts["dtype"] is torch.float32 and opts["budget_evals"] is None
    assert opts["patience"] is None and opts["warmup_pairs"] == 0     # an int option: 0 stays 0
