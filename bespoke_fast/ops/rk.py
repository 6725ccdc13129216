"""Bespoke RK1 / RK2 update ops: each reference (pure torch) op beside the dispatch to its Triton
twin in ``bespoke_fast.kernels.bespoke_rk``.

The references are the correctness oracle for the kernels and for the engine's eager program
(``bespoke_fast.engine``: the same torch ops, in the same order, on coefficient views made once
and preallocated buffers -- bitwise equal, ``tests/test_eager_ops.py``).
Each op reads its scalars from the ``[n, NUM_COLS]`` coefficient table (``bespoke_fast.ops.table``)
at a step index, updates the float32 state and, optionally, writes the model's next input in the
model's dtype (``model_in``), all without reading anything back to the host.

Arithmetic is defined as (``addcmul(y, u, c) = y + c * u``; coefficients cast to the state dtype)::

    rk1_step:    x_new = addcmul(a * x, u, b)
    rk2_stage1:  x_mid = addcmul(A * x, u1, B)
    rk2_stage2:  x_new = addcmul(addcmul(C * x, x_mid, D), u2, E)

``out`` may be ``x`` itself (in place), but ``u`` must not share memory with ``x`` or ``out``
(the state is overwritten before ``u`` is read). Under autograd the ops ignore ``out`` and
return a new tensor (autograd cannot record the in-place form).

With guidance, ``u`` is the raw model output of shape ``[2B, ...]`` (conditional half first,
unconditional half second) and the op first forms ``u = u_unc + w (u_cond - u_unc)``; then
``model_in`` has shape ``[2B, ...]`` and receives the new state in both halves.
"""
from __future__ import annotations

import torch

from . import table as T
from .backend import resolve_backend

__all__ = [
    "rk1_step", "rk2_stage1", "rk2_stage2",
    "rk1_step_ref", "rk2_stage1_ref", "rk2_stage2_ref", "guidance_combine_ref", "write_model_in",
]


def guidance_combine_ref(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[2B, ...]`` model output (cond half, then uncond half) -> ``[B, ...]`` guided velocity,
    ``u_unc + w (u_cond - u_unc)`` computed in float32."""
    u_cond, u_unc = u.float().chunk(2, dim=0)
    return torch.addcmul(u_unc, u_cond - u_unc, w.float())


def _velocity(u, coef_row, guidance, like):
    if guidance:
        u = guidance_combine_ref(u, coef_row[T.W])
    return u.to(like.dtype)


def _needs_grad(*tensors):
    # Autograd cannot record in-place writes into ``out`` buffers: use the functional form
    # (same kernels, same arithmetic, so results are bitwise equal to the in-place form).
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def write_model_in(model_in, x):
    """Copy the state ``x`` ``[B, ...]`` into the model-input buffer (``None``: nothing), in the
    buffer's dtype; a ``[2B, ...]`` buffer (the guidance batch) gets it in both halves."""
    if model_in is None:
        return
    if model_in.shape[0] == 2 * x.shape[0]:  # guidance: both halves get the state
        model_in[: x.shape[0]].copy_(x)
        model_in[x.shape[0]:].copy_(x)
    else:
        model_in.copy_(x)


def rk1_step_ref(x, u, table, step, model_in=None, guidance=False, out=None):
    """Bespoke RK1 step ``x_new = a x + b u`` (row ``step`` of ``table``).

    Args:
        x: state ``[B, ...]`` (float32 for the engine; any float dtype here).
        u: model output ``[B, ...]`` (``[2B, ...]`` with ``guidance``), any float dtype.
        table: ``[n, NUM_COLS]`` coefficient table. step: Python int.
        model_in: optional buffer ``[B or 2B, ...]`` that receives ``x_new`` in its own dtype.
        out: optional buffer for ``x_new`` (may be ``x`` itself: in-place).
    Returns: ``x_new``.
    """
    row = table[step].to(x.dtype)
    u = _velocity(u, row, guidance, x)
    if _needs_grad(x, u, row):
        x_new = torch.addcmul(x * row[T.A], u, row[T.B])
    else:
        x_new = torch.mul(x, row[T.A], out=out) if out is not None else x * row[T.A]
        x_new.addcmul_(u, row[T.B])
    write_model_in(model_in, x_new)
    return x_new


def rk2_stage1_ref(x, u1, table, step, model_in=None, guidance=False, out=None):
    """Bespoke RK2 stage 1 ``x_mid = A x + B u1``; returns ``x_mid`` (written to ``out`` if given).
    The same op as :func:`rk1_step_ref` (RK1 keeps ``a, b`` in the same columns ``A, B``)."""
    return rk1_step_ref(x, u1, table, step, model_in=model_in, guidance=guidance, out=out)


def rk2_stage2_ref(x, x_mid, u2, table, step, model_in=None, guidance=False, out=None):
    """Bespoke RK2 stage 2 ``x_new = C x + D x_mid + E u2``; returns ``x_new`` (``out`` may be ``x``)."""
    row = table[step].to(x.dtype)
    u2 = _velocity(u2, row, guidance, x)
    if _needs_grad(x, x_mid, u2, row):
        x_new = torch.addcmul(torch.addcmul(x * row[T.C], x_mid, row[T.D]), u2, row[T.E])
    else:
        x_new = torch.mul(x, row[T.C], out=out) if out is not None else x * row[T.C]
        x_new.addcmul_(x_mid, row[T.D]).addcmul_(u2, row[T.E])
    write_model_in(model_in, x_new)
    return x_new


# ----------------------------------------------------------------------------- dispatch
# ``backend``: "reference", "triton" or "auto" (``bespoke_fast.ops.backend``). The kernels are
# imported where they are used: triton is optional.
def rk1_step(x, u, table, step, model_in=None, guidance=False, out=None, backend="auto"):
    """Dispatching RK1 step; see :func:`rk1_step_ref` for the maths and arguments."""
    if resolve_backend(backend, x.device) == "triton":
        from ..kernels.bespoke_rk import rk1_step as op
    else:
        op = rk1_step_ref
    return op(x, u, table, step, model_in=model_in, guidance=guidance, out=out)


def rk2_stage1(x, u1, table, step, model_in=None, guidance=False, out=None, backend="auto"):
    """Dispatching RK2 stage 1; see :func:`rk2_stage1_ref`."""
    if resolve_backend(backend, x.device) == "triton":
        from ..kernels.bespoke_rk import rk2_stage1 as op
    else:
        op = rk2_stage1_ref
    return op(x, u1, table, step, model_in=model_in, guidance=guidance, out=out)


def rk2_stage2(x, x_mid, u2, table, step, model_in=None, guidance=False, out=None, backend="auto"):
    """Dispatching RK2 stage 2; see :func:`rk2_stage2_ref`."""
    if resolve_backend(backend, x.device) == "triton":
        from ..kernels.bespoke_rk import rk2_stage2 as op
    else:
        op = rk2_stage2_ref
    return op(x, x_mid, u2, table, step, model_in=model_in, guidance=guidance, out=out)
