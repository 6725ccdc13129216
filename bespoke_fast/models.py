"""Velocity models: the contract, prediction-type adapters, guidance, exact Gaussian-mixture flows.

The contract every solver and sampler in this package relies on::

    u = model(x, t, **extras)      # x: [B, ...] float, t: [B] float on x's device, u: like x

Time runs from noise (t = 0) to data (t = 1): ``x_t = alpha_t x1 + sigma_t x0`` (method.md section 1).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import nn

from ._checks import (InvalidArgumentError, MissingDependencyError, check_choice,
                      check_positive)

__all__ = [
    "GaussianPath", "PATHS", "as_velocity", "VelocityAdapter", "cfg", "GuidedModel",
    "from_torchdiffeq", "to_torchdiffeq", "GaussianMixtureFlow", "digits_data", "digits_flow",
]

PREDICTIONS = ("velocity", "eps", "x1", "v")
TIMES = ("flow", "diffusion")


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast against x."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


class GaussianPath:
    """A Gaussian probability path ``x_t = alpha_t x1 + sigma_t x0`` in flow time (noise at 0).

    ``name`` is one of:

    * ``"fm-ot"``:  alpha = t, sigma = 1 - t
    * ``"cosine"``: alpha = sin(pi t / 2), sigma = cos(pi t / 2)   (FM/v-CS)
    * ``"vp"``:     alpha = xi(1 - t), sigma = sqrt(1 - alpha^2),
      ``xi(s) = exp(-0.25 s^2 (B - b) - 0.5 s b)``, B = 20, b = 0.1   (eps-VP)

    All methods take a tensor ``t`` (any shape) and return tensors of the same shape.
    ``sigma_dsigma`` returns ``sigma * dsigma/dt`` directly (finite at t = 1 for VP, where
    ``dsigma/dt`` itself is singular).

    Example::

        >>> p = GaussianPath("cosine"); t = torch.tensor([0.0, 0.5, 1.0])
        >>> p.alpha(t), p.sigma(t)
    """

    B_MAX, B_MIN = 20.0, 0.1

    def __init__(self, name: str = "fm-ot"):
        self.name = check_choice("path", name, PATHS)

    def __repr__(self):
        return f"GaussianPath({self.name!r})"

    def _xi(self, s):
        return torch.exp(-0.25 * s * s * (self.B_MAX - self.B_MIN) - 0.5 * s * self.B_MIN)

    def alpha(self, t):
        if self.name == "fm-ot":
            return t
        if self.name == "cosine":
            return torch.sin(0.5 * math.pi * t)
        return self._xi(1.0 - t)

    def sigma(self, t):
        if self.name == "fm-ot":
            return 1.0 - t
        if self.name == "cosine":
            return torch.cos(0.5 * math.pi * t)
        return torch.sqrt(torch.clamp(1.0 - self._xi(1.0 - t) ** 2, min=0.0))

    def d_alpha(self, t):
        if self.name == "fm-ot":
            return torch.ones_like(t)
        if self.name == "cosine":
            return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)
        s = 1.0 - t  # d/dt xi(1 - t) = -xi'(s) = xi(s) (0.5 s (B - b) + 0.5 b)
        return self._xi(s) * (0.5 * s * (self.B_MAX - self.B_MIN) + 0.5 * self.B_MIN)

    def d_sigma(self, t):
        if self.name == "fm-ot":
            return -torch.ones_like(t)
        if self.name == "cosine":
            return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)  # singular at t = 1

    def sigma_dsigma(self, t):
        if self.name == "vp":  # alpha^2 + sigma^2 = 1  =>  sigma sigma' = -alpha alpha'
            return -self.alpha(t) * self.d_alpha(t)
        return self.sigma(t) * self.d_sigma(t)


PATHS = ("fm-ot", "cosine", "vp")


def _as_path(path) -> GaussianPath:
    return path if isinstance(path, GaussianPath) else GaussianPath(path)


# ------------------------------------------------------------------------- prediction adapters
class VelocityAdapter(nn.Module):
    """A network predicting velocity, noise (eps) or data (x1), turned into a flow-time velocity.

    See :func:`as_velocity` for the arguments and the maths.
    """

    def __init__(self, net, prediction="velocity", path="fm-ot", time="flow", time_scale=1.0,
                 eps=1e-3):
        super().__init__()
        self.net = net
        self.prediction = check_choice("prediction", prediction, PREDICTIONS)
        self.path = _as_path(path)
        self.time = check_choice("time", time, TIMES)
        self.time_scale = check_positive("time_scale", time_scale)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 <= eps < 0.5):
            raise InvalidArgumentError(f"eps must be in [0, 0.5), got {eps!r}")
        self.eps = float(eps)

    def forward(self, x, t, **extras):
        if self.prediction != "velocity":
            t = t.clamp(self.eps, 1.0 - self.eps)  # eps / x1 conversions are singular at an end
        t_net = t if self.time == "flow" else 1.0 - t
        f = self.net(x, t_net * self.time_scale if self.time_scale != 1.0 else t_net, **extras)
        if self.prediction == "velocity":
            return f
        p = self.path
        tf = t.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        a, s, da = p.alpha(tf), p.sigma(tf), p.d_alpha(tf)
        if self.prediction == "eps":
            # u = (a'/a) x + (s' - s a'/a) f ; s' written as (s s')/s to stay finite for VP
            ds = p.sigma_dsigma(tf) / s
            cx, cf = da / a, ds - s * da / a
        elif self.prediction == "x1":  # u = (s'/s) x + (a' - a s'/s) f
            ds_over_s = p.sigma_dsigma(tf) / (s * s)
            cx, cf = ds_over_s, da - a * ds_over_s
        else:  # v = a x0 - s x1: u = ((a a' + s s') x + (a s' - s a') f) / (a^2 + s^2)
            n2 = a * a + s * s
            cx, cf = (a * da + p.sigma_dsigma(tf)) / n2, (a * p.sigma_dsigma(tf) / s - s * da) / n2
        cx, cf = _bcast(cx, x).to(x.dtype), _bcast(cf, x).to(x.dtype)
        return (cx * x + cf * f.to(x.dtype)).to(f.dtype)


def as_velocity(net: Callable, prediction: str = "velocity", path="fm-ot", time: str = "flow",
                time_scale: float = 1.0, eps: float = 1e-3) -> VelocityAdapter:
    """Turn a network into a flow-time velocity model ``u(x, t)`` (method.md section 1).

    Args:
        net: ``net(x, t_net, **extras) -> f`` with ``f`` shaped like ``x``.
        prediction: what ``net`` predicts: ``"velocity"`` (u = f), ``"eps"`` (noise x0),
            ``"x1"`` (data) or ``"v"`` (``alpha x0 - sigma x1``, diffusers' ``v_prediction``).
            With ``alpha``, ``sigma`` of ``path`` and primes d/dt:

            * eps: ``u = (alpha'/alpha) x + (sigma' - sigma alpha'/alpha) f``
            * x1:  ``u = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) f``
            * v:   ``u = ((alpha alpha' + sigma sigma') x + (alpha sigma' - sigma alpha') f)
              / (alpha^2 + sigma^2)``

            These are singular at one end of [0, 1] (eps at t = 0 where alpha = 0; x1 and v at
            t = 1 where sigma = 0 (v through sigma' for VP); eps-VP also at t = 1): for all three,
            **t is clamped to [eps, 1 - eps]** before the network is called (default eps = 1e-3).
        path: ``"fm-ot"``, ``"cosine"`` or ``"vp"`` (or a :class:`GaussianPath`).
        time: ``"flow"`` (net takes flow time, noise at 0) or ``"diffusion"`` (net takes
            ``1 - t``, noise at 1, as most diffusion code does).
        time_scale: the network receives ``time_scale * t_net`` (e.g. 1000 for DDPM-style nets).

    Returns: an ``nn.Module`` velocity model ``model(x, t[B], **extras) -> u``.

    Example::

        >>> vel = as_velocity(eps_net, prediction="eps", path="vp", time="diffusion")
        >>> x1 = bespoke_fast.solve(vel, torch.randn(8, 64), "midpoint", n_steps=10)
    """
    return VelocityAdapter(net, prediction, path, time, time_scale, eps)


# ------------------------------------------------------------------------- guidance
class GuidedModel(nn.Module):
    """Classifier-free guidance from one batched forward of size 2B; see :func:`cfg`.

    ``forward_raw(x, t, **extras)`` returns the raw ``[2B, ...]`` output (cond half first,
    uncond half second): the fused CFG kernels combine it themselves.
    """

    def __init__(self, model, scale, cond_key="y", null=0):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise InvalidArgumentError(f"cfg: scale must be a finite number, got {scale!r}")
        if isinstance(null, numbers.Real) and not math.isfinite(null):
            raise InvalidArgumentError(f"cfg: null must be a finite number, a tensor or a "
                                       f"callable, got {null!r}")
        self.model, self.scale, self.cond_key, self.null = model, float(scale), cond_key, null

    def fingerprint_config(self) -> dict:
        """Part of the model's identity (``bespoke_fast.io.model_fingerprint``): a solver or GT
        set made at one guidance scale is not silently reused at another."""
        null = self.null if isinstance(self.null, (int, float)) else getattr(
            self.null, "__qualname__", type(self.null).__name__)
        return {"scale": self.scale, "cond_key": self.cond_key, "null": null}

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        if callable(self.null):
            return self.null(cond)
        return torch.as_tensor(self.null, dtype=cond.dtype, device=cond.device).expand_as(cond)

    def doubled_inputs(self, x, t, extras):
        """``(x2, t2, extras2)`` of batch 2B: cond half first, unconditional half second."""
        return torch.cat([x, x]), torch.cat([t, t]), self.doubled_extras(extras, x.shape[0])

    def doubled_extras(self, extras: dict, batch: int, cond2=None) -> dict:
        """The extras of the ``[2 batch]`` guidance batch: per-sample tensors (first dim
        ``batch``) repeated, the condition ``cond_key`` followed by its null condition
        (``cond2``, when the caller already holds that doubled condition: used as it is)."""
        if self.cond_key not in extras:
            raise KeyError(f"cfg: the guided model needs the condition extra {self.cond_key!r} "
                           f"(got extras {sorted(extras)})")
        cond = extras[self.cond_key]
        extras2 = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.shape[:1] == (batch,)
                       else v) for k, v in extras.items() if k != self.cond_key}
        extras2[self.cond_key] = (torch.cat([cond, self.null_condition(cond)]) if cond2 is None
                                  else cond2)
        return extras2

    def forward_raw(self, x, t, **extras):
        x2, t2, extras2 = self.doubled_inputs(x, t, extras)
        return self.model(x2, t2, **extras2)

    def forward(self, x, t, **extras):
        u_cond, u_unc = self.forward_raw(x, t, **extras).chunk(2)
        return u_unc + self.scale * (u_cond - u_unc)


def cfg(model: Callable, scale: float, cond_key: str = "y", null=0) -> GuidedModel:
    """Classifier-free guidance: ``u = u_uncond + scale (u_cond - u_uncond)`` from ONE forward.

    Args:
        model: a conditional velocity model ``model(x, t, **{cond_key: c, ...})``.
        scale: guidance scale w (1.0 = the conditional model).
        cond_key: name of the condition extra (e.g. class labels ``y`` of shape [B]).
        null: the "no condition" value (scalar or tensor broadcast to the condition's shape),
            or a callable ``null(cond) -> null_cond``.

    The guided model concatenates ``[x, x]``, ``[t, t]`` and ``[cond, null]`` into one batch of
    size 2B (conditional half first) and calls ``model`` once. Other extras with a batch
    dimension are duplicated; the rest are passed through.

    Example::

        >>> guided = cfg(class_model, scale=2.0, cond_key="y", null=10)
        >>> u = guided(x, t, y=labels)
    """
    return GuidedModel(model, scale, cond_key, null)


# ------------------------------------------------------------------------- torchdiffeq order
class _FromTorchdiffeq(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, t, **extras):
        # torchdiffeq functions take one scalar time for the whole batch; every solver in this
        # package evaluates the batch at one time, so t[0] is that time.
        return self.f(t[0], x, **extras)


class _ToTorchdiffeq(nn.Module):
    def __init__(self, model, extras):
        super().__init__()
        self.model, self.extras = model, extras

    def forward(self, t, x):
        return self.model(x, t.to(x.dtype).reshape(()).expand(x.shape[0]), **self.extras)


def from_torchdiffeq(f: Callable) -> nn.Module:
    """Adapt a torchdiffeq-order function ``f(t, x)`` (scalar t) to ``model(x, t[B])``.

    The batch must share one time (true for every solver here): ``f`` gets ``t[0]``.

    Example::

        >>> model = from_torchdiffeq(lambda t, x: -x * t)
    """
    return _FromTorchdiffeq(f)


def to_torchdiffeq(model: Callable, **extras) -> nn.Module:
    """Adapt ``model(x, t[B], **extras)`` to torchdiffeq's ``f(t, x)`` (for ``odeint``).

    Example::

        >>> from torchdiffeq import odeint
        >>> xs = odeint(to_torchdiffeq(model), x0, torch.tensor([0.0, 1.0]), method="rk4")
    """
    return _ToTorchdiffeq(model, extras)


# ------------------------------------------------------------------------- exact GMM flows
class GaussianMixtureFlow(nn.Module):
    """The exact marginal velocity of a Gaussian-mixture data distribution (method.md section 7).

    Data ``p(x1) = sum_k w_k N(mu_k, tau_k^2 I)`` in ``D = prod(shape)`` dims; along ``path``::

        v_k = alpha^2 tau_k^2 + sigma^2
        u_k(t, x) = alpha' mu_k + ((alpha alpha' tau_k^2 + sigma sigma') / v_k) (x - alpha mu_k)
        u(t, x) = sum_k p(k | x, t) u_k(t, x),   p(k | x, t) ∝ w_k N(x; alpha mu_k, v_k I)

    Args:
        means: ``[K, *shape]`` component means. stds: ``[K]`` or scalar isotropic stds (> 0).
        weights: ``[K]`` (normalized here), default uniform. path: see :class:`GaussianPath`.
        name: a label used in solver files and GT manifests.

    ``forward(x, t)`` computes in float64 when x is float64, else float32; ``predict`` gives
    the eps / x1 predictions of the same flow; ``sample_data(n)`` draws from the data.

    Example::

        >>> flow = GaussianMixtureFlow(torch.randn(8, 64), torch.full((8,), 0.1))
        >>> u = flow(torch.randn(4, 64), torch.full((4,), 0.3))
    """

    def __init__(self, means, stds, weights=None, path="fm-ot", name="gmm"):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        weights = (torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None
                   else torch.as_tensor(weights, dtype=torch.float64))
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise InvalidArgumentError(f"weights must be {K} non-negative numbers with a positive sum")
        if (stds <= 0).any():
            raise InvalidArgumentError("stds must be > 0")
        self.shape = tuple(means.shape[1:])
        self.path = _as_path(path)
        self.name = name
        self.register_buffer("means", means.reshape(K, -1))
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        # Decided here, on the host, once: forward must not read a device value back (that
        # would break CUDA-graph capture and cost a sync per call). Equal stds (e.g. the digits
        # flow): v is one number per sample and the -D/2 log v term drops out of the softmax.
        self.equal_stds = bool((stds == stds[0]).all())

    def _posterior(self, x, t):
        """Flattened x [B, D], p(k|x,t) [B, K], and the path scalars a, s (each [B, 1]),
        v and tau^2 ([B, K] and [K], or [B, 1] and [1] when all stds are equal), t [B, 1]."""
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.reshape(x.shape[0], -1).to(dt)
        mu = self.means.to(dt)
        t = t.to(dt).reshape(-1, 1)
        a, s = self.path.alpha(t), self.path.sigma(t)
        uniform = self.equal_stds  # decided at construction: no host read here
        tau2 = (self.stds[:1] if uniform else self.stds).to(dt) ** 2
        v = a * a * tau2 + s * s                                   # [B, 1] or [B, K]
        # ||x - a mu_k||^2 = ||x||^2 - 2 a x.mu_k + a^2 ||mu_k||^2, with one matmul
        sq = (xf * (-2 * a)) @ mu.T + (a * a) * (mu * mu).sum(1) + (xf * xf).sum(1, keepdim=True)
        logp = self.log_weights.to(dt) - (0.5 / v) * sq
        if not uniform:
            logp = logp - (0.5 * xf.shape[1]) * torch.log(v)
        return xf, torch.softmax(logp, dim=1), a, s, v, tau2, t

    def forward(self, x, t, **extras):
        xf, p, a, s, v, tau2, tt = self._posterior(x, t)
        da, ssd = self.path.d_alpha(tt), self.path.sigma_dsigma(tt)
        c = (a * da * tau2 + ssd) / v                              # [B, K] or [B, 1]
        mu = self.means.to(xf.dtype)
        # u = sum_k p_k [c_k x + (a' - a c_k) mu_k]
        if c.shape[1] == 1:
            u = c * xf + (da - a * c) * (p @ mu)
        else:
            u = (p * c).sum(1, keepdim=True) * xf + (p * (da - a * c)) @ mu
        return u.reshape(x.shape).to(x.dtype)

    def predict(self, x, t, kind="eps"):
        """The same flow as an eps-, x1- or v-prediction network (for adapter tests)."""
        check_choice("kind", kind, PREDICTIONS)
        u = self.forward(x, t)
        if kind == "velocity":
            return u
        dt = u.dtype
        tt = _bcast(t.to(dt), x)
        a, s, da = self.path.alpha(tt), self.path.sigma(tt), self.path.d_alpha(tt)
        ds = self.path.sigma_dsigma(tt) / s
        eps = (u - da / a * x) / (ds - s * da / a)    # u = (a'/a) x + (s' - s a'/a) eps
        if kind == "eps":
            return eps
        x1 = (u - ds / s * x) / (da - a * ds / s)
        return x1 if kind == "x1" else a * eps - s * x1  # v = a x0 - s x1

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from the data distribution, shape ``[n, *shape]``, float32."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        return (self.means[k] + self.stds[k, None] * z).reshape(n, *self.shape).float()


def digits_data() -> torch.Tensor:
    """The 1797 sklearn digits (8x8), scaled from [0, 16] to [-1, 1]: ``[1797, 1, 8, 8]`` float32.

    Needs scikit-learn (offline: the data ships with it).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("the digits data needs scikit-learn: pip install scikit-learn",
                                     name="sklearn") from e
    images = torch.tensor(load_digits().images, dtype=torch.float32)
    return (images / 8.0 - 1.0).reshape(-1, 1, 8, 8)


def digits_flow(path="fm-ot", std: float = 0.02) -> GaussianMixtureFlow:
    """The exact ("memorizing") flow of the 1797 sklearn digits in [-1, 1]: one mixture component
    per image with a tiny isotropic ``std``; stiff near t = 1 like real image models.
    Sample shape ``[1, 8, 8]``."""
    data = digits_data()
    return GaussianMixtureFlow(data, std, path=path, name=f"digits-exact-{_as_path(path).name}")
