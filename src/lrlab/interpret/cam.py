"""Class activation maps: where in the image the evidence for a class lies.

The maps come from pytorch-grad-cam (github.com/jacobgil/pytorch-grad-cam), one class registered
per name in :data:`CAM_METHODS`: Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391), XGrad-CAM
(Fu et al. 2020, arXiv:2008.02312) and LayerCAM (Jiang et al. 2021, IEEE TIP 30) as the library
has them; Grad-CAM++ (Chattopadhyay et al. 2018, arXiv:1710.11063) and Score-CAM (Wang et al.
2020, arXiv:1910.01279), whose library versions depart from their papers, as
:mod:`lrlab.interpret.cam_methods` writes them on the library's base class.
tests/test_interpret.py recomputes every method by hand from the hooked activations and
gradients with its paper's formula. Adding a method is one registered function here; the
config's ``explain.method`` and the faithfulness test's default list follow from the registry.

Example::

    images = torch.stack([test_set[i][0] for i in wrong])    # (25, 3, 32, 32) normalised
    maps = class_activation_maps(model, images, pred.preds[wrong], target_layer="layer4")
    why = class_activation_maps(model, images, pred.targets[wrong], target_layer=["layer3", "layer4"])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from lrlab.compute import eval_mode
from lrlab.errors import LrlabError
from lrlab.registry import Registry

__all__ = [
    "CAM_METHODS",
    "DEFAULT_CAM_METHOD",
    "ClassScore",
    "class_activation_maps",
    "denormalize",
    "layer_names",
    "normalise_maps",
    "target_layers",
]


CAM_METHODS: Registry[Callable[[], type]] = Registry("CAM method", "explain.method")
"""Valid ``method`` names for :func:`class_activation_maps`, in registration order: name ->
function returning its pytorch-grad-cam ``BaseCAM`` class (imported only when a method is used).
Grad-CAM, Grad-CAM++, XGrad-CAM and LayerCAM take one forward + backward pass per batch;
Score-CAM is gradient-free: one extra forward pass per channel of the target layer and image,
so C times slower."""


DEFAULT_CAM_METHOD = "layercam"
"""The default of ``explain.method`` and :func:`class_activation_maps`: the most faithful method at
Grad-CAM's cost in the README's faithfulness table (benchmarks/cam_faithfulness.py)."""


@CAM_METHODS.register("gradcam")
def _gradcam() -> type:
    """Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391): ReLU(sum_k mean_ij(dY_c/dA_kij) A_k)."""
    from pytorch_grad_cam import GradCAM

    return GradCAM


@CAM_METHODS.register("gradcampp")
def _gradcampp() -> type:
    """Grad-CAM++ (Chattopadhyay et al. 2018, arXiv:1710.11063): weights
    sum_ij alpha_kij ReLU(g_kij), alpha = g^2 / (2 g^2 + sum_ab(A_kab) g^3) (eq. 19, with the
    exponential's closed form; alpha = 0 where g = 0), g = dY_c/dA."""
    from lrlab.interpret.cam_methods import GradCAMPlusPlus

    return GradCAMPlusPlus


@CAM_METHODS.register("xgradcam")
def _xgradcam() -> type:
    """XGrad-CAM (Fu et al. 2020, arXiv:2008.02312): weights sum_ij (A_kij / sum_ab A_kab) g_kij."""
    from pytorch_grad_cam import XGradCAM

    return XGradCAM


@CAM_METHODS.register("layercam")
def _layercam() -> type:
    """LayerCAM (Jiang et al. 2021, IEEE TIP 30): ReLU(sum_k ReLU(g_k) * A_k), pixel-wise weights."""
    from pytorch_grad_cam import LayerCAM

    return LayerCAM


@CAM_METHODS.register("scorecam")
def _scorecam() -> type:
    """Score-CAM (Wang et al. 2020, arXiv:1910.01279, Algorithm 1): gradient-free; one forward
    pass per channel of each target layer and image (see :mod:`lrlab.interpret.cam_methods`)."""
    from lrlab.interpret.cam_methods import ScoreCAM

    return ScoreCAM


class ClassScore:
    """The score of one class as a pytorch-grad-cam target: ``output[..., index]`` of a (K,) or
    (B, K) model output (logits for the gradient methods, probabilities inside Score-CAM).

    Raises:
        LrlabError: ``index`` outside 0..K-1, or an output that is not (K,) or (B, K).
    """

    def __init__(self, index: int) -> None:
        self.index = int(index)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim not in (1, 2):
            raise LrlabError(f"class activation maps need a model that returns (N, K) logits, got {type(output)}")
        if not 0 <= self.index < output.shape[-1]:
            raise LrlabError(f"class index {self.index} is out of range; "
                             f"valid class indices: 0 to {output.shape[-1] - 1}")
        return output[..., self.index]


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
    method: str = DEFAULT_CAM_METHOD,
    batch_size: int = 64,
) -> torch.Tensor:
    """Class activation maps of ``images`` for the classes ``class_idx``, at image resolution.

    The methods are those of :data:`CAM_METHODS` (see the module docstring for the papers).
    The model runs on the device of its parameters, in float32 (autocast off, whatever the
    caller's precision) and in eval mode; its train/eval flags, its parameters'
    ``requires_grad`` flags and their ``.grad`` are as before the call, and every hook is removed
    even when an error is raised.

    A map whose weighted sum is negative everywhere (no pixel with positive evidence for the
    class) is all zeros after the ReLU; the figures label such maps instead of drawing them.
    Several target layers are fused as pytorch-grad-cam does: each layer's map is min-max
    normalised and upsampled, then the maps are averaged pixel-wise and normalised again.

    Args:
        model: a classifier returning (B, K) logits.
        images: (N, 3, H, W) float, normalised as the model expects.
        class_idx: (N,) int64, the class each map explains (e.g. the predicted class).
        target_layer: a name from :func:`layer_names` whose output is (B, C, h, w), or a list
            of such names to fuse.
        method: a name in :data:`CAM_METHODS`.
        batch_size: images per forward/backward pass (Score-CAM: images per pass of the
            unmasked model; the masked copies go 256 per forward pass).

    Returns:
        (N, H, W) float32 maps on the CPU: ReLU of the method's weighted sum at (h, w),
        bilinearly upsampled and min-max normalised to [0, 1] per image (an all-zero map stays
        zero); always finite.

    Raises:
        LrlabError: unknown ``target_layer`` or ``method`` (the message lists the valid ones);
            a layer whose output is not a spatial feature map, is not used, or does not feed the
            class scores; a class index out of range.
        ValueError: ``images`` and ``class_idx`` shapes do not match.
    """
    cam_class = CAM_METHODS.get(method)()
    layers = target_layers(model, target_layer)
    images, class_idx = _checked_inputs(images, class_idx, batch_size)
    n, _, height, width = images.shape
    if n == 0:
        return torch.zeros(0, height, width, dtype=torch.float32)
    with _extraction(model, cam_class, layers) as (cam, seen):
        parts = [_batch_maps(cam, layers, seen, images[s:s + batch_size], class_idx[s:s + batch_size])
                 for s in range(0, n, batch_size)]
    # exact min-max (the library divides by max + 1e-7)
    return normalise_maps(torch.nan_to_num(torch.cat(parts), nan=0.0, posinf=0.0, neginf=0.0))


def normalise_maps(cam: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float maps -> min-max normalised to [0, 1] per map, same shape and dtype; a
    constant map (e.g. all zero) gives zeros."""
    lo = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - lo
    cam = torch.where(span > 0, (cam - lo) / span.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(cam))
    return cam.clamp_(0.0, 1.0)


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


def _feature_map_check(name: str, seen: set[str]) -> Callable:
    """A forward hook on layer ``name`` that records the call in ``seen`` and stops at once (one
    line) when the layer's output is not a (N, C, h, w) feature map."""

    def hook(module: nn.Module, inputs, output) -> None:
        seen.add(name)
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise LrlabError(f"target layer {name!r} outputs shape {shape}, not a (N, C, h, w) feature map; "
                             f"choose a convolutional layer or block")

    return hook


@contextlib.contextmanager
def _extraction(model: nn.Module, cam_class: type, layers: list[str]) -> Iterator[tuple[object, set[str]]]:
    """The pytorch-grad-cam object of ``cam_class`` on ``layers`` and the set of layers seen in
    the last forward pass; ``model`` in eval mode, float32 (autocast off), outside inference mode,
    gradients on (off for a gradient-free method). On exit every hook is removed and the modes,
    the parameters' ``requires_grad`` flags and their ``.grad`` tensors are restored (the library
    calls ``model.zero_grad()``)."""
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    modules = dict(model.named_modules())
    seen: set[str] = set()
    checks = [modules[name].register_forward_hook(_feature_map_check(name, seen)) for name in layers]
    device = params[0].device if params else torch.device("cpu")
    cam = None
    try:
        # Gradients are wanted only w.r.t. the hooked activations, never for the weights: frozen
        # parameters keep the graph small, and the input that requires grad keeps it alive.
        for p in params:
            p.requires_grad_(False)
        with eval_mode(model), torch.inference_mode(False), torch.autocast(device.type, enabled=False):
            cam = cam_class(model, target_layers=[modules[name] for name in layers])
            with torch.enable_grad() if cam.uses_gradients else torch.no_grad():
                yield cam, seen
    finally:
        if cam is not None:
            cam.activations_and_grads.release()
        for handle in checks:
            handle.remove()
        for p, (flag, grad) in zip(params, saved, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def _batch_maps(cam, layers: list[str], seen: set[str], images: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float32 maps on the CPU of one batch ``images`` (B, 3, H, W) for the classes
    ``cls`` (B,). Run inside :func:`_extraction`.

    Raises:
        LrlabError: a class index out of range; a target layer that is not a feature map, is not
            used in the forward pass or does not feed the class scores.
    """
    x = images.detach().to(cam.device, torch.float32).clone().requires_grad_(cam.uses_gradients)
    seen.clear()
    try:
        return torch.from_numpy(cam(x, [ClassScore(c) for c in cls.tolist()])).float()
    except LrlabError:
        raise
    except Exception:
        unused = [name for name in layers if name not in seen]
        if unused:
            raise LrlabError(f"target layer {unused[0]!r} is not used in the model's forward pass; "
                             f"pick another layer") from None
        if cam.uses_gradients and len(cam.activations_and_grads.gradients) < len(layers):
            raise LrlabError(f"target layer {', '.join(map(repr, layers))} does not feed the class scores; "
                             f"choose a layer before the classifier head") from None
        raise
    finally:
        cam.activations_and_grads.clear()  # drop the stored activations and gradients
        cam.outputs = None  # and the graph the library keeps with the outputs


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
