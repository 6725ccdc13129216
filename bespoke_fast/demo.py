"""``bespoke-fast demo``: the whole product on a bundled model, offline, in a few minutes on a CPU.

model -> GT trajectories -> fit a Bespoke RK2 solver -> solver file -> evaluate against the
base solvers -> sample grids and plots (-> on CUDA, FastSampler vs the eager loop).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ._checks import InvalidArgumentError
from .evaluation import evaluate
from .gt import generate_trajectories, load_trajectories
from .io import atomic_write_text
from .trainer import train
from .zoo import resolve_model

__all__ = ["run_demo"]


def _baselines(nfe: int):
    """Base solvers at the same NFE (rk4 at the nearest multiple of 4 not above it) and midpoint
    at twice the NFE."""
    specs = [f"euler@{nfe}"]
    if nfe % 2 == 0:
        specs.append(f"midpoint@{nfe}")
    if nfe >= 4:
        specs.append(f"rk4@{nfe - nfe % 4}")
    specs.append(f"midpoint@{2 * nfe}")
    return specs


def _sample_grid(path: Path, images: dict, shape, n=16):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if len(shape) != 3:
        return None
    cols = len(images)
    fig, axes = plt.subplots(1, cols, figsize=(2.2 * cols, 2.6))
    side = int(n ** 0.5)
    for ax, (title, x) in zip(axes, images.items()):
        x = x[:side * side, 0].clamp(-1, 1).cpu()
        h, w = x.shape[-2:]
        # 1-pixel white gap between tiles so neighbouring digits do not merge
        tiles = torch.nn.functional.pad(x, (0, 1, 0, 1), value=1.0)
        grid = tiles.reshape(side, side, h + 1, w + 1).permute(0, 2, 1, 3).reshape(side * (h + 1),
                                                                                side * (w + 1))
        ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plots(out: Path, solver, curve_rows, bespoke_row):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tb = {k: v.detach().cpu() for k, v in solver.tables().items()}
    r = torch.linspace(0, 1, len(tb["t"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.plot(r, tb["t"], "o-", ms=3, label="learned $t_r$")
    a.plot(r, r, "--", color="gray", label="identity")
    a.set_xlabel("r"), a.set_ylabel("t"), a.legend()
    b.plot(r, tb["s"], "o-", ms=3, color="C1", label="learned $s_r$")
    b.axhline(1, ls="--", color="gray")
    b.set_xlabel("r"), b.set_ylabel("s"), b.legend()
    fig.tight_layout()
    fig.savefig(out / "transform.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, rows in curve_rows.items():
        ax.plot([x["nfe"] for x in rows], [x["psnr"] for x in rows], "o-", ms=3, label=method)
    ax.plot([bespoke_row["nfe"]], [bespoke_row["psnr"]], "*", ms=14, color="C3", label="bespoke-rk2")
    ax.set_xlabel("NFE"), ax.set_ylabel("PSNR vs GT (dB)"), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(out / "psnr_vs_nfe.png", dpi=120)
    plt.close(fig)


def run_demo(model: str = "digits-fmot", nfe: int = 10, out="bespoke_demo", num_gt: int = 1280,
             num_val: int = 256, iters: int | None = None, finetune_iters: int | None = None,
             device: str = "cpu", seed: int = 0, progress: bool = True, log=print) -> dict:
    """Run the demo; returns a summary dict (also written to ``out/summary.json``).

    Example::

        >>> run_demo("digits-fmot", nfe=10, out="bespoke_demo")
    """
    if nfe < 2 or nfe % 2:
        raise InvalidArgumentError(f"nfe must be an even number >= 2 for a bespoke RK2 solver, "
                                   f"got {nfe}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    zm = resolve_model(model, device=device)
    log(f"[1/4] ground truth: {num_gt} trajectories of {zm.name} (adaptive RK45, rtol 1e-5)")
    t0 = time.perf_counter()
    # the demo owns out/gt: the same settings resume it, other settings replace it
    manifest = generate_trajectories(zm.model, num_gt, zm.shape, out / "gt", seed=seed,
                                     model_name=zm.name, data_range=zm.data_range,
                                     progress=progress, overwrite=True)
    gt_seconds = time.perf_counter() - t0
    gt = load_trajectories(out / "gt", device=device)
    _, val = gt.split(num_val)
    log(f"[2/4] fitting a bespoke RK2 solver at NFE {nfe}")
    kwargs = {k: v for k, v in (("iters", iters), ("finetune_iters", finetune_iters)) if v is not None}
    solver, report = train(zm.model, gt, base="rk2", n_steps=nfe // 2, val=num_val, seed=seed,
                           progress=progress, model_name=zm.name, **kwargs)
    solver_path = out / f"{zm.name}_bespoke_rk2_nfe{nfe}.json"
    solver.save(solver_path)
    log(f"[3/4] evaluating against the base solvers on {num_val} held-out trajectories")
    rows = [evaluate(zm.model, solver, val)] + [evaluate(zm.model, s, val) for s in _baselines(nfe)]
    rows[0]["solver"] = f"bespoke-rk2@{nfe}"
    table = [f"{'solver':<18} {'NFE':>4} {'RMSE':>10} {'PSNR (dB)':>10} {'PSNR set':>9}"]
    table += [f"{r['solver']:<18} {r['nfe']:>4} {r['rmse']:>10.2e} {r['psnr']:>10.2f} "
              f"{r['psnr_set']:>9.2f}" for r in rows]
    table.append("PSNR: mean of per-sample PSNRs (the papers' convention); PSNR set: of the "
                 "mean MSE, which exposes samples that land on the wrong mode")
    for line in table:
        log(line)
    log(f"[4/4] sample grids and plots in {out}")
    curve = {}
    for method, per in (("euler", 1), ("midpoint", 2), ("rk4", 4)):
        nfes = [k for k in (4, 6, 8, 10, 12, 16, 20) if k % per == 0]
        curve[method] = [evaluate(zm.model, f"{method}@{k}", val) for k in nfes]
    files = {}
    try:
        with torch.no_grad():
            x0 = val.x0[:16]
            images = {"GT (RK45)": val.x1[:16], f"bespoke-rk2@{nfe}": solver.sample(zm.model, x0)}
            for spec in _baselines(nfe)[:-1]:
                method, k = spec.split("@")
                from .solvers.fixed import NFE_PER_STEP, solve
                images[spec] = solve(zm.model, x0, method, n_steps=int(k) // NFE_PER_STEP[method])
        if _sample_grid(out / "samples.png", images, zm.shape):
            files["samples"] = str(out / "samples.png")
        _plots(out, solver, curve, rows[0])
        files.update(transform=str(out / "transform.png"), psnr_vs_nfe=str(out / "psnr_vs_nfe.png"))
    except ImportError:
        log("matplotlib is not installed: skipping the PNGs (pip install bespoke_fast[viz])")
    speed = _cuda_timing(zm, solver, device) if str(device).startswith("cuda") else None
    if speed:
        log(f"FastSampler (triton + CUDA graph): {speed['fast_ms']:.2f} ms/batch vs eager loop "
            f"{speed['eager_ms']:.2f} ms/batch (batch {speed['batch']})")
    summary = {
        "model": zm.name, "nfe": nfe, "solver_file": str(solver_path), "results": rows,
        "baseline_curves": curve, "files": files, "fastsampler": speed,
        "gt": {"num": num_gt, "seconds": gt_seconds, "nfe": manifest["nfe"],
               "interpolation": manifest.get("interpolation")},
        "fit": {"seconds": report["wall_seconds"], "nfe": report["nfe"], "best": report["best"]},
        "total_seconds": time.perf_counter() - started,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    log(f"done in {summary['total_seconds']:.0f} s (GT {gt_seconds:.0f} s, fit "
        f"{report['wall_seconds']:.0f} s); solver file: {solver_path}")
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
