"""How GT knots are stored on disk and read back: storage dtype, adaptive knot count per
trajectory, and shards streamed (memory-mapped) during training instead of loaded whole.

**Error budget.** Stored GT may differ from the full float32 GT (every knot, compute dtype) by
at most ``error_fraction`` (default 0.1) times a *reference local error*: the mean per-sample
RMSE local error of one plain RK2 (midpoint) step on a uniform grid at ``reference_nfe``
(default 10), measured on up to 16 trajectories of the first shard computed. A Bespoke solver
at that NFE is trained on local errors of that size (it ends a few times below them), so GT
noise at a tenth of them is invisible to the fit. Both savings are measured against it:

* ``storage_dtype`` (float16 / bfloat16) rounds the knots ``x_k, u_k`` (x0 and x1 stay in the
  compute dtype). The extra interpolation error (Hermite of the rounded knots vs of the
  float32 knots, at every knot and interval midpoint) is measured per shard and recorded; a
  shard whose mean exceeds the budget is refused with a ``ValueError`` before it is written.
* ``adaptive_knots``: each trajectory keeps the coarsest nested subset of the knots (every 1st,
  2nd, 4th, ... knot) whose Hermite interpolation reproduces the dropped knots to half the
  budget (RMSE, worst knot). On load the dropped knots are restored exactly from the coarse
  cubic (value and derivative), so the trainer sees the same interpolant as the coarse one.

Layouts in a shard: fixed ``knots_x, knots_u [S, K, *shape]`` or, with adaptive knots,
``knots_x_flat, knots_u_flat [sum_i K_i, *shape]`` and ``knot_stride [S]``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .._checks import InvalidArgumentError, call_model
from .trajectories import TrajectorySet, fingerprint, hermite, split_point

__all__ = ["STORAGE_DTYPES", "GT_ERROR_FRACTION", "StorageOptions", "decode_knots",
           "mmap_safetensors", "StreamedTrajectories", "bytes_per_trajectory", "knot_strides"]

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GT_ERROR_FRACTION = 0.1
_REFERENCE_ROWS = 16


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def storage_dtype_of(value) -> torch.dtype | None:
    """``None`` / a torch dtype / a name in :data:`STORAGE_DTYPES` -> dtype (or None)."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in STORAGE_DTYPES.values():
            raise InvalidArgumentError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {value}")
        return value
    if value not in STORAGE_DTYPES:
        raise InvalidArgumentError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {value!r}")
    return STORAGE_DTYPES[value]


def bytes_per_trajectory(shape, num_knots: int, dtype=torch.float32, knot_dtype=None) -> int:
    """Bytes of one stored trajectory (index, x0, x1 and ``num_knots`` knots of x and u)."""
    numel = math.prod(shape)
    knot_dtype = knot_dtype or dtype
    return 8 + 2 * numel * dtype.itemsize + 2 * num_knots * numel * knot_dtype.itemsize


def knot_strides(K: int) -> list:
    """Nested knot subsets usable for thinning: strides 1, 2, 4, ... dividing ``K - 1`` and
    leaving at least 2 intervals."""
    out, s = [1], 2
    while (K - 1) % s == 0 and (K - 1) // s >= 2:
        out.append(s)
        s *= 2
    return out


def _per_sample_rmse(a, b):
    """``[m, B, ...]`` pairs -> ``[m, B]`` per-sample RMSE."""
    return (a - b).flatten(2).pow(2).mean(-1).sqrt()


def _probe_times(knots_t):
    mids = (knots_t[1:] + knots_t[:-1]) / 2
    return torch.sort(torch.cat([knots_t, mids])).values


def _densify(knots_t, sub_x, sub_u, stride):
    """Full-grid knots from every ``stride``-th knot: values and derivatives of the coarse cubic."""
    if stride == 1:
        return sub_x, sub_u
    sub_t = knots_t[::stride]
    x = hermite(sub_t, sub_x, sub_u, knots_t).movedim(0, 1)
    u = hermite(sub_t, sub_x, sub_u, knots_t, derivative=True).movedim(0, 1)
    return x, u


def reference_local_error(model, knots_t, kx, ku, extras, nfe: int) -> float:
    """Mean per-sample RMSE local error of one midpoint step on a uniform ``nfe // 2``-step grid,
    the targets taken from the GT's Hermite interpolant (float32 knots ``kx, ku [B, K, ...]``)."""
    n = max(1, nfe // 2)
    grid = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    X = hermite(knots_t, kx, ku, grid)                              # [n + 1, B, ...]
    B, h = X.shape[1], 1.0 / n
    xs = X[:-1].reshape(n * B, *X.shape[2:])
    t0 = grid[:-1].to(xs.dtype).repeat_interleave(B).to(xs.device)
    rep = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in extras.items()
           if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        u1 = call_model(model, xs, t0, rep)
        u2 = call_model(model, xs + 0.5 * h * u1, t0 + 0.5 * h, rep)
    x_next = (xs + h * u2).reshape(n, B, *X.shape[2:])
    return float(_per_sample_rmse(x_next, X[1:]).mean())


class StorageOptions:
    """What :func:`~bespoke_fast.fitting.gt.generate_trajectories` does with the knots of each shard."""

    def __init__(self, storage_dtype=None, adaptive_knots: bool = False,
                 error_fraction: float = GT_ERROR_FRACTION, reference_nfe: int = 10):
        self.dtype = storage_dtype_of(storage_dtype)
        self.adaptive = bool(adaptive_knots)
        if not (0 < error_fraction and math.isfinite(error_fraction)):
            raise InvalidArgumentError(f"error_fraction must be a positive number, got {error_fraction}")
        self.fraction = float(error_fraction)
        self.reference_nfe = int(reference_nfe)
        self.reference = None

    def active(self, compute_dtype) -> bool:
        return self.adaptive or (self.dtype is not None and self.dtype != compute_dtype)

    def describe(self, compute_dtype) -> dict:
        return {"knot_dtype": _dtype_name(self.dtype or compute_dtype), "adaptive_knots": self.adaptive,
                "error_fraction": self.fraction, "reference_nfe": self.reference_nfe}

    def encode(self, model, knots_t, kx, ku, extras) -> tuple:
        """``(tensors, info)`` for one shard's knots ``kx, ku [S, K, ...]`` (compute dtype).
        Raises ``ValueError`` when the stored knots exceed the error budget."""
        compute = kx.dtype
        if not self.active(compute):
            return {"knots_x": kx.contiguous().cpu(), "knots_u": ku.contiguous().cpu()}, {}
        if self.reference is None:
            rows = slice(0, _REFERENCE_ROWS)
            self.reference = reference_local_error(
                model, knots_t, kx[rows], ku[rows],
                {k: v[rows] for k, v in extras.items() if isinstance(v, torch.Tensor)},
                self.reference_nfe)
        limit = self.fraction * self.reference
        store = self.dtype or compute
        strides = torch.ones(kx.shape[0], dtype=torch.long)
        if self.adaptive:
            strides = self._choose_strides(knots_t, kx, ku, limit / 2)
        probe = _probe_times(knots_t)
        full = hermite(knots_t, kx, ku, probe)
        parts_x, parts_u, dec_x, dec_u = [], [], [], []
        for i, s in enumerate(strides.tolist()):
            sx, su = kx[i, ::s].to(store), ku[i, ::s].to(store)
            parts_x.append(sx)
            parts_u.append(su)
            dx, du = _densify(knots_t, sx[None].to(compute), su[None].to(compute), s)
            dec_x.append(dx[0])
            dec_u.append(du[0])
        err = _per_sample_rmse(hermite(knots_t, torch.stack(dec_x), torch.stack(dec_u), probe),
                               full).mean(0)                          # [S] per trajectory
        info = {"reference_local_error": self.reference, "error_limit": limit,
                "extra_rmse_mean": float(err.mean()), "extra_rmse_max": float(err.max()),
                "knots_mean": float(((kx.shape[1] - 1) / strides + 1).mean())}
        if info["extra_rmse_mean"] > limit:
            raise InvalidArgumentError(
                f"storing GT knots in {_dtype_name(store)} adds an interpolation error of "
                f"{info['extra_rmse_mean']:.2e} (RMSE), above {self.fraction:g} x the reference "
                f"local error {self.reference:.2e} of RK2 at NFE {self.reference_nfe}; use "
                f"storage_dtype float32 (or float16 instead of bfloat16)")
        if not self.adaptive:
            return {"knots_x": torch.stack(parts_x).contiguous().cpu(),
                    "knots_u": torch.stack(parts_u).contiguous().cpu()}, info
        return {"knots_x_flat": torch.cat(parts_x).contiguous().cpu(),
                "knots_u_flat": torch.cat(parts_u).contiguous().cpu(),
                "knot_stride": strides}, info

    @staticmethod
    def _choose_strides(knots_t, kx, ku, tol) -> torch.Tensor:
        """Per trajectory, the largest stride whose coarse interpolant reproduces every knot to
        RMSE <= ``tol`` (the knots themselves are exact solver values: the measured error)."""
        best = torch.ones(kx.shape[0], dtype=torch.long)
        for s in knot_strides(kx.shape[1])[1:]:
            approx = hermite(knots_t[::s], kx[:, ::s], ku[:, ::s], knots_t)
            err = _per_sample_rmse(approx, kx.movedim(1, 0)).amax(0)   # [S] worst knot
            best = torch.where((err <= tol) & (best == s // 2), torch.full_like(best, s), best)
        return best


def decode_knots(tensors: dict, rows, knots_t, dtype) -> tuple:
    """Knots ``(kx, ku) [len(rows), K, ...]`` in ``dtype`` of the given shard rows (either layout;
    ``tensors`` may be memory-mapped: only those rows are read)."""
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if "knot_stride" not in tensors:
        return tensors["knots_x"][rows].to(dtype), tensors["knots_u"][rows].to(dtype)
    K = knots_t.numel()
    strides = tensors["knot_stride"]
    counts = (K - 1) // strides + 1
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    xs, us = [], []
    for r in rows.tolist():
        lo, hi, s = int(offsets[r]), int(offsets[r + 1]), int(strides[r])
        x, u = _densify(knots_t, tensors["knots_x_flat"][lo:hi][None].to(dtype),
                        tensors["knots_u_flat"][lo:hi][None].to(dtype), s)
        xs.append(x[0])
        us.append(u[0])
    return torch.stack(xs), torch.stack(us)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def mmap_safetensors(path) -> dict:
    """The tensors of a safetensors file, memory-mapped (read-only use; nothing is read until
    indexed, and indexing reads only the rows asked for)."""
    path = Path(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    size = os.path.getsize(path)
    raw = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    flat = torch.empty(0, dtype=torch.uint8).set_(raw)
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        lo, hi = spec["data_offsets"]
        dtype = _ST_DTYPES[spec["dtype"]]
        chunk = flat[8 + n + lo: 8 + n + hi]
        if (8 + n + lo) % dtype.itemsize:
            chunk = chunk.clone()     # misaligned: copy (never happens with safetensors' layout)
        out[name] = chunk.view(dtype).reshape(spec["shape"])
    return out


class StreamedTrajectories:
    """A GT set read shard by shard as needed (``load_trajectories(dir, stream=True)``): memory
    holds only the rows of the current batch. Same reading API as
    :class:`~bespoke_fast.fitting.trajectories.TrajectorySet` for the trainer (the
    :class:`~bespoke_fast.fitting.trajectories.Trajectories` protocol): ``len``, ``shape``, ``meta``,
    ``data_range``, ``device``, ``subset(rows)`` (an in-memory TrajectorySet), ``split(num_val)``,
    ``endpoints()``.
    """

    def __init__(self, path, manifest: dict, device="cpu", rows=None):
        self.path = Path(path)
        self.meta = manifest
        self.device = torch.device(device)
        self.knots_t = torch.tensor(manifest["knots_t"], dtype=torch.float64)
        self._shards = [mmap_safetensors(self.path / s["file"]) for s in manifest["shards"]]
        counts = [s["count"] for s in manifest["shards"]]
        self._starts = torch.tensor([0] + counts).cumsum(0)
        self._rows = torch.arange(int(self._starts[-1])) if rows is None else rows

    def __len__(self):
        return len(self._rows)

    @property
    def shape(self):
        return tuple(self.meta["shape"])

    @property
    def data_range(self) -> float:
        return float(self.meta.get("data_range", 2.0))

    def _view(self, rows) -> "StreamedTrajectories":
        view = object.__new__(StreamedTrajectories)
        view.__dict__.update(self.__dict__)
        view._rows = self._rows[torch.as_tensor(rows, dtype=torch.long)]
        return view

    def split(self, num_val: int):
        """(train, val): the last ``num_val`` rows held out; val is loaded into memory."""
        cut = split_point(len(self), num_val)
        return self._view(range(cut)), self.subset(range(cut, len(self)))

    def _gather(self, rows, with_knots=True):
        glob = self._rows[torch.as_tensor(rows, dtype=torch.long).reshape(-1)]
        shard = torch.searchsorted(self._starts, glob, right=True) - 1
        dtype = getattr(torch, self.meta.get("dtype", "float32"))
        parts, order = [], []
        for k in torch.unique(shard).tolist():
            pos = torch.nonzero(shard == k).reshape(-1)
            local = glob[pos] - self._starts[k]
            t = self._shards[k]
            part = {"x0": t["x0"][local], "x1": t["x1"][local], "index": t["index"][local],
                    **{n: t[n][local] for n in t if n.startswith("extra.")}}
            if with_knots:
                part["knots_x"], part["knots_u"] = decode_knots(t, local, self.knots_t, dtype)
            parts.append(part)
            order.append(pos)
        inv = torch.argsort(torch.cat(order))
        cat = {n: torch.cat([p[n] for p in parts])[inv] for n in parts[0]}
        empty = cat["x0"].new_zeros(len(glob), 0, *self.shape)
        gt = TrajectorySet(cat["x0"], cat["x1"], self.knots_t, cat.get("knots_x", empty),
                           cat.get("knots_u", empty), cat["index"], dict(self.meta),
                           {n[len("extra."):]: v for n, v in cat.items() if n.startswith("extra.")})
        return gt.to(self.device) if self.device.type != "cpu" else gt

    def subset(self, rows):
        """Rows ``rows`` (of this view) as an in-memory TrajectorySet, knots decoded."""
        return self._gather(rows)

    def fingerprint(self, chunk: int = 1024) -> str:
        """:func:`~bespoke_fast.fitting.trajectories.fingerprint` of these rows (the same value
        as ``TrajectorySet.fingerprint`` of them), read ``chunk`` rows at a time."""
        return fingerprint(len(self), lambda lo, hi: self._gather(range(lo, hi), with_knots=False),
                           chunk)

    def endpoints(self):
        """All rows without knots (x0, x1, index, extras): what evaluation needs."""
        return self._gather(range(len(self)), with_knots=False)
