"""What the bespoke and the BNS trainer share, as public helpers: the model frozen while fitting,
validate-and-keep-best (:func:`validate_solver`, :func:`finish`), checkpoint / resume
(:func:`save_checkpoint`, :func:`load_checkpoint`), the learning-rate schedule
(:func:`cosine_lr`), the distributed reduce (:func:`average_gradients`; the stop decision:
:func:`bespoke_fast.fitting.stopping.rank0_decides`),
and the GT checks (:func:`check_gt_matches`, :func:`gt_split_fingerprint`). When to stop and
which checkpoint to keep: :mod:`bespoke_fast.fitting.stopping`."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from .._checks import InvalidFileError, MismatchError
from ..io import atomic_write, check_writable, model_fingerprint
from ..metrics import rmse_psnr
from .trajectories import TrajectorySet

__all__ = ["frozen", "validate_solver", "load_checkpoint", "save_checkpoint", "cosine_lr",
           "average_gradients", "gt_split_fingerprint", "check_gt_matches",
           "show_validation", "checkpoint_due", "finish", "new_lbfgs", "lbfgs_advance",
           "new_lbfgs_state", "in_dtype"]


@contextmanager
def frozen(model):
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


def validate_solver(solver, model, val: TrajectorySet, batch_size=1024):
    """End-to-end validation: sample from the held-out noises and compare with GT x(1)."""
    outs = []
    with torch.no_grad():
        for lo in range(0, len(val), batch_size):
            rows = slice(lo, lo + batch_size)
            extras = {k: v[rows] for k, v in val.extras.items()}
            outs.append(solver.sample(model, val.x0[rows], **extras))
    return rmse_psnr(torch.cat(outs), val.x1, val.data_range)


def load_checkpoint(path, config, solver, gen):
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


def save_checkpoint(path, config, solver, optim, gen, iteration, state, started):
    """Atomically save all a resumed run needs (shared by the bespoke and BNS trainers); adds
    the wall time since ``started`` to ``state`` and returns the new wall-clock origin."""
    now = time.perf_counter()
    state["wall_total"] += now - started
    saved = {"config": config, "solver": solver.state_dict(), "optim": optim.state_dict(),
             "rng": gen.get_state(), "iteration": iteration, "state": state}
    atomic_write(path, lambda f: torch.save(saved, f))
    return now


def cosine_lr(base, k, horizon):
    """Learning rate at iteration ``k`` of a phase whose schedule spans ``horizon`` iterations:
    a cosine decay from ``base`` to 5% of it. A pure function of its arguments (the horizon is
    kept in the checkpointed state), so resuming needs no scheduler state."""
    frac = min(1.0, k / max(1, horizon))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def gt_split_fingerprint(train_set: TrajectorySet, val_set: TrajectorySet) -> str:
    """Identity of the training and validation pairs (``TrajectorySet.fingerprint``), recorded
    in the trainers' config: a checkpoint cannot be resumed against another GT set."""
    return f"{train_set.fingerprint()}/{val_set.fingerprint()}"


def check_gt_matches(model, trajectories, model_name):
    """Raise ``MismatchError`` when the GT set records another model than ``model``."""
    meta = trajectories.meta.get("model", {})
    want = meta.get("hash", "")
    have = model_fingerprint(model)
    if want and have and want != have:
        raise MismatchError(f"the GT set was generated by model {meta.get('name') or want!r} "
                         f"(hash {want}), not by this model (hash {have}{', ' + model_name if model_name else ''}); "
                         f"generate GT for this model first")


def average_gradients(params, world: int) -> None:
    """Mean of each parameter's gradient over the ``world`` ranks (no-op for one process)."""
    if world > 1:
        for p in params:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def show_validation(bar, state, done: int, record: dict, callback=None) -> None:
    """After a validation: the progress bar's loss / PSNR / best score, then ``callback(done,
    record)`` when given."""
    bar.set_postfix(loss=f"{record['loss']:.3g}", val_psnr=f"{record['psnr']:.2f}",
                    best=f"{state['best_score']:.2f}")
    if callback is not None:
        callback(done, record)


def checkpoint_due(ckpt, rank: int, done: int, every: int, switched: bool, state) -> bool:
    """Whether rank 0 saves the checkpoint after iteration ``done``: every ``every`` iterations,
    when a phase switched, and when training stopped."""
    return (ckpt is not None and rank == 0
            and (done % every == 0 or switched or state["stop_reason"] is not None))


def finish(solver, model, trajectories, config, state, model_name, bar, started,
           **extra_report):
    """Close the progress ``bar``, add the wall time since ``started`` to ``state``, load the best
    parameters, then build the report and the solver's file metadata (shared by the bespoke and
    BNS trainers). Returns ``(solver, report)``."""
    bar.close()
    state["wall_total"] += time.perf_counter() - started
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


def in_dtype(model, dtype):
    """``model`` called in ``dtype`` (inputs cast to it, the output cast back to the state's
    dtype): a float64 sampler state around a float32 network. L-BFGS needs the float64 state:
    float32 rounding of a loss near its optimum defeats the line search."""
    def call(x, t, **extras):
        return model(x.to(dtype), t.to(dtype), **extras).to(x.dtype)
    return call


def new_lbfgs(params, lr: float = 1.0):
    """The L-BFGS optimizer :func:`lbfgs_advance` drives: one iteration per step at
    construction (the driver sets each call's length), 100 directions of memory, strong-Wolfe
    line search."""
    return torch.optim.LBFGS(params, lr=lr, max_iter=1, history_size=100,
                             line_search_fn="strong_wolfe")


def new_lbfgs_state() -> dict:
    """The fields :func:`lbfgs_advance` keeps in a trainer's (checkpointed) state."""
    return {"loss_evals": 0, "last_loss": None, "restarted": False, "converged": False,
            "restarts": 0}


def lbfgs_advance(optim, closure, state: dict, k: int, stop: int, budget_seconds, elapsed) -> int:
    """Run full-batch L-BFGS (``max_iter=1`` at construction; one direction + strong-Wolfe line
    search per iteration) from iteration ``k`` towards ``stop`` in ONE call, so it keeps its
    direction memory (one extra loss evaluation per call). Returns the iterations done.

    ``closure`` computes the loss and gradient, adds 1 to ``state["loss_evals"]`` and stores
    the loss in ``state["last_loss"]``. Under a time budget (``budget_seconds``, ``elapsed()``
    the fit's wall time so far) the call ends near it; the phase's first call makes one timed
    iteration (25 untimed ones overran a 30 s budget by 15 s on the exact digits flow).
    When L-BFGS stops early with evaluations to spare (a gradient ~0, or a line search that
    rounding defeated) the curvature memory is dropped and ``state["converged"]`` is set when
    a fresh start makes no more than one iteration either."""
    if budget_seconds is not None and k > state["phase_start"]:
        per = (elapsed() - state["phase_wall"]) / (k - state["phase_start"])
        stop = min(stop, k + max(1, int((budget_seconds - elapsed()) / per)))
    elif budget_seconds is not None:
        stop = k + 1
    group = optim.param_groups[0]
    group["max_iter"], group["max_eval"] = stop - k, 4 * (stop - k) + 4
    memory = optim.state[group["params"][0]]
    iters_before, evals_before = memory.get("n_iter", 0), state["loss_evals"]
    optim.step(closure)
    done = k + memory["n_iter"] - iters_before
    if done < stop and state["loss_evals"] - evals_before < group["max_eval"]:
        state["converged"] = state["restarted"] and done - k <= 1
        state["restarted"] = True
        optim.state.clear()
        state["restarts"] += 1
    else:
        state["restarted"] = False
    return done
