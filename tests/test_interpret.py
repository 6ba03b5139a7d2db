"""lrlab.interpret on real CIFAR-10 images and a small CNN trained for a moment on them."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrlab import plots
from lrlab.compute import Compute
from lrlab.errors import LrlabError
from lrlab.interpret import (
    CAM_METHODS,
    FRACTIONS,
    SELECT_BY,
    FaithfulnessResult,
    Predictions,
    cam_faithfulness,
    class_activation_maps,
    confusion_matrix,
    denormalize,
    format_table,
    keep_masks,
    layer_names,
    per_class_summary,
    predict,
    select_misclassified,
)
from lrlab.tta import TTA

from conftest import CLASSES, MEAN, STD, load_images

CPU = Compute(torch.device("cpu"))
VALID_CAM_METHODS = "valid CAM methods: gradcam, gradcampp, xgradcam, layercam, scorecam"


def small_cnn() -> nn.Sequential:
    """32x32 -> 16x16 -> 8x8 ("block2" has 8x8 maps) -> logits."""

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        OrderedDict(
            stem=block(3, 16),
            pool1=nn.MaxPool2d(2),
            block1=block(16, 32),
            pool2=nn.MaxPool2d(2),
            block2=block(32, 64),
            gap=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(64, 10),
        )
    )


def batches(x, y, size):
    for i in range(0, len(x), size):
        yield x[i : i + size], y[i : i + size]


@pytest.fixture(scope="module")
def data(cifar_dir):
    torch.manual_seed(0)
    xtr, ytr, _ = load_images(cifar_dir, "train", 100)  # 1000 images
    xte, yte, u8 = load_images(cifar_dir, "test", 30)  # 300 images
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    model.train()
    for _ in range(2):
        perm = torch.randperm(len(xtr))
        for xb, yb in batches(xtr[perm], ytr[perm], 50):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    pred = predict(model, batches(xte, yte, 128), CPU)
    return {"model": model, "x": xte, "y": yte, "u8": u8, "pred": pred}


def count_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


# --------------------------------------------------------------------------- predictions


def test_predictions_match_manual_computation(data):
    model, x, y, pred = data["model"], data["x"], data["y"], data["pred"]
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert pred.probs.shape == (300, 10) and pred.probs.dtype == torch.float32
    assert pred.targets.dtype == torch.int64 and torch.equal(pred.targets, y)
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(300))
    assert torch.equal(pred.preds, logits.argmax(1))
    assert pred.accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
    # learnt something in 2 epochs on 1000 images, but far from perfect: mistakes to study
    assert 0.2 < pred.accuracy < 0.9
    assert pred.losses.dtype == torch.float32
    torch.testing.assert_close(pred.losses, F.cross_entropy(logits, y, reduction="none"), atol=1e-4, rtol=1e-4)
    assert torch.equal(pred.correct, logits.argmax(1) == y)


def test_predict_restores_mode_and_runs_under_autocast(data):
    model, x, y = data["model"], data["x"][:64], data["y"][:64]
    model.train()
    model.block1.eval()  # a mixed state must come back exactly
    pred = predict(model, batches(x, y, 32), Compute(torch.device("cpu"), torch.bfloat16, channels_last=True))
    assert model.training and not model.block1.training and model.block2.training
    assert pred.probs.dtype == torch.float32 and torch.isfinite(pred.probs).all()
    # bf16 predictions agree with float32 on nearly every image
    agree = (pred.preds == data["pred"].preds[:64]).float().mean().item()
    assert agree > 0.8
    model.eval()


def test_predictions_save_load_round_trip(data, tmp_path):
    pred = data["pred"]
    path = pred.save(tmp_path / "sub" / "predictions.pt")
    assert [p.name for p in path.parent.iterdir()] == ["predictions.pt"]  # no temporary left over
    back = Predictions.load(path)
    assert torch.equal(back.probs, pred.probs) and torch.equal(back.targets, pred.targets)
    assert back.accuracy == pred.accuracy
    with pytest.raises(LrlabError, match="does not exist"):
        Predictions.load(tmp_path / "missing.pt")


def test_confusion_matrix(data):
    pred = data["pred"]
    m = confusion_matrix(pred)
    assert m.shape == (10, 10) and m.sum() == 300
    assert torch.equal(m.sum(1), torch.full((10,), 30))
    assert m.trace().item() == pred.correct.sum().item()


def test_per_class_summary(data):
    pred = data["pred"]
    summary = per_class_summary(pred, CLASSES, top_pairs=5)
    m = torch.tensor(summary["confusion"])
    assert m.sum() == len(pred) == summary["num_images"] == 300
    assert m.trace().item() / m.sum().item() == pytest.approx(pred.accuracy) == pytest.approx(summary["accuracy"])
    assert torch.equal(m, confusion_matrix(pred))
    norm = torch.tensor(summary["confusion_normalized"], dtype=torch.float64)
    torch.testing.assert_close(norm.sum(1), torch.ones(10, dtype=torch.float64), atol=1e-5, rtol=0)
    for i, c in enumerate(summary["per_class"]):
        mine = pred.targets == i
        assert c["class"] == CLASSES[i] and c["images"] == 30 == mine.sum().item()
        assert c["accuracy"] == pytest.approx(pred.correct[mine].float().mean().item())
        assert c["predicted"] == (pred.preds == i).sum().item()
    pairs = summary["most_confused"]
    assert len(pairs) == 5 and [p["count"] for p in pairs] == sorted((p["count"] for p in pairs), reverse=True)
    off = m.clone().fill_diagonal_(0)
    assert pairs[0]["count"] == off.max().item()
    for p in pairs:
        t, q = CLASSES.index(p["true"]), CLASSES.index(p["pred"])
        assert t != q and m[t, q] == p["count"] and p["fraction"] == pytest.approx(p["count"] / 30, abs=1e-6)
    json.dumps(summary)  # JSON-ready
    with pytest.raises(LrlabError, match="3 class names for 10 classes"):
        per_class_summary(pred, CLASSES[:3])


def test_predict_with_flip_tta(data):
    model, x, y = data["model"], data["x"][:40], data["y"][:40]
    pred = predict(model, batches(x, y, 16), CPU, tta=TTA())
    model.eval()
    with torch.no_grad():
        expected = (model(x).softmax(1) + model(torch.flip(x, dims=[3])).softmax(1)) / 2
    torch.testing.assert_close(pred.probs, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- misclassified


def test_select_misclassified_by_loss(data):
    pred = data["pred"]
    idx = select_misclassified(pred, k=25)
    assert idx.dtype == torch.int64 and len(idx) == 25
    assert not pred.correct[idx].any()
    wrong = torch.nonzero(~pred.correct).flatten()
    expected = torch.sort(pred.losses[wrong], descending=True).values[:25]
    torch.testing.assert_close(pred.losses[idx], expected, rtol=0, atol=0)
    assert torch.all(pred.losses[idx][:-1] >= pred.losses[idx][1:])
    # every wrong image not chosen has a loss no higher than the last chosen one
    rest = wrong[~torch.isin(wrong, idx)]
    assert (pred.losses[rest] <= pred.losses[idx[-1]]).all()


def test_select_misclassified_other_orders_and_few_wrong(data):
    pred = data["pred"]
    by_conf = select_misclassified(pred, k=10, by="confidence")
    assert not pred.correct[by_conf].any()
    conf = pred.probs.max(1).values[by_conf]
    assert torch.all(conf[:-1] >= conf[1:])
    first = select_misclassified(pred, k=10, by="first")
    assert torch.equal(first, torch.nonzero(~pred.correct).flatten()[:10])
    # fewer wrong than k -> all of them
    probs = torch.eye(4)[[0, 1, 2, 3, 0]] * 0.9 + 0.025
    few = Predictions(probs=probs, targets=torch.tensor([0, 1, 3, 3, 1]))
    got = select_misclassified(few, k=25)
    assert sorted(got.tolist()) == [2, 4]
    valid_orders = "valid mistake orders: loss, confidence, first"
    with pytest.raises(LrlabError, match=f"unknown explain.select 'random'; {valid_orders}$"):
        select_misclassified(pred, by="random")
    assert SELECT_BY.names() == ["loss", "confidence", "first"]


# --------------------------------------------------------------------------- CAM


def test_layer_names(data):
    names = layer_names(data["model"])
    assert "block2" in names and "block2.0" in names and "fc" in names and "" not in names


def test_cam_maps_shape_range_and_class_dependence(data):
    model, x, pred = data["model"], data["x"][:16], data["pred"]
    cls_a = pred.preds[:16]
    cls_b = (cls_a + 5) % 10
    maps_a = class_activation_maps(model, x, cls_a, target_layer="block2", batch_size=6)
    maps_b = class_activation_maps(model, x, cls_b, target_layer="block2")
    for maps in (maps_a, maps_b):
        assert maps.shape == (16, 32, 32) and maps.dtype == torch.float32
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    # each non-constant map spans [0, 1]
    spans = maps_a.amax((1, 2)) - maps_a.amin((1, 2))
    assert ((spans == 0) | ((maps_a.amax((1, 2)) == 1) & (maps_a.amin((1, 2)) == 0))).all()
    assert (spans > 0).sum() >= 12
    # different classes give different maps
    assert (maps_a - maps_b).abs().mean() > 0.05
    # batching does not change the result
    torch.testing.assert_close(maps_a, class_activation_maps(model, x, cls_a, target_layer="block2"))


def hooked(model, layer: str, x, cls):
    """Activations A (N, C, h, w) of ``layer`` and the gradients dY_c/dA of the class scores."""
    model.eval()
    store = {}
    handle = getattr(model, layer).register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        scores = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(scores.gather(1, cls.view(-1, 1)).sum(), store["a"])
    return store["a"].detach(), grad


def finish(raw, size=(32, 32)):
    """ReLU, bilinear upsampling to the image, min-max normalisation (all-zero stays zero)."""
    cam = F.interpolate(F.relu(raw).unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    lo, hi = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    return torch.where(hi > lo, (cam - lo) / (hi - lo), torch.zeros_like(cam))


def channel_sum(w, a):
    return (w[:, :, None, None] * a).sum(1)


def grad_cam(a, g):  # Selvaraju et al. 2017, eq. 1-2
    return channel_sum(g.mean((2, 3)), a)


def grad_cam_pp(a, g):  # Chattopadhyay et al. 2018: alpha by eq. 19, w_k = sum_ij alpha ReLU(g)
    g2, g3 = g ** 2, g ** 3
    denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / denom, torch.zeros_like(g))
    return channel_sum((alpha * F.relu(g)).sum((2, 3)), a)


def xgrad_cam(a, g):  # Fu et al. 2020; a channel that is zero everywhere weighs 0
    s = a.sum((2, 3))
    return channel_sum(torch.where(s != 0, (g * a).sum((2, 3)) / s, torch.zeros_like(s)), a)


def layer_cam(a, g):  # Jiang et al. 2021
    return (F.relu(g) * a).sum(1)


PAPER = {"gradcam": grad_cam, "gradcampp": grad_cam_pp, "xgradcam": xgrad_cam, "layercam": layer_cam}


def drop_grads(model):
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("layer", ["block1", "block2"])
@pytest.mark.parametrize("method", sorted(PAPER))
def test_gradient_cam_equals_its_paper_formula(data, method, layer):
    """Each gradient method's map is its paper's formula, recomputed from hooked A and dY_c/dA,
    for the predicted class of some images and another class of the others."""
    model, x, pred = data["model"], data["x"][:12], data["pred"]
    cls = torch.where(torch.arange(12) % 2 == 0, pred.preds[:12], (pred.preds[:12] + 3) % 10)
    a, g = hooked(model, layer, x, cls)
    drop_grads(model)
    expected = finish(PAPER[method](a, g))
    got = class_activation_maps(model, x, cls, target_layer=layer, method=method, batch_size=5)
    assert got.shape == (12, 32, 32) and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert 0 <= got.min() and got.max() <= 1 and (got.amax((1, 2)) == 1).sum() >= 6
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_gradcampp_is_not_the_library_denominator(data):
    """pytorch-grad-cam adds 1e-6 to eq. 19's denominator; here g^2 is of that order, so that
    version is a different map, and lrlab's must not be it."""
    model, x, cls = data["model"], data["x"][:12], data["pred"].preds[:12]
    a, g = hooked(model, "block2", x, cls)
    drop_grads(model)
    assert (g ** 2).mean() < 1e-4
    g2 = g ** 2
    alpha = torch.where(g != 0, g2 / (2 * g2 + a.sum((2, 3), keepdim=True) * g2 * g + 1e-6), torch.zeros_like(g))
    library = finish(channel_sum((alpha * F.relu(g)).sum((2, 3)), a))
    got = class_activation_maps(model, x, cls, target_layer="block2", method="gradcampp")
    assert (got - library).abs().max() > 0.01


def test_scorecam_equals_its_paper_formula(data):
    """Score-CAM (Wang et al. 2020, Algorithm 1) = ReLU(sum_k softmax_k(p_c(X * H_k)) A_k), H_k the
    min-max-normalised upsampled activation k (zero for a constant channel), p_c the softmax
    probability of class c (the baseline's probability is constant over k and cancels)."""
    model, x = data["model"], data["x"][:3]
    cls = data["pred"].preds[:3]
    model.eval()
    store = {}
    handle = model.block2.register_forward_hook(lambda m, i, o: store.update(a=o))
    with torch.no_grad():
        try:
            model(x)
        finally:
            handle.remove()
        act = store["a"]  # (3, 64, 8, 8)
        up = F.interpolate(act, size=(32, 32), mode="bilinear", align_corners=False)
        lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masks = torch.where(hi > lo, (up - lo) / (hi - lo), torch.zeros_like(up))
        probs = torch.stack([torch.softmax(model(x[i:i + 1] * masks[i].unsqueeze(1)), 1)[:, cls[i]] for i in range(3)])
        expected = finish(channel_sum(torch.softmax(probs, dim=1), act))
    got = class_activation_maps(model, x, cls, target_layer="block2", method="scorecam")
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_all_negative_map_is_zero_and_labelled(data):
    """Where the weighted sum is negative at every position (real pairs of image and class,
    found by hand), the map is all zero, and the figures label it instead of drawing it."""
    model, x = data["model"], data["x"]
    found = []
    for c in range(10):
        a, g = hooked(model, "block2", x, torch.full((len(x),), c))
        found += [(i, c) for i in torch.nonzero(grad_cam(a, g).amax((1, 2)) < 0).flatten().tolist()]
    drop_grads(model)
    assert len(found) >= 2, "no all-negative Grad-CAM among 300 images x 10 classes"
    idx, cls = (torch.tensor(v) for v in zip(*found[:4], strict=True))
    maps = class_activation_maps(model, x[idx], cls, target_layer="block2", method="gradcam")
    assert torch.equal(maps, torch.zeros_like(maps))
    positive = class_activation_maps(model, x[idx], data["pred"].preds[idx], target_layer="block2", method="gradcam")
    n, u8 = len(idx), data["u8"][idx.numpy()]
    fig = plots._cam_pairs_figure(u8, positive.numpy(), maps.numpy(), ["cat"] * n, [0.5] * n, ["dog"] * n)
    label = plots.EMPTY_MAP.split(" (")[0]
    labelled = [ax for ax in fig.axes if any(label in t.get_text() for t in ax.texts)]
    assert len(labelled) == n and all(len(ax.images) == 1 for ax in labelled)  # the image, no heatmap
    assert sum(len(ax.images) == 2 for ax in fig.axes) == int((positive.amax((1, 2)) > 0).sum())
    grid = plots._cam_figure(u8, maps.numpy(), ["x"] * n)
    assert sum(len(ax.texts) for ax in grid.axes) == n and all(len(ax.images) <= 1 for ax in grid.axes)
    plots.plt.close(fig)
    plots.plt.close(grid)


def test_fused_layers_are_the_mean_of_normalised_maps(data):
    """Several layers: each layer's map normalised at its resolution, upsampled, averaged, normalised."""
    model, x, cls = data["model"], data["x"][:6], data["pred"].preds[:6]

    def normalise(m):
        lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
        return (m - lo) / (hi - lo)

    for method in ("gradcam", "layercam"):
        ups = []
        for layer in ("block1", "block2"):
            low = normalise(F.relu(PAPER[method](*hooked(model, layer, x, cls))))
            ups.append(F.interpolate(low.unsqueeze(1), size=(32, 32), mode="bilinear", align_corners=False).squeeze(1))
        drop_grads(model)
        fused = class_activation_maps(model, x, cls, target_layer=["block1", "block2"], method=method)
        torch.testing.assert_close(fused, normalise((ups[0] + ups[1]) / 2), atol=2e-5, rtol=1e-4)
        single = class_activation_maps(model, x, cls, target_layer="block2", method=method)
        assert not torch.allclose(fused, single, atol=1e-3)  # the 16x16 layer adds detail


@pytest.mark.parametrize("method", CAM_METHODS.names())
def test_predicted_and_true_class_maps_differ(data, method):
    """"Why it said cat" and "where the dog was" are different maps for every mistake."""
    model, pred = data["model"], data["pred"]
    idx = select_misclassified(pred, k=8)
    x = data["x"][idx]
    why = class_activation_maps(model, x, pred.preds[idx], target_layer="block2", method=method)
    where = class_activation_maps(model, x, pred.targets[idx], target_layer="block2", method=method)
    assert (pred.preds[idx] != pred.targets[idx]).all()
    diff = (why - where).abs().mean((1, 2))
    if method == "scorecam":
        # The paper's weights are a softmax over channels of probabilities in [0, 1], nearly
        # uniform: its maps depend on the class, but far less than the gradient methods' maps.
        assert (diff > 1e-3).all(), diff
        return
    assert (diff > 0.02).all(), diff
    assert diff.mean() > 0.1


def test_cam_errors_are_one_line(data):
    model, x, cls = data["model"], data["x"][:2], data["pred"].preds[:2]
    before = count_hooks(model)
    with pytest.raises(LrlabError) as err:
        class_activation_maps(model, x, cls, target_layer="layer4")
    msg = str(err.value)
    assert "\n" not in msg and "'layer4'" in msg
    assert msg.endswith("valid layers: " + ", ".join(layer_names(model)))
    with pytest.raises(LrlabError) as err:
        class_activation_maps(model, x, cls, target_layer="block2", method="smoothgradcampp")
    msg = str(err.value)
    assert "\n" not in msg and "'smoothgradcampp'" in msg and msg.endswith(VALID_CAM_METHODS)
    with pytest.raises(LrlabError) as err:  # one wrong name in a list of layers to fuse
        class_activation_maps(model, x, cls, target_layer=["block1", "block9"], method="layercam")
    msg = str(err.value)
    assert "'block9'" in msg and msg.endswith("valid layers: " + ", ".join(layer_names(model)))
    # errors raised after the hooks are in place still remove them
    with pytest.raises(LrlabError, match="out of range"):
        class_activation_maps(model, x, torch.tensor([0, 10]), target_layer="block2")
    with pytest.raises(LrlabError, match="not a \\(N, C, h, w\\) feature map"):
        class_activation_maps(model, x, cls, target_layer="fc")
    for method in CAM_METHODS.names():
        with pytest.raises(LrlabError, match="out of range"):
            class_activation_maps(model, x, torch.tensor([0, 10]), target_layer=["block1", "block2"], method=method)
    assert count_hooks(model) == before


@pytest.mark.parametrize("method", CAM_METHODS.names())
def test_cam_leaves_model_untouched(data, method):
    model, x, cls = data["model"], data["x"][:1], data["pred"].preds[:1]
    model.train()
    model.stem.eval()
    model.fc.weight.requires_grad_(False)  # a partly frozen model stays partly frozen
    F.cross_entropy(model(data["x"][:8]), data["y"][:8]).backward()  # .grad as in mid-training
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    assert grads["fc.weight"] is None and grads["block2.0.weight"] is not None
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = count_hooks(model)
    assert before == 0
    try:
        for i in range(50):
            class_activation_maps(model, x, cls, target_layer="block2" if i % 2 else ["block1", "block2"],
                                  method=method)
        assert count_hooks(model) == before
        assert model.training and not model.stem.training and model.block2.training
        assert [p.requires_grad for p in model.parameters()] == flags
        for n, p in model.named_parameters():  # .grad untouched (the library's zero_grad is undone)
            assert (p.grad is None) if grads[n] is None else torch.equal(p.grad, grads[n]), n
        # eval mode during CAM: BatchNorm running statistics unchanged
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
    finally:
        model.fc.weight.requires_grad_(True)
        model.eval()
        drop_grads(model)


def test_cam_inside_inference_mode_and_frozen_model(data):
    model, x, cls = data["model"], data["x"][:4], data["pred"].preds[:4]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.inference_mode():
            maps = class_activation_maps(model, x, cls, target_layer="block2")
        assert torch.isfinite(maps).all() and (maps.amax((1, 2)) > 0).any()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_denormalize_round_trip(data):
    u8 = denormalize(data["x"][:10], MEAN, STD)
    assert u8.dtype == np.uint8 and u8.shape == (10, 32, 32, 3)
    assert np.abs(u8.astype(int) - data["u8"][:10].astype(int)).max() <= 1
    assert denormalize(data["x"][0], MEAN, STD).shape == (32, 32, 3)


# --------------------------------------------------------------------------- faithfulness


def test_keep_masks_have_exact_area_and_follow_the_map():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 32, 32, generator=gen)
    maps[0] = 0.0  # a constant map: ties are broken at random, the area is still exact
    for f in (0.0, 0.1, 0.25, 1.0):
        m = keep_masks(maps, f)
        assert m.shape == (4, 1, 32, 32) and (m.sum((1, 2, 3)) == round(f * 1024)).all()
    m = keep_masks(maps, 0.1).squeeze(1).bool()
    for i in range(1, 4):  # every kept pixel is at least as high as every dropped one
        assert maps[i][m[i]].min() >= maps[i][~m[i]].max()
    rows = keep_masks(maps[:1], 0.25).squeeze().sum(1)
    assert rows[:8].sum() < 0.6 * 256  # zeros are not taken from the top of the image first


def test_cam_faithfulness_curves(data):
    model, x = data["model"], data["x"][::15]  # 20 images, 2 per class
    result = cam_faithfulness(model, x, CPU, target_layer="block2", methods=("gradcam", "layercam"),
                              fractions=(0.0, 0.1, 0.5, 1.0), random_repeats=2)
    assert result.methods == ["gradcam", "layercam"] and result.num_images == 20 and result.random_grid == [8, 8]
    for name in ("gradcam", "layercam", "random"):
        keep, delete = result.keep[name], result.delete[name]
        assert len(keep) == len(delete) == 4
        # all pixels kept = the intact image; none kept = the all-mean image = everything deleted
        assert keep[-1] == pytest.approx(result.intact_confidence, abs=1e-5)
        assert delete[0] == pytest.approx(result.intact_confidence, abs=1e-5)
        assert keep[0] == pytest.approx(delete[-1], abs=1e-5)
        assert 0 < result.auc(name, "keep") < 1 and 0 < result.auc(name, "delete") < 1
    assert result.drop_at("gradcam", 0.1) == pytest.approx(result.intact_confidence - result.keep["gradcam"][1])
    # ROAD: imputing the most relevant pixels costs more confidence than imputing the least relevant
    assert set(result.road_morf) == set(result.road_lerf) == {"gradcam", "layercam", "random"}
    for name in ("gradcam", "layercam"):
        assert -1 < result.road_morf[name] < result.road_lerf[name] < 1
    table = format_table(result, at=(0.1, 0.5))
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and lines[2].startswith("| gradcam |") and "random map (8x8" in lines[-1]
    assert "ROAD MoRF (lower better) | ROAD LeRF (higher better)" in lines[0]
    assert f"| {100 * result.road_morf['gradcam']:+.1f} pp |" in lines[2]
    back = FaithfulnessResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result
    # a faithfulness.json written before ROAD existed still reads; its table shows "-"
    older = FaithfulnessResult.from_dict({k: v for k, v in result.to_dict().items() if not k.startswith("road")})
    assert "| - | - |" in format_table(older, at=(0.1, 0.5)).splitlines()[2]
    with pytest.raises(LrlabError, match=f"unknown explain.method 'rise'; {VALID_CAM_METHODS}$"):
        cam_faithfulness(model, x, CPU, target_layer="block2", methods=("gradcam", "rise"))
    with pytest.raises(LrlabError, match="valid layers"):
        cam_faithfulness(model, x, CPU, target_layer="block7", methods=("gradcam",))
    assert count_hooks(model) == 0
    assert FRACTIONS[0] == 0.0 and FRACTIONS[-1] == 1.0
