"""The capture checker (``bespoke_fast.check_capturable``, ``bespoke-fast doctor``) and the
engine's CUDA-graph path run on CPU under a stand-in ``torch.cuda`` whose capture applies the
checker. These make the GPU-only failures (a host read in a model, D2H copies, capture details)
fail in CI."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

import bespoke_fast as bf
from bespoke_fast import zoo
from bespoke_fast.capture import HostSyncDetector, HostSyncError
from bespoke_fast.engine import FastSampler
from bespoke_fast.models import cfg
from bespoke_fast.solvers.bns import NonStationarySolver
from tests.helpers import StandInCuda, run_twice_expecting_one_fallback
from tests.test_engine import SHAPE, CondFlow, gmm, noise, perturbed, perturbed_bns, reference


def solvers():
    return {"rk1": perturbed("rk1", 2), "rk2": perturbed("rk2", 2), "bns": perturbed_bns(3)}


KINDS = ("rk1", "rk2", "bns")


# ----------------------------------------------------------------------------- check_capturable
@pytest.mark.parametrize("name", zoo.NAMES)
def test_every_zoo_model_and_solver_kind_is_capturable(name):
    zm = zoo.load(name)
    for kind, solver in solvers().items():
        report = bf.check_capturable(zm.model, solver, zm.shape)
        assert report.ok, f"{name} {kind}: {report}"


@pytest.mark.parametrize("name", ["unet-2m", "digits", "unet-35m"])
def test_bench_models_are_capturable(name):
    from bench.models import make_model
    net, shape, _ = make_model(name)
    for dtype in (torch.float32, torch.bfloat16):
        report = bf.check_capturable(net.to(dtype), perturbed("rk2", 1), shape, model_dtype=dtype)
        assert report.ok, str(report)


@pytest.mark.parametrize("kind", KINDS)
def test_guided_model_is_capturable(kind):
    guided = cfg(CondFlow(), scale=2.0, cond_key="y", null=3)
    report = bf.check_capturable(guided, solvers()[kind], SHAPE, batch_size=3, guidance=2.0,
                                 y=torch.tensor([0, 1, 2]))
    assert report.ok, str(report)
    assert report.config["guided"] is True


class Syncing(nn.Module):
    """A model that reads a device value back to the host once per call (a planted sync)."""

    def __init__(self):
        super().__init__()
        self.flow = gmm()

    def forward(self, x, t):
        if t[0].item() > 2:  # SYNC-LINE
            raise AssertionError("never")
        return self.flow(x, t)


def _line_of(obj, marker):
    lines, start = inspect.getsourcelines(obj)
    return start + next(i for i, line in enumerate(lines) if marker in line)


@pytest.mark.parametrize("kind", KINDS)
def test_planted_item_is_caught_with_its_line(kind):
    report = bf.check_capturable(Syncing(), solvers()[kind], SHAPE)
    assert not report.ok and len(report.problems) == 1, report.problems
    problem = report.problems[0]
    assert "_local_scalar_dense" in problem and ".item()" in problem
    assert problem.endswith(f"{__file__}:{_line_of(Syncing.forward, 'SYNC-LINE')}"), problem


class HostTraffic(nn.Module):
    """Every other kind of host traffic a capture rejects, one per line."""

    def __init__(self):
        super().__init__()
        self.flow = gmm()

    def forward(self, x, t):
        u = self.flow(x, t)
        host = u.cpu()                                   # D2H-LINE
        if (t > 2).any():                                # BOOL-LINE
            raise AssertionError("never")
        _ = u.reshape(-1).nonzero()                      # NONZERO-LINE
        return u + 0 * host.sum()


def test_d2h_copy_bool_and_data_dependent_shape_are_caught():
    report = bf.check_capturable(HostTraffic(), perturbed("rk2", 1), SHAPE)
    assert not report.ok
    joined = "\n".join(report.problems)
    for marker, op in [("D2H-LINE", "_to_copy"), ("BOOL-LINE", "host read of a device value"),
                       ("NONZERO-LINE", "nonzero")]:
        where = f"{__file__}:{_line_of(HostTraffic.forward, marker)}"
        assert any(op in p and p.endswith(where) for p in report.problems), (marker, joined)
    assert "device-to-host copy" in joined and "data-dependent output shape" in joined


def test_host_tensor_in_a_device_op_is_reported_not_raised():
    class Stray(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = gmm()
            self.scale = torch.ones(*SHAPE)  # NOT a buffer: stays on the host after .to(device)

        def forward(self, x, t):
            return self.flow(x, t) * self.scale

    report = bf.check_capturable(Stray(), perturbed("rk1", 1), SHAPE)
    assert not report.ok and "device" in report.problems[0], report.problems
    assert f"{__file__}:" in report.problems[0]


def test_synchronize_inside_the_loop_is_caught(monkeypatch):
    class Syncs(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = gmm()

        def forward(self, x, t):
            torch.cuda.synchronize()
            return self.flow(x, t)

    report = bf.check_capturable(Syncs(), perturbed("rk1", 1), SHAPE)
    assert not report.ok and "synchronize" in report.problems[0]
    assert torch.cuda.synchronize.__module__ == "torch.cuda"  # restored


def test_report_prints_and_model_is_unchanged():
    model = Syncing()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = bf.check_capturable(model, perturbed("rk2", 1), SHAPE, model_dtype=torch.float32)
    text = str(report)
    assert text.startswith("NOT capturable") and "aten._local_scalar_dense" in text
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())
    ok = bf.check_capturable(gmm(), perturbed("rk2", 1), SHAPE)
    assert ok.ok and str(ok).startswith("capturable")


def test_detector_lets_host_values_through_when_not_on_the_device():
    with HostSyncDetector(device_types={"meta"}) as det:
        assert torch.ones(2).sum().item() == 2.0  # a host tensor: no device involved
    assert det.problems == []
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        with HostSyncDetector(device_types=None, strict=True):
            torch.ones(2).sum().item()


# ----------------------------------------------------------------------------- the graph path
def _sampler(cuda, model, solver, batch, **kw):
    return cuda.attach(FastSampler(model, solver, SHAPE, batch, backend="reference", **kw))


@pytest.mark.parametrize("kind", KINDS)
def test_graph_path_captures_replays_pads_and_swaps_solvers(monkeypatch, kind):
    """capture, replay, padding, load_solver with the capture checked: fails if the model (the
    GMM flow) reads a device value back (defect 1) or the loop does."""
    cuda = StandInCuda(monkeypatch)
    model, solver = gmm(), solvers()[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture failure warns: make it fail the test
        sampler = _sampler(cuda, model, solver, 4)
        x0 = noise(4)
        torch.testing.assert_close(sampler(x0), reference(solver, model, x0), rtol=1e-6, atol=1e-6)
        small = noise(3, seed=7)                                      # padded to 4: same graph
        torch.testing.assert_close(sampler(small), reference(solver, model, small),
                                   rtol=1e-6, atol=1e-6)
        other = perturbed_bns(3, seed=3) if kind == "bns" else perturbed(kind, 2, seed=3)
        sampler.load_solver(other)                                    # table copy, no re-capture
        torch.testing.assert_close(sampler(x0), reference(other, model, x0), rtol=1e-6, atol=1e-6)
        sampler(noise(6, seed=2))                                     # B > batch: a second key
    s = sampler.stats()
    assert cuda.problems == [] and s["capture_failures"] == {}
    assert (s["captures"], s["replays"], s["eager_runs"]) == (2, 4, 0)
    # defect 9: thread-local capture error mode, ONE side stream for every capture
    assert cuda.modes == ["thread_local", "thread_local"] and len(cuda.streams) == 1


def test_graph_path_guided_bf16(monkeypatch):
    cuda = StandInCuda(monkeypatch)
    guided = cfg(CondFlow(), scale=1.5, cond_key="y", null=3)
    sampler = _sampler(cuda, guided, perturbed("rk2", 2), 3, guidance=1.5,
                       model_dtype=torch.bfloat16)
    y = torch.tensor([0, 2, 1])
    sampler(noise(3), y=y)
    sampler(noise(3, seed=5), y=y)
    s = sampler.stats()
    assert cuda.problems == [] and (s["captures"], s["replays"]) == (1, 2)


def test_graph_path_falls_back_once_and_releases_the_failed_graph(monkeypatch):
    cuda = StandInCuda(monkeypatch)
    model, solver = Syncing(), perturbed("rk2", 2)
    sampler = _sampler(cuda, model, solver, 4)
    x0 = noise(4)
    first, second, _ = run_twice_expecting_one_fallback(sampler, x0, "_local_scalar_dense")
    want = reference(solver, model.flow, x0)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert len(cuda.problems) == 1 and cuda.resets == 1
    # the failed capture never ended, so reset() would keep its pool: closed and released by hand
    assert cuda.pools == cuda.closed_pools == cuda.released_pools and len(cuda.pools) == 1


def test_graph_path_releases_no_pool_by_hand_after_a_good_capture(monkeypatch):
    cuda = StandInCuda(monkeypatch)
    sampler = _sampler(cuda, gmm(), perturbed("rk2", 2), 4)
    sampler(noise(4))
    assert sampler.stats()["captures"] == 1 and len(cuda.pools) == 1
    assert cuda.closed_pools == cuda.released_pools == [] and cuda.resets == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_failed_capture_hands_its_memory_back():
    import gc

    def settled_reserved():
        gc.collect()
        torch.cuda.synchronize()
        # cuBLAS keeps one workspace per stream that empty_cache does not free (the warm-up's
        # side stream and the eager fallback each make one): clear them before every reading
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved()

    model, solver, x0 = AllocatesThenSyncs().cuda(), perturbed("rk2", 2), noise(4, device="cuda")
    base = settled_reserved()
    sampler = FastSampler(model, solver, SHAPE, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler(x0)
    assert sampler.stats()["capture_failures"]
    del sampler
    assert settled_reserved() == base  # the failed capture's private pool was released


class AllocatesThenSyncs(nn.Module):
    """Allocates 64 MB on the device, then reads a value back: a capture fails with the block
    in its private pool (a model that syncs first would leave the pool empty)."""

    def __init__(self):
        super().__init__()
        self.flow = gmm()

    def forward(self, x, t):
        scratch = torch.ones(16 * 2**20, device=x.device)
        if (scratch.sum() + t[0]).item() < 0:
            raise AssertionError("never")
        return self.flow(x, t)


def test_warmup_must_be_at_least_one():
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        FastSampler(gmm(), perturbed("rk1", 1), SHAPE, 2, warmup=0)


# ----------------------------------------------------------------------------- doctor CLI
def test_doctor_cli(tmp_path, capsys):
    from bespoke_fast.cli import main
    assert main(["doctor", "--model", "gmm-64"]) == 0
    assert "capturable" in capsys.readouterr().out
    path = tmp_path / "bns.json"
    NonStationarySolver(4).save(path)
    assert main(["doctor", "--model", "digits-fmot", "--solver", str(path),
                 "--model-dtype", "bf16", "--json"]) == 0
    assert '"ok": true' in capsys.readouterr().out
    assert main(["doctor", "--model", "tests.test_capture:syncing_factory"]) == 1
    out = capsys.readouterr().out
    assert "NOT capturable" in out and "_local_scalar_dense" in out
    assert main(["doctor", "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


def syncing_factory():
    """A user model factory for ``--model package.module:factory`` (see the zoo's resolver)."""
    return Syncing(), SHAPE


@pytest.mark.parametrize("solver", [bf.BespokeSolver("rk2", 3), bf.NonStationarySolver(4)],
                         ids=["rk2", "bns"])
def test_captured_region_is_what_a_call_runs(solver):
    model = zoo.load("gmm-64").model
    sampler = bf.FastSampler(model, solver, (64,), 4, backend="reference", cuda_graph=False)
    x0 = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    run, x = sampler.captured_region(x0)
    assert x.shape == (4, 64)                  # padded to the run size, nothing run yet
    run()
    assert sampler.num_eager_runs == 0         # the region alone: no counters
    assert torch.equal(x[:3], sampler(x0))
