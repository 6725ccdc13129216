"""Shared helpers for the benchmark scripts: machine record, timers, JSON + Markdown output.

Every result record carries the machine (GPU name, driver, versions; never the hostname) and the
git commit, so numbers from different runs can be told apart. GPU timings use CUDA events around
each repetition (with the L2 cache flushed between repetitions, like ``triton.testing.do_bench``);
CPU timings use ``time.perf_counter``. Both report the median and a spread (p90 - p10).
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["Timing", "machine_info", "git_commit", "timeit_cuda", "timeit_cpu", "write_results",
           "markdown_table", "command_line", "REPO", "Counted", "peer_status", "torchdiffeq_sample",
           "flow_matching_sample", "diffusers_scheduler", "diffusers_sample", "Peer", "PEERS",
           "DIFFUSERS_SCHEDULERS"]


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
    return " ".join([os.path.basename(sys.executable)] + sys.argv)


# ----------------------------------------------------------------------------- peer samplers
# The same ODE solved by other libraries, each driven from OUR velocity model
# ``model(x, t[B]) -> u`` (flow time t: noise at 0, data at 1). Used by quality.py,
# throughput.py and tests/test_bench_peers.py. A peer whose package is missing is reported as
# unavailable (with the reason), never imported at module import time.
#
# Conventions of the peers (checked in tests/test_bench_peers.py):
# * torchdiffeq ``odeint(f, x0, t_grid, method)``: ``f(t, x)`` with a 0-d time; fixed-grid
#   methods step exactly on ``t_grid`` (no step_size given). Its "rk4" is the 3/8-rule variant
#   (``rk4_alt_step_func``), not the classic RK4 of ``bespoke_fast.solve(..., "rk4")``.
# * flow_matching ``ODESolver(velocity_model).sample(x_init, step_size, method, time_grid)``: calls
#   ``velocity_model(x=x, t=t)`` with a 0-d t and runs torchdiffeq with ``options={"step_size":
#   step_size}`` (grid ``k * step_size``, last point clamped to 1).
# * diffusers flow schedulers: sigma = 1 - t (data at sigma = 0), the model output they expect
#   ("flow_prediction") is d x / d sigma = noise - data = MINUS our velocity, evaluated at
#   t = 1 - sigma. We feed the model the exact float ``1 - scheduler.sigmas[i]`` (DPM/UniPC store
#   integer ``timesteps``; a real pipeline would feed those, slightly coarser).

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


def peer_status(package: str) -> tuple:
    """(available, note) for an optional peer package, importing it only here."""
    try:
        mod = __import__(package)
        return True, f"{package} {getattr(mod, '__version__', '?')}"
    except Exception as e:  # ImportError, or a broken install
        return False, f"{package} not installed ({type(e).__name__}: {e})"


def _uniform(n_steps: int, like: torch.Tensor) -> torch.Tensor:
    # i / n correctly rounded, as bespoke_fast.solve's uniform grid
    return torch.arange(n_steps + 1, dtype=torch.float64).div(n_steps).to(like.device, like.dtype)


def torchdiffeq_sample(model, x0: torch.Tensor, method: str, n_steps: int) -> torch.Tensor:
    """torchdiffeq ``odeint`` with a fixed-grid ``method`` on the uniform grid of ``n_steps``."""
    from torchdiffeq import odeint
    import bespoke_fast
    f = bespoke_fast.to_torchdiffeq(model)
    return odeint(f, x0, _uniform(n_steps, x0), method=method)[-1]


def _fm_wrapper(model):
    from flow_matching.utils import ModelWrapper

    class _Wrap(ModelWrapper):
        def forward(self, x, t, **extras):
            t = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1)
            return self.model(x, t.expand(x.shape[0]), **extras)

    return _Wrap(model)


def flow_matching_sample(model, x0: torch.Tensor, method: str, n_steps: int) -> torch.Tensor:
    """flow_matching ``ODESolver.sample(x0, step_size=1/n_steps, method, time_grid=[0, 1])`` (the
    time grid in x0's dtype: its default float32 grid would round the times of a float64 run)."""
    from flow_matching.solver import ODESolver
    solver = ODESolver(velocity_model=_fm_wrapper(model))
    return solver.sample(x_init=x0, step_size=1.0 / n_steps, method=method,
                         time_grid=torch.tensor([0.0, 1.0], device=x0.device, dtype=x0.dtype))


DIFFUSERS_SCHEDULERS = ("euler", "dpm++2m", "unipc")


def diffusers_scheduler(name: str, n_steps: int, uniform_sigmas: bool = False, device=None):
    """A diffusers flow-matching scheduler with ``set_timesteps(n_steps)`` done.

    * ``"euler"``: ``FlowMatchEulerDiscreteScheduler(shift=1)``; its default sigmas run
      ``linspace(1, 1/1000, n)`` then 0. ``uniform_sigmas=True`` passes ``sigmas = 1 - i/n``
      (i < n), i.e. exactly our uniform Euler grid.
    * ``"dpm++2m"``: ``DPMSolverMultistepScheduler(prediction_type="flow_prediction",
      use_flow_sigmas=True, flow_shift=1, algorithm_type="dpmsolver++", solver_order=2)``:
      sigmas ``linspace(0.999, 0.999/n, n)`` then 0 (it cannot start at sigma = 1).
    * ``"unipc"``: ``UniPCMultistepScheduler(prediction_type="flow_prediction",
      use_flow_sigmas=True, flow_shift=1)`` (bh2, order 2, corrector on): sigmas
      ``linspace(1, 1/1000, n + 1)[:-1]`` (first one 1 - 1e-6) then 0.
    """
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    if name == "euler":
        s = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        if uniform_sigmas:
            sig = [1.0 - i / n_steps for i in range(n_steps)]
            s.set_timesteps(sigmas=sig, device=device)
        else:
            s.set_timesteps(n_steps, device=device)
        return s
    if uniform_sigmas:
        raise ValueError(f"uniform_sigmas is only offered for the euler scheduler, not {name!r}")
    if name == "dpm++2m":
        s = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=1.0, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
            final_sigmas_type="zero")
    elif name == "unipc":
        s = diffusers.UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=1.0, solver_order=2, lower_order_final=True, final_sigmas_type="zero")
    else:
        raise ValueError(f"unknown diffusers scheduler {name!r}; one of {DIFFUSERS_SCHEDULERS}")
    s.set_timesteps(n_steps, device=device)
    return s


def diffusers_sample(model, x0: torch.Tensor, name: str, n_steps: int,
                     uniform_sigmas: bool = False, scheduler=None) -> torch.Tensor:
    """The standard diffusers denoising loop (one model call per step, NFE = n_steps) with our
    velocity model converted to the flow prediction: ``v = -u(x, 1 - sigma)``.

    ``scheduler``: a prepared scheduler to reuse (``set_timesteps`` is called again, which resets
    its state); default a new one from :func:`diffusers_scheduler`."""
    if scheduler is None:
        sched = diffusers_scheduler(name, n_steps, uniform_sigmas, device=x0.device)
    else:
        sched = scheduler
        if uniform_sigmas:
            sched.set_timesteps(sigmas=[1.0 - i / n_steps for i in range(n_steps)], device=x0.device)
        else:
            sched.set_timesteps(n_steps, device=x0.device)
    # model times on the device once (1 - sigma, exact floats), no per-step host->device copy
    t_model = (1.0 - sched.sigmas[: len(sched.timesteps)].to(torch.float64)).to(x0.device, x0.dtype)
    x = x0
    b = x0.shape[0]
    for i, ts in enumerate(sched.timesteps):
        v = -model(x, t_model[i].expand(b))
        x = sched.step(v, ts, x, return_dict=False)[0]
    return x


class Peer(NamedTuple):
    """A peer solver: ``run(model, x0, nfe) -> x1``; ``per_step``: model calls per step
    (``nfe`` must be a multiple); ``package``: what must be importable."""
    name: str
    package: str
    per_step: int
    run: Callable
    description: str


PEERS = {
    "torchdiffeq-euler": Peer("torchdiffeq-euler", "torchdiffeq", 1,
                              lambda m, x, nfe: torchdiffeq_sample(m, x, "euler", nfe),
                              "torchdiffeq odeint, method='euler', uniform t grid"),
    "torchdiffeq-midpoint": Peer("torchdiffeq-midpoint", "torchdiffeq", 2,
                                 lambda m, x, nfe: torchdiffeq_sample(m, x, "midpoint", nfe // 2),
                                 "torchdiffeq odeint, method='midpoint', uniform t grid"),
    "torchdiffeq-rk4": Peer("torchdiffeq-rk4", "torchdiffeq", 4,
                            lambda m, x, nfe: torchdiffeq_sample(m, x, "rk4", nfe // 4),
                            "torchdiffeq odeint, method='rk4' (3/8 rule), uniform t grid"),
    "flow_matching-midpoint": Peer("flow_matching-midpoint", "flow_matching", 2,
                                   lambda m, x, nfe: flow_matching_sample(m, x, "midpoint", nfe // 2),
                                   "flow_matching ODESolver, method='midpoint', step_size=1/steps"),
    "diffusers-euler": Peer("diffusers-euler", "diffusers", 1,
                            lambda m, x, nfe: diffusers_sample(m, x, "euler", nfe),
                            "diffusers FlowMatchEulerDiscreteScheduler (default sigmas, shift 1)"),
    "diffusers-dpm++2m": Peer("diffusers-dpm++2m", "diffusers", 1,
                              lambda m, x, nfe: diffusers_sample(m, x, "dpm++2m", nfe),
                              "diffusers DPMSolverMultistepScheduler, dpmsolver++ order 2, "
                              "flow_prediction, use_flow_sigmas"),
    "diffusers-unipc": Peer("diffusers-unipc", "diffusers", 1,
                            lambda m, x, nfe: diffusers_sample(m, x, "unipc", nfe),
                            "diffusers UniPCMultistepScheduler, bh2 order 2, flow_prediction, "
                            "use_flow_sigmas"),
}
