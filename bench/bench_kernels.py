#!/usr/bin/env python
"""Benchmark the fused solver-update kernels against a device copy and the eager torch reference.

For each op (rk1_step, rk2_stage1, rk2_stage2, each plain and with classifier-free guidance, and
bns_step at i = n-1 with n = 10), each state size (fp32 state, 1 MB .. 1 GB) and model dtype
(fp32, bf16), it reports on CUDA:

* the kernel time (median and spread p90-p10 over repetitions, CUDA events, cold L2),
* GB/s from the MINIMAL byte count (each tensor read or written once, in its dtype),
* a device-to-device copy moving the same byte count, measured in the same run, and the
  kernel's percentage of that copy bandwidth,
* the eager torch reference op (``bespoke_fast.ops.*_ref``) time and the speed-up over it,
  judged against the speed-up the byte counts allow (``eager_bytes`` / ``minimal_bytes``: the
  eager op's passes over memory against the kernel's single pass),
* the first-call time (includes the JIT compile the first time a variant is seen), apart from
  the steady state.

Targets (H100/H200): >= 85 % of copy bandwidth at >= 64 MB working set, and a speed-up over the
eager op of at least min(3, 0.85 x the byte-count bound): eager cannot be slower than its own
bytes at copy bandwidth, so e.g. rk1_step fp32 (eager moves 1.75x the minimal bytes) can be at
most ~1.75x faster than eager, and a kernel at copy bandwidth must not be judged MISSED for that.

Inputs are generated ON the device (seeded ``torch.randn``), and ``DIR/kernels.json`` / ``.md``
are rewritten after every point, so a time cap loses only the unfinished points.

Without CUDA it says that GPU figures are unavailable and times only the reference ops on the
CPU at 1 MB and 16 MB, so the script and its output format are exercised everywhere.

Writes ``DIR/kernels.json`` (list of records) and ``DIR/kernels.md``.

    python bench/bench_kernels.py --quick --out bench/results/local
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Kernels are not timed without CUDA, but anything importing them must see the interpreter
    # flag before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if not __package__:  # python bench/x.py: the repository root, not bench/, on sys.path
    import _path  # noqa: F401
from bench.harness import (command_line, machine_info, markdown_table, timeit_cpu,  # noqa: E402
                           timeit_cuda, write_results)

from bespoke_fast import ops  # noqa: E402
from bespoke_fast.ops import table as T  # noqa: E402
from bespoke_fast.ops.bns import bns_step_ref  # noqa: E402

MB = 2 ** 20
OPS = ["rk1_step", "rk1_step+cfg", "rk2_stage1", "rk2_stage1+cfg", "rk2_stage2", "rk2_stage2+cfg",
       "bns_step"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_SIZES_MB = [1, 4, 16, 64, 256, 1024]
QUICK_SIZES_MB = [1, 16, 64]
CPU_SIZES_MB = [1, 16]
BNS_N = 10
BATCH = 8
TARGET_PCT_COPY, TARGET_SPEEDUP, TARGET_MIN_MB = 85.0, 3.0, 64


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def eager_bytes(op: str, guidance: bool, numel: int, model_dtype: torch.dtype) -> int:
    """Bytes the eager reference op moves, pass by pass, as ``bespoke_fast.ops.*_ref`` /
    ``bns_step_ref`` run in the engine's configuration (fp32 state, in place, model_in written;
    s = model-dtype size; a cast of s-byte data to fp32 reads s and writes 4 bytes per element,
    and is skipped when s = 4)::

        velocity:     s != 4: u.to(fp32)  (s + 4)              [guidance: u.float() 2(s + 4),
                                                                 u_cond - u_unc 12, addcmul 12]
        rk1/stage1:   mul 8, addcmul_ 12,        model_in copy (4 + s) per half
        rk2_stage2:   mul 8, addcmul_ 12, addcmul_ 12, model_in copy (4 + s) per half
        bns_step i:   mul 8, per row j <= i: [cast (s + 4)] + product 8 + add_ 12; copy (4 + s)
    """
    s = _itemsize(model_dtype)
    cast = 0 if s == 4 else s + 4
    copy = (2 if guidance else 1) * (4 + s)
    if op == "bns_step":
        return numel * (8 + BNS_N * (cast + 8 + 12) + (4 + s))
    velocity = (2 * cast + 12 + 12) if guidance else cast
    update = {"rk1_step": 8 + 12, "rk2_stage1": 8 + 12, "rk2_stage2": 8 + 12 + 12}[op]
    return numel * (velocity + update + copy)


def speedup_target(op: str, guidance: bool, model_dtype: torch.dtype) -> float:
    """The speed-up over eager a kernel at the copy-bandwidth target must reach: 3x, or less
    where the byte counts cannot allow it (``eager_bytes / minimal_bytes`` x 85 %)."""
    bound = (eager_bytes(op, guidance, 2 ** 20, model_dtype)
             / minimal_bytes(op, guidance, 2 ** 20, model_dtype))
    return min(TARGET_SPEEDUP, bound * TARGET_PCT_COPY / 100)


def judge(rec: dict) -> bool | None:
    """``meets_target`` of a kernel record (None below the working-set threshold)."""
    if rec.get("pct_copy") is None or rec["working_set_mb"] < TARGET_MIN_MB:
        return None
    rec["speedup_target"] = speedup_target(rec["op"], rec["guidance"], DTYPES[rec["model_dtype"]])
    return rec["pct_copy"] >= TARGET_PCT_COPY and rec["speedup_vs_eager"] >= rec["speedup_target"]


def minimal_bytes(op: str, guidance: bool, numel: int, model_dtype: torch.dtype) -> int:
    """Bytes every tensor must move once (state fp32; s = model-dtype size; g = 2 with guidance,
    since u and model_in are then [2B, ...]; the 32-byte table row is ignored)::

        rk1_step, rk2_stage1: 4N (read x) + g s N (read u)  + 4N (write x) + g s N (write model_in)
        rk2_stage2:           4N (x) + 4N (x_mid) + g s N (u2) + 4N (write x) + g s N (model_in)
        bns_step at row i:    4N (x0) + (i+1) s N (us rows 0..i) + 4N (write out) + s N (model_in)
    """
    s = _itemsize(model_dtype)
    g = 2 if guidance else 1
    if op in ("rk1_step", "rk2_stage1"):
        return 4 * numel + g * s * numel + 4 * numel + g * s * numel
    if op == "rk2_stage2":
        return 8 * numel + g * s * numel + 4 * numel + g * s * numel
    if op == "bns_step":
        return 4 * numel + BNS_N * s * numel + 4 * numel + s * numel  # i = n - 1: n rows
    raise ValueError(op)


def make_case(name: str, size_mb: float, model_dtype: torch.dtype, device: str, kernels=None):
    """Tensors and the two callables (kernel, eager reference) for one benchmark point.

    Engine configuration: in place (``out=x``) and the model input written in the same pass.
    Coefficients keep the in-place state bounded over many repetitions."""
    op, guidance = name.split("+")[0], name.endswith("+cfg")
    numel = int(size_mb * MB) // 4
    shape = (BATCH, numel // BATCH)
    numel = shape[0] * shape[1]
    g = 2 if guidance else 1

    def rnd(shp, dtype=torch.float32):
        # on the device: a 1 GB state is 250M normals, minutes on a CPU (seeded by main)
        return torch.randn(shp, device=device, dtype=dtype)

    t = {}
    if op == "bns_step":
        t["x0"] = rnd(shape)
        t["us"] = rnd((BNS_N,) + shape, model_dtype)
        t["ta"] = torch.ones(BNS_N, device=device)
        t["tb"] = torch.full((BNS_N, BNS_N), 1e-2, device=device).tril()
        t["out"] = torch.empty(shape, device=device)
        t["mi"] = torch.empty(shape, device=device, dtype=model_dtype)
        args = (t["x0"], t["us"], BNS_N - 1, t["ta"], t["tb"], t["out"])
        ref = lambda: bns_step_ref(*args, model_in=t["mi"])  # noqa: E731
        ker = (lambda: kernels.bns_step(*args, model_in=t["mi"])) if kernels else None
    else:
        tab = torch.zeros(4, T.NUM_COLS)
        tab[:, T.A], tab[:, T.B] = 1.0, 1e-3
        tab[:, T.C], tab[:, T.D], tab[:, T.E], tab[:, T.W] = 0.5, 0.5, 1e-3, 2.0
        t["table"] = tab.to(device)
        t["x"] = rnd(shape)
        t["u"] = rnd((g * shape[0], shape[1]), model_dtype)
        t["mi"] = torch.empty((g * shape[0], shape[1]), device=device, dtype=model_dtype)
        pre = (t["x"],)
        if op == "rk2_stage2":
            t["xm"] = rnd(shape)
            pre = (t["x"], t["xm"])
        kw = dict(model_in=t["mi"], guidance=guidance, out=t["x"])
        call_args = pre + (t["u"], t["table"], 1)
        ref_fn = getattr(ops, op + "_ref")
        ref = lambda: ref_fn(*call_args, **kw)  # noqa: E731
        ker = (lambda: getattr(kernels, op)(*call_args, **kw)) if kernels else None
    return dict(op=op, guidance=guidance, shape=list(shape), numel=numel, tensors=t, ref=ref,
                kernel=ker, bytes=minimal_bytes(op, guidance, numel, model_dtype))


def check_case(case, kernels):
    """Kernel vs reference on fresh copies (same inputs): max abs error of the new state."""
    t = case["tensors"]
    saved = {k: v.clone() for k, v in t.items()}
    case["ref"]()
    want = (t["out"] if case["op"] == "bns_step" else t["x"]).clone()
    for k, v in saved.items():
        t[k].copy_(v)
    case["kernel"]()
    got = t["out"] if case["op"] == "bns_step" else t["x"]
    err = float((got - want).abs().max())
    for k, v in saved.items():
        t[k].copy_(v)
    del saved
    return err


_COPY_CACHE = {}


def copy_bandwidth(nbytes: int, device: str, timer, warmup, reps):
    """A device copy moving ``nbytes`` in total (reads nbytes/2, writes nbytes/2), in GB/s."""
    key = (nbytes, device)
    if key not in _COPY_CACHE:
        half = max(16, nbytes // 2 // 16 * 16)
        src = torch.empty(half, dtype=torch.uint8, device=device).random_(0, 255)
        dst = torch.empty_like(src)
        tm = timer(lambda: dst.copy_(src), warmup, reps)
        _COPY_CACHE[key] = (tm, 2 * half / (tm.median_ms * 1e-3) / 1e9)
        del src, dst
    return _COPY_CACHE[key]


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def run(args, flush=lambda machine, records: None):
    """Every point; ``flush(machine, records)`` after each one (the caller rewrites the files)."""
    machine = machine_info()
    device = "cuda" if HAS_CUDA else "cpu"
    kernels = None
    if HAS_CUDA:
        from bespoke_fast import kernels as kernels_mod
        kernels = kernels_mod
        timer = timeit_cuda
        sizes = args.sizes_mb or (QUICK_SIZES_MB if args.quick else FULL_SIZES_MB)
        warmup, reps = args.warmup or 10, args.reps or 50
    else:
        print("gpu: unavailable -- no CUDA device, so GPU kernel figures are not measured; timing "
              "the eager reference ops on the CPU at small sizes only.")
        timer = timeit_cpu
        sizes = [s for s in (args.sizes_mb or CPU_SIZES_MB) if s <= max(CPU_SIZES_MB)] or CPU_SIZES_MB
        warmup, reps = args.warmup or 2, args.reps or 10
        if args.cpu_kernels:  # exercise the kernel path of this script; timings meaningless
            from bespoke_fast import kernels as kernels_mod
            kernels = kernels_mod

    records = []
    for name in args.ops:
        for dname in args.model_dtypes:
            dtype = DTYPES[dname]
            for size_mb in sizes:
                case = make_case(name, size_mb, dtype, device, kernels)
                rec = dict(machine=machine, git_commit=machine["git_commit"], op=case["op"],
                           guidance=case["guidance"], state_mb=size_mb, shape=case["shape"],
                           numel=case["numel"], state_dtype="fp32", model_dtype=dname,
                           bytes_moved=case["bytes"], working_set_mb=case["bytes"] / MB,
                           device=device, gpu=machine["gpu"], warmup=warmup, reps=reps,
                           timer="cuda events, cold L2" if HAS_CUDA else "perf_counter (CPU)")
                if case["op"] == "bns_step":
                    rec["bns_i"], rec["bns_n"] = BNS_N - 1, BNS_N
                if kernels is not None:
                    _sync()
                    t0 = time.perf_counter()
                    case["kernel"]()  # first call of a variant compiles it: reported apart
                    _sync()
                    rec["first_call_ms"] = (time.perf_counter() - t0) * 1e3
                    rec["max_abs_err_vs_ref"] = check_case(case, kernels)
                    tk = timer(case["kernel"], warmup, reps)
                    rec.update(median_ms=tk.median_ms, spread_ms=tk.spread_ms, min_ms=tk.min_ms,
                               gbps=case["bytes"] / (tk.median_ms * 1e-3) / 1e9)
                else:
                    rec.update(median_ms=None, spread_ms=None, gbps=None, first_call_ms=None,
                               max_abs_err_vs_ref=None)
                te = timer(case["ref"], warmup, reps)
                rec.update(eager_median_ms=te.median_ms, eager_spread_ms=te.spread_ms,
                           eager_gbps=case["bytes"] / (te.median_ms * 1e-3) / 1e9)
                tc, copy_gbps = copy_bandwidth(case["bytes"], device, timer, warmup, reps)
                rec.update(copy_median_ms=tc.median_ms, copy_gbps=copy_gbps,
                           eager_pct_copy=100 * rec["eager_gbps"] / copy_gbps)
                if kernels is not None:
                    rec["pct_copy"] = 100 * rec["gbps"] / copy_gbps
                    rec["speedup_vs_eager"] = te.median_ms / tk.median_ms
                    verdict = judge(rec)
                    if verdict is not None:
                        rec["meets_target"] = verdict
                else:
                    rec["pct_copy"] = rec["speedup_vs_eager"] = None
                records.append(rec)
                print(_line(rec), flush=True)
                flush(machine, records)
                del case
                if HAS_CUDA:
                    torch.cuda.empty_cache()
    return machine, records


def _line(r):
    tag = r["op"] + ("+cfg" if r["guidance"] else "")
    if r["median_ms"] is None:
        return (f"{tag:16s} {r['model_dtype']:4s} {r['state_mb']:5g} MB  kernel n/a  eager "
                f"{r['eager_median_ms']:.3f} ms ({r['eager_gbps']:.1f} GB/s, "
                f"{r['eager_pct_copy']:.0f}% of copy)")
    return (f"{tag:16s} {r['model_dtype']:4s} {r['state_mb']:5g} MB  kernel {r['median_ms']:.4f} ms "
            f"{r['gbps']:.0f} GB/s = {r['pct_copy']:.0f}% of copy ({r['copy_gbps']:.0f}), "
            f"eager {r['eager_median_ms']:.4f} ms, x{r['speedup_vs_eager']:.2f}")


def render(machine, records, args) -> str:
    m = machine
    lines = ["# Fused solver-update kernels", "",
             f"* machine: gpu {m['gpu']} (driver {m['driver']}), cpu {m['cpu']}; torch {m['torch']}, "
             f"triton {m['triton']}, CUDA {m['cuda']}, python {m['python']}",
             f"* git commit: {m['git_commit']}",
             f"* command: `{command_line()}`",
             "* bytes: minimal traffic, each tensor read/written once in its dtype (formula in "
             "`minimal_bytes`); copy: device copy moving the same bytes, same run; "
             "eager: the torch reference op (`bespoke_fast.ops.*_ref`, `ops.bns.bns_step_ref`); "
             "in place with model_in written, as the engine calls them",
             f"* targets: >= {TARGET_PCT_COPY:.0f}% of copy bandwidth at >= {TARGET_MIN_MB} MB "
             f"working set, and a speed-up over eager of min({TARGET_SPEEDUP:.0f}x, "
             f"{TARGET_PCT_COPY:.0f}% x the byte-count bound eager bytes / minimal bytes; "
             f"`speedup_target` per point)"]
    if m["gpu"] == "unavailable":
        if args.cpu_kernels:
            lines += ["", "**gpu: unavailable** -- kernel columns are Triton-interpreter runs on "
                      "the CPU (a check of this script; the timings mean nothing)."]
        else:
            lines += ["", "**gpu: unavailable** -- kernel figures not measured on this machine; "
                      "the table shows CPU timings of the eager reference ops only."]
    cols = [("op", lambda r: r["op"] + (" +cfg" if r["guidance"] else "")),
            ("model dtype", "model_dtype"), ("state MB", "state_mb"),
            ("moved MB", "working_set_mb"),
            ("kernel ms (median)", "median_ms"), ("spread ms", "spread_ms"), ("GB/s", "gbps"),
            ("copy GB/s", "copy_gbps"), ("% copy", "pct_copy"),
            ("eager ms", "eager_median_ms"), ("eager GB/s", "eager_gbps"),
            ("speed-up", "speedup_vs_eager"), ("1st call ms", "first_call_ms"),
            ("target", lambda r: {True: "met", False: "MISSED"}.get(r.get("meets_target"), "-"))]
    if records:
        lines += ["", f"warm-up {records[0]['warmup']}, reps {records[0]['reps']}, timer "
                  f"{records[0]['timer']}; spread = p90 - p10; 1st call = first launch of the "
                  f"point (includes the JIT compile when the variant is new)"]
    lines += ["", markdown_table(records, cols)]
    missed = [r for r in records if r.get("meets_target") is False]
    if missed:
        lines += ["", f"{len(missed)} point(s) at >= {TARGET_MIN_MB} MB miss the target."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("bench", "results", "local"),
                   help="output directory for kernels.json / kernels.md (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes only ({', '.join(map(str, QUICK_SIZES_MB))} MB on GPU)")
    p.add_argument("--sizes-mb", type=float, nargs="+", default=None,
                   help=f"fp32 state sizes in MB (default {FULL_SIZES_MB}; CPU: at most "
                        f"{max(CPU_SIZES_MB)})")
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS, help="ops to run (default: all)")
    p.add_argument("--model-dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES),
                   help="model dtypes (default: fp32 bf16)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (GPU 10, CPU 2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (GPU 50, CPU 10)")
    p.add_argument("--name", default="kernels", help="output file stem (default: %(default)s)")
    p.add_argument("--cpu-kernels", action="store_true",
                   help="without CUDA, also run the kernels through the Triton interpreter (checks "
                        "this script's kernel path; the timings mean nothing)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)  # seeds the device generators too: inputs are made on the device

    def flush(machine, records):
        return write_results(args.out, args.name, records, render(machine, records, args))

    machine, records = run(args, flush)
    jpath, mpath = flush(machine, records)
    print(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
