"""Integrations with other libraries (each behind its own extra).

* :mod:`bespoke_fast.integrations.diffusers` (``pip install bespoke_fast[diffusers]``): fit a
  solver to a diffusers pipeline, use it as a diffusers scheduler, or sample the pipeline with
  the whole-loop fast path.
"""
