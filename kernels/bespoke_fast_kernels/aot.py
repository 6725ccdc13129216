"""Ahead-of-time compile of every kernel variant the engine launches, for a GPU that is not here.

Triton's NVIDIA backend ships ``ptxas`` and ``cuobjdump``, so a cubin for sm_90 / sm_80 can be
built and inspected on a machine without a GPU. The variants are not listed by hand: the
engine (``FastSampler``, backend ``"triton"``) runs on ``meta`` tensors for every solver kind,
model dtype and guidance setting while the kernel launchers RECORD their launch plans
(:func:`record_launches`) instead of launching; each distinct plan is compiled with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` through the same argument
specialisation the JIT uses at a launch (pointer alignment, ``N % 16``). So the constexprs,
block size and warps compiled here are those the launchers choose.

For each compiled variant it reads, from the cubin: registers and local memory (spills) via
``cuobjdump -res-usage``, and the global / shared memory instructions via ``cuobjdump -sass``.

    python -m bespoke_fast.kernels.aot --arch 90 80 --out aot.json

Needs the kernels compiled for real: run it with ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from .launch import INTERPRETED, record_launches

__all__ = ["record_launches", "engine_plans", "compile_plan", "inspect_cubin", "compile_all",
           "markdown", "IMAGE_CASE"]

# The aligned image-size case: batch 64 of 3x32x32 (196,608 elements, a multiple of 16).
IMAGE_CASE = (64, (3, 32, 32))
# One small, unaligned state per block size the rule can choose (128 ... 4096 elements).
BLOCK_SWEEP = (1, 3, 7, 15, 31, 63)  # batch sizes of a (1, 8, 8) state (64 elements each)


class _Probe(torch.nn.Module):
    """A stand-in network: returns a tensor like its input, in the input's dtype."""

    def forward(self, x, t, **extras):
        return x * 0.5


def engine_plans(batch: int, shape, kinds=("rk1", "rk2", "bns"),
                 model_dtypes=(torch.float32, torch.bfloat16, torch.float16),
                 guidance=(False, True)) -> list:
    """The launch plans of one ``FastSampler`` call for each configuration, on meta tensors."""
    from bespoke_fast.engine import FastSampler
    from bespoke_fast.models import cfg
    from bespoke_fast.solvers.bespoke import BespokeSolver
    from bespoke_fast.solvers.bns import NonStationarySolver

    meta = torch.device("meta")
    plans = []
    for kind in kinds:
        solver = NonStationarySolver(2) if kind == "bns" else BespokeSolver(kind, 2)
        for dtype in model_dtypes:
            for guided in guidance:
                model = cfg(_Probe(), 2.0, cond_key="y") if guided else _Probe()
                extras = {"y": torch.zeros(batch, dtype=torch.long, device=meta)} if guided else {}
                sampler = FastSampler(model, solver, shape, batch, model_dtype=dtype,
                                      backend="triton", device=meta,
                                      guidance=2.0 if guided else None)
                with record_launches() as got:
                    sampler(torch.empty(batch, *shape, device=meta), **extras)
                plans += [(f"{kind}/{str(dtype)[6:]}{'+cfg' if guided else ''}", p) for p in got]
    return plans


def _specialize(kernel, args, meta, target):
    """What ``kernel[grid](*args, **meta)`` would compile for ``target``: the JIT's own binder
    (argument types, 16-byte alignment of pointers, ``int % 16``) and argument packing."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound,
                                                              specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options, signature


def compile_plan(plan, arch: int):
    """``(compiled kernel, signature)`` of a :class:`LaunchPlan` for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    src, options, signature = _specialize(plan.kernel, plan.args, plan.meta, target)
    return triton.compile(src, target=target, options=options.__dict__), signature


def _cuobjdump(args, cubin: bytes) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([knobs.nvidia.cuobjdump.path, *args, path], capture_output=True,
                              text=True, check=True).stdout


def inspect_cubin(cubin: bytes, sass: bool = True) -> dict:
    """Registers and local memory (spills: ptxas puts them in local memory) from
    ``cuobjdump -res-usage``; with ``sass``, the global / shared memory instructions and
    barriers of ``cuobjdump -sass`` (about a second per cubin)."""
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump(["-res-usage"], cubin)))
    out = {"registers": int(usage["REG"]), "local_bytes": int(usage["LOCAL"]),
           "stack_bytes": int(usage["STACK"])}
    if sass:
        text = _cuobjdump(["-sass"], cubin)
        ops: dict = {}
        for op in re.findall(r"\b((?:LDG|STG|LDS|STS)(?:\.[A-Z0-9_]+)*)", text):
            ops[op] = ops.get(op, 0) + 1
        out.update(memory_ops=ops, bar_sync=len(re.findall(r"\bBAR\.SYNC", text)))
    return out


def _key(plan):
    """What makes two plans compile differently: argument types, ``int % 16`` of the integer
    arguments the JIT specialises on (not ``do_not_specialize`` ones like the step index),
    constexprs and warps."""
    sig = tuple((type(a).__name__, getattr(a, "dtype", None),
                 a % 16 == 0 if isinstance(a, int) and not p.do_not_specialize else None)
                for a, p in zip(plan.args, plan.kernel.params))
    return (plan.kernel.fn.__name__, sig, tuple(sorted(plan.meta.items())))


def compile_all(archs=(90, 80), log=print) -> list:
    """Compile every distinct plan the engine launches for each arch: the aligned image-size
    case with every kind, model dtype and guidance setting (with the SASS inspected), and every
    block size of the launch rule (first arch only; registers and spills). One record per
    (variant, arch)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(f"image {IMAGE_CASE[0]}x{IMAGE_CASE[1]}", archs, p)
             for p in engine_plans(*IMAGE_CASE)]
    for b in BLOCK_SWEEP:
        cases += [(f"block sweep {b}x(1, 8, 8)", archs[:1], p) for p in engine_plans(
            b, (1, 8, 8), kinds=("rk2", "bns"), model_dtypes=(torch.bfloat16,), guidance=(True,))]
    seen, records, cubins = set(), [], []
    for case, case_archs, (config, plan) in cases:
        key = _key(plan)
        if key in seen:
            continue
        seen.add(key)
        for arch in case_archs:
            t0 = time.perf_counter()
            kernel, signature = compile_plan(plan, arch)
            records.append({
                "case": case, "config": config, "kernel": plan.kernel.fn.__name__, "arch": arch,
                "signature": signature,
                "constexprs": {k: v for k, v in plan.meta.items() if k != "num_warps"},
                "num_warps": plan.meta["num_warps"], "n": plan.args[-1],
                "aligned": plan.args[-1] % 16 == 0,
                "cubin_bytes": len(kernel.asm.get("cubin", b"")),
                "shared_bytes": kernel.metadata.shared,
                "compile_s": round(time.perf_counter() - t0, 3)})
            cubins.append((kernel.asm["cubin"], case.startswith("image")))
    # cuobjdump is a subprocess: inspect the cubins concurrently
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        found = list(pool.map(lambda c: inspect_cubin(*c), cubins))
    for rec, info in zip(records, found):
        rec.update(info)
        ops = " ".join(f"{k}x{v}" for k, v in sorted(rec.get("memory_ops", {}).items()))
        log(f"sm_{rec['arch']} {rec['kernel']:20s} {rec['config']:16s} "
            f"BLOCK={rec['constexprs']['BLOCK']:<5d} warps={rec['num_warps']} "
            f"regs={rec['registers']:3d} local={rec['local_bytes']} "
            f"shared={rec['shared_bytes']:5d} {ops}")
    return records


def markdown(records: list) -> str:
    """A table of the compiled variants: one row per (variant, arch)."""
    import triton
    lines = [f"# Ahead-of-time compile of the engine's kernels (triton {triton.__version__}, no GPU)",
             "", f"{len(records)} compiled variants; registers and local memory (spills) from "
             "`cuobjdump -res-usage`, memory instructions from `cuobjdump -sass` (image case).",
             "", "| case | config | kernel | arch | BLOCK | warps | model_in | regs | spill bytes "
             "| shared B | global / shared memory instructions |", "|" + "---|" * 11]
    for r in records:
        c = r["constexprs"]
        mi = ("none" if not c["HAS_MODEL_IN"] else "twice" if c["MODEL_IN_TWICE"] else "once")
        ops = " ".join(f"{k} x{v}" for k, v in sorted(r.get("memory_ops", {}).items())) or "-"
        lines.append(f"| {r['case']} | {r['config']} | {r['kernel']} | sm_{r['arch']} | "
                     f"{c['BLOCK']} | {r['num_warps']} | {mi} | {r['registers']} | "
                     f"{r['local_bytes'] + r['stack_bytes']} | {r['shared_bytes']} | {ops} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80],
                   help="compute capabilities to compile for (default: 90 80)")
    p.add_argument("--out", default=None, help="write the records as JSON here")
    p.add_argument("--md", default=None, help="write a Markdown table here")
    args = p.parse_args(argv)
    if INTERPRETED:
        print("aot: TRITON_INTERPRET=1 is set: the kernels are interpreted, not compiled; "
              "unset it and rerun", file=sys.stderr)
        return 2
    records = compile_all(args.arch)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(markdown(records))
    per_arch = {a: sum(r["arch"] == a for r in records) for a in args.arch}
    print(f"{len(records)} compiled variants: " + ", ".join(f"sm_{a}: {n}" for a, n in per_arch.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
