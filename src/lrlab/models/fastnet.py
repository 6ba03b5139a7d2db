"""FastNet: a small VGG-style CNN sized for CPU-speed CIFAR-10 runs.

The shape follows the speed-run networks (Page 2018, "How to train your ResNet";
Jordan 2024, arXiv:2404.00498): a patch-whitening stem, then three blocks of
conv3x3 -> max-pool 2 -> BN -> activation -> conv3x3 -> BN -> activation, a global
max-pool and a bias-free linear head whose output is scaled down. Pooling right after
the first conv of each block puts most FLOPs at low resolution. For a 32x32 input the
blocks output 16x16, 8x8 and 4x4 maps (15x15, 7x7, 3x3 with the 2x2 whitening stem);
``block2`` is the default Grad-CAM layer.

Two stems: the default 3x3 conv (padding 1) -> BN -> GELU, whose first channels get the
whitening filters; or airbench94's (``whiten_kernel=2``): a k x k conv without padding
holding all 2 x 3k^2 whitening filters (each eigenvector and its negation), then GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrlab.errors import LrlabError
from lrlab.models.registry import check_dropout, register



class Block(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> act -> conv3x3 -> BN -> act; halves H and W."""

    def __init__(self, c_in: int, c_out: int, bn_scale: bool = True, dirac: bool = False,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.act = nn.GELU()
        for bn in (self.bn1, self.bn2):
            bn.weight.requires_grad_(bn_scale)
        if dirac:
            for conv in (self.conv1, self.conv2):
                with torch.no_grad():
                    nn.init.dirac_(conv.weight[: conv.in_channels])

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
        whiten_kernel: None: the 3x3 conv -> BN -> GELU stem with ``widths[0]`` channels;
            k >= 2: airbench94's whitening stem, a k x k conv without padding and with
            2 x 3k^2 channels (``widths[0]`` is then unused), then GELU.
        bn_scale: False freezes every block BatchNorm's scale at 1 (only its bias trains;
            airbench94).
        dirac: identity (Dirac) initialisation of the first ``in_channels`` filters of each
            block conv, so that each block starts close to passing its input through (airbench94).
        bn_momentum: torch's BatchNorm momentum of the blocks (the weight of each batch in the
            running statistics; 0.1 is torch's default, airbench94 uses 0.4 for its ~25 steps per epoch).
        head_std: None keeps torch's init of the classifier (std ~ 1 / sqrt(3 x in_features));
            a number rescales it to that standard deviation (airbench94: 1, with head_scale 1/256).
    """

    default_cam_layer = "block2"

    def __init__(self, num_classes: int, widths: tuple[int, int, int, int] = (32, 64, 256, 256),
                 head_scale: float = 1 / 8, dropout: float = 0.0, channel_dropout: float = 0.0,
                 whiten_kernel: int | None = None, bn_scale: bool = True, dirac: bool = False,
                 bn_momentum: float = 0.1, head_std: float | None = None):
        super().__init__()
        c0, c1, c2, c3 = widths
        if whiten_kernel is None:
            self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, padding=1, bias=True), nn.BatchNorm2d(c0), nn.GELU())
        else:
            c0 = 2 * 3 * whiten_kernel ** 2
            self.stem = nn.Sequential(nn.Conv2d(3, c0, whiten_kernel, bias=True), nn.GELU())
        self.block1 = Block(c0, c1, bn_scale, dirac, bn_momentum)
        self.block2 = Block(c1, c2, bn_scale, dirac, bn_momentum)
        self.block3 = Block(c2, c3, bn_scale, dirac, bn_momentum)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(c3, num_classes, bias=False)
        if head_std is not None:
            with torch.no_grad():
                self.fc.weight.mul_(head_std / self.fc.weight.std())
        self.head_scale = head_scale
        self.dropout = nn.Dropout(dropout) if dropout else None  # modules only when on: same state
        self.channel_dropout = nn.Dropout2d(channel_dropout) if channel_dropout else None

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Patch-whitening initialisation of the stem (the idea of Page 2018 and airbench).

        The k x k x 3 patches of ``x`` ((N, 3, H, W) float32, normalised training images; a
        few thousand suffice; k the stem's kernel, patches taken as the stem's padding does)
        give a 3k^2 x 3k^2 covariance; the stem's filters become its top ``c0 / 2``
        eigenvectors (all 3k^2 for the whitening stem) scaled by 1/sqrt(eigenvalue + eps),
        each with its negation, and are frozen (the bias still trains). The first layer then
        sees decorrelated, unit-variance inputs from the first step, which speeds up short runs.
        """
        conv = self.stem[0]
        kh, kw = conv.kernel_size
        patches = F.unfold(x.float(), (kh, kw), padding=conv.padding).transpose(1, 2).reshape(-1, 3 * kh * kw)
        patches = patches - patches.mean(0)
        eigvals, eigvecs = torch.linalg.eigh(patches.T @ patches / len(patches))
        k = conv.out_channels // 2
        top = eigvecs[:, -k:].T / (eigvals[-k:, None] + eps).sqrt()  # (k, 3 kh kw)
        weight = torch.cat([top, -top]).reshape(2 * k, 3, kh, kw)
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
            channel_dropout: float = 0.0, whiten_kernel: int | None = None, bn_scale: bool = True,
            dirac: bool = False, bn_momentum: float = 0.1, head_std: float | None = None) -> FastNet:
    """FastNet with channel widths (32, 64, 256, 256) x ``width``; optional dropout before the
    classifier and channel dropout (Dropout2d) after each block; airbench94's stem and block
    settings (``whiten_kernel=2, bn_scale=False, dirac=True, bn_momentum=0.4, head_std=1``), see :class:`FastNet`.

    Raises:
        LrlabError: a dropout outside [0, 1), ``whiten_kernel`` not an integer 2..5, ``bn_momentum``
            outside (0, 1] or ``head_std`` not positive."""
    check_dropout(dropout=dropout, channel_dropout=channel_dropout)
    if whiten_kernel is not None and (isinstance(whiten_kernel, bool) or whiten_kernel not in range(2, 6)):
        raise LrlabError(f"model.kwargs.whiten_kernel must be an integer from 2 to 5 (or null for the 3x3 conv + BN "
                         f"stem), got {whiten_kernel!r}")
    if not 0 < bn_momentum <= 1:
        raise LrlabError(f"model.kwargs.bn_momentum must be in (0, 1] (torch's BatchNorm momentum, default 0.1), "
                         f"got {bn_momentum!r}")
    if head_std is not None and not head_std > 0:
        raise LrlabError(f"model.kwargs.head_std must be a positive number (or null for torch's init), got {head_std!r}")
    widths = tuple(max(8, round(c * width)) for c in (32, 64, 256, 256))
    return FastNet(num_classes, widths, head_scale, dropout, channel_dropout, whiten_kernel, bn_scale, dirac,
                   bn_momentum, head_std)
