"""Sample to a directory of ``.npy`` shards: resumable, shardable across ranks, batch-size
independent. Backs the ``bespoke-fast sample`` command.

Layout of ``out_dir``::

    run.json             the run identity (num, shape, seed, batch and shard size, solver kind
                         and sha256, model name and hash, model dtype, backend, extras), first
    samples_00000.npy    float32 [count, *shape]: samples [k*S, min((k+1)*S, num)) of the run
    samples_00000.json   sidecar: start, count, shape, sha256 of the .npy, run identity hash
    ...
    manifest.json        the run identity, shards (file/start/count/sha256), wall time, package
                         version; written LAST, sealed with its own sha256

Every file is written atomically (a temp file in ``out_dir``, then ``os.replace``), the ``.npy``
before its sidecar, so a shard counts as done only when its sidecar exists, matches this run
and the sha256 of the ``.npy`` on disk matches. A rerun with the same arguments keeps such shards
and recomputes the rest; a rerun with any other argument is refused (``MismatchError`` naming
the field) unless ``overwrite=True`` (``--overwrite``), which deletes the files the old run's
record lists first (never a file of the user's: a folder holding one is refused).
Every shard is checked to be finite before it is written: a NaN/Inf sample stops the run with a
``NonFiniteError`` naming the sample index and the solver step where it appeared.
:func:`load_samples` reads a folder back, verifying the manifest and every checksum.

Sample ``i`` always starts from ``noise_for_indices([i], shape, seed)``, so the arrays do not
depend on ``batch_size``, ``shard_size`` or the number of ranks (bit for bit with the reference
backend on CPU and a model whose rows do not depend on their batch neighbours or position; a
CPU matmul, e.g. in ``GaussianMixtureFlow``, can move a row by ~1 ulp between batch layouts).
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from ._checks import (InvalidArgumentError, InvalidFileError, MissingFileError, NonFiniteError,
                      check_int, model_errors)
from .io import (MANIFEST_MAX_BYTES, Inventory, atomic_write_text, check_model_identity, check_shard_plan,
                 claim_sharded_run, identity_hash, model_identity, read_json_bounded, read_run_record,
                 read_sidecar, seal, sha256_file, unseal, verified_sidecar, write_with_sidecar)
from .noise import noise_for_indices
from .utils import dist_info

__all__ = ["sample_to_dir", "load_samples", "shard_name"]

MANIFEST = "manifest.json"
FORMAT = "bespoke-fast-samples"
FORMAT_VERSION = 2      # 2: run identity, sealed manifest


def samples_inventory(n_shards: int) -> Inventory:
    """The files a sample run of ``n_shards`` shards may create (its claim in ``run.json``)."""
    return Inventory([MANIFEST], [("samples_", ".npy", n_shards), ("samples_", ".json", n_shards)])
_SHARD_RE = re.compile(r"^samples_\d{5,}\.npy$")


def shard_name(k: int) -> str:
    """``samples_{k:05d}`` (add ``.npy`` / ``.json``)."""
    return f"samples_{k:05d}"


def _solver_info(solver) -> dict:
    """What identifies a solver in a run (any kind: bespoke rk1 / rk2, BNS)."""
    return {"kind": solver.kind, **solver.file_header(), "n_steps": int(solver.n_steps),
            "nfe": int(solver.nfe), "sha256": solver.fingerprint()}


def _extras_identity(extras: dict) -> dict:
    return {k: (hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                if isinstance(v, torch.Tensor) else repr(v)) for k, v in sorted(extras.items())}


def _shard_done(out_dir: Path, k: int, start: int, count: int, run: str) -> dict | None:
    """The sidecar of shard ``k`` if the shard is complete and belongs to this run, else None."""
    return verified_sidecar(out_dir / (shard_name(k) + ".npy"), out_dir / (shard_name(k) + ".json"),
                            start=start, count=count, run=run)


def _dist_info(rank, world_size):
    default_rank, default_world, initialised = dist_info()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    world_size = check_int("world_size", world_size)
    rank = check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise InvalidArgumentError(f"rank must be < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size, initialised


def sample_to_dir(model, solver, shape, num: int, out_dir, batch_size: int = 256, seed: int = 0,
                  shard_size: int | None = None, model_dtype=torch.float32, backend: str = "auto",
                  device=None, progress: bool = True, model_name: str = "", rank: int | None = None,
                  world_size: int | None = None, overwrite: bool = False,
                  allow_model_mismatch: bool = False, **extras) -> dict:
    """Draw ``num`` samples with a :class:`~bespoke_fast.engine.FastSampler` into ``out_dir``.

    Args:
        model, solver, model_dtype, backend, device: as for ``FastSampler``.
        shape: per-sample shape. num: number of samples. seed: noise seed (counter-based).
        batch_size: samples per sampler call (the captured batch size). Not part of the run:
            a rerun with another batch size (e.g. after running out of memory) resumes.
        shard_size: samples per ``.npy`` shard (default: the resumed run's, else
            ``16 * batch_size``, at most ``num``); the unit of resumption and of work split
            across ranks.
        progress: tqdm bar (samples/s) on rank 0.
        model_name: recorded in the manifest and the shards' fingerprint.
        rank, world_size: default from ``torch.distributed`` when it is initialised, else 0 / 1.
            Shard ``k`` is computed by rank ``k % world_size``. When distributed, all ranks meet
            at a barrier and rank 0 then writes the manifest from the sidecars; without a process
            group, rank 0 writes it only once every shard is present.
        overwrite: replace a folder made with other arguments: the files its run record
            lists are deleted first, and a folder holding any other file is refused
            (``OutputError`` listing them); without it such a folder is refused
            (``MismatchError`` naming the field). A file of the user's that this run would
            write is never replaced (``OutputError`` naming it).
        allow_model_mismatch: use a solver whose file records another model (by hash, else by
            name); without it that is a ``MismatchError``.
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
    shape = tuple(check_int("shape entries", s)
                  for s in (shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,)))
    shard_given = shard_size is not None
    shard_size = (min(num, 16 * batch_size) if shard_size is None
                  else check_int("shard_size", shard_size))
    rank, world_size, distributed = _dist_info(rank, world_size)
    check_model_identity(solver.meta.get("model"), model, model_name,
                         "the solver", allow_model_mismatch)
    out_dir = Path(out_dir)
    # the batch size is not part of the run: a rerun with another one resumes (with the shard
    # size of the run it resumes, unless one is given)
    identity = {"format": FORMAT, "num": num, "shape": list(shape), "seed": int(seed),
                "shard_size": shard_size,
                "solver": _solver_info(solver), "model": model_identity(model, model_name),
                "model_dtype": str(model_dtype).replace("torch.", ""), "backend": backend,
                "extras": _extras_identity(extras)}
    if not shard_given:
        state, theirs, _ = read_run_record(out_dir)
        recorded = theirs.get("shard_size") if isinstance(theirs, dict) else None
        if (state == "ours" and type(recorded) is int and 1 <= recorded
                and {**identity, "shard_size": recorded} == theirs):
            shard_size = identity["shard_size"] = recorded
    run = identity_hash(identity)
    existing = sum(f.stat().st_size for f in out_dir.glob("samples_*.npy"))
    n_shards = check_shard_plan(out_dir, num, shard_size, 4 * int(np.prod(shape)), existing,
                                "sample")
    inventory = samples_inventory(n_shards)
    claim_sharded_run(out_dir, identity, inventory, overwrite, "sample folder", rank, distributed)

    def bounds(k):
        return k * shard_size, min((k + 1) * shard_size, num)

    sampler, bar, computed = None, None, []
    try:
        for k in range(rank, n_shards, world_size):          # streamed: no up-front lists
            start, end = bounds(k)
            if _shard_done(out_dir, k, start, end - start, run) is not None:
                continue
            if sampler is None:
                sampler = FastSampler(model, solver, shape, batch_size, model_dtype=model_dtype,
                                      backend=backend, device=device)
                if progress and rank == 0:
                    from tqdm.auto import tqdm
                    bar = tqdm(unit="sample", unit_scale=True, desc="sampling", dynamic_ncols=True)
            parts = []
            for a in range(start, end, batch_size):
                b = min(a + batch_size, end)
                x0 = noise_for_indices(range(a, b), shape, seed)
                with model_errors(model, f"at samples {a}..{b - 1}", x0):
                    x = sampler(x0, **extras).cpu()
                _check_finite(x, a, model, solver, x0, sampler.device, extras)
                parts.append(x)
                if bar is not None:
                    bar.update(b - a)
            arr = torch.cat(parts).numpy().astype(np.float32, copy=False)
            npy = out_dir / (shard_name(k) + ".npy")
            write_with_sidecar(npy, lambda f, arr=arr: np.save(f, arr, allow_pickle=False),
                               out_dir / (shard_name(k) + ".json"),
                               {"file": npy.name, "start": start, "count": end - start,
                                "shape": list(shape), "dtype": "float32", "run": run}, indent=2)
            computed.append(k)
    finally:
        if bar is not None:
            bar.close()

    if distributed:
        torch.distributed.barrier()

    shards, missing = [], []
    for k in range(n_shards):
        start, end = bounds(k)
        side = read_sidecar(out_dir / (shard_name(k) + ".json"))
        if (side is not None and side.get("run") == run and side.get("start") == start
                and side.get("count") == end - start):
            shards.append({"file": side["file"], "start": start, "count": end - start,
                           "sha256": side["sha256"]})
        else:
            missing.append(k)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "run": identity,
        "num": num, "shape": list(shape), "dtype": "float32", "seed": int(seed),
        "shard_size": shard_size, "batch_size": batch_size, "solver": identity["solver"],
        "model": model_name, "model_hash": identity["model"]["hash"],
        "model_dtype": identity["model_dtype"], "backend": backend,
        "world_size": world_size, "shards": shards, "complete": not missing,
        "wall_seconds": time.perf_counter() - wall0,
        "package_version": __version__,
    }
    if rank == 0 and not missing:
        manifest = seal(manifest)
        atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    manifest = dict(manifest)
    manifest["computed_shards"] = computed  # this rank, this run (the rest were reused or other ranks')
    if missing:
        manifest["missing_shards"] = missing
    return manifest


def _check_finite(x, first_index, model, solver, x0, device, extras):
    """Raise NonFiniteError naming the first non-finite sample of a batch and the solver step
    where it appeared (found by re-running that one sample with the reference sampler)."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0])
    where = "at an unknown step (the reference sampler stays finite on it)"
    try:
        with torch.no_grad():
            traj = solver.sample(model, x0[row:row + 1].to(device), return_trajectory=True,
                                 **extras)
        finite = torch.isfinite(traj.reshape(traj.shape[0], -1)).all(1)
        if not bool(finite.all()):
            step = int((~finite).nonzero()[0])
            where = f"at solver step {step} of {solver.n_steps}"
    except Exception as e:  # noqa: BLE001 -- diagnosis only: the error below is what matters
        where = f"at an unknown step (re-running it failed: {type(e).__name__})"
    raise NonFiniteError(f"sample {first_index + row} is NaN/Inf {where}: the model produced "
                         f"non-finite values; nothing was written for its shard")


def load_samples(out_dir) -> np.ndarray:
    """All samples of a complete folder written by :func:`sample_to_dir`, ``[num, *shape]``
    float32, after verifying the manifest (seal, schema) and every shard's sha256. Raises
    ``FileNotFoundError`` / ``InvalidFileError`` naming the file."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        raise MissingFileError(f"{out_dir}: no complete samples (no {MANIFEST}); rerun the "
                                f"'bespoke-fast sample' command that made it")
    doc = unseal(path, read_json_bounded(path, "samples manifest", MANIFEST_MAX_BYTES,
                                         InvalidFileError))
    shards = doc.get("shards")
    if (doc.get("format") != FORMAT or not isinstance(shards, list)
            or not all(isinstance(s, dict) and isinstance(s.get("file"), str)
                       and _SHARD_RE.match(s["file"]) for s in shards)):
        raise InvalidFileError(f"{path}: not a bespoke_fast samples manifest")
    parts = []
    for shard in shards:
        f = out_dir / shard["file"]
        if not f.is_file() or sha256_file(f) != shard.get("sha256"):
            raise InvalidFileError(f"{f}: missing or checksum mismatch; rerun the same "
                                   f"'bespoke-fast sample' command to recompute it")
        arr = np.load(f, allow_pickle=False)
        if arr.shape != (shard.get("count"), *doc.get("shape", [])):
            raise InvalidFileError(f"{f}: shape {arr.shape} does not match the manifest")
        parts.append(arr)
    return np.concatenate(parts) if parts else np.empty((0, *doc.get("shape", [])), np.float32)
