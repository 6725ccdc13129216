"""Error metrics (method.md section 1): per-sample RMSE and PSNR against ground truth, with 95%
bootstrap intervals, and the fraction of samples that land on another mode than GT's."""
from __future__ import annotations

import torch

from ._checks import InvalidArgumentError

__all__ = ["per_sample_rmse", "rmse_psnr", "bootstrap_intervals", "mode_flip_fraction",
           "format_ci", "N_BOOTSTRAP"]

N_BOOTSTRAP = 2000


def per_sample_rmse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[B]`` RMSE over all non-batch dims: ``sqrt(mean_j (x - ref)_j^2)``."""
    return (x.double() - ref.double()).flatten(1).pow(2).mean(1).sqrt()


def _psnr(mse: torch.Tensor, data_range: float) -> torch.Tensor:
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-30))


def bootstrap_intervals(mse: torch.Tensor, data_range: float = 2.0, n_boot: int = N_BOOTSTRAP,
                        level: float = 0.95, seed: int = 0) -> dict:
    """Percentile-bootstrap intervals (resampling the samples with replacement, ``n_boot``
    times, fixed ``seed``: reproducible) of the mean per-sample PSNR (``psnr_ci``), the set-level
    PSNR (``psnr_set_ci``) and the mean RMSE (``rmse_ci``), from per-sample MSEs ``[B]``."""
    if not 0 < level < 1:
        raise InvalidArgumentError(f"level must be in (0, 1), got {level}")
    mse = mse.double().flatten()
    n = mse.numel()
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    stats = {"psnr_ci": _psnr(mse, data_range)[idx].mean(1),
             "psnr_set_ci": _psnr(mse[idx].mean(1), data_range),
             "rmse_ci": mse.sqrt()[idx].mean(1)}
    return {k: [float(v) for v in torch.quantile(s, q)] for k, s in stats.items()}


def rmse_psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0,
              intervals: bool = False) -> dict:
    """Errors of samples ``x`` against GT ``ref`` (both ``[B, ...]``).

    Returns:
        ``rmse``: mean per-sample RMSE.
        ``psnr``: the mean over samples of ``10 log10(R^2 / MSE_i)`` (the papers' convention,
            e.g. BNS: PSNR per image, averaged).
        ``psnr_set``: ``10 log10(R^2 / mean_i MSE_i)``, PSNR of the whole set. Always report it
            beside ``psnr``: on multi-modal data (mixtures, memorising flows) a solver that
            nails most samples and sends a few to the wrong mode scores high on ``psnr`` while
            those few dominate ``psnr_set``.
        ``data_range``: R (2 for data in [-1, 1]); ``n``: number of samples.
        With ``intervals``: ``psnr_ci``, ``psnr_set_ci``, ``rmse_ci``, 95% bootstrap intervals
        ``[lo, hi]`` (:func:`bootstrap_intervals`).
    """
    mse = per_sample_rmse(x, ref).pow(2)
    out = {"rmse": float(mse.sqrt().mean()),
           "psnr": float(_psnr(mse, data_range).mean()),
           "psnr_set": float(_psnr(mse.mean(), data_range)),
           "data_range": float(data_range), "n": int(mse.numel())}
    if intervals:
        out.update(bootstrap_intervals(mse, data_range))
    return out


def mode_flip_fraction(x: torch.Tensor, ref: torch.Tensor, assign) -> float:
    """Fraction of samples whose mode (or class) ``assign(x) -> [B] ints`` differs from GT's."""
    return float((assign(x) != assign(ref)).double().mean())


def format_ci(result: dict, key: str = "psnr") -> str:
    """``"44.18 [44.02, 44.35]"``: ``result[key]`` with its interval ``result[key + "_ci"]``."""
    lo, hi = result[key + "_ci"]
    return f"{result[key]:.2f} [{lo:.2f}, {hi:.2f}]"
