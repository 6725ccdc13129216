"""Fitting a Bespoke solver to a model: the RMSE-bound loss and the trainer (method.md section 5).

Loss for a batch of GT trajectories ``x(t)`` (all n steps in parallel)::

    d_{i+1} = || x(t_{i+1}) - step_i(x(t_i)) ||            per-sample RMSE local error
    M_i     = prod_{j=i+1}^{n-1} L_j                       (M_{n-1} = 1: the LAST error has weight 1)
    loss    = mean_batch sum_{i=0}^{n-1} M_i d_{i+1}

Gradients reach the solver parameters through the step coefficients, through ``M``, through
the model inputs (times and states), and through ``x(t_i)`` at the moving grid times: cached GT
interpolates the stored trajectories with a cubic Hermite (differentiable in t); online GT
solves RK45 at the detached grid each iteration and uses ``x(sg t) + u(sg t, x(sg t)) (t - sg t)``.

After the bound phase an end-to-end fine-tune **(ours)** minimises ``mean log ||x_n - x(1)||^2``
(i.e. maximises the mean per-sample PSNR) through the n-step sampler (cheap at NFE <= 20) with
Adam on batches, then a polish **(ours)** minimises the same loss with full-batch L-BFGS (Adam's
batch noise leaves it short of the optimum: measured on digits-fmot at NFE 6, +0.7 dB on
validation and +0.9 dB held out). Each phase runs until its validation score stops improving,
within a time / iteration budget; the checkpoint kept is the one with the best validation score
(default the mean per-sample PSNR; ``select``, see ``bespoke_fast.fitting.stopping``), and the
report says why training stopped.

The fit ends in the basin it starts in, so by default (``init="auto"``, ours) it first screens a
few starting solvers (the base solver on the searched grid and on generic grids,
``bespoke_fast.fitting.grid_search.candidate_starts``) with a short end-to-end trial each and
starts from the best.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import InvalidArgumentError, InvalidTypeError, call_model, check_choice, check_int
from ..solvers.adaptive import solve_adaptive
from ..solvers.bespoke import BespokeSolver
from ..utils import dist_info
from .common import (average_gradients, check_gt_matches, checkpoint_due, cosine_lr, finish,
                     frozen, gt_split_fingerprint, in_dtype, lbfgs_advance, load_checkpoint,
                     new_lbfgs, new_lbfgs_state, save_checkpoint, show_validation,
                     validate_solver)
from .trajectories import TrajectorySet
from .gt_storage import StreamedTrajectories
from .stopping import (DEFAULT_SELECT, check_stopping, observe, phase_horizon, rank0_decides,
                       selection_score, stop_reason)
from .stopping import new_state as new_stop_state

__all__ = ["train", "BespokeOptions", "OPTIONS", "rmse_bound_loss", "local_errors",
           "lipschitz_weights", "gt_at_grid", "loss_backward", "model_for_loss", "screen_starts",
           "INITS"]

GT_MODES = ("cached", "online")
INITS = ("auto", "searched", "identity")


# ----------------------------------------------------------------------------- the loss
def lipschitz_weights(L: torch.Tensor) -> torch.Tensor:
    """``M_i = prod_{j=i+1}^{n-1} L_j`` for ``L`` of shape ``[n]``; ``M_{n-1} = 1``.

    Each local error is weighted by the Lipschitz constants of the steps AFTER it (a forward
    cumulative product would be the known bug)."""
    tail = torch.flip(torch.cumprod(torch.flip(L[1:], [0]), 0), [0])
    return torch.cat([tail, L.new_ones(1)])


def _grid(solver: BespokeSolver) -> torch.Tensor:
    """The solver's n + 1 grid times in t (differentiable)."""
    t = solver.tables()["t"]
    return t if solver.base == "rk1" else t[0::2]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def local_errors(solver: BespokeSolver, model, X: torch.Tensor, extras: dict | None = None) -> torch.Tensor:
    """Per-sample local errors ``d [n, B]`` of every step applied to GT states, in parallel.

    ``X``: ``[n + 1, B, ...]`` GT states at the solver's grid times. Step i maps ``X[i]`` and is
    compared with ``X[i + 1]``. The model sees one batch of ``n B`` samples with per-sample
    times. ``extras`` (per-trajectory, ``[B, ...]``) are repeated for every step."""
    n, B = solver.n_steps, X.shape[1]
    xs = X[:-1].reshape(n * B, *X.shape[2:])
    extras = {k: (v.repeat(n, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v)
              for k, v in (extras or {}).items()}
    c = {k: v.to(X.dtype).repeat_interleave(B) for k, v in solver.coefficients().items()}
    if solver.base == "rk1":
        u = call_model(model, xs, c["t"], extras)
        x_next = _bcast(c["a"], xs) * xs + _bcast(c["b"], xs) * u
    else:
        u1 = call_model(model, xs, c["t0"], extras)
        x_mid = _bcast(c["A"], xs) * xs + _bcast(c["B"], xs) * u1
        u2 = call_model(model, x_mid, c["tm"], extras)
        x_next = _bcast(c["C"], xs) * xs + _bcast(c["D"], xs) * x_mid + _bcast(c["E"], xs) * u2
    diff = (x_next - X[1:].reshape_as(x_next)).reshape(n, B, -1)
    return diff.pow(2).mean(-1).add(1e-20).sqrt()


def rmse_bound_loss(solver: BespokeSolver, model, X: torch.Tensor, extras=None, L_tau: float = 1.0):
    """``(loss, d)``: the RMSE bound ``mean_b sum_i M_i d_{i+1}`` and the local errors ``[n, B]``."""
    d = local_errors(solver, model, X, extras)
    M = lipschitz_weights(solver.lipschitz(L_tau)).to(d.dtype)
    return (M[:, None] * d).sum(0).mean(), d


def gt_at_grid(solver, model, batch: TrajectorySet, mode: str = "cached", rtol=1e-5, atol=1e-5,
               extras=None):
    """GT states ``[n + 1, B, ...]`` at the solver's (moving) grid times, differentiable in them,
    and the per-sample model evaluations this cost (0 for cached)."""
    t = _grid(solver)
    if mode == "cached":
        return batch.at(t), 0
    ts = t.detach()
    with torch.no_grad():
        x0 = batch.x0
        X, stats = solve_adaptive(model, x0, ts.clamp(0, 1), rtol=rtol, atol=atol,
                                  return_stats=True, **(extras or {}))
        flat = X.reshape(-1, *X.shape[2:])
        tt = ts.to(X.dtype).repeat_interleave(X.shape[1])
        rep = {k: v.repeat(X.shape[0], *([1] * (v.dim() - 1))) for k, v in (extras or {}).items()}
        U = call_model(model, flat, tt, rep).reshape_as(X)
    dt = (t - ts).to(X.dtype).reshape(-1, *([1] * (X.dim() - 1)))
    return X + U * dt, (stats["nfe"] + X.shape[0]) * X.shape[1]


# ----------------------------------------------------------------------------- memory
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def model_for_loss(model, activation_checkpointing: bool = False, autocast=None):
    """The model as the training loss calls it.

    ``autocast`` (``torch.bfloat16`` / ``torch.float16``): each call runs under
    ``torch.autocast`` with float32 inputs, and its output is cast back to the input's dtype, so
    the solver maths (states, coefficients, errors) stays float64/float32.
    ``activation_checkpointing``: each call's activations are dropped after the forward and
    recomputed in the backward (``torch.utils.checkpoint``): memory holds one model call's
    activations plus the states, for one more forward per call.
    """
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be torch.bfloat16 or torch.float16, got {autocast!r}")
    if not activation_checkpointing and autocast is None:
        return model

    def run(x, t, extras):
        if autocast is None:
            return model(x, t, **extras)
        xin = x.float() if x.dtype == torch.float64 else x
        with torch.autocast(device_type=x.device.type, dtype=autocast):
            u = model(xin, t.to(xin.dtype), **extras)
        return u.to(x.dtype)

    def call(x, t, **extras):
        if activation_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            return checkpoint(run, x, t, extras, use_reentrant=False)
        return run(x, t, extras)
    return call


def loss_backward(solver, model, batch: TrajectorySet, phase: str = "bound", gt_mode: str = "cached",
                  L_tau: float = 1.0, micro_batch: int | None = None, loss_model=None,
                  dtype=None):
    """One iteration's loss on ``batch`` with its gradient accumulated into ``.grad``.

    ``phase``: ``"bound"`` (the RMSE bound on GT states at the solver's grid) or
    ``"finetune"`` (``mean log ||x_n - x(1)||^2`` of the n-step sample: -(ln 10 / 10) x the mean
    per-sample PSNR + const, the selection metric itself; measured on digits-fmot, NFE 10, 90 s
    of Adam: +0.2 dB (batch 128) and +0.5 dB (batch 64) over the mean RMSE). ``micro_batch``:
    evaluate in chunks of that many trajectories, each chunk's loss weighted by its share of
    the batch and back-propagated at once (gradient accumulation: both losses are batch means,
    so the gradient equals the full batch's up to rounding, and memory is that of one chunk).
    ``loss_model``: the model as the loss calls it (:func:`model_for_loss`; default ``model``);
    online GT always uses ``model``. ``dtype`` (fine-tune only): run the sampler's state in it
    (e.g. float64 for L-BFGS), the model still in the GT's dtype; default the GT's dtype.

    Returns ``(loss, nfe)``: the batch loss (detached) and the per-sample model evaluations.
    """
    check_choice("phase", phase, ("bound", "finetune"))
    loss_model = model if loss_model is None else loss_model
    n = len(batch)
    chunk = n if micro_batch is None else min(check_int("micro_batch", micro_batch), n)
    stages = 1 if solver.base == "rk1" else 2
    total, nfe = None, 0
    for lo in range(0, n, chunk):
        part = batch if chunk == n else batch.subset(range(lo, min(n, lo + chunk)))
        if phase == "bound":
            X, gt_nfe = gt_at_grid(solver, model, part, gt_mode, extras=part.extras)
            loss, _ = rmse_bound_loss(solver, loss_model, X, part.extras, L_tau)
            nfe += gt_nfe + solver.n_steps * stages * len(part)
        else:
            x0, x1, call = part.x0, part.x1, loss_model
            if dtype is not None and dtype != x0.dtype:
                x0, x1, call = x0.to(dtype), x1.to(dtype), in_dtype(loss_model, x0.dtype)
            x_n = solver.sample(call, x0, **part.extras)
            loss = (x_n - x1).flatten(1).pow(2).mean(1).add(1e-20).log().mean()
            nfe += solver.nfe * len(part)
        if chunk != n:
            loss = loss * (len(part) / n)
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total, nfe


# ----------------------------------------------------------------------------- the start
def screen_starts(model, train_set: TrajectorySet, val_set: TrajectorySet, base: str, n_steps: int,
                  seed: int = 0, iters: int = 60, batch_size: int = 128, lr: float = 5e-3,
                  seconds: float | None = None, select: str = DEFAULT_SELECT, loss_model=None):
    """The starting solver of ``init="auto"``: each of
    :func:`~bespoke_fast.fitting.grid_search.candidate_starts` gets a short trial (``iters``
    end-to-end Adam iterations on batches of ``batch_size`` training trajectories, the fine-tune
    loss, rate ``lr`` decayed along a cosine; each trial stops early after ``seconds /
    candidates`` of wall time), is validated on ``val_set``, and the start whose trial scores
    best (``select``) is returned, untrained.

    Why: the fit ends in the basin it starts in, and neither the searched grid (least sum of
    one-step errors) nor the starts' own end-to-end PSNR predicts the best basin; a short trial
    does (measured at NFE 6: the trial picked the best of five starts on digits-eps, whose
    default fits ended between 27.7 and 35.6 dB).

    Returns ``(solver, record)``; ``record``: ``chosen`` (the start's name), ``candidates`` (per
    start: trial iterations, validation PSNR / set PSNR / score, seconds), ``nfe`` (per-sample
    model evaluations of the trials and their validations) and ``wall_seconds``.

    Example::

        >>> train_set, val_set = gt.split(256)
        >>> start, record = screen_starts(model, train_set, val_set, "rk2", n_steps=3)
        >>> record["chosen"]                       # e.g. 'data-dense-2'
        >>> solver, report = train(model, gt, base="rk2", n_steps=3, init=start)
    """
    from .grid_search import candidate_starts
    started = time.perf_counter()
    loss_model = model if loss_model is None else loss_model
    candidates = candidate_starts(model, train_set, base, n_steps, candidates=SEARCH_CANDIDATES,
                                  batch=SEARCH_BATCH, seed=seed)
    slot = None if seconds is None else seconds / len(candidates)
    records, nfe = [], 0
    for name, start in candidates.items():
        trial = copy.deepcopy(start)
        optim = torch.optim.Adam(trial.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        t0, k = time.perf_counter(), 0
        while k < iters and (slot is None or time.perf_counter() - t0 < slot):
            for group in optim.param_groups:
                group["lr"] = cosine_lr(lr, k, iters)
            rows = torch.randint(len(train_set), (batch_size,), generator=gen)
            optim.zero_grad(set_to_none=True)
            nfe += loss_backward(trial, model, train_set.subset(rows), "finetune",
                                 loss_model=loss_model)[1]
            optim.step()
            k += 1
        record = validate_solver(trial, model, val_set)
        nfe += trial.nfe * len(val_set)
        score = selection_score(record, select)
        records.append({"start": name, "iterations": k, "psnr": record["psnr"],
                        "psnr_set": record["psnr_set"],
                        "score": score if math.isfinite(score) else None,
                        "seconds": time.perf_counter() - t0})
    chosen = max(records, key=lambda r: -math.inf if r["score"] is None else r["score"])
    return candidates[chosen["start"]], {"chosen": chosen["start"], "candidates": records,
                                         "nfe": nfe, "wall_seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------- the trainer
BOUND_BUDGET_SHARE = 0.25  # the bound phase may use at most this share of budget_seconds
SCREEN_ITERS = 60          # init="auto": end-to-end Adam iterations of each start's trial
SCREEN_SHARE = 0.25        # init="auto": at most this share of budget_seconds for all the trials
POLISH_VAL_EVERY = 10      # polish: L-BFGS iterations between validations
POLISH_PAIRS = 1024        # polish: at most this many training trajectories in its full batch
FINETUNE_BUDGET_SHARE = 0.85  # the fine-tune stops here, leaving the rest of the budget to the polish
# the grid search of init="searched": 32 candidate times, 32 trajectories (528 one-step costs;
# on the stiff digits-exact flow 64 x 64 took 60 s of a loaded CPU, this about 8x less)
SEARCH_CANDIDATES, SEARCH_BATCH = 32, 32


@dataclass(frozen=True)
class BespokeOptions:
    """The bespoke trainer's tunable options and their defaults: the one place they are set.
    :func:`train` takes each as a keyword of the same name and type (the BNS trainer's
    :class:`~bespoke_fast.fitting.bns.BNSOptions` shares the names both kinds have), and the CLI's
    ``train`` command fills its unset options from here."""
    iters: int = 300                     # cap on the RMSE-bound phase
    finetune_iters: int = 6000           # cap on the end-to-end fine-tune (0: none)
    polish_iters: int = 200              # cap on the full-batch L-BFGS polish (0: none)
    batch_size: int = 128                # trajectories per iteration
    lr: float = 5e-3                     # Adam learning rate (cosine decay per phase)
    val: int = 256                       # trajectories held out for validation (or a set)
    val_every: int = 50                  # validate every k iterations
    gt_mode: str = "cached"              # "cached" (Hermite) or "online" (RK45 per iteration)
    budget_seconds: float | None = 170.0  # wall-time budget of the whole fit
    patience: int | None = 8             # validations without improvement before a phase stops
    select: str = DEFAULT_SELECT         # validation score that picks the kept checkpoint
    max_iters: int | None = None         # cap on all iterations
    init: str = "auto"                   # start: screened ("auto"), "searched" or "identity"


OPTIONS = BespokeOptions()


def train(model, trajectories: TrajectorySet, base: str = "rk2", n_steps: int = 5,
          iters: int = OPTIONS.iters, batch_size: int = OPTIONS.batch_size, lr: float = OPTIONS.lr,
          val=OPTIONS.val, val_every: int = OPTIONS.val_every, seed: int = 0, checkpoint=None,
          checkpoint_every: int = 50, gt_mode: str = OPTIONS.gt_mode,
          finetune_iters: int = OPTIONS.finetune_iters, finetune_lr: float | None = None,
          polish_iters: int = OPTIONS.polish_iters,
          L_tau: float = 1.0, model_name: str = "", progress: bool = True, callback=None,
          micro_batch: int | None = None, activation_checkpointing: bool = False, autocast=None,
          budget_seconds: float | None = OPTIONS.budget_seconds,
          patience: int | None = OPTIONS.patience, min_delta: float = 0.02,
          select: str = OPTIONS.select, max_iters: int | None = OPTIONS.max_iters,
          init=OPTIONS.init):
    """Fit a :class:`BespokeSolver` to ``model`` on GT trajectories.

    Training starts from ``init`` (by default the best of a few screened starts) and runs in
    three phases, each until its validation score stops improving, within a budget
    (``bespoke_fast.fitting.stopping``): the RMSE-bound phase (at most ``iters`` iterations and
    ``BOUND_BUDGET_SHARE`` of the time budget), the end-to-end fine-tune with Adam from the bound
    phase's best parameters (at most ``finetune_iters``, leaving ``1 - FINETUNE_BUDGET_SHARE`` of
    the budget to the polish), then the polish: the same loss with full-batch L-BFGS on up to
    ``POLISH_PAIRS`` training trajectories, the state in float64 (at most ``polish_iters``
    L-BFGS iterations, validated every ``POLISH_VAL_EVERY``). Each phase stops at the first of:
    ``patience`` validations without a ``min_delta`` dB improvement, its share of
    ``budget_seconds``, its cap, or ``max_iters`` iterations in all (the polish also when L-BFGS
    converges). The parameters with the best validation score are kept.

    Args:
        model: the velocity model the GT was generated with.
        trajectories: a :class:`TrajectorySet` (``load_trajectories(dir)``).
        base, n_steps: the solver family (NFE = n for rk1, 2n for rk2).
        iters: cap on the RMSE-bound phase; batch_size: trajectories per iteration.
        lr: Adam learning rate. Each phase decays it along a cosine to 5% over the phase's
            horizon: its iteration cap or, once the speed is measured (first validation of the
            phase), the iterations the time budget allows, whichever is fewer.
        val: number of trajectories held out (the last ones) for validation, or a separate
            TrajectorySet. val_every: validate every k iterations (and at the end of each phase).
        seed: seeds the batch order.
        checkpoint: path; saved every ``checkpoint_every`` iterations (atomically). If it exists,
            training resumes from it and ends with exactly the parameters of an uninterrupted run
            (with ``budget_seconds=None``; a time budget depends on the machine's speed).
        gt_mode: ``"cached"`` (Hermite interpolation of the stored trajectories, default) or
            ``"online"`` (an RK45 solve per iteration at the current grid, as in the paper).
        finetune_iters, finetune_lr: cap and rate of the end-to-end fine-tune (ours);
            ``finetune_lr`` defaults to ``lr``. 0 skips the fine-tune.
        polish_iters: cap on the L-BFGS polish (ours; each iteration costs about 1.3 passes of
            the sampler over its full batch, forward and backward), and never more than
            ``finetune_iters`` (the polish continues the fine-tune). 0 skips it.
        budget_seconds: wall-time budget of the whole fit (default 170 s: ``bespoke-fast demo``
            stays within 5 minutes on a 2-core CPU); None: no time limit.
        patience, min_delta: stop a phase after ``patience`` validations in a row without
            improving the best score by more than ``min_delta`` dB; None: no patience stop.
        select: the validation score that picks the kept parameters and drives patience:
            ``"per-sample"`` (default: mean per-sample PSNR), ``"set"`` (set-level PSNR) or
            ``"rmse"`` (see ``bespoke_fast.fitting.stopping``).
        max_iters: cap on the iterations of all phases together (default ``iters +
            finetune_iters + polish_iters``).
        init: the starting solver: ``"auto"`` (default): the best of
            :func:`~bespoke_fast.fitting.grid_search.candidate_starts` after a short end-to-end
            trial each (:func:`screen_starts`: ``SCREEN_ITERS`` iterations, at most ``iters +
            finetune_iters``, within ``SCREEN_SHARE`` of the budget; the report's ``start``
            lists the trials); ``"searched"``: the base solver on the grid of
            least one-step local error on the training trajectories
            (``bespoke_fast.fitting.grid_search``, GITS-style, a few seconds; measured at NFE 10
            with a 30 s budget: digits-eps 33.2 -> 42.6 dB over the uniform grid);
            ``"identity"``: the base solver on the uniform grid; or a :class:`BespokeSolver`
            with the same base and n_steps.
        callback: optional ``callback(iteration, record)`` after each validation.
        micro_batch, activation_checkpointing, autocast: memory (see :func:`loss_backward` and
            :func:`model_for_loss`): gradient accumulation over chunks of ``micro_batch``
            trajectories (same result up to rounding), per-model-call activation
            checkpointing (same result), the model under bf16/fp16 autocast (solver maths
            in the GT's dtype). Peak memory grows linearly with ``micro_batch`` (the whole
            batch without it): the bound phase calls the model on all n steps of a chunk at
            once (n x micro_batch samples per call, one call per RK stage), the fine-tune
            phase n times in sequence, the polish as the fine-tune on chunks of
            ``micro_batch`` (else ``batch_size``), its sampler state in float64; checkpointing keeps one call's activations instead of
            all of them. Measured on a 35M-parameter UNet: ``bench/fit_cost.py --unet``.

    Returns: ``(solver, report)``; the report holds the curve (iteration, phase, loss, validation
    RMSE/PSNR/score), the best validation figures, ``stop_reason`` (patience, budget, max_iters,
    converged) and each phase's (``phase_stop_reasons``), ``iterations`` run, ``start`` (the
    screening of ``init="auto"``, else None), model evaluations spent (``nfe``: GT, training
    including the screening, validation; per-sample evaluations) and the wall time.

    Under torchrun, each rank draws its own batches, gradients are all-reduced, and only rank 0
    writes checkpoints.

    Example::

        >>> gt = load_trajectories("runs/gt")
        >>> solver, report = train(model, gt, base="rk2", n_steps=5)
        >>> report["stop_reason"], report["best"]["psnr"]
        >>> solver.save("solver.json")
    """
    check_choice("gt_mode", gt_mode, GT_MODES)
    n_steps = check_int("n_steps", n_steps)
    iters = check_int("iters", iters, 0)
    finetune_iters = check_int("finetune_iters", finetune_iters, 0)
    polish_iters = check_int("polish_iters", polish_iters, 0)
    batch_size = check_int("batch_size", batch_size)
    val_every = check_int("val_every", val_every)
    # the polish continues the fine-tune: never longer than its cap (0 with a bound-only fit)
    caps = {"bound": iters, "finetune": finetune_iters, "polish": min(polish_iters, finetune_iters)}
    phases = [phase for phase, cap in caps.items() if cap]
    if not phases:
        raise InvalidArgumentError("iters + finetune_iters + polish_iters must be >= 1")
    max_iters = check_int("max_iters", sum(caps.values()) if max_iters is None else max_iters)
    check_stopping(select, patience, budget_seconds, min_delta)
    if not (lr > 0 and math.isfinite(lr)):
        raise InvalidArgumentError(f"lr must be a positive number, got {lr}")
    if not isinstance(trajectories, (TrajectorySet, StreamedTrajectories)):
        raise InvalidTypeError("trajectories must be a TrajectorySet (bespoke_fast.load_trajectories(dir))")
    check_gt_matches(model, trajectories, model_name)
    loss_model = model_for_loss(model, activation_checkpointing, autocast)
    if isinstance(val, TrajectorySet):
        train_set, val_set = trajectories, val
    else:
        train_set, val_set = trajectories.split(check_int("val", val))
    rank, world, _ = dist_info()
    device = train_set.device
    solver = BespokeSolver(base, n_steps).to(device)
    if isinstance(init, BespokeSolver):
        if (init.base, init.n_steps) != (base, n_steps):
            raise InvalidArgumentError(f"init must be a bespoke-{base} solver with n_steps={n_steps}, got "
                             f"bespoke-{init.base} with n_steps={init.n_steps}")
    elif not isinstance(init, str) or init not in INITS:
        raise InvalidArgumentError(f"init must be one of {', '.join(INITS)} or a BespokeSolver, "
                                   f"got {init!r}")
    config = {"base": base, "n_steps": n_steps, "iters": iters, "batch_size": batch_size, "lr": lr,
              "seed": seed, "gt_mode": gt_mode, "finetune_iters": finetune_iters,
              "polish_iters": polish_iters,
              "finetune_lr": finetune_lr if finetune_lr is not None else lr, "L_tau": L_tau,
              "num_train": len(train_set), "num_val": len(val_set), "val_every": val_every,
              "gt": gt_split_fingerprint(train_set, val_set),
              **({"autocast": str(autocast).replace("torch.", "")} if autocast is not None else {}),
              "budget_seconds": budget_seconds, "patience": patience, "min_delta": min_delta,
              "select": select, "max_iters": max_iters, "gt_seed": trajectories.meta.get("seed"),
              "init": init if isinstance(init, str) else
                      [round(float(v), 12) for v in torch.cat([p.detach().flatten().cpu()
                                                               for p in init.parameters()])]}
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    state = {"iteration": 0, "curve": [], "nfe_train": 0, "nfe_val": 0, "wall_total": 0.0,
             **new_stop_state(), **new_lbfgs_state(), "phase": phases[0], "phase_start": 0,
             "phase_wall": 0.0, "horizon": None, "phase_stop_reasons": {}, "start": None}

    def make_optim(phase):
        if phase == "polish":
            return new_lbfgs(solver.parameters())
        return torch.optim.Adam(solver.parameters(), lr=lr if phase == "bound" else config["finetune_lr"])

    optim = make_optim(state["phase"])
    ckpt = Path(checkpoint) if checkpoint else None
    saved = load_checkpoint(ckpt, config, solver, gen)
    if saved is not None:
        state = saved["state"]
        optim = make_optim(state["phase"])
        optim.load_state_dict(saved["optim"])
    started = time.perf_counter()

    def elapsed():
        return state["wall_total"] + time.perf_counter() - started

    if saved is None and init != "identity":
        if init == "auto":
            # a trial is never longer than the fit's own Adam phases
            start, state["start"] = screen_starts(
                model, train_set, val_set, base, n_steps, seed,
                min(SCREEN_ITERS, iters + finetune_iters), batch_size, lr,
                None if budget_seconds is None else budget_seconds * SCREEN_SHARE, select,
                loss_model)
            state["nfe_train"] += state["start"]["nfe"]
        elif init == "searched":
            from .grid_search import searched_solver
            start = searched_solver(model, train_set, base, n_steps, candidates=SEARCH_CANDIDATES,
                                    batch=SEARCH_BATCH, seed=seed)
        else:
            start = init
        solver.load_state_dict(start.state_dict())
        if world > 1:      # every rank starts from rank 0's parameters
            for p in solver.parameters():
                torch.distributed.broadcast(p.data, 0)
        state["phase_wall"] = elapsed()     # the first phase's share counts from here
    polish_set = train_set.subset(range(min(POLISH_PAIRS, len(train_set))))

    def closure():      # the polish: loss and gradient on its whole batch, float64 state
        optim.zero_grad(set_to_none=True)
        # in chunks of the micro-batch (memory as in the fine-tune), else of the batch size
        loss, nfe = loss_backward(solver, model, polish_set, "finetune",
                                  micro_batch=micro_batch or batch_size, loss_model=loss_model,
                                  dtype=torch.float64)
        average_gradients(solver.parameters(), world)
        state["nfe_train"] += nfe
        state["loss_evals"] += 1
        state["last_loss"] = float(loss)
        return loss.to(torch.float64)

    from tqdm.auto import tqdm
    bar = tqdm(total=max_iters, initial=state["iteration"], disable=not progress or rank != 0,
               desc=f"fit bespoke-{base} NFE {solver.nfe}", unit="it", dynamic_ncols=True)
    with frozen(model):
        while state["stop_reason"] is None:
            k = state["iteration"]
            phase = state["phase"]
            cap = caps[phase]
            phase_budget = (None if budget_seconds is None else
                            state["phase_wall"] + budget_seconds * BOUND_BUDGET_SHARE
                            if phase == "bound" else
                            budget_seconds * (FINETUNE_BUDGET_SHARE if phase == "finetune"
                                              and polish_iters else 1.0))
            if phase == "polish":
                stop = min(state["phase_start"] + cap, max_iters,
                           k + POLISH_VAL_EVERY - (k - state["phase_start"]) % POLISH_VAL_EVERY)
                done = lbfgs_advance(optim, closure, state, k, stop, phase_budget, elapsed)
                loss = state["last_loss"]
            else:
                base_lr = lr if phase == "bound" else config["finetune_lr"]
                for group in optim.param_groups:
                    group["lr"] = cosine_lr(base_lr, k - state["phase_start"],
                                            state["horizon"] or cap)
                rows = torch.randint(len(train_set), (batch_size,), generator=gen)
                batch = train_set.subset(rows)
                optim.zero_grad(set_to_none=True)
                loss, nfe = loss_backward(solver, model, batch, phase, gt_mode, L_tau,
                                          micro_batch, loss_model)
                state["nfe_train"] += nfe
                average_gradients(solver.parameters(), world)
                optim.step()
                done = k + 1
            state["iteration"] = done
            bar.update(done - k)
            in_phase = done - state["phase_start"]
            capped = in_phase >= cap or done >= max_iters
            out_of_time = phase_budget is not None and elapsed() >= phase_budget
            validated = (in_phase % POLISH_VAL_EVERY == 0 if phase == "polish"
                         else done % val_every == 0) or capped or out_of_time or state["converged"]
            if validated:
                record = {"iteration": done, "loss": float(loss), "phase": phase,
                          **validate_solver(solver, model, val_set)}
                state["nfe_val"] += solver.nfe * len(val_set)
                state["curve"].append(record)
                observe(state, record, solver, select, min_delta)
                if state["horizon"] is None and phase_budget is not None and phase != "polish":
                    state["horizon"] = phase_horizon(cap, in_phase, elapsed() - state["phase_wall"],
                                                     phase_budget - elapsed())
                show_validation(bar, state, done, record, callback)
            reason = "converged" if state["converged"] else stop_reason(
                state, in_phase, cap, patience, phase_budget, elapsed(), validated)
            if done >= max_iters and reason is None:
                reason = "max_iters"
            reason = rank0_decides(reason, world, state)
            switched = False
            if reason is not None:
                state["phase_stop_reasons"][phase] = reason
                nxt = phases[phases.index(phase) + 1] if phase != phases[-1] else None
                if nxt and done < max_iters and not (
                        budget_seconds is not None and elapsed() >= budget_seconds):
                    # go on from this phase's best parameters
                    solver.load_state_dict(state["best"])
                    optim = make_optim(nxt)
                    state.update(phase=nxt, phase_start=done, phase_wall=elapsed(),
                                 horizon=None, bad_evals=0, **new_lbfgs_state())
                    switched = True
                else:
                    state["stop_reason"] = reason
            if checkpoint_due(ckpt, rank, done, checkpoint_every, switched, state):
                started = save_checkpoint(ckpt, config, solver, optim, gen, done, state, started)
    stopped = {"stop_reason": state["stop_reason"],
               "bound_stop_reason": state["phase_stop_reasons"].get("bound"),
               "phase_stop_reasons": state["phase_stop_reasons"], "start": state["start"],
               "iterations": state["iteration"]}
    return finish(solver, model, trajectories, config, state, model_name, bar, started, **stopped)
