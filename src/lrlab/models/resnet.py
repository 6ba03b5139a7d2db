"""ResNet-18/34 for 32x32 inputs (He et al. 2015, arXiv:1512.03385).

The CIFAR variant: a 3x3 stride-1 stem and no max-pool, so the four stages produce
32x32, 16x16, 8x8 and 4x4 maps for a 32x32 input. ``resnet18(10)`` has 11,173,962
parameters.

``norm`` picks the normalisation of every conv: "batch" (BatchNorm2d, the default), "group"
(GroupNorm with 32 groups, or gcd(32, channels) for narrow layers; Wu & He 2018,
arXiv:1803.08494) or "layer" (GroupNorm with one group: layer norm over (C, H, W) of each
image; Ba et al. 2016, arXiv:1607.06450). The modules keep their ``bn*`` names, so the
parameter count and state-dict keys do not depend on the choice.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from lrlab.errors import LrlabError
from lrlab.models.registry import check_dropout, register

NORMS = ("batch", "group", "layer")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """The normalisation module ``norm`` ("batch", "group" or "layer") for ``channels`` channels.

    Raises:
        LrlabError: an unknown name (the valid ones are listed).
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    raise LrlabError(f"unknown model.kwargs norm {norm!r}; valid norms: {', '.join(NORMS)}")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm_layer(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: (N, 3, H, W) float32 -> (N, num_classes) logits.

    Modules ``layer1``..``layer4`` are the stages; ``layer3`` (8x8 maps at 32x32 input)
    is the default Grad-CAM target. ``dropout``: nn.Dropout before the classifier;
    ``channel_dropout``: nn.Dropout2d after each stage (0: none, the default).
    """

    default_cam_layer = "layer3"

    def __init__(self, blocks: list[int], num_classes: int, width: int = 64, norm: str = "batch",
                 dropout: float = 0.0, channel_dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(norm, width)
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            layers = [BasicBlock(c_in, c_out, 1 if i == 0 else 2, norm)]
            layers += [BasicBlock(c_out, c_out, 1, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, num_classes)
        self.dropout = nn.Dropout(dropout) if dropout else None  # modules only when on: same state
        self.channel_dropout = nn.Dropout2d(channel_dropout) if channel_dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            if self.channel_dropout is not None:
                x = self.channel_dropout(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)


@register
def resnet18(num_classes: int, width: int = 64, norm: str = "batch", dropout: float = 0.0,
             channel_dropout: float = 0.0) -> ResNet:
    """ResNet-18 for 32x32 inputs: 11.17 M parameters with 10 classes (any ``norm``)."""
    check_dropout(dropout=dropout, channel_dropout=channel_dropout)
    return ResNet([2, 2, 2, 2], num_classes, width, norm, dropout, channel_dropout)


@register
def resnet34(num_classes: int, width: int = 64, norm: str = "batch", dropout: float = 0.0,
             channel_dropout: float = 0.0) -> ResNet:
    """ResNet-34 for 32x32 inputs: 21.28 M parameters with 10 classes (any ``norm``)."""
    check_dropout(dropout=dropout, channel_dropout=channel_dropout)
    return ResNet([3, 4, 6, 3], num_classes, width, norm, dropout, channel_dropout)
