"""Integrations with other libraries (each behind its own extra).

* :mod:`bespoke_fast.integrations.diffusers` (``pip install bespoke_fast[diffusers]``): fit a
  solver to a diffusers pipeline, use it as a diffusers scheduler, or sample the pipeline with
  the whole-loop fast path.
* :mod:`bespoke_fast.integrations.k_diffusion` (no extra: only k-diffusion's calling convention):
  a k-diffusion denoiser as a velocity model to fit, and a fitted solver as a k-diffusion
  sampler function ``sample_bespoke(model, x, sigmas, ...)``.
"""
