"""Counter-based noise: sample ``i`` of a run with seed ``s`` always gets the same noise, whatever
the batch size, shard layout or number of processes. GT sets and the sampler both use it."""
from __future__ import annotations

import torch

__all__ = ["sample_seed", "noise_for_indices"]

_MASK = (1 << 63) - 1


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded ``seed`` (splitmix64 mixing)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 0x632BE59BD9B4E019) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


def noise_for_indices(indices, shape, seed: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal noise ``[len(indices), *shape]``: row ``j`` is drawn from a CPU generator
    seeded ``sample_seed(seed, indices[j])`` (so it is identical on every machine and device),
    then moved to ``device``.

    Example::

        >>> a = noise_for_indices(range(8), (1, 8, 8), seed=0)
        >>> b = noise_for_indices([4, 5], (1, 8, 8), seed=0)
        >>> torch.equal(a[4:6], b)
        True
    """
    g = torch.Generator()
    rows = []
    for i in indices:
        g.manual_seed(sample_seed(seed, int(i)))
        rows.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    out = torch.stack(rows) if rows else torch.empty(0, *shape)
    return out.to(dtype=dtype, device=device)
