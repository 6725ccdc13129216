"""The engine program of Bespoke solvers (kind ``"bespoke"``, base RK1 or RK2).

Device table: ``[n, NUM_COLS]`` float32 (``BespokeSolver.coefficient_table``; layout in
``bespoke_fast.ops.table``), the guidance scale in its ``W`` column; the per-step coefficients
are 0-d views into it, made once. Buffers: RK2 adds ``x_mid`` float32 ``[Bp, *shape]``; guidance
adds the combine's float32 scratch (``Program.guidance_buffers``). Step ``i`` (RK2; RK1 has the
first stage only, ``a``/``b``)::

    u1 = net(model_in, t[2i], **extras)
    x_mid = A x + B u1         -> also writes model_in          (ops.rk.rk2_stage1)
    u2 = net(model_in, t[2i+1], **extras)
    x = C x + D x_mid + E u2   -> also writes model_in          (ops.rk.rk2_stage2)

When the model runs in float32 without guidance, the model input IS the state buffer (``x`` or
``x_mid``) and no ``model_in`` exists. On the ``"reference"`` backend each stage is the
reference op's own torch ops (``mul(out=)``, then ``addcmul_`` per term; guidance: upcast,
``sub``, ``addcmul``; a low-precision ``u`` is read by ``addcmul_`` in place of the reference's
upcast copy, the same float32 values), so the result is bitwise the reference's.

Exact coefficients (eager only): ``loop(..., exact=True)`` (the sampler's eager path) skips the
terms that are exact no-ops for this solver, decided once per solver (at build and
:meth:`RKProgram.load`, on the host): ``A == 1`` (RK1 ``a == 1``) makes stage 1 ONE
``addcmul(x, u, B, out=x_mid)`` (the same kernel on the same values: bitwise), ``C == 1`` drops
``mul(x, C)`` (bitwise) and ``D == 0`` drops ``addcmul_(x_mid, 0)``. The identity solver (the
base midpoint / Euler rule) thus runs 2 ops per RK2 step instead of 5. Tolerance of the
``D == 0`` skip: the result equals the reference's (``torch.equal``) except for the sign of an
exact zero, and a NaN/Inf in ``x_mid`` reaches ``x`` only through the model's output (the
reference adds ``0 * x_mid``, which is NaN then). A captured graph always runs the general loop
(``exact=False``): ``load_solver`` refills the table under it.
"""
from __future__ import annotations

import torch

from ..ops import table as T
from ..ops.rk import rk1_step, rk2_stage1, rk2_stage2
from .program import Program
from .._checks import InvalidArgumentError

__all__ = ["RKProgram"]


def _shares(u: torch.Tensor, buf: torch.Tensor) -> bool:
    """``u`` lives in ``buf``'s storage (the Triton paths' test)."""
    return u.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


# A model returning its input (or a view of it: the same shape, so the same first element)
# would be clobbered by the in-place update of that buffer before it is read: the reference
# loops compare the output's data pointer with the buffer's (a host call, no op) and copy it
# then.


class RKProgram(Program):
    """RK1 / RK2 steps on the ``[n, NUM_COLS]`` table (see the module docs)."""

    kind = "bespoke"
    swap_keys = ("kind", "base", "n_steps")

    def __init__(self, solver, **kwargs):
        if solver.base not in ("rk1", "rk2"):
            raise InvalidArgumentError(f"unsupported bespoke base {solver.base!r}")
        self._base = solver.base
        self.stages = 1 if self._base == "rk1" else 2
        super().__init__(solver, **kwargs)
        # step i's coefficients (A, B, C, D, E, W) as 0-d views of the table: made once
        self.coefs = [tuple(self.table[i, c] for c in (T.A, T.B, T.C, T.D, T.E, T.W))
                      for i in range(self.n_steps)]
        self._plan(solver)

    def _plan(self, solver) -> None:
        """The eager plan: per step the coefficient views and which terms are exact no-ops,
        ``(A == 1, C == 1, D == 0)`` (RK1: ``a == 1``), decided ONCE per solver (here and in
        :meth:`load`) on the solver's float32 table made on the host (the values the device
        table holds; one read, from the solver's device). ``general`` is the same list with no
        skips: what a captured graph runs (it must stay right when ``load`` refills the table)."""
        with torch.no_grad():
            host = solver.coefficient_table(guidance_scale=self.guidance_scale,
                                            dtype=torch.float32)
        # a solver on the meta device (shape checks) has no values: no skips
        flags = (host[:, [T.A, T.C, T.D]].tolist() if host.device.type != "meta" else
                 [(None, None, None)] * self.n_steps)
        self.general = [(*c, False, False, False) for c in self.coefs]
        self.exact = [(*c, a == 1.0, cc == 1.0, d == 0.0) for c, (a, cc, d) in
                      zip(self.coefs, flags)]

    def load(self, solver) -> None:
        super().load(solver)
        self._plan(solver)

    def loop(self, st, x, x0, extras, call, exact=False) -> None:
        steps = self.exact if exact else self.general
        if self._base == "rk1":
            self._loop_rk1(st, x, steps, extras, call)
        else:
            self._loop_rk2(st, x, steps, extras, call)

    @property
    def base(self):
        return self._base

    def device_table(self, solver) -> torch.Tensor:
        return solver.coefficient_table(guidance_scale=self.guidance_scale, dtype=torch.float32,
                                        device=self.device).detach().contiguous()

    def time_view(self) -> torch.Tensor:
        # T0, TM are the table's first two columns: call order t_k0(0), t_km(0), t_k0(1), ...
        return self.table[:, T.T0:T.T0 + self.stages].unsqueeze(-1)

    def set_guidance_scale(self, scale: float) -> None:
        super().set_guidance_scale(scale)
        self.table[:, T.W].fill_(self.guidance_scale)

    def buffers(self, run_b, shape, model_dtype) -> dict:
        out = self.guidance_buffers(run_b, shape, model_dtype) if self.guided else {}
        if self._base == "rk2":
            x_mid = torch.zeros(run_b, *shape, dtype=torch.float32, device=self.device)
            out.update(x_mid=x_mid, x_mid2=x_mid.expand(2, *x_mid.shape) if self.guided else None)
        return out

    def _kernel_velocity(self, u, out):
        # the Triton ops read u after writing out: a model returning (a view of) its input
        # would be clobbered; and the kernels index u as contiguous
        if _shares(u, out):
            return u.clone()
        return u if u.is_contiguous() else u.contiguous()

    def _eager_velocity(self, st, call, inp, t, extras, w, written):
        """The reference loop's model call, inlined (``call.check`` only on a mismatch), the
        guidance combined, and a copy of a velocity that is (a view of) ``written``, the state
        the step overwrites before it reads u."""
        u = call.net(inp, t, **extras)
        if not isinstance(u, torch.Tensor) or u.shape != inp.shape or u.dtype != inp.dtype:
            call.check(u, inp, t, extras)
        if self.guided:
            return self.combine(st, u, w)
        return u.clone() if u.data_ptr() == written else u

    def _loop_rk1(self, st, x, steps, extras, call) -> None:
        mi, guided, last = st.model_in, self.guided, self.n_steps - 1
        x2 = x.expand(2, *x.shape) if guided else None
        self.write_in(st, x, x2)
        inp = x if mi is None else mi
        if self.backend != "reference":
            for i, t in enumerate(st.t_rows):
                u = self._kernel_velocity(call(inp, t, extras), x)
                rk1_step(x, u, self.table, i, model_in=None if i == last else mi,
                         guidance=guided, out=x, backend=self.backend)
            return
        xp, velocity = x.data_ptr(), self._eager_velocity
        for i, (a, b, _, _, _, w, a1, _, _), t in zip(range(last + 1), steps, st.t_rows):
            u = velocity(st, call, inp, t, extras, w, xp)
            if not a1:  # a == 1: x * a is x itself (exact), so the step is one addcmul_
                torch.mul(x, a, out=x)
            x.addcmul_(u, b)
            if mi is not None and i != last:
                self.write_in(st, x, x2)

    def _loop_rk2(self, st, x, steps, extras, call) -> None:
        mi, guided, last = st.model_in, self.guided, self.n_steps - 1
        xm, xm2 = st.x_mid, st.x_mid2
        x2 = x.expand(2, *x.shape) if guided else None
        self.write_in(st, x, x2)
        in1, in2 = (x, xm) if mi is None else (mi, mi)
        ts1, ts2 = st.t_rows[0::2], st.t_rows[1::2]
        if self.backend != "reference":
            for i, t1, t2 in zip(range(last + 1), ts1, ts2):
                u = self._kernel_velocity(call(in1, t1, extras), xm)
                rk2_stage1(x, u, self.table, i, model_in=mi, guidance=guided, out=xm,
                           backend=self.backend)
                u = self._kernel_velocity(call(in2, t2, extras), x)
                rk2_stage2(x, xm, u, self.table, i, model_in=None if i == last else mi,
                           guidance=guided, out=x, backend=self.backend)
            return
        xp, xmp, velocity = x.data_ptr(), xm.data_ptr(), self._eager_velocity
        for i, (a, b, c, d, e, w, a1, c1, d0), t1, t2 in zip(range(last + 1), steps, ts1, ts2):
            u = velocity(st, call, in1, t1, extras, w, xmp)
            if a1:  # A == 1: the same addcmul kernel on x itself (x * 1 is x: bitwise)
                torch.addcmul(x, u, b, out=xm)
            else:
                torch.mul(x, a, out=xm)
                xm.addcmul_(u, b)
            if mi is not None:
                self.write_in(st, xm, xm2)
            u = velocity(st, call, in2, t2, extras, w, xp)
            if not c1:  # C == 1: x * C is x itself (exact)
                torch.mul(x, c, out=x)
            if not d0:  # D == 0: D x_mid adds only a zero (see the module docs)
                x.addcmul_(xm, d)
            x.addcmul_(u, e)
            if mi is not None and i != last:
                self.write_in(st, x, x2)
