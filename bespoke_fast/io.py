"""Solver files: small, versioned JSON documents. Loading never executes code and validates
everything, raising ``ValueError`` that names the file and what is wrong.

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

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch

FORMAT = "bespoke_fast.solver"
FORMAT_VERSION = 1
MAX_BYTES = 1 << 20

__all__ = ["save_solver", "load_solver", "solver_document", "solver_from_document",
           "model_fingerprint", "sha256_file", "atomic_write_text", "FORMAT_VERSION"]


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes (shards, weights), read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """sha256 (first 16 hex digits) of a module's parameters and buffers, or ``""`` if it has none."""
    if not isinstance(model, torch.nn.Module):
        return ""
    h = hashlib.sha256()
    state = model.state_dict()
    if not state:
        return ""
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


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


def _fail(path, msg):
    raise ValueError(f"{path}: invalid solver file: {msg}")


def _float_list(path, doc_section, name, size):
    values = doc_section.get(name)
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        _fail(path, f"{name!r} must be a list of numbers")
    if len(values) != size:
        _fail(path, f"{name!r} has {len(values)} entries, expected {size}")
    if not all(math.isfinite(v) for v in values):
        _fail(path, f"{name!r} contains NaN or Inf")
    return torch.tensor(values, dtype=torch.float64)


def load_solver(path):
    """Read a solver file written by ``save`` and return the solver (BespokeSolver or
    NonStationarySolver), after validating format, sizes, finiteness, monotone ``t`` from 0 to 1,
    ``s > 0`` and that the stored tables match the parameters.

    Example::

        >>> solver = bespoke_fast.load_solver("digits_rk2_nfe10.json")
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"solver file not found: {path}")
    size = path.stat().st_size
    if size > MAX_BYTES:
        _fail(path, f"{size} bytes is over the 1 MB limit for solver files")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(path, f"not JSON ({e})")
    return solver_from_document(doc, path)


def solver_from_document(doc, path="<solver document>"):
    """Validate a solver document (see :func:`solver_document`) and build the solver; ``path``
    names the source in errors."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        _fail(path, f"'format' must be {FORMAT!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        _fail(path, f"unknown format_version {doc.get('format_version')!r} "
                    f"(this version of bespoke_fast reads {FORMAT_VERSION})")
    n = doc.get("n_steps")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        _fail(path, f"'n_steps' must be an int >= 1, got {n!r}")
    params = doc.get("parameters")
    if not isinstance(params, dict):
        _fail(path, "'parameters' must be an object")
    kind = doc.get("kind")
    if kind == "bespoke":
        from .solvers.bespoke import BASES, BespokeSolver
        base = doc.get("base")
        if base not in BASES:
            _fail(path, f"unknown base {base!r}; expected one of {BASES}")
        solver = BespokeSolver(base, n)
    elif kind == "bns":
        from .solvers.bns import INITS, NonStationarySolver
        init = doc.get("init")
        if init not in INITS:
            _fail(path, f"unknown init {init!r}; expected one of {INITS}")
        solver = NonStationarySolver(n, init=init)
    else:
        _fail(path, f"unknown kind {kind!r}; expected 'bespoke' or 'bns'")
    if doc.get("nfe") != solver.nfe:
        _fail(path, f"'nfe' is {doc.get('nfe')!r} but a {kind} solver with n_steps={n} has NFE {solver.nfe}")
    expected = {name: p.numel() for name, p in solver.named_parameters()}
    if set(params) != set(expected):
        _fail(path, f"'parameters' must hold exactly {sorted(expected)}, got {sorted(params)}")
    with torch.no_grad():
        for name, numel in expected.items():
            getattr(solver, name).copy_(_float_list(path, params, name, numel))
    _check_tables(path, solver, doc.get("tables"))
    for key in ("model", "training", "validation"):
        value = doc.get(key, {})
        if not isinstance(value, dict):
            _fail(path, f"{key!r} must be an object")
        solver.meta[key] = value
    return solver


def _check_tables(path, solver, stored):
    """Check the stored tables (what a person edits) and the tables derived from the parameters
    (what sampling uses): t from 0 to 1 strictly increasing, s > 0, and the two agree."""
    with torch.no_grad():
        derived = solver.tables()
    if not isinstance(stored, dict) or set(stored) != set(derived):
        _fail(path, f"'tables' must hold exactly {sorted(derived)}")
    for source, tables in (("stored", None), ("derived from the parameters", derived)):
        if tables is None:
            tables = {name: _float_list(path, stored, name, v.numel()).reshape(v.shape)
                      for name, v in derived.items()}
            stored_tables = tables
        t = tables["t"]
        if t[0] != 0 or abs(t[-1].item() - 1) > 1e-12:
            _fail(path, f"t ({source}) must start at 0 and end at 1, got [{t[0].item():.6g}, "
                        f"{t[-1].item():.6g}]")
        if (t.diff() <= 0).any():
            _fail(path, f"t ({source}) must be strictly increasing (non-monotone t)")
        if "s" in tables and (tables["s"] <= 0).any():
            _fail(path, f"s ({source}) must be > 0")
    for name, value in derived.items():
        if not torch.allclose(stored_tables[name], value, rtol=1e-9, atol=1e-12):
            _fail(path, f"table {name!r} does not match the parameters (edited by hand?)")
