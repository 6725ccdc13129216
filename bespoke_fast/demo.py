"""``bespoke-fast demo``: the whole product on a bundled model, offline, in a few minutes on a CPU.

A thin caller of :func:`bespoke_fast.fitting.job.fit` (GT, held-out GT, a Bespoke RK2 fit, held-out
evaluation against the base solvers, error maps and the learned transform), plus the base
solvers' PSNR-vs-NFE curves and, on CUDA, FastSampler vs the eager loop.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ._checks import InvalidArgumentError
from .fitting.evaluation import evaluate
from .fitting.job import DEFAULT_NUM_TRAIN, baselines, fit
from .fitting.gt import load_trajectories
from .io import atomic_write_text

__all__ = ["run_demo"]


def _psnr_vs_nfe(path: Path, curve_rows, ours_row, label):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, rows in curve_rows.items():
        ax.plot([x["nfe"] for x in rows], [x["psnr"] for x in rows], "o-", ms=3, label=method)
    ax.plot([ours_row["nfe"]], [ours_row["psnr"]], "*", ms=14, color="C3", label=label)
    ax.set_xlabel("NFE (network evaluations)"), ax.set_ylabel("PSNR vs GT (dB)")
    ax.set_title("held-out PSNR against the adaptive RK45 GT", fontsize=9)
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DEFAULT_BUDGET_SECONDS = 600.0
_CURVES = {"euler": 1, "midpoint": 2, "rk4": 4}          # the base solvers' PSNR-vs-NFE curves
_CURVE_NFES = (4, 6, 8, 10, 12, 16, 20)


def _curve_nfes(per: int) -> list:
    return [k for k in _CURVE_NFES if k % per == 0]


def _sizes_within_budget(model, nfe, num_gt, num_val, seed, iters, finetune_iters, device,
                         budget_seconds, log):
    """``(num_gt, num_val)``, scaled down (both by one factor; at least 96 / 64) when the fit's
    planned time (:func:`fit` with ``plan_only``: a timed probe of the model) plus the curves'
    model evaluations exceeds ``budget_seconds``. The training time is the trainer's budget and
    does not scale."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:       # plan_only writes nothing; a fresh folder
        plan = fit(model, nfe=nfe, solver="bespoke", out=Path(tmp) / "plan", num_train=num_gt,
                   num_heldout=num_val, seed=seed, iters=iters, finetune_iters=finetune_iters,
                   device=device, progress=False, log=lambda *a: None, plan_only=True)
    per_eval = plan["probe"]["seconds_per_eval"]
    curve_evals = num_val * sum(sum(_curve_nfes(per)) for per in _CURVES.values())
    eta = plan["eta_seconds"] + per_eval * curve_evals
    if eta <= budget_seconds:
        return num_gt, num_val
    train_s = plan["train_seconds"]
    scale = max(0.0, budget_seconds - train_s) / max(1e-9, eta - train_s)
    new_gt, new_val = max(min(num_gt, 96), int(num_gt * scale)), max(min(num_val, 64), int(num_val * scale))
    log(f"demo: {num_gt} + {num_val} trajectories would take about {eta / 60:.1f} min here "
        f"({per_eval * 1e3:.3g} ms per sample-evaluation, timed); using {new_gt} + {new_val} to fit "
        f"the {budget_seconds:.0f} s budget (--budget-seconds; 0: no limit)")
    return new_gt, new_val


def run_demo(model: str = "digits-fmot", nfe: int = 10, out="bespoke_demo",
             num_gt: int = DEFAULT_NUM_TRAIN,
             num_val: int = 1024, iters: int | None = None, finetune_iters: int | None = None,
             device: str = "cpu", seed: int = 0, progress: bool = True, log=print,
             budget_seconds: float | None = DEFAULT_BUDGET_SECONDS) -> dict:
    """Run the demo; returns a summary dict (also written to ``out/summary.json``).

    ``num_gt`` training trajectories (seed ``seed``) and ``num_val`` held-out ones (seed
    ``seed + 1``) that only the evaluation sees. ``budget_seconds``: the planned time of the
    whole demo (GT, training, held-out evaluation, the base solvers' curves), from the fit's
    timed plan: a model too slow for it gets proportionally fewer trajectories, and the demo
    says so (``None``: no limit). The plan's timing is pessimistic (it times small batches).

    Example::

        >>> run_demo("digits-fmot", nfe=10, out="bespoke_demo")
    """
    if nfe < 2 or nfe % 2:
        raise InvalidArgumentError(f"nfe must be an even number >= 2 for a bespoke RK2 solver, "
                                   f"got {nfe}")
    out = Path(out)
    started = time.perf_counter()
    if budget_seconds is not None:
        num_gt, num_val = _sizes_within_budget(model, nfe, num_gt, num_val, seed, iters,
                                               finetune_iters, device, budget_seconds, log)
    result = fit(model, nfe=nfe, solver="bespoke", out=out, num_train=num_gt, num_heldout=num_val,
                 seed=seed, iters=iters, finetune_iters=finetune_iters, device=device,
                 progress=progress, log=log, overwrite=True,   # the demo owns `out`
                 extra_files=("psnr_vs_nfe.png", "summary.json"))
    report, solver = result.report, result.solver
    heldout = load_trajectories(out / "gt_heldout", device=device)
    zm = result.model
    curve = {}
    for method, per in _CURVES.items():
        curve[method] = [evaluate(zm.model, f"{method}@{k}", heldout) for k in _curve_nfes(per)]
    files = dict(report["files"])
    if files:   # matplotlib is there
        _psnr_vs_nfe(out / "psnr_vs_nfe.png", curve, report["heldout"][0], report["heldout"][0]["solver"])
        files["psnr_vs_nfe"] = str(out / "psnr_vs_nfe.png")
    speed = _cuda_timing(zm, solver, device) if str(device).startswith("cuda") else None
    if speed:
        log(f"FastSampler (triton + CUDA graph): {speed['fast_ms']:.2f} ms/batch vs eager loop "
            f"{speed['eager_ms']:.2f} ms/batch (batch {speed['batch']})")
    gt = report["gt"]["train"]
    summary = {
        "model": zm.name, "nfe": nfe, "solver_file": str(result.solver_path),
        "results": report["heldout"], "baseline_curves": curve, "files": files,
        "fastsampler": speed, "baselines": baselines(nfe),
        "gt": {"num": gt["num"], "seconds": gt["wall_seconds_last_run"], "nfe": gt["nfe"],
               "interpolation": gt["interpolation"], "heldout": report["gt"]["heldout"]["num"]},
        "fit": report["training"], "report": str(out / "report.md"),
        "total_seconds": time.perf_counter() - started,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    log(f"done in {summary['total_seconds']:.0f} s; solver file: {result.solver_path}")
    return summary


def _cuda_timing(zm, solver, device, batch=16, reps=20):
    from .engine import FastSampler
    x0 = torch.randn(batch, *zm.shape, device=device)
    sampler = FastSampler(zm.model, solver, zm.shape, batch, device=device)
    sampler(x0)

    def timed(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    with torch.no_grad():
        return {"batch": batch, "fast_ms": timed(lambda: sampler(x0)),
                "eager_ms": timed(lambda: solver.sample(zm.model, x0))}
