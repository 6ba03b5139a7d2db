"""FastNet: a small VGG-style CNN sized for CPU-speed CIFAR-10 runs.

The shape follows the speed-run networks (Page 2018, "How to train your ResNet";
Jordan 2024, arXiv:2404.00498): a 3x3 stem, then three blocks of
conv3x3 -> max-pool 2 -> BN -> activation -> conv3x3 -> BN -> activation, a global
max-pool and a bias-free linear head whose output is scaled down. Pooling right after
the first conv of each block puts most FLOPs at low resolution. For a 32x32 input the
blocks output 16x16, 8x8 and 4x4 maps; ``block2`` (8x8) is the default Grad-CAM layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lrlab.models.registry import register


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


class Block(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> act -> conv3x3 -> BN -> act; halves H and W."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


class FastNet(nn.Module):
    """(N, 3, H, W) float32 -> (N, num_classes) logits, H and W divisible by 8.

    Args:
        num_classes: number of logits K.
        widths: channels of the stem and the three blocks.
        head_scale: multiplier on the logits (a small value acts like a lower
            initial temperature-free learning rate for the head; airbench uses 1/9).
    """

    default_cam_layer = "block2"

    def __init__(self, num_classes: int, widths: tuple[int, int, int, int] = (32, 64, 256, 256),
                 head_scale: float = 1 / 8):
        super().__init__()
        c0, c1, c2, c3 = widths
        self.stem = nn.Sequential(*_conv_bn(3, c0), nn.GELU())
        self.block1 = Block(c0, c1)
        self.block2 = Block(c1, c2)
        self.block3 = Block(c2, c3)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(c3, num_classes, bias=False)
        self.head_scale = head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.head_scale


@register
def fastnet(num_classes: int, width: float = 1.0, head_scale: float = 1 / 8) -> FastNet:
    """FastNet with channel widths (32, 64, 256, 256) x ``width``."""
    widths = tuple(max(8, round(c * width)) for c in (32, 64, 256, 256))
    return FastNet(num_classes, widths, head_scale)
