"""The GPU check (bench/gpu_check.sh) and its benchmarks, proven on CPU: the dry run goes through
every stage and writes every file; the real run's plan fits its budget; the bench defects that
only a GPU run would show (CPU-side data, byte-count targets, the L2 flush, the floor target,
a missing safetensors / triton) each have a test here."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
SCRIPT = os.path.join(BENCH, "gpu_check.sh")


@pytest.fixture(scope="module")
def bench():
    """The bench modules the GPU check runs."""
    from bench import bench_kernels, harness, models, throughput
    return {"harness": harness, "kernels": bench_kernels, "models": models,
            "throughput": throughput}


# ----------------------------------------------------------------------------- the script
# (the dry run itself runs in a rehearsal of the GPU image: tests/test_gpu_image.py)
def test_real_run_worst_case_fits_seven_minutes():
    """Install + every stage's cap + the seconds `timeout` waits before killing each stage that
    overruns: the plan the script prints adds the same numbers."""
    text = open(SCRIPT, encoding="utf-8").read()
    caps = dict(re.findall(r'^(CAP_[A-Z]+)="\$\{CAP_[A-Z]+:-(\d+)\}"', text, re.M))
    assert set(caps) == {"CAP_INSTALL", "CAP_TESTS", "CAP_KERNELS", "CAP_THROUGHPUT",
                         "CAP_RENDER"}
    kill = int(re.search(r'^KILL_AFTER="\$\{KILL_AFTER:-(\d+)\}"', text, re.M).group(1))
    assert sum(map(int, caps.values())) + len(caps) * kill <= 7 * 60, (caps, kill)
    assert "WORST=$(( TOTAL_CAP + 5 * KILL_AFTER ))" in text
    for cap in caps:  # every cap is used by a stage
        assert text.count(f'"${cap}"') >= 1 or text.count(f"${cap}") >= 2, cap


# ----------------------------------------------------------------------------- kernel bench
class _HostTensors(TorchDispatchMode):
    """Records every op that makes a CPU tensor with more than ``limit`` elements."""

    def __init__(self, limit=1024):
        super().__init__()
        self.limit, self.big = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > self.limit:
                self.big.append(str(func))
        return out


@pytest.mark.parametrize("op", ["rk2_stage2+cfg", "bns_step"])
def test_kernel_bench_makes_its_inputs_on_the_device(bench, op):
    """A 1 GB state is 250M normals: generated on the CPU that took minutes (defect 3)."""
    with _HostTensors() as mode:
        case = bench["kernels"].make_case(op, 16, torch.bfloat16, "meta")
    assert case["tensors"]["x0" if op == "bns_step" else "x"].device.type == "meta"
    assert mode.big == []


def test_kernel_bench_writes_each_point_as_it_goes(bench, tmp_path, monkeypatch):
    bk = bench["kernels"]
    real, calls = bk.make_case, []

    def make_case(*a, **k):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the time cap hits during the third point
        return real(*a, **k)

    monkeypatch.setattr(bk, "make_case", make_case)
    with pytest.raises(KeyboardInterrupt):
        bk.main(["--out", str(tmp_path), "--ops", "rk1_step", "--model-dtypes", "fp32",
                 "--sizes-mb", "0.0625", "0.125", "0.25", "--reps", "1", "--warmup", "1"])
    records = json.loads((tmp_path / "kernels.json").read_text())
    assert [r["state_mb"] for r in records] == [0.0625, 0.125]
    assert (tmp_path / "kernels.md").read_text().count("| rk1_step |") == 2


def test_speedup_target_comes_from_the_byte_counts(bench):
    """Eager moves only 1.75x / 2.67x / 2x / 2.75x the minimal bytes: a kernel at copy bandwidth
    cannot be 3x faster, and must not be judged MISSED for it (defect 4)."""
    bk = bench["kernels"]
    n = 2 ** 20
    for op, dtype, want in [("rk1_step", torch.float32, 1.75), ("rk1_step", torch.bfloat16, 8 / 3),
                            ("rk2_stage2", torch.float32, 2.0),
                            ("rk2_stage2", torch.bfloat16, 2.75)]:
        got = bk.eager_bytes(op, False, n, dtype) / bk.minimal_bytes(op, False, n, dtype)
        assert got == pytest.approx(want), (op, dtype)
    for op in bk.OPS:
        name, g = op.split("+")[0], op.endswith("+cfg")
        for dname, dtype in bk.DTYPES.items():
            ratio = bk.eager_bytes(name, g, n, dtype) / bk.minimal_bytes(name, g, n, dtype)
            assert 1 < ratio and bk.speedup_target(name, g, dtype) <= max(3.0, 0.85 * ratio)
            # a kernel at copy bandwidth and an eager op at copy bandwidth: met
            rec = dict(op=name, guidance=g, model_dtype=dname, working_set_mb=256.0,
                       pct_copy=100.0, speedup_vs_eager=ratio)
            assert bk.judge(rec) is True, (op, dname, rec)
            assert bk.judge(dict(rec, pct_copy=80.0)) is False
            assert bk.judge(dict(rec, working_set_mb=16.0)) is None


class _Writes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func, [a for a in args if isinstance(a, torch.Tensor)],
                         (kwargs or {}).get("out")))
        return func(*args, **(kwargs or {}))


def test_l2_flush_only_reads_its_buffer(bench, monkeypatch):
    """Writing the flush buffer (zero_) left dirty lines whose write-back was charged to the
    timed kernel (defect 5): the flush now reads it."""
    harness = bench["harness"]
    monkeypatch.setattr(harness, "L2_FLUSH_BYTES", 4096)
    monkeypatch.setattr(harness, "_L2_FLUSH", {})
    harness._flush_l2("cpu")                    # creates (and fills) the buffer, untimed
    buf = harness._L2_FLUSH["cpu"][0]
    with _Writes() as w:
        harness._flush_l2("cpu")                # what runs before every timed repetition
    assert w.ops, "the flush must touch the buffer"
    for func, tensors, out in w.ops:
        name = func.overloadpacket.__name__
        assert not name.endswith("_") and (out is None or out.numel() == 1), (func, name)
        assert any(t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                   for t in tensors)


# ----------------------------------------------------------------------------- throughput bench
def test_floor_target_is_the_readme_claim(bench):
    """The README claims "within 3% of the model-only floor" (defect 6: the bench used 5%)."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert "within 3% of the\nmodel-only floor" in readme or "within 3% of the model-only floor" in readme
    assert bench["throughput"].TARGET_X_FLOOR == pytest.approx(1.03)


def test_digits_bench_model_without_safetensors(bench, monkeypatch):
    """The GPU image has torch + triton only: the digits bench model must still build (defect 7)."""
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    net, shape, note = bench["models"].make_model("digits")
    assert shape == (1, 8, 8) and "RANDOM weights" in note
    x = torch.randn(2, *shape)
    assert net(x, torch.full((2,), 0.5)).shape == x.shape


def test_throughput_config_failing_in_setup_is_a_note(bench, tmp_path, monkeypatch):
    """make_model (or the solver's move to the device) failing must not end the bench (defect 7)."""
    tp = bench["throughput"]

    def broken(*a, **k):
        raise ImportError("No module named 'safetensors'")

    monkeypatch.setattr(tp, "make_model", broken)
    assert tp.main(["--regimes", "cpu", "--quick", "--reps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "throughput.json").read_text())
    notes = [r["text"] for r in rows if r.get("kind") == "note"]
    assert any("failed in setup: ImportError" in n for n in notes), notes


# ----------------------------------------------------------------------------- GPU runs need triton
def test_gpu_run_without_triton_fails(tmp_path):
    """With BESPOKE_FAST_GPU_TESTS=1 a triton that does not import is a failure, not skipped
    kernel tests and an "ok" GPU run (defect 8)."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('triton is broken here')\n")
    env = dict(os.environ, BESPOKE_FAST_GPU_TESTS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests/test_kernels.py", "tests/test_engine.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode not in (0, 5), proc.stdout[-2000:]
    assert "BESPOKE_FAST_GPU_TESTS=1 but bespoke_fast.kernels does not import" in proc.stdout


def test_compile_rows_run_after_every_regime(bench, tmp_path, monkeypatch):
    """A cold torch.compile takes a minute or more: its rows run after the rows of EVERY regime,
    so a time cap can cost compile rows only (defect: they ran between launch and compute)."""
    tp = bench["throughput"]
    calls = []
    monkeypatch.setattr(tp, "HAS_CUDA", True)
    monkeypatch.setattr(tp, "_guarded", lambda cfg, *a, phase="main", **k:
                        calls.append((cfg[0], phase)))
    assert tp.main(["--regimes", "launch", "compute", "--out", str(tmp_path)]) == 0
    phases = [phase for _, phase in calls]
    assert "compile" in phases and "main" in phases
    first_compile = phases.index("compile")
    assert set(phases[first_compile:]) == {"compile"}, calls          # nothing after a compile
    assert {r for r, p in calls if p == "main"} == {"launch", "compute"}
    assert {r for r, p in calls if p == "compile"} <= {"launch", "compute"}
