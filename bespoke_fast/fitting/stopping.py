"""When training stops and which checkpoint is kept: shared by both trainers.

Both trainers (``bespoke_fast.fitting.bespoke.train`` and ``bespoke_fast.fitting.bns.train_bns``) validate
every ``val_every`` iterations and

* keep the parameters with the best **selection score** (``select``):

  - ``"per-sample"`` (default): the mean over validation samples of the per-sample PSNR. It is
    the quantity the papers report and the one BNS optimises; on multi-modal data it is also
    the least noisy of the three (one sample sent to the wrong mode moves it by 1/N of that
    sample's dB, while it can move the set-level PSNR by several dB on a few hundred samples);
  - ``"set"``: the set-level PSNR ``10 log10(R^2 / mean_i MSE_i)`` (dominated by the worst
    samples: pick it when mode flips matter more than the typical sample);
  - ``"rmse"``: the mean per-sample RMSE, scored as ``20 log10(R / rmse)`` so that all three are
    in dB and "higher is better";

* stop at the first of (the report's ``stop_reason`` says which):

  - ``"patience"``: ``patience`` validations in a row without improving the best score by more
    than ``min_delta`` dB (the validation metric stopped improving);
  - ``"budget"``: ``budget_evals`` model evaluations (forward-equivalents, counted exactly)
    or ``budget_seconds`` of wall time spent (a resumed run counts its earlier runs');
  - ``"max_iters"``: the iteration cap;
  - ``"converged"`` (L-BFGS only): the optimizer itself stopped making progress;
  - ``"nonfinite"``: the loss, a gradient or a parameter turned NaN/Inf; the phase's best
    parameters are restored and the next phase goes on from them.

The stopping state (:class:`Selection`) is part of the trainer's checkpointed
``bespoke_fast.fitting.loop.TrainState``, so a resumed run stops where an uninterrupted one would (the wall-time budget aside: pass ``budget_seconds=None`` for
results that do not depend on the machine's speed).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from .._checks import InvalidArgumentError

__all__ = ["SELECT", "DEFAULT_SELECT", "STOP_REASONS", "selection_score", "observe", "stop_reason",
           "Selection", "new_state", "check_stopping", "phase_horizon", "describe_stop", "describe_events",
           "rank0_decides"]

SELECT = ("per-sample", "set", "rmse")
DEFAULT_SELECT = "per-sample"
STOP_REASONS = ("patience", "budget", "max_iters", "converged", "nonfinite")


def check_stopping(select: str, patience, budget_seconds, min_delta) -> None:
    """One-line ``ValueError`` for bad stopping settings."""
    if select not in SELECT:
        raise InvalidArgumentError(f"unknown select {select!r}; expected one of {', '.join(SELECT)}")
    if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool)
                                 or patience < 1):
        raise InvalidArgumentError(f"patience must be an integer >= 1 (validations) or None, got {patience!r}")
    if budget_seconds is not None and not (budget_seconds > 0 and math.isfinite(budget_seconds)):
        raise InvalidArgumentError(f"budget_seconds must be a positive number or None, got {budget_seconds!r}")
    if not (min_delta >= 0 and math.isfinite(min_delta)):
        raise InvalidArgumentError(f"min_delta must be a number >= 0 (dB), got {min_delta!r}")


def selection_score(record: dict, select: str = DEFAULT_SELECT) -> float:
    """The score (dB, higher is better) of a validation ``record`` under ``select``."""
    if select == "per-sample":
        return record["psnr"]
    if select == "set":
        return record["psnr_set"]
    if select == "rmse":
        return 20 * math.log10(record.get("data_range", 2.0) / max(record["rmse"], 1e-300))
    raise InvalidArgumentError(f"unknown select {select!r}; expected one of {', '.join(SELECT)}")


@dataclass
class Selection:
    """Keep-best and patience state: the best parameters (``best``, a solver state dict), their
    validation record and score, and the validations in a row without a significant gain.
    Fields are also readable and writable by name (``sel["bad_evals"]``)."""

    best: dict | None = None
    best_record: dict | None = None
    best_score: float = -math.inf
    bad_evals: int = 0

    def __getitem__(self, name):
        return getattr(self, name)

    def __setitem__(self, name, value):
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        setattr(self, name, value)


def new_state() -> Selection:
    """A fresh :class:`Selection` (nothing kept yet)."""
    return Selection()


def observe(state: Selection, record: dict, solver, select: str, min_delta: float) -> bool:
    """Record a validation: keep ``solver``'s parameters if its score is the best so far and
    count validations without a ``min_delta`` improvement. Returns whether it is the new best."""
    score = selection_score(record, select)
    record["score"] = score
    if not math.isfinite(score):
        state.bad_evals += 1
        return False
    significant = score > state.best_score + min_delta
    best = score > state.best_score
    if best:
        state.best_score = score
        state.best = copy.deepcopy(solver.state_dict())
        state.best_record = record
    state.bad_evals = 0 if significant else state.bad_evals + 1
    return best


def stop_reason(state: Selection, done: int, max_iters: int, patience, budget_seconds,
                elapsed: float, just_validated: bool):
    """``None`` to go on, else the reason to stop (one of ``STOP_REASONS``)."""
    if just_validated and patience is not None and state.bad_evals >= patience:
        return "patience"
    if done >= max_iters:
        return "max_iters"
    if budget_seconds is not None and elapsed >= budget_seconds:
        return "budget"
    return None


def phase_horizon(cap: int, done_in_phase: int, elapsed_in_phase: float, seconds_left) -> int:
    """Iterations a phase's learning-rate schedule should span: ``cap``, or fewer when the time
    left (``seconds_left``, None: unlimited) at the measured speed allows fewer, so that the
    cosine decay completes inside the budget instead of being cut off at a high rate."""
    if seconds_left is None or done_in_phase <= 0 or elapsed_in_phase <= 0:
        return cap
    per_iter = elapsed_in_phase / done_in_phase
    return int(max(done_in_phase + 1, min(cap, done_in_phase + seconds_left / per_iter)))


def describe_stop(report: dict) -> str:
    """One line for the CLI: why training stopped and which iteration was kept."""
    reason = report.get("stop_reason")
    cfg = report.get("config", {})
    best = report.get("best") or {}
    why = {
        "patience": f"validation {cfg.get('select', DEFAULT_SELECT)} score did not improve by more "
                    f"than {cfg.get('min_delta')} dB in {cfg.get('patience')} validations",
        "budget": "budget used up (" + " or ".join(
            ([f"{cfg['budget_evals']:,} model evaluations"] if cfg.get("budget_evals") else [])
            + ([f"{cfg['budget_seconds']} s"] if cfg.get("budget_seconds") else [])) + ")",
        "nonfinite": "the loss turned non-finite (NaN/Inf); the best parameters were restored",
        "max_iters": "iteration cap reached",
        "converged": "optimizer converged (no further progress)",
    }.get(reason, str(reason))
    return (f"stopped after {report.get('iterations')} iterations: {why}; kept iteration "
            f"{best.get('iteration')} (best {cfg.get('select', DEFAULT_SELECT)} score "
            f"{best.get('score', float('nan')):.2f} dB)")


def describe_events(report: dict) -> list:
    """One line per phase a non-finite loss stopped (a BNS fit's Bespoke start's too)."""
    events = list(report.get("events") or []) + list((report.get("bespoke_stage") or {})
                                                      .get("events") or [])
    return [f"{e['phase']} stopped at iteration {e['iteration']}: {e['event']}; restored the "
            f"parameters of iteration {e['restored_iteration']} and went on" for e in events]


def rank0_decides(reason, world: int, horizon=None, final: bool = False):
    """``(reason, horizon, final)`` as rank 0 has them. Under torch.distributed (``world > 1``)
    every rank takes rank 0's stop ``reason``, learning-rate ``horizon`` and ``final`` (the
    whole fit's budget is spent). All come from the ranks' own clocks and validation scores,
    which differ: diverging stop decisions would deadlock the gradient all-reduce, and diverging
    horizons would give the ranks different learning rates, so their solvers would drift apart.
    Call it on every rank at the same iteration (it is a collective)."""
    if world <= 1:
        return reason, horizon, final
    import torch
    code = torch.tensor([STOP_REASONS.index(reason) + 1 if reason else 0, horizon or 0, int(final)],
                        dtype=torch.int64)
    torch.distributed.broadcast(code, 0)
    reason = STOP_REASONS[int(code[0]) - 1] if int(code[0]) else None
    return reason, int(code[1]) or None, bool(code[2])
