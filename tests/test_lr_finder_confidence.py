"""Range-test confidence (issue 14): repeated sweeps from one restored state, the spread of each
method's suggestion and its verdict, the spike-aware window, per-group ratios during the sweep,
and find-lr / the report with lr_finder.repeats.

Real CIFAR-10 images and a real FastNet (width 0.25) for the sweeps; synthetic curves for the
window rule, where the spike has to be planted exactly.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, TensorDataset

from lrlab import pipeline
from lrlab.cli import main
from lrlab.config import load_config
from lrlab.lr_finder import (METHODS, STABLE_RANGE, LRRangeTest, RangeTestResult, analyse, centered_smooth,
                             spike_cut, suggest_all, suggestion_spread)
from lrlab.lr_plan import layer_scales
from lrlab.models import build

from conftest import CIFAR_DIR, load_images

N = 100
X = np.linspace(-5, 1, N)  # log10 lr, 1e-5 .. 10
LRS = (10 ** X).tolist()


# ---------------------------------------------------------------- repeated sweeps, real


@pytest.fixture(scope="module")
def loader():
    """320 real training images in a loader that reshuffles on every iteration (batch 32)."""
    x, y, _ = load_images(CIFAR_DIR, "train", 32)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def test_repeated_sweeps_start_from_one_state_and_restore_it_bit_for_bit(loader, tmp_path):
    torch.manual_seed(0)
    model = build("fastnet", 10, width=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    for x, y in list(loader)[:2]:  # momentum buffers and BN statistics that are not trivial
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    before = ({k: v.clone() for k, v in model.state_dict().items()},
              [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()])
    firsts, step = [], []

    def first_step(opt, args, kwargs):  # the state every repeat's first step starts from
        if len(step) % 30 == 0:
            firsts.append([p.detach().clone() for p in model.parameters()])
        step.append(1)

    hook = register_optimizer_step_pre_hook(first_step)
    try:
        with LRRangeTest(model, optimizer) as finder:
            result = finder.run(loader, nn.functional.cross_entropy, start_lr=1e-3, end_lr=3.0, num_iter=30,
                                skip_start=3, skip_end=2, diverge_factor=1e9, method="valley", repeats=3)
    finally:
        hook.remove()
    assert len(step) == 90 and len(firsts) == 3 and len(result.repeats) == 3
    # step 0 of every repeat sees the same parameters (before its first update: same as saved)
    for params in firsts[1:]:
        assert all(torch.equal(a, b) for a, b in zip(firsts[0], params))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    for p, buf in zip(model.parameters(), before[1]):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], buf)
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)

    curves = [r.losses for r in result.repeats]
    assert curves[0] != curves[1] and curves[1] != curves[2]  # new data orders
    n = min(len(c) for c in curves)
    assert result.losses == pytest.approx(np.mean([c[:n] for c in curves], axis=0).tolist(), rel=1e-12)
    found, _, cut = analyse(result.lrs, result.losses, 3, 2)
    assert {k: s.lr for k, s in result.suggestions.items()} == {k: s.lr for k, s in found.items()}
    assert result.cut_index == cut and set(result.spread) == set(METHODS)
    for name, sp in result.spread.items():
        given = [r.suggestions[name].lr for r in result.repeats if name in r.suggestions]
        if len(given) >= 2:
            assert sp.geo_range == pytest.approx(max(given) / min(given)) and sp.geo_std >= 1
        assert sp.verdict == ("stable" if len(given) == 3 and sp.geo_range <= STABLE_RANGE else "unstable")
    row = next(r for r in result.rows() if r["method"] == "valley")
    assert row["used"] and row["verdict"] == result.spread["valley"].verdict

    back = RangeTestResult.load_json(result.save_json(tmp_path / "lr.json"))
    assert back == result and back.spread == result.spread
    old = json.loads((tmp_path / "lr.json").read_text())
    for key in ("repeats", "spread", "cut_index", "cut_lr"):
        del old[key]  # a file written before repeats and the window cut existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    legacy = RangeTestResult.load_json(tmp_path / "old.json")
    assert legacy.repeats == [] and legacy.spread == {} and legacy.cut_index is None
    fig = result.plot()
    assert sum(line.get_label() == "3 repeats" for line in fig.axes[0].lines) == 1
    assert len(fig.axes[0].lines) >= 3 + 2  # thin repeat curves, raw and smoothed loss
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_spread_and_verdict_of_given_suggestions():
    from lrlab.lr_finder import Suggestion

    def sugg(lr):
        return {m: Suggestion(m, lr * (2 if m == "min10" else 1), 0, lr / 2, lr * 2) for m in METHODS}

    per_repeat = [sugg(0.1), sugg(0.12), sugg(0.14)]
    per_repeat[2] = {**per_repeat[2], "min10": Suggestion("min10", 0.9, 0, 0.3, 1.0)}
    spread = suggestion_spread(per_repeat)
    assert spread["steepest"].geo_range == pytest.approx(1.4) and spread["steepest"].verdict == "stable"
    logs = np.log([0.1, 0.12, 0.14])
    assert spread["steepest"].geo_std == pytest.approx(math.exp(np.std(logs, ddof=1)))
    assert spread["min10"].geo_range == pytest.approx(0.9 / 0.2) and spread["min10"].verdict == "unstable"
    del per_repeat[1]["valley"]  # one repeat without a suggestion: never stable
    assert suggestion_spread(per_repeat)["valley"].verdict == "unstable"
    assert suggestion_spread(per_repeat[:1]) == {}


# ---------------------------------------------------------------- spike-aware window, synthetic


def descent_curve(seed: int, noise: float = 0.02) -> np.ndarray:
    """Flat start at 2.3, descent around lr 1e-3 to ~1.3, slowly falling plateau, plus noise."""
    rng = np.random.default_rng(seed)
    y = 2.3 - 1.0 / (1 + np.exp(-(X + 3) / 0.3)) - 0.03 * np.clip(X + 2.5, 0, None)
    return y + rng.normal(0, noise, N)


def diverging(seed: int) -> np.ndarray:
    """The clean curve: descent, minimum near lr 0.1, then the loss rises for good."""
    return descent_curve(seed) + 6 * np.clip(X + 1, 0, None) ** 2


def spiking(seed: int) -> np.ndarray:
    """The same curve, but the rise at lr 0.1 is a spike: up for 8 points (to lr 0.3), down to a
    LOWER minimum (1.0) from lr 1 to 2.5, and only then the real divergence."""
    y, noise = diverging(seed), descent_curve(seed) - descent_curve(seed, 0)
    peak, bottom, end = (int(np.searchsorted(X, v)) for v in (-0.5, 0.0, 0.4))
    y[peak:bottom] = np.linspace(y[peak], 1.0, bottom - peak)
    y[bottom:] = 1.0 + 8 * np.clip(X[bottom:] - X[end], 0, None) ** 2 + noise[bottom:]
    return y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_planted_spike_does_not_move_any_suggestion(seed):
    clean, spiked = diverging(seed), spiking(seed)
    assert centered_smooth(spiked).min() < centered_smooth(clean).min() - 0.05  # the spike falls to a lower minimum
    found_clean, _, cut_clean = analyse(LRS, clean)
    found_spike, _, cut_spike = analyse(LRS, spiked)
    assert cut_clean is not None and cut_spike is not None and abs(cut_clean - cut_spike) <= 1
    assert 0.07 < LRS[cut_spike] < 0.3  # at the rise, after the minimum near lr 0.1
    assert set(found_clean) == set(found_spike) == set(METHODS)
    for m in METHODS:
        assert found_spike[m].lr == pytest.approx(found_clean[m].lr, rel=0.16), m  # at most one grid step
    # without the cut, the spike's second descent drags the suggestions up
    whole, _ = suggest_all(LRS, centered_smooth(spiked))
    moved = [m for m in METHODS if whole[m].lr / found_clean[m].lr > 3]
    assert {"steepest", "min10", "max_lr"} <= set(moved)
    uncut, _, none = analyse(LRS, spiked, cut_spikes=False)  # what Muon's own sweep reads
    assert none is None and {k: s.lr for k, s in uncut.items()} == {k: s.lr for k, s in whole.items()}


@pytest.mark.parametrize("seed", range(5))
def test_clean_curves_keep_their_suggestions(seed):
    """The cut lands on the final rise, after the minimum; noise never cuts, nor does a flat start."""
    y = diverging(seed) + np.random.default_rng(100 + seed).normal(0, 0.05, N)  # noisier raw loss
    found, _, cut = analyse(LRS, y)
    whole, _ = suggest_all(LRS, centered_smooth(y))
    assert cut is not None and LRS[cut] > LRS[int(np.argmin(centered_smooth(y)))]
    assert {k: s.lr for k, s in found.items()} == {k: s.lr for k, s in whole.items()}
    flat = 2.3 + np.random.default_rng(seed).normal(0, 0.05, N)  # no descent: nothing to cut after
    assert spike_cut(centered_smooth(flat)) is None
    no_rise = descent_curve(seed)
    assert spike_cut(centered_smooth(no_rise)) is None


# ---------------------------------------------------------------- per-group ratios, pipeline


def test_every_group_keeps_its_ratio_at_every_step_of_every_repeat(small_tree, cache_dir):
    """Discriminative lrs (train.lr_ratio over layer groups) times Muon's lr_ratio: at every step
    of both repeats each group's lr / the recorded (top) lr is its scale."""
    config = load_config(None, [f"data.path={small_tree}", f"data.cache_dir={cache_dir}", "model.kwargs={width: 0.25}",
                                "train.batch_size=50", "train.optimizer=muon", "train.muon.lr_ratio=0.25",
                                "train.layer_groups=[[stem, block1, block2], [block3, fc]]", "train.lr_ratio=10",
                                "lr_finder.num_iter=16", "lr_finder.skip_start=2", "lr_finder.skip_end=2",
                                "lr_finder.start_lr=1e-3", "lr_finder.end_lr=1", "lr_finder.repeats=2",
                                "lr_finder.diverge_factor=1e9"])
    setup = pipeline.prepare(config, range_test=True, train=True, explain=False)
    seen = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(
        [(g["layer_group"], g["use_muon"], g["lr"]) for g in opt.param_groups]) if hasattr(opt, "muon") else None)
    try:
        result = pipeline.range_test(setup)
    finally:
        hook.remove()
    scales = layer_scales(2, 10)
    assert len(seen) == 64 and len(result.repeats) == 2 and len(result.muon.repeats) == 2
    assert {(lg, mu) for lg, mu, _ in seen[0]} == {(0, False), (0, True), (1, False), (1, True)}
    for i, groups in enumerate(seen[:32]):  # every group together
        top = result.repeats[i // 16].lrs[i % 16]
        for lg, muon, lr in groups:
            assert lr == pytest.approx(top * scales[lg] * (0.25 if muon else 1.0), rel=1e-12), (i, lg, muon)
    for i, groups in enumerate(seen[32:]):  # then Muon's alone (recorded: the top group's), the rest held
        top = result.muon.repeats[i // 16].lrs[i % 16]
        for lg, muon, lr in groups:
            want = top * scales[lg] if muon else result.suggestion * scales[lg]
            assert lr == pytest.approx(want, rel=1e-12), (i, lg, muon)
    assert result.muon.start_lr == 1e-4 and result.muon.end_lr == 3.0
    plan = pipeline.make_plan(setup, result)
    assert plan.muon_lr_ratio == pytest.approx(result.muon.suggestion / result.suggestion)


def test_muons_sweep_when_the_top_layer_group_is_the_head_alone(small_tree, cache_dir):
    """Muon's groups all sit below the top (head-only) group, at layer scale 1/10: the sweep
    records that group at Muon's lr x 1/10 and the plan's ratio undoes the scale, so the
    group trains at Muon's suggestion."""
    config = load_config(None, [f"data.path={small_tree}", f"data.cache_dir={cache_dir}", "model.kwargs={width: 0.25}",
                                "train.batch_size=50", "train.optimizer=muon", "train.schedule=onecycle",
                                "train.layer_groups=[[stem, block1, block2, block3], [fc]]", "train.lr_ratio=10",
                                "lr_finder.num_iter=16", "lr_finder.skip_start=2", "lr_finder.skip_end=2",
                                "lr_finder.start_lr=1e-3", "lr_finder.end_lr=1", "lr_finder.diverge_factor=1e9"])
    setup = pipeline.prepare(config, range_test=True, train=True, explain=False)
    result = pipeline.range_test(setup)
    assert result.muon.start_lr == pytest.approx(1e-5) and result.muon.end_lr == pytest.approx(0.3)
    plan = pipeline.make_plan(setup, result)
    muon_row = next(r for r in plan.rows() if r["group"].endswith("(Muon)") and r["group"].startswith("stem"))
    assert muon_row["lr"] == pytest.approx(result.muon.suggestion)  # Muon's group at the lr its sweep suggests


# ---------------------------------------------------------------- find-lr and the report


def test_find_lr_prints_spread_and_verdict_and_the_report_says_it(small_tree, cache_dir, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "data": {"cache_dir": str(cache_dir)}, "model": {"name": "fastnet", "kwargs": {"width": 0.25}},
        "lr_finder": {"start_lr": 1e-4, "end_lr": 10, "num_iter": 30, "skip_start": 5, "repeats": 3},
        "train": {"epochs": 1, "batch_size": 50, "schedule": "onecycle"}}))
    out = tmp_path / "runs"
    assert main(["find-lr", str(recipe), "--data", str(small_tree), "--out", str(out)]) == 0
    (run_dir,) = out.iterdir()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["method", "lr", "range", "of", "good", "lrs", "spread", "verdict"]
    data = json.loads((run_dir / "lr_finder.json").read_text())
    assert len(data["repeats"]) == 3 and set(data["spread"]) == set(METHODS)
    rows = {line.split()[0]: line for line in lines[1:6]}
    for m, sp in data["spread"].items():
        if m in data["suggestions"]:
            assert sp["verdict"] in rows[m].split() and f"{sp['geo_range']:.2f}x" in rows[m]
    assert any(line.startswith("lr from the mean of 3 sweeps") for line in lines)
    assert (data["cut_lr"] is None) == (not any(line.startswith("window cut at lr") for line in lines))
    assert lines[-1].startswith(f"suggested lr {data['suggestion']:.3g}")
    from lrlab.report import write_report
    from lrlab.run_folder import RunFolder

    page = write_report(RunFolder.open(run_dir)).read_text()
    assert "repeated 3 times over different data orders" in page and "spread over repeats" in page
