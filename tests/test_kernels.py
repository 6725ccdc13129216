"""Fused Triton kernels vs the torch reference ops.

On a CPU-only machine these run the real kernels through Triton's interpreter
(``TRITON_INTERPRET=1``, set by the root conftest before the kernels are defined) at small sizes.
On a GPU machine (``BESPOKE_FAST_GPU_TESTS=1``, interpreter off) the interpreter tests skip and
the ``gpu``-marked tests run the same comparisons at large sizes.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from tests.helpers import require_kernels  # noqa: E402

K = require_kernels()  # a skip on CPU without triton, an error on a GPU run

from bespoke_fast import ops  # noqa: E402
from bespoke_fast.ops import table as T  # noqa: E402
from bespoke_fast.ops.bns import bns_step_ref  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(
    not INTERPRETED,
    reason="CPU kernel tests need TRITON_INTERPRET=1 (off on GPU runs, where each test runs on "
           "cuda as its [cuda] case, or test_gpu_large covers it at large sizes)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
compiled = pytest.mark.skipif(INTERPRETED, reason="needs compiled kernels: TRITON_INTERPRET=1 is "
                                                  "set (run with BESPOKE_FAST_GPU_TESTS=1)")
# the same test on CPU through the interpreter, and on a GPU with compiled kernels
on_each_device = pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=interp),
    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda, compiled])])

# --------------------------------------------------------------------------- tolerances
# The fp32 state output: the kernel upcasts u exactly like the reference and runs the same fp32
# operations in the same order, so only FMA contraction/rounding order may differ (~1-2 ulp).
STATE_TOL = {"rtol": 1e-6, "atol": 1e-6,
             "reason": "same fp32 ops and order as the reference; FMA contraction may move ~1 ulp"}

# model_in (the state rounded to the model dtype): judged against the reference's own
# low-precision error, |kernel - ref32| <= 2 |ref_lowp - ref32| + atol + ulps * ulp(ref32).
MODEL_IN_TOL = {
    torch.float32: {"atol": 1e-6, "ulps": 0, "lowp": False,
                    "reason": "fp32 model input is the fp32 state itself: STATE_TOL applies"},
    torch.bfloat16: {"atol": 1e-6, "ulps": 1, "lowp": True,
                     "reason": "rounding to bf16 (8-bit mantissa); the Triton interpreter "
                               "truncates bf16 stores instead of rounding: allow 1 ulp"},
    torch.float16: {"atol": 1e-6, "ulps": 1, "lowp": True,
                    "reason": "rounding to fp16 (11-bit mantissa); 1 ulp for the fp32 state "
                              "landing on the other side of a rounding tie"},
}
_MANTISSA = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (1000,), (4099,), (3, 5, 7, 11), (2, 4099)]  # none a multiple of the block
STEPS = [0, 3, -1]
SENTINEL = -4096.0  # exact in bf16/fp16; written just past each output, must survive
N_ROWS = 5


def _ulp(v: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |v| (v float32)."""
    mant, emin = _MANTISSA[dtype]
    _, e = torch.frexp(v.abs())  # v = m 2^e, m in [0.5, 1)
    return torch.pow(2.0, (e - 1).clamp(min=emin).float() - mant)


def assert_state(got, ref, what=""):
    tol = STATE_TOL
    assert not torch.isnan(got).any(), f"{what}: NaN left in the output (unwritten elements)"
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol["rtol"], atol=tol["atol"],
                               msg=lambda m: f"{what}: {m}")


def assert_model_in(got, ref32, what=""):
    """``got``: model-dtype buffer; ``ref32``: the reference state (float32) it should hold."""
    tol = MODEL_IN_TOL[got.dtype]
    assert not torch.isnan(got).any(), f"{what}: NaN left in model_in (unwritten elements)"
    if not tol["lowp"]:
        return assert_state(got, ref32, what)
    ref_lowp = ref32.to(got.dtype).float()
    bound = 2 * (ref_lowp - ref32).abs() + tol["atol"] + tol["ulps"] * _ulp(ref32, got.dtype)
    err = (got.float() - ref32).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements of model_in beyond the "
                           f"low-precision bound; worst err {float(err.max()):.3g} "
                           f"({tol['reason']})")


def poisoned(shape, dtype, device="cpu", pad=64):
    """NaN-filled contiguous buffer of ``shape`` followed by SENTINEL padding in one storage."""
    n = math.prod(shape)
    flat = torch.full((n + pad,), float("nan"), dtype=dtype, device=device)
    flat[n:] = SENTINEL
    return flat[:n].view(shape), flat


def assert_tail(flat, n, what):
    assert (flat[n:].float() == SENTINEL).all(), f"{what}: kernel wrote past the end of the buffer"


def make_table(n=N_ROWS, device="cpu", seed=0):
    """Distinct rows, so reading the wrong row changes the result."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, T.NUM_COLS, generator=g) * 1.5 + 0.25
    t[:, T.W] = torch.linspace(1.0, 7.5, n)  # guidance scales
    return t.to(device)


# --------------------------------------------------------------------------- one op call
OPS = ["rk1_step", "rk2_stage1", "rk2_stage2"]


def _call(fn, op, x, xm, u, table, step, **kw):
    if op == "rk2_stage2":
        return fn(x, xm, u, table, step, **kw)
    return fn(x, u, table, step, **kw)


def check_op(op, shape, dtype, guidance, model_in_mode, step, out_mode, table, device="cpu",
             seed=0):
    g = torch.Generator(device=device).manual_seed(seed)  # made on the device: no host copies
    x = torch.randn(shape, generator=g, device=device)
    xm = torch.randn(shape, generator=g, device=device)
    ushape = ((2 * shape[0],) + tuple(shape[1:])) if guidance else tuple(shape)
    u = torch.randn(ushape, generator=g, device=device).to(dtype)
    ref32 = _call(getattr(ops, op + "_ref"), op, x, xm, u.float(), table, step, guidance=guidance)

    mi = mi_flat = None
    if model_in_mode == "twice":
        mi, mi_flat = poisoned(((2 * shape[0],) + tuple(shape[1:])), dtype, device)
    elif model_in_mode == "once":
        mi, mi_flat = poisoned(tuple(shape), dtype, device)

    what = f"{op} {tuple(shape)} {dtype} guidance={guidance} model_in={model_in_mode} " \
           f"step={step} out={out_mode}"
    if out_mode == "inplace":
        out = x
    elif out_mode == "poisoned":
        out, out_flat = poisoned(tuple(shape), torch.float32, device)
    else:
        out = None
    got = _call(getattr(K, op), op, x, xm, u, table, step, model_in=mi, guidance=guidance, out=out)
    if out is not None:
        assert got is out, f"{what}: the result must be the out buffer"
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert_state(got, ref32, what)
    if out_mode == "poisoned":
        assert_tail(out_flat, x.numel(), what + " out")
    if mi is not None:
        if model_in_mode == "twice":
            assert_model_in(mi[: shape[0]], ref32, what + " model_in[:B]")
            assert_model_in(mi[shape[0]:], ref32, what + " model_in[B:]")
        else:
            assert_model_in(mi, ref32, what + " model_in")
        assert_tail(mi_flat, mi.numel(), what + " model_in")


# --------------------------------------------------------------------------- CPU (interpreter)
@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("model_in", [False, True], ids=["no_model_in", "model_in"])
@pytest.mark.parametrize("guidance", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference(op, guidance, model_in, dtype):
    table = make_table()
    mi_mode = ("twice" if guidance else "once") if model_in else None
    k = 0
    for shape in SHAPES:
        for step in STEPS:
            out_mode = ("poisoned", "inplace", "none")[k % 3]  # every mode meets every combo
            check_op(op, shape, dtype, guidance, mi_mode, step, out_mode, table, seed=k)
            k += 1


@on_each_device
@pytest.mark.parametrize("op", OPS)
def test_model_in_layout_follows_shape_like_reference(op, device):
    """As in the reference, a [2B] model_in gets both halves (even without guidance) and a [B]
    one gets the state once (even with guidance)."""
    table = make_table(device=device)
    check_op(op, (3, 17), torch.bfloat16, False, "twice", 1, "poisoned", table, device=device)
    check_op(op, (3, 17), torch.bfloat16, True, "once", 2, "poisoned", table, device=device)


@on_each_device
def test_wrong_row_is_detected(device):
    """Rows differ, so each step gives a different answer: the kernel reads row `step`."""
    table = make_table(device=device)
    x = torch.randn(4, 33, device=device)
    u = torch.randn(4, 33, device=device)
    results = [K.rk1_step(x, u, table, s) for s in range(N_ROWS)]
    for s in range(N_ROWS):
        assert_state(results[s], ops.rk1_step_ref(x, u, table, s), f"step {s}")
        for r in range(s):
            assert not torch.allclose(results[s], results[r])
    # Updating the device table (no re-launch setup) changes the result: nothing is cached.
    table2 = table.clone()
    table2[2, T.A] += 1.0
    assert_state(K.rk1_step(x, u, table2, 2), ops.rk1_step_ref(x, u, table2, 2), "updated table")


@on_each_device
def test_backend_dispatch_reaches_kernels(device):
    table = make_table(device=device)
    x, u = torch.randn(2, 50, device=device), torch.randn(4, 50, device=device).bfloat16()
    got = ops.rk1_step(x, u, table, 1, guidance=True, backend="triton")
    assert_state(got, ops.rk1_step_ref(x, u, table, 1, guidance=True))


def _rk2_table(n, seed=0):
    """Midpoint on a uniform grid, perturbed so every coefficient matters."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(n, T.NUM_COLS)
    h = 1.0 / n
    k = torch.arange(n, dtype=torch.float32)
    t[:, T.T0], t[:, T.TM] = k * h, k * h + h / 2
    t[:, T.A], t[:, T.B] = 1.0, h / 2
    t[:, T.C], t[:, T.D], t[:, T.E] = 1.0, 0.0, h
    t[:, T.W] = 1.0
    t[:, T.A:T.W] += 0.05 * torch.randn(n, T.W - T.A, generator=g)
    return t


def _velocity(x, t):
    return -x * t.view(-1, *([1] * (x.dim() - 1))) + torch.sin(x)


@on_each_device
@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_trajectory_matches_reference(base, device):
    """A whole n=4 trajectory through the kernels (in place, model input refreshed by the kernel)
    equals the reference trajectory."""
    n, shape = 4, (3, 257)
    table = _rk2_table(n).to(device)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)

    def run(rk1, s1, s2, fused):
        x = x0.clone()
        xm = torch.empty_like(x)
        xin = x.clone()  # model input buffer (fp32 model)
        for i in range(n):
            t0 = table[i, T.T0].expand(shape[0])
            u = _velocity(xin, t0)
            if base == "rk1":
                rk1(x, u, table, i, model_in=xin if fused else None, out=x)
            else:
                s1(x, u, table, i, model_in=xin if fused else None, out=xm)
                u2 = _velocity(xm if not fused else xin, table[i, T.TM].expand(shape[0]))
                s2(x, xm, u2, table, i, model_in=xin if fused else None, out=x)
            if not fused:
                xin.copy_(x)
        return x

    ref = run(ops.rk1_step_ref, ops.rk2_stage1_ref, ops.rk2_stage2_ref, fused=False)
    got = run(K.rk1_step, K.rk2_stage1, K.rk2_stage2, fused=True)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@on_each_device
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_bns_step_matches_reference(dtype, device):
    n = 10
    g = torch.Generator(device=device).manual_seed(3)
    ta = torch.randn(n, generator=g, device=device)
    tb = torch.randn(n, n, generator=g, device=device).tril()
    k = 0
    for shape in [(1,), (4099,), (2, 3, 167)]:
        x0 = torch.randn(shape, generator=g, device=device)
        us = torch.randn((n,) + shape, generator=g, device=device).to(dtype)
        us_short = us[:5].contiguous()  # only rows 0..i are needed
        for i, buf in [(0, us), (4, us_short), (n - 1, us), (-1, us)]:
            mi_mode = (None, "once", "twice")[k % 3]
            what = f"bns {shape} {dtype} i={i} model_in={mi_mode}"
            ref = bns_step_ref(x0, buf, i, ta, tb, None)
            out, out_flat = poisoned(shape, torch.float32, device)
            mi = mi_flat = None
            if mi_mode:
                mshape = ((2 * shape[0],) + shape[1:]) if mi_mode == "twice" else shape
                mi, mi_flat = poisoned(mshape, dtype, device)
            got = K.bns_step(x0, buf, i, ta, tb, out, model_in=mi)
            assert got is out
            assert_state(got, ref, what)
            assert_tail(out_flat, x0.numel(), what)
            if mi is not None:
                for half in mi.split(shape[0]):
                    assert_model_in(half, ref, what + " model_in")
                assert_tail(mi_flat, mi.numel(), what + " model_in")
            k += 1
    # out=None allocates; rows beyond i are never read (poison them)
    us = torch.randn((n, 7), generator=g, device=device).to(dtype)
    us[3:] = float("nan")
    x0 = torch.randn(7, generator=g, device=device)
    assert_state(K.bns_step(x0, us, 2, ta, tb, None), bns_step_ref(x0, us, 2, ta, tb, None), "bns")


def test_bns_ref_matches_formula():
    """The reference itself: a_i x0 + sum_j b_ij us_j, with out/model_in handling."""
    n = 4
    ta, tb = torch.randn(n), torch.randn(n, n).tril()
    x0, us = torch.randn(2, 5), torch.randn(n, 2, 5)
    want = ta[2] * x0 + sum(tb[2, j] * us[j] for j in range(3))
    out = torch.empty(2, 5)
    mi = torch.empty(4, 5, dtype=torch.bfloat16)
    got = bns_step_ref(x0, us, 2, ta, tb, out, model_in=mi)
    assert got is out
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(mi.float(), torch.cat([want, want]).bfloat16().float())


# --------------------------------------------------------------------------- bad input
@on_each_device
def test_bad_inputs_raise_clear_errors(device):
    table = make_table(device=device)
    x, u = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    nc = torch.randn(6, 4, device=device).t()  # [4, 6], not contiguous
    with pytest.raises(ValueError, match="x must be contiguous"):
        K.rk1_step(nc, u, table, 0)
    with pytest.raises(ValueError, match="u must be contiguous"):
        K.rk1_step(x, nc, table, 0)
    with pytest.raises(ValueError, match="x_mid must be contiguous"):
        K.rk2_stage2(x, nc, u, table, 0)
    with pytest.raises(ValueError, match="out must be contiguous"):
        K.rk2_stage1(x, u, table, 0, out=nc)
    with pytest.raises(ValueError, match="model_in must be contiguous"):
        K.rk2_stage1(x, u, table, 0, model_in=nc)
    with pytest.raises(ValueError, match=r"u must have shape \(4, 6\)"):
        K.rk1_step(x, torch.randn(4, 7, device=device), table, 0)
    with pytest.raises(ValueError, match=r"u1 must have shape \(8, 6\)"):
        K.rk2_stage1(x, u, table, 0, guidance=True)  # guidance needs [2B, ...]
    with pytest.raises(ValueError, match="x_mid must have shape"):
        K.rk2_stage2(x, torch.randn(4, 5, device=device), u, table, 0)
    with pytest.raises(ValueError, match="out must have shape"):
        K.rk1_step(x, u, table, 0, out=torch.empty(4, 5, device=device))
    with pytest.raises(ValueError, match="model_in must have shape"):
        K.rk1_step(x, u, table, 0, model_in=torch.empty(3, 6, device=device))
    with pytest.raises(ValueError, match="x must have dtype float32"):
        K.rk1_step(x.bfloat16(), u, table, 0)
    with pytest.raises(ValueError, match="u must have dtype"):
        K.rk1_step(x, u.double(), table, 0)
    with pytest.raises(ValueError, match="out must have dtype float32"):
        K.rk1_step(x, u, table, 0, out=torch.empty(4, 6, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="table must have dtype float32"):
        K.rk1_step(x, u, table.double(), 0)
    with pytest.raises(ValueError, match=r"table must have shape \[n, 8\]"):
        K.rk1_step(x, u, table[:, :7].contiguous(), 0)
    with pytest.raises(ValueError, match="step=5 is out of range"):
        K.rk1_step(x, u, table, N_ROWS)
    with pytest.raises(TypeError, match="step must be a Python int"):
        K.rk1_step(x, u, table, torch.tensor(0))
    with pytest.raises(ValueError, match="x0 must be contiguous"):
        K.bns_step(nc, torch.randn(3, 4, 6, device=device), 0, torch.randn(3, device=device),
                   torch.randn(3, 3, device=device), None)
    with pytest.raises(ValueError, match="us must have shape"):
        K.bns_step(x, torch.randn(2, 4, 6, device=device), 2, torch.randn(3, device=device),
                   torch.randn(3, 3, device=device), None)
    with pytest.raises(ValueError, match="table_b must have shape"):
        K.bns_step(x, torch.randn(3, 4, 6, device=device), 2, torch.randn(3, device=device),
                   torch.randn(3, 2, device=device), None)


# --------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("guidance", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.gpu
@needs_cuda
@compiled
def test_gpu_large(op, guidance, dtype):
    table = make_table(device="cuda")
    shape = (16, 2 ** 20 + 3)  # ~2^24 elements, not a multiple of the block
    for k, (step, out_mode) in enumerate([(0, "poisoned"), (3, "inplace"), (-1, "none")]):
        check_op(op, shape, dtype, guidance, "twice" if guidance else "once", step, out_mode,
                 table, device="cuda", seed=k)


@pytest.mark.gpu
@needs_cuda
@compiled
def test_gpu_bns_large():
    n, shape = 10, (16, 2 ** 20 + 3)
    ta = torch.randn(n, device="cuda")
    tb = torch.randn(n, n, device="cuda").tril()
    x0 = torch.randn(shape, device="cuda")
    us = torch.randn((n,) + shape, device="cuda").bfloat16()
    mi = torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16)
    out = torch.full(shape, float("nan"), device="cuda")
    got = K.bns_step(x0, us, n - 1, ta, tb, out, model_in=mi)
    ref = bns_step_ref(x0, us, n - 1, ta, tb, None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # GPU FMA over 10 terms
    assert_model_in(mi, ref, "bns model_in")


@pytest.mark.gpu
@needs_cuda
@compiled
def test_gpu_int64_offsets():
    """More than 2^31 elements: the int64 offsets must reach the tail."""
    n = 2 ** 31 + 4099
    need = n * (4 + 2) + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    table = make_table(device="cuda")
    x = torch.randn(n, device="cuda")
    u = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    tail = slice(n - (1 << 20), n)
    ref_tail = ops.rk1_step_ref(x[tail].clone(), u[tail], table, 2)
    ref_head = ops.rk1_step_ref(x[:4096].clone(), u[:4096], table, 2)
    K.rk1_step(x, u, table, 2, out=x)
    torch.testing.assert_close(x[tail], ref_tail, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x[:4096], ref_head, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu  # runs where the kernels are compiled: the GPU run
@compiled
def test_cpu_tensors_without_interpreter_raise():
    """With compiled kernels (interpreter off) CPU tensors get a clear error, not a Triton crash."""
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="need CUDA tensors, or TRITON_INTERPRET=1"):
        K.rk1_step(x, torch.randn(2, 8), make_table(), 0)
