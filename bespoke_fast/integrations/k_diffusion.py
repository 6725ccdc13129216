"""k-diffusion's sampler convention: fit a solver to a k-diffusion denoiser, and use a fitted
solver wherever ``sample_*(model, x, sigmas, ...)`` is called (k-diffusion, ComfyUI, Forge).

k-diffusion's convention
    ``model(x, sigma[B], **extra_args) -> denoised`` returns the clean estimate of ``x`` at noise
    level ``sigma`` (the data: ``x0`` in k-diffusion's words, ``x1`` in method.md's), with
    either ``x = x0 + sigma n`` (``parameterization="edm"``: EDM and every variance-exploding
    denoiser, e.g. SD 1.x / SDXL behind ``CompVisDenoiser`` or ComfyUI's EPS
    and V_PREDICTION model sampling) or ``x = (1 - sigma) x0 + sigma n`` (``"const"``: flow
    models such as SD3 and Flux, ComfyUI's CONST). Both follow the same ODE,
    ``dx/dsigma = (x - D(x, sigma)) / sigma``, from ``sigmas[0] = sigma_max`` (the start is
    ``x = sigma_max * noise``) down the schedule; a final ``0`` in ``sigmas`` asks for the last
    step to the denoised sample, ``x = D(x, sigma_min)``.

The time change (docs/method.md section 9)
    Flow time ``t`` in [0, 1] (noise at 0, data at 1) and the flow state ``y = s(t) x`` with::

        s(t) = (1 - t) / sigma_max + t            q(t) = s(t) sigma(t) = 1 - t (1 - sigma_min)
        sigma(t) = q(t) / s(t)
        t(sigma) = (1 - sigma / sigma_max) / (sigma (1 - 1 / sigma_max) + 1 - sigma_min)
        u(t, y) = (kappa D(y / s, sigma(t)) - (1 - sigma_min) y) / q(t),
        kappa = 1 - sigma_min / sigma_max

    so ``t = 0`` is ``sigma_max`` with ``y = x / sigma_max`` (k-diffusion's start ``sigma_max n`` is
    ``y = n``, the noise of the velocity contract) and ``t = 1`` is ``sigma_min`` with ``y = x``
    (the sample, in the denoiser's own units). ``s`` and ``q`` are affine in ``t``, which makes an
    Euler step in ``t`` exactly k-diffusion's Euler step in ``sigma``; for ``"const"`` with
    ``sigma_max = 1`` it is the plain FM-OT flow (``s = 1``, ``sigma`` affine in ``t``).

What is here
    * :func:`velocity_model` -- a k-diffusion denoiser as ``model(x, t[B], **extras) -> u`` in flow
      time, so ``gt``, ``train``, ``fit`` and ``eval`` work on it (the CLI too, through a
      ``--model package.module:factory`` that returns it);
    * :func:`denoiser` -- the other way: a velocity model as a k-diffusion denoiser (the exact
      inverse of :func:`velocity_model` with the same range), for k-diffusion's own samplers;
    * :func:`sampler` -- a fitted solver (Bespoke RK1 / RK2 or BNS) as
      ``sample_bespoke(model, x, sigmas, extra_args=None, callback=None, disable=None)``;
    * :func:`solver_sigmas` -- the k-diffusion sigmas of a solver's own grid;
    * :class:`SigmaTime` -- the time change itself; :func:`fitted_range` -- the range a solver
      file records.

No dependency on k-diffusion itself: only its calling convention.

Example::

    >>> from bespoke_fast.integrations.k_diffusion import sampler, solver_sigmas, velocity_model
    >>> model = velocity_model(edm_denoiser, "edm", sigma_min=0.002, sigma_max=80.0)
    >>> result = bespoke_fast.fit(model, shape=(4, 64, 64), nfe=10, out="runs/kd")
    >>> sample_bespoke = sampler(result.solver)           # a drop-in for sample_euler & co
    >>> x = sample_bespoke(edm_denoiser, torch.randn(8, 4, 64, 64) * 80.0,
    ...                    solver_sigmas(result.solver))
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn

from .._checks import (InvalidArgumentError, InvalidTypeError, MismatchError, ModelContractError,
                       check_state)
from ..solvers.base import Solver

__all__ = ["PARAMETERIZATIONS", "SigmaTime", "KDiffusionVelocity", "KDiffusionDenoiser",
           "velocity_model", "denoiser", "sampler", "solver_sigmas", "fitted_range", "RTOL"]

PARAMETERIZATIONS = ("edm", "const")
RTOL = 1e-4     # how closely sigmas[0] / the last non-zero sigma must match the fitted range
_CONFIG_KEY = "k_diffusion"


def _sigma_value(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.detach().cpu().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{name} must be a real number, got {type(value).__name__} "
                               f"{value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be finite, got {value!r}")
    return value


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def _coef_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for the per-sample coefficients (``[B]`` numbers: cheap), except where the
    device has none (MPS)."""
    return torch.float32 if t.device.type == "mps" else torch.float64


# ----------------------------------------------------------------------------- the time change
class SigmaTime:
    """The time change between k-diffusion noise levels and flow time (docs/method.md section 9).

    Args:
        parameterization: ``"edm"`` (``x = x0 + sigma n``) or ``"const"``
            (``x = (1 - sigma) x0 + sigma n``; needs ``sigma_max <= 1``).
        sigma_min, sigma_max: the noise levels at flow times 1 and 0, ``0 < sigma_min <
            sigma_max`` (floats or one-element tensors).
        allow_zero_min: accept ``sigma_min = 0`` (only :func:`denoiser` does: it evaluates the
            velocity model, which may be finite at ``t = 1``; a denoiser is not, at ``sigma = 0``).

    Methods take float64 / float32 tensors (or floats) and work elementwise: ``scale(t)`` = s,
    ``noise(t)`` = q, ``sigma(t)``, ``time(sigma)`` (the inverse of ``sigma``). ``kappa`` and
    ``decay`` are the constants ``1 - sigma_min / sigma_max`` and ``1 - sigma_min``.

    Example::

        >>> tc = SigmaTime("edm", 0.002, 80.0)
        >>> tc.sigma(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))   # 80, ~0.99, 0.002
    """

    def __init__(self, parameterization: str, sigma_min, sigma_max, allow_zero_min: bool = False):
        if parameterization not in PARAMETERIZATIONS:
            raise InvalidArgumentError(f"unknown parameterization {parameterization!r}; expected "
                                       f"'edm' (x = x0 + sigma n) or 'const' (x = (1 - sigma) x0 "
                                       f"+ sigma n)")
        lo, hi = _sigma_value("sigma_min", sigma_min), _sigma_value("sigma_max", sigma_max)
        if lo < 0 or (lo == 0 and not allow_zero_min):
            raise InvalidArgumentError(
                f"sigma_min must be > 0, got {lo!r}: it is the last non-zero sigma of the "
                f"schedules you sample with (a denoiser is not evaluated at sigma = 0)")
        if hi <= lo:
            raise InvalidArgumentError(f"sigma_max must be > sigma_min, got sigma_min={lo!r}, "
                                       f"sigma_max={hi!r}")
        if parameterization == "const" and hi > 1:
            raise InvalidArgumentError(f"parameterization 'const' (x = (1 - sigma) x0 + sigma n) "
                                       f"needs sigma_max <= 1, got {hi!r}; for x = x0 + sigma n "
                                       f"use 'edm'")
        self.parameterization, self.sigma_min, self.sigma_max = parameterization, lo, hi
        self.kappa = 1.0 - lo / hi
        self.decay = 1.0 - lo

    def config(self) -> dict:
        """``{"parameterization", "sigma_min", "sigma_max"}``: JSON-able, recorded in solver
        files."""
        return {"parameterization": self.parameterization, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max}

    def __repr__(self) -> str:
        return (f"SigmaTime({self.parameterization!r}, sigma_min={self.sigma_min!r}, "
                f"sigma_max={self.sigma_max!r})")

    def __eq__(self, other) -> bool:
        return isinstance(other, SigmaTime) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(self.config().values()))

    def scale(self, t):
        """``s(t) = (1 - t) / sigma_max + t``: the flow state is ``y = s x``."""
        return (1 - t) / self.sigma_max + t

    def noise(self, t):
        """``q(t) = s(t) sigma(t) = 1 - t (1 - sigma_min)``: the noise coefficient of ``y``."""
        return 1 - t * self.decay

    def sigma(self, t):
        """The noise level at flow time ``t``: ``q(t) / s(t)`` (``sigma_max`` at 0, ``sigma_min``
        at 1, decreasing)."""
        return self.noise(t) / self.scale(t)

    def time(self, sigma):
        """The flow time of noise level ``sigma``: the inverse of :meth:`sigma`."""
        return (1 - sigma / self.sigma_max) / (sigma * (1 - 1 / self.sigma_max) + self.decay)

    def matches(self, sigma_start: float, sigma_end: float, rtol: float = RTOL) -> bool:
        """Whether ``sigma_start`` / ``sigma_end`` equal ``sigma_max`` / ``sigma_min`` within
        ``rtol`` (relative)."""
        return (abs(sigma_start - self.sigma_max) <= rtol * self.sigma_max
                and abs(sigma_end - self.sigma_min) <= rtol * self.sigma_min)


def _time_change(parameterization, sigma_min, sigma_max, source=None, allow_zero_min=False):
    """A :class:`SigmaTime`, defaulting the range to ``source.sigma_min`` / ``.sigma_max`` (what
    k-diffusion's wrappers carry) when it has them."""
    if sigma_min is None:
        sigma_min = getattr(source, "sigma_min", None)
    if sigma_max is None:
        sigma_max = getattr(source, "sigma_max", None)
    missing = [n for n, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)) if v is None]
    if missing:
        raise InvalidArgumentError(
            f"pass {' and '.join(f'{n}=' for n in missing)}: the noise levels of the schedules you "
            f"sample with (sigmas[0] and the last non-zero sigma); the model has no attribute "
            f"{missing[0]} to take it from")
    return SigmaTime(parameterization, sigma_min, sigma_max, allow_zero_min)


# ----------------------------------------------------------------------------- the adapters
class KDiffusionVelocity(nn.Module):
    """A k-diffusion denoiser as a flow-time velocity model; see :func:`velocity_model`.

    ``time`` is the :class:`SigmaTime`; ``denoiser`` the wrapped callable (a submodule when it is
    an ``nn.Module``, so its parameters are part of the model's identity). ``evaluate`` also
    returns the denoised estimate, the k-diffusion state and the noise level of the call.
    """

    def __init__(self, denoiser, time: SigmaTime):
        super().__init__()
        if not callable(denoiser):
            raise InvalidTypeError(f"the denoiser must be callable as denoiser(x, sigma[B], "
                                   f"**extra_args), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.time = time

    def fingerprint_config(self) -> dict:
        """Part of the model's identity, and recorded with a fitted solver
        (:func:`fitted_range`)."""
        return {_CONFIG_KEY: self.time.config()}

    def extra_repr(self) -> str:
        return repr(self.time)

    def evaluate(self, y: torch.Tensor, t: torch.Tensor, extras: dict):
        """``(u, denoised, x, sigma)`` at flow state ``y`` ``[B, ...]`` and flow time ``t``
        ``[B]``: the velocity (``y``'s dtype), the denoiser's output and input (k-diffusion
        coordinates, ``x = y / s(t)``) and ``sigma(t)`` ``[B]``."""
        work = torch.float64 if y.dtype == torch.float64 else torch.float32
        tc = self.time
        tt = t.to(_coef_dtype(t))                  # the coefficients in float64 where possible
        s, q = tc.scale(tt), tc.noise(tt)
        sigma = (q / s).to(work)
        x = (y.to(work) / _bcast(s.to(work), y)).to(y.dtype)
        d = self.denoiser(x, sigma, **extras)
        if not isinstance(d, torch.Tensor):
            raise ModelContractError(f"the k-diffusion denoiser must return a torch.Tensor (the "
                                     f"denoised x), got {type(d).__name__}")
        if d.shape != y.shape:
            raise ModelContractError(f"the k-diffusion denoiser returned shape {tuple(d.shape)} "
                                     f"for an input of shape {tuple(y.shape)}; it must return "
                                     f"the denoised x, shaped like x")
        u = (_bcast((tc.kappa / q).to(work), y) * d.to(work)
             - _bcast((tc.decay / q).to(work), y) * y.to(work))
        return u.to(y.dtype), d, x, sigma

    def forward(self, y, t, **extras):
        return self.evaluate(y, t, extras)[0]


class KDiffusionDenoiser(nn.Module):
    """A flow-time velocity model as a k-diffusion denoiser; see :func:`denoiser`."""

    def __init__(self, model, time: SigmaTime):
        super().__init__()
        if not callable(model):
            raise InvalidTypeError(f"the model must be callable as model(x, t[B], **extras), got "
                                   f"{type(model).__name__}")
        self.model = model
        self.time = time

    def fingerprint_config(self) -> dict:
        return {_CONFIG_KEY + "_denoiser": self.time.config()}

    def extra_repr(self) -> str:
        return repr(self.time)

    def forward(self, x, sigma, **extras):
        check_state("x", x)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        sig = torch.as_tensor(sigma, device=x.device)
        sig = sig.to(_coef_dtype(sig)).reshape(-1).expand(x.shape[0])
        tc = self.time
        t = tc.time(sig)
        s, q = tc.scale(t).to(work), tc.noise(t).to(work)
        y = x.to(work) * _bcast(s, x)
        u = self.model(y.to(x.dtype), t.to(x.dtype), **extras)
        if not isinstance(u, torch.Tensor) or u.shape != x.shape:
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ModelContractError(f"the velocity model must return a tensor shaped like its "
                                     f"input {tuple(x.shape)}, got {got}")
        d = (_bcast(q, x) * u.to(work) + tc.decay * y) / tc.kappa
        return d.to(x.dtype)


def velocity_model(denoiser, parameterization: str = "edm", sigma_min=None,
                   sigma_max=None) -> KDiffusionVelocity:
    """A k-diffusion denoiser as a velocity model in flow time (docs/method.md section 9).

    Args:
        denoiser: ``denoiser(x, sigma[B], **extra_args) -> denoised`` shaped like ``x``
            (k-diffusion's model convention; CFG wrappers included).
        parameterization: ``"edm"`` (``x = x0 + sigma n``, every variance-exploding denoiser)
            or ``"const"`` (``x = (1 - sigma) x0 + sigma n``, flow models; ``sigma_max <= 1``).
        sigma_min, sigma_max: the range the solver will be fitted on and sample: the last
            non-zero sigma and ``sigmas[0]`` of the schedules you use (default: the
            denoiser's ``sigma_min`` / ``sigma_max`` attributes, which k-diffusion's wrappers
            have; otherwise required). ``0 < sigma_min < sigma_max``.

    Returns: a :class:`KDiffusionVelocity`, ``model(y, t[B], **extras) -> u``: noise at ``t = 0``
    (``y = x / sigma_max``, so k-diffusion's start ``x = sigma_max n`` is ``y = n``), and at
    ``t = 1`` the state at ``sigma_min`` in the denoiser's units (``y = x``; PSNRs and the
    ``data_range`` are in those units). Extras pass through to the denoiser unchanged. The
    denoiser is called at ``sigma(t)`` (float32, or float64 for float64 states) with
    ``x = y / s(t)`` in ``y``'s dtype; its output is cast to that dtype. The range is part of
    the model's identity and is recorded with a solver fitted to it, so :func:`sampler` can
    check the sigmas it is given.

    An EDM denoiser has no exact noise end: at ``sigma_max`` the true marginal is
    ``x0 + sigma_max n``, and the start ``sigma_max n`` (what k-diffusion, and ground truth
    here, draw) leaves out the data part (relative size ``sigma_data / sigma_max``).

    Example::

        >>> model = velocity_model(edm_denoiser, "edm", sigma_min=0.002, sigma_max=80.0)
        >>> x = bespoke_fast.solve(model, torch.randn(4, 3, 32, 32), "midpoint", n_steps=20)
    """
    return KDiffusionVelocity(denoiser, _time_change(parameterization, sigma_min, sigma_max,
                                                     denoiser))


def denoiser(model, parameterization: str = "edm", sigma_min=None,
             sigma_max=None) -> KDiffusionDenoiser:
    """A flow-time velocity model as a k-diffusion denoiser: the exact inverse of
    :func:`velocity_model` with the same arguments (docs/method.md section 9).

    ``D(x, sigma) = (q u(t, y) + (1 - sigma_min) y) / kappa`` with ``t = t(sigma)``,
    ``y = s(t) x``. ``sigma_min = 0`` is allowed here: with ``"const"``, ``sigma_min=0,
    sigma_max=1`` an FM-OT velocity model (noise at 0, data at 1) becomes the usual flow
    denoiser ``D(x, sigma) = x + sigma u(1 - sigma, x)``.

    Returns: a :class:`KDiffusionDenoiser`, ``D(x, sigma[B], **extras) -> denoised`` shaped like
    ``x`` (``sigma`` may also be 0-d), for k-diffusion's samplers.

    Example::

        >>> D = denoiser(bespoke_fast.zoo.load("gmm-64").model, "const", sigma_min=0, sigma_max=1)
        >>> x = k_diffusion.sampling.sample_dpmpp_2m(D, torch.randn(8, 64), sigmas)
    """
    return KDiffusionDenoiser(model, _time_change(parameterization, sigma_min, sigma_max, model,
                                                  allow_zero_min=True))


# ----------------------------------------------------------------------------- solver ranges
def fitted_range(solver) -> SigmaTime | None:
    """The :class:`SigmaTime` a solver was fitted with, read from its metadata (recorded when
    it was fitted to a :func:`velocity_model`), or ``None`` when it records none.
    ``InvalidArgumentError`` when the record is damaged or names two different ranges."""
    model = (getattr(solver, "meta", None) or {}).get("model") or {}
    configs = model.get("config") if isinstance(model, dict) else None
    found = []
    for entry in configs if isinstance(configs, list) else []:
        cfg = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if isinstance(cfg, dict) and _CONFIG_KEY in cfg:
            rec = cfg[_CONFIG_KEY]
            try:
                found.append(SigmaTime(rec["parameterization"], rec["sigma_min"], rec["sigma_max"]))
            except (TypeError, KeyError, ValueError) as e:
                raise InvalidArgumentError(f"the solver's k-diffusion range record {rec!r} is "
                                           f"damaged: {e}") from None
    if any(f != found[0] for f in found[1:]):
        raise InvalidArgumentError(f"the solver records several k-diffusion ranges: {found}")
    return found[0] if found else None


def _resolve_range(solver, parameterization, sigma_min, sigma_max) -> SigmaTime:
    recorded = fitted_range(solver)
    given = {"parameterization": parameterization, "sigma_min": sigma_min, "sigma_max": sigma_max}
    if recorded is None:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise InvalidArgumentError(
                f"the solver records no k-diffusion sigma range (it was not fitted to a "
                f"velocity_model(...) model); pass {', '.join(f'{m}=' for m in missing)} of the "
                f"model it was fitted to")
        return SigmaTime(parameterization, sigma_min, sigma_max)
    for key, value in given.items():
        if value is None:
            continue
        have = getattr(recorded, key)
        same = (value == have if key == "parameterization"
                else abs(_sigma_value(key, value) - have) <= RTOL * have)
        if not same:
            raise MismatchError(f"the solver was fitted with {key}={have!r}, not {value!r}; fit "
                                f"one for this range (velocity_model(..., {key}={value!r}))")
    return recorded


def _grid_times(solver) -> torch.Tensor:
    """Flow times of the solver's grid points (float64, 0 ... 1): the states it steps through."""
    t = solver.tables()["t"].detach().to(torch.float64).cpu()
    if getattr(solver, "kind", None) == "bespoke" and solver.base == "rk2":
        t = t[0::2]
    return t


def solver_sigmas(solver, parameterization=None, sigma_min=None, sigma_max=None,
                  final_zero: bool = True, dtype=torch.float32, device=None) -> torch.Tensor:
    """The k-diffusion ``sigmas`` of ``solver``'s own grid: ``sigma(t_i)`` at its ``n + 1`` grid
    times (``sigma_max`` ... ``sigma_min``), then ``0`` when ``final_zero`` (the final step to
    the denoised sample). The range is the one the solver records (:func:`fitted_range`), or
    the arguments when it records none. A schedule for ComfyUI's SIGMAS inputs, or for a
    k-diffusion sampler to compare with the fitted solver step for step.

    Example::

        >>> sigmas = solver_sigmas(solver)        # tensor([80.0, ..., 0.002, 0.0])
    """
    tc = _resolve_range(solver, parameterization, sigma_min, sigma_max)
    sig = tc.sigma(_grid_times(solver))
    sig[0], sig[-1] = tc.sigma_max, tc.sigma_min       # the ends exactly
    if final_zero:
        sig = torch.cat([sig, sig.new_zeros(1)])
    return sig.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- the sampler
def _check_sigmas(sigmas):
    """``(sigma_start, sigma_end, final_zero)`` of a k-diffusion schedule, checked."""
    if isinstance(sigmas, torch.Tensor):
        values = sigmas.detach().to("cpu", torch.float64).reshape(-1)
        if sigmas.dim() != 1:
            raise InvalidArgumentError(f"sigmas must be a 1-D tensor, got shape "
                                       f"{tuple(sigmas.shape)}")
    else:
        try:
            values = torch.tensor([float(v) for v in sigmas], dtype=torch.float64)
        except (TypeError, ValueError):
            raise InvalidTypeError(f"sigmas must be a 1-D tensor of noise levels, got "
                                   f"{type(sigmas).__name__}") from None
    if values.numel() < 2:
        raise InvalidArgumentError(f"sigmas must hold at least 2 noise levels (from sigmas[0] "
                                   f"down to the last), got {values.numel()}")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise InvalidArgumentError("sigmas must be finite and >= 0")
    final_zero = bool(values[-1] == 0)
    nonzero = values[:-1] if final_zero else values
    if bool((nonzero == 0).any()) or bool((nonzero.diff() >= 0).any()):
        raise InvalidArgumentError("sigmas must decrease strictly, and only the last may be 0")
    return float(nonzero[0]), float(nonzero[-1]), final_zero


def sampler(solver, *, parameterization=None, sigma_min=None, sigma_max=None, fast="auto",
            cuda_graph: bool = False, allow_range_mismatch: bool = False):
    """A fitted solver as a k-diffusion sampler function (docs/method.md section 9).

    Args:
        solver: a fitted :class:`~bespoke_fast.BespokeSolver` (rk1 / rk2) or
            :class:`~bespoke_fast.NonStationarySolver`, e.g. ``bespoke_fast.load_solver(path)``.
        parameterization, sigma_min, sigma_max: the range the solver was fitted on. A solver
            fitted to a :func:`velocity_model` records it (:func:`fitted_range`); then these are
            optional and must agree with the record (``MismatchError`` otherwise). Required for a
            solver that records none.
        fast: ``"auto"`` (:class:`~bespoke_fast.FastSampler` -- fused kernels -- when ``x`` is on
            CUDA and no ``callback`` is given, else the reference ``solver.sample``), ``True``
            (FastSampler also on CPU, where it runs its reference ops) or ``False`` (always the
            reference). A callback needs the per-step states, and FastSampler a float32 state,
            so a callback or a float64 ``x`` always runs the reference.
        cuda_graph: let FastSampler capture the loop in one CUDA graph. The function then keeps
            the last model's sampler (its graph and the model) and replays it while it is called
            with the same model object; another model builds a new one (``sample_bespoke.release()``
            drops it). Off by default: k-diffusion front ends usually wrap the model anew for
            every call, and a model that reads values back to the host cannot be captured.
        allow_range_mismatch: when the sigmas do not span the fitted range, warn and run the
            solver's grid on the sigmas' own range instead of raising ``MismatchError``.

    Returns: ``sample_bespoke(model, x, sigmas, extra_args=None, callback=None, disable=None)``
    with k-diffusion's signature and return value: ``model(x, sigma[B], **extra_args) ->
    denoised``; ``x`` the start at ``sigmas[0]`` (``sigma_max * noise``); returns the state at
    ``sigmas[-1]``. It runs the solver's own grid from ``sigmas[0]`` to the last non-zero sigma;
    these two must equal the fitted ``sigma_max`` / ``sigma_min`` (relative tolerance
    :data:`RTOL`), the sigmas in between are not used (:func:`solver_sigmas` gives the grid's
    own). When ``sigmas`` ends with 0 it then takes k-diffusion's final step,
    ``x = model(x, sigma_min)`` (one more model call). ``callback`` gets k-diffusion's dict
    ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per solver step (at the step's first
    model call; ``sigma_hat == sigma``) and once for the final step; ``disable`` turns the
    tqdm progress bar off (``None``: tqdm's default, off when not on a terminal). The state is
    float32 for half-precision ``x`` (float64 stays float64); the result has ``x``'s dtype.
    NFE: ``solver.nfe`` (+ 1 with a final 0).

    Example::

        >>> sample_bespoke = sampler(bespoke_fast.load_solver("solver.json"))
        >>> sigmas = k_diffusion.sampling.get_sigmas_karras(10, 0.002, 80.0)  # same range
        >>> x0 = sample_bespoke(denoiser, torch.randn(4, 3, 64, 64) * sigmas[0], sigmas)
    """
    if not isinstance(solver, Solver):
        raise InvalidTypeError(f"solver must be a fitted BespokeSolver or NonStationarySolver, "
                               f"got {type(solver).__name__}")
    if fast not in ("auto", True, False):
        raise InvalidArgumentError(f"fast must be 'auto', True or False, got {fast!r}")
    fitted = _resolve_range(solver, parameterization, sigma_min, sigma_max)
    stages = solver.nfe // solver.n_steps
    cache = {}

    def sample_bespoke(model, x, sigmas, extra_args=None, callback=None, disable=None):
        check_state("x", x)
        if extra_args is not None and not isinstance(extra_args, dict):
            raise InvalidTypeError(f"extra_args must be a dict, got {type(extra_args).__name__}")
        extras = dict(extra_args or {})
        start, end, final_zero = _check_sigmas(sigmas)
        tc = fitted
        if not fitted.matches(start, end):
            problem = (f"sigmas run from {start:.6g} to {end:.6g} (last non-zero), but the "
                       f"solver was fitted on {fitted.sigma_max:.6g} to {fitted.sigma_min:.6g} "
                       f"({fitted.parameterization})")
            if not allow_range_mismatch:
                raise MismatchError(f"{problem}; use sigmas with that range (solver_sigmas(solver) "
                                    f"gives its own grid), fit a solver for this range, or pass "
                                    f"allow_range_mismatch=True")
            warnings.warn(f"sample_bespoke: {problem}; running the solver's grid on the given "
                          f"range (allow_range_mismatch=True)", UserWarning, stacklevel=2)
            tc = SigmaTime(fitted.parameterization, end, start)
        state_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        vel = KDiffusionVelocity(model, tc)
        y0 = x.to(state_dtype) / tc.sigma_max
        sig_like = sigmas if isinstance(sigmas, torch.Tensor) else x

        def as_sigma(v):
            return torch.as_tensor(v, dtype=sig_like.dtype if sig_like.is_floating_point()
                                   else torch.float32, device=sig_like.device)

        from tqdm.auto import tqdm
        use_fast = (fast is True or (fast == "auto" and x.device.type == "cuda")) and (
            callback is None and state_dtype == torch.float32
            and not {"x0", "generator"} & set(extras))
        with tqdm(total=solver.n_steps + int(final_zero), disable=disable) as bar:
            if use_fast:
                y = _run_fast(cache, vel, model, solver, y0, extras, cuda_graph)
                bar.update(solver.n_steps)
            else:
                calls = [0]

                def hooked(yy, t):
                    u, d, xk, sig = vel.evaluate(yy, t, extras)
                    if calls[0] % stages == 0:
                        if callback is not None:
                            s0 = as_sigma(sig[0])
                            callback({"x": xk, "i": calls[0] // stages, "sigma": s0,
                                      "sigma_hat": s0, "denoised": d})
                        bar.update(1)
                    calls[0] += 1
                    return u

                with torch.no_grad():
                    y = solver.sample(hooked, y0)
            out = y                            # s(1) = 1: y is the state at sigma_min
            if final_zero:
                s_end = torch.full((x.shape[0],), tc.sigma_min, dtype=state_dtype,
                                   device=x.device)
                with torch.no_grad():
                    d = model(out, s_end, **extras)
                if not isinstance(d, torch.Tensor) or d.shape != x.shape:
                    raise ModelContractError("the k-diffusion denoiser must return the denoised "
                                             "x, shaped like x")
                if callback is not None:
                    s0 = as_sigma(tc.sigma_min)
                    callback({"x": out, "i": solver.n_steps, "sigma": s0, "sigma_hat": s0,
                              "denoised": d})
                bar.update(1)
                out = d                        # Euler from sigma_min to 0: x + (0 - s) (x - d) / s
        return out.to(x.dtype)

    def release():
        """Drop the kept FastSampler (its CUDA graph and the model it holds)."""
        cache.clear()

    sample_bespoke.release = release
    sample_bespoke.solver = solver
    sample_bespoke.sigma_range = fitted
    sample_bespoke.__doc__ = (f"k-diffusion sampler running a fitted {solver.kind} solver "
                              f"(NFE {solver.nfe}) on {fitted!r}; see "
                              f"bespoke_fast.integrations.k_diffusion.sampler.")
    return sample_bespoke


def _run_fast(cache: dict, vel, model, solver, y0, extras, cuda_graph: bool):
    """The solve through :class:`~bespoke_fast.FastSampler` (float32 state); with ``cuda_graph``
    the sampler is kept for the next call with the same model object."""
    from ..engine import FastSampler
    key = (tuple(y0.shape), str(y0.device), vel.time)
    entry = cache.get("fast")
    if entry is not None and entry[0] is model and entry[1] == key:
        fs = entry[2]
    else:
        fs = FastSampler(vel, solver, shape=tuple(y0.shape[1:]), batch_size=y0.shape[0],
                         model_dtype=torch.float32, cuda_graph=cuda_graph, device=y0.device)
        cache.clear()
        if cuda_graph:
            cache["fast"] = (model, key, fs)
    return fs(y0, **extras)
