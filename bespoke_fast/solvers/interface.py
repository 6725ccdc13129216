"""The one interface of a learned solver (imported with the registry as
``bespoke_fast.solvers.base``).

Every learned solver (``BespokeSolver``: kind ``"bespoke"``; ``NonStationarySolver``: kind
``"bns"``) is a :class:`Solver`. What the rest of the package asks of a solver, it asks here:

==========================  ====================================================================
``kind``                    the registry key, stored in the file (``"bespoke"``, ``"bns"``)
``header_key``, ``header``  the one choice besides ``n_steps`` that fixes the solver's shape
                            (``base`` ``"rk1"``/``"rk2"``; ``init`` ``"euler"``/``"midpoint"``)
``n_steps``, ``nfe``        steps and network evaluations (``steps_for_nfe``: the inverse)
``sample(model, x0, ...)``  the pure-torch sampler (the oracle of the engine)
``tables()``                the derived float64 tables stored in the file
``sampler_tables()``        the float32 coefficients the engine and schedulers read, by name
``to_document()``           the solver file's JSON document (``from_document`` reads one back)
``fingerprint()``           sha256 of kind, header, ``n_steps`` and raw parameters
``save(path)``, ``load``    the versioned solver file (``bespoke_fast.solvers.files``)
==========================  ====================================================================

The kinds are listed in ``bespoke_fast.solvers.registry`` (:func:`~bespoke_fast.solvers.registry.kinds`,
:func:`~bespoke_fast.solvers.registry.solver_class`); this module imports none of them. The file
format is ``bespoke_fast.solvers.document``; ``bespoke_fast.load_solver`` reads a file of any kind.
"""
from __future__ import annotations

import hashlib
import json
import math

import torch
from torch import nn

from .. import __version__
from .._checks import InvalidArgumentError, InvalidTypeError, SolverFileError
from .document import (FORMAT, FORMAT_VERSION, MAX_STEPS, build_solver, read_document,
                       write_document)

__all__ = ["Solver", "FORMAT", "FORMAT_VERSION"]


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


class Solver(nn.Module):
    """Base class of the learned solvers (see the module docs for the interface).

    Subclasses set ``kind``, ``header_key``, ``headers`` (the allowed header values) and
    ``parameter_names`` (the raw float64 parameters, in file order), and implement ``nfe``,
    ``tables``, ``sampler_tables``, ``sample``, :meth:`from_header` and :meth:`file_sizes`.
    ``meta`` is a dict saved with the file (model it was fitted to, training and validation).
    """

    kind: str = ""
    header_key: str = ""
    headers: tuple = ()
    parameter_names: tuple = ()

    # ------------------------------------------------------------------ shape of a kind
    @classmethod
    def from_header(cls, header: str, n_steps: int) -> "Solver":
        """A new (identity) solver of this kind with the given header and ``n_steps``."""
        raise NotImplementedError

    @classmethod
    def file_sizes(cls, header: str, n_steps: int) -> tuple:
        """``({parameter: size}, {table: size})`` of a solver of this kind (no allocation)."""
        raise NotImplementedError

    @classmethod
    def nfe_for(cls, header: str, n_steps: int) -> int:
        """NFE of a solver of this kind with the given header and ``n_steps``."""
        raise NotImplementedError

    @classmethod
    def header_problem(cls, header: str, n_steps: int):
        """Why ``header`` and ``n_steps`` do not fit together (a sentence), or ``None``."""
        return None

    @classmethod
    def steps_for_nfe(cls, header: str, nfe: int) -> int:
        """The ``n_steps`` of a solver with ``header`` that makes ``nfe`` network evaluations;
        ``InvalidArgumentError`` saying why when no step count does."""
        per = cls.nfe_for(header, 1)
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < per or nfe % per:
            raise InvalidArgumentError(f"nfe {nfe}: a {cls.kind} solver ({cls.header_key} {header}) "
                                       f"uses {per} NFE per step, so NFE must be a positive "
                                       f"multiple of {per}")
        if nfe // per > MAX_STEPS:
            raise InvalidArgumentError(f"nfe {nfe}: {nfe // per} steps of {per} NFE, over the "
                                       f"limit of {MAX_STEPS} steps a solver file holds")
        problem = cls.header_problem(header, nfe // per)
        if problem:
            raise InvalidArgumentError(f"nfe {nfe}: {problem}")
        return nfe // per

    @property
    def header(self) -> str:
        return getattr(self, self.header_key)

    @property
    def nfe(self) -> int:
        return self.nfe_for(self.header, self.n_steps)

    # ------------------------------------------------------------------ tables and sampling
    def tables(self) -> dict:
        raise NotImplementedError

    def sampler_tables(self) -> dict:
        raise NotImplementedError

    def sample(self, model, x0: torch.Tensor, **extras) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ files
    def file_header(self) -> dict:
        """``{header_key: header}``, e.g. ``{"base": "rk2"}``."""
        return {self.header_key: self.header}

    def raw_parameters(self) -> dict:
        """The raw parameters as lists of floats, by name (the file's ``parameters``)."""
        return {name: getattr(self, name).detach().cpu().tolist() for name in self.parameter_names}

    def fingerprint(self) -> str:
        """sha256 of the solver's kind, header, ``n_steps`` and raw parameters."""
        doc = {"kind": self.kind, **self.file_header(), "n_steps": int(self.n_steps),
               "parameters": self.raw_parameters()}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def to_document(self) -> dict:
        """The JSON-ready document of the solver file (what :meth:`save` writes; the layout is
        in ``bespoke_fast.solvers.document``)."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind,
            **self.file_header(),
            "n_steps": self.n_steps, "nfe": self.nfe,
            "parameters": self.raw_parameters(),
            "tables": {k: v.detach().cpu().tolist() for k, v in self.tables().items()},
            "model": _jsonable(self.meta.get("model", {})),
            "training": _jsonable(self.meta.get("training", {})),
            "validation": _jsonable(self.meta.get("validation", {})),
            "package_version": __version__,
        }

    @classmethod
    def from_document(cls, doc, path="<solver document>") -> "Solver":
        """Validate a solver document of this class's kind and build the solver; ``path``
        names the source in errors. A document of any kind: ``bespoke_fast.solvers.files.
        solver_from_document``."""
        return build_solver(doc, path, cls._own_kind(path), repr(cls.kind))

    def save(self, path) -> None:
        """Write the versioned JSON solver file atomically (``bespoke_fast.solvers.document``)."""
        write_document(self.to_document(), path)

    @classmethod
    def load(cls, path) -> "Solver":
        """Read and validate a solver file of this class's kind; ``SolverFileError`` (a
        ``ValueError``) names what is wrong. A file of any kind: ``bespoke_fast.load_solver``."""
        return build_solver(read_document(path), path, cls._own_kind(path), repr(cls.kind))

    @classmethod
    def _own_kind(cls, path):
        """The class lookup of :meth:`load`: this class for its own kind; another kind's file is
        refused naming the kind it holds."""
        if not cls.kind:
            raise InvalidTypeError("Solver.load / Solver.from_document read one kind: call them on "
                                   "the kind's class (e.g. BespokeSolver.load) or use "
                                   "bespoke_fast.load_solver for any kind")

        def lookup(kind):
            if kind == cls.kind:
                return cls
            if kind in _defined_kinds(Solver):      # a kind, but another: say which to use
                raise SolverFileError(f"{path}: holds a {kind!r} solver, not a {cls.kind} one; "
                                      f"use bespoke_fast.load_solver")
            return None                             # build_solver: "unknown kind"
        return lookup


def _defined_kinds(cls) -> set:
    """The kinds of the subclasses of ``cls`` defined so far (for error messages only: the
    registry of kinds is ``bespoke_fast.solvers.registry``)."""
    return {c.kind for c in cls.__subclasses__() if c.kind} | {
        k for c in cls.__subclasses__() for k in _defined_kinds(c)}
