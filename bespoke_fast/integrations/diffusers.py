"""diffusers integration: fit a solver to a pipeline, drop it in as a scheduler, or sample the
pipeline with the whole-loop fast path. Needs ``pip install bespoke_fast[diffusers]``.

Conventions (checked against diffusers 0.42)
    Flow-match pipelines (SD3, Flux, ...) use ``sigma = 1 - t`` (noise at sigma = 1) and
    ``timestep = 1000 sigma``; the transformer predicts ``d x / d sigma``, so the velocity in this
    package's time is ``u = -output``. DDPM-family UNets (``epsilon`` / ``v_prediction`` /
    ``sample``) go through :func:`bespoke_fast.as_velocity` on the continuous path that matches
    the scheduler config: ``beta_schedule="linear"`` -> VP with ``B = beta_end T``,
    ``b = beta_start T`` (T = ``num_train_timesteps``; the discrete DDPM schedule differs from it
    by O(1/T)), ``"squaredcos_cap_v2"`` -> cosine. Every conversion, including the flow one, is
    one :class:`~bespoke_fast.models.VelocityAdapter` with ``time="diffusion"`` and
    ``time_scale=T``: the model, the schedulers and the fast path share its arithmetic, so they
    agree bit for bit in float32.

What is here
    * :func:`velocity_model` -- a pipeline's transformer / UNet as ``model(x, t, **extras) -> u``,
      with a table of prompt embeddings (extra ``prompt``: row indices), class labels, Flux's
      embedded guidance and classifier-free guidance as one batched forward (``bespoke_fast.cfg``).
    * :func:`condition_extras`, :func:`save_conditioning` / :func:`load_conditioning` -- conditional
      GT: each trajectory stores its condition (a prompt index or a class label), so a solver is
      fitted over a distribution of prompts or classes.
    * :class:`BespokeScheduler`, :class:`BNSScheduler` -- diffusers schedulers running a fitted
      solver (``pipe.scheduler = BespokeScheduler.from_solver("solver.json")``).
    * :func:`fast_pipeline` -- the pipeline's own prompt encoding, latent preparation and VAE
      decode around :class:`bespoke_fast.FastSampler`.
    * :func:`tiny_pipeline` -- random-weight SD3 / Flux / DDPM pipelines built from small configs,
      offline (for tests and examples).
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

from .._checks import MissingDependencyError

try:
    import diffusers
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
except ImportError as e:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("bespoke_fast.integrations.diffusers needs diffusers and "
                                 "transformers: pip install bespoke_fast[diffusers]",
                                 name="diffusers") from e

from ..models import GaussianPath, GuidedModel, as_velocity, cfg
from ..ops import table as T
from ..ops.bns import bns_step_ref
from ..ops.rk import rk1_step_ref, rk2_stage1_ref, rk2_stage2_ref
from ..solvers.files import load_solver, solver_from_document
from .._checks import InvalidArgumentError, InvalidTypeError, MissingFileError

__all__ = ["velocity_model", "DiffusersVelocity", "conversion_from_config", "BespokeScheduler",
           "BNSScheduler", "fast_pipeline", "FastPipeline", "condition_extras", "ConditionExtras",
           "save_conditioning", "load_conditioning", "tiny_pipeline", "cli_model",
           "CONDITIONING_FILE"]

CONDITIONING_FILE = "conditioning.safetensors"
_PREDICTIONS = {"flow": "velocity", "epsilon": "eps", "v_prediction": "v", "sample": "x1"}
_EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


# ----------------------------------------------------------------------------- conventions
def conversion_from_config(config, prediction: str | None = None) -> dict:
    """How a denoiser's output becomes a velocity, from a diffusers scheduler (or its config;
    a config saved by diffusers names its class in ``_class_name``).

    Returns ``{"prediction_type", "path", "time_scale"}``: ``prediction_type`` in diffusers'
    words (``"flow"`` for flow-match schedulers, else the config's ``prediction_type`` or the
    ``prediction`` argument), the :class:`~bespoke_fast.models.GaussianPath` and ``T``."""
    name = type(config).__name__ if hasattr(config, "config") else ""
    config = dict(getattr(config, "config", config) or {})
    name = name or str(config.get("_class_name", ""))
    T_ = float(config.get("num_train_timesteps", 1000))
    flow = "FlowMatch" in name or config.get("prediction_type") in ("flow", "flow_prediction")
    kind = prediction or ("flow" if flow else config.get("prediction_type", "epsilon"))
    if kind not in _PREDICTIONS:
        raise InvalidArgumentError(f"unsupported prediction type {kind!r}; expected one of "
                         f"{', '.join(_PREDICTIONS)}")
    if kind == "flow":
        return {"prediction_type": kind, "path": GaussianPath("fm-ot"), "time_scale": T_}
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":
        path = GaussianPath("vp")
        path.B_MAX = float(config.get("beta_end", 0.02)) * T_
        path.B_MIN = float(config.get("beta_start", 0.0001)) * T_
    elif schedule == "squaredcos_cap_v2":
        path = GaussianPath("cosine")
    else:
        raise InvalidArgumentError(f"beta_schedule {schedule!r} has no continuous path here; supported: "
                         f"'linear' (VP) and 'squaredcos_cap_v2' (cosine)")
    return {"prediction_type": kind, "path": path, "time_scale": T_}


def _adapter(net: nn.Module, conv: dict) -> nn.Module:
    """The one conversion every path shares: ``net(x, timestep) -> output`` (output negated for
    flow) as a velocity in flow time, timestep ``= T (1 - t)``."""
    return as_velocity(net, _PREDICTIONS[conv["prediction_type"]], conv["path"], time="diffusion",
                       time_scale=conv["time_scale"])


class _Given(nn.Module):
    """A 'network' that returns a given output: turns a pipeline's model output into a velocity
    with exactly the adapter's arithmetic (the schedulers use it)."""

    def __init__(self, negate: bool):
        super().__init__()
        self.negate, self.value = negate, None

    def forward(self, x, timestep, **extras):
        return -self.value if self.negate else self.value


class _Recorder(nn.Module):
    """Records the timesteps the adapter would feed the network (the schedulers' ``timesteps``)."""

    def forward(self, x, timestep, **extras):
        self.timestep = timestep
        return torch.zeros_like(x)


def _timesteps_for(conv: dict, t: torch.Tensor) -> torch.Tensor:
    rec = _Recorder()
    _adapter(rec, conv)(t.new_zeros(t.shape[0], 1), t)
    return rec.timestep.detach().clone()


# ----------------------------------------------------------------------------- the model
def _family(denoiser) -> str:
    name = type(denoiser).__name__
    if name == "FluxTransformer2DModel":
        return "flux"
    if name == "SD3Transformer2DModel":
        return "sd3"
    if "UNet2D" in name:
        return "unet"
    raise InvalidArgumentError(f"unsupported denoiser {name}; supported: SD3Transformer2DModel, "
                     f"FluxTransformer2DModel, UNet2DModel, UNet2DConditionModel")


class _Denoiser(nn.Module):
    """The raw network call in the pipeline's own conventions, with the conditioning looked up."""

    def __init__(self, denoiser, family, negate):
        super().__init__()
        self.denoiser, self.family, self.negate = denoiser, family, negate
        self.num_prompts = 0
        self.register_buffer("guidance", None)   # Flux embedded guidance (a buffer: moves with .to)

    def conditioning(self, extras: dict) -> dict:
        extras = dict(extras)
        if "prompt" in extras:
            if not self.num_prompts:
                raise InvalidArgumentError("extra 'prompt' given but the model has no prompt table "
                                 "(pass prompt_embeds to velocity_model)")
            idx = extras.pop("prompt").long()
            extras.setdefault("encoder_hidden_states", self.prompt_embeds.index_select(0, idx))
            if getattr(self, "pooled_prompt_embeds", None) is not None:
                extras.setdefault("pooled_projections", self.pooled_prompt_embeds.index_select(0, idx))
        return extras

    def forward(self, x, timestep, **extras):
        c = self.conditioning(extras)
        b = x.shape[0]
        if self.family != "unet" and not {"encoder_hidden_states", "pooled_projections"} <= set(c):
            raise InvalidArgumentError(f"the {self.family} transformer needs text conditioning: the extra "
                             f"'prompt' (with a prompt table) or encoder_hidden_states and "
                             f"pooled_projections; got extras {sorted(extras)}")
        if self.family == "sd3":
            out = self.denoiser(hidden_states=x, timestep=timestep, return_dict=False,
                                encoder_hidden_states=c["encoder_hidden_states"],
                                pooled_projections=c["pooled_projections"])[0]
        elif self.family == "flux":
            g = c.get("guidance", self.guidance)
            if g is not None and g.dim() == 0:
                g = g.expand(b)
            out = self.denoiser(hidden_states=x, timestep=timestep / 1000, guidance=g,
                                pooled_projections=c["pooled_projections"],
                                encoder_hidden_states=c["encoder_hidden_states"],
                                txt_ids=self.txt_ids, img_ids=self.img_ids, return_dict=False)[0]
        else:
            kw = {k: c[k] for k in ("encoder_hidden_states", "class_labels") if k in c}
            out = self.denoiser(x, timestep, return_dict=False, **kw)[0]
        return -out if self.negate else out


class DiffusersVelocity(nn.Module):
    """A diffusers denoiser as a velocity model ``model(x, t[B], **extras) -> u``; see
    :func:`velocity_model`. ``raw`` is the network call, ``conversion`` the scheduler convention."""

    def __init__(self, raw: _Denoiser, conv: dict):
        super().__init__()
        self.raw, self.conversion = raw, conv
        self.velocity = _adapter(raw, conv)

    def forward(self, x, t, **extras):
        return self.velocity(x, t, **extras)

    def set_prompts(self, prompt_embeds, pooled_prompt_embeds=None, negative_prompt_embeds=None,
                    negative_pooled_prompt_embeds=None) -> int:
        """Store the prompt table: rows ``0..P-1`` the prompts, ``P..2P-1`` their negatives (if
        given). Copies into the existing buffers when the shapes match (captured CUDA graphs stay
        valid). Returns P."""
        pe = _cat(prompt_embeds, negative_prompt_embeds)
        pp = _cat(pooled_prompt_embeds, negative_pooled_prompt_embeds)
        for name, value in (("prompt_embeds", pe), ("pooled_prompt_embeds", pp)):
            old = getattr(self.raw, name, None)
            if value is not None:  # a copy: later in-place updates must not touch the caller's
                value = value.to(_device_of(self.raw.denoiser), copy=True)
            same = old is not None and value is not None and old.shape == value.shape
            if same and old.dtype == value.dtype:
                old.copy_(value)
            else:
                self.raw.register_buffer(name, value)
        self.raw.num_prompts = int(prompt_embeds.shape[0])
        return self.raw.num_prompts


def _cat(a, b):
    if a is None:
        return None
    return a if b is None else torch.cat([a, b])


def _device_of(module):
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def velocity_model(pipe_or_denoiser, prediction: str | None = None, *, scheduler_config=None,
                   guidance_scale: float | None = None, prompt_embeds=None,
                   pooled_prompt_embeds=None, negative_prompt_embeds=None,
                   negative_pooled_prompt_embeds=None, null_class: int | None = None,
                   txt_ids=None, img_ids=None):
    """A diffusers pipeline's transformer or UNet as this package's velocity model.

    Args:
        pipe_or_denoiser: a pipeline (its ``transformer`` or ``unet`` and its scheduler config
            are used) or the denoiser itself (SD3Transformer2DModel, FluxTransformer2DModel,
            UNet2DModel, UNet2DConditionModel).
        prediction: ``"flow"``, ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; default: read
            from the scheduler config (``scheduler_config`` or the pipeline's), ``"flow"`` for a
            bare transformer.
        guidance_scale: what the pipeline's argument of that name means. SD3 / UNet:
            classifier-free guidance, one batched forward of ``[cond; uncond]``
            (:func:`bespoke_fast.cfg`): needs ``negative_prompt_embeds`` (the unconditional rows
            of the table) or ``null_class`` (the label of "no class"). Flux: the embedded
            guidance (a per-sample extra ``guidance`` overrides it).
        prompt_embeds, pooled_prompt_embeds (+ ``negative_*``): ``[P, L, D]`` / ``[P, D]``: the
            prompt table; the model then takes the extra ``prompt`` (LongTensor ``[B]`` of row
            indices) instead of embeddings.
        txt_ids, img_ids: Flux position ids (from ``pipe.encode_prompt`` / ``pipe.prepare_latents``).

    Extras the model takes: ``prompt`` (table rows), or ``encoder_hidden_states`` /
    ``pooled_projections`` directly; ``class_labels``; ``guidance`` (Flux). The state ``x`` has
    the pipeline's latent shape (Flux: packed ``[B, seq, C]``).

    Example::

        >>> model = velocity_model(pipe, guidance_scale=5.0, prompt_embeds=pe,
        ...                        pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
        ...                        negative_pooled_prompt_embeds=np_)
        >>> x1 = solver.sample(model, latents, prompt=torch.arange(len(pe)))
    """
    denoiser = pipe_or_denoiser
    config = scheduler_config
    for attr in ("transformer", "unet"):
        if getattr(pipe_or_denoiser, attr, None) is not None:
            denoiser = getattr(pipe_or_denoiser, attr)
            if config is None and getattr(pipe_or_denoiser, "scheduler", None) is not None:
                config = pipe_or_denoiser.scheduler
            break
    family = _family(denoiser)
    if config is None and prediction is None and family == "unet":
        raise InvalidArgumentError("a bare UNet needs prediction= ('epsilon', 'v_prediction', 'sample') or "
                         "scheduler_config=; pass the pipeline instead to read its scheduler config")
    conv = conversion_from_config(config if config is not None else {"prediction_type": "flow"},
                                  prediction)
    raw = _Denoiser(denoiser, family, negate=conv["prediction_type"] == "flow")
    model = DiffusersVelocity(raw, conv)
    if prompt_embeds is not None:
        model.set_prompts(prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                          negative_pooled_prompt_embeds)
    if family == "flux":
        dev = _device_of(denoiser)
        if txt_ids is None and prompt_embeds is not None:
            txt_ids = torch.zeros(prompt_embeds.shape[1], 3)
        raw.register_buffer("txt_ids", None if txt_ids is None else txt_ids.to(dev))
        raw.register_buffer("img_ids", None if img_ids is None else img_ids.to(dev))
        if guidance_scale is not None and denoiser.config.get("guidance_embeds"):
            raw.guidance = torch.tensor(float(guidance_scale), dtype=torch.float32, device=dev)
        return model
    if guidance_scale is None or guidance_scale <= 1.0:
        return model
    if negative_prompt_embeds is not None:
        P = raw.num_prompts
        return cfg(model, guidance_scale, cond_key="prompt", null=lambda idx: idx + P)
    if null_class is not None:
        return cfg(model, guidance_scale, cond_key="class_labels", null=int(null_class))
    raise InvalidArgumentError("guidance_scale > 1 needs the unconditional input: negative_prompt_embeds "
                     "(prompt tables) or null_class (class labels)")


# ----------------------------------------------------------------------------- conditional GT
class ConditionExtras:
    """``extras_fn(index) -> extras`` for :func:`bespoke_fast.generate_trajectories` (made by
    :func:`condition_extras`). Its settings are part of a GT run's identity
    (``fingerprint_config``), so rerunning ``gt`` with other ``--classes`` is refused."""

    def __init__(self, num_prompts=None, classes=None, guidance=None):
        self.num_prompts = int(num_prompts) if num_prompts else None
        self.classes = None if classes is None else torch.as_tensor(list(classes), dtype=torch.long)
        self.guidance = (None if guidance is None else
                         torch.as_tensor(list(guidance), dtype=torch.float32))

    def __call__(self, index: torch.Tensor) -> dict:
        out = {}
        if self.num_prompts:
            out["prompt"] = index % self.num_prompts
        if self.classes is not None:
            out["class_labels"] = self.classes[index % len(self.classes)]
        if self.guidance is not None:
            out["guidance"] = self.guidance[index % len(self.guidance)]
        return out

    def fingerprint_config(self) -> dict:
        return {"num_prompts": self.num_prompts,
                "classes": None if self.classes is None else self.classes.tolist(),
                "guidance": None if self.guidance is None else self.guidance.tolist()}


def condition_extras(num_prompts: int | None = None, classes=None, guidance=None):
    """``extras_fn(index) -> extras`` for :func:`bespoke_fast.generate_trajectories`: trajectory
    ``i`` gets prompt row ``i % P`` (extra ``prompt``) and/or class ``classes[i % C]`` (extra
    ``class_labels``) and/or embedded guidance ``guidance[i % G]`` (extra ``guidance``); the GT
    set stores these per trajectory and ``train`` / ``evaluate`` pass them back to the model.

    Example::

        >>> fn = condition_extras(num_prompts=4, classes=[3, 5])
        >>> fn(torch.arange(3))["prompt"].tolist(), fn(torch.arange(3))["class_labels"].tolist()
        ([0, 1, 2], [3, 5, 3])
    """
    return ConditionExtras(num_prompts, classes, guidance)


def save_conditioning(path, tensors: dict, guidance_scale: float | None = None) -> Path:
    """Write a conditioning table (``prompt_embeds``, ``pooled_prompt_embeds`` and their
    ``negative_*``; ``classes``; ``guidance_scale``) as safetensors: the stored table a GT set's
    prompt indices refer to (``DIR/conditioning.safetensors``), or a ``--prompts`` file."""
    from safetensors.torch import save_file
    path = Path(path)
    out = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}
    if guidance_scale is not None:
        out["guidance_scale"] = torch.tensor(float(guidance_scale), dtype=torch.float64)
    save_file(out, str(path))
    return path


def load_conditioning(path) -> dict:
    """Read :func:`save_conditioning`'s file (``ValueError`` names a missing key)."""
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    if "prompt_embeds" not in tensors and "classes" not in tensors:
        raise InvalidArgumentError(f"{path}: a conditioning file needs 'prompt_embeds' or 'classes'")
    return tensors


# ----------------------------------------------------------------------------- schedulers
_CONFIG_KEYS = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end")


class _FittedScheduler(SchedulerMixin, ConfigMixin):
    """Shared machinery of :class:`BespokeScheduler` and :class:`BNSScheduler`.

    Position: the scheduler counts its ``step()`` calls (a Python int; ``set_begin_index`` sets
    the start), so ``step()`` never looks its timestep up on the host. The ``timestep`` argument
    is accepted and ignored. State: float32 inside; a float32 ``sample`` is taken as the state
    (so callbacks may edit latents), a lower-precision one is ignored in favour of the float32
    state it was rounded from. ``prev_sample`` is returned in ``sample``'s dtype.
    """

    config_name = "scheduler_config.json"
    _compatibles: list = []
    init_noise_sigma = 1.0
    kind = ""

    @register_to_config
    def __init__(self, solver: dict, prediction_type: str = "flow", num_train_timesteps: int = 1000,
                 beta_schedule: str = "linear", beta_start: float = 0.0001, beta_end: float = 0.02):
        solver = solver_from_document(solver, "scheduler config 'solver'")
        if solver.kind != self.kind:
            other = "BNSScheduler" if solver.kind == "bns" else "BespokeScheduler"
            raise InvalidArgumentError(f"{type(self).__name__} needs a {self.kind} solver, got kind "
                             f"{solver.kind!r}; use {other}")
        self._stages = solver.nfe // solver.n_steps  # model calls per step: 2 for an RK2 base
        self.order = self._stages  # what a pipeline's progress bar counts per tick: set_timesteps
        self.solver = solver
        self._conv = conversion_from_config(dict(self.config), prediction_type)
        self._given = _Given(negate=self._conv["prediction_type"] == "flow")
        self._to_velocity = _adapter(self._given, self._conv)
        self._warned = False
        self._begin_index = None
        self._device = torch.device("cpu")
        self.num_inference_steps = solver.n_steps
        self._build(torch.device("cpu"))
        self._reset()

    def _build(self, device):
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._t_model = self._model_times().to(self._device)          # float32 [calls]
        self.timesteps = _timesteps_for(self._conv, self._t_model)     # float32 [calls]
        self.sigmas = torch.cat([1.0 - self._t_model, self._t_model.new_zeros(1)])

    def _reset(self):
        self._step_index = None
        self._x = self._x_mid = self._x0 = self._us = None

    # -------------------------------------------------------------- diffusers API
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None,
                      mu=None, timesteps=None, **kwargs):
        """Move the fitted schedule to ``device`` and start a new sample. ``num_inference_steps``,
        ``sigmas``, ``mu`` and ``timesteps`` are accepted and IGNORED (the fitted times are
        used), with one warning per scheduler when they ask for something else.

        It also sets ``order``, which diffusers pipelines read only to advance their progress
        bar (one tick every ``order`` model calls, at most one per call; ``retrieve_timesteps``
        then the loop), so that the bar counts what runs:

        * ``sigmas`` / ``timesteps`` given (Flux passes ``sigmas``): the pipeline's total is
          ``len(timesteps)``, the NFE: ``order = 1``, one tick per model call;
        * ``num_inference_steps == n_steps``: the total counts steps: ``order`` = model calls
          per step (2 for an RK2 base);
        * any other ``num_inference_steps``: the pipeline takes it as the total as it is, and
          no scheduler can change that total; ``order = 1`` ticks once per model call, so the
          bar is exact at ``num_inference_steps == nfe``, ends at 100% below it (counting only
          the last calls) and short of 100% above it (at most NFE ticks): a warning says so,
          naming the two values that count exactly.
        """
        n, nfe = self.solver.n_steps, self.solver.nfe
        steps = num_inference_steps is not None and sigmas is None and timesteps is None
        self.order = self._stages if steps and num_inference_steps == n else 1
        exact_bar = not steps or num_inference_steps in (n, nfe)
        ignored = (not exact_bar or mu is not None or sigmas is not None or timesteps is not None)
        if ignored and not self._warned:
            self._warned = True
            bar = "" if exact_bar else (
                f"; the pipeline's progress bar takes num_inference_steps={num_inference_steps} as "
                f"its total and advances at most once per model call, so it cannot end at "
                f"{num_inference_steps}/{num_inference_steps} after exactly the {nfe} calls that "
                f"run: pass num_inference_steps={n}" + (
                    f" (the bar counts steps) or {nfe} (model calls)" if nfe != n else ""))
            warnings.warn(f"{type(self).__name__}: the fitted solver has {n} steps (NFE {nfe}) at "
                          f"learned times; the pipeline's num_inference_steps/sigmas/mu/timesteps "
                          f"are ignored{bar}", UserWarning, stacklevel=2)
        if device is not None and torch.device(device) != self._device:
            self._build(device)
        self._reset()

    def set_begin_index(self, begin_index: int = 0):
        """Start at call ``begin_index`` (a multiple of the model calls per step, 2 for an RK2
        base; 0 for a whole sample)."""
        if begin_index % self._stages or not 0 <= begin_index < len(self.timesteps):
            raise InvalidArgumentError(f"begin_index must be a multiple of {self._stages} (model calls per "
                             f"step) in [0, {len(self.timesteps)}), got {begin_index}")
        self._begin_index = int(begin_index)

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        """``alpha(t) x1 + sigma(t) noise`` with ``t = 1 - timesteps / T`` on the scheduler's path."""
        t = 1.0 - timesteps.to(original_samples.device, torch.float32) / self._conv["time_scale"]
        t = t.reshape(-1, *([1] * (original_samples.dim() - 1)))
        p = self._conv["path"]
        noisy = p.alpha(t) * original_samples.float() + p.sigma(t) * noise.float()
        return noisy.to(original_samples.dtype)

    def __len__(self):
        return int(self.config.num_train_timesteps)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             return_dict: bool = True, generator=None, **kwargs):
        """Advance one model evaluation. Returns ``SchedulerOutput(prev_sample)`` (or a tuple):
        the state at which the model must be evaluated next, the sample after the last call."""
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        k = self._step_index
        if k >= len(self.timesteps):
            raise IndexError(f"{type(self).__name__}.step called {k + 1} times but the fitted solver "
                             f"has {len(self.timesteps)} evaluations; call set_timesteps() to start "
                             f"a new sample")
        state = self._update(model_output, sample, k)
        self._step_index = k + 1
        prev = state.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _velocity(self, model_output, x, k):
        self._given.value = model_output.to(torch.float32)
        u = self._to_velocity(x, self._t_model[k].expand(x.shape[0]))
        self._given.value = None
        return u

    @staticmethod
    def _state(sample, kept):
        return sample if sample.dtype == torch.float32 or kept is None else kept

    @classmethod
    def from_solver(cls, solver, like=None, **config):
        """From a solver object or solver file. ``like``: a scheduler (or its config) whose
        prediction type and training schedule to adopt (default: flow matching)."""
        s = load_solver(solver) if isinstance(solver, (str, Path)) else solver
        return cls(solver=s.to_document(), **cls._config_from(like, config))

    @classmethod
    def _config_from(cls, like, overrides):
        config = {}
        if like is not None:
            src = dict(getattr(like, "config", like))
            config.update({k: src[k] for k in _CONFIG_KEYS if k in src})
            config["prediction_type"] = conversion_from_config(like)["prediction_type"]
        config.update(overrides)
        return config


class BespokeScheduler(_FittedScheduler):
    """A fitted :class:`~bespoke_fast.BespokeSolver` as a diffusers scheduler.

    Build it with :meth:`from_solver`; ``save_pretrained`` / ``from_pretrained`` store the solver
    document (parameters and tables) in ``scheduler_config.json``. An RK2 base takes two
    ``step()`` calls per step -- call 1 returns the midpoint state where the model is evaluated
    next (callbacks see it, and pipelines count it in ``timesteps``), call 2 returns ``x_{i+1}``.
    ``order`` is what diffusers pipelines count per progress-bar tick, set by
    :meth:`~_FittedScheduler.set_timesteps` so that the bar ends at 100% after the calls that
    run: 2 (steps) when the pipeline passes ``num_inference_steps=solver.n_steps``, else 1
    (model calls). With the pipeline's ``sigmas`` (Flux) the bar is always exact; with a plain
    ``num_inference_steps`` (SD3) it is exact at ``n_steps`` or ``nfe`` only, because the
    pipeline uses that number itself as the bar's total (a warning names both values).

    Args (the config): ``solver`` (the solver document, ``Solver.to_document()``),
    ``prediction_type`` (``"flow"``, ``"epsilon"``, ``"v_prediction"``, ``"sample"``),
    ``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end`` (the DDPM path for
    non-flow predictions).

    Example::

        >>> pipe.scheduler = BespokeScheduler.from_solver("solver.json")
        >>> image = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp).images[0]
    """

    kind = "bespoke"

    def _model_times(self):
        tab = self.solver.coefficient_table(dtype=torch.float32).detach()
        return tab[:, T.T0] if self._stages == 1 else tab[:, [T.T0, T.TM]].reshape(-1)

    def _build(self, device):
        super()._build(device)
        self._table = self.solver.coefficient_table(dtype=torch.float32, device=self._device).detach()

    def _update(self, model_output, sample, k):
        i, stage = divmod(k, self._stages)
        if stage == 0:
            x = self._x = self._state(sample, self._x).to(torch.float32)
            u = self._velocity(model_output, x, k)
            if self._stages == 1:
                self._x = rk1_step_ref(x, u, self._table, i)
                return self._x
            self._x_mid = rk2_stage1_ref(x, u, self._table, i)
            return self._x_mid
        x_mid = self._state(sample, self._x_mid).to(torch.float32)
        u = self._velocity(model_output, x_mid, k)
        self._x = rk2_stage2_ref(self._x, x_mid, u, self._table, i)
        return self._x


class BNSScheduler(_FittedScheduler):
    """A fitted :class:`~bespoke_fast.NonStationarySolver` as a diffusers scheduler (order 1,
    ``n`` calls). It keeps the float32 start state and every past velocity (``[n, B, ...]``
    float32). Same API, config and conventions as :class:`BespokeScheduler`."""

    kind = "bns"

    def _model_times(self):
        return self.solver.coefficient_tables(dtype=torch.float32)[0].detach()

    def _build(self, device):
        super()._build(device)
        _, a, b = self.solver.coefficient_tables(dtype=torch.float32, device=self._device)
        self._a, self._b = a.detach(), b.detach()

    def _update(self, model_output, sample, k):
        x = self._state(sample, self._x).to(torch.float32)
        if k == (self._begin_index or 0) or self._x0 is None:
            self._x0 = x
            self._us = torch.empty(self.solver.n_steps, *x.shape, dtype=torch.float32, device=x.device)
        self._us[k].copy_(self._velocity(model_output, x, k))
        self._x = bns_step_ref(self._x0, self._us, k, self._a, self._b, None)
        return self._x


# ----------------------------------------------------------------------------- fast path
def fast_pipeline(pipe, solver, batch_size: int = 1, model_dtype=None, **sampler_kwargs):
    """The pipeline with its denoising loop replaced by :class:`bespoke_fast.FastSampler`.

    ``fast = fast_pipeline(pipe, solver, batch_size, model_dtype)``; ``fast(...)`` takes the
    pipeline's own arguments (prompts or ``prompt_embeds`` / ``pooled_prompt_embeds`` and the
    negatives, ``guidance_scale``, ``height``, ``width``, ``latents``, ``generator``,
    ``num_images_per_prompt``, ``output_type``, ``return_dict``) and returns what ``pipe(...)``
    returns. The pipeline's ``encode_prompt``, ``prepare_latents`` and VAE decode are reused;
    the loop runs the fitted solver on float32 state with fused kernels and one CUDA graph on
    GPU, the reference ops on CPU. ``model_dtype`` defaults to the denoiser's dtype (the
    sampler does not cast weights); model times stay float32 (a bf16 Flux ``pipe(...)`` rounds
    them to bf16). ``num_inference_steps`` / ``sigmas`` are ignored. Supported: SD3 and Flux
    pipelines (text conditioning; not Flux's ``true_cfg_scale``, SD3's skip-layer guidance,
    IP-adapters or step callbacks), DDPM / DDIM pipelines (unconditional).
    """
    return FastPipeline(pipe, solver, batch_size, model_dtype, **sampler_kwargs)


class FastPipeline:
    """See :func:`fast_pipeline`. ``sampler`` is the last :class:`FastSampler` used (kept and
    reused while the latent shape and table shapes stay the same)."""

    def __init__(self, pipe, solver, batch_size=1, model_dtype=None, **sampler_kwargs):
        self.pipe = pipe
        self.solver = load_solver(solver) if isinstance(solver, (str, Path)) else solver
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        if denoiser is None:
            raise InvalidArgumentError(f"{type(pipe).__name__} has neither a transformer nor a unet")
        self.family = _family(denoiser)
        self.batch_size = int(batch_size)
        self.model_dtype = model_dtype or denoiser.dtype
        self.sampler_kwargs = sampler_kwargs
        self.sampler = None
        self._key = None

    def _sample(self, model, latents, key, **extras):
        from ..engine import FastSampler
        if self.sampler is None or self._key != key:
            self.sampler = FastSampler(model, self.solver, tuple(latents.shape[1:]), self.batch_size,
                                       model_dtype=self.model_dtype, **self.sampler_kwargs)
            self._key = key
        return self.sampler(latents, **extras)

    def _model(self, key, **kw):
        """The velocity model, reused (table copied in place) while shapes match."""
        if self._key == key and self.sampler is not None:
            model = self.sampler.model
            inner = model.model if isinstance(model, GuidedModel) else model
            inner.set_prompts(*[kw.get(k) for k in ("prompt_embeds", "pooled_prompt_embeds",
                                                    "negative_prompt_embeds",
                                                    "negative_pooled_prompt_embeds")])
            return model
        return velocity_model(self.pipe, **kw)

    def __call__(self, *args, **kwargs):
        run = {"sd3": self._sd3, "flux": self._flux, "unet": self._unet}[self.family]
        with torch.no_grad():
            return run(*args, **kwargs)

    _UNSUPPORTED = ("true_cfg_scale", "skip_guidance_layers", "ip_adapter_image",
                    "ip_adapter_image_embeds", "negative_ip_adapter_image",
                    "negative_ip_adapter_image_embeds", "callback_on_step_end")

    def _defaults(self, kwargs):
        """The pipeline's own arguments with its defaults; unknown or unsupported ones raise."""
        params = inspect.signature(self.pipe.__call__).parameters
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise InvalidTypeError(f"{type(self.pipe).__name__}() got unexpected arguments {unknown}")
        for k in self._UNSUPPORTED:
            if k in kwargs and kwargs[k] != params[k].default:
                raise InvalidArgumentError(f"fast_pipeline does not support {k}; use pipe(...) with "
                                 f"BespokeScheduler for it")
        return {k: kwargs.get(k, p.default) for k, p in params.items()
                if p.default is not inspect.Parameter.empty}

    def _sd3(self, prompt=None, **kwargs):
        pipe, a = self.pipe, self._defaults(kwargs)
        h = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        w = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        gs = a["guidance_scale"]
        device = pipe._execution_device
        pe, ne, pp, npp = pipe.encode_prompt(
            prompt=prompt, prompt_2=a.get("prompt_2"), prompt_3=a.get("prompt_3"),
            negative_prompt=a.get("negative_prompt"), do_classifier_free_guidance=gs > 1,
            prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], device=device,
            num_images_per_prompt=a["num_images_per_prompt"],
            max_sequence_length=a["max_sequence_length"])
        b = pe.shape[0]
        latents = pipe.prepare_latents(b, pipe.transformer.config.in_channels, h, w, pe.dtype, device,
                                       a["generator"], a["latents"])
        key = ("sd3", tuple(latents.shape), tuple(pe.shape), gs)
        model = self._model(key, guidance_scale=gs, prompt_embeds=pe, pooled_prompt_embeds=pp,
                            negative_prompt_embeds=ne if gs > 1 else None,
                            negative_pooled_prompt_embeds=npp if gs > 1 else None)
        x = self._sample(model, latents, key, prompt=torch.arange(b, device=device)).to(latents.dtype)
        if a["output_type"] == "latent":
            image = x
        else:
            x = x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(x.to(pipe.vae.dtype), return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
        from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
        return StableDiffusion3PipelineOutput(images=image) if a["return_dict"] else (image,)

    def _flux(self, prompt=None, **kwargs):
        pipe, a = self.pipe, self._defaults(kwargs)
        h = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        w = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        device = pipe._execution_device
        pe, pp, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=a.get("prompt_2"), prompt_embeds=a["prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"], device=device,
            num_images_per_prompt=a["num_images_per_prompt"],
            max_sequence_length=a["max_sequence_length"])
        b = pe.shape[0]
        latents, image_ids = pipe.prepare_latents(b, pipe.transformer.config.in_channels // 4, h, w,
                                                  pe.dtype, device, a["generator"], a["latents"])
        gs = a["guidance_scale"]
        key = ("flux", tuple(latents.shape), tuple(pe.shape), gs)
        if self._key == key and self.sampler is not None:
            model = self._model(key, prompt_embeds=pe, pooled_prompt_embeds=pp)
        else:
            model = velocity_model(pipe, guidance_scale=gs, prompt_embeds=pe, pooled_prompt_embeds=pp,
                                   txt_ids=text_ids, img_ids=image_ids)
        x = self._sample(model, latents, key, prompt=torch.arange(b, device=device)).to(latents.dtype)
        if a["output_type"] == "latent":
            image = x
        else:
            x = pipe._unpack_latents(x, h, w, pipe.vae_scale_factor)
            x = x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(x.to(pipe.vae.dtype), return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
        return FluxPipelineOutput(images=image) if a["return_dict"] else (image,)

    def _unet(self, **kwargs):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor
        a = self._defaults(kwargs)
        batch_size, generator, output_type = a["batch_size"], a["generator"], a["output_type"]
        pipe, cfgu = self.pipe, self.pipe.unet.config
        size = cfgu.sample_size if not isinstance(cfgu.sample_size, int) else (cfgu.sample_size,) * 2
        shape = (batch_size, cfgu.in_channels, *size)
        noise = randn_tensor(shape, generator=generator, device=pipe._execution_device,
                             dtype=pipe.unet.dtype)
        key = ("unet", shape)
        model = self.sampler.model if self._key == key else velocity_model(pipe)
        image = (self._sample(model, noise, key) / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if a["return_dict"] else (image,)


# ----------------------------------------------------------------------------- tiny pipelines
def tiny_pipeline(kind: str = "sd3", seed: int = 0):
    """A random-weight pipeline built offline from small configs (text encoders and tokenizers
    ``None``: pass ``prompt_embeds`` and friends). ``kind``: ``"sd3"`` (latents ``[4, 8, 8]``,
    prompt embeds ``[L, 16]``, pooled ``[8]``), ``"flux"`` (embedded guidance; packed latents
    ``[16, 16]`` at height = width = 16; same embed sizes), ``"ddpm-eps"`` / ``"ddpm-v"``
    (UNet2DModel on ``[3, 8, 8]`` images), ``"ddpm-class"`` (eps, class-conditional: labels
    0..2, label 3 = "no class" for guidance; DDPMPipeline itself passes no labels). For tests
    and examples: a few kB of weights, ms per call on CPU."""
    torch.manual_seed(seed)
    D = diffusers
    if kind == "sd3":
        tr = D.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                     attention_head_dim=8, num_attention_heads=2,
                                     joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
        return D.StableDiffusion3Pipeline(
            transformer=tr, vae=_tiny_vae(True), scheduler=D.FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None)
    if kind == "flux":
        tr = D.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=8, num_attention_heads=2,
                                      joint_attention_dim=16, pooled_projection_dim=8,
                                      guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        sched = D.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15)
        return D.FluxPipeline(transformer=tr, vae=_tiny_vae(False), scheduler=sched, text_encoder=None,
                              tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if kind in ("ddpm-eps", "ddpm-v", "ddpm-class"):
        unet = D.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                             layers_per_block=1, norm_num_groups=4,
                             down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                             num_class_embeds=4 if kind == "ddpm-class" else None)
        pred = "v_prediction" if kind == "ddpm-v" else "epsilon"
        return D.DDPMPipeline(unet=unet, scheduler=D.DDPMScheduler(prediction_type=pred))
    raise InvalidArgumentError(f"unknown tiny pipeline {kind!r}; expected 'sd3', 'flux', 'ddpm-eps', 'ddpm-v' "
                     f"or 'ddpm-class'")


def _tiny_vae(quant_conv: bool):
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.0609,
        scaling_factor=1.5035, use_quant_conv=quant_conv, use_post_quant_conv=quant_conv)


# ----------------------------------------------------------------------------- CLI models
def _parse_classes(spec: str):
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError as e:
        raise InvalidArgumentError(f"--classes {spec!r}: expected a count N (labels 0..N-1) or a comma list "
                         f"of integer labels") from e
    if not values or min(values) < 0:
        raise InvalidArgumentError(f"--classes {spec!r}: expected a positive count or non-negative labels")
    return list(range(values[0])) if len(values) == 1 and "," not in spec else values


def cli_model(directory, prompts=None, classes=None, guidance_scale=None, height=None, width=None,
              gt=None, device="cpu"):
    """The CLI's ``--model diffusers:DIR``: load the pipeline offline from the local folder
    ``DIR`` (``from_pretrained(..., local_files_only=True)``) and build a
    :class:`~bespoke_fast.zoo.ZooModel` whose ``condition(index)`` gives each GT trajectory its
    condition. ``prompts``: a ``.safetensors`` file of embeddings (:func:`save_conditioning`)
    or a text file with one prompt per line (encoded with the pipeline's own text encoders).
    ``classes``: ``"N"`` or ``"3,7,9"`` (a class-conditional UNet; with guidance the LAST class
    embedding, ``num_class_embeds - 1``, is taken as "no class"). Without either, the table
    stored in the GT directory ``gt`` is used. ``guidance_scale`` defaults to the pipeline's own
    default (1.0 when its ``__call__`` has none)."""
    from ..zoo import ZooModel
    directory = Path(directory)
    if not (directory / "model_index.json").is_file():
        raise MissingFileError(f"{directory}: not a diffusers pipeline folder (no model_index.json)")
    import json
    index = json.loads((directory / "model_index.json").read_text())
    absent = {k: None for k, v in index.items()   # components saved as None (e.g. no text encoders)
              if not k.startswith("_") and isinstance(v, list) and v and v[0] is None}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(directory), local_files_only=True,
                                                       **absent).to(device)
    pipe.set_progress_bar_config(disable=True)
    stored, stored_file = None, Path(gt) / CONDITIONING_FILE if gt is not None else None
    if prompts is None and classes is None and stored_file is not None and stored_file.is_file():
        stored = load_conditioning(stored_file)
    table = {}
    if prompts is not None:
        table = _prompt_table(pipe, Path(prompts), device)
    elif stored is not None:
        table = {k: v for k, v in stored.items() if k not in ("classes", "guidance_scale")}
    if guidance_scale is None and stored is not None and "guidance_scale" in stored:
        guidance_scale = float(stored["guidance_scale"])
    if guidance_scale is None:
        param = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
        guidance_scale = param.default if param is not None else 1.0
    labels = _parse_classes(classes) if classes is not None else (
        stored["classes"].tolist() if stored is not None and "classes" in stored else None)
    family = _family(getattr(pipe, "transformer", None) or pipe.unet)
    kw = {}
    if family == "flux":
        h = height or pipe.default_sample_size * pipe.vae_scale_factor
        w = width or pipe.default_sample_size * pipe.vae_scale_factor
        lat, kw["img_ids"] = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, h, w,
                                                  torch.float32, device, torch.Generator().manual_seed(0))
        shape = tuple(lat.shape[1:])
    elif family == "sd3":
        h = height or pipe.default_sample_size * pipe.vae_scale_factor
        w = width or pipe.default_sample_size * pipe.vae_scale_factor
        s = pipe.vae_scale_factor
        shape = (pipe.transformer.config.in_channels, h // s, w // s)
    else:
        size = pipe.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (pipe.unet.config.in_channels, *size)
    if family != "unet" and not table:
        raise InvalidArgumentError(f"{directory}: a {family} pipeline needs --prompts FILE (prompt embeddings "
                         f"or text)")
    kw.update(table)
    if labels is not None:
        n_embeds = getattr(pipe, "unet", None) and pipe.unet.config.get("num_class_embeds")
        if not n_embeds:
            raise InvalidArgumentError(f"{directory}: --classes needs a class-conditional UNet "
                             f"(num_class_embeds in its config)")
        if max(labels) >= n_embeds - (guidance_scale > 1):
            raise InvalidArgumentError(f"--classes: labels must be below {n_embeds - (guidance_scale > 1)} "
                             f"(num_class_embeds {n_embeds}; with guidance the last one means "
                             f"'no class')")
        if guidance_scale > 1:
            kw["null_class"] = n_embeds - 1
    model = velocity_model(pipe, guidance_scale=guidance_scale, **kw)
    num_prompts = int(table["prompt_embeds"].shape[0]) if table else None
    cond = condition_extras(num_prompts=num_prompts, classes=labels)
    zm = ZooModel(f"diffusers:{directory.name}", model, shape, 2.0,
                  f"{type(pipe).__name__} from {directory}")
    zm.condition = cond
    zm.conditioning = {**table, **({"classes": torch.tensor(labels)} if labels else {})}
    zm.guidance_scale = guidance_scale
    return zm


def _prompt_table(pipe, path: Path, device) -> dict:
    if not path.is_file():
        raise MissingFileError(f"--prompts {path}: no such file")
    if path.suffix == ".safetensors":
        return {k: v.to(device) for k, v in load_conditioning(path).items()
                if k in _EMBED_KEYS or k.startswith("negative_")}
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise InvalidArgumentError(f"--prompts {path}: no prompts (one per line)")
    if getattr(pipe, "text_encoder", None) is None:
        raise InvalidArgumentError(f"--prompts {path}: the pipeline has no text encoder to encode text "
                         f"prompts; give prompt embeddings as a .safetensors file instead")
    out = pipe.encode_prompt(prompt=lines, prompt_2=None, **(
        {"prompt_3": None, "negative_prompt": [""] * len(lines), "do_classifier_free_guidance": True}
        if "prompt_3" in inspect.signature(pipe.encode_prompt).parameters else {}), device=device)
    if len(out) == 4:
        return dict(zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                         "negative_pooled_prompt_embeds"), out))
    return {"prompt_embeds": out[0], "pooled_prompt_embeds": out[1]}
