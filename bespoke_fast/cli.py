"""The ``bespoke-fast`` command line: ``demo``, ``fit``, ``gt``, ``train``, ``eval``, ``sample``,
``doctor``.

Each sub-command has ``--help``; long work shows progress bars on stderr; ``--json`` prints a
machine-readable summary on stdout. Errors that are the user's to fix (the library's
``BespokeFastError`` types, bad options, and permission / disk-full / missing-file / is-a-directory
``OSError``) are one line on stderr and exit code 2; ``--debug`` shows their traceback instead.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from ._checks import BespokeFastError, MissingDependencyError

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _device(name):
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device (cpu, cuda, cuda:1 or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                           f"device(s)")
    return name


def _model(args):
    """The ``--model`` (a bundled name, a factory or a diffusers pipeline); a factory's model
    gets one probe call at batch 2 before any work (see ``_checks.probe_model``)."""
    from ._checks import probe_model
    from .zoo import resolve_model
    if args.model.startswith("diffusers:"):
        try:
            zm = _diffusers_model(args)
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise CLIError(str(e)) from e
        args.model_object = zm.model
        return zm
    device = _device(args.device)
    zm = resolve_model(args.model, device=device)
    args.model_object = zm.model
    if ":" in args.model:
        probe_model(zm.model, zm.shape, device, zm.extras)
    return zm


_DIFFUSERS_COMMANDS = ("gt", "train", "eval")     # the commands that take --model diffusers:DIR


def _diffusers_model(args):
    """``--model diffusers:DIR``: a local pipeline folder, conditioned by --prompts / --classes
    (or by the table stored in the --gt directory)."""
    from .integrations.diffusers import cli_model
    if args.command not in _DIFFUSERS_COMMANDS:
        raise CLIError(f"{args.command} does not take diffusers pipelines; use "
                       f"bespoke_fast.integrations.diffusers.fast_pipeline from Python")
    opt = {k: getattr(args, k, None) for k in ("prompts", "classes", "guidance_scale", "height",
                                               "width", "gt")}
    return cli_model(args.model[len("diffusers:"):], device=_device(args.device), **opt)


def _gt(args, zm):
    from .fitting.gt import load_trajectories
    gt = load_trajectories(args.gt, device=_device(args.device))
    if tuple(gt.shape) != tuple(zm.shape):
        raise CLIError(f"{args.gt}: GT samples have shape {tuple(gt.shape)} but model {args.model!r} "
                       f"makes shape {tuple(zm.shape)}: generate GT for this model")
    name = gt.meta.get("model", {}).get("name")
    if name and name != zm.name and not getattr(args, "allow_model_mismatch", False):
        raise CLIError(f"{args.gt}: GT was generated with model {name!r}, not {zm.name!r}")
    return gt


def _emit(args, summary, human_lines):
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for line in human_lines:
            print(line)


# ----------------------------------------------------------------------------- sub-commands
def cmd_gt(args):
    from .fitting.gt import generate_trajectories
    zm = _model(args)
    extra = ()
    if getattr(zm, "conditioning", None):
        from .integrations.diffusers import CONDITIONING_FILE
        extra = (CONDITIONING_FILE,)
    manifest = generate_trajectories(zm.model, args.num, zm.shape, args.out, seed=args.seed,
                                     rtol=args.rtol, atol=args.atol, knots=args.knots,
                                     batch_size=args.batch_size, model_name=zm.name,
                                     data_range=zm.data_range, progress=not args.quiet,
                                     extras_fn=getattr(zm, "condition", None),
                                     overwrite=args.overwrite, extra_files=extra)
    if getattr(zm, "conditioning", None):  # the table the stored prompt indices refer to
        from .integrations.diffusers import CONDITIONING_FILE, save_conditioning
        save_conditioning(Path(args.out) / CONDITIONING_FILE, zm.conditioning, zm.guidance_scale)
    interp = manifest.get("interpolation", {})
    lines = [f"wrote {manifest['num']} GT trajectories of {zm.name} to {args.out} "
             f"({manifest['nfe']['per_trajectory']:.0f} model evaluations per trajectory)"]
    if interp:
        lines.append(f"Hermite interpolation RMSE vs direct solves: mean {interp['rmse_mean']:.2e}, "
                     f"max {interp['rmse_max']:.2e}")
    _emit(args, {"out": str(args.out), "num": manifest["num"], "nfe": manifest["nfe"],
                 "interpolation": interp, "wall_seconds": manifest["wall_seconds_last_run"]}, lines)


def _nfe_to_steps(solver_kind, header, nfe):
    """Steps of a ``solver_kind`` solver with ``header`` (its base or init) at ``nfe``, through
    the solver interface (:meth:`Solver.steps_for_nfe`)."""
    from .solvers.registry import solver_class
    try:
        return solver_class(solver_kind).steps_for_nfe(header, nfe)
    except ValueError as e:
        raise CLIError(f"--{e}") from None


def _trained_kinds() -> tuple:
    """The solver kinds ``--solver`` takes: those with a trainer (``fitting.TRAINERS``)."""
    from .fitting.trainers import TRAINERS
    return tuple(TRAINERS)


def _default_kind() -> str:
    from .fitting.trainers import DEFAULT_KIND
    return DEFAULT_KIND


# trainer options the train command sets from flags of its own (--nfe, --seed)
_OWN_FLAGS = ("n_steps", "seed")
_DTYPES = ("float64", "float32", "bfloat16", "float16")


def _flag_choices() -> dict:
    from .fitting.bespoke import GT_MODES
    from .fitting.bns import OPTIMIZERS
    from .fitting.stopping import SELECT
    return {"base": ("rk1", "rk2"), "gt_mode": GT_MODES, "optimizer": OPTIMIZERS, "select": SELECT}


def _trainer_flags(p) -> None:
    """One ``--flag`` per option of the trainers (``fitting.TRAINERS``), made from their
    ``Options`` dataclasses: the name (``warmup_pairs`` -> ``--warmup-pairs``), the type and
    choices from the field, the help from its ``metadata["help"]`` (per kind where the kinds'
    differ, and which kinds have it). Unset flags keep the trainer's default; 0 gives None to
    an option that takes None."""
    import dataclasses
    from .fitting.trainers import TRAINERS
    fields = {}
    for kind, trainer in TRAINERS.items():
        for f in dataclasses.fields(trainer.Options):
            if f.name not in _OWN_FLAGS:
                fields.setdefault(f.name, []).append((kind, f))
    choices = _flag_choices()
    for name, per_kind in fields.items():
        f = per_kind[0][1]
        helps = {g.metadata["help"] for _, g in per_kind}
        text = (helps.pop() if len(helps) == 1 else
                "; ".join(f"{k}: {g.metadata['help']}" for k, g in per_kind))
        if len(per_kind) < len(TRAINERS):
            text = f"{' / '.join(k for k, _ in per_kind)} only: {text}"
        if "None" in str(f.type) and not str(f.type).startswith(("str", "torch")):
            text += " (0 here: None)"
        kw = {}
        if name in choices:
            kw["choices"] = choices[name]
        elif name == "autocast":
            kw["choices"] = _DTYPES[2:]
        elif "dtype" in str(f.type):
            kw["choices"] = _DTYPES
        elif str(f.type).startswith("bool"):
            kw = {"action": "store_const", "const": True}
        elif str(f.type).startswith("int"):
            kw["type"] = int
        elif str(f.type).startswith("float"):
            kw["type"] = float
        if name == "init":
            kw["metavar"] = "NAME|FILE"
            text += " (here: a name, or a solver file to start from)"
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                       help=text.replace("%", "%%"), **kw)


def _train_options(args) -> dict:
    """The trainer's options from the command line: each option of the kind's options dataclass
    (``fitting.trainer_for``), unset ones at its default; an option the kind lacks is refused."""
    import dataclasses
    import torch
    from .fitting import options_lacking, trainer_for
    from .solvers.registry import solver_class
    trainer = trainer_for(args.solver)
    # n_steps, seed and base: cmd_train passes them itself
    fields = [f for f in dataclasses.fields(trainer.Options) if f.name not in (*_OWN_FLAGS, "base")]
    header_key = solver_class(args.solver).header_key
    if args.base is not None and header_key != "base":
        raise CLIError(f"--base is for --solver bespoke; a {args.solver} solver has no base "
                       f"(its {header_key} is the trainer's default)")
    for name, why in options_lacking(args.solver).items():
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag} is not an option of --solver {args.solver} ({why})")
    defaults, opts = trainer.Options(), {}
    for f in fields:
        value = getattr(args, f.name, None)
        if value is None:
            value = getattr(defaults, f.name)
        elif "dtype" in str(f.type):
            value = getattr(torch, value)
        elif value == 0 and "None" in str(f.type) and not isinstance(value, bool):
            value = None                    # 0 on the command line: None (no budget, ...)
        opts[f.name] = value
    return opts


def cmd_train(args):
    from .fitting import trainer_for
    from .solvers.registry import solver_class
    opts = _train_options(args)
    # the header the trainer will use: bespoke's --base, BNS's init (its trainer's default)
    header = {"base": args.base or "rk2"} if solver_class(args.solver).header_key == "base" else {}
    names = trainer_for(args.solver).start_names     # else --init is a solver file
    if opts.get("init") not in (None, *names):   # a solver file to start from
        from .solvers.files import load_solver
        if not Path(opts["init"]).is_file():
            raise CLIError(f"--init {opts['init']}: not {', '.join(names)} or a solver file")
        opts["init"] = load_solver(opts["init"])
    # BNS: only the midpoint start needs an even NFE
    n = _nfe_to_steps(args.solver, header.get("base", "midpoint" if opts.get("init") == "midpoint"
                                                else "euler"), args.nfe)
    args.out = _solver_out(args.out)                 # before the fit, not after it
    zm = _model(args)
    gt = _gt(args, zm)
    from .fitting.stopping import describe_events, describe_stop
    train, _ = trainer_for(args.solver)
    solver, report = train(zm.model, gt, n_steps=n, seed=args.seed, checkpoint=args.checkpoint,
                           progress=not args.quiet, model_name=zm.name, **header, **opts)
    if report.get("split_note") and not args.quiet:
        print(f"bespoke-fast train: {report['split_note']}", file=sys.stderr)
    solver.save(args.out)
    best = report["best"]
    _emit(args, {"out": str(args.out), "nfe": solver.nfe, "best": best, "nfe_spent": report["nfe"],
                 "evaluations": report["evaluations"], "events": report["events"],
                 "wall_seconds": report["wall_seconds"], "stop_reason": report["stop_reason"],
                 "iterations": report["iterations"], "start": report.get("start")},
          [f"saved {args.solver} solver (NFE {solver.nfe}) to {args.out}",
           f"validation: RMSE {best['rmse']:.3e}, PSNR {best['psnr']:.2f} dB "
           f"(set {best['psnr_set']:.2f} dB) "
           f"(iteration {best['iteration']}, {report['wall_seconds']:.1f} s)",
           describe_stop(report), _evaluations_line(report)] + _start_line(report)
          + [f"note: {line}" for line in describe_events(report)])


def _solver_out(raw) -> Path:
    """``train --out``: a file name (not a folder, not ``dir/``) that can be written, and that
    holds nothing but a solver file already (a file of the user's is never replaced)."""
    from .io import check_writable
    text = str(raw)
    path = Path(text)
    if text.endswith(("/", "\\")) or path.is_dir():
        raise CLIError(f"--out {text} is a directory (a folder name); give the solver file's "
                       f"name, e.g. {path / 'solver.json'}")
    if path.is_symlink() and not path.exists():
        raise CLIError(f"--out {text}: a symbolic link to {path.readlink()}, which does not exist")
    if path.exists():
        from .io import read_json_bounded
        from .solvers.base import FORMAT
        try:
            ours = read_json_bounded(path, "solver file").get("format") == FORMAT
        except (BespokeFastError, AttributeError):
            ours = False
        if not ours:
            raise CLIError(f"--out {text}: the file exists and is not a bespoke_fast solver file; "
                           f"refusing to replace it: move it, or pick another --out")
    check_writable(path, "solver file")
    return path


def _evaluations_line(report) -> str:
    """The fit's exact model evaluations, one line."""
    ev = report["evaluations"]
    parts = ", ".join(f"{name} {row['forward_equivalent']:,}" for name, row in ev.items()
                      if name != "total")
    budget = report["config"].get("budget_evals")
    return (f"model evaluations: {ev['total']['forward_equivalent']:,} forward-equivalents "
            f"({ev['total']['forward']:,} forward + {ev['total']['backward']:,} backward rows"
            + (f"; budget {budget:,}" if budget else "") + f"): {parts}")


def _start_line(report) -> list:
    """The screened start of a bespoke fit (``init="auto"``), as one line; none otherwise."""
    start = report.get("start") or (report.get("bespoke_stage") or {}).get("start")
    if not start:
        return []
    trial = {c["start"]: c["psnr"] for c in start["candidates"]}
    return [f"start: {start['chosen']} grid (its trial {trial[start['chosen']]:.2f} dB; "
            f"{len(trial)} starts screened in {start['wall_seconds']:.1f} s)"]


def cmd_eval(args):
    from .fitting.evaluation import evaluate
    zm = _model(args)
    gt = _gt(args, zm)
    from .fitting.evaluation import trained_on
    from .solvers.files import load_solver
    from .metrics import format_ci
    results = []
    for spec in args.solvers:
        if Path(spec).is_file() and trained_on(load_solver(spec), gt):
            print(f"bespoke-fast eval: warning: {spec} was trained on GT with noise seed "
                  f"{gt.meta.get('seed')}, the seed of {args.gt}: these are its training noises, "
                  f"not held-out ones (make test GT with another --seed)", file=sys.stderr)
        results.append(evaluate(zm.model, spec, gt, model_name=zm.name,
                                allow_model_mismatch=args.allow_model_mismatch))
    bad = [r for r in results if r.get("nonfinite")]
    if bad and not args.allow_nonfinite:
        r = bad[0]
        raise CLIError(f"{r['solver']} produced NaN/Inf for {r['nonfinite']} of {len(gt)} samples "
                       f"(the first: GT trajectory {r['first_nonfinite']}), so its metrics are NaN; "
                       f"the model or the solver is not finite at some time it evaluates; pass "
                       f"--allow-nonfinite to print the rows marked")
    lines = [f"{'solver':<28} {'NFE':>4} {'RMSE':>10} {'PSNR (dB) [95% CI]':>22} "
             f"{'PSNR set [95% CI]':>22} {'mode flips':>10}"]
    lines += [f"{r['solver']:<28} {r['nfe']:>4} {r['rmse']:>10.3e} {format_ci(r, 'psnr'):>22} "
              f"{format_ci(r, 'psnr_set'):>22} "
              + (f"{r['mode_flips']:>10.4f}" if "mode_flips" in r else f"{'-':>10}")
              + (f"  NaN/Inf in {r['nonfinite']} samples" if r.get("nonfinite") else "")
              for r in results]
    notes = ["intervals: bootstrap over the trajectories"
             + ("" if len(gt) >= 1024 else "; fewer than 1,024: wide")]
    if any("mode_flips" not in r for r in results):
        notes.append("mode flips: '-' where the model has no known modes")
    lines.append(f"({len(gt)} GT trajectories, data range {gt.data_range}; {'; '.join(notes)})")
    _emit(args, {"results": results}, lines)


def cmd_sample(args):
    import torch
    from .solvers.files import load_solver
    from .sampling import sample_to_dir
    if args.backend == "triton":
        from .ops.backend import triton_available
        if not triton_available():
            raise MissingDependencyError("--backend triton needs the 'triton' package: pip install "
                                         "\"bespoke_fast[triton]\" (or use --backend reference)")
        if not str(_device(args.device)).startswith("cuda"):
            raise CLIError(f"--backend triton needs a CUDA device, and --device {args.device} is "
                           f"the CPU here; use --backend reference (or auto) on CPU")
    solver = load_solver(args.solver)
    zm = _model(args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.model_dtype]
    result = sample_to_dir(zm.model, solver, zm.shape, args.num, args.out, batch_size=args.batch_size,
                           seed=args.seed, model_dtype=dtype, backend=args.backend,
                           device=_device(args.device), progress=not args.quiet, model_name=zm.name,
                           overwrite=args.overwrite,
                           allow_model_mismatch=args.allow_model_mismatch)
    _emit(args, result, [f"wrote {args.num} samples of {zm.name} (NFE {solver.nfe}) to {args.out}"])


def cmd_doctor(args):
    """Exit 0 when the sampling loop can be captured in one CUDA graph, 1 with the problems."""
    import torch
    from .capture import check_capturable
    from .solvers.files import load_solver
    from .solvers.bespoke import BespokeSolver
    zm = _model(args)
    try:
        solver = load_solver(args.solver) if args.solver else BespokeSolver("rk2", 5)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.model_dtype]
    report = check_capturable(zm.model, solver, zm.shape, batch_size=args.batch_size,
                              model_dtype=dtype, **zm.extras)
    _emit(args, {"model": zm.name, "ok": report.ok, "problems": report.problems,
                 "config": report.config}, [f"{zm.name}: {report}"])
    return 0 if report.ok else 1


def cmd_demo(args):
    from .demo import run_demo
    summary = run_demo(args.model, nfe=args.nfe, out=args.out, num_gt=args.num_gt,
                       num_val=args.num_val, iters=args.iters,
                       finetune_iters=args.finetune_iters,
                       budget_seconds=args.budget_seconds or None,
                       device=_device(args.device), progress=not args.quiet,
                       log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(summary, indent=1))


def _size(text):
    """'20GB', '500MB', '1.5e9' -> bytes."""
    units = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "KB": 1e3, "B": 1}
    t = str(text).strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                return float(t[:-len(unit)]) * scale
            except ValueError:
                break
    try:
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20GB, 500MB)") from None


def cmd_fit(args):
    import torch
    from .fitting.job import fit
    if args.model.startswith("diffusers:"):
        raise CLIError("fit does not take diffusers pipelines yet; use 'gt', 'train' and 'eval' "
                       "with --model diffusers:DIR")
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    try:
        result = fit(args.model, nfe=args.nfe, solver=args.solver, out=args.out,
                     num_train=args.num_train, num_heldout=args.num_heldout, seed=args.seed,
                     heldout_seed=args.heldout_seed, storage_dtype=args.storage_dtype,
                     adaptive_knots=args.adaptive_knots, max_disk=args.max_disk,
                     budget_seconds=args.budget_seconds, device=_device(args.device),
                     **({} if args.budget_evals is None else
                        {"budget_evals": args.budget_evals or None}),
                     iters=args.iters, finetune_iters=args.finetune_iters,
                     batch_size=args.batch_size, micro_batch=args.micro_batch,
                     activation_checkpointing=args.checkpoint_activations, autocast=autocast,
                     progress=not args.quiet, log=log, plan_only=args.plan,
                     overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise CLIError(str(e)) from e
    if args.json:
        print(json.dumps(result if args.plan else result.report, indent=1, default=str))


# ----------------------------------------------------------------------------- parser
def _command(sub, name, func, help, description, gt=False, epilog=None, **defaults):
    """A sub-command's parser with the options every command shares (``--model``, ``--device``,
    ``--json``, ``--quiet``, ``--threads``, ``--debug``; ``--gt`` with ``gt=True``), running
    ``func``; ``defaults`` override option defaults (e.g. the demo's ``threads=1``)."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog)
    pipelines = ", or diffusers:LOCAL_PIPELINE_DIR" if name in _DIFFUSERS_COMMANDS else ""
    p.add_argument("--model", default="digits-fmot",
                   help="bundled model name (gmm-64, digits-exact, digits-fmot, digits-vcs, "
                        "digits-eps), package.module:factory or path/to/file.py:factory "
                        "(imported from the current folder first; factory() returns (model, "
                        f"shape[, data_range]), a dict with those keys or a ZooModel){pipelines} "
                        "(default: %(default)s)")
    if gt:
        p.add_argument("--gt", required=True, type=Path, help="GT directory made by 'bespoke-fast gt'")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; demo: 1)")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line")
    p.set_defaults(func=func, **defaults)  # after the options: it overrides their defaults
    return p


def _overwrite(p, what):
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace the {what} in --out if it was made with other arguments "
                        f"(default: refuse; the same arguments resume)")


def _allow_mismatch(p):
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="use a solver file (or GT set) made for another model than --model "
                        "(default: refuse)")


def _diffusers_options(p):
    g = p.add_argument_group("diffusers pipelines (--model diffusers:LOCAL_PIPELINE_DIR, offline)")
    g.add_argument("--prompts", type=Path, default=None,
                   help="prompt embeddings (.safetensors: prompt_embeds, pooled_prompt_embeds and "
                        "negative_*) or a text file, one prompt per line; trajectory i uses prompt "
                        "i mod P (default for train/eval: the table stored in --gt)")
    g.add_argument("--classes", default=None,
                   help="class labels for class-conditional UNets: N (0..N-1) or a list 3,7,9")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="the pipeline's guidance_scale (CFG; Flux: embedded guidance); default: "
                        "the pipeline's own default, or the value stored in --gt")
    g.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bespoke-fast",
        description="Fit Bespoke solvers to flow models and sample fast. "
                    "Data flow: model -> gt -> train -> solver file -> eval / sample.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"bespoke_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # the bundled models are tiny: one thread avoids OpenMP overhead and contention
    # (measured on 2 cores: demo 91 s with 1 thread vs 271 s with 2, same result)
    p = _command(sub, "demo", cmd_demo, threads=1,
                 help="the whole pipeline on a bundled model (GT, fit, eval, plots)",
                 description="Generate GT for a bundled model, fit a Bespoke RK2 solver, "
                             "compare it on held-out noises with euler/midpoint/rk4 at the same "
                             "NFE and midpoint at twice the NFE, save the solver file, a report, "
                             "error maps against GT, the learned transform and a PSNR-vs-NFE plot.")
    p.add_argument("--nfe", type=int, default=10, help="network evaluations (even; default %(default)s)")
    from .fitting.job import DEFAULT_NUM_TRAIN
    p.add_argument("--num-gt", type=int, default=DEFAULT_NUM_TRAIN,
                   help="training GT trajectories (default %(default)s, the fit's)")
    p.add_argument("--num-val", type=int, default=1024, help="held-out GT trajectories (separate seed; evaluation only) (default %(default)s)")
    p.add_argument("--iters", type=int, default=None, help="bound-phase iterations (default: the trainer's)")
    p.add_argument("--finetune-iters", type=int, default=None,
                   help="fine-tune iterations (default: the trainer's)")
    p.add_argument("--out", type=Path, default=Path("bespoke_demo"), help="output directory")
    from .demo import DEFAULT_BUDGET_SECONDS
    p.add_argument("--budget-seconds", type=float, default=DEFAULT_BUDGET_SECONDS,
                   help="planned seconds for the whole demo (from the fit's timed plan): a "
                        "slower model gets fewer trajectories, and the demo says so; 0: no limit "
                        "(default %(default)s)")

    from .zoo import FACTORY_CONTRACT
    p = _command(sub, "fit", cmd_fit,
                 help="the whole job: GT, held-out GT, training, held-out report",
                 description="Fit a solver to a model in one command: GT for training and a "
                             "disjoint held-out set (separate seeds), training, evaluation on "
                             "the held-out set only, report (JSON, Markdown, plots) and the "
                             "solver file in --out. Prints the plan (trajectories, disk, model "
                             "evaluations, ETA from a timed probe) first. Rerunning the same "
                             "command resumes at the stage it stopped.",
                 epilog=FACTORY_CONTRACT)
    p.add_argument("--nfe", type=int, default=10, help="network evaluations (default %(default)s)")
    p.add_argument("--solver", choices=_trained_kinds(), default=_default_kind(),
                   help="bespoke (RK2 scale-time) or bns (non-stationary) (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--num-train", type=int, default=None,
                   help="training GT trajectories (default 160; the last fifth select the "
                        "checkpoint)")
    p.add_argument("--num-heldout", type=int, default=1024, help="held-out GT trajectories (separate seed; evaluation only) (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training noise seed (default %(default)s)")
    p.add_argument("--heldout-seed", type=int, default=None, help="held-out noise seed (default seed + 1)")
    p.add_argument("--storage-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of the stored GT knots; float16 about halves the disk, refused if its "
                        "measured error exceeds 0.1x the RK2 local error at this NFE")
    p.add_argument("--adaptive-knots", action="store_true",
                   help="keep per trajectory only the knots its interpolation needs (same budget)")
    p.add_argument("--max-disk", type=_size, default=None, help="e.g. 20GB: scale down or refuse beyond it")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="scale down (fewer trajectories, then iterations) to fit the ETA, or refuse")
    p.add_argument("--budget-evals", type=int, default=None,
                   help="model evaluations the fit may spend (forward-equivalents: a backward "
                        "counts 2), training GT and trainer together; 0: the trainer's own "
                        "(default 250,000: the same fit on any device)")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the trainer's)")
    p.add_argument("--finetune-iters", type=int, default=None, help="fine-tune iterations (bespoke)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: the trainer's)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="gradient accumulation over chunks of this many trajectories (bespoke)")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each model call's activations in the backward (less memory)")
    p.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none",
                   help="run the model under autocast while training (solver maths stays float32)")
    p.add_argument("--plan", action="store_true", help="print the plan and stop")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a fit made with other settings in --out (default: refuse)")

    p = _command(sub, "gt", cmd_gt,
                 help="generate ground-truth trajectories (adaptive RK45)",
                 description="Integrate N noises with adaptive Dormand-Prince and store the "
                             "trajectories (dense knots) as a sharded GT set. Rerunning the "
                             "same command resumes an interrupted run.")
    p.add_argument("--num", type=int, default=1280, help="trajectories (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--knots", type=int, default=None, help="knots per trajectory (default: gt.DEFAULT_KNOTS)")
    p.add_argument("--batch-size", type=int, default=256, help="trajectories per shard")
    _diffusers_options(p)
    _overwrite(p, "GT set")

    p = _command(sub, "train", cmd_train,
                 help="fit a Bespoke (or BNS) solver on a GT set",
                 description="Fit a solver to the model on its GT trajectories and save the "
                             "solver file (JSON).", gt=True)
    p.add_argument("--solver", choices=_trained_kinds(), default=_default_kind(),
                   help="solver family (default %(default)s)")
    p.add_argument("--nfe", type=int, default=10, help="network evaluations (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order and of the "
                                                       "start's own fit (default %(default)s)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint file: resume from it if present")
    _trainer_flags(p)
    p.add_argument("--out", required=True,
                   help="solver file to write (.json); an existing file there is replaced only "
                        "if it is a solver file")
    _diffusers_options(p)

    p = _command(sub, "eval", cmd_eval,
                 help="RMSE / PSNR of solvers against a GT set",
                 description="Evaluate solver files and baselines (name@NFE: euler, midpoint, "
                             "heun, rk4) against the GT endpoints.", gt=True)
    p.add_argument("solvers", nargs="+", metavar="SOLVER", help="solver file or method@NFE")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="print rows with NaN/Inf samples, marked (default: such a row is an "
                        "error, exit code 2)")
    _diffusers_options(p)
    _allow_mismatch(p)

    p = _command(sub, "sample", cmd_sample,
                 help="draw samples with a solver file into .npy shards",
                 description="Sample with FastSampler (triton + one CUDA graph on GPU, the "
                             "pure-torch reference on CPU) into DIR/samples_*.npy shards and a "
                             "manifest.json. Sample i's noise depends only on (seed, i), so "
                             "results do not depend on the batch size, up to the model's own "
                             "rounding (a batched matmul may move a value by an ulp); reruns "
                             "resume, also with another --batch-size.")
    p.add_argument("--solver", required=True, type=Path, help="solver file (.json)")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--batch-size", type=int, default=256,
                   help="samples per sampler call (default %(default)s); a rerun with another "
                        "one resumes")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    p.add_argument("--model-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype the model runs in (the solver state stays fp32)")
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    _overwrite(p, "samples")
    _allow_mismatch(p)

    p = _command(sub, "doctor", cmd_doctor,
                 help="check on CPU that the sampling loop captures in a CUDA graph",
                 description="Run FastSampler's captured region for the model and solver on "
                             "CPU (meta tensors) and list every host read, device-to-host "
                             "copy or data-dependent shape that would make a CUDA-graph "
                             "capture fail, with its file:line. Exit 0 when capturable, 1 "
                             "with the problems listed. No GPU needed.")
    p.add_argument("--solver", type=Path, default=None,
                   help="solver file (.json); default a 5-step bespoke RK2 (any solver of the same "
                        "kind runs the same loop)")
    p.add_argument("--model-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype the model runs in (as for 'sample')")
    p.add_argument("--batch-size", type=int, default=2, help="batch size to check (default 2)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise CLIError(f"--threads must be >= 1, got {args.threads}")
            import torch
            torch.set_num_threads(args.threads)
        _fill_defaults(args)
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"bespoke-fast {args.command}: interrupted (rerun the same command to resume)",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- only the user's errors are mapped; bugs re-raise
        message = _user_error(e, getattr(args, "model_object", None))
        if message is None or args.debug:
            raise
        print(f"bespoke-fast {args.command}: error: {message}", file=sys.stderr)
        return 2
    return rc or 0


# OSErrors that are the user's to fix: a path that is missing, a directory, not writable, or a
# full disk. Others (EIO, ...) keep their traceback.
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                errno.ENOSPC, errno.EROFS, errno.ENAMETOOLONG, getattr(errno, "EDQUOT", -1)}


def _user_error(e: BaseException, model=None):
    """The one-line message for a user-fixable error, or None for a bug (see the docstring). An
    exception raised inside the user's ``model`` (its code is in the traceback) is the model's:
    one line too."""
    from ._checks import model_error, raised_by_model
    if isinstance(e, (CLIError, BespokeFastError)):
        text = str(e)
    elif model is not None and isinstance(e, Exception) and raised_by_model(e, model):
        text = str(model_error(e, "(in a call of the solver or the trainer)"))
    elif isinstance(e, OSError) and e.errno in _USER_ERRNOS:
        text = f"{e.strerror}: {e.filename}" if e.filename else str(e)
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            text = f"disk full ({text})"
    else:
        return None
    return " ".join(text.split()) or type(e).__name__


def _fill_defaults(args):
    """Options given as None take the defaults of what they feed (train: ``_train_options``);
    a leading ``~`` of a path option is the home folder, as in a shell."""
    for name in ("out", "gt", "solver", "checkpoint", "prompts"):
        value = getattr(args, name, None)
        if isinstance(value, Path) or (name == "out" and isinstance(value, str)):
            trailing = "/" if str(value).endswith("/") else ""
            expanded = Path(value).expanduser()
            setattr(args, name, str(expanded) + trailing if isinstance(value, str) else expanded)
    if args.command == "gt" and args.knots is None:
        from .fitting.gt import DEFAULT_KNOTS
        args.knots = DEFAULT_KNOTS


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
