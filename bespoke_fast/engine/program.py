"""What an engine program is: the part of :class:`~bespoke_fast.engine.FastSampler` that
belongs to one solver kind. ``FastSampler`` keeps what every kind shares (buffers ``x``,
``model_in``, ``t`` and the extras; the graph cache, capture, padding, streaming, stats) and
hands the rest to the program of its solver's kind (``engine.rk``, ``engine.bns``):

* its **device table** (:attr:`Program.table`, layout in ``bespoke_fast.ops.table``), built
  from the solver and refilled in place by :meth:`Program.load` (no re-capture);
* its **buffers** (:meth:`Program.buffers`: RK2 ``x_mid``; BNS ``x0`` and ``us``), made once per
  cached state;
* its **step** (:meth:`Program.step`): the model call(s) and the op of step ``i``, on those
  buffers only (no host reads, no allocation), so the sampler can capture the loop as it is.
"""
from __future__ import annotations

import torch

__all__ = ["Program"]


class Program:
    """Base of the per-kind engine programs.

    Args:
        solver: the solver (``kind`` must be the program's).
        device: where the table lives. backend: ``"reference"`` or ``"triton"`` (resolved).
        guided: the network runs on ``[2Bp]`` batches (cond half first) and the op combines them.
        guidance_scale: ``w``. alias: the model reads the float32 state itself (no ``model_in``).

    Subclasses set ``kind`` and ``swap_keys`` (what another solver must share to be swapped in)
    and implement :meth:`device_table`, :meth:`buffers`, :meth:`start` and :meth:`step`.
    """

    kind = ""
    swap_keys: tuple = ("kind", "n_steps")

    def __init__(self, solver, *, device, backend, guided, guidance_scale, alias):
        self.n_steps = int(solver.n_steps)
        self.device, self.backend = device, backend
        self.guided, self.guidance_scale, self.alias = guided, float(guidance_scale), alias
        with torch.no_grad():
            self.table = self.device_table(solver)

    @property
    def base(self):
        """The base solver (``"rk1"`` / ``"rk2"``) where the kind has one, else ``None``."""
        return None

    def device_table(self, solver) -> torch.Tensor:
        """The solver's float32 coefficients in this program's layout, on the device."""
        raise NotImplementedError

    def load(self, solver) -> None:
        """Copy another solver's coefficients into the table: ``ValueError`` when it differs in
        one of ``swap_keys`` (then nothing changes)."""
        for attr in self.swap_keys:
            mine, theirs = getattr(self, attr), getattr(solver, attr, None)
            if mine != theirs:
                raise ValueError(f"load_solver: {attr} mismatch: the sampler runs {attr}={mine!r}, "
                                 f"the new solver has {attr}={theirs!r}; build a new FastSampler")
        with torch.no_grad():
            self.table.copy_(self.device_table(solver))

    def set_guidance_scale(self, scale: float) -> None:
        self.guidance_scale = float(scale)

    def buffers(self, run_b: int, shape: tuple, model_dtype: torch.dtype) -> dict:
        """The program's own buffers for one cached state (set as attributes of the state)."""
        return {}

    def start(self, st) -> torch.Tensor:
        """The buffer the start noise ``x0`` is copied into."""
        return st.x

    def step(self, st, i: int, last: bool, call) -> None:
        """Step ``i`` on ``st``'s buffers; ``call(st, inp, t)`` runs the network on ``inp`` at the
        0-d device time ``t`` (copied into ``st.t``, never read back) and returns its output.
        ``last``: no next model input is needed."""
        raise NotImplementedError
