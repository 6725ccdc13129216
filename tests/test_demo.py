"""`bespoke-fast demo` end to end at a small size: every artefact is written and consistent."""
import json

import pytest
import torch

from bespoke_fast.cli import main
from bespoke_fast.solvers.files import load_solver

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The demo sets torch's thread count (default 1): give the rest of the suite its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_demo_runs_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "digits-fmot", "--nfe", "4", "--num-gt", "96", "--out", str(out),
                 "--quiet", "--json", "--device", "cpu", "--iters", "4", "--finetune-iters", "4",
                 "--num-val", "32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["solver"] for r in summary["results"]] == ["bespoke-rk2@4", "euler@4", "midpoint@4",
                                                         "rk4@4", "midpoint@8"]
    assert all(r["n"] == 32 for r in summary["results"])
    solver = load_solver(summary["solver_file"])
    assert solver.nfe == 4 and solver.meta["model"]["name"] == "digits-fmot"
    for name in ("error_maps", "transform", "psnr_vs_nfe"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["gt"]["num"] == 96
    assert torch.get_num_threads() == 1  # the demo's default


def test_demo_rejects_an_odd_nfe(capsys):
    assert main(["demo", "--nfe", "5", "--device", "cpu", "--quiet"]) == 2
    assert "nfe must be an even number" in capsys.readouterr().err
