"""Batch loaders over an in-memory Split: shuffle, augment, normalise, move to the device.

No DataLoader, no worker processes: the split already sits in memory as one uint8 tensor,
so a batch is an index_select plus (for training) one batched augmentation op. This is the
"data lives on the device as one tensor" design of Keller Jordan's cifar10-airbench.

The accepted values of the loader's ``augment`` and ``flip`` options are defined once here,
as :data:`AUGMENT_MODES` and :data:`FLIP_MODES`; the configuration derives its allowed
values from them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lrlab.data.augment import PAD_MODES, batch_augment, build_albumentations
from lrlab.data.containers import Split
from lrlab.data.photo_augment import CROP_SCALE, center_crop, random_resized_crop, trivial_augment
from lrlab.errors import LrlabError

AUGMENT_MODES = ("none", "tensor", "albumentations", "random_resized_crop")  # BatchLoader(augment=...)
PHOTO_MODES = ("none", "random_resized_crop")  # the modes that work with an image_size
FLIP_MODES = (True, False, "alternate")  # BatchLoader(flip=...)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Scale a uint8 (or 0..255 float) (N, C, H, W) batch to float32 ``(x/255 - mean) / std``.

    NHWC data can be passed as the free view ``x.permute(0, 3, 1, 2)``; the memory layout of
    the input (contiguous or channels_last) is kept.

    Args:
        x: (N, C, H, W) tensor with pixel values in 0..255, any device.
        mean: per-channel mean in [0, 1] units (length C).
        std: per-channel standard deviation in [0, 1] units (length C).

    Returns:
        float32 (N, C, H, W) tensor on x's device.
    """
    scale, shift = _affine(mean, std, x.device)
    return x.to(torch.float32).mul_(scale).sub_(shift)


def _affine(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, C, 1, 1) float32, with normalised = x * scale - shift."""
    m = torch.as_tensor(mean, dtype=torch.float64).flatten()
    s = torch.as_tensor(std, dtype=torch.float64).flatten()
    scale = (1.0 / (255.0 * s)).to(torch.float32).view(1, -1, 1, 1).to(device)
    shift = (m / s).to(torch.float32).view(1, -1, 1, 1).to(device)
    return scale, shift


def _check_options(shape: Sequence[int], *, augment: str, flip: bool | str, crop_padding: int, pad_mode: str,
                   cutout: int, rotate: float, crop_sizes: Sequence[int], mean: Sequence[float],
                   std: Sequence[float]) -> list[int]:
    """Validate BatchLoader's options for a split of images of ``shape`` (N, H, W, C).

    Returns:
        crop_sizes as a list of ints.

    Raises:
        LrlabError: the first invalid option, as documented on :class:`BatchLoader`.
    """
    if augment not in AUGMENT_MODES:
        raise LrlabError(f"augment {augment!r} is not valid; use one of {', '.join(AUGMENT_MODES)}")
    if augment in ("tensor", "random_resized_crop") and rotate:
        raise LrlabError(f"rotate={rotate} needs augment 'albumentations'; the {augment!r} path "
                         f"does crop, flip and Cutout only")
    if flip not in FLIP_MODES:
        raise LrlabError(f"flip {flip!r} is not valid; use true, false or 'alternate'")
    if augment not in ("tensor", "random_resized_crop") and flip == "alternate":
        raise LrlabError("flip 'alternate' needs augment 'tensor'; use flip true with "
                         f"augment {augment!r}")
    _, h, w, c = shape
    crop_sizes = [int(v) for v in crop_sizes]
    if crop_sizes and (augment != "tensor" or not all(max(cutout, 1) <= v <= min(h, w) for v in crop_sizes)):
        raise LrlabError(f"crop_sizes {crop_sizes} is not valid; it needs augment 'tensor' and sides "
                         f"between {max(cutout, 1)} (the Cutout) and {min(h, w)} pixels")
    if len(tuple(mean)) != c or len(tuple(std)) != c or min(float(s) for s in std) <= 0:
        raise LrlabError(f"mean {tuple(mean)} and std {tuple(std)} must have {c} values "
                         f"each, with std > 0")
    if crop_padding < 0 or not 0 <= cutout <= min(h, w) or rotate < 0:
        raise LrlabError(f"augmentation crop_padding={crop_padding}, cutout={cutout}, "
                         f"rotate={rotate} is not valid; use crop_padding >= 0, "
                         f"0 <= cutout <= {min(h, w)} and rotate >= 0")
    if pad_mode not in PAD_MODES:
        raise LrlabError(f"pad_mode {pad_mode!r} is not valid; use one of {', '.join(PAD_MODES)}")
    if pad_mode == "reflect" and crop_padding >= min([h, w, *crop_sizes]):
        raise LrlabError(f"crop_padding {crop_padding} with pad_mode reflect needs images (and crops) larger than "
                         f"{crop_padding} pixels; use a smaller crop_padding or pad_mode constant")
    return crop_sizes


def _check_photo_options(shape: Sequence[int], *, augment: str, image_size: int | None,
                         crop_scale: Sequence[float], crop_sizes: Sequence[int]) -> None:
    """Validate BatchLoader's image_size options for a split of images of ``shape`` (N, H, W, C).

    Raises:
        LrlabError: random_resized_crop without image_size, image_size with another mode than
            "none" or "random_resized_crop" or with crop_sizes, images smaller than image_size,
            or a crop_scale that is not 0 < low <= high <= 1.
    """
    if image_size is None:
        if augment == "random_resized_crop":
            raise LrlabError("augment 'random_resized_crop' needs an image_size (data.image_size)")
        return
    if augment not in PHOTO_MODES or list(crop_sizes):
        raise LrlabError(f"augment {augment!r}{' with crop_sizes' if list(crop_sizes) else ''} does not "
                         f"work with image_size {image_size}; use augment {' or '.join(PHOTO_MODES)} "
                         f"(and no crop_sizes)")
    if min(shape[1], shape[2]) < image_size:
        raise LrlabError(f"images of {shape[2]}x{shape[1]} pixels are smaller than image_size "
                         f"{image_size}; load the data with the same image_size")
    lo, hi = (float(v) for v in crop_scale)
    if not 0 < lo <= hi <= 1:
        raise LrlabError(f"crop_scale {tuple(crop_scale)} is not valid; use (low, high) with "
                         f"0 < low <= high <= 1 (fractions of the image area)")


class BatchLoader:
    """Iterate over a Split in batches of normalised float32 images and int64 labels.

    Each ``iter(loader)`` is one epoch: a fresh permutation (if shuffle) and fresh
    augmentation draws from a ``torch.Generator`` seeded with ``seed + epoch`` (epoch = 0 for
    the first iteration, then 1, 2, ...), so a run is reproducible from its seed and every
    epoch differs. Every image appears exactly once per epoch (the last batch is smaller
    unless drop_last).

    Augmentation modes:

    * ``"none"``: index and normalise (test sets).
    * ``"tensor"`` (fast path): the split is moved to ``device`` once as its uint8 NHWC
      tensor (50k CIFAR images: 154 MB); each batch is index_select, then
      :func:`~lrlab.data.augment.batch_augment` on the uint8 batch (black padding, Cutout
      filled with the uint8 mean colour, exactly the recipe of the albumentations path),
      then normalisation. Measured on CPU (1 thread, 512-image batches) this runs at the
      same ~150k images/s as keeping a normalised float32 copy, with 1/4 of the memory.
      No per-image Python. Rotation is not available here.
    * ``"albumentations"``: per image, the Compose of
      :func:`~lrlab.data.augment.build_albumentations` on the uint8 HWC numpy image (seeded
      per epoch), then stack and normalise. In-process, no workers.
    * ``"random_resized_crop"`` (photos, needs ``image_size``): per batch, index_select of the
      uint8 images where they are (in memory or a memory-mapped cache; the split is not copied
      to the device), then :func:`~lrlab.data.photo_augment.random_resized_crop` to image_size
      (area fraction in ``crop_scale``), the flip, optional TrivialAugmentWide and Cutout, all
      on uint8 CPU tensors with the epoch's generator; then to the device and normalised.

    With ``image_size`` and augment "none" (evaluation), each batch is the centre image_size x
    image_size of the images (:func:`~lrlab.data.photo_augment.center_crop`; no-op for images
    already of that size), read where they are and moved to the device per batch.

    Args:
        split: the images (uint8 (N, H, W, 3)) and labels (int64 (N,)).
        batch_size: images per batch B (settable between epochs via ``loader.batch_size``).
        mean: per-channel mean in [0, 1] units (use the train split's, ``Dataset.mean``).
        std: per-channel std in [0, 1] units (``Dataset.std``).
        shuffle: new random order every epoch (else the split's order).
        augment: one of :data:`AUGMENT_MODES`: "none", "tensor" or "albumentations".
        crop_padding: padding p in pixels of the random crop (0 = none).
        pad_mode: how that padding is filled, one of :data:`~lrlab.data.augment.PAD_MODES`:
            "constant" (black) or "reflect" (the image mirrored at its border).
        flip: True: random horizontal flip with probability 1/2; "alternate": alternating
            flips (Jordan 2024, arXiv:2404.00498, section 3.6), each image flipped at random
            in epoch 0 and then flipped in every other epoch, so consecutive epochs always
            show both orientations (tensor path only); False: no flip.
        cutout: side in pixels of the Cutout square (0 = none).
        rotate: maximum rotation in degrees (albumentations only).
        crop_sizes: progressive resizing (tensor path only): side of the square training crops
            of each epoch (epoch 0 first), the last value repeating; e.g. [24, 24, 28, 32].
            Smaller crops cost ~(S/32)^2 of the FLOPs. The fast.ai DAWNBench 2018 idea, here
            with random crops at the original pixel scale instead of downscaled images.
            Empty: full-size images every epoch.
        image_size: side of the delivered square images, for splits of larger stored squares
            (:func:`~lrlab.data.load_dataset` with image_size); None: the images' own size.
        crop_scale: (low, high) area fraction of random_resized_crop's boxes.
        trivial_augment: apply TrivialAugmentWide after random_resized_crop and the flip.
        device: where batches are delivered.
        channels_last: deliver x in ``torch.channels_last`` memory format.
        drop_last: drop the final incomplete batch.
        seed: base seed of the per-epoch generators.
        shard: (rank, world) of data-parallel training (:mod:`lrlab.distributed`): each batch
            is still drawn, augmented and counted as the whole (global) batch of
            ``batch_size``, from the same generator draws, and this process receives only
            its part: images [rank * B // world, (rank + 1) * B // world) of it (a rank whose
            part of a short last batch is empty skips that batch). The ranks' parts are
            disjoint and together are the one-process batch, augmentation included; the
            augmentation's cost is that of the whole batch on every rank. (0, 1): no sharding.

    Yields:
        (x, y): x float32 (B, 3, H, W) normalised, y int64 (B,), both on ``device``.

    Raises:
        LrlabError: unknown augment mode, batch_size < 1, rotate with augment="tensor", a
            Cutout larger than the image, or mean/std of the wrong length or with std <= 0;
            image_size options as :func:`_check_photo_options` says.
    """

    def __init__(self, split: Split, batch_size: int, *, mean: Sequence[float],
                 std: Sequence[float], shuffle: bool, augment: str = "none",
                 crop_padding: int = 4, flip: bool | str = True, cutout: int = 0, rotate: float = 0.0,
                 pad_mode: str = "constant", device: torch.device | str = torch.device("cpu"),
                 channels_last: bool = False,
                 drop_last: bool = False, seed: int = 0, crop_sizes: Sequence[int] = (),
                 image_size: int | None = None, crop_scale: Sequence[float] = CROP_SCALE,
                 trivial_augment: bool = False, shard: tuple[int, int] = (0, 1)):
        _check_photo_options(split.images.shape, augment=augment, image_size=image_size,
                             crop_scale=crop_scale, crop_sizes=crop_sizes)
        n, h, w, c = split.images.shape
        shape = (n, h, w, c) if image_size is None else (n, image_size, image_size, c)
        crop_sizes = _check_options(shape, augment=augment, flip=flip,
                                    crop_padding=crop_padding, pad_mode=pad_mode, cutout=cutout, rotate=rotate,
                                    crop_sizes=crop_sizes, mean=mean, std=std)
        self.image_size = image_size
        self.crop_scale = tuple(float(v) for v in crop_scale)
        self.trivial_augment = bool(trivial_augment)
        self.device = torch.device(device)
        self.augment = augment
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.channels_last = bool(channels_last)
        self.crop_padding, self.cutout, self.rotate = int(crop_padding), int(cutout), float(rotate)
        self.pad_mode = pad_mode
        self.flip = flip if flip == "alternate" else bool(flip)
        self.seed = int(seed)
        self.crop_sizes = crop_sizes
        self.shard = (int(shard[0]), int(shard[1]))
        # alternating flips: image i is flipped in epoch e iff first_flip[i] xor (e odd)
        self._first_flip = (torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(self.seed))
                            .bool().to(device if image_size is None else "cpu") if flip == "alternate" else None)
        self.epoch = 0
        self.batch_size = batch_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._scale, self._shift = _affine(self.mean, self.std, self.device)
        self._tiles: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cutout_fill = tuple(int(round(255.0 * m)) for m in self.mean)
        self._n = n
        if augment == "albumentations":
            self._images_np = split.images.cpu().numpy()  # per-image numpy work stays on CPU
            self._images = None
            self._compose = build_albumentations(self.crop_padding, self.flip, self.cutout,
                                                 self.rotate, self.mean, image_size=(h, w), pad_mode=pad_mode)
        elif image_size is not None:
            self._images = split.images  # stays where it is (memory-mapped); batches move
        else:
            self._images = split.images.to(self.device).contiguous()  # uint8 NHWC, once
        self._labels = split.labels.to(self.device, torch.int64)

    @property
    def batch_size(self) -> int:
        """Images per batch; may be changed between epochs (e.g. by a batch-size schedule)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LrlabError(f"batch_size {value!r} is not valid; use an integer >= 1")
        self._batch_size = value

    def __len__(self) -> int:
        """Batches per epoch at the current batch_size."""
        if self.drop_last:
            return self._n // self._batch_size
        return math.ceil(self._n / self._batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        epoch = self.epoch
        self.epoch += 1
        bs = self._batch_size
        if self.shuffle:
            order = torch.randperm(self._n, generator=gen)
        else:
            order = torch.arange(self._n)
        if self.augment == "albumentations":
            self._compose.set_random_seed(self.seed + epoch)
            return self._iter_albumentations(order, bs)
        if self.image_size is not None:
            return self._iter_photos(order, bs, gen, epoch)
        return self._iter_tensor(order.to(self.device), bs, gen, epoch)

    def _batches(self, order: torch.Tensor, bs: int):
        stop = (self._n // bs) * bs if self.drop_last else self._n
        for start in range(0, stop, bs):
            yield order[start:start + bs]

    def _cut(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's part (:attr:`shard`) of the augmented uint8 batch x and its indices; the
        batch itself without sharding; None when the part is empty."""
        rank, world = self.shard
        if world == 1:
            return x, idx
        n = len(idx)
        lo, hi = rank * n // world, (rank + 1) * n // world
        return (x[lo:hi], idx[lo:hi]) if hi > lo else None

    def _finish(self, x_uint8_nchw: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float32 in the requested memory format."""
        if not self.channels_last:
            return x_uint8_nchw.contiguous().to(torch.float32).mul_(self._scale).sub_(self._shift)
        # channels_last: change the layout while the data is 1 byte per value (free for the
        # "none" path, whose NHWC rows already are channels_last), then normalise the NHWC
        # memory as (B, H*W*C) rows against a tiled per-channel scale: broadcasting over an
        # innermost dim of 3 was 5-10x slower on CPU.
        b, c, h, w = x_uint8_nchw.shape
        nhwc = x_uint8_nchw.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        if self._tiles is None or self._tiles[0].numel() != h * w * c:
            self._tiles = (self._scale.view(c).repeat(h * w).view(1, -1),
                           self._shift.view(c).repeat(h * w).view(1, -1))
        x = nhwc.reshape(b, h * w * c).to(torch.float32).mul_(self._tiles[0]).sub_(self._tiles[1])
        return x.view(b, h, w, c).permute(0, 3, 1, 2)

    def _iter_tensor(self, order: torch.Tensor, bs: int, gen: torch.Generator, epoch: int):
        for idx in self._batches(order, bs):
            x = self._images.index_select(0, idx).permute(0, 3, 1, 2)  # (B, C, H, W) view
            if self.augment == "tensor":
                flip = self.flip
                if self._first_flip is not None:
                    flip = self._first_flip.index_select(0, idx) ^ bool(epoch % 2)
                size = self.crop_sizes[min(epoch, len(self.crop_sizes) - 1)] if self.crop_sizes else None
                x = batch_augment(x, self.crop_padding, flip, self.cutout, gen, size=size,
                                  pad_fill=0, cutout_fill=self._cutout_fill, pad_mode=self.pad_mode)
            if (part := self._cut(x, idx)) is not None:
                yield self._finish(part[0]), self._labels.index_select(0, part[1])

    def _iter_albumentations(self, order: torch.Tensor, bs: int):
        compose = self._compose
        images = self._images_np
        for idx in self._batches(order, bs):
            idx_np = idx.numpy()
            batch = np.stack([compose(image=images[i])["image"] for i in idx_np])
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
            if (part := self._cut(x, idx)) is not None:
                yield self._finish(part[0]), self._labels.index_select(0, part[1].to(self.device))

    def _iter_photos(self, order: torch.Tensor, bs: int, gen: torch.Generator, epoch: int):
        """Batches at image_size: read on the CPU, crop (and augment) as uint8, then move."""
        labels = self._labels.cpu()
        for idx in self._batches(order, bs):
            x = self._images.index_select(0, idx).permute(0, 3, 1, 2)  # uint8 (B, C, S, S), CPU
            if self.augment == "random_resized_crop":
                x = random_resized_crop(x, self.image_size, self.crop_scale, gen)
                flips = None
                if self._first_flip is not None:
                    flips = self._first_flip.index_select(0, idx) ^ bool(epoch % 2)
                elif self.flip:
                    flips = torch.randint(0, 2, (len(idx),), generator=gen).bool()
                if flips is not None:
                    x = torch.where(flips[:, None, None, None], x.flip(3), x)
                if self.trivial_augment:
                    x = trivial_augment(x, gen)
                if self.cutout:
                    x = batch_augment(x, 0, False, self.cutout, gen, cutout_fill=self._cutout_fill)
            else:
                x = center_crop(x, self.image_size)
            if (part := self._cut(x, idx)) is not None:
                yield self._finish(part[0].to(self.device)), labels.index_select(0, part[1]).to(self.device)
