"""What the bespoke and the BNS trainer share, as public helpers: the model frozen while fitting,
validation (:func:`validate_solver`), the report (:func:`finish`), checkpoint files
(:func:`save_checkpoint`, :func:`load_checkpoint`), the learning-rate schedule
(:func:`cosine_lr`), the distributed reduce (:func:`average_gradients`), full-batch L-BFGS
(:func:`new_lbfgs`, :func:`lbfgs_advance`) and the GT checks (:func:`check_gt_matches`,
:func:`gt_split_fingerprint`). The loop that uses them: :mod:`bespoke_fast.fitting.loop`; when
to stop and which checkpoint to keep: :mod:`bespoke_fast.fitting.stopping`."""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
from contextlib import contextmanager

import torch

from .._checks import InvalidArgumentError, InvalidFileError, InvalidTypeError, MismatchError
from ..io import atomic_write, check_writable, fingerprint_configs, model_fingerprint
from ..metrics import rmse_psnr
from .evals import raw_model, summary
from .stopping import DEFAULT_SELECT
from .trajectories import TrajectorySet

__all__ = ["frozen", "validate_solver", "load_checkpoint", "save_checkpoint", "cosine_lr",
           "average_gradients", "gt_split_fingerprint", "check_gt_matches",
           "show_validation", "checkpoint_due", "finish", "new_lbfgs", "lbfgs_advance",
           "in_dtype", "option", "CommonOptions", "keyword_trainer", "KindTrainer",
           "DEFAULT_BUDGET_EVALS", "check_budget_evals"]


@contextmanager
def frozen(model):
    """Model parameters do not need gradients while fitting the solver; restore afterwards
    (``model`` may be the fit's counted model: its parameters are the model's)."""
    model = raw_model(model)
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
    ``TrainState``). ``None`` when there is nothing to resume.

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
    """Atomically save all a resumed run needs (``state``: the loop's ``TrainState``, saved
    whole); adds the wall time since ``started`` to ``state.wall_total`` and returns the new
    wall-clock origin."""
    now = time.perf_counter()
    state.wall_total += now - started
    saved = {"config": config, "solver": solver.state_dict(), "optim": optim.state_dict(),
             "rng": gen.get_state(), "iteration": iteration, "state": state.to_dict()}
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


def show_validation(bar, selection, done: int, record: dict, callback=None) -> None:
    """After a validation: the progress bar's loss / PSNR / best score (``selection``:
    ``bespoke_fast.fitting.stopping.Selection``), then ``callback(done, record)`` when given."""
    loss = record["loss"]
    bar.set_postfix(loss="-" if loss is None else f"{loss:.3g}", val_psnr=f"{record['psnr']:.2f}",
                    best=f"{selection.best_score:.2f}")
    if callback is not None:
        callback(done, record)


def checkpoint_due(ckpt, rank: int, done: int, every: int, switched: bool, stop_reason) -> bool:
    """Whether rank 0 saves the checkpoint after iteration ``done``: every ``every`` iterations,
    when a phase switched, and when training stopped (``stop_reason`` set)."""
    return (ckpt is not None and rank == 0
            and (done % every == 0 or switched or stop_reason is not None))


def finish(solver, model, trajectories, config, state, model_name, **extra_report):
    """The report of a finished fit (``state``: the loop's ``TrainState``; ``solver`` holds the
    best parameters) and the solver's file metadata. Returns ``(solver, report)``; the report's
    ``evaluations`` are the fit's exact model evaluations by stage (the GT's are the GT set's:
    ``nfe["gt"]``), ``events`` what stopped a phase early."""
    model = raw_model(model)
    best = state.selection.best_record
    configs = fingerprint_configs(model)
    evaluations = summary(state.evals)
    forward_val = evaluations.get("validation", {}).get("forward", 0)
    report = {
        "config": config,
        "curve": state.curve,
        "best": best,
        # exact sample-evaluations of this fit by stage (forward / backward rows and
        # forward-equivalents; bespoke_fast.fitting.evals); "nfe" is the older per-sample
        # forward summary, GT included
        "evaluations": evaluations,
        "nfe": {"gt": trajectories.meta.get("nfe", {}).get("total"),
                "train": evaluations["total"]["forward"] - forward_val, "validation": forward_val},
        "events": state.events,
        **extra_report,
        "wall_seconds": state.wall_total,
        "gt_wall_seconds": trajectories.meta.get("wall_seconds_last_run"),
    }
    solver.meta = {
        "model": {"name": model_name or trajectories.meta.get("model", {}).get("name", ""),
                  "hash": model_fingerprint(model)},
        "training": {**config, "wall_seconds": report["wall_seconds"], "nfe": report["nfe"]},
        "validation": best,
    }
    if configs:  # the model's settings (a guidance scale, a k-diffusion sigma range), readable:
        solver.meta["model"]["config"] = configs    # integrations.k_diffusion.fitted_range
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


def lbfgs_advance(optim, closure, state, k: int, stop: int, allowed: int | None = None) -> int:
    """Run full-batch L-BFGS (``max_iter=1`` at construction; one direction + strong-Wolfe line
    search per iteration) from iteration ``k`` towards ``stop`` in ONE call, so it keeps its
    direction memory (one extra loss evaluation per call). Returns the iterations done.

    ``state``: the loop's ``TrainState`` (``loss_evals``, ``restarted``, ``converged``,
    ``restarts``). ``closure`` computes the loss and gradient, adds 1 to ``state.loss_evals``
    and stores the loss in ``state.last_loss``. ``allowed``: at most this many iterations (the
    budgets' share, ``loop.StepContext.iterations_allowed``; None: no limit). When L-BFGS
    stops early with evaluations to spare (a gradient ~0, or a line search that rounding
    defeated) the curvature memory is dropped and ``state.converged`` is set when a fresh start
    makes no more than one iteration either."""
    if allowed is not None:
        stop = min(stop, k + max(1, allowed))
    group = optim.param_groups[0]
    group["max_iter"], group["max_eval"] = stop - k, 4 * (stop - k) + 4
    memory = optim.state[group["params"][0]]
    iters_before, evals_before = memory.get("n_iter", 0), state.loss_evals
    optim.step(closure)
    done = k + memory["n_iter"] - iters_before
    if done < stop and state.loss_evals - evals_before < group["max_eval"]:
        state.converged = state.restarted and done - k <= 1
        state.restarted = True
        optim.state.clear()
        state.restarts += 1
    else:
        state.restarted = False
    return done


def option(default, help: str):
    """A trainer option: a dataclass field with its ``default`` and ``help`` (what it does, its
    unit and default: the CLI's help text is made from it)."""
    return dataclasses.field(default=default, metadata={"help": help})


# the trainers' default budget, in forward-equivalents (bespoke_fast.fitting.evals): the same
# fit on any device; bf.fit's default of 250,000 for everything covers its GT and this
DEFAULT_BUDGET_EVALS = 200_000


def check_budget_evals(budget_evals) -> None:
    """One-line error for a budget that is not a positive whole number of evaluations."""
    if budget_evals is not None and (not isinstance(budget_evals, int) or
                                     isinstance(budget_evals, bool) or budget_evals < 1):
        raise InvalidArgumentError(f"budget_evals must be a whole number of model evaluations "
                                   f">= 1 (forward-equivalents) or None, got {budget_evals!r}")


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    """The options every trainer has, with the same meaning and default: the seed, the
    checkpoint cadence, which parameters are kept and when patience stops a phase
    (``bespoke_fast.fitting.stopping``); the kinds' ``Options`` extend it."""
    seed: int = option(0, "seed of the batch order and of the start's own fit; default 0")
    checkpoint_every: int = option(50, "save the checkpoint every this many iterations (when "
                                       "checkpointing; BNS's L-BFGS calls end there too); "
                                       "default 50")
    patience: int | None = option(8, "stop a phase after this many validations without a "
                                     "min_delta gain (None: never); default 8")
    min_delta: float = option(0.02, "gain of the selection score that counts as an "
                                    "improvement, in dB; default 0.02")
    select: str = option(DEFAULT_SELECT, "validation score that picks the kept parameters: "
                                         "'per-sample' (mean per-sample PSNR), 'set' or 'rmse'; "
                                         f"default {DEFAULT_SELECT}")
    budget_evals: int | None = option(DEFAULT_BUDGET_EVALS,
                                      "model evaluations the whole fit may spend, in "
                                      "forward-equivalents (one sample through the model's "
                                      "forward; a backward counts 2), its start, every phase "
                                      "and the validations included (None: no limit); default "
                                      f"{DEFAULT_BUDGET_EVALS:,}")


class KindTrainer:
    """Base of the solver kinds' trainers (``bespoke_fast.fitting.trainers``): ``kind``,
    ``title``, ``Options``, ``lacks`` and ``planned_evaluations`` are the subclass's; ``train``
    checks the options and calls the subclass's ``fit``. For compatibility a trainer also
    unpacks as ``(keyword function, default options)``."""

    kind = title = ""
    Options: type = type(None)
    lacks: dict = {}
    keywords = None     # the public keyword function (:func:`keyword_trainer` sets it)

    def __iter__(self):
        return iter((self.keywords, self.Options()))

    def train(self, model, trajectories, options, *, checkpoint=None, progress: bool = True,
              model_name: str = "", callback=None):
        """Fit this kind's solver to ``model`` on ``trajectories`` (a ``Trajectories``) with
        ``options`` (an ``Options``); ``checkpoint``: path to resume from and save to;
        ``callback(iteration, record)`` after each validation. Returns ``(solver, report)``."""
        if not isinstance(options, self.Options):
            raise InvalidTypeError(f"options must be {self.Options.__name__}, got "
                                   f"{type(options).__name__}")
        return self.fit(model, trajectories, options, checkpoint, progress, model_name, callback)

    def fit(self, model, trajectories, options, checkpoint, progress, model_name, callback):
        raise NotImplementedError


def keyword_trainer(trainer, name: str, doc: str, aliases: dict | None = None):
    """``name(model, trajectories, *, checkpoint=None, progress=True, model_name="",
    callback=None, **options)``: ``trainer.train`` with each field of ``trainer.Options`` as a
    keyword of the same name and default (the signature says so: ``inspect.signature``), for
    the public ``train`` / ``train_bns``. ``aliases``: ``{old keyword: option}`` also accepted
    (one of the two at a time). An unknown keyword raises ``InvalidTypeError``."""
    fields = dataclasses.fields(trainer.Options)
    names = {f.name for f in fields}
    aliases = aliases or {}

    def fn(model, trajectories, *, checkpoint=None, progress: bool = True, model_name: str = "",
           callback=None, **options):
        for old, new in aliases.items():
            if old in options:
                value = options.pop(old)
                if new in options and options[new] is not None and options[new] != value:
                    raise InvalidArgumentError(f"{old}={value!r} and {new}={options[new]!r} both "
                                               f"set {new}; give one")
                options[new] = value
        unknown = sorted(set(options) - names)
        if unknown:
            raise InvalidTypeError(f"{fn.__name__}() got unexpected keyword argument(s) "
                                   f"{', '.join(unknown)}; its options: "
                                   f"{', '.join(sorted(names))}")
        return trainer.train(model, trajectories, trainer.Options(**options),
                             checkpoint=checkpoint, progress=progress, model_name=model_name,
                             callback=callback)

    P = inspect.Parameter
    params = [P("model", P.POSITIONAL_OR_KEYWORD), P("trajectories", P.POSITIONAL_OR_KEYWORD)]
    params += [P(f.name, P.KEYWORD_ONLY, default=f.default, annotation=f.type) for f in fields]
    params += [P(name, P.KEYWORD_ONLY, default=None) for name in aliases]
    params += [P("checkpoint", P.KEYWORD_ONLY, default=None),
               P("progress", P.KEYWORD_ONLY, default=True),
               P("model_name", P.KEYWORD_ONLY, default=""),
               P("callback", P.KEYWORD_ONLY, default=None)]
    fn.__signature__ = inspect.Signature(params)
    fn.__name__ = fn.__qualname__ = name
    fn.__module__, fn.__doc__ = type(trainer).__module__, doc
    trainer.keywords = fn
    return fn
