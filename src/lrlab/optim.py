"""Optimizers for the training loop."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(train_cfg, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (optionally Nesterov) and weight decay over ``model``'s parameters.

    Weight decay (L2, added to the gradient as in torch.optim.SGD) is applied to the
    weight tensors of convolutions and linear layers only, not to biases or norm
    parameters, which the decay would only shrink without regularising (Goyal et al.
    2017, arXiv:1706.02677).
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=train_cfg.momentum,
                           nesterov=train_cfg.nesterov and train_cfg.momentum > 0)
