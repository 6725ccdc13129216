"""The peer samplers: the same ODE solved by other libraries, each driven from OUR velocity model
``model(x, t[B]) -> u`` (flow time t: noise at 0, data at 1).

Used by quality.py, throughput.py, cpu_sampling.py and tests/test_bench_peers.py. A peer whose
package is missing is reported as unavailable (with the reason, :func:`peer_status`), never
imported at module import time: this module needs only torch.

Conventions of the peers (checked in tests/test_bench_peers.py):

* torchdiffeq ``odeint(f, x0, t_grid, method)``: ``f(t, x)`` with a 0-d time; fixed-grid
  methods step exactly on ``t_grid`` (no step_size given). Its "rk4" is the 3/8-rule variant
  (``rk4_alt_step_func``), not the classic RK4 of ``bespoke_fast.solve(..., "rk4")``.
* flow_matching ``ODESolver(velocity_model).sample(x_init, step_size, method, time_grid)``: calls
  ``velocity_model(x=x, t=t)`` with a 0-d t and runs torchdiffeq with ``options={"step_size":
  step_size}`` (grid ``k * step_size``, last point clamped to 1).
* diffusers flow schedulers: sigma = 1 - t (data at sigma = 0), the model output they expect
  ("flow_prediction") is d x / d sigma = noise - data = MINUS our velocity, evaluated at
  t = 1 - sigma. We feed the model the exact float ``1 - scheduler.sigmas[i]`` (DPM/UniPC store
  integer ``timesteps``; a real pipeline would feed those, slightly coarser).

Example (the ``PEERS`` table: name -> :class:`Peer`; ``x0 [B, ...]`` noise, ``nfe`` a multiple of
the peer's ``per_step``)::

    from bench.peers import PEERS, peer_status
    peer = PEERS["torchdiffeq-midpoint"]
    if peer_status(peer.package)[0]:
        x1 = peer.run(model, x0, 10)      # [B, ...], 10 model calls
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

__all__ = ["peer_status", "torchdiffeq_sample", "flow_matching_sample", "diffusers_scheduler",
           "diffusers_sample", "Peer", "PEERS", "DIFFUSERS_SCHEDULERS"]


def peer_status(package: str) -> tuple:
    """(available, note) for an optional peer package, importing it only here."""
    try:
        mod = __import__(package)
        return True, f"{package} {getattr(mod, '__version__', '?')}"
    except Exception as e:  # ImportError, or a broken install
        return False, f"{package} not installed ({type(e).__name__}: {e})"


def _uniform(n_steps: int, like: torch.Tensor) -> torch.Tensor:
    # i / n correctly rounded, as bespoke_fast.solve's uniform grid
    return torch.arange(n_steps + 1, dtype=torch.float64).div(n_steps).to(like.device, like.dtype)


def torchdiffeq_sample(model, x0: torch.Tensor, method: str, n_steps: int) -> torch.Tensor:
    """torchdiffeq ``odeint`` with a fixed-grid ``method`` on the uniform grid of ``n_steps``."""
    from torchdiffeq import odeint
    import bespoke_fast
    f = bespoke_fast.to_torchdiffeq(model)
    return odeint(f, x0, _uniform(n_steps, x0), method=method)[-1]


def _fm_wrapper(model):
    from flow_matching.utils import ModelWrapper

    class _Wrap(ModelWrapper):
        def forward(self, x, t, **extras):
            t = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1)
            return self.model(x, t.expand(x.shape[0]), **extras)

    return _Wrap(model)


def flow_matching_sample(model, x0: torch.Tensor, method: str, n_steps: int) -> torch.Tensor:
    """flow_matching ``ODESolver.sample(x0, step_size=1/n_steps, method, time_grid=[0, 1])`` (the
    time grid in x0's dtype: its default float32 grid would round the times of a float64 run)."""
    from flow_matching.solver import ODESolver
    solver = ODESolver(velocity_model=_fm_wrapper(model))
    return solver.sample(x_init=x0, step_size=1.0 / n_steps, method=method,
                         time_grid=torch.tensor([0.0, 1.0], device=x0.device, dtype=x0.dtype))


DIFFUSERS_SCHEDULERS = ("euler", "dpm++2m", "unipc")


def diffusers_scheduler(name: str, n_steps: int, uniform_sigmas: bool = False, device=None):
    """A diffusers flow-matching scheduler with ``set_timesteps(n_steps)`` done.

    * ``"euler"``: ``FlowMatchEulerDiscreteScheduler(shift=1)``; its default sigmas run
      ``linspace(1, 1/1000, n)`` then 0. ``uniform_sigmas=True`` passes ``sigmas = 1 - i/n``
      (i < n), i.e. exactly our uniform Euler grid.
    * ``"dpm++2m"``: ``DPMSolverMultistepScheduler(prediction_type="flow_prediction",
      use_flow_sigmas=True, flow_shift=1, algorithm_type="dpmsolver++", solver_order=2)``:
      sigmas ``linspace(0.999, 0.999/n, n)`` then 0 (it cannot start at sigma = 1).
    * ``"unipc"``: ``UniPCMultistepScheduler(prediction_type="flow_prediction",
      use_flow_sigmas=True, flow_shift=1)`` (bh2, order 2, corrector on): sigmas
      ``linspace(1, 1/1000, n + 1)[:-1]`` (first one 1 - 1e-6) then 0.
    """
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    if name == "euler":
        s = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        if uniform_sigmas:
            sig = [1.0 - i / n_steps for i in range(n_steps)]
            s.set_timesteps(sigmas=sig, device=device)
        else:
            s.set_timesteps(n_steps, device=device)
        return s
    if uniform_sigmas:
        raise ValueError(f"uniform_sigmas is only offered for the euler scheduler, not {name!r}")
    if name == "dpm++2m":
        s = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=1.0, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
            final_sigmas_type="zero")
    elif name == "unipc":
        s = diffusers.UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=1.0, solver_order=2, lower_order_final=True, final_sigmas_type="zero")
    else:
        raise ValueError(f"unknown diffusers scheduler {name!r}; one of {DIFFUSERS_SCHEDULERS}")
    s.set_timesteps(n_steps, device=device)
    return s


def diffusers_sample(model, x0: torch.Tensor, name: str, n_steps: int,
                     uniform_sigmas: bool = False, scheduler=None) -> torch.Tensor:
    """The standard diffusers denoising loop (one model call per step, NFE = n_steps) with our
    velocity model converted to the flow prediction: ``v = -u(x, 1 - sigma)``.

    ``scheduler``: a prepared scheduler to reuse (``set_timesteps`` is called again, which resets
    its state); default a new one from :func:`diffusers_scheduler`."""
    if scheduler is None:
        sched = diffusers_scheduler(name, n_steps, uniform_sigmas, device=x0.device)
    else:
        sched = scheduler
        if uniform_sigmas:
            sched.set_timesteps(sigmas=[1.0 - i / n_steps for i in range(n_steps)], device=x0.device)
        else:
            sched.set_timesteps(n_steps, device=x0.device)
    # model times on the device once (1 - sigma, exact floats), no per-step host->device copy
    t_model = (1.0 - sched.sigmas[: len(sched.timesteps)].to(torch.float64)).to(x0.device, x0.dtype)
    x = x0
    b = x0.shape[0]
    for i, ts in enumerate(sched.timesteps):
        v = -model(x, t_model[i].expand(b))
        x = sched.step(v, ts, x, return_dict=False)[0]
    return x


class Peer(NamedTuple):
    """A peer solver: ``run(model, x0, nfe) -> x1``; ``per_step``: model calls per step
    (``nfe`` must be a multiple); ``package``: what must be importable."""
    name: str
    package: str
    per_step: int
    run: Callable
    description: str


PEERS = {
    "torchdiffeq-euler": Peer("torchdiffeq-euler", "torchdiffeq", 1,
                              lambda m, x, nfe: torchdiffeq_sample(m, x, "euler", nfe),
                              "torchdiffeq odeint, method='euler', uniform t grid"),
    "torchdiffeq-midpoint": Peer("torchdiffeq-midpoint", "torchdiffeq", 2,
                                 lambda m, x, nfe: torchdiffeq_sample(m, x, "midpoint", nfe // 2),
                                 "torchdiffeq odeint, method='midpoint', uniform t grid"),
    "torchdiffeq-rk4": Peer("torchdiffeq-rk4", "torchdiffeq", 4,
                            lambda m, x, nfe: torchdiffeq_sample(m, x, "rk4", nfe // 4),
                            "torchdiffeq odeint, method='rk4' (3/8 rule), uniform t grid"),
    "flow_matching-midpoint": Peer("flow_matching-midpoint", "flow_matching", 2,
                                   lambda m, x, nfe: flow_matching_sample(m, x, "midpoint", nfe // 2),
                                   "flow_matching ODESolver, method='midpoint', step_size=1/steps"),
    "diffusers-euler": Peer("diffusers-euler", "diffusers", 1,
                            lambda m, x, nfe: diffusers_sample(m, x, "euler", nfe),
                            "diffusers FlowMatchEulerDiscreteScheduler (default sigmas, shift 1)"),
    "diffusers-dpm++2m": Peer("diffusers-dpm++2m", "diffusers", 1,
                              lambda m, x, nfe: diffusers_sample(m, x, "dpm++2m", nfe),
                              "diffusers DPMSolverMultistepScheduler, dpmsolver++ order 2, "
                              "flow_prediction, use_flow_sigmas"),
    "diffusers-unipc": Peer("diffusers-unipc", "diffusers", 1,
                            lambda m, x, nfe: diffusers_sample(m, x, "unipc", nfe),
                            "diffusers UniPCMultistepScheduler, bh2 order 2, flow_prediction, "
                            "use_flow_sigmas"),
}
