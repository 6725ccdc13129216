"""Nothing silently wrong: run fingerprints (a rerun with any other argument refuses, --overwrite
replaces), sealed manifests written last and verified on read (rebuilt from verified shards),
interrupted runs resume bit for bit without stray temp files, identity checks on use."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast._checks import InvalidFileError, MismatchError, NonFiniteError
from bespoke_fast.cli import main
from bespoke_fast.fitting.gt import generate_trajectories, load_trajectories
from bespoke_fast.io import model_identity
from bespoke_fast.sampling import load_samples, sample_to_dir
from tests.bad_models import _Linear, _NaNLate
from tests.helpers import smooth_gmm

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--model", "gmm-64", "--device", "cpu", "--quiet"]
GT_ARGS = ["--num", "16", "--batch-size", "8", "--knots", "9"]


def _gt_cli(out, *extra):
    return main(["gt", *MODEL, *GT_ARGS, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def gt_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "gt"
    assert _gt_cli(out) == 0
    return out


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


@pytest.mark.parametrize("change,field", [
    (["--seed", "1"], "seed was 0, now 1"),
    (["--rtol", "1e-4"], "rtol was 1e-05, now 0.0001"),
    (["--atol", "1e-4"], "atol was 1e-05, now 0.0001"),
    (["--knots", "11"], "knots_t was"),
    (["--num", "17"], "num was 16, now 17"),
    (["--batch-size", "4"], "batch_size was 8, now 4"),
    (["--model", "digits-fmot"], "model.name was 'gmm-64', now 'digits-fmot'"),
])
def test_gt_rerun_with_a_changed_argument_refuses_and_overwrite_replaces(gt_dir, tmp_path, capsys,
                                                                         change, field):
    import shutil
    out = tmp_path / "gt"
    shutil.copytree(gt_dir, out)
    before = _snapshot(out)
    argv = ["gt", *MODEL, *GT_ARGS, "--out", str(out)]
    for i in range(0, len(change), 2):          # the change replaces the option when present
        if change[i] in argv:
            argv[argv.index(change[i]) + 1] = change[i + 1]
        else:
            argv += change[i:i + 2]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert field in err and "--overwrite" in err
    assert _snapshot(out) == before                 # nothing touched
    assert main(argv + ["--overwrite"]) == 0
    fresh = tmp_path / "fresh"
    assert main(argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
                + ["--out", str(fresh)]) == 0
    assert _snapshot(out) == _snapshot(fresh)       # no leftovers of the old run
    assert torch.equal(load_trajectories(out).x1, load_trajectories(fresh).x1)


def test_gt_complete_rerun_keeps_everything_and_says_so(gt_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in gt_dir.iterdir()}
    assert _gt_cli(gt_dir) == 0
    assert {p.name: p.stat().st_mtime_ns for p in gt_dir.iterdir()} == before


def test_gt_manifest_is_written_once_with_the_interpolation_and_rebuilt_when_damaged(gt_dir, tmp_path):
    import shutil
    out = tmp_path / "gt"
    shutil.copytree(gt_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["interpolation"]["rmse_mean"] > 0 and manifest["sealed_sha256"]
    for damage in ("truncate", "flip", "delete"):
        text = (out / "manifest.json").read_text()
        if damage == "truncate":
            (out / "manifest.json").write_text(text[:len(text) // 2])
        elif damage == "flip":   # a byte of a shard checksum: the manifest is blamed, not the shard
            doc = json.loads(text)
            doc["shards"][1]["sha256"] = "f" + doc["shards"][1]["sha256"][1:]
            (out / "manifest.json").write_text(json.dumps(doc))
        else:
            (out / "manifest.json").unlink()
        with pytest.raises((InvalidFileError, FileNotFoundError), match="manifest.json"):
            load_trajectories(out)
        assert _gt_cli(out) == 0                    # rebuilt from the verified shards
        rebuilt = json.loads((out / "manifest.json").read_text())
        assert rebuilt["shards"] == manifest["shards"] and "interpolation" in rebuilt
    assert torch.equal(load_trajectories(out).x1, load_trajectories(gt_dir).x1)


class _Interrupt(Exception):
    pass


def test_interrupted_gt_resumes_bit_for_bit_without_temp_files(tmp_path):
    flow = smooth_gmm(dim=8)
    kw = dict(num=24, shape=(8,), seed=2, batch_size=8, progress=False, model_name="m",
              measure_interpolation=4)
    generate_trajectories(flow, out=tmp_path / "full", **kw)
    out = tmp_path / "killed"
    calls, forward = [0], flow.forward

    def stop_after_300(x, t, **extras):           # an interruption in the middle of shard 1 or 2
        calls[0] += 1
        if calls[0] > 300:
            raise _Interrupt
        return forward(x, t, **extras)

    flow.forward = stop_after_300
    with pytest.raises(bf.ModelError, match="the model raised _Interrupt at GT samples") as e:
        generate_trajectories(flow, out=out, **kw)
    assert isinstance(e.value.__cause__, _Interrupt)
    del flow.forward
    assert not (out / "manifest.json").exists() and (out / "shard_00000.json").exists()
    (out / ".shard_00002.safetensors.abc.tmp").write_bytes(b"partial")   # what kill -9 leaves
    generate_trajectories(flow, out=out, **kw)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    assert _snapshot(out) == _snapshot(tmp_path / "full")


def test_sample_rerun_with_changed_arguments_refuses_and_overwrite_replaces(tmp_path, capsys):
    solver = tmp_path / "s.json"
    s = bf.BespokeSolver("rk2", 2)
    s.meta = {"model": model_identity(bf.zoo.load("gmm-64").model, "gmm-64")}
    s.save(solver)
    other = tmp_path / "s2.json"
    s.theta_s.data[0] = 0.1
    s.save(other)
    out = tmp_path / "out"
    base = ["sample", *MODEL, "--solver", str(solver), "--num", "8", "--batch-size", "4",
            "--out", str(out)]
    assert main(base) == 0
    before = _snapshot(out)
    for option, value, field in (("--num", "9", "num was 8"),     # (--batch-size resumes)
                                 ("--seed", "3", "seed was 0"), ("--solver", str(other), "solver.sha256"),
                                 ("--model-dtype", "bf16", "model_dtype"),
                                 ("--backend", "reference", "backend was 'auto'")):
        argv = list(base)
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
        capsys.readouterr()
        assert main(argv) == 2
        assert field in capsys.readouterr().err
        assert _snapshot(out) == before
    argv = base[:base.index("--num")] + ["--num", "5", "--batch-size", "4", "--out", str(out)]
    assert main(argv + ["--overwrite"]) == 0
    assert load_samples(out).shape == (5, 64)
    assert sorted(p.name for p in out.glob("samples_*")) == ["samples_00000.json", "samples_00000.npy"]


def test_samples_are_verified_when_read_back(tmp_path):
    s = bf.BespokeSolver("rk1", 2)
    sample_to_dir(_Linear(), s, (4,), 10, tmp_path, batch_size=4, shard_size=4, progress=False)
    assert load_samples(tmp_path).shape == (10, 4)
    f = tmp_path / "samples_00001.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(InvalidFileError, match="samples_00001.npy: missing or checksum mismatch"):
        load_samples(tmp_path)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["num"] = 11
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidFileError, match="manifest.json: damaged"):
        load_samples(tmp_path)


def test_non_finite_outputs_name_the_sample_and_write_nothing(tmp_path):
    s = bf.NonStationarySolver(4, "euler")
    with pytest.raises(NonFiniteError, match=r"sample 0 is NaN/Inf at solver step 4 of 4"):
        sample_to_dir(_NaNLate(), s, (4,), 6, tmp_path / "s", batch_size=3, progress=False)
    assert not list((tmp_path / "s").glob("samples_*"))
    with pytest.raises(NonFiniteError, match=r"NaN/Inf for GT sample 0 at t=0.5"):
        generate_trajectories(_NaNLate(), 6, (4,), tmp_path / "g", batch_size=3, progress=False)
    assert not list((tmp_path / "g").glob("shard_*"))
    # a run that wrote nothing does not block the fixed rerun
    assert sample_to_dir(_Linear(), s, (4,), 6, tmp_path / "s", batch_size=3, progress=False)["complete"]


def test_identity_checks_on_use(tmp_path):
    flow, other = smooth_gmm(dim=8), smooth_gmm(dim=8, seed=9)
    generate_trajectories(flow, 40, (8,), tmp_path / "gt", batch_size=20, progress=False,
                          measure_interpolation=0)
    gt = load_trajectories(tmp_path / "gt")
    with pytest.raises(MismatchError, match="the GT set was made for model"):
        bf.evaluate(other, "midpoint@4", gt)
    assert bf.evaluate(other, "midpoint@4", gt, allow_model_mismatch=True)["nfe"] == 4
    solver = bf.BespokeSolver("rk1", 2)
    solver.meta = {"model": model_identity(other, "other")}
    with pytest.raises(MismatchError, match="solver bespoke-rk1@2 was made for model other"):
        bf.evaluate(flow, solver, gt)
    with pytest.raises(MismatchError, match="allow_model_mismatch"):
        sample_to_dir(flow, solver, (8,), 4, tmp_path / "s", progress=False)
    # plain functions have a documented identity: their import path
    assert bf.io.model_fingerprint(smooth_gmm) == "callable:tests.helpers.smooth_gmm"


def test_checkpoint_of_another_gt_set_of_the_same_size_refuses(tmp_path):
    flow = smooth_gmm(dim=8)
    sets = []
    for seed in (0, 1):
        generate_trajectories(flow, 40, (8,), tmp_path / f"gt{seed}", seed=seed, batch_size=20,
                              progress=False, measure_interpolation=0)
        sets.append(load_trajectories(tmp_path / f"gt{seed}"))
    kw = dict(base="rk1", n_steps=2, iters=2, finetune_iters=0, batch_size=8, val=8, val_every=1,
              checkpoint=tmp_path / "ck.pt", checkpoint_every=1, progress=False)
    bf.train(flow, sets[0], **kw)
    with pytest.raises(MismatchError, match="other settings .*'gt'"):
        bf.train(flow, sets[1], **kw)


_GT_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import bespoke_fast as bf
    from tests.bad_models import Delayed
    from tests.helpers import smooth_gmm
    bf.generate_trajectories(Delayed(smooth_gmm(dim=8), 0.002), 40, (8,), sys.argv[1],
                             batch_size=8, progress=False, model_name="m", measure_interpolation=4)
""")


def test_sigkill_during_gt_resumes_bit_for_bit(tmp_path):
    import time
    from tests.bad_models import Delayed
    kw = dict(num=40, shape=(8,), batch_size=8, progress=False, model_name="m",
              measure_interpolation=4)
    model = Delayed(smooth_gmm(dim=8))
    generate_trajectories(model, out=tmp_path / "full", **kw)
    script = tmp_path / "child.py"
    script.write_text(_GT_CHILD.format(repo=str(REPO)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "shard_00001.json").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()
    generate_trajectories(model, out=out, **kw)     # the same run (the delay is not identity)
    assert not list(out.glob("*.tmp"))
    assert _snapshot(out) == _snapshot(tmp_path / "full")


class _ClassShift(torch.nn.Module):
    """A class-conditional velocity: u = -x + y (so guidance changes the field)."""

    def forward(self, x, t, y):
        return -x + y.to(x.dtype)[:, None]


def test_gt_rerun_with_another_guidance_scale_or_class_list_refuses(tmp_path):
    from bespoke_fast.integrations.diffusers import condition_extras
    kw = dict(batch_size=4, progress=False, measure_interpolation=0)
    out = tmp_path / "gt"

    def gt(scale, classes, **extra):
        model = bf.cfg(_ClassShift(), scale, cond_key="y", null=0)
        fn = lambda index: {"y": condition_extras(classes=classes)(index)["class_labels"]}  # noqa: E731
        fn.fingerprint_config = lambda: {"classes": list(classes)}
        return generate_trajectories(model, 8, (3,), out, extras_fn=fn, **kw, **extra)

    gt(2.0, [1, 2])
    with pytest.raises(MismatchError, match="model.hash"):
        gt(3.0, [1, 2])            # the guidance scale is part of the model's identity
    with pytest.raises(MismatchError, match="extras_fn"):
        gt(2.0, [1, 5])            # so is the conditioning function's class list
    assert gt(3.0, [1, 5], overwrite=True)["num"] == 8


def test_fingerprint_config_is_part_of_the_model_identity():
    from bespoke_fast.integrations.diffusers import condition_extras
    fp = bf.io.model_fingerprint
    guided = [bf.cfg(_ClassShift(), s, cond_key="y") for s in (1.0, 1.0, 4.0)]
    assert fp(guided[0]) == fp(guided[1]) != fp(guided[2])
    assert fp(condition_extras(classes=[1, 2])) != fp(condition_extras(classes=[1, 3]))
    assert fp(condition_extras(num_prompts=4)) == fp(condition_extras(num_prompts=4))
    # a model without settings keeps the hash of its tensors alone (recorded hashes stay valid)
    import hashlib
    lin = torch.nn.Linear(2, 2)
    h = hashlib.sha256()
    for name, value in sorted(lin.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().to(torch.float64).numpy().tobytes())
    assert fp(lin) == h.hexdigest()[:16]
