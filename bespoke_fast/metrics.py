"""Error metrics (method.md section 1): per-sample RMSE and PSNR against ground truth."""
from __future__ import annotations

import torch

__all__ = ["per_sample_rmse", "rmse_psnr"]


def per_sample_rmse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[B]`` RMSE over all non-batch dims: ``sqrt(mean_j (x - ref)_j^2)``."""
    return (x.double() - ref.double()).flatten(1).pow(2).mean(1).sqrt()


def rmse_psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> dict:
    """Mean per-sample RMSE and mean per-sample PSNR ``10 log10(R^2 / MSE_i)`` (dB).

    ``data_range`` R is the width of the data interval (2 for data in [-1, 1])."""
    err = per_sample_rmse(x, ref)
    psnr = 10 * torch.log10(data_range ** 2 / err.pow(2).clamp_min(1e-30))
    return {"rmse": float(err.mean()), "psnr": float(psnr.mean()), "data_range": float(data_range),
            "n": int(err.numel())}
