"""Optimizers by name, parameter groups for weight decay, and Gaussian gradient noise.

Names (``train.optimizer``), all from ``torch.optim`` (muon: timm's Muon with one of them); the
learning rate is per optimizer step and is then driven by the schedule (``lrlab.schedules``):

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
muon       Muon (Jordan et al. 2024) for the hidden weights, an auxiliary optimizer
           (``train.muon.aux_optimizer``: Nesterov SGD or AdamW) for the rest, as one
           optimizer: :class:`MuonWithAux`, options in ``train.muon``.
=========  ==========================================================================

Weight decay is ``train.weight_decay``; unless ``train.decay_norm_and_bias`` is true it is
not applied to biases and norm weights (every parameter with fewer than 2 dimensions),
which decay would only shrink without regularising (Goyal et al. 2017, arXiv:1706.02677).

Discriminative learning rates (Howard & Ruder 2018, ULMFiT, arXiv:1801.06146; fastai's
``slice(lo, hi)``): ``train.layer_groups`` lists groups of module names from the bottom of the
network to the top; every parameter group carries the ``lr_scale`` of its layer group from the
:class:`lrlab.lr_plan.LRPlan`, and the schedules multiply their lr by it at every step.

Muon ("MomentUm Orthogonalized by Newton-Schulz"; K. Jordan, Y. Jin, V. Boza, J. You, F.
Cesista, L. Newhouse, J. Bernstein, "Muon: An optimizer for hidden layers in neural networks",
2024, kellerjordan.github.io/posts/muon) replaces each hidden weight's momentum update by its
nearest semi-orthogonal matrix (a few Newton-Schulz iterations). Which parameters it takes
(:func:`hidden_weights`), following the post (section "Empirical considerations": Muon for the
hidden layers' 2-D weights only; the input layer, the classifier head and scalar and vector
parameters go to a standard optimizer, as airbench94_muon and modded-nanogpt do): every conv
filter and weight matrix (out, in, ...) with out > 1 and in > 1, except the first such
parameter of the model (the input layer: the stem conv, a patch embedding; it sees pixels, not
hidden features) and the head's (``lrlab.models.model_spec(model).head``). Depthwise filters
(in = 1) stay with the auxiliary optimizer too (timm's ``_is_suitable_for_muon`` rule). Conv
filters (out, in, kh, kw) are orthogonalised as the (out, in x kh x kw) matrix.

The Muon update is timm's ``timm.optim.Muon`` (timm 1.0.31, R. Wightman, after Jordan's
github.com/KellerJordan/Muon), which flattens conv filters itself; ``torch.optim.Muon`` takes 2-D
parameters only. Settings: Nesterov momentum ``train.muon.momentum`` (0.95, Jordan's default),
``train.muon.ns_steps`` Newton-Schulz steps with the coefficients ``train.muon.ns_coefficients``
(:data:`NS_COEFFICIENTS`), the update scaled
by Jordan's sqrt(max(1, out / (in x kh x kw))) (timm's ``adjust_lr_fn="original"``, so its lr
lives on Muon's usual scale, ~0.02-0.05, not AdamW's), and decoupled weight decay: each step
multiplies a hidden weight by 1 - lr_muon x ``train.weight_decay``. The auxiliary optimizer is
``train.muon.aux_optimizer`` (:data:`MUON_AUX`): Nesterov SGD with ``train.momentum`` and L2
decay, or AdamW.

The two learning rates: the plan's lr (:class:`lrlab.lr_plan.LRPlan`, what ``train.lr``,
``train.max_lr`` and the range test's suggestion mean) is the auxiliary optimizer's; every Muon
group trains at that lr x ``train.muon.lr_ratio``. The ratio is put into the Muon groups'
``lr_scale``, so every schedule and the range test move both lrs together at a fixed ratio,
exactly as they move discriminative layer groups; the range test records the auxiliary lr.

LR-free optimizers (each builder carries an :class:`LrFree`, read by :class:`lrlab.lr_plan.LRPlan`:
no range test, the package's default lr unless the recipe sets ``train.lr``, the schedules the
package documents, else ``constant``):

==================  ==============================================================================
schedulefree_sgd    Schedule-Free SGD (Defazio et al. 2024, "The Road Less Scheduled",
                    arXiv:2405.15682; ``schedulefree``): lr 1.0, momentum (beta) ``train.momentum``.
schedulefree_adamw  Schedule-Free AdamW (same paper): lr 0.0025, ``train.betas``, ``train.eps``.
                    Both evaluated and saved at their average x (:mod:`lrlab.eval_weights`).
prodigy             Prodigy (Mishchenko & Defazio 2023, arXiv:2306.06101; ``prodigyopt``): Adam
                    with an estimated step size, lr 1.0 (a multiplier), decoupled weight decay,
                    ``safeguard_warmup`` on with ``train.warmup_epochs`` (its README).
dadapt_sgd          D-Adaptation SGD (Defazio & Mishchenko 2023, "Learning-Rate-Free Learning by
                    D-Adaptation", arXiv:2301.07733; ``dadaptation``), lr 1.0, ``train.momentum``.
dadapt_adam         D-Adaptation Adam (same), lr 1.0; discriminative lrs go to its ``layer_scale``.
dog                 DoG (Ivgi et al. 2023, "DoG is SGD's Best Friend", arXiv:2302.12022;
                    ``dog-optimizer``), lr 1.0, ``reps_rel`` 1e-4 with BatchNorm else 1e-6 (its
                    README), evaluated at its ``PolynomialDecayAverager``'s average.
==================  ==============================================================================

Weight decay is ``train.weight_decay`` in every group as above (each package's own kind: L2, or
decoupled for Prodigy). Prodigy and D-Adaptation SGD estimate one step size for all groups and
refuse groups at different lrs (discriminative lrs raise an LrlabError).

Every optimizer is registered once in :data:`OPTIMIZERS`: adding one is one decorated builder
function in this file. A builder may carry ``regroup(model, groups, train_cfg) -> groups``,
applied to the parameter groups before it is called (Muon splits off the hidden weights).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lrlab.errors import LrlabError
from lrlab.models.spec import model_spec
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


NS_COEFFICIENTS = ("quintic", "original", "polar_express")
"""``train.muon.ns_coefficients``: timm's presets of the Newton-Schulz coefficients (a, b, c) per step.
quintic (timm's default; five tuned steps, from modded-nanogpt), original (Jordan's (3.4445, -4.7750,
2.0315) at every step, as airbench94_muon iterates it 3 times), polar_express (Amsel et al. 2025,
"The Polar Express", arXiv:2505.16932)."""

MUON_AUX: Registry[Callable[[list[dict], float, object], torch.optim.Optimizer]] = Registry(
    "auxiliary optimizer", "train.muon.aux_optimizer")
"""``train.muon.aux_optimizer`` name -> builder of the optimizer for what Muon does not take:
``sgd`` (Nesterov momentum ``train.momentum``, L2 weight decay, as ``nesterov``) or ``adamw``
(``train.betas``, ``train.eps``, decoupled weight decay)."""
MUON_AUX.register("sgd")(_nesterov)
MUON_AUX.register("adamw")(_adamw)


class MuonWithAux(torch.optim.Optimizer):
    """Muon for the hidden weights and an auxiliary optimizer for every other parameter, as ONE
    ``torch.optim.Optimizer`` (the idea of Jordan's ``MuonWithAuxAdam``, github.com/KellerJordan/Muon;
    the updates are the libraries' own).

    Its ``param_groups`` are all groups (a group with ``use_muon=True`` is Muon's), its ``state``
    holds both parts' per-parameter state; :meth:`step` steps Muon, then the auxiliary
    optimizer. The two parts are library optimizers built over the SAME group dicts and sharing
    this object's ``state``, so setting a group's lr here sets it for the part that steps it,
    and ``state_dict`` / ``load_state_dict`` are torch's, one flat dict for both parts
    (checkpoints, resume, the range test's bit-exact restore). Step hooks (gradient noise) and
    ``zero_grad`` are the base class's. ``add_param_group`` after construction is not supported,
    and the parts' own ``state_dict()`` is not meaningful (their state holds the other part's
    parameters too): save and load this object's.

    Args:
        groups: parameter groups (dicts with "params", "lr", "use_muon", any other options).
        make_muon: builds the Muon part from its groups (a list of the group dicts).
        make_aux: builds the auxiliary part from its groups.
        renorm: before each Muon step, rescale every Muon weight (out, ...) to Frobenius norm
            sqrt(out), so that its scale stays fixed and the orthogonalised update sets its
            direction alone (airbench94_muon, Jordan 2024).
    """

    def __init__(self, groups: list[dict], make_muon: Callable[[list[dict]], torch.optim.Optimizer],
                 make_aux: Callable[[list[dict]], torch.optim.Optimizer], renorm: bool = False):
        super().__init__(groups, {})
        self.renorm = renorm
        muon = [g for g in self.param_groups if g["use_muon"]]
        aux = [g for g in self.param_groups if not g["use_muon"]]
        self.muon = make_muon(muon) if muon else None  # None: nothing for Muon (e.g. a frozen backbone)
        self.aux = make_aux(aux) if aux else None
        self._link()

    def _link(self) -> None:
        """Point both parts at this optimizer's groups and state (again after loading a state)."""
        for part, flag in ((self.muon, True), (self.aux, False)):
            if part is not None:
                part.param_groups = [g for g in self.param_groups if g["use_muon"] is flag]
                part.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        """One step of both parts (Muon first); returns ``closure()``'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.renorm and self.muon is not None:
            for group in self.muon.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(p.shape[0] ** 0.5 / p.norm().clamp_min(1e-12))
        for part in (self.muon, self.aux):
            if part is not None:
                part.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` (new group dicts, new state), then both parts re-linked."""
        super().load_state_dict(state_dict)
        self._link()


def hidden_weights(model: nn.Module) -> list[str]:
    """Names of the parameters Muon updates (trainable or not), in ``named_parameters`` order:
    every weight of >= 2 dimensions (out, in, ...) with out > 1 and in > 1, except the first one
    (the input layer) and those of the head (``model_spec(model).head``). See the module docstring."""
    head = model_spec(model).head
    shaped = [n for n, p in model.named_parameters() if p.ndim >= 2 and p.shape[0] > 1 and p.shape[1] > 1]
    return [n for n in shaped[1:] if not any(n == h or n.startswith(h + ".") for h in head)]


def muon_groups(model: nn.Module, groups: list[dict], train_cfg) -> list[dict]:
    """Each of :func:`param_groups`' groups split in two, in this order: the auxiliary
    optimizer's part (``use_muon=False``) and Muon's (``use_muon=True``, ``lr_scale`` x
    ``train.muon.lr_ratio``); empty parts are left out. Group 0 stays the plan's reference.

    Raises:
        LrlabError: the model has no hidden weight, or its top layer group holds nothing for the
            auxiliary optimizer (then no group trains at the plan's lr).
    """
    hidden = hidden_weights(model)
    if not hidden:
        raise LrlabError(f"train.optimizer muon: {type(model).__name__} has no hidden weight for Muon (a conv filter "
                         f"or matrix other than the first layer's and the head's); use another train.optimizer")
    ids = {id(model.get_parameter(n)) for n in hidden}
    out = []
    for g in groups:
        for flag in (False, True):
            params = [p for p in g["params"] if (id(p) in ids) is flag]
            if params:
                scale = g["lr_scale"] * (train_cfg.muon.lr_ratio if flag else 1.0)
                out.append({**g, "params": params, "use_muon": flag, "lr_scale": scale})
    if out and out[0]["use_muon"]:
        raise LrlabError("train.optimizer muon: the top layer group of train.layer_groups holds only hidden "
                         "weights, so no group trains at the plan's lr; put the head in the last layer group")
    return out


@OPTIMIZERS.register("muon")
def _muon(groups, lr, cfg):
    from timm.optim import Muon  # timm's Muon (flattens conv filters); imported only when used

    m = cfg.muon
    aux = MUON_AUX.get(m.aux_optimizer)
    if m.aux_optimizer == "sgd" and cfg.momentum <= 0:
        raise LrlabError("train.optimizer muon with train.muon.aux_optimizer sgd needs train.momentum > 0 "
                         "(Nesterov SGD, e.g. 0.9), got 0; or set train.muon.aux_optimizer=adamw")
    return MuonWithAux(groups, lambda gs: Muon(gs, lr=lr, momentum=m.momentum, nesterov=True, ns_steps=m.ns_steps,
                                               ns_coefficients=m.ns_coefficients, adjust_lr_fn="original",
                                               conv_mode="flatten"),
                       lambda gs: aux(gs, lr, cfg), renorm=m.renorm)


_muon.regroup = muon_groups


@dataclass(frozen=True)
class LrFree:
    """What lrlab does with an LR-free optimizer (read by :class:`lrlab.lr_plan.LRPlan`).

    Attributes:
        default_lr: the package's documented default lr (for Prodigy, D-Adaptation and DoG a
            multiplier of the step size they estimate): the run's lr unless the recipe sets one.
        schedules: the schedules the package documents for it; any other ``train.schedule`` is
            replaced by ``constant`` (the plan says so). None: every schedule.
        source: the package (and class) it comes from, for notes and errors.
    """

    default_lr: float
    schedules: tuple[str, ...] | None
    source: str


def lr_free(name: str) -> LrFree | None:
    """The :class:`LrFree` facts of the optimizer ``name`` (``train.optimizer``), None when it
    needs an lr (the range test's or the recipe's)."""
    return getattr(OPTIMIZERS.get(name), "lr_free", None)


def _quiet(make: Callable[[], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """``make()`` with its standard output dropped (prodigyopt and dadaptation print a line when
    decoupled weight decay is on; only lrlab's CLI prints)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return make()


def _one_lr(name: str, groups: list[dict]) -> list[dict]:
    """``groups`` unchanged when they share one lr (Prodigy and D-Adaptation SGD refuse groups at
    different lrs; their estimate is global).

    Raises:
        LrlabError: discriminative lrs (``train.lr_ratio`` > 1 or Muon's ratio).
    """
    if len({g["lr_scale"] for g in groups}) > 1:
        raise LrlabError(f"train.optimizer {name} trains every parameter group at one lr (the package estimates "
                         f"one step size), so discriminative lrs do not apply; set train.lr_ratio=1 or use "
                         f"dadapt_adam, which scales layers by its layer_scale")
    return groups


def _in_train_mode(optimizer):
    """A schedule-free optimizer ready to step: the package builds it in eval mode and refuses
    ``step()`` until ``train()`` (a no-op on the weights before the first step, where x = y = z)."""
    optimizer.train()
    return optimizer


@OPTIMIZERS.register("schedulefree_sgd")
def _schedulefree_sgd(groups, lr, cfg):
    from schedulefree import SGDScheduleFree

    if cfg.momentum <= 0:
        raise LrlabError("train.optimizer schedulefree_sgd needs train.momentum in (0, 1) (its interpolation "
                         "weight beta, default 0.9), got 0")
    return _in_train_mode(SGDScheduleFree(groups, lr=lr, momentum=cfg.momentum))


_schedulefree_sgd.lr_free = LrFree(1.0, ("constant",), "schedulefree.SGDScheduleFree")


@OPTIMIZERS.register("schedulefree_adamw")
def _schedulefree_adamw(groups, lr, cfg):
    from schedulefree import AdamWScheduleFree

    return _in_train_mode(AdamWScheduleFree(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps))


_schedulefree_adamw.lr_free = LrFree(0.0025, ("constant",), "schedulefree.AdamWScheduleFree")


@OPTIMIZERS.register("prodigy")
def _prodigy(groups, lr, cfg):
    from prodigyopt import Prodigy

    return _quiet(lambda: Prodigy(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  safeguard_warmup=cfg.warmup_epochs > 0))


_prodigy.lr_free = LrFree(1.0, ("constant", "cosine"), "prodigyopt.Prodigy")
_prodigy.regroup = lambda model, groups, cfg: _one_lr("prodigy", groups)


@OPTIMIZERS.register("dadapt_sgd")
def _dadapt_sgd(groups, lr, cfg):
    from dadaptation import DAdaptSGD

    return DAdaptSGD(groups, lr=lr, momentum=cfg.momentum)


_dadapt_sgd.lr_free = LrFree(1.0, None, "dadaptation.DAdaptSGD")
_dadapt_sgd.regroup = lambda model, groups, cfg: _one_lr("dadapt_sgd", groups)


@OPTIMIZERS.register("dadapt_adam")
def _dadapt_adam(groups, lr, cfg):
    from dadaptation import DAdaptAdam

    return _quiet(lambda: DAdaptAdam(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps))


def _layer_scale(model: nn.Module, groups: list[dict], train_cfg) -> list[dict]:
    """D-Adaptation Adam: discriminative lrs as its per-group ``layer_scale`` (its README: every
    group at one lr, layers scaled by ``layer_scale``); the groups' ``lr_scale`` becomes 1."""
    return [{**g, "layer_scale": g["lr_scale"], "lr_scale": 1.0} for g in groups]


_dadapt_adam.lr_free = LrFree(1.0, None, "dadaptation.DAdaptAdam")
_dadapt_adam.regroup = _layer_scale


@OPTIMIZERS.register("dog")
def _dog(groups, lr, cfg):
    from dog import DoG

    return DoG(groups, lr=1.0)  # build_optimizer sets every group's lr; 1.0 here keeps DoG's "lr != 1" warning quiet


def _reps_rel(model: nn.Module, groups: list[dict], train_cfg) -> list[dict]:
    """DoG's initial movement ``reps_rel`` per group, as its README recommends: 1e-6, or 1e-4 for
    a model with BatchNorm (with 1e-6 its step size hardly grows)."""
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return [{**g, "reps_rel": 1e-4 if bn else 1e-6} for g in groups]


_dog.lr_free = LrFree(1.0, ("constant",), "dog.DoG with dog.PolynomialDecayAverager")
_dog.regroup = _reps_rel


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
                 layer_groups: Sequence[Sequence[str]] = (), lr_scales: Sequence[float] = (1.0,),
                 bias_lr_ratio: float = 1.0) -> list[dict]:
    """Parameter groups of ``model``'s trainable parameters.

    Per layer group (top group first, so that group 0 of the optimizer is the plan's reference):
    conv/linear weights with ``weight_decay``, biases and norm weights (ndim < 2) with 0 unless
    ``decay_norm_and_bias`` (then in one group with the weights, unless ``bias_lr_ratio`` != 1);
    each group has ``lr_scale`` (``lr_scales[layer group]``, x ``bias_lr_ratio`` for biases and
    norm weights) and ``layer_group`` (its index, 0 = bottom). Empty groups are left out.

    Args:
        layer_groups: module-name prefixes per layer group, bottom to top; empty: one group.
        lr_scales: lr of each layer group / the plan's lr (``LRPlan.scales``), same length.
        bias_lr_ratio: lr of biases and norm weights / their layer group's lr (airbench94 trains
            them at ~1/13 of the head's lr).

    Raises:
        LrlabError: a layer-group name that matches no parameter.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    owner = _layer_group_of([n for n, _ in named], layer_groups)
    groups = []
    for g in reversed(range(max(1, len(layer_groups)))):
        params = [p for (_, p), o in zip(named, owner) if o == g]
        split = [(params, weight_decay, 1.0)] if decay_norm_and_bias and bias_lr_ratio == 1 else [
            ([p for p in params if p.ndim > 1], weight_decay, 1.0),
            ([p for p in params if p.ndim <= 1], weight_decay if decay_norm_and_bias else 0.0, bias_lr_ratio)]
        groups += [{"params": ps, "weight_decay": wd, "lr_scale": lr_scales[g] * ratio, "layer_group": g}
                   for ps, wd, ratio in split if ps]
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
        LrlabError: an unknown name (the valid ones are listed), ``nesterov`` (or ``muon``
            with SGD) with momentum 0, a layer-group name that matches no parameter, or
            ``muon`` on a model without hidden weights (:func:`muon_groups`).
    """
    build = OPTIMIZERS.get(train_cfg.optimizer)
    groups = param_groups(model, train_cfg.weight_decay, train_cfg.decay_norm_and_bias,
                          train_cfg.layer_groups, lr_scales, train_cfg.bias_lr_ratio)
    regroup = getattr(build, "regroup", None)
    if regroup is not None:
        groups = regroup(model, groups, train_cfg)
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
