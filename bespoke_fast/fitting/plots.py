"""The fit report's figures: error maps against GT samples and a Bespoke solver's learned transform.

* :func:`plot_error_maps`: image models (``[N, C, H, W]``, C = 1 or 3): one column per held-out
  sample; rows: the GT sample, then every solver's sample, then every solver's per-pixel error
  ``|x - x_GT|`` (mean over channels) on one shared colour scale with a labelled colour bar.
  Vector models (any other shape): per solver a scatter of its coordinates against the GT's
  (identity line: exact), and a histogram of the per-coordinate errors of every solver on a log
  axis. Every panel title names the solver, its NFE and its PSNR; the figure title names the model.
* :func:`plot_transform`: the learned scale-time transform ``t_r``, ``s_r`` of a Bespoke solver.

Both need matplotlib (``pip install "bespoke_fast[viz]"``), write the file atomically and return
its path.

    >>> plot_error_maps("error_maps.png", gt_x1[:4], {"bespoke-rk2@10": ours, "midpoint@10": mid},
    ...                 data_range=2.0, model_name="photo-32", gt_label="adaptive RK45")
"""
from __future__ import annotations

import re

import torch

from ..io import save_figure

__all__ = ["plot_error_maps", "plot_transform", "pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (ImportError without matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _solver_title(label: str) -> str:
    """``"bespoke-rk2@10"`` -> ``"bespoke-rk2, NFE 10"``; other labels unchanged."""
    m = re.fullmatch(r"(.+)@(\d+)", label)
    return f"{m.group(1)}, NFE {m.group(2)}" if m else label


def _show(ax, x, data_range):
    """Show one image ``[C, H, W]`` (data centred on 0, span ``data_range``) without axes."""
    x = x.double().cpu()
    pic = x.permute(1, 2, 0) if x.shape[0] == 3 else x.mean(0)
    ax.imshow(((pic / data_range) + 0.5).clamp(0, 1).numpy(),
              cmap=None if x.shape[0] == 3 else "gray", interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])


def plot_error_maps(path, gt_x1, samples: dict, data_range: float, n: int = 4,
                    model_name: str | None = None, gt_label: str = "adaptive RK45"):
    """Error maps of solver samples against GT samples from the same noises.

    Args:
        path: output file (``.png``).
        gt_x1: GT samples ``[N, *shape]``.
        samples: ``{label: [N, *shape]}``, e.g. ``{"bespoke-rk2@10": ..., "midpoint@10": ...}``;
            a label ``name@NFE`` is shown as "name, NFE k".
        data_range: the data's max - min, for PSNR and to display images.
        n: samples shown (the first ``n``; for vectors all ``n`` are pooled).
        model_name: named in the figure title.
        gt_label: how the GT was made (shown in the GT panels' titles).

    Image models (``gt_x1`` of 4 dims, 1 or 3 channels) get sample and error rows; others a
    scatter per solver and an error histogram (see the module docstring).
    """
    from ..metrics import rmse_psnr
    plt = pyplot()
    n = max(1, min(n, gt_x1.shape[0]))
    gt = gt_x1[:n].double().cpu()
    xs = {k: v[:n].double().cpu() for k, v in samples.items()}
    model = f"{model_name}: " if model_name else ""
    image = gt.dim() == 4 and gt.shape[1] in (1, 3)
    if image:
        k = len(xs)
        rows = 1 + 2 * k
        fig, axes = plt.subplots(rows, n, figsize=(2.1 * n + 1.2, 2.0 * rows + 0.6), squeeze=False)
        errs = {lab: (x - gt).abs().mean(1) for lab, x in xs.items()}             # [n, H, W]
        vmax = max(float(e.max()) for e in errs.values()) or 1.0
        im = None
        for j in range(n):
            _show(axes[0, j], gt[j], data_range)
            axes[0, j].set_title(f"GT sample {j}\n({gt_label})", fontsize=7)
            for i, (lab, x) in enumerate(xs.items()):
                psnr = rmse_psnr(x[j:j + 1], gt[j:j + 1], data_range)["psnr"]
                title = f"{_solver_title(lab)}\nPSNR {psnr:.1f} dB"
                _show(axes[1 + i, j], x[j], data_range)
                axes[1 + i, j].set_title(title, fontsize=7)
                ax = axes[1 + k + i, j]
                im = ax.imshow(errs[lab][j].numpy(), cmap="magma", vmin=0, vmax=vmax,
                               interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(f"error, {title}", fontsize=7)
        for i, lab in enumerate(xs):
            axes[1 + i, 0].set_ylabel("sample", fontsize=8)
            axes[1 + k + i, 0].set_ylabel("|x - x_GT|", fontsize=8)
        axes[0, 0].set_ylabel("GT", fontsize=8)
        fig.suptitle(f"{model}samples and per-pixel error against the GT (same noise, equal NFE)",
                     fontsize=9)
        fig.tight_layout(rect=(0, 0, 0.88, 0.97))
        lo, hi = axes[-1, 0].get_position().y0, axes[1 + k, 0].get_position().y1
        cax = fig.add_axes((0.9, lo, 0.022, hi - lo))             # beside the error rows only
        fig.colorbar(im, cax=cax).set_label("per-pixel |x - x_GT| (mean over channels, data units)",
                                            fontsize=7)
        return save_figure(fig, path, dpi=110)

    k = len(xs)
    fig, axes = plt.subplots(1, k + 1, figsize=(3.4 * (k + 1), 3.5), squeeze=False)
    g = gt.reshape(-1).numpy()
    lo, hi = float(g.min()), float(g.max())
    all_err = []
    for i, (lab, x) in enumerate(xs.items()):
        ax = axes[0, i]
        psnr = rmse_psnr(x, gt, data_range)["psnr"]
        ax.plot([lo, hi], [lo, hi], "--", color="gray", lw=0.8, label="exact (y = x)")
        ax.scatter(g, x.reshape(-1).numpy(), s=4, alpha=0.5, color=f"C{i}", label=_solver_title(lab))
        ax.set_xlabel("GT coordinate"), ax.set_ylabel("solver coordinate")
        ax.set_title(f"{_solver_title(lab)}, PSNR {psnr:.1f} dB", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
        all_err.append((lab, (x - gt).abs().reshape(-1).clamp_min(1e-12)))
    ax = axes[0, k]
    emin = min(float(e.min()) for _, e in all_err)
    emax = max(float(e.max()) for _, e in all_err)
    bins = torch.logspace(torch.log10(torch.tensor(emin)), torch.log10(torch.tensor(emax * 1.01)), 30)
    for i, (lab, e) in enumerate(all_err):
        psnr = rmse_psnr(xs[lab], gt, data_range)["psnr"]
        ax.hist(e.numpy(), bins=bins.numpy(), histtype="step", lw=1.5, color=f"C{i}",
                label=f"{_solver_title(lab)} ({psnr:.1f} dB)")
    ax.set_xscale("log")
    ax.set_xlabel("|x - x_GT| per coordinate"), ax.set_ylabel("count")
    ax.set_title(f"error histogram, {n} samples x {gt[0].numel()} coordinates", fontsize=8)
    ax.legend(fontsize=7)
    fig.suptitle(f"{model}solver samples against the GT ({gt_label}), same noise, equal NFE",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return save_figure(fig, path, dpi=110)


def plot_transform(path, solver):
    """The learned scale-time transform of a Bespoke solver, with axis names and a caption."""
    plt = pyplot()
    tb = {k: v.detach().double().cpu() for k, v in solver.tables().items()}
    r = torch.linspace(0, 1, len(tb["t"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.5, 3.6))
    a.plot(r, tb["t"], "o-", ms=3, label="learned $t_r$")
    a.plot(r, r, "--", color="gray", label="identity (plain RK)")
    a.set_xlabel("solver time r (uniform steps)"), a.set_ylabel("model time $t_r$"), a.legend()
    b.plot(r, tb["s"], "o-", ms=3, color="C1", label="learned $s_r$")
    b.axhline(1, ls="--", color="gray", label="no scaling")
    b.set_xlabel("solver time r (uniform steps)"), b.set_ylabel("state scale $s_r$"), b.legend()
    fig.text(0.5, 0.01, "The solver steps uniformly in r; $t_r$ is the model time it evaluates "
             "at step r, $s_r$ the factor the state is scaled by ($\\bar{x}_r = s_r\\,x(t_r)$).",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path, dpi=120)
