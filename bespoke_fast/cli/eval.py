"""The ``eval`` sub-command: its options and its run function."""
from __future__ import annotations

import sys
from pathlib import Path

from ..fitting.evaluation import evaluate, trained_on
from ..metrics import format_ci
from ..solvers.files import load_solver
from .common import (add_allow_mismatch, add_command, add_diffusers_options, CLIError, emit,
                     load_gt, load_model)


def run(args):
    zm = load_model(args)
    gt = load_gt(args, zm)
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
    emit(args, {"results": results}, lines)



def register(sub) -> None:
    """Add the ``eval`` parser to the sub-parsers ``sub``."""
    p = add_command(sub, "eval", run,
                 help="RMSE / PSNR of solvers against a GT set",
                 description="Evaluate solver files and baselines (name@NFE: euler, midpoint, "
                             "heun, rk4) against the GT endpoints.", gt=True)
    p.add_argument("solvers", nargs="+", metavar="SOLVER", help="solver file or method@NFE")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="print rows with NaN/Inf samples, marked (default: such a row is an "
                        "error, exit code 2)")
    add_diffusers_options(p)
    add_allow_mismatch(p)
