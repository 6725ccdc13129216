"""What fitting a 10-NFE Bespoke RK2 solver costs from scratch, GT included, and cached vs
online GT (method.md section 5). CPU is fine; writes JSON + Markdown.

    python bench/fit_cost.py --out bench/results/2026-11-27-cpu [--models gmm-64 digits-exact]

For each model: GT generation (trajectories, model evaluations, wall time), a default cached fit
(bound phase + fine-tune), and a short bound-only fit in both GT modes with the same settings,
so the per-iteration cost of online GT (an RK45 solve per iteration) is compared at equal work.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bespoke_fast as bf  # noqa: E402
from bench._common import machine_info, write_results  # noqa: E402


def fit_cost(name, num_gt, iters_compare, workdir):
    zm = bf.zoo.load(name)
    t0 = time.perf_counter()
    manifest = bf.generate_trajectories(zm.model, num_gt, zm.shape, Path(workdir) / name,
                                        model_name=name, progress=False)
    gt_seconds = time.perf_counter() - t0
    gt = bf.load_trajectories(Path(workdir) / name)
    _, val = gt.split(256)
    base = {s: bf.evaluate(zm.model, s, val) for s in ("midpoint@10", "midpoint@20")}
    t0 = time.perf_counter()
    solver, report = bf.train(zm.model, gt, base="rk2", n_steps=5, val=256, progress=False)
    fit_seconds = time.perf_counter() - t0
    modes = {}
    for mode in ("cached", "online"):
        t0 = time.perf_counter()
        _, rep = bf.train(zm.model, gt, base="rk2", n_steps=5, iters=iters_compare,
                          finetune_iters=0, val=256, val_every=iters_compare, gt_mode=mode,
                          progress=False)
        modes[mode] = {"seconds": time.perf_counter() - t0, "iters": iters_compare,
                       "psnr": rep["best"]["psnr"], "psnr_set": rep["best"]["psnr_set"],
                       "nfe_train": rep["nfe"]["train"]}
    return {
        "model": name, "num_gt": num_gt,
        "gt": {"seconds": gt_seconds, "nfe": manifest["nfe"], "interpolation": manifest["interpolation"]},
        "fit": {"seconds": fit_seconds, "nfe": report["nfe"], "iters": report["config"]["iters"],
                "finetune_iters": report["config"]["finetune_iters"], "best": report["best"]},
        "total_seconds": gt_seconds + fit_seconds,
        "baselines": {k: {"psnr": v["psnr"], "psnr_set": v["psnr_set"]} for k, v in base.items()},
        "cached_vs_online": modes,
        "online_over_cached_wall": modes["online"]["seconds"] / modes["cached"]["seconds"],
    }


def markdown(records, machine):
    lines = [f"# Fit cost: bespoke-rk2 at NFE 10 from scratch ({machine['cpu']}, "
             f"torch {machine['torch']}, {machine.get('threads', '?')} threads, load average "
             f"{machine.get('loadavg_1min_at_start', float('nan')):.1f} at start)", "",
             "| model | GT traj | GT model evals | GT s | fit s | total s | PSNR / set (dB) | "
             "midpoint@10 | midpoint@20 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        b, f = r["baselines"], r["fit"]["best"]
        lines.append(f"| {r['model']} | {r['num_gt']} | {r['gt']['nfe']['total']:,} | "
                     f"{r['gt']['seconds']:.0f} | {r['fit']['seconds']:.0f} | {r['total_seconds']:.0f} | "
                     f"{f['psnr']:.1f} / {f['psnr_set']:.1f} | {b['midpoint@10']['psnr']:.1f} / "
                     f"{b['midpoint@10']['psnr_set']:.1f} | {b['midpoint@20']['psnr']:.1f} / "
                     f"{b['midpoint@20']['psnr_set']:.1f} |")
    lines += ["", "Cached vs online GT, bound phase only, same iterations and batch:", "",
              "| model | iters | cached s | online s | online/cached | cached PSNR | online PSNR | "
              "online training model evals |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        c, o = r["cached_vs_online"]["cached"], r["cached_vs_online"]["online"]
        lines.append(f"| {r['model']} | {c['iters']} | {c['seconds']:.1f} | {o['seconds']:.1f} | "
                     f"{r['online_over_cached_wall']:.1f}x | {c['psnr']:.1f} | {o['psnr']:.1f} | "
                     f"{o['nfe_train']:,} |")
    lines += ["", "GT model evals count per-sample evaluations (RK45 stages + knot re-evaluations). "
              "PSNR: mean per-sample / set-level (see bespoke_fast.metrics)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gmm-64", "digits-exact"])
    p.add_argument("--num-gt", type=int, default=1280)
    p.add_argument("--compare-iters", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/local"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    machine["threads"] = args.threads
    machine["loadavg_1min_at_start"] = os.getloadavg()[0]  # shared machines: say how busy
    with tempfile.TemporaryDirectory() as work:
        records = []
        for name in args.models:
            print(f"fitting {name} ...", flush=True)
            records.append({"machine": machine, **fit_cost(name, args.num_gt, args.compare_iters, work)})
            print(markdown(records, machine), flush=True)
    write_results(args.out, "fit_cost", records, markdown(records, machine))


if __name__ == "__main__":
    main()
