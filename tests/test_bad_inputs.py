"""Bad inputs, one class per row: the command line answers with one line on stderr and exit code
2 (or the documented recovery), the API with one of the library's documented error types, and
nothing half-written is left that a rerun would trust (no temp files, no manifest, no output
file)."""
import errno
import json
import shutil

import numpy as np
import pytest
import torch

import bespoke_fast as bf
from bespoke_fast._checks import BespokeFastError
from bespoke_fast.cli import main
from bespoke_fast.io import model_identity, seal
from bespoke_fast.zoo import load

MODEL = ["--model", "gmm-64", "--device", "cpu", "--quiet"]
LINEAR = ["--model", "tests.bad_models:linear", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small gmm-64 GT set and solver files (fitted to gmm-64 / to another model)."""
    root = tmp_path_factory.mktemp("bad")
    assert main(["gt", *MODEL, "--num", "96", "--batch-size", "48", "--out", str(root / "gt")]) == 0
    ident = model_identity(load("gmm-64").model, "gmm-64")
    for name, meta in (("ours.json", ident), ("other.json", {"name": "digits-fmot", "hash": "00ff"})):
        solver = bf.BespokeSolver("rk2", 2)
        solver.meta = {"model": meta}
        solver.save(root / name)
    from tests.bad_models import nan_late
    solver.meta = {"model": model_identity(nan_late().model, "nan-late")}
    solver.save(root / "nan.json")
    bns = bf.NonStationarySolver(4)
    bns.meta = {"model": ident}
    bns.save(root / "bns.json")
    return root


def _copy_gt(base, tmp):
    shutil.copytree(base / "gt", tmp / "gt")
    return tmp / "gt"


def _edit_json(path, fn, reseal=False):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(seal(doc) if reseal else doc))


def _solver_doc(base, tmp, fn):
    path = tmp / "s.json"
    doc = json.loads((base / "ours.json").read_text())
    fn(doc)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _extreme_solver(base, tmp):
    solver = bf.BespokeSolver("rk2", 2)
    with torch.no_grad():
        solver.theta_s[1] = -95.0                     # finite in float64, overflows float32
    solver.meta = {"model": model_identity(load("gmm-64").model, "gmm-64")}
    solver.save(tmp / "s.json")
    return tmp / "s.json"


def _fail_writes(monkeypatch, exc):
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr("bespoke_fast.io.os.fsync", boom)


# class, argv (GT / SOLVER / OUT / BNS / OTHER / TMP are filled in), setup(base, tmp, monkeypatch)
# returning replacements, expected message
CLI_CASES = [
    ("num zero", ["gt", *MODEL, "--num", "0", "--out", "OUT"], None, "num must be an int >= 1"),
    ("num negative", ["gt", *MODEL, "--num", "-5", "--out", "OUT"], None, "num must be an int >= 1"),
    ("batch size zero", ["gt", *MODEL, "--num", "8", "--batch-size", "0", "--out", "OUT"], None,
     "batch_size must be an int >= 1"),
    ("rtol negative", ["gt", *MODEL, "--num", "8", "--rtol", "-1", "--out", "OUT"], None,
     "rtol must be a positive finite number"),
    ("rtol nan", ["gt", *MODEL, "--num", "8", "--rtol", "nan", "--out", "OUT"], None,
     "rtol must be a positive finite number"),
    ("atol zero", ["gt", *MODEL, "--num", "8", "--atol", "0", "--out", "OUT"], None,
     "atol must be a positive finite number"),
    ("knots one", ["gt", *MODEL, "--num", "8", "--knots", "1", "--out", "OUT"], None,
     "knots must be an int >= 2"),
    ("absurd gt count (shards)", ["gt", *MODEL, "--num", str(10 ** 12), "--out", "OUT"], None,
     "over the limit of 1000000"),
    ("absurd gt count (disk)", ["gt", *MODEL, "--num", str(10 ** 11), "--batch-size", str(10 ** 6),
                                "--out", "OUT"], None, "are free on"),
    ("absurd sample count", ["sample", *MODEL, "--solver", "SOLVER", "--num", str(10 ** 12),
                             "--out", "OUT"], None, "over the limit of 1000000"),
    ("gt rerun other seed", ["gt", *MODEL, "--num", "96", "--batch-size", "48", "--seed", "1",
                             "--out", "GTCOPY"], None, "seed was 0, now 1; use another --out, or --overwrite"),
    ("gt rerun other model", ["gt", *LINEAR, "--num", "96", "--batch-size", "48", "--out", "GTCOPY"],
     None, "model.name was 'gmm-64', now 'linear'"),
    ("gt folder of unknown run", ["gt", *MODEL, "--num", "8", "--out", "OUT"],
     lambda b, t, m: (t / "out").mkdir() or (t / "out" / "shard_00000.json").write_text("{}"),
     "files but no run.json"),
    ("gt out is a file", ["gt", *MODEL, "--num", "8", "--out", "OUT"],
     lambda b, t, m: (t / "out").write_text("x"), "out: it exists and is not a directory"),
    ("permission denied", ["gt", *MODEL, "--num", "8", "--out", "OUT"],
     lambda b, t, m: _fail_writes(m, PermissionError(errno.EACCES, "Permission denied")),
     "Permission denied"),
    ("disk full (errno)", ["sample", *MODEL, "--solver", "SOLVER", "--num", "8", "--out", "OUT"],
     lambda b, t, m: _fail_writes(m, OSError(errno.ENOSPC, "No space left on device")), "disk full"),
    ("disk full (short write)", ["gt", *MODEL, "--num", "8", "--out", "OUT"],
     lambda b, t, m: _fail_writes(m, OSError("65536 requested and 59360 written")), "disk full"),
    ("device cuda without cuda", ["gt", "--model", "gmm-64", "--device", "cuda", "--num", "8",
                                  "--out", "OUT"], None, "CUDA is not available"),
    ("device garbage", ["gt", "--model", "gmm-64", "--device", "banana", "--num", "8", "--out", "OUT"],
     None, "is not a device"),
    ("backend triton without triton", ["sample", *MODEL, "--solver", "SOLVER", "--num", "8",
                                       "--backend", "triton", "--out", "OUT"],
     lambda b, t, m: m.setattr("bespoke_fast.ops.backend.triton_available", lambda: False),
     "needs the 'triton' package"),
    ("digits-exact without scikit-learn", ["gt", "--model", "digits-exact", "--device", "cpu",
                                           "--num", "8", "--out", "OUT"],
     lambda b, t, m: m.setattr("bespoke_fast.zoo.importlib.util.find_spec",
                               lambda name, *a: None), "pip install \"bespoke_fast[digits]\""),
    ("unknown model", ["gt", "--model", "no-such", "--num", "8", "--out", "OUT"], None,
     "unknown model 'no-such'"),
    ("unimportable factory", ["gt", "--model", "no_such_pkg:f", "--num", "8", "--out", "OUT"], None,
     "cannot import model factory"),
    ("factory returns garbage", ["gt", "--model", "tests.bad_models:garbage", "--num", "8",
                                 "--out", "OUT"], None, "must return a ZooModel"),
    ("model contract: shape", ["gt", "--model", "tests.bad_models:wrong_shape", "--device", "cpu",
                               "--num", "8", "--out", "OUT"], None, "returned shape"),
    ("model NaN in gt", ["gt", "--model", "tests.bad_models:nan_late", "--device", "cpu", "--num",
                         "8", "--out", "OUT"], None, "NaN/Inf for GT sample 0 at t="),
    ("model NaN in sample", ["sample", "--model", "tests.bad_models:nan_late", "--device", "cpu",
                             "--solver", "NANSOLVER", "--num", "8", "--out", "OUT"], None,
     "sample 0 is NaN/Inf at solver step 2 of 2"),
    ("threads zero", ["gt", *MODEL, "--threads", "0", "--num", "8", "--out", "OUT"], None,
     "--threads must be >= 1"),
    ("checkpoint garbage", ["train", *MODEL, "--gt", "GT", "--nfe", "4", "--val", "16", "--checkpoint", "TMP/ck.pt",
                            "--out", "OUT"], lambda b, t, m: (t / "ck.pt").write_bytes(b"garbage"),
     "not a readable bespoke_fast checkpoint"),
    ("checkpoint is a directory", ["train", *MODEL, "--gt", "GT", "--nfe", "4", "--checkpoint",
                                   "TMP/ckdir", "--val", "16", "--out", "OUT"],
     lambda b, t, m: (t / "ckdir").mkdir(), "is a directory"),
    ("train out is a directory", ["train", *MODEL, "--gt", "GT", "--nfe", "4", "--out", "TMP"],
     None, "is a directory"),
    ("train out not writable", ["train", *MODEL, "--gt", "GT", "--nfe", "4", "--out", "OUT"],
     lambda b, t, m: m.setattr("bespoke_fast.io.tempfile.mkstemp",
                               _raiser(PermissionError(errno.EACCES, "Permission denied"))),
     "Permission denied"),
    ("train odd nfe rk2", ["train", *MODEL, "--gt", "GT", "--nfe", "7", "--out", "OUT"], None,
     "multiple of 2"),
    ("train bns odd nfe midpoint", ["train", *MODEL, "--gt", "GT", "--solver", "bns", "--nfe", "7",
                                    "--init", "midpoint", "--out", "OUT"], None,
     "init 'midpoint' needs an even number of steps"),
    ("train bns init unknown", ["train", *MODEL, "--gt", "GT", "--solver", "bns", "--init", "rk9",
                                "--out", "OUT"], None,
     "--init rk9: not bespoke, euler, midpoint or a solver file"),
    ("train bespoke init of bns", ["train", *MODEL, "--gt", "GT", "--init", "midpoint", "--out",
                                   "OUT"], None,
     "--init midpoint: not auto, searched, identity or a solver file"),
    ("train polish with bns", ["train", *MODEL, "--gt", "GT", "--solver", "bns",
                               "--polish-iters", "5", "--out", "OUT"], None,
     "--polish-iters is not an option of --solver bns"),
    ("train bns val too large", ["train", *MODEL, "--gt", "GT", "--solver", "bns", "--nfe", "4",
                                 "--val", "90", "--out", "OUT"], None,
     "cannot take 6 training and 90 validation pairs"),
    ("train bns GT too small", ["train", *LINEAR, "--gt", "TMP/tiny", "--solver", "bns", "--nfe",
                                "4", "--out", "OUT"],
     lambda b, t, m: main(["gt", *LINEAR, "--num", "20", "--out", str(t / "tiny")]),
     "needs at least 32 GT pairs"),
    ("train num-train with bespoke", ["train", *MODEL, "--gt", "GT", "--num-train", "10", "--out",
                                      "OUT"], None, "--num-train is not an option of --solver bespoke"),
    ("train gt-mode with bns", ["train", *MODEL, "--gt", "GT", "--solver", "bns", "--gt-mode",
                                "online", "--out", "OUT"], None,
     "--gt-mode is not an option of --solver bns"),
    ("train finetune-iters with bns", ["train", *MODEL, "--gt", "GT", "--solver", "bns",
                                       "--finetune-iters", "5", "--out", "OUT"], None,
     "--finetune-iters is not an option of --solver bns"),
    ("train optimizer with bespoke", ["train", *MODEL, "--gt", "GT", "--optimizer", "adam",
                                      "--out", "OUT"], None,
     "--optimizer is not an option of --solver bespoke"),
    ("train base with bns", ["train", *MODEL, "--gt", "GT", "--solver", "bns", "--base", "rk1",
                             "--out", "OUT"], None, "--base is for --solver bespoke"),
    ("train val too large", ["train", *MODEL, "--gt", "GT", "--nfe", "4", "--val", "96", "--out",
                             "OUT"], None, "cannot hold out 96 of 96"),
    ("train lr negative", ["train", *MODEL, "--gt", "GT", "--nfe", "4", "--lr", "-1", "--out", "OUT"],
     None, "lr must be a positive number"),
    ("train zero iterations", ["train", *MODEL, "--gt", "GT", "--nfe", "4", "--iters", "0",
                               "--finetune-iters", "0", "--polish-iters", "0", "--out", "OUT"],
     None, "iters + finetune_iters + polish_iters must be >= 1"),
    ("gt dir missing", ["eval", *MODEL, "--gt", "TMP/none", "midpoint@4"], None, "not a GT directory"),
    ("manifest truncated", ["eval", *MODEL, "--gt", "GTCOPY", "midpoint@4"],
     lambda b, t, m: (t / "gt" / "manifest.json").write_text(
         (b / "gt" / "manifest.json").read_text()[:100]), "manifest.json: not a GT manifest: not JSON"),
    ("manifest checksum byte flipped", ["eval", *MODEL, "--gt", "GTCOPY", "midpoint@4"],
     lambda b, t, m: _edit_json(t / "gt" / "manifest.json",
                                lambda d: d["shards"][1].update(sha256="0" * 64)),
     "damaged (its checksum does not match its content); rerun the same 'bespoke-fast gt'"),
    ("manifest without shards", ["eval", *MODEL, "--gt", "GTCOPY", "midpoint@4"],
     lambda b, t, m: _edit_json(t / "gt" / "manifest.json", lambda d: d.pop("shards"), reseal=True),
     "missing or malformed 'shards'"),
    ("shard corrupt", ["eval", *MODEL, "--gt", "GTCOPY", "midpoint@4"],
     lambda b, t, m: (t / "gt" / "shard_00001.safetensors").write_bytes(b"junk"), "checksum mismatch"),
    ("shard missing", ["eval", *MODEL, "--gt", "GTCOPY", "midpoint@4"],
     lambda b, t, m: (t / "gt" / "shard_00000.safetensors").unlink(), "shard_00000.safetensors is missing"),
    ("eval solver of another model", ["eval", *MODEL, "--gt", "GT", "OTHER"], None,
     "was made for model digits-fmot"),
    ("sample solver of another model", ["sample", *MODEL, "--solver", "OTHER", "--num", "8",
                                        "--out", "OUT"], None, "pass --allow-model-mismatch"),
    ("solver file truncated", ["eval", *MODEL, "--gt", "GT", "TMP/s.json"],
     lambda b, t, m: (t / "s.json").write_text((b / "ours.json").read_text()[:50]),
     "not a solver file: not JSON"),
    ("solver file nested deep", ["eval", *MODEL, "--gt", "GT", "TMP/s.json"],
     lambda b, t, m: _solver_doc(b, t, lambda d: d.update(training=json.loads("[" * 30 + "]" * 30))
                                 ) and (t / "s.json").write_text(
         (t / "s.json").read_text().replace("[[", "[" * 2000 + "[[").replace("]]", "]]" + "]" * 2000)),
     "nested deeper than 32 levels"),
    ("solver n_steps huge", ["sample", *MODEL, "--solver", "TMP/s.json", "--num", "8", "--out", "OUT"],
     lambda b, t, m: _solver_doc(b, t, lambda d: d.update(n_steps=12000, nfe=24000)),
     "'n_steps' must be an int >= 1 and <= MAX_STEPS (1024)"),
    ("solver n_steps 2**63", ["sample", *MODEL, "--solver", "TMP/s.json", "--num", "8", "--out", "OUT"],
     lambda b, t, m: _solver_doc(b, t, lambda d: d.update(n_steps=2 ** 63)), "'n_steps' must be"),
    ("solver integer 4301 digits", ["eval", *MODEL, "--gt", "GT", "TMP/s.json"],
     lambda b, t, m: (t / "s.json").write_text((b / "ours.json").read_text().replace(
         '"n_steps": 2', '"n_steps": ' + "9" * 4301)), "an integer with 4301 digits"),
    ("solver float32 overflow", ["sample", *MODEL, "--solver", "TMP/s.json", "--num", "8",
                                 "--out", "OUT"], lambda b, t, m: _extreme_solver(b, t),
     "float32 coefficients (table) overflow"),
    ("solver nfe float", ["eval", *MODEL, "--gt", "GT", "TMP/s.json"],
     lambda b, t, m: _solver_doc(b, t, lambda d: d.update(nfe=4.0)), "'nfe' is 4.0"),
    ("solver format_version true", ["eval", *MODEL, "--gt", "GT", "TMP/s.json"],
     lambda b, t, m: _solver_doc(b, t, lambda d: d.update(format_version=True)),
     "unknown format_version True"),
    ("solver duplicate keys", ["eval", *MODEL, "--gt", "GT", "TMP/s.json"],
     lambda b, t, m: (t / "s.json").write_text((b / "ours.json").read_text().replace(
         '"nfe": 4', '"nfe": 4, "nfe": 4')), "duplicate key 'nfe'"),
    ("solver missing", ["eval", *MODEL, "--gt", "GT", "TMP/none.json"], None, "neither a solver file"),
    ("sample rerun other num", ["sample", *MODEL, "--solver", "SOLVER", "--num", "16", "--out", "OUT"],
     lambda b, t, m: main(["sample", *MODEL, "--solver", str(b / "ours.json"), "--num", "8",
                           "--out", str(t / "out")]), "num was 8, now 16"),
    ("sample rerun other batch size", ["sample", *MODEL, "--solver", "SOLVER", "--num", "8",
                                       "--batch-size", "4", "--out", "OUT"],
     lambda b, t, m: main(["sample", *MODEL, "--solver", str(b / "ours.json"), "--num", "8",
                           "--out", str(t / "out")]), "batch_size was 256, now 4"),
]


def _raiser(exc):
    def f(*a, **k):
        raise exc
    return f


@pytest.mark.parametrize("argv,setup,message", [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input(base, tmp_path, monkeypatch, capsys, argv, setup, message):
    if "GTCOPY" in argv:
        _copy_gt(base, tmp_path)
    if setup is not None:
        setup(base, tmp_path, monkeypatch)
    subst = {"GT": str(base / "gt"), "GTCOPY": str(tmp_path / "gt"), "OUT": str(tmp_path / "out"),
             "SOLVER": str(base / "ours.json"), "OTHER": str(base / "other.json"),
             "NANSOLVER": str(base / "nan.json"), "TMP": str(tmp_path)}
    argv = [subst.get(a, a.replace("TMP/", str(tmp_path) + "/")) for a in argv]
    argv += [] if "--quiet" in argv else ["--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    _nothing_half_written(tmp_path, argv)


def _nothing_half_written(tmp_path, argv):
    assert not list(tmp_path.rglob("*.tmp")), list(tmp_path.rglob("*.tmp"))
    out = tmp_path / "out"
    if argv[0] in ("gt", "sample") and out.is_dir():
        # a refused rerun keeps the earlier complete run; a failed first run leaves no manifest
        manifest = out / "manifest.json"
        assert not manifest.exists() or json.loads(manifest.read_text())["sealed_sha256"]
    if argv[0] == "train":
        assert not out.is_file()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(BespokeFastError, match="num must be an int"):
        main(["gt", *MODEL, "--num", "0", "--out", str(tmp_path / "o"), "--debug"])


def test_real_bugs_keep_their_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr("bespoke_fast.fitting.gt.solve_adaptive", _raiser(ZeroDivisionError("bug")))
    with pytest.raises(ZeroDivisionError):
        main(["gt", *MODEL, "--num", "8", "--out", str(tmp_path / "o")])


def test_allow_model_mismatch_is_the_documented_recovery(base, tmp_path, capsys):
    assert main(["eval", *MODEL, "--gt", str(base / "gt"), "--allow-model-mismatch",
                 str(base / "other.json")]) == 0
    assert main(["sample", *MODEL, "--solver", str(base / "other.json"), "--num", "4",
                 "--allow-model-mismatch", "--out", str(tmp_path / "s")]) == 0


def test_sample_eval_train_work_with_every_solver_kind(base, tmp_path):
    """rk1, rk2 and BNS files through sample, eval and train (BNS sample raised AttributeError)."""
    gt = str(base / "gt")
    rk1 = tmp_path / "rk1.json"
    assert main(["train", *MODEL, "--gt", gt, "--base", "rk1", "--nfe", "3", "--iters", "2",
                 "--finetune-iters", "0", "--val", "16", "--out", str(rk1)]) == 0
    bns = tmp_path / "bns.json"
    assert main(["train", *MODEL, "--gt", gt, "--solver", "bns", "--nfe", "4", "--iters", "1",
                 "--out", str(bns)]) == 0
    assert json.loads(bns.read_text())["training"]["num_train"] == 48   # 96 pairs: 48 / 48
    for name, f in (("rk1", rk1), ("rk2", base / "ours.json"), ("bns", bns), ("bns0", base / "bns.json")):
        out = tmp_path / f"s_{name}"
        assert main(["sample", *MODEL, "--solver", str(f), "--num", "6", "--batch-size", "4",
                     "--out", str(out)]) == 0
        x = bf.sampling.load_samples(out)
        assert x.shape == (6, 64) and np.isfinite(x).all()
        assert main(["eval", *MODEL, "--gt", gt, str(f)]) == 0


def test_bns_split_rules():
    from bespoke_fast.fitting.bns import bns_split
    assert bns_split(1544)[:2] == (520, 1024) and bns_split(1544)[2] is None
    num_train, num_val, note = bns_split(1280)           # what `gt`'s default --num gives
    assert (num_train, num_val) == (520, 760) and "520 training / 760 validation" in note
    assert bns_split(384)[:2] == (192, 192) and bns_split(32)[:2] == (16, 16)
    assert bns_split(100, num_val=20)[:2] == (80, 20)
    assert bns_split(100, separate_val=50)[:2] == (100, 50)
    for kwargs in (dict(n=31), dict(n=100, num_val=90), dict(n=100, num_train=8),
                   dict(n=100, num_train=60, num_val=60)):
        with pytest.raises(bf.InvalidArgumentError):
            bns_split(**kwargs)


def test_error_types_are_public():
    assert issubclass(bf.SolverFileError, bf.BespokeFastError) and issubclass(bf.SolverFileError, ValueError)
    assert issubclass(bf.OutputError, OSError) and issubclass(bf.NonFiniteError, FloatingPointError)
