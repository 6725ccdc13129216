"""Non-stationary (BNS) solvers: identity inits, files, the sampler's two paths, training."""
import json

import pytest
import torch

import bespoke_fast as bf
import bespoke_fast.solvers.bns as bns_module
from bespoke_fast.fitting.bns import end_to_end_loss, train_bns
from bespoke_fast.ops.bns import bns_step_ref
from bespoke_fast.solvers.bns import INITS, NonStationarySolver, init_coefficients
from tests.helpers import noise, perturbed, smooth_gmm


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests are many small ops: with a busy machine, intra-op threads only oversubscribe it
    (measured 5x slower with 2 threads on a loaded 2-core box). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturbed(n=6, init="midpoint", seed=0, scale=0.05):
    solver = perturbed(NonStationarySolver(n, init=init), seed, scale)
    solver.meta = {"model": {"name": "gmm-test", "hash": "abc"}, "training": {"iters": 3},
                   "validation": {"psnr": 41.5}}
    return solver


# ----------------------------------------------------------------------------- identity inits
@pytest.mark.parametrize("init,n", [("euler", 1), ("euler", 5), ("euler", 8), ("midpoint", 2),
                                    ("midpoint", 6), ("midpoint", 10)])
def test_identity_init_reproduces_the_base_solver(init, n):
    flow, x0 = smooth_gmm(), noise(16, 8)
    solver = NonStationarySolver(n, init=init)
    want = bf.solve(flow, x0, init, n_steps=n if init == "euler" else n // 2)
    got = solver.sample(flow, x0)                       # differentiable path
    with torch.no_grad():
        got_ng = solver.sample(flow, x0)                # float64: same maths without autograd
    assert (got - want).abs().max() < 1e-12
    assert (got_ng - want).abs().max() < 1e-12
    assert solver.nfe == solver.n_steps == n


def _perturbed_bespoke(base, n, seed=0, scale=0.1):
    return perturbed(bf.BespokeSolver(base, n), seed, scale)


@pytest.mark.parametrize("base,n", [("rk2", 5), ("rk1", 7), ("rk2", 1)])
def test_from_solver_samples_exactly_like_a_bespoke_solver(base, n):
    flow, x0 = smooth_gmm(), noise(16, 8)
    bespoke = _perturbed_bespoke(base, n)
    bns = NonStationarySolver.from_solver(bespoke)
    assert bns.nfe == bespoke.nfe
    with torch.no_grad():
        got, want = bns.sample(flow, x0), bespoke.sample(flow, x0)
    assert (got - want).abs().max() < 1e-12
    assert bns.meta["initialised_from"]["fingerprint"] == bespoke.fingerprint()
    # the same model times, in call order
    assert torch.allclose(bns.coefficients()["t"].detach(),
                          bespoke.model_times().detach().flatten(), atol=1e-12)


def test_from_identity_bespoke_is_the_midpoint_init():
    bns = NonStationarySolver.from_solver(bf.BespokeSolver("rk2", 4))
    a, b = init_coefficients(8, "midpoint")
    c = bns.coefficients()
    assert (c["a"] - a).abs().max() < 1e-12 and (c["b"] - b).abs().max() < 1e-12
    assert torch.allclose(c["t"].detach(), torch.arange(8, dtype=torch.float64) / 8, atol=1e-12)


class _NotLinear:
    """A solver whose states are not linear in the velocities (it squares one)."""
    nfe, kind = 2, "toy"

    def sample(self, model, x0):
        t = torch.zeros(x0.shape[0], dtype=x0.dtype)
        u = model(x0, t)
        return x0 + model(x0 + 0.5 * u * u, t + 0.5)


class _LateStart(_NotLinear):
    def sample(self, model, x0):
        t = torch.full((x0.shape[0],), 0.1, dtype=x0.dtype)
        return x0 + model(x0 + model(x0, t), t + 0.5)


@pytest.mark.parametrize("solver,message", [(_NotLinear(), "not linear in its velocities"),
                                            (_LateStart(), "0 = t_0 < t_1")])
def test_from_solver_refuses_what_bns_cannot_write(solver, message):
    with pytest.raises(ValueError, match=message):
        NonStationarySolver.from_solver(solver)


def test_midpoint_init_states_alternate_grid_and_stage_states():
    flow, x0 = smooth_gmm(), noise(4, 8)
    traj = NonStationarySolver(6, "midpoint").sample(flow, x0, return_trajectory=True)
    grid = bf.solve(flow, x0, "midpoint", n_steps=3, return_trajectory=True)
    assert traj.shape == (7, 4, 8)
    assert (traj[0::2] - grid).abs().max() < 1e-12     # even states are the midpoint grid states
    h = 1 / 3
    stage = grid[0] + (h / 2) * flow(grid[0], torch.zeros(4, dtype=torch.float64))
    assert (traj[1] - stage).abs().max() < 1e-12


def test_init_coefficients_written_out():
    a, b = init_coefficients(4, "midpoint")      # h = 1/2: stage, step, stage, step
    assert torch.equal(a, torch.ones(4, dtype=torch.float64))
    assert torch.equal(b, torch.tensor([[0.25, 0, 0, 0], [0, 0.5, 0, 0], [0, 0.5, 0.25, 0],
                                        [0, 0.5, 0, 0.5]], dtype=torch.float64))
    _, b = init_coefficients(3, "euler")
    assert torch.allclose(b, torch.tril(torch.ones(3, 3, dtype=torch.float64)) / 3, rtol=0, atol=1e-16)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_midpoint_init_with_odd_n_raises(n):
    with pytest.raises(ValueError, match=f"n_steps={n}"):
        NonStationarySolver(n, init="midpoint")
    with pytest.raises(ValueError, match="unknown init"):
        NonStationarySolver(4, init="rk4")


def test_sizes_and_tables():
    for n, raw in [(4, 18), (8, 52), (16, 168)]:           # method.md's n(n+5)/2
        s = NonStationarySolver(n)
        assert sum(p.numel() for p in s.parameters()) == raw
        assert s.num_parameters == raw - 1                  # theta_t's overall scale is not free
    s = _perturbed(6)
    tb = s.tables()
    assert set(tb) == {"t", "a", "b"} and tb["t"].shape == (7,) and tb["b"].shape == (21,)
    assert tb["t"][0] == 0 and tb["t"][-1] == 1 and (tb["t"].diff() > 0).all()
    c = s.coefficients()
    assert torch.equal(c["t"], tb["t"][:-1]) and c["b"].shape == (6, 6)
    assert torch.equal(c["b"], torch.tril(c["b"]))
    assert torch.equal(c["b"][torch.tril_indices(6, 6).unbind()], tb["b"])
    t, a, b = s.coefficient_tables(dtype=torch.float32)
    assert t.dtype == a.dtype == b.dtype == torch.float32
    assert (t.shape, a.shape, b.shape) == ((6,), (6,), (6, 6)) and b.is_contiguous()
    assert torch.equal(NonStationarySolver(5, "euler").tables()["t"], bf.solvers.fixed.uniform_grid(5))


# ----------------------------------------------------------------------------- the sampler
def test_no_grad_path_uses_the_reference_op_and_equals_the_differentiable_path(monkeypatch):
    flow, x0 = smooth_gmm(), noise(8, 8).float()
    solver = _perturbed(6)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[2])
        return bns_step_ref(*args, **kwargs)

    monkeypatch.setattr(bns_module, "bns_step_ref", counting)
    with torch.no_grad():
        fast = solver.sample(flow, x0)
    assert calls == list(range(6))
    diff = solver.sample(flow, x0)
    assert diff.requires_grad and len(calls) == 6        # the autograd path does not call it
    assert fast.dtype == torch.float32 and torch.equal(fast, diff.detach())


def test_model_dtype_runs_the_model_in_its_own_dtype():
    flow, x0 = smooth_gmm(), noise(8, 8)
    seen = []

    def model(x, t):
        seen.append((x.dtype, t.dtype))
        return flow(x, t)

    solver = _perturbed(4)
    mixed = solver.sample(model, x0, model_dtype=torch.float32)
    assert mixed.dtype == torch.float64 and set(seen) == {(torch.float32, torch.float32)}
    assert (mixed - solver.sample(flow, x0)).abs().max() < 1e-5
    mixed.sum().backward()
    assert torch.isfinite(solver.theta_b.grad).all()


def test_sample_is_differentiable_in_the_parameters():
    flow, x0 = smooth_gmm(), noise(3, 8)
    solver = _perturbed(4, scale=0.02)
    names = [name for name, _ in solver.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in solver.parameters())

    def f(*ps):
        return torch.func.functional_call(solver, dict(zip(names, ps)), (flow, x0))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6)
    target = bf.solve(flow, x0, "rk4", n_steps=20)
    loss = end_to_end_loss(solver, flow, bf.fitting.gt.TrajectorySet(
        x0, target, torch.tensor([0.0, 1.0], dtype=torch.float64), x0[:, None], x0[:, None],
        torch.arange(3)))
    loss.backward()
    for name, p in solver.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip_is_exact(tmp_path):
    solver = _perturbed(6)
    path = tmp_path / "bns.json"
    solver.save(path)
    for loaded in (bf.load_solver(path), NonStationarySolver.load(path)):
        assert isinstance(loaded, NonStationarySolver) and loaded.init == "midpoint"
        for name, p in solver.named_parameters():
            assert torch.equal(p, getattr(loaded, name)), name
        assert loaded.meta["validation"]["psnr"] == 41.5
        flow, x0 = smooth_gmm(), noise(4, 8)
        with torch.no_grad():
            assert torch.equal(solver.sample(flow, x0), loaded.sample(flow, x0))
    doc = json.loads(path.read_text())
    assert doc["kind"] == "bns" and doc["init"] == "midpoint" and doc["nfe"] == 6
    assert len(doc["tables"]["t"]) == 7 and len(doc["tables"]["b"]) == 21
    bf.BespokeSolver("rk1", 3).save(tmp_path / "bespoke.json")
    with pytest.raises(ValueError, match="not a bns one"):
        NonStationarySolver.load(tmp_path / "bespoke.json")


def _bad(tmp_path, mutate):
    path = tmp_path / "bad.json"
    _perturbed(4).save(path)
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["parameters"].update(theta_b=[0.1] * 9), "'theta_b' has 9 entries, expected 10"),
    (lambda d: d["tables"].update(b=[0.1] * 16), "'b' has 16 entries, expected 10"),
    (lambda d: d["tables"].update(t=[0.0, 0.5, 0.3, 0.7, 1.0]), "non-monotone t"),
    (lambda d: d["parameters"].update(theta_t=[1.0, 0.0, 1.0, 1.0]), "strictly increasing"),
    (lambda d: d["tables"]["a"].__setitem__(0, 2.0), "does not match the parameters"),
    (lambda d: d.update(init="heun"), "unknown init 'heun'"),
    (lambda d: d.update(nfe=8), "'nfe' is 8"),
])
def test_bad_files_raise_value_error(tmp_path, mutate, message):
    path = _bad(tmp_path, mutate)
    with pytest.raises(ValueError, match=message):
        bf.load_solver(path)


def test_odd_n_midpoint_file_is_rejected(tmp_path):
    path = _bad(tmp_path, lambda d: d.update(n_steps=3, nfe=3))
    with pytest.raises(ValueError, match="n_steps=3"):
        NonStationarySolver.load(path)


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def gmm_gt(tmp_path_factory):
    torch.manual_seed(0)
    flow = smooth_gmm(dim=8, k=4, std_range=(0.1, 0.3))
    out = tmp_path_factory.mktemp("bns") / "gt"
    bf.generate_trajectories(flow, 128, (8,), out, batch_size=64, progress=False,
                             measure_interpolation=0)
    return flow, bf.load_trajectories(out)


# measured: NFE 4, midpoint init 27.5 dB on validation; L-BFGS 20 it -> 32.7 dB, Adam 60 it -> 33.6 dB
@pytest.mark.parametrize("optimizer,iters", [("lbfgs", 20), ("adam", 60)])
def test_training_improves_validation_psnr(gmm_gt, optimizer, iters):
    flow, gt = gmm_gt
    solver, report = train_bns(flow, gt, n_steps=4, init="midpoint", optimizer=optimizer,
                               iters=iters, num_train=64, num_val=64, val_every=10, progress=False)
    init, best = report["init"]["psnr"], report["best"]["psnr"]
    assert best > init + 3, (init, best)
    assert report["curve"][0]["iteration"] == 0 and report["config"]["num_val"] == 64
    assert report["nfe"]["train"] > 0 and report["wall_seconds"] > 0
    assert solver.meta["validation"]["psnr"] == best
    _, val = gt.split(64)
    assert bf.evaluate(flow, solver, val)["psnr"] == pytest.approx(best, abs=1e-9)


def test_training_from_a_bespoke_solver_starts_where_it_ends(gmm_gt):
    flow, gt = gmm_gt
    bespoke = _perturbed_bespoke("rk2", 2, scale=0.02)
    _, val = gt.split(64)
    start = bf.evaluate(flow, bespoke, val)["psnr"]
    solver, report = train_bns(flow, gt, n_steps=4, init=bespoke, optimizer="lbfgs", iters=10,
                               num_train=64, num_val=64, val_every=5, progress=False)
    # the same solver in BNS form (float32 validation: summation order differs, ~1e-6 dB)
    assert report["init"]["psnr"] == pytest.approx(start, abs=1e-4)
    assert report["best"]["psnr"] > start
    assert report["config"]["init"] == "bespoke"
    with pytest.raises(ValueError, match="NFE 4, but n_steps=6"):
        train_bns(flow, gt, n_steps=6, init=bespoke, iters=1, progress=False)
    with pytest.raises(TypeError, match="a fitted solver"):
        train_bns(flow, gt, n_steps=4, init=3, iters=1, progress=False)
    with pytest.raises(ValueError, match="unknown init"):
        train_bns(flow, gt, n_steps=4, init="rk4", iters=1, progress=False)


@pytest.mark.parametrize("n_steps,base", [(4, "rk2"), (3, "rk1")])
def test_default_init_fits_bespoke_first_then_starts_bns_from_it(gmm_gt, n_steps, base):
    flow, gt = gmm_gt
    solver, report = train_bns(flow, gt, n_steps=n_steps, optimizer="lbfgs", iters=5,
                               max_iters=30, num_train=64, num_val=64, val_every=5,
                               progress=False)
    stage = report["bespoke_stage"]
    assert stage["base"] == base and stage["num_train"] == 64       # every non-validation pair
    # BNS's first validation is the fitted Bespoke solver, in BNS form, on the same pairs
    assert report["init"]["psnr"] == pytest.approx(stage["best"]["psnr"], abs=1e-4)
    _, val = gt.split(64)
    classical = bf.evaluate(flow, f"{'midpoint' if base == 'rk2' else 'euler'}@{n_steps}", val)
    assert report["init"]["psnr"] > classical["psnr"] + 1, classical["psnr"]
    assert report["best"]["psnr"] >= report["init"]["psnr"]
    assert report["config"]["init"] == "bespoke" and solver.nfe == n_steps
    assert report["wall_seconds"] == pytest.approx(report["bns_wall_seconds"]
                                                   + stage["wall_seconds"])


def test_default_init_resumes_to_the_uninterrupted_result(gmm_gt, tmp_path):
    flow, gt = gmm_gt
    kw = dict(n_steps=4, optimizer="lbfgs", iters=20, max_iters=20, num_train=32, num_val=32,
              val_every=5, checkpoint_every=5, budget_seconds=None, progress=False)
    full, _ = train_bns(flow, gt, **kw)

    def stop(it, record):
        if it >= 10:
            raise KeyboardInterrupt

    ckpt = tmp_path / "bns.ckpt"
    with pytest.raises(KeyboardInterrupt):          # after the Bespoke start, inside BNS
        train_bns(flow, gt, checkpoint=ckpt, callback=stop, **kw)
    assert (tmp_path / "bns.ckpt.bespoke").is_file()
    resumed, report = train_bns(flow, gt, checkpoint=ckpt, **kw)
    for name, p in full.named_parameters():
        assert torch.equal(p, getattr(resumed, name)), name
    assert report["bespoke_stage"]["base"] == "rk2"


def test_default_init_without_interior_knots_starts_from_midpoint(gmm_gt):
    flow, gt = gmm_gt
    ends = gt.subset(range(len(gt)))
    keep = [0, len(ends.knots_t) - 1]
    ends.knots_t, ends.knots_x, ends.knots_u = (ends.knots_t[keep], ends.knots_x[:, keep],
                                                ends.knots_u[:, keep])
    _, report = train_bns(flow, ends, n_steps=4, iters=1, num_train=64, num_val=64, progress=False)
    assert "no interior knots" in report["bespoke_stage"]["note"]
    assert report["config"]["init"] == "midpoint"


def test_train_bns_split_and_arguments(gmm_gt):
    flow, gt = gmm_gt
    with pytest.raises(ValueError, match="cannot take 1000 training and 1000 validation pairs"):
        train_bns(flow, gt, n_steps=2, iters=1, num_train=1000, num_val=1000, progress=False)
    _, report = train_bns(flow, gt, n_steps=2, init="midpoint", iters=1,
                          progress=False)                                 # 128 pairs: defaults shrink
    assert (report["config"]["num_train"], report["config"]["num_val"]) == (64, 64)
    assert "64 training / 64 validation pairs of 128" in report["split_note"]
    with pytest.raises(ValueError, match="n_steps=3"):
        train_bns(flow, gt, n_steps=3, init="midpoint", iters=1, progress=False)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train_bns(flow, gt, n_steps=2, optimizer="sgd", progress=False)


@pytest.mark.parametrize("extra", [dict(optimizer="lbfgs"), dict(optimizer="adam", batch_size=16)])
def test_checkpoint_resume_matches_an_uninterrupted_run(gmm_gt, tmp_path, extra):
    flow, gt = gmm_gt
    kw = dict(n_steps=4, init="midpoint", iters=20, num_train=32, num_val=32, val_every=5,
              checkpoint_every=10, progress=False, **extra)
    full, _ = train_bns(flow, gt, **kw)

    def stop(it, record):
        if it > 10:
            raise KeyboardInterrupt

    ckpt = tmp_path / "bns.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_bns(flow, gt, checkpoint=ckpt, callback=stop, **kw)
    assert torch.load(ckpt, weights_only=True)["iteration"] == 10
    resumed, report = train_bns(flow, gt, checkpoint=ckpt, **kw)
    for name, p in full.named_parameters():
        assert torch.equal(p, getattr(resumed, name)), name
    assert report["curve"][0]["iteration"] == 0
    with pytest.raises(ValueError, match="other settings"):
        train_bns(flow, gt, checkpoint=ckpt, **{**kw, "iters": 30})


def test_inits_listed():
    assert INITS == ("euler", "midpoint")
