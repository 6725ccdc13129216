"""What an engine program is: the part of :class:`~bespoke_fast.engine.FastSampler` that
belongs to one solver kind. ``FastSampler`` keeps what every kind shares (the model-input
buffer, the model times, the graph cache, capture, padding, streaming, stats) and hands the rest
to the program of its solver's kind (``engine.rk``, ``engine.bns``):

* its **device table** (:attr:`Program.table`, layout in ``bespoke_fast.ops.table``), built
  from the solver and refilled in place by :meth:`Program.load` (no re-capture), and the
  per-step **coefficient views** into it (0-d views made once per program: reading a
  coefficient costs no op, and a refilled table shows through them);
* its **time view** (:meth:`Program.time_view`): the model times of the whole solve, in call
  order, as a view of the table;
* its **buffers** (:meth:`Program.buffers`: RK2 ``x_mid``; BNS ``us``; scratch for guidance and
  low-precision sums), made once per cached state;
* its **loop** (:meth:`Program.loop`): every model call and update op of the solve, on the
  state's buffers and the caller's ``x`` (no host reads, no allocation beyond what the model
  makes), so the sampler can capture it as it is or run it eagerly on a fresh output tensor.

The ``"reference"`` backend computes each update with the same torch ops, in the same order,
as the reference ops of ``bespoke_fast.ops`` (the correctness oracle), only on precomputed
views and preallocated buffers: the result is bitwise equal to them (``tests/test_eager_ops.py``).
The ``"triton"`` backend calls the fused kernels.
"""
from __future__ import annotations

import torch
from .._checks import InvalidArgumentError

__all__ = ["Program"]


class Program:
    """Base of the per-kind engine programs.

    Args:
        solver: the solver (``kind`` must be the program's).
        device: where the table lives. backend: ``"reference"`` or ``"triton"`` (resolved).
        guided: the network runs on ``[2Bp]`` batches (cond half first) and the op combines them.
        guidance_scale: ``w``. alias: the model reads the float32 state itself (no ``model_in``).

    Subclasses set ``kind``, ``swap_keys`` (what another solver must share to be swapped in) and
    ``stages`` (model calls per step) and implement :meth:`device_table`, :meth:`time_view`,
    :meth:`buffers` and :meth:`loop`.
    """

    kind = ""
    swap_keys: tuple = ("kind", "n_steps")
    stages = 1

    def __init__(self, solver, *, device, backend, guided, guidance_scale, alias):
        self.n_steps = int(solver.n_steps)
        self.device, self.backend = device, backend
        self.guided, self.guidance_scale, self.alias = guided, float(guidance_scale), alias
        self.version = 0  # bumped by load(): cached states refresh their model times
        with torch.no_grad():
            self.table = self.device_table(solver)

    @property
    def base(self):
        """The base solver (``"rk1"`` / ``"rk2"``) where the kind has one, else ``None``."""
        return None

    @property
    def nfe(self) -> int:
        return self.n_steps * self.stages

    def device_table(self, solver) -> torch.Tensor:
        """The solver's float32 coefficients in this program's layout, on the device."""
        raise NotImplementedError

    def time_view(self) -> torch.Tensor:
        """The model times ``[n_steps, stages, 1]``, call ``k = stages * i + s`` at ``[i, s]``: a
        view of the table (so a refilled table shows through it)."""
        raise NotImplementedError

    def load(self, solver) -> None:
        """Copy another solver's coefficients into the table: ``ValueError`` when it differs in
        one of ``swap_keys`` (then nothing changes)."""
        for attr in self.swap_keys:
            mine, theirs = getattr(self, attr), getattr(solver, attr, None)
            if mine != theirs:
                raise InvalidArgumentError(f"load_solver: {attr} mismatch: the sampler runs {attr}={mine!r}, "
                                 f"the new solver has {attr}={theirs!r}; build a new FastSampler")
        with torch.no_grad():
            self.table.copy_(self.device_table(solver))
        self.version += 1

    def set_guidance_scale(self, scale: float) -> None:
        self.guidance_scale = float(scale)

    def buffers(self, run_b: int, shape: tuple, model_dtype: torch.dtype) -> dict:
        """The program's own buffers for one cached state (set as attributes of the state)."""
        return {}

    def guidance_buffers(self, run_b: int, shape: tuple, model_dtype: torch.dtype) -> dict:
        """Scratch of the guidance combine (float32): ``g_u`` ``[2Bp]`` (the raw output upcast,
        only for a low-precision model) with its halves ``g_cond`` / ``g_unc``, ``g_diff`` and
        ``g`` ``[Bp]`` (the combined velocity)."""
        f32 = dict(dtype=torch.float32, device=self.device)
        out = {"g_diff": torch.empty(run_b, *shape, **f32), "g": torch.empty(run_b, *shape, **f32),
               "g_u": None}
        if model_dtype != torch.float32:
            g_u = torch.empty(2 * run_b, *shape, **f32)
            out.update(g_u=g_u, g_cond=g_u[:run_b], g_unc=g_u[run_b:])
        return out

    def combine(self, st, u, w) -> torch.Tensor:
        """Guided velocity ``u_unc + w (u_cond - u_unc)`` in float32 into ``st.g``: the ops of
        ``ops.rk.guidance_combine_ref`` (upcast, halves, sub, addcmul), into the state's buffers."""
        if st.g_u is not None:
            st.g_u.copy_(u)
            cond, unc = st.g_cond, st.g_unc
        else:
            cond, unc = u.chunk(2)
        torch.sub(cond, unc, out=st.g_diff)
        return torch.addcmul(unc, st.g_diff, w, out=st.g)

    @staticmethod
    def write_in(st, src: torch.Tensor, src2: torch.Tensor | None = None) -> None:
        """Copy the state ``src`` into the model input (``None``: nothing to write), in its
        dtype; the ``[2Bp]`` guidance input gets it in both halves in ONE copy, from ``src2``
        (``src`` expanded to ``[2, Bp, ...]``, made by the caller when it has one)."""
        if st.model_in is None:
            return
        if st.model_in2 is not None:
            st.model_in2.copy_(src.expand(2, *src.shape) if src2 is None else src2)
        else:
            st.model_in.copy_(src)

    def loop(self, st, x: torch.Tensor, x0: torch.Tensor, extras: dict, call,
             exact: bool = False) -> None:
        """The whole solve on ``st``'s buffers. ``x`` float32 ``[Bp, *shape]`` receives the
        result; ``x0`` float32 ``[Bp, *shape]`` is the start (read only; RK programs get
        ``x0 is x`` and update it in place). ``exact`` (the eager path only, never a captured
        graph) lets the program skip terms that are exact no-ops for the loaded solver's
        coefficients (a multiply by 1, an added 0 times a state; ``engine.rk``), read once per
        solver. ``call(inp, t, extras)`` runs the network on
        ``inp`` at the ``[rows]`` time ``t`` and returns its checked output; a loop may instead
        call ``call.net(inp, t, **extras)`` itself and hand an output that is not a tensor of
        ``inp``'s shape and dtype to ``call.check(u, inp, t, extras)`` (which raises)."""
        raise NotImplementedError
