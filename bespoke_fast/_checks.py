"""Argument and model-output checks shared by every solver: one place, one wording, and the
library's documented error types.

Errors that are the user's to fix (bad arguments, bad or foreign files, a model that breaks the
velocity contract or produces NaN/Inf, an output that cannot be written) derive from
:class:`BespokeFastError`; each also derives from the matching builtin (``ValueError``,
``TypeError``, ``FloatingPointError``, ``OSError``) so older ``except ValueError`` code keeps
working. The command line prints them as one line (exit code 2); anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager

import torch

__all__ = ["BespokeFastError", "InvalidArgumentError", "InvalidTypeError", "InvalidFileError",
           "SolverFileError", "MissingFileError", "MismatchError", "ModelContractError", "ModelError",
           "NonFiniteError",
           "OutputError", "MissingDependencyError", "check_int", "check_choice", "check_positive", "check_state",
           "call_model", "time_vector", "model_error", "model_errors", "raised_by_model"]


class BespokeFastError(Exception):
    """Base of every user-fixable error the library raises (see the module docstring)."""


class InvalidArgumentError(BespokeFastError, ValueError):
    """An argument value out of range (``num=0``, ``rtol=-1``, an unknown choice, ...)."""


class InvalidTypeError(BespokeFastError, TypeError):
    """An argument of the wrong type (``num=1.5``)."""


class InvalidFileError(BespokeFastError, ValueError):
    """A file or directory (GT set, samples, checkpoint) that is damaged or not ours; the message
    starts with its path."""


class MissingFileError(BespokeFastError, FileNotFoundError):
    """A file or directory the call needs does not exist; the message names it."""


class SolverFileError(InvalidFileError):
    """An invalid solver file; the message starts with its path."""


class MismatchError(BespokeFastError, ValueError):
    """An artefact made by another run or another model than the one given (a rerun with other
    arguments into an existing folder, a solver fitted to another model, a checkpoint of another
    GT set). The message names the differing field and how to proceed."""


class ModelContractError(BespokeFastError, TypeError, ValueError):
    """The model broke the velocity contract (returned a non-tensor, another shape or dtype).
    Both a ``TypeError`` and a ``ValueError``, as the separate checks were before."""


class ExecutionError(BespokeFastError, RuntimeError):
    """A run that cannot go on: an adaptive solve whose step count or step size ran out, a CUDA
    graph capture that left the device unusable."""


class ModelError(BespokeFastError, RuntimeError):
    """The user's model raised an exception: the message names the call (which samples, the
    time, the input shape) and the model's own message; ``__cause__`` is the original."""


def model_error(e: BaseException, where: str, x=None, t=None) -> ModelError:
    """A one-line :class:`ModelError` for exception ``e`` raised by the model ``where`` (e.g.
    ``"at GT samples 0..255"``), with the time ``t`` (first entry) and input ``x``'s shape."""
    parts = [where]
    if t is not None:
        try:
            parts.append(f"t={float(torch.as_tensor(t).reshape(-1)[0]):.3g}")
        except (RuntimeError, ValueError, IndexError):
            pass
    if isinstance(x, torch.Tensor):
        parts.append(f"input shape {tuple(x.shape)}")
    text = " ".join(str(e).split()) or "(no message)"
    if len(text) > 300:
        text = text[:297] + "..."
    return ModelError(f"the model raised {type(e).__name__} {', '.join(parts)}: {text}; "
                      f"--debug shows the traceback")


@contextmanager
def model_errors(model, where: str, x=None):
    """Inside the block, an exception raised in ``model``'s own code (:func:`raised_by_model`)
    becomes a one-line :class:`ModelError` naming ``where`` (and ``x``'s shape); the library's
    errors and its bugs pass unchanged.

    Example::

        >>> with model_errors(net, "during the fit (training or evaluation)"):
        ...     train(net, gt)
    """
    try:
        yield
    except BespokeFastError:
        raise
    except Exception as e:  # noqa: BLE001 -- the user's model's exceptions: one line
        if not raised_by_model(e, model):
            raise
        raise model_error(e, where, x) from e


def _model_files(model) -> set:
    """Source files of ``model``'s code: its class (or function) and its submodules' classes,
    except bespoke_fast's and torch's own."""
    import inspect
    import os
    skip = (os.path.dirname(os.path.abspath(__file__)),
            os.path.dirname(os.path.abspath(torch.__file__)))
    parts = list(model.modules()) if isinstance(model, torch.nn.Module) else [model]
    files = set()
    for part in parts:
        target = getattr(part, "__func__", part)
        target = target if inspect.isfunction(target) else type(target)
        try:
            f = os.path.abspath(inspect.getfile(target))
        except (TypeError, OSError):
            continue
        if not f.startswith(skip):
            files.add(f)
    return files


def raised_by_model(e: BaseException, model) -> bool:
    """Whether ``e`` was raised inside the code of ``model`` (a frame of its traceback is in
    the source file of the model's class or function, or of one of its submodules' classes):
    the user's model, not a bug of the library."""
    import os
    files = _model_files(model)
    tb = e.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) in files:
            return True
        tb = tb.tb_next
    return False


def probe_model(model, shape, device="cpu", extras=None, dtype=torch.float32) -> None:
    """One call of ``model`` at batch 2 (t = 0.5, fixed noise) before any plan or work: a model
    that raises, or breaks the velocity contract for ``shape``, fails here in one line
    (:class:`ModelError` / :class:`ModelContractError`)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, generator=g, dtype=dtype).to(device)
    t = torch.full((2,), 0.5, dtype=dtype, device=device)
    try:
        with torch.no_grad():
            call_model(model, x, t, dict(extras or {}))
    except BespokeFastError:
        raise
    except Exception as e:  # noqa: BLE001 -- the user's model: reported in one line
        raise model_error(e, "on the probe call (batch 2, before any work)", x, t) from e


class NonFiniteError(BespokeFastError, FloatingPointError):
    """The model (or a solver) produced NaN or Inf; the message names where."""


class MissingDependencyError(BespokeFastError, ModuleNotFoundError):
    """An optional package a feature needs is not installed; the message says what to install.

    A ``ModuleNotFoundError`` (so an ``ImportError`` too): ``pytest.importorskip`` skips on it,
    and ``except ImportError`` still catches it."""


class OutputError(BespokeFastError, OSError):
    """An output could not be written (permission, disk full, a directory in the way); the
    message names the file."""


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` must be a Python/NumPy integer (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidTypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} "
                               f"{value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise InvalidArgumentError(f"unknown {name} {value!r}; expected one of "
                                   f"{', '.join(map(repr, choices))}")
    return value


def check_positive(name: str, value) -> float:
    """``value`` must be a real number, finite and > 0 (tolerances, learning rates)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{name} must be a positive finite number, got "
                               f"{type(value).__name__} {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise InvalidArgumentError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_state(name: str, x) -> torch.Tensor:
    """A sampler state must be a floating-point tensor with a batch dimension."""
    if not isinstance(x, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InvalidTypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise InvalidArgumentError(f"{name} must have shape [B, ...] with B >= 1, got {tuple(x.shape)}")
    return x


def call_model(model, x: torch.Tensor, t: torch.Tensor, extras: dict, check_finite: bool = False,
               expect_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Evaluate ``model(x, t, **extras)`` and check the contract: same shape as ``x`` and a
    floating dtype (``expect_dtype`` when given, default ``x.dtype``); optionally finite.

    ``check_finite`` costs one device->host sync per call: it is for solvers and tests, never
    for the CUDA-graph engine.
    """
    u = model(x, t, **extras)
    if not isinstance(u, torch.Tensor):
        raise ModelContractError(f"the model must return a torch.Tensor, got {type(u).__name__}")
    if u.shape != x.shape:
        raise ModelContractError(f"the model returned shape {tuple(u.shape)} for an input of shape "
                         f"{tuple(x.shape)}; a velocity model must return the input's shape")
    want = expect_dtype or x.dtype
    if u.dtype != want:
        raise ModelContractError(f"the model returned dtype {u.dtype} for an input of dtype {x.dtype}; "
                        f"expected {want} (cast inside the model, or wrap it)")
    if check_finite and not bool(torch.isfinite(u).all()):
        at = float(t.detach().reshape(-1)[0])
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"the state given to the model at t={at:.6g} holds NaN/Inf "
                                 f"already (x0, the extras or an earlier step), so its velocity "
                                 f"does too")
        raise NonFiniteError(f"the model returned a non-finite velocity (NaN or Inf) at t={at:.6g}")
    return u


def time_vector(t, like: torch.Tensor) -> torch.Tensor:
    """A scalar time (float or 0-d tensor) -> ``[B]`` tensor on ``like``'s device and dtype."""
    if isinstance(t, torch.Tensor):
        return t.to(device=like.device, dtype=like.dtype).reshape(()).repeat(like.shape[0])
    return torch.full((like.shape[0],), float(t), device=like.device, dtype=like.dtype)
