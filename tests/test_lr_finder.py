"""LR range test: schedule law, bit-exact restore, stop rules, suggestions, errors, JSON, plot, and that
the library stands alone (no application imports, no function over 50 lines of code).

Real CIFAR-10 images (decoded here with PIL, independent of lrlab.data) and a small
Conv-BN-ReLU network, so every run below takes well under a second on a CPU.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lrlab.errors import LrlabError
from lrlab.lr_finder import (
    METHODS,
    MIN_POINTS,
    LRRangeTest,
    RangeTestResult,
    Suggestion,
    group_schedules,
    lr_schedule,
    range_test,
    steepest,
    suggest,
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
    result = range_test(model, optimizer, loss_fn, batches, start_lr=1e-5, end_lr=1.0, num_iter=60,
                        method="max_lr", progress=lambda i, lr, loss: seen.append((i, lr, loss)))
    schedule = lr_schedule(1e-5, 1.0, 60, "exp")
    assert result.stop_reason == "non-finite loss"
    assert len(result.lrs) == len(result.losses) == len(result.smoothed) == 30
    assert result.lrs == schedule[:30]
    assert all(math.isfinite(v) for v in result.losses + result.smoothed)
    assert result.suggestion is not None and math.isfinite(result.suggestion)
    assert result.suggestion < schedule[30]
    assert result.lrs[result.suggestion_index] == result.suggestion
    assert result.stop_index == 30 and result.stop_lr == schedule[30]
    for s in result.suggestions.values():
        assert math.isfinite(s.lr) and s.lr < schedule[30], s
    assert len(seen) == 31 and math.isnan(seen[-1][2])  # progress sees the NaN step too


def test_divergence_stops_a_real_run(batches):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = range_test(model, optimizer, nn.functional.cross_entropy, batches,
                        start_lr=1e-4, end_lr=1e4, num_iter=100)
    assert result.stop_reason == "diverged"
    assert len(result.lrs) < 100 and result.stop_index == len(result.lrs) - 1
    assert result.stop_lr == result.lrs[-1]
    assert result.smoothed[-1] > 5.0 * min(result.smoothed)
    # no earlier point (after the skip_start warm-up of the EMA) met the stop rule
    assert all(s <= 5.0 * min(result.smoothed[:k + 1])
               for k, s in enumerate(result.smoothed[:-1]) if k >= 10)


# ---------------------------------------------------------------- suggestion


@pytest.mark.parametrize("mode", ["exp", "linear"])
def test_steepest_on_a_known_curve(mode):
    lrs = np.array(lr_schedule(1e-3, 1.0, 400, mode))
    k = 300 if mode == "exp" else 150
    c = math.log10(lrs[k])
    smoothed = -np.tanh(3 * (np.log10(lrs) - c))  # steepest (in log10 lr) exactly at lrs[k]
    s = steepest(lrs, smoothed, skip_start=10, skip_end=5)
    assert s.index == k and s.lr == lrs[k] and s.method == "steepest"
    if mode == "linear":
        # the naive unit-spacing gradient is biased toward small lrs on a linear sweep
        assert int(np.argmin(np.gradient(smoothed))) != k


def test_steepest_ignores_nonfinite_and_skipped_points():
    lrs = np.array(lr_schedule(1e-4, 1.0, 101, "exp"))
    smoothed = -np.tanh(np.log10(lrs) + 2)  # steepest at lr = 1e-2, index 50
    smoothed[2] = -1e9   # inside skip_start: would look like a cliff
    smoothed[98] = -1e9  # inside skip_end
    smoothed[70] = np.nan
    smoothed[71] = np.inf
    assert steepest(lrs, smoothed, skip_start=5, skip_end=5).index == 50


def test_steepest_too_few_points():
    lrs = lr_schedule(1e-3, 1.0, 20, "exp")
    smoothed = [1.0] * 20
    with pytest.raises(LrlabError) as info:
        steepest(lrs, smoothed, skip_start=10, skip_end=6)
    msg = str(info.value)
    assert "only 4" in msg and f"at least {MIN_POINTS}" in msg and "\n" not in msg


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_needs_enough_points_and_a_descent(method):
    lrs = lr_schedule(1e-3, 1.0, 20, "exp")
    with pytest.raises(LrlabError) as info:
        suggest(method, lrs, np.linspace(2, 1, 20), skip_start=10, skip_end=6)
    assert "only 4" in str(info.value) and method in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(LrlabError, match="does not fall|never falls"):
        suggest(method, lrs, np.linspace(1, 2, 20), skip_start=2, skip_end=2)  # the loss only rises


def grid(n: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """lrs 1e-4 .. 1 exponentially (x = log10 lr in steps of 0.04), and x."""
    lrs = np.array(lr_schedule(1e-4, 1.0, n, "exp"))
    return lrs, np.log10(lrs)


def close_in_log(a: float, b: float, tol: float = 0.021) -> bool:
    return abs(math.log10(a) - math.log10(b)) <= tol


def test_steepest_band_is_where_the_slope_is_half_the_steepest():
    lrs, x = grid()
    s = steepest(lrs, -np.tanh(3 * (x + 2)), skip_start=0, skip_end=0)
    assert s.lr == lrs[50] and s.index == 50
    u = math.acosh(math.sqrt(2)) / 3  # sech^2(3u) = 1/2
    assert close_in_log(s.low, 10 ** (-2 - u), 0.04) and close_in_log(s.high, 10 ** (-2 + u), 0.04)


def test_valley_is_the_middle_of_the_longest_descent():
    lrs, x = grid()
    x = np.round(x, 9)
    y = np.where(x <= -3, 1.0 + 0.01 * (x + 4), 1.0 - (x + 3) / 2)  # slow rise, then a fall from -3 to -1
    y = np.where(x > -1, (x + 1) * 3, y)  # rises again after the minimum at -1
    y[5:8] = [1.0, 0.99, 0.98]  # a short earlier dip must not win
    s = suggest("valley", lrs, y, skip_start=0, skip_end=0)
    assert close_in_log(s.lr, 1e-2)
    assert close_in_log(s.low, 10 ** -2.5, 0.04) and close_in_log(s.high, 10 ** -1.5, 0.04)


def test_min10_is_a_tenth_of_the_minimum():
    lrs, x = grid()
    s = suggest("min10", lrs, (x + 1) ** 2, skip_start=3, skip_end=3)  # minimum at lr 0.1 (index 75)
    assert s.lr == pytest.approx(0.01, rel=1e-9) and s.index == 50
    assert s.low == pytest.approx(0.1 / 30) and s.high == pytest.approx(0.1 / 3)


def test_descent_is_three_quarters_of_the_way_down():
    lrs, x = grid()
    y = np.where(x <= -3, 1.0, 1.0 - (x + 3) / 2)  # falls linearly in log10 lr from 1 at -3 to 0 at -1
    y = np.where(x > -1, (x + 1) * 5, y)
    s = suggest("descent", lrs, y, skip_start=0, skip_end=0)
    assert close_in_log(s.lr, 10 ** -1.5, 1e-9)  # level 0.25 crossed exactly there (interpolated)
    assert close_in_log(s.low, 1e-2, 1e-9) and close_in_log(s.high, 10 ** -1.2, 1e-9)


def test_max_lr_is_the_last_clear_fall_before_the_minimum():
    lrs, x = grid()
    s = suggest("max_lr", lrs, -np.tanh(3 * (x + 2)), skip_start=0, skip_end=0)
    u = math.acosh(2) / 3  # slope = 1/4 of the steepest
    assert close_in_log(s.lr, 10 ** (-2 + u), 0.04)
    assert s.low == lrs[50] and s.high == lrs[-1]


def test_suggestions_are_real_recorded_points_or_near_them():
    lrs, x = grid()
    y = -np.tanh(3 * (x + 2)) + np.where(x > -1, (x + 1) ** 2 * 20, 0)
    for name in METHODS:
        s = suggest(name, lrs, y, skip_start=5, skip_end=5)
        assert s.method == name and s.low <= s.lr <= s.high
        assert close_in_log(lrs[s.index], s.lr, 0.02 + 1e-9)


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
                             stop_reason="non-finite loss", stop_index=1, stop_lr=1e-2)
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
                        start_lr=1e-5, end_lr=10.0, num_iter=80, method="max_lr")  # cycles the 8-batch loader
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


# ---------------------------------------------------------------- context manager, scheduler


def sched_state(scheduler) -> dict:
    return copy.deepcopy(scheduler.state_dict())


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
], ids=["sgd-momentum", "adam"])
def test_context_manager_restores_model_optimizer_and_scheduler(batches, make_opt):
    model = make_model()
    optimizer = make_opt(model.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=50)
    for _ in range(3):
        train_steps(model, optimizer, batches, 1)
        scheduler.step()
    before, before_sched = snapshot(model, optimizer), sched_state(scheduler)
    with LRRangeTest(model, optimizer, scheduler) as finder:
        first = finder.run(batches, nn.functional.cross_entropy, start_lr=1e-5, end_lr=1.0, num_iter=30)
        assert_restored(model, optimizer, before)  # each run restores on its own
        scheduler.step()  # even user changes inside the block are undone on exit
        second = finder.run(batches, nn.functional.cross_entropy, start_lr=1e-5, end_lr=1.0, num_iter=30)
    assert_restored(model, optimizer, before)
    assert_same(before_sched, scheduler.state_dict(), "scheduler")
    assert first.lrs == second.lrs and len(first.lrs) > 10


def test_restored_when_the_loop_raises_midway_with_a_scheduler(batches):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    train_steps(model, optimizer, batches, 2)
    scheduler.step()
    before, before_sched = snapshot(model, optimizer), sched_state(scheduler)

    class Failing:
        def __iter__(self):
            yield from batches[:3]
            raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        with LRRangeTest(model, optimizer, scheduler) as finder:
            finder.run(Failing(), nn.functional.cross_entropy, start_lr=1e-4, end_lr=1.0, num_iter=30)
    assert_restored(model, optimizer, before)
    assert_same(before_sched, scheduler.state_dict(), "scheduler")


def test_user_error_inside_the_block_still_restores(batches):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, optimizer, batches, 2)
    before = snapshot(model, optimizer)
    with pytest.raises(KeyError):
        with LRRangeTest(model, optimizer):
            train_steps(model, optimizer, batches, 2)  # the user trains inside the block, then fails
            raise KeyError("boom")
    assert_restored(model, optimizer, before)


def test_run_outside_the_block_is_an_error(batches):
    model = make_model()
    finder = LRRangeTest(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(LrlabError, match="with-block"):
        finder.run(batches, nn.functional.cross_entropy)


# ---------------------------------------------------------------- sweeps, optimizers, batches


def test_per_group_lrs_are_applied_and_other_options_untouched(batches):
    model = make_model()
    groups = [{"params": list(model[0].parameters()) + list(model[1].parameters())},
              {"params": [p for m in list(model)[2:] for p in m.parameters()]}]
    optimizer = torch.optim.Adam(groups, lr=1e-3, betas=(0.8, 0.95))
    seen = []
    hook = optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([(g["lr"], g["betas"]) for g in opt.param_groups]))
    try:
        result = range_test(model, optimizer, nn.functional.cross_entropy, batches, start_lr=[1e-5, 1e-4],
                            end_lr=[1e-2, 1.0], num_iter=25, skip_start=5, mode="exp")
    finally:
        hook.remove()
    expected = group_schedules([1e-5, 1e-4], [1e-2, 1.0], 2, 25, "exp")
    assert [[lr for lr, _ in step] for step in seen] == expected[:len(seen)] and len(seen) >= 10
    assert all(b == (0.8, 0.95) for step in seen for _, b in step)
    assert result.lrs == [e[0] for e in expected[:len(result.lrs)]]  # the recorded axis is group 0's
    assert expected[-1] == [1e-2, 1.0] and expected[0] == [1e-5, 1e-4]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3]


def test_exp_and_linear_group_sweeps_are_exact():
    exp = group_schedules(1e-4, 1.0, 3, 9, "exp")
    assert all(step == [step[0]] * 3 for step in exp)
    assert [s[0] for s in exp] == pytest.approx([10 ** (-4 + i / 2) for i in range(9)], rel=1e-12)
    lin = group_schedules([0.0 + 0.1, 1.0], [0.9, 2.0], 2, 5, "linear")
    assert [s[0] for s in lin] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9], rel=1e-12)
    assert [s[1] for s in lin] == pytest.approx([1.0, 1.25, 1.5, 1.75, 2.0], rel=1e-12)


def test_dict_batches_and_a_custom_batch_fn(batches):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dicts = [{"image": x, "label": y, "index": torch.arange(len(y))} for x, y in batches]
    as_dicts = range_test(model, optimizer, nn.functional.cross_entropy, dicts, start_lr=1e-4, end_lr=1.0,
                          num_iter=20)
    as_tuples = range_test(model, optimizer, nn.functional.cross_entropy, batches, start_lr=1e-4, end_lr=1.0,
                           num_iter=20)
    assert as_dicts.losses == as_tuples.losses and len(as_dicts.lrs) == 20
    custom = [{"pixels": x, "cls": y} for x, y in batches]
    with pytest.raises(LrlabError) as info:
        range_test(model, optimizer, nn.functional.cross_entropy, custom, num_iter=20)
    assert "['cls', 'pixels']" in str(info.value) and "batch_fn" in str(info.value)
    r = range_test(model, optimizer, nn.functional.cross_entropy, custom, num_iter=20, start_lr=1e-4,
                   end_lr=1.0, batch_fn=lambda b: (b["pixels"], b["cls"]))
    assert r.losses == as_tuples.losses


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Linear(32, 10))


def test_gradient_accumulation_equals_one_big_batch(images):
    x, y = images
    big = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    small = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 128, 16)]
    runs = {}
    for name, loader, k in (("big", big, 1), ("accumulated", small, 2)):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        grads = []
        optimizer.register_step_pre_hook(
            lambda opt, a, kw: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
        runs[name] = (range_test(model, optimizer, nn.functional.cross_entropy, loader, start_lr=1e-3,
                                 end_lr=1e-1, num_iter=6, skip_start=0, skip_end=0, accumulation_steps=k), grads)
    (big_r, big_g), (acc_r, acc_g) = runs["big"], runs["accumulated"]
    assert len(acc_r.lrs) == len(big_r.lrs) == 6 and acc_r.lrs == big_r.lrs  # one point per optimizer step
    assert len(acc_g) == len(big_g) == 6
    assert acc_r.losses == pytest.approx(big_r.losses, rel=1e-5)
    for step_a, step_b in zip(acc_g, big_g):
        for ga, gb in zip(step_a, step_b):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_validation_loss_every_k_steps_in_eval_mode(batches):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    modes = []
    handle = model.register_forward_hook(lambda m, i, o: modes.append((len(i[0]), m.training)))
    val = [(b[0][:8], b[1][:8]) for b in batches[:2]]  # 8 images: tells validation and training apart
    try:
        result = range_test(model, optimizer, nn.functional.cross_entropy, batches, start_lr=1e-4, end_lr=1.0,
                            num_iter=30, val_batches=val, val_every=3, skip_start=3, skip_end=3)
    finally:
        handle.remove()
    schedule = lr_schedule(1e-4, 1.0, 30, "exp")
    assert result.loss == "val" and result.val_every == 3
    assert result.lrs == schedule[2::3][:len(result.lrs)]
    n = len(result.lrs)
    assert n == 10 or result.stop_reason != "completed"
    assert [t for size, t in modes if size == 8] == [False] * (2 * n)  # eval mode, two batches per point
    assert all(t for size, t in modes if size == BATCH)
    assert (result.skip_start, result.skip_end) == (1, 1)
    assert all(math.isfinite(v) for v in result.losses)


def test_bad_val_and_group_settings_are_one_sentence(batches):
    model = make_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=0.1)
    cases = [
        (dict(start_lr=[1e-4, 1e-3, 1e-2]), "start_lr has 3 values but the optimizer has 2 parameter group"),
        (dict(start_lr=[1e-4, 1.0], end_lr=[1.0, 0.5]), "start_lr (1.0) must be below end_lr (0.5) for parameter group 1"),
        (dict(start_lr=[0.1, 0.2], end_lr=[0.1, 0.2]), "must be below end_lr ([0.1, 0.2]) for at least one parameter group"),
        (dict(start_lr=[0.1, 1e-4], end_lr=[0.1, 1.0]), "record_group (0) must be the index of a parameter group whose lr sweeps"),
        (dict(start_lr=[0.1, 1e-4], end_lr=[0.1, 1.0], record_group=2), "record_group (2)"),
        (dict(val_batches=[]), "val_batches must be a non-empty list"),
        (dict(val_batches=batches[:1], val_every=5, num_iter=39), "need at least 40"),
        (dict(accumulation_steps=0), "accumulation_steps (0)"),
        (dict(method="fastest"), "'fastest' is not a suggestion method"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(LrlabError) as info:
            range_test(model, optimizer, nn.functional.cross_entropy, batches, **kwargs)
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


# ---------------------------------------------------------------- result: chosen method, plot, JSON


def test_result_method_plot_and_json(tmp_path, batches):
    import matplotlib.pyplot as plt

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = range_test(model, optimizer, nn.functional.cross_entropy, batches, start_lr=1e-5, end_lr=10.0,
                        num_iter=60, method="min10")
    assert result.method == "min10" and result.suggestion == result.suggestions["min10"].lr
    assert result.max_lr == result.suggestions["max_lr"].lr
    assert isinstance(result.get("valley"), Suggestion)
    with pytest.raises(LrlabError, match="unknown suggestion method"):
        result.get("nope")
    fig = result.plot()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.patches) == 1  # the chosen method's band
    assert len(ax.get_lines()) >= 2 + len(result.suggestions)
    fig2, ax2 = plt.subplots()
    assert result.plot(ax=ax2, methods=list(result.suggestions)) is fig2 and len(ax2.patches) == len(result.suggestions)
    plt.close(fig)
    plt.close(fig2)
    back = RangeTestResult.load_json(result.save_json(tmp_path / "lr.json"))
    assert back == result and back.suggestion == result.suggestion
    raw = json.loads((tmp_path / "lr.json").read_text())
    assert raw["suggestion"] == result.suggestion and set(raw["suggestions"]) == set(result.suggestions)


def test_centered_smoothing_has_no_lag_unlike_the_ema():
    from lrlab.lr_finder.suggest import centered_smooth

    rng = np.random.default_rng(0)
    i = np.arange(60)
    truth = 2.3 - 0.3 * np.exp(-0.5 * ((i - 40) / 6) ** 2)  # minimum at 40
    curve = truth + rng.normal(0, 0.01, 60)
    centered = centered_smooth(curve)
    ema, avg = [], 0.0
    for n, v in enumerate(curve):
        avg = 0.98 * avg + 0.02 * v
        ema.append(avg / (1 - 0.98 ** (n + 1)))
    assert abs(int(np.argmin(centered)) - 40) <= 1
    assert int(np.argmin(ema)) >= 46  # the running EMA puts the minimum many points too late
    flat = slice(3, 18)  # where the true curve is level, the noise shrinks
    assert np.std(centered[flat] - truth[flat]) < np.std(curve[flat] - truth[flat]) / 2


def test_method_is_named_explicitly_and_defaults_to_steepest(batches):
    """The library has no "auto": choosing a method per optimizer is the application's policy."""
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    runs = {m: range_test(model, sgd, nn.functional.cross_entropy, batches, start_lr=1e-5, end_lr=1.0,
                          num_iter=30, **({} if m is None else {"method": m}))
            for m in (None, "max_lr")}
    default, max_lr = runs[None], runs["max_lr"]
    assert default.method == "steepest" and default.suggestion == default.suggestions["steepest"].lr
    assert max_lr.method == "max_lr" and max_lr.suggestion == max_lr.suggestions["max_lr"].lr
    assert default.losses == max_lr.losses and default.suggestions == max_lr.suggestions  # only the choice differs
    with LRRangeTest(model, sgd) as finder:
        assert finder.run(batches, nn.functional.cross_entropy, start_lr=1e-5, end_lr=1.0,
                          num_iter=30).method == "steepest"
    with pytest.raises(LrlabError) as info:
        range_test(model, sgd, nn.functional.cross_entropy, batches, method="auto")
    assert "'auto' is not a suggestion method" in str(info.value) and "\n" not in str(info.value)
    import lrlab.lr_finder as lib
    assert not hasattr(lib, "default_method") and not hasattr(lib, "steepest_descent")


def test_suggest_dispatches_through_the_one_registry():
    from lrlab.lr_finder import suggest_all

    assert list(METHODS) == ["steepest", "valley", "min10", "descent", "max_lr"]
    lrs, x = grid()
    y = -np.tanh(3 * (x + 2)) + np.where(x > -1, (x + 1) ** 2 * 20, 0)
    found, errors = suggest_all(lrs, y, skip_start=5, skip_end=5)
    assert list(found) == list(METHODS) and errors == {}
    for name, fn in METHODS.items():
        assert suggest(name, lrs, y, 5, 5) == fn(lrs, y, 5, 5) == found[name]
    with pytest.raises(LrlabError, match="unknown suggestion method 'auto'"):
        suggest("auto", lrs, y)


# ---------------------------------------------------------------- the library stands alone


LIBRARY = Path(__file__).resolve().parents[1] / "src" / "lrlab" / "lr_finder"


def module_imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules imported when the file is imported, modules imported only inside functions or
    under ``if TYPE_CHECKING:``) of one source file."""
    tree = ast.parse(path.read_text())
    deferred = [n for stmt in tree.body if isinstance(stmt, ast.If) and getattr(stmt.test, "id", "") == "TYPE_CHECKING"
                for n in ast.walk(stmt)]
    deferred += [n for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(fn)]
    now, later = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = {a.name for a in node.names} if isinstance(node, ast.Import) else {node.module or "."}
            (later if any(node is d for d in deferred) else now).update(names)
    return now, later


def test_the_library_imports_nothing_of_the_application():
    files = sorted(LIBRARY.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "finder.py", "plot.py", "result.py", "suggest.py"}
    for path in files:
        now, later = module_imports(path)
        for name in now | later:
            root = name.split(".")[0]
            assert (root in {"torch", "numpy", "matplotlib"} or root in sys.stdlib_module_names
                    or name in {"lrlab.errors", "lrlab.io"} or name.startswith("lrlab.lr_finder")), (path.name, name)
        assert not any(n.split(".")[0] == "matplotlib" for n in now), f"{path.name} imports matplotlib eagerly"
    _, later = module_imports(LIBRARY / "plot.py")
    assert "matplotlib.pyplot" in later


def test_no_long_functions_in_the_library():
    """Every function is at most 50 lines of code (docstrings, comments and blank lines not counted)."""
    for path in sorted(LIBRARY.glob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            first = fn.body[0]
            doc = first if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) else None
            skip = set(range(doc.lineno, doc.end_lineno + 1)) if doc else set()
            code = [ln for ln in range(fn.lineno, fn.end_lineno + 1)
                    if ln not in skip and lines[ln - 1].strip() and not lines[ln - 1].strip().startswith("#")]
            assert len(code) <= 50, f"{path.name}:{fn.name} has {len(code)} lines of code"
