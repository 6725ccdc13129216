"""Metrics you can trust: bootstrap intervals of both PSNRs, mode flips, the held-out check."""
from __future__ import annotations

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast.fitting.evaluation import mode_assigner, trained_on
from bespoke_fast.metrics import bootstrap_intervals, format_ci, mode_flip_fraction, rmse_psnr


def _errors(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, 16, generator=g, dtype=torch.float64)
    return ref + 0.01 * torch.randn(n, 16, generator=g, dtype=torch.float64) * \
        torch.rand(n, 1, generator=g, dtype=torch.float64) * 5, ref


def test_intervals_hold_the_estimate_shrink_with_n_and_are_reproducible():
    x, ref = _errors(4096)
    small = rmse_psnr(x[:256], ref[:256], intervals=True)
    big = rmse_psnr(x, ref, intervals=True)
    for r in (small, big):
        for key in ("psnr", "psnr_set", "rmse"):
            lo, hi = r[key + "_ci"]
            assert lo <= r[key] <= hi, (key, r)
    width = lambda r, k: r[k + "_ci"][1] - r[k + "_ci"][0]  # noqa: E731
    assert width(big, "psnr") < 0.6 * width(small, "psnr")          # ~ 1 / sqrt(n)
    assert rmse_psnr(x, ref, intervals=True) == big
    assert format_ci(big).startswith(f"{big['psnr']:.2f} [")
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(torch.ones(4), level=1.5)


def test_set_level_interval_is_wide_when_a_few_samples_flip():
    x, ref = _errors(512)
    x[:3] += 2.0                                   # three samples on another mode
    r = rmse_psnr(x, ref, intervals=True)
    assert r["psnr_set"] < r["psnr"] - 10
    assert r["psnr_set_ci"][1] - r["psnr_set_ci"][0] > 3 * (r["psnr_ci"][1] - r["psnr_ci"][0])


def test_mode_flips_on_a_mixture_and_the_digits_classifier():
    zm = bf.zoo.load("gmm-64")
    assign = mode_assigner(zm.model, "gmm-64")
    mu = zm.model.means.float()
    assert torch.equal(assign(mu), torch.arange(len(mu)))
    moved = mu.clone()
    moved[:2] = mu[[5, 6]]
    assert mode_flip_fraction(moved, mu, assign) == pytest.approx(2 / len(mu))
    digits = mode_assigner(torch.nn.Identity(), "digits-fmot")
    from bespoke_fast.zoo.quality import digits_split
    _, _, xte, yte = digits_split()
    assert (digits(xte) == yte).double().mean() > 0.9
    assert mode_assigner(torch.nn.Identity(), "my-model") is None


def test_trained_on_compares_the_noise_seeds():
    class S:
        meta = {"training": {"gt_seed": 0}, "model": {"hash": "h"}}

    class G:
        def __init__(self, seed, h="h"):
            self.meta = {"seed": seed, "model": {"hash": h}}

    assert trained_on(S(), G(0)) and not trained_on(S(), G(1)) and not trained_on(S(), G(0, "x"))
