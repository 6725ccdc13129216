"""Image statistics that need no classifier: how close a set of generated RGB images is to a set of
real ones, measured independently of the flow-matching loss.

* :func:`radial_power_spectrum`: the mean power ``|FFT2(x - mean(x))|^2`` of every image and
  channel, averaged over rings of integer radius ``r = 1 .. min(H, W) // 2`` (cycles per image).
  It measures how much energy sits at each spatial frequency: blur lowers the high rings, noise
  flattens the whole curve.
* :func:`channel_stats`: per-channel mean and standard deviation over all pixels of the set.
* :func:`compare`: ``spectrum_db_rms``, the RMS over rings of ``10 log10(P_a / P_b)`` (0 dB:
  identical spectra), and ``channel_l2``, the Euclidean distance between the 6-vectors
  ``(mean_R, mean_G, mean_B, std_R, std_G, std_B)``.

Shapes: image sets are ``[N, C, H, W]`` float tensors (any range; photo-32 uses [-1, 1]).

    >>> d = compare(samples, real_crops)
    >>> d["spectrum_db_rms"], d["channel_l2"]
"""
from __future__ import annotations

import math

import torch
from .._checks import InvalidArgumentError

__all__ = ["radial_power_spectrum", "channel_stats", "compare"]


def _check(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise InvalidArgumentError(f"expected a float image set [N, C, H, W], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidArgumentError("image set contains NaN or Inf")
    return x.detach().to(torch.float64)


def radial_power_spectrum(x: torch.Tensor) -> torch.Tensor:
    """``[min(H, W) // 2]`` mean power per ring ``r = 1 .. min(H, W) // 2`` (float64).

    Each image and channel has its own mean removed (the mean is :func:`channel_stats`' job);
    power is ``|FFT2|^2 / (H W)``, averaged over images, channels and the frequencies whose
    rounded radius ``round(sqrt(fy^2 + fx^2))`` is ``r``.
    """
    x = _check(x)
    H, W = x.shape[-2:]
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    p = (torch.fft.fft2(x).abs() ** 2).mean(dim=(0, 1)) / (H * W)          # [H, W]
    fy = torch.fft.fftfreq(H, d=1.0 / H, dtype=torch.float64)
    fx = torch.fft.fftfreq(W, d=1.0 / W, dtype=torch.float64)
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long()
    rmax = min(H, W) // 2
    out = torch.empty(rmax, dtype=torch.float64)
    for k in range(1, rmax + 1):
        out[k - 1] = p[r == k].mean()
    return out


def channel_stats(x: torch.Tensor) -> dict:
    """``{"mean": [C], "std": [C]}`` over all pixels of the set (floats, lists)."""
    x = _check(x)
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return {"mean": flat.mean(dim=1).tolist(), "std": flat.std(dim=1).tolist()}


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Distances of image set ``a`` from reference set ``b`` (same C, H, W; see module docstring).

    Returns ``{"spectrum_db_rms", "spectrum_db_high" (mean dB difference over the upper half of
    the rings: negative = a has less fine detail), "channel_l2", "spectrum_a", "spectrum_b",
    "stats_a", "stats_b"}``.
    """
    if a.shape[1:] != b.shape[1:]:
        raise InvalidArgumentError(f"image sets differ in shape: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    pa, pb = radial_power_spectrum(a), radial_power_spectrum(b)
    db = 10.0 * torch.log10(pa / pb)
    sa, sb = channel_stats(a), channel_stats(b)
    va = torch.tensor(sa["mean"] + sa["std"], dtype=torch.float64)
    vb = torch.tensor(sb["mean"] + sb["std"], dtype=torch.float64)
    half = db.shape[0] // 2
    return {"spectrum_db_rms": float(db.pow(2).mean().sqrt()),
            "spectrum_db_high": float(db[half:].mean()),
            "channel_l2": float((va - vb).norm()),
            "spectrum_a": pa.tolist(), "spectrum_b": pb.tolist(), "stats_a": sa, "stats_b": sb,
            "rings": list(range(1, pa.shape[0] + 1)),
            "finite": all(math.isfinite(v) for v in db.tolist())}
