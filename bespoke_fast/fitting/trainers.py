"""The trainers by solver kind: one :class:`Trainer` per kind of the solver registry
(``bespoke_fast.solvers.registry``), and what follows from their options.

A trainer has ``kind`` (the solver kind it fits), ``title`` (its name in messages), what the
fit job needs of it (``fit_header``, ``file_label``, ``start_names``, ``min_train``,
``min_val``, ``streams_gt``, ``fit_options(settings)``),
``Options`` (a frozen dataclass of every option with its default; each field's
``metadata["help"]`` says what it does, its unit and default), ``lacks`` (why it has no such
option, for options other kinds have), ``planned_evaluations(options, num_train, num_val,
nfe)`` and ``train(model, trajectories, options, *, checkpoint, progress, model_name,
callback) -> (solver, report)``.

Example::

    >>> from bespoke_fast.fitting import trainer_for, options_lacking
    >>> trainer = trainer_for("bns")
    >>> solver, report = trainer.train(model, gt, trainer.Options(n_steps=8, iters=50))
    >>> sorted(options_lacking("bns"))[:2]
    ['L_tau', 'activation_checkpointing']
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

from .._checks import InvalidArgumentError
from ..solvers.registry import kinds
from .bespoke import TRAINER as BESPOKE
from .bns import TRAINER as BNS

__all__ = ["Trainer", "TRAINERS", "DEFAULT_KIND", "trainer_for", "option_names", "options_lacking"]


class Trainer(Protocol):
    """The interface of a kind's trainer (see the module docstring)."""

    kind: str
    title: str
    Options: type
    lacks: dict
    fit_header: str        # the header the fit job counts steps with (``steps_for_nfe``)
    file_label: str        # the fit job's solver file is ``<model>_<file_label>_nfe<N>.json``
    start_names: tuple     # the named starts of ``init`` (else a solver)
    min_train: int         # the fewest training / validation trajectories it accepts
    min_val: int
    streams_gt: bool       # whether it can train on GT rows streamed from the shards

    def fit_options(self, settings: dict) -> dict: ...

    def planned_evaluations(self, options, num_train: int, num_val: int, nfe: int) -> tuple: ...

    def train(self, model, trajectories, options, *, checkpoint=None, progress: bool = True,
              model_name: str = "", callback=None) -> tuple: ...


TRAINERS = {trainer.kind: trainer for trainer in (BESPOKE, BNS)}
DEFAULT_KIND = BESPOKE.kind     # what bespoke_fast.fit and the CLI fit without --solver


def trainer_for(kind: str) -> Trainer:
    """The trainer of the solver kind ``kind``; ``InvalidArgumentError`` naming the kinds when
    there is none. For compatibility it also unpacks as ``train, options = trainer_for(kind)``
    (the keyword function, e.g. ``bespoke_fast.train``, and the default options)."""
    if kind not in TRAINERS:
        raise InvalidArgumentError(f"no trainer for solver kind {kind!r}; expected one of {kinds()}")
    return TRAINERS[kind]


def option_names(kind: str) -> tuple:
    """The names of the options of ``kind``'s trainer, in field order."""
    return tuple(f.name for f in dataclasses.fields(trainer_for(kind).Options))


def options_lacking(kind: str) -> dict:
    """``{option: why}`` for every option another kind's trainer has and ``kind``'s lacks
    (derived from the ``Options`` dataclasses; the reason from the trainer's ``lacks``, else
    the kinds that have it)."""
    own, trainer = set(option_names(kind)), trainer_for(kind)
    out = {}
    for other in TRAINERS:
        for name in option_names(other):
            if name not in own and name not in out:
                havers = [k for k in TRAINERS if name in option_names(k)]
                out[name] = trainer.lacks.get(name, f"an option of --solver {' / '.join(havers)}")
    return dict(sorted(out.items()))
