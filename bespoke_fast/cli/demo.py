"""The ``demo`` sub-command: its options and its run function."""
from __future__ import annotations

import json
from pathlib import Path

from ..demo import DEFAULT_BUDGET_SECONDS, run_demo
from ..fitting.job import DEFAULT_NUM_TRAIN
from .common import add_command, add_nfe, default_kind, resolve_device
from .train import job_flag_values, trainer_flags

# the trainer options the demo passes on (run_demo's keywords): the same flags as train's
DEMO_FLAGS = ("iters", "finetune_iters")


def run(args):
    summary = run_demo(args.model, nfe=args.nfe, out=args.out, num_gt=args.num_gt,
                       num_val=args.num_val, **job_flag_values(args, default_kind()),
                       budget_seconds=args.budget_seconds or None,
                       device=resolve_device(args.device), progress=not args.quiet,
                       log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(summary, indent=1))



def register(sub) -> None:
    """Add the ``demo`` parser to the sub-parsers ``sub``."""
    # the bundled models are tiny: one thread avoids OpenMP overhead and contention
    # (measured on 2 cores: demo 91 s with 1 thread vs 271 s with 2, same result)
    p = add_command(sub, "demo", run, threads=1,
                 help="the whole pipeline on a bundled model (GT, fit, eval, plots)",
                 description="Generate GT for a bundled model, fit a Bespoke RK2 solver, "
                             "compare it on held-out noises with euler/midpoint/rk4 at the same "
                             "NFE and midpoint at twice the NFE, save the solver file, a report, "
                             "error maps against GT, the learned transform and a PSNR-vs-NFE plot.")
    add_nfe(p)
    p.add_argument("--num-gt", type=int, default=DEFAULT_NUM_TRAIN,
                   help="training GT trajectories (default %(default)s, the fit's)")
    p.add_argument("--num-val", type=int, default=1024, help="held-out GT trajectories (separate seed; evaluation only) (default %(default)s)")
    trainer_flags(p, only=DEMO_FLAGS)
    p.add_argument("--out", type=Path, default=Path("bespoke_demo"), help="output directory (default %(default)s)")
    p.add_argument("--budget-seconds", type=float, default=DEFAULT_BUDGET_SECONDS,
                   help="planned seconds for the whole demo (from the fit's timed plan): a "
                        "slower model gets fewer trajectories, and the demo says so; 0: no limit "
                        "(default %(default)s)")

