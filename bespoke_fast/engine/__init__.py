"""The fast sampler (:class:`FastSampler`, ``engine/sampler.py``): capture, graph cache, padding,
streaming and stats; and one program per solver kind (``engine/rk.py``, ``engine/bns.py``,
interface in ``engine/program.py``) that owns its device table, its buffers and its loop."""
from .sampler import PROGRAMS, FastSampler

__all__ = ["FastSampler", "PROGRAMS"]
