"""What every kernel launcher shares: argument checks (one wording), the launch rule (block
size and warps), the :class:`LaunchPlan` a launcher builds, and the recorder the ahead-of-time
compile (``bespoke_fast.kernels.aot``) uses to collect plans instead of launching them."""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton

__all__ = ["INTERPRETED", "MODEL_DTYPES", "LaunchPlan", "launch", "launch_config", "record_launches",
           "check_tensor", "check_state", "check_index", "check_out", "check_model_in",
           "model_in_flags"]

# Decided once, when the kernels are defined (Triton reads TRITON_INTERPRET at decoration time).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_MAX_BLOCK = 4096  # big blocks: memory-bound streaming on GPU, few programs under the interpreter


def launch_config(n: int):
    """Block size and warps by a fixed rule (no autotune: it must be safe inside a graph capture
    and the interpreter cannot autotune)."""
    block = min(_MAX_BLOCK, max(128, triton.next_power_of_2(n)))
    return block, (8 if block >= 2048 else 4)


def check_tensor(name, t, *, shape=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; all tensors must share a device")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(t.stride())} for shape "
                         f"{tuple(t.shape)}); call .contiguous() first")
    return t


def check_state(name, x):
    check_tensor(name, x, dtypes=(torch.float32,))
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B, ...] with B >= 1, got {tuple(x.shape)}")
    if x.device.type != "cuda" and not INTERPRETED and not (_RECORDER is not None
                                                               and x.device.type == "meta"):
        raise ValueError(f"{name} is on {x.device}: the Triton kernels need CUDA tensors, or "
                         f"TRITON_INTERPRET=1 set before bespoke_fast.kernels is imported")
    return x


def check_index(name, i, n):
    """Python int in [-n, n) (negative counts from the end, like table[step]) -> [0, n)."""
    if isinstance(i, bool) or not isinstance(i, int):
        if isinstance(i, torch.Tensor):
            raise TypeError(f"{name} must be a Python int (a tensor would need a device->host read)")
        raise TypeError(f"{name} must be a Python int, got {type(i).__name__}")
    if not -n <= i < n:
        raise ValueError(f"{name}={i} is out of range for a table with {n} rows")
    return i % n


def check_out(out, x):
    if out is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return check_tensor("out", out, shape=x.shape, dtypes=(torch.float32,), device=x.device)


def check_model_in(model_in, x):
    """Returns (HAS_MODEL_IN, MODEL_IN_TWICE). Like the reference, a ``[2B, ...]`` buffer gets
    the state in both halves (the guidance batch), a ``[B, ...]`` one gets it once."""
    if model_in is None:
        return False, False
    check_tensor("model_in", model_in, dtypes=MODEL_DTYPES, device=x.device)
    twice = (2 * x.shape[0],) + tuple(x.shape[1:])
    if tuple(model_in.shape) not in (tuple(x.shape), twice):
        raise ValueError(f"model_in must have shape {tuple(x.shape)} or {twice} (guidance batch), "
                         f"got {tuple(model_in.shape)}")
    return True, tuple(model_in.shape) == twice


class LaunchPlan(NamedTuple):
    """One kernel launch, fully decided: ``kernel[grid](*args, **meta)``. The launchers build
    it (``bespoke_rk.plan_one_state``, ``bespoke_rk.plan_rk2_stage2``, ``bns.plan_bns_step``) and then launch
    it; the ahead-of-time compile (``bespoke_fast.kernels.aot``) compiles the same plans, so
    the constexprs, block size and warps it checks are the ones launched."""
    kernel: object
    grid: tuple
    args: tuple
    meta: dict


# Set by record_launches(): launches are recorded, not run.
_RECORDER = None


@contextlib.contextmanager
def record_launches():
    """Within the block, the kernel launchers append their :class:`LaunchPlan` to the yielded
    list instead of launching (meta tensors are accepted)."""
    global _RECORDER
    plans: list = []
    saved, _RECORDER = _RECORDER, plans
    try:
        yield plans
    finally:
        _RECORDER = saved


def launch(plan: LaunchPlan):
    if _RECORDER is not None:
        _RECORDER.append(plan)
        return
    plan.kernel[plan.grid](*plan.args, **plan.meta)


def model_in_flags(model_in, x):
    """(HAS_MODEL_IN, MODEL_IN_TWICE) from the buffer's shape (``[2B, ...]``: twice)."""
    if model_in is None:
        return False, False
    return True, model_in.shape[0] == 2 * x.shape[0]
