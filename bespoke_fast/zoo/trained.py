"""The trained flow models bundled with the package (weights in ``zoo/weights/``).

    >>> from bespoke_fast.zoo.trained import load_trained
    >>> model, meta = load_trained("digits-eps")      # a velocity model u(x [B,1,8,8], t [B])
    >>> x1 = bespoke_fast.solve(model, torch.randn(16, 1, 8, 8), method="rk4", n_steps=50)

The digits models are small residual MLPs, :class:`~bespoke_fast.zoo.nets.DigitsMLP`, trained by
:mod:`bespoke_fast.zoo.train`; ``photo-32`` is a small conv UNet,
:class:`~bespoke_fast.zoo.nets.PhotoUNet`, trained by :mod:`bespoke_fast.zoo.train_photo`
(``x [B, 3, 32, 32]``). ``meta`` is the model's JSON file (path, prediction, time convention, net
config, training stats, sha256 of the weights, quality report).
"""
from __future__ import annotations

import json
from pathlib import Path


from ..models import as_velocity
from .nets import DigitsMLP, PhotoUNet
from .._checks import InvalidArgumentError, MissingFileError

__all__ = ["TRAINED_NAMES", "IMAGE_NAMES", "WEIGHTS_DIR", "load_trained", "load_meta", "verify_weights",
           "WeightsIntegrityError"]

TRAINED_NAMES = ("digits-fmot", "digits-vcs", "digits-eps")   # the bundled weights, by name
IMAGE_NAMES = ("photo-32",)                                   # the bundled image models
WEIGHTS_DIR = Path(__file__).with_name("weights")


class WeightsIntegrityError(RuntimeError):
    """A weights file does not match the sha256 recorded in its JSON."""


_NETS = {"bespoke_fast.zoo.nets.DigitsMLP": DigitsMLP, "bespoke_fast.zoo.nets.PhotoUNet": PhotoUNet}


def _regen(name: str) -> str:
    if name in IMAGE_NAMES:
        return "regenerate it with: python -m bespoke_fast.zoo.train_photo"
    return f"regenerate it with: python -m bespoke_fast.zoo.train --name {name}"


def _check_name(name: str):
    if name not in TRAINED_NAMES + IMAGE_NAMES:
        raise InvalidArgumentError(f"unknown trained model {name!r}; expected one of "
                         f"{', '.join(map(repr, TRAINED_NAMES + IMAGE_NAMES))}")


def load_meta(name: str, weights_dir=None) -> dict:
    """The JSON metadata of a bundled model (raises FileNotFoundError naming the file)."""
    _check_name(name)
    jpath = Path(weights_dir or WEIGHTS_DIR) / f"{name}.json"
    if not jpath.is_file():
        raise MissingFileError(f"metadata file {jpath} is missing; {_regen(name)}")
    return json.loads(jpath.read_text())


def verify_weights(name: str, weights_dir=None) -> dict:
    """Check the weights file against the sha256 in its JSON; returns the metadata."""
    from ..io import sha256_file

    meta = load_meta(name, weights_dir)
    wpath = Path(weights_dir or WEIGHTS_DIR) / meta.get("weights_file", f"{name}.safetensors")
    if not wpath.is_file():
        raise MissingFileError(f"weights file {wpath} is missing; {_regen(name)}")
    got = sha256_file(wpath)
    if got != meta["sha256"]:
        raise WeightsIntegrityError(
            f"weights file {wpath} is corrupted or stale: sha256 {got} != {meta['sha256']} recorded "
            f"in {wpath.with_suffix('.json').name}; {_regen(name)}")
    return meta


def load_trained(name: str, device="cpu", weights_dir=None):
    """Load a bundled model as a velocity model: ``(velocity_model, meta)``.

    Builds the net (:class:`DigitsMLP` or :class:`PhotoUNet`, as the JSON names) from its
    config, verifies the weights' sha256 (clear error naming the file if missing or
    mismatched), loads them (float32), sets eval mode and
    ``requires_grad_(False)``, and wraps the net with
    ``as_velocity(net, prediction=meta["prediction"], path=meta["path"], time=meta["time"])``.

    Args:
        name: one of :data:`TRAINED_NAMES` or :data:`IMAGE_NAMES`.
        device: where to put the model.
        weights_dir: folder holding ``<name>.json`` and ``<name>.safetensors`` (default: bundled).

    The model maps ``x [B, *shape]`` (digits ``(1, 8, 8)``, photo-32 ``(3, 32, 32)``; float32,
    float64 or bf16; output in x's dtype) and ``t [B]`` in flow time (noise at 0, data at 1) to
    the velocity, shaped like x.
    """
    from safetensors.torch import load_file

    meta = verify_weights(name, weights_dir)
    wpath = Path(weights_dir or WEIGHTS_DIR) / meta.get("weights_file", f"{name}.safetensors")
    net = _NETS[meta["net"]["class"]](**meta["net"]["config"])
    net.load_state_dict(load_file(str(wpath)))
    net.eval().requires_grad_(False)
    model = as_velocity(net, prediction=meta["prediction"], path=meta["path"], time=meta["time"])
    model = model.to(device).eval().requires_grad_(False)
    return model, meta
