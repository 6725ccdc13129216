"""Argument and model-output checks shared by every solver: one place, one wording."""
from __future__ import annotations

import numbers

import torch


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` must be a Python/NumPy integer (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_state(name: str, x) -> torch.Tensor:
    """A sampler state must be a floating-point tensor with a batch dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B, ...] with B >= 1, got {tuple(x.shape)}")
    return x


def call_model(model, x: torch.Tensor, t: torch.Tensor, extras: dict, check_finite: bool = False,
               expect_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Evaluate ``model(x, t, **extras)`` and check the contract: same shape as ``x`` and a
    floating dtype (``expect_dtype`` when given, default ``x.dtype``); optionally finite.

    ``check_finite`` costs one device->host sync per call: it is for solvers and tests, never
    for the CUDA-graph engine.
    """
    u = model(x, t, **extras)
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"the model must return a torch.Tensor, got {type(u).__name__}")
    if u.shape != x.shape:
        raise ValueError(f"the model returned shape {tuple(u.shape)} for an input of shape "
                         f"{tuple(x.shape)}; a velocity model must return the input's shape")
    want = expect_dtype or x.dtype
    if u.dtype != want:
        raise TypeError(f"the model returned dtype {u.dtype} for an input of dtype {x.dtype}; "
                        f"expected {want} (cast inside the model, or wrap it)")
    if check_finite and not bool(torch.isfinite(u).all()):
        raise FloatingPointError(f"the model returned a non-finite velocity (NaN or Inf) at "
                                 f"t={float(t.reshape(-1)[0]):.6g}")
    return u


def time_vector(t, like: torch.Tensor) -> torch.Tensor:
    """A scalar time (float or 0-d tensor) -> ``[B]`` tensor on ``like``'s device and dtype."""
    if isinstance(t, torch.Tensor):
        return t.to(device=like.device, dtype=like.dtype).reshape(()).repeat(like.shape[0])
    return torch.full((like.shape[0],), float(t), device=like.device, dtype=like.dtype)
