"""lrlab.plots: every figure is a readable PNG written atomically; grids are labelled right."""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lrlab import plots
from lrlab.compute import Compute
from lrlab.interpret import class_activation_maps, confusion_matrix, denormalize, predict, select_misclassified

from conftest import CLASSES, MEAN, STD, load_images

TITLE = re.compile(r"^pred: (\w+) \((\d\.\d\d)\) / true: (\w+)$")


@pytest.fixture(scope="module")
def mistakes(cifar_dir):
    """25 truly misclassified test images of a small CNN trained one epoch on 600 real images."""
    torch.manual_seed(0)
    xtr, ytr, _ = load_images(cifar_dir, "train", 60)
    xte, yte, _ = load_images(cifar_dir, "test", 20)
    model = nn.Sequential(OrderedDict(
        c1=nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        c2=nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        c3=nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)),
    ))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    perm = torch.randperm(len(xtr))
    for i in range(0, len(xtr), 32):
        idx = perm[i : i + 32]
        opt.zero_grad()
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    pred = predict(model, [(xte[i : i + 100], yte[i : i + 100]) for i in range(0, len(xte), 100)], Compute())
    idx = select_misclassified(pred, k=25)
    assert len(idx) == 25
    titles = [
        plots.mistake_title(CLASSES[pred.preds[i]], pred.probs[i, pred.preds[i]].item(), CLASSES[pred.targets[i]])
        for i in idx.tolist()
    ]
    maps = class_activation_maps(model, xte[idx], pred.preds[idx], target_layer="c3")
    return {
        "pred": pred,
        "idx": idx,
        "images": denormalize(xte[idx], MEAN, STD),
        "titles": titles,
        "maps": maps,
    }


def history(epochs: int = 12):
    rows = []
    for e in range(1, epochs + 1):
        rows.append({
            "epoch": e,
            "train_loss": 2.0 * math.exp(-e / 4) + 0.1,
            "val_loss": 2.0 * math.exp(-e / 5) + 0.4 + (0.02 * e if e > 9 else 0),
            "train_acc": 1 - 0.8 * math.exp(-e / 4),
            "val_acc": 0.85 - 0.7 * math.exp(-e / 4) - (0.01 * (e - 9) if e > 9 else 0),
            "lr": 0.1 * (0.1 ** (e // 5)),
            "seconds": 3.0,
        })
    return rows


def assert_png(path, min_w=300, min_h=200):
    assert path.suffix == ".png" and path.stat().st_size > 5000
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert w >= min_w and h >= min_h and w < 5000 and h < 5000
    # atomic write: nothing but the final file in the folder
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    return w, h


def test_mistake_title():
    assert plots.mistake_title("cat", 0.7149, "dog") == "pred: cat (0.71) / true: dog"
    assert plots.mistake_title("ship", 1.0, "airplane") == "pred: ship (1.00) / true: airplane"


def test_mistakes_grid_titles_are_real_mistakes(mistakes):
    pred, idx = mistakes["pred"], mistakes["idx"]
    fig = plots._mistakes_figure(mistakes["images"], mistakes["titles"], ncols=5)
    try:
        axes = fig.axes
        assert len(axes) == 25
        for ax, i in zip(axes, idx.tolist(), strict=True):
            title = ax.get_title().replace("\n", " / ")
            m = TITLE.match(title)
            assert m, title
            p, prob, t = m.groups()
            assert p != t  # truly misclassified
            assert p == CLASSES[pred.preds[i]] and t == CLASSES[pred.targets[i]]
            assert float(prob) == pytest.approx(pred.probs[i].max().item(), abs=0.006)
            assert not ax.get_xticks().size and not ax.get_yticks().size
            assert len(ax.get_images()) == 1
        # rows of 5
        rows = sorted({round(ax.get_position().y0, 3) for ax in axes})
        assert len(rows) == 5
    finally:
        plots.plt.close(fig)


def test_plot_mistakes_and_cam_grid_write_pngs(mistakes, tmp_path):
    p = plots.plot_mistakes(mistakes["images"], mistakes["titles"], tmp_path / "a" / "misclassified.png")
    w, h = assert_png(p, 500, 500)
    assert 0.6 < w / h < 1.5
    p = plots.plot_cam_grid(mistakes["images"], mistakes["maps"], mistakes["titles"], tmp_path / "b" / "gradcam.png")
    assert_png(p, 500, 500)
    fig = plots._cam_figure(mistakes["images"], mistakes["maps"].numpy(), mistakes["titles"], alpha=0.4)
    try:
        assert len(fig.axes) == 25
        assert all(len(ax.get_images()) == 2 and ax.get_images()[1].get_alpha() == 0.4 for ax in fig.axes)
    finally:
        plots.plt.close(fig)
    # a partial last row has no empty axes
    fig = plots._mistakes_figure(mistakes["images"][:7], mistakes["titles"][:7], ncols=5)
    assert len(fig.axes) == 7
    plots.plt.close(fig)
    assert not plots.plt.get_fignums()  # every figure closed


def range_test_curve() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lrs (120,) 1e-6 .. 10, a smooth sigmoid descent that explodes after lr 0.2, and a noisy copy."""
    lrs = np.logspace(-6, 1, 120)
    x = np.log10(lrs)
    smooth = 2.3 - 1.2 / (1 + np.exp(-(x + 3) * 2)) + np.where(x > -0.7, (x + 0.7) ** 2 * 8, 0)
    raw = smooth + np.random.default_rng(0).normal(0, 0.08, len(lrs))
    return lrs, raw, smooth


def band_of(ax, patch) -> np.ndarray:
    """[low, high] learning rates covered by an ``axvspan`` patch (its x in data coordinates)."""
    x = patch.get_patch_transform().transform(patch.get_path().vertices)[:, 0]
    return np.array([x.min(), x.max()])


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_range_test_figure(tmp_path):
    from matplotlib.colors import to_rgba

    from lrlab.lr_finder.plot import range_test_figure

    lrs, raw, smooth = range_test_curve()
    raw[-1] = np.inf
    raw[-2] = np.nan
    fig = range_test_figure(lrs, raw, smooth, {"steepest": (1e-3, 3e-4, 3e-3), "max_lr": (3.2e-2, 1e-3, 1e-1)},
                            chosen="max_lr")
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_ylabel(), ax.get_title()) == ("log", "training loss", "LR range test")
    assert legend_texts(ax) == ["loss", "smoothed loss", "steepest: 1.0e-03", "max_lr: 3.2e-02 (used)"]
    markers = {line.get_label().split(":")[0]: line for line in ax.get_lines() if line.get_marker() == "o"}
    for name, lr in (("steepest", 1e-3), ("max_lr", 3.2e-2)):
        assert markers[name].get_xdata()[0] == lr
        assert markers[name].get_ydata()[0] == pytest.approx(np.interp(lr, lrs, smooth))  # on the solid curve
    assert markers["max_lr"].get_markersize() > markers["steepest"].get_markersize()
    assert len(ax.patches) == 1  # only the chosen method's band is shaded
    assert np.allclose(np.log10(band_of(ax, ax.patches[0])), [-3, -1], atol=1e-6)
    assert ax.patches[0].get_facecolor() == pytest.approx(to_rgba("tab:brown", 0.12))
    lo, hi = ax.get_ylim()
    assert lo < np.nanmin(raw[np.isfinite(raw)]) and 2.3 < hi < 4  # the explosion to ~24 is cut off
    assert_png(plots.save_figure(fig, tmp_path / "r" / "lr_finder.png"))

    # plain lists, no suggestion: two curves, no band, no marker
    fig = range_test_figure(lrs.tolist(), raw.tolist(), smooth.tolist())
    assert legend_texts(fig.axes[0]) == ["loss", "smoothed loss"] and not fig.axes[0].patches
    assert_png(plots.save_figure(fig, tmp_path / "s" / "lr.png"))
    with pytest.raises(ValueError, match="differ in length"):
        range_test_figure(lrs, raw[:-1], smooth)
    assert not plots.plt.get_fignums()


def test_range_test_result_plot(tmp_path):
    from lrlab.lr_finder import RANGE_TEST_COLORS, RangeTestResult, centered_smooth, suggest_all
    from matplotlib.colors import to_rgba

    lrs, raw, _ = range_test_curve()
    found, errors = suggest_all(lrs, centered_smooth(raw), 10, 5)
    assert "valley" in found and len(found) >= 3
    ema = list(np.cumsum(raw) / np.arange(1, len(raw) + 1))  # stands in for the EMA; must not be drawn
    result = RangeTestResult(lrs=lrs.tolist(), losses=raw.tolist(), smoothed=ema, mode="exp", start_lr=1e-6,
                             end_lr=10.0, num_iter=120, stop_reason="completed", suggestions=found,
                             suggestion_errors=errors, method="valley", loss="val")
    fig = result.plot()
    ax = fig.axes[0]
    assert ax.get_ylabel() == "validation loss" and ax.get_xscale() == "log"
    assert legend_texts(ax) == ["loss", "smoothed loss"] + [
        f"{name}: {s.lr:.1e}" + (" (used)" if name == "valley" else "") for name, s in found.items()]
    raw_line, solid = ax.get_lines()[:2]
    assert np.array_equal(raw_line.get_ydata(), raw) and np.array_equal(solid.get_ydata(), result.centered)
    assert len(ax.patches) == 1  # the chosen method's band
    assert ax.patches[0].get_facecolor() == pytest.approx(to_rgba(RANGE_TEST_COLORS["valley"], 0.12))
    assert np.allclose(band_of(ax, ax.patches[0]), [found["valley"].low, found["valley"].high], rtol=1e-6)
    assert_png(plots.save_figure(fig, tmp_path / "r" / "lr_finder.png"))

    # training loss, bands of every method, drawn into a given Axes
    result.loss = "train"
    fig, ax = plots.plt.subplots()
    assert result.plot(ax=ax, methods=list(found)) is fig
    assert ax.get_ylabel() == "training loss" and len(ax.patches) == len(found)
    plots.plt.close(fig)
    assert not plots.plt.get_fignums()


def test_plot_history_curves(tmp_path):
    h = history()
    for fn, name in ((plots.plot_loss, "loss"), (plots.plot_accuracy, "accuracy"), (plots.plot_lr, "lr")):
        p = fn(h, tmp_path / name / f"{name}.png")
        assert p == tmp_path / name / f"{name}.png"
        assert_png(p)
    # one epoch and missing test values still plot
    assert_png(plots.plot_accuracy([{"epoch": 1, "train_acc": 0.3, "val_acc": None}], tmp_path / "one" / "a.png"))
    assert not plots.plt.get_fignums()


def test_plot_confusion(mistakes, tmp_path):
    m = confusion_matrix(mistakes["pred"])
    assert_png(plots.plot_confusion(m, CLASSES, tmp_path / "c" / "confusion.png"), 400, 400)
    fig = plots._confusion_figure(m, CLASSES)
    try:
        counts, norm = [ax for ax in fig.axes if ax.get_title().startswith("Confusion")]
        assert "counts" in counts.get_title() and "%" in norm.get_title()
        cells = [t.get_text() for t in counts.texts]
        assert cells == [str(v) for v in m.flatten().tolist()]
        frac = 100 * m / m.sum(1, keepdim=True)
        assert [t.get_text() for t in norm.texts] == [f"{v:.0f}" for v in frac.flatten().tolist()]
        acc = 100 * m.trace().item() / m.sum().item()
        assert f"{acc:.2f}%" in fig._suptitle.get_text()
    finally:
        plots.plt.close(fig)
    with pytest.raises(ValueError, match="10, 10"):
        plots.plot_confusion(m, CLASSES[:5] * 2 + ["x"], tmp_path / "c2" / "x.png")


def test_overwrite_keeps_single_file(tmp_path):
    h = history(3)
    p1 = plots.plot_loss(h, tmp_path / "loss.png")
    p2 = plots.plot_loss(history(5), tmp_path / "loss.png")
    assert p1 == p2 and [q.name for q in tmp_path.iterdir()] == ["loss.png"]


def test_cam_pairs_figure_shows_image_and_both_maps(mistakes, tmp_path):
    pred, idx = mistakes["pred"], mistakes["idx"]
    n = 7
    pred_names = [CLASSES[pred.preds[i]] for i in idx[:n].tolist()]
    true_names = [CLASSES[pred.targets[i]] for i in idx[:n].tolist()]
    probs = [pred.probs[i].max().item() for i in idx[:n].tolist()]
    maps = mistakes["maps"][:n].numpy()
    fig = plots._cam_pairs_figure(mistakes["images"][:n], maps, 1 - maps, pred_names, probs, true_names,
                                  alpha=0.4, cmap="viridis", ncols=3)
    try:
        subs = [s for s in fig.subfigs if s.axes]
        assert len(subs) == n and len(fig.subfigs) == 9  # 3 rows of 3, the last two empty
        for sub, p, q, t in zip(subs, pred_names, probs, true_names, strict=True):
            assert TITLE.match(sub._suptitle.get_text()).groups() == (p, f"{q:.2f}", t)
            image, why, where = sub.axes
            assert [ax.get_xlabel() for ax in sub.axes] == ["image", f"why it said {p}", f"where the {t} was"]
            assert len(image.get_images()) == 1 and len(why.get_images()) == len(where.get_images()) == 2
            overlay_pred, overlay_true = why.get_images()[1], where.get_images()[1]
            assert overlay_pred.get_alpha() == 0.4 and overlay_pred.get_cmap().name == "viridis"
            assert np.abs(overlay_pred.get_array() - overlay_true.get_array()).mean() > 0.05
    finally:
        plots.plt.close(fig)
    path = plots.plot_cam_pairs(mistakes["images"], mistakes["maps"], mistakes["maps"].flip(2),
                                [CLASSES[pred.preds[i]] for i in idx.tolist()], [0.5] * 25,
                                [CLASSES[pred.targets[i]] for i in idx.tolist()], tmp_path / "p" / "pairs.png")
    assert_png(path, 800, 800)
    with pytest.raises(ValueError, match="maps must be"):
        plots.plot_cam_pairs(mistakes["images"][:2], maps[:3], maps[:2], ["a"] * 2, [0.1] * 2, ["b"] * 2,
                             tmp_path / "x.png")
    assert not plots.plt.get_fignums()


def test_plot_faithfulness(tmp_path):
    fr = [0.0, 0.1, 0.25, 0.5, 1.0]
    keep = {"gradcam": [0.1, 0.4, 0.6, 0.7, 0.8], "scorecam": [0.1, 0.5, 0.65, 0.75, 0.8],
            "random": [0.1, 0.2, 0.3, 0.5, 0.8]}
    delete = {k: v[::-1] for k, v in keep.items()}
    assert_png(plots.plot_faithfulness(fr, keep, delete, tmp_path / "f" / "faithfulness.png", intact=0.8))
    with pytest.raises(ValueError, match="3 points for 5 fractions"):
        plots.plot_faithfulness(fr, {"gradcam": [0.1, 0.2, 0.3]}, delete, tmp_path / "g.png")
    assert not plots.plt.get_fignums()


def test_photo_mistakes_are_drawn_at_their_own_resolution(tmp_path):
    """224 px images are not shrunk: every cell of the grids is at least 224 pixels wide."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    maps = rng.random((4, 224, 224)).astype(np.float32)
    titles = [plots.mistake_title("cat", 0.6, "dog")] * 4
    grid = Image.open(plots.plot_cam_grid(images, maps, titles, tmp_path / "g.png", ncols=2))
    assert grid.width >= 2 * 224 and grid.height >= 2 * 224
    pairs = Image.open(plots.plot_cam_pairs(images, maps, maps, ["cat"] * 4, [0.6] * 4, ["dog"] * 4,
                                            tmp_path / "p.png", ncols=2))
    assert pairs.width >= 2 * 3 * 224 and pairs.height >= 2 * 224
    small = Image.open(plots.plot_mistakes(images[:, :32, :32], titles, tmp_path / "s.png", ncols=2))
    assert small.width < grid.width  # CIFAR-sized images keep the compact default cells
