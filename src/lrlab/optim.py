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

Discriminative learning rates (Howard & Ruder 2018, ULMFiT, arXiv:1801.06146; fastai's
``slice(lo, hi)``): ``train.layer_groups`` lists groups of module names from the bottom of the
network to the top; every parameter group carries the ``lr_scale`` of its layer group from the
:class:`lrlab.lr_plan.LRPlan`, and the schedules multiply their lr by it at every step.

Every optimizer is registered once in :data:`OPTIMIZERS`: adding one is one decorated builder
function in this file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lrlab.errors import LrlabError
from lrlab.registry import Registry

OPTIMIZERS: Registry[Callable[[list[dict], float, object], torch.optim.Optimizer]] = Registry(
    "optimizer", "train.optimizer")
"""``train.optimizer`` name -> ``builder(param_groups, lr, train_cfg) -> torch.optim.Optimizer``."""


@OPTIMIZERS.register("sgd")
def _sgd(groups, lr, cfg):
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov and cfg.momentum > 0))


@OPTIMIZERS.register("nesterov")
def _nesterov(groups, lr, cfg):
    if cfg.momentum <= 0:
        raise LrlabError("train.optimizer 'nesterov' needs train.momentum > 0 (e.g. 0.9), got 0")
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)


@OPTIMIZERS.register("adam")
def _adam(groups, lr, cfg):
    return torch.optim.Adam(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


@OPTIMIZERS.register("adamw")
def _adamw(groups, lr, cfg):
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


@OPTIMIZERS.register("rmsprop")
def _rmsprop(groups, lr, cfg):
    return torch.optim.RMSprop(groups, lr=lr, alpha=0.99, eps=cfg.eps)


@OPTIMIZERS.register("adagrad")
def _adagrad(groups, lr, cfg):
    return torch.optim.Adagrad(groups, lr=lr, eps=cfg.eps)


@OPTIMIZERS.register("adadelta")
def _adadelta(groups, lr, cfg):
    return torch.optim.Adadelta(groups, lr=lr, rho=0.9, eps=cfg.eps)


def _layer_group_of(names: list[str], layer_groups: Sequence[Sequence[str]]) -> list[int]:
    """Index of the layer group of each parameter name: the first group with a module-name prefix
    of it; parameters no group names belong to the last (top) group.

    Raises:
        LrlabError: a module name that matches no parameter (the valid top-level names are listed).
    """
    if not layer_groups:
        return [0] * len(names)
    owner = [len(layer_groups) - 1] * len(names)
    for g in reversed(range(len(layer_groups))):
        for prefix in layer_groups[g]:
            hits = [i for i, n in enumerate(names) if n == prefix or n.startswith(prefix + ".")]
            if not hits:
                top = dict.fromkeys(n.split(".")[0] for n in names)
                raise LrlabError(f"train.layer_groups names {prefix!r}, which holds no parameter of the model; "
                                 f"valid names: {', '.join(top)} (or their submodules, e.g. {next(iter(top))}.0)")
            for i in hits:
                owner[i] = g
    return owner


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False,
                 layer_groups: Sequence[Sequence[str]] = (), lr_scales: Sequence[float] = (1.0,)) -> list[dict]:
    """Parameter groups of ``model``'s trainable parameters.

    Per layer group (top group first, so that group 0 of the optimizer is the plan's reference):
    conv/linear weights with ``weight_decay``, biases and norm weights (ndim < 2) with 0 unless
    ``decay_norm_and_bias``; each group has ``lr_scale`` (``lr_scales[layer group]``) and
    ``layer_group`` (its index, 0 = bottom). Empty groups are left out.

    Args:
        layer_groups: module-name prefixes per layer group, bottom to top; empty: one group.
        lr_scales: lr of each layer group / the plan's lr (``LRPlan.scales``), same length.

    Raises:
        LrlabError: a layer-group name that matches no parameter.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    owner = _layer_group_of([n for n, _ in named], layer_groups)
    groups = []
    for g in reversed(range(max(1, len(layer_groups)))):
        params = [p for (_, p), o in zip(named, owner) if o == g]
        split = [(params, weight_decay)] if decay_norm_and_bias else [
            ([p for p in params if p.ndim > 1], weight_decay), ([p for p in params if p.ndim <= 1], 0.0)]
        groups += [{"params": ps, "weight_decay": wd, "lr_scale": lr_scales[g], "layer_group": g}
                   for ps, wd in split if ps]
    return groups


def build_optimizer(train_cfg, model: nn.Module, lr: float, lr_scales: Sequence[float] = (1.0,)) -> torch.optim.Optimizer:
    """The optimizer named by ``train_cfg.optimizer`` (:data:`OPTIMIZERS`) over ``model``'s
    parameters; every group starts at ``lr`` x its ``lr_scale`` (per step; the schedule then
    shapes it).

    Args:
        train_cfg: a ``lrlab.config.TrainConfig`` (optimizer, momentum, nesterov, betas,
            eps, weight_decay, decay_norm_and_bias, layer_groups).
        model: the network; its parameters are grouped by :func:`param_groups`.
        lr: the plan's reference lr (``LRPlan.lr``).
        lr_scales: per layer group (``LRPlan.scales``).

    Raises:
        LrlabError: an unknown name (the valid ones are listed), ``nesterov`` with
            momentum 0, or a layer-group name that matches no parameter.
    """
    build = OPTIMIZERS.get(train_cfg.optimizer)
    groups = param_groups(model, train_cfg.weight_decay, train_cfg.decay_norm_and_bias,
                          train_cfg.layer_groups, lr_scales)
    optimizer = build(groups, lr, train_cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return optimizer


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
        """The step count and the state of each device's generator (keyed by device name)."""
        return {"t": self.t, "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        for name, gen_state in state.get("generators", {}).items():
            self._generator(torch.device(name)).set_state(gen_state)
