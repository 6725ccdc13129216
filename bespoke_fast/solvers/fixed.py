"""Fixed-grid Runge-Kutta solvers (method.md section 2), pure torch, any device and dtype."""
from __future__ import annotations

import torch

from .._checks import call_model, check_choice, check_int, check_state
from .._checks import InvalidArgumentError

__all__ = ["solve", "METHODS", "NFE_PER_STEP", "uniform_grid"]

NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
METHODS = tuple(NFE_PER_STEP)


def uniform_grid(n_steps: int, dtype=torch.float64) -> torch.Tensor:
    """``[n_steps + 1]`` times ``i / n_steps`` (each correctly rounded, so they equal the bespoke
    identity grid bit for bit)."""
    return torch.arange(n_steps + 1, dtype=torch.float64).div(n_steps).to(dtype)


def _check_grid(t_grid) -> torch.Tensor:
    t = torch.as_tensor(t_grid, dtype=torch.float64).reshape(-1)
    if t.numel() < 2:
        raise InvalidArgumentError(f"t_grid must hold at least 2 times, got {t.numel()}")
    if not torch.isfinite(t).all() or (t.diff() <= 0).any():
        raise InvalidArgumentError("t_grid must be finite and strictly increasing")
    if t[0] < 0 or t[-1] > 1:
        raise InvalidArgumentError(f"t_grid must lie in [0, 1], got [{t[0].item():.6g}, {t[-1].item():.6g}]")
    return t


def solve(model, x0: torch.Tensor, method: str = "midpoint", n_steps: int | None = None,
          t_grid=None, check_finite: bool = False, return_trajectory: bool = False,
          **extras) -> torch.Tensor:
    """Integrate ``dx/dt = model(x, t, **extras)`` with a fixed-step RK method.

    Args:
        model: velocity model ``model(x, t[B], **extras) -> u`` (u shaped and typed like x).
        x0: initial state ``[B, ...]`` (floating point); the state keeps x0's dtype.
        method: ``"euler"`` (1 NFE/step), ``"midpoint"`` (2), ``"heun"`` (2), ``"rk4"`` (4).
        n_steps: uniform grid ``t_i = i / n_steps`` on [0, 1]. Give this or ``t_grid``.
        t_grid: increasing times in [0, 1] (``[n_steps + 1]``); integrates from t_grid[0] to
            t_grid[-1].
        check_finite: raise ``FloatingPointError`` on a NaN/Inf velocity (one host sync per call).
        return_trajectory: also return the states at every grid time, ``[n_steps + 1, B, ...]``.

    Returns: ``x(t_end)`` shaped like ``x0`` (or the trajectory).

    Steps (``addcmul(y, u, c) = y + c u``, so the bespoke identity solver matches bitwise)::

        euler:    x + h u(t, x)
        midpoint: x + h u(t + h/2, x + (h/2) u(t, x))
        heun:     x + (h/2) (k1 + k2),  k1 = u(t, x), k2 = u(t + h, x + h k1)
        rk4:      x + (h/6) (k1 + 2 k2 + 2 k3 + k4)

    Example::

        >>> x1 = solve(model, torch.randn(16, 64), method="midpoint", n_steps=10)
    """
    check_state("x0", x0)
    check_choice("method", method, METHODS)
    if (n_steps is None) == (t_grid is None):
        raise InvalidArgumentError("give exactly one of n_steps (a uniform grid) or t_grid")
    if t_grid is None:
        n = check_int("n_steps", n_steps)
        times = uniform_grid(n)
        # midpoints (2i+1)/(2n), correctly rounded like the bespoke identity grid
        mids = torch.arange(1, 2 * n, 2, dtype=torch.float64).div(2 * n)
        steps = torch.full((n,), 1.0, dtype=torch.float64).div(n)
    else:
        times = _check_grid(t_grid)
        steps = times.diff()
        mids = times[:-1] + steps / 2
    dt = x0.dtype
    times, mids, steps = times.to(dt), mids.to(dt), steps.to(dt)
    times, mids, steps = (v.to(x0.device) for v in (times, mids, steps))

    def u(x, t):
        return call_model(model, x, t.expand(x.shape[0]), extras, check_finite)

    x = x0
    trajectory = [x0] if return_trajectory else None
    for i in range(steps.numel()):
        t, h = times[i], steps[i]
        if method == "euler":
            x = torch.addcmul(x, u(x, t), h)
        elif method == "midpoint":
            x_mid = torch.addcmul(x, u(x, t), h / 2)
            x = torch.addcmul(x, u(x_mid, mids[i]), h)
        elif method == "heun":
            k1 = u(x, t)
            k2 = u(torch.addcmul(x, k1, h), times[i + 1])
            x = torch.addcmul(x, k1 + k2, h / 2)
        else:  # rk4
            k1 = u(x, t)
            k2 = u(torch.addcmul(x, k1, h / 2), mids[i])
            k3 = u(torch.addcmul(x, k2, h / 2), mids[i])
            k4 = u(torch.addcmul(x, k3, h), times[i + 1])
            x = torch.addcmul(x, k1 + 2 * k2 + 2 * k3 + k4, h / 6)
        if return_trajectory:
            trajectory.append(x)
    return torch.stack(trajectory) if return_trajectory else x
