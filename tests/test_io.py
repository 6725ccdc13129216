import json

import pytest
import torch

import bespoke_fast as bf
from tests.helpers import noise, smooth_gmm


def _trained_like(base="rk2", n=4, seed=0):
    solver = bf.BespokeSolver(base, n)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    solver.meta = {"model": {"name": "gmm-test", "hash": "abc"}, "training": {"iters": 3},
                   "validation": {"psnr": 40.5}}
    return solver


@pytest.mark.parametrize("base", ["rk1", "rk2"])
def test_save_load_round_trip_is_exact(tmp_path, base):
    solver = _trained_like(base)
    path = tmp_path / "s.json"
    solver.save(path)
    loaded = bf.BespokeSolver.load(path)
    for name, p in solver.named_parameters():
        assert torch.equal(p, getattr(loaded, name)), name
    assert loaded.meta["model"] == {"name": "gmm-test", "hash": "abc"}
    assert loaded.meta["validation"]["psnr"] == 40.5
    flow, x0 = smooth_gmm(), noise(4, 8)
    with torch.no_grad():
        assert torch.equal(solver.sample(flow, x0), loaded.sample(flow, x0))
    doc = json.loads(path.read_text())
    assert doc["format_version"] == 1 and doc["nfe"] == solver.nfe and doc["base"] == base
    assert len(doc["tables"]["t"]) == solver.n_points


def _write(tmp_path, mutate):
    path = tmp_path / "s.json"
    _trained_like().save(path)
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    return path


def _set(doc, keys, value):
    d = doc
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


@pytest.mark.parametrize("keys,value,message", [
    (["format_version"], 99, "unknown format_version 99"),
    (["format"], "something", "'format' must be"),
    (["kind"], "magic", "unknown kind 'magic'"),
    (["base"], "rk3", "unknown base 'rk3'"),
    (["n_steps"], 0, "'n_steps' must be an int >= 1"),
    (["nfe"], 7, "'nfe' is 7"),
    (["parameters", "theta_s"], [0.0, 0.0], "'theta_s' has 2 entries, expected 8"),
    (["parameters", "theta_t"], [1.0] * 7 + [float("nan")], "contains NaN or Inf"),
    (["parameters", "theta_t"], [1.0] * 7 + [0.0], "strictly increasing"),
    (["parameters", "theta_t"], [1.0] * 7 + ["x"], "must be a list of numbers"),
    (["tables", "t"], [0.0, 0.3, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0], "non-monotone t"),
    (["tables", "t"], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9], "must start at 0 and end at 1"),
    (["tables", "s"], [1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], "s \\(stored\\) must be > 0"),
    (["tables", "tdot"], [1.0] * 8, "does not match the parameters"),
])
def test_bad_solver_files_name_the_problem(tmp_path, keys, value, message):
    path = _write(tmp_path, lambda doc: _set(doc, keys, value))
    with pytest.raises(ValueError, match=message):
        bf.BespokeSolver.load(path)


def test_bad_solver_files_not_json_too_big_missing(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        bf.load_solver(p)
    p.write_text(" " * (1 << 20 + 1))
    with pytest.raises(ValueError, match="over the 1 MB limit"):
        bf.load_solver(p)
    with pytest.raises(FileNotFoundError, match="solver file not found"):
        bf.load_solver(tmp_path / "missing.json")


def test_unexpected_parameter_names_are_rejected(tmp_path):
    path = _write(tmp_path, lambda doc: doc["parameters"].update(evil=[1.0]))
    with pytest.raises(ValueError, match="'parameters' must hold exactly"):
        bf.load_solver(path)


def test_sidecar_vouches_for_its_file_and_nothing_else(tmp_path):
    from bespoke_fast.io import verified_sidecar, write_with_sidecar
    data, side = tmp_path / "shard.bin", tmp_path / "shard.json"
    info = write_with_sidecar(data, b"payload", side, {"run": "r1", "count": 3})
    assert json.loads(side.read_text()) == info and len(info["sha256"]) == 64
    assert verified_sidecar(data, side, run="r1", count=3) == info
    assert verified_sidecar(data, side, run="r2", count=3) is None          # another run
    # a writer callable hashes the file on disk: the same digest as for the bytes
    assert write_with_sidecar(data, lambda f: f.write(b"payload"), side, {"run": "r1"})["sha256"] \
        == info["sha256"]
    data.write_bytes(b"payloaX")                                             # corrupted file
    assert verified_sidecar(data, side, run="r1") is None
    data.unlink()
    assert verified_sidecar(data, side, run="r1") is None                    # missing file
    side.write_text("[1, 2]")
    assert verified_sidecar(data, side) is None                              # not an object


def test_infer_device_and_dist_info_without_distributed():
    from bespoke_fast.utils import count_params, dist_info, infer_device
    assert dist_info() == (0, 1, False)
    net = torch.nn.Linear(3, 2)
    assert infer_device(net) == torch.device("cpu") and count_params(net) == 8
    buffers_only = torch.nn.Module()
    buffers_only.register_buffer("b", torch.zeros(1, device="meta"))
    assert infer_device(buffers_only) == torch.device("meta")
    assert infer_device(lambda x, t: x) == torch.device("cpu")
