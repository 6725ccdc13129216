"""Ground-truth (GT) trajectory sets: the data a Bespoke solver is trained and validated on.

Each trajectory starts from counter-based noise ``x0`` (``bespoke_fast.noise``), is integrated
with adaptive Dormand-Prince (``solve_adaptive``) and is stored as dense knots
``(t_k, x_k, u_k = u(t_k, x_k))``, so that ``x(t)`` at any time is a cubic Hermite
interpolation, differentiable in t ("cached" GT, method.md section 5), plus its endpoint x(1).

On disk, a directory::

    run.json                 the run identity (model name + hash, num, shape, seed, tolerances,
                             knots, batch size, dtype, ...), written first
    shard_00000.safetensors  index [S], x0, x1 [S, *shape], knots_x, knots_u [S, K, *shape]
                             (or the adaptive-knot layout, see ``bespoke_fast.fitting.gt_storage``)
    shard_00000.json         sidecar: count, run identity hash, sha256 of the shard (written
                             after the shard)
    manifest.json            the run identity, shards, measured interpolation error, model
                             evaluations, wall time; written LAST, sealed with its own sha256

Shards are written atomically (temp file + rename); a rerun with the same arguments keeps every
shard whose sidecar matches its file and this run, and computes only the missing ones; a rerun
with other arguments is refused (``overwrite=True`` / ``--overwrite`` replaces the set). A
damaged manifest is detected on read and rebuilt from the verified shards by a rerun. Under
torchrun, shard k is computed by rank ``k % world_size`` and rank 0 writes the manifest.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path

import torch

from .. import __version__
from .._checks import (BespokeFastError, InvalidArgumentError, InvalidFileError, MissingFileError,
                      NonFiniteError, check_int, check_positive, model_error)
from ..io import (MANIFEST_MAX_BYTES, Inventory, atomic_write_text, check_shard_plan, claim_sharded_run,
                 first_difference, identity_hash, model_fingerprint, model_identity,
                 read_json_bounded, read_run_record, read_sidecar, seal,
                 sha256_file, unseal, verified_sidecar, write_with_sidecar)
from .gt_storage import StorageOptions, StreamedTrajectories, bytes_per_trajectory, decode_knots
from .trajectories import TrajectorySet, hermite
from ..noise import noise_for_indices
from ..solvers.adaptive import default_knots, solve_adaptive
from ..utils import dist_info, infer_device

__all__ = ["generate_trajectories", "load_trajectories", "TrajectorySet", "hermite",
           "DEFAULT_KNOTS", "GT_FORMAT"]

GT_FORMAT = "bespoke_fast.gt"
GT_FORMAT_VERSION = 2      # 2: run identity, sealed manifest written last
DEFAULT_KNOTS = 41



# ----------------------------------------------------------------------------- generation


def gt_inventory(n_shards: int, extra_files=()) -> Inventory:
    """The files a GT run of ``n_shards`` shards may create (its claim in ``run.json``)."""
    return Inventory(["manifest.json", *extra_files],
                     [("shard_", ".safetensors", n_shards), ("shard_", ".json", n_shards)])
_SHARD_RE = re.compile(r"^shard_\d{5,}\.safetensors$")


def _shard_paths(out: Path, k: int):
    return out / f"shard_{k:05d}.safetensors", out / f"shard_{k:05d}.json"


def _shard_done(out: Path, k: int, count: int, run: str):
    """The sidecar of shard ``k`` if it belongs to run ``run`` (identity hash), holds ``count``
    trajectories and its file's sha256 matches; else None."""
    return verified_sidecar(*_shard_paths(out, k), run=run, count=count)


def run_identity(model, num, shape, seed, rtol, atol, knots_t, batch_size, model_name, data_range,
                 dtype, extras_fn=None) -> dict:
    """Everything that determines a GT set's bytes (stored in ``run.json`` and the manifest): a
    rerun into the same folder must match it field for field."""
    return {"format": GT_FORMAT, "model": model_identity(model, model_name), "num": num,
            "shape": list(shape), "seed": seed, "rtol": rtol, "atol": atol,
            "knots_t": knots_t.tolist(), "batch_size": batch_size,
            "dtype": str(dtype).replace("torch.", ""), "data_range": data_range,
            "extras_fn": model_fingerprint(extras_fn) if extras_fn is not None else ""}


class _CheckedModel:
    """Wraps the model for GT integration: counts evaluations and turns a NaN/Inf velocity into
    a NonFiniteError naming the sample index, the time and the evaluation."""

    def __init__(self, model, index):
        self.model, self.index, self.calls = model, index, 0

    def __call__(self, x, t, **extras):
        self.calls += 1
        try:
            u = self.model(x, t, **extras)
        except BespokeFastError:
            raise
        except Exception as e:  # noqa: BLE001 -- the user's model: one line with the call
            lo, hi = int(self.index[0]), int(self.index[-1])
            raise model_error(e, f"at GT samples {lo}..{hi} (model evaluation {self.calls} of "
                                 f"their shard)", x, t) from e
        if isinstance(u, torch.Tensor) and u.is_floating_point() and u.shape == x.shape:
            bad = ~torch.isfinite(u.reshape(u.shape[0], -1)).all(1)
            if bool(bad.any()):
                row = int(bad.nonzero()[0])
                raise NonFiniteError(
                    f"the model returned NaN/Inf for GT sample {int(self.index[row])} at "
                    f"t={float(t.reshape(-1)[row]):.6g} (model evaluation {self.calls} of its "
                    f"shard); nothing was written for that shard")
        return u

    def __getattr__(self, name):
        return getattr(self.model, name)


def _first_non_finite(index, knots_x):
    """``(sample index, knot)`` of the first non-finite state in ``knots_x [B, K, ...]``, or None."""
    bad = ~torch.isfinite(knots_x.reshape(knots_x.shape[0], knots_x.shape[1], -1)).all(-1)
    if not bool(bad.any()):
        return None
    row, knot = (int(v) for v in bad.nonzero()[0])
    return int(index[row]), knot


def generate_trajectories(model, num: int, shape, out, seed: int = 0, rtol: float = 1e-5,
                          atol: float = 1e-5, knots=DEFAULT_KNOTS, batch_size: int = 256,
                          extras_fn=None, model_name: str = "", data_range: float = 2.0,
                          device=None, dtype=torch.float32, progress: bool = True,
                          measure_interpolation: int = 16, overwrite: bool = False,
                          storage_dtype=None, adaptive_knots: bool = False,
                          error_fraction: float = 0.1, reference_nfe: int = 10,
                          extra_files=()) -> dict:
    """Integrate ``num`` noises to t = 1 and store them as a sharded GT set in directory ``out``.

    Args:
        model: velocity model ``model(x, t[B], **extras)``.
        num: number of trajectories. shape: one sample's shape (e.g. ``(1, 8, 8)``).
        out: output directory (created). Rerunning the same call resumes: finished shards are
            verified (sha256) and kept, only missing ones are computed. A folder made with other
            arguments (model, num, seed, tolerances, knots, batch size, ...) is refused with a
            ``MismatchError`` naming the field, unless ``overwrite=True``, which deletes the
            files that run's record lists (and refuses a folder holding any other file). A
            file of the user's that this run would write (e.g. a ``manifest.json`` of theirs)
            is never replaced: ``OutputError`` naming it.
        extra_files: names of further files the caller writes into ``out`` after the run
            (claimed in the run record with the rest, e.g. the diffusers conditioning table).
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
        storage_dtype: dtype the knots are stored in (``"float16"``, ``"bfloat16"``; default:
            ``dtype``), about halving the disk. adaptive_knots: keep per trajectory only the
            knots its interpolation needs. Both are measured against an error budget of
            ``error_fraction`` x the local error of RK2 at ``reference_nfe`` (recorded in the
            manifest's ``storage``; an ``InvalidArgumentError`` when exceeded): see
            ``bespoke_fast.fitting.gt_storage``.

    A model that returns NaN/Inf stops the run with a ``NonFiniteError`` naming the sample
    index and the time; the shard is not written. Absurd sizes fail before any work (more than
    ``io.MAX_SHARDS`` shards, or more bytes than the disk has free).

    Returns: the manifest (also written to ``out/manifest.json``, last and atomically, sealed
    with its own checksum), including the model evaluations spent (``nfe``: per-sample
    evaluations, solver + knots) and wall time.

    Example::

        >>> m = generate_trajectories(model, 2048, (64,), "runs/gmm_gt", seed=0)
        >>> gt = load_trajectories("runs/gmm_gt")
    """
    num = check_int("num", num)
    batch_size = check_int("batch_size", batch_size)
    rtol, atol = check_positive("rtol", rtol), check_positive("atol", atol)
    shape = tuple(check_int("shape entries", s) for s in shape)
    out = Path(out)
    knots_t = (default_knots(check_int("knots", knots, 2)) if isinstance(knots, int)
               else torch.as_tensor(knots, dtype=torch.float64))
    if knots_t.numel() < 2 or knots_t[0] != 0 or knots_t[-1] != 1 or (knots_t.diff() <= 0).any():
        raise InvalidArgumentError("knots must be an int >= 2 or increasing times from 0 to 1")
    device = torch.device(device) if device is not None else infer_device(model)
    rank, world, distributed = dist_info()
    identity = run_identity(model, num, shape, seed, rtol, atol, knots_t, batch_size, model_name,
                            data_range, dtype, extras_fn)
    storage = StorageOptions(storage_dtype, adaptive_knots, error_fraction, reference_nfe)
    if storage.active(dtype):        # part of the run: a rerun with other storage is refused
        identity["storage"] = storage.describe(dtype)
    run = identity_hash(identity)
    item = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
    existing = sum(f.stat().st_size for f in out.glob("shard_*.safetensors"))
    n_shards = check_shard_plan(out, num, batch_size, item * (2 + 2 * knots_t.numel()) + 8,
                                existing, "gt")
    inventory = gt_inventory(n_shards, extra_files)
    claim_sharded_run(out, identity, inventory, overwrite, "GT set", rank, distributed)

    def count(k):
        return min(batch_size, num - k * batch_size)

    mine = range(rank, n_shards, world)          # streamed: no up-front lists
    last_is_mine = (n_shards - 1) % world == rank
    start = time.perf_counter()
    bar = _progress(total=len(mine) * batch_size - (batch_size - count(n_shards - 1)) * last_is_mine,
                    enabled=progress and rank == 0, desc="GT trajectories", unit="traj")
    try:
        for k in mine:
            lo, hi = k * batch_size, k * batch_size + count(k)
            if _shard_done(out, k, hi - lo, run) is not None:
                bar.update(hi - lo)
                continue
            index = torch.arange(lo, hi)
            x0 = noise_for_indices(range(lo, hi), shape, seed, dtype=dtype, device=device)
            extras = extras_fn(index) if extras_fn is not None else {}
            try:
                with torch.no_grad():
                    _, stats = solve_adaptive(_CheckedModel(model, index), x0,
                                              torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=rtol,
                                              atol=atol, dense_knots=knots_t, check_finite=False,
                                              **extras)
            except RuntimeError as e:   # max_steps / step size underflow: the tolerances' to fix
                if not str(e).startswith("solve_adaptive:"):
                    raise
                raise InvalidArgumentError(f"GT shard {k} (samples {lo}..{hi - 1}): {e}") from e
            kx, ku = stats["knots_x"].movedim(0, 1), stats["knots_u"].movedim(0, 1)
            bad = _first_non_finite(index, kx)
            if bad is not None:
                raise NonFiniteError(f"GT sample {bad[0]} is NaN/Inf at knot {bad[1]} (t="
                                     f"{float(knots_t[bad[1]]):.6g}; the integration diverged); nothing "
                                     f"was written for shard {k}")
            knot_tensors, storage_info = storage.encode(model, knots_t, kx, ku, extras)
            tensors = {"index": index, "x0": x0.cpu(), "x1": stats["knots_x"][-1].cpu().clone(),
                       **knot_tensors}
            for name, value in extras.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"extra.{name}"] = value.contiguous().cpu()
            _write_shard(out, k, tensors, {"count": hi - lo, "start": lo, "run": run,
                                            "nfe": stats["nfe"] * (hi - lo),
                                            "nfe_knots": stats["nfe_knots"] * (hi - lo),
                                            "steps": stats["n_accepted"], "rejected": stats["n_rejected"],
                                            **({"storage": storage_info} if storage_info else {})})
            bar.update(hi - lo)
    finally:
        bar.close()
    if distributed:
        torch.distributed.barrier()
    manifest = None
    if rank == 0:
        manifest = _reusable_manifest(out, identity, run, n_shards)
        if manifest is None:
            manifest = _write_manifest(out, model, identity, run, n_shards, seed, rtol, atol,
                                       measure_interpolation, time.perf_counter() - start, storage)
    if distributed:
        torch.distributed.barrier()
        if rank != 0:
            manifest = read_manifest(out)
    return manifest


def _progress(total, enabled, desc, unit):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc=desc, unit=unit, dynamic_ncols=True)


def _write_shard(out: Path, k: int, tensors: dict, info: dict) -> None:
    """The shard file, then its sidecar (both atomic): a sidecar vouches for a complete file."""
    from safetensors.torch import save
    data, side = _shard_paths(out, k)
    write_with_sidecar(data, save(tensors), side, info)


def _manifest_error(path, msg):
    return InvalidFileError(f"{path}: {msg}; rerun the same 'bespoke-fast gt' command to rebuild "
                            f"it from the verified shards")


def read_manifest(out) -> dict:
    """Read and verify ``out/manifest.json``: bounded JSON, its seal (own checksum) and schema.
    Raises ``FileNotFoundError`` when absent, ``InvalidFileError`` naming the file otherwise."""
    path = Path(out) / "manifest.json"
    if not path.is_file():
        raise MissingFileError(f"{out}: not a GT directory (no manifest.json); create one with "
                                f"'bespoke-fast gt --model M --num N --out {out}'")
    try:
        doc = read_json_bounded(path, "GT manifest", MANIFEST_MAX_BYTES, InvalidFileError)
    except InvalidFileError as e:
        raise _manifest_error(path, str(e).split(": ", 1)[-1]) from None
    if not isinstance(doc, dict) or doc.get("format") != GT_FORMAT:
        raise InvalidFileError(f"{path}: not a bespoke_fast GT manifest")
    if doc.get("format_version") == 1 and "sealed_sha256" not in doc:
        raise InvalidFileError(f"{path}: made by an older bespoke_fast (an unverifiable manifest); "
                               f"regenerate the set: rerun 'bespoke-fast gt' with --overwrite")
    try:
        unseal(path, doc)
    except InvalidFileError as e:
        raise _manifest_error(path, str(e).split(": ", 1)[-1]) from None
    shards = doc.get("shards")
    ok = (isinstance(shards, list) and shards and isinstance(doc.get("knots_t"), list)
          and isinstance(doc.get("num"), int) and isinstance(doc.get("shape"), list)
          and all(isinstance(s, dict) and isinstance(s.get("file"), str)
                  and _SHARD_RE.match(s["file"]) and isinstance(s.get("count"), int)
                  and isinstance(s.get("sha256"), str) for s in shards)
          and sum(s["count"] for s in shards) == doc["num"])
    if not ok:
        raise _manifest_error(path, "damaged (missing or malformed 'shards', 'num', 'shape' or "
                                    "'knots_t')")
    _check_against_run(path, doc)
    return doc


def _check_against_run(path: Path, doc: dict) -> None:
    """A manifest edited and resealed by hand: its fields must equal its run identity, its shards
    must belong to that run (identity hash), and the folder's run record must name the same run."""
    run = doc.get("run")
    if not isinstance(run, dict):
        raise _manifest_error(path, "damaged (no run identity)")
    for key in ("model", "num", "shape", "dtype", "seed", "rtol", "atol", "batch_size", "knots_t",
                "data_range"):
        if key in run and doc.get(key) != run[key]:
            raise _manifest_error(path, f"its {key} ({doc.get(key)!r:.40}) differs from its run "
                                        f"identity's ({run[key]!r:.40}): edited by hand?")
    run_hash = identity_hash(run)
    if any(s.get("run", run_hash) != run_hash for s in doc["shards"]):
        raise _manifest_error(path, "its shards belong to another run than its identity: edited "
                                    "by hand?")
    state, recorded, _ = read_run_record(path.parent)
    if state in ("ours", "legacy") and recorded != run:
        raise _manifest_error(path, f"it describes another run than {path.parent / 'run.json'} "
                                    f"({first_difference(recorded, run)}): edited by hand?")


def _reusable_manifest(out, identity, run, n_shards):
    """The existing manifest if it verifies and describes exactly the shards on disk, else None
    (then it is rebuilt)."""
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, InvalidFileError):
        return None
    if manifest.get("run") != identity or len(manifest["shards"]) != n_shards:
        return None
    for k, shard in enumerate(manifest["shards"]):
        info = read_sidecar(_shard_paths(out, k)[1])
        if info is None or info.get("run") != run or info.get("sha256") != shard["sha256"]:
            return None
    return manifest


def _write_manifest(out, model, identity, run, n_shards, seed, rtol, atol, measure, wall,
                    storage=None):
    """Build the manifest from the verified shards (measuring the interpolation error first),
    then write it once, atomically and sealed: a kill before leaves no manifest, after a
    complete one."""
    shards, nfe, nfe_knots = [], 0, 0
    for k in range(n_shards):
        count = min(identity["batch_size"], identity["num"] - k * identity["batch_size"])
        info = _shard_done(out, k, count, run)
        if info is None:
            raise InvalidFileError(f"{_shard_paths(out, k)[0]}: missing or corrupt after the run "
                                   f"(another process writing to {out}?); rerun the same command")
        shards.append({"file": _shard_paths(out, k)[0].name, **info})
        nfe += info["nfe"]
        nfe_knots += info["nfe_knots"]
    num = identity["num"]
    manifest = {
        "format": GT_FORMAT, "format_version": GT_FORMAT_VERSION, "package_version": __version__,
        "run": identity,
        **{k: identity[k] for k in ("model", "num", "shape", "dtype", "seed", "rtol", "atol",
                                    "batch_size", "knots_t", "data_range")},
        "shards": shards,
        "nfe": {"solver": nfe, "knots": nfe_knots, "total": nfe + nfe_knots,
                "per_trajectory": (nfe + nfe_knots) / num},
        "wall_seconds_last_run": wall,
    }
    if storage is not None:
        manifest["storage"] = _storage_summary(out, manifest, storage, getattr(torch, identity["dtype"]))
    if measure:
        gt = _assemble(out, manifest)
        manifest["interpolation"] = measure_interpolation_error(
            model, gt, min(measure, len(gt)), rtol=rtol * 1e-2, atol=atol * 1e-2, seed=seed)
    atomic_write_text(out / "manifest.json", json.dumps(seal(manifest), indent=1) + "\n")
    return seal(manifest)


def _storage_summary(out: Path, manifest: dict, storage: StorageOptions, dtype) -> dict:
    """The manifest's ``storage`` entry: knot dtype, adaptive knots, the measured extra error
    (worst shard) and bytes per trajectory as stored vs float32 with every knot."""
    shards = manifest["shards"]
    measured = [s["storage"] for s in shards if "storage" in s]
    stored = sum((out / s["file"]).stat().st_size for s in shards)
    K = len(manifest["knots_t"])
    summary = {**storage.describe(dtype),
               "bytes_per_trajectory": {"float32_all_knots": bytes_per_trajectory(manifest["shape"], K),
                                        "stored": stored / manifest["num"]}}
    if measured:
        summary.update(reference_local_error=measured[0]["reference_local_error"],
                       error_limit=measured[0]["error_limit"],
                       extra_rmse_mean=max(m["extra_rmse_mean"] for m in measured),
                       extra_rmse_max=max(m["extra_rmse_max"] for m in measured),
                       knots_mean=sum(m["knots_mean"] * s["count"] for m, s in zip(measured, shards))
                       / sum(s["count"] for s in shards))
    return summary


def measure_interpolation_error(model, gt: TrajectorySet, num: int = 16, times_per_traj: int = 8,
                                rtol=1e-7, atol=1e-7, seed=0) -> dict:
    """RMSE between the Hermite-interpolated GT and direct, tighter adaptive solves at random
    times, for ``num`` trajectories: the accuracy of the GT the trainer sees at moving times.

    The reference solves run in float64 when the model accepts it (float32 cannot reach
    tolerances near 1e-7), else in the GT's dtype at ``max(rtol, 1e-6)``."""
    g = torch.Generator().manual_seed(seed + 12345)
    t = torch.sort(torch.rand(times_per_traj, generator=g, dtype=torch.float64) * 0.98 + 0.01).values
    rows = torch.arange(num)
    device = infer_device(model)
    times = torch.cat([t.new_zeros(1), t, t.new_ones(1)])
    extras = {k: v[rows].to(device) for k, v in gt.extras.items()}   # each trajectory's condition
    with torch.no_grad():
        try:
            ref, stats = solve_adaptive(model, gt.x0[rows].to(device, torch.float64), times,
                                        rtol=rtol, atol=atol, return_stats=True, **extras)
            ref_dtype = "float64"
        except (TypeError, RuntimeError):  # a model that only runs in its own dtype
            ref, stats = solve_adaptive(model, gt.x0[rows].to(device), times, rtol=max(rtol, 1e-6),
                                        atol=max(atol, 1e-6), return_stats=True, **extras)
            ref_dtype = str(gt.x0.dtype).replace("torch.", "")
        interp = gt.at(t, rows).to(device, ref.dtype)
    err = (interp - ref[1:-1]).flatten(2).pow(2).mean(-1).sqrt()     # [m, num] per-sample RMSE
    end = (gt.x1[rows].to(device, ref.dtype) - ref[-1]).flatten(1).pow(2).mean(-1).sqrt()
    return {"rmse_mean": float(err.mean()), "rmse_max": float(err.max()),
            "endpoint_rmse_mean": float(end.mean()), "endpoint_rmse_max": float(end.max()),
            "num": num, "times_per_trajectory": times_per_traj, "reference_rtol": rtol,
            "reference_dtype": ref_dtype,
            "evaluations": int((stats["nfe"] + stats.get("nfe_knots", 0)) * num)}


def _assemble(path: Path, manifest: dict) -> TrajectorySet:
    """Read the manifest's shards, each checked against its checksum, into one set."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    parts = []
    for shard in manifest["shards"]:
        f = path / shard["file"]
        if not f.is_file():
            raise MissingFileError(f"{path}: shard {shard['file']} is missing; rerun the same "
                                    f"'bespoke-fast gt' command to recompute it")
        blob = f.read_bytes()
        if hashlib.sha256(blob).hexdigest() != shard["sha256"]:
            raise InvalidFileError(f"{f}: checksum mismatch (corrupt or partial); delete it and "
                                   f"rerun the same 'bespoke-fast gt' command")
        try:
            part = st_load(blob)
        except (SafetensorError, ValueError) as e:
            raise InvalidFileError(f"{f}: not a GT shard ({e})") from None
        if part.get("x0") is None or part["x0"].shape[0] != shard["count"]:
            raise InvalidFileError(f"{f}: holds another number of trajectories than the manifest")
        if "knot_stride" in part:   # adaptive layout: restore every knot (exactly, from the cubic)
            part["knots_x"], part["knots_u"] = decode_knots(
                part, range(shard["count"]), torch.tensor(manifest["knots_t"], dtype=torch.float64),
                part["x0"].dtype)
            del part["knots_x_flat"], part["knots_u_flat"], part["knot_stride"]
        parts.append(part)
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return TrajectorySet(cat["x0"], cat["x1"], torch.tensor(manifest["knots_t"], dtype=torch.float64),
                         cat["knots_x"], cat["knots_u"], cat["index"], manifest,
                         {k[len("extra."):]: v for k, v in cat.items() if k.startswith("extra.")})


def load_trajectories(path, device="cpu", stream: bool = False) -> TrajectorySet:
    """Load a GT directory written by :func:`generate_trajectories` (safe format, verified: the
    manifest's seal and schema, then every shard's sha256).

    ``stream=True`` returns a :class:`~bespoke_fast.fitting.gt_storage.StreamedTrajectories`: shards are
    verified and memory-mapped, and only the rows of each batch are read (for sets larger than
    memory; ``train`` accepts it).

    Raises ``FileNotFoundError`` / ``InvalidFileError`` (a ``ValueError``) naming what is missing
    or wrong; a damaged manifest is rebuilt from the verified shards by rerunning the same
    ``gt`` command.
    """
    path = Path(path)
    if stream:
        manifest = read_manifest(path)
        for shard in manifest["shards"]:
            f = path / shard["file"]
            if not f.is_file():
                raise MissingFileError(f"{path}: shard {shard['file']} is missing; rerun the same "
                                       f"'bespoke-fast gt' command to recompute it")
            if sha256_file(f) != shard["sha256"]:
                raise InvalidFileError(f"{f}: checksum mismatch (corrupt or partial); delete it and "
                                       f"rerun the same 'bespoke-fast gt' command")
        return StreamedTrajectories(path, manifest, device)
    gt = _assemble(path, read_manifest(path))
    return gt.to(device) if str(device) != "cpu" else gt
