"""The name -> constructor registry of lrlab's own networks, behind :func:`lrlab.models.build`."""

from __future__ import annotations

from typing import Callable

from torch import nn

from lrlab.errors import LrlabError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn(num_classes, **kwargs) -> nn.Module`` under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def model_names() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_MODELS)


def check_model_name(name: str) -> None:
    """Raise unless ``name`` is a registered model.

    Raises:
        LrlabError: unknown name (the message lists the valid ones).
    """
    if name not in _MODELS:
        raise LrlabError(f"unknown model {name!r}; valid models: {', '.join(model_names())}, or torchvision:<name>, "
                         f"timm:<name>, package.module:function")


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the registered model ``name`` for ``num_classes`` classes.

    Args:
        name: a registered model name (see ``model_names()``).
        num_classes: number of output logits K; the model maps (N, 3, H, W) float32
            images to (N, K) float32 logits.
        **kwargs: model-specific options (e.g. ``width`` for fastnet).

    Raises:
        LrlabError: unknown name (the message lists the valid ones) or an option the
            model does not take.
    """
    check_model_name(name)
    try:
        return _MODELS[name](num_classes, **kwargs)
    except TypeError as e:
        raise LrlabError(f"model {name!r} does not accept the options {sorted(kwargs)}: {e}") from None


def check_dropout(**probabilities: float) -> None:
    """Raise unless every dropout probability (keyword = the model.kwargs key) is in [0, 1).

    Raises:
        LrlabError: naming the key and value.
    """
    for key, p in probabilities.items():
        if not 0 <= p < 1:
            raise LrlabError(f"model.kwargs {key}={p!r} is not valid; use a probability in [0, 1) (0: off)")
