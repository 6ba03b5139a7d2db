"""Do the class activation maps point at what the model uses? Keep / delete tests per CAM method.

For each image, the pixels are ranked by the map of the predicted class. Two curves of the
model's probability for that (originally predicted) class are measured, each as a function of
the share ``f`` of pixels:

- **keep** ("insertion" with a mean baseline): only the top-``f`` pixels of the map stay, the
  others are set to the dataset mean (0 after normalisation). A faithful map keeps the
  confidence high with few pixels; the *drop* ``p(intact) - p(kept)`` is small. This is the
  "Average Drop" idea of Chattopadhyay et al. 2018 (Grad-CAM++, arXiv:1710.11063) with a hard
  top-k mask.
- **delete**: the top-``f`` pixels are set to the mean, the rest stay. A faithful map makes
  the confidence fall fast (Petsiuk et al. 2018, RISE, arXiv:1806.07421, "deletion").

Third, **ROAD** (RemOve And Debias, Rong et al. 2022, arXiv:2202.00449), from pytorch-grad-cam:
the top (MoRF: most relevant first) or bottom (LeRF: least relevant first) p% of the pixels are
not set to the mean but filled in from their neighbours by noisy linear imputation, so that the
shape of the removed region does not leak the class; the change in the predicted class's
probability is averaged over p = 10, 20, ..., 90%. A faithful map makes MoRF fall far and LeRF
hardly at all. The maps are passed as their pixel ranks (ties broken at random), so each p
removes exactly that share even where a ReLU'd map is flat at zero.

The baseline is a *random map of the same area and smoothness*: uniform noise at the target
layer's resolution (e.g. 8x8), upsampled bilinearly to the image like a CAM, so the random
regions are blobs of the same size as the CAM's, not scattered pixels (scattered pixels keep
a low-resolution copy of the whole image and would make a poor, flattering baseline).

Example::

    result = cam_faithfulness(model, x, Compute.choose(), target_layer="block2", methods=("gradcam", "scorecam"))
    print(format_table(result))
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrlab.compute import Compute, eval_mode
from lrlab.errors import LrlabError
from lrlab.interpret.cam import CAM_METHODS, class_activation_maps, target_layers
from lrlab.io import write_json

__all__ = ["FRACTIONS", "ROAD_PERCENTILES", "FaithfulnessResult", "cam_faithfulness", "format_table", "keep_masks",
           "random_maps", "table_rows"]

FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Default shares of pixels at which the keep and delete curves are measured."""

RANDOM = "random"
"""Key of the random-map baseline in :class:`FaithfulnessResult` curves."""

TABLE_AT = (0.1, 0.25, 0.5)
"""Shares of kept pixels reported in :func:`format_table`."""

ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
"""Percentages of pixels removed (imputed) by the ROAD test, averaged over."""


@dataclass
class FaithfulnessResult:
    """Mean confidence curves per CAM method and for the random baseline.

    Attributes:
        fractions: (F,) shares of pixels in [0, 1], increasing.
        methods: the CAM methods measured (keys of the curves besides ``"random"``).
        keep: method or "random" -> (F,) mean probability of the originally predicted class
            when only the top-f pixels of the map are kept (the rest set to the mean).
        delete: method or "random" -> (F,) the same when the top-f pixels are set to the mean.
        intact_confidence: mean probability of the predicted class on the intact images.
        cam_seconds_per_image: method -> wall seconds per image to compute its maps.
        num_images: N, the number of images averaged over.
        target_layer: the layer name(s) the maps were computed on.
        random_grid: (h, w) resolution of the random baseline maps.
        road_morf: method or "random" -> mean change of the predicted class's probability when
            the most relevant p% of pixels are imputed (ROAD MoRF), averaged over
            :data:`ROAD_PERCENTILES`; more negative is more faithful.
        road_lerf: the same for the least relevant p% (ROAD LeRF); closer to 0 is more faithful.
    """

    fractions: list[float]
    methods: list[str]
    keep: dict[str, list[float]]
    delete: dict[str, list[float]]
    intact_confidence: float
    cam_seconds_per_image: dict[str, float]
    num_images: int
    target_layer: list[str]
    random_grid: list[int]
    road_morf: dict[str, float] = field(default_factory=dict)
    road_lerf: dict[str, float] = field(default_factory=dict)

    def drop_at(self, name: str, fraction: float) -> float:
        """Mean drop in confidence (probability, 0..1) when only the top ``fraction`` is kept."""
        i = self._index(fraction)
        return self.intact_confidence - self.keep[name][i]

    def auc(self, name: str, curve: str) -> float:
        """Area under the ``curve`` ("keep" or "delete") of ``name`` over the fractions (trapezoid)."""
        ys = (self.keep if curve == "keep" else self.delete)[name]
        xs = self.fractions
        return float(sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)))

    def _index(self, fraction: float) -> int:
        for i, f in enumerate(self.fractions):
            if abs(f - fraction) < 1e-9:
                return i
        raise LrlabError(f"fraction {fraction:g} was not measured; measured: {', '.join(f'{f:g}' for f in self.fractions)}")

    def to_dict(self) -> dict:
        """JSON-ready dict (``save`` writes it; ``from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FaithfulnessResult:
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON to ``path`` atomically; return the Path."""
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FaithfulnessResult:
        """Read what :meth:`save` wrote (raises OSError / ValueError / TypeError when it is not one)."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _ranks(maps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, H, W) maps -> (N, H*W) int64 rank of each pixel, 0 = highest value.

    Ties (e.g. the zero region of a ReLU'd map) are broken at random, not by pixel position,
    so that equal pixels are not always taken from the top of the image first.
    """
    flat = maps.flatten(1)
    shuffle = torch.argsort(torch.rand(flat.shape, generator=generator), dim=1)
    # A stable sort of randomly shuffled pixels: equal values end up in random order.
    order = shuffle.gather(1, torch.sort(flat.gather(1, shuffle), dim=1, descending=True, stable=True).indices)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order).contiguous())
    return ranks


def keep_masks(maps: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 1, H, W) float32 masks with exactly ``round(fraction * H * W)`` ones per image: the
    pixels where ``maps`` (N, H, W) is highest (ties broken at random with ``generator``).

    Raises:
        ValueError: ``fraction`` outside [0, 1] or ``maps`` not (N, H, W).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got {tuple(maps.shape)}")
    n, h, w = maps.shape
    ranks = _ranks(maps.detach().cpu(), generator or torch.Generator().manual_seed(0))
    return (ranks < round(fraction * h * w)).float().view(n, 1, h, w)


def random_maps(n: int, size: tuple[int, int], grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(n, H, W) float32 random maps: uniform noise on a ``grid`` (h, w), upsampled bilinearly to
    ``size`` (H, W), i.e. random blobs as smooth as a CAM of a layer with that resolution."""
    noise = torch.rand(n, 1, *grid, generator=generator)
    return F.interpolate(noise, size=size, mode="bilinear", align_corners=False).squeeze(1)


def _layer_grid(model: nn.Module, layers: list[str], x: torch.Tensor) -> tuple[int, int]:
    """Spatial (h, w) of the finest of ``layers`` for input ``x`` (one forward pass, hooks removed)."""
    sizes: list[tuple[int, int]] = []
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
               for name in layers]
    try:
        with eval_mode(model), torch.inference_mode():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else tuple(x.shape[-2:])


def _batches(x: torch.Tensor, cls: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for s in range(0, len(x), batch_size):
        yield x[s:s + batch_size], cls[s:s + batch_size]


def _softmax(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(x).float(), dim=1)


def _predicted(model: nn.Module, x: torch.Tensor, compute: Compute, batch_size: int) -> torch.Tensor:
    """(N,) int64 predicted class (top-1) of each image of ``x`` (N, 3, H, W), on the CPU."""
    batches = _batches(x, torch.arange(len(x)), batch_size)  # (images, their indices): no labels needed
    return torch.cat([out.argmax(1).cpu() for out, _ in compute.forward_batches(model, batches)])


def _confidence(model: nn.Module, x: torch.Tensor, cls: torch.Tensor, compute: Compute,
                batch_size: int) -> torch.Tensor:
    """(N,) float32 probability of class ``cls`` for each image of ``x`` (N, 3, H, W), on the CPU."""
    outs = compute.forward_batches(model, _batches(x, cls, batch_size), _softmax)
    return torch.cat([p.gather(1, c.view(-1, 1)).squeeze(1).cpu() for p, c in outs])


def _curves(confidence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
            preds: torch.Tensor, maps_list: list[torch.Tensor], fractions: list[float],
            gen: torch.Generator) -> tuple[list[float], list[float]]:
    """Mean keep / delete confidence of the predicted class per fraction, averaged over the maps
    (each (N, H, W)) in ``maps_list``; ``confidence(images, classes)`` gives (N,) probabilities."""
    n, _, h, w = x.shape
    nf = len(fractions)
    ks = torch.tensor([round(f * h * w) for f in fractions]).view(-1, 1, 1, 1, 1)  # (F, 1, 1, 1, 1)
    keep, delete = torch.zeros(nf), torch.zeros(nf)
    cls = preds.repeat(nf)
    for mp in maps_list:
        ranks = _ranks(mp, gen).view(1, n, 1, h, w)
        kept = (ranks < ks).float()  # (F, N, 1, H, W): one masked copy of every image per fraction
        for sign, acc in ((kept, keep), (1.0 - kept, delete)):
            p = confidence((x.unsqueeze(0) * sign).flatten(0, 1), cls).view(nf, n)
            acc += p.mean(1) / len(maps_list)
    return keep.tolist(), delete.tolist()


def _road(model: nn.Module, x: torch.Tensor, preds: torch.Tensor, maps_list: list[torch.Tensor],
          gen: torch.Generator, device: torch.device, batch_size: int) -> tuple[float, float]:
    """Mean ROAD MoRF and LeRF change of the predicted class's probability (pytorch-grad-cam's
    ``ROAD*RelevantFirstAverage`` over :data:`ROAD_PERCENTILES`), averaged over images and over
    the maps (each (N, H, W)) in ``maps_list``; float32, imputation noise seeded from ``gen``."""
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    metrics = (ROADMostRelevantFirstAverage(list(ROAD_PERCENTILES)),
               ROADLeastRelevantFirstAverage(list(ROAD_PERCENTILES)))
    totals = [0.0, 0.0]
    n, _, h, w = x.shape
    with (eval_mode(model), torch.inference_mode(), torch.autocast(device.type, enabled=False),
          torch.random.fork_rng(devices=[])):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        for mp in maps_list:
            relevance = (1.0 - _ranks(mp, gen).float() / (h * w)).view(n, h, w).numpy()
            for s in range(0, n, batch_size):
                targets = [ClassifierOutputSoftmaxTarget(c) for c in preds[s:s + batch_size].tolist()]
                xb = x[s:s + batch_size].to(device)
                for i, metric in enumerate(metrics):
                    totals[i] += float(np.sum(metric(xb, relevance[s:s + batch_size], targets, model)))
    morf, lerf = (t / (n * len(maps_list)) for t in totals)
    return morf, lerf


def _timed_maps(model: nn.Module, x: torch.Tensor, preds: torch.Tensor, layers: list[str],
                method: str) -> tuple[torch.Tensor, float]:
    """``method``'s maps of ``x`` for the classes ``preds`` and the wall seconds per image they took.
    One image goes first, untimed, so that one-off warm-up costs do not count for the first method."""
    class_activation_maps(model, x[:1], preds[:1], target_layer=layers, method=method)
    start = time.perf_counter()
    maps = class_activation_maps(model, x, preds, target_layer=layers, method=method)
    return maps, (time.perf_counter() - start) / max(len(x), 1)


def _checked(methods: Sequence[str] | None, fractions: Sequence[float]) -> tuple[list[str], list[float]]:
    """The methods (None: every one in ``CAM_METHODS``) and the sorted fractions, checked."""
    methods = CAM_METHODS.names() if methods is None else list(methods)
    for m in methods:
        CAM_METHODS.get(m)
    fractions = sorted(float(f) for f in fractions)
    if not fractions or fractions[0] < 0 or fractions[-1] > 1:
        raise LrlabError(f"faithfulness fractions must lie in [0, 1], got {fractions}")
    return methods, fractions


def cam_faithfulness(
    model: nn.Module,
    images: torch.Tensor,
    compute: Compute,
    *,
    target_layer: str | Sequence[str],
    methods: Sequence[str] | None = None,
    fractions: Sequence[float] = FRACTIONS,
    batch_size: int = 500,
    random_repeats: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> FaithfulnessResult:
    """Keep and delete curves and ROAD scores of the predicted class's confidence for each CAM method.

    Args:
        model: a classifier returning (B, K) logits, on ``compute.device`` (eval mode during the
            call, restored after).
        images: (N, 3, H, W) float, normalised (so 0 is the dataset mean, the fill value).
        compute: device, autocast dtype and memory layout of the prediction and confidence
            forward passes (e.g. bfloat16, as the model is evaluated in training); the maps
            and the ROAD scores are computed in float32 on ``compute.device``.
        target_layer: layer name or list of names (see ``lrlab.interpret.layer_names``).
        methods: names in ``lrlab.interpret.CAM_METHODS``; None: all of them, in registration order.
        fractions: shares of pixels in [0, 1] at which to measure the curves.
        batch_size: images per confidence forward pass.
        random_repeats: random maps per image for the baseline (averaged).
        seed: seed of the random maps and of the tie-breaking.
        progress: called with the name of each method before it is measured.

    Returns:
        A :class:`FaithfulnessResult`. Wall times include only the map computation.

    Raises:
        LrlabError: unknown method or layer (lists the valid ones); a fraction outside [0, 1].
    """
    methods, fractions = _checked(methods, fractions)
    layers = target_layers(model, target_layer)
    x = torch.as_tensor(images).detach().float().cpu()
    n, _, h, w = x.shape
    confidence = functools.partial(_confidence, model, compute=compute, batch_size=batch_size)
    preds = _predicted(model, x, compute, batch_size)
    intact = confidence(x, preds)
    gen = torch.Generator().manual_seed(seed)
    curves: dict[str, tuple] = {}  # name -> (keep, delete, ROAD MoRF, ROAD LeRF)
    seconds: dict[str, float] = {}

    def score(name: str, maps_list: list[torch.Tensor]) -> None:
        curves[name] = (*_curves(confidence, x, preds, maps_list, fractions, gen),
                        *_road(model, x, preds, maps_list, gen, compute.device, batch_size))

    for method in methods:
        if progress is not None:
            progress(method)
        maps, seconds[method] = _timed_maps(model, x, preds, layers, method)
        score(method, [maps])
    grid = _layer_grid(model, layers, x[:1].to(compute.device))
    score(RANDOM, [random_maps(n, (h, w), grid, gen) for _ in range(max(1, random_repeats))])
    keep, delete, morf, lerf = ({name: c[i] for name, c in curves.items()} for i in range(4))
    return FaithfulnessResult(fractions=fractions, methods=methods, keep=keep, delete=delete,
                              intact_confidence=intact.mean().item(), cam_seconds_per_image=seconds,
                              num_images=n, target_layer=layers, random_grid=list(grid),
                              road_morf=morf, road_lerf=lerf)


def table_rows(result: FaithfulnessResult, at: Sequence[float] = TABLE_AT) -> list[list[str]]:
    """Header + one row per method + the random baseline, as strings (see :func:`format_table`)."""
    header = ["method"] + [f"drop, top {100 * f:g}% kept" for f in at] + [
        "keep AUC (higher better)", "deletion AUC (lower better)", "ROAD MoRF (lower better)",
        "ROAD LeRF (higher better)", "ms / image"]
    rows = [header]
    for name in [*result.methods, RANDOM]:
        label = f"random map ({result.random_grid[0]}x{result.random_grid[1]}, same area)" if name == RANDOM else name
        ms = result.cam_seconds_per_image.get(name)
        road = [result.road_morf.get(name), result.road_lerf.get(name)]
        rows.append([label] + [f"{100 * result.drop_at(name, f):.1f} pp" for f in at]
                    + [f"{result.auc(name, 'keep'):.3f}", f"{result.auc(name, 'delete'):.3f}"]
                    + ["-" if r is None else f"{100 * r:+.1f} pp" for r in road]
                    + ["-" if ms is None else f"{1000 * ms:.1f}"])
    return rows


def format_table(result: FaithfulnessResult, at: Sequence[float] = TABLE_AT) -> str:
    """A Markdown table: per method, the drop in the predicted class's mean probability (in
    percentage points) when only the top 10/25/50% of pixels are kept, the areas under the keep
    and delete curves, the ROAD MoRF and LeRF changes (percentage points), and the map time per
    image; the random baseline last."""
    rows = table_rows(result, at)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)
