"""The engine program of Bespoke solvers (kind ``"bespoke"``, base RK1 or RK2).

Device table: ``[n, NUM_COLS]`` float32 (``BespokeSolver.coefficient_table``; layout in
``bespoke_fast.ops.table``), the guidance scale in its ``W`` column. Buffers: RK2 adds
``x_mid`` float32 ``[Bp, *shape]``. Step ``i`` (RK2; RK1 has the first stage only, ``a``/``b``)::

    t <- table[i, T0];  u1 = net(model_in, t, **extras)
    x_mid = A x + B u1         -> also writes model_in          (ops.rk.rk2_stage1)
    t <- table[i, TM];  u2 = net(model_in, t, **extras)
    x = C x + D x_mid + E u2   -> also writes model_in          (ops.rk.rk2_stage2)

When the model runs in float32 without guidance, the model input IS the state buffer (``x`` or
``x_mid``) and no ``model_in`` exists.
"""
from __future__ import annotations

import torch

from ..ops import table as T
from ..ops.rk import rk1_step, rk2_stage1, rk2_stage2
from .program import Program

__all__ = ["RKProgram"]


class RKProgram(Program):
    """RK1 / RK2 steps on the ``[n, NUM_COLS]`` table (see the module docs)."""

    kind = "bespoke"
    swap_keys = ("kind", "base", "n_steps")

    def __init__(self, solver, **kwargs):
        if solver.base not in ("rk1", "rk2"):
            raise ValueError(f"unsupported bespoke base {solver.base!r}")
        self._base = solver.base
        super().__init__(solver, **kwargs)
        self.step = self._step_rk1 if self._base == "rk1" else self._step_rk2

    @property
    def base(self):
        return self._base

    def device_table(self, solver) -> torch.Tensor:
        return solver.coefficient_table(guidance_scale=self.guidance_scale, dtype=torch.float32,
                                        device=self.device).detach().contiguous()

    def set_guidance_scale(self, scale: float) -> None:
        super().set_guidance_scale(scale)
        self.table[:, T.W].fill_(self.guidance_scale)

    def buffers(self, run_b, shape, model_dtype) -> dict:
        if self._base == "rk1":
            return {}
        return {"x_mid": torch.zeros(run_b, *shape, dtype=torch.float32, device=self.device)}

    def _velocity(self, st, inp, i, col, out, call):
        u = call(st, inp, self.table[i, col])
        if u.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            u = u.clone()  # a model returning (a view of) its input: the in-place update would clobber it
        elif self.backend == "triton" and not u.is_contiguous():
            u = u.contiguous()
        return u

    def _step_rk1(self, st, i, last, call) -> None:
        u = self._velocity(st, st.x if self.alias else st.model_in, i, T.T0, st.x, call)
        rk1_step(st.x, u, self.table, i, model_in=None if last else st.model_in,
                 guidance=self.guided, out=st.x, backend=self.backend)

    def _step_rk2(self, st, i, last, call) -> None:
        u1 = self._velocity(st, st.x if self.alias else st.model_in, i, T.T0, st.x_mid, call)
        rk2_stage1(st.x, u1, self.table, i, model_in=st.model_in, guidance=self.guided,
                   out=st.x_mid, backend=self.backend)
        u2 = self._velocity(st, st.x_mid if self.alias else st.model_in, i, T.TM, st.x, call)
        rk2_stage2(st.x, st.x_mid, u2, self.table, i, model_in=None if last else st.model_in,
                   guidance=self.guided, out=st.x, backend=self.backend)
