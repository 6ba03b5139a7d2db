"""Every figure of a run, drawn with matplotlib's Agg backend and saved as PNG.

Each ``plot_*`` function writes its PNG atomically (savefig to a temporary name in the same
folder, then ``os.replace``), closes the figure and returns the Path. The grids are built by
``_mistakes_figure`` / ``_cam_figure``, which return the open Figure so it can be inspected.
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

from lrlab.io import atomic_path  # noqa: E402

__all__ = [
    "mistake_title",
    "plot_accuracy",
    "plot_cam_grid",
    "plot_confusion",
    "plot_loss",
    "plot_lr",
    "plot_mistakes",
    "plot_range_test",
]

DPI = 120
TITLE_SEP = " / "


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` atomically as ``path`` (format from its extension), close it, return the Path."""
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


# --------------------------------------------------------------------------- LR range test


def plot_range_test(
    lrs: Sequence[float],
    losses: Sequence[float],
    smoothed: Sequence[float],
    suggestion: float | None,
    path: str | os.PathLike,
    *,
    log_x: bool = True,
) -> Path:
    """The LR range test (Smith 2015, arXiv:1506.01186): training loss against learning rate.

    Args:
        lrs: (S,) learning rate (per step) at each step of the test.
        losses: (S,) raw training loss per step (drawn faint; NaN/inf are left out).
        smoothed: (S,) smoothed loss (drawn solid).
        suggestion: suggested learning rate, marked with a vertical line and
            "suggested lr = 3.2e-02"; None draws no marker.
        path: the PNG to write.
        log_x: logarithmic learning-rate axis.

    Returns:
        the Path written.
    """
    lrs_a, raw, smooth = _finite(lrs), _finite(losses), _finite(smoothed)
    if not (len(lrs_a) == len(raw) == len(smooth)):
        raise ValueError(f"lrs, losses and smoothed differ in length: {len(lrs_a)}, {len(raw)}, {len(smooth)}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs_a, raw, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(lrs_a, smooth, color="tab:blue", linewidth=2, label="smoothed loss")
    if log_x and np.nanmin(lrs_a, initial=np.inf) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("learning rate (per step)")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.grid(True, which="major", alpha=0.3)

    # The loss usually explodes at the end; keep the interesting part readable.
    ylim = _range_test_ylim(raw, smooth)
    if ylim is not None:
        ax.set_ylim(*ylim)

    if suggestion is not None and math.isfinite(suggestion):
        ax.axvline(suggestion, color="tab:red", linestyle="--", linewidth=1.2)
        ok = np.isfinite(lrs_a) & np.isfinite(smooth)
        y = float(np.interp(suggestion, lrs_a[ok], smooth[ok])) if ok.sum() >= 1 and _increasing(lrs_a[ok]) else None
        if y is not None:
            ax.plot([suggestion], [y], "o", color="tab:red", markersize=6, zorder=3)
        ax.annotate(
            f"suggested lr = {suggestion:.1e}",
            xy=(suggestion, 0.92),
            xycoords=("data", "axes fraction"),
            xytext=(6, 0),
            textcoords="offset points",
            color="tab:red",
            fontsize=10,
            ha="left",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
        )
    ax.legend(loc="lower left")
    return _save(fig, path)


def _increasing(a: np.ndarray) -> bool:
    return bool(np.all(np.diff(a) > 0))


def _range_test_ylim(raw: np.ndarray, smooth: np.ndarray) -> tuple[float, float] | None:
    both = np.concatenate([raw, smooth])
    if not np.isfinite(both).any():
        return None
    lo = float(np.nanmin(both))
    hi = float(np.nanmax(both))
    if np.isfinite(smooth).any():
        best = int(np.nanargmin(smooth))
        before = smooth[: best + 1]
        hi = min(hi, 1.5 * float(np.nanmax(before)) - 0.5 * float(np.nanmin(before)) + 1e-12)
        hi = max(hi, float(np.nanmax(before)))
    pad = 0.05 * max(hi - lo, 1e-6)
    return lo - pad, hi + pad


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


def plot_loss(history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Train and test loss against epoch.

    Args:
        history: one dict per epoch with keys epoch, train_loss, test_loss (missing or None
            values are skipped).
        path: the PNG to write.
    """
    epochs = _epochs(history)
    marker = "o" if len(epochs) <= 30 else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, color in (("train_loss", "train", "tab:blue"), ("test_loss", "test", "tab:orange")):
        y = _series(history, key)
        if np.isfinite(y).any():
            ax.plot(epochs, y, marker=marker, markersize=3, color=color, label=label)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss")
    ax.legend()
    return _save(fig, path)


def plot_accuracy(history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Train and test top-1 accuracy (%) against epoch on one set of axes; the best test epoch marked.

    Args:
        history: one dict per epoch with keys epoch, train_acc, test_acc (fractions in [0, 1]).
        path: the PNG to write.
    """
    epochs = _epochs(history)
    marker = "o" if len(epochs) <= 30 else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    train = 100.0 * _series(history, "train_acc")
    test = 100.0 * _series(history, "test_acc")
    if np.isfinite(train).any():
        ax.plot(epochs, train, marker=marker, markersize=3, color="tab:blue", label="train")
    if np.isfinite(test).any():
        ax.plot(epochs, test, marker=marker, markersize=3, color="tab:orange", label="test")
        best = int(np.nanargmax(test))
        ax.plot([epochs[best]], [test[best]], "*", color="tab:red", markersize=14, zorder=3,
                label=f"best test {test[best]:.2f}% (epoch {epochs[best]:g})")
        ax.annotate(
            f"{test[best]:.2f}% @ epoch {epochs[best]:g}",
            xy=(epochs[best], test[best]),
            xytext=(0, -18),
            textcoords="offset points",
            ha="center",
            color="tab:red",
            fontsize=9,
        )
    _epoch_axis(ax, epochs)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy")
    ax.legend(loc="lower right")
    return _save(fig, path)


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
    _epoch_axis(ax, epochs)
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate schedule")
    return _save(fig, path)


# --------------------------------------------------------------------------- image grids


def mistake_title(pred_name: str, prob: float, true_name: str) -> str:
    """The canonical label of a misclassified image: ``"pred: cat (0.71) / true: dog"``."""
    return f"pred: {pred_name} ({prob:.2f}){TITLE_SEP}true: {true_name}"


def _grid(n: int, ncols: int) -> tuple[Figure, list]:
    if n < 1:
        raise ValueError("an image grid needs at least one image")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.9 * ncols, 2.3 * nrows), squeeze=False,
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
    fig, axes = _grid(len(images), ncols)
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
    fig, axes = _grid(len(images), ncols)
    for ax, img, cam, title in zip(axes, images, maps, titles, strict=True):
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, interpolation="nearest",
                  cmap="gray" if img.shape[-1] == 1 else None)
        ax.imshow(cam, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
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
    return _save(_mistakes_figure(images_uint8, titles, ncols), path)


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
        maps: (N, H, W) float in [0, 1] (from ``lrlab.interpret.class_activation_maps``).
        titles: N labels.
        path: the PNG to write.
        alpha: opacity of the heatmap.
        cmap: matplotlib colormap of the heatmap.
        ncols: images per row.
    """
    return _save(_cam_figure(images_uint8, maps, titles, alpha=alpha, cmap=cmap, ncols=ncols), path)


def plot_confusion(matrix, classes: Sequence[str], path: str | os.PathLike) -> Path:
    """The (K, K) confusion matrix (row = true class, column = predicted), counts in the cells.

    Cell colour is the row-normalised fraction, so classes with fewer images stay readable.
    """
    m = np.asarray(matrix.cpu() if hasattr(matrix, "cpu") else matrix, dtype=np.int64)
    k = len(classes)
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix must be ({k}, {k}) for {k} classes, got {m.shape}")
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros(m.shape, dtype=np.float64), where=rows > 0)
    size = max(5.0, 0.6 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(k), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fontsize = 8 if k <= 12 else 6
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=fontsize,
                        color="white" if frac[i, j] > 0.5 else "black")
    total = m.sum()
    acc = np.trace(m) / total if total else float("nan")
    ax.set_title(f"Confusion matrix (top-1 accuracy {100 * acc:.2f}%)")
    return _save(fig, path)
