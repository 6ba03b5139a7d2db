"""The CAM methods whose pytorch-grad-cam version departs from the paper, written as the paper
says, on pytorch-grad-cam's ``BaseCAM`` (same interface: ``Cls(model, target_layers=[module])
(input_tensor, targets)`` -> (N, H, W) maps in [0, 1]).

**Grad-CAM++** (Chattopadhyay et al. 2018, arXiv:1710.11063, eq. 19, the closed form for an
exponential output): with g = dY_c/dA_kij, the weight of channel k is
sum_ij alpha_kij ReLU(g_kij), alpha_kij = g^2 / (2 g^2 + sum_ab(A_kab) g^3), and alpha = 0 where
the denominator is 0 (e.g. g = 0). pytorch-grad-cam 1.5.7 adds 1e-6 to the denominator: where
g^2 is of order 1e-6 (the last block of a small CIFAR network: g = W_fc / (h w) after global
average pooling) that changes the maps by up to 0.29; torchcam 0.5.0 never divides at all.

**Score-CAM** (Wang et al. 2020, arXiv:1910.01279, Algorithm 1): for every channel k, the mask
H_k = s(Up(A_k)) is the channel upsampled bilinearly to the image and min-max normalised to
[0, 1] (a constant channel gives a zero mask); the channel's score is the softmax probability of
class c on the masked image X * H_k, minus that on a baseline image; the weights are the softmax
of the scores over the channels, and the map is ReLU(sum_k w_k A_k). The baseline's probability
is one constant per image, which the softmax over the channels cancels, so it is not computed.
pytorch-grad-cam's and torchcam's Score-CAM score the logit instead of the probability (and the
former upsamples with ``align_corners=True``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam.base_cam import BaseCAM
from torch import nn

from lrlab.interpret.cam import normalise_maps

__all__ = ["GradCAMPlusPlus", "ScoreCAM"]

MASKED_BATCH = 256
"""Masked copies of an image per forward pass."""


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ with eq. 19 of Chattopadhyay et al. 2018 exactly (see the module docstring)."""

    def get_cam_weights(self, input_tensor: torch.Tensor, target_layer: nn.Module, targets: list,
                        activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """(B, C) float32 channel weights from the activations and gradients (B, C, h, w)."""
        a, g = torch.from_numpy(activations), torch.from_numpy(grads)
        g2 = g.square()
        denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
        return (alpha * g.clamp_min(0)).sum(dim=(2, 3)).numpy()


class ScoreCAM(BaseCAM):
    """Score-CAM (Wang et al. 2020, Algorithm 1) with pytorch-grad-cam's interface:
    ``ScoreCAM(model, target_layers=[module])(input_tensor, targets)`` -> (N, H, W) maps.

    ``targets`` are callables that take a (B, K) tensor of class probabilities and return the
    (B,) probabilities of the explained class (e.g. :class:`lrlab.interpret.cam.ClassScore`).
    Costs one forward pass of C masked images per image, C the target layer's channels.
    """

    def __init__(self, model: nn.Module, target_layers: list[nn.Module], reshape_transform=None) -> None:
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)

    @torch.no_grad()
    def get_cam_weights(self, input_tensor: torch.Tensor, target_layer: nn.Module, targets: list,
                        activations: np.ndarray, grads: np.ndarray | None) -> np.ndarray:
        """(B, C) float32 channel weights of the activations (B, C, h, w) of ``input_tensor`` (B, 3, H, W)."""
        acts = torch.from_numpy(activations).to(self.device, torch.float32)
        weights = [self._image_weights(x, a, target) for x, a, target in zip(input_tensor, acts, targets, strict=True)]
        return torch.stack(weights).cpu().numpy()

    def _image_weights(self, x: torch.Tensor, act: torch.Tensor, target) -> torch.Tensor:
        """(C,) softmax over the channels of p_c(x * H_k) for one image x (3, H, W), act (C, h, w)."""
        up = F.interpolate(act.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False)
        masks = normalise_maps(up.squeeze(1)).unsqueeze(1)  # (C, 1, H, W)
        scores = []
        for chunk in masks.split(MASKED_BATCH):
            probs = torch.softmax(self.model(x.unsqueeze(0) * chunk).float(), dim=1)
            scores.append(target(probs))
            self.activations_and_grads.activations.clear()  # the masked passes are not the explained one
        return torch.softmax(torch.cat(scores), dim=0)
