"""The ``fit`` sub-command: its options and its run function."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..fitting.job import fit
from ..zoo import FACTORY_CONTRACT
from .common import (add_command, add_nfe, CLIError, default_kind, parse_size, resolve_device,
                     trained_kinds)
from .train import job_flag_values, JOB_FLAGS, trainer_flags


def run(args):
    if args.model.startswith("diffusers:"):
        raise CLIError("fit does not take diffusers pipelines yet; use 'gt', 'train' and 'eval' "
                       "with --model diffusers:DIR")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    try:
        result = fit(args.model, nfe=args.nfe, solver=args.solver, out=args.out,
                     num_train=args.num_train, num_heldout=args.num_heldout, seed=args.seed,
                     heldout_seed=args.heldout_seed, storage_dtype=args.storage_dtype,
                     adaptive_knots=args.adaptive_knots, max_disk=args.max_disk,
                     budget_seconds=args.budget_seconds, device=resolve_device(args.device),
                     **({} if args.budget_evals is None else
                        {"budget_evals": args.budget_evals or None}),
                     **job_flag_values(args, args.solver), progress=not args.quiet, log=log,
                     plan_only=args.plan, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise CLIError(str(e)) from e
    if args.json:
        print(json.dumps(result if args.plan else result.report, indent=1, default=str))



def register(sub) -> None:
    """Add the ``fit`` parser to the sub-parsers ``sub``."""
    p = add_command(sub, "fit", run,
                 help="the whole job: GT, held-out GT, training, held-out report",
                 description="Fit a solver to a model in one command: GT for training and a "
                             "disjoint held-out set (separate seeds), training, evaluation on "
                             "the held-out set only, report (JSON, Markdown, plots) and the "
                             "solver file in --out. Prints the plan (trajectories, disk, model "
                             "evaluations, ETA from a timed probe) first. Rerunning the same "
                             "command resumes at the stage it stopped.",
                 epilog=FACTORY_CONTRACT)
    add_nfe(p)
    p.add_argument("--solver", choices=trained_kinds(), default=default_kind(),
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
                        "measured error exceeds 0.1x the RK2 local error at this NFE (default %(default)s)")
    p.add_argument("--adaptive-knots", action="store_true",
                   help="keep per trajectory only the knots its interpolation needs (same budget) (default: off, all knots)")
    p.add_argument("--max-disk", type=parse_size, default=None, help="disk the GT sets may take, in bytes or with a unit, e.g. 20GB: scale down or refuse beyond it (default: no limit)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="scale down (fewer trajectories, then iterations) to fit the ETA, or refuse; in seconds (default: no limit)")
    p.add_argument("--budget-evals", type=int, default=None,
                   help="model evaluations the fit may spend (forward-equivalents: a backward "
                        "counts 2), training GT and trainer together; 0: the trainer's own "
                        "(default 250,000: the same fit on any device)")
    trainer_flags(p, only=JOB_FLAGS)
    p.add_argument("--plan", action="store_true", help="print the plan and stop (default: off, run the fit)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a fit made with other settings in --out (default: refuse)")
