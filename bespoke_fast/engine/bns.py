"""The engine program of non-stationary (BNS) solvers (kind ``"bns"``, NFE = n).

Device table: the flat ``t [n] | a [n] | b [n, n]`` float32 buffer with its three views
(``bespoke_fast.ops.table.pack_bns`` / ``bns_views``); the guidance scale is a 0-d tensor ``w``.
Buffers, per cached state::

    x0     float32 [Bp, *shape]          the start state (x0 copied in, padded with zeros)
    us     model_dtype [n, Bp, *shape]   u_0 .. u_{n-1}, written one row per step
    (x     float32 [Bp, *shape]          x_{i+1}: the sampler's state, the output at the end)

Step ``i``::

    t <- t[i];  us[i] <- net(model_in, t, **extras)      (x0 / x themselves in fp32)
    x = a_i x0 + sum_{j<=i} b_ij us[j]  -> also writes model_in       (ops.bns.bns_step)

With guidance the ``[2Bp]`` output's halves are combined (``u_unc + w (u_cond - u_unc)`` in
float32, ``ops.rk.guidance_combine_ref``) before the row is stored, so ``us`` stays ``[n, Bp]``.
"""
from __future__ import annotations

import torch

from ..ops import table as T
from ..ops.bns import bns_step
from ..ops.rk import guidance_combine_ref
from .program import Program

__all__ = ["BNSProgram"]


class BNSProgram(Program):
    """Model -> ``us[i]``, then ``bns_step(x0, us, i, a, b)`` (see the module docs)."""

    kind = "bns"
    swap_keys = ("kind", "n_steps")   # the init does not change the table's layout

    def __init__(self, solver, **kwargs):
        super().__init__(solver, **kwargs)
        # contiguous views of the one flat table (load() copies into it)
        self.t, self.a, self.b = T.bns_views(self.table, self.n_steps)
        self.w = torch.full((), self.guidance_scale, dtype=torch.float32, device=self.device)

    def device_table(self, solver) -> torch.Tensor:
        return T.pack_bns(*solver.coefficient_tables(dtype=torch.float32, device=self.device))

    def set_guidance_scale(self, scale: float) -> None:
        super().set_guidance_scale(scale)
        self.w.fill_(self.guidance_scale)

    def buffers(self, run_b, shape, model_dtype) -> dict:
        # the past velocities in the model dtype: guidance halves are combined before storing
        return {"x0": torch.zeros(run_b, *shape, dtype=torch.float32, device=self.device),
                "us": torch.zeros(self.n_steps, run_b, *shape, dtype=model_dtype,
                                  device=self.device)}

    def start(self, st) -> torch.Tensor:
        return st.x0  # the loop reads x0 and writes x

    def step(self, st, i, last, call) -> None:
        # fp32 without guidance the model reads the state itself: x0 at step 0, then x.
        inp = (st.x0 if i == 0 else st.x) if self.alias else st.model_in
        u = call(st, inp, self.t[i])
        if self.guided:
            u = guidance_combine_ref(u, self.w)  # [2Bp] -> [Bp] float32
        st.us[i].copy_(u)  # before the op overwrites x (a model may return its input)
        bns_step(st.x0, st.us, i, self.a, self.b, out=st.x,
                 model_in=None if last else st.model_in, backend=self.backend)
