"""Fused non-stationary (BNS) solver step (Triton).

    x_{i+1} = a_i x0 + sum_{j=0..i} b[i, j] us[j]

``us`` ``[n, B, ...]`` holds the velocities of every step so far (rows ``0..i`` are read), in
float32 or the model's dtype; ``a = table_a`` ``[n]`` and ``b = table_b`` ``[n, n]``
(lower-triangular) are float32 device tensors, read inside the kernel at row ``i``. The sum runs
over ``j`` ascending in fp32, the same order as the reference ``bespoke_fast.ops.bns.bns_step_ref``.
One pass: reads x0 and ``i + 1`` velocity rows, writes ``out`` (float32) and optionally
``model_in`` (model dtype, the next model input).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (MODEL_DTYPES, LaunchPlan, check_index, check_model_in, check_out, check_state,
                     check_tensor, launch, launch_config, model_in_flags)

__all__ = ["bns_step"]


# ============================================================================ kernel
@triton.jit(do_not_specialize=["i"])  # one compiled kernel for every step index
def _bns_step_kernel(x0_ptr, us_ptr, ta_ptr, tb_ptr, out_ptr, mi_ptr, i, n_rows, N,
                     HAS_MODEL_IN: tl.constexpr, MODEL_IN_TWICE: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: > 2**31 elements is fine
    mask = offs < N
    a = tl.load(ta_ptr + i).to(tl.float32)
    acc = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32) * a
    b_row = tb_ptr + i * n_rows
    u_ptrs = us_ptr + offs  # advanced by N per row: pointer arithmetic, no int32 j*N overflow
    for j in range(0, i + 1):  # j ascending: the reference's summation order
        b = tl.load(b_row + j).to(tl.float32)
        acc += tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32) * b
        u_ptrs += N
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_MODEL_IN:
        v = acc.to(mi_ptr.dtype.element_ty)
        tl.store(mi_ptr + offs, v, mask=mask)
        if MODEL_IN_TWICE:
            tl.store(mi_ptr + N + offs, v, mask=mask)


# ============================================================================ launcher
def _launch_bns_step(x0, us, i, table_a, table_b, out, model_in):
    check_state("x0", x0)
    check_tensor("table_a", table_a, dtypes=(torch.float32,), device=x0.device)
    if table_a.dim() != 1 or table_a.shape[0] == 0:
        raise ValueError(f"table_a must have shape [n] with n >= 1, got {tuple(table_a.shape)}")
    n = table_a.shape[0]
    check_tensor("table_b", table_b, shape=(n, n), dtypes=(torch.float32,), device=x0.device)
    i = check_index("i", i, n)
    check_tensor("us", us, dtypes=MODEL_DTYPES, device=x0.device)
    if us.dim() != x0.dim() + 1 or tuple(us.shape[1:]) != tuple(x0.shape) or us.shape[0] <= i:
        raise ValueError(f"us must have shape [m, {', '.join(map(str, x0.shape))}] with m > i={i} "
                         f"(velocities of steps 0..i), got {tuple(us.shape)}")
    out = check_out(out, x0)
    check_model_in(model_in, x0)
    if x0.numel():
        launch(plan_bns_step(x0, us, i, table_a, table_b, out, model_in))
    return out


def plan_bns_step(x0, us, i, table_a, table_b, out, model_in) -> LaunchPlan:
    """The launch of the BNS kernel on checked tensors (``i`` already in ``[0, n)``)."""
    has_mi, mi_twice = model_in_flags(model_in, x0)
    N = x0.numel()
    block, warps = launch_config(N)
    return LaunchPlan(_bns_step_kernel, (triton.cdiv(N, block),),
                      (x0, us, table_a, table_b, out, model_in if has_mi else out, i,
                       table_a.shape[0], N),
                      dict(HAS_MODEL_IN=has_mi, MODEL_IN_TWICE=mi_twice, BLOCK=block,
                           num_warps=warps))


# ============================================================================ public
def bns_step(x0, us, i, table_a, table_b, out, model_in=None):
    """Fused BNS step ``x_{i+1} = a[i] x0 + sum_{j<=i} b[i, j] us[j]`` (fp32, ``j`` ascending).

    Args:
        x0: float32 initial state ``[B, ...]``, contiguous.
        us: ``[m, B, ...]`` (m > i) velocities of steps ``0..m-1``, float32 or model dtype;
            rows ``0..i`` are read.
        i: Python int step index (negative counts from the end).
        table_a: float32 ``[n]``; table_b: float32 ``[n, n]`` lower-triangular.
        out: float32 ``[B, ...]`` receiving ``x_{i+1}`` (``None`` allocates).
        model_in: optional ``[B, ...]`` / ``[2B, ...]`` buffer (model dtype) that also receives it.
    Returns: ``out``.

    Example::

        us[i].copy_(model(x_model, t[i]))
        bns_step(x0, us, i, a, b, out=x, model_in=x_model)
    """
    return _launch_bns_step(x0, us, i, table_a, table_b, out, model_in)
