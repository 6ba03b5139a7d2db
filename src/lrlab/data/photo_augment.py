"""Augmentation of photos at an image size: RandomResizedCrop, centre crop, TrivialAugmentWide.

The images are uint8 (N, C, S, S) batches of stored squares (:func:`lrlab.data.decode.stored_side`);
the ops are torchvision.transforms.v2's functional API on uint8 tensors. Every random draw comes
from a ``torch.Generator`` passed in, so a loader seeded with ``seed + epoch`` repeats its epoch
exactly (resume relies on it).

Sources: RandomResizedCrop ("scale augmentation"), Szegedy et al. 2015, "Going deeper with
convolutions", arXiv:1409.4842, with torchvision's parameters (scale range, aspect ratio in
[3/4, 4/3] sampled log-uniformly, 10 tries then the whole square); TrivialAugmentWide, Müller &
Hutter 2021, arXiv:2103.10158.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

CROP_SCALE = (0.25, 1.0)  # default area fraction range of RandomResizedCrop (config data.crop_scale)
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio range (width / height), as torchvision's default
_TRIES = 10


def random_resized_crop_boxes(n: int, height: int, width: int, scale: Sequence[float],
                              generator: torch.Generator, ratio: Sequence[float] = CROP_RATIO) -> torch.Tensor:
    """Crop boxes of RandomResizedCrop for ``n`` images of ``height`` x ``width``, drawn at once.

    Per image, up to 10 candidates: area fraction uniform in ``scale``, aspect ratio w/h
    log-uniform in ``ratio``, w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); the
    first candidate that fits is placed uniformly (top in {0..H-h}, left in {0..W-w}); when none
    fits, the largest centred box of an aspect ratio within ``ratio`` (the whole square for a
    square image).

    Returns:
        int64 tensor (n, 4) of (top, left, h, w) in pixels, on the CPU.
    """
    area = height * width
    s = torch.empty(n, _TRIES, dtype=torch.float64).uniform_(float(scale[0]), float(scale[1]), generator=generator)
    log_r = torch.empty(n, _TRIES, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                 generator=generator)
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * s * r)).long()
    h = torch.round(torch.sqrt(area * s / r)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first box that fits
    w, h, ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    in_ratio = width / height
    fw = width if in_ratio <= ratio[1] else int(round(height * ratio[1]))
    fh = height if in_ratio >= ratio[0] else int(round(width / ratio[0]))
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.where(ok, (u[:, 0] * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(ok, (u[:, 1] * (width - w + 1)).long(), (width - w) // 2)
    return torch.stack([top, left, h, w], 1)


def random_resized_crop(x: torch.Tensor, size: int, scale: Sequence[float],
                        generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop of every image of a uint8 (N, C, H, W) batch to (N, C, size, size).

    Boxes from :func:`random_resized_crop_boxes`; each box is resized with
    ``torchvision.transforms.v2.functional.resized_crop`` (bilinear, antialiased), one image at a
    time (about 1 ms per 224-pixel image on one CPU core).
    """
    boxes = random_resized_crop_boxes(x.shape[0], x.shape[2], x.shape[3], scale, generator).tolist()
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=x.dtype, device=x.device)
    for i, (top, left, h, w) in enumerate(boxes):
        out[i] = F.resized_crop(x[i], top, left, h, w, [size, size], antialias=True)
    return out


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` x ``size`` of a (N, C, H, W) batch (``v2.functional.center_crop``: top
    offset ``int(round((H - size) / 2))``); x itself when it already is that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.center_crop(x, [size])


def trivial_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugmentWide (``torchvision.transforms.v2.TrivialAugmentWide``) on each image of a
    uint8 (N, C, H, W) batch: one random op at a random strength per image.

    torchvision draws from the global RNG; it runs here under ``torch.random.fork_rng`` seeded
    from ``generator``, so the draws are reproducible and the global RNG is left as it was.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    op = v2.TrivialAugmentWide()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([op(img) for img in x])
