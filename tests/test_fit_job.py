"""`bespoke-fast fit` / `bf.fit`: the whole job on every bundled model and on a module:factory
model, held-out evaluation only, the plan and its limits, resuming after an interruption."""
import json
import sys
import textwrap

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast.cli import main
from bespoke_fast.solvers.files import load_solver

SMALL = dict(nfe=4, num_train=40, num_heldout=16, iters=3, finetune_iters=2, batch_size=8,
             progress=False)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("model", [n for n in bf.zoo.NAMES if n not in bf.zoo.IMAGE_NAMES])
# (the image model photo-32: a smaller fit in tests/test_zoo_photo.py; this size takes minutes)
def test_fit_runs_end_to_end_on_every_bundled_model(model, tmp_path):
    lines = []
    r = bf.fit(model, out=tmp_path / "fit", plots=model == "digits-fmot", log=lines.append, **SMALL)
    assert lines[0].startswith(f"plan: bespoke solver at NFE 4 for {model}")
    assert any("ETA: about" in x for x in lines) and any("disk:" in x for x in lines)
    rep = r.report
    assert [x["solver"] for x in rep["heldout"]][:2] == ["bespoke-rk2@4", "euler@4"]
    assert all(x["n"] == 16 for x in rep["heldout"])              # the held-out set only
    g = rep["gt"]
    assert (g["train"]["seed"], g["heldout"]["seed"]) == (0, 1)
    assert (g["train"]["num"], g["heldout"]["num"]) == (40, 16)
    assert load_solver(r.solver_path).nfe == 4
    assert json.loads((tmp_path / "fit" / "report.json").read_text())["heldout"] == rep["heldout"]
    md = (tmp_path / "fit" / "report.md").read_text()
    assert "| bespoke-rk2@4 | 4 |" in md
    lo, hi = rep["heldout"][0]["psnr_ci"]                          # intervals, printed and stored
    assert lo <= rep["heldout"][0]["psnr"] <= hi and f"[{lo:.2f}, {hi:.2f}]" in md
    assert rep["training"]["stop_reason"] and f"Training stopped: {rep['training']['stop_reason']}" in md
    assert any(x.startswith("training stopped: ") for x in lines)
    if model == "digits-fmot":
        for name in ("error_maps", "transform"):
            assert (tmp_path / "fit" / f"{name}.png").stat().st_size > 5000


def test_fit_a_module_factory_model_from_the_cli_with_a_data_range_notice(tmp_path, capsys,
                                                                         monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch

        class Field(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a = torch.nn.Parameter(torch.tensor(0.7))

            def forward(self, x, t):
                return (self.a * torch.tanh(x) - x) * (1 + t[:, None])

        def make():
            return Field(), (6,)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "fit"
    argv = ["fit", "--model", "my_models:make", "--nfe", "4", "--out", str(out), "--num-train", "40",
            "--num-heldout", "16", "--iters", "3", "--finetune-iters", "2", "--batch-size", "8",
            "--device", "cpu", "--quiet", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "assuming 2.0" in captured.err and captured.err.count("note:") == 1
    assert report["model"] == "my_models:make" and report["heldout"][0]["n"] == 16
    assert "plan: bespoke solver" in captured.err                  # --json: the plan on stderr
    sys.modules.pop("my_models", None)


def test_fit_bns_starts_from_a_bespoke_solver_fitted_on_the_same_gt(tmp_path):
    lines = []
    r = bf.fit("gmm-64", solver="bns", out=tmp_path / "bns", nfe=4, num_train=40, num_heldout=16,
               iters=2, plots=False, progress=False, log=lines.append,
               train_kwargs={"max_iters": 6})
    assert r.report["heldout"][0]["solver"] == "bns@4"
    assert r.report["gt"]["train"]["knots"] > 2                   # the Bespoke start needs knots
    stage = r.report["training"]["bespoke_stage"]
    assert stage["base"] == "rk2" and stage["num_train"] == 40 - r.report["settings"]["num_select"]
    assert any("BNS started from a Bespoke RK2 solver" in line for line in lines)


def test_overwrite_replaces_a_bns_fit_and_its_bespoke_start_checkpoint(tmp_path):
    from bespoke_fast._checks import MismatchError
    kw = dict(solver="bns", out=tmp_path / "f", num_train=40, num_heldout=16, iters=2,
              plots=False, progress=False, log=lambda *a: None, train_kwargs={"max_iters": 4})
    bf.fit("gmm-64", nfe=4, **kw)
    assert (tmp_path / "f" / "train.ckpt.bespoke").is_file()
    with pytest.raises(MismatchError, match="a fit made with other arguments: settings.nfe was 4, now 6"):
        bf.fit("gmm-64", nfe=6, **kw)
    r = bf.fit("gmm-64", nfe=6, overwrite=True, **kw)       # the old checkpoints go too
    assert r.solver.nfe == 6 and r.report["training"]["bespoke_stage"]["base"] == "rk2"


def test_an_interrupted_fit_resumes_to_the_uninterrupted_result(tmp_path):
    kw = dict(SMALL, iters=4, finetune_iters=2, plots=False, log=lambda *a: None)
    ref = bf.fit("gmm-64", out=tmp_path / "ref", **kw).solver

    def stop(iteration, record):
        if iteration == 3:
            raise KeyboardInterrupt

    out = tmp_path / "fit"
    with pytest.raises(KeyboardInterrupt):
        bf.fit("gmm-64", out=out, train_kwargs={"val_every": 1, "checkpoint_every": 1,
                                                 "callback": stop}, **kw)
    assert (out / "train.ckpt").is_file() and not (out / "report.json").exists()
    shards = {p: p.stat().st_mtime_ns for p in out.glob("gt_*/shard_*.safetensors")}
    lines = []
    again = bf.fit("gmm-64", out=out, train_kwargs={"val_every": 1, "checkpoint_every": 1},
                   **dict(kw, log=lines.append))
    assert any("resuming" in x for x in lines)
    assert {p: p.stat().st_mtime_ns for p in shards} == shards   # GT kept, not recomputed
    for a, b in zip(ref.parameters(), again.solver.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="holds a fit made with other arguments: settings.num_heldout was 16, now 20"):
        bf.fit("gmm-64", out=out, **dict(kw, num_heldout=20))


def test_the_plan_scales_down_or_refuses_under_disk_and_time_limits(tmp_path):
    lines = []
    full = bf.fit("gmm-64", out=tmp_path / "p", plan_only=True, log=lines.append)
    assert full["trajectories"]["train"] == 160 and full["trajectories"]["heldout"] == 1024
    ev = full["model_evaluations"]
    # the default budget covers the training GT and the trainer, which gets what the GT leaves
    assert ev["budget"] == 250_000 and ev["fit"] == ev["gt"] + ev["train"] <= 250_000
    assert ev["gt"] >= 160 * full["probe"]["gt_evals_per_trajectory"] and full["eta_seconds"] > 0
    assert any(line.startswith("  memory: about") for line in lines)
    with pytest.raises(ValueError, match="the training GT alone needs about"):
        bf.fit("gmm-64", out=tmp_path / "p", plan_only=True, num_train=2000, log=lambda *a: None)
    assert not (tmp_path / "p").exists()                          # a plan writes nothing
    lines.clear()
    half = bf.fit("gmm-64", out=tmp_path / "p", plan_only=True, max_disk=full["disk_bytes"] / 2,
                  log=lines.append)
    assert half["disk_bytes"] <= full["disk_bytes"] / 2
    assert half["trajectories"]["train"] < 160 and lines[0].startswith("scaled down to fit max disk")
    with pytest.raises(ValueError, match="refusing to start: .* exceeds max disk"):
        bf.fit("gmm-64", out=tmp_path / "p", plan_only=True, max_disk=1000, log=lambda *a: None)
    with pytest.raises(ValueError, match="refusing to start: .* exceeds budget"):
        bf.fit("gmm-64", out=tmp_path / "p", plan_only=True, budget_seconds=1e-6, log=lambda *a: None)
    with pytest.raises(ValueError, match="heldout_seed must differ"):
        bf.fit("gmm-64", out=tmp_path / "p", heldout_seed=0)
    with pytest.raises(ValueError, match="NFE must be a positive multiple of 2"):
        bf.fit("gmm-64", out=tmp_path / "p", nfe=5)


def test_fit_cli_plan_and_errors(tmp_path, capsys):
    assert main(["fit", "--model", "gmm-64", "--out", str(tmp_path / "x"), "--plan",
                 "--max-disk", "1KB", "--device", "cpu"]) == 2
    assert "refusing to start" in capsys.readouterr().err
    assert main(["fit", "--model", "gmm-64", "--out", str(tmp_path / "x"), "--plan", "--json",
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["trajectories"]["train"] == 160
    assert main(["fit", "--model", "gmm-64", "--out", str(tmp_path / "x"), "--plan", "--json",
                 "--device", "cpu", "--budget-evals", "400000"]) == 0
    assert json.loads(capsys.readouterr().out)["model_evaluations"]["budget"] == 400_000


@pytest.mark.slow
def test_fit_killed_twice_resumes_to_the_uninterrupted_solver(tmp_path):
    """SIGKILL the CLI as soon as its plan is written (probe or GT) and again once the held-out GT
    is done (training), then rerun: the solver equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import time
    settings = dict(nfe=4, num_train=96, num_heldout=16, iters=55, finetune_iters=5, batch_size=8)
    ref = bf.fit("gmm-64", out=tmp_path / "ref", plots=False, progress=False, log=lambda *a: None,
                 device="cpu", **settings)
    out = tmp_path / "fit"
    argv = [sys.executable, "-m", "bespoke_fast.cli", "fit", "--model", "gmm-64", "--out", str(out),
            "--device", "cpu", "--quiet"]
    for k, v in settings.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for marker in (out / "plan.json", out / "gt_heldout" / "manifest.json"):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not marker.exists():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "report.json").exists()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    resumed = load_solver(next(out.glob("*_nfe4.json")))
    assert all(torch.equal(a, b) for a, b in zip(ref.solver.parameters(), resumed.parameters()))
    assert json.loads((out / "report.json").read_text())["heldout"] == ref.report["heldout"]


def test_plan_eta_counts_the_trainers_time_budget():
    from bespoke_fast.fitting.job import make_plan, plan_lines
    settings = dict(nfe=10, knots_t=[0.0, 0.5, 1.0], storage_dtype="float32", num_train=1280,
                    num_heldout=1024, shape=[1, 8, 8], solver="bespoke", iters=200,
                    finetune_iters=800, batch_size=128, val_every=10, num_select=256,
                    adaptive_knots=False, seed=0, heldout_seed=1, model="m")
    probe = {"seconds_per_eval": 1e-4, "gt_evals_per_trajectory": 300, "device": "cpu"}
    unlimited = make_plan({**settings, "train_budget_seconds": None}, probe)
    budgeted = make_plan({**settings, "train_budget_seconds": 170.0}, probe)
    assert unlimited["train_seconds"] > 170.0 and budgeted["train_seconds"] == 170.0
    assert budgeted["eta_seconds"] == pytest.approx(unlimited["eta_seconds"]
                                                    - unlimited["train_seconds"] + 170.0)
    assert "the trainer's time budget" in plan_lines(budgeted, settings)[-1]


@pytest.mark.parametrize("option", [{"finetune_iters": 5}, {"micro_batch": 4},
                                    {"activation_checkpointing": True}])
def test_bns_fit_refuses_the_options_it_would_ignore(option, tmp_path):
    from bespoke_fast._checks import InvalidArgumentError
    name = next(iter(option))
    with pytest.raises(InvalidArgumentError, match=f"{name}: not used by the BNS trainer"):
        bf.fit("gmm-64", nfe=4, solver="bns", out=tmp_path / "f", log=lambda *a: None, **option)
    assert not (tmp_path / "f").exists()                           # refused before any work
