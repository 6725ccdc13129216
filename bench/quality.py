#!/usr/bin/env python
"""Sample quality vs NFE: our base solvers, trained Bespoke (and BNS) solvers, and peer libraries,
all against the same tight ground truth from the same noises.

For each model (zoo: ``gmm-64``, ``digits-exact``; the trained ``digits-fmot``, ``digits-vcs``,
``digits-eps`` when their weights are installed):

1. GT: ``--num-test`` held-out + ``--num-train`` training trajectories (adaptive RK45,
   ``--rtol``), cached under ``--cache`` (default ``bench/.cache``, git-ignored) and reused when
   the model's weights hash matches.
2. At every NFE in ``--nfes`` (default 4 6 8 10 16 20), RMSE and PSNR of x(1) against the GT
   endpoint on the held-out noises for

   * ours: ``euler``, ``midpoint``, ``heun``, ``rk4`` (``bespoke_fast.solve``; where NFE divides),
   * ``bespoke-rk1`` / ``bespoke-rk2``: ``bespoke_fast.train`` on the training trajectories only,
     with the default recipe of ``bespoke-fast fit``: 160 training trajectories (the trainer holds
     out its default fifth to pick the best iterate) and the fit's evaluation budget, 250,000
     forward-equivalents less what the training GT cost (``--budget-evals``); trained solvers
     are cached too,
   * ``bns``: ``train_bns`` with its defaults on the same GT and budget,
   * learned-grid peers (``bench/peers_learned.py``): LD3-style iPNDM / DPM-Solver++(2M) /
     UniPC and GITS-style midpoint, fitted on the same training trajectories with the same
     validation fifth and their own defaults,
   * peers: torchdiffeq fixed-grid ``odeint`` (euler, midpoint, rk4) on the same uniform grid,
     flow_matching ``ODESolver`` (midpoint, ``step_size = 1/steps``), diffusers
     ``FlowMatchEulerDiscreteScheduler``, ``DPMSolverMultistepScheduler`` (dpmsolver++ 2M) and
     ``UniPCMultistepScheduler`` in flow-prediction mode with their default flow sigmas
     (conversions in ``bench/peers.py``, checked in tests/test_bench_peers.py).

   Every solver call goes through a counting wrapper: the model evaluations per sample are
   recorded (``nfe_measured``) and any mismatch with the nominal NFE is flagged in the table.
   Every fit's model evaluations (forward-equivalents, exact) are recorded and shown with the
   training GT's.

Writes ``OUT/quality.json`` (records: ``kind`` = gt / result / note), ``OUT/quality.md`` (one
PSNR table per model, rows solver, columns NFE, then issue 16's targets judged cell by cell)
and ``OUT/quality_<model>.png`` (PSNR vs NFE).

    python bench/quality.py --quick --out /tmp/q          # smoke run, ~1 min on 2 CPU cores
    python bench/quality.py --train-nfes 10               # defaults at NFE 10: ~30 min of one core
    # split across processes (or machines), then one table:
    python bench/quality.py --models gmm-64 digits-exact --out runs/A &
    python bench/quality.py --models digits-fmot digits-vcs digits-eps --out runs/B
    python bench/quality.py --merge runs/A runs/B --out bench/results/DATE-cpu/quality
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

if not __package__:  # python bench/x.py: the repository root, not bench/, on sys.path
    import _path  # noqa: F401
import bespoke_fast as bf  # noqa: E402
from bench import peers_learned  # noqa: E402
from bench.harness import Counted, command_line, machine_info, write_results  # noqa: E402
from bench.peers import PEERS, peer_status  # noqa: E402
from bench.render import _order, quality_markdown  # noqa: E402
from bespoke_fast.fitting.bns import train_bns  # noqa: E402
from bespoke_fast.fitting.evaluation import mode_assigner  # noqa: E402
from bespoke_fast.fitting.evals import EvalLedger  # noqa: E402
from bespoke_fast.fitting.job import DEFAULT_BUDGET_EVALS, DEFAULT_NUM_TRAIN  # noqa: E402
from bespoke_fast.io import model_fingerprint  # noqa: E402
from bespoke_fast.metrics import mode_flip_fraction, rmse_psnr  # noqa: E402
from bespoke_fast.solvers.fixed import NFE_PER_STEP  # noqa: E402

EXACT_MODELS = ["gmm-64", "digits-exact"]
TRAINED_MODELS = ["digits-fmot", "digits-vcs", "digits-eps"]
# None: the trainer's own default (the numbers a user gets); 1,024 held-out noises (seed 1,
# disjoint from the training noises' seed 0); the default fit's training GT (DEFAULT_NUM_TRAIN)
# and budget (budget_evals None: DEFAULT_BUDGET_EVALS less the training GT's evaluations)
FULL = dict(nfes=[4, 6, 8, 10, 16, 20], num_train=DEFAULT_NUM_TRAIN, num_test=1024, num_val=None,
            iters=None, finetune_iters=None, train_batch=None, rtol=1e-5, bns_iters=None,
            bns_num_train=None, eval_only_num_test=1024, budget_seconds=None, budget_evals=None)
QUICK = dict(nfes=[4, 8], num_train=96, num_test=64, num_val=32, iters=8, finetune_iters=4,
             train_batch=32, rtol=1e-5, bns_iters=4, bns_num_train=64, eval_only_num_test=32,
             budget_seconds=3.0, budget_evals=None)
LEARNED_GRID = ["ld3-ipndm", "ld3-dpm++2m", "ld3-unipc", "gits-midpoint"]
BASES = ["euler", "midpoint", "heun", "rk4"]
DESCRIPTIONS = {
    "euler": "bespoke_fast.solve(method='euler'), uniform grid",
    "midpoint": "bespoke_fast.solve(method='midpoint'), uniform grid",
    "heun": "bespoke_fast.solve(method='heun'), uniform grid",
    "rk4": "bespoke_fast.solve(method='rk4') (classic RK4), uniform grid",
    "bespoke-rk1": "bespoke_fast.train(base='rk1', n_steps=NFE): learned scale-time Euler",
    "bespoke-rk2": "bespoke_fast.train(base='rk2', n_steps=NFE/2): learned scale-time midpoint",
    "bns": "bespoke_fast.fitting.bns.train_bns(n_steps=NFE): non-stationary, started from a "
           "Bespoke RK2 solver fitted first with half of the budget (the trainer's default)",
    "ld3-ipndm": "iPNDM on a learned time grid (LD3-style fit, bench/peers_learned.py)",
    "ld3-dpm++2m": "DPM-Solver++(2M), FM-OT data prediction, learned time grid (LD3-style fit)",
    "ld3-unipc": "UniPC bh2 order 2, FM-OT data prediction, learned time grid (LD3-style fit)",
    "gits-midpoint": "midpoint on a GITS-style DP-optimised grid (one-step local errors on GT)",
    **{name: peer.description for name, peer in PEERS.items()},
}


def default_out() -> str:
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    return os.path.join("bench", "results", f"{datetime.date.today().isoformat()}-{tag}")


# ----------------------------------------------------------------------------- models and GT
def load_models(names, notes):
    """``[(name, ZooModel)]``; a trained model whose weights are not installed is skipped with a
    note."""
    out = []
    for name in names:
        try:
            out.append((name, bf.zoo.load(name)))
        except Exception as e:
            notes.append({"kind": "note", "model": name,
                          "text": f"{name} skipped: cannot load it ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); trained weights "
                                  f"live in bespoke_fast/zoo/weights/"})
    return out


def get_gt(name, zm, args, device):
    """(train, test, gt record): GT generated once into the cache, reused while the model's
    fingerprint and the settings match. Training GT uses noise seed ``args.seed``, the held-out
    test GT seed ``args.seed + 1``: disjoint noises."""
    eval_only = name in args.eval_only
    num_train = 0 if eval_only else args.num_train
    num_test = args.eval_only_num_test if eval_only else args.num_test
    want = model_fingerprint(zm.model)
    t0 = time.perf_counter()
    train, train_manifest, _ = (_gt_set(name, zm, args, device, num_train, args.seed, want)
                                if num_train else (None, None, None))
    test, manifest, d = _gt_set(name, zm, args, device, num_test, args.seed + 1, want)
    # what the training GT cost, as `fit` counts it (solves, knots and the accuracy check)
    train_gt_evals = (int(train_manifest["nfe"]["total"]) + int(
        (train_manifest.get("interpolation") or {}).get("evaluations", 0)) if train_manifest else 0)
    wall = time.perf_counter() - t0
    rec = {"kind": "gt", "model": name, "num_train": len(train) if train is not None else 0,
           "num_test": len(test), "eval_only": eval_only,
           "rtol": args.rtol, "atol": args.rtol, "seed": args.seed, "test_seed": args.seed + 1,
           "cache_dir": d, "nfe_per_trajectory": manifest["nfe"]["per_trajectory"],
           "train_gt_evaluations": train_gt_evals,
           "interpolation": manifest.get("interpolation"), "model_hash": want,
           "wall_seconds_this_run": wall, "shape": list(zm.shape), "data_range": zm.data_range}
    return train, test, rec


def _gt_set(name, zm, args, device, total, seed, want):
    d = os.path.join(args.cache, "gt", f"{name}-n{total}-rtol{args.rtol:g}-seed{seed}")
    man_path = os.path.join(d, "manifest.json")
    if os.path.isfile(man_path):
        try:
            with open(man_path, encoding="utf-8") as f:
                have = json.load(f).get("model", {}).get("hash")
        except (OSError, json.JSONDecodeError):
            have = None
        if have != want:
            print(f"[{name}] cached GT was made with another model (hash {have} != {want}): "
                  f"regenerating", flush=True)
            shutil.rmtree(d)
    manifest = bf.generate_trajectories(zm.model, total, zm.shape, d, seed=seed,
                                        rtol=args.rtol, atol=args.rtol, batch_size=256,
                                        model_name=name, data_range=zm.data_range,
                                        progress=args.progress, device=device,
                                        measure_interpolation=8)
    return bf.load_trajectories(d, device=device), manifest, d


# ----------------------------------------------------------------------------- scoring
def score(model, fn, test, data_range, assign=None):
    """Run ``fn(counted_model, x0)`` on the held-out noises; RMSE/PSNR (95% bootstrap intervals)
    vs the GT endpoints, mode flips (``assign``), model calls per sample and wall time."""
    c = Counted(model)
    x0 = test.x0
    t0 = time.perf_counter()
    with torch.no_grad():
        y = fn(c, x0)
    wall = time.perf_counter() - t0
    m = rmse_psnr(y.float(), test.x1, data_range, intervals=True)
    finite = bool(torch.isfinite(y).all())
    out = {**m, "nfe_measured": c.rows / x0.shape[0], "wall_seconds": wall, "finite": finite}
    if not finite:
        out.update(psnr=float("nan"), psnr_set=float("nan"))
    if assign is not None and finite:
        out["mode_flips"] = mode_flip_fraction(y.float(), test.x1, assign)
    return out


def _given(args, **names):
    """The bench options that were set (not None), under the trainer's argument names."""
    return {k: getattr(args, v) for k, v in names.items() if getattr(args, v) is not None}


def fit_budget(args, gt_record) -> int:
    """The trainers' budget in forward-equivalents: ``--budget-evals``, or what the default
    ``bespoke-fast fit`` leaves its trainer (its whole budget less the training GT's cost)."""
    if args.budget_evals is not None:
        return args.budget_evals
    return max(1, DEFAULT_BUDGET_EVALS - gt_record["train_gt_evaluations"])


def _fitting_code() -> str:
    """A short hash of the code that fits solvers (``bespoke_fast/fitting``, the peers): a
    cached solver fitted by other code is never reused."""
    h = hashlib.sha256()
    for path in sorted(Path(bf.__file__).parent.joinpath("fitting").glob("*.py")) + [
            Path(peers_learned.__file__)]:
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def trained_solver(kind, base, n, name, zm, train, args, cache_tag, budget_evals):
    """Train (or load from the cache) one solver; returns (solver, train record).

    ``kind``: bespoke, bns, ld3 (``base`` = the classical method) or gits. Options left at None
    take the trainers' defaults; ours spend ``budget_evals`` forward-equivalents; the LD3 peers
    validate on the same last fifth of the training trajectories as ours (at most 256) and train
    on the rest (at most ``--bns-num-train``), with their own defaults. The record's
    ``evaluations`` is the fit's exact cost in forward-equivalents."""
    stop = _given(args, budget_seconds="budget_seconds")
    key = f"{kind}-{base}-n{n}-N{len(train)}-s{args.seed}-b{budget_evals}-{_fitting_code()}-" + "-".join(
        f"{k}{getattr(args, k)}" for k in ("iters", "finetune_iters", "train_batch", "num_val",
                                             "bns_iters", "bns_num_train", "budget_seconds"))
    d = os.path.join(args.cache, "solvers", f"{name}-{cache_tag}")
    path = os.path.join(d, key + ".pt")
    if not args.no_solver_cache and os.path.isfile(path):
        try:
            solver, rec = torch.load(path, weights_only=False)
            rec["cached"] = True
            return solver, rec
        except Exception as e:  # stale or invalid file: retrain
            print(f"[{name}] cached solver {path} unusable ({e}); retraining", flush=True)
    common = dict(seed=args.seed, model_name=name, progress=args.progress,
                  budget_evals=budget_evals, **stop)
    ledger = EvalLedger()               # the peers' cost (ours count their own)
    if kind == "bespoke":
        solver, report = bf.train(zm.model, train, base=base, n_steps=n, **common, **_given(
            args, iters="iters", finetune_iters="finetune_iters", batch_size="train_batch",
            val="num_val"))
    elif kind == "bns":
        solver, report = train_bns(zm.model, train, n_steps=n, **common, **_given(
            args, iters="bns_iters", num_train="bns_num_train", val="num_val"))
    elif kind == "ld3":
        pool, val = train.split(args.num_val or min(256, max(1, len(train) // 5)))
        pairs = pool.subset(range(min(args.bns_num_train or len(pool), len(pool))))
        solver, report = peers_learned.fit_ld3(ledger.wrap(zm.model), base, n, pairs, val,
                                               seed=args.seed, **stop)
    else:  # gits
        solver, report = peers_learned.fit_gits_midpoint(ledger.wrap(zm.model), n, train,
                                                         seed=args.seed)
    spent = (report.get("evaluations") or {}).get("total", {}).get("forward_equivalent")
    best = report.get("best") or {}
    cfg = report.get("config", {})
    rec = {"kind": kind, "base": base, "optimizer": cfg.get("optimizer"),
           "iterations": report.get("iterations"), "stop_reason": report.get("stop_reason"),
           "switched_to_adam_at": report.get("switched_to_adam_at"),
           "num_train": cfg.get("num_train"), "num_val": cfg.get("num_val"),
           "budget_seconds": cfg.get("budget_seconds", stop.get("budget_seconds")),
           "wall_seconds": report.get("wall_seconds"),
           "val_psnr": best.get("psnr"), "val_rmse": best.get("rmse"),
           "evaluations": int(spent if spent is not None else ledger.equivalent()),
           "budget_evals": budget_evals if kind in ("bespoke", "bns") else None,
           "num_parameters": getattr(solver, "num_parameters", None), "cached": False}
    os.makedirs(d, exist_ok=True)
    torch.save((solver, rec), path)
    return solver, rec


# ----------------------------------------------------------------------------- one model
def run_model(name, zm, args, device, machine, records, flush):
    model = zm.model.to(device)
    print(f"[{name}] ground truth ...", flush=True)
    train, test, grec = get_gt(name, zm, args, device)
    grec.update(machine=machine, git_commit=machine["git_commit"])
    records.append(grec)
    print(f"[{name}] GT: {grec['nfe_per_trajectory']:.0f} NFE/trajectory, "
          f"{grec['wall_seconds_this_run']:.1f} s", flush=True)
    R = zm.data_range
    assign = mode_assigner(model, name)
    base = dict(model=name, machine=machine, git_commit=machine["git_commit"], kind="result",
                device=str(device), num_test=len(test))
    peers = {}
    for p in args.peers:
        ok, why = peer_status(PEERS[p].package)
        peers[p] = ok
        if not ok and not any(r.get("text", "").startswith(f"{p}:") for r in records):
            records.append({"kind": "note", "model": None, "text": f"{p}: skipped, {why}"})
    cache_tag = grec["model_hash"] or "nohash"
    if train is None and args.trained:
        records.append({"kind": "note", "model": name,
                        "text": f"evaluation only (no trained solvers) for {name} (--eval-only); "
                                f"{len(test)} held-out trajectories. Pass --eval-only with no "
                                f"names for the full protocol."})

    def add(solver, library, nfe, res, **extra):
        rec = dict(base, solver=solver, library=library, description=DESCRIPTIONS.get(solver, ""),
                   nfe=nfe, **res, **extra)
        records.append(rec)
        flag = "" if abs(rec["nfe_measured"] - nfe) < 1e-9 else f"  (!! {rec['nfe_measured']:g} calls)"
        print(f"[{name}] NFE {nfe:3d} {solver:24s} PSNR {res['psnr']:7.2f} dB  "
              f"RMSE {res['rmse']:.3e}  {res['wall_seconds']:.2f} s{flag}", flush=True)

    for nfe in args.nfes:
        for m in BASES:
            per = NFE_PER_STEP[m]
            if nfe % per:
                continue
            add(m, "bespoke_fast", nfe,
                score(model, lambda c, x, m=m, k=nfe // per: bf.solve(c, x, m, n_steps=k), test, R, assign))
        for p in args.peers:
            peer = PEERS[p]
            if not peers[p] or nfe % peer.per_step:
                continue
            try:
                add(p, peer.package, nfe,
                    score(model, lambda c, x, peer=peer: peer.run(c, x, nfe), test, R, assign))
            except Exception as e:  # a peer API change must not kill the run
                records.append({"kind": "note", "model": name,
                                "text": f"{p} at NFE {nfe} failed: {type(e).__name__}: {e}"})
                print(f"[{name}] {p} failed: {e}", flush=True)
        for kind in (args.trained if train is not None and nfe in args.train_nfes else []):
            if kind in ("bns", "gits-midpoint", "bespoke-rk2") and nfe % 2:
                continue  # BNS starts from midpoint; midpoint and rk2 use 2 NFE per step
            if kind == "bns":
                k, b, n = "bns", "midpoint", nfe
            elif kind.startswith("bespoke-"):
                b = kind.split("-")[1]
                k, n = "bespoke", nfe if b == "rk1" else nfe // 2
            elif kind == "gits-midpoint":
                k, b, n = "gits", "midpoint", nfe
            else:
                k, b, n = "ld3", kind.split("-", 1)[1], nfe
            label = kind
            t0 = time.perf_counter()
            try:
                solver, trec = trained_solver(k, b, n, name, zm, train, args, cache_tag,
                                              fit_budget(args, grec))
            except Exception as e:
                records.append({"kind": "note", "model": name,
                                "text": f"{label} at NFE {nfe}: training failed: "
                                        f"{type(e).__name__}: {e}"})
                print(f"[{name}] {label} NFE {nfe} training failed: {e}", flush=True)
                continue
            print(f"[{name}] trained {label} NFE {nfe} in {time.perf_counter() - t0:.1f} s"
                  f"{' (cached)' if trec.get('cached') else ''}", flush=True)
            add(label, "bespoke_fast" if k in ("bespoke", "bns") else "bench/peers_learned", nfe,
                score(model, lambda c, x, s=solver: s.sample(c, x), test, R, assign), train=trec)
        flush()
    return records


# ----------------------------------------------------------------------------- output
def plot(records, out_dir, name):
    """PSNR vs NFE, one line per solver: ours solid, trained thick, peers dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot skipped: matplotlib unavailable ({e})"
    rs = [r for r in records if r.get("kind") == "result" and r["model"] == name]
    if not rs:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.8))
    names = _order({r["solver"] for r in rs})
    colors = plt.cm.tab20.colors
    for i, s in enumerate(names):
        pts = sorted((r["nfe"], r["psnr"]) for r in rs if r["solver"] == s and math.isfinite(r["psnr"]))
        if not pts:
            continue
        trained = s.startswith(("bespoke", "bns"))
        peer = s in PEERS
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, label=s,
                lw=2.6 if trained else 1.2, ls="--" if peer else "-",
                color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20])
    ax.set_xticks(sorted({r["nfe"] for r in rs}))
    ax.set_xlabel("NFE")
    ax.set_ylabel("PSNR vs GT (dB)")
    ax.set_title(f"{name}: PSNR vs NFE (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path = os.path.join(out_dir, f"quality_{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def header(args):
    light = {k: getattr(args, k) for k in ("iters", "finetune_iters", "train_batch", "num_val",
                                           "bns_iters", "bns_num_train", "budget_seconds",
                                           "budget_evals")
             if getattr(args, k) is not None}
    return [f"* command: `{command_line()}`",
            f"* settings: NFEs {args.nfes} (trained solvers at {args.train_nfes}); GT "
            f"{args.num_test} held-out (noise seed {args.seed + 1}) + {args.num_train} training "
            f"trajectories (seed {args.seed}), rtol {args.rtol:g}; training: "
            + (f"LIGHT settings {light} (not the defaults), the rest the trainers' defaults"
               if light else "the default recipe of `bespoke-fast fit` (our fits spend "
               f"{DEFAULT_BUDGET_EVALS:,} forward-equivalent evaluations with their training GT)")
            + (f"; evaluation only (no training, {args.eval_only_num_test} held-out) for "
               f"{args.eval_only}" if args.eval_only else "")
            + f"; torch threads {torch.get_num_threads()}"
            + (" (QUICK smoke run: numbers are not meaningful)" if args.quick else ""),
            "* intervals: 95% percentile bootstrap over the held-out noises (2,000 resamples); "
            "mode flips: fraction of samples whose mixture component (gmm-64, digits-exact) or "
            "digits-classifier class (trained digits models) differs from the GT endpoint's; "
            "fit: wall seconds of the fit at 1 thread on a shared machine, and its exact model "
            "evaluations (forward-equivalents; the training GT's are in the GT line)"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default bench/results/<date>-cpu)")
    p.add_argument("--cache", default=os.path.join("bench", ".cache"),
                   help="GT and trained-solver cache (default: %(default)s; git-ignored)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: gmm-64 only, NFE 4 and 8, tiny GT, a few iterations")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"models (default {EXACT_MODELS + TRAINED_MODELS}; trained ones only if "
                        f"installed; quick: gmm-64)")
    p.add_argument("--nfes", type=int, nargs="+", default=None, help=f"default {FULL['nfes']}")
    p.add_argument("--num-train", type=int, default=None, help=f"default {FULL['num_train']}")
    p.add_argument("--num-test", type=int, default=None, help=f"default {FULL['num_test']}")
    p.add_argument("--num-val", type=int, default=None,
                   help=f"training trajectories held out for model selection (default: the trainer's)")
    p.add_argument("--iters", type=int, default=None,
                   help=f"bound-phase training iterations (default: the trainer's)")
    p.add_argument("--finetune-iters", type=int, default=None,
                   help=f"end-to-end fine-tune iterations (default: the trainer's)")
    p.add_argument("--train-batch", type=int, default=None, help=f"default {FULL['train_batch']}")
    p.add_argument("--rtol", type=float, default=None, help=f"GT tolerance (default {FULL['rtol']:g})")
    p.add_argument("--bns-iters", type=int, default=None,
                   help=f"BNS optimizer iterations (default: the trainer's)"
                        f"own default optimizer)")
    p.add_argument("--bns-num-train", type=int, default=None,
                   help="BNS (and LD3) training pairs (default: the BNS trainer's; LD3: all "
                        "that are not held out)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="an extra wall-time cap on each fit, in seconds (default: none)")
    p.add_argument("--budget-evals", type=int, default=None,
                   help=f"model evaluations each of our fits may spend, in forward-equivalents "
                        f"(default: what `bespoke-fast fit` leaves its trainer: "
                        f"{DEFAULT_BUDGET_EVALS:,} less the training GT's evaluations)")
    p.add_argument("--train-nfes", type=int, nargs="+", default=None,
                   help="NFEs at which solvers are trained (default: all of --nfes)")
    p.add_argument("--eval-only", nargs="*", default=None,
                   help="models run without trained solvers, on --eval-only-num-test held-out "
                        "trajectories (default: none)")
    p.add_argument("--eval-only-num-test", type=int, default=None,
                   help=f"held-out trajectories for eval-only models (default "
                        f"{FULL['eval_only_num_test']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS),
                   help="peer solvers (default: all)")
    kinds = ["bespoke-rk1", "bespoke-rk2", "bns"] + LEARNED_GRID
    p.add_argument("--trained", nargs="*", default=kinds, choices=kinds,
                   help="trained solvers and learned-grid peers (default: all)")
    p.add_argument("--no-solver-cache", action="store_true", help="always retrain")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="merge the results of runs split by model or by NFE across processes "
                        "or machines (each DIR holds a quality.json) into --out, and stop")
    p.add_argument("--device", default="cpu", help="device for models and solvers (default cpu)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared CPU, oversubscribed OpenMP "
                        "threads spin; 0 keeps torch's default)")
    args = p.parse_args(argv)
    d = QUICK if args.quick else FULL
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.models is None:
        args.models = ["gmm-64"] if args.quick else EXACT_MODELS + TRAINED_MODELS
    args.out = args.out or default_out()
    if args.eval_only is None:
        args.eval_only = []
    args.train_nfes = args.train_nfes or args.nfes
    if args.num_val is not None and args.num_val >= args.num_train:
        p.error("--num-val must be smaller than --num-train")
    return args


def merge(dirs, out):
    """Merge the records of runs split by model or by NFE (``dirs``, in order) into one table in
    ``out``, with the plots redrawn from the merged records. A model's GT must be the same in
    every run; an untrained row met twice must agree (it is kept once); a trained row met twice
    is refused (which fit would be the result?)."""
    records, gts, rows, head = [], {}, {}, []
    for d in dirs:
        path = os.path.join(d, "quality.json")
        if not os.path.isfile(path):
            raise SystemExit(f"quality.py --merge: {path} does not exist")
        with open(path, encoding="utf-8") as f:
            part = json.load(f)
        name = os.path.basename(os.path.normpath(d))           # no machine paths
        for r in part:
            if r.get("kind") == "gt":
                same = ("num_test", "num_train", "seed", "test_seed", "rtol", "model_hash")
                if r["model"] in gts:
                    if any(gts[r["model"]].get(k) != r.get(k) for k in same):
                        raise SystemExit(f"quality.py --merge: {name} has another GT for "
                                         f"{r['model']} than an earlier run")
                    continue
                gts[r["model"]] = r
            elif r.get("kind") == "result":
                key = (r["model"], r["solver"], r["nfe"])
                if key in rows:
                    if r.get("train") or rows[key].get("train"):
                        raise SystemExit(f"quality.py --merge: {name} fits {key[1]}@{key[2]} on "
                                         f"{key[0]} again; merge runs with disjoint fits")
                    if abs(rows[key]["psnr"] - r["psnr"]) > 1e-6:
                        raise SystemExit(f"quality.py --merge: {name} disagrees on {key[1]}@"
                                         f"{key[2]} for {key[0]} ({r['psnr']} vs "
                                         f"{rows[key]['psnr']})")
                    continue
                rows[key] = r
            records.append(r)
        with open(os.path.join(d, "quality.md"), encoding="utf-8") as f:
            top = f.read().split("\n## ")[0].splitlines()    # the header block, before any model
        for line in top:
            if line.startswith(("* command", "* settings")):
                line = re.sub(r"--out [^\s`]+", f"--out {name}", line[2:])     # no machine paths
                line = re.sub(r"; evaluation only \(no training, \d+ held-out\) for none", "",
                              line)                                        # older runs' wording
                head.append(f"* run {name}: {line}")
    with open(os.path.join(dirs[0], "quality.md"), encoding="utf-8") as f:
        top = f.read().split("\n## ")[0].splitlines()
    head += [line for line in top if line.startswith("* ")
             and not line.startswith(("* machine", "* command", "* settings", "* Each cell"))]
    head.append(f"* merged from {len(dirs)} runs (run side by side or one after the other on "
                f"this machine)")
    order = EXACT_MODELS + TRAINED_MODELS           # the bench's model order, others after
    records.sort(key=lambda r: order.index(r.get("model")) if r.get("model") in order
                 else len(order))
    write_results(out, "quality", records, quality_markdown(records, header_lines=head))
    for model in gts:
        plot(records, out, model)
    print(f"wrote {os.path.join(out, 'quality.json')} and quality.md", flush=True)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    machine = machine_info()
    records = []
    models = load_models(args.models, records)
    started = time.perf_counter()

    def flush():
        write_results(args.out, "quality", records, quality_markdown(records, header_lines=header(args)))

    for name, zm in models:
        t0 = time.perf_counter()
        run_model(name, zm, args, device, machine, records, flush)
        p = plot(records, args.out, name)
        if p and not str(p).endswith(".png"):
            records.append({"kind": "note", "model": name, "text": p})
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    records.append({"kind": "note", "model": None,
                    "text": f"total wall time {time.perf_counter() - started:.0f} s on {device}"})
    flush()
    print(f"wrote {os.path.join(args.out, 'quality.json')} and quality.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
