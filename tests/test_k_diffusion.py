"""k-diffusion's sampler convention (``bespoke_fast.integrations.k_diffusion``), checked against
k-diffusion itself: its ``sampling`` module is the peer.

How the peer is imported: ``import k_diffusion`` runs the package's ``__init__``, which imports
its training stack (torchvision, kornia, clip, wandb, ...). ``k_diffusion/sampling.py`` needs
only torch, scipy, torchdiffeq, torchsde and tqdm, plus ``append_dims`` from
``k_diffusion.utils`` (a module that imports torchvision). So when ``import k_diffusion.sampling``
fails on a missing dependency of the package, the installed ``sampling.py`` is loaded on its own
under a private package name, next to a stand-in ``utils`` that provides ``append_dims``
(``x[..., None, ...]`` up to the wanted rank). Install it without its dependencies::

    pip install --no-deps k-diffusion && pip install torchsde scipy torchdiffeq tqdm

The peer tests skip (with that reason) only where k-diffusion is not installed at all.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast._checks import InvalidArgumentError, InvalidTypeError, MismatchError
from bespoke_fast.integrations.k_diffusion import (SigmaTime, denoiser, fitted_range, sampler,
                                                   solver_sigmas, velocity_model)

F64 = torch.float64
RANGES = {"edm": (0.002, 80.0), "const": (0.005, 1.0)}
PEER_NAME = "_bespoke_fast_k_diffusion_peer"


def _load_k_diffusion_sampling():
    """k-diffusion's ``sampling`` module (see the module docstring), or ``None`` when k-diffusion
    is not installed."""
    try:
        import k_diffusion.sampling as ks
        return ks
    except ImportError:
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    if PEER_NAME + ".sampling" in sys.modules:
        return sys.modules[PEER_NAME + ".sampling"]
    package = types.ModuleType(PEER_NAME)
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType(PEER_NAME + ".utils")

    def append_dims(x, target_dims):        # k_diffusion.utils.append_dims' contract
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    sys.modules[PEER_NAME], sys.modules[PEER_NAME + ".utils"] = package, utils
    return importlib.import_module(PEER_NAME + ".sampling")


@pytest.fixture(scope="module")
def ks():
    module = _load_k_diffusion_sampling()
    if module is None:
        pytest.skip("k-diffusion is not installed: pip install --no-deps k-diffusion "
                    "&& pip install torchsde")
    return module


class GMMDenoiser(torch.nn.Module):
    """The exact k-diffusion denoiser ``E[x0 | x]`` of a Gaussian mixture
    ``sum_k w_k N(mu_k, tau_k^2 I)`` at noise level sigma, with ``x = c x0 + sigma n``,
    ``c = 1`` ("edm") or ``1 - sigma`` ("const"): per component ``x | k ~ N(c mu_k, v_k I)``,
    ``v_k = c^2 tau_k^2 + sigma^2``, ``E[x0 | x, k] = mu_k + (c tau_k^2 / v_k) (x - c mu_k)``.
    The extra ``scale`` multiplies the output (tests that extras reach the denoiser)."""

    def __init__(self, parameterization, dim=8, k=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("mu", torch.randn(k, dim, generator=g, dtype=F64) * 0.8)
        self.register_buffer("tau", 0.1 + 0.3 * torch.rand(k, generator=g, dtype=F64))
        self.parameterization = parameterization
        self.calls = []

    def forward(self, x, sigma, scale=None):
        self.calls.append(sigma.detach().clone())
        s = sigma.to(F64).reshape(-1, 1, 1)
        c = 1.0 if self.parameterization == "edm" else 1 - s
        xk = x.to(F64).reshape(x.shape[0], 1, -1)
        tau2 = self.tau[None, :, None] ** 2
        v = c * c * tau2 + s * s
        logp = (-0.5 * ((xk - c * self.mu[None]) ** 2).sum(-1, keepdim=True) / v
                - 0.5 * xk.shape[-1] * torch.log(v))
        post = self.mu[None] + c * tau2 / v * (xk - c * self.mu[None])     # E[x0 | x, k]
        d = (torch.softmax(logp, 1) * post).sum(1)
        if scale is not None:
            d = d * (scale.to(F64).reshape(-1, 1) if isinstance(scale, torch.Tensor) else scale)
        return d.reshape(x.shape).to(x.dtype)


def edm_factory():
    """``--model tests.test_k_diffusion:edm_factory``: a wrapped k-diffusion (EDM) denoiser."""
    lo, hi = RANGES["edm"]
    return {"model": velocity_model(GMMDenoiser("edm"), "edm", sigma_min=lo, sigma_max=hi),
            "shape": (8,), "data_range": 4.0}


def _noise(param, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=F64) * RANGES[param][1]


def _close(a, b, rtol):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= rtol * scale, float((a - b).abs().max()) / scale


# ----------------------------------------------------------------------------- the time change
@pytest.mark.parametrize("param", ["edm", "const"])
def test_time_change_ends_inverse_and_affine_scales(param):
    lo, hi = RANGES[param]
    tc = SigmaTime(param, lo, hi)
    t = torch.linspace(0, 1, 101, dtype=F64)
    sig = tc.sigma(t)
    assert float(sig[0]) == pytest.approx(hi, rel=1e-15)
    assert float(sig[-1]) == pytest.approx(lo, rel=1e-13)
    assert bool((sig.diff() < 0).all())
    _close(tc.time(sig), t, 1e-12)
    for f in (tc.scale, tc.noise):               # affine in t: the Euler equivalence rests on it
        assert float(f(t).diff(n=2).abs().max()) < 1e-14
    assert float(tc.scale(torch.tensor(0.0, dtype=F64))) == pytest.approx(1 / hi)
    assert float(tc.scale(torch.tensor(1.0, dtype=F64))) == 1.0
    flow = SigmaTime("const", lo, 1.0)             # const from sigma 1: the FM-OT flow, s = 1
    assert float((flow.scale(t) - 1).abs().max()) == 0
    _close(flow.sigma(t), 1 - t * (1 - lo), 1e-15)


@pytest.mark.parametrize("param", ["edm", "const"])
def test_velocity_model_is_the_exact_mixture_flow_in_changed_time(param):
    """velocity_model(exact denoiser) against the library's own exact FM-OT mixture flow.

    The flow state is ``y = m x_fm(t')`` with ``m = s c + q`` (edm: s + q; const: s),
    ``t' = s c / m`` and ``dt'/dt = kappa / m^2``, so
    ``u = m' x_fm + (kappa / m) u_fm(t', x_fm)``."""
    lo, hi = RANGES[param]
    d = GMMDenoiser(param)
    model = velocity_model(d, param, sigma_min=lo, sigma_max=hi)
    flow = bf.GaussianMixtureFlow(d.mu, d.tau, path="fm-ot")
    tc = model.time
    t = torch.linspace(0, 1, 9, dtype=F64)
    y = torch.randn(9, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    s, q = tc.scale(t), tc.noise(t)
    sigma = q / s
    c = torch.ones_like(sigma) if param == "edm" else 1 - sigma
    m = s * c + q
    dm = ((1 - 1 / hi) - (1 - lo) if param == "edm" else 1 - 1 / hi) + 0 * t    # m' (constant)
    x_fm = y / m[:, None]
    want = dm[:, None] * x_fm + (tc.kappa / m)[:, None] * flow(x_fm, s * c / m)
    _close(model(y, t), want, 1e-10)


@pytest.mark.parametrize("param", ["edm", "const"])
def test_the_two_adapters_are_inverse(param):
    lo, hi = RANGES[param]
    d = GMMDenoiser(param)
    x = _noise(param)
    sig = torch.linspace(hi, lo, 6, dtype=F64)
    back = denoiser(velocity_model(d, param, lo, hi), param, lo, hi)
    _close(back(x, sig), d(x, sig), 1e-12)
    flow = bf.GaussianMixtureFlow(d.mu, d.tau, path="fm-ot")
    again = velocity_model(denoiser(flow, param, lo, hi), param, lo, hi)
    t = torch.linspace(0, 1, 6, dtype=F64)
    _close(again(x / hi, t), flow(x / hi, t), 1e-12)


def test_an_fm_ot_velocity_model_is_the_usual_flow_denoiser():
    flow = bf.GaussianMixtureFlow(torch.randn(3, 8, dtype=F64), 0.2, path="fm-ot")
    D = denoiser(flow, "const", sigma_min=0, sigma_max=1)
    x, sig = torch.randn(5, 8, dtype=F64), torch.tensor([1.0, 0.7, 0.3, 0.01, 0.0], dtype=F64)
    _close(D(x, sig), x + sig[:, None] * flow(x, 1 - sig), 1e-13)


def test_bad_ranges_and_models_are_refused_with_one_line():
    d = GMMDenoiser("edm")
    for kwargs, match in [(dict(parameterization="ve"), "unknown parameterization"),
                          (dict(sigma_min=0.0), "sigma_min must be > 0"),
                          (dict(sigma_min=5.0, sigma_max=1.0), "sigma_max must be > sigma_min"),
                          (dict(parameterization="const", sigma_max=2.0), "needs sigma_max <= 1"),
                          (dict(sigma_max=float("inf")), "must be finite")]:
        args = dict(parameterization="edm", sigma_min=0.002, sigma_max=80.0) | kwargs
        with pytest.raises(InvalidArgumentError, match=match):
            velocity_model(d, **args)
    with pytest.raises(InvalidArgumentError, match="pass sigma_min= and sigma_max="):
        velocity_model(d, "edm")
    with pytest.raises(InvalidTypeError, match="sigma_min must be a real number"):
        velocity_model(d, "edm", sigma_min="0.002", sigma_max=80.0)
    with pytest.raises(InvalidTypeError, match="callable"):
        velocity_model("not a model", "edm", 0.002, 80.0)
    d.sigma_min, d.sigma_max = 0.01, 10.0          # k-diffusion wrappers carry their range
    assert velocity_model(d, "edm").time.config()["sigma_max"] == 10.0
    bad = velocity_model(lambda x, sigma: x[:, :3], "edm", 0.002, 80.0)
    with pytest.raises(bf.ModelContractError, match="returned shape"):
        bad(torch.randn(2, 8), torch.rand(2))


# ----------------------------------------------------------------------------- against k-diffusion
@pytest.mark.parametrize("param", ["edm", "const"])
@pytest.mark.parametrize("kind", ["rk1", "bns"])
@pytest.mark.parametrize("final_zero", [True, False])
def test_identity_euler_solvers_equal_sample_euler(ks, param, kind, final_zero):
    """On the sigmas that are the image of the solver's grid, Bespoke RK1 at the identity (and
    BNS written as Euler) IS k-diffusion's Euler: s and q are affine in t."""
    lo, hi = RANGES[param]
    solver = bf.BespokeSolver("rk1", 6) if kind == "rk1" else bf.NonStationarySolver(6, "euler")
    sigmas = solver_sigmas(solver, param, lo, hi, final_zero=final_zero, dtype=F64)
    x, d = _noise(param), GMMDenoiser(param)
    ours = sampler(solver, parameterization=param, sigma_min=lo, sigma_max=hi)(d, x, sigmas,
                                                                              disable=True)
    _close(ours, ks.sample_euler(d, x, sigmas, disable=True), 1e-12)
    assert len(d.calls) == 2 * (6 + final_zero)                # NFE: n (+ the final step)


def _dpm2_as_bespoke(tc, sigmas):
    """k-diffusion's ``sample_dpm_2`` on ``sigmas`` (sigma_max ... sigma_min) as a Bespoke RK2
    solver: the stage at the geometric mean noise level, and the scale table undoing the time
    change's own scale so that stage 2 uses only the stage's velocity (docs/method.md
    section 9). With ``s`` affine (``s' = k``) and ``dsigma/dt`` from ``sigma = q / s``, the
    step coefficients ``A .. E`` of method.md section 4 must be
    ``B = (sigma_m - sigma_i) S_m / (S_0 sigma'_0)``, ``A = (S_m - B k) / S_0``,
    ``C = S_1 / S_0``, ``E = S_1 (sigma_(i+1) - sigma_i) / (S_m sigma'_m)``, ``D = -E k / S_m``."""
    sig = torch.as_tensor(sigmas, dtype=F64)
    n, mid = sig.numel() - 1, (sig[:-1] * sig[1:]).sqrt()
    t = torch.empty(2 * n + 1, dtype=F64)
    t[0::2], t[1::2] = tc.time(sig), tc.time(mid)
    t[0], t[-1] = 0.0, 1.0
    h, k = 1.0 / n, 1 - 1 / tc.sigma_max
    S = tc.scale(t)
    dsig = (-tc.decay * S - tc.noise(t) * k) / S ** 2
    s = torch.ones(2 * n + 1, dtype=F64)
    tdot, sdot = torch.empty(2 * n, dtype=F64), torch.empty(2 * n, dtype=F64)
    for i in range(n):
        k0, km, k1 = 2 * i, 2 * i + 1, 2 * i + 2
        B = (mid[i] - sig[i]) * S[km] / (S[k0] * dsig[k0])
        A = (S[km] - B * k) / S[k0]
        s[km] = s[k0]
        sdot[k0], tdot[k0] = (A * s[km] - s[k0]) / (h / 2), B * s[km] / ((h / 2) * s[k0])
        E = S[k1] * (sig[i + 1] - sig[i]) / (S[km] * dsig[km])
        s[k1] = s[k0] * S[k0] / S[k1]
        tdot[km], sdot[km] = E * s[k1] / (h * s[km]), -E * k / S[km] * s[k1] / h
    return bf.BespokeSolver.from_tables("rk2", t, tdot, s, sdot)


@pytest.mark.parametrize("param", ["edm", "const"])
def test_sample_dpm_2_is_a_bespoke_rk2_solver_and_identity_rk2_differs(ks, param):
    lo, hi = RANGES[param]
    tc = SigmaTime(param, lo, hi)
    ramp = torch.linspace(0, 1, 6, dtype=F64)                     # Karras rho = 7, in float64
    schedule = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    solver = _dpm2_as_bespoke(tc, schedule)
    sigmas = solver_sigmas(solver, param, lo, hi, dtype=F64)
    _close(sigmas[:-1], schedule, 1e-12)
    x, d = _noise(param), GMMDenoiser(param)
    run = sampler(solver, parameterization=param, sigma_min=lo, sigma_max=hi)
    _close(run(d, x, sigmas, disable=True), ks.sample_dpm_2(d, x, sigmas, disable=True), 1e-10)
    # identity RK2 is the midpoint rule in flow time: its stage sits at sigma(t + h/2), not at
    # the geometric mean, so on its own grid it is NOT sample_dpm_2
    ident = bf.BespokeSolver("rk2", 5)
    grid = solver_sigmas(ident, param, lo, hi, dtype=F64)
    ours = sampler(ident, parameterization=param, sigma_min=lo, sigma_max=hi)(d, x, grid,
                                                                             disable=True)
    assert float((ours - ks.sample_dpm_2(d, x, grid, disable=True)).abs().max()) > 1e-3


def test_identity_rk2_is_the_midpoint_rule_in_sigma_for_const_from_1(ks):
    """const with sigma_max = 1 (s = 1, sigma affine in t): identity RK2 is k-diffusion's
    ``sample_dpm_2`` with the arithmetic instead of the geometric midpoint."""
    lo, hi = RANGES["const"]
    solver = bf.BespokeSolver("rk2", 5)
    sigmas = solver_sigmas(solver, "const", lo, hi, dtype=F64)
    x, d = _noise("const"), GMMDenoiser("const")
    want = x
    ones = x.new_ones(x.shape[0])
    for i in range(5):
        s0, s1 = sigmas[i], sigmas[i + 1]
        sm = (s0 + s1) / 2
        x_mid = want + (sm - s0) * ks.to_d(want, s0, d(want, s0 * ones))
        want = want + (s1 - s0) * ks.to_d(x_mid, sm, d(x_mid, sm * ones))
    want = d(want, sigmas[5] * ones)                  # the final step to sigma = 0
    got = sampler(solver, parameterization="const", sigma_min=lo, sigma_max=hi)(d, x, sigmas,
                                                                               disable=True)
    _close(got, want, 1e-12)


def test_identity_rk2_and_sample_heun_converge_to_the_same_ode_at_second_order(ks):
    """Heun is not in the Bespoke family (its second call sits at the next grid sigma, where
    the next step calls again; a Bespoke stage lies strictly inside its step); both are
    second-order solvers of the same ODE, which the adaptive reference pins down."""
    lo, hi = RANGES["const"]
    x, d = _noise("const", n=16), GMMDenoiser("const")
    ref = bf.solve_adaptive(velocity_model(d, "const", lo, hi), x / hi, [0.0, 1.0], rtol=1e-9,
                            atol=1e-9)[-1]

    def errors(n):
        solver = bf.BespokeSolver("rk2", n)
        sigmas = solver_sigmas(solver, "const", lo, hi, final_zero=False, dtype=F64)
        ours = sampler(solver, parameterization="const", sigma_min=lo, sigma_max=hi)(
            d, x, sigmas, disable=True)
        heun = ks.sample_heun(d, x, sigmas, disable=True)
        return [float((v - ref).pow(2).mean().sqrt()) for v in (ours, heun)]

    coarse, fine = errors(8), errors(16)
    for e1, e2 in zip(coarse, fine):       # ~4 asymptotically; a first-order solver gives ~2
        assert e1 / e2 > 2.8, (coarse, fine)


# ----------------------------------------------------------------------------- a fitted solver
@pytest.fixture(scope="module", params=["edm", "const"])
def fitted(request, tmp_path_factory):
    """A Bespoke RK2 solver (NFE 6) fitted briefly to the exact mixture denoiser (~2 s)."""
    param = request.param
    lo, hi = RANGES[param]
    d = GMMDenoiser(param)
    model = velocity_model(d, param, sigma_min=lo, sigma_max=hi)
    out = tmp_path_factory.mktemp(f"kd_{param}")
    bf.generate_trajectories(model, 64, (8,), out, progress=False, measure_interpolation=0)
    solver, _ = bf.train(model, bf.load_trajectories(out), base="rk2", n_steps=3, iters=1,
                         finetune_iters=40, polish_iters=1, lr=3e-2, val=16, batch_size=32,
                         patience=None, init="identity", progress=False)
    return param, d, solver


def test_a_fitted_solver_beats_identity_and_dpm_2_against_an_adaptive_reference(ks, fitted):
    param, d, solver = fitted
    lo, hi = RANGES[param]
    assert fitted_range(solver) == SigmaTime(param, lo, hi)        # recorded when it was fitted
    x = _noise(param, n=32, seed=5)
    ref = ks.sample_dpm_adaptive(d, x, lo, hi, rtol=1e-6, atol=1e-6, disable=True)
    # k-diffusion's adaptive solver (in log sigma) and ours (in flow time) agree: the time
    # change is the same ODE end to end
    ours_ref = bf.solve_adaptive(velocity_model(d, param, lo, hi), x / hi, [0.0, 1.0],
                                 rtol=1e-7, atol=1e-7)[-1]
    _close(ours_ref, ref, 1e-5)

    def psnr(v):                    # mean per-sample PSNR (R = 4): what the trainer maximises
        return float((10 * torch.log10(16 / (v - ref).pow(2).mean(1))).mean())

    got = sampler(solver)(d, x, solver_sigmas(solver, final_zero=False, dtype=F64), disable=True)
    ident = bf.BespokeSolver("rk2", 3)
    base = sampler(ident, parameterization=param, sigma_min=lo, sigma_max=hi)(
        d, x, solver_sigmas(ident, param, lo, hi, final_zero=False, dtype=F64), disable=True)
    ramp = torch.linspace(0, 1, 4, dtype=F64)
    karras = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    dpm2 = ks.sample_dpm_2(d, x, karras, disable=True)             # NFE 5 (its last step: Euler)
    # measured: about +5 to +7 dB over identity RK2, +28 to +38 dB over sample_dpm_2
    assert psnr(got) > max(psnr(base), psnr(dpm2)) + 3, (psnr(got), psnr(base), psnr(dpm2))
    # the same solver written exactly in BNS form samples the same, through the same function
    bns = bf.NonStationarySolver.from_solver(solver)
    bns.meta = solver.meta
    _close(sampler(bns)(d, x, karras, disable=True), got, 1e-9)
    # FastSampler (float32 state; its reference ops on CPU) agrees with the reference path
    x32 = x.float()
    fast = sampler(solver, fast=True)(d, x32, karras.float(), disable=True)
    slow = sampler(solver, fast=False)(d, x32, karras.float(), disable=True)
    assert fast.dtype == torch.float32
    _close(fast, slow, 1e-5)


def test_the_sigmas_must_span_the_fitted_range(fitted):
    param, d, solver = fitted
    lo, hi = RANGES[param]
    run = sampler(solver)
    x = _noise(param)
    for sigmas, what in [(torch.linspace(hi * 0.9, lo, 5), "sigmas run from"),
                         (torch.cat([torch.linspace(hi, lo * 3, 5), torch.zeros(1)]),
                          rf"to {lo * 3:.6g} \(last non-zero\)")]:
        with pytest.raises(MismatchError, match=what):
            run(d, x, sigmas.to(F64), disable=True)
    with pytest.warns(UserWarning, match="running the solver's grid on the given range"):
        out = sampler(solver, allow_range_mismatch=True)(d, x, torch.linspace(hi * 0.9, lo, 5),
                                                         disable=True)
    assert bool(torch.isfinite(out).all())
    for bad, error, match in [(torch.tensor([hi]), InvalidArgumentError, "at least 2"),
                              (torch.tensor([lo, hi]), InvalidArgumentError, "decrease"),
                              (torch.tensor([hi, 0.0, lo]), InvalidArgumentError, "only the last"),
                              ("sigmas", InvalidTypeError, "1-D tensor")]:
        with pytest.raises(error, match=match):
            run(d, x, bad, disable=True)
    with pytest.raises(MismatchError, match="fitted with sigma_max"):
        sampler(solver, sigma_max=hi * 2)
    with pytest.raises(MismatchError, match="fitted with parameterization"):
        sampler(solver, parameterization="const" if param == "edm" else "edm")
    with pytest.raises(InvalidArgumentError, match="records no k-diffusion sigma range"):
        sampler(bf.BespokeSolver("rk2", 3))
    with pytest.raises(InvalidTypeError, match="fitted BespokeSolver"):
        sampler("solver.json")


def test_extras_reach_the_denoiser_on_both_paths(ks):
    lo, hi = RANGES["edm"]
    solver = bf.BespokeSolver("rk1", 4)
    sigmas = solver_sigmas(solver, "edm", lo, hi, dtype=F64)
    x, d = _noise("edm"), GMMDenoiser("edm")
    scale = torch.linspace(0.5, 1.5, x.shape[0], dtype=F64)       # a per-sample tensor extra
    run = sampler(solver, parameterization="edm", sigma_min=lo, sigma_max=hi)
    want = ks.sample_euler(d, x, sigmas, extra_args={"scale": scale}, disable=True)
    _close(run(d, x, sigmas, extra_args={"scale": scale}, disable=True), want, 1e-12)
    assert float((want - ks.sample_euler(d, x, sigmas, disable=True)).abs().max()) > 1e-2
    fast = sampler(solver, parameterization="edm", sigma_min=lo, sigma_max=hi, fast=True)
    _close(fast(d, x.float(), sigmas.float(), extra_args={"scale": scale.float()}, disable=True),
           want.float(), 1e-5)
    model = velocity_model(d, "edm", lo, hi)                        # and through the adapter
    t = torch.full((x.shape[0],), 0.5, dtype=F64)
    assert not torch.allclose(model(x / hi, t, scale=scale), model(x / hi, t))


@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_callback_gets_k_diffusions_dict_per_step(ks, base):
    lo, hi = RANGES["edm"]
    solver = bf.BespokeSolver(base, 4)
    sigmas = solver_sigmas(solver, "edm", lo, hi, dtype=F64)
    x, d = _noise("edm"), GMMDenoiser("edm")
    ours, theirs = [], []
    sampler(solver, parameterization="edm", sigma_min=lo, sigma_max=hi)(
        d, x, sigmas, callback=ours.append, disable=True)
    assert [c["i"] for c in ours] == list(range(5))                # 4 steps + the final step
    assert all(set(c) == {"x", "i", "sigma", "sigma_hat", "denoised"} for c in ours)
    assert all(isinstance(c["sigma"], torch.Tensor) and c["sigma"].dim() == 0 for c in ours)
    _close(torch.stack([c["sigma"] for c in ours]), sigmas[:-1], 1e-12)
    assert all(torch.equal(c["sigma"], c["sigma_hat"]) for c in ours)
    if base == "rk1":       # the same states and denoised estimates as sample_euler's callbacks
        ks.sample_euler(d, x, sigmas, callback=theirs.append, disable=True)
        assert [c["i"] for c in theirs] == list(range(5))
        for a, b in zip(ours, theirs):
            _close(a["x"], b["x"], 1e-12)
            _close(a["denoised"], b["denoised"], 1e-12)
            assert float(a["sigma"]) == pytest.approx(float(b["sigma"]), rel=1e-14)


def test_disable_controls_the_progress_bar(capsys):
    lo, hi = RANGES["edm"]
    solver = bf.BespokeSolver("rk1", 3)
    run = sampler(solver, parameterization="edm", sigma_min=lo, sigma_max=hi)
    sigmas = solver_sigmas(solver, "edm", lo, hi, dtype=F64)
    run(GMMDenoiser("edm"), _noise("edm"), sigmas, disable=False)
    assert "4/4" in capsys.readouterr().err                         # 3 steps + the final step
    run(GMMDenoiser("edm"), _noise("edm"), sigmas, disable=True)
    assert capsys.readouterr().err == ""


def test_cli_fits_a_factory_that_returns_a_wrapped_k_diffusion_denoiser(tmp_path, capsys,
                                                                        monkeypatch):
    from bespoke_fast.cli import main
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # no plots here (test_fit_job has them)
    out = tmp_path / "fit"
    argv = ["fit", "--model", "tests.test_k_diffusion:edm_factory", "--nfe", "4", "--out",
            str(out), "--num-train", "40", "--num-heldout", "16", "--iters", "3",
            "--finetune-iters", "2", "--batch-size", "8", "--device", "cpu", "--quiet", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "tests.test_k_diffusion:edm_factory"
    solver = bf.load_solver(next(out.glob("*_nfe4.json")))
    lo, hi = RANGES["edm"]
    assert fitted_range(solver) == SigmaTime("edm", lo, hi)        # recorded in the solver file
    x = _noise("edm")
    sigmas = torch.cat([torch.linspace(hi, lo, 7, dtype=F64), torch.zeros(1, dtype=F64)])
    got = sampler(solver)(GMMDenoiser("edm"), x, sigmas, disable=True)
    assert got.shape == x.shape and bool(torch.isfinite(got).all())


@pytest.mark.parametrize("kind", ["rk2", "bns"])
def test_the_adapter_adds_no_host_read_to_the_captured_loop(kind):
    """FastSampler's CUDA graph sees the adapter's arithmetic only: checked on the meta device."""
    solver = bf.BespokeSolver("rk2", 3) if kind == "rk2" else bf.NonStationarySolver(4)
    model = velocity_model(GMMDenoiser("edm"), "edm", *RANGES["edm"])
    report = bf.check_capturable(model, solver, (8,))
    assert report.ok, str(report)


def test_fast_sampler_is_kept_per_model_only_with_cuda_graph(monkeypatch):
    import bespoke_fast.engine as engine
    built = []

    class Counting(engine.FastSampler):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("cuda_graph"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine, "FastSampler", Counting)
    lo, hi = RANGES["edm"]
    solver = bf.BespokeSolver("rk1", 3)
    sigmas = solver_sigmas(solver, "edm", lo, hi)
    x, d1, d2 = _noise("edm").float(), GMMDenoiser("edm"), GMMDenoiser("edm")
    kept = sampler(solver, parameterization="edm", sigma_min=lo, sigma_max=hi, fast=True,
                   cuda_graph=True)
    first = kept(d1, x, sigmas, disable=True)
    _close(kept(d1, x, sigmas, disable=True), first, 0)            # replayed: the same sampler
    assert built == [True]
    kept(d2, x, sigmas, disable=True)                              # another model: a new one
    kept.release()
    kept(d2, x, sigmas, disable=True)
    assert built == [True, True, True]
    fresh = sampler(solver, parameterization="edm", sigma_min=lo, sigma_max=hi, fast=True)
    fresh(d1, x, sigmas, disable=True)
    fresh(d1, x, sigmas, disable=True)
    assert built == [True, True, True, False, False]               # nothing kept alive


def test_a_half_precision_start_runs_in_float32_and_comes_back_in_its_dtype():
    lo, hi = RANGES["edm"]
    solver = bf.BespokeSolver("rk2", 3)
    run = sampler(solver, parameterization="edm", sigma_min=lo, sigma_max=hi)
    sigmas = solver_sigmas(solver, "edm", lo, hi)
    x = _noise("edm").float()
    d = GMMDenoiser("edm")
    half = run(d, x.bfloat16(), sigmas, disable=True)
    assert half.dtype == torch.bfloat16
    assert all(c.dtype == torch.float32 for c in d.calls)          # sigma in float32
    full = run(d, x.bfloat16().float(), sigmas, disable=True)
    _close(half.float(), full, 1e-2)
