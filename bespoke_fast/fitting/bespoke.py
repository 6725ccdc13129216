"""Fitting a Bespoke solver to a model: the RMSE-bound loss and the trainer (method.md section 5).

Loss for a batch of GT trajectories ``x(t)`` (all n steps in parallel)::

    d_{i+1} = || x(t_{i+1}) - step_i(x(t_i)) ||            per-sample RMSE local error
    M_i     = prod_{j=i+1}^{n-1} L_j                       (M_{n-1} = 1: the LAST error has weight 1)
    loss    = mean_batch sum_{i=0}^{n-1} M_i d_{i+1}

Gradients reach the solver parameters through the step coefficients, through ``M``, through
the model inputs (times and states), and through ``x(t_i)`` at the moving grid times: cached GT
interpolates the stored trajectories with a cubic Hermite (differentiable in t); online GT
solves RK45 at the detached grid each iteration and uses ``x(sg t) + u(sg t, x(sg t)) (t - sg t)``.

What a fit costs is counted in model evaluations (``bespoke_fast.fitting.evals``) and bounded
by ``budget_evals`` (forward-equivalents: a backward counts 2), the same on every device. The
default recipe **(ours)** is built for that budget: start from the base solver on the grid of
least one-step error (``init="searched"``, GITS-style), then minimise ``mean log ||x_n -
x(1)||^2`` (the mean per-sample PSNR, the selection metric itself) through the n-step sampler:
first Levenberg-Marquardt on ``warmup_pairs`` trajectories (``bespoke_fast.fitting.gauss_newton``:
the whole Gauss-Newton curvature of the few parameters from forward differences, which finds the
basin in a few iterations; at most ``WARMUP_SHARE`` of the budget), then full-batch L-BFGS on
all of them (the polish: what generalises), each phase until its validation score stops
improving or its share of the budget is spent. The paper's RMSE-bound phase (``iters``) and an
Adam fine-tune on batches (``finetune_iters``) are there to be switched on; both are off by
default: at a few hundred thousand evaluations these second-order phases from a searched start
gave more held-out PSNR per evaluation (``bench/fit_cost.py --pareto``). The checkpoint kept is
the one with the best validation score (default the mean per-sample PSNR; ``select``, see
``bespoke_fast.fitting.stopping``), and the report says why training stopped.

The fit ends in the basin it starts in; ``init="auto"`` (ours) screens a few starting solvers
(the base solver on the searched grid and on generic grids,
``bespoke_fast.fitting.grid_search.candidate_starts``) with a short end-to-end trial each and
starts from the best, for a larger budget.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from .._checks import InvalidArgumentError, InvalidTypeError, call_model, check_choice, check_int
from ..solvers.adaptive import solve_adaptive
from ..solvers.bespoke import BespokeSolver
from ..solvers.interface import Solver
from ..utils import dist_info
from .common import (CommonOptions, KindTrainer, average_gradients, check_budget_evals,
                     check_gt_matches, cosine_lr, finish, gt_split_fingerprint, in_dtype,
                     keyword_trainer, new_lbfgs, option, validate_solver)
from .evals import EvalLedger, raw_model
from .gauss_newton import LevenbergMarquardt, lm_step, MAX_TRIALS
from .gt import TrajectorySet
from .loop import Phase, Stopping, lbfgs_step, run_phases
from .stopping import DEFAULT_SELECT, check_stopping, phase_horizon, selection_score
from .trajectories import Trajectories

__all__ = ["train", "BespokeOptions", "OPTIONS", "BespokeTrainer", "TRAINER", "rmse_bound_loss",
           "local_errors", "lipschitz_weights", "gt_at_grid", "loss_backward", "model_for_loss",
           "screen_starts", "INITS"]

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
        raise InvalidArgumentError(f"autocast must be torch.bfloat16 or torch.float16, got {autocast!r}")
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
    per-sample PSNR + const, the selection metric itself). ``micro_batch``:
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
                  seconds: float | None = None, select: str = DEFAULT_SELECT, loss_model=None,
                  evals: int | None = None, spent=None):
    """The starting solver of ``init="auto"``: each of
    :func:`~bespoke_fast.fitting.grid_search.candidate_starts` gets a short trial (``iters``
    end-to-end Adam iterations on batches of ``batch_size`` training trajectories, the fine-tune
    loss, rate ``lr`` decayed along a cosine; each trial stops early after ``seconds /
    candidates`` of wall time), is validated on ``val_set``, and the start whose trial scores
    best (``select``) is returned, untrained.

    Why: the fit ends in the basin it starts in, and neither the searched grid (least sum of
    one-step errors) nor the starts' own end-to-end PSNR predicts the best basin; a short trial
    is the cheapest predictor of where the fit ends.

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
    spent = spent or (lambda: 0)
    spent_before = spent()
    loss_model = model if loss_model is None else loss_model
    candidates = candidate_starts(model, train_set, base, n_steps, candidates=SEARCH_CANDIDATES,
                                  batch=SEARCH_BATCH, seed=seed)
    slot = None if seconds is None else (seconds - (time.perf_counter() - started)) / len(candidates)
    eval_slot = (None if evals is None else
                 (evals - (spent() - spent_before)) / len(candidates))
    records, nfe = [], 0
    for name, start in candidates.items():
        trial = copy.deepcopy(start)
        optim = torch.optim.Adam(trial.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        t0, e0, k = time.perf_counter(), spent(), 0
        # each trial's validation (trial.nfe x len(val_set) evaluations) comes out of its slot
        while k < iters and (slot is None or time.perf_counter() - t0 < slot) and (
                eval_slot is None or spent() - e0 + trial.nfe * len(val_set) < eval_slot):
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
DEFAULT_VAL = 256          # validation trajectories at most, by default (a fifth of smaller sets)
# budget shares (of budget_evals, and of budget_seconds when given), counted from the fit's start
BOUND_BUDGET_SHARE = 0.25  # the bound phase may use at most this share, counted from its start
SCREEN_ITERS = 60          # init="auto": end-to-end Adam iterations of each start's trial
SCREEN_SHARE = 0.25        # init="auto": at most this share for the candidate search and trials
WARMUP_SHARE = 0.5         # the Levenberg-Marquardt warm-up on warmup_pairs ends here at the latest
POLISH_VAL_EVERY = 10      # polish: L-BFGS iterations between validations
POLISH_PAIRS = 1024        # polish: at most this many training trajectories in its full batch
FINETUNE_BUDGET_SHARE = 0.85  # the fine-tune stops here, leaving the rest of the budget to the polish
# the grid search of init="searched": 32 candidate times on 16 trajectories (528 one-step costs),
# smaller when that would take more than SEARCH_SHARE of the budget
SEARCH_CANDIDATES, SEARCH_BATCH, SEARCH_SHARE = 32, 16, 0.15


def search_cost(base: str, candidates: int, batch: int) -> int:
    """Model evaluations of the grid search: one (rk1) or two (rk2) calls per one-step cost,
    ``candidates (candidates + 1) / 2`` of them on ``batch`` trajectories."""
    return (1 if base == "rk1" else 2) * batch * candidates * (candidates + 1) // 2


def search_size(base: str, n_steps: int, num_train: int, budget_evals=None) -> tuple:
    """``(candidates, batch)`` of the start's grid search: ``SEARCH_CANDIDATES`` times on
    ``SEARCH_BATCH`` trajectories, fewer of both (never fewer candidates than ``2 n_steps``,
    nor trajectories than 4) while its cost, ``calls x batch x M (M + 1) / 2`` model
    evaluations (:func:`search_cost`), exceeds ``SEARCH_SHARE`` of the budget."""
    m, b = SEARCH_CANDIDATES, min(SEARCH_BATCH, num_train)
    while budget_evals is not None and search_cost(base, m, b) > SEARCH_SHARE * budget_evals:
        if b > 4:
            b = max(4, b // 2)
        elif m > 2 * n_steps:
            m = max(2 * n_steps, m * 3 // 4)
        else:
            break
    return max(m, n_steps), b


@dataclass(frozen=True)
class BespokeOptions(CommonOptions):
    """Every option of the bespoke trainer, with its default: the one place they are set.
    :func:`train` takes each as a keyword of the same name (the BNS trainer's
    :class:`~bespoke_fast.fitting.bns.BNSOptions` shares the names both kinds have, with the
    same meaning), and the CLI makes its flags and their help from the fields' ``help``."""
    base: str = option("rk2", "the solver family: 'rk1' (1 NFE per step) or 'rk2' (2 NFE per "
                              "step); default rk2")
    n_steps: int = option(5, "steps of the solver (NFE = n_steps for rk1, 2 n_steps for rk2); "
                             "default 5")
    iters: int = option(0, "cap on the RMSE-bound phase (the paper's loss), in iterations "
                           "(0: skip it); default 0")
    batch_size: int = option(128, "trajectories per Adam iteration; default 128")
    lr: float = option(5e-3, "Adam learning rate of the bound phase (and of the fine-tune unless "
                             "finetune_lr is set), decayed along a cosine to 5%; default 5e-3")
    val: int | TrajectorySet | None = option(None, "trajectories held out (the last ones) to "
                                                  "validate and keep the best parameters, or a "
                                                  "separate set; default: a fifth of the GT "
                                                  "set, at most 256")
    val_every: int = option(50, "validate every this many iterations (and at each phase's end); "
                                "default 50")
    gt_mode: str = option("cached", "'cached': Hermite interpolation of the stored GT; "
                                    "'online': an RK45 solve per iteration; default cached")
    finetune_iters: int = option(0, "cap on the end-to-end Adam fine-tune on batches, in "
                                    "iterations (0: none); default 0")
    finetune_lr: float | None = option(None, "learning rate of the fine-tune; default: lr")
    warmup_pairs: int = option(32, "training trajectories of the warm-up: Levenberg-Marquardt "
                                   "on these few first (it finds the basin), then the L-BFGS "
                                   "polish on all (0: no warm-up); default 32")
    polish_iters: int = option(1000, "cap on the full-batch L-BFGS polish (and on the warm-up), "
                                     "in iterations (0: none); default 1000")
    L_tau: float = option(1.0, "Lipschitz constant assumed per unit of time in the RMSE bound's "
                               "weights; default 1.0")
    micro_batch: int | None = option(None, "evaluate the loss in chunks of this many "
                                           "trajectories (memory; same result up to rounding); "
                                           "default: the whole batch")
    activation_checkpointing: bool = option(False, "recompute each model call's activations in "
                                                   "the backward (memory); default off")
    autocast: torch.dtype | None = option(None, "run the model under torch.bfloat16 / "
                                                "torch.float16 autocast; default off")
    budget_seconds: float | None = option(None, "wall-time cap on the whole fit, in seconds, "
                                                "besides budget_evals (None: none); default "
                                                "none")
    max_iters: int | None = option(None, "cap on the iterations of all phases together; "
                                         "default: the sum of the phases' caps")
    init: str | Solver = option("searched", "the start: 'searched' (the base solver on the grid "
                                            "of least one-step error), 'auto' (the best of a "
                                            "few screened starts), 'identity' (uniform grid) "
                                            "or a BespokeSolver; default searched")


OPTIONS = BespokeOptions()


class BespokeTrainer(KindTrainer):
    """The bespoke kind's trainer (``bespoke_fast.fitting.trainer_for("bespoke")``): fits a
    :class:`BespokeSolver` through the RMSE-bound phase, the end-to-end fine-tune and the L-BFGS
    polish on the training loop of ``bespoke_fast.fitting.loop``.

    Example::

        >>> trainer = trainer_for("bespoke")
        >>> solver, report = trainer.train(model, gt, trainer.Options(n_steps=3, iters=100))
    """

    kind = BespokeSolver.kind
    title = "bespoke"
    Options = BespokeOptions
    # what the fit job (bespoke_fast.fit) needs to know of the kind
    fit_header, file_label, start_names = "rk2", "bespoke_rk2", INITS
    min_train = min_val = 1
    streams_gt = True           # trains on shard rows read per batch

    def fit_options(self, settings: dict) -> dict:
        """The options the fit job trains this kind with, from its settings: Bespoke RK2 at the
        fit's NFE, its iteration caps and batch."""
        return {"base": self.fit_header, "n_steps": settings["nfe"] // 2,
                "iters": settings["iters"], "finetune_iters": settings["finetune_iters"],
                "batch_size": settings["batch_size"]}
    lacks = {
        "num_train": "bespoke trains on all but the validation trajectories",
        "optimizer": "the bespoke trainer uses Adam, then polishes with L-BFGS",
    }

    def planned_evaluations(self, options: BespokeOptions, num_train: int, num_val: int,
                            nfe: int) -> int:
        """An upper bound on a fit's model evaluations (forward-equivalents: a backward counts
        2), its start and validations included, with ``num_train`` training and ``num_val``
        validation trajectories at NFE ``nfe``: ``budget_evals`` when set, and never more than
        the phases' caps allow (a gradient iteration costs 3 ``nfe`` per trajectory; L-BFGS
        about 1.3 of them per iteration on its full batch; a Levenberg-Marquardt iteration of
        the warm-up at most ``P + 1 + MAX_TRIALS`` forward passes for P parameters)."""
        from .grid_search import GRID_FAMILIES
        iters, finetune, polish = options.iters, options.finetune_iters, options.polish_iters
        per_pair = 3 * nfe
        if options.init == "auto":
            trial = min(SCREEN_ITERS, iters + finetune) or SCREEN_ITERS
            start = (len(GRID_FAMILIES) + 1) * (trial * options.batch_size * per_pair + num_val * nfe)
        else:
            start = 0
        if options.init in ("auto", "searched"):     # the grid search: one or two calls per step
            start += search_cost(options.base, *search_size(options.base, options.n_steps,
                                                            num_train, options.budget_evals))
        warm = min(options.warmup_pairs, num_train) if polish else 0
        n_params = sum(p.numel() for p in BespokeSolver(options.base, options.n_steps).parameters())
        train = ((iters + finetune) * options.batch_size * per_pair
                 + int(1.3 * polish * min(POLISH_PAIRS, num_train) * per_pair)
                 + polish * (n_params + 1 + MAX_TRIALS) * warm * nfe)   # LM: J, then its trials
        validations = (2 + math.ceil((iters + finetune) / options.val_every)
                       + math.ceil(polish / POLISH_VAL_EVERY) + (polish if warm else 0))
        at_caps = start + train + validations * num_val * nfe
        return at_caps if options.budget_evals is None else min(at_caps, options.budget_evals)

    def fit(self, model, trajectories, o, checkpoint, progress, model_name, callback):
        (base, n_steps, iters, batch_size, lr, val, val_every, seed, checkpoint_every, gt_mode,
         finetune_iters, finetune_lr, polish_iters, L_tau, micro_batch, activation_checkpointing,
         autocast, budget_seconds, patience, min_delta, select, max_iters, init, budget_evals,
         warmup_pairs) = (
            o.base, o.n_steps, o.iters, o.batch_size, o.lr, o.val, o.val_every, o.seed,
            o.checkpoint_every, o.gt_mode, o.finetune_iters, o.finetune_lr, o.polish_iters,
            o.L_tau, o.micro_batch, o.activation_checkpointing, o.autocast, o.budget_seconds,
            o.patience, o.min_delta, o.select, o.max_iters, o.init, o.budget_evals,
            o.warmup_pairs)
        check_choice("gt_mode", gt_mode, GT_MODES)
        n_steps = check_int("n_steps", n_steps)
        iters = check_int("iters", iters, 0)
        finetune_iters = check_int("finetune_iters", finetune_iters, 0)
        polish_iters = check_int("polish_iters", polish_iters, 0)
        batch_size = check_int("batch_size", batch_size)
        val_every = check_int("val_every", val_every)
        warmup_pairs = check_int("warmup_pairs", warmup_pairs, 0)
        caps = {"bound": iters, "finetune": finetune_iters,
                "warmup": polish_iters if warmup_pairs else 0, "polish": polish_iters}
        if not any(caps.values()):
            raise InvalidArgumentError("iters + finetune_iters + polish_iters must be >= 1")
        check_budget_evals(budget_evals)
        max_iters = check_int("max_iters", sum(caps.values()) if max_iters is None else max_iters)
        ledger = EvalLedger()
        model = ledger.wrap(model)          # every model call of the fit is counted
        check_stopping(select, patience, budget_seconds, min_delta)
        if not (lr > 0 and math.isfinite(lr)):
            raise InvalidArgumentError(f"lr must be a positive number, got {lr}")
        if not isinstance(trajectories, Trajectories):
            raise InvalidTypeError("trajectories must be a TrajectorySet (bespoke_fast.load_trajectories(dir))")
        check_gt_matches(raw_model(model), trajectories, model_name)
        loss_model = model_for_loss(model, activation_checkpointing, autocast)
        raw = raw_model(model)
        split_note = None
        if isinstance(val, TrajectorySet):
            train_set, val_set = trajectories, val
        else:
            if val is None:     # a fifth, at most DEFAULT_VAL; the report says when that is fewer
                val = max(1, min(DEFAULT_VAL, len(trajectories) // 5))
                if val < DEFAULT_VAL:
                    split_note = (f"the GT set has {len(trajectories)} trajectories: holding out "
                                  f"the last {val} (a fifth) for validation and training on "
                                  f"{len(trajectories) - val} (val= / --val sets it)")
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
                  "budget_seconds": budget_seconds, "budget_evals": budget_evals,
                  "warmup_pairs": warmup_pairs if caps["warmup"] else 0,
                  "patience": patience, "min_delta": min_delta,
                  "select": select, "max_iters": max_iters, "gt_seed": trajectories.meta.get("seed"),
                  "init": init if isinstance(init, str) else
                          [round(float(v), 12) for v in torch.cat([p.detach().flatten().cpu()
                                                                   for p in init.parameters()])]}
        gen = torch.Generator().manual_seed(seed * 1000 + rank)

        def start(state, elapsed):      # a fresh run: the starting solver
            if init == "identity":
                return
            if init == "auto":
                # a trial is never longer than the fit's own Adam phases
                first, state.start = screen_starts(
                    model, train_set, val_set, base, n_steps, seed,
                    min(SCREEN_ITERS, iters + finetune_iters) or SCREEN_ITERS, batch_size, lr,
                    None if budget_seconds is None else budget_seconds * SCREEN_SHARE, select,
                    loss_model, None if budget_evals is None else int(budget_evals * SCREEN_SHARE),
                    ledger.equivalent)
            elif init == "searched":
                from .grid_search import searched_solver
                m, b = search_size(base, n_steps, len(train_set), budget_evals)
                first = searched_solver(model, train_set, base, n_steps, candidates=m, batch=b,
                                        seed=seed)
            else:
                first = init
            solver.load_state_dict(first.state_dict())
            if world > 1:      # every rank starts from rank 0's parameters
                for p in solver.parameters():
                    torch.distributed.broadcast(p.data, 0)

        def adam_step(phase, base_lr):
            def step(ctx, k):
                for group in ctx.optim.param_groups:
                    group["lr"] = cosine_lr(base_lr, k - ctx.state.phase_start,
                                            ctx.state.horizon or ctx.cap)
                rows = torch.randint(len(train_set), (batch_size,), generator=gen)
                batch = train_set.subset(rows)
                ctx.optim.zero_grad(set_to_none=True)
                loss, _ = loss_backward(solver, model, batch, phase, gt_mode, L_tau, micro_batch,
                                        loss_model)
                average_gradients(solver.parameters(), world)
                ctx.optim.step()
                return k + 1, loss
            return step

        polish_set = train_set.subset(range(min(POLISH_PAIRS, len(train_set))))
        warmup_set = train_set.subset(range(min(warmup_pairs or 1, len(train_set))))

        def evaluation_cost(data):  # forward-equivalents of one loss and gradient on ``data``
            return len(data) * solver.nfe * (4 if activation_checkpointing else 3)

        def closure_on(data):   # L-BFGS: loss and gradient on its whole batch, float64 state
            def closure(ctx):
                ctx.optim.zero_grad(set_to_none=True)
                # in chunks of the micro-batch (memory as in the fine-tune), else of the batch size
                loss, _ = loss_backward(solver, model, data, "finetune",
                                        micro_batch=micro_batch or batch_size,
                                        loss_model=loss_model, dtype=torch.float64)
                average_gradients(solver.parameters(), world)
                ctx.state.loss_evals += 1
                ctx.state.last_loss = float(loss)
                return loss.to(torch.float64)
            return closure

        def endpoints(part):    # the warm-up's samples: float64 state, the model in its dtype
            return solver.sample(in_dtype(loss_model, part.x0.dtype),
                                 part.x0.to(torch.float64), **part.extras)

        n_params = sum(p.numel() for p in solver.parameters())

        def adam(rate):
            return lambda: torch.optim.Adam(solver.parameters(), lr=rate)

        if len(warmup_set) >= len(polish_set):    # no smaller set to warm up on
            caps["warmup"] = 0
        phases = [
            Phase("bound", caps["bound"], adam(lr), adam_step("bound", lr),
                  budget_share=BOUND_BUDGET_SHARE, budget_from_start=True, val_every=val_every,
                  sets_horizon=True, record={"phase": "bound"}),
            Phase("finetune", caps["finetune"], adam(config["finetune_lr"]),
                  adam_step("finetune", config["finetune_lr"]),
                  budget_share=FINETUNE_BUDGET_SHARE if caps["polish"] else 1.0, val_every=val_every,
                  sets_horizon=True, record={"phase": "finetune"}),
            # Levenberg-Marquardt on a few trajectories (the whole curvature: it finds the basin
            # in a few iterations), then full-batch L-BFGS on all of them (what generalises)
            Phase("warmup", caps["warmup"], lambda: LevenbergMarquardt(solver.parameters()),
                  lm_step(warmup_set, endpoints, micro_batch or batch_size,
                          cost=(n_params + 2) * len(warmup_set) * solver.nfe),
                  budget_share=WARMUP_SHARE, val_every=1, val_from_start=True,
                  record={"phase": "warmup"}),
            Phase("polish", caps["polish"], lambda: new_lbfgs(solver.parameters()),
                  lbfgs_step(closure_on(polish_set), cost=evaluation_cost(polish_set)),
                  val_every=POLISH_VAL_EVERY,
                  val_from_start=True, record={"phase": "polish"}),
        ]
        state = run_phases(solver, model, val_set, [p for p in phases if p.cap], config=config,
                           gen=gen, stopping=Stopping(max_iters, budget_seconds, patience, min_delta,
                                                      select, budget_evals),
                           checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                           progress=progress, desc=f"fit bespoke-{base} NFE {solver.nfe}",
                           callback=callback, start=start, horizon_rule=phase_horizon,
                           ledger=ledger)
        return finish(solver, raw, trajectories, config, state, model_name,
                      stop_reason=state.stop_reason,
                      bound_stop_reason=state.phase_stop_reasons.get("bound"),
                      phase_stop_reasons=state.phase_stop_reasons, start=state.start,
                      split_note=split_note,
                      iterations=state.iteration)


TRAINER = BespokeTrainer()
train = keyword_trainer(TRAINER, "train", """Fit a :class:`BespokeSolver` to ``model`` on GT trajectories.

    Training starts from ``init`` (by default the base solver on the searched grid) and runs
    its phases in order, each until its validation score stops improving, within the budget
    ``budget_evals`` (model evaluations in forward-equivalents, counted exactly; the report's
    ``evaluations`` has them by stage) and the caps (``bespoke_fast.fitting.stopping``): the
    RMSE-bound phase (at most ``iters`` iterations, ``BOUND_BUDGET_SHARE`` of the budget; off
    by default), the end-to-end fine-tune with Adam on batches (at most ``finetune_iters``;
    off by default), the warm-up (Levenberg-Marquardt on the first ``warmup_pairs`` training
    trajectories, ``bespoke_fast.fitting.gauss_newton``, validated every iteration, until
    ``WARMUP_SHARE`` of the budget) and the polish (full-batch L-BFGS on up to
    ``POLISH_PAIRS`` training trajectories, the state in float64, validated every
    ``POLISH_VAL_EVERY`` iterations). Each phase stops at the first of: ``patience``
    validations without a ``min_delta`` dB improvement, its share of the budget (an
    evaluation that would pass it is not made), its cap, ``max_iters`` iterations in all,
    convergence, or a non-finite loss (then the phase's best parameters are restored,
    the report's ``events`` says where, and the next phase goes on from them). The parameters
    with the best validation score are kept.

    Args:
        model: the velocity model the GT was generated with.
        trajectories: a GT set, in memory or streamed (``load_trajectories(dir[, stream=True])``,
            ``bespoke_fast.fitting.trajectories.Trajectories``).
        base, n_steps: the solver family (NFE = n for rk1, 2n for rk2).
        iters: cap on the RMSE-bound phase; batch_size: trajectories per iteration.
        lr: Adam learning rate. Each phase decays it along a cosine to 5% over the phase's
            horizon: its iteration cap or, once the speed is measured (first validation of the
            phase), the iterations the time budget allows, whichever is fewer.
        val: number of trajectories held out (the last ones) for validation (default: a fifth
            of the set, at most 256; the report's ``split_note`` says when that is fewer than
            256), or a separate TrajectorySet. val_every: validate every k iterations (and at the end of each phase).
        seed: seeds the batch order.
        checkpoint: path; saved every ``checkpoint_every`` iterations (atomically). If it exists,
            training resumes from it and ends with exactly the parameters of an uninterrupted run
            (with ``budget_seconds=None``; a time budget depends on the machine's speed).
        gt_mode: ``"cached"`` (Hermite interpolation of the stored trajectories, default) or
            ``"online"`` (an RK45 solve per iteration at the current grid, as in the paper).
        finetune_iters, finetune_lr: cap and rate of the end-to-end fine-tune (ours);
            ``finetune_lr`` defaults to ``lr``. 0 skips the fine-tune.
        polish_iters: cap on the L-BFGS polish and on the warm-up (ours; a polish iteration
            costs about 1.3 passes of the sampler over its full batch, forward and backward; a
            warm-up iteration P + 1 forward passes over its batch for P parameters, and one per
            damping trial). 0 skips both. warmup_pairs: trajectories of the warm-up (0: none).
        budget_evals: model evaluations the whole fit may spend (forward-equivalents; default
            200,000; None: no limit): the start, every phase and the validations.
        budget_seconds: an extra wall-time cap on the whole fit in seconds (default None).
        patience, min_delta: stop a phase after ``patience`` validations in a row without
            improving the best score by more than ``min_delta`` dB; None: no patience stop.
        select: the validation score that picks the kept parameters and drives patience:
            ``"per-sample"`` (default: mean per-sample PSNR), ``"set"`` (set-level PSNR) or
            ``"rmse"`` (see ``bespoke_fast.fitting.stopping``).
        max_iters: cap on the iterations of all phases together (default ``iters +
            finetune_iters + polish_iters``).
        init: the starting solver: ``"searched"`` (default): the base solver on the grid of
            least one-step local error on ``SEARCH_BATCH`` training trajectories
            (``bespoke_fast.fitting.grid_search``, GITS-style; a smaller search under a small
            budget, :func:`search_size`); ``"auto"``: the best of
            :func:`~bespoke_fast.fitting.grid_search.candidate_starts` after a short end-to-end
            trial each (:func:`screen_starts`: ``SCREEN_ITERS`` iterations, at most ``iters +
            finetune_iters`` when set, within ``SCREEN_SHARE`` of the budgets; the report's
            ``start`` lists the trials);
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
            all of them (``bench/fit_cost.py --unet`` measures it).

    Returns: ``(solver, report)``; the report holds the curve (iteration, phase, loss, validation
    RMSE/PSNR/score), the best validation figures, ``stop_reason`` (patience, budget, max_iters,
    converged, nonfinite) and each phase's (``phase_stop_reasons``), ``events`` (phases a
    non-finite loss stopped), ``iterations`` run, ``start`` (the screening of ``init="auto"``,
    else None), ``evaluations`` (exact forward / backward rows and forward-equivalents by
    stage: start, each phase, validation, total), ``nfe`` (per-sample forward summary, the
    GT's included) and the wall time.

    Under torchrun, each rank draws its own batches, gradients are all-reduced, and only rank 0
    writes checkpoints.

    Example::

        >>> gt = load_trajectories("runs/gt")
        >>> solver, report = train(model, gt, base="rk2", n_steps=5, budget_evals=200_000)
        >>> report["stop_reason"], report["best"]["psnr"]
        >>> report["evaluations"]["total"]["forward_equivalent"]        # <= 200,000
        >>> solver.save("solver.json")
    """)
