"""Searching a time grid for a one-step base solver on GT trajectories (GITS-style dynamic
programming; Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML
2024).

On a fine candidate grid ``c_0 = 0 < ... < c_M = 1`` (uniform in t), the cost of a step
``c_i -> c_j`` is the mean per-sample RMSE of ONE step of the base solver (Euler or midpoint)
started on the GT trajectory at ``c_i`` against the GT at ``c_j`` (GT read from the cached
trajectories by Hermite interpolation: no extra ODE solves). Dynamic programming returns the
``n``-step grid with the least total cost. It costs ``M (M + 1) / 2`` steps on ``batch``
trajectories: seconds for the bundled models.

:func:`searched_solver` writes the result as a :class:`BespokeSolver` (the base solver on that
grid, scale 1). It is one of the starts ``bespoke_fast.train`` screens by default
(``init="auto"``, :func:`candidate_starts`), with the base solver on a few generic grids
(:data:`GRID_FAMILIES`): the searched grid minimises the sum of one-step errors, which is not
the end-to-end error the fit maximises, and the fit ends in the basin it starts in.
"""
from __future__ import annotations

import math

import torch

from .._checks import InvalidArgumentError, call_model, check_choice, check_int
from .trajectories import TrajectorySet
from ..solvers.bespoke import BespokeSolver

__all__ = ["search_grid", "searched_solver", "grid_solver", "family_grid", "GRID_FAMILIES",
           "candidate_starts"]

# generic starting grids over t (0 noise ... 1 data) as functions of the uniform r in [0, 1]:
# uniform, denser towards the data end (``1 - (1 - r)^p``: where the velocity of the trained
# digits models and of EDM-style schedules changes fastest) and denser towards the noise end
GRID_FAMILIES = {
    "uniform": lambda r: r,
    "data-dense-1.5": lambda r: 1 - (1 - r) ** 1.5,
    "data-dense-2": lambda r: 1 - (1 - r) ** 2,
    "data-dense-3": lambda r: 1 - (1 - r) ** 3,
    "noise-dense-1.5": lambda r: r ** 1.5,
}


def search_grid(model, trajectories: TrajectorySet, n_steps: int, method: str = "midpoint",
                candidates: int = 64, batch: int = 64, seed: int = 0) -> torch.Tensor:
    """The ``n_steps + 1`` grid times (float64, 0 ... 1) of least total one-step local error
    for ``method`` (``"euler"`` or ``"midpoint"``) on ``batch`` trajectories."""
    check_choice("method", method, ("euler", "midpoint"))
    n = check_int("n_steps", n_steps)
    M = check_int("candidates", candidates)
    if n > M:
        raise InvalidArgumentError(f"n_steps={n} needs at least as many candidates, got {M}")
    rows = torch.randperm(len(trajectories), generator=torch.Generator().manual_seed(seed))[:batch]
    sub = trajectories.subset(rows)
    B = len(rows)
    c = torch.linspace(0, 1, M + 1, dtype=torch.float64)
    cost = torch.full((M + 1, M + 1), math.inf, dtype=torch.float64)
    with torch.no_grad():
        X = sub.at(c.to(sub.knots_t.dtype))                           # [M + 1, B, ...]
        for i in range(M):
            j = torch.arange(i + 1, M + 1)
            xs = X[i].unsqueeze(0).expand(len(j), *X[i].shape).reshape(-1, *X.shape[2:])
            extras = {k: v.repeat(len(j), *[1] * (v.dim() - 1)) for k, v in sub.extras.items()}
            h = (c[j] - c[i]).repeat_interleave(B).to(xs.dtype)
            hb = h.reshape(-1, *[1] * (xs.dim() - 1))
            ti = torch.full_like(h, float(c[i]))
            u = call_model(model, xs, ti, extras)
            if method == "midpoint":
                u = call_model(model, xs + hb / 2 * u, ti + h / 2, extras)
            err = (xs + hb * u - X[j].reshape(-1, *X.shape[2:])).double().flatten(1).pow(2).mean(1)
            cost[i, j] = err.sqrt().reshape(len(j), B).mean(1)
    best = torch.full((n + 1, M + 1), math.inf, dtype=torch.float64)
    arg = torch.zeros((n + 1, M + 1), dtype=torch.long)
    best[0, 0] = 0
    for k in range(1, n + 1):
        best[k], arg[k] = (best[k - 1][:, None] + cost).min(0)      # [from, to] -> to
    path = [M]
    for k in range(n, 0, -1):
        path.append(int(arg[k, path[-1]]))
    return c[path[::-1]]


def family_grid(name: str, n_steps: int) -> torch.Tensor:
    """The ``n_steps + 1`` times (float64, 0 ... 1) of the :data:`GRID_FAMILIES` grid ``name``."""
    check_choice("grid family", name, tuple(GRID_FAMILIES))
    r = torch.linspace(0, 1, check_int("n_steps", n_steps) + 1, dtype=torch.float64)
    return GRID_FAMILIES[name](r)


def grid_solver(base: str, grid: torch.Tensor) -> BespokeSolver:
    """The base solver (``"rk1"``: Euler, ``"rk2"``: midpoint) on the time ``grid`` (``[n + 1]``,
    0 ... 1 increasing) as a :class:`BespokeSolver` with scale 1: it samples exactly like that
    base solver on that grid."""
    check_choice("base", base, ("rk1", "rk2"))
    grid = torch.as_tensor(grid, dtype=torch.float64)
    n_steps, dt = grid.numel() - 1, grid.diff()
    if base == "rk1":
        t, tdot = grid, n_steps * dt
    else:   # grid and half points; tdot = dt / dr with dr = 1 / n per step
        t = torch.cat([torch.stack([grid[:-1], grid[:-1] + dt / 2], 1).reshape(-1), grid[-1:]])
        tdot = (n_steps * dt).repeat_interleave(2)
    m = t.numel() - 1
    return BespokeSolver.from_tables(base, t, tdot, torch.ones(m + 1, dtype=torch.float64),
                                     torch.zeros(m, dtype=torch.float64))


def searched_solver(model, trajectories: TrajectorySet, base: str, n_steps: int,
                    **kwargs) -> BespokeSolver:
    """The base solver (``"rk1"``: Euler, ``"rk2"``: midpoint) on :func:`search_grid`'s grid,
    as a :class:`BespokeSolver` with scale 1 (it samples exactly like that base solver)."""
    check_choice("base", base, ("rk1", "rk2"))
    return grid_solver(base, search_grid(model, trajectories, n_steps,
                                         "euler" if base == "rk1" else "midpoint", **kwargs))


def candidate_starts(model, trajectories: TrajectorySet, base: str, n_steps: int,
                     **search_kwargs) -> dict:
    """``{name: BespokeSolver}``: the starts the bespoke trainer screens (``init="auto"``): the
    base solver on the searched grid (:func:`searched_solver`) and on each
    :data:`GRID_FAMILIES` grid. The searched grid is left out where ``n_steps`` exceeds the
    search's candidate times."""
    starts = {}
    if n_steps <= search_kwargs.get("candidates", 64):
        starts["searched"] = searched_solver(model, trajectories, base, n_steps, **search_kwargs)
    for name in GRID_FAMILIES:
        starts[name] = grid_solver(base, family_grid(name, n_steps))
    return starts
