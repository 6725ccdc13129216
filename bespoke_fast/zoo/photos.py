"""The photos behind ``photo-32``: real RGB photos that ship inside the scikit-learn and scikit-image
wheels (never downloaded), their train / held-out split, and seeded random 32x32 crops.

Photos (uint8 RGB, read from the installed packages' own folders)::

    sklearn  load_sample_images(): china.jpg, flower.jpg                       (427 x 640 each)
    skimage  skimage/data/: astronaut.png (512 x 512), chelsea.png (300 x 451), coffee.png
             (400 x 600), rocket.jpg (427 x 640), motorcycle_left.png (500 x 741)

Split (:func:`photo_split`): ``coffee`` is held out whole; every other photo is cut at 80% of its
width: crops come from the left part for training and from the right part for the held-out set, so
no held-out pixel is ever seen in training. Each part is rescaled (antialiased bilinear) by the
factors :data:`SCALES` (1, 1/2, 1/4) *after* the cut, so scales do not leak across it either.

Crops (:func:`random_crops`): a crop picks a (part, scale) uniformly, a uniform position, and a
horizontal flip with probability 1/2; pixels in [-1, 1], shape ``[B, 3, 32, 32]``.

    >>> train, heldout = photo_split()
    >>> x = random_crops(train, 64, torch.Generator().manual_seed(0))    # [64, 3, 32, 32]
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.nn import functional as F

from .._checks import MissingDependencyError

__all__ = ["SKIMAGE_PHOTOS", "SKLEARN_PHOTOS", "HELDOUT_PHOTOS", "SCALES", "TRAIN_FRACTION",
           "CROP", "load_photos", "photo_split", "random_crops", "fixed_crops"]

SKLEARN_PHOTOS = ("china", "flower")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
HELDOUT_PHOTOS = ("coffee",)
SCALES = (1.0, 0.5, 0.25)
TRAIN_FRACTION = 0.8
CROP = 32
_SKIMAGE_FILES = {"astronaut": "astronaut.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
                  "rocket": "rocket.jpg", "motorcycle_left": "motorcycle_left.png"}
_INSTALL = 'pip install "bespoke_fast[photos]" (scikit-learn and scikit-image)'


def load_photos() -> dict:
    """``{name: uint8 tensor [3, H, W]}`` for the seven photos, read from the installed packages'
    own files (no network). Raises :class:`MissingDependencyError` naming what is missing."""
    for mod, pkg in (("sklearn", "scikit-learn"), ("skimage", "scikit-image")):
        if importlib.util.find_spec(mod) is None:
            raise MissingDependencyError(f"model 'photo-32' needs {pkg} (its training photos ship "
                                         f"with it): {_INSTALL}")
    from sklearn.datasets import load_sample_images
    import skimage.data
    import skimage.io

    out = {}
    sk = load_sample_images()
    for fname, img in zip(sk.filenames, sk.images):
        out[Path(fname).stem] = torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous()
    folder = Path(skimage.data.__file__).parent
    for name in SKIMAGE_PHOTOS:
        path = folder / _SKIMAGE_FILES[name]
        if not path.is_file():
            raise MissingDependencyError(f"scikit-image's bundled photo {path} is missing "
                                         f"(photo-32 never downloads data); reinstall: {_INSTALL}")
        img = skimage.io.imread(str(path))[..., :3]
        out[name] = torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous()
    missing = [n for n in SKLEARN_PHOTOS if n not in out]
    if missing:
        raise MissingDependencyError(f"scikit-learn's sample photos {missing} are missing: {_INSTALL}")
    return {n: out[n] for n in SKLEARN_PHOTOS + SKIMAGE_PHOTOS}


def _pyramid(img_u8: torch.Tensor, tag: str) -> list:
    """``[(tag@scale, float tensor [3, h, w] in [-1, 1])]`` for each scale big enough for a crop."""
    x = img_u8.float()[None] / 127.5 - 1.0
    parts = []
    for s in SCALES:
        h, w = round(x.shape[-2] * s), round(x.shape[-1] * s)
        if min(h, w) < CROP:
            continue
        y = x if s == 1.0 else F.interpolate(x, size=(h, w), mode="bilinear", antialias=True,
                                             align_corners=False)
        parts.append((f"{tag}@{s:g}", y[0].clamp(-1.0, 1.0).contiguous()))
    return parts


def photo_split(photos: dict | None = None) -> tuple:
    """``(train_parts, heldout_parts)``: lists of ``(label, [3, h, w] float32 in [-1, 1])`` at every
    scale (see the module docstring for the split)."""
    photos = load_photos() if photos is None else photos
    train, heldout = [], []
    for name, img in photos.items():
        if name in HELDOUT_PHOTOS:
            heldout += _pyramid(img, name)
            continue
        cut = int(img.shape[-1] * TRAIN_FRACTION)
        train += _pyramid(img[..., :cut], f"{name}[:, :{cut}]")
        heldout += _pyramid(img[..., cut:], f"{name}[:, {cut}:]")
    return train, heldout


def random_crops(parts: list, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random crops ``[n, 3, 32, 32]`` (uniform part, uniform position, random h-flip)."""
    which = torch.randint(len(parts), (n,), generator=generator)
    u = torch.rand(n, 3, generator=generator)
    out = torch.empty(n, 3, CROP, CROP)
    for i in range(n):
        img = parts[int(which[i])][1]
        h, w = img.shape[-2:]
        y = int(u[i, 0] * (h - CROP + 1))
        x = int(u[i, 1] * (w - CROP + 1))
        c = img[:, y:y + CROP, x:x + CROP]
        out[i] = c.flip(-1) if u[i, 2] < 0.5 else c
    return out


def fixed_crops(parts: list, n: int, seed: int) -> torch.Tensor:
    """A reproducible set of ``n`` crops (``random_crops`` with ``Generator().manual_seed(seed)``)."""
    return random_crops(parts, n, torch.Generator().manual_seed(seed))
