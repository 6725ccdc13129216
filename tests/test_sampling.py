"""sample_to_dir (bespoke_fast.sampling): shards + manifest, batch-size independence, resume,
and a 2-process gloo run started the way torchrun starts its workers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

import pytest

from bespoke_fast._checks import MismatchError
from bespoke_fast.sampling import sample_to_dir, shard_name

# Shared by the tests and the torchrun script (exec'ed in both) so both build the same problem.
PROBLEM_SRC = textwrap.dedent('''
    import torch
    from torch import nn
    from bespoke_fast.solvers.bespoke import BespokeSolver

    SHAPE = (2, 3)

    class Problem(nn.Module):
        """Exact fm-ot GMM velocity with broadcasting only (no matmul, whose CPU rounding depends
        on a row's position in the batch): bitwise batch invariant. Counts its calls."""

        def __init__(self, k=4, tau=0.3):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("means", torch.randn(k, 6, generator=g))
            self.tau2, self.calls = tau * tau, 0

        def forward(self, x, t):
            self.calls += 1
            xf, tt = x.reshape(x.shape[0], 1, -1), t.reshape(-1, 1)
            v = tt * tt * self.tau2 + (1 - tt) ** 2
            d = xf - tt[..., None] * self.means
            p = torch.softmax(-0.5 * (d * d).sum(-1) / v - 3 * torch.log(v), 1)
            c = (tt * self.tau2 - (1 - tt)) / v
            return (((p * c)[..., None] * d).sum(1) + (p[..., None] * self.means).sum(1)).reshape(x.shape)

    def make_solver():
        solver = BespokeSolver("rk2", 2)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in solver.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return solver
''')
_ns: dict = {}
exec(PROBLEM_SRC, _ns)
Problem, make_solver, SHAPE = _ns["Problem"], _ns["make_solver"], _ns["SHAPE"]

NUM, SHARD = 20, 8          # shards of 8, 8, 4


def run(out_dir, batch_size=8, model=None, **kw):
    kw.setdefault("shard_size", SHARD)
    return sample_to_dir(model or Problem(), make_solver(), SHAPE, NUM, out_dir,
                         batch_size=batch_size, seed=3, backend="reference", progress=False,
                         model_name="toy", **kw)


def load_all(out_dir):
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return manifest, np.concatenate([np.load(out_dir / s["file"]) for s in manifest["shards"]])


def test_writes_shards_and_manifest_bitwise_across_batch_sizes(tmp_path):
    m8 = run(tmp_path / "b8", batch_size=8)
    run(tmp_path / "b3", batch_size=3)
    manifest, a8 = load_all(tmp_path / "b8")
    _, a3 = load_all(tmp_path / "b3")
    assert a8.dtype == np.float32 and a8.shape == (NUM, *SHAPE)
    assert np.array_equal(a8, a3)                      # bit-identical whatever the batch size
    assert manifest["complete"] and m8["complete"]
    assert [(s["start"], s["count"]) for s in manifest["shards"]] == [(0, 8), (8, 8), (16, 4)]
    assert manifest["num"] == NUM and manifest["shape"] == list(SHAPE) and manifest["seed"] == 3
    assert manifest["solver"]["nfe"] == 4 and manifest["solver"]["kind"] == "bespoke"
    assert manifest["model"] == "toy" and "package_version" in manifest and "wall_seconds" in manifest
    side = json.loads((tmp_path / "b8" / (shard_name(2) + ".json")).read_text())
    assert side["count"] == 4 and side["start"] == 16 and len(side["sha256"]) == 64
    assert not [p for p in os.listdir(tmp_path / "b8") if p.endswith(".tmp")]
    # the same samples the sampler itself streams (counter-based noise)
    from bespoke_fast.engine import FastSampler
    sampler = FastSampler(Problem(), make_solver(), SHAPE, 5, backend="reference")
    assert np.array_equal(sampler.sample(NUM, seed=3).numpy(), a8)


def test_resume_recomputes_only_missing_or_corrupt_shards(tmp_path):
    run(tmp_path)
    _, first = load_all(tmp_path)
    kept = tmp_path / (shard_name(0) + ".npy")
    kept_mtime = kept.stat().st_mtime_ns
    for ext in (".npy", ".json"):                      # shard 1: gone
        (tmp_path / (shard_name(1) + ext)).unlink()
    corrupt = tmp_path / (shard_name(2) + ".npy")      # shard 2: one byte flipped
    raw = bytearray(corrupt.read_bytes())
    raw[-1] ^= 0xFF
    corrupt.write_bytes(bytes(raw))

    model = Problem()
    manifest = run(tmp_path, batch_size=8, model=model)
    assert manifest["computed_shards"] == [1, 2]
    assert model.calls == 2 * make_solver().nfe        # one batch per recomputed shard
    assert kept.stat().st_mtime_ns == kept_mtime
    _, second = load_all(tmp_path)
    assert np.array_equal(first, second)

    model = Problem()                                  # complete: nothing to do
    assert run(tmp_path, model=model)["computed_shards"] == [] and model.calls == 0
    with pytest.raises(MismatchError, match="shard_size was 8, now 5"):  # another layout
        run(tmp_path, shard_size=5)
    assert run(tmp_path, shard_size=5, overwrite=True)["computed_shards"] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("samples_*.npy")) == [
        shard_name(k) + ".npy" for k in range(4)]


def test_explicit_ranks_without_a_process_group(tmp_path):
    m1 = run(tmp_path, rank=1, world_size=2)
    assert m1["computed_shards"] == [1] and not m1["complete"] and m1["missing_shards"] == [0, 2]
    assert not (tmp_path / "manifest.json").exists()
    m0 = run(tmp_path, rank=0, world_size=2)
    assert m0["computed_shards"] == [0, 2] and m0["complete"]
    _, arr = load_all(tmp_path)
    run(tmp_path / "single")
    assert np.array_equal(arr, load_all(tmp_path / "single")[1])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_single_process(tmp_path):
    """Two processes in one gloo group, started with the environment torchrun gives its workers
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT: env:// init) but without torchrun's launcher process,
    which would cost one more torch import. Shard k runs on rank k % 2; rank 0 writes the
    manifest after the barrier."""
    script = tmp_path / "run_sampling.py"
    script.write_text(PROBLEM_SRC + textwrap.dedent(f'''
        import sys
        import torch.distributed as dist
        from bespoke_fast.sampling import sample_to_dir

        dist.init_process_group("gloo")
        m = sample_to_dir(Problem(), make_solver(), SHAPE, {NUM}, sys.argv[1], batch_size=3,
                          seed=3, shard_size={SHARD}, backend="reference", progress=False,
                          model_name="toy")
        assert m["complete"] and m["world_size"] == 2, m
        print("rank", dist.get_rank(), "computed", m["computed_shards"], flush=True)
        dist.destroy_process_group()
    '''))
    out, port = tmp_path / "dist", str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert "rank 0 computed [0, 2]" in logs[0] and "rank 1 computed [1]" in logs[1], logs
    manifest, arr = load_all(out)
    assert manifest["world_size"] == 2
    run(tmp_path / "single")
    assert np.array_equal(arr, load_all(tmp_path / "single")[1])
