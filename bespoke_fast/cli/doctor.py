"""The ``doctor`` sub-command: its options and its run function."""
from __future__ import annotations

from pathlib import Path

import torch

from ..capture import check_capturable
from ..solvers.bespoke import BespokeSolver
from ..solvers.files import load_solver
from .common import add_command, add_model_dtype, CLIError, emit, load_model


def run(args):
    """Exit 0 when the sampling loop can be captured in one CUDA graph, 1 with the problems."""
    zm = load_model(args)
    try:
        solver = load_solver(args.solver) if args.solver else BespokeSolver("rk2", 5)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.model_dtype]
    report = check_capturable(zm.model, solver, zm.shape, batch_size=args.batch_size,
                              model_dtype=dtype, **zm.extras)
    emit(args, {"model": zm.name, "ok": report.ok, "problems": report.problems,
                 "config": report.config}, [f"{zm.name}: {report}"])
    return 0 if report.ok else 1



def register(sub) -> None:
    """Add the ``doctor`` parser to the sub-parsers ``sub``."""
    p = add_command(sub, "doctor", run,
                 help="check on CPU that the sampling loop captures in a CUDA graph",
                 description="Run FastSampler's captured region for the model and solver on "
                             "CPU (meta tensors) and list every host read, device-to-host "
                             "copy or data-dependent shape that would make a CUDA-graph "
                             "capture fail, with its file:line. Exit 0 when capturable, 1 "
                             "with the problems listed. No GPU needed.")
    p.add_argument("--solver", type=Path, default=None,
                   help="solver file (.json); default a 5-step bespoke RK2 (any solver of the same "
                        "kind runs the same loop)")
    add_model_dtype(p)
    p.add_argument("--batch-size", type=int, default=2, help="batch size to check (default %(default)s)")
