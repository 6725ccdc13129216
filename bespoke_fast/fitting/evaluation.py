"""Evaluating a solver against GT endpoints: RMSE and both PSNRs (with 95% bootstrap intervals)
at its NFE, and the fraction of samples sent to another mode than GT's where the model has
modes."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .._checks import InvalidArgumentError, InvalidTypeError
from .trajectories import TrajectorySet
from ..io import check_model_identity
from ..metrics import mode_flip_fraction, rmse_psnr
from ..solvers.interface import Solver
from ..solvers.fixed import METHODS, NFE_PER_STEP, solve

__all__ = ["evaluate", "parse_solver_spec", "mode_assigner", "trained_on"]

_SPEC = re.compile(r"^(?P<method>[a-z0-9]+)@(?P<nfe>\d+)$")


def parse_solver_spec(spec):
    """A solver (the Solver interface, or any object with ``sample`` and ``nfe``), a solver file
    path, or a baseline ``"name@NFE"`` (euler, midpoint, heun, rk4). Returns ``(label, sampler_fn(model, x0, **extras), nfe)``."""
    if isinstance(spec, Solver):
        return f"{spec.kind}-{spec.header}@{spec.nfe}", spec.sample, spec.nfe
    if hasattr(spec, "sample") and hasattr(spec, "nfe"):   # solver-like (e.g. a bench peer)
        label = f"{getattr(spec, 'kind', type(spec).__name__)}-{getattr(spec, 'base', '')}"
        return f"{label}@{spec.nfe}", spec.sample, spec.nfe
    if not isinstance(spec, str):
        raise InvalidTypeError(f"solver must be a solver object, a solver file or 'method@NFE', got {spec!r}")
    m = _SPEC.match(spec)
    if m:
        method, nfe = m["method"], int(m["nfe"])
        if method not in METHODS:
            raise InvalidArgumentError(f"unknown method {method!r} in {spec!r}; expected one of {', '.join(METHODS)}")
        per = NFE_PER_STEP[method]
        if nfe < per or nfe % per:
            raise InvalidArgumentError(f"{spec!r}: {method} uses {per} NFE per step, so NFE must be a positive "
                             f"multiple of {per}")
        return spec, (lambda model, x0, **ex: solve(model, x0, method, n_steps=nfe // per, **ex)), nfe
    if Path(spec).is_file() or spec.endswith(".json") or "/" in spec:
        from ..solvers.files import load_solver     # a missing file: the message 'sample' gives
        solver = load_solver(spec)
        return Path(spec).name, solver.sample, solver.nfe
    raise InvalidArgumentError(f"solver {spec!r} is neither a solver file nor 'method@NFE' "
                     f"(e.g. midpoint@10; methods: {', '.join(METHODS)})")


def mode_assigner(model, name: str = ""):
    """``assign(x [B, ...]) -> [B]`` mode index, or ``None`` when the model has no known modes.

    * Gaussian mixture flows (``gmm-64``, ``digits-exact``, any ``GaussianMixtureFlow``): the
      component of highest posterior ``log w_k - |x - mu_k|^2 / (2 tau_k^2) - D log tau_k`` at
      the data end (for ``digits-exact``: which training digit the sample reproduces);
    * the trained digits models (``name`` starting with ``digits-``, samples ``[1, 8, 8]``): the
      class predicted by the digits classifier (``bespoke_fast.zoo.quality``) on the clamped
      sample."""
    from ..models import GaussianMixtureFlow
    inner = getattr(model, "model", model)
    if isinstance(inner, GaussianMixtureFlow):
        mu, tau2, logw = inner.means, inner.stds.pow(2), inner.log_weights
        dim = mu.shape[1]

        def assign(x):
            xf = x.reshape(x.shape[0], -1).to(mu)
            d2 = torch.cdist(xf, mu).pow(2)
            return (logw - d2 / (2 * tau2) - 0.5 * dim * torch.log(tau2)).argmax(1)
        return assign
    if name.startswith("digits-"):
        from ..zoo.quality import digits_classifier
        clf, _ = digits_classifier()

        def assign(x):
            if tuple(x.shape[1:]) != (1, 8, 8):
                raise InvalidArgumentError(f"the digits classifier needs [B, 1, 8, 8] samples, "
                                           f"got {tuple(x.shape)}")
            flat = x.detach().double().cpu().clamp(-1, 1).reshape(len(x), -1).numpy()
            return torch.as_tensor(clf.predict(flat))
        return assign
    return None


def trained_on(solver, trajectories: TrajectorySet) -> bool:
    """Whether ``solver`` (its file metadata) was fitted on GT drawn with the same noise seed as
    ``trajectories``: noise i depends only on (seed, i), so such GT shares its noises with the
    training set and scores the solver on what it was fitted to."""
    meta = getattr(solver, "meta", None) or {}
    seed = meta.get("training", {}).get("gt_seed")
    have = trajectories.meta.get("seed")
    solver_hash = meta.get("model", {}).get("hash")
    same_model = solver_hash in (None, "", trajectories.meta.get("model", {}).get("hash"))
    return seed is not None and have is not None and seed == have and same_model


def evaluate(model, solver, trajectories: TrajectorySet, batch_size: int = 1024,
             model_name: str = "", allow_model_mismatch: bool = False, intervals: bool = True,
             modes="auto") -> dict:
    """RMSE and PSNR of ``solver`` against the GT endpoints ``x(1)`` of ``trajectories``.

    Evaluate on GT drawn with a noise seed the solver was not trained on (``bespoke-fast gt
    --seed 1``) and with >= 1,024 trajectories: the intervals say how far the figures can be
    trusted.

    Args:
        model: the velocity model. solver: a BespokeSolver / NonStationarySolver, a solver file,
            or ``"midpoint@10"``-style baseline. trajectories: a TrajectorySet.
        model_name: the model's name, compared with the names the GT set and the solver record
            when a hash is missing. allow_model_mismatch: skip the identity checks; without it a
            GT set or solver made for another model raises ``MismatchError``.
        intervals: add 95% bootstrap intervals (``psnr_ci``, ``psnr_set_ci``, ``rmse_ci``).
        modes: ``"auto"`` (:func:`mode_assigner` of the model and the GT's model name), a callable
            ``assign(x) -> [B]``, or None: adds ``mode_flips``, the fraction of samples whose
            mode / class differs from the GT endpoint's (absent when the model has no modes).
    Returns: ``{"solver", "nfe", "rmse", "psnr", "psnr_set", "data_range", "n", ...}`` (mean
    per-sample RMSE and PSNR, the set-level PSNR, the data range R used for PSNR, the number of
    samples; the intervals and mode flips as above), and ``nonfinite``: the number of samples
    with a NaN/Inf (their metrics are then NaN; ``first_nonfinite`` is the first one's row).

    Example::

        >>> evaluate(model, "midpoint@10", load_trajectories("runs/gt_test"))["psnr_ci"]
    """
    if not all(hasattr(trajectories, a) for a in ("x0", "x1", "meta", "extras", "data_range")):
        raise InvalidTypeError(f"trajectories must be a GT set (load_trajectories(DIR)), got "
                               f"{type(trajectories).__name__}")
    check_model_identity(trajectories.meta.get("model"), model, model_name, "the GT set",
                         allow_model_mismatch)
    label, sample, nfe = parse_solver_spec(solver)
    fitted = getattr(sample, "__self__", None)      # a solver object or file (not a baseline)
    if fitted is not None:
        check_model_identity(getattr(fitted, "meta", {}).get("model"), model, model_name,
                             f"solver {label}", allow_model_mismatch)
    outs = []
    with torch.no_grad():
        for lo in range(0, len(trajectories), batch_size):
            rows = slice(lo, lo + batch_size)
            extras = {k: v[rows] for k, v in trajectories.extras.items()}
            outs.append(sample(model, trajectories.x0[rows], **extras))
    x = torch.cat(outs)
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    out = {"solver": label, "nfe": nfe,
           **rmse_psnr(x, trajectories.x1, trajectories.data_range, intervals=intervals),
           "nonfinite": int((~finite).sum())}
    if out["nonfinite"]:
        out["first_nonfinite"] = int((~finite).nonzero()[0])
    if modes == "auto":
        modes = mode_assigner(model, trajectories.meta.get("model", {}).get("name", ""))
    if modes is not None:
        out["mode_flips"] = mode_flip_fraction(x, trajectories.x1, modes)
    return out
