"""Bundled models, loadable offline by name: ``bespoke_fast.zoo.load(name)``.

====================  =====================================================================
name                  what it is
====================  =====================================================================
``gmm-64``            exact FM-OT flow of a fixed 64-dim, 8-component Gaussian mixture
                      (stds in [0.05, 0.3]); no training, any dtype
``digits-exact``      exact FM-OT flow of the 1797 sklearn digits in [-1, 1] (one component
                      per image, std 0.02): stiff near t = 1 like a real image model
``digits-fmot``       small MLP trained on the digits, FM-OT velocity prediction
``digits-vcs``        small MLP trained on the digits, FM/v-CS (cosine) velocity prediction
``digits-eps``        small MLP trained on the digits, eps-VP noise prediction, used through
                      ``as_velocity(net, "eps", "vp", time="diffusion")``
``photo-32``          small conv UNet (:class:`~bespoke_fast.zoo.nets.PhotoUNet`, shape
                      (3, 32, 32), RGB in [-1, 1]) trained on 32x32 crops of the photos
                      bundled in scikit-learn / scikit-image, FM-OT velocity prediction
====================  =====================================================================

The trained weights ship with the package (safetensors, < 2 MB each) and are reproducible with
``python -m bespoke_fast.zoo.train --all`` (digits) and ``python -m bespoke_fast.zoo.train_photo``
(``photo-32``; loading it needs no extra package, retraining it needs scikit-image). ``digits-exact`` reads the digits from scikit-learn
(installed by the ``digits`` extra: ``pip install "bespoke_fast[digits]"``).

Your own model: ``package.module:factory`` (see :func:`resolve_model`); its name is that spec,
and its identity (recorded in GT sets and solver files, checked on use) is the hash of its
parameters and buffers, or for a plain function ``"callable:<module>.<qualname>"``
(``bespoke_fast.io.model_fingerprint``).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field

import torch

from .._checks import InvalidArgumentError, MissingDependencyError
from .trained import IMAGE_NAMES, TRAINED_NAMES, load_trained

__all__ = ["ZooModel", "load", "NAMES", "resolve_model", "FACTORY_CONTRACT"]

FACTORY_CONTRACT = (
    "--model package.module:factory: factory() (no arguments) must return a ZooModel, a dict "
    "{'model': m, 'shape': (C, H, W), 'data_range': R}, or a tuple (m, shape[, data_range]); m(x, "
    "t[B]) -> u shaped like x (noise at t = 0, data at t = 1); data_range R is the data's "
    "max - min for PSNR (default 2.0, data in [-1, 1], with a notice).")

EXACT_NAMES = ("gmm-64", "digits-exact")
NAMES = EXACT_NAMES + TRAINED_NAMES + IMAGE_NAMES


@dataclass
class ZooModel:
    """A ready velocity model with what a sampler needs to know about it.

    ``model(x, t[B], **extras) -> u``; ``shape``: one sample's shape; ``data_range``: R for PSNR.
    """

    name: str
    model: torch.nn.Module
    shape: tuple
    data_range: float = 2.0
    description: str = ""
    extras: dict = field(default_factory=dict)


def gmm64():
    from ..models import GaussianMixtureFlow
    g = torch.Generator().manual_seed(64)
    means = torch.randn(8, 64, generator=g, dtype=torch.float64) * 0.6
    stds = 0.05 + 0.25 * torch.rand(8, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(8, generator=g, dtype=torch.float64)
    return GaussianMixtureFlow(means, stds, weights, path="fm-ot", name="gmm-64")


def load(name: str, device="cpu") -> ZooModel:
    """Load a bundled model by name (see the module docstring), offline.

    Example::

        >>> zm = bespoke_fast.zoo.load("digits-fmot")
        >>> x1 = bespoke_fast.solve(zm.model, torch.randn(16, *zm.shape), "midpoint", n_steps=10)
    """
    if name == "gmm-64":
        return ZooModel(name, gmm64().to(device), (64,), 2.0,
                        "exact FM-OT flow of a 64-dim 8-component Gaussian mixture")
    if name == "digits-exact":
        if importlib.util.find_spec("sklearn") is None:
            raise MissingDependencyError("model 'digits-exact' needs scikit-learn (the digits "
                                         "data ships with it): pip install \"bespoke_fast[digits]\"")
        from ..models import digits_flow
        flow = digits_flow()
        flow.name = "digits-exact"
        return ZooModel(name, flow.to(device), (1, 8, 8), 2.0,
                        "exact FM-OT flow of the sklearn digits in [-1, 1]")
    if name in TRAINED_NAMES:
        model, meta = load_trained(name, device=device)
        return ZooModel(name, model, (1, 8, 8), 2.0, meta.get("description", name))
    if name in IMAGE_NAMES:
        model, meta = load_trained(name, device=device)
        return ZooModel(name, model, tuple(meta["shape"]), 2.0, meta.get("description", name))
    raise InvalidArgumentError(f"unknown model {name!r}; bundled models: {', '.join(NAMES)} "
                     f"(or give 'package.module:factory' for your own)")


def resolve_model(spec: str, device="cpu", notice=None) -> ZooModel:
    """A bundled name, or ``package.module:factory`` / ``path/to/file.py:factory`` where
    ``factory()`` returns a
    :class:`ZooModel`, a ``(model, shape)`` / ``(model, shape, data_range)`` tuple, or a dict
    with keys model, shape and optionally data_range, extras (:data:`FACTORY_CONTRACT`).
    Without a data range, 2.0 is assumed and ``notice`` (default: print to stderr) says so.
    A module is imported from the current folder first (as ``python -m`` does); a ``.py`` path is
    loaded as the module named by its file name.

    Example::

        >>> zm = resolve_model("mymodel.py:factory")     # mymodel.py in the current folder
    """
    if ":" not in spec:
        return load(spec, device)
    module_name, _, attr = spec.rpartition(":")
    try:
        factory = getattr(_import_factory_module(module_name), attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise InvalidArgumentError(f"cannot import model factory {spec!r}: "
                                   f"{type(e).__name__}: {e}") from e
    if not callable(factory):
        raise InvalidArgumentError(f"model factory {spec!r} is not callable")
    made = factory()
    assumed = False
    if isinstance(made, ZooModel):
        zm = made
    elif isinstance(made, dict) and "model" in made and "shape" in made:
        zm = ZooModel(spec, made["model"], tuple(made["shape"]), float(made.get("data_range", 2.0)),
                      extras=made.get("extras", {}))
        assumed = "data_range" not in made
    elif isinstance(made, (tuple, list)) and len(made) in (2, 3):
        zm = ZooModel(spec, made[0], tuple(made[1]), float(made[2]) if len(made) == 3 else 2.0)
        assumed = len(made) == 2
    else:
        raise InvalidArgumentError(f"model factory {spec!r} must return a ZooModel, a dict with 'model' and "
                         f"'shape', or a (model, shape[, data_range]) tuple; got {type(made).__name__}")
    if assumed:
        (notice or _stderr)(f"note: model factory {spec!r} gave no data_range; assuming 2.0 (data in "
                            f"[-1, 1]) for PSNR; return data_range to change it")
    if isinstance(zm.model, torch.nn.Module):
        zm.model.to(device)
    return zm


def _import_factory_module(name: str):
    """The module of a factory spec: a ``.py`` file path (loaded under its file name), or a
    dotted module name imported with the current folder first on ``sys.path``."""
    import os
    import sys
    if name.endswith(".py") or "/" in name or os.sep in name:
        path = os.path.abspath(os.path.expanduser(name))
        if not os.path.isfile(path):
            raise ImportError(f"no such file {name}")
        module_name = os.path.splitext(os.path.basename(path))[0]
        loaded = sys.modules.get(module_name)
        if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == path:
            return loaded
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return module
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _stderr(line):
    import sys
    print(line, file=sys.stderr)
