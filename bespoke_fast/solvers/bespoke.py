"""The Bespoke scale-time solver family on an RK1 / RK2 base (method.md sections 3-5).

A solver with ``n`` steps on a uniform r grid (``h = 1/n``) holds free scalars ``t_k, tdot_k,
s_k, sdot_k`` at the grid points (and half points for RK2, ``k = 0..2n``). In x coordinates::

    RK1:  x_{i+1} = a_i x_i + b_i u(t_i, x_i)
          a_i = (s_i + h sdot_i) / s_{i+1},   b_i = h tdot_i s_i / s_{i+1}

    RK2:  x_mid   = A_i x_i + B_i u(t_k0, x_i)                     (k0 = 2i, km = 2i+1, k1 = 2i+2)
          x_{i+1} = C_i x_i + D_i x_mid + E_i u(t_km, x_mid)
          A_i = (s_k0 + (h/2) sdot_k0) / s_km,  B_i = (h/2) tdot_k0 s_k0 / s_km,
          C_i = s_k0 / s_k1,  D_i = h sdot_km / s_k1,  E_i = h tdot_km s_km / s_k1

Parametrization (unconstrained, identity at init; ``m = n`` for RK1, ``2n`` for RK2)::

    t    = [0, cumsum(|theta_t|) / sum(|theta_t|)]     theta_t    [m]  init 1
    tdot = exp(theta_tdot)                              theta_tdot [m]  init 0  (points 0..m-1)
    s    = [1, exp(theta_s)]                            theta_s    [m]  init 0  (points 1..m)
    sdot = theta_sdot                                   theta_sdot [m]  init 0  (points 0..m-1)

``tdot`` and ``sdot`` at the last point are never used by a step, so they are not stored. The
``m`` entries of ``theta_t`` carry one redundant overall scale (only their ratios matter), so the
solver has ``4m - 1`` free scalars: ``4n - 1`` (RK1) or ``8n - 1`` (RK2), although it stores
``4m`` raw numbers. Parameters are float64: they are ~80 numbers and the identity solver then
reproduces plain Euler / midpoint bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import call_model, check_choice, check_int, check_state
from ..ops import table as T
from ..ops.rk import rk1_step_ref, rk2_stage1_ref, rk2_stage2_ref
from .interface import Solver
from .._checks import InvalidArgumentError

__all__ = ["BespokeSolver", "BASES"]

BASES = ("rk1", "rk2")


class BespokeSolver(Solver):
    """A learned scale-time solver on an RK1 (Euler) or RK2 (midpoint) base.

    Args:
        base: ``"rk2"`` (NFE = 2 n) or ``"rk1"`` (NFE = n).
        n_steps: number of steps n (>= 1).

    Starts at the identity transform, i.e. plain midpoint / Euler on the uniform grid.

    Attributes / methods: ``nfe``, ``num_parameters``, ``tables()``, ``coefficients()``,
    ``coefficient_table()``, ``lipschitz()``, ``sample(model, x0, **extras)``, ``save(path)``,
    ``BespokeSolver.load(path)``. ``meta`` is a dict saved with the file (model it was fitted
    to, training and validation figures).

    Example::

        >>> solver = BespokeSolver("rk2", n_steps=5)          # NFE 10, 39 free scalars
        >>> x1 = solver.sample(model, torch.randn(16, 64))    # == midpoint with 5 steps
        >>> solver.save("my_solver.json"); BespokeSolver.load("my_solver.json")
    """

    kind = "bespoke"
    header_key = "base"
    headers = BASES
    parameter_names = ("theta_t", "theta_tdot", "theta_s", "theta_sdot")

    def __init__(self, base: str = "rk2", n_steps: int = 10):
        super().__init__()
        self.base = check_choice("base", base, BASES)
        self.n_steps = check_int("n_steps", n_steps)
        m = self.n_points - 1
        f64 = dict(dtype=torch.float64)
        self.theta_t = nn.Parameter(torch.ones(m, **f64))
        self.theta_tdot = nn.Parameter(torch.zeros(m, **f64))
        self.theta_s = nn.Parameter(torch.zeros(m, **f64))
        self.theta_sdot = nn.Parameter(torch.zeros(m, **f64))
        self.meta: dict = {}

    # ------------------------------------------------------------------ sizes
    @property
    def n_points(self) -> int:
        """Grid points in r (including both ends): n + 1 (RK1) or 2n + 1 (RK2)."""
        return self.n_steps + 1 if self.base == "rk1" else 2 * self.n_steps + 1

    @classmethod
    def nfe_for(cls, header: str, n_steps: int) -> int:
        return n_steps if header == "rk1" else 2 * n_steps

    @classmethod
    def file_sizes(cls, header: str, n_steps: int) -> tuple:
        m = cls.nfe_for(header, n_steps)  # grid intervals: n (RK1) or 2n (RK2)
        return ({"theta_t": m, "theta_tdot": m, "theta_s": m, "theta_sdot": m},
                {"t": m + 1, "tdot": m, "s": m + 1, "sdot": m})

    @classmethod
    def from_header(cls, header: str, n_steps: int) -> "BespokeSolver":
        return cls(header, n_steps)

    @property
    def num_parameters(self) -> int:
        """Free scalars: 4n - 1 (RK1) or 8n - 1 (RK2) (theta_t's overall scale is not free)."""
        return 4 * (self.n_points - 1) - 1

    def extra_repr(self) -> str:
        return f"base={self.base!r}, n_steps={self.n_steps}, nfe={self.nfe}"

    # ------------------------------------------------------------------ tables
    def tables(self) -> dict:
        """The derived float64 tables: ``t`` [m+1] (0 ... 1, strictly increasing), ``tdot`` [m],
        ``s`` [m+1] (s_0 = 1, all > 0), ``sdot`` [m]; m = n (RK1) or 2n (RK2). Differentiable."""
        inc = self.theta_t.abs()
        t = torch.cat([inc.new_zeros(1), torch.cumsum(inc, 0) / inc.sum()])
        s = torch.cat([self.theta_s.new_ones(1), torch.exp(self.theta_s)])
        return {"t": t, "tdot": torch.exp(self.theta_tdot), "s": s, "sdot": self.theta_sdot}

    def coefficients(self) -> dict:
        """Per-step model times and update scalars (float64, each ``[n]``, differentiable).

        RK1: ``t`` (model time), ``a``, ``b``.
        RK2: ``t0`` (first model time), ``tm`` (second), ``A``, ``B``, ``C``, ``D``, ``E``.
        """
        tb = self.tables()
        t, tdot, s, sdot = tb["t"], tb["tdot"], tb["s"], tb["sdot"]
        h = 1.0 / self.n_steps
        if self.base == "rk1":
            return {"t": t[:-1], "a": (s[:-1] + h * sdot) / s[1:], "b": h * tdot * s[:-1] / s[1:]}
        k0, km, k1 = slice(0, -1, 2), slice(1, None, 2), slice(2, None, 2)
        s0, sm, s1 = s[k0], s[km], s[k1]
        return {
            "t0": t[k0], "tm": t[km],
            "A": (s0 + (h / 2) * sdot[k0]) / sm,
            "B": (h / 2) * tdot[k0] * s0 / sm,
            "C": s0 / s1,
            "D": h * sdot[km] / s1,
            "E": h * tdot[km] * sm / s1,
        }

    def coefficient_table(self, guidance_scale: float = 1.0, dtype=torch.float32,
                          device=None) -> torch.Tensor:
        """The packed ``[n, NUM_COLS]`` table the ops, kernels and engine read (``bespoke_fast.ops.table``).

        Differentiable when ``dtype`` is float64 (used by ``sample`` and the trainer)."""
        c = self.coefficients()
        tab = c[next(iter(c))].new_zeros(self.n_steps, T.NUM_COLS)
        cols = ({T.T0: "t", T.A: "a", T.B: "b"} if self.base == "rk1" else
                {T.T0: "t0", T.TM: "tm", T.A: "A", T.B: "B", T.C: "C", T.D: "D", T.E: "E"})
        tab = tab.index_copy(1, torch.tensor(list(cols), device=tab.device),
                             torch.stack([c[name] for name in cols.values()], 1))
        tab[:, T.W] = float(guidance_scale)
        return tab.to(dtype=dtype, device=device)

    def sampler_tables(self) -> dict:
        """``{"table": coefficient_table(dtype=float32)}``: what the engine and schedulers read."""
        return {"table": self.coefficient_table(dtype=torch.float32)}

    def lipschitz(self, L_tau: float = 1.0) -> torch.Tensor:
        """Per-step Lipschitz constants ``[n]`` (method.md section 5)::

            Lbar_k = |sdot_k| / s_k + tdot_k L_tau
            RK1: L_i = (s_i / s_{i+1}) (1 + h Lbar_i)
            RK2: L_i = (s_k0 / s_k1) (1 + h Lbar_km (1 + (h/2) Lbar_k0))
        """
        tb = self.tables()
        s, h = tb["s"], 1.0 / self.n_steps
        lbar = tb["sdot"].abs() / s[:-1] + tb["tdot"] * L_tau
        if self.base == "rk1":
            return s[:-1] / s[1:] * (1 + h * lbar)
        return s[0:-1:2] / s[2::2] * (1 + h * lbar[1::2] * (1 + (h / 2) * lbar[0::2]))

    # ------------------------------------------------------------------ sampling
    def model_times(self) -> torch.Tensor:
        """``[n, stages]`` model evaluation times (float64)."""
        c = self.coefficients()
        return c["t"][:, None] if self.base == "rk1" else torch.stack([c["t0"], c["tm"]], 1)

    def step(self, model, x: torch.Tensor, i: int, table: torch.Tensor | None = None,
             check_finite: bool = False, **extras) -> torch.Tensor:
        """One bespoke step ``x_i -> x_{i+1}`` with the reference ops (differentiable)."""
        table = self.coefficient_table(dtype=torch.float64) if table is None else table
        row = table[i].to(x.dtype)

        def u(y, col):
            return call_model(model, y, row[col].expand(y.shape[0]), extras, check_finite)

        if self.base == "rk1":
            return rk1_step_ref(x, u(x, T.T0), table, i)
        x_mid = rk2_stage1_ref(x, u(x, T.T0), table, i)
        return rk2_stage2_ref(x, x_mid, u(x_mid, T.TM), table, i)

    def sample(self, model, x0: torch.Tensor, check_finite: bool = False,
               return_trajectory: bool = False, **extras) -> torch.Tensor:
        """Pure-torch reference sampler: ``x0`` (noise, ``[B, ...]``) -> ``x(1)`` (``[B, ...]``).

        The state keeps x0's dtype; coefficients are computed in float64 and cast to it.
        Differentiable in the solver parameters (used for end-to-end fine-tuning).
        ``return_trajectory`` returns ``[n + 1, B, ...]`` states at the grid points.

        Example::

            >>> x1 = BespokeSolver.load("solver.json").sample(model, torch.randn(8, 64))
        """
        check_state("x0", x0)
        table = self.coefficient_table(dtype=torch.float64, device=x0.device)
        x, trajectory = x0, [x0]
        for i in range(self.n_steps):
            x = self.step(model, x, i, table, check_finite, **extras)
            if return_trajectory:
                trajectory.append(x)
        return torch.stack(trajectory) if return_trajectory else x

    # ------------------------------------------------------------------ construction / files
    @classmethod
    def from_tables(cls, base: str, t, tdot, s, sdot) -> "BespokeSolver":
        """Build a solver with the given tables (t [m+1] from 0 to 1 increasing; s [m+1] with
        s_0 = 1, positive; tdot [m] positive; sdot [m]); m = n (RK1) or 2n (RK2)."""
        t, tdot, s, sdot = (torch.as_tensor(v, dtype=torch.float64).reshape(-1)
                            for v in (t, tdot, s, sdot))
        m = t.numel() - 1
        n = m if base == "rk1" else m // 2
        solver = cls(base, n)
        if solver.n_points != m + 1 or tdot.numel() != m or s.numel() != m + 1 or sdot.numel() != m:
            raise InvalidArgumentError(f"table sizes do not fit a {base} solver: t {t.numel()}, "
                             f"tdot {tdot.numel()}, s {s.numel()}, sdot {sdot.numel()}")
        inc = t.diff()
        if t[0] != 0 or t[-1] != 1 or (inc <= 0).any():
            raise InvalidArgumentError("t must increase strictly from 0 to 1")
        if (tdot <= 0).any() or (s <= 0).any() or s[0] != 1:
            raise InvalidArgumentError("tdot and s must be positive and s[0] must be 1")
        with torch.no_grad():
            solver.theta_t.copy_(inc * m)  # scale-free: any positive multiple gives the same t
            solver.theta_tdot.copy_(tdot.log())
            solver.theta_s.copy_(s[1:].log())
            solver.theta_sdot.copy_(sdot)
        return solver
