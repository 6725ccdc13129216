"""The solver-update ops, one module per solver kind; each reference (pure torch) op sits beside
the dispatch to its Triton twin in ``bespoke_fast.kernels`` (imported by name where it is used:
triton is optional).

* ``ops.rk``: Bespoke RK1 / RK2 steps (``rk1_step``, ``rk2_stage1``, ``rk2_stage2`` and their
  ``*_ref``), ``guidance_combine_ref``;
* ``ops.bns``: the non-stationary step (``bns_step``, ``bns_step_ref``);
* ``ops.table``: the device-table layouts of both kinds (the one place they are documented);
* ``ops.backend``: ``"reference"`` / ``"triton"`` / ``"auto"``.
"""
from .backend import resolve_backend, triton_available
from .bns import bns_step, bns_step_ref
from .rk import (guidance_combine_ref, rk1_step, rk1_step_ref, rk2_stage1, rk2_stage1_ref,
                 rk2_stage2, rk2_stage2_ref, write_model_in)

__all__ = ["rk1_step", "rk2_stage1", "rk2_stage2", "rk1_step_ref", "rk2_stage1_ref",
           "rk2_stage2_ref", "guidance_combine_ref", "write_model_in", "bns_step", "bns_step_ref",
           "resolve_backend", "triton_available"]
