"""Which implementation of the ops runs: ``"reference"`` (pure torch, any device) or
``"triton"`` (the fused kernels of ``bespoke_fast.kernels``); ``"auto"`` picks triton on CUDA
when it imports."""
from __future__ import annotations

import torch

from .._checks import InvalidArgumentError, MissingDependencyError

__all__ = ["BACKENDS", "triton_available", "resolve_backend"]

BACKENDS = ("auto", "reference", "triton")


def triton_available() -> bool:
    """True when ``bespoke_fast.kernels`` imports (triton installed). Queries no GPU."""
    try:
        from .. import kernels  # noqa: F401  (from kernels/bespoke_fast_kernels/ via package_dir)
    except Exception:  # ImportError, or triton failing to initialise
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA when triton imports, else ``"reference"``."""
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton" and not triton_available():
        raise MissingDependencyError("backend='triton' needs the 'triton' package (pip install bespoke_fast[triton])")
    return backend
