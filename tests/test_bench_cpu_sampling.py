"""bench/cpu_sampling.py: its rows compute the same midpoint solve, the targets are judged from
the records, bad options are refused, and a smoke run writes JSON + Markdown."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def cpu_sampling():
    from bench import cpu_sampling
    return cpu_sampling


def test_fast_sampler_is_the_hand_written_midpoint_loop(cpu_sampling):
    torch.manual_seed(0)
    net = cpu_sampling.MLP().eval().requires_grad_(False)
    x0 = torch.randn(3, cpu_sampling.DIM)
    with torch.no_grad():
        rows, _ = cpu_sampling.build_rows(net, 3, x0)
        want = cpu_sampling.hand_midpoint(net, x0)
        torch.testing.assert_close(rows["FastSampler"](), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows["hand-written (lean)"](), want, rtol=1e-5, atol=1e-5)
        cpu_sampling.check_outputs(rows, 3)  # raises when a midpoint row differs


def test_targets_are_judged_from_the_records(cpu_sampling):
    def rec(b, row, ms, floor):
        return {"batch": b, "row": row, "median_ms": ms, "x_floor": ms / floor}
    records = [rec(1, "floor", 1.0, 1.0), rec(1, "FastSampler", 1.2, 1.0),
               rec(1, "hand-written loop", 1.3, 1.0), rec(1, "torchdiffeq", 1.1, 1.0),
               rec(256, "floor", 10.0, 10.0), rec(256, "FastSampler", 10.6, 10.0),
               rec(256, "diffusers", 11.0, 10.0)]
    got = dict(cpu_sampling.targets(records))
    assert got == {"batch 1: FastSampler <= hand-written loop": True,
                   "batch 1: FastSampler ahead of every library peer": False,
                   "batch 256: FastSampler <= 1.05x floor": False,
                   "batch 256: FastSampler ahead of every library peer": True}
    with_paired = dict(cpu_sampling.targets(records, {1: 1.02}))
    assert [v for k, v in with_paired.items() if "paired" in k] == [False]
    records[5]["x_floor_paired"] = 1.049   # the batch-256 FastSampler row, judged paired too
    floor_paired = [v for k, v in cpu_sampling.targets(records) if "floor, paired" in k]
    assert floor_paired == [True]


@pytest.mark.parametrize("argv", [["--reps", "0"], ["--threads", "0"], ["--sample-ms", "-1"],
                                  ["--batches", "0"]])
def test_bad_options_are_refused(cpu_sampling, argv, capsys):
    with pytest.raises(SystemExit):
        cpu_sampling.parse_args(argv)
    assert "must be" in capsys.readouterr().err


def test_smoke_run_writes_json_and_markdown(cpu_sampling, tmp_path):
    threads = torch.get_num_threads()
    try:
        cpu_sampling.main(["--quick", "--reps", "2", "--batches", "2", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "cpu_sampling.json").read_text())
    rows = {r["row"] for r in data["records"]}
    assert {"floor", "FastSampler", cpu_sampling.LEARNED, "hand-written loop",
            "hand-written (lean)"} <= rows
    assert all(r["reps"] == 2 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
               for r in data["records"])
    assert len(data["meta"]["load_before"]) == 3
    md = (tmp_path / "cpu_sampling.md").read_text()
    assert "| 2 |" in md and "load average" in md
