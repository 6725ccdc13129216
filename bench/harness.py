"""The measurement harness of the benchmark scripts: machine record, git commit, timers, JSON +
Markdown output, a call counter. (The other libraries' samplers, the peers, are in
:mod:`bench.peers`.)

Every result record carries the machine (GPU name, driver, versions; never the hostname) and the
git commit, so numbers from different runs can be told apart. GPU timings use CUDA events around
each repetition (with the L2 cache flushed between repetitions, like ``triton.testing.do_bench``);
CPU timings use ``time.perf_counter``. Both report the median and a spread (p90 - p10).

Example::

    from bench.harness import machine_info, markdown_table, timeit_cpu, write_results
    t = timeit_cpu(lambda: sampler(x0), warmup=2, reps=10)     # Timing(median_ms, spread_ms, ...)
    recs = [{"name": "fast", "ms": t.median_ms, "machine": machine_info()}]
    write_results("out", "speed", recs, markdown_table(recs, [("name", "name"), ("ms", "ms")]))
    # -> out/speed.json, out/speed.md
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import torch

from bespoke_fast.io import atomic_write_text

# the checkout (realpath: bench/ reached through a symlink, as in gpu_check.sh's shadow folder,
# still names the git checkout)
REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

__all__ = ["Timing", "machine_info", "git_commit", "timeit_cuda", "timeit_cpu", "write_results",
           "markdown_table", "command_line", "REPO", "Counted"]


class Timing(NamedTuple):
    """Median and spread (p90 - p10) in milliseconds over ``reps`` timed repetitions."""
    median_ms: float
    spread_ms: float
    min_ms: float
    max_ms: float
    warmup: int
    reps: int


def _quantile(sorted_vals, q):
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _summarise(times_ms, warmup):
    s = sorted(times_ms)
    return Timing(statistics.median(s), _quantile(s, 0.9) - _quantile(s, 0.1), s[0], s[-1],
                  warmup, len(s))


def git_commit() -> str:
    """``git rev-parse HEAD`` of the repository (with ``+dirty`` if it has local changes), or
    ``"unknown"``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:  # no git, not a checkout, ...
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _driver_version() -> str:
    try:
        import pynvml  # nvidia-ml-py
        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return "n/a"


def machine_info() -> dict:
    """What ran the benchmark (no hostname): GPU name and driver ("n/a" when unknown), CPU model,
    torch / triton / CUDA / python versions, git commit. Queries the GPU only when called."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    has_cuda = torch.cuda.is_available()
    info = {
        "gpu": torch.cuda.get_device_name(0) if has_cuda else "unavailable",
        "gpu_count": torch.cuda.device_count() if has_cuda else 0,
        "driver": _driver_version() if has_cuda else "n/a",
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "n/a",
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "git_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if has_cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


_L2_FLUSH = {}
L2_FLUSH_BYTES = 256 * 2**20  # more than any L2 (H100: 50 MB, H200: 60 MB)


def _flush_l2(device):
    """Start each repetition with a cold L2 by READING a buffer bigger than it: the cache then
    holds only clean lines, so nothing is written back during the timed kernel. (Writing the
    buffer, e.g. ``zero_()``, leaves its dirty lines to be written back while the next kernel
    runs: that write-back would be charged to the kernel and to the copy.)"""
    got = _L2_FLUSH.get(device)
    if got is None:
        buf = torch.zeros(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)
        if buf.device.type == "cuda":
            torch.cuda.synchronize(buf.device)  # the zero-fill's write-back ends here, untimed
        got = _L2_FLUSH[device] = (buf, torch.zeros((), device=device))
    buf, acc = got
    torch.sum(buf, dim=0, out=acc)  # reads every line; writes 4 bytes


def timeit_cuda(fn: Callable[[], object], warmup: int = 10, reps: int = 50,
                flush_l2: bool = True) -> Timing:
    """Time ``fn`` on the current CUDA stream with one pair of CUDA events per repetition."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    dev = torch.cuda.current_device()
    for s, e in zip(starts, ends):
        if flush_l2:
            _flush_l2(dev)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _summarise([s.elapsed_time(e) for s, e in zip(starts, ends)], warmup)


def timeit_cpu(fn: Callable[[], object], warmup: int = 2, reps: int = 10) -> Timing:
    """Time ``fn`` on the host with ``time.perf_counter`` (CPU work only: never for GPU work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summarise(times, warmup)


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(records, columns) -> str:
    """``columns``: list of (header, key or callable(record))."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    rows = []
    for r in records:
        cells = [_fmt(k(r) if callable(k) else r.get(k)) for _, k in columns]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep] + rows)


def write_results(out_dir: str, name: str, records: list, markdown: str) -> tuple:
    """Write ``out_dir/name.json`` (the records) and ``out_dir/name.md``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, name + ".json")
    mpath = os.path.join(out_dir, name + ".md")
    atomic_write_text(jpath, json.dumps(records, indent=1, default=str) + "\n")
    atomic_write_text(mpath, markdown.rstrip() + "\n")
    return jpath, mpath


def command_line() -> str:
    """The command that runs this process, as recorded with the results (``python bench/x.py
    --flag ...``; the interpreter's base name, not its path)."""
    return " ".join([os.path.basename(sys.executable)] + sys.argv)


class Counted(torch.nn.Module):
    """Wraps a velocity model and counts its calls (``calls``) and evaluated rows (``rows``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0
        self.rows = 0

    def forward(self, x, t, **extras):
        self.calls += 1
        self.rows += x.shape[0]
        return self.model(x, t, **extras)
