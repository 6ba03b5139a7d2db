"""Generic in-memory dataset containers: :class:`Split` and :class:`Dataset`.

A :class:`Split` holds uint8 NHWC images and int64 labels as tensors; a :class:`Dataset` is a
train/test pair of splits with the class names and the train split's per-channel mean and
standard deviation. Nothing here knows where the images came from: the loading of data
folders lives in :mod:`lrlab.data.sources`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrlab.errors import LrlabError


@dataclass
class Split:
    """One split of a dataset, held in memory.

    Attributes:
        images: uint8 tensor (N, H, W, 3), NHWC, contiguous, pixel values 0..255 (RGB).
        labels: int64 tensor (N,), class indices into ``Dataset.classes``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        """Number of images N."""
        return int(self.labels.shape[0])

    def subset(self, n: int, seed: int = 0) -> Split:
        """A class-balanced (stratified), deterministic subset of ``n`` images.

        Each class is shuffled with a ``torch.Generator`` seeded by ``seed``; images are then
        taken round-robin over the classes (rank 0 of every class, then rank 1, ...), so every
        class gets ``n // K`` or ``n // K + 1`` images (K = number of classes present) unless a
        class runs out, in which case the others make up the difference. The chosen images
        keep their original order. The same (split, n, seed) always gives the same subset.

        Args:
            n: number of images to keep, 1 <= n <= len(self).
            seed: seed of the per-class shuffles.

        Returns:
            A new Split with copies of the chosen images (N = n).

        Raises:
            LrlabError: when n is not in 1..len(self).
        """
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(self):
            raise LrlabError(f"subset size {n!r} is not valid; use an integer from 1 to {len(self)}")
        if n == len(self):
            return Split(self.images.clone(), self.labels.clone())
        gen = torch.Generator().manual_seed(int(seed))
        labels = self.labels.cpu()
        num_classes = int(labels.max()) + 1
        # rank of every image within its own shuffled class
        rank = torch.empty_like(labels)
        for c in range(num_classes):
            idx = torch.nonzero(labels == c).flatten()
            rank[idx[torch.randperm(idx.numel(), generator=gen)]] = torch.arange(idx.numel())
        key = rank * num_classes + labels  # round-robin order: rank first, then class
        chosen = torch.sort(torch.argsort(key)[:n]).values
        return Split(self.images[chosen.to(self.images.device)].contiguous(),
                     self.labels[chosen.to(self.labels.device)].contiguous())


@dataclass
class Dataset:
    """The splits of a dataset with class names and normalisation statistics.

    Attributes:
        train: training split, images uint8 (N, H, W, 3).
        test: test split, same H, W and classes as train; reported only, never read by a
            decision (unless the recipe says ``data.val_split: test``); None when the data
            folder has none.
        val: validation split (a ``val/`` or ``valid/`` folder, or a stratified hold-out from
            train), read by every decision: best checkpoint, plateau schedule, early stop, the
            range test's validation loss, ``compare``'s ranking; None until one is made.
        classes: class names; ``classes[i]`` is the name of label i (sorted folder names for
            an ImageFolder tree, ``label_names`` from ``batches.meta`` for python batches).
        mean: per-channel (R, G, B) mean of the TRAIN images in [0, 1] units.
        std: per-channel (R, G, B) population standard deviation (ddof=0) of the TRAIN
            images in [0, 1] units, over all pixels of all images (float64 accumulation).
    """

    train: Split
    test: Split | None
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    val: Split | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.classes)
