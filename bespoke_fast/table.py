"""The device coefficient table: the one layout the reference ops, the Triton kernels, the
solvers and the CUDA-graph engine agree on.

A solver with ``n`` steps is packed into a float32 tensor of shape ``[n, NUM_COLS]``; row ``i``
holds everything step ``i`` needs, so kernels read their scalars by step index and swapping in
another solver with the same ``n`` is a copy into the table (never a re-capture).

Columns (unused entries are 0):

====== ===================== ===================== =====================================
col    bespoke / base RK2    bespoke / base RK1    BNS (non-stationary, see ``ops``)
====== ===================== ===================== =====================================
T0     model time t_k0       model time t_i        model time t_i
TM     model time t_km       --                    --
A      A_i                   a_i                   a_i (coefficient of x0)
B      B_i                   b_i                   --
C      C_i                   --                    --
D      D_i                   --                    --
E      E_i                   --                    --
W      guidance scale w      guidance scale w      guidance scale w
====== ===================== ===================== =====================================

Step maths (method.md section 4): RK1 ``x <- a x + b u(t_i, x)``; RK2 ``x_mid = A x + B u(t_k0, x)``,
``x <- C x + D x_mid + E u(t_km, x_mid)``.
"""
T0, TM, A, B, C, D, E, W = range(8)
NUM_COLS = 8

__all__ = ["T0", "TM", "A", "B", "C", "D", "E", "W", "NUM_COLS"]
