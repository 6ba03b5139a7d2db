"""Training-time augmentation: random crop from padding, horizontal flip, Cutout.

Two implementations of the same recipe (the standard CIFAR one: pad by 4 and crop back,
flip half the images, one Cutout square):

* :func:`batch_augment`, the fast path: one batched tensor op on the device, per-image
  randomness, no per-image Python;
* :func:`build_albumentations`, the per-image path through albumentations, for recipes that
  want its wider catalogue (here: rotation).

Both draw the crop offset uniformly from the 2p+1 integer shifts per axis, flip with
probability 1/2, and place the Cutout square uniformly *fully inside* the image (its top-left
corner uniform over the (H-c+1) x (W-c+1) positions). Fully inside is what albumentations
2.0.8's ``CoarseDropout`` does (``y_min ~ U{0..H-h}``), so the paths match; DeVries & Taylor
2017 (arXiv:1708.04552) instead centre the square anywhere and clip it at the border, which
erases on average less than c x c pixels.

Sources: random crop + flip, He et al. 2016 (arXiv:1512.03385) CIFAR recipe; Cutout, DeVries
& Taylor 2017 (arXiv:1708.04552).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # albumentations is imported lazily: it is slow to import
    import albumentations

PAD_MODES = ("constant", "reflect")
"""How the random crop's padding is filled (``data.pad_mode``): "constant" (black pixels) or
"reflect" (the image mirrored at its border, without repeating the edge pixel)."""


def build_albumentations(crop_padding: int = 4, flip: bool = True, cutout: int = 16,
                         rotate: float = 0.0, mean: tuple = (0.5, 0.5, 0.5), *,
                         image_size: tuple[int, int] = (32, 32), pad_mode: str = "constant",
                         seed: int | None = None) -> albumentations.Compose:
    """The per-image augmentation pipeline as an ``albumentations.Compose``.

    Applied to one uint8 (H, W, 3) numpy image at a time (``compose(image=img)["image"]``),
    it returns a uint8 (H, W, 3) image. Steps, in order:

    1. ``Rotate(limit=rotate)`` by an angle uniform in [-rotate, rotate] degrees, bilinear,
       border reflected (BORDER_REFLECT_101); only when rotate > 0.
    2. ``PadIfNeeded`` to (H + 2p, W + 2p), with constant 0 (black) or reflected
       (``pad_mode``, BORDER_REFLECT_101), then ``RandomCrop`` back to (H, W): an integer shift
       uniform in [-p, p] per axis; only when crop_padding p > 0.
    3. ``HorizontalFlip(p=0.5)`` when flip.
    4. Cutout as ``CoarseDropout`` with exactly one c x c hole (c = cutout) filled with the
       dataset mean colour ``round(255 * mean)``, always applied; only when cutout > 0.
       albumentations places the hole fully inside the image (it never clips it).

    Importing albumentations is deferred to this call; its update check (a network request
    to PyPI) is switched off with ``NO_ALBUMENTATIONS_UPDATE=1`` unless the user set it.

    Args:
        crop_padding: p, padding in pixels for the random crop (0 = no crop).
        flip: random horizontal flip with probability 0.5.
        cutout: side c in pixels of the Cutout square (0 = no Cutout); at most min(H, W).
        rotate: maximum rotation in degrees (0 = no rotation).
        mean: per-channel (R, G, B) dataset mean in [0, 1] units, used as the Cutout fill.
        image_size: (H, W) of the images, needed for the pad-and-crop sizes.
        pad_mode: one of :data:`PAD_MODES`, how the crop's padding is filled.
        seed: seed of the Compose's own random state (None = nondeterministic).

    Returns:
        An ``albumentations.Compose`` (an empty one when every step is switched off).

    Raises:
        ValueError: negative padding, cutout or rotation, cutout larger than the image, or a
            reflected padding as wide as the image.
    """
    h, w = int(image_size[0]), int(image_size[1])
    _check_args(crop_padding, cutout, h, w, pad_mode)
    if rotate < 0:
        raise ValueError(f"rotate must be >= 0 degrees, got {rotate}")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    steps = []
    if rotate > 0:
        steps.append(A.Rotate(limit=float(rotate), border_mode=cv2.BORDER_REFLECT_101, p=1.0))
    if crop_padding > 0:
        steps.append(A.PadIfNeeded(min_height=h + 2 * crop_padding, min_width=w + 2 * crop_padding,
                                   border_mode=cv2.BORDER_CONSTANT if pad_mode == "constant"
                                   else cv2.BORDER_REFLECT_101, fill=0, p=1.0))
        steps.append(A.RandomCrop(height=h, width=w, p=1.0))
    if flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if cutout > 0:
        fill = tuple(int(round(255.0 * float(m))) for m in mean)
        steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(cutout, cutout),
                                     hole_width_range=(cutout, cutout), fill=fill, p=1.0))
    return A.Compose(steps, seed=seed)


def batch_augment(x: torch.Tensor, crop_padding: int, flip: bool | torch.Tensor, cutout: int,
                  generator: torch.Generator | None = None, *,
                  pad_fill: float | Sequence[float] | torch.Tensor = 0.0,
                  cutout_fill: float | Sequence[float] | torch.Tensor = 0.0,
                  size: int | None = None, pad_mode: str = "constant") -> torch.Tensor:
    """Random crop from padding, horizontal flip and Cutout on a whole batch at once.

    Every image gets its own random crop offset, flip coin and Cutout position, drawn in a
    handful of tensor ops with no per-image Python loop:

    * crop: the output is ``padded[:, :, dy:dy+S, dx:dx+S]`` of the image padded by p on every
      side, with dy, dx uniform in {0..H-S+2p} and {0..W-S+2p} per image (S = ``size``; for
      S = H = W an exact integer shift by (dy - p, dx - p)), ``pad_fill`` coming in at the
      border (no interpolation), or with ``pad_mode="reflect"`` the image mirrored at its edge
      without repeating the edge pixel (``F.pad(mode="reflect")``, as airbench94 pads);
    * flip: a random half of the images (Bernoulli(1/2) each) is exactly ``torch.flip(., [3])``
      of its crop; crop and flip are done together as one gather;
    * Cutout: a c x c square, placed uniformly *fully inside* the image (top-left corner
      uniform in {0..H-c} x {0..W-c}, as albumentations' CoarseDropout does; DeVries &
      Taylor 2017, arXiv:1708.04552, clip a square centred anywhere instead), is set to
      ``cutout_fill``.

    For normalised inputs (the usual case) the default fills of 0 mean "the dataset mean
    colour". To match the uint8 recipe of :func:`build_albumentations` exactly (black padding,
    mean-colour Cutout), pass ``pad_fill = -mean / std`` per channel, as ``BatchLoader`` does.

    Args:
        x: (N, C, H, W) float or uint8 batch on any device; channels_last input is fine.
        crop_padding: p in pixels (0 = no crop).
        flip: True flips a random half of the images horizontally; a bool tensor of shape
            (N,) gives the flip of each image instead (alternating flips, see BatchLoader).
        cutout: side c of the Cutout square in pixels (0 = no Cutout), at most min(H, W).
        generator: torch.Generator for the random draws (its device is used for the draws;
            None = the global RNG).
        pad_fill: value of the padding, a scalar or one value per channel.
        cutout_fill: value of the Cutout square, a scalar or one value per channel.
        size: side S of square output crops (progressive resizing trains early epochs on
            smaller crops, whose FLOPs scale with S^2); None: the full H x W. The crops keep
            the pixel scale (no resampling), so objects look as large as at test time.
        pad_mode: one of :data:`PAD_MODES`: "constant" (``pad_fill``) or "reflect".

    Returns:
        A new (N, C, S, S) tensor ((N, C, H, W) without ``size``) of x's dtype and device,
        contiguous (NCHW memory format). With all steps off and no ``size``, x itself.

    Raises:
        ValueError: x is not 4-D, negative padding or cutout, cutout larger than the image, or a
            reflected padding as wide as the image.
    """
    if x.dim() != 4:
        raise ValueError(f"batch_augment expects an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    p, k = int(crop_padding), int(cutout)
    oh, ow = (h, w) if size is None else (int(size), int(size))
    if not 0 < oh <= h or not 0 < ow <= w:
        raise ValueError(f"crop size {size} must be between 1 and {min(h, w)} pixels")
    _check_args(p, k, oh, ow, pad_mode)
    flips = flip if isinstance(flip, torch.Tensor) else None
    if flips is not None and flips.shape != (n,):
        raise ValueError(f"flip tensor has shape {tuple(flips.shape)}; expected ({n},), one per image")
    if n == 0 or (p == 0 and flips is None and not flip and k == 0 and (oh, ow) == (h, w)):
        return x
    dev = x.device
    gdev = generator.device if generator is not None else dev

    def randint(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=generator, device=gdev).to(dev)

    # Crop, flip and Cutout are one gather. Image i is copied once into a source of
    # (H+1) x (W+1) pixels per channel whose extra last row and column hold the padding fill,
    # followed by one more slot holding the Cutout fill. The gather index is built from
    # per-image row and column indices of shape (N, H) and (N, W): a row or column that the
    # shift moves off the image points at the fill row/column, so padding costs nothing, and
    # the Cutout square is scattered into the index as k*k positions per image.
    hs, ws = h + 1, w + 1
    hole_slot = hs * ws
    src = torch.empty((n, c, hole_slot + 1), dtype=x.dtype, device=dev)
    grid = src[:, :, :hole_slot].view(n, c, hs, ws)
    grid[:, :, :h, :w] = x  # also turns channels_last input into NCHW
    grid[:, :, h, :] = _per_channel(pad_fill, x)
    grid[:, :, :h, w] = _per_channel(pad_fill, x)
    src[:, :, hole_slot] = _per_channel(cutout_fill, x)[:, :, 0]

    rows = torch.arange(oh, device=dev).expand(n, oh)                        # (N, S)
    cols = torch.arange(ow, device=dev).expand(n, ow)                        # (N, S)
    if flips is not None or flip:
        # output column j reads crop column S-1-j: the reversed row of this image's crop
        flips = randint(2).bool() if flips is None else flips.to(dev, torch.bool)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    if p > 0 or (oh, ow) != (h, w):
        # crop offset (dy, dx) in {0..H-S+2p} x {0..W-S+2p} of the padded image
        rows = rows + (randint(h - oh + 2 * p + 1) - p)[:, None]
        cols = cols + (randint(w - ow + 2 * p + 1) - p)[:, None]
        if pad_mode == "reflect":  # off the image: its mirror image (-1 -> 1, h -> h - 2)
            rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
            cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
        else:
            rows = torch.where((rows >= 0) & (rows < h), rows, h)  # off the image: fill row
            cols = torch.where((cols >= 0) & (cols < w), cols, w)  # off the image: fill column
    index = (rows[:, :, None] * ws + cols[:, None, :]).view(n, oh * ow)      # (N, S*S)
    if k > 0:
        top, left = randint(oh - k + 1), randint(ow - k + 1)
        square = (torch.arange(k, device=dev)[:, None] * ow + torch.arange(k, device=dev)).view(1, k * k)
        index.scatter_(1, (top * ow + left)[:, None] + square, hole_slot)
    index = index.view(n, 1, oh * ow).expand(n, c, oh * ow)
    return torch.gather(src, 2, index).view(n, c, oh, ow)


def _per_channel(value, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-channel fill as a (1, C, 1) tensor of x's dtype and device."""
    t = torch.as_tensor(value, dtype=torch.float32).to(device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[1])
    if t.numel() != x.shape[1]:
        raise ValueError(f"fill has {t.numel()} values but the batch has {x.shape[1]} channels")
    return t.reshape(1, -1, 1).to(x.dtype)


def _check_args(crop_padding: int, cutout: int, h: int, w: int, pad_mode: str = "constant") -> None:
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}")
    if pad_mode == "reflect" and crop_padding >= min(h, w):
        raise ValueError(f"reflected padding of {crop_padding} pixels needs images larger than that, got {h}x{w}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0 pixels, got {crop_padding}")
    if cutout < 0 or cutout > min(h, w):
        raise ValueError(f"cutout must be between 0 and {min(h, w)} pixels, got {cutout}")
