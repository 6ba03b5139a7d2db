"""Test-time augmentation (TTA): average the class probabilities over mirrored and
translated copies of each test image.

Views and weights, for one batch: the image (and, with ``shift`` s > 0, the image
translated by (+s, +s) and by (-s, -s) pixels, reflect-padded at the border, weights
1/2, 1/4, 1/4), each also mirrored horizontally (weights halved). This is the flip +
translate TTA of airbench (Jordan 2024, arXiv:2404.00498, section 3.7) at the level that
uses six views; flip TTA alone is the common two-view form.

Selective TTA (``fraction`` < 1; hiverge/cifar10-speedrun, 2025): every image gets the plain
view first, and only the ``fraction`` of each batch with the lowest top-1 probability gets the
other views; a confident prediction rarely changes under TTA, so this keeps most of its gain for
a fraction of its cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TTA:
    """A recipe's test-time augmentation (``train.tta``, ``train.tta_shift``, ``train.tta_fraction``).

    Attributes:
        shift: translation s in pixels of the extra views (0: flip TTA only, 2 views; s > 0: 6).
        fraction: share (0, 1] of each batch, least confident first, that gets the extra views.
    """

    shift: int = 0
    fraction: float = 1.0

    @classmethod
    def of(cls, train_cfg) -> TTA | None:
        """The TTA of a ``lrlab.config.TrainConfig``; None when ``train.tta`` is off."""
        return cls(train_cfg.tta_shift, train_cfg.tta_fraction) if train_cfg.tta else None

    def probs(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """:func:`tta_probs` with these settings."""
        return tta_probs(model, x, self.shift, self.fraction)


def _views(x: torch.Tensor, shift: int) -> list[tuple[torch.Tensor, float]]:
    """(view, weight) pairs, the plain image first; weights sum to 1."""
    views = [(x, 1.0)]
    if shift:
        padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
        h, w = x.shape[-2:]
        views = [(x, 0.5), (padded[..., :h, :w], 0.25), (padded[..., 2 * shift:, 2 * shift:], 0.25)]
    return [(v, weight / 2) for view, weight in views for v in (view, torch.flip(view, dims=[3]))]


def tta_probs(model: nn.Module, x: torch.Tensor, shift: int = 0, fraction: float = 1.0) -> torch.Tensor:
    """Mean softmax of ``model`` over the TTA views of ``x``.

    Args:
        model: classifier, (B, C, H, W) -> (B, K) logits; called as is (set eval mode and
            autocast outside).
        x: (B, C, H, W) float batch, any memory format.
        shift: translation s in pixels of the extra views (0: flip TTA only, 2 views; s > 0:
            6 views), at most H-1 and W-1.
        fraction: share of the batch that gets every view: the ceil(fraction x B) images with
            the lowest top-1 probability of the plain view; the others keep the plain view's
            softmax (1: every image, the plain TTA).

    Returns:
        float32 (B, K) probabilities, each row summing to 1.

    Raises:
        ValueError: when ``shift`` is negative or not smaller than the image, or ``fraction`` is
            not in (0, 1].
    """
    if shift < 0 or shift >= min(x.shape[-2:]):
        raise ValueError(f"TTA shift {shift} must be between 0 and {min(x.shape[-2:]) - 1} pixels")
    if not 0 < fraction <= 1:
        raise ValueError(f"TTA fraction {fraction} must be in (0, 1]")
    if fraction == 1:
        return sum(weight * model(v).float().softmax(1) for v, weight in _views(x, shift))
    plain = model(x).float().softmax(1)
    unsure = plain.max(1).values.topk(math.ceil(fraction * len(x)), largest=False).indices
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    sub = x[unsure].contiguous(memory_format=layout)  # indexing may drop the layout the model runs fastest in
    (_, w0), *rest = _views(sub, shift)
    probs = plain.clone()
    probs[unsure] = w0 * plain[unsure] + sum(weight * model(v).float().softmax(1) for v, weight in rest)
    return probs
