"""Error metrics (method.md section 1): per-sample RMSE and PSNR against ground truth."""
from __future__ import annotations

import torch

__all__ = ["per_sample_rmse", "rmse_psnr"]


def per_sample_rmse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[B]`` RMSE over all non-batch dims: ``sqrt(mean_j (x - ref)_j^2)``."""
    return (x.double() - ref.double()).flatten(1).pow(2).mean(1).sqrt()


def rmse_psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> dict:
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
    """
    mse = per_sample_rmse(x, ref).pow(2)
    return {"rmse": float(mse.sqrt().mean()),
            "psnr": float((10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-30))).mean()),
            "psnr_set": float(10 * torch.log10(data_range ** 2 / mse.mean().clamp_min(1e-30))),
            "data_range": float(data_range), "n": int(mse.numel())}
