"""Fitting a non-stationary (BNS) solver to a model (method.md section 6).

BNS solvers are trained end to end on a fixed set of GT pairs ``(x0, x(1))`` (paper: 520 for
training, 1024 held out for validation) by minimising, through the whole n-step sampler::

    loss = mean_batch log ||x_n - x(1)||^2          (per-sample MSE; = -mean PSNR ln10/10 + const)

i.e. maximising the mean PSNR, starting (default ``init="bespoke"``) from a Bespoke solver of
the same NFE fitted first on the same GT with ``BESPOKE_SHARE`` of the budget and rewritten
exactly in BNS form (method.md section 6), with full-batch L-BFGS (after a Levenberg-Marquardt
warm-up on ``warmup_pairs`` pairs, ``bespoke_fast.fitting.gauss_newton``), Adam, or (default,
``"auto"``) L-BFGS that hands over to Adam, from the best parameters so far, when it stalls,
converges or uses its iterations. The budget is in
model evaluations (``budget_evals``, forward-equivalents, counted exactly, the Bespoke start's
included), the same on every device. Training stops when the validation score stops improving, within a time / iteration
budget (``bespoke_fast.fitting.stopping``). The parameters with the best validation score are kept (the
initial solver counts, so the result is never worse on validation than the base solver).
Both trainers run on the training loop of ``bespoke_fast.fitting.loop`` (validation,
keep-best, checkpoint / resume, the multi-rank stop).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import InvalidArgumentError, InvalidTypeError, check_choice, check_int
from ..solvers.bns import INITS, NonStationarySolver
from ..solvers.interface import Solver
from ..utils import dist_info
from .common import (CommonOptions, KindTrainer, average_gradients, check_budget_evals,
                     check_gt_matches, finish, gt_split_fingerprint, keyword_trainer, new_lbfgs,
                     option)
from .evals import EvalLedger
from .gt import TrajectorySet
from .gauss_newton import LevenbergMarquardt, lm_step, MAX_TRIALS
from .loop import Phase, Stopping, lbfgs_step, run_phases
from .stopping import check_stopping
from .trajectories import Trajectories

__all__ = ["train_bns", "BNSOptions", "OPTIONS", "BNSTrainer", "TRAINER", "end_to_end_loss", "bns_split", "OPTIMIZERS",
           "DEFAULT_NUM_TRAIN", "DEFAULT_NUM_VAL", "MIN_TRAIN_PAIRS", "MIN_VAL_PAIRS"]


OPTIMIZERS = ("auto", "lbfgs", "adam")
DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL = 520, 1024   # the paper's split
MIN_TRAIN_PAIRS, MIN_VAL_PAIRS = 16, 16          # below these a fit or its PSNR means little


def bns_split(n: int, num_train: int | None = None, num_val: int | None = None,
              separate_val: int | None = None):
    """``(num_train, num_val, note)`` for a BNS fit on ``n`` GT pairs.

    Defaults: 520 training and 1024 validation pairs (the paper's). When the set is smaller, a
    defaulted size shrinks to fit (validation first gives up pairs, never below the training
    pairs' count nor ``MIN_VAL_PAIRS``) and ``note`` says what was used; sizes given explicitly
    are kept or refused. Refused below ``MIN_TRAIN_PAIRS`` (16) training or ``MIN_VAL_PAIRS``
    (16) validation pairs. ``separate_val``: the size of a separate validation set (then all
    ``n`` pairs are for training)."""
    n = check_int("number of GT pairs", n, 0)
    for name, v in (("num_train", num_train), ("num_val", num_val)):
        if v is not None:
            check_int(name, v, MIN_TRAIN_PAIRS if name == "num_train" else MIN_VAL_PAIRS)
    if separate_val is not None:
        num_val = separate_val
        avail = n
    else:
        if n < MIN_TRAIN_PAIRS + MIN_VAL_PAIRS:
            raise InvalidArgumentError(
                f"a BNS fit needs at least {MIN_TRAIN_PAIRS + MIN_VAL_PAIRS} GT pairs "
                f"({MIN_TRAIN_PAIRS} training + {MIN_VAL_PAIRS} validation), got {n}; generate more")
        if num_val is None:
            keep = num_train if num_train is not None else min(DEFAULT_NUM_TRAIN, n // 2)
            num_val = min(DEFAULT_NUM_VAL, n - keep)
        avail = n - num_val
    if num_train is None:
        num_train = min(DEFAULT_NUM_TRAIN, avail)
    if num_val < MIN_VAL_PAIRS or num_train < MIN_TRAIN_PAIRS or num_train > avail:
        raise InvalidArgumentError(
            f"cannot take {num_train} training and {num_val} validation pairs from {n} GT pairs "
            f"(need at least {MIN_TRAIN_PAIRS} / {MIN_VAL_PAIRS}); lower num_train / num_val "
            f"(--num-train / --val) or generate more GT")
    note = None
    if (num_train, num_val) != (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL):
        note = (f"BNS split: {num_train} training / {num_val} validation pairs of {n} "
                f"(paper default {DEFAULT_NUM_TRAIN} / {DEFAULT_NUM_VAL})")
    return num_train, num_val, note


def end_to_end_loss(solver: NonStationarySolver, model, batch: TrajectorySet,
                    dtype=torch.float64, model_dtype=None) -> torch.Tensor:
    """``mean log ||x_n - x(1)||^2`` over the batch (per-sample mean squared error), through the
    whole sampler; differentiable in the solver parameters. The sampler's state runs in
    ``dtype`` (default float64) and the model in ``model_dtype`` (default: the batch's dtype,
    i.e. the GT's); the error and the log are taken in float64. Near the optimum the loss is a
    small difference of large logs: with a float32 state its rounding stalls L-BFGS's line
    search."""
    mdt = batch.x0.dtype if model_dtype is None else model_dtype
    x0 = batch.x0 if dtype is None else batch.x0.to(dtype)
    x_n = solver.sample(model, x0, model_dtype=mdt, **batch.extras)
    err2 = (x_n.double() - batch.x1.double()).flatten(1).pow(2).mean(1)
    return torch.log(err2 + 1e-30).mean()


def _full_loss_backward(solver, model, data: TrajectorySet, chunk: int, world: int,
                        dtype, model_dtype) -> float:
    """The loss over all of ``data`` with its gradient accumulated into ``.grad``, evaluated in
    chunks of ``chunk`` pairs (memory stays bounded by one chunk through the sampler)."""
    total, n = 0.0, len(data)
    for lo in range(0, n, chunk):
        part = data.subset(range(lo, min(n, lo + chunk)))
        loss = end_to_end_loss(solver, model, part, dtype, model_dtype) * (len(part) / n)
        loss.backward()
        total += float(loss.detach())
    average_gradients(solver.parameters(), world)
    return total


def _lr_at(k: int, iters: int, lr: float, lr_final: float) -> float:
    """Adam: cosine decay from ``lr`` (iteration 0) to ``lr * lr_final`` (the last iteration)."""
    frac = min(1.0, k / max(iters - 1, 1))
    return lr * (lr_final + (1 - lr_final) * 0.5 * (1 + math.cos(math.pi * frac)))


BESPOKE_SHARE = 0.4   # of the budgets for the Bespoke stage of init="bespoke"
WARMUP_SHARE = 0.5    # the Levenberg-Marquardt warm-up on warmup_pairs: at most this share, from its start


def _check_init(init, n_steps: int):
    """Refuse a bad ``init`` before any work: a name (``"bespoke"``, ``"midpoint"``, ``"euler"``)
    or a fitted solver of NFE ``n_steps``."""
    if isinstance(init, str):
        check_choice("init", init, ("bespoke",) + INITS)
        problem = NonStationarySolver.header_problem(init, n_steps)
        if problem:
            raise InvalidArgumentError(problem)
        return
    if not hasattr(init, "sample") or not hasattr(init, "nfe"):
        raise InvalidTypeError(f"init must be 'bespoke', one of {', '.join(INITS)} or a fitted "
                               f"solver (e.g. a BespokeSolver), got {type(init).__name__}")
    if init.nfe != n_steps:
        raise InvalidArgumentError(f"init solver has NFE {init.nfe}, but n_steps={n_steps}: a BNS "
                                   f"solver starts from a solver of the same NFE")


def _starting_solver(init, n_steps: int) -> NonStationarySolver:
    """The solver a BNS fit starts from: ``init`` names an identity start (``"midpoint"``,
    ``"euler"``) or is a fitted solver of NFE ``n_steps`` (e.g. Bespoke RK2), rewritten exactly
    in BNS form (:meth:`NonStationarySolver.from_solver`)."""
    if isinstance(init, str):
        return NonStationarySolver(n_steps, init=init)
    try:
        return NonStationarySolver.from_solver(init)
    except ValueError as e:
        raise InvalidArgumentError(f"cannot start a BNS fit from this solver: {e}") from None


def _bespoke_start(model, pool: TrajectorySet, val_set: TrajectorySet, n_steps: int,
                   budget_seconds, seed, checkpoint, progress, model_name, select, max_iters,
                   budget_evals=None):
    """``init="bespoke"``: fit a Bespoke solver of the same NFE (RK2 for an even NFE, else RK1)
    on all the non-validation trajectories, validated on the BNS validation set, within
    ``BESPOKE_SHARE`` of the budgets (evaluations and seconds) and, when given, the same
    ``max_iters``, with the Bespoke trainer's defaults otherwise. Returns ``(solver or None, record)``; None (and a note)
    when the GT has no interior knots to train a Bespoke solver on."""
    if len(pool.knots_t) <= 2:
        return None, {"note": "the GT has no interior knots (endpoints only), so no Bespoke start: "
                              "BNS starts from midpoint / Euler"}
    from .bespoke import train
    base = "rk2" if n_steps % 2 == 0 else "rk1"
    solver, report = train(model, pool, base=base, n_steps=n_steps // (2 if base == "rk2" else 1),
                           val=val_set, seed=seed, model_name=model_name, progress=progress,
                           budget_seconds=None if budget_seconds is None else
                           budget_seconds * BESPOKE_SHARE,
                           budget_evals=None if budget_evals is None else
                           int(budget_evals * BESPOKE_SHARE),
                           select=select, max_iters=max_iters,
                           checkpoint=None if checkpoint is None else
                           Path(str(checkpoint) + ".bespoke"))
    return solver, {"base": base, "num_train": len(pool), "best": report["best"],
                    "stop_reason": report["stop_reason"], "wall_seconds": report["wall_seconds"],
                    "nfe": report["nfe"], "evaluations": report["evaluations"],
                    "start": report["start"], "events": report["events"]}


@dataclass(frozen=True)
class BNSOptions(CommonOptions):
    """Every option of the BNS trainer, with its default: the one place they are set.
    :func:`train_bns` takes each as a keyword of the same name (the bespoke trainer's
    :class:`~bespoke_fast.fitting.bespoke.BespokeOptions` shares the names both kinds have,
    with the same meaning), and the CLI makes its flags and their help from the fields'
    ``help``. BNS has no fine-tune phase (its loss is end-to-end already) and no GT mode (it
    trains on endpoints)."""
    n_steps: int = option(8, "steps of the solver (NFE = n_steps); default 8")
    init: str | Solver = option("bespoke", "the start: 'bespoke' (a Bespoke solver of the same "
                                           "NFE fitted first with 40% of the budget), 'midpoint' "
                                           "(even NFE), 'euler', or a fitted solver of the same "
                                           "NFE; default bespoke")
    optimizer: str = option("auto", "'auto' (L-BFGS, then Adam when it stops), 'lbfgs' or "
                                    "'adam'; default auto")
    iters: int | None = option(None, "iterations of the first optimizer; default: 300 for L-BFGS "
                                     "(auto), 1000 for Adam")
    batch_size: int = option(520, "pairs per chunk (L-BFGS, full batch) or per iteration (Adam); "
                                  "default 520")
    lr: float | None = option(None, "L-BFGS step scale or Adam learning rate; default: 1 for "
                                    "L-BFGS, adam_lr for Adam")
    lr_final: float = option(0.01, "Adam's rate at the last iteration, as a fraction of lr "
                                   "(cosine decay); default 0.01")
    num_train: int | None = option(None, "training pairs; default 520, fewer when the GT set is "
                                         "small")
    val: int | TrajectorySet | None = option(None, "pairs held out (the last ones) to validate "
                                                   "and keep the best parameters, or a separate "
                                                   "set; default 1024, fewer when the GT set is "
                                                   "small (num_val: the same)")
    val_every: int = option(25, "validate every this many iterations (and at the start and the "
                                "end); default 25")
    dtype: torch.dtype | None = option(torch.float64, "dtype of the sampler's state while "
                                                      "training (None: the GT's); default "
                                                      "float64")
    model_dtype: torch.dtype | None = option(None, "dtype the model is called in while "
                                                   "training; default: the GT's")
    adam_iters: int = option(3000, "'auto': cap on the Adam continuation, in iterations; "
                                   "default 3000")
    adam_lr: float = option(3e-3, "'auto' and 'adam': Adam's learning rate; default 3e-3")
    warmup_pairs: int = option(32, "pairs of the warm-up: Levenberg-Marquardt on these few "
                                   "first (it finds the basin), then L-BFGS on all (0: none); "
                                   "default 32")
    budget_seconds: float | None = option(None, "wall-time cap on the whole fit (its Bespoke "
                                                "start included), in seconds, besides "
                                                "budget_evals (None: none); default none")
    max_iters: int | None = option(None, "cap on all iterations; default iters + adam_iters")


OPTIONS = BNSOptions()


class BNSTrainer(KindTrainer):
    """The BNS kind's trainer (``bespoke_fast.fitting.trainer_for("bns")``): fits a
    :class:`~bespoke_fast.solvers.bns.NonStationarySolver` end to end (L-BFGS, then Adam) on the
    training loop of ``bespoke_fast.fitting.loop``, by default from a Bespoke solver fitted
    first.

    Example::

        >>> trainer = trainer_for("bns")
        >>> solver, report = trainer.train(model, gt, trainer.Options(n_steps=8))
    """

    kind = NonStationarySolver.kind
    title = "BNS"
    Options = BNSOptions
    # what the fit job (bespoke_fast.fit) needs to know of the kind: the header its steps are
    # counted with (it starts from a fitted Bespoke RK2), its file name, its named starts
    fit_header, file_label, start_names = "midpoint", "bns", ("bespoke",) + INITS
    min_train, min_val = MIN_TRAIN_PAIRS, MIN_VAL_PAIRS
    streams_gt = False          # L-BFGS reads its whole training set every evaluation

    def fit_options(self, settings: dict) -> dict:
        """The options the fit job trains this kind with: NFE steps and its iteration cap."""
        return {"n_steps": settings["nfe"], "iters": settings["iters"]}
    lacks = {
        "finetune_iters": "BNS has no fine-tune phase: its loss is end-to-end already",
        "finetune_lr": "BNS has no fine-tune phase: its loss is end-to-end already",
        "polish_iters": "BNS has no polish phase: its default optimizer is L-BFGS already",
        "gt_mode": "BNS trains on the GT endpoints only",
        "micro_batch": "BNS evaluates L-BFGS's full batch in chunks of batch_size already",
        "activation_checkpointing": "BNS has no micro-batching memory options",
        "autocast": "BNS runs the model in model_dtype",
        "base": "a BNS solver has no base: its init is its header",
        "L_tau": "BNS has no RMSE-bound phase",
    }

    def planned_evaluations(self, options: BNSOptions, num_train: int, num_val: int,
                            nfe: int) -> int:
        """An upper bound on a fit's model evaluations (forward-equivalents), its Bespoke start
        and validations included: ``budget_evals`` when set, and never more than the caps allow
        (the Bespoke start at the bespoke trainer's defaults, then L-BFGS at about 1.3
        full-batch loss evaluations per iteration on up to ``DEFAULT_NUM_TRAIN`` pairs)."""
        from .bespoke import OPTIONS as bespoke_options
        from .bespoke import TRAINER as bespoke_trainer
        start = (bespoke_trainer.planned_evaluations(
            dataclasses.replace(bespoke_options, budget_evals=None), num_train, num_val, nfe)
            if options.init == "bespoke" else 0)
        iters = options.iters or 300
        pairs = min(options.num_train or DEFAULT_NUM_TRAIN, num_train)
        warm = min(options.warmup_pairs, pairs)
        n_params = sum(p.numel() for p in NonStationarySolver(options.n_steps, init="euler").parameters())
        train = (int(1.3 * iters * pairs * 3 * nfe)
                 + (iters * (n_params + 1 + MAX_TRIALS) * warm * nfe if warm else 0)  # LM
                 + options.adam_iters * min(options.batch_size, pairs) * 3 * nfe)
        validations = (2 + math.ceil(iters / options.val_every) + (iters if warm else 0)
                       + math.ceil(options.adam_iters / options.val_every)) * num_val * nfe
        at_caps = start + train + validations
        return at_caps if options.budget_evals is None else min(at_caps, options.budget_evals)

    def fit(self, model, trajectories, o, checkpoint, progress, model_name, callback):
        (n_steps, init, optimizer, iters, batch_size, lr, lr_final, num_train, val, val_every,
         seed, checkpoint_every, dtype, model_dtype, adam_iters, adam_lr, budget_seconds,
         patience, min_delta, select, max_iters, budget_evals, warmup_pairs) = (
            o.n_steps, o.init, o.optimizer, o.iters, o.batch_size, o.lr, o.lr_final, o.num_train,
            o.val, o.val_every, o.seed, o.checkpoint_every, o.dtype, o.model_dtype, o.adam_iters,
            o.adam_lr, o.budget_seconds, o.patience, o.min_delta, o.select, o.max_iters,
            o.budget_evals, o.warmup_pairs)
        num_val = None
        n_steps = check_int("n_steps", n_steps)
        _check_init(init, n_steps)
        stage_max_iters = max_iters
        check_choice("optimizer", optimizer, OPTIMIZERS)
        iters = check_int("iters", (1000 if optimizer == "adam" else 300) if iters is None else iters)
        adam_iters = check_int("adam_iters", adam_iters, 0) if optimizer == "auto" else 0
        warmup_pairs = check_int("warmup_pairs", warmup_pairs, 0)
        max_iters = check_int("max_iters", (2 if warmup_pairs and optimizer != "adam" else 1) * iters
                              + adam_iters if max_iters is None else max_iters)
        check_stopping(select, patience, budget_seconds, min_delta)
        check_budget_evals(budget_evals)
        if not (adam_lr > 0 and math.isfinite(adam_lr)):
            raise InvalidArgumentError(f"adam_lr must be a positive number, got {adam_lr}")
        batch_size = check_int("batch_size", batch_size)
        val_every = check_int("val_every", val_every)
        checkpoint_every = check_int("checkpoint_every", checkpoint_every)
        lr = (adam_lr if optimizer == "adam" else 1.0) if lr is None else lr
        if not (lr > 0 and math.isfinite(lr)):
            raise InvalidArgumentError(f"lr must be a positive number, got {lr}")
        if not 0 <= lr_final <= 1:
            raise InvalidArgumentError(f"lr_final must be in [0, 1] (a fraction of lr), got {lr_final}")
        if not isinstance(trajectories, Trajectories):
            raise InvalidTypeError("trajectories must be a TrajectorySet (bespoke_fast.load_trajectories(dir))")
        check_gt_matches(model, trajectories, model_name)
        raw, ledger = model, EvalLedger()
        model = ledger.wrap(raw)            # every model call of the fit is counted
        if isinstance(val, int) and not isinstance(val, bool):
            num_val, val = val, None
        if val is not None and not isinstance(val, TrajectorySet):
            raise InvalidTypeError("val must be None, a number of pairs or a TrajectorySet")
        num_train, num_val, split_note = bns_split(len(trajectories), num_train, num_val,
                                                   len(val) if val is not None else None)
        if val is not None:
            pool, val_set = trajectories, val
        else:
            pool, val_set = trajectories.split(num_val)
        train_set = pool.subset(range(num_train))
        model_dtype = train_set.x0.dtype if model_dtype is None else model_dtype
        rank, world, _ = dist_info()
        device = train_set.x0.device
        stage, total_budget = None, budget_seconds
        if isinstance(init, str) and init == "bespoke":
            fitted, stage = _bespoke_start(raw, pool, val_set, n_steps, budget_seconds, seed,
                                           checkpoint, progress, model_name, select,
                                           stage_max_iters, budget_evals)
            for name, row in (stage.get("evaluations") or {}).items():
                if name != "total":     # the stage's spend is the fit's, by stage
                    ledger.add(f"bespoke-{name}", row["forward"], row["backward"])
            init = fitted if fitted is not None else ("midpoint" if n_steps % 2 == 0 else "euler")
            if budget_seconds is not None and fitted is not None:
                budget_seconds = max(budget_seconds - stage["wall_seconds"], 1.0)
        start = _starting_solver(init, n_steps)
        solver = start.to(device)
        init = start.meta.get("initialised_from", {}).get("kind") or init
        batch_size = min(batch_size, len(train_set))
        config = {"kind": "bns", "n_steps": n_steps, "init": init, "init_fingerprint": start.fingerprint(),
                  "optimizer": optimizer,
                  "iters": iters, "batch_size": batch_size, "lr": lr,
                  "lr_final": lr_final if optimizer != "lbfgs" else None, "seed": seed,
                  "num_train": len(train_set), "num_val": len(val_set), "val_every": val_every,
                  "checkpoint_every": checkpoint_every, "gt": gt_split_fingerprint(train_set, val_set),
                  "dtype": str(dtype or train_set.x0.dtype).replace("torch.", ""),
                  "model_dtype": str(model_dtype).replace("torch.", ""),
                  "loss": "mean log mse", "adam_iters": adam_iters,
                  "adam_lr": adam_lr if optimizer == "auto" else None,
                  "budget_seconds": total_budget, "budget_evals": budget_evals,
                  "warmup_pairs": warmup_pairs, "patience": patience, "min_delta": min_delta,
                  "select": select, "max_iters": max_iters, "gt_seed": trajectories.meta.get("seed")}
        gen = torch.Generator().manual_seed(seed * 1000 + rank)

        def closure_on(data):  # L-BFGS: loss and gradient on the whole of ``data``
            def closure(ctx):
                ctx.optim.zero_grad(set_to_none=True)
                loss = _full_loss_backward(solver, model, data, batch_size, world, dtype,
                                           model_dtype)
                ctx.state.loss_evals += 1
                ctx.state.last_loss = loss
                return torch.tensor(loss, dtype=torch.float64)
            return closure
        warmup_set = train_set.subset(range(min(warmup_pairs, len(train_set))))

        def adam_step(ctx, k):
            state = ctx.state
            rows = (range(len(train_set)) if batch_size == len(train_set) else
                    torch.randperm(len(train_set), generator=gen)[:batch_size])
            for group in ctx.optim.param_groups:
                group["lr"] = _lr_at(k - state.phase_start, state.horizon or ctx.cap,
                                     lr if optimizer == "adam" else adam_lr, lr_final)
            ctx.optim.zero_grad(set_to_none=True)
            loss = _full_loss_backward(solver, model, train_set.subset(rows), batch_size, world,
                                       dtype, model_dtype)
            ctx.optim.step()
            state.loss_evals += 1
            return k + 1, loss

        # Levenberg-Marquardt on a few pairs first (it finds the basin), then L-BFGS on all
        def endpoints(part):    # the warm-up's samples: float64 state, the model in model_dtype
            x0 = part.x0 if dtype is None else part.x0.to(dtype)
            return solver.sample(model, x0, model_dtype=model_dtype, **part.extras).double()

        n_params = sum(p.numel() for p in solver.parameters())
        warmup = Phase("warmup", iters, lambda: LevenbergMarquardt(solver.parameters()),
                       lm_step(warmup_set, endpoints, batch_size,
                               (n_params + 2) * solver.nfe * len(warmup_set)),
                       budget_share=WARMUP_SHARE, budget_from_start=True, val_every=1,
                       cap_within_max_iters=True,
                       record={"optimizer": "levenberg-marquardt", "pairs": len(warmup_set)})
        lbfgs = Phase("lbfgs", iters, lambda: new_lbfgs(solver.parameters(), lr),
                      lbfgs_step(closure_on(train_set), checkpoint_every,
                                 3 * solver.nfe * len(train_set)), val_every=val_every,
                      cap_within_max_iters=True, record={"optimizer": "lbfgs"})
        # "auto": L-BFGS stalled, converged or used its iterations: Adam goes on from the best
        # parameters (on float32 networks L-BFGS often stops far from the optimum)
        adam = Phase("adam", iters if optimizer == "adam" else adam_iters,
                     lambda: torch.optim.Adam(solver.parameters(),
                                              lr=lr if optimizer == "adam" else adam_lr),
                     adam_step, val_every=val_every, sets_horizon=True, cap_within_max_iters=True,
                     record={"optimizer": "adam"})
        lbfgs_phases = ([warmup] if 0 < len(warmup_set) < len(train_set) else []) + [lbfgs]
        phases = [adam] if optimizer == "adam" else lbfgs_phases + ([adam] if adam_iters else [])
        stopping = Stopping(max_iters, budget_seconds, patience, min_delta, select, budget_evals)
        state = run_phases(solver, model, val_set, phases, config=config, gen=gen, stopping=stopping,
                           checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                           progress=progress, desc=f"fit bns-{init} NFE {solver.nfe} ({optimizer})",
                           callback=callback, validate_start=True, ledger=ledger)
        switched_at = state.phase_starts.get("adam") if optimizer == "auto" else None
        solver, report = finish(solver, raw, trajectories, config, state, model_name,
                                init=state.init_record, loss_evaluations=state.loss_evals,
                                converged=state.stop_reason == "converged",
                                lbfgs_restarts=state.restarts, stop_reason=state.stop_reason,
                                iterations=state.iteration, switched_to_adam_at=switched_at,
                                lbfgs_stop_reason=(state.phase_stop_reasons.get("lbfgs")
                                                   if switched_at is not None else None),
                                split_note=split_note, bespoke_stage=stage,
                                phase_stop_reasons=state.phase_stop_reasons)
        if stage and "wall_seconds" in stage:    # the fit's wall time includes its Bespoke start
            report["bns_wall_seconds"] = report["wall_seconds"]
            report["wall_seconds"] += stage["wall_seconds"]
            solver.meta["training"]["wall_seconds"] = report["wall_seconds"]
        return solver, report


TRAINER = BNSTrainer()
train_bns = keyword_trainer(TRAINER, "train_bns", """Fit a :class:`~bespoke_fast.solvers.bns.NonStationarySolver` (NFE = ``n_steps``) to ``model``.

    Args:
        model: the velocity model the GT was generated with.
        trajectories: a GT set, in memory or streamed (``bespoke_fast.fitting.trajectories.
            Trajectories``); only the pairs ``(x0, x1)`` are used, and the knots for the
            Bespoke start.
        n_steps: NFE.
        init: the starting solver. ``"bespoke"`` (default): first fit a Bespoke solver of the
            same NFE (RK2 for an even NFE, RK1 for an odd one) on all the non-validation
            trajectories with ``BESPOKE_SHARE`` (40%) of the budgets, then start BNS from it (the report's
            ``bespoke_stage`` says how it went; GT without interior knots falls back to
            midpoint / Euler). A fitted solver of the same NFE: start from it. Both are written
            exactly in BNS form (:meth:`NonStationarySolver.from_solver`), so BNS starts where
            the Bespoke solver ends and the kept result is never worse on validation.
            ``"midpoint"`` (n even) or ``"euler"``: the classical solver written in BNS form.
        optimizer: ``"auto"`` (default): full-batch L-BFGS with a strong-Wolfe line search (the
            problem is small, smooth, deterministic and ill-conditioned), then, if L-BFGS
            stalls or converges ("converged" after a fresh restart makes no progress, or no
            validation gain in ``patience`` validations) or uses its ``iters``, Adam from the
            best parameters for up to ``adam_iters`` more (rate ``adam_lr``, cosine decay);
            ``"lbfgs"`` or ``"adam"`` alone.
        iters: iterations of the first optimizer (default 300 for L-BFGS / auto, 1000 for Adam).
            L-BFGS: one direction + line search, about 1.3 loss and gradient evaluations on the
            whole training set. Adam: one step on a batch.
        adam_iters, adam_lr: the Adam continuation of ``"auto"``.
        budget_evals, budget_seconds, patience, min_delta, select, max_iters: stopping and
            checkpoint selection (``bespoke_fast.fitting.stopping``): stop at the first of
            ``patience`` validations without a ``min_delta`` dB gain, ``budget_evals`` model
            evaluations (forward-equivalents, default 200,000; None: none), ``budget_seconds``
            of wall time (default None), ``max_iters`` iterations in all (default twice
            ``iters`` with a warm-up, plus ``adam_iters``), a non-finite loss (the phase's best
            parameters are restored; ``events`` says where); keep the best ``select`` score
            (default per-sample PSNR).
        warmup_pairs: Levenberg-Marquardt on this many training pairs first (at most
            ``WARMUP_SHARE`` of the budget from its start, validated every iteration), then
            L-BFGS on all of them; 0: none.
        batch_size: Adam's batch (``>= num_train``: the whole training set every step);
            L-BFGS always uses the whole training set and evaluates it in chunks of
            ``batch_size`` pairs (gradient accumulation: bounds memory).
        lr: L-BFGS step scale (default 1) or Adam's learning rate (default 3e-3), decayed along a
            cosine to ``lr * lr_final`` at the last iteration (Adam only: the end-to-end loss is
            sharp, and a constant rate leaves the validation PSNR jumping by tens of dB).
        num_train, val: the last ``val`` trajectories are held out for validation first, then
            the first ``num_train`` of the rest are the training pairs. Defaults
            520 / 1024, shrunk to fit a smaller set (the report's ``split_note`` says what was
            used); explicit sizes that do not fit, or fewer than 16 / 16 pairs, are refused
            (:func:`bns_split`).
        val: the number of validation pairs (as the bespoke trainer's ``val``; ``num_val`` is
            accepted for it), or a separate TrajectorySet to validate on instead (then
            ``trajectories`` are all for training, up to ``num_train``).
        val_every: validate every k iterations (and at the start and the end); the parameters
            with the best validation PSNR are kept (the initial solver included).
        seed: seeds Adam's batch order (the result is a deterministic function of the inputs on CPU).
        checkpoint: path; saved every ``checkpoint_every`` iterations (atomically). If it exists,
            training resumes from it and ends with exactly the parameters of an uninterrupted run
            (iteration-capped runs; a wall-time budget ends wherever the time runs out). The
            Bespoke start keeps its own checkpoint beside it, ``<checkpoint>.bespoke``.
        dtype: dtype of the sampler's state while training (default float64: float32 rounding
            of the loss stalls L-BFGS, see ``end_to_end_loss``); ``None``: the GT's dtype.
        model_dtype: dtype the model is called in while training (default: the GT's, which
            any model accepts); ``torch.float64`` for models that run in float64 (exact flows)
            goes further still. Validation samples in the GT's dtype, like deployment.
        callback: optional ``callback(iteration, record)`` after each validation.

    Returns: ``(solver, report)``; the report holds ``bespoke_stage`` (the Bespoke start's base,
    best validation record, stop reason and wall time; ``wall_seconds`` is the whole fit's, the
    BNS part alone is ``bns_wall_seconds``), the curve (iteration, loss, validation
    RMSE/PSNR; iteration 0 is the initial solver), the initial and best validation figures,
    model evaluations spent (``evaluations``: exact forward / backward rows and
    forward-equivalents by stage, the Bespoke start's as ``bespoke-*``; ``nfe``: the per-sample
    forward summary), ``events``, the number of loss evaluations, ``stop_reason`` (patience,
    budget, max_iters, converged, nonfinite) and ``phase_stop_reasons``, ``iterations``,
    ``switched_to_adam_at`` and ``lbfgs_stop_reason`` (auto) and the wall time.

    Under torchrun, gradients are all-reduced (Adam: each rank draws its own batches; L-BFGS:
    every rank computes the same full batch, so nothing is gained) and only rank 0 writes
    checkpoints. (Not tested multi-process.)

    Example::

        >>> gt = load_trajectories("runs/gt")                       # 1544 trajectories
        >>> solver, report = train_bns(model, gt, n_steps=8)        # 520 train / 1024 val
        >>> solver.save("bns_nfe8.json")
    """,
                            aliases={"num_val": "val"})
