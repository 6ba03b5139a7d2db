"""Transfer learning in stages: freeze the backbone, train the head, unfreeze, fine-tune.

The recipe of fastai's ``fine_tune`` and of ULMFiT (Howard & Ruder 2018, "Universal Language
Model Fine-tuning for Text Classification", arXiv:1801.06146: gradual unfreezing and
discriminative learning rates), in two stages over the model's layer groups (bottom to top;
``train.layer_groups`` when the recipe gives them, else :func:`lrlab.models.spec.model_spec`'s):

* stage 1 (``transfer.freeze_epochs`` > 0): every group but the top one (the head) is frozen:
  its parameters get ``requires_grad=False`` (so no gradient, no optimizer step and no weight
  decay touch them) and its normalisation layers with running statistics (BatchNorm) stay in
  eval mode, so their running mean/var do not move either;
* stage 2 (``train.epochs``): the top ``transfer.unfreeze`` groups ("all": every group) train,
  with the discriminative lrs of ``train.lr_ratio`` (:func:`lrlab.lr_plan.layer_scales`).

Each stage is the run's config with its own ``train`` section (:class:`Stage`), so each gets
its own range test, LR plan and schedule through the ordinary pipeline stages.

How a frozen BatchNorm stays in eval mode: :func:`freeze` gives the module an eval-only
subclass of its own class (``EvalOnlyBatchNorm2d`` for ``nn.BatchNorm2d``) whose ``train(mode)``
always sets ``training=False``. ``model.train()``, ``model.eval()``, the range test and
:func:`lrlab.compute.eval_mode` (which restores each module's own flag) then all leave it in
eval mode; the state_dict keys and tensors are those of the original class, and
:meth:`Frozen.undo` puts the original class back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from lrlab.config import Config
from lrlab.errors import LrlabError
from lrlab.models.spec import model_spec

HEAD_STAGE, FINE_TUNE_STAGE = 1, 2
"""The stage numbers: 1 trains the head with the backbone frozen, 2 fine-tunes."""

STAGE_NAMES = {HEAD_STAGE: "head only, backbone frozen", FINE_TUNE_STAGE: "fine-tuning"}


class _EvalOnly:
    """Mixin of the eval-only classes: ``train(mode)`` keeps the module in eval mode."""

    def train(self, mode: bool = True):
        return super().train(False)


_EVAL_ONLY: dict[type, type] = {}


def _eval_only_class(cls: type) -> type:
    """The eval-only subclass of ``cls`` (made once per class)."""
    if cls not in _EVAL_ONLY:
        _EVAL_ONLY[cls] = type(f"EvalOnly{cls.__name__}", (_EvalOnly, cls), {"__module__": __name__})
    return _EVAL_ONLY[cls]


def _under(name: str, prefixes: Sequence[str]) -> bool:
    """True when ``name`` is one of ``prefixes`` or inside one (``block1.conv`` is in ``block1``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _has_running_stats(module: nn.Module) -> bool:
    """BatchNorm (and InstanceNorm with ``track_running_stats``): updates buffers in train mode."""
    return bool(getattr(module, "track_running_stats", False)) and getattr(module, "running_mean", None) is not None


@dataclass
class Frozen:
    """What :func:`freeze` changed: the parameters it froze and the normalisation modules it made
    eval-only (with their original classes). :meth:`undo` reverts exactly that."""

    params: list[nn.Parameter] = field(default_factory=list)
    norms: list[tuple[nn.Module, type]] = field(default_factory=list)

    def undo(self, training: bool = True) -> None:
        """Make the frozen parameters trainable again and the modules their own class, in
        ``training`` mode. Parameters that were frozen before :func:`freeze` stay frozen."""
        for p in self.params:
            p.requires_grad_(True)
        for module, cls in self.norms:
            module.__class__ = cls
            module.train(training)
        self.params, self.norms = [], []


def freeze(model: nn.Module, trainable_prefixes: Sequence[str]) -> Frozen:
    """Freeze every part of ``model`` outside ``trainable_prefixes`` (module or parameter names;
    a name is inside a prefix when equal to it or below it, ``block1.conv.weight`` in ``block1``).

    Outside: each parameter that requires grad gets ``requires_grad=False`` (the optimizer,
    :func:`lrlab.optim.param_groups`, then leaves it out: no update, no weight decay, bit for
    bit unchanged), and each normalisation layer with running statistics becomes eval-only (see
    the module docstring), so its running mean/var stay as loaded. Dropout is left alone.

    Returns:
        a :class:`Frozen` whose ``undo()`` reverts the change.
    """
    done = Frozen()
    for name, p in model.named_parameters():
        if p.requires_grad and not _under(name, trainable_prefixes):
            p.requires_grad_(False)
            done.params.append(p)
    for name, m in model.named_modules():
        if _has_running_stats(m) and not isinstance(m, _EvalOnly) and not _under(name, trainable_prefixes):
            done.norms.append((m, type(m)))
            m.__class__ = _eval_only_class(type(m))
            m.train(False)
    return done


def layer_groups(config: Config, model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """The layer groups (module-name prefixes, bottom to top) the stages work on:
    ``train.layer_groups`` when given, else the model's spec (``model_spec(model).layer_groups``)."""
    given = config.train.layer_groups
    return tuple(tuple(g) for g in given) if given else tuple(model_spec(model).layer_groups)


def fine_tunes(config: Config, model: nn.Module) -> bool:
    """Whether ``config`` fine-tunes the pretrained ``model``: ``model.weights`` is set and more
    than one layer group trains (:func:`layer_groups`: a stage's config names only the groups it
    trains, so the head-only stage 1 does not count)."""
    return config.model.weights is not None and len(layer_groups(config, model)) > 1


def trainable_prefixes(model: nn.Module, groups: Sequence[Sequence[str]], top: int) -> tuple[str, ...]:
    """The names that train when the top ``top`` of ``groups`` do: their prefixes, plus every
    parameter and running-statistics module that no group names (these join the top group, as
    in :func:`lrlab.optim.param_groups`)."""
    named = [p for g in groups for p in g]
    rest = [n for n, _ in model.named_parameters() if not _under(n, named)]
    rest += [n for n, m in model.named_modules() if _has_running_stats(m) and not _under(n, named)]
    return tuple(p for g in groups[len(groups) - top:] for p in g) + tuple(rest)


@dataclass(frozen=True)
class Stage:
    """One stage of a transfer run.

    Attributes:
        number: :data:`HEAD_STAGE` or :data:`FINE_TUNE_STAGE`.
        config: the run's config with this stage's ``train`` section: ``epochs`` (stage 1:
            ``transfer.freeze_epochs``; stage 2: ``train.epochs``), ``layer_groups`` (the groups
            that train) and ``lr_ratio`` (so that each trained group keeps the lr scale it has
            when every group trains: r^((N-1)/(n-1)) for the top N of n groups).
        trainable: the prefixes :func:`freeze` keeps trainable.
    """

    number: int
    config: Config
    trainable: tuple[str, ...]

    @property
    def name(self) -> str:
        return STAGE_NAMES[self.number]


def _stage_config(config: Config, groups: Sequence[Sequence[str]], top: int, stage: int) -> Config:
    """``config`` with the train section of ``stage`` training the top ``top`` of ``groups``."""
    t, n = config.train, len(groups)
    ratio = t.lr_ratio ** ((top - 1) / (n - 1)) if n > 1 else 1.0
    update = {"layer_groups": [list(g) for g in groups[n - top:]], "lr_ratio": ratio}
    if stage == HEAD_STAGE:
        epochs = config.transfer.freeze_epochs
        update.update(epochs=epochs, warmup_epochs=min(t.warmup_epochs, epochs), batch_size_milestones=[],
                      early_stop_patience=0)
    return config.model_copy(update={"train": t.model_copy(update=update)})


def stages(config: Config, model: nn.Module) -> list[Stage]:
    """The stages of ``config`` for ``model`` (with ``transfer.active``): stage 1 when
    ``transfer.freeze_epochs`` > 0, then stage 2.

    Raises:
        LrlabError: fewer than 2 layer groups with ``transfer.freeze_epochs`` > 0 (nothing to
            freeze), or ``transfer.unfreeze`` above the number of layer groups.
    """
    groups = layer_groups(config, model)
    n, tr = len(groups), config.transfer
    if tr.freeze_epochs and n < 2:
        raise LrlabError(f"transfer.freeze_epochs={tr.freeze_epochs} needs at least 2 layer groups (a backbone to "
                         f"freeze and a head); {config.model.name} has {n}: set train.layer_groups")
    if tr.unfreeze != "all" and tr.unfreeze > n:
        raise LrlabError(f"transfer.unfreeze={tr.unfreeze} is more than the {n} layer groups of {config.model.name}; "
                         f"use all or 1 to {n}")
    top = n if tr.unfreeze == "all" else tr.unfreeze
    out = [Stage(HEAD_STAGE, _stage_config(config, groups, 1, HEAD_STAGE), trainable_prefixes(model, groups, 1))
           ] if tr.freeze_epochs else []
    out.append(Stage(FINE_TUNE_STAGE, _stage_config(config, groups, top, FINE_TUNE_STAGE),
                     trainable_prefixes(model, groups, top)))
    return out
