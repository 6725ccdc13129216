"""Small shared fixtures for the test-suite (importable as ``tests.helpers``)."""
import os

import pytest
import torch

from bespoke_fast.models import GaussianMixtureFlow


# bench/gpu_check.sh sets it: the kernels compile for the GPU, and they MUST be there
GPU_RUN = os.environ.get("BESPOKE_FAST_GPU_TESTS") == "1"


def require_kernels():
    """Import ``bespoke_fast.kernels``: on a GPU run (``BESPOKE_FAST_GPU_TESTS=1``) a missing or
    broken triton is an ERROR (a GPU run whose kernel tests silently skip would report "ok");
    elsewhere the calling test module is skipped."""
    import pytest
    try:
        from bespoke_fast import kernels
    except Exception as e:  # ImportError, or triton failing to initialise
        if GPU_RUN:
            raise RuntimeError(f"BESPOKE_FAST_GPU_TESTS=1 but bespoke_fast.kernels does not import "
                               f"({type(e).__name__}: {e}): the GPU run needs triton") from e
        pytest.skip(f"triton is not importable ({type(e).__name__}: {e})", allow_module_level=True)
    return kernels


def smooth_gmm(dim=8, k=4, path="fm-ot", seed=0, std_range=(0.3, 0.6)):
    """A float64 mixture flow that is smooth enough for clean convergence-order measurements."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64)
    lo, hi = std_range
    stds = lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64)
    return GaussianMixtureFlow(means, stds, path=path)


def noise(b, *shape, seed=1, dtype=torch.float64):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class StandInCuda:
    """A stand-in ``torch.cuda`` for FastSampler's graph path on CPU: streams, events and
    ``synchronize`` do nothing; a "capture" (``torch.cuda.graph``) runs its body under the
    capture checker (``bespoke_fast.capture.HostSyncDetector``, strict, every tensor counted as
    a device tensor), so anything a real capture rejects raises there, as on a GPU; "replay"
    reruns the captured state's loop. Records what the engine asked for: capture error modes,
    streams made and set, graphs reset after a failed capture, and the private pools closed and
    released by hand (as a real ``reset()`` does not for a capture that never ended);
    ``capturing`` is True inside a capture.

    Use ``cuda = StandInCuda(monkeypatch); sampler = cuda.attach(FastSampler(...))``.
    """

    def __init__(self, monkeypatch):
        import contextlib

        from bespoke_fast.engine import sampler as engine
        from bespoke_fast.capture import HostSyncDetector

        self.modes, self.streams, self.resets, self.replays, self.problems = [], [], 0, 0, []
        self.capturing, self.set_streams = False, []
        self.pools, self.closed_pools, self.released_pools = [], [], []
        outer = self

        class Stream:
            def __init__(self, device=None, made=True):
                if made:
                    outer.streams.append(self)

            def wait_stream(self, other):
                pass

        current = Stream(made=False)

        class Graph:
            ended = False

            def pool(self):  # as CUDAGraph.pool(): only after a capture that ended
                if not self.ended:
                    raise RuntimeError("Called CUDAGraph::pool() without a preceding successful "
                                       "capture.")
                return self.capture_pool

            def replay(self):
                outer.replays += 1
                state = next(s for s in outer.sampler._states.values() if s.graph is self)
                outer.sampler._loop(state)

            def reset(self):
                outer.resets += 1

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None, capture_error_mode="global"):
            outer.modes.append(capture_error_mode)
            g.capture_pool = pool
            detector = HostSyncDetector(device_types=None, strict=True)
            outer.capturing = True
            try:
                with detector:
                    yield
                g.ended = True
            finally:
                outer.capturing = False
                outer.problems += detector.problems

        def graph_pool_handle():
            outer.pools.append((0, len(outer.pools) + 1))
            return outer.pools[-1]

        for name, value in dict(device=lambda d=None: contextlib.nullcontext(),
                                stream=lambda s=None: contextlib.nullcontext(),
                                current_stream=lambda d=None: current, Stream=Stream,
                                CUDAGraph=Graph, graph=graph, set_stream=outer.set_streams.append,
                                synchronize=lambda d=None: None, current_device=lambda: 0,
                                graph_pool_handle=graph_pool_handle,
                                empty_cache=lambda: None).items():
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool",
                            lambda index, pool: outer.closed_pools.append(pool), raising=False)
        monkeypatch.setattr(torch._C, "_cuda_releasePool",
                            lambda index, pool: outer.released_pools.append(pool), raising=False)
        monkeypatch.setattr(engine, "_SIDE_STREAMS", {})  # no stream left from another test

    def attach(self, sampler):
        self.sampler = sampler
        sampler.use_graph = True  # as on a CUDA device
        return sampler


def gmm_trajectories(out, num, batch_size):
    """``(flow, GT set)``: ``num`` trajectories of the smooth 16-dim mixture the trainer tests
    fit (seed 0, no interpolation measurement), stored in ``out``."""
    import bespoke_fast as bf
    flow = smooth_gmm(dim=16, k=6, std_range=(0.1, 0.3))
    bf.generate_trajectories(flow, num, (16,), out, seed=0, batch_size=batch_size, progress=False,
                             measure_interpolation=0)
    return flow, bf.load_trajectories(out)


def run_twice_expecting_one_fallback(sampler, x0, reason):
    """Call ``sampler(x0)`` twice when its capture fails: exactly one "could not capture" warning
    naming ``reason``, then eager runs. Returns ``(first, second, sampler.stats())``."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = sampler(x0), sampler(x0)
    msgs = [str(w.message) for w in caught if "could not capture" in str(w.message)]
    assert len(msgs) == 1 and reason in msgs[0], msgs
    stats = sampler.stats()
    assert (stats["captures"], stats["replays"], stats["eager_runs"]) == (0, 0, 2)
    return first, second, stats


def perturbed(solver, seed=0, scale=0.05):
    """``solver`` with ``scale * N(0, 1)`` added to every parameter (seeded; in place):
    a non-trivial learned solver for tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return solver


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: import it there and set
    ``pytestmark = pytest.mark.usefixtures("one_thread")``. On a shared 2-core machine two OpenMP
    threads next to other jobs ran ~10x slower than one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
