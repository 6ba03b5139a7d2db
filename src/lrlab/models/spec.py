"""What the rest of lrlab needs to know about a model, in one place: :class:`ModelSpec`.

:func:`lrlab.models.build` attaches a ModelSpec to every model it builds (``model.lrlab_spec``);
:func:`model_spec` reads it back, and derives one for any other ``nn.Module``. It holds

* ``mean``/``std``: the input normalisation the weights were trained with (ImageNet's for
  torchvision weights, timm's ``pretrained_cfg``), or None: lrlab then normalises with the
  training split's own mean/std;
* ``cam_layer``: the default Grad-CAM target layer, the last convolutional stage (resnet
  ``layer4``, ``features``' last block for MobileNet/EfficientNet/ConvNeXt/VGG, timm's last
  ``feature_info`` module; lrlab's own CIFAR networks keep their 8x8 ``default_cam_layer``);
* ``layer_groups``: module names per layer group, bottom (stem) to top (head), for
  discriminative learning rates (Howard & Ruder 2018, arXiv:1801.06146) and for freezing;
* ``head``: the classifier's module names, what stage-1 transfer training trains while the
  backbone is frozen (:func:`lrlab.transfer.freeze`);
* ``input_size``: the side the weights were trained at (224 for ImageNet weights), or None;
* ``note``: what loading the weights did, e.g. that a weights file's head was not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BODY_GROUPS = 4  # the layers between stem and head are split into at most this many groups


@dataclass(frozen=True)
class ModelSpec:
    """See the module docstring. Tuples of 3 floats in [0, 1] pixel units for mean/std."""

    cam_layer: str | None
    layer_groups: tuple[tuple[str, ...], ...]
    head: tuple[str, ...]
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: int | None = None
    note: str = field(default="")


def model_spec(model: nn.Module) -> ModelSpec:
    """The :class:`ModelSpec` attached by :func:`lrlab.models.build`, else one derived from the
    module's structure (:func:`derive_spec`)."""
    spec = getattr(model, "lrlab_spec", None)
    return spec if isinstance(spec, ModelSpec) else derive_spec(model)


def _with_params(model: nn.Module, prefix: str = "") -> list[str]:
    """Names of the children of ``model`` (under ``prefix``) that hold parameters, in order."""
    return [prefix + n for n, m in model.named_children() if any(True for _ in m.parameters())]


def _chunks(names: list[str], n: int) -> list[tuple[str, ...]]:
    """``names`` split into at most ``n`` contiguous, nearly equal groups."""
    n = min(n, len(names))
    if n == 0:
        return []
    bounds = [round(i * len(names) / n) for i in range(n + 1)]
    return [tuple(names[a:b]) for a, b in zip(bounds, bounds[1:])]


def head_name(model: nn.Module) -> str | None:
    """Name of the classifier: the last nn.Linear of the module tree, else its last nn.Conv2d
    (SqueezeNet's classifier is a 1x1 convolution); None for a model without either."""
    last = None
    for kind in (nn.Linear, nn.Conv2d):
        last = next((n for n, m in reversed(list(model.named_modules())) if isinstance(m, kind)), None)
        if last is not None:
            return last
    return last


def _top_of(name: str, candidates: list[str]) -> str | None:
    """The candidate that is ``name`` or one of its ancestors."""
    return next((c for c in candidates if name == c or name.startswith(c + ".")), None)


def derive_spec(model: nn.Module, head: str | None = None) -> ModelSpec:
    """A spec from the module structure: torchvision-style ResNets (``layer1``..``layer4``:
    groups stem, layer1..layer4, head; CAM ``layer4``), models with a ``features`` sequence
    (MobileNet, EfficientNet, ConvNeXt, VGG, DenseNet, Swin: stem ``features.0``, the rest in up
    to 4 groups; CAM the last child of ``features`` with parameters), else the top-level
    children (stem, up to 4 groups, head; CAM the last child before the head). A model's own
    ``default_cam_layer`` wins. No normalisation (mean/std None)."""
    head = head or head_name(model)
    top = _with_params(model)
    head_top = _top_of(head, top) if head else None
    stages = [s for s in ("layer1", "layer2", "layer3", "layer4") if s in top]
    if len(stages) == 4:
        stem = top[: top.index("layer1")]
        body = [(s,) for s in stages]
        cam = "layer4"
    else:
        trunk = _with_params(model.features, "features.") if isinstance(getattr(model, "features", None), nn.Module) else []
        rest = [n for n in top if n != head_top and n != "features"]
        if not trunk:
            trunk, rest = rest, []
        stem, body = trunk[:1], _chunks(trunk[1:], BODY_GROUPS)
        cam = trunk[-1] if trunk else None
        if rest and body:  # e.g. Swin's final norm: joins the last body group
            body[-1] = body[-1] + tuple(rest)
    cam = getattr(model, "default_cam_layer", None) or cam
    groups = [tuple(stem)] if stem else []
    groups += [g for g in body if g]
    grouped = {x for g in groups for x in g}
    tail = tuple(n for n in top if n not in grouped and n != head_top and not any(x.startswith(n + ".") for x in grouped))
    head_group = ((head_top,) if head_top else ()) + tail
    groups += [head_group] if head_group else []
    return ModelSpec(cam, tuple(groups), head_group)


def _shortest_prefixes(groups: list[list[str]]) -> list[tuple[str, ...]]:
    """Each group's module names shortened to the shortest dotted prefixes that no other group
    shares (``blocks.1.0.conv_pw``, ``blocks.1.0.bn1``, ... -> ``blocks.1``), order kept."""
    out = []
    for g, names in enumerate(groups):
        others = [n for h, ns in enumerate(groups) if h != g for n in ns]
        short: dict[str, None] = {}
        for name in names:
            parts = name.split(".")
            for k in range(1, len(parts) + 1):
                p = ".".join(parts[:k])
                if not any(o == p or o.startswith(p + ".") or p.startswith(o + ".") for o in others):
                    break
            short[p] = None
        out.append(tuple(short))
    return out


def timm_spec(model: nn.Module) -> ModelSpec:
    """The spec of a timm model: layer groups from timm's own coarse ``group_matcher`` (stem,
    one group per stage, head; the grouping timm uses for layer-wise lr decay), the CAM layer
    from ``feature_info`` (its last, deepest feature map), mean/std/input size from
    ``pretrained_cfg``. Mean/std are filled in by the builder only when weights are loaded."""
    from timm.models import group_modules

    grouped = group_modules(model, model.group_matcher(coarse=True))
    groups = _shortest_prefixes([grouped[k] for k in sorted(grouped)])
    info = getattr(model, "feature_info", None)
    cam = info[-1]["module"] if info else derive_spec(model).cam_layer
    size = model.pretrained_cfg.get("input_size", (3, None, None))[-1]
    return ModelSpec(cam, tuple(groups), groups[-1], input_size=size)
