"""Small shared fixtures for the test-suite (importable as ``tests.helpers``)."""
import torch

from bespoke_fast.models import GaussianMixtureFlow


def smooth_gmm(dim=8, k=4, path="fm-ot", seed=0, std_range=(0.3, 0.6)):
    """A float64 mixture flow that is smooth enough for clean convergence-order measurements."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64)
    lo, hi = std_range
    stds = lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64)
    return GaussianMixtureFlow(means, stds, path=path)


def noise(b, *shape, seed=1, dtype=torch.float64):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
