"""Test-time augmentation: the views and their weights are exact."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrlab.config import TrainConfig
from lrlab.tta import TTA, tta_probs


def _model() -> nn.Module:
    torch.manual_seed(0)  # position-sensitive: a conv net with a linear head on the whole map
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved by (dy, dx) pixels, the uncovered border filled by reflection, built per pixel."""
    h, w = x.shape[-2:]

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    rows = torch.tensor([reflect(r - dy, h) for r in range(h)])
    cols = torch.tensor([reflect(c - dx, w) for c in range(w)])
    return x[..., rows, :][..., cols]


@torch.no_grad()
def test_flip_tta_is_the_mean_over_image_and_mirror():
    model, x = _model(), torch.randn(6, 3, 8, 8)
    expected = (F.softmax(model(x), 1) + F.softmax(model(torch.flip(x, [3])), 1)) / 2
    torch.testing.assert_close(tta_probs(model, x), expected)


@torch.no_grad()
def test_shift_tta_weights_six_views():
    model, x = _model(), torch.randn(6, 3, 8, 8)
    views = [(x, 0.5), (_shifted(x, 2, 2), 0.25), (_shifted(x, -2, -2), 0.25)]
    expected = sum(w / 2 * (F.softmax(model(v), 1) + F.softmax(model(torch.flip(v, [3])), 1)) for v, w in views)
    got = tta_probs(model, x.contiguous(memory_format=torch.channels_last), shift=2)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(1), torch.ones(6))
    assert not torch.allclose(got, tta_probs(model, x))  # the shifted views matter
    with pytest.raises(ValueError, match="shift"):
        tta_probs(model, x, shift=8)


@torch.no_grad()
def test_selective_tta_gives_the_views_to_the_least_confident_images_only():
    """Selective TTA (hiverge/cifar10-speedrun): the ceil(fraction x B) images whose plain top-1
    probability is lowest get every view, the others keep the plain softmax."""
    model, x = _model(), torch.randn(10, 3, 8, 8)
    plain, full = F.softmax(model(x), 1), tta_probs(model, x, shift=1)
    unsure = plain.max(1).values.argsort()[:3]  # ceil(0.25 x 10) = 3
    got = tta_probs(model, x.contiguous(memory_format=torch.channels_last), shift=1, fraction=0.25)
    sure = torch.ones(10, dtype=torch.bool)
    sure[unsure] = False
    torch.testing.assert_close(got[unsure], full[unsure])
    torch.testing.assert_close(got[sure], plain[sure])
    assert not torch.allclose(got[unsure], plain[unsure])
    torch.testing.assert_close(TTA(1, 0.25).probs(model, x), got)
    assert TTA.of(TrainConfig(tta=True, tta_shift=1, tta_fraction=0.25)) == TTA(1, 0.25)
    assert TTA.of(TrainConfig(tta=False, tta_fraction=0.25)) is None
    with pytest.raises(ValueError, match="fraction"):
        tta_probs(model, x, fraction=0)
