"""Generic in-memory dataset containers: :class:`Split` and :class:`Dataset`.

A :class:`Split` holds uint8 NHWC images and int64 labels as tensors; a :class:`Dataset` is a
train/test pair of splits with the class names and the train split's per-channel mean and
standard deviation. Nothing here knows where the images came from: the loading of data
folders lives in :mod:`lrlab.data.sources`.
"""

from __future__ import annotations

import math
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
        return self._take(chosen)

    def hold_out(self, fraction: float, seed: int = 0) -> tuple[Split, Split]:
        """A stratified, seeded hold-out: ``(rest, held)``, disjoint, together all images.

        Each class c with n_c images is shuffled with a ``torch.Generator`` seeded by ``seed``
        (classes in label order), and its first ``min(floor(fraction * n_c + 0.5), n_c - 1)``
        images go to ``held``: every class keeps at least one image in ``rest``, and a class
        whose share rounds to 0 has none in ``held`` (the caller decides whether that is an
        error). Both parts keep the original order. The same (split, fraction, seed) always
        gives the same parts; this is the usual stratified validation hold-out (e.g.
        scikit-learn's ``train_test_split(..., stratify=labels)``).

        Args:
            fraction: share of every class to hold out, 0 < fraction < 1.
            seed: seed of the per-class shuffles.

        Returns:
            (rest, held): new Splits with copies of the images (uint8 (N, H, W, 3), int64 (N,)).

        Raises:
            ValueError: when fraction is not in (0, 1).
        """
        if not 0 < fraction < 1:
            raise ValueError(f"hold-out fraction {fraction!r} is not in (0, 1)")
        gen = torch.Generator().manual_seed(int(seed))
        labels = self.labels.cpu()
        held = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(int(labels.max()) + 1 if len(labels) else 0):
            idx = torch.nonzero(labels == c).flatten()
            k = min(math.floor(fraction * idx.numel() + 0.5), idx.numel() - 1)
            held[idx[torch.randperm(idx.numel(), generator=gen)[:max(k, 0)]]] = True
        return self._take(torch.nonzero(~held).flatten()), self._take(torch.nonzero(held).flatten())

    def _take(self, index: torch.Tensor) -> Split:
        """A new Split with copies of the images at the (sorted) int64 ``index``."""
        return Split(self.images[index.to(self.images.device)].contiguous(),
                     self.labels[index.to(self.labels.device)].contiguous())


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

    @property
    def report_split(self) -> Split:
        """The split the report's predictions, mistakes and class activation maps read: the test
        split when there is one, else the validation split.

        Raises:
            LrlabError: neither a test nor a validation split.
        """
        split = self.test if self.test is not None else self.val
        if split is None:
            raise LrlabError("the dataset has neither a test nor a validation split to report on; "
                             "add a test/ folder or set data.val_split=val")
        return split

    @property
    def report_split_name(self) -> str:
        """"test" or "val": the name of :attr:`report_split`."""
        return "test" if self.test is not None else "val"
