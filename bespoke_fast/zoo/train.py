"""Train the bundled digits flow models (small residual MLPs on the 8x8 sklearn digits, CPU, minutes).

    python -m bespoke_fast.zoo.train --name digits-fmot [--iters N] [--seed S] [--out DIR]
    python -m bespoke_fast.zoo.train --all

Models (noise at t = 0, data at t = 1; ``x_t = alpha_t x1 + sigma_t x0``, method.md section 1):

* ``digits-fmot``: FM-OT path, velocity prediction, target ``x1 - x0``, t ~ U(0, 1).
* ``digits-vcs``:  cosine path, velocity prediction, target ``alpha' x1 + sigma' x0``, t ~ U(0, 1).
* ``digits-eps``:  eps-VP path, noise prediction (target ``x0``); the net takes DIFFUSION time
  ``s = 1 - t`` with ``s ~ U(1e-3, 1 - 1e-3)`` (the range ``as_velocity`` clamps to).

Training: the train part of :func:`bespoke_fast.zoo.quality.digits_split` (1497 images; the 300
held-out ones are the quality report's reference), batches drawn epoch by epoch from a seeded
permutation, Adam with linear warm-up and cosine decay to 0, gradient clipping at 1, EMA of the
weights (the EMA weights are saved). Everything random comes from ``torch.manual_seed(seed)``
(initialisation) and one ``torch.Generator`` seeded with ``seed`` (data order, noise, times): the
same seed and thread count on the same machine give bit-identical weights.

Output: ``<out>/<name>.safetensors`` (EMA weights, float32) and ``<out>/<name>.json`` (metadata:
paths, net config, training stats, machine, sha256 of the weights file, quality report).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from ..io import atomic_write, atomic_write_text, sha256_file
from ..models import GaussianPath
from ..utils import count_params
from .nets import DigitsMLP
from .._checks import InvalidArgumentError

__all__ = ["MODELS", "NET_CONFIG", "DEFAULTS", "train_model", "save_model", "update_quality",
           "machine_info", "main"]

MODELS = {
    "digits-fmot": dict(path="fm-ot", prediction="velocity", time="flow"),
    "digits-vcs": dict(path="cosine", prediction="velocity", time="flow"),
    "digits-eps": dict(path="vp", prediction="eps", time="diffusion"),
}
NET_CONFIG = dict(pixels=64, hidden=256, depth=2, emb_dim=64, freq_dim=64, time_scale=1000.0)
DEFAULTS = dict(iters=8000, batch_size=128, lr=2e-3, warmup=200, ema_decay=0.998, grad_clip=1.0,
                seed=0, t_eps=1e-3)
DEFAULT_OUT = Path(__file__).with_name("weights")


def loadavg():
    try:
        import os
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def lr_factor(it: int, iters: int, warmup: int) -> float:
    if it < warmup:
        return (it + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / max(1, iters - warmup)))


def training_setup(net_class, cfg: dict, seed: int, lr: float, iters: int, warmup: int):
    """The seeded start of a zoo network's training: ``(net, ema, opt, sched, g, ema_params,
    net_params)``; ``net`` initialised under ``torch.manual_seed(seed)``, ``ema`` a frozen copy,
    Adam with the warm-up + cosine factor :func:`lr_factor`, ``g`` the data generator."""
    torch.manual_seed(seed)
    net = net_class(**cfg)
    ema = net_class(**cfg)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(it, iters, warmup))
    g = torch.Generator().manual_seed(seed)
    return net, ema, opt, sched, g, list(ema.parameters()), list(net.parameters())


def optimizer_step(loss, net, opt, sched, grad_clip, ema_params, net_params, ema_decay: float,
                   it: int) -> float:
    """One training step of a zoo network: backward, gradient clip (``grad_clip`` > 0), Adam and
    learning-rate steps, then the EMA update (decay warmed up as ``(1 + it) / (10 + it)``, capped
    at ``ema_decay``). Returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    sched.step()
    d = min(ema_decay, (1.0 + it) / (10.0 + it))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, net_params, 1.0 - d)
    return float(loss.detach())


def _pair(spec: dict, path: GaussianPath, x1: torch.Tensor, x0: torch.Tensor, u: torch.Tensor,
          t_eps: float):
    """``(x_t, t_net, target)`` for data x1 [B,...], noise x0 and uniforms u [B] in [0, 1)."""
    if spec["prediction"] == "velocity":
        t = u
        a, s = path.alpha(t), path.sigma(t)
        da, ds = path.d_alpha(t), path.d_sigma(t)
        v = lambda c: c.view(-1, 1, 1, 1)  # noqa: E731
        return v(a) * x1 + v(s) * x0, t, v(da) * x1 + v(ds) * x0
    # eps prediction, diffusion time s_diff = 1 - t in [t_eps, 1 - t_eps]
    s_diff = t_eps + (1.0 - 2.0 * t_eps) * u
    t = 1.0 - s_diff
    a, s = path.alpha(t).view(-1, 1, 1, 1), path.sigma(t).view(-1, 1, 1, 1)
    return a * x1 + s * x0, s_diff, x0


def _loss_fn(net, spec, path, x1, x0, u, t_eps):
    xt, t_net, target = _pair(spec, path, x1, x0, u, t_eps)
    return (net(xt, t_net) - target).pow(2).mean()


@torch.no_grad()
def _eval_loss(net, spec, path, x1, seed: int, t_eps: float, repeats: int = 8) -> float:
    """Mean training loss of ``net`` on ``x1`` with fixed-seed noise and times (repeats draws)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    tot = 0.0
    for _ in range(repeats):
        x0 = torch.randn(x1.shape, generator=g)
        u = torch.rand(x1.shape[0], generator=g)
        tot += float(_loss_fn(net, spec, path, x1, x0, u, t_eps))
    return tot / repeats


def train_model(name: str, iters: int = DEFAULTS["iters"], seed: int = DEFAULTS["seed"],
                batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
                warmup: int = DEFAULTS["warmup"], ema_decay: float = DEFAULTS["ema_decay"],
                grad_clip: float = DEFAULTS["grad_clip"], net_config: dict | None = None,
                progress: bool = True, eval_loss: bool = True):
    """Train one model; returns ``(ema_net, stats)``.

    ``ema_net`` is a float32 :class:`DigitsMLP` in eval mode holding the EMA weights. ``stats``: the
    hyper-parameters, ``final_loss`` (mean training loss of the last 10% iterations),
    ``loss_curve`` (mean loss per 1/20 of the run), ``wall_time_s`` (the training loop only),
    and, with ``eval_loss``, the EMA net's fixed-seed loss on the train and held-out splits.
    """
    if name not in MODELS:
        raise InvalidArgumentError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if iters < 1 or batch_size < 1:
        raise InvalidArgumentError("iters and batch_size must be >= 1")
    from .quality import digits_split

    spec = MODELS[name]
    path = GaussianPath(spec["path"])
    t_eps = DEFAULTS["t_eps"]
    cfg = dict(NET_CONFIG if net_config is None else net_config)
    xtr, _, xte, _ = digits_split()
    N = xtr.shape[0]

    net, ema, opt, sched, g, ema_params, net_params = training_setup(DigitsMLP, cfg, seed, lr,
                                                                    iters, warmup)

    losses = []
    perm, pos = torch.randperm(N, generator=g), 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=iters, desc=name, dynamic_ncols=True)
    load_start = loadavg()
    t_start = time.perf_counter()
    for it in range(iters):
        if pos + batch_size > N:
            perm, pos = torch.randperm(N, generator=g), 0
        idx = perm[pos:pos + batch_size] if batch_size <= N else torch.randint(N, (batch_size,), generator=g)
        pos += batch_size
        x1 = xtr[idx]
        x0 = torch.randn(x1.shape, generator=g)
        u = torch.rand(x1.shape[0], generator=g)
        loss = _loss_fn(net, spec, path, x1, x0, u, t_eps)
        losses.append(optimizer_step(loss, net, opt, sched, grad_clip, ema_params, net_params,
                                     ema_decay, it))
        if bar is not None:
            bar.update(1)
            if it % 25 == 0 or it == iters - 1:
                bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    wall = time.perf_counter() - t_start
    if bar is not None:
        bar.close()
    ema.eval()
    k = max(1, iters // 10)
    chunks = max(1, min(20, iters))
    step = iters / chunks
    curve = [sum(losses[int(i * step):int((i + 1) * step)]) / max(1, int((i + 1) * step) - int(i * step))
             for i in range(chunks)]
    stats = dict(name=name, **spec, iters=int(iters), seed=int(seed), batch_size=int(batch_size),
                 lr=lr, lr_schedule=f"linear warm-up {warmup} iters, cosine decay to 0",
                 optimizer="Adam(betas=(0.9, 0.999))", grad_clip=grad_clip, ema_decay=ema_decay,
                 t_sampling=("t ~ U(0, 1)" if spec["prediction"] == "velocity"
                             else f"diffusion time ~ U({t_eps}, {1 - t_eps})"),
                 n_train=int(N), split="bespoke_fast.zoo.quality.digits_split(seed=0)",
                 final_loss=sum(losses[-k:]) / k, loss_curve=curve, wall_time_s=wall,
                 loadavg_1min_start_end=[load_start, loadavg()],
                 torch_threads=torch.get_num_threads(), net_config=cfg,
                 params=count_params(ema), flops_per_sample=ema.flops_per_sample())
    if eval_loss:
        stats["ema_loss_train"] = _eval_loss(ema, spec, path, xtr, seed, t_eps)
        stats["ema_loss_heldout"] = _eval_loss(ema, spec, path, xte, seed, t_eps)
    return ema, stats


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os
    return dict(cpu=cpu, cpu_count=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version(), platform=platform.platform())


def save_model(net: DigitsMLP, stats: dict, out_dir=DEFAULT_OUT, quality: dict | None = None) -> Path:
    """Write ``<out>/<name>.safetensors`` (float32) and ``<out>/<name>.json``; returns the JSON path."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = stats["name"]
    wpath = out / f"{name}.safetensors"
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(wpath, save(tensors, metadata={"name": name, "format": "bespoke_fast.zoo.nets.DigitsMLP"}))
    wpath.chmod(0o644)  # the temp file is 0600; the file ships with the package
    meta = {
        "name": name,
        "path": stats["path"],
        "prediction": stats["prediction"],
        "time": stats["time"],
        "adapter": (f'as_velocity(net, prediction="{stats["prediction"]}", path="{stats["path"]}", '
                    f'time="{stats["time"]}")'),
        "net": {"class": "bespoke_fast.zoo.nets.DigitsMLP", "config": stats["net_config"]},
        "params": stats["params"],
        "flops_per_sample": stats["flops_per_sample"],
        "weights_file": wpath.name,
        "weights_bytes": wpath.stat().st_size,
        "sha256": sha256_file(wpath),
        "training": {k: v for k, v in stats.items()
                     if k not in ("name", "path", "prediction", "time", "net_config", "params",
                                  "flops_per_sample")},
        "machine": machine_info(),
        "regenerate": f"python -m bespoke_fast.zoo.train --name {name} --iters {stats['iters']} "
                      f"--seed {stats['seed']}",
        "quality": quality,
    }
    jpath = out / f"{name}.json"
    atomic_write_text(jpath, json.dumps(meta, indent=2) + "\n")
    return jpath


def update_quality(name: str, out_dir=DEFAULT_OUT, n: int = 1000, grid_dir=None) -> dict:
    """Recompute the quality report of saved weights (sha256-checked, weights untouched) and store
    it under ``"quality"`` in ``<out>/<name>.json``; optionally save ``<grid_dir>/zoo_<name>.png``."""
    from .quality import quality_report
    from .trained import load_trained

    model, meta = load_trained(name, weights_dir=out_dir)
    grid = None if grid_dir is None else Path(grid_dir) / f"zoo_{name}.png"
    t0 = time.perf_counter()
    rep = quality_report(model, n=n, seed=0, grid_path=grid)
    rep["report_wall_time_s"] = time.perf_counter() - t0
    rep["torch_threads"] = torch.get_num_threads()
    meta["quality"] = rep
    atomic_write_text(Path(out_dir) / f"{name}.json", json.dumps(meta, indent=2) + "\n")
    return rep


def training_parser(prog: str, description: str, defaults: dict, seeded: str, batch: str):
    """The options every zoo training script shares (iterations, seed, batch, learning rate,
    threads), with ``defaults``' values; ``seeded`` says what the seed draws, ``batch`` what a
    batch holds."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--iters", type=int, default=defaults["iters"],
                    help=f"training iterations (default {defaults['iters']})")
    ap.add_argument("--seed", type=int, default=defaults["seed"],
                    help=f"seed of {seeded} (default {defaults['seed']})")
    ap.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                    help=f"{batch} per iteration (default {defaults['batch_size']})")
    ap.add_argument("--lr", type=float, default=defaults["lr"],
                    help=f"peak Adam learning rate (default {defaults['lr']})")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: on a shared 2-core machine two OpenMP "
                         "threads competing with other jobs ran 10x slower than one)")
    return ap


def main(argv=None):
    ap = training_parser("python -m bespoke_fast.zoo.train",
                         "Train the bundled digits flow models (CPU).", DEFAULTS,
                         "initialisation, data order, noise and times", "digits")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--name", choices=sorted(MODELS), help="the model to train")
    g.add_argument("--all", action="store_true", help="train the three models")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: bundled weights)")
    ap.add_argument("--no-quality", action="store_true", help="skip the quality report")
    ap.add_argument("--quality-only", action="store_true",
                    help="do not train: recompute the quality report of existing weights in --out")
    ap.add_argument("--quality-n", type=int, default=1000,
                    help="samples for the quality report (default 1000)")
    ap.add_argument("--grid-dir", default=None, help="also save <grid-dir>/zoo_<name>.png")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    names = sorted(MODELS) if args.all else [args.name]
    for name in names:
        if not args.quality_only:
            net, stats = train_model(name, iters=args.iters, seed=args.seed,
                                     batch_size=args.batch_size, lr=args.lr,
                                     progress=not args.no_progress)
            jpath = save_model(net, stats, args.out)
            print(f"{name}: {stats['params']} params, final loss {stats['final_loss']:.4f}, "
                  f"train wall {stats['wall_time_s']:.1f} s -> {jpath}")
        if not args.no_quality:
            rep = update_quality(name, args.out, n=args.quality_n, grid_dir=args.grid_dir)
            print(json.dumps(rep, indent=1))

if __name__ == "__main__":
    main()
