"""LR range test: schedule law, bit-exact restore, stop rules, suggestion, errors, JSON.

Real CIFAR-10 images (decoded here with PIL, independent of lrlab.data) and a small
Conv-BN-ReLU network, so every run below takes well under a second on a CPU.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lrlab.errors import LrlabError
from lrlab.lr_finder import (
    MIN_POINTS,
    RangeTestResult,
    lr_schedule,
    range_test,
    steepest_descent,
)

from conftest import CIFAR_DIR, CLASSES

BATCH = 32


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    """256 real training images, x (256, 3, 32, 32) float32 normalised, y (256,) int64."""
    xs, ys = [], []
    for i in range(26):
        for label, cls in enumerate(CLASSES):
            with Image.open(CIFAR_DIR / "train" / cls / f"{i:04d}.jpg") as im:
                xs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            ys.append(label)
    x = torch.from_numpy(np.stack(xs[:256])).permute(0, 3, 1, 2).float() / 255
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / std, torch.tensor(ys[:256])


@pytest.fixture
def batches(images) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = images
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def train_steps(model, optimizer, batches, n: int) -> None:
    """Ordinary training steps, so momentum buffers, Adam moments and BN stats are non-trivial."""
    model.train()
    for x, y in batches[:n]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_same(a, b, where: str = "") -> None:
    """Recursive bit-exact equality of nested dicts/lists/tensors/numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(model, optimizer):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(optimizer.state_dict()),
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def assert_restored(model, optimizer, before) -> None:
    state, opt_state, grads, modes = before
    assert_same(state, dict(model.state_dict()), "model")
    assert_same(opt_state, optimizer.state_dict(), "optimizer")
    for g, p in zip(grads, model.parameters()):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    assert modes == [m.training for m in model.modules()]


# ---------------------------------------------------------------- schedule


def test_exp_schedule_follows_the_law():
    start, end, n = 1e-7, 10.0, 100
    lrs = np.array(lr_schedule(start, end, n, "exp"))
    i = np.arange(n)
    assert np.allclose(lrs, start * (end / start) ** (i / (n - 1)), rtol=1e-12, atol=0)
    ratios = lrs[1:] / lrs[:-1]
    assert np.allclose(ratios, ratios[0], rtol=1e-12, atol=0)
    assert lrs[0] == start and lrs[-1] == end and len(lrs) == n


def test_linear_schedule_is_exact():
    lrs = lr_schedule(0.01, 1.0, 34, "linear")
    expected = [0.01 + (1.0 - 0.01) * i / 33 for i in range(34)]
    assert np.allclose(lrs, expected, rtol=1e-12, atol=0)
    assert np.allclose(np.diff(lrs), 0.99 / 33, rtol=1e-9)
    assert lrs[0] == 0.01 and lrs[-1] == 1.0


# ---------------------------------------------------------------- restore


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-4),
], ids=["sgd-momentum", "adam"])
def test_state_is_restored_bit_exactly(batches, make_opt):
    model = make_model()
    optimizer = make_opt(model.parameters())
    train_steps(model, optimizer, batches, 3)
    # leave gradients in place and a mixed train/eval state, both must come back
    nn.functional.cross_entropy(model(batches[4][0]), batches[4][1]).backward()
    model.eval()
    model[1].train()
    before = snapshot(model, optimizer)
    assert optimizer.state_dict()["state"], "prior step must have created optimizer state"

    changed = []  # proves the sweep really trained, so the restore check is not vacuous
    weight = model[0].weight
    result = range_test(model, optimizer, nn.functional.cross_entropy, batches,
                        start_lr=1e-5, end_lr=1.0, num_iter=30,
                        progress=lambda i, lr, loss: changed.append(not torch.equal(weight, before[0]["0.weight"])))

    assert len(result.lrs) > 0 and any(changed)
    assert_restored(model, optimizer, before)
    assert optimizer.param_groups[0]["lr"] == before[1]["param_groups"][0]["lr"]
    assert model[1].num_batches_tracked.item() == 4  # 3 steps + the forward that made .grad


def test_state_is_restored_when_the_loader_raises(batches):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, optimizer, batches, 2)
    before = snapshot(model, optimizer)

    def failing_loader():
        yield from batches[:3]
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        range_test(model, optimizer, nn.functional.cross_entropy, failing_loader(),
                   start_lr=1e-4, end_lr=1.0, num_iter=30)
    assert_restored(model, optimizer, before)


# ---------------------------------------------------------------- stop rules


def test_nan_loss_stops_and_is_excluded(batches):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] > 30 else loss

    seen = []
    result = range_test(model, optimizer, loss_fn, batches, start_lr=1e-5, end_lr=1.0,
                        num_iter=60, progress=lambda i, lr, loss: seen.append((i, lr, loss)))
    schedule = lr_schedule(1e-5, 1.0, 60, "exp")
    assert result.stop_reason == "non-finite loss"
    assert len(result.lrs) == len(result.losses) == len(result.smoothed) == 30
    assert result.lrs == schedule[:30]
    assert all(math.isfinite(v) for v in result.losses + result.smoothed)
    assert result.suggestion is not None and math.isfinite(result.suggestion)
    assert result.suggestion < schedule[30]
    assert result.lrs[result.suggestion_index] == result.suggestion
    assert len(seen) == 31 and math.isnan(seen[-1][2])  # progress sees the NaN step too


def test_divergence_stops_a_real_run(batches):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = range_test(model, optimizer, nn.functional.cross_entropy, batches,
                        start_lr=1e-4, end_lr=1e4, num_iter=100)
    assert result.stop_reason == "diverged"
    assert len(result.lrs) < 100
    assert result.smoothed[-1] > 5.0 * min(result.smoothed)
    # no earlier point (after the skip_start warm-up of the EMA) met the stop rule
    assert all(s <= 5.0 * min(result.smoothed[:k + 1])
               for k, s in enumerate(result.smoothed[:-1]) if k >= 10)


# ---------------------------------------------------------------- suggestion


@pytest.mark.parametrize("mode", ["exp", "linear"])
def test_steepest_descent_on_a_known_curve(mode):
    lrs = np.array(lr_schedule(1e-3, 1.0, 400, mode))
    k = 300 if mode == "exp" else 150
    c = math.log10(lrs[k])
    smoothed = -np.tanh(3 * (np.log10(lrs) - c))  # steepest (in log10 lr) exactly at lrs[k]
    assert steepest_descent(lrs, smoothed, skip_start=10, skip_end=5) == k
    if mode == "linear":
        # the naive unit-spacing gradient is biased toward small lrs on a linear sweep
        assert int(np.argmin(np.gradient(smoothed))) != k


def test_steepest_descent_ignores_nonfinite_and_skipped_points():
    lrs = np.array(lr_schedule(1e-4, 1.0, 101, "exp"))
    smoothed = -np.tanh(np.log10(lrs) + 2)  # steepest at lr = 1e-2, index 50
    smoothed[2] = -1e9   # inside skip_start: would look like a cliff
    smoothed[98] = -1e9  # inside skip_end
    smoothed[70] = np.nan
    smoothed[71] = np.inf
    assert steepest_descent(lrs, smoothed, skip_start=5, skip_end=5) == 50


def test_steepest_descent_too_few_points():
    lrs = lr_schedule(1e-3, 1.0, 20, "exp")
    smoothed = [1.0] * 20
    with pytest.raises(LrlabError) as info:
        steepest_descent(lrs, smoothed, skip_start=10, skip_end=6)
    msg = str(info.value)
    assert "only 4" in msg and f"at least {MIN_POINTS}" in msg and "\n" not in msg


# ---------------------------------------------------------------- errors


class NoLr(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


@pytest.mark.parametrize("kwargs, opt, loader, needle", [
    (dict(start_lr=1.0, end_lr=1.0), "sgd", "ok", "start_lr (1.0) must be below end_lr (1.0)"),
    (dict(start_lr=1.0, end_lr=0.1), "sgd", "ok", "must be below end_lr"),
    (dict(start_lr=0.0), "sgd", "ok", "start_lr (0.0)"),
    (dict(num_iter=19), "sgd", "ok", "at least 20"),
    (dict(mode="cosine"), "sgd", "ok", "'cosine'"),
    (dict(smooth=1.0), "sgd", "ok", "smooth (1.0)"),
    (dict(diverge_factor=1.0), "sgd", "ok", "diverge_factor (1.0)"),
    ({}, "nolr", "ok", "'lr' key"),
    ({}, "sgd", "empty", "no batches"),
    ({}, "sgd", "oneshot", "could not be restarted"),
    ({}, "sgd", "bad", "(x, y)"),
], ids=["equal", "reversed", "zero", "num_iter", "mode", "smooth", "diverge", "no-lr",
        "empty", "oneshot", "bad-batch"])
def test_bad_input_is_one_sentence(batches, kwargs, opt, loader, needle):
    model = make_model()
    optimizer = NoLr(model.parameters()) if opt == "nolr" else torch.optim.SGD(model.parameters(), lr=0.1)
    loaders = {"ok": batches, "empty": [], "oneshot": iter(batches[:2]), "bad": [batches[0][0]] * 3}
    before = snapshot(model, optimizer)
    with pytest.raises(LrlabError) as info:
        range_test(model, optimizer, nn.functional.cross_entropy, loaders[loader], **kwargs)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg
    assert_restored(model, optimizer, before)


# ---------------------------------------------------------------- JSON


def test_json_round_trip(tmp_path, batches):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = range_test(model, optimizer, nn.functional.cross_entropy, batches,
                        start_lr=1e-4, end_lr=1.0, num_iter=25, mode="linear")
    path = result.save_json(tmp_path / "lr_finder.json")
    assert RangeTestResult.load_json(path) == result
    assert [p.name for p in tmp_path.iterdir()] == ["lr_finder.json"]  # no temp file left


def test_json_nonfinite_becomes_null(tmp_path):
    result = RangeTestResult(lrs=[1e-3, 1e-2], losses=[2.3, math.nan], smoothed=[2.3, math.inf],
                             mode="exp", start_lr=1e-3, end_lr=1e-2, num_iter=2,
                             stop_reason="non-finite loss", suggestion=None, suggestion_index=None)
    path = result.save_json(tmp_path / "r.json")
    raw = json.loads(path.read_text())  # strict JSON: no NaN/Infinity tokens
    assert raw["losses"] == [2.3, None] and raw["smoothed"] == [2.3, None]
    back = RangeTestResult.load_json(path)
    assert back.losses[0] == 2.3 and math.isnan(back.losses[1]) and math.isnan(back.smoothed[1])


def test_load_json_bad_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lrs": []}')
    with pytest.raises(LrlabError, match="lacks the field"):
        RangeTestResult.load_json(bad)


# ---------------------------------------------------------------- real runs


def test_real_run_gives_a_suggestion_in_range(images):
    x, y = images
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    result = range_test(model, optimizer, nn.functional.cross_entropy, loader,
                        start_lr=1e-5, end_lr=10.0, num_iter=80)  # cycles the 8-batch loader
    assert result.stop_reason in ("completed", "diverged", "non-finite loss")
    assert len(result.lrs) >= 30
    assert result.suggestion is not None
    assert result.start_lr <= result.suggestion <= result.end_lr
    assert result.lrs[result.suggestion_index] == result.suggestion
    assert 10 <= result.suggestion_index < len(result.lrs) - 5
    # the loss at the suggestion is still near the start: it is on the descent, not past it
    assert result.smoothed[result.suggestion_index] < 1.5 * result.smoothed[0]


def test_bf16_channels_last_run_restores(batches):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, optimizer, batches, 2)
    before = snapshot(model, optimizer)
    result = range_test(model, optimizer, nn.functional.cross_entropy, batches, start_lr=1e-4,
                        end_lr=1.0, num_iter=20, device="cpu", autocast_dtype=torch.bfloat16,
                        channels_last=True)
    assert len(result.lrs) > 0 and all(math.isfinite(v) for v in result.losses)
    assert_restored(model, optimizer, before)
