"""Learned-time-grid peers for bench/quality.py: classical solvers whose time steps are fitted to
the model on the same GT pairs as the Bespoke / BNS solvers.

Solvers (flow-matching form, noise at t = 0, data at t = 1; our velocity model ``u(t, x)``):

* ``ipndm``: improved PNDM (Zhang & Chen, DEIS, 2022): Adams-Bashforth on the velocity with the
  fixed uniform-step coefficients of orders 1, 2, 3, 4 (lower orders while the history fills).
* ``dpm++2m``: DPM-Solver++(2M) (Lu et al., 2022) in data prediction, with the FM-OT path the
  diffusers flow schedulers assume (``alpha_t = t``, ``sigma_t = 1 - t``; data prediction
  ``D = x + (1 - t) u``; ``lambda = log(t / (1 - t))``); first order at the first and the last step.
* ``unipc``: UniPC (Zhao et al., 2023), variant bh2, order 2 predictor + UniC corrector (the
  corrector reuses the next step's model evaluation, so NFE = steps), data prediction, same path.
* ``midpoint``: the midpoint rule (2 NFE per step).

The multistep exponential integrators cannot start at ``lambda = -inf``: their grid runs from
``T_START = 1e-4`` (diffusers' flow schedulers start at 1e-3 or 1e-6) and treats x0 as the state
there; ``ipndm`` and ``midpoint`` start at t = 0.

Fitting, two peers from their papers:

* **LD3** (Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025, arXiv
  2405.15506): the grid is ``t = cumsum(softmax(xi))`` (uniform at init); decoupled model times
  ``t'_j = t_j + clamp(xi'_j, +-window * min step)`` (window 0.5; the first time stays put); the
  student is trained end to end against the teacher's endpoints. LD3's soft teacher loss lets each
  training noise move inside a ball of radius ``prior_bound`` (one SGD step per iteration, kept
  only where it lowers that sample's loss); ``prior_bound=0`` (our default) is the hard loss,
  since the benchmark scores PSNR against the teacher's endpoint from the ORIGINAL noise. The
  paper uses RMSprop / SGD with LPIPS on 50-100 pairs; we use the same optimiser, loss (mean
  per-sample RMSE, LD3's L2 option), training pairs, validation split, budget and stopping rules
  as our own trainers (``bespoke_fast.fitting.stopping``) so that the comparison is like for like.
* **GITS** (Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML
  2024): dynamic programming over a fine candidate grid; the cost of a step ``t_i -> t_j`` is the
  mean local error of ONE solver step started on the GT trajectory (Hermite-interpolated GT), and
  the grid of ``n`` steps with the least total cost wins. Here for the midpoint rule (a one-step
  method, for which the per-step cost is exact); the search lives in
  ``bespoke_fast.fitting.grid_search``, where it also gives the bespoke trainer its starting point.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from bespoke_fast._checks import call_model
from bespoke_fast.fitting.stopping import (DEFAULT_SELECT, check_stopping, new_state, observe,
                                   phase_horizon, stop_reason)
from bespoke_fast.fitting.common import validate_solver

__all__ = ["METHODS", "T_START", "LearnedGridSolver", "fit_ld3", "fit_gits_midpoint",
           "sample_on_grid"]

METHODS = ("ipndm", "dpm++2m", "unipc", "midpoint")
T_START = 1e-4
_AB = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12],
       4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def steps_for(method: str, nfe: int) -> int:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    if method == "midpoint":
        if nfe % 2:
            raise ValueError(f"midpoint needs an even NFE, got {nfe}")
        return nfe // 2
    return nfe


def _start(method):
    return T_START if method in ("dpm++2m", "unipc") else 0.0


def _lam(t):
    return torch.log(t) - torch.log1p(-t)


def sample_on_grid(model, x0, method: str, t, t_model=None, extras=None, model_dtype=None):
    """Run ``method`` on the time grid ``t`` (``[steps + 1]``, increasing, ends at 1; 0-d
    tensors, differentiable). ``t_model``: the times the model is called at (default the nominal
    ones; ``[nfe]``: per evaluation). The state keeps x0's dtype; the model runs in
    ``model_dtype`` (default the same)."""
    extras = extras or {}
    mdt = x0.dtype if model_dtype is None else model_dtype
    B = x0.shape[0]
    n = t.shape[0] - 1
    nominal = (torch.stack([t[:-1], (t[:-1] + t[1:]) / 2], 1).reshape(-1) if method == "midpoint"
               else t[:-1])
    tm = nominal if t_model is None else t_model
    evals = iter(range(tm.shape[0]))

    def u(x, j):
        return call_model(model, x.to(mdt), tm[j].to(mdt).expand(B), extras).to(x0.dtype)

    x = x0
    if method == "midpoint":
        for i in range(n):
            h = t[i + 1] - t[i]
            xm = x + (h / 2) * u(x, next(evals))
            x = x + h * u(xm, next(evals))
        return x
    if method == "ipndm":
        us = []
        for i in range(n):
            us.append(u(x, next(evals)))
            c = _AB[min(len(us), 4)]
            d = sum(ci * us[-1 - k] for k, ci in enumerate(c))
            x = x + (t[i + 1] - t[i]) * d
        return x
    # exponential integrators in data prediction on the FM-OT path (alpha = t, sigma = 1 - t)
    Ds, lams = [], []
    m_t = None
    for i in range(n):
        s, tt = t[i], t[i + 1]
        a_s, s_s, a_t, s_t = s, 1 - s, tt, 1 - tt
        last = i == n - 1
        if m_t is None:
            m0 = x + s_s * u(x, next(evals))
        else:
            m0 = m_t
        Ds.append(m0)
        lams.append(_lam(s))
        # first-order (DDIM) part, exact also at t = 1: x_t = (s_t/s_s) x + (a_t - a_s s_t/s_s) D
        ratio = s_t / s_s
        x_lin = ratio * x + (a_t - a_s * ratio) * m0
        second = len(Ds) >= 2 and not last
        if method == "dpm++2m":
            if second:
                h, h0 = _lam(tt) - lams[-1], lams[-1] - lams[-2]
                r = h0 / h
                x_lin = x_lin + (a_t - a_s * ratio) * (m0 - Ds[-2]) / (2 * r)
            x = x_lin
            continue
        # UniPC bh2: B(h) = expm1(-h) = e^{-h} - 1 = a_s s_t / (s_s a_t) - 1
        if second:
            h = _lam(tt) - lams[-1]
            rk = (lams[-2] - lams[-1]) / h
            D1 = (Ds[-2] - m0) / rk
            Bh = torch.expm1(-h)
            x_pred = x_lin - a_t * Bh * 0.5 * D1
        else:
            x_pred = x_lin
        if last:
            x = x_pred
            break
        # corrector with the model at the predicted state (reused by the next step)
        m_t = x_pred + s_t * u(x_pred, next(evals))
        h = _lam(tt) - lams[-1]
        hh = -h
        Bh = torch.expm1(hh)
        h_phi_1 = torch.expm1(hh)
        if second:
            # UniC order 2: rows rks^0 = [1, 1] and rks^1 = [rk, 1] (columns: D1, m_t - m0),
            # right side b_k = phi_{k+1} k! / B(h) with phi_2 = h_phi_1 / hh - 1,
            # phi_3 = phi_2 / hh - 1/2
            p2 = h_phi_1 / hh - 1
            b1, b2 = p2 / Bh, 2 * (p2 / hh - 0.5) / Bh
            rho_d1 = (b1 - b2) / (1 - rk)
            x = x_lin - a_t * Bh * (rho_d1 * D1 + (b1 - rho_d1) * (m_t - m0))
        else:
            x = x_lin - a_t * Bh * 0.5 * (m_t - m0)
    return x


class LearnedGridSolver(nn.Module):
    """A classical solver on a learned time grid (LD3 parametrization, see the module doc)."""

    kind = "learned-grid"

    def __init__(self, method: str, nfe: int, window: float = 0.5, decouple: bool = True):
        super().__init__()
        self.method, self.nfe_, self.window, self.decouple = method, nfe, window, decouple
        self.base = method
        self.n_steps = steps_for(method, nfe)
        self.xi = nn.Parameter(torch.zeros(self.n_steps, dtype=torch.float64))
        self.xi_model = nn.Parameter(torch.zeros(nfe, dtype=torch.float64))

    @property
    def nfe(self):
        return self.nfe_

    def grid(self):
        t0 = _start(self.method)
        c = torch.cumsum(torch.softmax(self.xi, 0), 0)
        return torch.cat([c.new_full((1,), t0), t0 + (1 - t0) * c / c[-1]])

    def times(self):
        t = self.grid()
        if self.method == "midpoint":
            nominal = torch.stack([t[:-1], (t[:-1] + t[1:]) / 2], 1).reshape(-1)
            step = (t[1:] - t[:-1]).repeat_interleave(2) / 2
        else:
            nominal, step = t[:-1], t[1:] - t[:-1]
        if not self.decouple:
            return t, nominal
        move = self.window * step.detach().min()
        shift = self.xi_model.clamp(-float(move), float(move))
        shift = torch.cat([shift.new_zeros(1), shift[1:]])       # the first model time stays put
        return t, nominal + shift

    def sample(self, model, x0, model_dtype=None, **extras):
        t, tm = self.times()
        return sample_on_grid(model, x0, self.method, t.to(x0.dtype), tm, extras, model_dtype)


def fit_ld3(model, method: str, nfe: int, train, val, iters: int = 3000, batch_size: int = 128,
            lr: float = 1e-2, prior_bound: float = 0.0, shift_lr: float = 0.1,
            val_every: int = 25, budget_seconds: float | None = 170.0, patience: int | None = 8,
            min_delta: float = 0.02, select: str = DEFAULT_SELECT, seed: int = 0,
            dtype=torch.float64):
    """Fit the grid (and decoupled model times) of ``method`` at ``nfe`` on GT pairs ``train``
    (``TrajectorySet``), keep the best on ``val``. Returns ``(solver, report)``."""
    check_stopping(select, patience, budget_seconds, min_delta)
    solver = LearnedGridSolver(method, nfe)
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.Adam(solver.parameters(), lr=lr)
    x0_all = train.x0.to(dtype)
    x1_all = train.x1.double()
    shift = torch.zeros_like(x0_all)
    mdt = train.x0.dtype
    state, kept = {"curve": [], "horizon": None, "stop_reason": None}, new_state()
    started = time.perf_counter()
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)

    def per_sample(x0, rows):
        xn = solver.sample(model, x0, model_dtype=mdt)
        return (xn.double() - x1_all[rows]).flatten(1).pow(2).mean(1).add(1e-30).sqrt()

    def validate(k):
        rec = {"iteration": k, **validate_solver(solver, model, val)}
        state["curve"].append(rec)
        observe(kept, rec, solver, select, min_delta)
        return rec

    try:
        validate(0)
        k = 0
        while True:
            rows = torch.randint(len(train), (min(batch_size, len(train)),), generator=gen)
            for g in optim.param_groups:
                frac = min(1.0, k / max(1, state["horizon"] or iters))
                g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            optim.zero_grad(set_to_none=True)
            if prior_bound > 0:
                z = (x0_all[rows] + shift[rows]).requires_grad_(True)
                loss_vec = per_sample(z, rows)
                loss_vec.mean().backward()
                with torch.no_grad():       # LD3 soft teacher: move the noise inside the ball
                    cand = z - shift_lr * z.grad
                    d = cand - x0_all[rows]
                    norm = d.flatten(1).norm(dim=1).clamp_min(1e-30)
                    d = d * (prior_bound / norm).clamp(max=1.0).reshape(-1, *[1] * (d.dim() - 1))
                    better = per_sample(x0_all[rows] + d, rows) < loss_vec.detach()
                    shift[rows[better]] = d[better]
            else:
                per_sample(x0_all[rows], rows).mean().backward()
            optim.step()
            k += 1
            elapsed = time.perf_counter() - started
            validated = k % val_every == 0
            if validated:
                validate(k)
                if state["horizon"] is None and budget_seconds is not None:
                    state["horizon"] = phase_horizon(iters, k, elapsed, budget_seconds - elapsed)
            reason = stop_reason(kept, k, iters, patience, budget_seconds, elapsed, validated)
            if reason:
                if not validated:
                    validate(k)
                state["stop_reason"] = reason
                break
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    solver.load_state_dict(kept.best)
    return solver, {"best": kept.best_record, "curve": state["curve"], "iterations": k,
                    "config": {"num_train": len(train), "num_val": len(val), "lr": lr,
                               "batch_size": batch_size, "prior_bound": prior_bound,
                               "budget_seconds": budget_seconds, "patience": patience},
                    "stop_reason": state["stop_reason"],
                    "wall_seconds": time.perf_counter() - started,
                    "grid": solver.grid().tolist(), "model_times": solver.times()[1].tolist()}


class FixedGridSolver(nn.Module):
    """``method`` on a given grid (GITS result), same ``sample`` interface."""

    kind = "gits"

    def __init__(self, method, t):
        super().__init__()
        self.method = self.base = method
        self.register_buffer("t", torch.as_tensor(t, dtype=torch.float64))

    @property
    def nfe(self):
        n = self.t.shape[0] - 1
        return 2 * n if self.method == "midpoint" else n

    def sample(self, model, x0, model_dtype=None, **extras):
        return sample_on_grid(model, x0, self.method, self.t.to(x0.dtype), None, extras, model_dtype)


def fit_gits_midpoint(model, nfe: int, train, candidates: int = 64, batch: int = 64, seed: int = 0):
    """GITS-style DP (``bespoke_fast.fitting.grid_search.search_grid``): the ``nfe / 2``-step midpoint
    grid with the least total one-step local error on ``batch`` GT trajectories. Returns
    ``(solver, report)``."""
    from bespoke_fast.fitting.grid_search import search_grid
    started = time.perf_counter()
    grid = search_grid(model, train, steps_for("midpoint", nfe), "midpoint", candidates, batch, seed)
    solver = FixedGridSolver("midpoint", grid)
    return solver, {"grid": grid.tolist(), "wall_seconds": time.perf_counter() - started,
                    "stop_reason": "exact search", "config": {"num_train": min(batch, len(train))},
                    "candidates": candidates, "batch": batch}
