"""The trainers' options: one config per trainer, the same names and types where both kinds have
an option, and every kind of the solver registry has a trainer."""
import dataclasses
import inspect

import pytest

from bespoke_fast.fitting import trainer_for
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
