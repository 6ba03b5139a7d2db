"""Test-time augmentation (TTA): average the class probabilities over mirrored and
translated copies of each test image.

Views and weights, for one batch: the image (and, with ``shift`` s > 0, the image
translated by (+s, +s) and by (-s, -s) pixels, reflect-padded at the border, weights
1/2, 1/4, 1/4), each also mirrored horizontally (weights halved). This is the flip +
translate TTA of airbench (Jordan 2024, arXiv:2404.00498, section 3.7) at the level that
uses six views; flip TTA alone is the common two-view form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tta_probs(model: nn.Module, x: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """Mean softmax of ``model`` over the TTA views of ``x``.

    Args:
        model: classifier, (B, C, H, W) -> (B, K) logits; called as is (set eval mode and
            autocast outside).
        x: (B, C, H, W) float batch, any memory format.
        shift: translation s in pixels of the extra views (0: flip TTA only, 2 views; s > 0:
            6 views), at most H-1 and W-1.

    Returns:
        float32 (B, K) probabilities, each row summing to 1.

    Raises:
        ValueError: when ``shift`` is negative or not smaller than the image.
    """
    if shift < 0 or shift >= min(x.shape[-2:]):
        raise ValueError(f"TTA shift {shift} must be between 0 and {min(x.shape[-2:]) - 1} pixels")
    views = [(x, 1.0)]
    if shift:
        padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
        h, w = x.shape[-2:]
        views = [(x, 0.5), (padded[..., :h, :w], 0.25), (padded[..., 2 * shift:, 2 * shift:], 0.25)]
    probs = 0
    for view, weight in views:
        for v in (view, torch.flip(view, dims=[3])):
            probs = probs + (weight / 2) * model(v).float().softmax(1)
    return probs
