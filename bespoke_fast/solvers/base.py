"""The solver interface and the registry of kinds, in one import: :class:`Solver` (the interface,
``bespoke_fast.solvers.interface``) and :func:`kinds` / :func:`solver_class` (the registry,
``bespoke_fast.solvers.registry``). The solver modules import the interface directly, so this
module can import them through the registry without a circle.

Example::

    >>> from bespoke_fast.solvers.base import Solver, kinds, solver_class
    >>> kinds()
    ('bespoke', 'bns')
    >>> issubclass(solver_class("bespoke"), Solver)
    True
"""
from __future__ import annotations

from .interface import FORMAT, FORMAT_VERSION, Solver
from .registry import kinds, solver_class

__all__ = ["Solver", "solver_class", "kinds", "FORMAT", "FORMAT_VERSION"]
