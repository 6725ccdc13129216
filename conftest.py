"""Root pytest configuration.

TRITON_INTERPRET must be set before any Triton kernel is *defined* (decorated), so it is set
here, at collection start, when no CUDA device is available: CPU-only machines then run the
real kernels through Triton's interpreter on CPU tensors.
"""
import os

if os.environ.get("BESPOKE_FAST_GPU_TESTS") != "1":
    # GPU runs set BESPOKE_FAST_GPU_TESTS=1 (bench/gpu_check.sh) to compile kernels for real.
    os.environ.setdefault("TRITON_INTERPRET", "1")
