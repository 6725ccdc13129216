#!/usr/bin/env python
"""Sampler throughput at NFE 10: FastSampler against the eager loop, the peers and the
model-only floor, all measured in the same run on the same machine.

Rows (each one call = one batch of samples at NFE 10; the solver is a 5-step Bespoke RK2 at
its identity, i.e. midpoint -- coefficients do not change the cost):

* ``fast: triton + graph``      FastSampler(backend="triton", cuda_graph=True)       CUDA only
* ``fast: triton``              FastSampler(backend="triton", cuda_graph=False)      CUDA only
* ``fast: reference + graph``   FastSampler(backend="reference", cuda_graph=True)    CUDA only
* ``fast: reference``           FastSampler(backend="reference", cuda_graph=False)
* ``eager: BespokeSolver.sample``  the package's pure-torch reference loop
* ``torchdiffeq midpoint``      odeint(method="midpoint") on a 5-step uniform grid
* ``flow_matching midpoint``    ODESolver.sample(method="midpoint", step_size=1/5)
* ``diffusers FlowMatchEuler``  the scheduler loop, 10 steps (scheduler built once)
* ``compile(reduce-overhead) + midpoint``  torch.compile(model, mode="reduce-overhead") inside
  ``bespoke_fast.solve(..., "midpoint")``; CUDA only (on CPU: ``--cpu-compile`` uses
  mode="default", otherwise the row is skipped with a note)
* ``floor: NFE x forward``      the model alone on the 10 (state, time) inputs the midpoint
  sampler feeds it (recorded once): on CUDA the 10 forwards captured in one CUDA graph, on CPU
  plain forwards. ``x floor`` = latency / floor.

Regimes (``--regimes``):

* ``launch``  (CUDA): the zoo's digits network (1x8x8) and the ~2M-param 3x32x32 UNet
  (bench/models.py) at batch 1 and 16, fp32: host/launch overhead dominates.
* ``compute`` (CUDA): the 35.7M-param DDPM CIFAR UNet (random weights) at batch 128 (fp32, bf16)
  and 256 (bf16).
* ``cpu``     (always available): the zoo's digits network at batch 64 and 256, fp32; target:
  FastSampler's reference path within 1.03x of its floor.

For every row: latency median and spread (p90 - p10) over ``reps`` timed calls (CUDA events
without an L2 flush -- back-to-back sampling is the steady state; host clock on CPU),
samples/s, the ratio to the floor, the first call(s) (compile / capture) apart from steady
state, peak CUDA memory, and NVML telemetry (average power, energy per sample, GPU utilisation)
over a separate >= ``--telemetry-seconds`` loop (``bench/telemetry.py``'s ``PowerSampler``;
"n/a" without NVML). Outputs of midpoint-equivalent rows are checked against the eager loop.

Results are rewritten after each configuration (``OUT/throughput.json`` + ``.md``), and
``--time-budget`` skips what would run past it, so a time cap never loses finished rows.

    python bench/throughput.py --quick --out /tmp/t
    python bench/throughput.py --regimes launch compute --out OUT      # on a GPU
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings

import torch

if not __package__:  # python bench/x.py: the repository root, not bench/, on sys.path
    import _path  # noqa: F401
from bench.harness import (_summarise, command_line, machine_info, timeit_cuda,  # noqa: E402
                           write_results)
from bench.models import count_params, make_model  # noqa: E402
from bench.peers import (diffusers_sample, diffusers_scheduler, flow_matching_sample,  # noqa: E402
                         peer_status, torchdiffeq_sample)
from bench.render import throughput_markdown  # noqa: E402
from bench.telemetry import PowerSampler  # noqa: E402

import bespoke_fast as bf  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
NFE = 10
N_STEPS = 5          # RK2: 2 NFE per step
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_X_FLOOR = 1.03  # the README's claim: within 3% of the model-only floor

# (regime, model, batch, dtype, run torch.compile row)
REGIMES = {
    "launch": [("launch", "unet-2m", 1, "fp32", True), ("launch", "digits", 1, "fp32", False),
               ("launch", "unet-2m", 16, "fp32", False), ("launch", "digits", 16, "fp32", False)],
    "compute": [("compute", "unet-35m", 128, "bf16", True), ("compute", "unet-35m", 128, "fp32", False),
                ("compute", "unet-35m", 256, "bf16", False)],
    "cpu": [("cpu", "digits", 64, "fp32", True), ("cpu", "digits", 256, "fp32", False)],
}
QUICK_REGIMES = {
    "launch": [("launch", "unet-2m", 1, "fp32", True), ("launch", "digits", 16, "fp32", False)],
    "compute": [("compute", "unet-35m", 128, "bf16", True)],
    "cpu": [("cpu", "digits", 64, "fp32", False)],
}
REPS = {  # (warmup, reps)
    "launch": (5, 30), "compute": (2, 10), "cpu": (3, 50),
}
QUICK_REPS = {"launch": (3, 10), "compute": (1, 5), "cpu": (1, 5)}


class Skip(Exception):
    """A row that cannot run here; the message is the note."""


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def _host_time(fn, calls=1):
    """Seconds for ``calls`` calls of ``fn`` (synchronised: the first calls include compile /
    capture, which is host work anyway)."""
    _sync()
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn()
    _sync()
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------- rows
def _sampler_inputs(net, x0, model_dtype):
    """The NFE (state, time) pairs the midpoint sampler feeds the network, recorded from one
    eager run and cast to the model dtype: the floor runs the network on exactly these."""
    seen = []

    def rec(x, t):
        seen.append((x.detach().to(model_dtype).clone(), t.detach().float().contiguous().clone()))
        return net(x, t)
    with torch.no_grad():
        bf.solve(rec, x0, "midpoint", n_steps=N_STEPS)
    return seen


def _graph_floor(net, inputs):
    """The NFE forwards captured in one CUDA graph: the model-only floor on CUDA."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            for x, t in inputs:
                net(x, t)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        for x, t in inputs:
            out = net(x, t)
    return g, out


def build_rows(cfg, net, shape, x0, model_dtype, device, args):
    """``[(row name, factory)]``: ``factory()`` returns ``(fn, info)`` where ``fn()`` runs one
    batch; ``info`` holds setup details; raises :class:`Skip` with the reason."""
    regime, model_name, batch, dname, do_compile = cfg
    solver = bf.BespokeSolver("rk2", N_STEPS).to(device)
    rows = []

    def fast(backend, graph):
        def make():
            if backend == "triton" and device.type != "cuda":
                raise Skip("triton backend timed on CUDA only")
            if graph and device.type != "cuda":
                raise Skip("CUDA graphs need CUDA")
            try:
                s = bf.FastSampler(net, solver, shape, batch, model_dtype=model_dtype,
                                   backend=backend, cuda_graph=graph)
            except ImportError as e:
                raise Skip(f"FastSampler not importable: {e}") from e
            return (lambda: s(x0)), {"sampler": s}
        return make

    rows += [("fast: triton + graph", fast("triton", True), True),
             ("fast: triton", fast("triton", False), True),
             ("fast: reference + graph", fast("reference", True), True),
             ("fast: reference", fast("reference", False), True)]

    def eager():
        def fn():
            with torch.no_grad():
                return solver.sample(net, x0)
        return fn, {}
    rows.append(("eager: BespokeSolver.sample", eager, True))

    def peer(pkg, run):
        def make():
            ok, why = peer_status(pkg)
            if not ok:
                raise Skip(why)

            def fn():
                with torch.no_grad():
                    return run()
            return fn, {}
        return make

    rows.append(("torchdiffeq midpoint", peer("torchdiffeq", lambda: torchdiffeq_sample(
        net, x0, "midpoint", N_STEPS)), True))
    rows.append(("flow_matching midpoint", peer("flow_matching", lambda: flow_matching_sample(
        net, x0, "midpoint", N_STEPS)), True))

    def diffusers_row():
        ok, why = peer_status("diffusers")
        if not ok:
            raise Skip(why)
        sched = diffusers_scheduler("euler", NFE, device=device)

        def fn():
            with torch.no_grad():
                return diffusers_sample(net, x0, "euler", NFE, scheduler=sched)
        return fn, {}
    rows.append(("diffusers FlowMatchEuler", diffusers_row, False))

    def compiled():
        if not do_compile:
            raise Skip("torch.compile row only in the first configuration of each regime "
                       "(compile time)")
        if device.type != "cuda" and not args.cpu_compile:
            raise Skip("CPU: torch.compile row skipped (pass --cpu-compile for mode='default')")
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        torch._dynamo.reset()
        cm = torch.compile(net, mode=mode)

        mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)

        def fn():
            if device.type == "cuda" and mark is not None:
                mark()
            with torch.no_grad():
                return bf.solve(cm, x0, "midpoint", n_steps=N_STEPS)
        return fn, {"setup_calls": 3, "mode": mode}
    rows.append(("compile(reduce-overhead) + midpoint" if device.type == "cuda"
                 else "compile(default) + midpoint", compiled, True))

    def floor():
        inputs = _sampler_inputs(net, x0, model_dtype)
        assert len(inputs) == NFE
        if device.type == "cuda":
            try:
                g, _ = _graph_floor(net, inputs)
                return g.replay, {"floor": "the sampler's NFE forwards in one CUDA graph"}
            except Exception as e:  # pragma: no cover - GPU only
                warnings.warn(f"floor graph capture failed ({e}); timing eager forwards")

        def fn():
            with torch.no_grad():
                for x, t in inputs:
                    out = net(x, t)
            return out
        return fn, {"floor": "the sampler's NFE forwards, plain"}
    rows.append(("floor: NFE x forward", floor, False))
    # the compile row goes last: it is the slowest to set up, so a time cap costs nothing else
    rows.sort(key=lambda r: r[0].startswith("compile"))
    return rows


# ----------------------------------------------------------------------------- one config
def _finish(rec, tm, batch):
    rec.update(median_ms=tm.median_ms, spread_ms=tm.spread_ms, min_ms=tm.min_ms,
               max_ms=tm.max_ms, samples_per_s=batch / (tm.median_ms * 1e-3))
    print(f"   {rec['row']:38s} {tm.median_ms:9.3f} ms (spread {tm.spread_ms:.3f})  "
          f"{rec['samples_per_s']:10.1f} samples/s  setup {rec.get('setup_s', 0):.2f} s", flush=True)


def run_config(cfg, args, machine, records, device, deadline, flush=lambda: None, phase="main"):
    """Time every row of one configuration. ``phase="main"``: all rows but a torch.compile row
    that would really compile; ``phase="compile"``: only that row (run after every main phase,
    so its long compile cannot crowd out the other rows under a time cap)."""
    regime, model_name, batch, dname, do_compile = cfg
    model_dtype = DTYPES[dname]
    net, shape, note = make_model(model_name, device=device, dtype=model_dtype)
    params = count_params(net)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, *shape, generator=g).to(device)
    warmup, reps = (QUICK_REPS if args.quick else REPS)[regime]
    if args.reps:
        reps = args.reps
    base = dict(kind="result", regime=regime, model=model_name, params=params, shape=list(shape),
                batch=batch, dtype=dname, device=str(device), nfe=NFE, warmup=warmup, reps=reps,
                machine=machine, git_commit=machine["git_commit"], model_note=note,
                timer=("cuda events (no L2 flush)" if device.type == "cuda" else "perf_counter"))
    rows = build_rows(cfg, net, shape, x0, model_dtype, device, args)
    compiles = do_compile and (device.type == "cuda" or args.cpu_compile)
    if phase == "compile":
        rows = [r for r in rows if r[0].startswith("compile")]
    elif compiles:
        rows = [r for r in rows if not r[0].startswith("compile")]
    out_rows, pending = [], []
    with torch.no_grad():  # the eager output, to check every midpoint-equivalent row against
        ref_out = bf.BespokeSolver("rk2", N_STEPS).to(device).sample(net, x0).float()
    print(f"== {regime}: {model_name} ({params:,} params) batch {batch} {dname} on {device}",
          flush=True)
    for name, make, midpoint_like in rows:
        rec = dict(base, row=name)
        if time.perf_counter() > deadline:
            rec.update(note=f"skipped: --time-budget {args.time_budget:.0f} s reached")
            out_rows.append(rec)
            records.append(rec)
            continue
        try:
            fn, info = make()
        except Skip as e:
            rec.update(note=str(e))
            out_rows.append(rec)
            records.append(rec)
            print(f"   {name:38s} skipped: {e}", flush=True)
            continue
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                mem0 = torch.cuda.memory_allocated()
            setup_s, out = _host_time(fn, info.get("setup_calls", 1))
            rec["setup_s"] = setup_s
            if "sampler" in info:
                st = info["sampler"].stats()
                rec["capture_s"] = st.get("capture_seconds_total")
                rec["capture_failures"] = st.get("capture_failures") or None
                rec["backend"] = st.get("backend")
            if info.get("floor"):
                rec["floor_method"] = info["floor"]
            if midpoint_like and out is not None:
                rec["max_abs_diff_vs_eager"] = float((out.float() - ref_out).abs().max())
            if device.type == "cuda":
                tm = timeit_cuda(fn, warmup=warmup, reps=reps, flush_l2=False)
                rec["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
                rec["extra_mem_mib"] = (torch.cuda.max_memory_allocated() - mem0) / 2**20
                # telemetry over a loop long enough for NVML's power average; synchronise
                # only every ~0.1 s of work so the loop stays back to back
                chunk = max(1, int(0.1 / max(tm.median_ms * 1e-3, 1e-6)))
                calls = 0
                with PowerSampler(device=device) as ps:
                    t0 = time.perf_counter()
                    while time.perf_counter() - t0 < args.telemetry_seconds:
                        for _ in range(chunk):
                            fn()
                        calls += chunk
                        _sync()
                rec["telemetry"] = ps.result(num_samples=calls * batch)
            else:
                # CPU: timed below, round-robin over the rows, so that load from other
                # processes on a shared machine hits every row alike
                pending.append((rec, fn))
                print(f"   {name:38s} set up in {setup_s:.2f} s", flush=True)
                out_rows.append(rec)
                records.append(rec)
                continue
            _finish(rec, tm, batch)
        except Exception as e:  # a row failing must not lose the others
            rec.update(note=f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"   {name:38s} FAILED: {e}", flush=True)
        out_rows.append(rec)
        records.append(rec)
        flush()
        fn = info = out = None  # drop this row's sampler / graph before the next row
    if pending:
        times = {id(rec): [] for rec, _ in pending}
        failed = set()
        with PowerSampler() as ps:
            for k in range(warmup + reps):
                for rec, fn in pending:
                    if id(rec) in failed:
                        continue
                    try:
                        t0 = time.perf_counter()
                        fn()
                        if k >= warmup:
                            times[id(rec)].append((time.perf_counter() - t0) * 1e3)
                    except Exception as e:
                        failed.add(id(rec))
                        rec.update(note=f"failed: {type(e).__name__}: {e}")
        tel = ps.result()
        floor_rec = next((rec for rec, _ in pending if rec["row"].startswith("floor")), None)
        for rec, _ in pending:
            if times[id(rec)] and id(rec) not in failed:
                rec["telemetry"] = tel
                rec["timer"] = "perf_counter, rows interleaved round-robin"
                _finish(rec, _summarise(times[id(rec)], warmup), batch)
                ft = times.get(id(floor_rec)) if floor_rec is not None else None
                if ft and len(ft) == len(times[id(rec)]):
                    # paired: each round times every row back to back, so the per-round ratio
                    # cancels the load drift of a shared CPU; its median is the robust figure
                    ratios = sorted(a / b for a, b in zip(times[id(rec)], ft))
                    rec["x_floor_paired"] = ratios[len(ratios) // 2]
        pending.clear()
    same = lambda r: (r.get("kind") == "result" and r["row"].startswith("floor")  # noqa: E731
                      and (r["regime"], r["model"], r["batch"], r["dtype"])
                      == (regime, model_name, batch, dname))
    floor = next((r for r in out_rows + records if same(r)), {})
    floor_ms, floor_min = floor.get("median_ms"), floor.get("min_ms")
    for r in out_rows:
        if floor_ms and r.get("median_ms"):
            r["x_floor_of_medians"] = r["median_ms"] / floor_ms
            r["x_floor"] = r.get("x_floor_paired", r["x_floor_of_medians"])
            r["x_floor_min"] = r["min_ms"] / floor_min
            r["floor_ms"] = floor_ms
        tgt_row = "fast: triton + graph" if device.type == "cuda" else "fast: reference"
        if r["row"] == tgt_row and r.get("x_floor") is not None:
            r["target"] = f"<= {TARGET_X_FLOOR}x floor"
            r["meets_target"] = r["x_floor"] <= TARGET_X_FLOOR
    flush()
    del net, x0
    if HAS_CUDA:
        torch.cuda.empty_cache()


def _guarded(cfg, args, machine, records, device, deadline, flush, phase="main"):
    """One configuration; a failure in its setup (the model, the solver, the reference run) is
    recorded as a note and the next configuration runs."""
    try:
        run_config(cfg, args, machine, records, device, deadline, flush=flush, phase=phase)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        records.append({"kind": "note", "text": f"{cfg[:4]} ({phase}) failed in setup: "
                                                f"{type(e).__name__}: {first}"})
        print(f"== {cfg[:4]} FAILED in setup: {type(e).__name__}: {first}", flush=True)
        flush()
        if HAS_CUDA:
            torch.cuda.empty_cache()


def header(args, device):
    return [f"* command: `{command_line()}`",
            f"* device {device}; NFE {NFE} (Bespoke RK2 n={N_STEPS} at identity = midpoint; "
            f"diffusers Euler: 10 steps); regimes {args.regimes}"
            + (" (QUICK run)" if args.quick else "")
            + (f"; torch CPU threads {torch.get_num_threads()}" if str(device) == "cpu" else ""),
            "* compute-bound bf16: FastSampler runs the bf16 net on bf16 inputs (fp32 state); "
            "the other rows pass the fp32 state and the net casts inside (as a user would)."]


def default_out():
    tag = "gpu" if HAS_CUDA else "cpu"
    return os.path.join("bench", "results", f"{datetime.date.today().isoformat()}-{tag}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default bench/results/<date>-<cpu|gpu>)")
    p.add_argument("--regimes", nargs="+", default=None, choices=list(REGIMES),
                   help="default: launch compute cpu with CUDA, cpu without")
    p.add_argument("--quick", action="store_true", help="one or two configurations per regime, few reps")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default per regime)")
    p.add_argument("--telemetry-seconds", type=float, default=None,
                   help="length of the NVML telemetry loop per row (default 1.0, quick 0.3)")
    p.add_argument("--time-budget", type=float, default=1e9,
                   help="seconds; rows that would start after it are skipped with a note")
    p.add_argument("--cpu-compile", action="store_true",
                   help="on CPU, also time torch.compile(mode='default') (slow to compile)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared CPU, oversubscribed OpenMP "
                        "threads spin and distort every row; 0 keeps torch's default)")
    p.add_argument("--name", default="throughput", help="output file stem (default: %(default)s)")
    args = p.parse_args(argv)
    if args.regimes is None:
        args.regimes = ["launch", "compute", "cpu"] if HAS_CUDA else ["cpu"]
    if args.telemetry_seconds is None:
        args.telemetry_seconds = 0.3 if args.quick else 1.0
    args.out = args.out or default_out()
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    deadline = start + args.time_budget
    machine = machine_info()
    records = []
    table = QUICK_REGIMES if args.quick else REGIMES

    def flusher(d):
        return lambda: write_results(args.out, args.name, records,
                                     throughput_markdown(records, header_lines=header(args, d)))

    regimes = []
    for regime in args.regimes:
        cuda_regime = regime in ("launch", "compute")
        if cuda_regime and not HAS_CUDA:
            records.append({"kind": "note", "text": f"regime {regime!r} skipped: needs CUDA "
                                                    f"(gpu: unavailable)"})
            print(f"regime {regime} skipped: no CUDA", flush=True)
            continue
        regimes.append((regime, cuda_regime, torch.device("cuda" if cuda_regime else "cpu")))
    for regime, _, device in regimes:
        for cfg in table[regime]:
            if time.perf_counter() > deadline:
                records.append({"kind": "note", "text": f"{cfg[:4]} skipped: time budget reached"})
                continue
            _guarded(cfg, args, machine, records, device, deadline, flusher(device))
    # torch.compile rows after EVERY regime's other rows: a cold compile takes a minute or more,
    # so under a time cap it may cost only compile rows (see run_config)
    for regime, cuda_regime, device in regimes:
        for cfg in table[regime]:
            if cfg[4] and (cuda_regime or args.cpu_compile):
                if time.perf_counter() > deadline:
                    records.append({"kind": "note", "text": f"{cfg[:4]} torch.compile row "
                                                            f"skipped: time budget reached"})
                    continue
                _guarded(cfg, args, machine, records, device, deadline, flusher(device),
                         phase="compile")
    if HAS_CUDA and torch.backends.cuda.matmul.allow_tf32 is False:
        records.append({"kind": "note", "text": "fp32 matmuls without TF32 (torch default); "
                                                "cuDNN convolutions may use TF32 "
                                                f"(allow_tf32={torch.backends.cudnn.allow_tf32})"})
    records.append({"kind": "note", "text": f"total wall time {time.perf_counter() - start:.0f} s"})
    dev = "cuda" if HAS_CUDA else "cpu"
    jpath, mpath = write_results(args.out, args.name, records,
                                 throughput_markdown(records, header_lines=header(args, dev)))
    print(f"wrote {jpath} and {mpath}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
