"""Fitting a learned solver to a model, in one place. The data flows down this list:

* ``gt.py`` -- ground-truth trajectories (adaptive RK45, sharded, resumable), stored by
  ``gt_storage.py`` (knot layouts, storage dtypes, streaming), read as ``trajectories.py``
  (``TrajectorySet``, the interpolation, the fingerprint, the protocol both trainers accept);
* ``loop.py`` -- the one training loop: phases as data, budgets, stopping, keep-best,
  checkpoint / resume, the multi-rank stop, on the shared helpers of ``common.py`` and
  ``stopping.py`` (when a phase stops and which checkpoint is kept);
* ``bespoke.py`` -- the Bespoke RK trainer (``bespoke_fast.train``), started from the grid that
  ``grid_search.py`` finds; ``bns.py`` -- the non-stationary (BNS) trainer;
  ``trainers.py`` -- the trainer of each solver kind (:func:`trainer_for`);
* ``evaluation.py`` -- a solver against held-out GT (``bespoke_fast.evaluate``);
* ``job.py`` -- the whole fit of one model: GT, training, evaluation, report
  (``bespoke_fast.fit``, ``bespoke-fast fit``).

Importing this package imports none of them; import the module you need, or get a kind's trainer
with :func:`trainer_for`.
"""


def trainer_for(kind: str):
    """The trainer of the solver kind ``kind`` (``bespoke_fast.fitting.trainers.trainer_for``):
    ``kind``, ``title``, ``Options``, ``planned_evaluations``, ``train``."""
    from .trainers import trainer_for as find
    return find(kind)


def options_lacking(kind: str) -> dict:
    """``{option: why}`` for the options other kinds' trainers have and ``kind``'s lacks
    (``bespoke_fast.fitting.trainers.options_lacking``)."""
    from .trainers import options_lacking as lacking
    return lacking(kind)
