"""ResNet-18/34 for 32x32 inputs (He et al. 2015, arXiv:1512.03385).

The CIFAR variant: a 3x3 stride-1 stem and no max-pool, so the four stages produce
32x32, 16x16, 8x8 and 4x4 maps for a 32x32 input. ``resnet18(10)`` has 11,173,962
parameters.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from lrlab.models.registry import register


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: (N, 3, H, W) float32 -> (N, num_classes) logits.

    Modules ``layer1``..``layer4`` are the stages; ``layer3`` (8x8 maps at 32x32 input)
    is the default Grad-CAM target.
    """

    default_cam_layer = "layer3"

    def __init__(self, blocks: list[int], num_classes: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            layers = [BasicBlock(c_in, c_out, 1 if i == 0 else 2)]
            layers += [BasicBlock(c_out, c_out, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register
def resnet18(num_classes: int, width: int = 64) -> ResNet:
    """ResNet-18 for 32x32 inputs: 11.17 M parameters with 10 classes."""
    return ResNet([2, 2, 2, 2], num_classes, width)


@register
def resnet34(num_classes: int, width: int = 64) -> ResNet:
    """ResNet-34 for 32x32 inputs: 21.28 M parameters with 10 classes."""
    return ResNet([3, 4, 6, 3], num_classes, width)
