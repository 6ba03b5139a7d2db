"""Every figure of a run, drawn with matplotlib's Agg backend and saved as PNG.

Each ``plot_*`` function writes its PNG with :func:`save_figure`: atomically (savefig to a
temporary name in the same folder, then ``os.replace``), closing the figure, returning the Path.
The grids are built by ``_mistakes_figure`` / ``_cam_figure``, which return the open Figure so it
can be inspected. The LR range-test figure is ``lrlab.lr_finder``'s (``RangeTestResult.plot``);
the application saves it with :func:`save_figure`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lrlab.engine import STAGE  # noqa: E402
from lrlab.io import atomic_path  # noqa: E402

__all__ = [
    "EMPTY_MAP",
    "mistake_title",
    "plot_accuracy",
    "plot_cam_grid",
    "plot_cam_pairs",
    "plot_confusion",
    "plot_faithfulness",
    "plot_importances",
    "plot_loss",
    "plot_lr",
    "plot_mistakes",
    "plot_tune_history",
    "plot_tune_lr",
    "save_figure",
    "stage_boundaries",
]

DPI = 120
TITLE_SEP = " / "
EMPTY_MAP = "no positive evidence (map all zero)"
"""Drawn instead of a heatmap whose map is zero everywhere (the method's weighted sum was
negative at every position, so nothing survives the ReLU)."""


def _overlay(ax, cam: np.ndarray, *, cmap: str, alpha: float, interpolation: str) -> None:
    """Draw the map ``cam`` (H, W) in [0, 1] over the image in ``ax``; an all-zero map is not
    drawn (a colormap would paint it as a confident uniform map) but labelled :data:`EMPTY_MAP`
    across the image."""
    if cam.max() > 0:
        ax.imshow(cam, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation=interpolation)
        return
    ax.text(0.5, 0.5, EMPTY_MAP.replace(" (", "\n("), transform=ax.transAxes, ha="center", va="center",
            fontsize=6, color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 2})
    return False


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` as ``path`` (format from its extension, ``DPI`` dots per inch, tight bounding
    box) atomically, creating the folder; close ``fig`` (also on error) and return the Path."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format=(path.suffix or ".png").lstrip("."), bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """float64 array with non-finite entries (inf, None) replaced by NaN, which matplotlib skips."""
    a = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    a[~np.isfinite(a)] = np.nan
    return a


# --------------------------------------------------------------------------- training curves


def _series(history: Sequence[Mapping], key: str) -> np.ndarray:
    return _finite([row.get(key) for row in history])


def _epochs(history: Sequence[Mapping]) -> np.ndarray:
    if not history:
        raise ValueError("history is empty; there is nothing to plot")
    return np.array([row.get("epoch", i + 1) for i, row in enumerate(history)], dtype=np.float64)


def _epoch_axis(ax, epochs: np.ndarray) -> None:
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    if len(epochs) <= 20:
        ax.set_xticks(epochs)


def stage_boundaries(history: Sequence[Mapping]) -> list[float]:
    """Where a training stage ends (lrlab.transfer): the midpoint between the last epoch of a
    stage and the first of the next, one per change of the records' ``stage``; [] without stages."""
    return [(a["epoch"] + b["epoch"]) / 2 for a, b in zip(history, history[1:])
            if a.get(STAGE) is not None and b.get(STAGE) != a.get(STAGE)]


def mark_stages(ax, history: Sequence[Mapping]) -> None:
    """Draw each :func:`stage_boundaries` as a dashed vertical line labelled with the new stage."""
    for x in stage_boundaries(history):
        stage = next(r[STAGE] for r in history if r["epoch"] > x)
        ax.axvline(x, color="0.3", linestyle="--", linewidth=1, label=f"stage {stage} starts")


def plot_loss(history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Train and validation loss against epoch.

    Args:
        history: one dict per epoch with keys epoch, train_loss, val_loss (missing or None
            values are skipped).
        path: the PNG to write.
    """
    epochs = _epochs(history)
    marker = "o" if len(epochs) <= 30 else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, color in (("train_loss", "train", "tab:blue"), ("val_loss", "val", "tab:orange")):
        y = _series(history, key)
        if np.isfinite(y).any():
            ax.plot(epochs, y, marker=marker, markersize=3, color=color, label=label)
    mark_stages(ax, history)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss")
    ax.legend()
    return save_figure(fig, path)


def plot_accuracy(history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Train and validation top-1 accuracy (%) against epoch on one set of axes; the best
    validation epoch (that of checkpoints/best.pt) marked.

    Args:
        history: one dict per epoch with keys epoch, train_acc, val_acc (fractions in [0, 1]).
        path: the PNG to write.
    """
    epochs = _epochs(history)
    marker = "o" if len(epochs) <= 30 else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    train = 100.0 * _series(history, "train_acc")
    val = 100.0 * _series(history, "val_acc")
    if np.isfinite(train).any():
        ax.plot(epochs, train, marker=marker, markersize=3, color="tab:blue", label="train")
    if np.isfinite(val).any():
        ax.plot(epochs, val, marker=marker, markersize=3, color="tab:orange", label="val")
        best = int(np.nanargmax(val))
        ax.plot([epochs[best]], [val[best]], "*", color="tab:red", markersize=14, zorder=3,
                label=f"best val {val[best]:.2f}% (epoch {epochs[best]:g})")
        ax.annotate(
            f"{val[best]:.2f}% @ epoch {epochs[best]:g}",
            xy=(epochs[best], val[best]),
            xytext=(0, -18),
            textcoords="offset points",
            ha="center",
            color="tab:red",
            fontsize=9,
        )
    mark_stages(ax, history)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_lr(history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Learning rate against epoch, log y-axis (linear if any value is <= 0).

    Args:
        history: one dict per epoch with keys epoch and lr.
        path: the PNG to write.
    """
    epochs = _epochs(history)
    lr = _series(history, "lr")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(epochs, lr, marker="o" if len(epochs) <= 30 else None, markersize=3, color="tab:green")
    if np.isfinite(lr).any() and np.nanmin(lr) > 0:
        ax.set_yscale("log")
    mark_stages(ax, history)
    if stage_boundaries(history):
        ax.legend(fontsize=8)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate schedule")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- image grids


def mistake_title(pred_name: str, prob: float, true_name: str) -> str:
    """The canonical label of a misclassified image: ``"pred: cat (0.71) / true: dog"``."""
    return f"pred: {pred_name} ({prob:.2f}){TITLE_SEP}true: {true_name}"


def _scale(images: np.ndarray, cell_inches: float) -> float:
    """Factor to enlarge a figure's cells so that each image of ``images`` (N, H, W, C) is drawn
    with at least its own pixels (a 224 px photo is not shrunk; CIFAR's 32 px keep the defaults)."""
    return max(1.0, max(images.shape[1:3]) / (0.85 * cell_inches * DPI))


def _grid(n: int, ncols: int, scale: float = 1.0) -> tuple[Figure, list]:
    if n < 1:
        raise ValueError("an image grid needs at least one image")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.9 * scale * ncols, (1.9 * scale + 0.4) * nrows), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        fig.delaxes(ax)
    return fig, flat[:n]


def _check_images(images: np.ndarray, titles: Sequence[str]) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 3) uint8, got shape {images.shape}")
    if len(titles) != len(images):
        raise ValueError(f"got {len(images)} images but {len(titles)} titles")
    return images


def _style_cell(ax, title: str) -> None:
    ax.set_title(title.replace(TITLE_SEP, "\n"), fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _mistakes_figure(images: np.ndarray, titles: Sequence[str], ncols: int = 5) -> Figure:
    """Build (not save) the labelled image grid; one Axes per image, titled with its label."""
    images = _check_images(images, titles)
    fig, axes = _grid(len(images), ncols, _scale(images, 1.9))
    for ax, img, title in zip(axes, images, titles, strict=True):
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, interpolation="nearest",
                  cmap="gray" if img.shape[-1] == 1 else None)
        _style_cell(ax, title)
    return fig


def _cam_figure(
    images: np.ndarray,
    maps: np.ndarray,
    titles: Sequence[str],
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    ncols: int = 5,
) -> Figure:
    """Build (not save) the grid of images with their class activation maps overlaid."""
    images = _check_images(images, titles)
    maps = np.asarray(maps.detach().cpu() if hasattr(maps, "detach") else maps, dtype=np.float32)
    if maps.shape != images.shape[:3]:
        raise ValueError(f"maps must be (N, H, W) = {images.shape[:3]}, got {maps.shape}")
    fig, axes = _grid(len(images), ncols, _scale(images, 1.9))
    for ax, img, cam, title in zip(axes, images, maps, titles, strict=True):
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, interpolation="nearest",
                  cmap="gray" if img.shape[-1] == 1 else None)
        _overlay(ax, cam, cmap=cmap, alpha=alpha, interpolation="bilinear")
        _style_cell(ax, title)
    return fig


def plot_mistakes(
    images_uint8: np.ndarray, titles: Sequence[str], path: str | os.PathLike, ncols: int = 5
) -> Path:
    """A grid of images (5x5 for 25), each titled e.g. "pred: cat (0.71) / true: dog".

    Args:
        images_uint8: (N, H, W, 3) uint8, e.g. from ``lrlab.interpret.denormalize``.
        titles: N labels (see :func:`mistake_title`); " / " is drawn as a line break.
        path: the PNG to write.
        ncols: images per row.
    """
    return save_figure(_mistakes_figure(images_uint8, titles, ncols), path)


def plot_cam_grid(
    images_uint8: np.ndarray,
    maps: np.ndarray,
    titles: Sequence[str],
    path: str | os.PathLike,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    ncols: int = 5,
) -> Path:
    """The image grid of :func:`plot_mistakes` with class activation maps overlaid.

    Args:
        images_uint8: (N, H, W, 3) uint8.
        maps: (N, H, W) float in [0, 1] (from ``lrlab.interpret.class_activation_maps``); an
            all-zero map is labelled :data:`EMPTY_MAP` instead of drawn.
        titles: N labels.
        path: the PNG to write.
        alpha: opacity of the heatmap.
        cmap: matplotlib colormap of the heatmap.
        ncols: images per row.
    """
    return save_figure(_cam_figure(images_uint8, maps, titles, alpha=alpha, cmap=cmap, ncols=ncols), path)


def plot_confusion(matrix, classes: Sequence[str], path: str | os.PathLike) -> Path:
    """The (K, K) confusion matrix (row = true class, column = predicted class), twice side by side:
    counts (cell colour = count) and row-normalised (percent of each true class; the diagonal is
    the per-class accuracy). The title gives the top-1 accuracy.

    Args:
        matrix: (K, K) int counts (tensor or array), e.g. ``lrlab.interpret.confusion_matrix``.
        classes: K class names.
        path: the PNG to write.

    Raises:
        ValueError: the matrix is not (K, K) for K = len(classes).
    """
    fig = _confusion_figure(matrix, classes)
    return save_figure(fig, path)


def _confusion_figure(matrix, classes: Sequence[str]) -> Figure:
    """Build (not save) the two-panel confusion figure; axes[0] counts, axes[1] row-normalised."""
    m = np.asarray(matrix.cpu() if hasattr(matrix, "cpu") else matrix, dtype=np.int64)
    k = len(classes)
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix must be ({k}, {k}) for {k} classes, got {m.shape}")
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros(m.shape, dtype=np.float64), where=rows > 0)
    size = max(4.5, 0.5 * k + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size), layout="constrained")
    fontsize = 8 if k <= 12 else 6
    panels = ((axes[0], m.astype(np.float64), "counts", "Blues", lambda i, j: str(m[i, j])),
              (axes[1], 100.0 * frac, "% of true class", "Oranges", lambda i, j: f"{100 * frac[i, j]:.0f}"))
    for ax, values, label, cmap, text in panels:
        vmax = float(values.max()) if values.size and values.max() > 0 else 1.0
        im = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=label)
        ax.set_xticks(range(k), labels=classes, rotation=45, ha="right")
        ax.set_yticks(range(k), labels=classes)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"Confusion matrix ({label})", fontsize=10)
        if k <= 30:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, text(i, j), ha="center", va="center", fontsize=fontsize,
                            color="white" if values[i, j] > 0.6 * vmax else "black")
    total = m.sum()
    acc = np.trace(m) / total if total else float("nan")
    fig.suptitle(f"top-1 accuracy {100 * acc:.2f}% on {total:,} test images")
    return fig


# --------------------------------------------------------------------------- mistakes: CAM of predicted vs true class


def _cam_pairs_figure(
    images: np.ndarray,
    pred_maps: np.ndarray,
    true_maps: np.ndarray,
    pred_names: Sequence[str],
    probs: Sequence[float],
    true_names: Sequence[str],
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    ncols: int = 3,
) -> Figure:
    """Build (not save) the figure of :func:`plot_cam_pairs`: one subfigure per image, titled
    with :func:`mistake_title`, holding three Axes (image, predicted-class map, true-class map)."""
    titles = [mistake_title(p, q, t) for p, q, t in zip(pred_names, probs, true_names, strict=True)]
    images = _check_images(images, titles)
    maps = [np.asarray(m.detach().cpu() if hasattr(m, "detach") else m, dtype=np.float32)
            for m in (pred_maps, true_maps)]
    for m in maps:
        if m.shape != images.shape[:3]:
            raise ValueError(f"maps must be (N, H, W) = {images.shape[:3]}, got {m.shape}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    n = len(images)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    scale = _scale(images, 1.4)
    fig = plt.figure(figsize=(4.2 * scale * ncols, (1.4 * scale + 0.45) * nrows), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(nrows, ncols, squeeze=False)).reshape(-1)
    for i, sub in enumerate(subfigs):
        if i >= n:
            continue
        img = images[i].squeeze(-1) if images[i].shape[-1] == 1 else images[i]
        gray = "gray" if images[i].shape[-1] == 1 else None
        axes = sub.subplots(1, 3)
        captions = ("image", f"why it said {pred_names[i]}", f"where the {true_names[i]} was")
        for j, (ax, caption) in enumerate(zip(axes, captions, strict=True)):
            ax.imshow(img, interpolation="nearest", cmap=gray)
            if j:
                _overlay(ax, maps[j - 1][i], cmap=cmap, alpha=alpha, interpolation="nearest")
            ax.set_xlabel(caption, fontsize=7, labelpad=2)
            ax.set_xticks([])
            ax.set_yticks([])
        sub.suptitle(titles[i], fontsize=8)
    return fig


def plot_cam_pairs(
    images_uint8: np.ndarray,
    pred_maps: np.ndarray,
    true_maps: np.ndarray,
    pred_names: Sequence[str],
    probs: Sequence[float],
    true_names: Sequence[str],
    path: str | os.PathLike,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    ncols: int = 3,
) -> Path:
    """Each mistake as image | map of the predicted class | map of the true class.

    "Why it said cat / where the dog was": for every image, titled "pred: cat (0.71) / true:
    dog", the class activation map of the predicted class and the one of the true class are
    drawn side by side over the image, next to the plain image.

    Args:
        images_uint8: (N, H, W, 3) uint8.
        pred_maps, true_maps: (N, H, W) float in [0, 1], maps of the predicted and of the true
            class (from ``lrlab.interpret.class_activation_maps``); an all-zero map is labelled
            :data:`EMPTY_MAP` instead of drawn.
        pred_names, true_names: N class names; probs: N probabilities of the predicted class.
        path: the PNG to write.
        alpha: opacity of the heatmaps; cmap: their matplotlib colormap.
        ncols: images (triplets) per row.

    Raises:
        ValueError: mismatched lengths or shapes.
    """
    return save_figure(_cam_pairs_figure(images_uint8, pred_maps, true_maps, pred_names, probs, true_names,
                                   alpha=alpha, cmap=cmap, ncols=ncols), path)


# --------------------------------------------------------------------------- CAM faithfulness


def plot_faithfulness(
    fractions: Sequence[float],
    keep: Mapping[str, Sequence[float]],
    delete: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    intact: float | None = None,
    baseline: str = "random",
) -> Path:
    """Keep and delete curves of each CAM method (see ``lrlab.interpret.faithfulness``), two panels.

    Args:
        fractions: (F,) shares of pixels in [0, 1] (drawn in percent).
        keep: name -> (F,) mean probability of the predicted class when only the top pixels of
            the map are kept (higher is better).
        delete: name -> (F,) the same when the top pixels are removed (lower is better).
        path: the PNG to write.
        intact: mean probability on the intact images, drawn as a dotted line.
        baseline: the key of the random baseline, drawn dashed in black.
    """
    x = 100.0 * _finite(fractions)
    for name, ys in [*keep.items(), *delete.items()]:
        if len(ys) != len(x):
            raise ValueError(f"curve {name!r} has {len(ys)} points for {len(x)} fractions")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    panels = ((axes[0], keep, "only the top x% of the map kept (higher is better)"),
              (axes[1], delete, "the top x% of the map removed (lower is better)"))
    for ax, curves, title in panels:
        for name, ys in curves.items():
            y = _finite(ys)
            if name == baseline:
                ax.plot(x, y, "--", color="black", linewidth=1.5, label=f"{name} map (same area)")
            else:
                ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, label=name)
        if intact is not None and math.isfinite(intact):
            ax.axhline(intact, color="gray", linestyle=":", linewidth=1, label="intact image")
        ax.set_xlabel("pixels (% of the image, ranked by the map)")
        ax.set_ylabel("probability of the predicted class")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 100)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- plateaus, per-step lr, comparisons


_LINESTYLES = ("-", "--", "-.", ":")  # overlapping runs stay visible


def shade_plateaus(ax, epochs: np.ndarray, spans: Sequence[tuple[int, int]], *, label: bool = True) -> None:
    """Shade each plateau span (0-based inclusive indices into ``epochs``, from
    ``lrlab.plateau.find_plateaus``) on ``ax`` as a grey band from its first to its last epoch."""
    for k, (start, end) in enumerate(spans):
        ax.axvspan(epochs[start], epochs[end], color="0.5", alpha=0.18, linewidth=0,
                   label="plateau" if label and k == 0 else None)


def plot_plateaus(history: Sequence[Mapping], spans: Sequence[tuple[int, int]], path: str | os.PathLike) -> Path:
    """Loss (left) and top-1 accuracy (right) against epoch, train and validation, with the
    plateaus of the validation loss shaded.

    Args:
        history: one dict per epoch with keys epoch, train_loss, val_loss, train_acc, val_acc.
        spans: (start, end) 0-based inclusive epoch indices, e.g. from
            ``lrlab.plateau.find_plateaus`` on the validation losses.
        path: the PNG to write.
    """
    epochs = _epochs(history)
    marker = "o" if len(epochs) <= 30 else None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for ax, (key, ylabel, scale) in zip(axes, (("loss", "cross-entropy loss", 1.0), ("acc", "top-1 accuracy (%)", 100.0))):
        for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
            y = scale * _series(history, f"{split}_{key}")
            if np.isfinite(y).any():
                ax.plot(epochs, y, marker=marker, markersize=3, color=color, label=split)
        shade_plateaus(ax, epochs, spans)
        mark_stages(ax, history)
        _epoch_axis(ax, epochs)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"Plateaus of the validation loss ({len(spans)} found)" if spans
                 else "No plateau of the validation loss found")
    return save_figure(fig, path)


def plot_lr_steps(runs: Mapping[str, tuple[Sequence[float], Sequence[int] | None]], path: str | os.PathLike) -> Path:
    """The lr of every optimizer step against the step (log y-axis when all lrs are > 0), one
    line per run; below it the batch size against the step when any run's batch size changes.

    Args:
        runs: label -> (lrs, batch_sizes): lrs (S,) per-step learning rates; batch_sizes (S,)
            images per batch at each step, or None.
        path: the PNG to write.
    """
    if not runs:
        raise ValueError("no runs to plot")
    ramps = any(bs is not None and len(set(bs)) > 1 for _, bs in runs.values())
    fig, axes = plt.subplots(2 if ramps else 1, 1, figsize=(8, 6.5 if ramps else 4), sharex=True,
                             squeeze=False, layout="constrained")
    ax = axes[0, 0]
    positive = True
    for k, (label, (lrs, _)) in enumerate(runs.items()):
        y = _finite(lrs)
        positive &= bool(np.isfinite(y).any() and np.nanmin(y) > 0)
        ax.plot(np.arange(len(y)), y, linewidth=1.2, linestyle=_LINESTYLES[k % 4], label=label or None)
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel("learning rate (per step)")
    ax.set_title("Learning rate of every step")
    ax.grid(True, alpha=0.3)
    if len(runs) > 1 or any(runs):
        ax.legend(fontsize=8)
    if ramps:
        bax = axes[1, 0]
        for k, (label, (_, bs)) in enumerate(runs.items()):
            if bs is not None:
                bax.step(np.arange(len(bs)), bs, where="post", linewidth=1.2, linestyle=_LINESTYLES[k % 4],
                         label=label or None)
        bax.set_ylabel("batch size")
        bax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    return save_figure(fig, path)


def plot_compare(histories: Mapping[str, Sequence[Mapping]], key: str, path: str | os.PathLike) -> Path:
    """One metric of several runs against epoch on one set of axes (``lrlab compare``).

    Args:
        histories: label -> the run's History records (one dict per epoch).
        key: "val_acc" (drawn in %, each run's best marked with a star), "val_loss", or any
            other record key.
        path: the PNG to write.
    """
    if not histories:
        raise ValueError("no runs to plot")
    is_acc = key.endswith("_acc")
    fig, ax = plt.subplots(figsize=(8, 5))
    for k, (label, records) in enumerate(histories.items()):
        epochs = _epochs(records)
        y = (100.0 if is_acc else 1.0) * _series(records, key)
        line, = ax.plot(epochs, y, marker="o" if len(epochs) <= 30 else None, markersize=3,
                        linestyle=_LINESTYLES[k % 4], label=label)
        if is_acc and np.isfinite(y).any():
            best = int(np.nanargmax(y))
            ax.plot([epochs[best]], [y[best]], "*", color=line.get_color(), markersize=11, zorder=3)
    _epoch_axis(ax, _epochs(max(histories.values(), key=len)))
    names = {"val_acc": "validation top-1 accuracy (%)", "val_loss": "validation loss (cross-entropy)",
             "train_acc": "train top-1 accuracy (%)", "train_loss": "train loss (cross-entropy)"}
    ax.set_ylabel(names.get(key, key))
    ax.set_title(names.get(key, key).split(" (")[0].capitalize())
    ax.legend(fontsize=8, loc="lower right" if is_acc else "upper right")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------- lrlab tune

_STAGE_MARKERS = {1: ("o", "stage 1 (lr)"), 2: ("s", "stage 2 (other axes)")}


def _tune_points(rows: Sequence[Mapping], x_key: str):
    """(stage, x, accuracy in %, pruned) of every trial with an accuracy: the best validation
    accuracy of complete trials, the last reported one of pruned trials."""
    for r in rows:
        pruned = r["state"] == "pruned"
        acc = r["last_val_acc_reported"] if pruned else r["val_acc"]
        if acc is not None and r[x_key] is not None and r["stage"] in _STAGE_MARKERS:
            yield r["stage"], r[x_key], 100.0 * acc, pruned


def _scatter_tune(ax, rows: Sequence[Mapping], x_key: str) -> None:
    """The trials as points: marker by stage, hollow when pruned."""
    for stage, (marker, label) in _STAGE_MARKERS.items():
        for pruned in (False, True):
            pts = [(x, y) for s, x, y, p in _tune_points(rows, x_key) if s == stage and p == pruned]
            if pts:
                x, y = zip(*pts)
                ax.scatter(x, y, marker=marker, s=36, facecolors="none" if pruned else f"C{stage - 1}",
                           edgecolors=f"C{stage - 1}", label=f"{label}{', pruned' if pruned else ''}", zorder=3)


def plot_tune_history(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Optimisation history of an ``lrlab tune`` study: each trial's validation accuracy (%)
    against its number (``lrlab.tune.summary.trial_rows``: pruned trials hollow, at their last
    reported epoch), the best so far as a step line, stage 2's start as a dotted line."""
    fig, ax = plt.subplots(figsize=(8, 5))
    _scatter_tune(ax, rows, "trial")
    done = sorted((r["trial"], 100.0 * r["val_acc"]) for r in rows if r["val_acc"] is not None)
    if done:
        x, y = zip(*done)
        ax.step(x, np.maximum.accumulate(y), where="post", color="0.3", linewidth=1.2, label="best so far")
    stage2 = [r["trial"] for r in rows if r["stage"] == 2]
    if stage2:
        ax.axvline(min(stage2) - 0.5, color="0.5", linestyle=":", linewidth=1)
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("best validation top-1 accuracy (%)")
    ax.set_title("Optimisation history")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_tune_lr(rows: Sequence[Mapping], path: str | os.PathLike,
                 lr_range: tuple[float, float] | None = None) -> Path:
    """Validation accuracy (%) against the trial's lr (log axis) of an ``lrlab tune`` study:
    stage 1's search of the lr within ``lr_range`` (shaded), stage 2's trials at the lr it chose
    (a dashed line)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    if lr_range is not None:
        ax.axvspan(*lr_range, color="0.92", zorder=0, label="stage 1's lr range")
    chosen = {r["lr"] for r in rows if r["stage"] == 2 and r["lr"] is not None}
    for lr in chosen:
        ax.axvline(lr, color="C1", linestyle="--", linewidth=1, label="lr of stage 2")
    _scatter_tune(ax, rows, "lr")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: no crowded labels
    ax.set_xlabel("learning rate (peak or initial, as the schedule reads it)")
    ax.set_ylabel("best validation top-1 accuracy (%)")
    ax.set_title("Learning rate against validation accuracy")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_importances(importances: Mapping[str, float], path: str | os.PathLike) -> Path:
    """Horizontal bars of hyper-parameter importances (name -> share, summing to 1), the most
    important on top."""
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 1 + 0.45 * len(items)))
    ax.barh([k for k, _ in items], [v for _, v in items], color="C0")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("importance (share of the variation in validation accuracy)")
    ax.set_title("Hyper-parameter importance (stage 2)")
    ax.set_xlim(0, max(1.0, max(v for _, v in items) * 1.15))
    return save_figure(fig, path)
