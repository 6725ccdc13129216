"""Small helpers used across the package, one copy each: the distributed rank / world size, the
device a model lives on, and a module's parameter count. (File helpers -- atomic writes, sha256
of files, sealed manifests -- live in :mod:`bespoke_fast.io`.)"""
from __future__ import annotations

import torch

__all__ = ["dist_info", "infer_device", "count_params", "training_bar"]


def dist_info() -> tuple:
    """``(rank, world_size, initialised)`` of ``torch.distributed``; ``(0, 1, False)`` when it is
    not available or not initialised."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size(), True
    return 0, 1, False


def infer_device(model) -> torch.device:
    """The device of ``model``'s first parameter, else of its first buffer, else the CPU (a plain
    function, a module without state)."""
    for tensors in ("parameters", "buffers"):
        try:
            return next(iter(getattr(model, tensors)())).device
        except (AttributeError, TypeError, StopIteration):
            pass
    return torch.device("cpu")


def count_params(net: torch.nn.Module) -> int:
    """Number of parameters of ``net``."""
    return sum(p.numel() for p in net.parameters())


def training_bar(total: int, initial: int = 0, budget_seconds=None, disable: bool = False,
                 desc: str = "", budget_evals=None, spent: int = 0):
    """The trainers' progress bar; ``bar.advance(iterations, spent)`` after each step (then
    ``set_postfix`` / ``close`` as tqdm's).

    With an evaluation budget (``budget_evals``, forward-equivalents) the bar counts the
    evaluations ``spent`` against it: the fit ends there or earlier, so its ETA is an upper
    bound that holds on any device. Otherwise it counts iterations to the cap ``total``; with a
    wall-time budget the run usually ends at the budget, long before the cap, so the bar shows
    the elapsed time against the budget instead of an ETA from the cap (which read e.g. 3:56:53
    for a two-minute fit)."""
    from tqdm.auto import tqdm
    if budget_evals:
        bar = tqdm(total=int(budget_evals), initial=min(int(spent), int(budget_evals)),
                   disable=disable, desc=desc, unit=" evals", unit_scale=True, dynamic_ncols=True)
        bar.advance = lambda iterations, now: bar.update(max(0, min(int(now), bar.total) - bar.n))
        return bar
    kwargs = {}
    if budget_seconds:
        kwargs["bar_format"] = ("{desc}: {n_fmt} it [{elapsed} of a " + f"{budget_seconds:.0f}"
                                + " s budget, {rate_fmt}{postfix}]")
    bar = tqdm(total=total, initial=initial, disable=disable, desc=desc, unit="it",
               dynamic_ncols=True, **kwargs)
    bar.advance = lambda iterations, now: bar.update(iterations)
    return bar
