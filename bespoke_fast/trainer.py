"""Fitting a Bespoke solver to a model: the RMSE-bound loss and the trainer (method.md section 5).

Loss for a batch of GT trajectories ``x(t)`` (all n steps in parallel)::

    d_{i+1} = || x(t_{i+1}) - step_i(x(t_i)) ||            per-sample RMSE local error
    M_i     = prod_{j=i+1}^{n-1} L_j                       (M_{n-1} = 1: the LAST error has weight 1)
    loss    = mean_batch sum_{i=0}^{n-1} M_i d_{i+1}

Gradients reach the solver parameters through the step coefficients, through ``M``, through
the model inputs (times and states), and through ``x(t_i)`` at the moving grid times: cached GT
interpolates the stored trajectories with a cubic Hermite (differentiable in t); online GT
solves RK45 at the detached grid each iteration and uses ``x(sg t) + u(sg t, x(sg t)) (t - sg t)``.

After the bound phase an end-to-end fine-tune **(ours)** minimises the mean per-sample RMSE
``mean ||x_n - x(1)||`` through the n-step sampler (cheap at NFE <= 20). The checkpoint kept is
the one with the best validation PSNR (mean per-sample PSNR, ``metrics.rmse_psnr``; the
set-level ``psnr_set`` is recorded beside it).
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ._checks import (InvalidArgumentError, InvalidFileError, InvalidTypeError, MismatchError,
                      call_model, check_choice, check_int)
from .gt import TrajectorySet
from .gt_storage import StreamedTrajectories
from .io import atomic_write, check_writable, model_fingerprint
from .metrics import rmse_psnr
from .solvers.adaptive import solve_adaptive
from .solvers.bespoke import BespokeSolver

__all__ = ["train", "rmse_bound_loss", "local_errors", "lipschitz_weights", "gt_at_grid",
           "loss_backward", "model_for_loss"]

GT_MODES = ("cached", "online")


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
                  L_tau: float = 1.0, micro_batch: int | None = None, loss_model=None):
    """One iteration's loss on ``batch`` with its gradient accumulated into ``.grad``.

    ``phase``: ``"bound"`` (the RMSE bound on GT states at the solver's grid) or
    ``"finetune"`` (mean per-sample RMSE of the n-step sample vs ``x(1)``). ``micro_batch``:
    evaluate in chunks of that many trajectories, each chunk's loss weighted by its share of
    the batch and back-propagated at once (gradient accumulation: both losses are batch means,
    so the gradient equals the full batch's up to rounding, and memory is that of one chunk).
    ``loss_model``: the model as the loss calls it (:func:`model_for_loss`; default ``model``);
    online GT always uses ``model``.

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
            x_n = solver.sample(loss_model, part.x0, **part.extras)
            loss = (x_n - part.x1).flatten(1).pow(2).mean(1).add(1e-20).sqrt().mean()
            nfe += solver.nfe * len(part)
        if chunk != n:
            loss = loss * (len(part) / n)
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total, nfe


# ----------------------------------------------------------------------------- helpers
@contextmanager
def _frozen(model):
    """Model parameters do not need gradients while fitting the solver; restore afterwards."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _dist():
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _validate(solver, model, val: TrajectorySet, batch_size=1024):
    """End-to-end validation: sample from the held-out noises and compare with GT x(1)."""
    outs = []
    with torch.no_grad():
        for lo in range(0, len(val), batch_size):
            rows = slice(lo, lo + batch_size)
            extras = {k: v[rows] for k, v in val.extras.items()}
            outs.append(solver.sample(model, val.x0[rows], **extras))
    return rmse_psnr(torch.cat(outs), val.x1, val.data_range)


def _load_checkpoint(path, config, solver, gen):
    """If ``path`` exists: check it was made with ``config``, restore the solver's parameters and
    the batch generator, and return the saved dict (the caller restores its optimizer and
    state). ``None`` when there is nothing to resume. Shared by the bespoke and BNS trainers.

    Checked before any training: the path is not a directory and its folder is writable; a file
    that is not a checkpoint of ours raises ``InvalidFileError`` and one made with other
    settings or another GT set (``config["gt"]``) ``MismatchError``, both naming the file."""
    if path is None:
        return None
    check_writable(path, "checkpoint")
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- pickle/zip/EOF errors of a damaged or foreign file
        raise InvalidFileError(f"{path}: not a readable bespoke_fast checkpoint ({type(e).__name__}); "
                               f"delete it or give another --checkpoint") from None
    keys = {"config", "solver", "optim", "rng", "iteration", "state"}
    if not isinstance(saved, dict) or not keys <= set(saved) or not isinstance(saved["config"], dict):
        raise InvalidFileError(f"{path}: not a bespoke_fast checkpoint (missing "
                               f"{sorted(keys - set(saved)) if isinstance(saved, dict) else keys}); "
                               f"delete it or give another --checkpoint")
    if saved["config"] != config:
        diff = {k: (saved["config"].get(k), v) for k, v in config.items() if saved["config"].get(k) != v}
        raise MismatchError(f"checkpoint {path} was made with other settings {diff} "
                            f"(saved, now); remove it or use the same settings")
    try:
        solver.load_state_dict(saved["solver"])
        gen.set_state(saved["rng"])
    except (RuntimeError, TypeError, KeyError) as e:
        raise InvalidFileError(f"{path}: damaged checkpoint ({type(e).__name__}); delete it or "
                               f"give another --checkpoint") from None
    return saved


def _save_checkpoint(path, config, solver, optim, gen, iteration, state, started):
    """Atomically save all a resumed run needs (shared by the bespoke and BNS trainers); adds
    the wall time since ``started`` to ``state`` and returns the new wall-clock origin."""
    now = time.perf_counter()
    state["wall_total"] += now - started
    _atomic_torch_save({"config": config, "solver": solver.state_dict(), "optim": optim.state_dict(),
                        "rng": gen.get_state(), "iteration": iteration, "state": state}, path)
    return now


def _cosine_lr(config, k):
    """Learning rate at iteration k: a cosine decay to 5% within each phase (bound, then
    fine-tune). A pure function of k, so resuming from a checkpoint needs no scheduler state."""
    if k < config["iters"]:
        base, frac = config["lr"], k / config["iters"]
    else:
        base, frac = config["finetune_lr"], (k - config["iters"]) / max(1, config["finetune_iters"])
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def _atomic_torch_save(obj, path: Path):
    atomic_write(path, lambda f: torch.save(obj, f))


def gt_split_fingerprint(train_set: TrajectorySet, val_set: TrajectorySet) -> str:
    """Identity of the training and validation pairs (``TrajectorySet.fingerprint``), recorded
    in the trainers' config: a checkpoint cannot be resumed against another GT set."""
    return f"{train_set.fingerprint()}/{val_set.fingerprint()}"


def _check_gt_matches(model, trajectories, model_name):
    meta = trajectories.meta.get("model", {})
    want = meta.get("hash", "")
    have = model_fingerprint(model)
    if want and have and want != have:
        raise MismatchError(f"the GT set was generated by model {meta.get('name') or want!r} "
                         f"(hash {want}), not by this model (hash {have}{', ' + model_name if model_name else ''}); "
                         f"generate GT for this model first")


# ----------------------------------------------------------------------------- the trainer
def train(model, trajectories: TrajectorySet, base: str = "rk2", n_steps: int = 5,
          iters: int = 200, batch_size: int = 128, lr: float = 5e-3, val=256,
          val_every: int = 50, seed: int = 0, checkpoint=None, checkpoint_every: int = 50,
          gt_mode: str = "cached", finetune_iters: int = 800, finetune_lr: float | None = None,
          L_tau: float = 1.0, model_name: str = "", progress: bool = True, callback=None,
          micro_batch: int | None = None, activation_checkpointing: bool = False, autocast=None):
    """Fit a :class:`BespokeSolver` to ``model`` on GT trajectories.

    Args:
        model: the velocity model the GT was generated with.
        trajectories: a :class:`TrajectorySet` (``load_trajectories(dir)``).
        base, n_steps: the solver family (NFE = n for rk1, 2n for rk2).
        iters: iterations of the RMSE-bound phase; batch_size: trajectories per iteration.
        lr: Adam learning rate (cosine decay to 5% over each phase). val: number of trajectories held out (the last ones) for
            validation, or a separate TrajectorySet. val_every: validate every k iterations;
            the parameters with the best validation PSNR are kept.
        seed: seeds the batch order (the result is a deterministic function of the inputs on CPU).
        checkpoint: path; saved every ``checkpoint_every`` iterations (atomically). If it exists,
            training resumes from it and ends with exactly the parameters of an uninterrupted run.
        gt_mode: ``"cached"`` (Hermite interpolation of the stored trajectories, default) or
            ``"online"`` (an RK45 solve per iteration at the current grid, as in the paper).
        finetune_iters, finetune_lr: end-to-end fine-tune after the bound phase (ours),
            starting from the best bound-phase solver; ``finetune_lr`` defaults to ``lr``.
            Defaults measured on gmm-64 and digits-fmot (NFE 10): the bound phase plateaus
            within ~150 iterations, the fine-tune adds 2-4 dB.
        callback: optional ``callback(iteration, record)`` after each validation.
        micro_batch, activation_checkpointing, autocast: memory (see :func:`loss_backward` and
            :func:`model_for_loss`): gradient accumulation over chunks of ``micro_batch``
            trajectories (same result up to rounding), per-model-call activation
            checkpointing (same result), the model under bf16/fp16 autocast (solver maths
            in the GT's dtype). Peak memory grows linearly with ``micro_batch`` (the whole
            batch without it): the bound phase calls the model on all n steps of a chunk at
            once (n x micro_batch samples per call, one call per RK stage), the fine-tune
            phase n times in sequence; checkpointing keeps one call's activations instead of
            all of them. Measured on a 35M-parameter UNet: ``bench/fit_cost.py --unet``.

    Returns: ``(solver, report)``; the report holds the curve (iteration, loss, validation
    RMSE/PSNR), the best validation figures, model evaluations spent (``nfe``: GT, training,
    validation; per-sample evaluations) and the wall time.

    Under torchrun, each rank draws its own batches, gradients are all-reduced, and only rank 0
    writes checkpoints.

    Example::

        >>> gt = load_trajectories("runs/gt")
        >>> solver, report = train(model, gt, base="rk2", n_steps=5, iters=1500)
        >>> solver.save("solver.json")
    """
    check_choice("gt_mode", gt_mode, GT_MODES)
    n_steps = check_int("n_steps", n_steps)
    iters = check_int("iters", iters, 0)
    finetune_iters = check_int("finetune_iters", finetune_iters, 0)
    batch_size = check_int("batch_size", batch_size)
    val_every = check_int("val_every", val_every)
    if iters + finetune_iters == 0:
        raise InvalidArgumentError("iters + finetune_iters must be >= 1")
    if not (lr > 0 and math.isfinite(lr)):
        raise InvalidArgumentError(f"lr must be a positive number, got {lr}")
    if not isinstance(trajectories, (TrajectorySet, StreamedTrajectories)):
        raise InvalidTypeError("trajectories must be a TrajectorySet (bespoke_fast.load_trajectories(dir))")
    _check_gt_matches(model, trajectories, model_name)
    loss_model = model_for_loss(model, activation_checkpointing, autocast)
    if isinstance(val, TrajectorySet):
        train_set, val_set = trajectories, val
    else:
        train_set, val_set = trajectories.split(check_int("val", val))
    rank, world = _dist()
    device = train_set.device
    solver = BespokeSolver(base, n_steps).to(device)
    config = {"base": base, "n_steps": n_steps, "iters": iters, "batch_size": batch_size, "lr": lr,
              "seed": seed, "gt_mode": gt_mode, "finetune_iters": finetune_iters,
              "finetune_lr": finetune_lr if finetune_lr is not None else lr, "L_tau": L_tau,
              "num_train": len(train_set), "num_val": len(val_set), "val_every": val_every,
              "gt": gt_split_fingerprint(train_set, val_set),
              **({"autocast": str(autocast).replace("torch.", "")} if autocast is not None else {})}
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    state = {"iteration": 0, "curve": [], "best": None, "best_psnr": -math.inf,
             "nfe_train": 0, "nfe_val": 0, "wall_total": 0.0}
    optim = torch.optim.Adam(solver.parameters(), lr=lr)
    ckpt = Path(checkpoint) if checkpoint else None
    saved = _load_checkpoint(ckpt, config, solver, gen)
    if saved is not None:
        if saved["iteration"] > iters:  # resumed inside the fine-tune phase
            optim = torch.optim.Adam(solver.parameters(), lr=config["finetune_lr"])
        optim.load_state_dict(saved["optim"])
        state = saved["state"]
    started = time.perf_counter()
    total = iters + finetune_iters
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=state["iteration"], disable=not progress or rank != 0,
               desc=f"fit bespoke-{base} NFE {solver.nfe}", unit="it", dynamic_ncols=True)
    with _frozen(model):
        while state["iteration"] < total:
            k = state["iteration"]
            if k == iters and finetune_iters and k > 0:
                # bound phase done: fine-tune end to end from its best parameters
                solver.load_state_dict(state["best"])
                optim = torch.optim.Adam(solver.parameters(), lr=config["finetune_lr"])
            for group in optim.param_groups:
                group["lr"] = _cosine_lr(config, k)
            rows = torch.randint(len(train_set), (batch_size,), generator=gen)
            batch = train_set.subset(rows)
            optim.zero_grad(set_to_none=True)
            loss, nfe = loss_backward(solver, model, batch, "bound" if k < iters else "finetune",
                                      gt_mode, L_tau, micro_batch, loss_model)
            state["nfe_train"] += nfe
            if world > 1:
                for p in solver.parameters():
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
            optim.step()
            state["iteration"] = k + 1
            bar.update(1)
            done = state["iteration"]
            if done % val_every == 0 or done == total or done == iters:
                record = {"iteration": done, "loss": float(loss.detach()),
                          "phase": "bound" if done <= iters else "finetune",
                          **_validate(solver, model, val_set)}
                state["nfe_val"] += solver.nfe * len(val_set)
                state["curve"].append(record)
                if record["psnr"] > state["best_psnr"]:
                    state["best_psnr"] = record["psnr"]
                    state["best"] = copy.deepcopy(solver.state_dict())
                    state["best_record"] = record
                bar.set_postfix(loss=f"{record['loss']:.3g}", val_psnr=f"{record['psnr']:.2f}",
                                best=f"{state['best_psnr']:.2f}")
                if callback is not None:
                    callback(done, record)
            if ckpt is not None and rank == 0 and (done % checkpoint_every == 0 or done == total):
                started = _save_checkpoint(ckpt, config, solver, optim, gen, done, state, started)
    bar.close()
    state["wall_total"] += time.perf_counter() - started
    return _finish(solver, model, trajectories, config, state, model_name)


def _finish(solver, model, trajectories, config, state, model_name, **extra_report):
    """Load the best parameters, then build the report and the solver's file metadata (shared
    by the bespoke and BNS trainers). Returns ``(solver, report)``."""
    solver.load_state_dict(state["best"])
    report = {
        "config": config,
        "curve": state["curve"],
        "best": state["best_record"],
        "nfe": {"gt": trajectories.meta.get("nfe", {}).get("total"), "train": state["nfe_train"],
                "validation": state["nfe_val"]},
        **extra_report,
        "wall_seconds": state["wall_total"],
        "gt_wall_seconds": trajectories.meta.get("wall_seconds_last_run"),
    }
    solver.meta = {
        "model": {"name": model_name or trajectories.meta.get("model", {}).get("name", ""),
                  "hash": model_fingerprint(model)},
        "training": {**config, "wall_seconds": report["wall_seconds"], "nfe": report["nfe"]},
        "validation": state["best_record"],
    }
    return solver, report
