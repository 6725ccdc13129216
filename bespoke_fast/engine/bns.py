"""The engine program of non-stationary (BNS) solvers (kind ``"bns"``, NFE = n).

Device table: the flat ``t [n] | a [n] | b [n, n]`` float32 buffer with its three views
(``bespoke_fast.ops.table.pack_bns`` / ``bns_views``); ``a_i`` and ``b_ij`` are 0-d views into it,
made once; the guidance scale is a 0-d tensor ``w``. Buffers, per cached state::

    us     model_dtype [n, Bp, *shape]   u_0 .. u_{n-1}, written one row per step
    acc    float32 [Bp, *shape]          one product b_ij u_j (reference backend)
    (x0, x  float32 [Bp, *shape]         the start (read only) and the result: the caller's)

Step ``i``::

    us[i] <- net(model_in, t[i], **extras)      (fp32 without guidance: x0 / x themselves)
    x = a_i x0 + sum_{j<=i} b_ij us[j]  -> also writes model_in       (ops.bns.bns_step)

On the ``"reference"`` backend the sum is the reference op's own ops in its order (``mul(out=)``
for ``a_i x0``, then per ``j``: upcast ``us[j]`` when low precision, multiply by ``b_ij``,
``add_``), into ``acc`` instead of a new tensor: bitwise the reference's. With guidance the
``[2Bp]`` output's halves are combined (``u_unc + w (u_cond - u_unc)`` in float32, the ops of
``ops.rk.guidance_combine_ref``) before the row is stored, so ``us`` stays ``[n, Bp]``.
"""
from __future__ import annotations

import torch

from ..ops import table as T
from ..ops.bns import bns_step
from .program import Program

__all__ = ["BNSProgram"]


class BNSProgram(Program):
    """Model -> ``us[i]``, then ``x = a_i x0 + sum_j b_ij us[j]`` (see the module docs)."""

    kind = "bns"
    swap_keys = ("kind", "n_steps")   # the init does not change the table's layout

    def __init__(self, solver, **kwargs):
        super().__init__(solver, **kwargs)
        # contiguous views of the one flat table (load() copies into it)
        self.t, self.a, self.b = T.bns_views(self.table, self.n_steps)
        self.w = torch.full((), self.guidance_scale, dtype=torch.float32, device=self.device)
        # a_i and row i of b (j <= i) as 0-d views: made once
        self.coefs = [(self.a[i], [self.b[i, j] for j in range(i + 1)])
                      for i in range(self.n_steps)]

    def device_table(self, solver) -> torch.Tensor:
        return T.pack_bns(*solver.coefficient_tables(dtype=torch.float32, device=self.device))

    def time_view(self) -> torch.Tensor:
        return self.t.view(self.n_steps, 1, 1)

    def set_guidance_scale(self, scale: float) -> None:
        super().set_guidance_scale(scale)
        self.w.fill_(self.guidance_scale)

    def buffers(self, run_b, shape, model_dtype) -> dict:
        # the past velocities in the model dtype: guidance halves are combined before storing
        us = torch.zeros(self.n_steps, run_b, *shape, dtype=model_dtype, device=self.device)
        out = self.guidance_buffers(run_b, shape, model_dtype) if self.guided else {}
        out.update(us=us, us_rows=list(us.unbind(0)),
                   acc=torch.empty(run_b, *shape, dtype=torch.float32, device=self.device))
        return out

    def loop(self, st, x, x0, extras, call, exact=False) -> None:
        # ``exact`` (skip exact no-op terms) changes nothing here: every b_ij term is kept
        mi, guided, last = st.model_in, self.guided, self.n_steps - 1
        us, acc = st.us_rows, st.acc
        x2 = x.expand(2, *x.shape) if guided else None
        self.write_in(st, x0)
        ref, low = self.backend == "reference", st.us.dtype != torch.float32
        net, shape, dtype = call.net, x0.shape if mi is None else mi.shape, st.us.dtype
        for i, (a, bs), t in zip(range(last + 1), self.coefs, st.t_rows):
            # fp32 without guidance the model reads the state itself: x0 at step 0, then x
            inp = (x0 if i == 0 else x) if mi is None else mi
            u = net(inp, t, **extras)  # the call, inlined: checked by call.check on a mismatch
            if not isinstance(u, torch.Tensor) or u.shape != shape or u.dtype != dtype:
                call.check(u, inp, t, extras)
            if guided:
                u = self.combine(st, u, self.w)  # [2Bp] -> [Bp] float32
            us[i].copy_(u)  # before x is overwritten (a model may return its input)
            if not ref:
                bns_step(x0, st.us, i, self.a, self.b, out=x,
                         model_in=None if i == last else mi, backend=self.backend)
                continue
            torch.mul(x0, a, out=x)
            for uj, bij in zip(us, bs):  # j ascending: the reference's (and kernel's) order
                if low:
                    acc.copy_(uj)
                    acc.mul_(bij)
                else:
                    torch.mul(uj, bij, out=acc)
                x.add_(acc)
            if mi is not None and i != last:
                self.write_in(st, x, x2)
