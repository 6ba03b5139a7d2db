"""FastNet: a small VGG-style CNN sized for CPU-speed CIFAR-10 runs.

The shape follows the speed-run networks (Page 2018, "How to train your ResNet";
Jordan 2024, arXiv:2404.00498): a 3x3 patch-whitening stem, then three blocks of
conv3x3 -> max-pool 2 -> BN -> activation -> conv3x3 -> BN -> activation, a global
max-pool and a bias-free linear head whose output is scaled down. Pooling right after
the first conv of each block puts most FLOPs at low resolution. For a 32x32 input the
blocks output 16x16, 8x8 and 4x4 maps; ``block2`` (8x8) is the default Grad-CAM layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrlab.models.registry import check_dropout, register



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
        dropout: probability of nn.Dropout on the pooled features before the classifier
            (0: none, the default).
        channel_dropout: probability of nn.Dropout2d (whole channels) after each block
            (0: none, the default).
    """

    default_cam_layer = "block2"

    def __init__(self, num_classes: int, widths: tuple[int, int, int, int] = (32, 64, 256, 256),
                 head_scale: float = 1 / 8, dropout: float = 0.0, channel_dropout: float = 0.0):
        super().__init__()
        c0, c1, c2, c3 = widths
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, padding=1, bias=True), nn.BatchNorm2d(c0), nn.GELU())
        self.block1 = Block(c0, c1)
        self.block2 = Block(c1, c2)
        self.block3 = Block(c2, c3)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(c3, num_classes, bias=False)
        self.head_scale = head_scale
        self.dropout = nn.Dropout(dropout) if dropout else None  # modules only when on: same state
        self.channel_dropout = nn.Dropout2d(channel_dropout) if channel_dropout else None

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Patch-whitening initialisation of the stem (the idea of Page 2018 and airbench).

        The 3x3x3 patches of ``x`` ((N, 3, H, W) float32, normalised training images; a few
        thousand suffice) give a 27x27 covariance; the stem's filters become its top
        ``c0 / 2`` eigenvectors scaled by 1/sqrt(eigenvalue + eps), each with its negation,
        and are frozen (the bias still trains). The first layer then sees decorrelated,
        unit-variance inputs from the first step, which speeds up short runs.
        """
        conv = self.stem[0]
        patches = F.unfold(x.float(), 3, padding=1).transpose(1, 2).reshape(-1, 27)
        patches = patches - patches.mean(0)
        eigvals, eigvecs = torch.linalg.eigh(patches.T @ patches / len(patches))
        k = conv.out_channels // 2
        top = eigvecs[:, -k:].T / (eigvals[-k:, None] + eps).sqrt()  # (k, 27)
        weight = torch.cat([top, -top]).reshape(2 * k, 3, 3, 3)
        conv.weight[: 2 * k] = weight.to(conv.weight)
        conv.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in (self.block1, self.block2, self.block3):
            x = block(x)
            if self.channel_dropout is not None:
                x = self.channel_dropout(x)
        x = torch.flatten(self.pool(x), 1)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x) * self.head_scale


@register
def fastnet(num_classes: int, width: float = 1.0, head_scale: float = 1 / 8, dropout: float = 0.0,
            channel_dropout: float = 0.0) -> FastNet:
    """FastNet with channel widths (32, 64, 256, 256) x ``width``; optional dropout before the
    classifier and channel dropout (Dropout2d) after each block."""
    check_dropout(dropout=dropout, channel_dropout=channel_dropout)
    widths = tuple(max(8, round(c * width)) for c in (32, 64, 256, 256))
    return FastNet(num_classes, widths, head_scale, dropout, channel_dropout)
