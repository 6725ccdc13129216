"""Levenberg-Marquardt steps on the end-to-end loss of a fit (method.md section 5).

A solver has few parameters (40 for Bespoke RK2 at NFE 10), and the end-to-end loss of a fit,
``mean_i log m_i`` with ``m_i = mean_d (x_n,i - x(1)_i)^2`` over B trajectories of D numbers,
is a sum of squares in disguise. With ``J_i = d x_n,i / d theta`` (D x P) and ``r_i = x_n,i -
x(1)_i``, its gradient and Gauss-Newton curvature are::

    g = 2 / (B D) sum_i J_i^T r_i / m_i          H = 2 / (B D) sum_i J_i^T J_i / m_i

One iteration solves ``(H + lam diag(H)) delta = -g`` and takes ``theta + delta`` if the loss
falls there (``lam`` shrinks 3x), else tries again with ``lam`` 4x larger (at most
``MAX_TRIALS`` trials; none accepted: the phase has converged). ``J`` comes from forward
differences, ``P + 1`` passes of the sampler without a backward: ``(P + 1) B nfe`` model
evaluations, plus ``B nfe`` per trial. Each iteration uses the whole curvature, where L-BFGS
builds it over many gradient evaluations, so at a fixed budget of model evaluations it reaches a
lower loss (``bench/fit_cost.py --pareto`` measures held-out PSNR against evaluations).

The sampler state is float64 and the model runs in its own dtype (``common.in_dtype``); the
relative step ``FD_STEP`` stays well above float32 rounding of the endpoints. A lower-precision
model (bf16 autocast) makes ``J`` noisier; a step is still only taken where the loss falls.

Example (the phase of a trainer; ``bespoke_fast.fitting.bespoke`` uses it for its warm-up)::

    >>> phase = Phase("warmup", cap=200,
    ...               optimizer=lambda: LevenbergMarquardt(solver.parameters()),
    ...               step=lm_step(warmup_set, endpoints, chunk=128, cost=41 * 32 * 10))
"""
from __future__ import annotations

import math

import torch

from ..utils import dist_info

__all__ = ["LevenbergMarquardt", "lm_step", "gauss_newton_system", "FD_STEP", "MAX_TRIALS",
           "LAMBDA0", "JACOBIAN_BYTES"]

FD_STEP = 1e-3      # forward-difference step, relative to max(1, |theta_k|)
JACOBIAN_BYTES = 256 * 2 ** 20  # one chunk's float64 Jacobian at most (fewer rows per chunk)
MAX_TRIALS = 8      # damping trials per iteration before the phase counts as converged
LAMBDA0 = 1e-3      # the first damping, relative to diag(H)
_TINY = 1e-20       # keeps log m_i and 1 / m_i finite for an exact endpoint


class LevenbergMarquardt:
    """The state of a Levenberg-Marquardt phase over ``params`` (checkpointed with the fit):
    the damping ``lam`` and the iterations made. It holds no gradients; :func:`lm_step` does
    the work.

    Example::

        >>> opt = LevenbergMarquardt(solver.parameters())
        >>> opt.state_dict()
        {'lam': 0.001, 'n_iter': 0}
    """

    def __init__(self, params, lam: float = LAMBDA0):
        self.params = list(params)
        self.param_groups = [{"params": self.params}]
        self.lam, self.n_iter = float(lam), 0

    def state_dict(self) -> dict:
        return {"lam": self.lam, "n_iter": self.n_iter}

    def load_state_dict(self, saved: dict) -> None:
        self.lam, self.n_iter = float(saved["lam"]), int(saved["n_iter"])

    def zero_grad(self, set_to_none: bool = True) -> None:     # the optimizer protocol
        pass


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).to(torch.float64)


def _assign(params, theta: torch.Tensor) -> None:
    at = 0
    for p in params:
        p.data.copy_(theta[at:at + p.numel()].view_as(p).to(p.dtype))
        at += p.numel()


def _log_mse(x_n: torch.Tensor, x1: torch.Tensor):
    r = (x_n - x1).flatten(1)
    m = r.pow(2).mean(1).add(_TINY)
    return r, m


def gauss_newton_system(endpoints, params, data, chunk: int, step: float = FD_STEP):
    """``(loss, g, H)`` of the end-to-end loss on ``data`` at the current ``params`` (see the
    module docstring): ``loss`` the mean of ``log m_i`` (float), ``g`` [P] and ``H`` [P, P] in
    float64. ``endpoints(part) -> x_n`` samples the rows of ``part`` (a TrajectorySet) with the
    current parameters; it is called on chunks of at most ``chunk`` rows, ``P + 1`` times
    each, so memory is one chunk's Jacobian (rows x D x P float64, at most
    ``JACOBIAN_BYTES``). The parameters end as they began."""
    params = list(params)
    theta = _flat(params)
    P, B = theta.numel(), len(data)
    per_row = P * 8 * max(1, data.x1[0].numel())
    chunk = max(1, min(chunk, JACOBIAN_BYTES // per_row))
    steps = (step * theta.abs().clamp_min(1.0)).tolist()     # one host sync for all P
    g = torch.zeros(P, dtype=torch.float64)
    H = torch.zeros(P, P, dtype=torch.float64)
    total = 0.0
    with torch.no_grad():
        for lo in range(0, B, chunk):
            part = data if chunk >= B else data.subset(range(lo, min(B, lo + chunk)))
            x1 = part.x1.to(torch.float64)
            f0 = endpoints(part)
            r, m = _log_mse(f0, x1)
            J = torch.empty(r.shape[0], r.shape[1], P, dtype=torch.float64, device=r.device)
            for k, h in enumerate(steps):
                moved = theta.clone()
                moved[k] += h
                _assign(params, moved)
                J[:, :, k] = (endpoints(part).flatten(1) - f0.flatten(1)) / h
            _assign(params, theta)
            w = (2.0 / (B * r.shape[1])) / m                   # [b]
            g += torch.einsum("b,bdp,bd->p", w, J, r).cpu()
            H += torch.einsum("b,bdp,bdq->pq", w, J, J).cpu()
            total += float(m.log().sum())
    return total / B, g, H


def _loss(endpoints, data, chunk: int) -> float:
    """The end-to-end loss on ``data`` at the current parameters, forward only."""
    total = 0.0
    with torch.no_grad():
        for lo in range(0, len(data), chunk):
            part = data if chunk >= len(data) else data.subset(range(lo, min(len(data), lo + chunk)))
            _, m = _log_mse(endpoints(part), part.x1.to(torch.float64))
            total += float(m.log().sum())
    return total / len(data)


def lm_step(data, endpoints, chunk: int, cost: int):
    """A phase ``step`` (``bespoke_fast.fitting.loop.Phase``) making one Levenberg-Marquardt
    iteration on the whole of ``data`` per call; the phase's optimizer is a
    :class:`LevenbergMarquardt`. ``endpoints(part) -> x_n``: the sampler's endpoints for the
    rows of ``part`` with the solver's current parameters (float64 state); ``chunk``: rows per
    sampler call; ``cost``: the forward-equivalents of one iteration until one is measured.

    An iteration that would pass the phase's evaluation deadline is not started, nor a damping
    trial (the loop then ends the phase); a non-finite loss, gradient or curvature ends it with a NaN loss (the loop
    restores the phase's best parameters); no accepted trial sets ``state.converged``. Under
    torchrun every rank computes the same step on the same rows, and rank 0's parameters are
    broadcast after it."""
    cost = [int(cost)]

    def step(ctx, k: int):
        opt, state = ctx.optim, ctx.state
        if ctx.eval_budget is not None and ctx.spent() + cost[0] + ctx.reserve > ctx.eval_budget:
            ctx.out_of_budget = True
            return k, state.last_loss
        before = ctx.spent()
        params = opt.params
        loss, g, H = gauss_newton_system(endpoints, params, data, chunk)
        state.loss_evals += 1
        theta, new = _flat(params), loss
        trial_cost = (ctx.spent() - before) / (theta.numel() + 1)   # one sampler pass
        if not (math.isfinite(loss) and bool(torch.isfinite(g).all())
                and bool(torch.isfinite(H).all())):
            state.last_loss = math.nan
            return k + 1, math.nan
        damping = torch.diag(torch.diag(H).clamp_min(_TINY))
        for _ in range(MAX_TRIALS):
            if (ctx.eval_budget is not None
                    and ctx.spent() + trial_cost + ctx.reserve > ctx.eval_budget):
                _assign(params, theta)  # no room for another trial: keep the last accepted point
                ctx.out_of_budget = True
                break
            try:
                delta = torch.linalg.solve(H + opt.lam * damping, -g)
            except RuntimeError:        # singular at this damping: damp more
                opt.lam *= 4
                continue
            _assign(params, theta + delta.to(theta.device))
            trial = _loss(endpoints, data, chunk)
            state.loss_evals += 1
            if math.isfinite(trial) and trial < loss:
                new, opt.lam = trial, max(opt.lam / 3, 1e-12)
                break
            opt.lam *= 4
        else:
            _assign(params, theta)      # no trial lowered the loss: a minimum at this precision
            state.converged = True
        if ctx.out_of_budget:
            new = loss
        _, world, _ = dist_info()
        if world > 1:
            for p in params:
                torch.distributed.broadcast(p.data, 0)
        opt.n_iter += 1
        cost[0] = ctx.spent() - before
        state.last_loss = new
        return k + 1, new
    return step
