"""Adaptive Dormand-Prince 5(4) with dense output: the ground-truth (GT) solver.

Integrates ``dx/dt = u(t, x)`` forward in flow time (noise at t = 0, data at t = 1) with one
step size for the whole batch, and returns the states at requested times through the method's
4th-order dense output. Optionally it also stores a dense grid of "knots" ``(t_k, x_k, u_k)``
with ``u_k`` re-evaluated exactly, for cubic Hermite interpolation of the trajectories.
"""
from __future__ import annotations

import math
import numbers

import torch

from .._checks import call_model, check_int, check_state, time_vector
from .._checks import ExecutionError, InvalidArgumentError

__all__ = ["solve_adaptive", "default_knots"]

# --- Dormand-Prince 5(4) tableau (FSAL: the 7th stage is f at the new point) -------------------
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4))  # error estimate: h * sum_i E_i k_i

# Shampine's dense output (as in scipy's RK45 / Hairer's DOPRI5 contd5): for sigma in [0, 1],
#   x(t + sigma h) = x + h * sum_i k_i * sum_j P[i][j] sigma^(j+1),
# a quartic in sigma that matches x, x_new, f(t, x), f(t+h, x_new) and is 4th-order accurate.
_P = (
    (1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432),
    (0.0, 0.0, 0.0, 0.0),
    (0.0, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799),
    (0.0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072),
    (0.0, 127303824393 / 49829197408, -318862633887 / 49829197408,
     701980252875 / 199316789632),
    (0.0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844),
    (0.0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423),
)

_SAFETY, _FAC_MIN, _FAC_MAX, _ORDER = 0.9, 0.2, 10.0, 5


def default_knots(K: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """``K`` knot times in [0, 1], denser near t = 1 where flows get stiff.

    ``t_k = 0.5 u_k + 0.5 (1 - (1 - u_k)^2)`` with ``u_k = k / (K - 1)``: half uniform, half
    quadratic clustering at 1 (the spacing near 1 is half the spacing near 0). Strictly
    increasing, ``t_0 = 0`` and ``t_{K-1} = 1`` exactly. Returns a ``[K]`` tensor.

        >>> default_knots(5)
        tensor([0.0000, 0.3438, 0.6250, 0.8438, 1.0000], dtype=torch.float64)
    """
    K = check_int("K", K, 2)
    u = torch.arange(K, dtype=torch.float64) / (K - 1)
    t = 0.5 * u + 0.5 * (1.0 - (1.0 - u) ** 2)
    t[0], t[-1] = 0.0, 1.0
    return t.to(dtype=dtype, device=device)


def _times(name: str, value, what: str) -> list:
    """A 1-D, finite, strictly increasing sequence of >= 2 floats -> list of Python floats."""
    try:
        if isinstance(value, torch.Tensor):
            t = value.detach().to(device="cpu", dtype=torch.float64)
        else:
            t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidArgumentError(f"{name} must be {what}, got {type(value).__name__} ({e})") from None
    if t.dim() != 1 or t.numel() < 2:
        raise InvalidArgumentError(f"{name} must be {what} with length >= 2, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise InvalidArgumentError(f"{name} must be finite, got {t.tolist()}")
    if not bool((t[1:] > t[:-1]).all()):
        raise InvalidArgumentError(f"{name} must be strictly increasing, got {t.tolist()}")
    return t.tolist()


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(float(value)) and float(value) > 0):
        raise InvalidArgumentError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def _rms(v: torch.Tensor) -> float:
    """Worst per-sample RMS over the batch, as a Python float: one host sync.

    Max over samples, not RMS over the whole batch: every trajectory must meet the tolerance
    (a batch-wide RMS lets one stiff sample in a batch of 256 carry ~16x the error)."""
    return float(v.square().flatten(1).mean(1).sqrt().max()) if v.dim() > 1 else float(v.abs().max())


def _combine(x: torch.Tensor, h: float, coeffs, ks) -> torch.Tensor:
    """``x + h * sum_i coeffs[i] * ks[i]`` (zero coefficients skipped)."""
    out = x
    for c, k in zip(coeffs, ks):
        if c != 0.0:
            out = out + (h * c) * k
    return out


def _interpolate(x: torch.Tensor, h: float, ks, sigma: float) -> torch.Tensor:
    """Dense output at ``t + sigma h`` inside the accepted step ``[t, t + h]``."""
    coeffs = [sum(p * sigma ** (j + 1) for j, p in enumerate(row)) for row in _P]
    return _combine(x, h, coeffs, ks)


def _initial_step(f, t0: float, x0: torch.Tensor, f0: torch.Tensor, rtol: float, atol: float,
                  t_end: float) -> float:
    """Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.4 (as torchdiffeq/scipy). 1 model call."""
    scale = atol + rtol * x0.abs()
    d0, d1 = _rms(x0 / scale), _rms(f0 / scale)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, t_end - t0)
    f1 = f(t0 + h0, x0 + h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / _ORDER)
    return min(100 * h0, h1, t_end - t0)


def solve_adaptive(model, x0: torch.Tensor, t_eval, rtol: float = 1e-5, atol: float = 1e-5,
                   first_step: float | None = None, max_steps: int = 100_000,
                   check_finite: bool = True, return_stats: bool = False, dense_knots=None,
                   **extras):
    """Solve ``dx/dt = model(x, t, **extras)`` with adaptive Dormand-Prince 5(4) and dense output.

    Args:
        model: ``model(x, t, **extras) -> u``; ``x`` is ``[B, ...]``, ``t`` is a ``[B]`` tensor
            (all entries equal to the current time) in ``x``'s dtype; ``u`` shaped like ``x``,
            same dtype. Every call goes through ``_checks.call_model``.
        x0: ``[B, ...]`` floating tensor, the state at ``t_eval[0]``. Any device; float32/64.
        t_eval: 1-D sequence or tensor of ``T >= 2`` strictly increasing times in [0, 1].
            Integration runs from ``t_eval[0]`` to ``t_eval[-1]``; never beyond ``t_eval[-1]``.
        rtol, atol: tolerances (default 1e-5 each: the GT default for float32 states; use
            1e-7..1e-9 with float64 for tests; float32 cannot reach rtol much below 1e-6).
        first_step: initial step size; default: Hairer's selection (costs 1 extra call).
        max_steps: maximum number of attempted (accepted + rejected) steps; RuntimeError beyond.
        check_finite: raise FloatingPointError if the model returns NaN/Inf (one host sync per
            call).
        return_stats: also return the stats dict (see Returns).
        dense_knots: ``None`` (default), an int ``K >= 2`` or a 1-D increasing sequence/tensor
            of knot times within ``[t_eval[0], t_eval[-1]]``. An int means the times
            ``default_knots(K)`` (denser near t = 1), mapped affinely onto
            ``[t_eval[0], t_eval[-1]]`` (identical when ``t_eval`` spans [0, 1]). Giving it
            implies ``return_stats=True``.
        **extras: passed to every model call (e.g. class labels).

    Returns:
        ``states``: ``[T, *x0.shape]`` in ``x0``'s dtype, the solution at each ``t_eval``
        (``states[0]`` is ``x0``). With ``return_stats`` (or ``dense_knots``):
        ``(states, stats)`` where ``stats`` has ``"nfe"`` (model calls of the solve, including
        the initial step selection), ``"n_accepted"``, ``"n_rejected"``, and with
        ``dense_knots`` also ``"knots_t"`` ``[K]`` (x0's dtype/device), ``"knots_x"`` and
        ``"knots_u"`` ``[K, *x0.shape]`` with ``knots_u[k] = model(knots_x[k], knots_t[k])``
        evaluated exactly (not interpolated), and ``"nfe_knots"`` = K (those extra calls).

    Maths. Stages ``k_i = u(t + c_i h, x + h sum_j a_ij k_j)``, ``i = 1..7``;
    ``x_new = x + h sum_i b_i k_i`` (5th order, ``k_7 = u(t + h, x_new)`` is reused as the next
    step's ``k_1``: FSAL), error ``err = h sum_i (b_i - b*_i) k_i`` against the embedded 4th
    order solution. Error ratio: the worst sample's RMS,
    ``r = max_b RMS_b(err / (atol + rtol max(|x|, |x_new|)))`` (every trajectory meets the
    tolerance); the step is accepted if ``r <= 1``, and
    the next step is ``h * clamp(0.9 r^(-1/5), 0.2, 10)``. Values between accepted points come
    from Shampine's quartic dense output (4th order, as torchdiffeq/scipy RK45). Autograd is
    left on: wrap GT generation in ``torch.no_grad()``.

    Example:
        >>> import torch
        >>> f = lambda x, t: -x * t[:, None]            # x(t) = x0 exp(-t^2 / 2)
        >>> xs, st = solve_adaptive(f, torch.ones(2, 3, dtype=torch.float64), [0.0, 0.5, 1.0],
        ...                         rtol=1e-9, atol=1e-9, return_stats=True)
        >>> xs.shape, round(float(xs[-1, 0, 0]), 6), st["nfe"] > 0
        (torch.Size([3, 2, 3]), 0.606531, True)
    """
    x0 = check_state("x0", x0)
    ts = _times("t_eval", t_eval, "a 1-D sequence of floats")
    if ts[0] < 0.0 or ts[-1] > 1.0:
        raise InvalidArgumentError(f"t_eval must lie in [0, 1], got [{ts[0]}, {ts[-1]}]")
    rtol, atol = _positive("rtol", rtol), _positive("atol", atol)
    max_steps = check_int("max_steps", max_steps, 1)
    if first_step is not None:
        first_step = _positive("first_step", first_step)
    t0, t_end = ts[0], ts[-1]

    knots = None
    if dense_knots is not None:
        return_stats = True
        if isinstance(dense_knots, numbers.Integral) and not isinstance(dense_knots, bool):
            knots = (t0 + (t_end - t0) * default_knots(check_int("dense_knots", dense_knots, 2))
                     ).tolist()
            knots[0], knots[-1] = t0, t_end
        elif isinstance(dense_knots, bool):
            raise InvalidArgumentError(f"dense_knots must be an int >= 2 or a 1-D increasing sequence of "
                             f"times, got {dense_knots!r}")
        else:
            knots = _times("dense_knots", dense_knots, "an int >= 2 or a 1-D sequence of times")
            if knots[0] < t0 or knots[-1] > t_end:
                raise InvalidArgumentError(f"dense_knots must lie within t_eval's range [{t0}, {t_end}], "
                                 f"got [{knots[0]}, {knots[-1]}]")

    nfe = 0

    def f(t: float, x: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return call_model(model, x, time_vector(t, x), extras, check_finite)

    # Output schedules: (query times, list of collected states, next index).
    outputs = [[ts, [x0], 1]]
    if knots is not None:
        outputs.append([knots, [], 0])
        while outputs[1][2] < len(knots) and knots[outputs[1][2]] <= t0:
            outputs[1][1].append(x0)
            outputs[1][2] += 1

    x, t = x0, t0
    k1 = f(t, x)
    if first_step is None:
        h = _initial_step(f, t, x, k1, rtol, atol, t_end)
    else:
        h = min(first_step, t_end - t)
    n_accepted = n_rejected = 0

    while t < t_end:
        if n_accepted + n_rejected >= max_steps:
            raise ExecutionError(
                f"solve_adaptive: max_steps={max_steps} exceeded at t={t:.6g} (target "
                f"{t_end:.6g}, step size {h:.3g}, {n_accepted} accepted / {n_rejected} rejected "
                f"steps); loosen rtol/atol (now {rtol:g}/{atol:g}) or raise max_steps")
        last = t + h >= t_end
        if last:
            h = t_end - t
        t_new = t_end if last else t + h
        if t_new <= t:
            raise ExecutionError(f"solve_adaptive: step size underflow at t={t:.6g} (h={h:.3g}); "
                               f"the flow may be singular there, or loosen rtol/atol")

        ks = [k1]
        for i in range(1, 6):
            ks.append(f(t + _C[i] * h, _combine(x, h, _A[i], ks)))
        x_new = _combine(x, h, _A[6], ks)  # a_7j == b_j: the 7th stage is at x_new (FSAL)
        ks.append(f(t_new, x_new))
        err = _combine(torch.zeros_like(x), h, _E, ks)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        ratio = _rms(err / scale)

        if ratio <= 1.0:
            n_accepted += 1
            for out in outputs:
                q, got, j = out
                while j < len(q) and q[j] <= t_new:
                    got.append(x_new if q[j] == t_new else _interpolate(x, h, ks, (q[j] - t) / h))
                    j += 1
                out[2] = j
            x, t, k1 = x_new, t_new, ks[6]
        else:
            n_rejected += 1
        if not math.isfinite(ratio):
            factor = _FAC_MIN
        elif ratio == 0.0:
            factor = _FAC_MAX
        else:
            factor = min(_FAC_MAX, max(_FAC_MIN, _SAFETY * ratio ** (-1.0 / _ORDER)))
        h = h * factor

    states = torch.stack(outputs[0][1])
    if not return_stats:
        return states
    stats = {"nfe": nfe, "n_accepted": n_accepted, "n_rejected": n_rejected}
    if knots is not None:
        knots_x = torch.stack(outputs[1][1])
        knots_u = torch.stack([call_model(model, xk, time_vector(tk, xk), extras, check_finite)
                               for tk, xk in zip(knots, knots_x)])
        stats.update(knots_t=torch.tensor(knots, dtype=x0.dtype, device=x0.device),
                     knots_x=knots_x, knots_u=knots_u, nfe_knots=len(knots))
    return states, stats
