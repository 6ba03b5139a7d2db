"""Class activation maps: where in the image the evidence for a class lies.

The maps come from torchcam's extractors, one registered per name in :data:`CAM_METHODS`
(Grad-CAM: Selvaraju et al. 2017, arXiv:1610.02391; Grad-CAM++: Chattopadhyay et al. 2018,
arXiv:1710.11063; XGrad-CAM: Fu et al. 2020, arXiv:2008.02312; LayerCAM: Jiang et al. 2021,
IEEE TIP 30; Score-CAM: Wang et al. 2020, arXiv:1910.01279). Adding a method is one
registered function here; the config's ``explain.method`` and the faithfulness test's default
list follow from the registry.

Example::

    images = torch.stack([test_set[i][0] for i in wrong])    # (25, 3, 32, 32) normalised
    maps = class_activation_maps(model, images, pred.preds[wrong], target_layer="layer4")
    why = class_activation_maps(model, images, pred.targets[wrong], target_layer=["layer3", "layer4"])
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrlab.compute import eval_mode
from lrlab.errors import LrlabError
from lrlab.registry import Registry

__all__ = [
    "CAM_METHODS",
    "CamMethod",
    "class_activation_maps",
    "denormalize",
    "layer_names",
    "target_layers",
]


@dataclass(frozen=True)
class CamMethod:
    """How to run one CAM method.

    Attributes:
        extractor: the torchcam extractor class, called as
            ``extractor(model, target_layer=[names], enable_hooks=True, **options)``.
        gradients: False for a gradient-free method (it then runs under ``torch.no_grad``).
        options: extra keyword arguments of the extractor.
    """

    extractor: type
    gradients: bool = True
    options: dict[str, Any] = field(default_factory=dict)


CAM_METHODS: Registry[Callable[[], CamMethod]] = Registry("CAM method", "explain.method")
"""Valid ``method`` names for :func:`class_activation_maps`, in registration order: name ->
function returning its :class:`CamMethod` (torchcam is imported only when a method is used).
Grad-CAM, Grad-CAM++, XGrad-CAM and LayerCAM take one forward + backward pass per batch;
Score-CAM is gradient-free: one extra forward pass per channel of the target layer and image,
so C times slower."""


@CAM_METHODS.register("gradcam")
def _gradcam() -> CamMethod:
    """Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391)."""
    from torchcam.methods import GradCAM

    return CamMethod(GradCAM)


@CAM_METHODS.register("gradcampp")
def _gradcampp() -> CamMethod:
    """Grad-CAM++ (Chattopadhyay et al. 2018, arXiv:1710.11063)."""
    from torchcam.methods import GradCAMpp

    return CamMethod(GradCAMpp)


@CAM_METHODS.register("xgradcam")
def _xgradcam() -> CamMethod:
    """XGrad-CAM (Fu et al. 2020, arXiv:2008.02312)."""
    from torchcam.methods import XGradCAM

    return CamMethod(XGradCAM)


@CAM_METHODS.register("layercam")
def _layercam() -> CamMethod:
    """LayerCAM (Jiang et al. 2021, IEEE TIP 30)."""
    from torchcam.methods import LayerCAM

    return CamMethod(LayerCAM)


@CAM_METHODS.register("scorecam")
def _scorecam() -> CamMethod:
    """Score-CAM (Wang et al. 2020, arXiv:1910.01279): gradient-free; one forward pass per channel
    of each target layer and image, with the channel's upsampled activation as a mask on the
    input; 256 masked images per forward pass."""
    from torchcam.methods import ScoreCAM

    return CamMethod(ScoreCAM, gradients=False, options={"batch_size": 256})


# --------------------------------------------------------------------------- target layers


def layer_names(model: nn.Module) -> list[str]:
    """Names usable as ``target_layer`` in :func:`class_activation_maps`: every named submodule.

    Pick one whose output is a spatial feature map (N, C, h, w), typically the last convolutional
    block (e.g. "layer4" of a ResNet); its output resolution sets the map's detail.
    """
    return [name for name, _ in model.named_modules() if name]


def target_layers(model: nn.Module, target_layer: str | Sequence[str]) -> list[str]:
    """The layer name(s) ``target_layer`` as a checked, non-empty list (order kept, duplicates dropped).

    Raises:
        LrlabError: a name that is not in :func:`layer_names` (the message lists the valid names),
            or an empty list.
    """
    names = [target_layer] if isinstance(target_layer, str) else list(target_layer)
    if not names:
        raise LrlabError("target layer list is empty; give one layer name or a list of them")
    valid = layer_names(model)
    for name in names:
        if not isinstance(name, str) or name not in valid:
            raise LrlabError(f"target layer {name!r} does not exist; valid layers: {', '.join(valid)}")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- activation maps


def class_activation_maps(
    model: nn.Module,
    images: torch.Tensor,
    class_idx: torch.Tensor | Sequence[int],
    *,
    target_layer: str | Sequence[str],
    method: str = "gradcam",
    device: torch.device | str | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Class activation maps of ``images`` for the classes ``class_idx``, at image resolution.

    Uses torchcam's extractors: "gradcam" (Selvaraju et al. 2017, arXiv:1610.02391),
    "gradcampp" (Chattopadhyay et al. 2018, arXiv:1710.11063), "xgradcam" (Fu et al. 2020,
    arXiv:2008.02312), "layercam" (Jiang et al. 2021) and the gradient-free "scorecam" (Wang et
    al. 2020, arXiv:1910.01279; one forward pass per channel of each target layer and image,
    with the channel's upsampled activation as a mask on the input). The model runs in float32
    (autocast off, whatever the caller's precision) and in eval mode; its train/eval flags and
    its parameters' ``requires_grad`` flags are restored afterwards, parameter ``.grad`` is not
    touched, and every hook is removed even when an error is raised.

    Several target layers are fused: each layer's map is upsampled to (H, W) and min-max
    normalised, then the pixel-wise maximum is taken and normalised again (so a coarse deep
    layer and a finer shallow one both count, whatever their raw scales).

    Args:
        model: a classifier returning (B, K) logits.
        images: (N, 3, H, W) float, normalised as the model expects.
        class_idx: (N,) int64, the class each map explains (e.g. the predicted class).
        target_layer: a name from :func:`layer_names` whose output is (B, C, h, w), or a list
            of such names to fuse.
        method: a name in :data:`CAM_METHODS`.
        device: where to run; default the device of the model's parameters.
        batch_size: images per forward/backward pass (Score-CAM: images whose C masked copies
            are scored together, 256 masked images per forward pass).

    Returns:
        (N, H, W) float32 maps on the CPU, bilinearly upsampled from (h, w) and min-max
        normalised to [0, 1] per image (a constant map gives zeros); always finite.

    Raises:
        LrlabError: unknown ``target_layer`` or ``method`` (the message lists the valid ones);
            a layer whose output is not a spatial feature map or is not used for the scores; a
            class index out of range.
        ValueError: ``images`` and ``class_idx`` shapes do not match.
    """
    cam_method = CAM_METHODS.get(method)()
    layers = target_layers(model, target_layer)
    images, class_idx = _checked_inputs(images, class_idx, batch_size)
    n, _, height, width = images.shape
    if n == 0:
        return torch.zeros(0, height, width, dtype=torch.float32)
    if device is None:  # the device of the model's weights
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = first.device if first is not None else "cpu"
    device = torch.device(device)
    parts: list[torch.Tensor] = []
    with _extraction(model, cam_method, layers, device) as extractor:
        for start in range(0, n, batch_size):
            batch = slice(start, start + batch_size)
            cams = _batch_maps(model, extractor, layers, images[batch], class_idx[batch], device)
            parts.append(_fuse(cams, (height, width)))
    return torch.cat(parts)


def _checked_inputs(images, class_idx, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` as a tensor and ``class_idx`` as a flat int64 tensor, their shapes checked."""
    images = torch.as_tensor(images)
    class_idx = torch.as_tensor(class_idx, dtype=torch.int64).flatten()
    if images.ndim != 4 or len(class_idx) != len(images):
        raise ValueError(
            f"class_activation_maps needs images (N, 3, H, W) and class_idx (N,), got "
            f"{tuple(images.shape)} and {tuple(class_idx.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return images, class_idx


@contextlib.contextmanager
def _extraction(model: nn.Module, cam_method: CamMethod, layers: list[str],
                device: torch.device) -> Iterator[Any]:
    """The torchcam extractor on ``layers``, hooked into ``model`` in eval mode, float32 (autocast
    off), outside inference mode, with gradients on (off for a gradient-free method); on exit the
    hooks are removed and the modes and the parameters' ``requires_grad`` flags restored."""
    params = list(model.parameters())
    grad_flags = [p.requires_grad for p in params]
    # Score-CAM needs no gradients; the gradient methods need a graph from input to scores.
    grad_mode = torch.enable_grad if cam_method.gradients else torch.no_grad
    try:
        # Gradients are wanted only w.r.t. the hooked activation, never for the weights:
        # freezing the parameters keeps .grad untouched and the saved graph small, and making the
        # input require grad keeps the graph alive for models whose weights are already frozen.
        for p in params:
            p.requires_grad_(False)
        with (
            eval_mode(model),
            torch.inference_mode(False),
            grad_mode(),
            torch.autocast(device.type, enabled=False),
            cam_method.extractor(model, target_layer=layers, enable_hooks=True, **cam_method.options) as extractor,
        ):
            yield extractor
    finally:
        for p, flag in zip(params, grad_flags, strict=True):
            p.requires_grad_(flag)


def _batch_maps(model: nn.Module, extractor, layers: list[str], images: torch.Tensor, cls: torch.Tensor,
                device: torch.device) -> list[torch.Tensor]:
    """Raw maps of one batch of ``images`` (B, 3, H, W) for the classes ``cls`` (B,): one (B, h, w)
    per layer, on ``device``. Run inside :func:`_extraction`.

    Raises:
        LrlabError: a target layer that does not feed the class scores, and see :func:`_check_scores`.
    """
    x = images.detach().to(device, torch.float32).clone().requires_grad_(True)
    try:
        scores = model(x)
        _check_scores(scores, cls, layers, extractor)
        return extractor(cls.tolist(), scores.float(), normalized=False)
    except RuntimeError as exc:
        if "not connected" not in str(exc):
            raise
        raise LrlabError(
            f"target layer {', '.join(map(repr, layers))} does not feed the class scores; "
            f"choose a layer before the classifier head"
        ) from None
    finally:
        extractor.reset_hooks()  # drop the stored activations and their graph
        if hasattr(extractor, "_input"):
            del extractor._input  # Score-CAM keeps a copy of the last input batch


def _check_scores(scores: torch.Tensor, cls: torch.Tensor, layers: list[str], extractor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        raise LrlabError(f"class activation maps need a model that returns (N, K) logits, got {type(scores)}")
    bad = cls[(cls < 0) | (cls >= scores.shape[1])]
    if len(bad):
        raise LrlabError(
            f"class index {bad[0].item()} is out of range; valid class indices: 0 to {scores.shape[1] - 1}"
        )
    for name, act in zip(layers, extractor.hook_a, strict=True):
        if act is None:
            raise LrlabError(f"target layer {name!r} is not used in the model's forward pass; pick another layer")
        if act.ndim != 4:
            raise LrlabError(
                f"target layer {name!r} outputs shape {tuple(act.shape)}, not a (N, C, h, w) feature map; "
                f"choose a convolutional layer or block"
            )


def _fuse(cams: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """One (B, h_l, w_l) raw map per layer -> (B, H, W) float32 on the CPU in [0, 1]: each upsampled
    and normalised, then (several layers) the pixel-wise maximum, normalised again."""
    maps = [_upsample_normalise(cam, size) for cam in cams]
    return maps[0] if len(maps) == 1 else _renormalise(torch.stack(maps).amax(0))


def _renormalise(cam: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> min-max normalised to [0, 1] per map; constant maps -> zeros."""
    lo = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - lo
    cam = torch.where(span > 0, (cam - lo) / span.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(cam))
    return cam.clamp_(0.0, 1.0)


def _upsample_normalise(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) raw maps -> (B, H, W) float32 in [0, 1]; constant or non-finite maps -> zeros."""
    cam = torch.nan_to_num(cam.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    cam = F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return _renormalise(cam).cpu()


# --------------------------------------------------------------------------- display


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo ``(x - mean) / std`` for display (e.g. under a class activation map).

    Args:
        x: (N, C, H, W) or (C, H, W) float, normalised per channel.
        mean, std: per-channel values used to normalise (in [0, 1] pixel units).

    Returns:
        (N, H, W, C) (or (H, W, C)) uint8 numpy array, rounded and clipped to [0, 255].
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"denormalize needs (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    img = ((x * s + m) * 255.0).round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    out = img.contiguous().numpy()
    return out[0] if single else out
