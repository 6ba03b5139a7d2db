"""Optimizers by name, parameter groups for weight decay, and Gaussian gradient noise.

Names (``train.optimizer``), all from ``torch.optim``; the learning rate is per optimizer
step and is then driven by the schedule (``lrlab.schedules``):

=========  ==========================================================================
sgd        SGD with ``train.momentum`` (heavy ball; 0 gives plain SGD) and Nesterov when
           ``train.nesterov`` is true (Polyak 1964; Sutskever et al. 2013).
nesterov   SGD with Nesterov momentum ``train.momentum`` (must be > 0), whatever
           ``train.nesterov`` says.
adam       Adam with bias correction, ``train.betas`` and ``train.eps`` (Kingma & Ba 2014,
           arXiv:1412.6980); weight decay is L2 added to the gradient.
adamw      Adam with decoupled weight decay (Loshchilov & Hutter 2017, arXiv:1711.05101).
rmsprop    RMSProp (Hinton, lecture 6e), smoothing constant 0.99, no momentum, ``train.eps``.
adagrad    AdaGrad (Duchi et al. 2011), ``train.eps``.
adadelta   AdaDelta (Zeiler 2012, arXiv:1212.5701), rho 0.9, ``train.eps``; its lr is a
           multiplier on the update (torch's default is 1.0).
=========  ==========================================================================

Weight decay is ``train.weight_decay``; unless ``train.decay_norm_and_bias`` is true it is
not applied to biases and norm weights (every parameter with fewer than 2 dimensions),
which decay would only shrink without regularising (Goyal et al. 2017, arXiv:1706.02677).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lrlab.errors import LrlabError

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "adadelta")


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Parameter groups of ``model``: conv/linear weights with ``weight_decay``; biases and
    norm weights (ndim < 2) with 0, unless ``decay_norm_and_bias``. Empty groups are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(train_cfg, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by ``train_cfg.optimizer`` over ``model``'s parameters at learning
    rate ``lr`` (per step); see the module docstring for the names.

    Args:
        train_cfg: a ``lrlab.config.TrainConfig`` (optimizer, momentum, nesterov, betas,
            eps, weight_decay, decay_norm_and_bias).
        model: the network; its parameters are grouped by :func:`param_groups`.
        lr: initial learning rate per optimizer step (the schedule sets it afterwards).

    Raises:
        LrlabError: an unknown name (the valid ones are listed) or ``nesterov`` with
            momentum 0.
    """
    name = train_cfg.optimizer
    groups = param_groups(model, train_cfg.weight_decay, train_cfg.decay_norm_and_bias)
    eps = train_cfg.eps
    if name == "sgd":
        m = train_cfg.momentum
        return torch.optim.SGD(groups, lr=lr, momentum=m, nesterov=bool(train_cfg.nesterov and m > 0))
    if name == "nesterov":
        if train_cfg.momentum <= 0:
            raise LrlabError("train.optimizer 'nesterov' needs train.momentum > 0 (e.g. 0.9), got 0")
        return torch.optim.SGD(groups, lr=lr, momentum=train_cfg.momentum, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(train_cfg.betas), eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(train_cfg.betas), eps=eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.99, eps=eps)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, eps=eps)
    if name == "adadelta":
        return torch.optim.Adadelta(groups, lr=lr, rho=0.9, eps=eps)
    raise LrlabError(f"unknown train.optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")


class GradientNoise:
    """Adds Gaussian noise to every gradient before each optimizer step (Neelakantan et al.
    2015, "Adding gradient noise improves learning for very deep networks", arXiv:1511.06807).

    At optimizer step t (0 for the first step) each gradient element gets independent noise
    N(0, sigma_t^2) with sigma_t^2 = eta / (1 + t)^gamma; the paper uses eta in {0.01, 0.3, 1}
    and gamma = 0.55. The noise is drawn from its own generator seeded with ``seed``, so it
    does not shift the data order or the model's initialisation.

    Use :meth:`attach` to run it as a step pre-hook of a torch optimizer, or call
    :meth:`add_` on a list of parameters.
    """

    def __init__(self, eta: float, gamma: float = 0.55, seed: int = 0):
        if eta < 0 or gamma < 0:
            raise LrlabError(f"train.grad_noise eta={eta:g}, gamma={gamma:g} is not valid; use eta >= 0 and gamma >= 0")
        self.eta, self.gamma, self.seed = float(eta), float(gamma), int(seed)
        self.t = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def variance(self, t: int) -> float:
        """sigma_t^2 = eta / (1 + t)^gamma, the noise variance at optimizer step ``t``."""
        return self.eta / (1.0 + t) ** self.gamma

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def add_(self, params) -> None:
        """Add noise of the current step's variance to each ``p.grad`` in place, then count a step."""
        std = self.variance(self.t) ** 0.5
        for p in params:
            if p.grad is None:
                continue
            noise = torch.randn(p.grad.shape, generator=self._generator(p.grad.device),
                                device=p.grad.device, dtype=torch.float32)
            p.grad.add_(noise.to(p.grad.dtype), alpha=std)
        self.t += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> Callable:
        """Register as a step pre-hook of ``optimizer``; returns the hook handle (``.remove()``)."""
        def hook(opt, args, kwargs):
            self.add_(p for g in opt.param_groups for p in g["params"])
        return optimizer.register_step_pre_hook(hook)

    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
