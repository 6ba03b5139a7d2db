"""LRPlan: the learning rate resolved once; discriminative lrs per layer group through optimizer,
schedule and range test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lrlab import pipeline
from lrlab.config import load_config
from lrlab.errors import LrlabError
from lrlab.lr_finder import RangeTestResult, analyse
from lrlab.lr_plan import LRPlan, layer_scales, muon_method, suggestion_method
from lrlab.models import build
from lrlab.optim import build_optimizer
from lrlab.schedules import Clock, build_schedule


def cfg(*overrides):
    return load_config(None, list(overrides))


def test_where_the_lr_comes_from():
    onecycle = cfg("train.schedule=onecycle", "lr_finder.lr_factor=2")
    plan = LRPlan.make(onecycle, 0.3, "max_lr")
    assert (plan.lr, plan.kind, plan.suggestion) == (0.6, "peak", 0.3)
    assert plan.source == "range test: max_lr 0.3 x lr_factor 2"
    peak = LRPlan.make(cfg("train.schedule=onecycle", "train.max_lr=0.1"), 0.3, "max_lr")
    assert (peak.lr, peak.source, peak.suggestion) == (0.1, "train.max_lr", None)  # max_lr wins over the test
    step = LRPlan.make(cfg("train.schedule=step", "train.lr=0.2", "train.max_lr=0.9"))
    assert (step.lr, step.kind, step.source) == (0.2, "initial", "train.lr")  # max_lr is only a peak
    assert LRPlan.make(cfg("train.schedule=step", "train.lr=0.2"), 0.7, "steepest").lr == 0.7
    assert LRPlan.from_dict(plan.to_dict()) == plan


def test_lr_errors_are_checked_once_before_and_after_the_range_test():
    onecycle = cfg("train.schedule=onecycle")
    with pytest.raises(LrlabError, match="needs a max_lr: set train.max_lr or let the range test find it"):
        LRPlan.check(onecycle, range_test_runs=False)
    LRPlan.check(onecycle, range_test_runs=True)  # the test will provide it
    cyclic = cfg("train.schedule=cyclic", "train.cyclic.base_lr=0.5")
    LRPlan.check(cyclic, range_test_runs=True)  # the peak is not known yet
    with pytest.raises(LrlabError, match=r"base_lr \(0.5\) must be below the cyclic max_lr \(0.2, range test: "):
        LRPlan.make(cyclic, 0.2, "max_lr")
    with pytest.raises(LrlabError, match=r"base_lr \(0.5\) must be below the cyclic max_lr \(0.1, train.max_lr\)") as e:
        LRPlan.check(cfg("train.schedule=cyclic", "train.cyclic.base_lr=0.5", "train.max_lr=0.1"), True)
    assert "\n" not in str(e.value)


def test_auto_suggestion_method_follows_the_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert suggestion_method("auto", torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)) == "max_lr"
    assert suggestion_method("auto", torch.optim.Adam(params)) == "steepest"
    assert suggestion_method("valley", torch.optim.SGD(params, lr=0.1)) == "valley"
    # fine-tuning a pretrained network: descent with SGD; adaptive optimizers keep steepest
    assert suggestion_method("auto", torch.optim.SGD(params, lr=0.1), fine_tuning=True) == "descent"
    assert suggestion_method("auto", torch.optim.AdamW(params), fine_tuning=True) == "steepest"
    assert suggestion_method("max_lr", torch.optim.SGD(params, lr=0.1), fine_tuning=True) == "max_lr"
    model = build("fastnet", 10, width=0.25)
    for aux, rule in (("sgd", "max_lr"), ("adamw", "steepest")):  # Muon: the rule of the plan's (auxiliary) lr
        muon = build_optimizer(cfg("train.optimizer=muon", f"train.muon.aux_optimizer={aux}").train, model, 0.1)
        assert suggestion_method("auto", muon) == rule


def muon_curve(losses: list[float]) -> RangeTestResult:
    """A Muon sweep's result over 1e-4..3 with every method's suggestion read from ``losses``."""
    lrs = np.geomspace(1e-4, 3.0, len(losses)).tolist()
    found, errors, _ = analyse(lrs, losses, skip_start=3, skip_end=2, cut_spikes=False)
    return RangeTestResult(lrs=lrs, losses=losses, smoothed=losses, mode="exp", start_lr=1e-4, end_lr=3.0,
                           num_iter=len(lrs), stop_reason="end", suggestions=found, suggestion_errors=errors,
                           skip_start=3, skip_end=2)


def test_muons_own_sweep_reads_max_lr_where_its_curve_turns_else_min10():
    falling = muon_curve(np.linspace(2.3, 1.6, 30).tolist())  # BatchNorm'd filters: no turning point
    x = np.linspace(0.0, 1.0, 30)
    turning = muon_curve((2.3 - 0.4 * np.tanh(8 * x - 5) - 0.4 + 0.6 * np.clip(x - 0.75, 0, None)).tolist())
    assert muon_method("auto", falling) == "min10"
    assert muon_method("auto", turning) == "max_lr"
    lowest = turning.get("max_lr").high
    assert turning.get("max_lr").lr < lowest < turning.lrs[-3]  # the peak sits below the turn, inside the window
    assert muon_method("valley", falling) == "valley"  # any other method as given


def test_muons_lr_from_its_sweep_or_the_recipes_ratio():
    muon = cfg("train.optimizer=muon", "train.schedule=onecycle", "train.muon.lr_ratio=0.1", "lr_finder.lr_factor=2")
    swept = LRPlan.make(muon, 0.3, "max_lr", (0.045, "descent"))
    assert (swept.lr, swept.muon_lr_ratio) == (0.6, pytest.approx(0.15))  # Muon at 0.045 x lr_factor 2
    assert swept.rows()[1] == {"group": "all (Muon)", "lr": pytest.approx(0.09), "kind": "peak",
                               "source": "Muon's range test: descent 0.045 x lr_factor 2"}
    assert LRPlan.from_dict(swept.to_dict()) == swept
    kept = LRPlan.make(muon, 0.3, "max_lr")  # no Muon sweep (lr_finder.muon.enabled=false)
    assert (kept.muon_lr_ratio, kept.rows()[1]["source"]) == (0.1, "range test: max_lr 0.3 x lr_factor 2 x "
                                                                   "train.muon.lr_ratio 0.1")
    fixed = LRPlan.make(cfg("train.optimizer=muon", "train.schedule=onecycle", "train.max_lr=0.2"), 0.3, "max_lr",
                        (0.045, "descent"))  # the recipe's lr: the sweeps are not used, nor is Muon's
    assert (fixed.lr, fixed.muon_lr_ratio) == (0.2, 0.1)
    assert LRPlan.make(cfg(), 0.3, "max_lr", (0.045, "descent")).muon_lr_ratio is None  # not Muon


def test_discriminative_lrs_per_layer_group_through_optimizer_and_schedule():
    config = cfg("train.layer_groups=[[stem, block1], [block2], [block3]]", "train.lr_ratio=100",
                 "train.schedule=onecycle", "train.max_lr=0.5", "train.epochs=2")
    plan = LRPlan.make(config)
    assert plan.scales == pytest.approx((0.01, 0.1, 1.0)) and plan.group_names == ("stem+block1", "block2", "block3")
    assert [r["group"] for r in plan.rows()] == ["block3", "block2", "stem+block1"]  # top first
    model = build("fastnet", 10, width=0.25)
    opt = build_optimizer(config.train, model, plan.lr, plan.scales)
    owner = {id(p): name.split(".")[0] for name, p in model.named_parameters()}
    for g in opt.param_groups:
        tops = {owner[id(p)] for p in g["params"]}
        expected = {0: {"stem", "block1"}, 1: {"block2"}, 2: {"block3", "fc"}}[g["layer_group"]]  # fc: unnamed -> top
        assert tops <= expected and g["lr_scale"] == pytest.approx(plan.scales[g["layer_group"]])
    assert opt.param_groups[0]["layer_group"] == 2  # the reference (top) group first
    sched = build_schedule(config.train, opt, plan.lr, Clock(10, 2))
    for _ in range(13):  # warm-up and decay: the ratios hold at every step
        top = sched.lr
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(top * plan.scales[g["layer_group"]], rel=1e-12)
        sched.step_batch()
    with pytest.raises(LrlabError, match="train.layer_groups names 'block9'.*valid names: stem, block1"):
        build_optimizer(cfg("train.layer_groups=[[block9], [fc]]").train, model, 0.1, layer_scales(2, 10))
    assert layer_scales(1, 10) == (1.0,) and layer_scales(3, 4) == pytest.approx((0.25, 0.5, 1.0))


def test_range_test_sweeps_every_layer_group_at_its_ratio(small_tree, cache_dir):
    config = load_config(None, [f"data.path={small_tree}", f"data.cache_dir={cache_dir}", "model.kwargs={width: 0.25}",
                                "train.batch_size=50", "train.layer_groups=[[stem, block1, block2], [block3, fc]]",
                                "train.lr_ratio=10", "lr_finder.num_iter=20", "lr_finder.skip_start=2",
                                "lr_finder.skip_end=2", "lr_finder.start_lr=1e-3", "lr_finder.end_lr=1"])
    setup = pipeline.prepare(config, range_test=True, train=True, explain=False)
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append({g["layer_group"]: g["lr"] for g in opt.param_groups}))
    try:
        result = pipeline.range_test(setup)
    finally:
        hook.remove()
    assert len(seen) == len(result.lrs) >= 15
    for lrs, recorded in zip(seen, result.lrs):
        assert lrs[1] == pytest.approx(recorded) and lrs[0] == pytest.approx(recorded / 10)  # top group recorded
    plan = pipeline.make_plan(setup, result)
    assert plan.group_lrs == pytest.approx((plan.lr / 10, plan.lr))
