"""The device coefficient tables: the one place that documents how each solver kind's
coefficients are laid out for the reference ops, the Triton kernels and the engine.

Both layouts are float32 tensors on the device; kernels read their scalars from them by step
index (never from the host), so swapping in another solver of the same kind and ``n`` is a copy
into the table (never a re-capture of a CUDA graph).

Bespoke (RK1 / RK2): ``[n, NUM_COLS]``, row ``i`` holds everything step ``i`` needs
(``BespokeSolver.coefficient_table``; unused entries are 0)::

    ====== ===================== =====================
    col    base RK2              base RK1
    ====== ===================== =====================
    T0     model time t_k0       model time t_i
    TM     model time t_km       --
    A      A_i                   a_i
    B      B_i                   b_i
    C      C_i                   --
    D      D_i                   --
    E      E_i                   --
    W      guidance scale w      guidance scale w
    ====== ===================== =====================

    RK1  x <- a x + b u(t_i, x)                                  (ops.rk.rk1_step)
    RK2  x_mid = A x + B u(t_k0, x);  x <- C x + D x_mid + E u(t_km, x_mid)
                                                                 (ops.rk.rk2_stage1 / rk2_stage2)

BNS (non-stationary): one flat ``[n + n + n*n]`` buffer (:func:`pack_bns`), read through the
contiguous views :func:`bns_views` returns::

    t [n]      model times t_0 .. t_{n-1}
    a [n]      coefficient of x0 in step i
    b [n, n]   row-major, lower-triangular: b[i, j] weighs u_j in step i
    x_{i+1} = a_i x0 + sum_{j<=i} b_ij u_j                      (ops.bns.bns_step)

The guidance scale of a BNS program is a separate 0-d float32 tensor (it is not a solver
coefficient). Step maths: ``docs/method.md`` sections 4 (bespoke) and 6 (BNS).
"""
import torch

T0, TM, A, B, C, D, E, W = range(8)
NUM_COLS = 8

__all__ = ["T0", "TM", "A", "B", "C", "D", "E", "W", "NUM_COLS", "pack_bns", "bns_views"]


def pack_bns(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``t [n]``, ``a [n]``, ``b [n, n]`` -> the flat ``[n + n + n*n]`` BNS table (detached,
    contiguous, in ``t``'s dtype and device)."""
    return torch.cat([t.detach(), a.detach(), b.detach().reshape(-1)]).contiguous()


def bns_views(flat: torch.Tensor, n: int):
    """``(t [n], a [n], b [n, n])``: contiguous views of the flat BNS table (writes to the table,
    e.g. ``flat.copy_(pack_bns(...))``, show through them)."""
    return flat[:n], flat[n:2 * n], flat[2 * n:].view(n, n)
