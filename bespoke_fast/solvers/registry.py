"""The registry of solver kinds: the one list of the learned solver classes, by ``kind``.

Adding a kind means adding its class here (and its engine program, op and trainer beside the
shipped ones); nothing registers itself on import. The solver file reader
(``bespoke_fast.solvers.files``), the CLI and the fit job look kinds up here, the engine picks
its program by ``kind`` (``bespoke_fast.engine.PROGRAMS``), and the trainers are found by
:func:`bespoke_fast.fitting.trainer_for`.

Example::

    >>> from bespoke_fast.solvers.registry import kinds, solver_class
    >>> kinds()
    ('bespoke', 'bns')
    >>> solver_class("bns").steps_for_nfe("midpoint", 10)
    5
"""
from __future__ import annotations

from .bespoke import BespokeSolver
from .bns import NonStationarySolver

__all__ = ["KINDS", "solver_class", "kinds"]

KINDS = {cls.kind: cls for cls in (BespokeSolver, NonStationarySolver)}


def solver_class(kind):
    """The solver class registered for ``kind`` (``None`` when no class has that kind)."""
    return KINDS.get(kind) if isinstance(kind, str) else None


def kinds() -> tuple:
    """The registered kinds, sorted (``("bespoke", "bns")``)."""
    return tuple(sorted(KINDS))
