"""The ``sample`` sub-command: its options and its run function."""
from __future__ import annotations

from pathlib import Path

import torch

from .._checks import MissingDependencyError
from ..ops import backend as ops_backend
from ..sampling import sample_to_dir
from ..solvers.files import load_solver
from .common import (add_allow_mismatch, add_command, add_model_dtype, add_overwrite, CLIError,
                     emit, load_model, resolve_device)


def run(args):
    if args.backend == "triton":
        if not ops_backend.triton_available():
            raise MissingDependencyError("--backend triton needs the 'triton' package: pip install "
                                         "\"bespoke_fast[triton]\" (or use --backend reference)")
        if not str(resolve_device(args.device)).startswith("cuda"):
            raise CLIError(f"--backend triton needs a CUDA device, and --device {args.device} is "
                           f"the CPU here; use --backend reference (or auto) on CPU")
    solver = load_solver(args.solver)
    zm = load_model(args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.model_dtype]
    result = sample_to_dir(zm.model, solver, zm.shape, args.num, args.out, batch_size=args.batch_size,
                           seed=args.seed, model_dtype=dtype, backend=args.backend,
                           device=resolve_device(args.device), progress=not args.quiet, model_name=zm.name,
                           overwrite=args.overwrite,
                           allow_model_mismatch=args.allow_model_mismatch)
    emit(args, result, [f"wrote {args.num} samples of {zm.name} (NFE {solver.nfe}) to {args.out}"])



def register(sub) -> None:
    """Add the ``sample`` parser to the sub-parsers ``sub``."""
    p = add_command(sub, "sample", run,
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
    add_model_dtype(p)
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto",
                   help="sampler backend: triton kernels (CUDA), the pure-torch reference, or "
                        "auto (triton on CUDA when installed) (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_overwrite(p, "samples")
    add_allow_mismatch(p)
