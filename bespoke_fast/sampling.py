"""Sample to a directory of ``.npy`` shards: resumable, shardable across ranks, batch-size
independent. Backs the ``bespoke-fast sample`` command.

Layout of ``out_dir``::

    samples_00000.npy    float32 [count, *shape]: samples [k*S, min((k+1)*S, num)) of the run
    samples_00000.json   sidecar: start, count, shape, sha256 of the .npy, run fingerprint
    ...
    manifest.json        num, shape, seed, solver, model, shards (file/start/count/sha256),
                         wall time, package version

Every file is written atomically (a temp file in ``out_dir``, then ``os.replace``), the ``.npy``
before its sidecar, so a shard counts as done only when its sidecar exists, matches this run
(fingerprint, start, count) and the sha256 of the ``.npy`` on disk matches. A rerun keeps such
shards and recomputes the rest.

Sample ``i`` always starts from ``noise_for_indices([i], shape, seed)``, so the arrays do not
depend on ``batch_size``, ``shard_size`` or the number of ranks (bit for bit with the reference
backend on CPU and a model whose rows do not depend on their batch neighbours or position; a
CPU matmul, e.g. in ``GaussianMixtureFlow``, can move a row by ~1 ulp between batch layouts).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ._checks import check_int
from .io import sha256_file
from .noise import noise_for_indices

__all__ = ["sample_to_dir", "shard_name"]

MANIFEST = "manifest.json"
FORMAT = "bespoke-fast-samples"
FORMAT_VERSION = 1


def shard_name(k: int) -> str:
    """``samples_{k:05d}`` (add ``.npy`` / ``.json``)."""
    return f"samples_{k:05d}"



def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temp file next to ``path``, fsync, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_json(path: Path, doc: dict) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(doc, indent=2) + "\n").encode()))


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _solver_info(solver) -> dict:
    table = solver.coefficient_table(dtype=torch.float64).detach().cpu().contiguous()
    return {"kind": solver.kind, "base": getattr(solver, "base", None),
            "n_steps": int(solver.n_steps), "nfe": int(solver.nfe),
            "table_sha256": hashlib.sha256(table.numpy().tobytes()).hexdigest()}


def _shard_done(out_dir: Path, k: int, start: int, count: int, fingerprint: dict) -> dict | None:
    """The sidecar of shard ``k`` if the shard is complete and belongs to this run, else None."""
    side = _read_json(out_dir / (shard_name(k) + ".json"))
    npy = out_dir / (shard_name(k) + ".npy")
    if not isinstance(side, dict) or not npy.is_file():
        return None
    if (side.get("start"), side.get("count"), side.get("fingerprint")) != (start, count, fingerprint):
        return None
    if side.get("sha256") != sha256_file(npy):
        return None
    return side


def _dist_info(rank, world_size):
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    world_size = check_int("world_size", world_size)
    rank = check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size, initialised


def sample_to_dir(model, solver, shape, num: int, out_dir, batch_size: int = 256, seed: int = 0,
                  shard_size: int | None = None, model_dtype=torch.float32, backend: str = "auto",
                  device=None, progress: bool = True, model_name: str = "", rank: int | None = None,
                  world_size: int | None = None, **extras) -> dict:
    """Draw ``num`` samples with a :class:`~bespoke_fast.engine.FastSampler` into ``out_dir``.

    Args:
        model, solver, model_dtype, backend, device: as for ``FastSampler``.
        shape: per-sample shape. num: number of samples. seed: noise seed (counter-based).
        batch_size: samples per sampler call (the captured batch size).
        shard_size: samples per ``.npy`` shard (default ``16 * batch_size``, at most ``num``);
            the unit of resumption and of work split across ranks.
        progress: tqdm bar (samples/s) on rank 0.
        model_name: recorded in the manifest and the shards' fingerprint.
        rank, world_size: default from ``torch.distributed`` when it is initialised, else 0 / 1.
            Shard ``k`` is computed by rank ``k % world_size``. When distributed, all ranks meet
            at a barrier and rank 0 then writes the manifest from the sidecars; without a process
            group, rank 0 writes it only once every shard is present.
        extras: passed to the model (non-tensor values, or tensors shared by every sample).

    Returns: the manifest dict (``"complete": False`` and not written when shards are missing).

    Example::

        >>> m = sample_to_dir(model, solver, (3, 32, 32), 50_000, "samples/", batch_size=500)
        >>> x = np.concatenate([np.load(f"samples/{s['file']}") for s in m["shards"]])
    """
    from . import __version__
    from .engine import FastSampler

    wall0 = time.perf_counter()
    num = check_int("num", num)
    batch_size = check_int("batch_size", batch_size)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,)))
    shard_size = (min(num, 16 * batch_size) if shard_size is None
                  else check_int("shard_size", shard_size))
    rank, world_size, distributed = _dist_info(rank, world_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    n_shards = -(-num // shard_size)
    bounds = [(k * shard_size, min((k + 1) * shard_size, num)) for k in range(n_shards)]
    fingerprint = {"seed": int(seed), "shape": list(shape), "shard_size": shard_size,
                   "solver": _solver_info(solver), "model": model_name,
                   "model_dtype": str(model_dtype).replace("torch.", "")}

    mine = [k for k in range(n_shards) if k % world_size == rank]
    todo = [k for k in mine if _shard_done(out_dir, k, bounds[k][0], bounds[k][1] - bounds[k][0],
                                           fingerprint) is None]
    computed = []
    if todo:
        sampler = FastSampler(model, solver, shape, batch_size, model_dtype=model_dtype,
                              backend=backend, device=device)
        bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=sum(bounds[k][1] - bounds[k][0] for k in todo), unit="sample",
                       unit_scale=True, desc=f"sampling ({len(todo)} shards)", dynamic_ncols=True)
        try:
            for k in todo:
                start, end = bounds[k]
                parts = []
                for a in range(start, end, batch_size):
                    b = min(a + batch_size, end)
                    x0 = noise_for_indices(range(a, b), shape, seed)
                    parts.append(sampler(x0, **extras).cpu())
                    if bar is not None:
                        bar.update(b - a)
                arr = torch.cat(parts).numpy().astype(np.float32, copy=False)
                npy = out_dir / (shard_name(k) + ".npy")
                _atomic_write(npy, lambda f, arr=arr: np.save(f, arr, allow_pickle=False))
                _write_json(out_dir / (shard_name(k) + ".json"), {
                    "file": npy.name, "start": start, "count": end - start, "shape": list(shape),
                    "dtype": "float32", "sha256": sha256_file(npy), "fingerprint": fingerprint})
                computed.append(k)
        finally:
            if bar is not None:
                bar.close()

    if distributed:
        torch.distributed.barrier()

    shards, missing = [], []
    for k, (start, end) in enumerate(bounds):
        side = _read_json(out_dir / (shard_name(k) + ".json"))
        ok = (isinstance(side, dict) and side.get("fingerprint") == fingerprint
              and side.get("start") == start and side.get("count") == end - start)
        if ok:
            shards.append({"file": side["file"], "start": start, "count": end - start,
                           "sha256": side["sha256"]})
        else:
            missing.append(k)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "num": num, "shape": list(shape), "dtype": "float32", "seed": int(seed),
        "shard_size": shard_size, "batch_size": batch_size,
        "solver": {k: v for k, v in fingerprint["solver"].items()},
        "model": model_name, "model_dtype": fingerprint["model_dtype"], "backend": backend,
        "world_size": world_size, "shards": shards, "complete": not missing,
        "wall_seconds": time.perf_counter() - wall0,
        "package_version": __version__,
        "computed_shards": computed,  # this rank, this run (the rest were reused or other ranks')
    }
    if rank == 0 and not missing:
        written = {k: v for k, v in manifest.items() if k != "computed_shards"}
        _write_json(out_dir / MANIFEST, written)
    if missing:
        manifest["missing_shards"] = missing
    return manifest
