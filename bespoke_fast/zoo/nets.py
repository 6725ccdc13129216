"""The zoo's digits network: a residual MLP on the 64 flattened pixels, time-conditioned by FiLM.

Shapes::

    net = DigitsMLP()          # defaults: hidden 256, depth 2, emb_dim 64 -> 368,512 parameters
                               # (1.48 MB of float32 weights), 0.73 MFLOP per sample
    f = net(x, t)              # x: [B, 1, 8, 8], t: [B] (or a scalar)  ->  f: [B, 1, 8, 8]

Layout (``H = hidden``, ``N = depth``, ``E = emb_dim``)::

    t [B] -> sinusoid(time_scale * t) [B, freq_dim] -> Linear(freq_dim, E) -> SiLU
          -> Linear(E, N * 2H) -> N pairs (scale_i, shift_i) [B, H]
    x [B, 1, 8, 8] -> flatten [B, 64] -> Linear(64, H) = h
    N x  h = h + Linear2_i( SiLU(Linear1_i(LayerNorm_i(h))) * (1 + scale_i) + shift_i )
    LayerNorm -> SiLU -> Linear(H, 64)  (zero-initialised) -> [B, 1, 8, 8]

Cost per sample (multiply-adds of the Linear layers, x2 for FLOPs; elementwise ops, LayerNorm
and the sinusoid are a few thousand more): ``64 H + freq_dim E + E 2NH + N 2H^2 + 64 H`` MACs,
see :meth:`DigitsMLP.flops_per_sample`; at the defaults 364,544 MACs = 0.73 MFLOP (the UNet it
replaced: ~11.5 MFLOP). About 4-10 ms per batch-256 forward on one CPU core.

The network computes in the dtype of its own weights (float32, float64 or bfloat16 after
``net.to(dtype)``) and returns the dtype of ``x``: a float32 net accepts float64 states (and
computes in float32). The time embedding is always formed in float32 (float64 for a float64
net) so bf16 nets still see precise times. There is no data-dependent Python control flow and no
host synchronisation, so the forward is CUDA-graph capturable.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DigitsMLP", "PhotoUNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(scale t f_k), sin(scale t f_k)]``, ``f_k = max_period^(-k/half)``.

    Args: t ``[B]`` (any float dtype; computed in t's dtype if float64, else float32), dim even.
    Returns ``[B, dim]``.
    """
    dt = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=dt)
    freqs = torch.exp(k * (-math.log(max_period) / half))
    args = (t.to(dt) * scale)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _Block(nn.Module):
    """``h + Linear2(SiLU(Linear1(LayerNorm(h))) * (1 + scale) + shift)``; h, scale, shift ``[B, H]``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        z = F.silu(self.fc1(self.norm(h)))
        return h + self.fc2(z * (1.0 + scale) + shift)


class DigitsMLP(nn.Module):
    """Residual MLP for 8x8 single-channel images (see the module docstring for the layout).

    Args:
        pixels: flattened image size (64 for the digits; any ``[B, C, H, W]`` with C H W = pixels).
        hidden: width H of the residual stream.
        depth: number N of residual blocks.
        emb_dim: width E of the time-embedding MLP.
        freq_dim: size of the sinusoidal embedding (even).
        time_scale: the sinusoid sees ``time_scale * t`` (t in [0, 1]).

    ``forward(x [B, C, H, W], t [B] or scalar) -> [B, C, H, W]`` in x's dtype.
    ``config`` holds the constructor arguments (JSON-serialisable).
    """

    def __init__(self, pixels: int = 64, hidden: int = 256, depth: int = 2, emb_dim: int = 64,
                 freq_dim: int = 64, time_scale: float = 1000.0):
        super().__init__()
        self.config = dict(pixels=int(pixels), hidden=int(hidden), depth=int(depth),
                           emb_dim=int(emb_dim), freq_dim=int(freq_dim), time_scale=float(time_scale))
        self.pixels, self.hidden, self.depth = int(pixels), int(hidden), int(depth)
        self.freq_dim, self.time_scale = int(freq_dim), float(time_scale)
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, 2 * depth * hidden))
        self.inp = nn.Linear(pixels, hidden)
        self.blocks = nn.ModuleList([_Block(hidden) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, pixels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def flops_per_sample(self) -> int:
        """2 x the multiply-adds of the Linear layers for one sample (elementwise ops excluded)."""
        return 2 * sum(m.in_features * m.out_features for m in self.modules()
                       if isinstance(m, nn.Linear))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        wdt = self.inp.weight.dtype
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(B)                                # scalar or [B] -> [B]
        emb_t = t.to(torch.float64) if wdt == torch.float64 else t
        emb = self.time_mlp(timestep_embedding(emb_t, self.freq_dim, self.time_scale).to(wdt))
        film = emb.reshape(B, self.depth, 2, self.hidden)          # [B, N, (scale, shift), H]
        h = self.inp(x.reshape(B, self.pixels).to(wdt))            # [B, H]
        for i, block in enumerate(self.blocks):
            h = block(h, film[:, i, 0], film[:, i, 1])
        y = self.out(F.silu(self.norm_out(h)))                     # [B, pixels]
        return y.reshape(x.shape).to(x.dtype)


class _ConvBlock(nn.Module):
    """``skip(h) + conv2(SiLU(GN(conv1(SiLU(GN(h)))) * (1 + scale) + shift))``, time FiLM between."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        z = F.silu(self.norm2(z) * (1.0 + scale) + shift)
        return self.skip(h) + self.conv2(z)


class PhotoUNet(nn.Module):
    """Small two-level convolutional UNet for ``[B, 3, 32, 32]`` images (see the layout below).

    Args:
        channels: RGB channels (3).
        patch: space-to-depth factor of the stem (2: the UNet runs at 16x16 and 8x8).
        width: channels at the patch resolution; ``2 * width`` at half of it.
        depth_low: residual blocks at the low resolution.
        emb_dim: width of the time-embedding MLP; freq_dim: sinusoid size (even);
        time_scale: the sinusoid sees ``time_scale * t``.

    Layout (``W = width``)::

        x [B, 3, 32, 32] -> pixel_unshuffle(patch) [B, 3 p^2, 32/p, 32/p] -> conv3x3 -> W
        block(W) = s -> conv3x3 stride 2 -> 2W -> depth_low x block(2W)
        -> nearest x2 -> conv3x3 -> W -> concat s -> block(2W -> W)
        -> GN -> SiLU -> conv3x3 (zero-initialised) -> 3 p^2 -> pixel_shuffle(patch) [B, 3, 32, 32]

    Every block is time-conditioned by FiLM from the sinusoidal embedding of t.
    ``forward(x [B, 3, H, W], t [B] or scalar) -> [B, 3, H, W]`` in x's dtype (H, W divisible by
    ``2 patch``); computes in its weights' dtype, no data-dependent control flow (CUDA-graph
    capturable). ``config`` holds the constructor arguments (JSON-serialisable).
    """

    def __init__(self, channels: int = 3, patch: int = 2, width: int = 32, depth_low: int = 2,
                 emb_dim: int = 128, freq_dim: int = 64, time_scale: float = 1000.0):
        super().__init__()
        self.config = dict(channels=int(channels), patch=int(patch), width=int(width),
                           depth_low=int(depth_low), emb_dim=int(emb_dim), freq_dim=int(freq_dim),
                           time_scale=float(time_scale))
        self.patch, self.freq_dim, self.time_scale = int(patch), int(freq_dim), float(time_scale)
        cp, w = channels * patch * patch, int(width)
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.stem = nn.Conv2d(cp, w, 3, padding=1)
        self.enc = _ConvBlock(w, w, emb_dim)
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.low = nn.ModuleList([_ConvBlock(2 * w, 2 * w, emb_dim) for _ in range(depth_low)])
        self.up = nn.Conv2d(2 * w, w, 3, padding=1)
        self.dec = _ConvBlock(2 * w, w, emb_dim)
        self.norm_out = nn.GroupNorm(min(8, w), w)
        self.out = nn.Conv2d(w, cp, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def flops_per_sample(self, height: int = 32, width: int = 32) -> int:
        """2 x the multiply-adds of the convolutions and Linear layers for one ``height x width``
        sample (normalisations and elementwise ops excluded)."""
        total, h0 = 0, height * width // (self.patch ** 2)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                total += m.in_features * m.out_features
            elif isinstance(m, nn.Conv2d):
                low = name.startswith("low") or name == "down"
                pix = h0 // 4 if low else h0
                total += pix * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        return 2 * total

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        wdt = self.stem.weight.dtype
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(B)
        emb_t = t.to(torch.float64) if wdt == torch.float64 else t
        emb = self.time_mlp(timestep_embedding(emb_t, self.freq_dim, self.time_scale).to(wdt))
        h = self.stem(F.pixel_unshuffle(x.to(wdt), self.patch))
        s = self.enc(h, emb)
        h = self.down(s)
        for block in self.low:
            h = block(h, emb)
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.dec(torch.cat([h, s], dim=1), emb)
        y = self.out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(y, self.patch).to(x.dtype)
