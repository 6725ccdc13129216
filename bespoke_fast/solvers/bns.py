"""Bespoke Non-Stationary (BNS) solvers (method.md section 6).

``n`` steps, NFE = n. The model is evaluated at the learned times ``t_0 = 0 < t_1 < ... < t_{n-1}``
and every step combines the start noise with ALL velocities so far::

    u_j     = u(t_j, x_j)                                  j = 0..n-1
    x_{i+1} = a_i x0 + sum_{j=0..i} b_ij u_j               i = 0..n-1;  x_n is the sample

Parametrization (unconstrained, float64)::

    t     = [0, cumsum(|theta_t|) / sum(|theta_t|)]     theta_t [n]            t [n+1], t_n = 1
    a     = theta_a                                     theta_a [n]            init 1
    b     = tril(theta_b)                               theta_b [n(n+1)/2]     row-major lower
                                                                               triangle of b [n, n]

``t_n = 1`` is not a model time; it closes the grid (solver files require ``t`` from 0 to 1).
The ``n`` entries of ``theta_t`` carry one redundant overall scale, so the solver stores
``n + n + n(n+1)/2 = n(n+5)/2`` raw numbers (method.md's count: 18 / 52 / 168 at NFE 4 / 8 / 16)
but has ``n(n+5)/2 - 1`` free scalars (``num_parameters``).

Identity initialisations (``init``), both on the uniform grid ``t_i = i / n``:

* ``"euler"``: ``a = 1``, ``b_ij = 1/n`` (j <= i): plain Euler with n steps.
* ``"midpoint"`` (n even, n/2 midpoint steps of size ``h = 2/n``): evaluation 2k is at the grid
  state ``x_{2k}`` (time ``k h``), evaluation 2k+1 at the stage state (time ``k h + h/2``)::

      x_{2k+1} = x_{2k} + (h/2) u_{2k}  = x0 + h sum_{l<k} u_{2l+1} + (h/2) u_{2k}
      x_{2k+2} = x_{2k} + h u_{2k+1}    = x0 + h sum_{l<=k} u_{2l+1}

  i.e. ``b[2k, 2l+1] = h`` (l < k), ``b[2k, 2k] = h/2``, ``b[2k+1, 2l+1] = h`` (l <= k), else 0.

Both reproduce ``bespoke_fast.solve(model, x0, "euler" / "midpoint", ...)`` (float64: to
rounding; the sums run in the same order, so usually bit for bit).
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import call_model, check_choice, check_int, check_state
from ..ops.bns import bns_step_ref
from .interface import Solver
from .._checks import InvalidArgumentError

__all__ = ["NonStationarySolver", "INITS", "init_coefficients"]

INITS = ("euler", "midpoint")


def init_coefficients(n_steps: int, init: str = "midpoint"):
    """``(a [n], b [n, n])`` float64 that write Euler / midpoint (NFE = n) in BNS form."""
    n = check_int("n_steps", n_steps)
    check_choice("init", init, INITS)
    a = torch.ones(n, dtype=torch.float64)
    b = torch.zeros(n, n, dtype=torch.float64)
    if init == "euler":
        h = torch.tensor(1.0, dtype=torch.float64) / n
        return a, torch.tril(torch.ones(n, n, dtype=torch.float64)) * h
    if n % 2:
        raise InvalidArgumentError(f"init='midpoint' needs an even number of steps (NFE = n, two evaluations "
                         f"per midpoint step), got n_steps={n}; use an even n or init='euler'")
    m = n // 2
    h = torch.tensor(1.0, dtype=torch.float64) / m        # the midpoint step 2/n, as solve() rounds it
    for k in range(m):
        b[2 * k, 1:2 * k:2] = h                           # x_{2k} = x0 + h sum_{l<k} u_{2l+1}
        b[2 * k, 2 * k] = h / 2                           # stage: + (h/2) u_{2k}
        b[2 * k + 1, 1:2 * k + 2:2] = h                   # x_{2k+2} = x0 + h sum_{l<=k} u_{2l+1}
    return a, b


class NonStationarySolver(Solver):
    """A learned non-stationary (BNS) solver: NFE = ``n_steps``.

    Args:
        n_steps: number of steps n = NFE (>= 1; even for ``init="midpoint"``).
        init: ``"midpoint"`` (n/2 midpoint steps) or ``"euler"`` (n Euler steps), written exactly
            in BNS form; the new solver reproduces that base solver.

    Attributes / methods: ``nfe``, ``num_parameters``, ``tables()``, ``coefficients()``,
    ``coefficient_tables()``, ``sample(model, x0, **extras)``, ``save(path)``,
    ``NonStationarySolver.load(path)``. ``meta`` is a dict saved with the file (model it was
    fitted to, training and validation figures).

    Example::

        >>> solver = NonStationarySolver(8, init="midpoint")      # NFE 8, 51 free scalars
        >>> x1 = solver.sample(model, torch.randn(16, 64))        # == midpoint with 4 steps
        >>> solver.save("bns.json"); NonStationarySolver.load("bns.json")
    """

    kind = "bns"
    header_key = "init"
    headers = INITS
    parameter_names = ("theta_t", "theta_a", "theta_b")

    def __init__(self, n_steps: int = 8, init: str = "midpoint"):
        super().__init__()
        self.n_steps = check_int("n_steps", n_steps)
        self.init = check_choice("init", init, INITS)
        a, b = init_coefficients(self.n_steps, init)
        rows, cols = self._tril()
        self.theta_t = nn.Parameter(torch.ones(self.n_steps, dtype=torch.float64))
        self.theta_a = nn.Parameter(a)
        self.theta_b = nn.Parameter(b[rows, cols].clone())
        self.meta: dict = {}

    @classmethod
    def from_solver(cls, solver, tol: float = 1e-9) -> "NonStationarySolver":
        """The BNS solver that samples exactly like ``solver`` (same NFE, same model calls).

        Any fixed-grid solver whose states are linear in the noise and the velocities so far is
        a BNS solver: Bespoke RK1/RK2 (the scale-time transform only changes the scalars),
        Euler, midpoint. The coefficients are read off by running ``solver.sample`` on a probe
        model (float64, batch 1): with the noise ``e_0`` and velocities ``u_j = e_(j+1)`` (unit
        vectors), each recorded state's entries are its coefficients, exactly and bit for bit the
        same on every run; a second run with random noise and velocities checks that the solver
        is linear in them. BNS
        evaluates the model first at ``(t = 0, x0)``; a solver that does not, that is not linear
        in its velocities (relative residual above ``tol``), or whose model times do not increase
        strictly below 1, is refused with a ValueError. The result starts a BNS fit from a fitted
        Bespoke solver (``train_bns(init=solver)``): it is never worse than that solver on the
        training loss.

        Example::

            >>> bns = NonStationarySolver.from_solver(BespokeSolver.load("bespoke_rk2_nfe10.json"))
            >>> bns.nfe                                                          # 10
        """
        name = f"{type(solver).__name__} (kind {getattr(solver, 'kind', '?')})"
        nfe = check_int("solver.nfe", getattr(solver, "nfe", None))

        def run(x0, velocities):          # (model times, model inputs, output) of one sample
            calls = []

            def probe(x, t, **extras):
                if len(calls) >= nfe:
                    raise InvalidArgumentError(f"{name} called the model more than its NFE ({nfe}) times")
                calls.append((float(t.reshape(-1)[0]), x.detach().double().clone()))
                return velocities[len(calls) - 1].to(x.dtype)

            with torch.no_grad():
                out = solver.sample(probe, x0.clone())
            if len(calls) != nfe:
                raise InvalidArgumentError(f"{name} called the model {len(calls)} times, not its NFE {nfe}")
            return ([t for t, _ in calls], [x for _, x in calls] + [out.detach().double()])

        # one-hot probe: x0 = e_0, u_j = e_(j+1), so each state's entries ARE its coefficients
        # (read off, no solve: bit-reproducible, hence a stable fingerprint for checkpoints)
        eye = torch.eye(nfe + 1, dtype=torch.float64)
        t_list, states = run(eye[:1], eye[1:, None])
        times = torch.tensor(t_list, dtype=torch.float64)
        if times[0] != 0 or not bool((times.diff() > 0).all()) or times[-1] >= 1:
            raise InvalidArgumentError(f"{name} evaluates the model at times {times.tolist()}; a BNS solver "
                             f"needs 0 = t_0 < t_1 < ... < t_(n-1) < 1")
        if not torch.equal(states[0], eye[:1]):
            raise InvalidArgumentError(f"{name} does not evaluate the model at the noise x0 first")
        coef = torch.cat(states[1:])                               # [n, n + 1]: (a_i, b_i0, ...)
        a = coef[:, 0].clone()
        b = torch.tril(coef[:, 1:])
        # the check: random noise and velocities must give the same states (linearity)
        gen = torch.Generator().manual_seed(0)
        dim = 2 * nfe + 16
        x0 = torch.randn(1, dim, generator=gen, dtype=torch.float64)
        u = torch.randn(nfe, 1, dim, generator=gen, dtype=torch.float64)
        _, got = run(x0, u)
        for i, x in enumerate(got[1:]):       # x_{i+1} = a_i x0 + sum_{j<=i} b_ij u_j
            want = a[i] * x0 + (b[i, :, None, None] * u).sum(0)
            residual = float((x - want).norm() / want.norm().clamp_min(1e-300))
            if residual > tol or bool(coef[i, i + 2:].ne(0).any()):
                raise InvalidArgumentError(f"{name} is not linear in its velocities (state {i + 1}: relative "
                                 f"residual {residual:.2e}); it cannot be written as a BNS solver")
        new = cls(nfe, init="midpoint" if nfe % 2 == 0 else "euler")
        rows, cols = new._tril()
        with torch.no_grad():
            new.theta_t.copy_(torch.cat([times, times.new_ones(1)]).diff())
            new.theta_a.copy_(a)
            new.theta_b.copy_(b[rows, cols])
        fingerprint = getattr(solver, "fingerprint", None)
        new.meta = {"initialised_from": {"kind": getattr(solver, "kind", None),
                                         "fingerprint": fingerprint() if fingerprint else None}}
        return new

    # ------------------------------------------------------------------ sizes
    @classmethod
    def nfe_for(cls, header: str, n_steps: int) -> int:
        return n_steps

    @classmethod
    def file_sizes(cls, header: str, n_steps: int) -> tuple:
        n, tri = n_steps, n_steps * (n_steps + 1) // 2
        return {"theta_t": n, "theta_a": n, "theta_b": tri}, {"t": n + 1, "a": n, "b": tri}

    @classmethod
    def header_problem(cls, header: str, n_steps: int):
        if header == "midpoint" and n_steps % 2:
            return f"init 'midpoint' needs an even number of steps, got n_steps={n_steps}"
        return None

    @classmethod
    def from_header(cls, header: str, n_steps: int) -> "NonStationarySolver":
        return cls(n_steps, init=header)

    @property
    def num_parameters(self) -> int:
        """Free scalars: ``n(n+5)/2 - 1`` (n - 1 interior times, n a's, n(n+1)/2 b's); the
        stored ``theta_t`` has one more entry (its overall scale is not free)."""
        n = self.n_steps
        return n * (n + 5) // 2 - 1

    def extra_repr(self) -> str:
        return f"n_steps={self.n_steps}, nfe={self.nfe}, init={self.init!r}"

    def _tril(self):
        return torch.tril_indices(self.n_steps, self.n_steps)

    # ------------------------------------------------------------------ tables
    def tables(self) -> dict:
        """The derived float64 tables (differentiable): ``t`` [n+1] (0 ... 1, strictly increasing;
        ``t[:n]`` are the model times), ``a`` [n], ``b`` [n(n+1)/2]: the lower triangle of the
        ``[n, n]`` matrix, row-major (``b00, b10, b11, b20, ...``; see ``coefficients``)."""
        c = torch.cumsum(self.theta_t.abs(), 0)
        t = torch.cat([c.new_zeros(1), c / c[-1]])           # c[-1] / c[-1]: t_n is exactly 1
        return {"t": t, "a": self.theta_a, "b": self.theta_b}

    def coefficients(self) -> dict:
        """``t`` [n] model times, ``a`` [n], ``b`` [n, n] lower-triangular (float64,
        differentiable): ``x_{i+1} = a_i x0 + sum_{j<=i} b_ij u(t_j, x_j)``."""
        tb = self.tables()
        n = self.n_steps
        rows, cols = self._tril()
        b = tb["b"].new_zeros(n, n).index_put((rows.to(tb["b"].device), cols.to(tb["b"].device)),
                                              tb["b"])
        return {"t": tb["t"][:-1], "a": tb["a"], "b": b}

    def coefficient_tables(self, dtype=torch.float32, device=None):
        """``(t [n], a [n], b [n, n])`` device tensors for the ops, kernels and engine
        (``bespoke_fast.ops.bns.bns_step_ref`` / ``kernels.bns_step`` read ``a`` and ``b``).
        Differentiable (not detached); contiguous."""
        c = self.coefficients()
        return tuple(c[k].to(dtype=dtype, device=device).contiguous() for k in ("t", "a", "b"))

    def sampler_tables(self) -> dict:
        """``{"t", "a", "b"}`` of ``coefficient_tables(dtype=float32)``: what the engine and
        schedulers read."""
        return dict(zip(("t", "a", "b"), self.coefficient_tables(dtype=torch.float32)))

    # ------------------------------------------------------------------ sampling
    def sample(self, model, x0: torch.Tensor, check_finite: bool = False,
               return_trajectory: bool = False, model_dtype: torch.dtype | None = None,
               **extras) -> torch.Tensor:
        """Pure-torch sampler: ``x0`` (noise, ``[B, ...]``) -> ``x_n`` (``[B, ...]``).

        The state keeps x0's dtype; coefficients are computed in float64 and cast to it.
        ``model_dtype`` (default: the state's) is the dtype the model is called in (its inputs
        are cast to it and its velocities back), e.g. a float64 state around a float32 network
        while training. Differentiable in the solver parameters when autograd records
        (end-to-end training); otherwise, for a float32 state, each step runs the reference op
        ``bns_step_ref`` (the oracle of the fused kernel; same values, same summation order).
        ``return_trajectory`` returns the ``[n + 1, B, ...]`` states ``x_0 .. x_n`` (the inputs
        of the model evaluations, then the sample).

        Example::

            >>> x1 = NonStationarySolver.load("bns.json").sample(model, torch.randn(8, 64))
        """
        check_state("x0", x0)
        n = self.n_steps
        mdt = x0.dtype if model_dtype is None else model_dtype
        c = self.coefficients()
        t = c["t"].to(dtype=mdt, device=x0.device)
        a, b = (c[k].to(dtype=x0.dtype, device=x0.device) for k in ("a", "b"))
        grad = torch.is_grad_enabled() and (x0.requires_grad
                                             or any(p.requires_grad for p in self.parameters()))
        ref = not grad and x0.dtype == torch.float32
        if ref:
            t, a, b = t.detach(), a.detach().contiguous(), b.detach().contiguous()
            us = torch.empty(n, *x0.shape, dtype=x0.dtype, device=x0.device)
        else:
            us = []
        x, trajectory = x0, [x0]
        for i in range(n):
            u = call_model(model, x.to(mdt), t[i].expand(x.shape[0]), extras, check_finite)
            if ref:
                us[i].copy_(u)
                x = bns_step_ref(x0, us, i, a, b, torch.empty_like(x0))
            else:
                us.append(u.to(x0.dtype))
                x = x0 * a[i]                      # same op order as bns_step_ref
                for j in range(i + 1):
                    x = x + us[j] * b[i, j]
            if return_trajectory:
                trajectory.append(x)
        return torch.stack(trajectory) if return_trajectory else x

    def forward(self, model, x0: torch.Tensor, **kwargs) -> torch.Tensor:
        """``solver(model, x0)`` is ``solver.sample(model, x0)`` (for ``torch.func`` and wrappers)."""
        return self.sample(model, x0, **kwargs)
