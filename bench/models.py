"""Benchmark-only velocity networks with random weights (throughput, never quality).

=================  =========================================================  ============
name               what it is                                                 parameters
=================  =========================================================  ============
``unet-35m``       DDPM CIFAR-10 UNet (Ho et al. 2020): 3x32x32, ch 128,       35,746,307
                   mult (1, 2, 2, 2), 2 res blocks per level, attention at
                   16x16, GroupNorm(32): the compute-bound regime
``unet-2m``        the same architecture at a quarter of the width: ch 32,       2,245,763
                   mult (1, 2, 2, 2), 2 res blocks per level, attention at
                   16x16, GroupNorm(8): a small 3x32x32 model (many small
                   kernels) for the launch-bound regime
``digits``         the zoo's digits network (1x8x8; ``bespoke_fast.zoo``:          ~0.37M
                   ``DigitsMLP``) with the trained ``digits-fmot`` weights, or
                   random weights where ``safetensors`` is not installed (the
                   same architecture and cost: throughput does not depend on
                   the weights)
=================  =========================================================  ============

(Counts are checked by ``python bench/models.py``.) Every network follows the package's velocity
contract ``net(x [B, C, H, W], t [B]) -> u`` shaped like x. It computes in its weights' dtype
(``net.to(torch.bfloat16)`` for bf16) and returns x's dtype, so a float32 state can be passed to a
bf16 net (it casts inside) and a bf16 input gives a bf16 output (what ``FastSampler`` with
``model_dtype=torch.bfloat16`` expects). No host synchronisation, no data-dependent control flow:
the forward can be captured in a CUDA graph. The output convolution is NOT zero-initialised
(random weights everywhere), so no kernel can shortcut on zeros.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from bespoke_fast.utils import count_params

__all__ = ["BenchUNet", "make_model", "count_params", "MODELS"]


def _timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(k * (-math.log(10000.0) / (half - 1)))
    args = (t.float() * scale)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _Attn(nn.Module):
    """Single-head self-attention over the H*W positions (DDPM), via scaled_dot_product_attention."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, hh * ww).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)                  # [b, 1, hw, c]
        return x + self.proj(h.transpose(-1, -2).reshape(b, c, hh, ww))


class BenchUNet(nn.Module):
    """DDPM-style UNet (Ho et al. 2020, the 35.7M-parameter CIFAR-10 model at the defaults).

    Args:
        in_channels: image channels. ch: base width. ch_mult: width multipliers per level
            (a 2x downsample between levels). num_res_blocks: residual blocks per level (the
            decoder has one more per level, as in DDPM). attn_resolutions: resolutions with
            self-attention. resolution: input H = W. groups: GroupNorm groups.

    ``forward(x [B, C, H, W], t [B]) -> [B, C, H, W]`` in x's dtype, computed in the weights' dtype.
    """

    def __init__(self, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), resolution=32, groups=32):
        super().__init__()
        self.ch = ch
        temb = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        chans, c, res = [ch], ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks = nn.ModuleList([_ResBlock(c, ch * mult, temb, groups)])
                c = ch * mult
                if res in attn_resolutions:
                    blocks.append(_Attn(c, groups))
                self.down.append(blocks)
                chans.append(c)
            if level != len(ch_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                chans.append(c)
                res //= 2
        self.mid1 = _ResBlock(c, c, temb, groups)
        self.mid_attn = _Attn(c, groups)
        self.mid2 = _ResBlock(c, c, temb, groups)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = nn.ModuleList([_ResBlock(c + chans.pop(), ch * mult, temb, groups)])
                c = ch * mult
                if res in attn_resolutions:
                    blocks.append(_Attn(c, groups))
                self.up.append(blocks)
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2.0, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
                res *= 2
        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        wdt = self.conv_in.weight.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.temb(_timestep_embedding(t, self.ch).to(wdt))
        h = self.conv_in(x.to(wdt))
        hs = [h]
        for blocks in self.down:
            if isinstance(blocks[0], _ResBlock):
                h = blocks[0](h, emb)
                for extra in blocks[1:]:
                    h = extra(h)
            else:
                h = blocks[0](h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks in self.up:
            if isinstance(blocks[0], _ResBlock):
                h = blocks[0](torch.cat([h, hs.pop()], dim=1), emb)
                for extra in blocks[1:]:
                    h = extra(h)
            else:
                h = blocks[1](blocks[0](h))
        return self.conv_out(F.silu(self.norm_out(h))).to(x.dtype)


MODELS = {
    "unet-35m": dict(shape=(3, 32, 32), kwargs=dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                                     attn_resolutions=(16,), groups=32)),
    "unet-2m": dict(shape=(3, 32, 32), kwargs=dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                                    attn_resolutions=(16,), groups=8)),
    "digits": dict(shape=(1, 8, 8), kwargs={}),
}


def _zoo_digits():
    """The zoo's trained ``digits-fmot`` velocity model (weights ship with the package); without
    ``safetensors`` (e.g. a GPU image with only torch + triton) the same network, random
    weights."""
    import bespoke_fast
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        from bespoke_fast.models import as_velocity
        from bespoke_fast.zoo.nets import DigitsMLP
        from bespoke_fast.zoo.trained import load_meta
        meta = load_meta("digits-fmot")
        net = as_velocity(DigitsMLP(**meta["net"]["config"]), prediction=meta["prediction"],
                          path=meta["path"], time=meta["time"])
        return net, "zoo digits-fmot architecture, RANDOM weights (safetensors not installed)"
    net = bespoke_fast.zoo.load("digits-fmot").model
    return net, f"zoo digits-fmot, trained ({type(getattr(net, 'net', net)).__name__})"


def make_model(name: str, device="cpu", dtype=torch.float32, seed: int = 0):
    """``(net, shape, note)`` for a benchmark network by name (random weights from ``seed``; the
    digits network uses the zoo's trained ``digits-fmot`` weights when they load)."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; one of {', '.join(MODELS)}")
    spec = MODELS[name]
    torch.manual_seed(seed)
    note = "random weights"
    if name == "digits":
        net, note = _zoo_digits()
    else:
        net = BenchUNet(in_channels=spec["shape"][0], resolution=spec["shape"][1], **spec["kwargs"])
    net = net.to(device=device, dtype=dtype).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, spec["shape"], note


if __name__ == "__main__":
    for n in MODELS:
        net, shape, note = make_model(n)
        print(f"{n:12s} {count_params(net):>12,d} parameters, shape {shape}, {note}")
