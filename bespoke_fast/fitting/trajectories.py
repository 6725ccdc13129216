"""GT trajectories as the trainers read them: :class:`TrajectorySet` (in memory), the cubic
Hermite interpolation of its knots (:func:`hermite`), the one :func:`fingerprint` of a set's
pairs, and :class:`Trajectories`, the protocol both trainers accept (a :class:`TrajectorySet`
or the streamed ``bespoke_fast.fitting.gt_storage.StreamedTrajectories``). Generating and
loading GT: ``bespoke_fast.fitting.gt``.

Example::

    >>> gt = load_trajectories("runs/gt")                 # bespoke_fast.load_trajectories
    >>> isinstance(gt, Trajectories)
    True
    >>> train, val = gt.split(256)
    >>> train.subset([0, 1]).at(torch.tensor([0.5])).shape   # [1, 2, *shape]
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .._checks import InvalidArgumentError, check_int

__all__ = ["TrajectorySet", "Trajectories", "hermite", "fingerprint", "split_point"]


# ----------------------------------------------------------------------------- interpolation
def hermite(knots_t: torch.Tensor, knots_x: torch.Tensor, knots_u: torch.Tensor,
            t: torch.Tensor, derivative: bool = False) -> torch.Tensor:
    """Cubic Hermite interpolation of trajectories, differentiable in ``t``.

    Args:
        knots_t: ``[K]`` increasing times (starting at 0, ending at 1).
        knots_x, knots_u: ``[B, K, ...]`` states and velocities at the knots.
        t: ``[m]`` query times in ``[knots_t[0], knots_t[-1]]`` (may require grad).
    Returns: ``[m, B, ...]`` states ``x(t)``; ``d/dt`` of it is the cubic's derivative (it equals
    ``u`` at the knots); ``derivative=True`` returns that derivative instead.

    With ``s = (t - t_k) / dt_k`` on the interval ``[t_k, t_{k+1}]``::

        x(t) = h00 x_k + h10 dt u_k + h01 x_{k+1} + h11 dt u_{k+1}
        h00 = 2s^3 - 3s^2 + 1, h10 = s^3 - 2s^2 + s, h01 = -2s^3 + 3s^2, h11 = s^3 - s^2
    """
    kt = knots_t.to(device=knots_x.device, dtype=torch.float64).contiguous()
    tt = t.to(device=knots_x.device)
    idx = torch.searchsorted(kt, tt.detach().to(torch.float64).contiguous(), right=True) - 1
    idx = idx.clamp(0, kt.numel() - 2)
    t0, dt = kt[idx], kt[idx + 1] - kt[idx]
    s = ((tt.to(torch.float64) - t0) / dt)
    shape = (-1, 1) + (1,) * (knots_x.dim() - 2)
    s = s.reshape(shape)
    s2, s3 = s * s, s * s * s
    dt = dt.reshape(shape)
    if derivative:   # d/dt = (d/ds) / dt
        h00, h10 = (6 * s2 - 6 * s) / dt, 3 * s2 - 4 * s + 1
        h01, h11 = (-6 * s2 + 6 * s) / dt, 3 * s2 - 2 * s
        dt = torch.ones_like(dt)
    else:
        h00, h10, h01, h11 = 2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s, -2 * s3 + 3 * s2, s3 - s2
    xk, xk1 = knots_x[:, idx].movedim(1, 0), knots_x[:, idx + 1].movedim(1, 0)
    uk, uk1 = knots_u[:, idx].movedim(1, 0), knots_u[:, idx + 1].movedim(1, 0)
    dtype = knots_x.dtype
    return (h00.to(dtype) * xk + (h10 * dt).to(dtype) * uk + h01.to(dtype) * xk1
            + (h11 * dt).to(dtype) * uk1)


# ----------------------------------------------------------------------------- the set
@dataclass
class TrajectorySet:
    """GT trajectories in memory. Tensors: ``x0``, ``x1`` ``[N, *shape]``; ``knots_x``, ``knots_u``
    ``[N, K, *shape]``; ``knots_t`` ``[K]``; ``index`` ``[N]`` (sample indices). ``meta``: the manifest.

    Example::

        >>> gt = load_trajectories("runs/gt")
        >>> train, val = gt.split(256)
        >>> x_at = gt.at(torch.tensor([0.0, 0.5, 1.0]))       # [3, N, *shape]
    """

    x0: torch.Tensor
    x1: torch.Tensor
    knots_t: torch.Tensor
    knots_x: torch.Tensor
    knots_u: torch.Tensor
    index: torch.Tensor
    meta: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)   # per-trajectory model extras, [N, ...] each

    def __len__(self):
        return self.x0.shape[0]

    @property
    def shape(self):
        return tuple(self.x0.shape[1:])

    @property
    def data_range(self) -> float:
        return float(self.meta.get("data_range", 2.0))

    def subset(self, rows) -> "TrajectorySet":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return TrajectorySet(self.x0[rows], self.x1[rows], self.knots_t, self.knots_x[rows],
                             self.knots_u[rows], self.index[rows], dict(self.meta),
                             {k: v[rows] for k, v in self.extras.items()})

    def split(self, num_val: int):
        """(train, val): the last ``num_val`` trajectories are held out for validation."""
        cut = split_point(len(self), num_val)
        return self.subset(range(cut)), self.subset(range(cut, len(self)))

    def fingerprint(self) -> str:
        """:func:`fingerprint` of this set: tells two GT sets (or splits) apart, e.g. when a
        checkpoint is resumed."""
        return fingerprint(len(self), lambda lo, hi: self.subset(range(lo, hi)), chunk=max(1, len(self)))

    @property
    def device(self) -> torch.device:
        return self.x0.device

    def at(self, t: torch.Tensor, rows=None) -> torch.Tensor:
        """``x(t)`` by Hermite interpolation, ``[m, N or len(rows), *shape]``, in x0's dtype
        (knots stored in float16/bfloat16 are cast first)."""
        kx = self.knots_x if rows is None else self.knots_x[rows]
        ku = self.knots_u if rows is None else self.knots_u[rows]
        return hermite(self.knots_t, kx.to(self.x0.dtype), ku.to(self.x0.dtype), t)

    def to(self, device) -> "TrajectorySet":
        return TrajectorySet(self.x0.to(device), self.x1.to(device), self.knots_t.to(device),
                             self.knots_x.to(device), self.knots_u.to(device), self.index,
                             dict(self.meta), {k: v.to(device) for k, v in self.extras.items()})


@runtime_checkable
class Trajectories(Protocol):
    """What a trainer reads from a GT set: :class:`TrajectorySet` and
    ``StreamedTrajectories`` both are one. ``subset(rows)`` returns an in-memory
    :class:`TrajectorySet` of those rows (knots decoded); ``split(num_val)`` holds out the last
    ``num_val`` rows (``(train, val)``, val in memory); ``fingerprint()`` is :func:`fingerprint`
    of the rows; ``knots_t`` ``[K]`` the knot times; ``meta`` the manifest."""

    meta: dict
    knots_t: torch.Tensor

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple: ...

    @property
    def data_range(self) -> float: ...

    @property
    def device(self) -> torch.device: ...

    def subset(self, rows) -> TrajectorySet: ...

    def split(self, num_val: int) -> tuple: ...

    def fingerprint(self) -> str: ...


def fingerprint(n: int, rows, chunk: int = 1024) -> str:
    """sha256 (first 16 hex digits) of the sample indices and the pairs ``(x0, x1)`` of a set of
    ``n`` trajectories, ``rows(lo, hi)`` giving rows ``lo..hi`` (a :class:`TrajectorySet`; its
    knots are not read) in chunks of ``chunk``: the same value however the set is held (in
    memory or streamed) and however it is chunked. Tells two GT sets (or splits) apart, e.g.
    when a checkpoint is resumed."""
    h = hashlib.sha256()
    for name in ("index", "x0", "x1"):
        for lo in range(0, n, chunk):
            v = getattr(rows(lo, min(n, lo + chunk)), name)
            if lo == 0:
                h.update(str(v.dtype).encode() + str((n, *v.shape[1:])).encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def split_point(n: int, num_val: int) -> int:
    """Where a set of ``n`` trajectories splits when the last ``num_val`` are held out."""
    num_val = check_int("num_val", num_val, 1)
    if num_val >= n:
        raise InvalidArgumentError(f"cannot hold out {num_val} of {n} trajectories for validation "
                                   f"(at least one must be left for training); lower val (--val), "
                                   f"or generate more GT")
    return n - num_val
