"""Train the bundled ``photo-32`` model: a small conv UNet (:class:`~bespoke_fast.zoo.nets.PhotoUNet`)
on random 32x32 crops of the photos bundled in scikit-learn and scikit-image (CPU, ~45 min).

    python -m bespoke_fast.zoo.train_photo [--iters N] [--seed S] [--out DIR] [--curve-dir DIR]

FM-OT flow matching, velocity prediction: ``x_t = t x1 + (1 - t) x0`` (noise x0 at t = 0, a crop x1
at t = 1), target ``x1 - x0``, ``t ~ U(0, 1)``, loss = mean squared error per pixel.

Data: :func:`bespoke_fast.zoo.photos.photo_split` (one photo held out whole, the right 20% of every
other photo held out, three scales), a fresh batch of random crops with random horizontal flips each
iteration. Optimisation like :mod:`bespoke_fast.zoo.train`: Adam, linear warm-up then cosine decay
to 0, gradient clipping at 1, EMA of the weights (the EMA weights are saved). Everything random
comes from ``torch.manual_seed(seed)`` (initialisation) and one ``torch.Generator`` seeded with
``seed`` (crops, flips, noise, times): the same seed and thread count on the same machine give
bit-identical weights.

Every ``--eval-every`` iterations the EMA net's flow-matching loss is measured with fixed noise
and times on fixed crop sets: train crops, held-out regions, and the held-out photo. The curve
(training loss per chunk and these evaluations) is written to ``<curve-dir>/training_curve.json``
(updated during training) and plotted to ``training_curve.png`` at the end.

Output: ``<out>/photo-32.safetensors`` (EMA weights, float32) and ``<out>/photo-32.json``
(metadata: path, net config, training stats, machine, sha256 of the weights file).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..io import atomic_write_text
from ..utils import count_params
from .nets import PhotoUNet
from .photos import HELDOUT_PHOTOS, fixed_crops, photo_split, random_crops
from .train import loadavg, machine_info, optimizer_step, training_parser, training_setup
from .._checks import InvalidArgumentError

__all__ = ["NAME", "NET_CONFIG", "DEFAULTS", "train_photo", "save_photo_model", "fm_loss",
           "eval_sets", "main"]

NAME = "photo-32"
NET_CONFIG = dict(channels=3, patch=2, width=24, depth_low=2, emb_dim=128, freq_dim=64,
                  time_scale=1000.0)
DEFAULTS = dict(iters=8000, batch_size=64, lr=1e-3, warmup=200, ema_decay=0.999, grad_clip=1.0,
                seed=0, eval_every=500, eval_n=512)
DEFAULT_OUT = Path(__file__).with_name("weights")
DEFAULT_CURVE_DIR = Path("bench/results/2026-12-04-cpu/photo-32")


def fm_loss(net, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """FM-OT loss ``mean((net(t x1 + (1 - t) x0, t) - (x1 - x0))^2)``; x1, x0 ``[B, 3, H, W]``, t ``[B]``."""
    tt = t.view(-1, 1, 1, 1)
    return (net(tt * x1 + (1.0 - tt) * x0, t) - (x1 - x0)).pow(2).mean()


def eval_sets(train_parts, heldout_parts, n: int = DEFAULTS["eval_n"]) -> dict:
    """Fixed crop sets ``{"train", "heldout_regions", "heldout_photo"}`` of ``n`` crops each."""
    photo = [p for p in heldout_parts if p[0].split("@")[0] in HELDOUT_PHOTOS]
    regions = [p for p in heldout_parts if p[0].split("@")[0] not in HELDOUT_PHOTOS]
    return {"train": fixed_crops(train_parts, n, 101),
            "heldout_regions": fixed_crops(regions, n, 102),
            "heldout_photo": fixed_crops(photo, n, 103)}


@torch.no_grad()
def eval_fm_loss(net, x1: torch.Tensor, seed: int = 0, repeats: int = 4, batch: int = 256) -> float:
    """Mean FM-OT loss of ``net`` on crops ``x1`` with fixed-seed noise and times (``repeats`` draws)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    tot, cnt = 0.0, 0
    for _ in range(repeats):
        x0 = torch.randn(x1.shape, generator=g)
        t = torch.rand(x1.shape[0], generator=g)
        for i in range(0, x1.shape[0], batch):
            b = slice(i, i + batch)
            tot += float(fm_loss(net, x1[b], x0[b], t[b])) * x1[b].shape[0]
            cnt += x1[b].shape[0]
    return tot / cnt


def _plot_curve(curve: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(curve["train_chunks"]["iter_end"], curve["train_chunks"]["loss"], lw=1, color="0.6",
            label=f"training batches (mean per {curve['train_chunks']['chunk']} iters)")
    ev = curve["evals"]
    for key, style in (("train", "o-"), ("heldout_regions", "s-"), ("heldout_photo", "^-")):
        ax.plot([e["iter"] for e in ev], [e[key] for e in ev], style, ms=3,
                label=f"EMA net, fixed {key.replace('_', ' ')} crops")
    ax.set_xlabel("iteration"), ax.set_ylabel("FM-OT loss (MSE per pixel)")
    ax.set_title(f"{NAME}: training curve (seed {curve['seed']}, batch {curve['batch_size']})", fontsize=9)
    lo = min(min(curve["train_chunks"]["loss"][1:] or [1.0]),
             min(e[k] for e in ev for k in ("train", "heldout_regions", "heldout_photo")))
    ax.set_ylim(lo * 0.95, lo * 2.2)
    ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_photo(iters: int = DEFAULTS["iters"], seed: int = DEFAULTS["seed"],
                batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
                warmup: int = DEFAULTS["warmup"], ema_decay: float = DEFAULTS["ema_decay"],
                grad_clip: float = DEFAULTS["grad_clip"], eval_every: int = DEFAULTS["eval_every"],
                eval_n: int = DEFAULTS["eval_n"], net_config: dict | None = None,
                curve_dir=None, log=print):
    """Train ``photo-32``; returns ``(ema_net, stats)`` (stats: hyper-parameters, curve, losses).

    ``ema_net`` is a float32 :class:`PhotoUNet` in eval mode holding the EMA weights. With
    ``curve_dir``, ``training_curve.json`` there is rewritten at every evaluation.
    """
    if iters < 1 or batch_size < 1 or eval_every < 1:
        raise InvalidArgumentError("iters, batch_size and eval_every must be >= 1")
    cfg = dict(NET_CONFIG if net_config is None else net_config)
    train_parts, heldout_parts = photo_split()
    sets = eval_sets(train_parts, heldout_parts, eval_n)

    net, ema, opt, sched, g, ema_params, net_params = training_setup(PhotoUNet, cfg, seed, lr,
                                                                    iters, warmup)

    chunk = max(1, min(100, iters // 20))
    curve = dict(name=NAME, seed=int(seed), batch_size=int(batch_size), iters=int(iters),
                 train_chunks=dict(chunk=chunk, iter_end=[], loss=[]), evals=[],
                 eval_sets={k: int(v.shape[0]) for k, v in sets.items()},
                 eval_protocol="EMA net, FM-OT loss with fixed noise and t (seed 10000), 4 draws per crop")
    curve_path = None if curve_dir is None else Path(curve_dir) / "training_curve.json"
    if curve_path is not None:
        curve_path.parent.mkdir(parents=True, exist_ok=True)

    def evaluate(it):
        ema.eval()
        row = {"iter": it, "wall_s": time.perf_counter() - t_start}
        row.update({k: eval_fm_loss(ema, v) for k, v in sets.items()})
        curve["evals"].append(row)
        log(f"iter {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "iter"))
        if curve_path is not None:
            atomic_write_text(curve_path, json.dumps(curve, indent=1) + "\n")

    losses = []
    load_start = loadavg()
    t_start = time.perf_counter()
    net.train()
    for it in range(iters):
        x1 = random_crops(train_parts, batch_size, g)
        x0 = torch.randn(x1.shape, generator=g)
        t = torch.rand(batch_size, generator=g)
        loss = fm_loss(net, x1, x0, t)
        losses.append(optimizer_step(loss, net, opt, sched, grad_clip, ema_params, net_params,
                                     ema_decay, it))
        if (it + 1) % chunk == 0 or it == iters - 1:
            start = (it // chunk) * chunk
            curve["train_chunks"]["iter_end"].append(it + 1)
            curve["train_chunks"]["loss"].append(sum(losses[start:]) / len(losses[start:]))
        if (it + 1) % eval_every == 0 or it == iters - 1:
            evaluate(it + 1)
    wall = time.perf_counter() - t_start
    ema.eval()
    k = max(1, iters // 10)
    last = curve["evals"][-1]
    stats = dict(name=NAME, path="fm-ot", prediction="velocity", time="flow",
                 iters=int(iters), seed=int(seed), batch_size=int(batch_size), lr=lr,
                 lr_schedule=f"linear warm-up {warmup} iters, cosine decay to 0",
                 optimizer="Adam(betas=(0.9, 0.999))", grad_clip=grad_clip, ema_decay=ema_decay,
                 t_sampling="t ~ U(0, 1)",
                 data="random 32x32 crops, random h-flip: bespoke_fast.zoo.photos.photo_split()",
                 train_parts=[p[0] for p in train_parts], heldout_parts=[p[0] for p in heldout_parts],
                 final_loss=sum(losses[-k:]) / k, wall_time_s=wall,
                 loadavg_1min_start_end=[load_start, loadavg()],
                 torch_threads=torch.get_num_threads(), net_config=cfg, params=count_params(ema),
                 flops_per_sample=ema.flops_per_sample(),
                 ema_loss_train=last["train"], ema_loss_heldout_regions=last["heldout_regions"],
                 ema_loss_heldout_photo=last["heldout_photo"], eval_protocol=curve["eval_protocol"])
    curve.update(wall_time_s=wall, final=stats["final_loss"], net_config=cfg, params=stats["params"])
    if curve_path is not None:
        atomic_write_text(curve_path, json.dumps(curve, indent=1) + "\n")
        try:
            _plot_curve(curve, curve_path.with_suffix(".png"))
        except ImportError:
            log("matplotlib missing: no training_curve.png")
    stats["curve_file"] = None if curve_path is None else str(curve_path)
    return ema, stats


def save_photo_model(net: PhotoUNet, stats: dict, out_dir=DEFAULT_OUT) -> Path:
    """Write ``<out>/photo-32.safetensors`` (float32) and ``<out>/photo-32.json``; returns the JSON path."""
    from safetensors.torch import save

    from ..io import atomic_write, sha256_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wpath = out / f"{NAME}.safetensors"
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(wpath, save(tensors, metadata={"name": NAME, "format": "bespoke_fast.zoo.nets.PhotoUNet"}))
    wpath.chmod(0o644)
    meta = {
        "name": NAME, "path": "fm-ot", "prediction": "velocity", "time": "flow",
        "adapter": 'as_velocity(net, prediction="velocity", path="fm-ot", time="flow")',
        "shape": [3, 32, 32],
        "net": {"class": "bespoke_fast.zoo.nets.PhotoUNet", "config": stats["net_config"]},
        "params": stats["params"], "flops_per_sample": stats["flops_per_sample"],
        "weights_file": wpath.name, "weights_bytes": wpath.stat().st_size,
        "sha256": sha256_file(wpath),
        "training": {k: v for k, v in stats.items()
                     if k not in ("name", "path", "prediction", "time", "net_config", "params",
                                  "flops_per_sample")},
        "machine": machine_info(),
        "regenerate": f"python -m bespoke_fast.zoo.train_photo --iters {stats['iters']} --seed {stats['seed']}",
        "description": "small conv UNet trained on 32x32 crops of the photos bundled in "
                       "scikit-learn / scikit-image, FM-OT velocity prediction",
    }
    jpath = out / f"{NAME}.json"
    atomic_write_text(jpath, json.dumps(meta, indent=2) + "\n")
    return jpath


def main(argv=None):
    ap = training_parser("python -m bespoke_fast.zoo.train_photo",
                         "Train the bundled photo-32 flow model (CPU).", DEFAULTS,
                         "initialisation, crops, noise and times", "crops")
    ap.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"],
                    help=f"iterations between held-out evaluations (default {DEFAULTS['eval_every']})")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="weights folder (default: bundled weights)")
    ap.add_argument("--curve-dir", default=str(DEFAULT_CURVE_DIR),
                    help=f"where training_curve.json/.png go (default {DEFAULT_CURVE_DIR})")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, stats = train_photo(iters=args.iters, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                             eval_every=args.eval_every, curve_dir=args.curve_dir,
                             log=lambda line: print(line, flush=True))
    jpath = save_photo_model(net, stats, args.out)
    print(f"{NAME}: {stats['params']} params, final loss {stats['final_loss']:.4f}, held-out "
          f"regions {stats['ema_loss_heldout_regions']:.4f}, held-out photo "
          f"{stats['ema_loss_heldout_photo']:.4f}, train wall {stats['wall_time_s']:.1f} s -> {jpath}",
          flush=True)


if __name__ == "__main__":
    main()
