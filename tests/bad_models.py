"""Model factories for the bad-input tests (``--model tests.bad_models:NAME``)."""
import torch

from bespoke_fast.zoo import ZooModel


class _Linear(torch.nn.Module):
    """u = -x: a tiny well-behaved model with a buffer (so it has a content hash)."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x, t):
        return -self.scale * x


class _NaNLate(_Linear):
    """NaN velocity for t > 0.5 (the GT integration and the sampler cross it)."""

    def forward(self, x, t):
        u = super().forward(x, t)
        return torch.where((t > 0.5).reshape(-1, *[1] * (x.dim() - 1)), torch.nan, u)


class _WrongShape(_Linear):
    def forward(self, x, t):
        return super().forward(x, t)[:, :2]


def linear():
    return ZooModel("linear", _Linear(), (4,))


def nan_late():
    return ZooModel("nan-late", _NaNLate(), (4,))


def wrong_shape():
    return ZooModel("wrong-shape", _WrongShape(), (4,))


def plain(x, t):
    """A plain-function model: identified by its import path."""
    return -x


def plain_factory():
    return plain, (4,)


def garbage():
    return 42


class Delayed(torch.nn.Module):
    """``model`` with a sleep per call (so a test can kill a run in the middle); the delay is not
    part of the state, so the identity is the same with or without it."""

    def __init__(self, model, delay=0.0):
        super().__init__()
        self.model, self.delay = model, delay

    def forward(self, x, t, **extras):
        if self.delay:
            import time
            time.sleep(self.delay)
        return self.model(x, t, **extras)


class _RaisesLate(_Linear):
    """Raises RuntimeError for t > 0.5 (the probe call at t = 0.5 passes)."""

    def forward(self, x, t):
        if bool((t > 0.5).any()):
            raise RuntimeError("boom: the user's bug")
        return super().forward(x, t)


class _Mismatched(torch.nn.Module):
    """A network for 16-dim inputs, declared (below) with shape (4,): the probe catches it."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(16, 16)

    def forward(self, x, t):
        return self.net(x)


def raises_late():
    return ZooModel("raises-late", _RaisesLate(), (4,))


def mismatched():
    return ZooModel("mismatched", _Mismatched(), (4,))
