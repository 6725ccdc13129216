"""Fitting a non-stationary (BNS) solver to a model (method.md section 6).

BNS solvers are trained end to end on a fixed set of GT pairs ``(x0, x(1))`` (paper: 520 for
training, 1024 held out for validation) by minimising, through the whole n-step sampler::

    loss = mean_batch log ||x_n - x(1)||^2          (per-sample MSE; = -mean PSNR ln10/10 + const)

i.e. maximising the mean PSNR, starting (default ``init="bespoke"``) from a Bespoke solver of
the same NFE fitted first on the same GT with half of the time budget and rewritten exactly in
BNS form (method.md section 6), with full-batch L-BFGS, Adam, or (default, ``"auto"``) L-BFGS
that hands over to Adam, from the best parameters so far, when it stalls, converges or uses its
iterations. Training stops when the validation score stops improving, within a time / iteration
budget (``bespoke_fast.fitting.stopping``). The parameters with the best validation score are kept (the
initial solver counts, so the result is never worse on validation than the base solver).
Validation, checkpoint writing and model checks reuse the Bespoke trainer's helpers (``bespoke_fast.fitting.bespoke``); the checkpoint scheme is the same.

Measured from the midpoint start (``init="midpoint"``) on ``zoo`` gmm-64 (520 train / 1024
validation pairs, CPU, one thread), validation PSNR:
midpoint NFE 8 / 10 / 20: 43.9 / 49.3 / 65.6 dB; bespoke-rk2 NFE 10: 65.5 dB; BNS (defaults,
L-BFGS 300 it, about 70 s) NFE 8: 71.9 dB, NFE 10: 75.1 dB; with Adam (1000 it, 2-3 min)
67.0 / 69.3 dB.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import InvalidArgumentError, InvalidTypeError, check_choice, check_int
from ..solvers.bns import INITS, NonStationarySolver
from ..utils import dist_info
from .common import (average_gradients, check_gt_matches, checkpoint_due, finish, frozen,
                     gt_split_fingerprint, lbfgs_advance, load_checkpoint, new_lbfgs,
                     new_lbfgs_state, save_checkpoint, show_validation, validate_solver)
from .trajectories import TrajectorySet
from .stopping import (DEFAULT_SELECT, check_stopping, observe, phase_horizon, rank0_decides,
                       stop_reason)
from .stopping import new_state as new_stop_state

__all__ = ["train_bns", "BNSOptions", "OPTIONS", "end_to_end_loss", "bns_split", "OPTIMIZERS",
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
    search (measured on gmm-64, NFE 8: 64.8 dB float32 state, 70.7 dB float64 state with the
    model still in float32, 72.4 dB all float64)."""
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


def _next_stop(done: int, iters: int, *every: int) -> int:
    """The next iteration after ``done`` that is a multiple of one of ``every``, or ``iters``."""
    return min([iters] + [(done // e + 1) * e for e in every])


BESPOKE_SHARE = 0.5   # of the wall-time budget for the Bespoke stage of init="bespoke"


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
                   budget_seconds, seed, checkpoint, progress, model_name, select, max_iters):
    """``init="bespoke"``: fit a Bespoke solver of the same NFE (RK2 for an even NFE, else RK1)
    on all the non-validation trajectories, validated on the BNS validation set, within
    ``BESPOKE_SHARE`` of the budget and, when given, the same ``max_iters``, without the
    Bespoke trainer's L-BFGS polish. Returns ``(solver or None, record)``; None (and a note)
    when the GT has no interior knots to train a Bespoke solver on."""
    if len(pool.knots_t) <= 2:
        return None, {"note": "the GT has no interior knots (endpoints only), so no Bespoke start: "
                              "BNS starts from midpoint / Euler"}
    from .bespoke import train
    base = "rk2" if n_steps % 2 == 0 else "rk1"
    # no L-BFGS polish: BNS's own L-BFGS goes on from the start, in a family that contains it,
    # and the time the polish would take (it often runs to the budget) is BNS's (measured on
    # digits-exact at NFE 10: with the polish, BNS had 85 s left and ended at bespoke + 2.7 dB)
    solver, report = train(model, pool, base=base, n_steps=n_steps // (2 if base == "rk2" else 1),
                           val=val_set, seed=seed, model_name=model_name, progress=progress,
                           polish_iters=0,
                           budget_seconds=None if budget_seconds is None else
                           budget_seconds * BESPOKE_SHARE, select=select, max_iters=max_iters,
                           checkpoint=None if checkpoint is None else
                           Path(str(checkpoint) + ".bespoke"))
    return solver, {"base": base, "num_train": len(pool), "best": report["best"],
                    "stop_reason": report["stop_reason"], "wall_seconds": report["wall_seconds"],
                    "nfe": report["nfe"], "start": report["start"]}


@dataclass(frozen=True)
class BNSOptions:
    """The BNS trainer's tunable options and their defaults: the one place they are set.
    :func:`train_bns` takes each as a keyword of the same name and type as the bespoke trainer's
    (:class:`~bespoke_fast.fitting.bespoke.BespokeOptions`) where both have it; the CLI's ``train``
    command fills its unset options from here. Not here, because BNS has no such thing: a
    fine-tune phase (its loss is end-to-end already) and a GT mode (it trains on endpoints)."""
    iters: int | None = None             # None: L-BFGS 300, Adam 3000
    batch_size: int = 520                # pairs per chunk (L-BFGS) or per iteration (Adam)
    lr: float | None = None              # None: L-BFGS 1, Adam 3e-3
    val: int | None = None               # pairs held out for validation (or a set); None: 1024,
                                         # fewer when the GT set is small
    num_train: int | None = None         # training pairs; None: 520, fewer when the set is small
    val_every: int = 25                  # validate every k iterations
    optimizer: str = "auto"              # "auto" (L-BFGS, then Adam when it stops), "lbfgs", "adam"
    budget_seconds: float | None = 170.0  # wall-time budget of the whole fit
    patience: int | None = 8             # validations without improvement before a phase stops
    select: str = DEFAULT_SELECT         # validation score that picks the kept checkpoint
    max_iters: int | None = None         # cap on all iterations
    init: str = "bespoke"                # start: a fitted Bespoke solver, or "midpoint" / "euler"


OPTIONS = BNSOptions()


def train_bns(model, trajectories: TrajectorySet, n_steps: int = 8, init=OPTIONS.init,
              optimizer: str = OPTIONS.optimizer, iters: int | None = OPTIONS.iters,
              batch_size: int = OPTIONS.batch_size, lr: float | None = OPTIONS.lr,
              lr_final: float = 0.01, num_train: int | None = OPTIONS.num_train,
              num_val: int | None = None, val=OPTIONS.val, val_every: int = OPTIONS.val_every,
              seed: int = 0, checkpoint=None, checkpoint_every: int = 50, dtype=torch.float64,
              model_dtype=None, progress: bool = True,
              model_name: str = "", callback=None, adam_iters: int = 3000, adam_lr: float = 3e-3,
              budget_seconds: float | None = OPTIONS.budget_seconds,
              patience: int | None = OPTIONS.patience, min_delta: float = 0.02,
              select: str = OPTIONS.select, max_iters: int | None = OPTIONS.max_iters):
    """Fit a :class:`~bespoke_fast.solvers.bns.NonStationarySolver` (NFE = ``n_steps``) to ``model``.

    Args:
        model: the velocity model the GT was generated with.
        trajectories: a :class:`TrajectorySet`; only the pairs ``(x0, x1)`` are used.
        n_steps: NFE.
        init: the starting solver. ``"bespoke"`` (default): first fit a Bespoke solver of the
            same NFE (RK2 for an even NFE, RK1 for an odd one) on all the non-validation
            trajectories with half of ``budget_seconds``, then start BNS from it (the report's
            ``bespoke_stage`` says how it went; GT without interior knots falls back to
            midpoint / Euler). A fitted solver of the same NFE: start from it. Both are written
            exactly in BNS form (:meth:`NonStationarySolver.from_solver`), so BNS starts where
            the Bespoke solver ends and the kept result is never worse on validation. Measured
            (held-out PSNR at NFE 10, 60 s + 60 s on one CPU thread): digits-vcs bespoke 47.3 ->
            BNS 56.0 dB; digits-eps 42.3 -> 47.6 dB (from midpoint with 30 s: 42.4 and 34.4).
            ``"midpoint"`` (n even) or ``"euler"``: the classical solver written in BNS form.
        optimizer: ``"auto"`` (default): full-batch L-BFGS with a strong-Wolfe line search (the
            problem is small, smooth, deterministic and ill-conditioned: measured on gmm-64,
            3-4 dB better than Adam in a quarter of the time; on the float32 digits-fmot MLP at
            NFE 10 with 520 pairs and a 170 s budget, 48.0 dB vs Adam's 44.1), then, if L-BFGS
            stalls or converges ("converged" after a fresh restart makes no progress, or no
            validation gain in ``patience`` validations) or uses its ``iters``, Adam from the
            best parameters for up to ``adam_iters`` more (rate ``adam_lr``, cosine decay);
            ``"lbfgs"`` or ``"adam"`` alone.
        iters: iterations of the first optimizer (default 300 for L-BFGS / auto, 1000 for Adam).
            L-BFGS: one direction + line search, about 1.3 loss and gradient evaluations on the
            whole training set. Adam: one step on a batch.
        adam_iters, adam_lr: the Adam continuation of ``"auto"``.
        budget_seconds, patience, min_delta, select, max_iters: stopping and checkpoint
            selection (``bespoke_fast.fitting.stopping``): stop at the first of ``patience``
            validations without a ``min_delta`` dB gain, ``budget_seconds`` of wall time
            (default 170 s; None: none), ``max_iters`` iterations in all (default ``iters +
            adam_iters``); keep the best ``select`` score (default per-sample PSNR).
        batch_size: Adam's batch (``>= num_train``: the whole training set every step);
            L-BFGS always uses the whole training set and evaluates it in chunks of
            ``batch_size`` pairs (gradient accumulation: bounds memory).
        lr: L-BFGS step scale (default 1) or Adam's learning rate (default 3e-3), decayed along a
            cosine to ``lr * lr_final`` at the last iteration (Adam only: the end-to-end loss is
            sharp, and a constant rate leaves the validation PSNR jumping by tens of dB).
        num_train, num_val: the last ``num_val`` trajectories are held out for validation
            first, then the first ``num_train`` of the rest are the training pairs. Defaults
            520 / 1024, shrunk to fit a smaller set (the report's ``split_note`` says what was
            used); explicit sizes that do not fit, or fewer than 16 / 16 pairs, are refused
            (:func:`bns_split`).
        val: the number of validation pairs (as the bespoke trainer's ``val``; the same as
            ``num_val``), or a separate TrajectorySet to validate on instead (then
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
    model evaluations spent (``nfe``: GT, training, validation; per-sample), the number of loss
    evaluations, ``stop_reason`` (patience, budget, max_iters, converged), ``iterations``,
    ``switched_to_adam_at`` and ``lbfgs_stop_reason`` (auto) and the wall time.

    Under torchrun, gradients are all-reduced (Adam: each rank draws its own batches; L-BFGS:
    every rank computes the same full batch, so nothing is gained) and only rank 0 writes
    checkpoints. (Not tested multi-process.)

    Example::

        >>> gt = load_trajectories("runs/gt")                       # 1544 trajectories
        >>> solver, report = train_bns(model, gt, n_steps=8)        # 520 train / 1024 val
        >>> solver.save("bns_nfe8.json")
    """
    n_steps = check_int("n_steps", n_steps)
    _check_init(init, n_steps)
    stage_max_iters = max_iters
    check_choice("optimizer", optimizer, OPTIMIZERS)
    iters = check_int("iters", (1000 if optimizer == "adam" else 300) if iters is None else iters)
    adam_iters = check_int("adam_iters", adam_iters, 0) if optimizer == "auto" else 0
    max_iters = check_int("max_iters", iters + adam_iters if max_iters is None else max_iters)
    check_stopping(select, patience, budget_seconds, min_delta)
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
    if not isinstance(trajectories, TrajectorySet):
        raise InvalidTypeError("trajectories must be a TrajectorySet (bespoke_fast.load_trajectories(dir))")
    check_gt_matches(model, trajectories, model_name)
    if isinstance(val, int) and not isinstance(val, bool):
        if num_val is not None and num_val != val:
            raise InvalidArgumentError(f"val={val} and num_val={num_val} both set the number of "
                                       f"validation pairs; give one")
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
        fitted, stage = _bespoke_start(model, pool, val_set, n_steps, budget_seconds, seed,
                                       checkpoint, progress, model_name, select,
                                       stage_max_iters)
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
              "budget_seconds": total_budget, "patience": patience, "min_delta": min_delta,
              "select": select, "max_iters": max_iters, "gt_seed": trajectories.meta.get("seed")}
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    first = "adam" if optimizer == "adam" else "lbfgs"
    state = {"iteration": 0, "curve": [], "nfe_train": 0, "nfe_val": 0, "wall_total": 0.0,
             **new_lbfgs_state(), **new_stop_state(), "phase": first, "phase_start": 0,
             "phase_wall": 0.0, "horizon": None, "switched_at": None, "lbfgs_stop_reason": None}

    def make_optim(kind):
        if kind == "adam":
            return torch.optim.Adam(solver.parameters(), lr=lr if optimizer == "adam" else adam_lr)
        return new_lbfgs(solver.parameters(), lr)

    optim = make_optim(first)
    ckpt = Path(checkpoint) if checkpoint else None
    saved = load_checkpoint(ckpt, config, solver, gen)
    if saved is not None:
        state = saved["state"]
        optim = make_optim(state["phase"])
        optim.load_state_dict(saved["optim"])
    started = time.perf_counter()

    def elapsed():
        return state["wall_total"] + time.perf_counter() - started

    from tqdm.auto import tqdm
    bar = tqdm(total=max_iters, initial=state["iteration"], disable=not progress or rank != 0,
               desc=f"fit bns-{init} NFE {solver.nfe} ({optimizer})", unit="it", dynamic_ncols=True)

    def validate(done, loss):
        record = {"iteration": done, "loss": loss, "optimizer": state["phase"],
                  **validate_solver(solver, model, val_set)}
        state["nfe_val"] += solver.nfe * len(val_set)
        state["curve"].append(record)
        observe(state, record, solver, select, min_delta)
        return record

    def closure():  # L-BFGS: loss and gradient on the whole training set
        optim.zero_grad(set_to_none=True)
        loss = _full_loss_backward(solver, model, train_set, batch_size, world, dtype, model_dtype)
        state["nfe_train"] += solver.nfe * len(train_set)
        state["loss_evals"] += 1
        state["last_loss"] = loss
        return torch.tensor(loss, dtype=torch.float64)

    with frozen(model):
        if state["iteration"] == 0 and not state["curve"]:
            state["init_record"] = validate(0, None)
        while state["stop_reason"] is None:
            k = state["iteration"]
            adam = state["phase"] == "adam"
            cap = (adam_iters if state["switched_at"] is not None else iters)
            cap = min(cap, max_iters - state["phase_start"])
            if adam:
                rows = (range(len(train_set)) if batch_size == len(train_set) else
                        torch.randperm(len(train_set), generator=gen)[:batch_size])
                for group in optim.param_groups:
                    group["lr"] = _lr_at(k - state["phase_start"], state["horizon"] or cap,
                                         lr if optimizer == "adam" else adam_lr, lr_final)
                optim.zero_grad(set_to_none=True)
                loss = _full_loss_backward(solver, model, train_set.subset(rows), batch_size, world,
                                            dtype, model_dtype)
                optim.step()
                state["nfe_train"] += solver.nfe * batch_size
                state["loss_evals"] += 1
                done = k + 1
            else:
                stop = _next_stop(k, state["phase_start"] + cap, val_every, checkpoint_every)
                done = lbfgs_advance(optim, closure, state, k, stop, budget_seconds, elapsed)
                loss = state["last_loss"]
            state["iteration"] = done
            bar.update(done - k)
            in_phase = done - state["phase_start"]
            capped = in_phase >= cap or done >= max_iters
            out_of_time = budget_seconds is not None and elapsed() >= budget_seconds
            fresh = not state["curve"] or state["curve"][-1]["iteration"] != done
            validated = fresh and (done % val_every == 0 or capped or out_of_time
                                   or state["converged"])
            if validated:
                record = validate(done, loss)
                if adam and state["horizon"] is None and budget_seconds is not None:
                    state["horizon"] = phase_horizon(cap, in_phase, elapsed() - state["phase_wall"],
                                                     budget_seconds - elapsed())
                show_validation(bar, state, done, record, callback)
            reason = "converged" if state["converged"] else stop_reason(
                state, in_phase, cap, patience, budget_seconds, elapsed(), validated)
            if done >= max_iters and reason is None:
                reason = "max_iters"
            reason = rank0_decides(reason, world, state)
            switched = False
            if reason is not None:
                if (optimizer == "auto" and not adam and adam_iters and done < max_iters
                        and reason != "budget"):
                    # L-BFGS stalled, converged or used its iterations: go on with Adam from the
                    # best parameters (on float32 networks L-BFGS often stops far from the optimum)
                    switched = True
                    solver.load_state_dict(state["best"])
                    optim = make_optim("adam")
                    state.update(phase="adam", phase_start=done, phase_wall=elapsed(), horizon=None,
                                 bad_evals=0, switched_at=done, lbfgs_stop_reason=reason,
                                 converged=False)
                else:
                    state["stop_reason"] = reason
            if checkpoint_due(ckpt, rank, done, checkpoint_every, switched, state):
                started = save_checkpoint(ckpt, config, solver, optim, gen, done, state, started)
    solver, report = finish(solver, model, trajectories, config, state, model_name, bar, started,
                            init=state["init_record"], loss_evaluations=state["loss_evals"],
                            converged=state["stop_reason"] == "converged",
                            lbfgs_restarts=state["restarts"], stop_reason=state["stop_reason"],
                            iterations=state["iteration"], switched_to_adam_at=state["switched_at"],
                            lbfgs_stop_reason=state["lbfgs_stop_reason"], split_note=split_note,
                            bespoke_stage=stage)
    if stage and "wall_seconds" in stage:    # the fit's wall time includes its Bespoke start
        report["bns_wall_seconds"] = report["wall_seconds"]
        report["wall_seconds"] += stage["wall_seconds"]
        solver.meta["training"]["wall_seconds"] = report["wall_seconds"]
    return solver, report
