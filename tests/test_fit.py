"""The Fit pipeline: GT sets, the RMSE-bound loss, the trainer (checkpoints, multi-process)."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast.fitting.gt import TrajectorySet, hermite
from bespoke_fast.fitting.bespoke import lipschitz_weights, local_errors, rmse_bound_loss
from tests.helpers import gmm_trajectories, noise, smooth_gmm
from tests.helpers import perturbed as perturb_parameters

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- exact linear flow
class LinearField(torch.nn.Module):
    """u(t, x) = A x with spectral norm ||A||_2 = lip; exact x(t) = expm(A t) x0."""

    def __init__(self, dim=6, lip=1.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.register_buffer("A", A * lip / torch.linalg.matrix_norm(A, ord=2))

    def forward(self, x, t):
        return x @ self.A.T

    def exact(self, x0, t):  # [m] times -> [m, B, dim]
        return torch.stack([x0 @ torch.matrix_exp(self.A * float(ti)).T for ti in t])


def linear_gt(field, B=8, K=200):
    x0 = noise(B, field.A.shape[0], seed=7)
    kt = torch.linspace(0, 1, K, dtype=torch.float64)
    kx = field.exact(x0, kt)                       # [K, B, D]
    ku = kx @ field.A.T
    return TrajectorySet(x0, kx[-1], kt, kx.movedim(0, 1), ku.movedim(0, 1), torch.arange(B),
                         {"data_range": 2.0})


def perturbed(base, n, seed=0, scale=0.3):
    return perturb_parameters(bf.BespokeSolver(base, n), seed, scale)


@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_global_error_stays_below_the_rmse_bound_on_a_lipschitz_1_field(base):
    field = LinearField(lip=1.0)
    gt = linear_gt(field)
    for seed in range(5):
        solver = perturbed(base, 4, seed)
        grid = solver.tables()["t"].detach()
        grid = grid if base == "rk1" else grid[0::2]
        X = field.exact(gt.x0, grid)                      # exact GT at the grid
        with torch.no_grad():
            d = local_errors(solver, field, X)            # [n, B]
            M = lipschitz_weights(solver.lipschitz(1.0))
            bound = (M[:, None] * d).sum(0)               # per sample
            err = (solver.sample(field, gt.x0) - X[-1]).pow(2).mean(-1).sqrt()
        assert (err <= bound * (1 + 1e-9)).all(), (seed, err, bound)
        assert (err > 0.05 * bound).any()  # the bound is not vacuous here


def test_lipschitz_weights_multiply_the_later_steps():
    L = torch.tensor([2.0, 3.0, 5.0, 7.0])
    assert torch.equal(lipschitz_weights(L), torch.tensor([105.0, 35.0, 7.0, 1.0]))


@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_loss_gradients_match_finite_differences(base):
    field = LinearField(lip=1.5, seed=1)
    gt = linear_gt(field)
    solver = perturbed(base, 3, seed=2, scale=0.2)

    def loss_fn():
        X = gt.at(solver.tables()["t"] if base == "rk1" else solver.tables()["t"][0::2])
        return rmse_bound_loss(solver, field, X)[0]

    loss_fn().backward()
    for name, p in solver.named_parameters():
        for j in range(p.numel()):
            with torch.no_grad():
                old = p.view(-1)[j].item()
                p.view(-1)[j] = old + 1e-6
                up = loss_fn().item()
                p.view(-1)[j] = old - 1e-6
                down = loss_fn().item()
                p.view(-1)[j] = old
            fd = (up - down) / 2e-6
            assert abs(p.grad.view(-1)[j].item() - fd) < 1e-6 + 1e-5 * abs(fd), (name, j)


def test_hermite_interpolation_is_exact_at_knots_and_cubic_between():
    kt = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    f = lambda t: t ** 3 - 2 * t + 1
    df = lambda t: 3 * t ** 2 - 2
    kx = f(kt).reshape(1, 3, 1)
    ku = df(kt).reshape(1, 3, 1)
    t = torch.tensor([0.0, 0.1, 0.3, 0.77, 1.0], dtype=torch.float64, requires_grad=True)
    x = hermite(kt, kx, ku, t)
    assert torch.allclose(x.reshape(-1), f(t.detach()), atol=1e-14)  # reproduces cubics
    x.sum().backward()
    assert torch.allclose(t.grad, df(t.detach()), atol=1e-12)


# ----------------------------------------------------------------------------- GT sets
def test_gt_sets_resume_verify_and_match_direct_solves(tmp_path):
    flow = smooth_gmm(dim=8)
    out = tmp_path / "gt"
    m = bf.generate_trajectories(flow, 20, (8,), out, seed=3, batch_size=8, progress=False,
                                 model_name="smooth", measure_interpolation=4)
    assert m["num"] == 20 and len(m["shards"]) == 3 and m["nfe"]["total"] > 0
    assert m["interpolation"]["rmse_max"] < 1e-3
    gt = bf.load_trajectories(out)
    assert gt.x0.shape == (20, 8) and gt.knots_x.shape[:2] == (20, len(m["knots_t"]))
    assert torch.equal(gt.x0[5], bf.noise.noise_for_indices([5], (8,), 3)[0])
    direct = bf.solve_adaptive(flow, gt.x0.double(), [0.0, 1.0], rtol=1e-9, atol=1e-9)[-1]
    assert (gt.x1.double() - direct).abs().max() < 1e-3
    # resume: delete one shard, corrupt another -> exactly those are recomputed, identically
    before = {p.name: p.read_bytes() for p in out.glob("shard_*.safetensors")}
    (out / "shard_00001.safetensors").unlink()
    (out / "shard_00002.safetensors").write_bytes(b"garbage")
    mtime0 = (out / "shard_00000.safetensors").stat().st_mtime_ns
    bf.generate_trajectories(flow, 20, (8,), out, seed=3, batch_size=8, progress=False,
                             model_name="smooth", measure_interpolation=0)
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == mtime0
    after = {p.name: p.read_bytes() for p in out.glob("shard_*.safetensors")}
    assert after == before
    (out / "shard_00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checksum mismatch"):
        bf.load_trajectories(out)
    with pytest.raises(FileNotFoundError, match="not a GT directory"):
        bf.load_trajectories(tmp_path / "nothing")


# ----------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def gmm_gt(tmp_path_factory):
    return gmm_trajectories(tmp_path_factory.mktemp("gmm_gt"), 192, 96)


def test_training_beats_the_base_solver(gmm_gt):
    flow, gt = gmm_gt
    solver, report = bf.train(flow, gt, base="rk2", n_steps=3, iters=120, finetune_iters=40,
                              polish_iters=0, batch_size=64, lr=1e-2, val=64, val_every=40,
                              init="searched", budget_evals=None, progress=False)
    _, val = gt.split(64)
    base = bf.evaluate(flow, "midpoint@6", val)["psnr"]
    ours = bf.evaluate(flow, solver, val)["psnr"]
    assert ours > base + 3, (base, ours)
    assert report["best"]["psnr"] == pytest.approx(ours, abs=1e-6)
    ev = report["evaluations"]      # exact: a gradient iteration is 64 x 6 rows each way
    assert ev["bound"] == {"forward": 120 * 64 * 6, "backward": 120 * 64 * 6,
                           "forward_equivalent": 3 * 120 * 64 * 6}
    assert ev["finetune"]["forward"] == ev["finetune"]["backward"] == 40 * 64 * 6
    assert ev["start"]["backward"] == 0 and report["wall_seconds"] > 0
    assert [(r["iteration"], r["phase"]) for r in report["curve"]] == [
        (40, "bound"), (80, "bound"), (120, "bound"), (160, "finetune")]
    assert solver.meta["model"]["hash"] and solver.meta["validation"]["psnr"] == report["best"]["psnr"]


def test_the_lbfgs_polish_goes_beyond_the_adam_fine_tune(gmm_gt):
    flow, gt = gmm_gt
    kw = dict(base="rk2", n_steps=3, iters=40, finetune_iters=40, batch_size=64, lr=1e-2,
              val=64, val_every=20, init="searched", progress=False, patience=None,
              budget_seconds=None, budget_evals=None, warmup_pairs=0)
    adam, adam_report = bf.train(flow, gt, polish_iters=0, **kw)
    polished, report = bf.train(flow, gt, polish_iters=30, **kw)
    _, val = gt.split(64)
    # the same run up to the fine-tune's end, then L-BFGS on the whole training set
    assert report["curve"][:len(adam_report["curve"])] == adam_report["curve"]
    polish = [r for r in report["curve"] if r["phase"] == "polish"]
    assert [r["iteration"] for r in polish][:3] == [90, 100, 110]
    assert report["phase_stop_reasons"]["finetune"] == "max_iters"
    assert report["best"]["phase"] == "polish"
    gain = bf.evaluate(flow, polished, val)["psnr"] - bf.evaluate(flow, adam, val)["psnr"]
    assert gain > 0.5, gain
    assert report["nfe"]["train"] > adam_report["nfe"]["train"] + 30 * 128 * 6


def test_online_gt_mode_trains_too(gmm_gt):
    flow, gt = gmm_gt
    solver, report = bf.train(flow, gt, base="rk1", n_steps=4, iters=20, batch_size=32, lr=1e-2,
                              val=64, val_every=20, gt_mode="online", progress=False)
    assert report["nfe"]["train"] > 20 * 32 * 4  # the per-iteration RK45 solves are counted
    _, val = gt.split(64)
    assert report["best"]["psnr"] > bf.evaluate(flow, "euler@4", val)["psnr"]


def test_trainer_rejects_bad_settings_and_foreign_gt(gmm_gt):
    flow, gt = gmm_gt
    with pytest.raises(ValueError, match="unknown gt_mode"):
        bf.train(flow, gt, gt_mode="live", progress=False)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        bf.train(flow, gt, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="GT set was generated by model"):
        bf.train(smooth_gmm(dim=16, k=6, seed=9), gt, iters=1, progress=False)


_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {repo!r})
    import bespoke_fast as bf
    from tests.helpers import smooth_gmm
    torch.set_num_threads(1)
    flow = smooth_gmm(dim=16, k=6, std_range=(0.1, 0.3))
    gt = bf.load_trajectories(sys.argv[1])
    def cb(i, rec):
        print("iter", i, flush=True)
    solver, _ = bf.train(flow, gt, base="rk2", n_steps=3, iters=30, batch_size=32, lr=1e-2, val=64,
                         val_every=1, checkpoint=sys.argv[2] or None, checkpoint_every=1,
                         finetune_iters=10, polish_iters=20, init="searched", progress=False,
                         callback=cb, patience=None, budget_seconds=None)
    # a fixed schedule: kill points at iterations 12 (bound), 33 (fine-tune), 44 (the
    # Levenberg-Marquardt warm-up, 41-47) and 57 (polish, validated at 57 and 67)
    solver.save(sys.argv[3])
""")


def test_sigkill_and_restart_ends_with_the_uninterrupted_parameters(gmm_gt, tmp_path):
    flow, gt = gmm_gt
    gt_dir = tmp_path / "gt"
    bf.generate_trajectories(flow, 192, (16,), gt_dir, seed=0, batch_size=96, progress=False,
                             measure_interpolation=0)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=str(REPO)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(script), str(gt_dir), "", str(tmp_path / "full.json")],
                   check=True, env=env, capture_output=True)
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "resumed.json"
    for kill_at in ("iter 12", "iter 33", "iter 44", "iter 57"):   # once in each phase
        proc = subprocess.Popen([sys.executable, str(script), str(gt_dir), str(ckpt), str(out)],
                                stdout=subprocess.PIPE, text=True, env=env)
        for line in proc.stdout:
            if line.strip() == kill_at:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        assert proc.returncode == -signal.SIGKILL and not out.exists()
    subprocess.run([sys.executable, str(script), str(gt_dir), str(ckpt), str(out)], check=True,
                   env=env, capture_output=True)
    full, resumed = json.loads((tmp_path / "full.json").read_text()), json.loads(out.read_text())
    assert full["parameters"] == resumed["parameters"]
    assert full["validation"] == resumed["validation"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIST = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {repo!r})
    import bespoke_fast as bf
    from tests.helpers import smooth_gmm
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    flow = smooth_gmm(dim=16, k=6, std_range=(0.1, 0.3))
    bf.generate_trajectories(flow, 40, (16,), sys.argv[1], seed=5, batch_size=8, progress=False,
                             measure_interpolation=0)
    gt = bf.load_trajectories(sys.argv[1])
    if dist.get_rank() == 1:  # a slower clock on rank 1: on its own it would pick a shorter
        import bespoke_fast.fitting.bespoke as trainer  # learning-rate horizon than rank 0
        trainer.phase_horizon = lambda cap, done, elapsed, left: done + 1
    solver, _ = bf.train(flow, gt, base="rk1", n_steps=3, iters=6, batch_size=8, lr=1e-2, val=8,
                         val_every=3, progress=False)
    solver.save(sys.argv[2] + f".rank{{dist.get_rank()}}.json")
    dist.destroy_process_group()
""")


def test_two_gloo_processes_split_gt_shards_and_train_in_sync(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(_DIST.format(repo=str(REPO)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(_free_port()), str(script), str(tmp_path / "gt2"),
                    str(tmp_path / "s")], check=True, env=env, capture_output=True, timeout=240)
    flow = smooth_gmm(dim=16, k=6, std_range=(0.1, 0.3))
    bf.generate_trajectories(flow, 40, (16,), tmp_path / "gt1", seed=5, batch_size=8,
                             progress=False, measure_interpolation=0)
    one, two = bf.load_trajectories(tmp_path / "gt1"), bf.load_trajectories(tmp_path / "gt2")
    assert torch.equal(one.x1, two.x1) and torch.equal(one.knots_x, two.knots_x)
    r0 = json.loads((tmp_path / "s.rank0.json").read_text())["parameters"]
    r1 = json.loads((tmp_path / "s.rank1.json").read_text())["parameters"]
    assert r0 == r1  # all-reduced gradients and rank 0's schedule keep the ranks identical
