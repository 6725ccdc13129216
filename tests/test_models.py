import math

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast.models import PATHS, GaussianMixtureFlow, GaussianPath, digits_flow
from tests.helpers import noise, smooth_gmm


@pytest.mark.parametrize("path", PATHS)
def test_path_derivatives_match_finite_differences(path):
    p = GaussianPath(path)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    e = 1e-6
    da_fd = (p.alpha(t + e) - p.alpha(t - e)) / (2 * e)
    ds_fd = (p.sigma(t + e) - p.sigma(t - e)) / (2 * e)
    assert torch.allclose(p.d_alpha(t), da_fd, atol=1e-7)
    assert torch.allclose(p.d_sigma(t), ds_fd, atol=1e-7)
    assert torch.allclose(p.sigma_dsigma(t), p.sigma(t) * p.d_sigma(t), atol=1e-12)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(p.alpha(ends), torch.tensor([0.0, 1.0], dtype=torch.float64), atol=7e-3)
    # VP only approximately reaches the ends: alpha_0 = xi(1) ~ 6.6e-3, sigma_0 = sqrt(1 - alpha_0^2)
    assert torch.allclose(p.sigma(ends), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=3e-5)


@pytest.mark.parametrize("path", PATHS)
def test_gmm_flow_satisfies_continuity_equation(path):
    """d/dt log p + grad log p . u + div u = 0 for the exact marginal density p_t and velocity u."""
    flow = smooth_gmm(dim=2, k=3, path=path)
    mu, tau2, logw = flow.means, flow.stds ** 2, flow.log_weights
    pth = GaussianPath(path)

    def log_p(x, t):  # x [N, 2], t scalar tensor
        a, s = pth.alpha(t), pth.sigma(t)
        v = a * a * tau2 + s * s
        sq = ((x[:, None, :] - a * mu[None]) ** 2).sum(-1)
        return torch.logsumexp(logw - 0.5 * sq / v - math.log(2 * math.pi) * 1.0 - torch.log(v), dim=1)

    x = noise(6, 2, seed=3).requires_grad_(True)
    for tv in (0.2, 0.5, 0.8):
        t = torch.tensor(tv, dtype=torch.float64)
        e = 1e-5
        dlogp_dt = (log_p(x, t + e) - log_p(x, t - e)) / (2 * e)
        grad = torch.autograd.grad(log_p(x, t).sum(), x)[0]
        u = flow(x, t.expand(6))
        div = sum(torch.autograd.grad(u[:, j].sum(), x, retain_graph=True)[0][:, j] for j in range(2))
        residual = dlogp_dt + (grad * u).sum(1) + div
        assert residual.abs().max() < 1e-6, (tv, residual)


def test_gmm_flow_pushes_noise_to_the_mixture_moments():
    flow = smooth_gmm(dim=3, k=3, std_range=(0.2, 0.4))
    x1 = bf.solve(flow, noise(4000, 3, seed=5), "rk4", n_steps=40)
    w = flow.log_weights.exp()
    mean = w @ flow.means
    second = sum(w[k] * (torch.outer(flow.means[k], flow.means[k]) + flow.stds[k] ** 2 * torch.eye(3,
                 dtype=torch.float64)) for k in range(3))
    cov = second - torch.outer(mean, mean)
    # Monte-Carlo error with 4000 samples: std of the mean ~ sqrt(var/4000) ~ 0.02 here
    assert (x1.mean(0) - mean).abs().max() < 0.08
    assert (torch.cov(x1.T) - cov).abs().max() < 0.15
    data = flow.sample_data(4000, generator=torch.Generator().manual_seed(0)).double()
    assert (data.mean(0) - mean).abs().max() < 0.08


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", ["eps", "x1"])
@pytest.mark.parametrize("time", ["flow", "diffusion"])
def test_as_velocity_recovers_the_exact_velocity(path, prediction, time):
    flow = smooth_gmm(dim=6, k=3, path=path)

    def net(x, t_net):
        t = t_net if time == "flow" else 1 - t_net
        return flow.predict(x, t, prediction)

    vel = bf.as_velocity(net, prediction=prediction, path=path, time=time)
    x = noise(5, 6)
    for tv in (0.1, 0.5, 0.9):
        t = torch.full((5,), tv, dtype=torch.float64)
        assert torch.allclose(vel(x, t), flow(x, t), atol=1e-10)


def test_as_velocity_clamps_t_at_the_singular_ends():
    flow = smooth_gmm(dim=4, k=2, path="fm-ot")
    vel = bf.as_velocity(lambda x, t: flow.predict(x, t, "eps"), prediction="eps", path="fm-ot")
    u = vel(noise(3, 4), torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(u).all()
    assert torch.allclose(u, flow(noise(3, 4), torch.full((3,), 1e-3, dtype=torch.float64)), atol=1e-8)


def test_as_velocity_time_scale_and_bad_arguments():
    seen = {}

    def net(x, t):
        seen["t"] = t
        return x

    bf.as_velocity(net, time="diffusion", time_scale=1000.0)(torch.zeros(2, 3), torch.full((2,), 0.25))
    assert torch.allclose(seen["t"], torch.full((2,), 750.0))
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        bf.as_velocity(net, prediction="score")
    with pytest.raises(ValueError, match="unknown path 've'"):
        bf.as_velocity(net, path="ve")
    with pytest.raises(ValueError, match="unknown time"):
        bf.as_velocity(net, time="reverse")


class _ConditionalToy(torch.nn.Module):
    """u = -x + y (broadcast); counts forwards and records batch sizes."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return -x + y[:, None].to(x.dtype) * t[:, None]


def test_cfg_scale_one_is_the_conditional_model_with_one_forward():
    toy = _ConditionalToy()
    guided = bf.cfg(toy, scale=1.0, cond_key="y", null=0)
    x, t, y = noise(4, 3), torch.full((4,), 0.5, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    assert torch.allclose(guided(x, t, y=y), toy(x, t, y))
    assert toy.batches[0] == 8  # one batched forward of size 2B


def test_cfg_combines_cond_and_uncond():
    toy = _ConditionalToy()
    x, t, y = noise(4, 3), torch.full((4,), 0.5, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    u_c, u_u = toy(x, t, y), toy(x, t, torch.zeros_like(y))
    assert torch.allclose(bf.cfg(toy, 3.0)(x, t, y=y), u_u + 3.0 * (u_c - u_u))
    with pytest.raises(KeyError, match="needs the condition extra 'y'"):
        bf.cfg(toy, 2.0)(x, t)


def test_torchdiffeq_adapters_round_trip():
    flow = smooth_gmm(dim=4, k=2)
    x, t = noise(3, 4), torch.full((3,), 0.3, dtype=torch.float64)
    f = bf.to_torchdiffeq(flow)
    assert torch.allclose(f(torch.tensor(0.3, dtype=torch.float64), x), flow(x, t))
    assert torch.allclose(bf.from_torchdiffeq(f)(x, t), flow(x, t))


def test_gmm_bad_arguments():
    with pytest.raises(ValueError, match="stds must be > 0"):
        GaussianMixtureFlow(torch.zeros(2, 3), torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureFlow(torch.zeros(2, 3), 0.1, weights=[1.0, -1.0])


def test_digits_flow_shape_and_range():
    flow = digits_flow()
    assert flow.shape == (1, 8, 8) and flow.means.shape == (1797, 64)
    assert flow.means.min() == -1 and flow.means.max() == 1
    u = flow(torch.randn(4, 1, 8, 8), torch.full((4,), 0.5))
    assert u.shape == (4, 1, 8, 8) and u.dtype == torch.float32 and torch.isfinite(u).all()
