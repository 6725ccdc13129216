"""Fused Bespoke RK1 / RK2 solver updates (Triton), optionally with classifier-free guidance.

Each kernel makes ONE pass over memory: it reads the float32 state and the model output (in the
model's dtype), reads its scalars from the device coefficient table at row ``step`` (never from
the host, so a CUDA graph can replay it with another solver copied into the table), writes the
new float32 state and, in the same pass, the model's next input in the model's dtype.

Maths (fp32 throughout; see ``bespoke_fast.ops.rk`` for the torch references they must match)::

    guidance:    u  = u_unc + w (u_cond - u_unc)          u = [u_cond; u_unc], w = table[step, W]
    rk1_step:    x' = a x + b u                           a, b = table[step, A], table[step, B]
    rk2_stage1:  x_mid = A x + B u1
    rk2_stage2:  x' = C x + D x_mid + E u2

Layout: ``@triton.jit`` kernels, then launchers (checks, allocation, launch), then the thin
public functions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bespoke_fast.ops import table as T

from .launch import (MODEL_DTYPES, LaunchPlan, check_index, check_model_in, check_out, check_state,
                     check_tensor, launch, launch_config, model_in_flags)

__all__ = ["rk1_step", "rk2_stage1", "rk2_stage2"]


# ============================================================================ kernels
@triton.jit
def _load_velocity(u_ptr, row_ptr, offs, mask, N, COL_W: tl.constexpr, GUIDANCE: tl.constexpr):
    """Model output at ``offs`` as fp32; under guidance combine the two halves of ``u``."""
    # Upcast BEFORE any arithmetic: low-precision maths (and the interpreter's bf16) must not leak.
    if GUIDANCE:
        w = tl.load(row_ptr + COL_W).to(tl.float32)
        u_cond = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u_unc = tl.load(u_ptr + N + offs, mask=mask, other=0.0).to(tl.float32)  # 2nd half starts at N
        u = u_unc + w * (u_cond - u_unc)
    else:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return u


@triton.jit
def _store_state(val, out_ptr, mi_ptr, offs, mask, N,
                 HAS_MODEL_IN: tl.constexpr, MODEL_IN_TWICE: tl.constexpr):
    """Write the new state (fp32 ``out``) and the model's next input in the model's dtype."""
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_MODEL_IN:
        v = val.to(mi_ptr.dtype.element_ty)
        tl.store(mi_ptr + offs, v, mask=mask)
        if MODEL_IN_TWICE:  # guidance batch [2B, ...]: both halves get the same state
            tl.store(mi_ptr + N + offs, v, mask=mask)


@triton.jit(do_not_specialize=["step"])  # one compiled kernel for every step index
def _rk1_step_kernel(x_ptr, u_ptr, table_ptr, out_ptr, mi_ptr, step, N,
                     NUM_COLS: tl.constexpr, COL_A: tl.constexpr, COL_B: tl.constexpr,
                     COL_W: tl.constexpr, GUIDANCE: tl.constexpr, HAS_MODEL_IN: tl.constexpr,
                     MODEL_IN_TWICE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: > 2**31 elements is fine
    mask = offs < N
    row_ptr = table_ptr + step * NUM_COLS
    a = tl.load(row_ptr + COL_A).to(tl.float32)
    b = tl.load(row_ptr + COL_B).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = _load_velocity(u_ptr, row_ptr, offs, mask, N, COL_W, GUIDANCE)
    _store_state(x * a + u * b, out_ptr, mi_ptr, offs, mask, N, HAS_MODEL_IN, MODEL_IN_TWICE)


# RK2 stage 1 (x_mid = A x + B u1) is the same one-state update as RK1 (x' = a x + b u) on the
# same table columns, so it runs the same compiled kernel.
_rk2_stage1_kernel = _rk1_step_kernel


@triton.jit(do_not_specialize=["step"])
def _rk2_stage2_kernel(x_ptr, xm_ptr, u_ptr, table_ptr, out_ptr, mi_ptr, step, N,
                       NUM_COLS: tl.constexpr, COL_C: tl.constexpr, COL_D: tl.constexpr,
                       COL_E: tl.constexpr, COL_W: tl.constexpr, GUIDANCE: tl.constexpr,
                       HAS_MODEL_IN: tl.constexpr, MODEL_IN_TWICE: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row_ptr = table_ptr + step * NUM_COLS
    c = tl.load(row_ptr + COL_C).to(tl.float32)
    d = tl.load(row_ptr + COL_D).to(tl.float32)
    e = tl.load(row_ptr + COL_E).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xm = tl.load(xm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = _load_velocity(u_ptr, row_ptr, offs, mask, N, COL_W, GUIDANCE)
    # Same association as the reference: (C x + D x_mid) + E u.
    _store_state(x * c + xm * d + u * e, out_ptr, mi_ptr, offs, mask, N,
                 HAS_MODEL_IN, MODEL_IN_TWICE)


# ============================================================================ launchers (shared machinery: launch.py)
def _check_table(table, step, device, ncols=T.NUM_COLS):
    check_tensor("table", table, dtypes=(torch.float32,), device=device)
    if table.dim() != 2 or table.shape[1] != ncols or table.shape[0] == 0:
        raise ValueError(f"table must have shape [n, {ncols}] with n >= 1, got {tuple(table.shape)}")
    return check_index("step", step, table.shape[0])


def _velocity_shape(x, guidance):
    return ((2 * x.shape[0],) + tuple(x.shape[1:])) if guidance else tuple(x.shape)


def plan_one_state(kernel, x, u, table, step, model_in, guidance, out, cols) -> LaunchPlan:
    """The launch of an ``x' = p x + q u`` kernel (rk1_step, rk2_stage1) on checked tensors."""
    has_mi, mi_twice = model_in_flags(model_in, x)
    n = x.numel()
    block, warps = launch_config(n)
    return LaunchPlan(kernel, (triton.cdiv(n, block),),
                      (x, u, table, out, model_in if has_mi else out, step, n),
                      dict(NUM_COLS=T.NUM_COLS, COL_A=cols[0], COL_B=cols[1], COL_W=T.W,
                           GUIDANCE=bool(guidance), HAS_MODEL_IN=has_mi, MODEL_IN_TWICE=mi_twice,
                           BLOCK=block, num_warps=warps))


def plan_rk2_stage2(x, x_mid, u2, table, step, model_in, guidance, out) -> LaunchPlan:
    """The launch of the RK2 stage-2 kernel on checked tensors."""
    has_mi, mi_twice = model_in_flags(model_in, x)
    n = x.numel()
    block, warps = launch_config(n)
    return LaunchPlan(_rk2_stage2_kernel, (triton.cdiv(n, block),),
                      (x, x_mid, u2, table, out, model_in if has_mi else out, step, n),
                      dict(NUM_COLS=T.NUM_COLS, COL_C=T.C, COL_D=T.D, COL_E=T.E, COL_W=T.W,
                           GUIDANCE=bool(guidance), HAS_MODEL_IN=has_mi, MODEL_IN_TWICE=mi_twice,
                           BLOCK=block, num_warps=warps))


def _launch_one_state(kernel, x, u, table, step, model_in, guidance, out, cols, u_name):
    """Shared launcher of the x' = p x + q u kernels (rk1_step, rk2_stage1)."""
    check_state("x", x)
    check_tensor(u_name, u, shape=_velocity_shape(x, guidance), dtypes=MODEL_DTYPES, device=x.device)
    step = _check_table(table, step, x.device)
    out = check_out(out, x)
    check_model_in(model_in, x)
    if x.numel():
        launch(plan_one_state(kernel, x, u, table, step, model_in, guidance, out, cols))
    return out


def _launch_rk2_stage2(x, x_mid, u2, table, step, model_in, guidance, out):
    check_state("x", x)
    check_tensor("x_mid", x_mid, shape=x.shape, dtypes=(torch.float32,), device=x.device)
    check_tensor("u2", u2, shape=_velocity_shape(x, guidance), dtypes=MODEL_DTYPES, device=x.device)
    step = _check_table(table, step, x.device)
    out = check_out(out, x)
    check_model_in(model_in, x)
    if x.numel():
        launch(plan_rk2_stage2(x, x_mid, u2, table, step, model_in, guidance, out))
    return out


# ============================================================================ public
def rk1_step(x, u, table, step, model_in=None, guidance=False, out=None):
    """Fused Bespoke RK1 step ``x' = a x + b u`` with ``a, b = table[step, A], table[step, B]``.

    Args:
        x: float32 state ``[B, ...]``, contiguous.
        u: model output in the model dtype (fp32/bf16/fp16), ``[B, ...]``; with ``guidance``
           ``[2B, ...]`` (conditional half first) combined as ``u_unc + w (u_cond - u_unc)``,
           ``w = table[step, W]``.
        table: float32 ``[n, NUM_COLS]`` device coefficient table. step: Python int row.
        model_in: optional buffer ``[B, ...]`` or ``[2B, ...]`` (model dtype) that receives ``x'``
           in the same pass (both halves when ``[2B, ...]``).
        out: float32 ``[B, ...]`` for ``x'``; ``out=x`` updates in place; ``None`` allocates.
    Returns: ``out`` holding ``x'``.

    Example::

        x = rk1_step(x, u, table, i, model_in=x_model, out=x)   # in place, model input refreshed
    """
    return _launch_one_state(_rk1_step_kernel, x, u, table, step, model_in, guidance, out,
                             (T.A, T.B), "u")


def rk2_stage1(x, u1, table, step, model_in=None, guidance=False, out=None):
    """Fused Bespoke RK2 stage 1 ``x_mid = A x + B u1`` (row ``step``); arguments as
    :func:`rk1_step`. Returns ``out`` holding ``x_mid`` (``[B, ...]`` float32)."""
    return _launch_one_state(_rk2_stage1_kernel, x, u1, table, step, model_in, guidance, out,
                             (T.A, T.B), "u1")


def rk2_stage2(x, x_mid, u2, table, step, model_in=None, guidance=False, out=None):
    """Fused Bespoke RK2 stage 2 ``x' = C x + D x_mid + E u2`` (row ``step``).

    ``x_mid``: float32 ``[B, ...]`` from :func:`rk2_stage1`; other arguments as :func:`rk1_step`
    (``out=x`` in place). Returns ``out`` holding ``x'``.
    """
    return _launch_rk2_stage2(x, x_mid, u2, table, step, model_in, guidance, out)
