"""The ``gt`` sub-command: its options and its run function."""
from __future__ import annotations

from pathlib import Path

from ..fitting.gt import generate_trajectories
from .common import add_command, add_diffusers_options, add_overwrite, emit, load_model


def run(args):
    zm = load_model(args)
    extra = ()
    if getattr(zm, "conditioning", None):
        # deferred: integrations.diffusers needs the optional diffusers package
        from ..integrations.diffusers import CONDITIONING_FILE, save_conditioning
        extra = (CONDITIONING_FILE,)
    manifest = generate_trajectories(zm.model, args.num, zm.shape, args.out, seed=args.seed,
                                     rtol=args.rtol, atol=args.atol, knots=args.knots,
                                     batch_size=args.batch_size, model_name=zm.name,
                                     data_range=zm.data_range, progress=not args.quiet,
                                     extras_fn=getattr(zm, "condition", None),
                                     overwrite=args.overwrite, extra_files=extra)
    if getattr(zm, "conditioning", None):  # the table the stored prompt indices refer to
        save_conditioning(Path(args.out) / CONDITIONING_FILE, zm.conditioning, zm.guidance_scale)
    interp = manifest.get("interpolation", {})
    lines = [f"wrote {manifest['num']} GT trajectories of {zm.name} to {args.out} "
             f"({manifest['nfe']['per_trajectory']:.0f} model evaluations per trajectory)"]
    if interp:
        lines.append(f"Hermite interpolation RMSE vs direct solves: mean {interp['rmse_mean']:.2e}, "
                     f"max {interp['rmse_max']:.2e}")
    emit(args, {"out": str(args.out), "num": manifest["num"], "nfe": manifest["nfe"],
                 "interpolation": interp, "wall_seconds": manifest["wall_seconds_last_run"]}, lines)



def register(sub) -> None:
    """Add the ``gt`` parser to the sub-parsers ``sub``."""
    p = add_command(sub, "gt", run,
                 help="generate ground-truth trajectories (adaptive RK45)",
                 description="Integrate N noises with adaptive Dormand-Prince and store the "
                             "trajectories (dense knots) as a sharded GT set. Rerunning the "
                             "same command resumes an interrupted run.")
    p.add_argument("--num", type=int, default=1280, help="trajectories (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="relative tolerance of the adaptive RK45 solves (default %(default)s)")
    p.add_argument("--atol", type=float, default=1e-5,
                   help="absolute tolerance of the adaptive RK45 solves (default %(default)s)")
    p.add_argument("--knots", type=int, default=None, help="knots per trajectory (default: gt.DEFAULT_KNOTS)")
    p.add_argument("--batch-size", type=int, default=256, help="trajectories per shard (default %(default)s)")
    add_diffusers_options(p)
    add_overwrite(p, "GT set")
