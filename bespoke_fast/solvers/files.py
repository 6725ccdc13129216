"""Solver files, any kind: :func:`load_solver` reads one (the kind's class from the registry,
``bespoke_fast.solvers.registry``), :func:`save_solver` writes one. The format, its limits and
its checks: ``bespoke_fast.solvers.document``.
"""
from __future__ import annotations

from .document import FORMAT_VERSION, MAX_STEPS, build_solver, read_document
from .registry import kinds, solver_class

__all__ = ["save_solver", "load_solver", "solver_from_document", "FORMAT_VERSION", "MAX_STEPS"]


def save_solver(solver, path) -> None:
    """Write ``solver`` (any :class:`~bespoke_fast.solvers.base.Solver`) to ``path`` as JSON,
    atomically (the same as ``solver.save(path)``)."""
    solver.save(path)


def load_solver(path):
    """Read a solver file written by ``save`` and return the solver (BespokeSolver or
    NonStationarySolver). The file is bounded and validated (``bespoke_fast.solvers.document``)
    before and after the solver is built; problems raise ``SolverFileError`` (a ``ValueError``)
    naming the file, a missing file ``FileNotFoundError``.

    Example::

        >>> solver = bespoke_fast.load_solver("digits_rk2_nfe10.json")
    """
    return solver_from_document(read_document(path), path)


def solver_from_document(doc, path="<solver document>"):
    """Validate a solver document (``Solver.to_document``; the checks of :func:`load_solver`
    after parsing) and build the solver of its kind; ``path`` names the source in errors."""
    return build_solver(doc, path, solver_class, " or ".join(map(repr, kinds())))
