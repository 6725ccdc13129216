"""The ``train`` sub-command: its options and its run function."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from .._checks import BespokeFastError
from ..fitting import options_lacking, trainer_for
from ..fitting.bespoke import GT_MODES
from ..fitting.bns import OPTIMIZERS
from ..fitting.stopping import describe_events, describe_stop, SELECT
from ..fitting.trainers import TRAINERS
from ..io import check_writable, read_json_bounded
from ..solvers.base import FORMAT
from ..solvers.files import load_solver
from ..solvers.registry import solver_class
from .common import (add_command, add_diffusers_options, add_nfe, CLIError, default_kind, emit,
                     load_gt, load_model, nfe_to_steps, trained_kinds)


# trainer options the train command sets from flags of its own (--nfe, --seed)
_OWN_FLAGS = ("n_steps", "seed")



_DTYPES = ("float64", "float32", "bfloat16", "float16")



def _flag_choices() -> dict:
    return {"base": ("rk1", "rk2"), "gt_mode": GT_MODES, "optimizer": OPTIMIZERS, "select": SELECT}



# the trainer options that fit and demo pass on to the trainer: the same flags as train's
JOB_FLAGS = ("iters", "finetune_iters", "batch_size", "micro_batch", "activation_checkpointing",
             "autocast")


def trainer_flags(p, only=None) -> None:
    """One ``--flag`` per option of the trainers (``fitting.TRAINERS``; ``only``: these names),
    made from their ``Options`` dataclasses: the name (``warmup_pairs`` -> ``--warmup-pairs``),
    the type and choices from the field, the help from its ``metadata["help"]`` (per kind where
    the kinds' differ, and which kinds have it). Unset flags keep the trainer's default; 0 gives
    None to an option that takes None. ``fit`` and ``demo`` add ``JOB_FLAGS`` with it, so a
    flag means the same in every command."""
    fields = {}
    for kind, trainer in TRAINERS.items():
        for f in dataclasses.fields(trainer.Options):
            if f.name not in _OWN_FLAGS and (only is None or f.name in only):
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



def flag_value(f, value):
    """A trainer flag's value as the option ``f`` (a dataclass field) takes it: a dtype name
    becomes the dtype, 0 gives None to an option that takes None; None stays None (unset)."""
    if value is None:
        return None
    if "dtype" in str(f.type):
        return getattr(torch, value)
    if value == 0 and "None" in str(f.type) and not isinstance(value, bool):
        return None                    # 0 on the command line: None (no budget, ...)
    return value


def job_flag_values(args, kind) -> dict:
    """``fit`` / ``demo``: the ``JOB_FLAGS`` given on the command line, as the options of the
    trainer of ``kind`` take them (unset ones left out: the job's defaults apply; one the kind
    lacks is passed on for the job to refuse)."""
    fields = {f.name: f for trainer in (*TRAINERS.values(), trainer_for(kind))
              for f in dataclasses.fields(trainer.Options)}          # the kind's own last
    return {name: flag_value(fields[name], getattr(args, name)) for name in JOB_FLAGS
            if getattr(args, name, None) is not None}


def _train_options(args) -> dict:
    """The trainer's options from the command line: each option of the kind's options dataclass
    (``fitting.trainer_for``), unset ones at its default; an option the kind lacks is refused."""
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
        opts[f.name] = getattr(defaults, f.name) if value is None else flag_value(f, value)
    return opts



def run(args):
    opts = _train_options(args)
    # the header the trainer will use: bespoke's --base, BNS's init (its trainer's default)
    header = {"base": args.base or "rk2"} if solver_class(args.solver).header_key == "base" else {}
    names = trainer_for(args.solver).start_names     # else --init is a solver file
    if opts.get("init") not in (None, *names):   # a solver file to start from
        if not Path(opts["init"]).is_file():
            raise CLIError(f"--init {opts['init']}: not {', '.join(names)} or a solver file")
        opts["init"] = load_solver(opts["init"])
    # BNS: only the midpoint start needs an even NFE
    n = nfe_to_steps(args.solver, header.get("base", "midpoint" if opts.get("init") == "midpoint"
                                                else "euler"), args.nfe)
    args.out = _solver_out(args.out)                 # before the fit, not after it
    zm = load_model(args)
    gt = load_gt(args, zm)
    train, _ = trainer_for(args.solver)
    solver, report = train(zm.model, gt, n_steps=n, seed=args.seed, checkpoint=args.checkpoint,
                           progress=not args.quiet, model_name=zm.name, **header, **opts)
    if report.get("split_note") and not args.quiet:
        print(f"bespoke-fast train: {report['split_note']}", file=sys.stderr)
    solver.save(args.out)
    best = report["best"]
    emit(args, {"out": str(args.out), "nfe": solver.nfe, "best": best, "nfe_spent": report["nfe"],
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
    text = str(raw)
    path = Path(text)
    if text.endswith(("/", "\\")) or path.is_dir():
        raise CLIError(f"--out {text} is a directory (a folder name); give the solver file's "
                       f"name, e.g. {path / 'solver.json'}")
    if path.is_symlink() and not path.exists():
        raise CLIError(f"--out {text}: a symbolic link to {path.readlink()}, which does not exist")
    if path.exists():
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



def register(sub) -> None:
    """Add the ``train`` parser to the sub-parsers ``sub``."""
    p = add_command(sub, "train", run,
                 help="fit a Bespoke (or BNS) solver on a GT set",
                 description="Fit a solver to the model on its GT trajectories and save the "
                             "solver file (JSON).", gt=True)
    p.add_argument("--solver", choices=trained_kinds(), default=default_kind(),
                   help="solver family (default %(default)s)")
    add_nfe(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order and of the "
                                                       "start's own fit (default %(default)s)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint file: resume from it if present (default: none, no checkpoint)")
    trainer_flags(p)
    p.add_argument("--out", required=True,
                   help="solver file to write (.json); an existing file there is replaced only "
                        "if it is a solver file")
    add_diffusers_options(p)
