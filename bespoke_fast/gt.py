"""Ground-truth (GT) trajectory sets: the data a Bespoke solver is trained and validated on.

Each trajectory starts from counter-based noise ``x0`` (``bespoke_fast.noise``), is integrated
with adaptive Dormand-Prince (``solve_adaptive``) and is stored as dense knots
``(t_k, x_k, u_k = u(t_k, x_k))``, so that ``x(t)`` at any time is a cubic Hermite
interpolation, differentiable in t ("cached" GT, method.md section 5), plus its endpoint x(1).

On disk, a directory::

    manifest.json            model name/hash, shape, seed, tolerances, knots, shards, measured
                             interpolation error, model evaluations, wall time
    shard_00000.safetensors  index [S], x0, x1 [S, *shape], knots_x, knots_u [S, K, *shape]
    shard_00000.json         sidecar: count, sha256 of the shard (written after the shard)

Shards are written atomically (temp file + rename); a rerun keeps every shard whose sidecar
matches its file and computes only the missing ones. Under torchrun, shard k is computed by
rank ``k % world_size`` and rank 0 writes the manifest.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from ._checks import check_int
from .io import atomic_write_text, model_fingerprint, sha256_file
from .noise import noise_for_indices
from .solvers.adaptive import default_knots, solve_adaptive

__all__ = ["generate_trajectories", "load_trajectories", "TrajectorySet", "hermite",
           "DEFAULT_KNOTS", "GT_FORMAT"]

GT_FORMAT = "bespoke_fast.gt"
DEFAULT_KNOTS = 41



def _dist():
    """(rank, world_size, initialised) of torch.distributed, (0, 1, False) when not in use."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size(), True
    return 0, 1, False


# ----------------------------------------------------------------------------- interpolation
def hermite(knots_t: torch.Tensor, knots_x: torch.Tensor, knots_u: torch.Tensor,
            t: torch.Tensor) -> torch.Tensor:
    """Cubic Hermite interpolation of trajectories, differentiable in ``t``.

    Args:
        knots_t: ``[K]`` increasing times (starting at 0, ending at 1).
        knots_x, knots_u: ``[B, K, ...]`` states and velocities at the knots.
        t: ``[m]`` query times in ``[knots_t[0], knots_t[-1]]`` (may require grad).
    Returns: ``[m, B, ...]`` states ``x(t)``; ``d/dt`` of it is the cubic's derivative (it equals
    ``u`` at the knots).

    With ``s = (t - t_k) / dt_k`` on the interval ``[t_k, t_{k+1}]``::

        x(t) = h00 x_k + h10 dt u_k + h01 x_{k+1} + h11 dt u_{k+1}
        h00 = 2s^3 - 3s^2 + 1, h10 = s^3 - 2s^2 + s, h01 = -2s^3 + 3s^2, h11 = s^3 - s^2
    """
    kt = knots_t.to(device=knots_x.device, dtype=torch.float64)
    tt = t.to(device=knots_x.device)
    idx = torch.searchsorted(kt, tt.detach().to(torch.float64).contiguous(), right=True) - 1
    idx = idx.clamp(0, kt.numel() - 2)
    t0, dt = kt[idx], kt[idx + 1] - kt[idx]
    s = ((tt.to(torch.float64) - t0) / dt)
    shape = (-1, 1) + (1,) * (knots_x.dim() - 2)
    s = s.reshape(shape)
    s2, s3 = s * s, s * s * s
    h00, h10, h01, h11 = 2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s, -2 * s3 + 3 * s2, s3 - s2
    dt = dt.reshape(shape)
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
        num_val = check_int("num_val", num_val, 1)
        if num_val >= len(self):
            raise ValueError(f"cannot hold out {num_val} of {len(self)} trajectories for validation")
        n = len(self)
        return self.subset(range(n - num_val)), self.subset(range(n - num_val, n))

    def at(self, t: torch.Tensor, rows=None) -> torch.Tensor:
        """``x(t)`` by Hermite interpolation, ``[m, N or len(rows), *shape]``."""
        kx = self.knots_x if rows is None else self.knots_x[rows]
        ku = self.knots_u if rows is None else self.knots_u[rows]
        return hermite(self.knots_t, kx, ku, t)

    def to(self, device) -> "TrajectorySet":
        return TrajectorySet(self.x0.to(device), self.x1.to(device), self.knots_t.to(device),
                             self.knots_x.to(device), self.knots_u.to(device), self.index,
                             dict(self.meta), {k: v.to(device) for k, v in self.extras.items()})


# ----------------------------------------------------------------------------- generation
def _shard_paths(out: Path, k: int):
    return out / f"shard_{k:05d}.safetensors", out / f"shard_{k:05d}.json"


def _shard_done(out: Path, k: int, count: int) -> bool:
    data, side = _shard_paths(out, k)
    if not (data.is_file() and side.is_file()):
        return False
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("count") == count and info.get("sha256") == sha256_file(data)


def generate_trajectories(model, num: int, shape, out, seed: int = 0, rtol: float = 1e-5,
                          atol: float = 1e-5, knots=DEFAULT_KNOTS, batch_size: int = 256,
                          extras_fn=None, model_name: str = "", data_range: float = 2.0,
                          device=None, dtype=torch.float32, progress: bool = True,
                          measure_interpolation: int = 16) -> dict:
    """Integrate ``num`` noises to t = 1 and store them as a sharded GT set in directory ``out``.

    Args:
        model: velocity model ``model(x, t[B], **extras)``.
        num: number of trajectories. shape: one sample's shape (e.g. ``(1, 8, 8)``).
        out: output directory (created). Rerunning the same call resumes: finished shards are
            verified (sha256) and kept, only missing ones are computed.
        seed: noise seed; trajectory i starts from ``noise_for_indices([i], shape, seed)``.
        rtol, atol: Dormand-Prince tolerances (float32 state: 1e-5 is a sensible floor).
        knots: number of knots K (times ``default_knots(K)``, denser near t = 1) or a tensor of
            increasing knot times from 0 to 1.
        batch_size: trajectories per shard (one adaptive solve per shard).
        extras_fn: optional ``extras_fn(index: LongTensor[B]) -> dict`` of model extras
            (e.g. class labels) for those trajectories; stored alongside.
        model_name: recorded in the manifest (checked later by train/eval).
        data_range: the data range R used for PSNR, recorded in the manifest.
        measure_interpolation: trajectories used to measure the Hermite interpolation error
            against direct tight solves at random times (0 to skip).

    Returns: the manifest (also written to ``out/manifest.json``), including the model
    evaluations spent (``nfe``: per-sample evaluations, solver + knots) and wall time.

    Example::

        >>> m = generate_trajectories(model, 2048, (64,), "runs/gmm_gt", seed=0)
        >>> gt = load_trajectories("runs/gmm_gt")
    """
    num = check_int("num", num)
    batch_size = check_int("batch_size", batch_size)
    shape = tuple(int(s) for s in shape)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    knots_t = default_knots(knots) if isinstance(knots, int) else torch.as_tensor(knots, dtype=torch.float64)
    if knots_t.numel() < 2 or knots_t[0] != 0 or knots_t[-1] != 1 or (knots_t.diff() <= 0).any():
        raise ValueError("knots must be an int >= 2 or increasing times from 0 to 1")
    device = torch.device(device) if device is not None else _model_device(model)
    rank, world, distributed = _dist()
    n_shards = math.ceil(num / batch_size)
    mine = [k for k in range(n_shards) if k % world == rank]
    todo = [k for k in mine if not _shard_done(out, k, min(batch_size, num - k * batch_size))]
    start = time.perf_counter()
    bar = _progress(total=sum(min(batch_size, num - k * batch_size) for k in todo),
                    enabled=progress and rank == 0, desc="GT trajectories", unit="traj")
    for k in todo:
        lo, hi = k * batch_size, min(num, (k + 1) * batch_size)
        index = torch.arange(lo, hi)
        x0 = noise_for_indices(index.tolist(), shape, seed, dtype=dtype, device=device)
        extras = extras_fn(index) if extras_fn is not None else {}
        with torch.no_grad():
            _, stats = solve_adaptive(model, x0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                                      rtol=rtol, atol=atol, dense_knots=knots_t, **extras)
        tensors = {
            "index": index, "x0": x0.cpu(), "x1": stats["knots_x"][-1].cpu(),
            "knots_x": stats["knots_x"].movedim(0, 1).contiguous().cpu(),
            "knots_u": stats["knots_u"].movedim(0, 1).contiguous().cpu(),
        }
        for name, value in extras.items():
            if isinstance(value, torch.Tensor):
                tensors[f"extra.{name}"] = value.contiguous().cpu()
        _write_shard(out, k, tensors, {"count": hi - lo, "start": lo, "nfe": stats["nfe"] * (hi - lo),
                                        "nfe_knots": stats["nfe_knots"] * (hi - lo),
                                        "steps": stats["n_accepted"], "rejected": stats["n_rejected"]})
        bar.update(hi - lo)
    bar.close()
    if distributed:
        torch.distributed.barrier()
    manifest = _read_manifest(out) if not todo and (out / "manifest.json").is_file() else None
    if rank == 0 and manifest is None:
        manifest = _write_manifest(out, model, num, shape, seed, rtol, atol, knots_t, batch_size,
                                   n_shards, model_name, data_range, dtype,
                                   time.perf_counter() - start)
        if measure_interpolation:
            gt = load_trajectories(out)
            manifest["interpolation"] = measure_interpolation_error(
                model, gt, min(measure_interpolation, len(gt)), rtol=rtol * 1e-2,
                atol=atol * 1e-2, seed=seed)
            atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    if distributed:
        torch.distributed.barrier()
        if rank != 0:
            manifest = _read_manifest(out)
    return manifest


def _model_device(model):
    try:
        return next(iter(model.parameters())).device
    except (AttributeError, StopIteration):
        pass
    try:
        return next(iter(model.buffers())).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _progress(total, enabled, desc, unit):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc=desc, unit=unit, dynamic_ncols=True)


def _write_shard(out: Path, k: int, tensors: dict, info: dict) -> None:
    from safetensors.torch import save_file
    data, side = _shard_paths(out, k)
    tmp = data.with_name(data.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(data)
    atomic_write_text(side, json.dumps({**info, "sha256": sha256_file(data)}) + "\n")


def _read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _write_manifest(out, model, num, shape, seed, rtol, atol, knots_t, batch_size, n_shards,
                    model_name, data_range, dtype, wall):
    shards, nfe, nfe_knots = [], 0, 0
    for k in range(n_shards):
        info = json.loads(_shard_paths(out, k)[1].read_text())
        shards.append({"file": _shard_paths(out, k)[0].name, **info})
        nfe += info["nfe"]
        nfe_knots += info["nfe_knots"]
    manifest = {
        "format": GT_FORMAT, "format_version": 1, "package_version": __version__,
        "model": {"name": model_name, "hash": model_fingerprint(model)},
        "num": num, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
        "seed": seed, "rtol": rtol, "atol": atol, "batch_size": batch_size,
        "knots_t": knots_t.tolist(), "data_range": data_range, "shards": shards,
        "nfe": {"solver": nfe, "knots": nfe_knots, "total": nfe + nfe_knots,
                "per_trajectory": (nfe + nfe_knots) / num},
        "wall_seconds_last_run": wall,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def measure_interpolation_error(model, gt: TrajectorySet, num: int = 16, times_per_traj: int = 8,
                                rtol=1e-7, atol=1e-7, seed=0) -> dict:
    """RMSE between the Hermite-interpolated GT and direct, tighter adaptive solves at random
    times, for ``num`` trajectories: the accuracy of the GT the trainer sees at moving times.

    The reference solves run in float64 when the model accepts it (float32 cannot reach
    tolerances near 1e-7), else in the GT's dtype at ``max(rtol, 1e-6)``."""
    g = torch.Generator().manual_seed(seed + 12345)
    t = torch.sort(torch.rand(times_per_traj, generator=g, dtype=torch.float64) * 0.98 + 0.01).values
    rows = torch.arange(num)
    device = _model_device(model)
    times = torch.cat([t.new_zeros(1), t, t.new_ones(1)])
    extras = {k: v[rows].to(device) for k, v in gt.extras.items()}   # each trajectory's condition
    with torch.no_grad():
        try:
            ref = solve_adaptive(model, gt.x0[rows].to(device, torch.float64), times, rtol=rtol,
                                 atol=atol, **extras)
            ref_dtype = "float64"
        except (TypeError, RuntimeError):  # a model that only runs in its own dtype
            ref = solve_adaptive(model, gt.x0[rows].to(device), times, rtol=max(rtol, 1e-6),
                                 atol=max(atol, 1e-6), **extras)
            ref_dtype = str(gt.x0.dtype).replace("torch.", "")
        interp = gt.at(t, rows).to(device, ref.dtype)
    err = (interp - ref[1:-1]).flatten(2).pow(2).mean(-1).sqrt()     # [m, num] per-sample RMSE
    end = (gt.x1[rows].to(device, ref.dtype) - ref[-1]).flatten(1).pow(2).mean(-1).sqrt()
    return {"rmse_mean": float(err.mean()), "rmse_max": float(err.max()),
            "endpoint_rmse_mean": float(end.mean()), "endpoint_rmse_max": float(end.max()),
            "num": num, "times_per_trajectory": times_per_traj, "reference_rtol": rtol,
            "reference_dtype": ref_dtype}


def load_trajectories(path, device="cpu") -> TrajectorySet:
    """Load a GT directory written by :func:`generate_trajectories` (safe format, verified).

    Raises ``FileNotFoundError`` / ``ValueError`` naming what is missing or wrong.
    """
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path}: not a GT directory (no manifest.json); create one with "
                                f"'bespoke-fast gt --model M --num N --out {path}'")
    manifest = _read_manifest(path)
    if manifest.get("format") != GT_FORMAT:
        raise ValueError(f"{path}/manifest.json: not a bespoke_fast GT manifest")
    parts = []
    for shard in manifest["shards"]:
        f = path / shard["file"]
        if not f.is_file():
            raise FileNotFoundError(f"{path}: shard {shard['file']} is missing; rerun the same "
                                    f"'bespoke-fast gt' command to recompute it")
        if sha256_file(f) != shard["sha256"]:
            raise ValueError(f"{f}: checksum mismatch (corrupt or partial); delete it and rerun "
                             f"the same 'bespoke-fast gt' command")
        parts.append(load_file(str(f)))
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    gt = TrajectorySet(cat["x0"], cat["x1"], torch.tensor(manifest["knots_t"], dtype=torch.float64),
                       cat["knots_x"], cat["knots_u"], cat["index"], manifest,
                       {k[len("extra."):]: v for k, v in cat.items() if k.startswith("extra.")})
    return gt.to(device) if str(device) != "cpu" else gt
