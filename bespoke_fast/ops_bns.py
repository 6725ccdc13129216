"""Reference (pure torch) non-stationary (BNS) solver step: the oracle for
``bespoke_fast.kernels.bns_step``. Importable without Triton.

    x_{i+1} = a[i] x0 + sum_{j=0..i} b[i, j] us[j]

computed in float32, ``j`` ascending (the kernel sums in the same order).
"""
from __future__ import annotations

import torch

__all__ = ["bns_step_ref"]


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

    Like :mod:`bespoke_fast.ops`, when autograd is recording the result is a new tensor and
    ``out`` is not written (autograd cannot record writes into caller buffers).
    """
    n = table_a.shape[0]
    if not -n <= i < n:
        raise ValueError(f"i={i} is out of range for a table with {n} rows")
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
    if model_in is not None:
        if model_in.shape[0] == 2 * x0.shape[0]:  # guidance batch: both halves get the state
            model_in[: x0.shape[0]].copy_(acc)
            model_in[x0.shape[0]:].copy_(acc)
        else:
            model_in.copy_(acc)
    return acc
