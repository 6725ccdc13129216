"""Fitting a learned solver to a model, in one place. The data flows down this list:

* ``gt.py`` -- ground-truth trajectories (adaptive RK45, sharded, resumable), stored by
  ``gt_storage.py`` (knot layouts, storage dtypes, streaming);
* ``common.py`` -- what both trainers share, as public helpers: checkpoint / resume,
  validate-and-keep-best, the learning-rate schedule, the distributed reduce, the report;
* ``stopping.py`` -- when a training phase stops and which checkpoint is kept;
* ``bespoke.py`` -- the Bespoke RK trainer (``bespoke_fast.train``), started from the grid that
  ``grid_search.py`` finds;
* ``bns.py`` -- the non-stationary (BNS) trainer;
* ``evaluation.py`` -- a solver against held-out GT (``bespoke_fast.evaluate``);
* ``job.py`` -- the whole fit of one model: GT, training, evaluation, report
  (``bespoke_fast.fit``, ``bespoke-fast fit``).

Importing this package imports none of them; import the module you need, or get a kind's trainer
with :func:`trainer_for`.
"""


def trainer_for(kind: str):
    """``(train function, its options)`` for the solver kind ``kind`` (the solver registry's
    ``kind``): :func:`bespoke.train` with :data:`bespoke.OPTIONS`, or :func:`bns.train_bns` with
    :data:`bns.OPTIONS`. Both take the options by the same names and types."""
    from .._checks import InvalidArgumentError
    from ..solvers.registry import kinds
    from ..solvers.bespoke import BespokeSolver
    from ..solvers.bns import NonStationarySolver
    if kind == BespokeSolver.kind:
        from .bespoke import OPTIONS, train
        return train, OPTIONS
    if kind == NonStationarySolver.kind:
        from .bns import OPTIONS, train_bns
        return train_bns, OPTIONS
    raise InvalidArgumentError(f"no trainer for solver kind {kind!r}; expected one of {kinds()}")
