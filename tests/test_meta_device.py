"""Device placement, checked without a GPU: the sampler, the solvers' tables, one step of each
trainer and the bench's setup run with every tensor on PyTorch's ``meta`` device. A tensor made
on the wrong device (e.g. a CPU index for a device table) or a host read of a device value (e.g.
``bool(tensor)``) then fails here, as it would on CUDA."""
from __future__ import annotations

import pytest
import torch

from bespoke_fast import zoo
from bespoke_fast.fitting.bns import end_to_end_loss
from bespoke_fast.engine import FastSampler
from bespoke_fast.fitting.gt import TrajectorySet
from bespoke_fast.models import GaussianMixtureFlow, cfg
from bespoke_fast.fitting.bespoke import gt_at_grid, rmse_bound_loss
from tests.test_engine import SHAPE, CondFlow, gmm, perturbed, perturbed_bns

META = torch.device("meta")


def _solver(kind):
    return perturbed_bns(4) if kind == "bns" else perturbed(kind, 2)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("kind", ["rk1", "rk2", "bns"])
@pytest.mark.parametrize("solver_device", ["cpu", "meta"])
def test_fast_sampler_on_meta(kind, guided, model_dtype, solver_device):
    solver = _solver(kind).to(solver_device)
    if guided:
        model = cfg(CondFlow().to(META), scale=2.0, cond_key="y", null=3)

        def extras(b):
            return {"y": torch.zeros(b, dtype=torch.long, device=META)}
    else:
        model = gmm().to(META)

        def extras(b):
            return {}
    sampler = FastSampler(model, solver, SHAPE, 3, model_dtype=model_dtype, backend="reference",
                          guidance=2.0 if guided else None)
    assert sampler.device == META and sampler.table.device == META
    out = sampler(torch.empty(2, *SHAPE, device=META), **extras(2))   # padded run
    assert out.device == META and out.shape == (2, *SHAPE) and out.dtype == torch.float32
    big = sampler.sample(4, **extras(4))
    assert big.device == META and big.shape == (4, *SHAPE)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_models_run_on_meta(name):
    zm = zoo.load(name, device=META)
    x = torch.empty(3, *zm.shape, device=META)
    u = zm.model(x, torch.empty(3, device=META))
    assert u.device == META and u.shape == x.shape


@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_coefficient_table_on_meta(base):
    solver = perturbed(base, 3).to(META)
    for dtype in (torch.float32, torch.float64):
        tab = solver.coefficient_table(guidance_scale=2.0, dtype=dtype)
        assert tab.device == META and tab.dtype == dtype and tab.shape[0] == 3


def test_coefficient_tables_on_meta():
    t, a, b = perturbed_bns(4).to(META).coefficient_tables(dtype=torch.float32)
    assert {x.device for x in (t, a, b)} == {META} and b.shape == (4, 4)


def _trajectories(n=4, k=5, device=META):
    def e(*s):
        return torch.empty(*s, device=device)
    return TrajectorySet(e(n, *SHAPE), e(n, *SHAPE), torch.linspace(0, 1, k).to(device),
                         e(n, k, *SHAPE), e(n, k, *SHAPE), torch.arange(n).to(device))


def test_bespoke_trainer_step_on_meta():
    solver, model = perturbed("rk2", 2).to(META), gmm().double().to(META)
    optim = torch.optim.Adam(solver.parameters(), lr=1e-3)
    X, _ = gt_at_grid(solver, model, _meta64())
    loss, d = rmse_bound_loss(solver, model, X)
    loss.backward()
    optim.step()
    assert loss.device == META and d.shape == (2, 4)
    assert all(p.grad is not None and p.grad.device == META for p in solver.parameters())


def _meta64():
    ts = _trajectories()
    return TrajectorySet(*(v.double() if v.is_floating_point() else v
                           for v in (ts.x0, ts.x1, ts.knots_t, ts.knots_x, ts.knots_u, ts.index)))


def test_bns_trainer_step_on_meta():
    solver, model = perturbed_bns(4).to(META), gmm().to(META)
    optim = torch.optim.Adam(solver.parameters(), lr=1e-3)
    loss = end_to_end_loss(solver, model, _trajectories(), model_dtype=torch.float32)
    loss.backward()
    optim.step()
    assert loss.device == META
    assert all(p.grad is not None and p.grad.device == META for p in solver.parameters())


def test_gaussian_mixture_equal_stds_decided_at_construction():
    """No host read in forward (defect 1): the equal-stds path is fixed when the flow is built."""
    means = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert GaussianMixtureFlow(means, 0.2).equal_stds
    assert not GaussianMixtureFlow(means, torch.tensor([0.1, 0.2, 0.3])).equal_stds


@pytest.fixture()
def bench_modules():
    from bench import bench_kernels, models, throughput
    return bench_kernels, models, throughput


def test_bench_setup_on_meta(bench_modules):
    """The bench's setup functions place everything on the device they are given (the
    throughput bench once moved the solver to CUDA and built its table index on the CPU). The
    rows run on the digits network (a UNet forward on meta takes seconds of Python)."""
    bench_kernels, models, throughput = bench_modules
    for name in models.MODELS:
        net, shape, _ = models.make_model(name, device=META)
        assert {p.device for p in net.parameters()} == {META}, name
    net, shape, _ = models.make_model("digits", device=META)
    x0 = torch.empty(2, *shape, device=META)
    args = throughput.parse_args(["--regimes", "cpu"])
    rows = dict((n, make) for n, make, _ in throughput.build_rows(
        ("compute", "digits", 2, "fp32", False), net, shape, x0, torch.float32, META, args))
    for row in ("fast: reference", "eager: BespokeSolver.sample", "floor: NFE x forward"):
        fn, _ = rows[row]()
        assert fn().device == META, row
    for op in bench_kernels.OPS:
        case = bench_kernels.make_case(op, 0.0625, torch.bfloat16, META)
        assert {t.device for t in case["tensors"].values()} == {META}
        assert case["ref"]().device == META
