"""Ahead-of-time compile, in CI, of every kernel variant the engine launches, for sm_90 and
sm_80 (``bespoke_fast.kernels.aot``; Triton's bundled ptxas / cuobjdump, no GPU). The compile
runs once, in a subprocess WITHOUT ``TRITON_INTERPRET`` (the root conftest sets it for this
process, and interpreted kernels cannot be compiled)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.aot

ARCHS = (90, 80)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvidia_backend_missing():
    try:
        from triton import knobs
        from triton.backends.nvidia import compiler  # noqa: F401
        tool = knobs.nvidia.cuobjdump.path
    except Exception as e:  # no triton, or a build without the NVIDIA backend
        return f"the installed triton has no NVIDIA backend ({type(e).__name__}: {e})"
    return None if tool and os.path.exists(tool) else "triton's NVIDIA backend lacks cuobjdump"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    reason = _nvidia_backend_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; silences its warning
    proc = subprocess.run([sys.executable, "-m", "bespoke_fast.kernels.aot", "--arch",
                           *map(str, ARCHS), "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_engine_variant_compiles_to_a_cubin_for_both_archs(records):
    image = [r for r in records if r["case"].startswith("image")]
    variants = {a: {(r["kernel"], r["config"], json.dumps(r["constexprs"], sort_keys=True))
                    for r in image if r["arch"] == a} for a in ARCHS}
    assert variants[90] == variants[80] and variants[90]
    configs = {r["config"] for r in image}
    for kind in ("rk1", "rk2", "bns"):
        for dtype in ("float32", "bfloat16", "float16"):
            for cfg in ("", "+cfg"):
                assert f"{kind}/{dtype}{cfg}" in configs
    kernels = {r["kernel"] for r in image}
    assert kernels == {"_rk1_step_kernel", "_rk2_stage2_kernel", "_bns_step_kernel"}
    # with and without the model-input write, once and twice (guidance)
    flags = {(r["kernel"], r["constexprs"]["HAS_MODEL_IN"], r["constexprs"]["MODEL_IN_TWICE"])
             for r in image}
    for k in kernels:
        assert {(k, False, False), (k, True, False), (k, True, True)} <= flags, k
    assert all(r["cubin_bytes"] > 0 for r in records)


def test_every_block_size_of_the_launch_rule_is_compiled(records):
    from bespoke_fast.kernels.launch import launch_config
    rule = {launch_config(2 ** k) for k in range(0, 32)}
    compiled = {(r["constexprs"]["BLOCK"], r["num_warps"]) for r in records}
    assert rule == compiled, (rule, compiled)


def test_no_spills(records):
    bad = [(r["kernel"], r["config"], r["arch"], r["local_bytes"], r["stack_bytes"])
           for r in records if r["local_bytes"] or r["stack_bytes"]]
    assert not bad
    # <= 64 registers per thread: at least 1,024 resident threads per SM (65,536 registers)
    assert max(r["registers"] for r in records) <= 64


def test_128_bit_global_loads_and_stores_in_the_aligned_image_case(records):
    for r in records:
        if not r["case"].startswith("image"):
            continue
        assert r["aligned"]
        ops = r["memory_ops"]
        stores = {k for k in ops if k.startswith("STG")}
        loads = {k for k in ops if k.startswith("LDG")}
        where = (r["kernel"], r["config"], r["arch"], ops)
        assert stores == {"STG.E.128"}, where
        assert loads <= {"LDG.E.128", "LDG.E"} and "LDG.E.128" in loads, where
        # the only narrow loads are the table's scalars (a, b[, w]; c, d, e[, w]; a, b_ij)
        assert ops.get("LDG.E", 0) <= 4, where


# H100/H200 figures used to bound the mixed-dtype reshuffle: shared memory moves 128 B/clock
# per SM; HBM gives each SM 3.35 TB/s / 132 SMs / 1.98 GHz = 12.8 B/clock (H100 SXM; the H200
# has more, 4.8 TB/s: 18.4 B/clock, the bound below uses it).
SMEM_BYTES_PER_CLOCK, HBM_BYTES_PER_CLOCK = 128.0, 18.4
SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024}


def test_mixed_dtype_reshuffle_costs_no_occupancy_and_little_time(records):
    """fp32-only variants use no shared memory. The low-precision (bf16/fp16 model) variants
    move the fp32 result through shared memory once: Triton stores at most 128 bits per thread,
    so the fp32 store takes 4 elements per thread while the 16-bit loads and stores take 8. From
    the compiled code: at most 8 KB per block, which does not cut the blocks per SM (threads
    limit them first), and per element the shared traffic takes < 15% of the time the kernel's
    own HBM traffic takes (on a pipe that overlaps with it)."""
    for r in records:
        if not r["case"].startswith("image"):
            continue
        low = "float32" not in r["config"]
        if not low:
            assert r["shared_bytes"] == 0 and not any(k.startswith(("LDS", "STS"))
                                                      for k in r["memory_ops"]), r
            continue
        threads = 32 * r["num_warps"]
        blocks_by_threads = 2048 // threads
        assert r["shared_bytes"] <= 8192
        assert blocks_by_threads * r["shared_bytes"] <= SMEM_PER_SM[r["arch"]]
        ops = r["memory_ops"]
        smem_bytes = 16 * threads * sum(v for k, v in ops.items()
                                        if k.startswith(("LDS", "STS")))
        smem_per_elem = smem_bytes / r["constexprs"]["BLOCK"]
        hbm_per_elem = 4 + 4 + 2  # at least: read x, write x (fp32), read u (16-bit)
        assert (smem_per_elem / SMEM_BYTES_PER_CLOCK) < 0.15 * (hbm_per_elem / HBM_BYTES_PER_CLOCK), r
