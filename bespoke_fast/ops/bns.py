"""Non-stationary (BNS) solver step: the reference (pure torch) op beside the dispatch to its
Triton twin ``bespoke_fast.kernels.bns.bns_step``. Importable without Triton.

    x_{i+1} = a[i] x0 + sum_{j=0..i} b[i, j] us[j]

computed in float32, ``j`` ascending (the kernel sums in the same order). The tables ``a``
``[n]`` and ``b`` ``[n, n]`` are views of the engine's flat BNS table (``bespoke_fast.ops.table``).
"""
from __future__ import annotations

import torch

from .backend import resolve_backend
from .rk import write_model_in
from .._checks import InvalidArgumentError

__all__ = ["bns_step", "bns_step_ref"]


def bns_step_ref(x0, us, i, table_a, table_b, out, model_in=None):
    """Reference BNS step.

    Args:
        x0: initial state ``[B, ...]`` (float32 for the engine).
        us: ``[m, B, ...]`` (m > i) velocities of the steps so far, any float dtype; rows
            ``0..i`` are read (upcast to float32).
        i: Python int step index.
        table_a: float32 ``[n]``; table_b: float32 ``[n, n]`` (lower-triangular).
        out: optional buffer ``[B, ...]`` for ``x_{i+1}`` (``None`` allocates).
        model_in: optional buffer ``[B, ...]`` or ``[2B, ...]`` that receives ``x_{i+1}`` in its
            own dtype (both halves when ``[2B, ...]``).
    Returns: ``x_{i+1}`` (float32).

    Like :mod:`bespoke_fast.ops.rk`, when autograd is recording the result is a new tensor and
    ``out`` is not written (autograd cannot record writes into caller buffers).
    """
    n = table_a.shape[0]
    if not -n <= i < n:
        raise InvalidArgumentError(f"i={i} is out of range for a table with {n} rows")
    i = i % n  # negative counts from the end, like table indexing
    a = table_a[i].float()
    b = table_b[i].float()
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x0, us, table_a, table_b))
    if grad:
        acc = x0.float() * a
        for j in range(i + 1):  # j ascending: the kernel's order
            acc = acc + us[j].float() * b[j]
    else:
        acc = torch.mul(x0.float(), a, out=out) if out is not None else x0.float() * a
        for j in range(i + 1):  # j ascending: the kernel's order
            acc.add_(us[j].float() * b[j])
    write_model_in(model_in, acc)
    return acc


def bns_step(x0, us, i, table_a, table_b, out, model_in=None, backend="auto"):
    """Dispatching BNS step (``backend`` as :func:`bespoke_fast.ops.rk.rk1_step`); see
    :func:`bns_step_ref` for the maths and arguments."""
    if resolve_backend(backend, x0.device) == "triton":
        from ..kernels.bns import bns_step as op
    else:
        op = bns_step_ref
    return op(x0, us, i, table_a, table_b, out, model_in=model_in)
