#!/usr/bin/env python
"""Evidence that ``photo-32`` learned its photos, independent of the flow-matching loss.

From the same ``--num`` noises (seed ``--seed``) it draws samples with the adaptive Dormand-Prince
solver (``--rtol``; the accurate flow) and with midpoint@20, and compares them, plus pure N(0, 1)
noise and random *training* crops (real vs real: the floor a perfect model could reach), with
``--num`` random crops of the held-out photo and regions (:func:`bespoke_fast.zoo.photos.photo_split`):

* the radially averaged power spectrum (``spectrum_db_rms``: RMS over the 16 rings of the dB
  difference; ``spectrum_db_high``: mean dB difference over rings 9-16, negative = less fine
  detail than the real crops),
* per-channel mean and std (``channel_l2``: distance of the 6-vectors),

all from :mod:`bespoke_fast.zoo.photo_stats`. Writes to ``--out``: ``evidence.json``,
``evidence.md`` (the table), ``samples_vs_heldout.png`` (64 samples beside 64 held-out crops,
captioned) and ``spectra.png``.

    python bench/photo32_evidence.py --out bench/results/2026-12-04-cpu/photo-32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

if not __package__:  # python bench/x.py: the repository root, not bench/, on sys.path
    import _path  # noqa: F401

from bespoke_fast import zoo  # noqa: E402
from bespoke_fast.io import atomic_write_text  # noqa: E402
from bespoke_fast.solvers.adaptive import solve_adaptive  # noqa: E402
from bespoke_fast.solvers.fixed import solve  # noqa: E402
from bespoke_fast.zoo.photo_stats import compare  # noqa: E402
from bespoke_fast.zoo.photos import fixed_crops, photo_split  # noqa: E402


def _mosaic(x, nrow=8, pad=2):
    n, c, h, w = x.shape
    ncol = (n + nrow - 1) // nrow
    out = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, nrow)
        out[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    return out


def _grid(path, panels, title, caption):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 5.3))
    for ax, (label, x) in zip(axes, panels):
        ax.imshow(_mosaic((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.text(0.5, 0.02, caption, ha="center", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spectra(path, rows, ref):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.loglog(ref["rings"], ref["spectrum_b"], "k-", lw=2.5, label="held-out real crops")
    for name, d in rows.items():
        ax.loglog(d["rings"], d["spectrum_a"], "o-", ms=3, label=name)
    ax.set_xlabel("spatial frequency (cycles per 32 px)"), ax.set_ylabel("mean power per ring")
    ax.set_title("photo-32: radially averaged power spectrum", fontsize=10)
    ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=512, help="samples and crops per set (default 512)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    ap.add_argument("--rtol", type=float, default=1e-5, help="adaptive solver tolerance (default 1e-5)")
    ap.add_argument("--batch-size", type=int, default=128, help="samples per solver call (default 128)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    zm = zoo.load("photo-32")
    train_parts, heldout_parts = photo_split()
    heldout = fixed_crops(heldout_parts, args.num, 1000 + args.seed)
    train = fixed_crops(train_parts, args.num, 2000 + args.seed)
    x0 = torch.randn(args.num, *zm.shape, generator=torch.Generator().manual_seed(args.seed))

    adaptive, midpoint, nfes = [], [], []
    with torch.no_grad():
        for i in range(0, args.num, args.batch_size):
            xb = x0[i:i + args.batch_size]
            states, st = solve_adaptive(zm.model, xb, [0.0, 1.0], rtol=args.rtol, atol=args.rtol,
                                        return_stats=True)
            adaptive.append(states[-1])
            nfes.append(st["nfe"])
            midpoint.append(solve(zm.model, xb, "midpoint", n_steps=10))
    adaptive, midpoint = torch.cat(adaptive), torch.cat(midpoint)
    sample_s = time.perf_counter() - t0

    sets = {f"samples, adaptive RK45 (rtol {args.rtol:g})": adaptive,
            "samples, midpoint@20": midpoint,
            "pure noise N(0, 1)": x0,
            "real training crops (floor)": train}
    rows = {name: compare(x, heldout) for name, x in sets.items()}
    ref = next(iter(rows.values()))
    from bespoke_fast.zoo.trained import load_meta
    meta = load_meta("photo-32")
    result = {
        "model": "photo-32", "weights_sha256": meta.get("sha256"), "num": args.num,
        "seed": args.seed, "rtol": args.rtol, "adaptive_nfe_per_batch": nfes,
        "reference": f"{args.num} random crops of the held-out photo and regions "
                     f"(fixed_crops(heldout_parts, {args.num}, {1000 + args.seed}))",
        "heldout_stats": ref["stats_b"],
        "rows": {k: {kk: v for kk, v in d.items() if kk != "spectrum_b"} for k, d in rows.items()},
        "wall_s": time.perf_counter() - t0, "sampling_wall_s": sample_s,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_1min": os.getloadavg()[0], "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    atomic_write_text(args.out / "evidence.json", json.dumps(result, indent=1) + "\n")

    def fmt(v):
        return "(" + ", ".join(f"{x:+.3f}" for x in v) + ")"
    lines = [f"# photo-32: samples against held-out crops ({args.num} each)", "",
             f"Reference: {result['reference']}; mean RGB {fmt(ref['stats_b']['mean'])}, std RGB "
             f"{fmt(ref['stats_b']['std'])}. Same noises (seed {args.seed}) for both solvers; "
             f"adaptive NFE per batch of {args.batch_size}: {nfes}. "
             f"Spectrum: radially averaged power of mean-removed images, rings 1-16; "
             f"dB RMS over rings, 'high' = mean dB difference over rings 9-16 "
             f"(negative: less fine detail). Channel L2: distance of (mean RGB, std RGB).", "",
             "| set | spectrum dB RMS | high-freq dB | channel L2 | mean RGB | std RGB |",
             "|---|---:|---:|---:|---|---|"]
    for name, d in rows.items():
        lines.append(f"| {name} | {d['spectrum_db_rms']:.2f} | {d['spectrum_db_high']:+.2f} | "
                     f"{d['channel_l2']:.3f} | {fmt(d['stats_a']['mean'])} | {fmt(d['stats_a']['std'])} |")
    lines += ["", f"Machine: {os.cpu_count()}-core CPU, 1 thread, load ~{result['machine']['loadavg_1min']:.1f}; "
              f"wall {result['wall_s']:.0f} s. `python bench/photo32_evidence.py --out {args.out}`", ""]
    atomic_write_text(args.out / "evidence.md", "\n".join(lines))
    try:
        n = min(64, args.num)
        _grid(args.out / "samples_vs_heldout.png",
              [("photo-32 samples, adaptive RK45", adaptive[:n]), ("photo-32 samples, midpoint@20", midpoint[:n]),
               ("real held-out crops", heldout[:n])],
              "photo-32 (3x32x32, FM-OT conv UNet trained on 32x32 crops of 6 bundled photos)",
              f"Left and middle: the same {n} noises solved adaptively and with midpoint@20. Right: "
              f"{n} random crops (3 scales, flips) of the held-out coffee photo and the held-out right "
              f"20% of the other photos, never seen in training.")
        _spectra(args.out / "spectra.png", rows, ref)
    except ImportError:
        print("matplotlib missing: no figures", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
