"""GT that scales: float16/bfloat16 knots and adaptive knot counts under a measured error budget,
and shards streamed (memory-mapped rows) into the trainer."""
import json

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast.fitting.gt_storage import StreamedTrajectories, bytes_per_trajectory


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same 48 gmm-64 trajectories stored four ways."""
    zm = bf.zoo.load("gmm-64")
    root = tmp_path_factory.mktemp("gtstore")
    out = {}
    for name, kw in (("f32", {}), ("f16", {"storage_dtype": "float16"}),
                     ("adaptive", {"adaptive_knots": True}),
                     ("adaptive_f16", {"adaptive_knots": True, "storage_dtype": "float16"})):
        m = bf.generate_trajectories(zm.model, 48, zm.shape, root / name, batch_size=24,
                                     progress=False, measure_interpolation=4, **kw)
        out[name] = (root / name, m)
    return zm, out


def _disk(path):
    return sum(f.stat().st_size for f in path.glob("shard_*.safetensors"))


def test_float16_knots_halve_the_disk_at_a_measured_recorded_cost(sets):
    zm, s = sets
    (d32, m32), (d16, m16) = s["f32"], s["f16"]
    assert _disk(d16) <= 0.52 * _disk(d32)
    st = m16["storage"]
    assert st["knot_dtype"] == "float16" and st["bytes_per_trajectory"]["stored"] <= 0.52 * \
        st["bytes_per_trajectory"]["float32_all_knots"]
    assert st["bytes_per_trajectory"]["float32_all_knots"] == bytes_per_trajectory((64,), 41)
    assert 0 < st["extra_rmse_mean"] <= st["error_limit"] == pytest.approx(0.1 * st["reference_local_error"])
    # the recorded cost is the real one: fp16 vs fp32 interpolants at times between the knots
    t = torch.linspace(0.013, 0.987, 23, dtype=torch.float64)
    a, b = bf.load_trajectories(d32).at(t), bf.load_trajectories(d16).at(t)
    assert a.dtype == b.dtype == torch.float32
    real = (a - b).flatten(2).pow(2).mean(-1).sqrt().mean()
    assert 0.3 * st["extra_rmse_mean"] < real < 3 * st["extra_rmse_mean"]
    assert json.loads((d16 / "manifest.json").read_text())["storage"] == st


def test_a_storage_dtype_beyond_the_error_budget_is_refused_before_writing(sets, tmp_path):
    zm, _ = sets
    with pytest.raises(ValueError, match="adds an interpolation error of .* above 1e-05 x the reference"):
        bf.generate_trajectories(zm.model, 8, zm.shape, tmp_path / "g", storage_dtype="bfloat16",
                                 error_fraction=1e-5, progress=False)
    assert not list((tmp_path / "g").glob("shard_*"))
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        bf.generate_trajectories(zm.model, 8, zm.shape, tmp_path / "h", storage_dtype="int8",
                                 progress=False)


def test_adaptive_knots_keep_fewer_knots_and_restore_the_interpolant(sets):
    _, s = sets
    (d32, _), (da, ma) = s["f32"], s["adaptive"]
    st = ma["storage"]
    assert st["adaptive_knots"] and st["knots_mean"] < 41
    assert _disk(da) < _disk(d32)
    full, thin = bf.load_trajectories(d32), bf.load_trajectories(da)
    assert thin.knots_x.shape == full.knots_x.shape
    t = torch.linspace(0, 1, 57, dtype=torch.float64)
    err = (full.at(t) - thin.at(t)).flatten(2).pow(2).mean(-1).sqrt()
    assert float(err.mean(0).max()) <= st["error_limit"]
    # both savings together
    assert _disk(s["adaptive_f16"][0]) < _disk(s["f16"][0])


@pytest.mark.parametrize("name", ["f32", "adaptive_f16"])
def test_streamed_rows_equal_the_loaded_ones(sets, name):
    path = sets[1][name][0]
    full, lazy = bf.load_trajectories(path), bf.load_trajectories(path, stream=True)
    assert isinstance(lazy, StreamedTrajectories) and len(lazy) == len(full) == 48
    rows = [40, 3, 25, 24, 0]                       # across both shards, unsorted
    a, b = full.subset(rows), lazy.subset(rows)
    for k in ("x0", "x1", "index"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert torch.equal(a.knots_x.to(b.knots_x.dtype), b.knots_x)
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    assert torch.equal(a.at(t), b.at(t))
    tr, val = lazy.split(8)
    assert len(tr) == 40 and torch.equal(val.index, full.index[40:])
    assert torch.equal(tr.subset([39]).x1, full.x1[39:40])
    ends = lazy.endpoints()
    assert torch.equal(ends.x1, full.x1) and ends.knots_x.shape[1] == 0


def test_training_on_streamed_shards_equals_training_on_the_loaded_set(sets):
    zm, s = sets
    path = s["f16"][0]
    kw = dict(base="rk2", n_steps=2, iters=3, finetune_iters=1, batch_size=8, val=8, progress=False)
    a, _ = bf.train(zm.model, bf.load_trajectories(path), **kw)
    b, _ = bf.train(zm.model, bf.load_trajectories(path, stream=True), **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
