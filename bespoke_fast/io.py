"""Solver files: small, versioned JSON documents. Loading never executes code, is bounded before
anything is allocated, and validates everything: every problem raises
:class:`~bespoke_fast._checks.SolverFileError` (a ``ValueError``) whose message starts with the
file's path; a missing file raises ``FileNotFoundError``.

Limits, checked in this order before a solver is built: the file is at most ``MAX_BYTES``
(1 MiB); JSON nesting at most ``MAX_DEPTH`` (32) levels; integers at most ``MAX_INT_DIGITS``
(20) digits; no duplicate keys, no NaN/Infinity literals; ``format_version``, ``n_steps`` and
``nfe`` are JSON integers (``true`` and ``10.0`` are errors); ``1 <= n_steps <= MAX_STEPS``
(1024); every array has exactly the length ``n_steps`` implies. Then the parameters are loaded
and the tables are derived: they must be finite, ``t`` must run strictly from 0 to 1, ``s > 0``,
and the packed table the sampler uses must be finite in float32 (a ``theta_s`` of -95 is finite
in float64 but overflows a float32 coefficient).

Model identity: ``model_fingerprint`` is the sha256 of a module's parameters and buffers; a
model without any (a plain function, a stateless module) is identified by its import path,
``"callable:<module>.<qualname>"`` (so two lambdas of one module look alike).

Layout (format version 1)::

    {
      "format": "bespoke_fast.solver", "format_version": 1,
      "kind": "bespoke" | "bns",
      "base": "rk1" | "rk2",               (bespoke)   "init": "euler" | "midpoint"  (bns)
      "n_steps": n, "nfe": NFE,
      "parameters": {name: [floats], ...},  the raw (unconstrained) parameters: the source of truth
      "tables": {name: [floats], ...},      derived, for people and other tools; checked on load
      "model": {"name": ..., "hash": ...},  what it was fitted to (may be empty)
      "training": {...}, "validation": {...},
      "package_version": "x.y.z"
    }
"""
from __future__ import annotations

import errno as _errno
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch

from ._checks import (InvalidArgumentError, InvalidFileError, MismatchError, MissingFileError,
                      OutputError, SolverFileError)

FORMAT = "bespoke_fast.solver"
FORMAT_VERSION = 1
MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_INT_DIGITS = 20
MAX_STEPS = 1024

__all__ = ["save_solver", "load_solver", "solver_document", "solver_from_document",
           "model_fingerprint", "model_identity",
           "check_model_identity", "solver_fingerprint", "sha256_file", "atomic_write",
           "atomic_write_text", "check_writable", "FORMAT_VERSION", "MAX_BYTES", "MAX_DEPTH", "MAX_INT_DIGITS",
           "MAX_STEPS"]


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


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes (shards, weights), read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- identities
def model_fingerprint(model) -> str:
    """Identity of a model: sha256 (first 16 hex digits) of a module's parameters and buffers;
    for a model without any (a plain function, a stateless module), ``"callable:<module>.<qualname>"``
    (documented in the module docstring)."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else {}
    if not state:
        fn = getattr(model, "__func__", model)
        if not hasattr(fn, "__qualname__"):
            fn = type(model)
        return f"callable:{getattr(fn, '__module__', '?')}.{fn.__qualname__}"
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().to(torch.float64).numpy().tobytes())
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


def solver_fingerprint(solver) -> str:
    """sha256 of a solver's kind, header, ``n_steps`` and raw parameters (any solver kind)."""
    doc = {"kind": solver.kind, **solver.file_header(), "n_steps": int(solver.n_steps),
           "parameters": solver.raw_parameters()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- saving
def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def solver_document(solver) -> dict:
    """The JSON-ready document of a solver file (what :func:`save_solver` writes)."""
    from . import __version__
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": solver.kind,
        **solver.file_header(),
        "n_steps": solver.n_steps, "nfe": solver.nfe,
        "parameters": solver.raw_parameters(),
        "tables": {k: v.detach().cpu().tolist() for k, v in solver.tables().items()},
        "model": _jsonable(solver.meta.get("model", {})),
        "training": _jsonable(solver.meta.get("training", {})),
        "validation": _jsonable(solver.meta.get("validation", {})),
        "package_version": __version__,
    }


def save_solver(solver, path) -> None:
    """Write ``solver`` (a BespokeSolver or NonStationarySolver) to ``path`` as JSON, atomically."""
    atomic_write_text(path, json.dumps(solver_document(solver), indent=1) + "\n")


# ----------------------------------------------------------------------------- loading
def _fail(path, msg):
    raise SolverFileError(f"{path}: invalid solver file: {msg}")


class _Reject(Exception):
    """Raised inside the JSON hooks; turned into a SolverFileError naming the file."""


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
                      error=SolverFileError):
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


def _is_int(v) -> bool:
    return type(v) is int  # noqa: E721 -- bool and float are errors


def _expected_sizes(path, kind, header, n):
    """Parameter and table sizes a solver of this kind / header / n has (no allocation)."""
    if kind == "bespoke":
        m = n if header == "rk1" else 2 * n
        return ({"theta_t": m, "theta_tdot": m, "theta_s": m, "theta_sdot": m},
                {"t": m + 1, "tdot": m, "s": m + 1, "sdot": m})
    tri = n * (n + 1) // 2
    return {"theta_t": n, "theta_a": n, "theta_b": tri}, {"t": n + 1, "a": n, "b": tri}


def _number_list(path, section, where, name, size):
    values = section[name]
    if not isinstance(values, list):
        _fail(path, f"{where} {name!r} must be a list of numbers")
    if len(values) != size:
        _fail(path, f"{where} {name!r} has {len(values)} entries, expected {size}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        _fail(path, f"{where} {name!r} must be a list of numbers")
    try:
        out = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except OverflowError:
        _fail(path, f"{where} {name!r} holds a number too large for a float")
    if not torch.isfinite(out).all():
        _fail(path, f"{where} {name!r} contains a non-finite number")
    return out


def load_solver(path):
    """Read a solver file written by ``save`` and return the solver (BespokeSolver or
    NonStationarySolver). The file is bounded and validated (see the module docstring) before
    and after the solver is built; problems raise ``SolverFileError`` (a ``ValueError``) naming
    the file, a missing file ``FileNotFoundError``.

    Example::

        >>> solver = bespoke_fast.load_solver("digits_rk2_nfe10.json")
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            _fail(path, "not a regular file")
        raise MissingFileError(f"solver file not found: {path}")
    return solver_from_document(read_json_bounded(path, "solver file"), path)


def solver_from_document(doc, path="<solver document>"):
    """Validate a solver document (see :func:`solver_document`; the checks of
    :func:`load_solver` after parsing) and build the solver; ``path`` names the source in errors."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        _fail(path, f"'format' must be {FORMAT!r}")
    version = doc.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        _fail(path, f"unknown format_version {version!r} (this version of bespoke_fast reads "
                    f"the integer {FORMAT_VERSION})")
    kind = doc.get("kind")
    if kind == "bespoke":
        from .solvers.bespoke import BASES as choices
        key = "base"
    elif kind == "bns":
        from .solvers.bns import INITS as choices
        key = "init"
    else:
        _fail(path, f"unknown kind {kind!r}; expected 'bespoke' or 'bns'")
    header = doc.get(key)
    if not isinstance(header, str) or header not in choices:
        _fail(path, f"unknown {key} {header!r}; expected one of {choices}")
    n = doc.get("n_steps")
    if not _is_int(n) or not 1 <= n <= MAX_STEPS:
        _fail(path, f"'n_steps' must be an int >= 1 and <= MAX_STEPS ({MAX_STEPS}), got {n!r}")
    if kind == "bns" and header == "midpoint" and n % 2:
        _fail(path, f"init 'midpoint' needs an even number of steps, got n_steps={n}")
    nfe = n if kind == "bns" or header == "rk1" else 2 * n
    if not _is_int(doc.get("nfe")) or doc["nfe"] != nfe:
        _fail(path, f"'nfe' is {doc.get('nfe')!r} but a {kind} solver with n_steps={n} has NFE "
                    f"{nfe} (an integer)")
    param_sizes, table_sizes = _expected_sizes(path, kind, header, n)
    params, stored = doc.get("parameters"), doc.get("tables")
    for where, section, sizes in (("parameter", params, param_sizes), ("table", stored, table_sizes)):
        if not isinstance(section, dict) or set(section) != set(sizes):
            _fail(path, f"'{where}s' must hold exactly {sorted(sizes)}, got "
                        f"{sorted(map(str, section)) if isinstance(section, dict) else type(section).__name__}")
    params = {k: _number_list(path, params, "parameter", k, v) for k, v in param_sizes.items()}
    stored = {k: _number_list(path, stored, "table", k, v) for k, v in table_sizes.items()}
    for key in ("model", "training", "validation"):
        if not isinstance(doc.get(key, {}), dict):
            _fail(path, f"{key!r} must be an object")
    model = doc.get("model", {})
    if not all(isinstance(model.get(k, ""), str) for k in ("name", "hash")):
        _fail(path, "'model' name and hash must be strings")
    if kind == "bespoke":
        from .solvers.bespoke import BespokeSolver
        solver = BespokeSolver(header, n)
    else:
        from .solvers.bns import NonStationarySolver
        solver = NonStationarySolver(n, init=header)
    with torch.no_grad():
        for name, value in params.items():
            getattr(solver, name).copy_(value)
    _check_tables(path, solver, stored)
    for key in ("model", "training", "validation"):
        solver.meta[key] = doc.get(key, {})
    return solver


def sampler_tables(solver) -> dict:
    """The float32 coefficients the samplers use, by name (bespoke: the packed table; BNS:
    t, a, b), computed as the engine computes them (float64, then cast)."""
    with torch.no_grad():
        if solver.kind == "bns":
            return dict(zip(("t", "a", "b"), solver.coefficient_tables(dtype=torch.float32)))
        return {"table": solver.coefficient_table(dtype=torch.float32)}


def _check_tables(path, solver, stored):
    """Check the tables derived from the parameters (what sampling uses) and the stored ones
    (what a person edits): finite, t from 0 to 1 strictly increasing, s > 0 also in float32,
    the float32 sampler coefficients finite, and stored == derived."""
    with torch.no_grad():
        derived = solver.tables()
    for source, tables in (("derived from the parameters", derived), ("stored", stored)):
        for name, value in tables.items():
            if not torch.isfinite(value).all():
                _fail(path, f"table {name!r} ({source}) is not finite")
        t = tables["t"]
        if t[0] != 0 or abs(t[-1].item() - 1) > 1e-12:
            _fail(path, f"t ({source}) must start at 0 and end at 1, got [{t[0].item():.6g}, "
                        f"{t[-1].item():.6g}]")
        if (t.diff() <= 0).any():
            _fail(path, f"t ({source}) must be strictly increasing (non-monotone t)")
        if "s" in tables and not (tables["s"].to(torch.float32) > 0).all():
            _fail(path, f"s ({source}) must be > 0 (also in float32)")
    for name, value in sampler_tables(solver).items():
        if not torch.isfinite(value).all():
            _fail(path, f"the sampler's float32 coefficients ({name}) overflow: the parameters "
                        f"are too extreme")
    for name, value in derived.items():
        if not torch.allclose(stored[name], value, rtol=1e-9, atol=1e-12):
            _fail(path, f"table {name!r} does not match the parameters (edited by hand?)")


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
