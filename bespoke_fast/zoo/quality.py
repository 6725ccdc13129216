"""Sample-quality report for the digits models (no FID for 8x8 digits: a classifier stands in).

* A fixed split of the 1797 sklearn digits: :func:`digits_split` (seed 0: 1497 train / 300
  held-out). The bundled flow models are trained on the train part only, so held-out digits are
  a fair "real, unseen" reference.
* A multinomial logistic-regression classifier on the 64 pixels in [-1, 1], trained once on the
  train part (:func:`digits_classifier`, cached); its held-out accuracy is reported.
* :func:`quality_report` samples ``n`` images from fixed-seed noise (RK4, 50 steps by default,
  through :func:`bespoke_fast.solvers.fixed.solve`) and reports, for samples vs held-out real digits:

  - mean max-class confidence of the classifier;
  - the predicted-class histogram, its entropy (bits; uniform = log2 10 = 3.32) and max/min ratio;
  - the mean per-pixel-RMSE distance to the nearest TRAINING image: about the held-out value
    means new digits; much smaller means memorisation; much larger means noise / artefacts.

Samples are clamped to [-1, 1] (as when they are turned into images) before classification and
distances; the fraction of raw sample pixels outside [-1.05, 1.05] is reported too.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable

import numpy as np
import torch

from .._checks import MissingDependencyError
from ..io import save_figure
from ..solvers.fixed import solve
from ..utils import infer_device

__all__ = ["digits_split", "digits_classifier", "generate_samples", "sample_stats",
           "quality_report", "save_sample_grid", "N_HELDOUT", "SPLIT_SEED"]

N_HELDOUT = 300
SPLIT_SEED = 0
NEAR_COPY_RMSE = 0.1  # a sample this close (per-pixel RMSE, data in [-1, 1]) to a train image is a near copy


@functools.lru_cache(maxsize=4)
def _split(seed: int, n_heldout: int):
    from sklearn.datasets import load_digits

    from ..models import digits_data

    x = digits_data()                                            # [1797, 1, 8, 8] in [-1, 1]
    y = torch.as_tensor(load_digits().target, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_heldout], perm[n_heldout:]
    return x[train], y[train], x[test], y[test]


def digits_split(seed: int = SPLIT_SEED, n_heldout: int = N_HELDOUT):
    """Fixed split of the digits: ``(x_train [N,1,8,8], y_train [N], x_held [M,1,8,8], y_held [M])``.

    ``torch.randperm`` with ``seed`` (CPU generator); the first ``n_heldout`` are held out.
    Returns copies (callers may modify them).
    """
    return tuple(t.clone() for t in _split(int(seed), int(n_heldout)))


def _one_thread():
    """Limit BLAS/OpenMP pools to one thread: deterministic, and sklearn's pools next to torch's
    on a shared 2-core machine ran the fit 30x slower (8.6 s vs 0.27 s)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(1)


@functools.lru_cache(maxsize=2)
def digits_classifier(seed: int = SPLIT_SEED):
    """``(classifier, held-out accuracy)``: sklearn LogisticRegression(C=1) on the flattened
    train split (lbfgs, one BLAS thread: deterministic); cached per process.
    ``classifier.predict_proba(X [N, 64])``.
    """
    from sklearn.linear_model import LogisticRegression

    xtr, ytr, xte, yte = _split(int(seed), N_HELDOUT)
    clf = LogisticRegression(C=1.0, max_iter=5000)
    with _one_thread():
        clf.fit(xtr.reshape(len(xtr), -1).numpy(), ytr.numpy())
        acc = float((clf.predict(xte.reshape(len(xte), -1).numpy()) == yte.numpy()).mean())
    return clf, acc


@torch.no_grad()
def generate_samples(velocity_model: Callable, n: int = 1000, seed: int = 0, n_steps: int = 50,
                     method: str = "rk4", batch_size: int = 1000):
    """``(samples [n, 1, 8, 8] float32 unclamped, solver description)`` from
    ``torch.randn(n, 1, 8, 8, generator=Generator().manual_seed(seed))`` noise."""
    x0 = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    out = [solve(velocity_model, chunk, method=method, n_steps=n_steps)
           for chunk in x0.to(infer_device(velocity_model)).split(batch_size)]
    return (torch.cat(out).float().cpu(),
            f"bespoke_fast.solvers.fixed.solve, method={method}, n_steps={n_steps}")


def _nn_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row distance (per-pixel RMSE) from each row of ``a`` to its nearest row of ``b``."""
    a = a.reshape(len(a), -1).double()
    b = b.reshape(len(b), -1).double()
    return (torch.cdist(a, b).min(dim=1).values / math.sqrt(a.shape[1])).float()


def _confidence(clf, x: torch.Tensor):
    with _one_thread():
        p = clf.predict_proba(x.reshape(len(x), -1).double().numpy())
    return p.max(axis=1), p.argmax(axis=1)


def _balance(pred: np.ndarray) -> dict:
    hist = np.bincount(pred, minlength=10)
    q = hist / hist.sum()
    nz = q[q > 0]
    return {
        "class_hist": [int(h) for h in hist],
        "class_entropy_bits": float(-(nz * np.log2(nz)).sum()),
        "classes_present": int((hist > 0).sum()),
        "class_max_min_ratio": (float(hist.max() / hist.min()) if hist.min() > 0 else None),
    }


def sample_stats(samples: torch.Tensor) -> dict:
    """The quality numbers for given samples ``[N, 1, 8, 8]`` (see the module docstring)."""
    raw = samples.float()
    s = raw.clamp(-1.0, 1.0)
    xtr, _, xte, _ = _split(SPLIT_SEED, N_HELDOUT)
    clf, acc = digits_classifier()
    conf_s, pred_s = _confidence(clf, s)
    conf_r, pred_r = _confidence(clf, xte)
    nn_s, nn_r = _nn_rmse(s, xtr), _nn_rmse(xte, xtr)
    bal_s, bal_r = _balance(pred_s), _balance(pred_r)
    return {
        "n_samples": int(len(s)),
        "classifier": "sklearn LogisticRegression(C=1), train split of digits_split(seed=0)",
        "classifier_heldout_accuracy": acc,
        "confidence_samples_mean": float(conf_s.mean()),
        "confidence_heldout_mean": float(conf_r.mean()),
        "frac_samples_confidence_gt_0.9": float((conf_s > 0.9).mean()),
        "frac_heldout_confidence_gt_0.9": float((conf_r > 0.9).mean()),
        **{k: v for k, v in bal_s.items()},
        "heldout_class_entropy_bits": bal_r["class_entropy_bits"],
        "nn_rmse_samples_to_train_mean": float(nn_s.mean()),
        "nn_rmse_samples_to_train_median": float(nn_s.median()),
        "nn_rmse_heldout_to_train_mean": float(nn_r.mean()),
        "nn_rmse_heldout_to_train_median": float(nn_r.median()),
        "frac_samples_near_copy": float((nn_s < NEAR_COPY_RMSE).float().mean()),
        "frac_heldout_near_copy": float((nn_r < NEAR_COPY_RMSE).float().mean()),
        "near_copy_rmse_threshold": NEAR_COPY_RMSE,
        "frac_pixels_outside_1.05": float((raw.abs() > 1.05).float().mean()),
        "sample_pixel_mean_std": [float(raw.mean()), float(raw.std())],
        "data_pixel_mean_std": [float(xtr.mean()), float(xtr.std())],
    }


def quality_report(velocity_model: Callable, n: int = 1000, seed: int = 0, n_steps: int = 50,
                   method: str = "rk4", grid_path=None) -> dict:
    """Sample ``n`` digits from fixed-seed noise and return :func:`sample_stats` plus the solver
    used. ``velocity_model(x [B,1,8,8], t [B]) -> u``. Optionally saves a PNG grid of the first
    100 samples to ``grid_path``.

    Example::

        >>> model, meta = load_trained("digits-fmot")
        >>> quality_report(model, n=1000)["confidence_samples_mean"]
    """
    samples, desc = generate_samples(velocity_model, n=n, seed=seed, n_steps=n_steps, method=method)
    rep = {"solver": desc, "noise_seed": int(seed), **sample_stats(samples)}
    if grid_path is not None:
        save_sample_grid(samples, grid_path)
    return rep


def save_sample_grid(samples: torch.Tensor, path, nrow: int = 10, n: int = 100, title=None):
    """Save the first ``n`` samples ``[N, 1, 8, 8]`` (values in [-1, 1], clamped) as a PNG grid.

    Needs matplotlib (imported here, Agg backend). Returns ``path``.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional dependency
        raise MissingDependencyError("save_sample_grid needs matplotlib: pip install matplotlib",
                                     name="matplotlib") from e
    x = samples[:n].float().clamp(-1, 1).reshape(-1, 8, 8).cpu().numpy()
    k = len(x)
    ncol = nrow
    nr = (k + ncol - 1) // ncol
    pad = 1
    grid = np.full((nr * (8 + pad) + pad, ncol * (8 + pad) + pad), 0.0)  # grey separators
    for i in range(k):
        r, c = divmod(i, ncol)
        grid[pad + r * (8 + pad): pad + r * (8 + pad) + 8, pad + c * (8 + pad): pad + c * (8 + pad) + 8] = x[i]
    fig, ax = plt.subplots(figsize=(ncol * 0.6, nr * 0.6), dpi=100)
    ax.imshow(grid, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    save_figure(fig, path, bbox_inches="tight")
    return path
