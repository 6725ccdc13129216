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
     "shard_00000.json was not written by this GT set (no run record"),
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
    ("manifest data_range edited and resealed", ["eval", *MODEL, "--gt", "GTCOPY", "midpoint@4"],
     lambda b, t, m: _edit_json(t / "gt" / "manifest.json", lambda d: d.update(data_range=20),
                                reseal=True),
     "its data_range (20) differs from its run identity's (2.0): edited by hand?"),
    ("manifest and its run identity edited and resealed", ["eval", *MODEL, "--gt", "GTCOPY",
                                                           "midpoint@4"],
     lambda b, t, m: _edit_json(t / "gt" / "manifest.json", lambda d: d.update(data_range=20) or
                                d["run"].update(data_range=20), reseal=True),
     "its shards belong to another run than its identity"),
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
    ("solver missing", ["eval", *MODEL, "--gt", "GT", "TMP/none.json"], None,
     "solver file not found: "),
    ("solver missing (sample)", ["sample", *MODEL, "--solver", "TMP/none.json", "--num", "4",
                                 "--out", "OUT"], None, "solver file not found: "),
    ("solver spec unknown", ["eval", *MODEL, "--gt", "GT", "midpoint10"], None,
     "neither a solver file nor 'method@NFE'"),
    ("sample rerun other num", ["sample", *MODEL, "--solver", "SOLVER", "--num", "16", "--out", "OUT"],
     lambda b, t, m: main(["sample", *MODEL, "--solver", str(b / "ours.json"), "--num", "8",
                           "--out", str(t / "out")]), "num was 8, now 16"),
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


# ----------------------------------------------------------------------------- user files survive
USER_FILES = {"manifest.json": b'{"mine": 1}', "shard_notes.json": b"notes", "notes.txt": b"n",
              "samples_final.npy": b"final", "samples_index.json": b"[]",
              "results_nfe10.json": b"{}", "paper_nfe8_table.json": b"{}", "report.md": b"# mine",
              "report.json": b"{}", "error_maps.png": b"png", "train_report.json": b"{}",
              "plan.json": b'{"mine": true}', "run.json": b'{"mine": true}'}


def _user_folder(path, names):
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).write_bytes(USER_FILES[name])
    return {name: USER_FILES[name] for name in names}


def _intact(path, files):
    for name, data in files.items():
        assert (path / name).read_bytes() == data, name


def _out_variants(tmp_path, name):
    """The folder itself, and a symbolic link to it."""
    real = tmp_path / name
    link = tmp_path / f"{name}_link"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    return real, link


def _refused(argv, capsys, *fragments):
    capsys.readouterr()
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("via_link", [False, True], ids=["folder", "symlink"])
def test_gt_never_replaces_or_deletes_user_files(tmp_path, capsys, via_link):
    real, link = _out_variants(tmp_path, "d")
    out = str(link if via_link else real)
    files = _user_folder(real, ["manifest.json", "shard_notes.json", "notes.txt"])
    gt = ["gt", *MODEL, "--num", "8", "--batch-size", "4", "--out", out]
    for extra in ([], ["--overwrite"]):       # the user's manifest.json: refused, never replaced
        _refused(gt + extra, capsys, "manifest.json was not written by this GT set")
        _intact(real, files)
        assert not (real / "run.json").exists() and not list(real.glob("shard_0*"))
    (real / "manifest.json").unlink()
    del files["manifest.json"]
    assert main(gt) == 0                        # beside the user's files: fine
    assert bf.load_trajectories(out).x1.shape == (8, 64)
    err = _refused(gt[:-2] + ["--seed", "1", "--out", out, "--overwrite"], capsys,
                   "holds 2 file(s) bespoke_fast did not write (notes.txt, shard_notes.json)",
                   "pick an empty or new --out")
    _intact(real, files)
    assert bf.load_trajectories(out).x1.shape == (8, 64)      # the old run is untouched too
    for name in files:
        (real / name).unlink()
    assert main(gt[:-2] + ["--seed", "1", "--out", out, "--overwrite"]) == 0
    assert sorted(p.name for p in real.iterdir()) == ["manifest.json", "run.json",
                                                       "shard_00000.json", "shard_00000.safetensors",
                                                       "shard_00001.json", "shard_00001.safetensors"]


@pytest.mark.parametrize("via_link", [False, True], ids=["folder", "symlink"])
def test_sample_never_replaces_or_deletes_user_files(base, tmp_path, capsys, via_link):
    real, link = _out_variants(tmp_path, "s")
    out = str(link if via_link else real)
    files = _user_folder(real, ["samples_final.npy", "samples_index.json"])
    sample = ["sample", *MODEL, "--solver", str(base / "ours.json"), "--num", "6", "--out", out]
    assert main(sample + ["--overwrite"]) == 0      # nothing of ours to replace: a new run
    _intact(real, files)
    assert bf.sampling.load_samples(out).shape == (6, 64)
    _refused(sample[:-4] + ["--num", "5", "--out", out, "--overwrite"], capsys,
             "(samples_final.npy, samples_index.json)")
    _intact(real, files)
    _refused(sample[:-4] + ["--num", "5", "--out", out], capsys, "num was 6, now 5")
    _intact(real, files)
    assert bf.sampling.load_samples(out).shape == (6, 64)


def test_sample_into_the_current_folder_and_home_is_safe(base, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    files = _user_folder(home, ["manifest.json", "notes.txt"])
    monkeypatch.chdir(home)
    monkeypatch.setenv("HOME", str(home))
    for out in (".", "~"):
        argv = ["sample", *MODEL, "--solver", str(base / "ours.json"), "--num", "4", "--out", out]
        _refused(argv + ["--overwrite"], capsys, "manifest.json was not written by this sample")
        _intact(home, files)
    assert sorted(p.name for p in home.iterdir()) == ["manifest.json", "notes.txt"]


def test_a_foreign_run_json_is_refused_never_parsed(tmp_path, capsys):
    files = _user_folder(tmp_path / "d", ["run.json"])
    for extra in ([], ["--overwrite"]):
        _refused(["gt", *MODEL, "--num", "4", "--out", str(tmp_path / "d"), *extra], capsys,
                 "run.json was not written by bespoke_fast")
        _intact(tmp_path / "d", files)


FIT = dict(nfe=4, num_train=40, num_heldout=16, iters=2, finetune_iters=0, plots=False,
           progress=False, log=lambda *a: None, train_kwargs={"max_iters": 2, "polish_iters": 0})


@pytest.mark.slow
def test_fit_never_replaces_or_deletes_user_files(tmp_path):
    from bespoke_fast import OutputError
    real, link = _out_variants(tmp_path, "f")
    for names in (["report.md"], ["report.json"], ["error_maps.png"], ["train_report.json"],
                  ["plan.json"]):
        files = _user_folder(real, names)
        for overwrite in (False, True):     # refused before any work, never parsed
            with pytest.raises(OutputError, match=f"{names[0]} was not written by this fit"):
                bf.fit("gmm-64", out=link, overwrite=overwrite, **FIT)
            _intact(real, files)
            assert sorted(p.name for p in real.iterdir()) == names
        (real / names[0]).unlink()
    files = _user_folder(real, ["results_nfe10.json", "paper_nfe8_table.json"])
    first = bf.fit("gmm-64", out=link, **FIT)
    _intact(real, files)
    with pytest.raises(OutputError, match=r"holds 2 file\(s\) bespoke_fast did not write "
                                          r"\(paper_nfe8_table.json, results_nfe10.json\)"):
        bf.fit("gmm-64", out=link, overwrite=True, **dict(FIT, nfe=6))
    _intact(real, files)
    assert first.solver_path.is_file() and (real / "report.json").is_file()
    for name in files:
        (real / name).unlink()
    again = bf.fit("gmm-64", out=link, overwrite=True, **dict(FIT, nfe=6))
    assert again.solver.nfe == 6 and not first.solver_path.exists()


def test_train_never_replaces_a_user_file(base, tmp_path, capsys):
    mine = tmp_path / "notes.json"
    mine.write_bytes(b'{"mine": 1}')
    train = ["train", *MODEL, "--gt", str(base / "gt"), "--nfe", "4", "--iters", "1",
             "--finetune-iters", "0", "--polish-iters", "0", "--val", "16"]
    _refused(train + ["--out", str(mine)], capsys, "is not a bespoke_fast solver file; refusing")
    assert mine.read_bytes() == b'{"mine": 1}'
    _refused(train + ["--out", str(tmp_path / "outdir") + "/"], capsys, "is a directory (a folder name); give the solver")
    assert not (tmp_path / "outdir").exists()
    link = tmp_path / "dangling.json"
    link.symlink_to(tmp_path / "nowhere" / "x.json")
    _refused(train + ["--out", str(link)], capsys, "which does not exist")
    solver = tmp_path / "s.json"
    assert main(train + ["--out", str(solver), "--quiet"]) == 0
    assert main(train + ["--out", str(solver), "--quiet"]) == 0     # a solver file: replaced


def test_gt_into_a_dangling_symlink_says_so(tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing")
    _refused(["gt", *MODEL, "--num", "4", "--out", str(link)], capsys,
             "is a symbolic link to", "which does not exist")


def test_output_files_honour_the_umask(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        assert main(["gt", *MODEL, "--num", "4", "--out", str(tmp_path / "g")]) == 0
    finally:
        os.umask(old)
    for f in (tmp_path / "g").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_a_250_character_train_out_name_is_written(base, tmp_path):
    out = tmp_path / ("s" * 245 + ".json")
    assert main(["train", *MODEL, "--gt", str(base / "gt"), "--nfe", "4", "--iters", "1",
                 "--finetune-iters", "0", "--polish-iters", "0", "--val", "16", "--quiet",
                 "--out", str(out)]) == 0
    assert bf.load_solver(out).nfe == 4


# ----------------------------------------------------------------------------- no silent NaN
def test_eval_refuses_nan_rows_unless_allowed(tmp_path, capsys):
    assert main(["gt", *LINEAR, "--num", "8", "--out", str(tmp_path / "g")]) == 0
    argv = ["eval", "--model", "tests.bad_models:nan_late", "--device", "cpu", "--quiet", "--gt",
            str(tmp_path / "g"), "--allow-model-mismatch", "euler@4", "midpoint@4"]
    _refused(argv, capsys, "euler@4 produced NaN/Inf for 8 of 8 samples (the first: GT "
                           "trajectory 0)", "--allow-nonfinite")
    capsys.readouterr()
    assert main(argv + ["--allow-nonfinite"]) == 0
    out = capsys.readouterr().out
    assert out.count("NaN/Inf in 8 samples") == 2 and "mode flips: '-'" in out


def test_eval_of_a_finite_model_has_no_nonfinite_rows(base):
    r = bf.evaluate(load("gmm-64").model, "midpoint@4", bf.load_trajectories(base / "gt"))
    assert r["nonfinite"] == 0 and "first_nonfinite" not in r
    with pytest.raises(bf.InvalidTypeError, match="trajectories must be a GT set"):
        bf.evaluate(load("gmm-64").model, "midpoint@4", None)


@pytest.mark.parametrize("make,message", [
    (lambda: bf.cfg(lambda x, t, **k: x, float("nan")), "cfg: scale must be a finite number"),
    (lambda: bf.cfg(lambda x, t, **k: x, float("inf")), "cfg: scale must be a finite number"),
    (lambda: bf.cfg(lambda x, t, **k: x, 2.0, null=float("nan")), "cfg: null must be a finite"),
    (lambda: bf.as_velocity(lambda x, t: x, time_scale=float("nan")),
     "time_scale must be a positive finite number"),
    (lambda: bf.as_velocity(lambda x, t: x, time_scale=0), "time_scale must be a positive"),
    (lambda: bf.as_velocity(lambda x, t: x, eps=float("nan")), "eps must be in [0, 0.5)"),
])
def test_cfg_and_as_velocity_validate_their_scalars(make, message):
    with pytest.raises(BespokeFastError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        make()


# ----------------------------------------------------------------------------- user models
RAISES = ["--model", "tests.bad_models:raises_late", "--device", "cpu", "--quiet"]


def test_a_model_that_raises_is_one_line_naming_the_call(base, tmp_path, capsys):
    _refused(["gt", *RAISES, "--num", "8", "--batch-size", "4", "--out", str(tmp_path / "g")],
             capsys, "the model raised RuntimeError at GT samples 0..3", "t=0.",
             "input shape (4, 4): boom: the user's bug; --debug shows the traceback")
    solver = tmp_path / "s.json"
    s = bf.BespokeSolver("rk2", 2)
    s.save(solver)
    _refused(["sample", *RAISES, "--solver", str(solver), "--num", "6", "--batch-size", "4",
              "--allow-model-mismatch", "--out", str(tmp_path / "s")], capsys,
             "the model raised RuntimeError at samples 0..3", "input shape (4, 4): boom")
    _refused(["fit", *RAISES, "--nfe", "4", "--num-train", "16", "--num-heldout", "8", "--out",
              str(tmp_path / "f")], capsys,
             "the model raised RuntimeError on the timing probe (one GT trajectory, before any "
             "work): boom")
    with pytest.raises(RuntimeError, match="boom"):       # --debug: the model's own traceback
        main(["gt", *RAISES, "--num", "8", "--out", str(tmp_path / "g2"), "--debug"])


@pytest.mark.parametrize("command", ["gt", "sample", "doctor", "fit"])
def test_a_factory_whose_shape_does_not_fit_its_network_fails_on_the_probe(base, tmp_path,
                                                                           capsys, command):
    argv = {"gt": ["--num", "8", "--out", str(tmp_path / "o")],
            "sample": ["--solver", str(base / "ours.json"), "--num", "4", "--out",
                       str(tmp_path / "o"), "--allow-model-mismatch"],
            "doctor": [], "fit": ["--plan", "--out", str(tmp_path / "o")]}[command]
    _refused([command, "--model", "tests.bad_models:mismatched", "--device", "cpu", *argv],
             capsys, "the model raised RuntimeError on the probe call (batch 2, before any work)",
             "input shape (2, 4)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,message", [
    (["train", "--nfe", "200000"], "nfe 200000: 100000 steps of 2 NFE, over the limit of 1024"),
    (["train", "--solver", "bns", "--nfe", "5000"], "over the limit of 1024 steps"),
    (["fit", "--nfe", "4096", "--plan"], "nfe 4096: 2048 steps of 2 NFE, over the limit"),
])
def test_the_step_limit_of_solver_files_applies_to_nfe(base, tmp_path, capsys, argv, message):
    extra = (["--gt", str(base / "gt")] if argv[0] == "train" else []) + [
        "--out", str(tmp_path / ("o.json" if argv[0] == "train" else "o"))]
    _refused([argv[0], *MODEL, *argv[1:], *extra], capsys, message)


def test_sample_backend_triton_on_cpu_is_one_line(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("bespoke_fast.ops.backend.triton_available", lambda: True)
    _refused(["sample", *MODEL, "--solver", str(base / "ours.json"), "--num", "4", "--backend",
              "triton", "--out", str(tmp_path / "o")], capsys,
             "--backend triton needs a CUDA device", "use --backend reference")


# ----------------------------------------------------------------------------- frictions
FACTORY_FILE = """import torch
from bespoke_fast.zoo import ZooModel


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.tensor(1.0))

    def forward(self, x, t):
        return -self.k * x


def factory():
    return ZooModel("mine", Net(), (4,))
"""


def test_model_factory_from_the_current_folder_and_from_a_file_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodel_cwd_26.py").write_text(FACTORY_FILE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other_model_26.py").write_text(FACTORY_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "unrelated"))    # sys.path without the cwd
    import sys
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for spec in ("mymodel_cwd_26:factory", "./mymodel_cwd_26.py:factory",
                 "sub/other_model_26.py:factory", str(tmp_path / "sub" / "other_model_26.py") + ":factory"):
        out = tmp_path / f"g{abs(hash(spec))}"
        assert main(["gt", "--model", spec, "--device", "cpu", "--quiet", "--num", "4", "--out",
                     str(out)]) == 0, capsys.readouterr().err
        assert bf.load_trajectories(out).x1.shape == (4, 4)
    _refused(["gt", "--model", "nowhere/missing.py:factory", "--num", "4", "--out",
              str(tmp_path / "x")], capsys, "cannot import model factory", "no such file")


def test_sample_resumes_with_another_batch_size(base, tmp_path):
    from bespoke_fast.sampling import load_samples, sample_to_dir
    zm = load("gmm-64")
    solver = bf.load_solver(base / "ours.json")
    kw = dict(progress=False, model_name="gmm-64")
    full = sample_to_dir(zm.model, solver, zm.shape, 12, tmp_path / "full", batch_size=4, **kw)
    first = sample_to_dir(zm.model, solver, zm.shape, 12, tmp_path / "s", batch_size=4, **kw)
    assert first["computed_shards"] == [0] and full["shard_size"] == 12
    again = sample_to_dir(zm.model, solver, zm.shape, 12, tmp_path / "s", batch_size=2, **kw)
    assert again["computed_shards"] == [] and again["shard_size"] == 12
    part = sample_to_dir(zm.model, solver, zm.shape, 12, tmp_path / "p", batch_size=4,
                         shard_size=4, **kw)
    for name in ("samples_00002.npy", "samples_00002.json", "manifest.json"):
        (tmp_path / "p" / name).unlink()                 # as if killed before the last shard
    resumed = sample_to_dir(zm.model, solver, zm.shape, 12, tmp_path / "p", batch_size=3, **kw)
    assert part["computed_shards"] == [0, 1, 2] and resumed["computed_shards"] == [2]
    np.testing.assert_allclose(load_samples(tmp_path / "p"), load_samples(tmp_path / "full"),
                               rtol=1e-6, atol=1e-6)


def test_help_lists_only_what_each_command_accepts(capsys):
    for command, pipelines in (("gt", True), ("train", True), ("eval", True), ("sample", False),
                               ("doctor", False), ("fit", False)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert ("diffusers:LOCAL_PIPELINE_DIR" in text) == pipelines, command
        assert "path/to/file.py:factory" in text


@pytest.mark.slow
def test_a_damaged_plan_or_training_report_is_named_and_overwrite_recovers(tmp_path):
    out = tmp_path / "f"
    bf.fit("gmm-64", out=out, **FIT)
    for name, message in (("plan.json", "plan.json: not a fit plan: not JSON"),
                          ("train_report.json", "train_report.json: not a training report: not JSON")):
        text = (out / name).read_text()
        (out / name).write_text(text[:40])
        with pytest.raises(bf.InvalidFileError, match=f"{message}.*--overwrite"):
            bf.fit("gmm-64", out=out, **FIT)
        again = bf.fit("gmm-64", out=out, overwrite=True, **FIT)
        assert again.solver.nfe == 4 and json.loads((out / name).read_text())


def test_a_scaled_down_fit_plan_keeps_the_selection_share(tmp_path):
    plan = bf.fit("gmm-64", out=tmp_path / "f", plan_only=True, max_disk=8e6, log=lambda *a: None)
    t = plan["trajectories"]
    assert t["train"] < 1280 and t["model_selection"] <= t["train"] // 5
    assert t["train"] - t["model_selection"] >= 64 and not (tmp_path / "f").exists()


def test_fast_sampler_check_finite_tells_x0_extras_and_model_apart():
    from tests.bad_models import nan_late
    solver = bf.BespokeSolver("rk2", 2)
    good = bf.FastSampler(load("gmm-64").model, solver, (64,), 4, check_finite=True)
    x0 = torch.randn(4, 64)
    assert torch.isfinite(good(x0)).all()
    x0[2, 5] = float("nan")
    with pytest.raises(bf.NonFiniteError, match="x0 row 2 is NaN/Inf: the input noise"):
        good(x0)
    with pytest.raises(bf.NonFiniteError, match="the extra 'w' holds NaN/Inf"):
        good(torch.randn(4, 64), w=torch.tensor([float("nan")]))
    bad = bf.FastSampler(nan_late().model, solver, (4,), 4, check_finite=True)
    with pytest.raises(bf.NonFiniteError, match="sample 0 of the batch is NaN/Inf although x0 "
                                                "and the extras are finite: the model"):
        bad(torch.randn(4, 4))
    quiet = bf.FastSampler(nan_late().model, solver, (4,), 4)        # default: no host sync
    assert not torch.isfinite(quiet(torch.randn(4, 4))).any()
    with pytest.raises(bf.NonFiniteError, match="holds NaN/Inf already"):
        solver.sample(load("gmm-64").model, x0, check_finite=True)


def test_bespoke_train_shrinks_its_default_hold_out_on_a_small_gt_set(tmp_path, capsys):
    assert main(["gt", *LINEAR, "--num", "64", "--out", str(tmp_path / "g")]) == 0
    out = tmp_path / "s.json"
    capsys.readouterr()
    assert main(["train", "--model", "tests.bad_models:linear", "--device", "cpu", "--gt",
                 str(tmp_path / "g"), "--nfe", "4", "--iters", "1", "--finetune-iters", "0",
                 "--polish-iters", "0", "--init", "identity", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "holding out the last 12 (a fifth) for validation and training on 52 (val= / --val sets it)" in err
    assert json.loads(out.read_text())["training"]["num_val"] == 12
    # the same from Python: bf.train shrinks its default hold-out and says so in the report
    import bespoke_fast as bf
    from tests.bad_models import linear
    _, report = bf.train(linear().model, bf.load_trajectories(tmp_path / "g"), n_steps=2, iters=1,
                         polish_iters=0, init="identity", progress=False)
    assert report["config"]["num_val"] == 12 and "holding out the last 12" in report["split_note"]


def test_training_bars_show_the_budget_not_an_eta_from_the_iteration_cap(base, tmp_path, capsys):
    assert main(["train", "--model", "gmm-64", "--device", "cpu", "--gt", str(base / "gt"),
                 "--nfe", "4", "--iters", "3", "--finetune-iters", "0", "--polish-iters", "0",
                 "--val", "16", "--init", "identity", "--budget-seconds", "100",
                 "--budget-evals", "0", "--out", str(tmp_path / "s.json")]) == 0
    err = capsys.readouterr().err
    assert "of a 100 s budget" in err and "<" not in err.split("fit bespoke", 1)[1], err
    # under an evaluation budget (the default) the bar counts evaluations to it: its ETA is a
    # true upper bound
    assert main(["train", "--model", "gmm-64", "--device", "cpu", "--gt", str(base / "gt"),
                 "--nfe", "4", "--val", "16", "--budget-evals", "20000",
                 "--out", str(tmp_path / "s.json")]) == 0
    err = capsys.readouterr().err
    assert "/20.0k" in err and "evals/s" in err, err
