import pytest
import torch

from lrlab.config import TrainConfig
from lrlab.optim import build_optimizer
from lrlab.schedules import OneCycle, Plateau


def _optimizer():
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0, momentum=0.9)


def test_one_cycle_is_linear_up_to_max_lr_then_down():
    opt = _optimizer()
    sched = OneCycle(opt, max_lr=0.4, total_steps=101, warmup_pct=0.25, div=10, final_div=1000)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(100):
        sched.step_batch()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.04)
    assert max(lrs) == pytest.approx(0.4) and lrs.index(max(lrs)) == 25
    assert lrs[-1] == pytest.approx(0.4 / 1000)
    up = torch.diff(torch.tensor(lrs[:26], dtype=torch.float64))
    down = torch.diff(torch.tensor(lrs[25:], dtype=torch.float64))
    assert torch.allclose(up, up[0]) and torch.allclose(down, down[0]) and down[0] < 0


def test_plateau_cuts_after_patience_plus_one_flat_epochs():
    opt = _optimizer()
    sched = Plateau(opt, lr=0.1, factor=0.1, patience=2)
    lrs = []
    for loss in [1.0, 0.9, 0.9, 0.9, 0.9, 0.9]:
        sched.step_epoch(loss)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(TrainConfig(weight_decay=5e-4, nesterov=True), model, lr=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4 and [p.ndim for p in decayed["params"]] == [4]
    assert plain["weight_decay"] == 0 and len(plain["params"]) == 3
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


# ------------------------------------------------------------------ closed forms (issue 4)

import math  # noqa: E402

from lrlab.config import load_config  # noqa: E402
from lrlab.errors import LrlabError  # noqa: E402
from lrlab.schedules import (  # noqa: E402
    Clock, Cyclic, Warmup, batch_sizes, build_schedule, check_batch_sizes,
)


def _trajectory(sched, opt, steps_per_epoch, losses=None):
    """lr of every optimizer step, stepping the schedule as engine.fit does."""
    lrs = []
    for e, n in enumerate(steps_per_epoch):
        for _ in range(n):
            lrs.append(opt.param_groups[0]["lr"])
            sched.step_batch()
        sched.step_epoch(losses[e] if losses else 1.0)
    return lrs


def _cfg(*overrides):
    return load_config(None, list(overrides)).train


def test_one_cycle_peaks_at_max_lr_at_pct_start_via_build_schedule():
    opt = _optimizer()
    sched = build_schedule(_cfg("train.schedule=onecycle", "train.epochs=4", "train.onecycle.warmup_pct=0.3"), opt, 0.8, Clock(25, 4))
    lrs = _trajectory(sched, opt, [25] * 4)
    assert len(lrs) == 100 and max(lrs) == pytest.approx(0.8)
    assert lrs.index(max(lrs)) == round(0.3 * 99)
    assert lrs[0] == pytest.approx(0.08) and lrs[-1] == pytest.approx(0.8e-3)


def test_step_multistep_exponential_cosine_closed_forms():
    spe = [10] * 6
    cases = {
        ("train.schedule=step", "train.step.step_size=2", "train.step.gamma=0.5"): lambda t: 0.4 * 0.5 ** ((t // 10) // 2),
        ("train.schedule=multistep", "train.multistep.milestones=[1,4]", "train.multistep.gamma=0.1"):
            lambda t: 0.4 * 0.1 ** sum(t // 10 >= m for m in (1, 4)),
        ("train.schedule=multistep",): lambda t: 0.4 * 0.1 ** sum(t // 10 >= m for m in (3, 4)),  # 50%, 75% of 6
        ("train.schedule=exponential", "train.exponential.gamma=0.8"): lambda t: 0.4 * 0.8 ** (t // 10),
        ("train.schedule=cosine", "train.cosine.min_lr=0.01"):
            lambda t: 0.01 + (0.4 - 0.01) * (1 + math.cos(math.pi * t / 60)) / 2,
        ("train.schedule=constant",): lambda t: 0.4,
    }
    for overrides, law in cases.items():
        opt = _optimizer()
        lrs = _trajectory(build_schedule(_cfg("train.epochs=6", *overrides), opt, 0.4, Clock(10, 6)), opt, spe)
        assert lrs == pytest.approx([law(t) for t in range(60)], rel=1e-12), overrides


def test_cyclic_period_is_exact_and_modes_scale_the_amplitude():
    clock = Clock(10, epochs=8)  # 10 steps per epoch, cycle of 2 epochs = 20 steps
    opt = _optimizer()
    tri = Cyclic(opt, 0.01, 0.1, cycle_epochs=2, clock=clock, mode="triangular")
    lrs = [tri.lr_at(t) for t in range(80)]
    assert lrs[:60] == pytest.approx(lrs[20:80], abs=1e-15)  # period exactly 20 steps
    assert lrs[0] == pytest.approx(0.01) and lrs[10] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01)
    assert torch.allclose(torch.diff(torch.tensor(lrs[:11], dtype=torch.float64)), torch.tensor(0.009, dtype=torch.float64))
    tri2 = Cyclic(opt, 0.01, 0.1, 2, clock, mode="triangular2")
    assert [tri2.lr_at(10 + 20 * c) for c in range(3)] == pytest.approx([0.1, 0.055, 0.0325])
    exp = Cyclic(opt, 0.01, 0.1, 2, clock, mode="exp_range", gamma=0.5)
    assert exp.lr_at(30) == pytest.approx(0.01 + 0.09 * 0.5 ** 3)
    # through build_schedule, stepped: the lr of each step follows lr_at
    opt = _optimizer()
    sched = build_schedule(_cfg("train.schedule=cyclic", "train.epochs=4", "train.cyclic.cycle_epochs=2",
                                "train.cyclic.base_lr=0.01"), opt, 0.1, Clock(10, 4))
    assert _trajectory(sched, opt, [10] * 4) == pytest.approx(lrs[:40])


def test_warmup_is_linear_then_hands_over():
    opt = _optimizer()
    sched = build_schedule(_cfg("train.schedule=step", "train.epochs=6", "train.warmup_epochs=1.5",
                                "train.step.step_size=3", "train.step.gamma=0.1"), opt, 0.3, Clock(10, 6))
    assert isinstance(sched, Warmup) and sched.warmup_steps == 15
    lrs = _trajectory(sched, opt, [10] * 6)
    assert lrs[:15] == pytest.approx([0.3 * (t + 1) / 15 for t in range(15)])
    assert lrs[15:30] == pytest.approx([0.3] * 15) and lrs[30:] == pytest.approx([0.03] * 30)
    # in front of ReduceLROnPlateau: ramps to the plateau's lr, which then cuts as torch does
    opt = _optimizer()
    sched = build_schedule(_cfg("train.schedule=plateau", "train.epochs=4", "train.warmup_epochs=1",
                                "train.plateau.patience=0"), opt, 0.2, Clock(4, 4))
    lrs = _trajectory(sched, opt, [4] * 4, losses=[1.0, 0.5, 0.5, 0.5])
    assert lrs == pytest.approx([0.05, 0.1, 0.15, 0.2] + [0.2] * 8 + [0.02] * 4)  # cut after epoch 3


def test_plateau_cooldown_follows_torch():
    opt = _optimizer()
    sched = Plateau(opt, lr=1.0, factor=0.5, patience=1, cooldown=2)
    lrs = []
    for loss in [1.0] + [2.0] * 8:
        sched.step_epoch(loss)
        lrs.append(opt.param_groups[0]["lr"])
    # cut after 2 flat epochs (patience + 1); then 2 cooldown epochs are not counted
    assert lrs == pytest.approx([1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])


def test_batch_size_ramp_steps_per_epoch_and_one_cycle_length():
    cfg = _cfg("train.epochs=5", "train.batch_size=16", "train.batch_size_milestones=[2,4]",
               "train.batch_size_factor=2", "train.schedule=onecycle")
    sizes = batch_sizes(cfg)
    assert sizes == [16, 16, 32, 32, 64]
    steps = [100 // b for b in sizes]  # 100 images, last partial batch dropped
    assert steps == [6, 6, 3, 3, 1]
    opt = _optimizer()
    sched = build_schedule(cfg, opt, 0.5, Clock(steps))
    assert sched.total_steps == 19
    lrs = _trajectory(sched, opt, steps)
    assert len(lrs) == 19 and lrs[-1] == pytest.approx(0.5 / 1000)
    check_batch_sizes(cfg, 64)
    with pytest.raises(LrlabError, match="batch_size 64 at epoch 5 is larger than the 63 training images"):
        check_batch_sizes(cfg, 63)


def test_batch_size_ramp_in_fit_records_steps_lrs_and_batch_sizes(tmp_path):
    import csv

    from lrlab.compute import Compute
    from lrlab.data import BatchLoader, Split
    from lrlab.engine import fit
    from lrlab.run_folder import RunFolder

    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (100, 8, 8, 3), dtype=torch.uint8, generator=g),
                  torch.randint(0, 3, (100,), generator=g))
    cfg = _cfg("train.epochs=3", "train.batch_size=10", "train.batch_size_milestones=[1,2]",
               "train.batch_size_factor=2.5", "train.schedule=cosine")
    sizes = batch_sizes(cfg)
    loader = BatchLoader(split, sizes[0], mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, drop_last=True)
    test = BatchLoader(split, 50, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    opt = build_optimizer(cfg, model, 0.1)
    sched = build_schedule(cfg, opt, 0.1, Clock([100 // b for b in sizes]))
    history = fit(model, loader, test, opt, sched, 3, Compute(), batch_sizes=sizes)
    assert [r["batch_size"] for r in history.records] == [10, 25, 62]
    assert [r["steps"] for r in history.records] == [10, 4, 1]
    assert history.step_lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 15)) for t in range(15)])
    RunFolder(tmp_path).save_history(history, "ramp", [])
    rows = list(csv.DictReader((tmp_path / "lr_steps.csv").open()))
    assert len(rows) == 15 and rows[10]["epoch"] == "2" and rows[10]["batch_size"] == "25"
    assert float(rows[3]["lr"]) == history.step_lrs[3]


def test_bad_schedule_input_is_one_line():
    with pytest.raises(LrlabError) as e:
        load_config(None, ["train.schedule=linear"])
    assert "train.schedule" in str(e.value) and "onecycle" in str(e.value) and "cyclic" in str(e.value)
    assert "\n" not in str(e.value)


def test_config_names_come_from_the_registries():
    from lrlab.config import TrainConfig
    from lrlab.optim import OPTIMIZERS
    from lrlab.schedules import CYCLIC_MODES, SCHEDULES

    for name in SCHEDULES.names():  # every registered name is accepted and builds
        opt = _optimizer()
        cfg = _cfg(f"train.schedule={name}")
        build_schedule(cfg, opt, 0.5, Clock(4, cfg.epochs))
    for name in OPTIMIZERS.names():
        assert load_config(None, [f"train.optimizer={name}"]).train.optimizer == name
    for name in CYCLIC_MODES:
        assert _cfg(f"train.cyclic.mode={name}").cyclic.mode == name
    for key, bad in (("train.optimizer", "lion"), ("train.cyclic.mode", "sine")):
        with pytest.raises(LrlabError, match=f"{key}.*'{bad}'.*valid"):
            load_config(None, [f"{key}={bad}"])
    # every schedule with options has its config section, named after it
    assert {n for n, c in SCHEDULES.items() if c.Options} <= set(TrainConfig.model_fields)
