"""FastSampler (bespoke_fast.engine): the reference path against the solver's own ``sample``,
batch handling, solver swaps, dtypes, guidance, the Triton backend under the interpreter, errors,
and (on a GPU) the CUDA-graph runner. Tests that hold for every solver kind are parametrized over
``KINDS`` (bespoke rk1 / rk2, BNS); what only one kind has is tested for that kind."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from bespoke_fast import ops
from bespoke_fast.engine import FastSampler
from bespoke_fast.models import GaussianMixtureFlow, cfg
from bespoke_fast.noise import noise_for_indices
from bespoke_fast.solvers.bespoke import BespokeSolver
from bespoke_fast.solvers.bns import NonStationarySolver
from tests.helpers import (GPU_RUN, StandInCuda, require_kernels,
                           run_twice_expecting_one_fallback)

SHAPE = (2, 3)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_skip_reason():
    if not ops.triton_available():
        return "bespoke_fast.kernels (triton) is not importable"
    if not INTERPRETED:
        return "CPU Triton runs need TRITON_INTERPRET=1 (set by the root conftest)"
    return None


needs_interpreter = pytest.mark.skipif(_triton_skip_reason() is not None,
                                       reason=str(_triton_skip_reason()))


def gmm(device="cpu", k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, *SHAPE, generator=g, dtype=torch.float64)
    return GaussianMixtureFlow(means, 0.3).float().to(device)


class BatchInvariantGMM(nn.Module):
    """The exact fm-ot Gaussian-mixture velocity (isotropic std ``tau``), computed with
    broadcasting only. ``GaussianMixtureFlow`` uses a matmul, and CPU BLAS rounds a row
    differently depending on its position in the batch (measured: ~1e-7), so it is NOT bitwise
    batch invariant; this one is, which is what the batch-invariance tests need."""

    def __init__(self, k=4, tau=0.3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("means", torch.randn(k, *SHAPE, generator=g, dtype=torch.float64)
                             .float().reshape(k, -1))
        self.tau2 = tau * tau

    def forward(self, x, t):
        xf, tt = x.reshape(x.shape[0], 1, -1).float(), t.float().reshape(-1, 1)
        v = tt * tt * self.tau2 + (1 - tt) ** 2                         # [B, 1]
        d = xf - tt[..., None] * self.means                             # x - alpha mu_k
        logp = -0.5 * (d * d).sum(-1) / v - 0.5 * xf.shape[-1] * torch.log(v)
        p = torch.softmax(logp, 1)                                      # [B, K]
        c = (tt * self.tau2 - (1 - tt)) / v
        u = ((p * c)[..., None] * d).sum(1) + (p[..., None] * self.means).sum(1)
        return u.reshape(x.shape).to(x.dtype)


def test_batch_invariant_gmm_is_the_gmm_flow():
    x, t = noise(8), torch.linspace(0.05, 0.95, 8)
    torch.testing.assert_close(BatchInvariantGMM()(x, t), gmm()(x, t), rtol=1e-5, atol=1e-5)


KINDS = ["rk1", "rk2", "bns"]   # bespoke on an RK1 / RK2 base; non-stationary (BNS)


def identity(kind, n):
    """The untrained solver of a kind: plain Euler / midpoint (BNS: Euler written in BNS form)."""
    return NonStationarySolver(n, init="euler") if kind == "bns" else BespokeSolver(kind, n)


def perturbed(kind, n, seed=0, scale=0.15):
    """A NON-identity solver (identity would hide coefficient mix-ups): ``kind`` in ``KINDS``."""
    solver = identity(kind, n)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return solver


def noise(b, seed=1, device="cpu"):
    return torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(seed)).to(device)


def reference(solver, model, x0, **extras):
    with torch.no_grad():
        return solver.sample(model, x0, **extras)


class CondFlow(nn.Module):
    """A class-conditional velocity: the GMM flow plus a per-class drift (class K = null)."""

    def __init__(self, k=3):
        super().__init__()
        self.flow = gmm()
        g = torch.Generator().manual_seed(5)
        self.register_buffer("emb", torch.randn(k + 1, *SHAPE, generator=g))

    def forward(self, x, t, y):
        return self.flow(x, t) + (t.reshape(-1, 1, 1) * self.emb[y]).to(x.dtype)


# ----------------------------------------------------------------------------- reference path
@pytest.mark.parametrize("kind", KINDS)
def test_reference_backend_is_bitwise_solver_sample(kind):
    # The same float32 tables (float64 -> float32 casts of the same coefficients), the same
    # model inputs and the same reference ops (BNS: j ascending): bit for bit.
    model, solver = gmm(), perturbed(kind, 4)
    x0 = noise(8)
    sampler = FastSampler(model, solver, SHAPE, batch_size=8, backend="reference")
    out = sampler(x0)
    assert out.dtype == torch.float32 and out.shape == (8, *SHAPE)
    assert torch.equal(out, reference(solver, model, x0))
    # and the identity solver is not what we compared against
    assert not torch.equal(out, reference(identity(kind, 4), model, x0))
    # padding (3 rows run at 8) and determinism
    assert torch.equal(sampler(x0[2:5]), reference(solver, model, x0[2:5]))
    assert torch.equal(sampler(x0), out)
    s = sampler.stats()
    assert (s["kind"], s["base"], s["nfe"], s["cached_keys"]) == (
        solver.kind, getattr(solver, "base", None), solver.nfe, 1)
    assert solver.kind in repr(sampler)


def test_returns_a_copy_not_the_static_buffer():
    sampler = FastSampler(gmm(), perturbed("rk2", 2), SHAPE, batch_size=4, backend="reference")
    a = sampler(noise(4, seed=1))
    a_copy = a.clone()
    sampler(noise(4, seed=2))
    assert torch.equal(a, a_copy)


def test_batch_invariance_padding_and_determinism():
    model, solver = BatchInvariantGMM(), perturbed("rk2", 3)
    x0 = noise(8)
    big = FastSampler(model, solver, SHAPE, batch_size=8, backend="reference")
    small = FastSampler(model, solver, SHAPE, batch_size=3, backend="reference")
    full = big(x0)
    assert torch.equal(full, big(x0))                       # determinism
    assert torch.equal(small(x0[:3]), full[:3])              # batch of 3 vs batch of 8
    padded = big(x0[5:8])                                    # 3 rows padded up to 8
    assert padded.shape == (3, *SHAPE)
    assert torch.equal(padded, full[5:8])
    assert big.stats()["cached_keys"] == 1                   # padding reused the same buffers
    # more rows than batch_size run at their own size (a second key)
    assert torch.equal(small(x0), full)
    assert small.stats()["cached_keys"] == 2


def test_sample_streams_counter_based_noise():
    model, solver = BatchInvariantGMM(), perturbed("rk1", 3)
    sampler = FastSampler(model, solver, SHAPE, batch_size=4, backend="reference")
    a = sampler.sample(10, seed=7)
    b = sampler.sample(10, batch_size=3, seed=7)
    assert a.shape == (10, *SHAPE) and torch.equal(a, b)
    assert torch.equal(a, reference(solver, model, noise_for_indices(range(10), SHAPE, 7)))
    assert torch.equal(sampler.sample(4, seed=7, start=6), a[6:])
    assert not torch.equal(sampler.sample(10, seed=8), a)


def test_x0_none_uses_generator():
    sampler = FastSampler(gmm(), perturbed("rk2", 2), SHAPE, batch_size=5, backend="reference")
    a = sampler(generator=torch.Generator().manual_seed(3))
    b = sampler(generator=torch.Generator().manual_seed(3))
    assert a.shape == (5, *SHAPE) and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["rk2", "bns"])
def test_load_solver_swaps_coefficients_in_place(kind):
    model, first, second = gmm(), perturbed(kind, 4, seed=1), perturbed(kind, 4, seed=2)
    x0 = noise(6)
    sampler = FastSampler(model, first, SHAPE, batch_size=6, backend="reference")
    assert torch.equal(sampler(x0), reference(first, model, x0))
    # the table and every view of it the program reads (BNS: t, a, b) keep their storage
    tables = {k: v.data_ptr() for k, v in vars(sampler.program).items() if isinstance(v, torch.Tensor)}
    sampler.load_solver(second)
    assert tables == {k: v.data_ptr() for k, v in vars(sampler.program).items()
                      if isinstance(v, torch.Tensor)}
    assert torch.equal(sampler(x0), reference(second, model, x0))
    assert sampler.solver is second and sampler.stats()["cached_keys"] == 1
    with pytest.raises(ValueError, match="n_steps mismatch.*n_steps=4.*n_steps=3"):
        sampler.load_solver(perturbed(kind, 3))
    other = "bns" if kind == "rk2" else "rk2"
    with pytest.raises(ValueError, match=f"kind mismatch.*'{solver_kind(kind)}'.*'{solver_kind(other)}'"):
        sampler.load_solver(perturbed(other, 4))
    if kind == "rk2":
        with pytest.raises(ValueError, match="base mismatch"):
            sampler.load_solver(BespokeSolver("rk1", 4))

        class FakeBNS:
            kind, base, n_steps = "bns", "rk2", 4
        with pytest.raises(ValueError, match="kind mismatch"):
            sampler.load_solver(FakeBNS())
    else:  # BNS solvers have no base: another init with the same n swaps in
        midpoint = perturbed_bns(4, seed=3, init="midpoint")
        sampler.load_solver(midpoint)
        assert torch.equal(sampler(x0), reference(midpoint, model, x0))
        sampler.load_solver(second)
    assert torch.equal(sampler(x0), reference(second, model, x0))  # failed swaps change nothing


def solver_kind(kind):
    return "bns" if kind == "bns" else "bespoke"


class DtypeRecorder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.dtypes = model, set()

    def forward(self, x, t, **extras):
        self.dtypes.add((x.dtype, t.dtype))
        return self.model(x, t, **extras)


# bf16 keeps 8 mantissa bits: each model input/output is rounded to ~2**-9 relative. Measured
# over this GMM (|x1| ~ 1-3, 3 RK2 steps): max |bf16 - fp32| ~ 3.5e-3. The tolerance is ~4x that,
# well below the O(1) distances between mixture modes, so a wrong bf16 path still fails.
BF16_ATOL = 1.5e-2


@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_bf16_model_dtype_runs_and_is_close_to_fp32(base):
    model, solver = DtypeRecorder(gmm()), perturbed(base, 3)
    x0 = noise(8)
    exact = reference(solver, model.model, x0)
    sampler = FastSampler(model, solver, SHAPE, batch_size=8, backend="reference",
                          model_dtype=torch.bfloat16)
    out = sampler(x0)
    assert out.dtype == torch.float32                        # the state stays fp32
    assert model.dtypes == {(torch.bfloat16, torch.float32)}
    err = (out - exact).abs().max().item()
    assert 0 < err < BF16_ATOL, err


@pytest.mark.parametrize("kind", KINDS)
def test_model_returning_its_input_is_not_clobbered(kind):
    class Linear(nn.Module):  # u = x: the returned tensor IS the state buffer (fp32 alias mode)
        def forward(self, x, t):
            return x

    solver = perturbed(kind, 2 if kind == "rk2" else 3)
    x0 = noise(4)
    sampler = FastSampler(Linear(), solver, SHAPE, batch_size=4, backend="reference")
    assert torch.equal(sampler(x0), reference(solver, Linear(), x0))


# ----------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("kind", ["rk2", "bns"])
def test_cfg_matches_solver_sample_on_guided_model(kind):
    guided = cfg(CondFlow(), scale=2.5, cond_key="y", null=3)
    solver = perturbed(kind, 3 if kind == "rk2" else 4)
    x0, y = noise(6), torch.tensor([0, 1, 2, 0, 1, 2])
    want = reference(solver, guided, x0, y=y)
    sampler = FastSampler(guided, solver, SHAPE, batch_size=6, backend="reference")
    # fp32: the op (BNS: guidance_combine_ref) combines u_unc + w (u_cond - u_unc) with addcmul
    # where the GuidedModel does mul + add: one rounding apart per step, so allclose
    torch.testing.assert_close(sampler(x0, y=y), want, rtol=1e-5, atol=1e-5)
    # padding: 4 rows (and their labels) padded to 6
    torch.testing.assert_close(sampler(x0[2:], y=y[2:]), want[2:], rtol=1e-5, atol=1e-5)
    # an explicit guidance scale overrides the model's, and can be changed in place
    other = FastSampler(guided, solver, SHAPE, batch_size=6, backend="reference", guidance=1.0)
    plain = reference(solver, cfg(CondFlow(), 1.0, "y", 3), x0, y=y)
    torch.testing.assert_close(other(x0, y=y), plain, rtol=1e-5, atol=1e-5)
    other.set_guidance_scale(2.5)
    torch.testing.assert_close(other(x0, y=y), want, rtol=1e-5, atol=1e-5)
    st = next(iter(other._states.values()))
    assert st.model_in.shape == (12, *SHAPE)                   # the [2Bp] guidance batch
    if kind == "bns":
        assert st.us.shape == (4, 6, *SHAPE)                   # halves combined before storing
    with pytest.raises(KeyError, match="'y'"):
        sampler(x0)


def test_tensor_and_value_extras_are_keyed():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = gmm()

        def forward(self, x, t, gain=1.0, shift=None):
            u = gain * self.flow(x, t)
            return u if shift is None else u + shift

    model, solver = Scaled(), perturbed("rk1", 2)
    x0, shift = noise(4), 0.1 * noise(4, seed=9)
    sampler = FastSampler(model, solver, SHAPE, batch_size=4, backend="reference", max_graphs=2)
    for gain in (1.0, 0.5):
        assert torch.equal(sampler(x0, gain=gain, shift=shift),
                           reference(solver, model, x0, gain=gain, shift=shift))
    assert sampler.stats()["cached_keys"] == 2
    sampler(x0)                                          # a third signature: LRU evicts one
    assert sampler.stats()["cached_keys"] == 2 and sampler.stats()["evictions"] == 1


# ----------------------------------------------------------------------------- triton backend
# Tolerances of the Triton backend against the reference ops under the interpreter, by the
# model dtype, with the reason:
INTERPRETER_TOL = {
    # same fp32 maths and order (BNS: the same j order); FMA contraction / interpreter rounding
    # may move ~1 ulp per step
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    # the interpreter truncates bf16 stores of model_in (1 ulp of bf16 ~ 8e-3 relative) where
    # torch rounds
    torch.bfloat16: dict(rtol=0, atol=BF16_ATOL),
}


@needs_interpreter
@pytest.mark.parametrize("kind,model_dtype,guided", [
    ("rk1", torch.float32, False), ("rk2", torch.float32, False), ("bns", torch.float32, False),
    ("bns", torch.bfloat16, False), ("rk2", torch.bfloat16, True), ("bns", torch.float32, True)])
def test_triton_backend_matches_reference_under_interpreter(kind, model_dtype, guided):
    solver = perturbed(kind, 2 if guided else 3)
    model = cfg(CondFlow(), 2.0, "y", 3) if guided else gmm()
    # unguided: 5 rows padded to 6. Guided bf16 is chaotic enough here that a 1-ulp model_in
    # difference (interpreter truncation) grows to ~0.1 in one row of other batches (measured,
    # the same before the engine was split into programs), so it runs the batch of 4 it was
    # measured on (max difference 8.4e-3).
    x0 = noise(4 if guided else 5)
    extras = {"y": torch.tensor([2, 1, 0, 1])} if guided else {}
    kw = dict(shape=SHAPE, batch_size=4 if guided else 6, model_dtype=model_dtype)
    ref = FastSampler(model, solver, backend="reference", **kw)(x0, **extras)
    tri = FastSampler(model, solver, backend="triton", cuda_graph=False, **kw)
    torch.testing.assert_close(tri(x0, **extras), ref, **INTERPRETER_TOL[model_dtype])
    assert tri.stats()["backend"] == "triton"


# ----------------------------------------------------------------------------- errors
def test_clear_errors():
    model, solver = gmm(), perturbed("rk2", 2)
    sampler = FastSampler(model, solver, SHAPE, batch_size=4, backend="reference")
    with pytest.raises(ValueError, match=r"x0 must have shape \[B, 2, 3\]"):
        sampler(torch.randn(4, 6))
    with pytest.raises(TypeError, match="floating-point"):
        sampler(torch.zeros(4, *SHAPE, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend must be one of"):
        FastSampler(model, solver, SHAPE, 4, backend="cuda")
    with pytest.raises(ValueError, match="bespoke_fast.cfg"):
        FastSampler(model, solver, SHAPE, 4, guidance=2.0)
    with pytest.raises(ValueError, match="model_dtype must be a floating-point"):
        FastSampler(model, solver, SHAPE, 4, model_dtype=torch.int32)
    with pytest.raises(TypeError, match="BespokeSolver"):
        FastSampler(model, object(), SHAPE, 4)
    with pytest.raises(ValueError, match="batch_size"):
        FastSampler(model, solver, SHAPE, 0)

    class WrongShape(nn.Module):
        def forward(self, x, t):
            return x[:, :1]
    with pytest.raises(ValueError, match="must return the input's shape"):
        FastSampler(WrongShape(), solver, SHAPE, 2, backend="reference")(noise(2))


# ----------------------------------------------------------------------------- allocation
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_path_reuses_the_same_buffers_every_step(kind, model_dtype):
    """The model reads preallocated buffers: the one model-input buffer (bf16), or the state
    itself (fp32: the call's output ``x``, RK2's ``x_mid``, BNS's ``x0`` at step 0), and the
    same time rows on every call. (What the update ops run, and that no step allocates, is
    pinned in tests/test_eager_ops.py.)"""
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = gmm()

        def forward(self, x, t):
            seen.append((x.data_ptr(), t.data_ptr()))
            return self.flow(x, t)

    solver = perturbed(kind, 4)
    sampler = FastSampler(Recorder(), solver, SHAPE, batch_size=4, backend="reference",
                          model_dtype=model_dtype)
    calls = []
    for seed in (1, 2):
        seen.clear()
        x0 = noise(4, seed=seed)
        out = sampler(x0)
        calls.append((list(seen), out.data_ptr(), x0.data_ptr()))
    (first, out1, _), (second, out2, x0_2) = calls
    assert len(first) == len(second) == solver.nfe
    assert [t for _, t in first] == [t for _, t in second]        # the same time rows
    assert len({t for _, t in first}) == solver.nfe               # one per model call
    st = next(iter(sampler._states.values()))
    inputs = [x for x, _ in second]
    if model_dtype != torch.float32:
        assert set(inputs) == {st.model_in.data_ptr()}             # one bf16 input buffer
    elif kind == "rk2":
        assert inputs == [out2, st.x_mid.data_ptr()] * solver.n_steps
    elif kind == "rk1":
        assert inputs == [out2] * solver.n_steps
    else:  # BNS reads x0 (the caller's float32 tensor, never written) at step 0, then x
        assert inputs == [x0_2] + [out2] * (solver.n_steps - 1)


# ----------------------------------------------------------------------------- graph control flow
class CaptureSensitive(nn.Module):
    def __init__(self, fake, fail):
        super().__init__()
        self.flow, self.fake, self.fail, self.calls = gmm(), fake, fail, 0

    def forward(self, x, t):
        self.calls += 1
        if self.fail and self.fake.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return self.flow(x, t)


@pytest.mark.parametrize("kind", ["rk2", "bns"])
def test_graph_control_flow_capture_then_replay(monkeypatch, kind):
    fake = StandInCuda(monkeypatch)
    model, solver = CaptureSensitive(fake, fail=False), perturbed(kind, 2 if kind == "rk2" else 3)
    sampler = fake.attach(FastSampler(model, solver, SHAPE, 4, backend="reference", warmup=2))
    x0 = noise(4)
    want = reference(solver, model.flow, x0)
    assert torch.equal(sampler(x0), want)
    # 2 warm-up loops + the capture + the first replay
    assert model.calls == 4 * solver.nfe and fake.replays == 1
    assert torch.equal(sampler(noise(3, seed=4)), reference(solver, model.flow, noise(3, seed=4)))
    s = sampler.stats()
    assert (s["captures"], s["replays"], s["eager_runs"]) == (1, 2, 0)
    assert len(s["capture_seconds"]) == 1 and not fake.set_streams


def test_graph_control_flow_capture_failure_warns_once_and_runs_eagerly(monkeypatch):
    fake = StandInCuda(monkeypatch)
    model, solver = CaptureSensitive(fake, fail=True), perturbed("rk1", 3)
    sampler = fake.attach(FastSampler(model, solver, SHAPE, 4, backend="reference"))
    x0 = noise(4)
    first, second, s = run_twice_expecting_one_fallback(
        sampler, x0, "operation not permitted when stream is capturing")
    want = reference(solver, model.flow, x0)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert len(s["capture_failures"]) == 1 and len(fake.set_streams) == 1  # stream restored


# ----------------------------------------------------------------------------- GPU (graph)
def _gpu_backend():
    """Compiled kernels on the GPU (a missing triton is an error on a GPU run), else the
    reference ops (still captured in the graph)."""
    if GPU_RUN:
        require_kernels()
    return "triton" if ops.triton_available() and not INTERPRETED else "reference"


def _eager_reference(model, solver, x0, **kw):
    return FastSampler(model, solver, SHAPE, x0.shape[0], backend="reference",
                       cuda_graph=False, **kw)


# graph replay of the same fp32 ops; the fused kernels may contract to FMA (~1 ulp per step)
GPU_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_gpu_graph_replay_matches_eager(base):
    model, solver = gmm("cuda"), perturbed(base, 4)
    x0 = noise(16, device="cuda")
    sampler = FastSampler(model, solver, SHAPE, 16, backend=_gpu_backend())
    first, second = sampler(x0), sampler(x0)
    torch.testing.assert_close(first, _eager_reference(model, solver, x0)(x0), **GPU_TOL)
    assert torch.equal(first, second)
    s = sampler.stats()
    assert s["captures"] == 1 and s["replays"] == 2 and s["eager_runs"] == 0
    assert len(s["capture_seconds"]) == 1


@pytest.mark.gpu
@needs_cuda
def test_gpu_solver_swap_without_recapture():
    model, a, b = gmm("cuda"), perturbed("rk2", 3, seed=1), perturbed("rk2", 3, seed=2)
    x0 = noise(8, device="cuda")
    sampler = FastSampler(model, a, SHAPE, 8, backend=_gpu_backend())
    sampler(x0)
    sampler.load_solver(b)
    out = sampler(x0)
    torch.testing.assert_close(out, _eager_reference(model, b, x0)(x0), **GPU_TOL)
    assert sampler.stats()["captures"] == 1


@pytest.mark.gpu
@needs_cuda
def test_gpu_two_batch_sizes_and_padding():
    model, solver = gmm("cuda"), perturbed("rk2", 3)
    x0 = noise(12, device="cuda")
    sampler = FastSampler(model, solver, SHAPE, 4, backend=_gpu_backend())
    want = _eager_reference(model, solver, x0)(x0)
    torch.testing.assert_close(sampler(x0[:4]), want[:4], **GPU_TOL)
    torch.testing.assert_close(sampler(x0), want, **GPU_TOL)          # 12 > 4: its own graph
    torch.testing.assert_close(sampler(x0[:3]), want[:3], **GPU_TOL)  # padded into the 4-graph
    assert sampler.stats()["captures"] == 2


@pytest.mark.gpu
@needs_cuda
def test_gpu_bf16_model():
    model, solver = gmm("cuda"), perturbed("rk2", 3)
    x0 = noise(8, device="cuda")
    out = FastSampler(model, solver, SHAPE, 8, backend=_gpu_backend(),
                      model_dtype=torch.bfloat16)(x0)
    ref16 = _eager_reference(model, solver, x0, model_dtype=torch.bfloat16)(x0)
    ref32 = _eager_reference(model, solver, x0)(x0)
    assert (out - ref32).abs().max().item() < BF16_ATOL
    # judged against the reference's own bf16 error (design.md, conventions 3)
    assert ((out - ref32).abs() <= 2 * (ref16 - ref32).abs() + 1e-2).all()


@pytest.mark.gpu
@needs_cuda
def test_gpu_cfg():
    guided = cfg(CondFlow().cuda(), 2.0, "y", 3)
    solver = perturbed("rk2", 3)
    x0, y = noise(6, device="cuda"), torch.tensor([0, 1, 2, 2, 1, 0], device="cuda")
    sampler = FastSampler(guided, solver, SHAPE, 8, backend=_gpu_backend())
    want = reference(solver, guided, x0, y=y)
    torch.testing.assert_close(sampler(x0, y=y), want, **GPU_TOL)
    y2 = torch.tensor([2, 2, 2, 0, 0, 0], device="cuda")          # new labels, same graph
    torch.testing.assert_close(sampler(x0, y=y2), reference(solver, guided, x0, y=y2), **GPU_TOL)
    assert sampler.stats()["captures"] == 1


@pytest.mark.gpu
@needs_cuda
def test_gpu_uncapturable_model_falls_back_with_one_warning():
    class Syncing(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = gmm("cuda")

        def forward(self, x, t):
            if t[0].item() < -1:   # a host read: legal eagerly, illegal during capture
                raise AssertionError
            return self.flow(x, t)

    model, solver = Syncing(), perturbed("rk2", 2)
    x0 = noise(4, device="cuda")
    sampler = FastSampler(model, solver, SHAPE, 4, backend=_gpu_backend())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = sampler(x0), sampler(x0)
    msgs = [str(w.message) for w in caught if "could not capture" in str(w.message)]
    assert len(msgs) == 1, msgs
    want = _eager_reference(model, solver, x0)(x0)
    torch.testing.assert_close(first, want, **GPU_TOL)
    torch.testing.assert_close(second, want, **GPU_TOL)
    s = sampler.stats()
    assert s["captures"] == 0 and len(s["capture_failures"]) == 1 and s["eager_runs"] == 2
    # the device is still usable: a capturable model captures fine afterwards
    ok = FastSampler(gmm("cuda"), solver, SHAPE, 4, backend=_gpu_backend())
    ok(x0)
    assert ok.stats()["captures"] == 1


# ----------------------------------------------------------------------------- BNS only
def perturbed_bns(n, seed=0, scale=0.15, init="euler"):
    """A NON-identity BNS solver with the given init: non-uniform times, a != 1, b off the
    base pattern."""
    solver = NonStationarySolver(n, init=init)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return solver


def test_bns_bf16_model_dtype_is_the_bf16_loop():
    # NonStationarySolver.sample(model_dtype=bf16) also rounds the model TIMES to bf16; the
    # engine (like the bespoke kinds) passes float32 times. So the oracle here is the plain loop
    # with fp32 t, bf16 model input and bns_step_ref: us holds the same bf16 velocities (the
    # reference upcasts them exactly) and model_in the same rounding of x: bitwise.
    from bespoke_fast.ops.bns import bns_step_ref

    model, solver = DtypeRecorder(gmm()), perturbed_bns(3, seed=4)
    x0 = noise(6)
    sampler = FastSampler(model, solver, SHAPE, batch_size=6, backend="reference",
                          model_dtype=torch.bfloat16)
    out = sampler(x0)
    assert model.dtypes == {(torch.bfloat16, torch.float32)}
    with torch.no_grad():
        t, a, b = (v.detach() for v in solver.coefficient_tables())
        us, x = torch.empty(3, *x0.shape), x0
        for i in range(3):
            us[i].copy_(model.model(x.to(torch.bfloat16), t[i].expand(6)))
            x = bns_step_ref(x0, us, i, a, b, None)
    assert torch.equal(out, x)
    # vs fp32: measured 1.5e-2 here (every step re-reads all past bf16 velocities, and the
    # perturbed b's are not a contraction); still far below the O(1) mode distances
    assert 0 < (out - reference(solver, model.model, x0)).abs().max().item() < 2 * BF16_ATOL
    st = next(iter(sampler._states.values()))
    assert st.us.dtype == torch.bfloat16 and st.us.shape == (3, 6, *SHAPE)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_gpu_bns_graph_replay_matches_eager(model_dtype):
    model, solver, other = gmm("cuda"), perturbed_bns(4, seed=1), perturbed_bns(4, seed=2)
    x0 = noise(12, device="cuda")
    sampler = FastSampler(model, solver, SHAPE, 16, backend=_gpu_backend(),
                          model_dtype=model_dtype)
    first, second = sampler(x0), sampler(x0)
    eager = _eager_reference(model, solver, x0, model_dtype=model_dtype)(x0)
    if model_dtype == torch.float32:
        torch.testing.assert_close(first, eager, **GPU_TOL)
    else:  # bf16 model inputs: kernel vs torch rounding of model_in may differ by 1 ulp
        torch.testing.assert_close(first, eager, rtol=0, atol=BF16_ATOL)
    assert torch.equal(first, second)
    sampler.load_solver(other)                                      # table copy, same graph
    torch.testing.assert_close(
        sampler(x0), _eager_reference(model, other, x0, model_dtype=model_dtype)(x0),
        **(GPU_TOL if model_dtype == torch.float32 else dict(rtol=0, atol=BF16_ATOL)))
    s = sampler.stats()
    assert s["captures"] == 1 and s["replays"] == 3 and s["eager_runs"] == 0
