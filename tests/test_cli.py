"""The bespoke-fast command line: help, the gt -> train -> eval flow, clear errors."""
import json
import subprocess
import sys

import pytest

import bespoke_fast as bf
from bespoke_fast.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"demo", "gt", "train", "eval", "sample"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: bespoke-fast " + name in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "bespoke_fast.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "gt" in out and "train" in out and "eval" in out


@pytest.fixture(scope="module")
def gt_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "gt"
    assert main(["gt", "--model", "gmm-64", "--num", "96", "--out", str(out), "--batch-size", "48",
                 "--quiet", "--device", "cpu"]) == 0
    return out


def test_gt_train_eval_flow(gt_dir, tmp_path, capsys):
    capsys.readouterr()
    solver = tmp_path / "s.json"
    assert main(["train", "--model", "gmm-64", "--gt", str(gt_dir), "--nfe", "6", "--iters", "30",
                 "--finetune-iters", "10", "--val", "32", "--init", "auto", "--out", str(solver),
                 "--quiet", "--json", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nfe"] == 6 and solver.is_file()
    assert summary["start"]["chosen"] in [c["start"] for c in summary["start"]["candidates"]]
    assert main(["eval", "--model", "gmm-64", "--gt", str(gt_dir), "--json", "--device", "cpu",
                 str(solver), "midpoint@6", "euler@6"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["nfe"] for r in results] == [6, 6, 6]
    assert set(results[0]) >= {"solver", "nfe", "rmse", "psnr"}
    by_name = {r["solver"]: r["psnr"] for r in results}
    assert by_name["s.json"] > by_name["euler@6"]
    # a BNS fit started from that bespoke solver file: its first validation is the same solver
    bns = tmp_path / "bns.json"
    assert main(["train", "--model", "gmm-64", "--gt", str(gt_dir), "--solver", "bns", "--nfe",
                 "6", "--init", str(solver), "--iters", "3", "--val", "32", "--out", str(bns),
                 "--quiet", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 6
    meta = bf.load_solver(bns).meta["training"]
    assert meta["init"] == "bespoke" and meta["init_fingerprint"]


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "gmm-64", "--gt", "/nonexistent/gt", "midpoint@4"], "not a GT directory"),
    (["eval", "--model", "digits-exact", "--gt", "GT", "midpoint@4"], "shape"),
    (["eval", "--model", "gmm-64", "--gt", "GT", "midpoint@5"], "NFE must be a positive multiple of 2"),
    (["eval", "--model", "gmm-64", "--gt", "GT", "rk9@4"], "unknown method 'rk9'"),
    (["eval", "--model", "gmm-64", "--gt", "GT", "nonsense"], "neither a solver file nor"),
    (["eval", "--model", "no-such-model", "--gt", "GT", "midpoint@4"], "unknown model 'no-such-model'"),
    (["train", "--model", "gmm-64", "--gt", "GT", "--nfe", "7", "--out", "x.json"], "multiple of 2"),
])
def test_clear_errors(gt_dir, capsys, argv, message):
    argv = [str(gt_dir) if a == "GT" else a for a in argv]
    assert main(argv + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_bespoke_start_and_polish_options(gt_dir, tmp_path, capsys):
    base = ["train", "--model", "gmm-64", "--gt", str(gt_dir), "--nfe", "4", "--iters", "5",
            "--finetune-iters", "5", "--val", "32", "--device", "cpu", "--quiet"]
    capsys.readouterr()
    assert main(base + ["--init", "auto", "--out", str(tmp_path / "auto.json")]) == 0
    out = capsys.readouterr().out
    assert "start: " in out and "6 starts screened" in out
    assert "model evaluations: " in out and "budget 200,000" in out
    assert main(base + ["--init", "identity", "--polish-iters", "0", "--json",
                        "--out", str(tmp_path / "id.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["start"] is None and summary["iterations"] == 10
    ev = summary["evaluations"]     # exact: 5 + 5 iterations of 128 trajectories x 4 rows each way
    assert ev["bound"]["forward"] == ev["finetune"]["backward"] == 5 * 128 * 4
    assert ev["total"]["forward_equivalent"] == ev["total"]["forward"] + 2 * ev["total"]["backward"]
    t = bf.BespokeSolver.load(tmp_path / "id.json").meta["training"]
    assert t["init"] == "identity" and t["polish_iters"] == 0
