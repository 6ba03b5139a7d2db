"""Study a trained classifier: predictions, the mistakes, confusion, class activation maps.

Everything here takes an ``nn.Module`` and tensors and gives back tensors (or plain dicts);
drawing them is ``lrlab.plots``'s job. Class activation maps come from torchcam (Grad-CAM:
Selvaraju et al. 2017, arXiv:1610.02391; Grad-CAM++: Chattopadhyay et al. 2018, arXiv:1710.11063;
XGrad-CAM: Fu et al. 2020, arXiv:2008.02312; LayerCAM: Jiang et al. 2021, IEEE TIP 30;
Score-CAM: Wang et al. 2020, arXiv:1910.01279).

Example::

    pred = predict(model, test_loader, device=device)
    wrong = select_misclassified(pred, k=25)                 # highest-loss mistakes first
    images = torch.stack([test_set[i][0] for i in wrong])    # (25, 3, 32, 32) normalised
    maps = class_activation_maps(model, images, pred.preds[wrong], target_layer="layer4")
    why = class_activation_maps(model, images, pred.targets[wrong], target_layer=["layer3", "layer4"])
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrlab.compute import autocast
from lrlab.errors import LrlabError
from lrlab.io import atomic_path
from lrlab.tta import tta_probs

__all__ = [
    "CAM_METHODS",
    "SELECT_BY",
    "Predictions",
    "class_activation_maps",
    "confusion_matrix",
    "denormalize",
    "layer_names",
    "per_class_summary",
    "predict",
    "select_misclassified",
    "target_layers",
]

SELECT_BY = ("loss", "confidence", "first")
"""Valid orders for :func:`select_misclassified`."""

CAM_METHODS = ("gradcam", "gradcampp", "xgradcam", "layercam", "scorecam")
"""Valid ``method`` names for :func:`class_activation_maps`: torchcam's Grad-CAM, Grad-CAM++,
XGrad-CAM, LayerCAM (one forward + backward pass per batch) and Score-CAM (gradient-free: one
extra forward pass per channel of the target layer and image, so C times slower)."""


# --------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """The model's class probabilities for every image of a dataset, in dataset order.

    Attributes:
        probs: (N, K) float32 softmax probabilities on the CPU.
        targets: (N,) int64 true class indices on the CPU.
    """

    probs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        self.probs = torch.as_tensor(self.probs).detach().to("cpu", torch.float32)
        self.targets = torch.as_tensor(self.targets).detach().to("cpu", torch.int64)
        if self.probs.ndim != 2 or self.targets.ndim != 1 or len(self.probs) != len(self.targets):
            raise ValueError(
                f"Predictions needs probs (N, K) and targets (N,), got {tuple(self.probs.shape)} "
                f"and {tuple(self.targets.shape)}"
            )

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return self.probs.shape[1]

    @property
    def preds(self) -> torch.Tensor:
        """(N,) int64 predicted class (top-1, the argmax of ``probs``)."""
        return self.probs.argmax(dim=1)

    @property
    def confidence(self) -> torch.Tensor:
        """(N,) float32 probability of the predicted class."""
        return self.probs.max(dim=1).values

    @property
    def losses(self) -> torch.Tensor:
        """(N,) float32 per-image cross-entropy, ``-log p[target]`` (finite: p is clamped at 1e-38)."""
        p_true = self.probs.gather(1, self.targets.view(-1, 1)).squeeze(1)
        return -torch.log(p_true.clamp_min(torch.finfo(torch.float32).tiny))

    @property
    def correct(self) -> torch.Tensor:
        """(N,) bool, True where the top-1 prediction equals the target."""
        return self.preds == self.targets

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy as a fraction in [0, 1] (NaN for an empty set)."""
        if len(self) == 0:
            return float("nan")
        return self.correct.float().mean().item()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``probs`` and ``targets`` to ``path`` atomically (tmp file + rename); return the Path."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save({"probs": self.probs, "targets": self.targets}, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Predictions:
        """Read what :meth:`save` wrote.

        Raises:
            LrlabError: when the file is missing or does not hold saved predictions.
        """
        path = Path(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(probs=data["probs"], targets=data["targets"])
        except FileNotFoundError:
            raise LrlabError(f"predictions file {str(path)!r} does not exist") from None
        except (KeyError, TypeError, RuntimeError, ValueError, EOFError) as exc:
            raise LrlabError(
                f"predictions file {str(path)!r} is not a saved Predictions (needs keys probs, targets): {exc}"
            ) from None


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own training flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def predict(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta: bool = False,
    tta_shift: int = 0,
) -> Predictions:
    """Softmax probabilities of ``model`` on every batch of ``loader``, in loader order.

    Args:
        model: a classifier returning (B, K) logits; put in eval mode for the call, and every
            submodule's train/eval flag is restored afterwards.
        loader: yields ``(x, y)``: x (B, 3, H, W) float, normalised; y (B,) int64 class indices.
            It must not shuffle if the indices are to match the dataset.
        device: where to run; default the device of the model's parameters.
        autocast_dtype: e.g. torch.bfloat16 to run under ``torch.autocast``; None for float32.
            Probabilities are always computed and returned in float32.
        channels_last: move inputs in ``torch.channels_last`` memory format.
        tta: test-time augmentation: the probabilities are the mean of the softmax over the
            image and its horizontal mirror image (with ``tta_shift`` s > 0 also both translated
            by +-s pixels; :func:`lrlab.tta.tta_probs`), as ``lrlab.engine.evaluate`` does, so
            the accuracy matches the final one recorded during training with ``train.tta``.
        tta_shift: translation in pixels of the extra TTA views (0: flip only).

    Returns:
        Predictions with probs (N, K) float32 and targets (N,) int64, both on the CPU.

    Raises:
        ValueError: when the loader yields no batches.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    probs, targets = [], []
    with _eval_mode(model), torch.inference_mode():
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            with autocast(device, autocast_dtype):
                p = tta_probs(model, x, tta_shift) if tta else torch.softmax(model(x).float(), dim=1)
            probs.append(p.cpu())
            targets.append(torch.as_tensor(y).to("cpu", torch.int64))
    if not probs:
        raise ValueError("predict() got a loader that yielded no batches")
    return Predictions(probs=torch.cat(probs), targets=torch.cat(targets))


def select_misclassified(pred: Predictions, k: int = 25, by: str = "loss") -> torch.Tensor:
    """Dataset indices of up to ``k`` wrongly classified images.

    Args:
        pred: predictions from :func:`predict`.
        k: how many to return; when fewer than k are wrong, all wrong ones are returned.
        by: "loss" (highest cross-entropy first, i.e. least probability on the true class),
            "confidence" (highest probability on the wrong predicted class first) or "first"
            (dataset order).

    Returns:
        (min(k, n_wrong),) int64 indices into the dataset.

    Raises:
        LrlabError: for an unknown ``by`` or a negative ``k``.
    """
    if by not in SELECT_BY:
        raise LrlabError(f"misclassified order by={by!r} is not known; valid: {', '.join(SELECT_BY)}")
    if k < 0:
        raise LrlabError(f"number of misclassified images k={k} must be >= 0")
    wrong = torch.nonzero(~pred.correct, as_tuple=False).flatten()
    if by == "first":
        return wrong[:k]
    key = pred.losses[wrong] if by == "loss" else pred.confidence[wrong]
    # Stable sort so that ties keep dataset order (reproducible grids).
    order = torch.sort(key, descending=True, stable=True).indices
    return wrong[order[:k]]


def confusion_matrix(pred: Predictions, num_classes: int | None = None) -> torch.Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class.

    The matrix sums to ``len(pred)`` and its trace is the number of correct predictions.
    """
    k = num_classes or pred.num_classes
    flat = pred.targets * k + pred.preds
    return torch.bincount(flat, minlength=k * k).reshape(k, k)


def per_class_summary(pred: Predictions, classes: Sequence[str], top_pairs: int = 10) -> dict:
    """Confusion matrix (counts and row-normalised), per-class accuracy and the most-confused pairs.

    Args:
        pred: predictions from :func:`predict`.
        classes: K class names, ``classes[i]`` for label i.
        top_pairs: how many (true, predicted) pairs to list, most frequent first.

    Returns:
        A JSON-ready dict (written as ``per_class.json`` in a run folder):
        ``num_images`` (int), ``accuracy`` (top-1, fraction), ``classes`` (K names),
        ``confusion`` (K x K int counts, row = true class, column = predicted),
        ``confusion_normalized`` (K x K fractions of each true class; a row without images is 0),
        ``per_class``: one dict per class with ``class``, ``images``, ``correct``, ``accuracy``
        (recall; NaN-free: null when the class has no images) and ``predicted`` (how often it was
        predicted), and ``most_confused``: up to ``top_pairs`` dicts ``{true, pred, count,
        fraction}`` (fraction of the true class's images), sorted by count, then by fraction;
        only pairs that occurred.

    Raises:
        LrlabError: when ``len(classes)`` differs from the number of classes K in ``pred``.
    """
    k = pred.num_classes
    if len(classes) != k:
        raise LrlabError(f"per-class summary got {len(classes)} class names for {k} classes; give one name per class")
    m = confusion_matrix(pred, k)
    rows = m.sum(1)
    frac = torch.where(rows[:, None] > 0, m.double() / rows.clamp_min(1)[:, None].double(), torch.zeros_like(m, dtype=torch.float64))
    per_class = [
        {"class": name, "images": int(rows[i]), "correct": int(m[i, i]),
         "accuracy": float(frac[i, i]) if rows[i] > 0 else None, "predicted": int(m[:, i].sum())}
        for i, name in enumerate(classes)
    ]
    pairs = [(int(m[t, p]), float(frac[t, p]), t, p) for t in range(k) for p in range(k) if t != p and m[t, p] > 0]
    pairs.sort(key=lambda q: (-q[0], -q[1], q[2], q[3]))
    return {
        "num_images": len(pred),
        "accuracy": pred.accuracy,
        "classes": list(classes),
        "confusion": m.tolist(),
        "confusion_normalized": [[round(v, 6) for v in row] for row in frac.tolist()],
        "per_class": per_class,
        "most_confused": [{"true": classes[t], "pred": classes[p], "count": c, "fraction": round(f, 6)}
                          for c, f, t, p in pairs[:top_pairs]],
    }


# --------------------------------------------------------------------------- activation maps


def layer_names(model: nn.Module) -> list[str]:
    """Names usable as ``target_layer`` in :func:`class_activation_maps`: every named submodule.

    Pick one whose output is a spatial feature map (N, C, h, w), typically the last convolutional
    block (e.g. "layer4" of a ResNet); its output resolution sets the map's detail.
    """
    return [name for name, _ in model.named_modules() if name]


def _cam_class(method: str):
    from torchcam import methods as cams

    return {
        "gradcam": cams.GradCAM,
        "gradcampp": cams.GradCAMpp,
        "xgradcam": cams.XGradCAM,
        "layercam": cams.LayerCAM,
        "scorecam": cams.ScoreCAM,
    }[method]


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
    (autocast off) and in eval mode; its train/eval flags and its parameters' ``requires_grad``
    flags are restored afterwards, parameter ``.grad`` is not touched, and every hook is removed
    even when an error is raised.

    Several target layers are fused: each layer's map is upsampled to (H, W) and min-max
    normalised, then the pixel-wise maximum is taken and normalised again (so a coarse deep
    layer and a finer shallow one both count, whatever their raw scales).

    Args:
        model: a classifier returning (B, K) logits.
        images: (N, 3, H, W) float, normalised as the model expects.
        class_idx: (N,) int64, the class each map explains (e.g. the predicted class).
        target_layer: a name from :func:`layer_names` whose output is (B, C, h, w), or a list
            of such names to fuse.
        method: one of :data:`CAM_METHODS`.
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
    if method not in CAM_METHODS:
        raise LrlabError(f"CAM method {method!r} is not known; valid methods: {', '.join(CAM_METHODS)}")
    layers = target_layers(model, target_layer)
    images = torch.as_tensor(images)
    class_idx = torch.as_tensor(class_idx, dtype=torch.int64).flatten()
    if images.ndim != 4 or len(class_idx) != len(images):
        raise ValueError(
            f"class_activation_maps needs images (N, 3, H, W) and class_idx (N,), got "
            f"{tuple(images.shape)} and {tuple(class_idx.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, _, height, width = images.shape
    if n == 0:
        return torch.zeros(0, height, width, dtype=torch.float32)
    device = torch.device(device) if device is not None else _model_device(model)
    extractor_cls = _cam_class(method)
    options = {"batch_size": 256} if method == "scorecam" else {}
    # Score-CAM needs no gradients; the gradient methods need a graph from input to scores.
    grad_mode = torch.no_grad if method == "scorecam" else torch.enable_grad

    parts: list[torch.Tensor] = []
    params = list(model.parameters())
    grad_flags = [p.requires_grad for p in params]
    try:
        # Gradients are wanted only w.r.t. the hooked activation, never for the weights:
        # freezing the parameters keeps .grad untouched and the saved graph small, and making the
        # input require grad keeps the graph alive for models whose weights are already frozen.
        for p in params:
            p.requires_grad_(False)
        with (
            _eval_mode(model),
            torch.inference_mode(False),
            grad_mode(),
            torch.autocast(device.type, enabled=False),
            extractor_cls(model, target_layer=layers, enable_hooks=True, **options) as extractor,
        ):
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                x = images[start:stop].detach().to(device, torch.float32).clone().requires_grad_(True)
                cls = class_idx[start:stop]
                try:
                    scores = model(x)
                    _check_scores(scores, cls, layers, extractor)
                    cams = extractor(cls.tolist(), scores.float(), normalized=False)
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
                maps = [_upsample_normalise(cam, (height, width)) for cam in cams]
                parts.append(maps[0] if len(maps) == 1 else _renormalise(torch.stack(maps).amax(0)))
    finally:
        for p, flag in zip(params, grad_flags, strict=True):
            p.requires_grad_(flag)
    return torch.cat(parts)


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
    """Undo ``(x - mean) / std`` for display.

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
