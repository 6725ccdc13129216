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


def _option_helps():
    """{option string: {command: help}} over every sub-command of ``build_parser()``, and the
    (command, action) pairs."""
    import argparse
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps, actions = {}, []
    for command, p in sub.choices.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            actions.append((command, a))
            for o in a.option_strings:
                helps.setdefault(o, {})[command] = a.help or ""
    assert len(sub.choices) >= 7 and actions, "the walk saw no sub-command"
    return helps, actions


def test_every_option_has_a_help_that_states_its_default():
    """Every option of every command: a help text, and in it its default (``%(default)s`` or
    words, e.g. "default: the trainer's"); required options and positionals have none to state."""
    _, actions = _option_helps()
    bad = [f"{c} {a.option_strings or a.dest}: {a.help!r}" for c, a in actions
           if not (a.help or "").strip()
           or (a.option_strings and not a.required and "default" not in a.help.lower())]
    assert not bad, "options without a help stating the default:\n" + "\n".join(bad)


# Flags whose meaning differs between commands on purpose, with the reason.
DIFFERENT_MEANING = {
    "--model": "diffusers:DIR is accepted by gt/train/eval only, and the help says so there",
    "--out": "a directory for demo/fit/gt/sample, the solver file for train",
    "--solver": "a solver kind to fit for fit/train, a solver file for sample/doctor",
    "--seed": "the noise seed of GT or samples, the training seed of fit, the batch order of train",
    "--num": "GT trajectories for gt, samples for sample",
    "--batch-size": "a GT shard (gt), a sampler call (sample), a checked batch (doctor), a "
                    "training batch (fit, train: the same trainer flag)",
    "--overwrite": "each command names what it replaces (a fit, a GT set, samples)",
    "--model-dtype": "train: the trainer's option (training); sample/doctor: sampling",
    "--num-train": "fit: GT trajectories; train: the bns trainer's training pairs",
    "--budget-seconds": "demo: its planned total; fit: the job's ETA; train: the trainer's cap",
    "--budget-evals": "fit: GT and training together; train: the trainer alone",
}


def test_a_flag_shared_by_commands_has_one_help():
    """A flag in several commands means the same there: one help text (built once in
    ``cli/common.py``), unless listed in DIFFERENT_MEANING with its reason."""
    helps, _ = _option_helps()
    shared = {o: per for o, per in helps.items() if len(per) > 1}
    differ = {o for o, per in shared.items() if len(set(per.values())) > 1}
    assert {"--device", "--json", "--nfe", "--model-dtype"} <= set(shared)
    bad = sorted(differ - set(DIFFERENT_MEANING))
    assert not bad, f"flags with different help texts across commands: {bad}"
    stale = sorted(set(DIFFERENT_MEANING) - differ)
    assert not stale, f"DIFFERENT_MEANING lists flags that now agree: {stale}"


def test_fit_and_demo_pass_the_trainer_flags_as_train_does(monkeypatch, tmp_path):
    """fit's and demo's --iters / --micro-batch / --autocast / ... are train's flags: the same
    parsing (dtype names, 0 for None), passed on to the job; unset ones are left out."""
    import torch
    import bespoke_fast.cli.demo as demo_cmd
    import bespoke_fast.cli.fit as fit_cmd
    seen = {}
    monkeypatch.setattr(fit_cmd, "fit", lambda *a, **kw: seen.setdefault("fit", kw) and {})
    monkeypatch.setattr(demo_cmd, "run_demo", lambda *a, **kw: seen.setdefault("demo", kw) and {})
    main(["fit", "--model", "gmm-64", "--out", str(tmp_path / "f"), "--plan", "--iters", "7",
          "--micro-batch", "0", "--autocast", "bfloat16", "--activation-checkpointing"])
    kw = seen["fit"]
    assert kw["iters"] == 7 and kw["autocast"] is torch.bfloat16
    assert kw["activation_checkpointing"] is True and kw["micro_batch"] is None
    assert "finetune_iters" not in kw and "batch_size" not in kw
    main(["demo", "--out", str(tmp_path / "d"), "--finetune-iters", "3"])
    assert seen["demo"]["finetune_iters"] == 3 and "iters" not in seen["demo"]
