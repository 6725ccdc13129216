"""FastSampler's eager path (``backend="reference"``): the update ops it runs per call and per
step are pinned (counted with a ``TorchDispatchMode``, the model's own ops excluded), no step
allocates, and the result is bitwise a loop of the reference ops (``bespoke_fast.ops``) for every
solver kind, model dtype, with and without guidance, padded or not -- and bitwise the graph
path's loop on its static buffers."""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bespoke_fast import cfg
from bespoke_fast.engine import FastSampler
from bespoke_fast.ops import table as T
from bespoke_fast.ops.bns import bns_step_ref
from bespoke_fast.ops.rk import guidance_combine_ref, rk1_step_ref, rk2_stage1_ref, rk2_stage2_ref
from bespoke_fast.solvers.bespoke import BespokeSolver
from bespoke_fast.solvers.bns import NonStationarySolver
from tests.helpers import perturbed

SHAPE = (2, 3)
DIM = 6
KINDS = ("rk1", "rk2", "bns")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# what a step may run: arithmetic into preallocated buffers (``out=`` / in place), copies into
# them, and (guidance, fp32) the split of the model's output into its halves (views)
STEP_OPS = {"mul.out", "addcmul_.default", "add_.Tensor", "mul_.Tensor", "copy_.default",
            "sub.out", "addcmul.out", "split.Tensor"}


class _Counter(TorchDispatchMode):
    """Counts aten ops by name, except while ``paused`` (the model's own ops)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[func.__name__] += 1  # e.g. "mul.out"
        return func(*args, **(kwargs or {}))


class Net(nn.Module):
    """A small nonlinear conditional velocity (fp32 inside, output in the input's dtype); it
    pauses the op counter of the test that runs it, so only the sampler's ops are counted."""

    counter: _Counter | None = None

    def __init__(self, k=3):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = nn.Parameter(torch.randn(DIM + 1, 16, generator=g) / 3, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(16, DIM, generator=g) / 4, requires_grad=False)
        self.emb = nn.Parameter(torch.randn(k + 1, DIM, generator=g), requires_grad=False)

    def forward(self, x, t, y=None):
        c = Net.counter
        if c is not None:
            c.paused = True
        try:
            h = torch.cat([x.reshape(x.shape[0], -1).float(), t.float().reshape(-1, 1)], 1)
            u = torch.tanh(h @ self.w1) @ self.w2 - 0.5 * h[:, :DIM]
            if y is not None:
                u = u + t.float().reshape(-1, 1) * self.emb[y]
            return u.reshape(x.shape).to(x.dtype)
        finally:
            if c is not None:
                c.paused = False


def make_solver(kind, n):
    if kind == "bns":
        return perturbed(NonStationarySolver(n), seed=n, scale=0.05)
    return perturbed(BespokeSolver(kind, n), seed=n, scale=0.05)


def make_sampler(kind, n, dtype, guided, batch_size=4):
    model = cfg(Net(), 1.7, "y", 3) if guided else Net()
    return FastSampler(model, make_solver(kind, n), SHAPE, batch_size, model_dtype=dtype,
                       backend="reference")


def extras_for(guided, b):
    return {"y": torch.arange(b) % 3} if guided else {}


# ----------------------------------------------------------------------------- op count
# The documented count (engine/sampler.py, "Ops per call"): update ops per call, n steps.
def expected_ops(kind, dtype, guided, n):
    low = dtype != torch.float32
    if kind == "rk1":
        return 6 * n + 3 if guided else (3 * n + 1 if low else 2 * n + 1)
    if kind == "rk2":
        return 13 * n + 3 if guided else (7 * n + 1 if low else 5 * n + 1)
    tri = n * (n + 1) // 2          # terms of the sums: sum_i (i + 1)
    if guided:
        return 6 * n + (3 if low else 2) * tri + 4
    return 3 * n + 3 * tri + 1 if low else 2 * n + 2 * tri + 1


def count_call(kind, dtype, guided, n, b=4):
    sampler = make_sampler(kind, n, dtype, guided)
    x0, ex = torch.randn(b, *SHAPE), extras_for(guided, b)
    sampler(x0, **ex)  # the first call makes the state (buffers, model times)
    return ops_of_one_call(sampler, x0, ex)


def ops_of_one_call(sampler, x0, ex):
    """The non-model aten ops of one ``sampler(x0, **ex)`` call, by op name."""
    counter = _Counter()
    Net.counter = counter
    try:
        with counter:
            sampler(x0, **ex)
    finally:
        Net.counter = None
    return counter.ops


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_op_count_per_call_and_step_is_pinned(kind, dtype, guided):
    counts = {n: count_call(kind, dtype, guided, n) for n in (2, 4)}
    for n, ops in counts.items():
        assert sum(ops.values()) == expected_ops(kind, dtype, guided, n), (n, dict(ops))
    # what the extra steps cost is update arithmetic and copies into preallocated buffers:
    # no step allocates
    extra = counts[4] - counts[2]
    assert set(extra) <= STEP_OPS, dict(extra)
    # per call, one new tensor: the output (RK: a copy of x0; BNS: x0 is read in place)
    made = ("clone.default", "_to_copy.default", "empty_like.default")
    assert sum(counts[2][op] for op in made) == 1, dict(counts[2])


# ----------------------------------------------------------------------------- bitwise
def reference_loop(sampler, x0, extras):
    """The solve as a plain loop of the reference ops on fresh tensors, at the sampler's run
    size (x0 padded with zero rows, per-sample extras with their last row), rows ``:B``."""
    b, run_b = x0.shape[0], max(x0.shape[0], sampler.batch_size)
    dt, guided, w = sampler.model_dtype, sampler.guided, sampler.guidance_scale
    x = torch.zeros(run_b, *SHAPE)
    x[:b] = x0
    ex = {k: torch.cat([v, v[-1:].expand(run_b - b)]) for k, v in extras.items()}
    net = sampler.model.model if guided else sampler.model
    if guided:
        ex = sampler.model.doubled_extras(ex, run_b)
    rows = 2 * run_b if guided else run_b

    def velocity(state, t):
        inp = state.to(dt)
        if guided:
            inp = torch.cat([inp, inp])
        return net(inp, t.expand(rows).contiguous(), **ex)

    with torch.no_grad():
        if sampler.kind == "bns":
            t, a, bb = (v.detach().float() for v in sampler.solver.coefficient_tables())
            us, x0p, xs = [], x, x
            for i in range(sampler.n_steps):
                u = velocity(xs, t[i])
                if guided:
                    u = guidance_combine_ref(u, torch.tensor(w))
                us.append(u.to(dt))
                xs = bns_step_ref(x0p, torch.stack(us), i, a, bb, None)
            return xs[:b]
        table = sampler.solver.coefficient_table(guidance_scale=w, dtype=torch.float32).detach()
        for i in range(sampler.n_steps):
            u = velocity(x, table[i, T.T0])
            if sampler.base == "rk1":
                x = rk1_step_ref(x, u, table, i, guidance=guided)
                continue
            xm = rk2_stage1_ref(x, u, table, i, guidance=guided)
            x = rk2_stage2_ref(x, xm, velocity(xm, table[i, T.TM]), table, i, guidance=guided)
        return x[:b]


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_eager_is_bitwise_the_reference_ops(kind, dtype, guided):
    sampler = make_sampler(kind, 4, dtype, guided, batch_size=5)
    for b in (5, 3):  # B == batch_size (the fast path) and padded
        x0 = torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(b))
        ex = extras_for(guided, b)
        want = reference_loop(sampler, x0, ex)
        got = sampler(x0, **ex)
        assert got.shape == (b, *SHAPE) and got.dtype == torch.float32
        assert torch.equal(got, want), (b, (got - want).abs().max())
        assert torch.equal(sampler(x0, **ex), got)  # the reused buffers carry nothing over
    # and the graph path's loop (static buffers, static extras) is the same computation
    x0 = torch.randn(5, *SHAPE)
    run, x = sampler.captured_region(x0, **extras_for(guided, 5))
    run()
    assert torch.equal(x, sampler(x0, **extras_for(guided, 5)))


def test_eager_does_not_write_the_callers_tensors():
    for kind in KINDS:
        sampler = make_sampler(kind, 2, torch.float32, False)
        x0 = torch.randn(4, *SHAPE)
        keep = x0.clone()
        out = sampler(x0)
        assert torch.equal(x0, keep) and out.data_ptr() != x0.data_ptr()
        assert not torch.equal(out, sampler(x0 + 1))
        # other dtypes and layouts of x0 take the converting path: the same result
        strided = x0.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        assert not strided.is_contiguous()
        assert torch.equal(sampler(strided), out) and torch.equal(sampler(x0.double()), out)


def test_load_solver_refreshes_the_model_times_of_cached_states():
    # another solver of the same kind and n has other model times: a cached state must use
    # them on its next call (eager) and on the captured region
    sampler = make_sampler("rk2", 3, torch.float32, False)
    x0 = torch.randn(4, *SHAPE)
    sampler(x0)
    other = make_solver("rk2", 3)
    perturbed(other, seed=9, scale=0.1)
    sampler.load_solver(other)
    fresh = FastSampler(Net(), other, SHAPE, 4, backend="reference")
    assert torch.equal(sampler(x0), fresh(x0))
    run, x = sampler.captured_region(x0)
    run()
    assert torch.equal(x, fresh(x0))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_model_contract_is_checked_on_every_call(kind, dtype):
    from bespoke_fast._checks import ModelContractError

    class Bad(nn.Module):
        """Right for the first ``good`` calls, then ``mode``."""

        def __init__(self, mode, good):
            super().__init__()
            self.mode, self.good, self.net = mode, good, Net()

        def forward(self, x, t):
            u = self.net(x, t)
            self.good -= 1
            if self.good >= 0:
                return u
            return {"shape": u[:, :1], "dtype": u.double(), "type": u.tolist()}[self.mode]

    for mode, match in (("shape", "shape"), ("dtype", "dtype"), ("type", "torch.Tensor")):
        sampler = FastSampler(Bad(mode, 1), make_solver(kind, 2), SHAPE, 4, model_dtype=dtype,
                              backend="reference")
        with pytest.raises(ModelContractError, match=match):
            sampler(torch.randn(4, *SHAPE))


# ----------------------------------------------------------------------------- exact coefficients
class TableSolver:
    """A bespoke solver stand-in with a given float32 ``[n, 8]`` table (what ``load_solver`` and
    ``reference_loop`` read), to place exact 1 / 0 coefficients where a test wants them."""

    kind = "bespoke"

    def __init__(self, base, table):
        self.base, self.table, self.n_steps = base, table, table.shape[0]

    def coefficient_table(self, guidance_scale=1.0, dtype=torch.float32, device=None):
        tab = self.table.clone()
        tab[:, T.W] = float(guidance_scale)
        return tab.to(dtype=dtype, device=device)


def exact_ops(kind, dtype, guided, n):
    """Update ops per call of the IDENTITY solver (A = C = 1, D = 0 at every step): RK2 drops
    3 ops a step (mul by A, mul by C, the D term), RK1 one (mul by a)."""
    return expected_ops(kind, dtype, guided, n) - (3 if kind == "rk2" else 1) * n


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("kind", ("rk1", "rk2"))
def test_identity_solver_skips_exact_terms_and_matches_the_reference(kind, dtype, guided):
    model = cfg(Net(), 1.7, "y", 3) if guided else Net()
    sampler = FastSampler(model, BespokeSolver(kind, 3), SHAPE, 4, model_dtype=dtype,
                          backend="reference")
    x0, ex = torch.randn(4, *SHAPE), extras_for(guided, 4)
    got = sampler(x0, **ex)
    assert torch.equal(got, reference_loop(sampler, x0, ex))
    ops = ops_of_one_call(sampler, x0, ex)
    assert sum(ops.values()) == exact_ops(kind, dtype, guided, 3), dict(ops)
    # the graph path's loop keeps every term: the same result
    run, x = sampler.captured_region(x0, **ex)
    run()
    assert torch.equal(x, got)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("kind", ("rk1", "rk2"))
def test_partly_exact_coefficients_are_the_reference(kind, dtype):
    # exact 1 / 0 on some steps only, in each combination; load_solver re-plans both ways
    n = 4
    learned = make_solver(kind, n)
    tab = learned.coefficient_table(dtype=torch.float32).detach().clone()
    tab[0, T.A] = 1.0                                  # stage 1 (RK1: the step) fused
    tab[1, T.C], tab[1, T.D] = 1.0, 0.0                # stage 2 a single addcmul_
    tab[2, T.A], tab[2, T.D] = 1.0, 0.0
    tab[3, T.C] = 1.0
    if kind == "rk1":
        tab[:, [T.C, T.D, T.E, T.TM]] = 0.0
    sampler = FastSampler(Net(), learned, SHAPE, 4, model_dtype=dtype, backend="reference")
    x0 = torch.randn(4, *SHAPE)
    general = sampler(x0)
    sampler.load_solver(TableSolver(kind, tab))
    got = sampler(x0)
    assert torch.equal(got, reference_loop(sampler, x0, {}))
    assert not torch.equal(got, general)
    sampler.load_solver(learned)  # back to general coefficients: nothing is skipped any more
    assert torch.equal(sampler(x0), general)


def test_zero_d_term_differs_at_most_in_the_sign_of_zero():
    # the documented tolerance of the D == 0 skip: the reference adds 0 * x_mid = +0 to
    # -0 + (-0), so an exact -0 there becomes +0; the eager loop keeps -0 (torch.equal, not bitwise)
    tab = BespokeSolver("rk2", 1).coefficient_table(dtype=torch.float32).detach().clone()
    tab[0, T.A], tab[0, T.B], tab[0, T.C], tab[0, T.E] = 1.0, 0.0, -1.0, 0.0

    class MinusOne(nn.Module):
        def forward(self, x, t):
            return -torch.ones_like(x)

    sampler = FastSampler(MinusOne(), BespokeSolver("rk2", 1), (2,), 1, backend="reference")
    sampler.load_solver(TableSolver("rk2", tab))
    x0, u = torch.tensor([[0.0, 2.0]]), -torch.ones(1, 2)
    want = rk2_stage2_ref(x0, rk2_stage1_ref(x0, u, tab, 0), u, tab, 0)
    got = sampler(x0)
    assert torch.equal(got, want) and torch.equal(got, torch.tensor([[0.0, -2.0]]))
    assert torch.signbit(got[0, 0]) and not torch.signbit(want[0, 0])


# ----------------------------------------------------------------------------- guidance condition
@pytest.mark.parametrize("null", [0, torch.tensor(2), lambda y: (y + 1) % 3],
                         ids=["number", "tensor", "callable"])
def test_doubled_condition_is_never_stale(null):
    # a number null: the doubled condition lives in a kept buffer, the condition copied in
    # every call; a tensor / callable null: built per call. Either way each call sees its own
    # condition: written in place between calls, padded, another null
    model = cfg(Net(), 1.7, "y", null)
    sampler = FastSampler(model, make_solver("rk2", 3), SHAPE, 4, backend="reference")
    x0, y = torch.randn(4, *SHAPE), torch.tensor([0, 1, 2, 0])
    first = sampler(x0, y=y)
    assert torch.equal(first, reference_loop(sampler, x0, {"y": y}))
    y[:2] = torch.tensor([2, 2])  # the same tensor object, new values
    second = sampler(x0, y=y)
    assert torch.equal(second, reference_loop(sampler, x0, {"y": y}))
    assert not torch.equal(first, second)
    assert torch.equal(sampler(x0[:3], y=y[:3]), reference_loop(sampler, x0[:3], {"y": y[:3]}))
    if not callable(null):
        model.null = 1
        assert torch.equal(sampler(x0, y=y), reference_loop(sampler, x0, {"y": y}))
    assert len(sampler._cond_bufs) <= sampler.max_graphs


def test_padded_calls_copy_only_a_small_remainder():
    # eager, padded: rows :B are a view of the call's own output when B >= run_b / 2 (no copy,
    # at most 2x the memory kept), a copy below that; either way a tensor of its own
    sampler = make_sampler("rk2", 2, torch.float32, False, batch_size=4)
    x0 = torch.randn(4, *SHAPE)
    full = sampler(x0)
    for b, view in ((3, True), (2, True), (1, False)):
        out = sampler(x0[:b])
        assert torch.equal(out, full[:b]) and out.is_contiguous()
        kept = out.untyped_storage().nbytes() // (out[0].numel() * 4)
        assert kept == (4 if view else b), (b, kept)
        assert out.untyped_storage().data_ptr() not in (
            x0.untyped_storage().data_ptr(), full.untyped_storage().data_ptr())
