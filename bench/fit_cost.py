"""What fitting a 10-NFE Bespoke RK2 solver costs from scratch, GT included, and cached vs
online GT (method.md section 5). CPU is fine; writes JSON + Markdown.

    python bench/fit_cost.py --out bench/results/2026-11-27-cpu [--models gmm-64 digits-exact]
    python bench/fit_cost.py --unet --out bench/results/2026-12-01-cpu

For each model: GT generation (trajectories, model evaluations, wall time), a default cached fit
(bound phase + fine-tune), and a short bound-only fit in both GT modes with the same settings,
so the per-iteration cost of online GT (an RK45 solve per iteration) is compared at equal work.

``--storage``: the same fit (``bf.fit``, same seeds) with GT knots stored in float32, float16
and float16 + adaptive knots: disk per trajectory, the recorded extra interpolation error and the
held-out PSNR of the trained solver (the accuracy cost of the smaller GT).

``--pareto``: held-out PSNR against the model evaluations a fit spends (forward-equivalents: a
backward counts 2; GT included), for our two kinds at several budgets and for the learned-grid
peers of ``bench/peers_learned.py`` (LD3 on three bases at several iteration caps, GITS), each
counted exactly by wrapping the model in ``bespoke_fast.fitting.evals.EvalLedger``; on the same
training GT pool (seed 0) and the same 1,024 held-out noises (seed 1) as ``bench/quality.py``.
Writes ``fit_pareto.{json,md,png}``.

    python bench/fit_cost.py --pareto --out bench/results/2026-12-04-cpu [--models gmm-64 ...]

``--image MODEL``: the default ``bespoke-fast fit`` of an image-shaped zoo model (e.g.
``photo-32``, 3x32x32) in a child process: its plan (disk, peak memory, evaluations, ETA, printed
before it starts) against what it did (exact evaluations, wall time, peak RSS, disk), the
held-out PSNR, and a projection of the same fit for a DiT-XL/2-size model on one H200 from
published FLOP counts (marked as a projection). Writes ``fit_cost_image.{json,md}``.

``--unet``: the 35.7M-parameter UNet of ``bench/models.py`` (random weights: the ODE is still
well defined) at tiny counts: a few GT trajectories, then, each configuration in its own process
(so peak RSS is its own), training iterations of both phases at micro-batch sizes with and
without activation checkpointing: peak RSS and seconds per iteration, and the trend (memory
linear in the micro-batch, time linear in the batch) extrapolated to a full default fit.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if not __package__:  # python bench/x.py: the repository root, not bench/, on sys.path
    import _path  # noqa: F401
import bespoke_fast as bf  # noqa: E402
from bench.harness import machine_info, write_results  # noqa: E402


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


# ----------------------------------------------------------------------------- the 35M UNet
def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def unet_child(cfg):
    """One configuration in a fresh process: peak RSS and seconds per iteration (stdout JSON)."""
    from bench.models import make_model
    from bespoke_fast.solvers.bespoke import BespokeSolver
    from bespoke_fast.fitting.bespoke import loss_backward, model_for_loss
    torch.set_num_threads(1)
    net, _, _ = make_model("unet-35m")
    gt = bf.load_trajectories(cfg["gt"], stream=True)
    batch = gt.subset(list(range(cfg["batch"])))
    solver = BespokeSolver("rk2", cfg["nfe"] // 2)
    loss_model = model_for_loss(net, cfg["checkpointing"], getattr(torch, cfg["autocast"]) if cfg["autocast"] else None)
    out = {"rss_before_mb": _rss_mb()}
    times = []
    for _ in range(cfg["reps"]):
        solver.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss_backward(solver, net, batch, cfg["phase"], micro_batch=cfg["micro_batch"],
                      loss_model=loss_model)
        times.append(time.perf_counter() - t0)
    out.update(seconds_per_iter=min(times), peak_rss_mb=_rss_mb())
    print(json.dumps(out))


def unet_cost(args, work):
    from bench.models import make_model
    torch.set_num_threads(1)
    net, shape, _ = make_model("unet-35m")
    gt_dir = Path(work) / "unet_gt"
    t0 = time.perf_counter()
    manifest = bf.generate_trajectories(net, args.unet_batch, shape, gt_dir, rtol=1e-3, atol=1e-3,
                                        knots=11, measure_interpolation=0, progress=False,
                                        model_name="unet-35m")
    gt_seconds = time.perf_counter() - t0
    del net
    configs = [{"micro_batch": mb, "checkpointing": ck, "autocast": None}
               for mb in sorted({args.unet_batch, 1}, reverse=True) for ck in (False, True)]
    configs.append({"micro_batch": 1, "checkpointing": False, "autocast": "bfloat16"})
    rows = []
    for cfg in configs:
        cfg = {**cfg, "gt": str(gt_dir), "batch": args.unet_batch, "nfe": 10}
        print(f"unet-35m: {cfg}", flush=True)
        for phase, reps in (("bound", 2), ("finetune", 1)):   # one process per phase: own peak RSS
            res = subprocess.run([sys.executable, __file__, "--unet-child",
                                  json.dumps({**cfg, "phase": phase, "reps": reps})],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            got = json.loads(res.stdout.strip().splitlines()[-1])
            cfg.update({f"{phase}_{k}": v for k, v in got.items()})
        rows.append({k: v for k, v in cfg.items() if k != "gt"})   # no machine paths in results
        print(rows[-1], flush=True)
    return {"model": "unet-35m", "parameters": 35_746_307, "shape": list(shape), "nfe": 10,
            "batch": args.unet_batch, "gt": {"num": manifest["num"], "seconds": gt_seconds,
                                             "rtol": 1e-3, "nfe": manifest["nfe"]},
            "rows": rows, "extrapolation": _extrapolate(rows, manifest, gt_seconds, args.unet_batch)}


def _extrapolate(rows, manifest, gt_seconds, batch, full_batch=128, iters=200, finetune=800,
                 num_gt=1280 + 1024):
    """Memory linear in the micro-batch (per configuration of checkpointing), time linear in the
    batch: a full default fit (batch 128, 200 bound + 800 fine-tune iterations, 1280 + 1024 GT
    trajectories at this GT's model evaluations per trajectory)."""
    out = {}
    rows = [r for r in rows if not r["autocast"]]
    for ck in (False, True):
        pts = sorted((r["micro_batch"], r) for r in rows if r["checkpointing"] == ck)
        (m1, r1), (m2, r2) = pts[0], pts[-1]
        line = {}   # per phase: peak RSS = base + slope x micro-batch
        for ph in ("bound", "finetune"):
            slope_ph = (r2[f"{ph}_peak_rss_mb"] - r1[f"{ph}_peak_rss_mb"]) / max(m2 - m1, 1)
            line[ph] = (r1[f"{ph}_peak_rss_mb"] - slope_ph * m1, slope_ph)

        def peak(mb):
            return max(b0 + sl * mb for b0, sl in line.values())
        slope = max(sl for _, sl in line.values())
        base = peak(0)
        per_sample = {p: sum(r[f"{p}_seconds_per_iter"] for r in rows if r["checkpointing"] == ck)
                      / sum(1 for r in rows if r["checkpointing"] == ck) / batch
                      for p in ("bound", "finetune")}
        out["checkpointing" if ck else "plain"] = {
            "rss_mb_per_micro_batch_sample": slope, "rss_mb_base": base,
            "per_phase_mb": {ph: {"base": b0, "per_sample": sl} for ph, (b0, sl) in line.items()},
            "peak_rss_gb_at": {str(mb): peak(mb) / 1024 for mb in (1, 8, 32, full_batch)},
            "train_hours_full_fit": (per_sample["bound"] * iters + per_sample["finetune"] * finetune)
            * full_batch / 3600}
    out["gt_hours_full_fit"] = gt_seconds / manifest["num"] * num_gt / 3600
    out["assumes"] = {"batch": full_batch, "iters": iters, "finetune_iters": finetune, "num_gt": num_gt}
    return out


def unet_markdown(rec, machine):
    e = rec["extrapolation"]
    lines = [f"# Fit cost of the 35.7M-parameter UNet (random weights), CPU ({machine['cpu']}, torch "
             f"{machine['torch']}, 1 thread, load average {machine.get('loadavg_1min_at_start', 0):.1f})", "",
             f"bespoke-rk2 at NFE 10, batch {rec['batch']} trajectories of 3x32x32; GT: "
             f"{rec['gt']['num']} trajectories (rtol 1e-3, 11 knots) in {rec['gt']['seconds']:.0f} s "
             f"({rec['gt']['nfe']['per_trajectory']:.0f} model evaluations each). Each row is its own "
             "process; RSS is the process peak (includes torch and the model, about "
             f"{min(r['bound_rss_before_mb'] for r in rec['rows']):.0f} MB before the first iteration).", "",
             "| micro-batch | checkpointing | model autocast | bound s/iter | bound peak RSS MB | "
             "fine-tune s/iter | fine-tune peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        lines.append(f"| {r['micro_batch']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{r['autocast'] or 'no (float32)'} | "
                     f"{r['bound_seconds_per_iter']:.1f} | {r['bound_peak_rss_mb']:.0f} | "
                     f"{r['finetune_seconds_per_iter']:.1f} | {r['finetune_peak_rss_mb']:.0f} |")
    a = e["assumes"]
    lines += ["", f"Extrapolated to a full default fit (batch {a['batch']}, {a['iters']} + "
              f"{a['finetune_iters']} iterations, {a['num_gt']} GT trajectories), 1 CPU thread:", "",
              "| | MB per micro-batch sample | peak RSS GB at micro-batch 1 / 8 / 32 / 128 | training hours |",
              "|---|---|---|---|"]
    for k in ("plain", "checkpointing"):
        x = e[k]
        lines.append(f"| {k} | {x['rss_mb_per_micro_batch_sample']:.0f} | "
                     + " / ".join(f"{v:.1f}" for v in x["peak_rss_gb_at"].values())
                     + f" | {x['train_hours_full_fit']:.0f} |")
    lines += ["", f"GT for the full fit at this tolerance: about {e['gt_hours_full_fit']:.1f} h on this "
              "CPU thread. Memory grows linearly with the micro-batch and time per iteration does not "
              "depend on it; checkpointing adds one forward per model call. The bound phase "
              "evaluates all n steps of a chunk in one model call of n x micro-batch samples, so "
              "checkpointing there only drops the other RK2 stage's activations; in the "
              "fine-tune phase (n sequential calls) it keeps one call's. Peak RSS is reliable; "
              "the times are not better than 2x: the machine was shared (load average "
              f"{machine.get('loadavg_1min_at_start', 0):.1f} at the start). bf16 autocast speed "
              "depends on the CPU's bf16 support."]
    return "\n".join(lines) + "\n"


def storage_cost(name, num_gt, iters, finetune_iters, work):
    rows = []
    for label, kw in (("float32", {}), ("float16", {"storage_dtype": "float16"}),
                      ("float16 + adaptive knots", {"storage_dtype": "float16", "adaptive_knots": True})):
        t0 = time.perf_counter()
        r = bf.fit(name, nfe=10, out=Path(work) / f"{name}-{len(rows)}", num_train=num_gt,
                   num_heldout=1024, iters=iters, finetune_iters=finetune_iters, plots=False,
                   progress=False, log=lambda *a: None, **kw)
        st = r.report["gt"]["train"]["storage"]
        rows.append({"model": name, "storage": label, "num_gt": num_gt, "iters": iters,
                     "finetune_iters": finetune_iters, "seconds": time.perf_counter() - t0,
                     "bytes_per_trajectory": st["bytes_per_trajectory"],
                     "extra_rmse_mean": st.get("extra_rmse_mean", 0.0),
                     "error_limit": st.get("error_limit"), "knots_mean": st.get("knots_mean", 41),
                     "interpolation_rmse_mean": r.report["gt"]["train"]["interpolation"]["rmse_mean"],
                     "heldout": {x["solver"]: {"psnr": x["psnr"], "psnr_set": x["psnr_set"]}
                                 for x in r.report["heldout"]}})
        print(rows[-1], flush=True)
    return rows


def storage_markdown(rows, machine):
    lines = [f"# GT storage: disk vs accuracy ({machine['cpu']}, torch {machine['torch']}, "
             f"{machine.get('threads', '?')} threads)", "",
             f"`bf.fit` of bespoke-rk2 at NFE 10, {rows[0]['num_gt']} training GT trajectories, "
             f"{rows[0]['iters']} + {rows[0]['finetune_iters']} iterations, the same seeds; "
             "held-out PSNR on 1024 trajectories (seed 1). Extra RMSE: the stored GT's Hermite "
             "interpolant vs the float32, every-knot one (measured while writing, recorded in the "
             "manifest); limit: 0.1 x the RK2 local error at NFE 10.", "",
             "| model | knots stored as | bytes / trajectory | vs float32 | mean knots | extra RMSE "
             "| limit | interpolation RMSE vs direct solves | held-out PSNR / set (dB) | midpoint@10 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bytes_per_trajectory"]
        ours = next(v for k, v in r["heldout"].items() if k.startswith("bespoke"))
        mid = r["heldout"]["midpoint@10"]
        lines.append(f"| {r['model']} | {r['storage']} | {b['stored']:.0f} | "
                     f"{b['stored'] / b['float32_all_knots']:.2f} | {r['knots_mean']:.1f} | "
                     f"{r['extra_rmse_mean']:.1e} | {r['error_limit'] or float('nan'):.1e} | "
                     f"{r['interpolation_rmse_mean']:.1e} | {ours['psnr']:.2f} / {ours['psnr_set']:.2f} | "
                     f"{mid['psnr']:.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the Pareto front
REFERENCE = "bench/results/2026-12-02-cpu/quality-defaults/quality.json"


def reference_psnr(models) -> dict:
    """``{model: {kind: held-out PSNR}}`` of the 2026-12-02 quality-defaults fits at NFE 10."""
    path = Path(__file__).resolve().parents[1] / REFERENCE
    out = {}
    for r in json.loads(path.read_text()):
        if (r.get("kind") == "result" and r.get("nfe") == 10 and r.get("model") in models
                and r.get("solver") in ("bespoke-rk2", "bns")):
            out.setdefault(r["model"], {})[r["solver"]] = r["psnr"]
    return out


def run_pareto(args, machine):
    torch.set_num_threads(1)
    machine["threads"] = 1
    models = args.models if args.models != ["gmm-64", "digits-exact"] else list(BENCH_MODELS)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.cache or tmp
        for name in models:
            points += pareto_points(name, work, budgets=args.budgets)
            md = pareto_markdown(points, machine, reference_psnr(models))
            write_results(args.out, "fit_pareto", [{"machine": machine, **p} for p in points], md)
    try:
        pareto_plot(points, Path(args.out) / "fit_pareto.png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(md)

PARETO_BUDGETS = (30_000, 60_000, 125_000, 250_000, 500_000)
LD3_ITERS = (10, 25, 100, 400)
BENCH_MODELS = ("gmm-64", "digits-exact", "digits-fmot", "digits-vcs", "digits-eps")


def _gt_pool(name, num, seed, knots, work):
    zm = bf.zoo.load(name)
    out = Path(work) / f"{name}-{num}-{seed}-{knots}"
    if not (out / "manifest.json").is_file():
        bf.generate_trajectories(zm.model, num, zm.shape, out, seed=seed, knots=knots,
                                 model_name=name, data_range=zm.data_range, progress=False,
                                 measure_interpolation=0)
    return zm, bf.load_trajectories(out)


def gt_for_budget(budget: int, per_traj: float) -> int:
    """GT trajectories of a fit with ``budget`` forward-equivalents: about a quarter of it, 160
    at most (``bf.fit``'s default), 40 at least (8 of them validate)."""
    return int(min(160, max(40, 0.25 * budget / per_traj)))


def pareto_points(name, work, kinds=("bespoke", "bns"), budgets=PARETO_BUDGETS,
                  ld3_iters=LD3_ITERS, nfe=10):
    """One model's points: ``{"method", "evals", "gt_evals", "psnr", "psnr_set", ...}``."""
    from bench import peers_learned
    from bespoke_fast.fitting.bns import train_bns
    from bespoke_fast.fitting.evals import EvalLedger
    zm, pool = _gt_pool(name, 1544, 0, 41, work)
    _, held = _gt_pool(name, 1024, 1, 2, work)
    per_traj = pool.meta["nfe"]["per_trajectory"]
    points = []

    def add(method, budget, n, fe, solver, report, wall):
        h = bf.evaluate(zm.model, solver, held)
        gt_evals = int(round(n * per_traj))
        points.append({"model": name, "method": method, "budget": budget, "num_gt": n,
                       "gt_evals": gt_evals, "train_evals": int(fe), "evals": gt_evals + int(fe),
                       "psnr": h["psnr"], "psnr_set": h["psnr_set"], "psnr_ci": h.get("psnr_ci"),
                       "stop_reason": report.get("stop_reason"), "wall_seconds": wall})
        print(f"[{name}] {method} budget {budget} GT {n}: {points[-1]['evals']:,} evals, "
              f"held-out {h['psnr']:.2f} dB", flush=True)

    for budget in budgets:
        n = gt_for_budget(budget, per_traj)
        data, left = pool.subset(range(n)), budget - int(round(n * per_traj))
        for kind in kinds:
            t0 = time.perf_counter()
            if kind == "bespoke":
                solver, report = bf.train(zm.model, data, base="rk2", n_steps=nfe // 2,
                                          val=max(8, n // 5), budget_evals=left, progress=False)
            else:
                solver, report = train_bns(zm.model, data, n_steps=nfe, val=max(16, n // 5),
                                           budget_evals=left, progress=False)
            add(kind, budget, n, report["evaluations"]["total"]["forward_equivalent"], solver,
                report, time.perf_counter() - t0)
    n = 160                                   # the peers: the default fit's GT, split as ours
    data = pool.subset(range(n))
    train, val = data.split(n // 5)
    for method in ("ipndm", "dpm++2m", "unipc"):
        for iters in ld3_iters:
            ledger = EvalLedger()
            t0 = time.perf_counter()
            solver, report = peers_learned.fit_ld3(ledger.wrap(zm.model), method, nfe, train, val,
                                                   iters=iters, budget_seconds=None,
                                                   patience=None)
            add(f"ld3-{method}", None, n, ledger.equivalent(), solver, report,
                time.perf_counter() - t0)
    ledger = EvalLedger()
    t0 = time.perf_counter()
    solver, report = peers_learned.fit_gits_midpoint(ledger.wrap(zm.model), nfe, train)
    add("gits-midpoint", None, n, ledger.equivalent(), solver, report, time.perf_counter() - t0)
    return points


def pareto_markdown(points, machine, reference):
    models = list(dict.fromkeys(p["model"] for p in points))
    lines = [f"# Held-out PSNR against fit cost at NFE 10 ({machine['cpu']}, torch "
             f"{machine['torch']}, 1 thread, load average {machine.get('loadavg_1min_at_start', 0):.1f}"
             " at start)", "",
             "Fit cost: model evaluations in forward-equivalents (one sample through the model; a "
             "backward counts 2), the training GT included (its trajectories x the pool's measured "
             "evaluations per trajectory, 41 knots, rtol 1e-5), counted exactly for the trainers. "
             "PSNR: mean per-sample over the same 1,024 held-out noises (seed 1) as "
             "bench/quality.py. Ours: `bf.train` / `train_bns` at their defaults with "
             "`budget_evals` = budget - GT, on the first N of the training pool (seed 0; the last "
             "fifth validates). Peers: LD3 (bench/peers_learned.py, Adam on batches of 128, "
             "capped at 10 / 25 / 100 / 400 iterations, no time budget) and GITS on the 160-trajectory "
             "GT of the default fit. Reference: the 2026-12-02 quality-defaults fits "
             "(1,288 training trajectories, 170 s per fit; their evaluations were not counted, "
             "the plan of that recipe said about 12 million).", ""]
    for model in models:
        rows = sorted((p for p in points if p["model"] == model), key=lambda p: (p["method"], p["evals"]))
        lines += [f"## {model}", "", "| method | budget | GT traj | fit evaluations | held-out PSNR (dB) | "
                  "PSNR set (dB) |", "|---|---|---|---|---|---|"]
        for p in rows:
            lines.append(f"| {p['method']} | {p['budget'] or '-'} | {p['num_gt']} | {p['evals']:,} | "
                         f"{p['psnr']:.2f} | {p['psnr_set']:.2f} |")
        for kind, ref in reference.get(model, {}).items():
            lines.append(f"| {kind} (2026-12-02 defaults) | - | 1,544 | ~12,000,000 (planned) | "
                         f"{ref:.2f} | - |")
        lines.append("")
        lines += _lead_lines(rows)
        lines.append("")
    return "\n".join(lines) + "\n"


def _lead_lines(rows):
    """At each of our budgets: the best peer point that spent no more, and the difference."""
    out = []
    peers = [p for p in rows if p["budget"] is None]
    for p in rows:
        if p["budget"] is None:
            continue
        cheaper = [q for q in peers if q["evals"] <= p["evals"]]
        if not cheaper:
            out.append(f"- {p['method']} at {p['evals']:,}: no peer point spent as little")
            continue
        best = max(cheaper, key=lambda q: q["psnr"])
        verdict = "leads" if p["psnr"] > best["psnr"] else "TRAILS"
        out.append(f"- {p['method']} at {p['evals']:,}: {p['psnr']:.2f} dB; best peer at no more "
                   f"evaluations {best['method']} {best['psnr']:.2f} dB ({best['evals']:,}): "
                   f"{verdict} by {p['psnr'] - best['psnr']:+.2f} dB")
    return out


def pareto_plot(points, path):
    from bespoke_fast.fitting.plots import pyplot
    plt = pyplot()
    models = list(dict.fromkeys(p["model"] for p in points))
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    for ax, model in zip(axes.flat, models):
        for method in dict.fromkeys(p["method"] for p in points):
            pts = sorted((p for p in points if p["model"] == model and p["method"] == method),
                         key=lambda p: p["evals"])
            if pts:
                ax.plot([p["evals"] for p in pts], [p["psnr"] for p in pts],
                        "o-" if method in ("bespoke", "bns") else "s--", label=method,
                        lw=2 if method in ("bespoke", "bns") else 1)
        ax.set_xscale("log")
        ax.set_title(model)
        ax.set_xlabel("fit cost: model evaluations (GT included)")
        ax.set_ylabel("held-out PSNR at NFE 10 (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Held-out PSNR against fit cost (forward-equivalents: a backward counts 2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- an image model
# a DiT-XL/2 forward at 256x256 (latent 4x32x32): 118.6 GFLOP (Peebles & Xie, 2023, table 4);
# one H200: 989 TFLOP/s dense bf16 (NVIDIA's data sheet), of which a large transformer
# forward reaches about 40% (an assumption, not a measurement)
DIT_XL2_GFLOP, H200_TFLOPS, ASSUMED_MFU = 118.6, 989.0, 0.4


def image_fit(name, out_dir, nfe=10):
    """The default fit of ``name`` in a child process; its report, wall time and peak RSS."""
    import shutil
    work = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "bespoke_fast.cli", "fit", "--model", name,
                              "--nfe", str(nfe), "--out", str(work / "fit"), "--threads", "1",
                              "--quiet", "--json"], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - t0
        if res.returncode:
            raise SystemExit(f"the fit failed: {res.stderr.strip().splitlines()[-1:]}")
        report = json.loads(res.stdout)
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024   # Linux: KiB
        disk = sum(f.stat().st_size for f in (work / "fit").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plan, ev = report["plan"], report["evaluations"]
    per_eval = plan["probe"]["seconds_per_eval"]
    dit_per_eval = DIT_XL2_GFLOP * 1e9 / (H200_TFLOPS * 1e12 * ASSUMED_MFU)
    return {"model": name, "nfe": nfe, "wall_seconds": wall, "peak_rss_bytes": peak_rss,
            "disk_bytes": disk, "plan": {k: plan[k] for k in ("model_evaluations", "memory_bytes",
                                                              "disk_bytes", "eta_seconds")},
            "evaluations": ev, "heldout": report["heldout"][:2],
            "seconds_per_eval_probe": per_eval,
            "projection_dit_xl2_h200": {
                "assumes": {"gflop_per_forward": DIT_XL2_GFLOP, "h200_tflops": H200_TFLOPS,
                            "mfu": ASSUMED_MFU},
                "seconds_per_eval": dit_per_eval,
                "fit_seconds": ev["fit"] * dit_per_eval,
                "with_heldout_report_seconds": (ev["fit"] + ev["heldout_gt"] + ev["report"])
                * dit_per_eval}}


def image_markdown(rec, machine):
    p, ev, pr = rec["plan"], rec["evaluations"], rec["projection_dit_xl2_h200"]
    rows = {r["solver"]: r for r in rec["heldout"]}
    lines = [f"# The default fit of {rec['model']} (NFE {rec['nfe']}) on CPU ({machine['cpu']}, "
             f"torch {machine['torch']}, 1 thread, load average "
             f"{machine.get('loadavg_1min_at_start', 0):.1f} at start)", "",
             "| | planned (before it starts) | measured |", "|---|---|---|",
             f"| model evaluations of the fit (forward-equivalents, GT included) | at most "
             f"{p['model_evaluations']['fit']:,} | {ev['fit']:,} |",
             f"| held-out GT + report evaluations (not in the budget) | "
             f"{p['model_evaluations']['heldout_gt'] + p['model_evaluations']['report']:,} | "
             f"{ev['heldout_gt'] + ev['report']:,} |",
             f"| peak memory | {p['memory_bytes']['peak'] / 1e6:.0f} MB (the process, plus its "
             f"largest stage) | {rec['peak_rss_bytes'] / 1e6:.0f} MB RSS (the fit's process at "
             f"its peak) |",
             f"| disk | {p['disk_bytes'] / 1e6:.1f} MB (GT) | {rec['disk_bytes'] / 1e6:.1f} MB (the "
             f"whole --out) |",
             f"| wall time | {p['eta_seconds']:.0f} s (ETA) | {rec['wall_seconds']:.0f} s |", "",
             "Held-out PSNR (dB): " + ", ".join(f"{k} {v['psnr']:.2f}" for k, v in rows.items()),
             "", "Trainer evaluations by stage: " + ", ".join(
                 f"{k} {v['forward_equivalent']:,}" for k, v in ev["trainer"].items()), "",
             f"**Projection, not a measurement**: the same fit ({ev['fit']:,} evaluations) of a "
             f"DiT-XL/2-size model at 256x256 ({pr['assumes']['gflop_per_forward']} GFLOP per "
             f"forward) on one H200 at an assumed {pr['assumes']['mfu']:.0%} of its "
             f"{pr['assumes']['h200_tflops']:.0f} TFLOP/s: {pr['seconds_per_eval'] * 1e3:.2f} ms "
             f"per sample-evaluation, about {pr['fit_seconds'] / 60:.1f} min for the fit "
             f"({pr['with_heldout_report_seconds'] / 60:.1f} min with the held-out report)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gmm-64", "digits-exact"])
    p.add_argument("--num-gt", type=int, default=1280)
    p.add_argument("--compare-iters", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/local"))
    p.add_argument("--storage", action="store_true",
                   help="float32 vs float16 (vs adaptive) GT knots: disk and held-out accuracy")
    p.add_argument("--iters", type=int, default=100, help="--storage: bound-phase iterations")
    p.add_argument("--finetune-iters", type=int, default=300, help="--storage: fine-tune iterations")
    p.add_argument("--unet", action="store_true",
                   help="the 35M UNet: peak RSS and time per iteration vs micro-batch/checkpointing")
    p.add_argument("--unet-batch", type=int, default=2, help="batch (and GT trajectories) for --unet")
    p.add_argument("--unet-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--image", default=None, metavar="MODEL",
                   help="the default fit of an image-shaped zoo model (e.g. photo-32): planned "
                        "vs measured evaluations, memory, disk, time; a DiT-XL/2 projection")
    p.add_argument("--pareto", action="store_true",
                   help="held-out PSNR against fit evaluations: ours at several budgets, the "
                        "learned-grid peers at their own counts (default models: the five bench "
                        "models)")
    p.add_argument("--budgets", type=int, nargs="+", default=list(PARETO_BUDGETS),
                   help="--pareto: our fits' budgets in forward-equivalents, GT included")
    p.add_argument("--cache", type=Path, default=None,
                   help="--pareto: keep the GT pools here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.unet_child:
        return unet_child(json.loads(args.unet_child))
    torch.set_num_threads(args.threads)
    machine = machine_info()
    machine["threads"] = args.threads
    machine["loadavg_1min_at_start"] = os.getloadavg()[0]  # shared machines: say how busy
    if args.storage:
        with tempfile.TemporaryDirectory() as work:
            rows = [r for name in args.models
                    for r in storage_cost(name, args.num_gt, args.iters, args.finetune_iters, work)]
        md = storage_markdown(rows, machine)
        print(md)
        write_results(args.out, "gt_storage", [{"machine": machine, **r} for r in rows], md)
        return
    if args.pareto:
        return run_pareto(args, machine)
    if args.image:
        machine["threads"] = 1
        rec = {"machine": machine, **image_fit(args.image, args.out)}
        md = image_markdown(rec, machine)
        print(md)
        write_results(args.out, "fit_cost_image", [rec], md)
        return
    if args.unet:
        machine["threads"] = 1
        with tempfile.TemporaryDirectory() as work:
            rec = {"machine": machine, **unet_cost(args, work)}
        md = unet_markdown(rec, machine)
        print(md)
        write_results(args.out, "fit_cost_unet", [rec], md)
        return
    with tempfile.TemporaryDirectory() as work:
        records = []
        for name in args.models:
            print(f"fitting {name} ...", flush=True)
            records.append({"machine": machine, **fit_cost(name, args.num_gt, args.compare_iters, work)})
            print(markdown(records, machine), flush=True)
    write_results(args.out, "fit_cost", records, markdown(records, machine))


if __name__ == "__main__":
    main()
