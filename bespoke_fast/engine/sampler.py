"""The fast sampler: a learned solver's whole NFE loop on preallocated buffers, optionally fused
Triton updates, and (on CUDA) the entire loop -- every model call included -- captured in ONE
CUDA graph and replayed.

Anatomy of one call (``B`` = rows asked for, ``Bp`` = the run size, see *Batch sizes*)::

    x      float32 [Bp, *shape]   solver state: x0 copied in (padded with zeros); the output
    model_in  model_dtype [Bp or 2Bp, *shape]   the network's input, written by the update op
    times  float32 [NFE, Bp or 2Bp]   the model times, one row per model call, copied from the
           device table when the state is made and after load_solver (never .item())
    + the program's own device table (and 0-d coefficient views into it) and buffers

    program.loop(x, x0, extras)    # for each step: model call(s), then the update op(s)

The program is chosen by the solver's ``kind`` (``PROGRAMS``): :mod:`bespoke_fast.engine.rk`
(Bespoke RK1 / RK2: ``[n, 8]`` table, ``x_mid``) and :mod:`bespoke_fast.engine.bns`
(non-stationary: flat ``t | a | b`` table, the past velocities ``us``); each module shows its
step. Table layouts: :mod:`bespoke_fast.ops.table`. When the model runs in float32 without
guidance the model input IS the state buffer, so no model-input copy is made at all.

Eager path (CPU; CUDA with ``cuda_graph=False``; a key whose capture failed)
    The loop runs on a NEW float32 output tensor (RK: a copy of ``x0``; BNS: an empty ``x``,
    reading a float32 contiguous ``x0`` in place) and the caller's extras (padded / doubled for
    guidance only when needed): no static buffers, no copies into them, no output clone when
    ``B == batch_size``. Everything else lives in the cached state and is reused. On the
    ``"reference"`` backend each update is the reference op's own torch ops on 0-d coefficient
    views made once per solver, so the result is bitwise equal to the reference ops
    (``tests/test_eager_ops.py``). Update ops per call (aten ops, the model's own excluded;
    ``n`` steps, ``T = n (n + 1) / 2`` terms of the BNS sums; ``B == batch_size``), pinned by
    ``tests/test_eager_ops.py``::

        kind  fp32          bf16 (low precision)   guided fp32 / bf16
        rk1   2n + 1        3n + 1                 6n + 3
        rk2   5n + 1        7n + 1                 13n + 3
        bns   2n + 2T + 1   3n + 3T + 1            6n + 2T + 4  /  6n + 3T + 4

    Per RK2 step (fp32): ``mul(out=)`` + ``addcmul_`` (stage 1), ``mul(out=)`` + 2
    ``addcmul_`` (stage 2); bf16 adds one copy into ``model_in`` per stage (the update reads
    the bf16 output in place: no upcast copy); guidance adds the combine (split or upcast copy,
    ``sub(out=)``, ``addcmul(out=)``) per stage and writes both halves of ``model_in`` in one
    copy. The ``+ 1`` is the output (a copy of ``x0``, or BNS's empty ``x``); a model-input
    buffer adds its first write, guidance the condition's copy into its doubled buffer (kept
    per sampler, null half written once; a tensor or callable ``null`` builds it with 3 ops
    instead) and the ``[2, Bp]`` view of ``x``. No step allocates.

    Exact coefficients: these are the counts for general coefficients. The eager loop skips
    the terms that are exact no-ops for the loaded solver (read once per solver: ``A == 1``,
    ``C == 1``, ``D == 0``; RK1 ``a == 1``), so the identity solver (the midpoint / Euler
    rule) runs ``3n`` fewer ops for RK2 (fp32: ``2n + 1``) and ``n`` fewer for RK1. The
    ``D == 0`` skip is the one inexact case: equal to the reference (``torch.equal``) but an
    exact zero may keep its sign (:mod:`bespoke_fast.engine.rk`). A captured graph keeps
    every term.

Batch sizes
    A call with ``B <= batch_size`` rows runs at ``Bp = batch_size``: the rows are PADDED with
    zeros (per-sample tensor extras, i.e. those whose first dim is ``B``, are padded by repeating
    their last row) and the result is sliced back to ``B``. A call with ``B > batch_size`` runs
    at ``Bp = B`` (a new graph / buffer set). :meth:`FastSampler.sample` streams batches at its
    own ``batch_size`` (default the constructor's), padding only the last one. Padding keeps the
    number of captured graphs small; its cost is the compute of the padded rows, so pick
    ``batch_size`` to match the batches you actually run. On the eager path a padded call
    returns its rows as a view of the call's own fresh output when they are at least half of
    it (no copy; the view keeps at most twice its memory alive), else a copy.

Graph cache
    One state (buffers + graph) per ``(Bp, shape, model_dtype, extras signature)``; the extras
    signature holds each tensor extra's shape/dtype and the VALUE of each non-tensor extra (it is
    baked into the graph). States live in an LRU dict of at most ``max_graphs`` entries.

CUDA graph (device cuda and ``cuda_graph=True``)
    First use of a key: warm up on a side stream (``warmup >= 1`` full loops; compiles and
    caches the Triton kernels, cuBLAS workspaces, ``torch.compile`` code, so none of that happens
    inside the capture), then capture the whole loop with ``torch.cuda.graph(g, stream=side,
    capture_error_mode="thread_local")`` (CUDA calls of OTHER threads, e.g. a data loader
    pinning memory, do not break it), then replay. One side stream per device serves every
    warm-up and capture (a stream per capture would also get a cuBLAS workspace each). Later calls copy x0 / extras into the
    static buffers, ``g.replay()``, and return ``x[:B].clone()``. Capture time (warm-up
    included) is kept apart in ``capture_seconds[key]`` and :meth:`FastSampler.stats`.

    If the capture raises (the model syncs with the host: ``.item()``, ``.cpu()``, printing a
    CUDA tensor, data-dependent shapes, ...), the sampler warns ONCE for that key with the
    reason, frees the failed graph and releases its private memory pool at once (the capture
    runs on a pool of the sampler's own, released explicitly because ``graph.reset()`` skips
    the pool of a capture that never ended; blocks the failure's traceback still holds are
    freed by the next ``empty_cache``), and runs the same loop eagerly for that key from then
    on. The cuBLAS workspace of the side stream stays, as after any cuBLAS call on a stream.
    ``bespoke_fast.check_capturable`` (CLI: ``bespoke-fast doctor``) finds such models on CPU,
    before a GPU run. Host-side values a model
    reads during capture (Python RNG, counters) are frozen into the graph: such models should
    use ``cuda_graph=False``.
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from collections import OrderedDict

import torch

from .._checks import NonFiniteError, call_model, check_int, check_state
from ..models import GuidedModel
from ..noise import noise_for_indices
from ..ops.backend import resolve_backend
from ..solvers.base import Solver
from ..utils import infer_device
from .bns import BNSProgram
from .rk import RKProgram
from .._checks import ExecutionError, InvalidArgumentError, InvalidTypeError

__all__ = ["FastSampler", "PROGRAMS"]

# One engine program per solver kind, keyed by the solver interface's ``kind``.
PROGRAMS = {RKProgram.kind: RKProgram, BNSProgram.kind: BNSProgram}


def _extra_signature(extras: dict) -> tuple:
    """Hashable description of the extras: tensors by (shape, dtype), other values by value
    (they are baked into a captured graph, so a different value needs another graph)."""
    sig = []
    for k in sorted(extras):
        v = extras[k]
        if isinstance(v, torch.Tensor):
            sig.append((k, "tensor", tuple(v.shape), v.dtype))
        else:
            try:
                hash(v)
                sig.append((k, "value", type(v).__name__, v))
            except TypeError:
                sig.append((k, "repr", type(v).__name__, repr(v)))
    return tuple(sig)


def _exception_chain(e: BaseException, limit: int = 3) -> str:
    """``capture_end`` may raise while the model's own error is being handled: report both,
    innermost (the model's) first."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen and len(chain) < limit:
        seen.add(id(e))
        chain.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        e = e.__cause__ or e.__context__
    return " <- ".join(reversed(chain))


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """ONE side stream per device for every warm-up and capture: a new stream per capture
    would also get its own cuBLAS workspace (memory that is never given back)."""
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


def _release_failed_capture(graph, pool) -> None:
    """After a failed capture: free the graph and hand its private memory pool back now.

    ``CUDAGraph.reset()`` releases a graph's pool only when its capture ENDED; a capture that
    raised inside (the usual failure: a host sync) never ended, so the pool, with every block
    the loop allocated before the failure, would stay reserved for the life of the process.
    The capture runs on a pool of ours (``pool``, from ``graph_pool_handle``), so this closes
    and releases that pool explicitly when the capture did not end. Blocks that the failure's
    traceback still holds return to the pool when it dies; the next ``empty_cache`` (or the
    allocator's own retry on out-of-memory) frees them."""
    index = torch.cuda.current_device()
    try:
        graph.pool()  # raises unless the capture ended, in which case reset() releases the pool
        ended = True
    except RuntimeError:
        ended = False
    if not ended:
        try:  # capture_end closes the pool before it fails in some torch versions, not others
            torch._C._cuda_endAllocateToPool(index, pool)
        except RuntimeError:
            pass
    try:
        graph.reset()
    except RuntimeError:  # pragma: no cover - capture_begin itself failed
        pass
    if not ended:
        try:
            torch._C._cuda_releasePool(index, pool)
        except RuntimeError:  # pragma: no cover - capture_begin failed before making the pool
            pass
    torch.cuda.empty_cache()


class _ModelCall:
    """``call(inp, t, extras)``: the network on ``inp`` at the ``[rows]`` time row ``t``, its
    output checked against the model contract (a tensor of ``inp``'s shape and dtype, which is
    ``model_dtype``) on the host. ``net`` and ``check(u, inp, t, extras)`` (raises the contract
    error) are there for loops that make the call themselves (``Program.loop``)."""

    __slots__ = ("net", "check")

    def __init__(self, net, check):
        self.net, self.check = net, check

    def __call__(self, inp: torch.Tensor, t: torch.Tensor, extras: dict) -> torch.Tensor:
        u = self.net(inp, t, **extras)
        if not isinstance(u, torch.Tensor) or u.shape != inp.shape or u.dtype != inp.dtype:
            self.check(u, inp, t, extras)
        return u


class _State:
    """The buffers (and the graph, once captured) of one cache key.

    Made with the state, used by both paths: ``model_in`` (``None`` when the model reads the
    float32 state itself; ``model_in2`` its ``[2, Bp]`` view under guidance), the model times
    ``times`` ``[n, stages, rows]`` (copied from the table's time view ``times_src`` by ONE copy
    when the state is made and after each ``load_solver``, outside any graph; ``t_rows`` its
    ``[rows]`` row per model call) and the program's own buffers (RK2 ``x_mid``; BNS ``us``;
    guidance scratch) as attributes.

    Static, for the CUDA graph (and :meth:`FastSampler.captured_region`) only, made on the first
    :meth:`load`: ``x`` (the state and result), ``x0`` (the start: ``x`` itself for RK, its own
    buffer for BNS) and copies of the tensor extras. The eager path never touches them: it runs
    on a fresh output tensor and the caller's extras."""

    def __init__(self, key, run_b, shape, model_dtype, device, guided, alias, program, extras):
        self.key, self.run_b, self.shape, self.device = key, run_b, shape, device
        rows = 2 * run_b if guided else run_b
        self.model_in = None if alias else torch.zeros(rows, *shape, dtype=model_dtype, device=device)
        self.model_in2 = (self.model_in.view(2, run_b, *shape)
                          if guided and self.model_in is not None else None)
        n, stages = program.n_steps, program.stages
        self.times = torch.zeros(n, stages, rows, dtype=torch.float32, device=device)
        self.times_src = program.time_view().expand(n, stages, rows)
        self.t_rows = list(self.times.view(n * stages, rows).unbind(0))
        self.times_version = -1  # the program's table version the times were copied from
        vars(self).update(program.buffers(run_b, shape, model_dtype))
        self.separate_start = program.kind == "bns"  # the BNS loop reads x0 and writes x
        self.x = self.x0 = self.extras = None
        self.graph = None
        self.failure: str | None = None
        self.capture_tried = False

    def load(self, x0: torch.Tensor, extras: dict) -> None:
        """Copy ``x0`` (zero-padded) and the tensor extras into the static buffers."""
        if self.x is None:
            f32 = dict(dtype=torch.float32, device=self.device)
            self.x = torch.zeros(self.run_b, *self.shape, **f32)
            self.x0 = torch.zeros_like(self.x) if self.separate_start else self.x
            self.extras = {k: (torch.empty_like(v, device=self.device)
                               if isinstance(v, torch.Tensor) else v) for k, v in extras.items()}
        b = x0.shape[0]
        self.x0[:b].copy_(x0)
        if b < self.run_b:
            self.x0[b:].zero_()
        for k, v in extras.items():
            if isinstance(v, torch.Tensor):
                self.extras[k].copy_(v)


def _first_nonfinite_row(x: torch.Tensor):
    """The first row of ``x`` ``[B, ...]`` holding a NaN/Inf, or None (one host sync)."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    return int(bad.nonzero()[0]) if bool(bad.any()) else None


def _check_inputs_finite(x0, extras):
    row = _first_nonfinite_row(x0) if x0.is_floating_point() else None
    if row is not None:
        raise NonFiniteError(f"FastSampler: x0 row {row} is NaN/Inf: the input noise is not "
                             f"finite (not the model's doing)")
    for name, value in extras.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() and \
                not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"FastSampler: the extra {name!r} holds NaN/Inf (not the "
                                 f"model's doing)")


class FastSampler:
    """Sample with a learned solver on preallocated buffers, fused kernels and one CUDA graph.

    Args:
        model: velocity model ``model(x [B, *shape], t [B] float32, **extras) -> u`` (``u`` in
            ``model_dtype``, shaped like ``x``), or a :class:`~bespoke_fast.models.GuidedModel`
            from :func:`bespoke_fast.cfg` for classifier-free guidance. The sampler does not cast
            the model's weights: pass a model that takes ``model_dtype`` inputs. ``x`` and ``t``
            are the sampler's buffers (``t`` is reused by every call): read them, never write
            them.
        solver: a :class:`~bespoke_fast.BespokeSolver` (base ``"rk1"`` or ``"rk2"``) or a
            :class:`~bespoke_fast.solvers.bns.NonStationarySolver` (``kind == "bns"``). A BNS
            solver keeps every past velocity in a ``us`` buffer ``[n, Bp, *shape]`` in
            ``model_dtype``: ``n x Bp x prod(shape) x itemsize`` bytes per cached state, e.g.
            NFE 10, batch 256, shape (3, 32, 32), bf16: 10 * 256 * 3072 * 2 B = 15.7 MB (plus
            the float32 ``x0`` and ``x``, ``Bp x prod(shape) x 4`` B each).
        shape: per-sample shape, e.g. ``(64,)`` or ``(3, 32, 32)``.
        batch_size: the captured batch size (see the module docs on padding).
        model_dtype: dtype of the network input/output (float32, bfloat16, float16). The state
            stays float32; the update ops upcast ``u`` and write the next input in this dtype.
        backend: ``"reference"`` (pure torch, in place into the buffers), ``"triton"`` (fused
            kernels; CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` with ``cuda_graph=False``)
            or ``"auto"`` (triton on CUDA when it imports, else reference).
        cuda_graph: capture the loop in a CUDA graph (only on CUDA devices; ignored elsewhere).
        guidance: ``None``, or the guidance scale ``w`` (needs a ``GuidedModel``; default its
            ``scale``). The network then runs once per stage on a ``[2Bp, ...]`` batch (cond
            half first) and the update op forms ``u_unc + w (u_cond - u_unc)``. BNS solvers
            support it too: the halves are combined in float32 (``ops.rk.guidance_combine_ref``)
            before the velocity is stored into ``us`` (in ``model_dtype``).
        compile_model: wrap the network with ``torch.compile(mode="default")`` before the first
            capture. ``"reduce-overhead"`` / ``"max-autotune"`` use CUDA graphs of their own and
            conflict with capturing the whole loop; if the compiled model still cannot be
            captured the sampler warns and runs eagerly.
        device: where buffers, table and the loop live (default: the model's parameters' device,
            else CPU).
        max_graphs: at most this many cached states (graphs + buffers), least recently used
            evicted first.
        warmup: full loops (>= 1) run on a side stream before a capture, so that Triton
            compiles, cuBLAS workspaces and lazy initialisation happen outside the capture.
        check_finite: check each call's ``x0``, tensor extras and samples for NaN/Inf and raise
            ``NonFiniteError`` saying which (x0, an extra, or the samples: the model or the
            solver). Off by default: it syncs the host with the device on every call (outside
            the captured graph, which is unchanged).

    Calling it: ``sampler(x0=None, generator=None, **extras) -> float32 [B, *shape]`` (a new
    tensor). ``x0=None`` draws ``[batch_size, *shape]`` with ``torch.randn(generator=...)``.
    ``x0`` may be any float dtype and device; it is copied into the float32 state.

    Example::

        >>> solver = BespokeSolver.load("solver.json")
        >>> sampler = FastSampler(model, solver, shape=(3, 32, 32), batch_size=64,
        ...                       model_dtype=torch.bfloat16)
        >>> x1 = sampler(torch.randn(64, 3, 32, 32, device="cuda"))     # capture + replay
        >>> x1 = sampler()                                                # replay only
        >>> xs = sampler.sample(10_000, seed=0)   # counter-based noise: batch-size independent
        >>> sampler.load_solver(other_solver)     # same kind/base/n: table copy, no re-capture
        >>> bns = FastSampler(model, NonStationarySolver.load("bns.json"), (3, 32, 32), 64)
        >>> sampler.stats()["capture_seconds"]
    """

    def __init__(self, model, solver, shape, batch_size: int, model_dtype=torch.float32,
                 backend: str = "auto", cuda_graph: bool = True, guidance=None,
                 compile_model: bool = False, device=None, max_graphs: int = 8, warmup: int = 2,
                 check_finite: bool = False):
        if not isinstance(model_dtype, torch.dtype) or not model_dtype.is_floating_point:
            raise InvalidArgumentError(f"model_dtype must be a floating-point torch.dtype (torch.float32, "
                             f"torch.bfloat16, torch.float16), got {model_dtype!r}")
        self.shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list, torch.Size))
                                            else (shape,)))
        self.batch_size = check_int("batch_size", batch_size)
        self.max_graphs = check_int("max_graphs", max_graphs)
        # >= 1: the first Triton compile / cuBLAS workspace / lazy init must happen before the
        # capture, never inside it
        self.warmup = check_int("warmup", warmup, minimum=1)
        self.model_dtype = model_dtype
        self.check_finite = bool(check_finite)
        self.device = torch.device(device) if device is not None else infer_device(
            model.model if isinstance(model, GuidedModel) else model)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = resolve_backend(backend, self.device)

        # ---- guidance: the raw network runs on [2Bp] inputs, the op combines the halves
        if guidance is not None and not isinstance(model, GuidedModel):
            raise InvalidArgumentError("guidance needs a classifier-free-guidance model: wrap the "
                             "conditional model with bespoke_fast.cfg(model, scale, cond_key=..., "
                             "null=...) and pass that")
        self.model = model
        self.guided = isinstance(model, GuidedModel)
        self.guidance_scale = (float(guidance) if guidance is not None else
                               float(model.scale) if self.guided else 1.0)
        net = model.model if self.guided else model
        if compile_model:
            net = torch.compile(net, mode="default")
        self._net = net
        self._call = _ModelCall(net, self._check_output)
        # fp32 without guidance: the model reads the state buffers directly (no input copy).
        self._alias = model_dtype == torch.float32 and not self.guided

        self.use_graph = bool(cuda_graph) and self.device.type == "cuda"
        self.solver = solver
        program = PROGRAMS.get(solver.kind) if isinstance(solver, Solver) else None
        if program is None:
            raise InvalidTypeError(f"solver must be a BespokeSolver or a NonStationarySolver (a solver "
                            f"of kind {' or '.join(map(repr, PROGRAMS))}), got "
                            f"{type(solver).__name__}")
        self.program = program(solver, device=self.device, backend=self.backend,
                               guided=self.guided, guidance_scale=self.guidance_scale,
                               alias=self._alias)
        self.kind, self.base = self.program.kind, self.program.base
        self.n_steps = self.program.n_steps

        self._states: OrderedDict = OrderedDict()
        self._cond_bufs: OrderedDict = OrderedDict()  # guidance: the doubled conditions
        self.capture_seconds: dict = {}
        self.num_captures = 0
        self.num_replays = 0
        self.num_eager_runs = 0
        self.num_evictions = 0
        self.capture_failures: dict = {}

    @property
    def table(self) -> torch.Tensor:
        """The program's device table (layout: ``bespoke_fast.ops.table``). Change it through
        :meth:`load_solver` / :meth:`set_guidance_scale`: the cached model times and the eager
        loop's exact-coefficient plan (``engine.rk``) are refreshed only then."""
        return self.program.table

    def load_solver(self, other) -> None:
        """Swap in another solver of the same kind, base and ``n_steps``: its coefficients are
        copied into the existing device table (``table.copy_``), so captured graphs stay valid
        and the next call uses the new coefficients (no re-capture). ``ValueError`` otherwise
        (BNS solvers have no base: kind and ``n_steps`` must match)."""
        self.program.load(other)
        self.solver = other

    def set_guidance_scale(self, scale: float) -> None:
        """Change the guidance scale in place (on the device, in the program: no re-capture)."""
        if not self.guided:
            raise InvalidArgumentError("set_guidance_scale: this sampler was not built with a cfg(...) model")
        self.guidance_scale = float(scale)
        self.program.set_guidance_scale(self.guidance_scale)

    # ------------------------------------------------------------------ the loop
    def _check_output(self, u, inp: torch.Tensor, t: torch.Tensor, extras: dict) -> None:
        """Raise the model-contract error that ``u`` (the output on ``inp``) earns."""
        call_model(lambda *a, **k: u, inp, t, extras, expect_dtype=self.model_dtype)

    def _loop(self, st: _State) -> None:
        """The whole n-step solve on ``st``'s static buffers (the captured region): no host
        reads, no Python branching on tensor values, no allocation outside what the model
        makes -- so it can be captured as it is."""
        self.program.loop(st, st.x, st.x0, st.extras, self._call)

    def _eager(self, st: _State, x0: torch.Tensor, run_b: int, extras: dict) -> torch.Tensor:
        """The same loop, eagerly, on a fresh float32 output: ``x0`` is converted (or, BNS,
        read in place when it already is float32, contiguous and on the device) and the
        network extras are passed as they are -- no static-buffer copies, no output clone
        when ``B == run_b``."""
        b = x0.shape[0]
        separate = st.separate_start
        if b == run_b:
            if (x0.dtype == torch.float32 and x0.device == self.device
                    and x0.is_contiguous()):  # the common case, without .to()'s arguments
                start = x0 if separate else x0.clone()
            else:
                start = x0.to(device=self.device, dtype=torch.float32,
                              memory_format=torch.contiguous_format, copy=not separate)
        else:  # padded with zero rows
            start = torch.zeros(run_b, *self.shape, dtype=torch.float32, device=self.device)
            start[:b].copy_(x0)
        x = torch.empty_like(start) if separate else start
        self.program.loop(st, x, start, extras, self._call, exact=True)
        self.num_eager_runs += 1
        if b == run_b:
            return x
        # padded: the rows asked for as a view of this call's own output when it pins at most
        # twice their memory (no copy); a copy when a few rows would keep the whole run alive
        return x[:b] if 2 * b >= run_b else x[:b].clone()

    # ------------------------------------------------------------------ graph capture
    def _capture(self, st: _State) -> None:
        """Warm up on a side stream, capture the loop, replay (or fall back to eager). On return
        ``st.x`` holds the result for the inputs loaded in ``st``."""
        st.capture_tried = True
        dev = self.device
        saved = st.x.clone()  # warm-up advances the state: restart each pass from x0
        # (BNS reads its start from st.x0, which the loop never writes)
        start = time.perf_counter()
        with torch.cuda.device(dev):
            current = torch.cuda.current_stream(dev)
            side = _side_stream(dev)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    st.x.copy_(saved)
                    self._loop(st)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            pool = torch.cuda.graph_pool_handle()  # ours, so a failed capture can release it
            try:
                # thread_local: another thread's CUDA calls (a data loader pinning memory) do
                # not invalidate this capture; this thread's own illegal calls still do
                with torch.cuda.graph(graph, pool=pool, stream=side,
                                      capture_error_mode="thread_local"):
                    self._loop(st)
            except Exception as e:  # the model did something a capture cannot record
                torch.cuda.set_stream(current)  # graph.__exit__ skips restoring it when capture_end raises
                _release_failed_capture(graph, pool)  # the half-captured graph's private pool
                graph = None
                try:
                    torch.cuda.synchronize(dev)
                except Exception:  # pragma: no cover - a sticky error: nothing left to salvage
                    raise ExecutionError(f"CUDA graph capture failed and left the device in an "
                                       f"error state: {_exception_chain(e)}") from e
                st.failure = _exception_chain(e)
                self.capture_failures[st.key] = st.failure
                warnings.warn(f"FastSampler: could not capture the sampling loop in a CUDA graph "
                              f"for batch {st.run_b}, shape {self.shape}; running it eagerly for "
                              f"this key from now on. Reason: {st.failure}",
                              RuntimeWarning, stacklevel=3)
                st.x.copy_(saved)
                self._loop(st)
                self.num_eager_runs += 1
                return
            torch.cuda.synchronize(dev)
            self.capture_seconds[st.key] = time.perf_counter() - start
            self.num_captures += 1
            st.graph = graph
            st.x.copy_(saved)
            graph.replay()
            self.num_replays += 1

    def _execute(self, st: _State) -> None:
        if st.graph is not None:
            with torch.cuda.device(self.device):
                st.graph.replay()
            self.num_replays += 1
        elif self.use_graph and not st.capture_tried:
            self._capture(st)
        else:
            self._loop(st)
            self.num_eager_runs += 1

    # ------------------------------------------------------------------ states
    def _state_for(self, run_b: int, net_extras: dict) -> _State:
        key = (run_b, self.shape, self.model_dtype, _extra_signature(net_extras))
        st = self._states.get(key)
        if st is not None:
            self._states.move_to_end(key)
        else:
            st = _State(key, run_b, self.shape, self.model_dtype, self.device, self.guided,
                        self._alias, self.program, net_extras)
            self._states[key] = st
            while len(self._states) > self.max_graphs:
                old_key, _ = self._states.popitem(last=False)
                self.capture_seconds.pop(old_key, None)
                self.num_evictions += 1
        if st.times_version != self.program.version:  # new state, or load_solver since
            st.times.copy_(st.times_src)  # outside the graph: a replay reads the new times
            st.times_version = self.program.version
        return st

    def _network_extras(self, extras: dict, b: int, run_b: int) -> dict:
        """User extras -> what the network sees: tensors on the device, per-sample ones (first
        dim ``b``) padded to ``run_b`` by repeating the last row, doubled for guidance (the
        condition through :meth:`_doubled_condition` when it can)."""
        if not extras and not self.guided:
            return extras
        cond2 = self._doubled_condition(extras, b, run_b) if self.guided else None
        out = {}
        for k, v in extras.items():
            if isinstance(v, torch.Tensor) and (cond2 is None or k != self.model.cond_key):
                v = v.to(self.device)
                if v.dim() > 0 and v.shape[0] == b and run_b > b:
                    v = torch.cat([v, v[-1:].expand(run_b - b, *v.shape[1:])])
            out[k] = v
        if self.guided:
            out = self.model.doubled_extras(out, run_b, cond2)
        return out

    def _doubled_condition(self, extras: dict, b: int, run_b: int):
        """The guidance batch's condition ``[cond (padded to run_b rows), null]`` ``[2 run_b,
        ...]`` in a buffer kept per (run_b, condition shape and dtype, null): the null half is
        written when the buffer is made, each call copies the condition in (one copy; two when
        padded) -- no allocation, and never stale (the values are copied every call). Only for
        a per-sample tensor condition (first dim ``b``) and a number ``null``; ``None``
        otherwise (``GuidedModel.doubled_extras`` makes it). The network receives the buffer
        itself: read it, never keep it across calls."""
        cond, null = extras.get(self.model.cond_key), self.model.null
        if not (isinstance(cond, torch.Tensor) and cond.dim() > 0 and cond.shape[0] == b
                and isinstance(null, (int, float)) and not cond.requires_grad):
            return None
        key = (run_b, tuple(cond.shape[1:]), cond.dtype, type(null), null)
        bufs = self._cond_bufs.get(key)
        if bufs is None:
            buf = torch.empty(2 * run_b, *cond.shape[1:], dtype=cond.dtype, device=self.device)
            half = buf[run_b:]
            half.copy_(torch.as_tensor(null, dtype=cond.dtype, device=self.device).expand_as(half))
            bufs = self._cond_bufs[key] = (buf, buf[:run_b])  # the cond half as a view, made once
            while len(self._cond_bufs) > self.max_graphs:
                self._cond_bufs.popitem(last=False)
        else:
            self._cond_bufs.move_to_end(key)
        buf, head = bufs
        if run_b == b:
            head.copy_(cond)
        else:
            head[:b].copy_(cond)
            head[b:].copy_(cond[-1:].expand(run_b - b, *cond.shape[1:]))
        return buf

    def _check_x0(self, x0) -> torch.Tensor:
        check_state("x0", x0)
        if tuple(x0.shape[1:]) != self.shape:
            raise InvalidArgumentError(f"x0 must have shape [B, {', '.join(map(str, self.shape))}] "
                             f"(B, *shape with shape={self.shape}), got {tuple(x0.shape)}")
        return x0

    def _randn(self, b: int, generator) -> torch.Tensor:
        dev = generator.device if generator is not None else self.device
        return torch.randn(b, *self.shape, generator=generator, device=dev).to(self.device)

    def _load(self, x0: torch.Tensor, run_b: int, extras: dict) -> _State:
        """The state of ``run_b`` rows and these extras, with ``x0`` and the extras copied in."""
        net_extras = self._network_extras(extras, x0.shape[0], run_b)
        st = self._state_for(run_b, net_extras)
        st.load(x0, net_extras)
        return st

    def _run(self, x0: torch.Tensor, run_b: int, extras: dict) -> torch.Tensor:
        if self.check_finite:
            _check_inputs_finite(x0, extras)
        if torch.is_grad_enabled():
            with torch.no_grad():
                out = self._run_no_grad(x0, run_b, extras)
        else:
            out = self._run_no_grad(x0, run_b, extras)  # already off: skip the context manager
        if self.check_finite:
            bad = _first_nonfinite_row(out)
            if bad is not None:
                raise NonFiniteError(f"FastSampler: sample {bad} of the batch is NaN/Inf although "
                                     f"x0 and the extras are finite: the model returned NaN/Inf "
                                     f"(or the solver's coefficients overflow)")
        return out

    def _run_no_grad(self, x0: torch.Tensor, run_b: int, extras: dict) -> torch.Tensor:
        net_extras = self._network_extras(extras, x0.shape[0], run_b)
        st = self._state_for(run_b, net_extras)
        if self.use_graph and (st.graph is not None or not st.capture_tried):
            st.load(x0, net_extras)
            self._execute(st)  # replay, or capture (falling back to eager on failure)
            return st.x[:x0.shape[0]].clone()
        return self._eager(st, x0, run_b, net_extras)

    # ------------------------------------------------------------------ public
    def __call__(self, x0: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 **extras) -> torch.Tensor:
        """``x0`` ``[B, *shape]`` (default: ``[batch_size, *shape]`` standard normal drawn with
        ``generator``) -> float32 samples ``[B, *shape]`` on the sampler's device (a new
        tensor). ``B <= batch_size`` runs padded to ``batch_size``; larger ``B`` runs at ``B``."""
        if x0 is None:
            x0 = self._randn(self.batch_size, generator)
        elif not (isinstance(x0, torch.Tensor) and x0.is_floating_point() and x0.dim() > 0
                  and x0.shape[0] > 0 and x0.shape[1:] == self.shape):
            x0 = self._check_x0(x0)  # raises the error that says what is wrong
        b = x0.shape[0]
        return self._run(x0, max(b, self.batch_size), extras)

    def captured_region(self, x0: torch.Tensor, **extras):
        """The region a CUDA graph captures, ready to run on its own buffers: loads ``x0``
        ``[B, *shape]`` and the extras into the state of ``B``'s run size (as a call does) and
        returns ``(run, x)``. ``run()`` runs the whole solve once on those buffers, eagerly --
        no warm-up, no capture, no replay, no counters -- exactly what a capture records; ``x``
        is the ``[Bp, *shape]`` state buffer that holds the result afterwards (rows ``:B``).
        For tools that watch the loop from outside: :func:`bespoke_fast.check_capturable`
        runs ``run()`` under a dispatch mode, on the ``meta`` device."""
        x0 = self._check_x0(x0)
        with torch.no_grad():
            st = self._load(x0, max(x0.shape[0], self.batch_size), extras)
        return functools.partial(self._loop, st), st.x

    def sample(self, num: int, batch_size: int | None = None, seed: int = 0,
               generator: torch.Generator | None = None, start: int = 0, **extras) -> torch.Tensor:
        """``num`` samples ``[num, *shape]`` (float32, on the sampler's device), streamed in
        batches of ``batch_size`` (default the constructor's; every batch runs at that size,
        the last one padded).

        Noise: sample ``start + j`` gets ``noise_for_indices([start + j], shape, seed)``, so the
        result does not depend on ``batch_size``; with a ``generator`` the noise is drawn batch by
        batch with ``torch.randn(generator=generator)`` instead. Tensor extras whose first dim is
        ``num`` are sliced per batch; other extras are passed to every batch.

        Example::

            >>> xs = sampler.sample(1000, batch_size=250, seed=3)
        """
        num = check_int("num", num)
        bs = self.batch_size if batch_size is None else check_int("batch_size", batch_size)
        outs = []
        for a in range(0, num, bs):
            e = min(a + bs, num)
            x0 = (self._randn(e - a, generator) if generator is not None else
                  noise_for_indices(range(start + a, start + e), self.shape, seed,
                                    device=self.device))
            ex = {k: (v[a:e] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == num
                      else v) for k, v in extras.items()}
            outs.append(self._run(x0, bs, ex))
        return torch.cat(outs)

    def stats(self) -> dict:
        """Counters and timings: backend, graph use, cached keys, captures (with seconds per key,
        warm-up included), replays, eager runs, evictions and capture failures (with reasons)."""
        def name(key):
            run_b, shape, dtype, sig = key
            extra = ",".join(f"{s[0]}:{s[2] if s[1] == 'tensor' else s[3]}" for s in sig)
            return f"b={run_b} shape={shape} dtype={str(dtype).replace('torch.', '')}" + (
                f" extras={extra}" if extra else "")
        return {
            "backend": self.backend, "device": str(self.device), "cuda_graph": self.use_graph,
            "kind": self.kind, "base": self.base, "n_steps": self.n_steps,
            "nfe": self.solver.nfe, "guided": self.guided, "model_dtype": str(self.model_dtype),
            "cached_keys": len(self._states), "captures": self.num_captures,
            "replays": self.num_replays, "eager_runs": self.num_eager_runs,
            "evictions": self.num_evictions,
            "capture_seconds": {name(k): v for k, v in self.capture_seconds.items()},
            "capture_seconds_total": math.fsum(self.capture_seconds.values()),
            "capture_failures": {name(k): v for k, v in self.capture_failures.items()},
        }

    def __repr__(self) -> str:
        prog = self.kind if self.base is None else f"{self.kind}/{self.base}"
        return (f"FastSampler({prog}, n_steps={self.n_steps}, shape={self.shape}, "
                f"batch_size={self.batch_size}, backend={self.backend!r}, device={self.device}, "
                f"cuda_graph={self.use_graph}, model_dtype={self.model_dtype}, guided={self.guided})")
