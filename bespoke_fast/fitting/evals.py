"""Model evaluations, counted exactly: what a fit costs, on any device.

A fit's cost is counted in **sample-evaluations** of the user's model: one forward row is one
sample through the model's forward; one backward row is one sample through its backward (the
vector-Jacobian product a gradient needs). A backward costs about two forwards, so the cost of
a stage in **forward-equivalents** is ``forward + 2 * backward``; budgets
(``budget_evals``) are in forward-equivalents. Counts are per sample, not per call: a call on a
batch of 128 rows is 128 evaluations.

:class:`EvalLedger` counts them at the model call itself: every call a trainer makes goes
through :meth:`EvalLedger.wrap`, which adds the call's rows to the current **stage** (``"start"``,
a phase's name, ``"validation"``) and, when the output takes part in a backward, adds the same
rows to the stage's backward count when the backward reaches it (activation checkpointing's
recomputed forwards count as forwards; L-BFGS's line-search evaluations count as what they
are).

Example::

    >>> ledger = EvalLedger()
    >>> counted = ledger.wrap(model)
    >>> with ledger.charging("polish"):
    ...     counted(x, t).sum().backward()        # x: [B, ...] with B rows
    >>> ledger.counts["polish"]                   # [B, B]: forward rows, backward rows
    >>> ledger.equivalent()                       # 3 B
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["EvalLedger", "CountedModel", "forward_equivalent", "summary", "raw_model"]


def forward_equivalent(forward: int, backward: int) -> int:
    """The cost of ``forward`` forward rows and ``backward`` backward rows in forward rows."""
    return int(forward) + 2 * int(backward)


def summary(counts: dict) -> dict:
    """``{stage: {"forward", "backward", "forward_equivalent"}, "total": {...}}`` for ``counts``
    (``{stage: [forward, backward]}``), the form reports and ``--json`` print."""
    out = {stage: {"forward": int(f), "backward": int(b), "forward_equivalent": forward_equivalent(f, b)}
           for stage, (f, b) in counts.items()}
    f = sum(int(v[0]) for v in counts.values())
    b = sum(int(v[1]) for v in counts.values())
    out["total"] = {"forward": f, "backward": b, "forward_equivalent": forward_equivalent(f, b)}
    return out


class EvalLedger:
    """Forward and backward sample-evaluations by stage: ``counts = {stage: [forward,
    backward]}`` (plain ints: a checkpoint saves it and a resumed fit goes on counting)."""

    def __init__(self, counts: dict | None = None):
        self.counts = {k: [int(v[0]), int(v[1])] for k, v in (counts or {}).items()}
        self.stage = "start"

    @contextmanager
    def charging(self, stage: str):
        """Charge the model calls made inside to ``stage`` (then the previous stage again)."""
        before, self.stage = self.stage, stage
        try:
            yield
        finally:
            self.stage = before

    def add(self, stage: str, forward: int = 0, backward: int = 0) -> None:
        row = self.counts.setdefault(stage, [0, 0])
        row[0] += int(forward)
        row[1] += int(backward)

    def equivalent(self, stage: str | None = None) -> int:
        """Forward-equivalents spent in ``stage``, or in all stages (None)."""
        rows = [self.counts.get(stage, [0, 0])] if stage is not None else self.counts.values()
        return sum(forward_equivalent(f, b) for f, b in rows)

    def wrap(self, model) -> "CountedModel":
        """``model`` as a callable that counts its calls into this ledger (a model already
        counted by this ledger is returned as it is)."""
        if isinstance(model, CountedModel) and model.ledger is self:
            return model
        return CountedModel(raw_model(model), self)

    def summary(self) -> dict:
        return summary(self.counts)


class CountedModel:
    """``model(x, t, **extras)`` counted into ``ledger``: ``x.shape[0]`` forward rows per call
    and, if the output is part of a graph that is back-propagated, as many backward rows when
    the gradient reaches it. ``inner`` is the model itself (its parameters, its fingerprint)."""

    def __init__(self, model, ledger: EvalLedger):
        self.inner, self.ledger = model, ledger

    def __call__(self, x, t, **extras):
        rows, stage = int(x.shape[0]), self.ledger.stage
        # counted before the call: activation checkpointing's recompute may stop inside the
        # model once it has what the backward needs (it ran the forward all the same)
        self.ledger.add(stage, forward=rows)
        out = self.inner(x, t, **extras)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            ledger = self.ledger

            def count_backward(grad):
                ledger.add(stage, backward=rows)
                return grad
            out.register_hook(count_backward)
        return out

    def __getattr__(self, name):       # the model's own attributes (config, dtype hints, ...)
        return getattr(self.inner, name)


def raw_model(model):
    """The model inside a :class:`CountedModel` (else ``model``)."""
    return model.inner if isinstance(model, CountedModel) else model
