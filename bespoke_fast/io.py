"""General file utilities: atomic writes, sha256 of files, the bounded JSON reader, model
identity, and the run-folder claim shared by GT sets and sample folders. (Solver files live in
``bespoke_fast.solvers.files``.)

Bounded JSON (:func:`read_json_bounded`): the file is at most ``MAX_BYTES`` (1 MiB, unless the
caller allows more); JSON nesting at most ``MAX_DEPTH`` (32) levels; integers at most
``MAX_INT_DIGITS`` (20) digits; no duplicate keys, no NaN/Infinity literals.

Model identity: ``model_fingerprint`` is the sha256 of a module's parameters and buffers; a
model without any (a plain function, a stateless module) is identified by its import path,
``"callable:<module>.<qualname>"`` (so two lambdas of one module look alike).
"""
from __future__ import annotations

import errno as _errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch

from ._checks import InvalidArgumentError, InvalidFileError, MismatchError, OutputError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_INT_DIGITS = 20

__all__ = ["model_fingerprint", "fingerprint_configs", "model_identity", "check_model_identity",
           "sha256_file", "atomic_write", "atomic_write_text", "write_with_sidecar", "read_sidecar",
           "save_figure", "verified_sidecar", "check_writable", "read_json_bounded",
           "claim_run_dir", "check_shard_plan", "seal", "unseal", "identity_hash",
           "remove_stale_temp_files", "MAX_BYTES", "MAX_DEPTH", "MAX_INT_DIGITS"]


# ----------------------------------------------------------------------------- atomic files
def atomic_write(path, data) -> None:
    """Write ``data`` (bytes, or a callable ``data(binary_file)``) to ``path`` via a temp file in
    the same directory, fsync and ``os.replace``: readers never see a partial file, and no temp
    file stays behind on failure. ``OSError`` (permission, disk full, a directory in the way)
    becomes :class:`OutputError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _output_error(path, e) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _output_error(path, e: OSError) -> OutputError:
    reason = e.strerror or str(e)
    if e.errno in (_errno.ENOSPC, getattr(_errno, "EDQUOT", -1)) or "requested and" in str(e):
        reason = f"disk full ({reason})"
    err = OutputError(f"cannot write {path}: {reason}")
    err.errno = e.errno
    return err


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, text.encode("utf-8"))


def save_figure(fig, path, **savefig_kwargs) -> Path:
    """Save a matplotlib figure to ``path`` atomically (the format from the file's suffix, e.g.
    ``.png``), then close it; returns ``Path(path)``. ``savefig_kwargs`` go to ``fig.savefig``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = path.suffix.lstrip(".") or None
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, **savefig_kwargs))
    finally:
        plt.close(fig)
    return path


def write_with_sidecar(path, data, sidecar, info: dict, indent=None) -> dict:
    """Write ``data`` (as :func:`atomic_write` takes it) to ``path``, then the JSON ``sidecar``:
    ``info`` plus ``"sha256"`` of ``path``'s bytes. Both writes are atomic and the sidecar comes
    second, so a sidecar vouches for a complete file (check it with :func:`verified_sidecar`).
    Returns the sidecar's contents."""
    atomic_write(path, data)
    digest = hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else sha256_file(path)
    info = {**info, "sha256": digest}
    atomic_write_text(sidecar, json.dumps(info, indent=indent) + "\n")
    return info


def read_sidecar(sidecar) -> dict | None:
    """The JSON object in ``sidecar``, or None when it is missing, unreadable or not an object."""
    try:
        info = json.loads(Path(sidecar).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def verified_sidecar(path, sidecar, **expected) -> dict | None:
    """The sidecar of ``path`` (see :func:`write_with_sidecar`) when ``path`` exists, the sidecar
    holds every ``expected`` key with that value, and its ``"sha256"`` matches ``path``'s bytes;
    else None (the file is to be computed again)."""
    info = read_sidecar(sidecar)
    if info is None or not Path(path).is_file():
        return None
    if any(info.get(k) != v for k, v in expected.items()):
        return None
    return info if info.get("sha256") == sha256_file(path) else None


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes (shards, weights), read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- identities
def fingerprint_configs(model) -> list:
    """Settings that change what a model computes but live outside its tensors (a guidance
    scale, the class list of a conditioning function): objects opt in by defining
    ``fingerprint_config() -> dict`` (JSON-able), on the model itself or any submodule."""
    parts = model.named_modules() if isinstance(model, torch.nn.Module) else [("", model)]
    return [[name, part.fingerprint_config()] for name, part in parts
            if callable(getattr(part, "fingerprint_config", None))]


def model_fingerprint(model) -> str:
    """Identity of a model: sha256 (first 16 hex digits) of a module's parameters and buffers
    and of the ``fingerprint_config()`` of any part that defines one (e.g. ``cfg``'s guidance
    scale); for a model without any of these (a plain function, a stateless module),
    ``"callable:<module>.<qualname>"`` (documented in the module docstring)."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else {}
    configs = fingerprint_configs(model)
    if not state and not configs:
        fn = getattr(model, "__func__", model)
        if not hasattr(fn, "__qualname__"):
            fn = type(model)
        return f"callable:{getattr(fn, '__module__', '?')}.{fn.__qualname__}"
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().to(torch.float64).numpy().tobytes())
    if configs:  # absent for models without settings: their hashes are unchanged
        h.update(json.dumps(configs, sort_keys=True).encode())
    return h.hexdigest()[:16]


def model_identity(model, name: str = "") -> dict:
    """``{"name": name, "hash": model_fingerprint(model)}``: what artefacts record."""
    return {"name": name or "", "hash": model_fingerprint(model)}


def check_model_identity(recorded, model, model_name: str = "", what: str = "the solver",
                         allow: bool = False) -> None:
    """Raise :class:`MismatchError` when ``recorded`` (``{"name", "hash"}``, as a solver file or
    GT manifest stores it) names another model than ``model``. Hashes decide when both are
    known; otherwise names do; an empty record matches anything. ``allow=True`` skips it."""
    if allow or not isinstance(recorded, dict):
        return
    want_hash, want_name = str(recorded.get("hash") or ""), str(recorded.get("name") or "")
    have_hash = model_fingerprint(model)
    if want_hash and have_hash:
        differs = want_hash != have_hash
    else:
        differs = bool(want_name and model_name and want_name != model_name)
    if differs:
        raise MismatchError(
            f"{what} was made for model {want_name or '?'!s} (hash {want_hash or '-'}), not for "
            f"{model_name or 'the given model'} (hash {have_hash}); make one for this model, or "
            f"pass --allow-model-mismatch (allow_model_mismatch=True) to use it anyway")


# ----------------------------------------------------------------------------- bounded JSON
class _Reject(Exception):
    """Raised inside the JSON hooks; turned into the caller's error naming the file."""


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _int_hook(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Reject(f"an integer with {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _constant_hook(name):
    raise _Reject(f"contains NaN or Inf ({name} is not allowed: numbers must be finite)")


def _pairs_hook(pairs):
    doc = {}
    for key, value in pairs:
        if key in doc:
            raise _Reject(f"duplicate key {key!r}")
        doc[key] = value
    return doc


def read_json_bounded(path, what: str = "JSON file", max_bytes: int = MAX_BYTES,
                      error=InvalidFileError):
    """Parse a small JSON file with the limits above (size, nesting depth, integer digits, no
    duplicate keys or NaN); every problem raises ``error`` with a message starting with ``path``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is over the {max_bytes / 2**20:g} MB limit for a {what}")
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a {what}: not UTF-8 ({e.reason} at byte {e.start})") from e
    depth = 0
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise error(f"{path}: not a {what}: nested deeper than {MAX_DEPTH} levels")
        elif tok in "]}":
            depth -= 1
    try:
        return json.loads(text, parse_int=_int_hook, parse_constant=_constant_hook,
                          object_pairs_hook=_pairs_hook)
    except _Reject as e:
        raise error(f"{path}: not a valid {what}: {e}") from None
    except ValueError as e:  # JSONDecodeError
        raise error(f"{path}: not a {what}: not JSON ({e})") from None


# ----------------------------------------------------------------------------- run directories
# Shared by the GT sets (gt.py) and the sample folders (sampling.py): a folder holds the output
# of ONE run, identified by a dict of everything that determines its bytes ("run identity",
# stored in RUN_FILE before any shard is written). A rerun with the same identity resumes; with
# another one it stops (MismatchError naming the field) unless overwrite=True, which deletes the
# files of the old run (and only those). Manifests are written last and sealed with the sha256
# of their own canonical JSON, so any damage to them is detected on read.
RUN_FILE = "run.json"
MAX_SHARDS = 1_000_000
MANIFEST_MAX_BYTES = 256 << 20


def _canonical(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def identity_hash(identity: dict) -> str:
    """sha256 (hex) of a run identity's canonical JSON."""
    return hashlib.sha256(_canonical(identity)).hexdigest()


def seal(doc: dict) -> dict:
    """``doc`` plus ``"sealed_sha256"``: the sha256 of the rest (see :func:`unseal`)."""
    body = {k: v for k, v in doc.items() if k != "sealed_sha256"}
    return {**body, "sealed_sha256": hashlib.sha256(_canonical(body)).hexdigest()}


def unseal(path, doc, error=InvalidFileError):
    """Check a sealed document read from ``path``; raise ``error`` naming it when damaged."""
    if not isinstance(doc, dict) or not isinstance(doc.get("sealed_sha256"), str):
        raise error(f"{path}: damaged (not an object with a 'sealed_sha256' checksum)")
    body = {k: v for k, v in doc.items() if k != "sealed_sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != doc["sealed_sha256"]:
        raise error(f"{path}: damaged (its checksum does not match its content)")
    return doc


def _first_difference(old, new, prefix=""):
    """Dotted name and the two values of the first field where ``old`` and ``new`` differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            if old.get(key, "<absent>") != new.get(key, "<absent>"):
                return _first_difference(old.get(key, "<absent>"), new.get(key, "<absent>"),
                                         f"{prefix}{key}.")
    return prefix.rstrip("."), old, new


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def claim_run_dir(out, identity: dict, owned, overwrite: bool = False, what: str = "run",
                  rank: int = 0, grouped: bool = False) -> None:
    """Make ``out`` the folder of the run ``identity`` (see the block comment above).

    ``owned``: glob patterns of the files a run of this kind writes (shards, sidecars, manifest,
    temp files); ``overwrite`` deletes exactly those, plus RUN_FILE, first. Raises
    :class:`MismatchError` naming the first differing field when ``out`` holds files of another
    run, or of an unknown one. Only rank 0 deletes; in a process group (``grouped``) only rank 0
    writes RUN_FILE (the caller then meets the others at a barrier)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write {out}: it exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(out, e) from e
    run_file = out / RUN_FILE
    theirs = None
    if run_file.exists():
        try:
            theirs = read_json_bounded(run_file, "run identity file", error=InvalidFileError)
            theirs = unseal(run_file, theirs)["identity"]
        except (InvalidFileError, KeyError):
            theirs = "damaged"
    has_files = any(next(out.glob(p), None) is not None for p in owned)
    if theirs == identity:
        return
    if has_files and not overwrite:   # a run.json alone (a run that wrote nothing) is replaced
        if theirs is None or theirs == "damaged":
            state = "a damaged run.json" if theirs == "damaged" else "files but no run.json"
            raise MismatchError(f"{out} holds {state} (a {what} of an unknown run); use another "
                                f"--out, or --overwrite (overwrite=True) to replace it")
        field, old, new = _first_difference(theirs, identity)
        raise MismatchError(f"{out} holds a {what} made with other arguments: {field} was "
                            f"{_short(old)}, now {_short(new)}; use another --out, or --overwrite "
                            f"(overwrite=True) to replace it")
    if rank != 0 and grouped:  # rank 0 clears the folder and claims it; the others only check
        return
    if overwrite and rank == 0:
        for pattern in list(owned) + [RUN_FILE]:
            for f in out.glob(pattern):
                if f.is_file() or f.is_symlink():
                    f.unlink()
    atomic_write_text(run_file, json.dumps(seal({"identity": identity}), indent=1) + "\n")


def check_writable(path, what: str = "output") -> None:
    """Fail before any work if ``path`` cannot be written: it is a directory, or its folder
    cannot be created or written (probed with a temp file that is removed again)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write the {what} {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise _output_error(path, e) from e


def remove_stale_temp_files(out, patterns) -> None:
    """Delete temp files a killed writer left in ``out`` (they are never read)."""
    for pattern in patterns:
        for f in Path(out).glob(pattern):
            f.unlink(missing_ok=True)


def check_shard_plan(out, num: int, shard_size: int, bytes_per_item: int, existing: int = 0,
                     what: str = "run") -> int:
    """Fail fast on absurd sizes, before any work: at most ``MAX_SHARDS`` shards, and the bytes
    still to write must fit the free space of ``out``'s disk. Returns the number of shards."""
    n_shards = -(-num // shard_size)
    if n_shards > MAX_SHARDS:
        raise InvalidArgumentError(f"{what}: {num} items in shards of {shard_size} make {n_shards} "
                                   f"shards, over the limit of {MAX_SHARDS}; use a larger batch "
                                   f"size or a smaller count")
    import shutil
    need = num * bytes_per_item - existing
    probe = Path(out).absolute()
    while not probe.exists() and probe != probe.parent:   # the folder may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise InvalidArgumentError(f"{what}: {num} items need about {need / 1e9:.3g} GB but only "
                                   f"{free / 1e9:.3g} GB are free on {out}; use a smaller count or "
                                   f"another --out")
    return n_shards
