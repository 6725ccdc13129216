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

__all__ = ["DigitsMLP", "timestep_embedding"]


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
