"""``bespoke-fast fit`` / ``bf.fit(...)``: the whole job of fitting a solver to a model, in one call.

Stages, each resumable (rerun the same call after an interruption)::

    plan        trajectories, disk, model evaluations, ETA (timed probe)   -> OUT/plan.json
    gt_train    GT trajectories for training (seed S)                      -> OUT/gt_train/
    gt_heldout  disjoint held-out GT, endpoints only (seed S + 1)          -> OUT/gt_heldout/
    train       bespoke (RK2) or BNS solver; model selection on the last
                trajectories of gt_train, never on the held-out set         -> OUT/train.ckpt, solver file
    evaluate    the solver and the base solvers at the same NFE, held-out set only
    report      OUT/report.json, OUT/report.md, OUT/error_maps.png, OUT/transform.png

GT shards are checksummed and kept, training resumes from its checkpoint (ending with the
parameters of an uninterrupted run), the plan is frozen in ``plan.json`` on the first run.
``max_disk`` / ``budget_seconds`` scale the plan down (fewer trajectories, then fewer
iterations) or refuse with a one-line ``ValueError`` when even the smallest plan does not fit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import (InvalidArgumentError, InvalidFileError, check_choice,
                       check_int, model_errors, probe_model)
from .common import check_budget_evals, frozen
from .stopping import describe_events
from . import options_lacking, trainer_for
from .trainers import DEFAULT_KIND, TRAINERS
from .gt_storage import bytes_per_trajectory
from .plots import plot_error_maps, plot_transform  # the report's figures (re-exported)
from .plots import pyplot as _plt
from ..io import (Inventory, atomic_write_text, claim_run_dir, first_difference,
                  read_json_bounded)
from ..solvers.registry import solver_class
from ..solvers.bespoke import BespokeSolver

__all__ = ["fit", "FitResult", "make_plan", "plot_error_maps", "plot_transform", "baselines",
           "SOLVERS"]

SOLVERS = tuple(TRAINERS)     # the kinds with a trainer (the registry's, in its order)
_ENDPOINT_KNOTS = (0.0, 1.0)
# smallest plan --max-disk / --budget-seconds may scale down to
_MIN_TRAIN, _MIN_HELDOUT, _MIN_ITERS = 64, 64, 10
_SCALES = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.02, 0.01)
# the fit's default budget: forward-equivalents for the training GT and the trainer together
# (the held-out GT and report are not part of the fit); default training GT trajectories
DEFAULT_BUDGET_EVALS, DEFAULT_NUM_TRAIN = 250_000, 160
# the GT accuracy check: this many trajectories solved again 100x tighter (float64), at about
# this many times a GT trajectory's evaluations (the report has the exact count)
GT_CHECK, GT_CHECK_FACTOR = 16, 3
GT_BUDGET_SHARE = 0.6   # at most this share of budget_evals for the training GT
GT_SHARD, EVAL_BATCH = 256, 1024    # trajectories per GT shard, samples per evaluation batch


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained ``solver``, the ``report`` dict (also in
    ``out/report.json``), the ``solver_path``, the output directory ``out`` and the resolved
    ``model`` (a :class:`~bespoke_fast.zoo.ZooModel`)."""

    solver: object
    report: dict
    solver_path: Path
    out: Path
    model: object = None


def baselines(nfe: int) -> list:
    """Base solvers at the same NFE (rk4 at the nearest multiple of 4 not above it) and midpoint
    at twice the NFE."""
    specs = [f"euler@{nfe}"]
    if nfe % 2 == 0:
        specs.append(f"midpoint@{nfe}")
    if nfe >= 4:
        specs.append(f"rk4@{nfe - nfe % 4}")
    specs.append(f"midpoint@{2 * nfe}")
    return specs


# ----------------------------------------------------------------------------- the model
def _resolve(model, shape, data_range, device, log):
    """``(ZooModel, device)`` from a name / ``module:factory`` / ZooModel / plain model."""
    from ..zoo import ZooModel, resolve_model
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, str):
        zm = resolve_model(model, device=device)
    elif isinstance(model, ZooModel):
        zm = model
        if isinstance(zm.model, torch.nn.Module):
            zm.model.to(device)
    else:
        if shape is None:
            raise InvalidArgumentError("shape is required for a plain model, e.g. fit(net, shape=(3, 32, 32))")
        if data_range is None:
            log("note: no data_range given; assuming 2.0 (data in [-1, 1]) for PSNR")
        name = getattr(model, "name", "") or type(model).__name__
        zm = ZooModel(name, model, tuple(shape), 2.0 if data_range is None else float(data_range))
        if isinstance(model, torch.nn.Module):
            model.to(device)
    if shape is not None and tuple(shape) != tuple(zm.shape):
        raise InvalidArgumentError(f"shape {tuple(shape)} does not match the model's shape {tuple(zm.shape)}")
    if data_range is not None:
        zm.data_range = float(data_range)
    return zm, torch.device(device)


# ----------------------------------------------------------------------------- the plan
def _probe(zm, device, batch, rtol, atol, knots):
    """Seconds per sample-evaluation (forward) at ``batch``, GT model evaluations per
    trajectory (an adaptive solve of 2 trajectories with the GT tolerances) and the bytes a
    forward keeps for its backward, per sample (the activations a training step holds)."""
    from ..noise import noise_for_indices
    from ..solvers.adaptive import solve_adaptive

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        x = noise_for_indices(list(range(batch)), zm.shape, seed=12345, device=device)
        t = torch.full((batch,), 0.5, device=device)
        zm.model(x, t)                                   # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(3):
            zm.model(x, t)
        sync()
        per_eval = (time.perf_counter() - start) / (3 * batch)
        x0 = noise_for_indices([0, 1], zm.shape, seed=12345, device=device)
        _, stats = solve_adaptive(zm.model, x0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                                  rtol=rtol, atol=atol, return_stats=True)
    # what the model keeps for the backward per sample when its input takes part in a
    # gradient: saved bytes at two batch sizes, the difference per row (weights a call saves
    # are shared by the rows, not per sample)
    sizes, saved = (1, min(batch, 4)), []
    with frozen(zm.model):
        for rows in sizes:
            total = [0]

            def pack(tensor, total=total):
                total[0] += tensor.numel() * tensor.element_size()
                return tensor
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                zm.model(x[:rows].clone().requires_grad_(True), t[:rows])
            saved.append(total[0])
    per_row = (saved[1] - saved[0]) / (sizes[1] - sizes[0]) if sizes[1] > sizes[0] else saved[0]
    return per_eval, stats["nfe"] + knots, max(per_row, 0.0)


def make_plan(settings: dict, probe: dict) -> dict:
    """The plan for ``settings`` (counts, iterations) given the probe's timings: trajectories,
    disk bytes, model evaluations (per-sample forwards) and ETA seconds."""
    s, nfe = settings, settings["nfe"]
    K = len(settings["knots_t"])
    knot_dtype = getattr(torch, s["storage_dtype"])
    disk = (s["num_train"] * bytes_per_trajectory(s["shape"], K, knot_dtype=knot_dtype)
            + s["num_heldout"] * bytes_per_trajectory(s["shape"], len(_ENDPOINT_KNOTS)))
    per_traj = probe["gt_evals_per_trajectory"]
    gt_evals = per_traj * s["num_train"] + GT_CHECK_FACTOR * per_traj * GT_CHECK
    heldout_evals = (per_traj - K + len(_ENDPOINT_KNOTS)) * s["num_heldout"]
    report_evals = s["num_heldout"] * (nfe + sum(int(b.split("@")[1]) for b in baselines(nfe)))
    trainer = trainer_for(s["solver"])
    options = _trainer_options(s, trainer, None if s.get("budget_evals") is None else
                               max(0, s["budget_evals"] - int(gt_evals)))
    train_evals = trainer.planned_evaluations(options, s["num_train"] - s["num_select"],
                                              s["num_select"], nfe)
    # forward-equivalents: a backward takes about two forwards' time, so the per-forward time
    # of the probe prices them all
    evals = {"gt": int(gt_evals), "train": int(train_evals), "heldout_gt": int(heldout_evals),
             "report": int(report_evals)}
    train_seconds = probe["seconds_per_eval"] * train_evals
    train_budget = s.get("train_budget_seconds")
    if train_budget is not None:
        train_seconds = min(train_seconds, train_budget)
    eta = probe["seconds_per_eval"] * (gt_evals + heldout_evals + report_evals) + train_seconds
    memory = _memory_estimate(s, probe)
    return {"trajectories": {"train": s["num_train"], "heldout": s["num_heldout"],
                             "train_seed": s["seed"], "heldout_seed": s["heldout_seed"],
                             "model_selection": s["num_select"]},
            "iterations": {"iters": s["iters"], "finetune_iters": s["finetune_iters"]},
            "disk_bytes": int(disk), "disk_is_upper_bound": bool(s["adaptive_knots"]),
            "model_evaluations": {**evals, "fit": evals["gt"] + evals["train"],
                                  "total": sum(evals.values()),
                                  "budget": s.get("budget_evals")},
            "memory_bytes": memory,
            "eta_seconds": eta, "train_seconds": train_seconds,
            "train_budget_seconds": train_budget, "probe": probe}


def _trainer_options(s, trainer, budget_evals):
    """The trainer's options as the fit runs it (its defaults, the fit's settings)."""
    names = {f.name for f in dataclasses.fields(trainer.Options)}
    return trainer.Options(**{k: s[k] for k in ("iters", "finetune_iters", "batch_size",
                                                 "val_every") if k in names},
                           budget_evals=budget_evals)


def _memory_estimate(s, probe) -> dict:
    """Peak memory of the fit, estimated before it starts (bytes): what the process holds now
    (``process``: torch, the model), plus the largest of its stages: GT generation
    (``gt_generation``: a shard of ``GT_SHARD`` trajectories' knots, the solver's stages and
    one call's activations), training (``training``: the training GT in memory and what one
    chunk keeps for the backward: the probe's bytes per sample-evaluation x the chunk's
    evaluations through the NFE-step sampler) and the held-out report (``evaluation``: batches
    of ``EVAL_BATCH``). ``peak`` is ``process`` plus the largest."""
    import resource
    from .gt_storage import bytes_per_trajectory
    numel = math.prod(s["shape"])
    act = probe.get("saved_bytes_per_eval", 0)
    knots = len(s["knots_t"])
    gt = s["num_train"] * bytes_per_trajectory(s["shape"], knots)
    shard = min(GT_SHARD, s["num_train"])
    gt_generation = shard * (bytes_per_trajectory(s["shape"], knots) + 8 * numel * 4 + act)
    chunk = min(s["batch_size"], s["num_train"])
    # + the sampler's float64 states the backward keeps (state, stage state, velocity per call)
    training = gt + int(chunk * s["nfe"] * (act + 3 * numel * 8))
    evaluation = min(EVAL_BATCH, s["num_heldout"]) * (act + 4 * numel * 4)
    process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: KiB
    stages = {"gt_generation": int(gt_generation), "training": int(training),
              "evaluation": int(evaluation)}
    return {"process": int(process), **stages, "gt": int(gt),
            "peak": int(process + max(stages.values()))}


def _num_select(num_train: int, solver: str) -> int:
    """The last trajectories of the training GT that select the checkpoint: a fifth, at most
    256, at least what the kind's trainer needs (``min_val``)."""
    return max(trainer_for(solver).min_val, min(256, num_train // 5))


def _scaled(settings, scale):
    s = dict(settings)
    smallest = next(n for n in range(_MIN_TRAIN, 10 * _MIN_TRAIN)
                    if n - _num_select(n, settings["solver"]) >= _MIN_TRAIN)
    s["num_train"] = max(min(smallest, settings["num_train"]), int(settings["num_train"] * scale))
    if s["num_train"] < settings["num_train"]:     # the selection share shrinks with the set
        s["num_select"] = min(settings["num_select"], _num_select(s["num_train"], s["solver"]))
    s["num_heldout"] = max(min(_MIN_HELDOUT, settings["num_heldout"]), int(settings["num_heldout"] * scale))
    for key in ("iters", "finetune_iters"):
        if settings[key]:
            s[key] = max(min(_MIN_ITERS, settings[key]), int(settings[key] * scale))
    return s


def _fit_plan(settings, probe, max_disk, budget_seconds, log):
    """The largest scaled plan within ``max_disk`` and ``budget_seconds`` (or ``ValueError``)."""
    plan = make_plan(settings, probe)
    for scale in _SCALES:
        s = _scaled(settings, scale)
        p = make_plan(s, probe)
        if (max_disk is None or p["disk_bytes"] <= max_disk) and (
                budget_seconds is None or p["eta_seconds"] <= budget_seconds):
            if scale < 1:
                log(f"scaled down to fit {_limits(max_disk, budget_seconds)}: "
                    f"{settings['num_train']} -> {s['num_train']} training and "
                    f"{settings['num_heldout']} -> {s['num_heldout']} held-out trajectories, "
                    f"{settings['iters']}+{settings['finetune_iters']} -> "
                    f"{s['iters']}+{s['finetune_iters']} iterations")
            return s, p
    raise InvalidArgumentError(f"refusing to start: the full plan needs {_gb(plan['disk_bytes'])} and about "
                     f"{_duration(plan['eta_seconds'])}, and even the smallest one ("
                     f"{s['num_train']} trajectories, {_gb(p['disk_bytes'])}, "
                     f"{_duration(p['eta_seconds'])}) exceeds {_limits(max_disk, budget_seconds)}")


def _check_gt_within_budget(settings, plan) -> None:
    """Refuse (one line) a fit whose training GT alone would spend most of its budget."""
    budget, gt = settings.get("budget_evals"), plan["model_evaluations"]["gt"]
    if budget is not None and gt > GT_BUDGET_SHARE * budget:
        raise InvalidArgumentError(
            f"refusing to start: the training GT alone needs about {gt:,} model evaluations "
            f"({settings['num_train']} trajectories x {plan['probe']['gt_evals_per_trajectory']:.0f}"
            f", plus its accuracy check), more than {GT_BUDGET_SHARE:.0%} of the budget of "
            f"{budget:,} (--budget-evals); lower --num-train or raise --budget-evals")


def _limits(max_disk, budget_seconds):
    parts = ([f"max disk {_gb(max_disk)}"] if max_disk is not None else []) + (
        [f"budget {_duration(budget_seconds)}"] if budget_seconds is not None else [])
    return " and ".join(parts)


def _gb(n):
    return (f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5
            else f"{n / 1e3:.0f} kB")


def _duration(sec):
    return f"{sec / 3600:.1f} h" if sec >= 7200 else f"{sec / 60:.1f} min" if sec >= 120 else f"{sec:.0f} s"


def plan_lines(plan, settings) -> list:
    t, e = plan["trajectories"], plan["model_evaluations"]
    return [f"plan: {settings['solver']} solver at NFE {settings['nfe']} for {settings['model']} "
            f"(shape {tuple(settings['shape'])})",
            f"  trajectories: {t['train']} for training (seed {t['train_seed']}; the last "
            f"{t['model_selection']} select the checkpoint) + {t['heldout']} held out "
            f"(seed {t['heldout_seed']}, disjoint) for the report",
            f"  disk: {'at most ' if plan['disk_is_upper_bound'] else ''}{_gb(plan['disk_bytes'])} "
            f"(knots in {settings['storage_dtype']})",
            f"  model evaluations (forward-equivalents: one sample through the model; a "
            f"backward counts 2): the fit {e['fit']:,}"
            + (f" of its budget of {e['budget']:,}" if e.get("budget") is not None else "")
            + f" (training GT about {e['gt']:,}: {t['train']} x "
            f"{plan['probe']['gt_evals_per_trajectory']:.0f} and its accuracy check; trainer at "
            f"most {e['train']:,}); measuring apart: held-out GT {e['heldout_gt']:,}, report "
            f"{e['report']:,}",
            f"  memory: about {_gb(plan['memory_bytes']['peak'])} at the peak (this process "
            f"{_gb(plan['memory_bytes']['process'])} now, plus the largest stage: GT "
            f"generation {_gb(plan['memory_bytes']['gt_generation'])}, training "
            f"{_gb(plan['memory_bytes']['training'])}, held-out report "
            f"{_gb(plan['memory_bytes']['evaluation'])}; estimated from the probe)",
            f"  ETA: about {_duration(plan['eta_seconds'])} "
            f"({plan['probe']['seconds_per_eval'] * 1e3:.3g} ms per sample-evaluation, timed; "
            + (f"training at most {_duration(plan['train_budget_seconds'])}, the trainer's "
               f"time budget)" if plan.get("train_budget_seconds") is not None
               else "training without a time budget)")]


# ----------------------------------------------------------------------------- the job
def fit(model, nfe: int = 10, solver: str = DEFAULT_KIND, out="runs/fit", shape=None,
        data_range=None, num_train: int | None = None, num_heldout: int = 1024, seed: int = 0,
        heldout_seed: int | None = None, rtol: float = 1e-5, atol: float = 1e-5,
        knots: int | None = None, storage_dtype: str = "float32", adaptive_knots: bool = False,
        max_disk: float | None = None, budget_seconds: float | None = None,
        budget_evals: int | None = DEFAULT_BUDGET_EVALS, device="auto",
        iters: int | None = None, finetune_iters: int | None = None, batch_size: int | None = None,
        micro_batch: int | None = None, activation_checkpointing: bool = False, autocast=None,
        stream: bool = True, plots: bool = True, progress: bool = True, log=print,
        plan_only: bool = False, train_kwargs: dict | None = None,
        overwrite: bool = False, extra_files=()) -> FitResult | dict:
    """Fit a solver to ``model`` end to end: GT, held-out GT, training, held-out evaluation,
    report and solver file in ``out``. Rerunning the same call resumes where it stopped.

    Args:
        model: a bundled name (``"digits-fmot"``), ``"package.module:factory"``, a
            :class:`~bespoke_fast.zoo.ZooModel`, or any velocity model ``model(x, t[B]) -> u``
            (then give ``shape``; ``data_range`` defaults to 2, with a notice).
        nfe: network evaluations of the solver (even for bespoke: RK2 steps of 2).
        solver: ``"bespoke"`` (RK2 scale-time) or ``"bns"`` (non-stationary).
        num_train: training GT trajectories (default 160; the last ``min(256, num_train //
            5)`` select the checkpoint). BNS fits a Bespoke RK2 start on all the others, then
            trains on 520 of them (``train_bns``'s default ``init="bespoke"``). num_heldout: held-out GT
            (endpoints only; only the report uses them). seed / heldout_seed: their noise seeds
            (held-out default ``seed + 1``; must differ, so the sets are disjoint).
        rtol, atol, knots, storage_dtype, adaptive_knots: GT settings
            (:func:`~bespoke_fast.fitting.gt.generate_trajectories`; the storage error budget uses
            this ``nfe``).
        budget_evals: model evaluations the fit may spend, in forward-equivalents (one sample
            through the model's forward; a backward counts 2): the training GT (its accuracy
            check included) and the trainer (its start, phases and validations) together;
            the trainer gets what the GT left. Not counted: the held-out GT and the report,
            which only measure. Default 250,000; None: the trainer's own budget.
        max_disk (bytes), budget_seconds: scale the plan down to fit, or refuse.
        iters, finetune_iters, batch_size: training length (default: the trainer's).
        micro_batch, activation_checkpointing, autocast: trainer memory options
            (:func:`~bespoke_fast.train`). stream: read training GT shard rows on demand.
        plan_only: print and return the plan, do nothing else.
        train_kwargs: further keyword arguments for the trainer (e.g. ``val_every``).
        overwrite: replace a fit made with other settings in ``out`` (default: refuse with a
            ``MismatchError`` naming the first differing setting); the same settings always
            resume. It deletes only the files the old fit's run record (``out/run.json``) lists
            and refuses a folder holding any other file; without it, a file of the user's that
            the fit would write (``report.md``, ``plan.json``, ...) is refused, never replaced.
            A damaged ``plan.json`` / ``train_report.json`` of the fit is named in an
            ``InvalidFileError``; ``overwrite`` computes it again.
        extra_files: names of further files the caller writes into ``out`` (claimed with the
            fit's own, e.g. the demo's plots).

    Returns: a :class:`FitResult` (``solver``, ``report``, ``solver_path``, ``out``), or the
    plan dict with ``plan_only``.

    Example::

        >>> result = fit("digits-fmot", nfe=10, out="runs/digits_fit")
        >>> result.report["heldout"][0]["psnr"], result.solver_path
    """
    check_choice("solver", solver, SOLVERS)
    nfe = check_int("nfe", nfe)
    lacking = options_lacking(solver)    # the options this kind's trainer does not have
    unused = [name for name, v in (("finetune_iters", finetune_iters), ("micro_batch", micro_batch),
                                   ("activation_checkpointing", activation_checkpointing or None),
                                   ("autocast", autocast)) if v is not None and name in lacking]
    if unused:
        raise InvalidArgumentError(f"{', '.join(unused)}: not used by the {trainer_for(solver).title} "
                                   f"trainer ({'; '.join(lacking[n] for n in unused)}); drop "
                                   f"{'them' if len(unused) > 1 else 'it'} or use another solver")
    solver_class(solver).steps_for_nfe(trainer_for(solver).fit_header, nfe)
    heldout_seed = seed + 1 if heldout_seed is None else heldout_seed
    if heldout_seed == seed:
        raise InvalidArgumentError("heldout_seed must differ from seed (the held-out noises must be disjoint)")
    for name, v in (("max_disk", max_disk), ("budget_seconds", budget_seconds)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise InvalidArgumentError(f"{name} must be a positive number, got {v}")
    check_budget_evals(budget_evals)
    out = Path(out)
    zm, device = _resolve(model, shape, data_range, device, log)
    probe_model(zm.model, zm.shape, device, zm.extras)
    settings = _settings(zm, nfe, solver, num_train, num_heldout, seed, heldout_seed, rtol, atol,
                         knots, storage_dtype, adaptive_knots, iters, finetune_iters, batch_size)
    _, trainer_options = trainer_for(solver)
    settings["train_budget_seconds"] = (train_kwargs or {}).get("budget_seconds",
                                                                trainer_options.budget_seconds)
    settings["budget_evals"] = (budget_evals if budget_evals is not None
                                else (train_kwargs or {}).get("budget_evals"))
    requested = json.loads(json.dumps({"settings": settings, "max_disk": max_disk,
                                       "budget_seconds": budget_seconds}))
    inventory = fit_inventory(solver_file_name(zm.name, solver, nfe), extra_files)
    state = claim_run_dir(out, requested, inventory, overwrite, "fit", dry_run=plan_only)
    plan_file = out / "plan.json"
    saved = _read_plan(plan_file, requested, overwrite, log) if state == "resume" else None
    if saved is not None:
        settings, plan = saved["settings"], saved["plan"]
        log(f"resuming the fit in {out} (plan from {plan_file})")
    else:
        with model_errors(zm.model, "on the timing probe (one GT trajectory, before any work)"):
            per_eval, gt_per_traj, saved_bytes = _probe(zm, device, min(settings["batch_size"], 16),
                                                        rtol, atol, len(settings["knots_t"]))
        probe = {"seconds_per_eval": per_eval, "gt_evals_per_trajectory": gt_per_traj,
                 "saved_bytes_per_eval": saved_bytes, "device": str(device)}
        settings, plan = _fit_plan(settings, probe, max_disk, budget_seconds, log)
        _check_gt_within_budget(settings, plan)
        if not plan_only:
            atomic_write_text(plan_file, json.dumps({"requested": requested, "settings": settings,
                                                     "plan": plan}, indent=1) + "\n")
    for line in plan_lines(plan, settings):
        log(line)
    if plan_only:
        return plan
    with model_errors(zm.model, "during the fit (training or evaluation)"):
        return _run(zm, device, settings, plan, out, micro_batch, activation_checkpointing,
                    autocast, stream, plots, progress, log, train_kwargs or {}, overwrite)


def solver_file_name(model_name: str, solver: str, nfe: int) -> str:
    """The name of the solver file a fit writes into its folder."""
    return f"{_safe(model_name)}_{trainer_for(solver).file_label}_nfe{nfe}.json"


def fit_inventory(solver_file: str, extra_files=()) -> Inventory:
    """The files a fit may create in its folder (its claim in ``run.json``); the GT folders hold
    runs of their own."""
    return Inventory(["plan.json", "train.ckpt", "train.ckpt.bespoke", "train_report.json",
                      "report.json", "report.md", "error_maps.png", "transform.png", solver_file,
                      *extra_files],
                     dirs=["gt_train", "gt_heldout"])


_PLAN_KEYS = {"trajectories": dict, "iterations": dict, "disk_bytes": int,
              "model_evaluations": dict, "eta_seconds": (int, float), "probe": dict}
_SETTINGS_KEYS = {"model": str, "shape": list, "nfe": int, "solver": str, "num_train": int,
                  "num_heldout": int, "num_select": int, "seed": int, "heldout_seed": int,
                  "knots_t": list, "storage_dtype": str, "iters": int, "finetune_iters": int,
                  "batch_size": int, "val_every": int}


def _read_plan(path: Path, requested: dict, overwrite: bool, log):
    """The saved plan of a resumed fit, checked (bounded JSON, its request, the types of the
    fields the job uses); a damaged one raises ``InvalidFileError`` naming it, or with
    ``overwrite`` is computed again (returns None)."""
    if not path.is_file():
        return None
    try:
        doc = read_json_bounded(path, "fit plan")
        ok = (isinstance(doc, dict) and isinstance(doc.get("settings"), dict)
              and isinstance(doc.get("plan"), dict)
              and all(isinstance(doc["settings"].get(k), t) and not isinstance(doc["settings"][k], bool)
                      for k, t in _SETTINGS_KEYS.items())
              and all(isinstance(doc["plan"].get(k), t) for k, t in _PLAN_KEYS.items()))
        if not ok:
            raise InvalidFileError(f"{path}: not a valid fit plan (missing or mistyped fields)")
        if doc.get("requested") != requested:
            raise InvalidFileError(f"{path}: a plan for other settings than its run record "
                                   f"({first_difference(doc.get('requested'), requested)})")
        s, r = doc["settings"], requested["settings"]
        if any(s[k] != r[k] for k in ("model", "shape", "nfe", "solver", "seed", "heldout_seed")):
            raise InvalidFileError(f"{path}: its settings do not match its request")
    except InvalidFileError as e:
        if overwrite:
            log(f"{path} is damaged; computing the plan again (--overwrite)")
            return None
        raise InvalidFileError(f"{e}; rerun with --overwrite (overwrite=True) to compute it "
                               f"again") from None
    return doc


def _settings(zm, nfe, solver, num_train, num_heldout, seed, heldout_seed, rtol, atol, knots,
              storage_dtype, adaptive_knots, iters, finetune_iters, batch_size):
    from .gt import DEFAULT_KNOTS
    from .gt_storage import storage_dtype_of
    from ..solvers.adaptive import default_knots
    defaults = trainer_for(solver).Options()
    num_train = check_int("num_train", num_train if num_train is not None else
                          DEFAULT_NUM_TRAIN, 2)
    iters = iters if iters is not None else (defaults.iters if defaults.iters is not None else 300)
    finetune_iters = (finetune_iters if finetune_iters is not None
                      else getattr(defaults, "finetune_iters", 0))
    batch_size = check_int("batch_size", batch_size if batch_size is not None else defaults.batch_size)
    num_select = _num_select(num_train, solver)     # the last ones pick the checkpoint
    trainer = trainer_for(solver)
    if num_train < num_select + trainer.min_train:
        raise InvalidArgumentError(f"num_train must be >= {num_select + trainer.min_train} for "
                                   f"{trainer.title} ({trainer.min_train} training + {num_select} "
                                   f"selection trajectories)")
    storage_dtype = str(storage_dtype_of(storage_dtype) or torch.float32).replace("torch.", "")
    # BNS trains on endpoint pairs, but its Bespoke start needs the knots
    knots_t = default_knots(check_int("knots", knots if knots is not None else DEFAULT_KNOTS, 2)).tolist()
    return {"model": zm.name, "shape": list(zm.shape), "data_range": zm.data_range, "nfe": nfe,
            "solver": solver, "num_train": num_train, "num_heldout": check_int("num_heldout", num_heldout),
            "num_select": num_select, "seed": seed, "heldout_seed": heldout_seed,
            "rtol": rtol, "atol": atol, "knots_t": knots_t, "storage_dtype": storage_dtype,
            "adaptive_knots": bool(adaptive_knots),
            "iters": check_int("iters", iters, 0), "finetune_iters": check_int("finetune_iters", finetune_iters, 0),
            "batch_size": batch_size, "val_every": defaults.val_every}


def _run(zm, device, s, plan, out, micro_batch, activation_checkpointing, autocast, stream, plots,
         progress, log, train_kwargs, overwrite=False):
    from .evaluation import evaluate
    from .gt import generate_trajectories, load_trajectories
    started = time.perf_counter()
    gt_kwargs = dict(rtol=s["rtol"], atol=s["atol"], model_name=zm.name, data_range=zm.data_range,
                     progress=progress, overwrite=overwrite)
    log(f"[1/4] GT for training: {s['num_train']} trajectories (seed {s['seed']}) -> {out / 'gt_train'}")
    gt_manifest = generate_trajectories(
        zm.model, s["num_train"], zm.shape, out / "gt_train", seed=s["seed"],
        knots=torch.tensor(s["knots_t"], dtype=torch.float64), storage_dtype=s["storage_dtype"],
        adaptive_knots=s["adaptive_knots"], reference_nfe=s["nfe"],
        measure_interpolation=16, **gt_kwargs)
    log(f"[2/4] held-out GT: {s['num_heldout']} trajectories (seed {s['heldout_seed']}, endpoints "
        f"only) -> {out / 'gt_heldout'}")
    held_manifest = generate_trajectories(
        zm.model, s["num_heldout"], zm.shape, out / "gt_heldout", seed=s["heldout_seed"],
        knots=torch.tensor(_ENDPOINT_KNOTS, dtype=torch.float64), measure_interpolation=0, **gt_kwargs)
    heldout = load_trajectories(out / "gt_heldout", device=device)
    solver_path = out / solver_file_name(zm.name, s["solver"], s["nfe"])
    train_report_path = out / "train_report.json"
    gt_evals = _gt_evaluations(gt_manifest)
    if s.get("budget_evals") is not None:       # the trainer gets what the GT left
        train_kwargs = {**train_kwargs, "budget_evals": max(1, s["budget_evals"] - gt_evals)}
    done = _finished_training(solver_path, train_report_path, overwrite, log)
    if done is not None:
        log(f"[3/4] training already done: {solver_path}")
        solver, train_report = done
    else:
        log(f"[3/4] training a {s['solver']} solver at NFE {s['nfe']}")
        solver, train_report = _train(zm, device, s, out, micro_batch, activation_checkpointing,
                                      autocast, stream, progress, train_kwargs)
        solver.save(solver_path)
        atomic_write_text(train_report_path, json.dumps(train_report, indent=1, default=str) + "\n")
    stage = train_report.get("bespoke_stage")
    if stage:
        log(stage["note"] if "note" in stage else
            f"BNS started from a Bespoke {stage['base'].upper()} solver fitted first "
            f"(validation PSNR {stage['best']['psnr']:.2f} dB, {stage['wall_seconds']:.0f} s, "
            f"stopped: {stage['stop_reason']})")
    if train_report.get("stop_reason"):
        log(f"training stopped: {train_report['stop_reason']}")
    for event in describe_events(train_report):
        log(f"note: {event}")
    log(f"[4/4] evaluating on the {len(heldout)} held-out trajectories")
    label = f"{trainer_for(s['solver']).file_label.replace('_', '-')}@{s['nfe']}"   # bespoke-rk2@10
    rows = [{**evaluate(zm.model, solver, heldout), "solver": label}]
    rows += [evaluate(zm.model, spec, heldout) for spec in baselines(s["nfe"])]
    files = _report_plots(out, zm, solver, heldout, s, label, log) if plots else {}
    report = {
        "model": zm.name, "shape": list(zm.shape), "data_range": zm.data_range, "nfe": s["nfe"],
        "solver": s["solver"], "solver_file": str(solver_path), "settings": s, "plan": plan,
        "heldout": rows,
        "gt": {"train": _gt_summary(gt_manifest), "heldout": _gt_summary(held_manifest),
               "disjoint": "different noise seeds: counter-based noise, one stream per seed"},
        "training": {k: train_report.get(k) for k in ("config", "best", "nfe", "wall_seconds",
                                                      "stop_reason", "bound_stop_reason",
                                                      "bespoke_stage", "events",
                                                      "phase_stop_reasons")},
        "evaluations": _evaluations(s, gt_evals, train_report, held_manifest, rows),
        "gt_accuracy": _gt_accuracy(gt_manifest, rows[0]),
        "files": files, "seconds_this_run": time.perf_counter() - started,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    atomic_write_text(out / "report.md", _markdown(report))
    for line in _table(rows):
        log(line)
    log(f"report: {out / 'report.md'}; solver file: {solver_path}")
    return FitResult(solver, report, solver_path, out, zm)


def _finished_training(solver_path: Path, report_path: Path, overwrite: bool, log):
    """``(solver, train_report)`` of a finished training stage, read back and checked; None
    when it has not finished. A damaged file raises ``InvalidFileError`` naming it, or with
    ``overwrite`` is trained again."""
    if not (solver_path.is_file() and report_path.is_file()):
        return None
    from ..solvers.files import load_solver
    try:
        report = read_json_bounded(report_path, "training report")
        if not isinstance(report, dict) or not isinstance(report.get("best"), dict):
            raise InvalidFileError(f"{report_path}: not a training report (no 'best' entry)")
        return load_solver(solver_path), report
    except InvalidFileError as e:
        if overwrite:
            log(f"{e}; training again (--overwrite)")
            return None
        raise InvalidFileError(f"{e}; rerun with --overwrite (overwrite=True) to train again"
                               ) from None


def _safe(name):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _train(zm, device, s, out, micro_batch, activation_checkpointing, autocast, stream, progress,
           train_kwargs):
    from .gt import load_trajectories
    trainer = trainer_for(s["solver"])
    gt = load_trajectories(out / "gt_train", device=device, stream=stream and trainer.streams_gt)
    lacking = options_lacking(s["solver"])      # fit() refused the memory options it lacks
    memory = {k: v for k, v in (("micro_batch", micro_batch),
                                ("activation_checkpointing", activation_checkpointing),
                                ("autocast", autocast)) if k not in lacking}
    return trainer.keywords(zm.model, gt, val=s["num_select"], seed=s["seed"],
                            checkpoint=out / "train.ckpt", model_name=zm.name, progress=progress,
                            **trainer.fit_options(s), **memory, **train_kwargs)


def _gt_evaluations(manifest) -> int:
    """The training GT's model evaluations (forward rows): its solves and knots, and its
    accuracy check."""
    return int(manifest["nfe"]["total"]) + int((manifest.get("interpolation") or {})
                                                .get("evaluations", 0))


def _evaluations(s, gt_evals, train_report, held_manifest, rows) -> dict:
    """The report's exact model evaluations: the fit's (training GT + the trainer's, in
    forward-equivalents, against its budget) and, apart, the measuring (held-out GT, report)."""
    trainer = train_report.get("evaluations") or {}
    spent = (trainer.get("total") or {}).get("forward_equivalent", 0)
    return {"gt": {"forward": gt_evals, "backward": 0, "forward_equivalent": gt_evals},
            "trainer": trainer,
            "fit": gt_evals + spent, "budget": s.get("budget_evals"),
            "heldout_gt": int(held_manifest["nfe"]["total"]),
            "report": int(sum(r.get("nfe") or 0 for r in rows) * held_manifest["num"])}


def _gt_accuracy(manifest, row) -> dict | None:
    """How far the GT is from a 100x tighter solve next to the fitted solver's own error (both
    endpoint RMSE): the GT should be at least 10x more accurate than the solver it trains."""
    check = manifest.get("interpolation") or {}
    if "endpoint_rmse_mean" not in check or not row.get("rmse"):
        return None
    ratio = row["rmse"] / max(check["endpoint_rmse_mean"], 1e-300)
    return {"gt_endpoint_rmse": check["endpoint_rmse_mean"], "solver_rmse": row["rmse"],
            "ratio": ratio, "ok": ratio >= 10}


def _gt_summary(m):
    return {"num": m["num"], "seed": m["seed"], "knots": len(m["knots_t"]), "nfe": m["nfe"],
            "storage": m.get("storage"), "interpolation": m.get("interpolation"),
            "wall_seconds_last_run": m.get("wall_seconds_last_run")}


def _report_plots(out, zm, solver, heldout, s, label, log):
    from ..solvers.fixed import solve
    try:
        _plt()
    except ImportError:
        log("matplotlib is not installed: skipping the plots (pip install bespoke_fast[viz])")
        return {}
    files = {}
    with torch.no_grad():
        x0 = heldout.x0[:4 if heldout.x0.dim() == 4 else 256]   # vectors: a scatter of many
        samples = {label: solver.sample(zm.model, x0)}
        if s["nfe"] % 2 == 0:
            samples[f"midpoint@{s['nfe']}"] = solve(zm.model, x0, "midpoint", n_steps=s["nfe"] // 2)
        else:
            samples[f"euler@{s['nfe']}"] = solve(zm.model, x0, "euler", n_steps=s["nfe"])
    files["error_maps"] = str(plot_error_maps(out / "error_maps.png", heldout.x1[:x0.shape[0]],
                                              samples, zm.data_range, n=x0.shape[0],
                                              model_name=zm.name))
    if isinstance(solver, BespokeSolver):
        files["transform"] = str(plot_transform(out / "transform.png", solver))
    return files


def _ci(row, key):
    """``" [lo, hi]"`` for a row's 95% bootstrap interval of ``key``, or ``""``."""
    ci = row.get(f"{key}_ci")
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _table(rows):
    lines = [f"{'solver':<18} {'NFE':>4} {'RMSE':>10} {'PSNR (dB) [95% CI]':>26} "
             f"{'PSNR set [95% CI]':>26}"]
    lines += [f"{r['solver']:<18} {r['nfe']:>4} {r['rmse']:>10.2e} "
              f"{r['psnr']:>8.2f}{_ci(r, 'psnr'):>18} {r['psnr_set']:>8.2f}{_ci(r, 'psnr_set'):>18}"
              for r in rows]
    return lines


def _markdown(r):
    s, p = r["settings"], r["plan"]
    g = r["gt"]["train"]
    lines = [f"# Fit report: {r['solver']} solver, NFE {r['nfe']}, {r['model']}", "",
             f"Held-out evaluation: {r['gt']['heldout']['num']} trajectories (seed "
             f"{r['gt']['heldout']['seed']}); training GT: {g['num']} trajectories (seed {g['seed']}), "
             f"the last {s['num_select']} used only to select the checkpoint.", "",
             "| solver | NFE | RMSE | PSNR (dB) [95% CI] | PSNR set (dB) [95% CI] |",
             "|---|---|---|---|---|"]
    lines += [f"| {x['solver']} | {x['nfe']} | {x['rmse']:.3e} | {x['psnr']:.2f}{_ci(x, 'psnr')} "
              f"| {x['psnr_set']:.2f}{_ci(x, 'psnr_set')} |" for x in r["heldout"]]
    stop = r["training"].get("stop_reason")
    if stop:
        lines += ["", f"Training stopped: {stop} (bound phase: "
                  f"{r['training'].get('bound_stop_reason') or 'n/a'})."]
    storage = g.get("storage") or {}
    bpt = storage.get("bytes_per_trajectory", {})
    lines += ["", "PSNR: mean of per-sample PSNRs against the GT endpoint (data range "
              f"{r['data_range']}); PSNR set: of the mean MSE.", "",
              f"GT: {g['knots']} knots, stored in {storage.get('knot_dtype', 'float32')}"
              + (f", {bpt['stored']:.0f} bytes per trajectory (float32, every knot: "
                 f"{bpt['float32_all_knots']})" if bpt else "")
              + (f", extra interpolation error {storage['extra_rmse_mean']:.2e} RMSE (limit "
                 f"{storage['error_limit']:.2e})" if "extra_rmse_mean" in storage else "") + ".",
              f"Plan: {p['model_evaluations']['total']:,} model evaluations, ETA "
              f"{_duration(p['eta_seconds'])}; training took {r['training']['wall_seconds'] or 0:.0f} s.", ""]
    for name, f in r["files"].items():
        lines.append(f"![{name}]({Path(f).name})")
    return "\n".join(lines) + "\n"
