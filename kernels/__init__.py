"""Fused Triton kernels for the solver updates (installed as ``bespoke_fast.kernels``).

Each op matches a torch reference importable without Triton (``bespoke_fast.ops`` and
``bespoke_fast.ops_bns``) and reads its scalars from a device table by step index.
Importing this package queries no GPU. On a CPU-only machine set ``TRITON_INTERPRET=1`` before
importing it to run the kernels through Triton's interpreter.
"""
from .bespoke_rk import rk1_step, rk2_stage1, rk2_stage2
from .bns import bns_step

__all__ = ["rk1_step", "rk2_stage1", "rk2_stage2", "bns_step"]
