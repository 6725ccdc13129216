"""Will my model capture in a CUDA graph? A CPU-side check, before renting a GPU.

:func:`check_capturable` builds the :class:`~bespoke_fast.FastSampler` a GPU run would build and
runs its captured region (:meth:`FastSampler.captured_region`: the sampler's own loop on its own
state buffers, nothing re-implemented) on CPU, with the sampler's buffers and the model's
parameters and buffers on PyTorch's ``meta`` device, which plays the GPU: shapes, dtypes and devices are tracked, no memory
is touched, no GPU is needed. (A fake ``cuda`` device, ``FakeTensorMode``, would be closer, but
a CPU-only torch build cannot index such tensors.) A dispatch mode watches every aten op of the
loop and reports what a real capture rejects:

* host reads of a device value: ``.item()``, ``float()``, ``bool()`` / ``if tensor:``,
  ``torch.equal`` (``aten._local_scalar_dense``, ``aten.is_nonzero``, ``aten.equal``);
* data-dependent output shapes: ``nonzero``, boolean-mask indexing, ``masked_select``,
  ``unique``, ... (their size is only known after a device-to-host read);
* device-to-host copies (``.cpu()``, ``.to("cpu")``, ``.tolist()``; ``.numpy()`` fails on
  the meta device and is reported with its error) and host-to-device copies of host tensors
  made inside the loop (a synchronous copy from pageable memory);
* ``torch.cuda.synchronize()``;
* anything else that fails on the device: a host tensor mixed into a device op, a dtype error.

Each problem names the aten op and the first frame of user code (``file:line``) that caused it,
skipping torch and the sampler's own machinery. Not seen: printing a device tensor (a meta
tensor prints without values), branches on ``tensor.is_cuda`` or ``torch.cuda`` calls other than
``synchronize``, and Python-side values a model reads (its own counters, Python RNG): those are
legal in a capture but frozen into the graph. The Triton kernels are not run here (the check
uses the reference ops); their launches take a Python-int step and read device tables, and the
``aot`` tests compile every variant for sm_90 / sm_80.

The same dispatch mode (:class:`HostSyncDetector`) is what the tests' stand-in ``torch.cuda``
applies during a "capture", so the engine's graph path is exercised on CPU.

    >>> import bespoke_fast as bf
    >>> report = bf.check_capturable(bf.zoo.load("gmm-64").model, bf.BespokeSolver("rk2", 5), (64,))
    >>> report.ok, report.problems
    (True, [])

Command line: ``bespoke-fast doctor --model gmm-64 [--solver FILE] [--model-dtype bf16]``.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .solvers.base import Solver

__all__ = ["check_capturable", "CaptureReport", "HostSyncDetector", "HostSyncError"]

aten = torch.ops.aten

# ops that hand a device value to the host (the Python scalar or bool they return)
_HOST_READS = {
    aten._local_scalar_dense.default: ".item() / float() / int() / bool()",
    aten.is_nonzero.default: "bool(tensor) / `if tensor:`",
    aten.equal.default: "torch.equal (returns a Python bool)",
}
# ops whose output shape depends on the values (needs a device-to-host read of a count)
_DATA_DEPENDENT = {
    "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "bincount",
}

_TORCH_DIR = os.path.dirname(torch.__file__)
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
# the sampler's machinery: a problem is never reported at these frames, but at the user code
# they call (models in bespoke_fast, e.g. models.py and the zoo, ARE reported)
_MACHINERY = {os.path.join(_PKG_DIR, f) for f in ("capture.py", "_checks.py")}
_MACHINERY_DIRS = tuple(os.path.join(_PKG_DIR, d) + os.sep for d in ("engine", "ops"))
# the kernels: bespoke_fast/kernels when installed, under the repository's kernels/ when editable
_KERNEL_DIRS = tuple(os.path.join(d, "kernels") + os.sep
                     for d in (_PKG_DIR, os.path.dirname(_PKG_DIR)))


class HostSyncError(RuntimeError):
    """Raised by a strict :class:`HostSyncDetector` at the first op a capture would reject."""


def _is_machinery(filename: str) -> bool:
    f = os.path.abspath(filename)
    return (f.startswith(_TORCH_DIR + os.sep) or f in _MACHINERY
            or f.startswith(_MACHINERY_DIRS + _KERNEL_DIRS)
            or f.endswith(os.sep + "contextlib.py"))


def user_frame(frames=None) -> str:
    """``file:line`` of the innermost frame outside torch and the sampler's machinery."""
    frames = traceback.extract_stack()[:-1] if frames is None else frames
    for fr in reversed(frames):
        if not _is_machinery(fr.filename):
            return f"{fr.filename}:{fr.lineno}"
    return "<unknown>"


def _flat_tensors(args, kwargs):
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


class HostSyncDetector(TorchDispatchMode):
    """A dispatch mode that records (``strict=False``) or raises :class:`HostSyncError` on
    (``strict=True``) every op a CUDA-graph capture rejects; see the module docs.

    Args:
        device_types: which tensors count as "on the device": ``{"meta"}`` for
            :func:`check_capturable` (a host read of a real CPU tensor is then legal: no device
            is involved), ``{"cuda"}`` on a GPU, or ``None`` to treat EVERY tensor
            as a device tensor (CPU stand-in runs, where the buffers play the device).
        strict: raise at the first problem, like a real capture.

    ``problems``: one line per (op, user frame), in order of first occurrence.
    """

    def __init__(self, device_types=("meta", "cuda"), strict: bool = False):
        super().__init__()
        self.device_types = None if device_types is None else set(device_types)
        self.strict = strict
        self.problems: list[str] = []
        self._seen: set = set()

    def _on_device(self, t: torch.Tensor) -> bool:
        return self.device_types is None or t.device.type in self.device_types

    def report(self, what: str, op, where: str | None = None) -> None:
        where = where or user_frame()
        line = f"{what} [aten.{getattr(op, '__name__', op)}] at {where}"
        if (line not in self._seen):
            self._seen.add(line)
            self.problems.append(line)
        if self.strict:
            raise HostSyncError(f"operation not permitted when stream is capturing: {line}")

    def _copy_problem(self, func, args, kwargs):
        name = func.overloadpacket.__name__
        if name == "_to_copy":
            src, dst_dev = args[0], kwargs.get("device")
            if dst_dev is None or torch.device(dst_dev).type == src.device.type:
                return None
            dst_type = torch.device(dst_dev).type
        elif name in ("copy_", "_copy_from", "_copy_from_and_resize"):
            dst, src = (args[0], args[1]) if name == "copy_" else (args[1], args[0])
            if dst.device.type == src.device.type:
                return None
            dst_type = dst.device.type
        else:
            return None
        if self.device_types is None:
            return None
        if src.device.type in self.device_types and dst_type not in self.device_types:
            return "device-to-host copy (.cpu() / .to('cpu') / .tolist() / .numpy())"
        if src.device.type not in self.device_types and src.dim() > 0:
            return ("host-to-device copy of a host tensor made during the loop (a synchronous "
                    "copy; create it on the device, or once outside the loop)")
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _flat_tensors(args, kwargs)
        if func in _HOST_READS and any(self._on_device(t) for t in tensors):
            self.report(f"host read of a device value: {_HOST_READS[func]}", func)
            return _dummy_scalar(func, tensors)
        name = func.overloadpacket.__name__
        data_dependent = name in _DATA_DEPENDENT or (
            name == "repeat_interleave" and "int" not in func._overloadname)
        if data_dependent and any(self._on_device(t)
                                  for t in tensors):
            self.report("data-dependent output shape (needs a device-to-host read of its size)",
                        func)
            # no shape to give back without the values: stop this run here
            raise HostSyncError(f"data-dependent shape at {user_frame()}")
        if func is aten.index.Tensor and any(t.dtype == torch.bool for t in _flat_tensors(
                args[1:], {}) if t is not None) and self._on_device(args[0]):
            self.report("boolean-mask indexing (data-dependent output shape)", func)
            raise HostSyncError(f"data-dependent shape at {user_frame()}")
        why = self._copy_problem(func, args, kwargs)
        if why:
            self.report(why, func)
            if why.startswith("device-to-host") and args[0].device.type == "meta":
                # a meta tensor has no values to copy out: hand back an empty host tensor
                if func.overloadpacket.__name__ == "_to_copy":
                    return torch.empty_like(args[0], device="cpu", dtype=kwargs.get("dtype"))
                return args[0]
        return func(*args, **kwargs)


def _dummy_scalar(func, tensors):
    """A stand-in result for a reported host read, so the run goes on and finds more."""
    if func is aten._local_scalar_dense.default:
        t = tensors[0]
        return False if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
    return False


@dataclass
class CaptureReport:
    """Result of :func:`check_capturable`: ``ok`` when the captured region did nothing a CUDA
    graph capture rejects; ``problems``: one line each (what, the aten op, user ``file:line``);
    ``config``: what was checked."""

    ok: bool
    problems: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def __str__(self) -> str:
        head = ", ".join(f"{k}={v}" for k, v in self.config.items())
        if self.ok:
            return f"capturable: the sampling loop can run in one CUDA graph ({head})"
        lines = [f"NOT capturable ({head}): {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


@contextlib.contextmanager
def _no_cuda_synchronize(detector):
    """``torch.cuda.synchronize`` (and stream/event syncs) inside the loop are problems too."""
    saved = torch.cuda.synchronize

    def sync(device=None):
        detector.report("torch.cuda.synchronize() inside the loop", "synchronize")

    torch.cuda.synchronize = sync
    try:
        yield
    finally:
        torch.cuda.synchronize = saved


def _meta_module_state(module):
    """Every parameter and buffer of ``module`` as an (empty) tensor on the meta device."""
    if not isinstance(module, torch.nn.Module):
        return {}
    return {name: torch.empty_like(t, device="meta")
            for name, t in list(module.named_parameters()) + list(module.named_buffers())}


def check_capturable(model, solver, shape, *, batch_size: int = 2,
                     model_dtype: torch.dtype = torch.float32, guidance=None,
                     **extras) -> CaptureReport:
    """Run the sampler's captured region for ``model`` + ``solver`` on the meta device and
    report what a CUDA-graph capture would reject (see the module docs).

    Args:
        model: the velocity model (or a ``cfg(...)`` model) as you would pass it to
            ``FastSampler``, on the CPU; for the check its parameters and buffers are replaced
            by meta tensors (the model itself is not changed).
        solver: a ``BespokeSolver`` (rk1 / rk2) or ``NonStationarySolver``.
        shape: one sample's shape. batch_size, model_dtype, guidance: as ``FastSampler``.
        **extras: the extras you would call the sampler with (e.g. ``y=labels``); tensors are
            moved to the meta device.

    Returns: a :class:`CaptureReport`. Exceptions of the model itself during the run (e.g. a
    host tensor mixed into a device op) are reported as problems, not raised.

    Example::

        >>> report = check_capturable(model, solver, (3, 32, 32), model_dtype=torch.bfloat16)
        >>> assert report.ok, str(report)
    """
    from torch.nn.utils.stateless import _reparametrize_module

    from .engine import FastSampler

    device = torch.device("meta")
    config = {"solver": (f"{solver.kind}/{solver.header} n={solver.n_steps}"
                         if isinstance(solver, Solver) else type(solver).__name__),
              "batch_size": batch_size, "model_dtype": str(model_dtype).replace("torch.", ""),
              "guided": guidance is not None}
    detector = HostSyncDetector(device_types={"meta"})
    ctx = (_reparametrize_module(model, _meta_module_state(model))
           if isinstance(model, torch.nn.Module) else contextlib.nullcontext())
    with ctx, torch.no_grad():
        sampler = FastSampler(model, solver, shape, batch_size, model_dtype=model_dtype,
                              backend="reference", cuda_graph=False, guidance=guidance,
                              device=device)
        run, _ = sampler.captured_region(torch.zeros(batch_size, *sampler.shape, device=device),
                                         **extras)
        try:
            with detector, _no_cuda_synchronize(detector):
                run()  # the captured region, exactly
        except HostSyncError:
            pass  # recorded; the run cannot go on past a data-dependent shape
        except Exception as e:  # the loop fails on the device for another reason
            frames = traceback.extract_tb(e.__traceback__)
            detector.problems.append(
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                f" at {user_frame(frames)}")
    return CaptureReport(ok=not detector.problems, problems=list(detector.problems), config=config)
