"""The one training loop of every trainer: :func:`run_phases` runs a list of :class:`Phase` (the
phases are data) and owns what both kinds of solver fit share: time budgets, stopping, keeping
the best parameters, checkpoint / resume and the multi-rank stop. A trainer says what its phases
are (optimizer, step, cap, budget share, validation cadence) and what happens before the first
one (its start); all the state a resumed run needs is one :class:`TrainState`, checkpointed as a
whole with the solver, the optimizer and the batch generator.

Budgets: ``budget_evals`` (model evaluations in forward-equivalents, counted exactly by the
fit's :class:`~bespoke_fast.fitting.evals.EvalLedger`: the same on every device) and, as an
extra cap, ``budget_seconds`` of wall time. A phase's deadline in each is ``budget_share`` of
the whole, counted from the fit's start (or from the phase's when ``budget_from_start``).

Per iteration, for the current phase (``cap``: its iteration cap):

1. ``done, loss = phase.step(ctx, k)``: one Adam iteration, or several L-BFGS ones
   (:func:`lbfgs_step`);
2. a non-finite loss or parameter stops the phase at once: the phase's best parameters are
   restored (``TrainState.events`` records what happened, where), and the fit goes on with the
   next phase (the reason is ``"nonfinite"``);
3. validate when the cadence says so (every ``val_every`` iterations, counted from 0 or from the
   phase's start), at the cap, out of budget or when L-BFGS converged; keep the best
   (``bespoke_fast.fitting.stopping.observe``); the first validation of a phase with
   ``sets_horizon`` fits its learning-rate schedule into the time left
   (``bespoke_fast.fitting.stopping.phase_horizon``);
4. the stop decision (``converged``, ``patience``, ``budget``, ``max_iters``) is rank 0's on
   every rank (``bespoke_fast.fitting.stopping.rank0_decides``), with its learning-rate horizon
   and whether the whole budget is spent;
5. a stopped phase hands over to the next one from its best parameters unless the iterations
   or the whole budget are spent;
6. rank 0 checkpoints every ``checkpoint_every`` iterations, at a phase switch and at the end.

A run resumed from its checkpoint ends with exactly the parameters of an uninterrupted one
(iteration- and evaluation-budgeted runs: a wall-clock budget ends wherever the time runs out).

Example (the shape of a trainer; ``bespoke_fast.fitting.bns`` is a complete one)::

    >>> phases = [Phase("adam", cap=100, optimizer=lambda: torch.optim.Adam(solver.parameters()),
    ...                 step=my_step, val_every=10, sets_horizon=True)]
    >>> state = run_phases(solver, model, val_set, phases, config=config, gen=gen,
    ...                    stopping=Stopping(max_iters=100, budget_evals=200_000),
    ...                    checkpoint=None, progress=False, ledger=ledger)
    >>> state.selection.best_record["psnr"], state.stop_reason
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .._checks import InvalidFileError
from ..utils import dist_info, training_bar
import torch

from .common import (checkpoint_due, frozen, lbfgs_advance, load_checkpoint, save_checkpoint,
                     show_validation, validate_solver)
from .evals import EvalLedger
from .stopping import DEFAULT_SELECT, Selection, observe, phase_horizon, rank0_decides, stop_reason

__all__ = ["Phase", "Stopping", "TrainState", "StepContext", "run_phases", "lbfgs_step",
           "Diverged", "TRAIN_STATE_VERSION"]

TRAIN_STATE_VERSION = 3     # 3: exact evaluation counts and budgets (2: one TrainState)


@dataclass
class Phase:
    """One training phase, as data.

    ``name``: recorded in the curve (``record``: the fields each validation record gets, e.g.
    ``{"phase": "bound"}``) and in ``TrainState.phase_stop_reasons``; ``cap``: its iterations
    at most; ``optimizer()``: a new optimizer over the solver's parameters (made at the phase's
    start and on resume, then its saved state is loaded); ``step(ctx, k) -> (done, loss)``: run
    from iteration ``k`` (one Adam step: ``done = k + 1``; L-BFGS: :func:`lbfgs_step`) and
    return the iteration reached and the last loss (a float or a 0-d tensor).
    ``budget_share``: the phase's deadline as a share of ``budget_evals`` and of
    ``budget_seconds`` (counted from the fit's start, or from the phase's when
    ``budget_from_start``). ``val_every``: validation
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
    no patience stop), ``budget_evals`` model evaluations in forward-equivalents (None: none;
    what the ledger had counted before the loop, e.g. the trainer's start, counts too)."""

    max_iters: int
    budget_seconds: float | None = None
    patience: int | None = None
    min_delta: float = 0.0
    select: str = DEFAULT_SELECT
    budget_evals: int | None = None


@dataclass
class TrainState:
    """Everything a resumed fit needs besides the solver, optimizer and generator states; saved
    whole in the checkpoint (:meth:`to_dict`, :meth:`from_dict`).

    ``iteration``: iterations done (all phases); ``phase``, ``phase_start``, ``phase_wall``:
    the current phase, the iteration and the wall time (s) it started at; ``horizon``: its
    learning-rate horizon once measured (None: its cap); ``phase_starts`` /
    ``phase_stop_reasons``: per phase name; ``curve``: the validation records;
    ``selection``: keep-best and patience; ``stop_reason``: set when the fit is over;
    ``evals``: the exact model evaluations so far, ``{stage: [forward, backward]}`` (the
    ledger's counts); ``phase_evals``: the forward-equivalents spent when the current phase
    started; ``events``: what stopped a phase early (a non-finite loss: phase, iteration, the
    iteration restored); ``wall_total``: seconds of all runs so far; ``loss_evals``, ``restarts``: loss evaluations and L-BFGS restarts in all;
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
    evals: dict = field(default_factory=dict)
    phase_evals: int = 0
    events: list = field(default_factory=list)
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
    """What a phase's ``step`` sees: the ``state``, the current ``optim``, the phase's ``cap``,
    its deadlines ``budget`` (fit seconds) and ``eval_budget`` (forward-equivalents; None:
    none), ``max_iters`` (of the whole fit), ``elapsed()`` (the fit's seconds so far),
    ``spent()`` (its forward-equivalents so far), :meth:`next_validation` and
    :meth:`iterations_allowed`."""

    state: TrainState
    optim: object
    phase: Phase
    cap: int
    budget: float | None
    max_iters: int
    elapsed: Callable
    eval_budget: int | None = None
    spent: Callable = lambda: 0
    reserve: int = 0
    out_of_budget: bool = False     # set by a step that stopped because the next evaluation would not fit

    def next_validation(self, k: int) -> int:
        """The next iteration after ``k`` at which the phase's cadence validates."""
        every, start = self.phase.val_every, self.state.phase_start
        if self.phase.val_from_start:
            return k + every - (k - start) % every
        return (k // every + 1) * every

    def iterations_allowed(self, k: int) -> int | None:
        """How many iterations from ``k`` the phase's deadlines leave at the speed measured so
        far in the phase (seconds and evaluations per iteration; ``reserve`` evaluations are
        kept for the validation that ends the phase): 0 when not one more fits, 1 before
        anything is measured, None without a deadline."""
        done, allowed = k - self.state.phase_start, None
        for deadline, now, origin, reserve in (
                (self.budget, self.elapsed(), self.state.phase_wall, 0),
                (self.eval_budget, self.spent(), self.state.phase_evals, self.reserve)):
            if deadline is None:
                continue
            if now + reserve >= deadline:
                return 0
            if done <= 0 or now <= origin:
                n = 1
            else:
                n = max(0, int((deadline - now - reserve) / ((now - origin) / done)))
            allowed = n if allowed is None else min(allowed, n)
        return allowed


class Diverged(Exception):
    """Raised inside an L-BFGS step when the loss or its gradient is not finite: the step ends
    at once (its line search would go on evaluating from NaN parameters)."""


class _NoRoom(Exception):
    """Raised inside an L-BFGS step when one more loss evaluation would pass the phase's
    evaluation deadline."""


def _finite(loss, params) -> bool:
    """Whether ``loss`` (a float, a 0-d tensor or None) and every parameter and gradient are
    finite: one host sync for all of them."""
    params = list(params)
    if loss is not None and not isinstance(loss, torch.Tensor) and not math.isfinite(loss):
        return False
    checks = [torch.isfinite(v).all() for p in params for v in (p, p.grad) if v is not None]
    if isinstance(loss, torch.Tensor):
        checks.append(torch.isfinite(loss.detach()).all().to(checks[0].device if checks
                                                               else loss.device))
    return bool(torch.stack(checks).all()) if checks else True


def lbfgs_step(closure, checkpoint_every: int | None = None, cost: int = 0):
    """A phase ``step`` that runs full-batch L-BFGS (``common.lbfgs_advance``; the phase's
    optimizer is ``common.new_lbfgs``) from ``k`` to the phase's cap, its next validation or,
    when given, the next multiple of ``checkpoint_every``, whichever comes first, within the
    phase's budgets (:meth:`StepContext.iterations_allowed`). ``closure(ctx)`` (a
    :class:`StepContext`) computes the loss and gradient on the whole batch with ``ctx.optim``,
    adds 1 to ``ctx.state.loss_evals`` and stores the loss in ``ctx.state.last_loss``. A
    non-finite loss or gradient ends the step at once with a NaN loss (the loop then stops the
    phase and restores its best parameters). Under an evaluation deadline a loss evaluation
    that would pass it is not made: the step ends at the best point it evaluated (``cost``:
    the forward-equivalents of one evaluation until one is measured; 0: unknown)."""
    cost = [cost]   # forward-equivalents of one loss evaluation (measured after the first)

    def step(ctx: StepContext, k: int):
        stop = min(ctx.state.phase_start + ctx.cap, ctx.max_iters, ctx.next_validation(k))
        if checkpoint_every:
            stop = min(stop, (k // checkpoint_every + 1) * checkpoint_every)
        params = ctx.optim.param_groups[0]["params"]
        best = [math.inf, None]     # the lowest loss this call evaluated, and where

        def guarded():
            before = ctx.spent()
            if (ctx.eval_budget is not None and cost[0]
                    and before + cost[0] + ctx.reserve > ctx.eval_budget):
                raise _NoRoom
            at = [p.detach().clone() for p in params]
            loss = closure(ctx)
            cost[0] = ctx.spent() - before
            if not _finite(loss, params):
                raise Diverged
            if float(loss) < best[0]:
                best[0], best[1] = float(loss), at
            return loss
        before = ctx.optim.state[params[0]].get("n_iter", 0)
        try:
            done = lbfgs_advance(ctx.optim, guarded, ctx.state, k, stop,
                                 ctx.iterations_allowed(k))
        except Diverged:
            done = k + max(1, ctx.optim.state[params[0]].get("n_iter", 0) - before)
            ctx.state.last_loss = math.nan
        except _NoRoom:      # back to the best point this call evaluated (not a line-search trial)
            done = k + max(0, ctx.optim.state[params[0]].get("n_iter", 0) - before)
            if best[1] is not None:
                with torch.no_grad():
                    for p, v in zip(params, best[1]):
                        p.copy_(v)
                ctx.state.last_loss = best[0]
            ctx.out_of_budget = True
        return done, ctx.state.last_loss
    return step


def _deadlines(phase: Phase, state: TrainState, stopping: Stopping):
    """The phase's deadlines: (fit seconds, forward-equivalents), None where there is none; a
    share counted from the phase's start never reaches past the whole budget."""
    seconds = evals = None
    if stopping.budget_seconds is not None:
        origin = state.phase_wall if phase.budget_from_start else 0.0
        seconds = min(origin + stopping.budget_seconds * phase.budget_share,
                      stopping.budget_seconds)
    if stopping.budget_evals is not None:
        origin = state.phase_evals if phase.budget_from_start else 0
        evals = min(origin + stopping.budget_evals * phase.budget_share, stopping.budget_evals)
    return seconds, evals


def run_phases(solver, model, val_set, phases: list, *, config: dict, gen, stopping: Stopping,
               checkpoint=None, checkpoint_every: int = 50, progress: bool = True, desc: str = "",
               callback=None, start=None, validate_start: bool = False,
               horizon_rule=phase_horizon, ledger: EvalLedger | None = None) -> TrainState:
    """Fit ``solver`` through ``phases`` (in order; each at least one iteration of cap) and
    return the final :class:`TrainState`, the best parameters loaded into ``solver``.

    ``config``: the settings that fix the result (a checkpoint made with others is refused);
    ``gen``: the batch generator (checkpointed); ``checkpoint``: path to resume from and save
    to every ``checkpoint_every`` iterations (rank 0, atomically); ``start(state, elapsed)``:
    the trainer's work before the first phase, run only when not resuming (e.g. choosing the
    starting solver; the first phase's wall clock starts after it); ``validate_start``: also
    validate the starting solver (iteration 0, ``state.init_record``; it can be the one kept);
    ``horizon_rule``: how a phase's learning-rate horizon fits the budget left;
    ``callback(iteration, record)`` after each validation; ``ledger``: the fit's
    :class:`~bespoke_fast.fitting.evals.EvalLedger` (the trainer's steps call the model through
    ``ledger.wrap(model)``; the loop charges the start to ``"start"``, each phase to its name
    and the validations to ``"validation"``). Under torchrun every rank runs it; rank 0 decides
    when to stop and writes the checkpoints."""
    rank, world, _ = dist_info()
    ledger = EvalLedger() if ledger is None else ledger
    counted = ledger.wrap(model)
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
        ledger.counts = {k: [int(v[0]), int(v[1])] for k, v in state.evals.items()}
    state.evals = ledger.counts
    started = time.perf_counter()

    def elapsed():
        return state.wall_total + time.perf_counter() - started

    if saved is None:
        if start is not None:
            with ledger.charging("start"):
                start(state, elapsed)
        # the first phase starts now: after the start, and after what the ledger counted before
        # the loop (BNS's Bespoke stage), so its budget share counts from here
        state.phase_wall, state.phase_evals = elapsed(), ledger.equivalent()

    def validate(done, loss, phase):
        with ledger.charging("validation"):
            record = {"iteration": done, "loss": None if loss is None else float(loss),
                      **phase.record, **validate_solver(solver, counted, val_set)}
        state.curve.append(record)
        observe(state.selection, record, solver, stopping.select, stopping.min_delta)
        return record

    bar = training_bar(stopping.max_iters, state.iteration, stopping.budget_seconds,
                       not progress or rank != 0, desc, stopping.budget_evals,
                       ledger.equivalent())
    origin = copy.deepcopy(solver.state_dict())     # restored if a phase diverges before any validation
    val_cost = solver.nfe * len(val_set)            # forward rows of one validation
    with frozen(model):
        if validate_start and state.iteration == 0 and not state.curve:
            state.init_record = validate(0, None, phases[0])
        while state.stop_reason is None:
            k, phase = state.iteration, by_name[state.phase]
            cap = (min(phase.cap, stopping.max_iters - state.phase_start)
                   if phase.cap_within_max_iters else phase.cap)
            budget, eval_budget = _deadlines(phase, state, stopping)
            ctx = StepContext(state, optim, phase, cap, budget, stopping.max_iters, elapsed,
                              eval_budget, ledger.equivalent, val_cost)
            if ctx.iterations_allowed(k) == 0:       # not one more iteration fits: stop here
                done, loss, no_room = k, state.last_loss, True
            else:
                with ledger.charging(phase.name):
                    done, loss = phase.step(ctx, k)
                no_room = ctx.out_of_budget
            state.iteration = done
            bar.advance(done - k, ledger.equivalent())
            in_phase = done - state.phase_start
            diverged = not _finite(loss, solver.parameters())
            if diverged:
                restored = state.selection.best_record
                solver.load_state_dict(state.selection.best if restored is not None else origin)
                state.events.append({"phase": phase.name, "iteration": done,
                                     "event": "non-finite loss, gradient or parameters",
                                     "restored_iteration": restored["iteration"] if restored
                                     else state.phase_start})
            capped = in_phase >= cap or done >= stopping.max_iters
            spent = ((stopping.budget_seconds is not None and elapsed() >= stopping.budget_seconds)
                     or (stopping.budget_evals is not None
                         and ledger.equivalent() >= stopping.budget_evals)
                     # no room for one more iteration before a deadline that is the whole budget's
                     or (no_room and eval_budget is not None
                         and eval_budget >= stopping.budget_evals))
            out_of_budget = spent or no_room or ((budget is not None and elapsed() >= budget)
                                      or (eval_budget is not None
                                          and ledger.equivalent() >= eval_budget))
            due = (in_phase if phase.val_from_start else done) % phase.val_every == 0
            fresh = not state.curve or state.curve[-1]["iteration"] != done
            validated = (fresh and (due or capped or out_of_budget or state.converged)
                         and (not diverged or state.selection.best is None))
            if validated:
                record = validate(done, None if diverged else loss, phase)
                if state.horizon is None and phase.sets_horizon:
                    state.horizon = _horizon(horizon_rule, cap, in_phase, state, elapsed, budget,
                                             ledger.equivalent(), eval_budget)
                show_validation(bar, state.selection, done, record, callback)
            if diverged:
                reason = "nonfinite"
            elif state.converged:
                reason = "converged"
            else:
                reason = stop_reason(state.selection, in_phase, cap, stopping.patience, None,
                                     0.0, validated)
                if reason is None and out_of_budget:
                    reason = "budget"
            if done >= stopping.max_iters and reason is None:
                reason = "max_iters"
            reason, state.horizon, spent = rank0_decides(reason, world, state.horizon, spent)
            switched = False
            if reason is not None:
                state.phase_stop_reasons[phase.name] = reason
                nxt = phases[phases.index(phase) + 1] if phase is not phases[-1] else None
                if nxt is not None and done < stopping.max_iters and not spent:
                    # go on from this phase's best parameters
                    if state.selection.best is not None:
                        solver.load_state_dict(state.selection.best)
                    optim = nxt.optimizer()
                    state.phase, state.phase_start = nxt.name, done
                    state.phase_wall, state.phase_evals = elapsed(), ledger.equivalent()
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


def _horizon(rule, cap, in_phase, state, elapsed, budget, spent, eval_budget):
    """The phase's learning-rate horizon: ``rule`` applied to the time and to the evaluations
    left, whichever allows fewer iterations."""
    horizon = cap
    if budget is not None:
        horizon = min(horizon, rule(cap, in_phase, elapsed() - state.phase_wall, budget - elapsed()))
    if eval_budget is not None:
        horizon = min(horizon, rule(cap, in_phase, spent - state.phase_evals, eval_budget - spent))
    return horizon
