"""Fused Triton kernels for the solver updates (installed as ``bespoke_fast.kernels``).

The kernels live in the repository's top-level ``kernels/`` folder, as
``kernels/bespoke_fast_kernels/``, and install as this subpackage (setup.py ``package_dir``).
``kernels/`` itself is no package, so it never shadows an installed package named ``kernels``
(Hugging Face's kernel hub, which transformers imports) when the repository root is on
``sys.path``. Each op matches a torch reference importable without
Triton (``bespoke_fast.ops.rk`` and ``bespoke_fast.ops.bns``, which also dispatch to it) and
reads its scalars from a device table by step index (``bespoke_fast.ops.table``). ``launch``
holds what the launchers share; ``aot`` compiles the engine's launch plans ahead of time.
Importing this package queries no GPU. On a CPU-only machine set ``TRITON_INTERPRET=1`` before
importing it to run the kernels through Triton's interpreter.
"""
from .bespoke_rk import rk1_step, rk2_stage1, rk2_stage2
from .bns import bns_step

__all__ = ["rk1_step", "rk2_stage1", "rk2_stage2", "bns_step"]
