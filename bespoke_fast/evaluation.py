"""Evaluating a solver against GT endpoints: RMSE and PSNR at its NFE."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ._checks import InvalidArgumentError, InvalidTypeError
from .gt import TrajectorySet
from .io import check_model_identity
from .metrics import rmse_psnr
from .solvers.fixed import METHODS, NFE_PER_STEP, solve

__all__ = ["evaluate", "parse_solver_spec"]

_SPEC = re.compile(r"^(?P<method>[a-z0-9]+)@(?P<nfe>\d+)$")


def parse_solver_spec(spec):
    """A solver object, a solver file path, or a baseline ``"name@NFE"`` (euler, midpoint, heun,
    rk4). Returns ``(label, sampler_fn(model, x0, **extras), nfe)``."""
    if hasattr(spec, "sample") and hasattr(spec, "nfe"):
        label = f"{spec.kind}-{getattr(spec, 'base', getattr(spec, 'init', ''))}@{spec.nfe}"
        return label, spec.sample, spec.nfe
    if not isinstance(spec, str):
        raise InvalidTypeError(f"solver must be a solver object, a solver file or 'method@NFE', got {spec!r}")
    m = _SPEC.match(spec)
    if m:
        method, nfe = m["method"], int(m["nfe"])
        if method not in METHODS:
            raise InvalidArgumentError(f"unknown method {method!r} in {spec!r}; expected one of {', '.join(METHODS)}")
        per = NFE_PER_STEP[method]
        if nfe < per or nfe % per:
            raise InvalidArgumentError(f"{spec!r}: {method} uses {per} NFE per step, so NFE must be a positive "
                             f"multiple of {per}")
        return spec, (lambda model, x0, **ex: solve(model, x0, method, n_steps=nfe // per, **ex)), nfe
    if Path(spec).is_file():
        from .solvers.files import load_solver
        solver = load_solver(spec)
        return Path(spec).name, solver.sample, solver.nfe
    raise InvalidArgumentError(f"solver {spec!r} is neither a solver file nor 'method@NFE' "
                     f"(e.g. midpoint@10; methods: {', '.join(METHODS)})")


def evaluate(model, solver, trajectories: TrajectorySet, batch_size: int = 1024,
             model_name: str = "", allow_model_mismatch: bool = False) -> dict:
    """RMSE and PSNR of ``solver`` against the GT endpoints ``x(1)`` of ``trajectories``.

    Args:
        model: the velocity model. solver: a BespokeSolver / NonStationarySolver, a solver file,
            or ``"midpoint@10"``-style baseline. trajectories: a TrajectorySet.
        model_name: the model's name, compared with the names the GT set and the solver record
            when a hash is missing. allow_model_mismatch: skip the identity checks; without it a
            GT set or solver made for another model raises ``MismatchError``.
    Returns: ``{"solver", "nfe", "rmse", "psnr", "data_range", "n"}`` (mean per-sample RMSE and
    PSNR, the data range R used for PSNR, the number of samples).

    Example::

        >>> evaluate(model, "midpoint@10", load_trajectories("runs/gt"))["psnr"]
    """
    check_model_identity(trajectories.meta.get("model"), model, model_name, "the GT set",
                         allow_model_mismatch)
    label, sample, nfe = parse_solver_spec(solver)
    fitted = getattr(sample, "__self__", None)      # a solver object or file (not a baseline)
    if fitted is not None:
        check_model_identity(getattr(fitted, "meta", {}).get("model"), model, model_name,
                             f"solver {label}", allow_model_mismatch)
    outs = []
    with torch.no_grad():
        for lo in range(0, len(trajectories), batch_size):
            rows = slice(lo, lo + batch_size)
            extras = {k: v[rows] for k, v in trajectories.extras.items()}
            outs.append(sample(model, trajectories.x0[rows], **extras))
    return {"solver": label, "nfe": nfe, **rmse_psnr(torch.cat(outs), trajectories.x1,
                                                      trajectories.data_range)}
