"""The solver file format: small, versioned JSON documents, read and validated for a known
solver class (the kind's class is looked up by the caller: ``bespoke_fast.solvers.files`` through
the registry, ``Solver.load`` on the kind's own class). Loading never executes code, is
bounded before anything is allocated, and validates everything: every problem raises
:class:`~bespoke_fast._checks.SolverFileError` (a ``ValueError``) whose message starts with the
file's path; a missing file raises ``FileNotFoundError``.

This module imports no solver class: the document comes from
:meth:`Solver.to_document <bespoke_fast.solvers.base.Solver.to_document>`, and
:func:`build_solver` turns a read document into a solver of the class ``lookup(kind)`` gives.

Limits, checked in this order before a solver is built: the file is at most ``MAX_BYTES``
(1 MiB); JSON nesting at most ``MAX_DEPTH`` (32) levels; integers at most ``MAX_INT_DIGITS``
(20) digits; no duplicate keys, no NaN/Infinity literals (the bounded reader,
``bespoke_fast.io.read_json_bounded``); ``format_version``, ``n_steps`` and ``nfe`` are JSON
integers (``true`` and ``10.0`` are errors); ``1 <= n_steps <= MAX_STEPS`` (1024); every array
has exactly the length ``n_steps`` implies. Then the parameters are loaded and the tables are
derived: they must be finite, ``t`` must run strictly from 0 to 1, ``s > 0``, and the float32
tables the sampler uses must be finite (a ``theta_s`` of -95 is finite in float64 but overflows
a float32 coefficient), and so must every step of the float32 sampler on a simulated run (states
in [-4, 4]; velocities x, -x and 1): finite coefficients can overflow in their products.

Layout (format version 1)::

    {
      "format": "bespoke_fast.solver", "format_version": 1,
      "kind": "bespoke" | "bns",
      "base": "rk1" | "rk2",               (bespoke)   "init": "euler" | "midpoint"  (bns)
      "n_steps": n, "nfe": NFE,
      "parameters": {name: [floats], ...},  the raw (unconstrained) parameters: the source of truth
      "tables": {name: [floats], ...},      derived, for people and other tools; checked on load
      "model": {"name": ..., "hash": ...},  what it was fitted to (may be empty; "config": the
                                            model's settings, e.g. a k-diffusion sigma range)
      "training": {...}, "validation": {...},
      "package_version": "x.y.z"
    }
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .._checks import MissingFileError, SolverFileError
from ..io import atomic_write_text, read_json_bounded

FORMAT = "bespoke_fast.solver"
FORMAT_VERSION = 1
MAX_STEPS = 1024

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_STEPS", "write_document", "read_document",
           "build_solver"]


def write_document(doc: dict, path) -> None:
    """Write a solver document (``Solver.to_document()``) to ``path`` as JSON, atomically."""
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def _fail(path, msg):
    raise SolverFileError(f"{path}: invalid solver file: {msg}")


def _is_int(v) -> bool:
    return type(v) is int  # noqa: E721 -- bool and float are errors


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


def read_document(path) -> dict:
    """The JSON document of the solver file ``path``, read within the bounds (not yet
    validated: :func:`build_solver` does that). ``MissingFileError`` (a ``FileNotFoundError``)
    when there is no file, ``SolverFileError`` naming the file for anything else."""
    path = Path(path)
    if not path.is_file():
        if path.exists():
            _fail(path, "not a regular file")
        raise MissingFileError(f"solver file not found: {path}")
    return read_json_bounded(path, "solver file", error=SolverFileError)


def build_solver(doc, path, lookup, expected: str):
    """Validate a solver document (the checks of the module docstring) and build the solver of
    class ``lookup(kind)`` (``None``: an unknown kind, refused naming ``expected``, the kinds
    that are readable); ``path`` names the source in errors."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        _fail(path, f"'format' must be {FORMAT!r}")
    version = doc.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        _fail(path, f"unknown format_version {version!r} (this version of bespoke_fast reads "
                    f"the integer {FORMAT_VERSION})")
    kind = doc.get("kind")
    cls = lookup(kind) if isinstance(kind, str) else None
    if cls is None:
        _fail(path, f"unknown kind {kind!r}; expected {expected}")
    key, choices = cls.header_key, cls.headers
    header = doc.get(key)
    if not isinstance(header, str) or header not in choices:
        _fail(path, f"unknown {key} {header!r}; expected one of {choices}")
    n = doc.get("n_steps")
    if not _is_int(n) or not 1 <= n <= MAX_STEPS:
        _fail(path, f"'n_steps' must be an int >= 1 and <= MAX_STEPS ({MAX_STEPS}), got {n!r}")
    problem = cls.header_problem(header, n)
    if problem:
        _fail(path, problem)
    nfe = cls.nfe_for(header, n)
    if not _is_int(doc.get("nfe")) or doc["nfe"] != nfe:
        _fail(path, f"'nfe' is {doc.get('nfe')!r} but a {kind} solver with n_steps={n} has NFE "
                    f"{nfe} (an integer)")
    param_sizes, table_sizes = cls.file_sizes(header, n)
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
    solver = cls.from_header(header, n)
    with torch.no_grad():
        for name, value in params.items():
            getattr(solver, name).copy_(value)
    _check_tables(path, solver, stored)
    for key in ("model", "training", "validation"):
        solver.meta[key] = doc.get(key, {})
    return solver


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
    with torch.no_grad():
        sampler_tables = solver.sampler_tables()
    for name, value in sampler_tables.items():
        if not torch.isfinite(value).all():
            _fail(path, f"the sampler's float32 coefficients ({name}) overflow: the parameters "
                        f"are too extreme")
    for name, value in derived.items():
        if not torch.allclose(stored[name], value, rtol=1e-9, atol=1e-12):
            _fail(path, f"table {name!r} does not match the parameters (edited by hand?)")
    _simulate_float32(path, solver)


# finite velocity fields the float32 simulation runs every loaded solver on: finite coefficients
# can still overflow in their products (theta_sdot = 3.5e38 times a state of 4)
_SIMULATED = (("u = x", lambda x, t: x), ("u = -x", lambda x, t: -x),
              ("u = 1", lambda x, t: torch.ones_like(x)))


def _simulate_float32(path, solver):
    """Run the float32 reference sampler over every step with states in [-4, 4] and the
    velocity fields above; a NaN/Inf anywhere on the way means the coefficients overflow."""
    x0 = torch.tensor([[4.0, -4.0, 0.5, 0.0]], dtype=torch.float32)
    for name, field in _SIMULATED:
        with torch.no_grad():
            traj = solver.sample(field, x0, return_trajectory=True)
        if not torch.isfinite(traj).all():
            _fail(path, f"the sampler's float32 steps overflow on a simulated run (states in "
                        f"[-4, 4], velocity {name}): the parameters are too extreme")
