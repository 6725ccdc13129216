"""The one training loop of every trainer: :func:`run_phases` runs a list of :class:`Phase` (the
phases are data) and owns what both kinds of solver fit share: time budgets, stopping, keeping
the best parameters, checkpoint / resume and the multi-rank stop. A trainer says what its phases
are (optimizer, step, cap, budget share, validation cadence) and what happens before the first
one (its start); all the state a resumed run needs is one :class:`TrainState`, checkpointed as a
whole with the solver, the optimizer and the batch generator.

Per iteration, for the current phase (``cap``: its iteration cap;
``budget``: its wall-clock deadline, ``budget_share`` of ``budget_seconds``, counted from the
phase's start when ``budget_from_start``):

1. ``done, loss = phase.step(ctx, k)``: one Adam iteration, or several L-BFGS ones
   (:func:`lbfgs_step`);
2. validate when the cadence says so (every ``val_every`` iterations, counted from 0 or from the
   phase's start), at the cap, out of time or when L-BFGS converged; keep the best
   (``bespoke_fast.fitting.stopping.observe``); the first validation of a phase with
   ``sets_horizon`` fits its learning-rate schedule into the time left
   (``bespoke_fast.fitting.stopping.phase_horizon``);
3. the stop decision (``converged``, ``patience``, ``budget``, ``max_iters``) is rank 0's on
   every rank (``bespoke_fast.fitting.stopping.rank0_decides``), with its learning-rate horizon
   and whether the whole budget is spent;
4. a stopped phase hands over to the next one from its best parameters unless the iterations
   or the whole budget are spent;
5. rank 0 checkpoints every ``checkpoint_every`` iterations, at a phase switch and at the end.

A run resumed from its checkpoint ends with exactly the parameters of an uninterrupted one
(iteration-capped runs: a wall-clock budget ends wherever the time runs out).

Example (the shape of a trainer; ``bespoke_fast.fitting.bns`` is a complete one)::

    >>> phases = [Phase("adam", cap=100, optimizer=lambda: torch.optim.Adam(solver.parameters()),
    ...                 step=my_step, val_every=10, sets_horizon=True)]
    >>> state = run_phases(solver, model, val_set, phases, config=config, gen=gen,
    ...                    stopping=Stopping(max_iters=100), checkpoint=None, progress=False)
    >>> state.selection.best_record["psnr"], state.stop_reason
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .._checks import InvalidFileError
from ..utils import dist_info, training_bar
from .common import (checkpoint_due, frozen, lbfgs_advance, load_checkpoint, save_checkpoint,
                     show_validation, validate_solver)
from .stopping import DEFAULT_SELECT, Selection, observe, phase_horizon, rank0_decides, stop_reason

__all__ = ["Phase", "Stopping", "TrainState", "StepContext", "run_phases", "lbfgs_step",
           "TRAIN_STATE_VERSION"]

TRAIN_STATE_VERSION = 2     # 2: one TrainState (1: the trainers' string-keyed state dicts)


@dataclass
class Phase:
    """One training phase, as data.

    ``name``: recorded in the curve (``record``: the fields each validation record gets, e.g.
    ``{"phase": "bound"}``) and in ``TrainState.phase_stop_reasons``; ``cap``: its iterations
    at most; ``optimizer()``: a new optimizer over the solver's parameters (made at the phase's
    start and on resume, then its saved state is loaded); ``step(ctx, k) -> (done, loss)``: run
    from iteration ``k`` (one Adam step: ``done = k + 1``; L-BFGS: :func:`lbfgs_step`) and
    return the iteration reached and the last loss (a float or a 0-d tensor).
    ``budget_share``: the phase's deadline as a share of ``budget_seconds`` (counted from the
    fit's start, or from the phase's when ``budget_from_start``). ``val_every``: validation
    cadence in iterations (counted from 0, or from the phase's start when ``val_from_start``).
    ``sets_horizon``: the first validation shortens the learning-rate horizon to the time left
    (``ctx.state.horizon``; the step reads it). ``cap_within_max_iters``: the cap the phase
    runs with (``ctx.cap``, the default horizon) shrinks to the iterations ``max_iters`` leaves
    it (else it stays ``cap``, and ``max_iters`` only stops the phase)."""

    name: str
    cap: int
    optimizer: Callable
    step: Callable
    budget_share: float = 1.0
    budget_from_start: bool = False
    val_every: int = 1
    val_from_start: bool = False
    sets_horizon: bool = False
    cap_within_max_iters: bool = False
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stopping:
    """When the whole fit stops and which parameters are kept (``bespoke_fast.fitting.stopping``):
    ``max_iters`` iterations in all, ``budget_seconds`` of wall time (None: none),
    ``patience`` validations without a ``min_delta`` dB gain of the ``select`` score (None:
    no patience stop)."""

    max_iters: int
    budget_seconds: float | None = None
    patience: int | None = None
    min_delta: float = 0.0
    select: str = DEFAULT_SELECT


@dataclass
class TrainState:
    """Everything a resumed fit needs besides the solver, optimizer and generator states; saved
    whole in the checkpoint (:meth:`to_dict`, :meth:`from_dict`).

    ``iteration``: iterations done (all phases); ``phase``, ``phase_start``, ``phase_wall``:
    the current phase, the iteration and the wall time (s) it started at; ``horizon``: its
    learning-rate horizon once measured (None: its cap); ``phase_starts`` /
    ``phase_stop_reasons``: per phase name; ``curve``: the validation records;
    ``selection``: keep-best and patience; ``stop_reason``: set when the fit is over;
    ``nfe_train`` / ``nfe_val``: per-sample model evaluations; ``wall_total``: seconds of all
    runs so far; ``loss_evals``, ``restarts``: loss evaluations and L-BFGS restarts in all;
    ``last_loss``, ``restarted``, ``converged``: the current L-BFGS phase's; ``init_record``:
    the validation of the starting solver (when the trainer asks for it); ``start``: the
    trainer's record of how it chose its start."""

    iteration: int = 0
    phase: str = ""
    phase_start: int = 0
    phase_wall: float = 0.0
    horizon: int | None = None
    phase_starts: dict = field(default_factory=dict)
    phase_stop_reasons: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)
    selection: Selection = field(default_factory=Selection)
    stop_reason: str | None = None
    nfe_train: int = 0
    nfe_val: int = 0
    wall_total: float = 0.0
    loss_evals: int = 0
    restarts: int = 0
    last_loss: float | None = None
    restarted: bool = False
    converged: bool = False
    init_record: dict | None = None
    start: dict | None = None

    def to_dict(self) -> dict:
        """Plain types and tensors only (``torch.load(weights_only=True)`` reads it back)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["selection"] = {f.name: getattr(self.selection, f.name)
                            for f in dataclasses.fields(Selection)}
        return {"version": TRAIN_STATE_VERSION, **out}

    @classmethod
    def from_dict(cls, saved, path="checkpoint") -> "TrainState":
        """The state :meth:`to_dict` wrote; ``InvalidFileError`` naming ``path`` for anything
        else (another version's checkpoint, a damaged one)."""
        if not isinstance(saved, dict) or saved.get("version") != TRAIN_STATE_VERSION:
            raise InvalidFileError(f"{path}: a training checkpoint of another bespoke_fast version "
                                   f"(state version {saved.get('version') if isinstance(saved, dict) else None}, "
                                   f"this one reads {TRAIN_STATE_VERSION}); delete it or give "
                                   f"another --checkpoint")
        fields = {k: v for k, v in saved.items() if k != "version"}
        try:
            fields["selection"] = Selection(**fields["selection"])
            state = cls(**fields)
        except (KeyError, TypeError) as e:
            raise InvalidFileError(f"{path}: damaged training checkpoint ({type(e).__name__}: {e}); "
                                   f"delete it or give another --checkpoint") from None
        return state


@dataclass
class StepContext:
    """What a phase's ``step`` sees: the ``state``, the current ``optim``, the phase's ``cap``
    and ``budget`` (deadline in fit seconds, None: none), ``max_iters`` (of the whole fit),
    ``elapsed()`` (the fit's seconds so far) and :meth:`next_validation`."""

    state: TrainState
    optim: object
    phase: Phase
    cap: int
    budget: float | None
    max_iters: int
    elapsed: Callable

    def next_validation(self, k: int) -> int:
        """The next iteration after ``k`` at which the phase's cadence validates."""
        every, start = self.phase.val_every, self.state.phase_start
        if self.phase.val_from_start:
            return k + every - (k - start) % every
        return (k // every + 1) * every


def lbfgs_step(closure, checkpoint_every: int | None = None):
    """A phase ``step`` that runs full-batch L-BFGS (``common.lbfgs_advance``; the phase's
    optimizer is ``common.new_lbfgs``) from ``k`` to the phase's cap, its next validation or,
    when given, the next multiple of ``checkpoint_every``, whichever comes first, within the
    phase's time budget. ``closure(ctx)`` (a :class:`StepContext`) computes the loss and
    gradient on the whole batch with ``ctx.optim``, adds 1 to ``ctx.state.loss_evals`` and
    stores the loss in ``ctx.state.last_loss``."""
    def step(ctx: StepContext, k: int):
        stop = min(ctx.state.phase_start + ctx.cap, ctx.max_iters, ctx.next_validation(k))
        if checkpoint_every:
            stop = min(stop, (k // checkpoint_every + 1) * checkpoint_every)
        done = lbfgs_advance(ctx.optim, lambda: closure(ctx), ctx.state, k, stop,
                             ctx.budget, ctx.elapsed)
        return done, ctx.state.last_loss
    return step


def _phase_budget(phase: Phase, state: TrainState, budget_seconds):
    if budget_seconds is None:
        return None
    origin = state.phase_wall if phase.budget_from_start else 0.0
    return origin + budget_seconds * phase.budget_share


def run_phases(solver, model, val_set, phases: list, *, config: dict, gen, stopping: Stopping,
               checkpoint=None, checkpoint_every: int = 50, progress: bool = True, desc: str = "",
               callback=None, start=None, validate_start: bool = False,
               horizon_rule=phase_horizon) -> TrainState:
    """Fit ``solver`` through ``phases`` (in order; each at least one iteration of cap) and
    return the final :class:`TrainState`, the best parameters loaded into ``solver``.

    ``config``: the settings that fix the result (a checkpoint made with others is refused);
    ``gen``: the batch generator (checkpointed); ``checkpoint``: path to resume from and save
    to every ``checkpoint_every`` iterations (rank 0, atomically); ``start(state, elapsed)``:
    the trainer's work before the first phase, run only when not resuming (e.g. choosing the
    starting solver; the first phase's wall clock starts after it); ``validate_start``: also
    validate the starting solver (iteration 0, ``state.init_record``; it can be the one kept);
    ``horizon_rule``: how a phase's learning-rate horizon fits the time left;
    ``callback(iteration, record)`` after each validation. Under torchrun every rank runs it;
    rank 0 decides when to stop and writes the checkpoints."""
    rank, world, _ = dist_info()
    by_name = {p.name: p for p in phases}
    state = TrainState(phase=phases[0].name, phase_starts={phases[0].name: 0})
    optim = phases[0].optimizer()
    ckpt = Path(checkpoint) if checkpoint else None
    saved = load_checkpoint(ckpt, config, solver, gen)
    if saved is not None:
        state = TrainState.from_dict(saved["state"], ckpt)
        if state.phase not in by_name:
            raise InvalidFileError(f"{ckpt}: damaged training checkpoint (unknown phase "
                                   f"{state.phase!r}); delete it or give another --checkpoint")
        optim = by_name[state.phase].optimizer()
        optim.load_state_dict(saved["optim"])
    started = time.perf_counter()

    def elapsed():
        return state.wall_total + time.perf_counter() - started

    if saved is None and start is not None:
        start(state, elapsed)
        state.phase_wall = elapsed()     # the first phase's share counts from here

    def validate(done, loss, phase):
        record = {"iteration": done, "loss": None if loss is None else float(loss),
                  **phase.record, **validate_solver(solver, model, val_set)}
        state.nfe_val += solver.nfe * len(val_set)
        state.curve.append(record)
        observe(state.selection, record, solver, stopping.select, stopping.min_delta)
        return record

    bar = training_bar(stopping.max_iters, state.iteration, stopping.budget_seconds,
                       not progress or rank != 0, desc)
    with frozen(model):
        if validate_start and state.iteration == 0 and not state.curve:
            state.init_record = validate(0, None, phases[0])
        while state.stop_reason is None:
            k, phase = state.iteration, by_name[state.phase]
            cap = (min(phase.cap, stopping.max_iters - state.phase_start)
                   if phase.cap_within_max_iters else phase.cap)
            budget = _phase_budget(phase, state, stopping.budget_seconds)
            ctx = StepContext(state, optim, phase, cap, budget, stopping.max_iters, elapsed)
            done, loss = phase.step(ctx, k)
            state.iteration = done
            bar.update(done - k)
            in_phase = done - state.phase_start
            capped = in_phase >= cap or done >= stopping.max_iters
            out_of_time = budget is not None and elapsed() >= budget
            due = (in_phase if phase.val_from_start else done) % phase.val_every == 0
            fresh = not state.curve or state.curve[-1]["iteration"] != done
            validated = fresh and (due or capped or out_of_time or state.converged)
            if validated:
                record = validate(done, loss, phase)
                if state.horizon is None and phase.sets_horizon and budget is not None:
                    state.horizon = horizon_rule(cap, in_phase, elapsed() - state.phase_wall,
                                                 budget - elapsed())
                show_validation(bar, state.selection, done, record, callback)
            reason = "converged" if state.converged else stop_reason(
                state.selection, in_phase, cap, stopping.patience, budget, elapsed(), validated)
            if done >= stopping.max_iters and reason is None:
                reason = "max_iters"
            spent = stopping.budget_seconds is not None and elapsed() >= stopping.budget_seconds
            reason, state.horizon, spent = rank0_decides(reason, world, state.horizon, spent)
            switched = False
            if reason is not None:
                state.phase_stop_reasons[phase.name] = reason
                nxt = phases[phases.index(phase) + 1] if phase is not phases[-1] else None
                if nxt is not None and done < stopping.max_iters and not spent:
                    # go on from this phase's best parameters
                    solver.load_state_dict(state.selection.best)
                    optim = nxt.optimizer()
                    state.phase, state.phase_start, state.phase_wall = nxt.name, done, elapsed()
                    state.phase_starts[nxt.name] = done
                    state.horizon, state.selection.bad_evals = None, 0
                    state.last_loss, state.restarted, state.converged = None, False, False
                    switched = True
                else:
                    state.stop_reason = reason
            if checkpoint_due(ckpt, rank, done, checkpoint_every, switched, state.stop_reason):
                started = save_checkpoint(ckpt, config, solver, optim, gen, done, state, started)
    bar.close()
    state.wall_total += time.perf_counter() - started
    solver.load_state_dict(state.selection.best)
    return state
