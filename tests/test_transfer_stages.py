"""Transfer learning in stages (lrlab.transfer) on real CIFAR-10 images with lrlab's FastNet.

Stage 1 trains the head with the backbone frozen (parameters and BatchNorm running statistics
bit for bit unchanged); stage 2 fine-tunes the top layer groups with discriminative lrs. Each
stage has its own range test, the curves and the report mark the boundary, and a run killed in
stage 2 resumes in stage 2.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lrlab import transfer
from lrlab.cli import main
from lrlab.compute import eval_mode
from lrlab.config import load_config
from lrlab.engine import Trainer
from lrlab.lr_plan import LRPlan, layer_scales
from lrlab.optim import build_optimizer
from lrlab.pipeline import Callbacks, Setup, eval_loader, prepare, resume_pipeline, train
from lrlab.run_folder import RunFolder
from lrlab.schedules import Constant
from test_cli import write_recipe

KEYS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "steps", "stage"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, small_tree, cache_dir) -> Path:
    """FastNet x0.25 (layer groups stem, block1, block2, block3, fc), batch 50: 9 steps an epoch."""
    root = tmp_path_factory.mktemp("transfer")
    return write_recipe(root / "tiny.yaml", cache_dir, data={"path": str(small_tree)},
                        lr_finder={"num_iter": 20}, explain={"num_images": 2})


def states_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, model: nn.Module) -> set[str]:
    """Top-level module names whose parameters or buffers differ from ``before`` at all."""
    return {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def pretrained(recipe: Path, *overrides: str) -> Setup:
    """The model after one epoch of ordinary training of every layer, a stand-in for pretrained
    weights (meaningful features and BatchNorm statistics) without a download."""
    config = load_config(recipe, ["lr_finder.enabled=false", "train.max_lr=0.2", "train.epochs=1", *overrides])
    setup = prepare(config, range_test=False, train=True, explain=False)
    train(setup, LRPlan.make(config))
    return setup


def test_stage1_trains_the_head_only_and_frozen_batchnorm_stays_in_eval_mode(recipe):
    setup = pretrained(recipe, "transfer.freeze_epochs=1")
    model = setup.model
    head, fine = transfer.stages(setup.config, model)
    assert head.number == 1 and head.config.train.epochs == 1 and head.config.train.layer_groups == [["fc"]]
    assert fine.config.train.epochs == 1 and len(fine.config.train.layer_groups) == 5
    before = states_of(model)
    frozen = transfer.freeze(model, head.trainable)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # the optimizer holds the head only: no update and no weight decay for the backbone
    optimizer = build_optimizer(head.config.train, model, 0.1)
    assert [p for g in optimizer.param_groups for p in g["params"]] == [model.fc.weight]
    model.train()
    assert model.training and norms and not any(m.training for m in norms)
    with eval_mode(model):
        assert not model.training
    x, y = next(iter(eval_loader(setup, setup.data.val, 50)))
    list(setup.compute.forward_batches(model, [(x, y)]))
    assert model.training and not any(m.training for m in norms)  # flags restored, frozen ones stay eval

    history = train(Setup(head.config, setup.compute, setup.data, model), LRPlan.make(head.config), stage=1)
    assert [r["stage"] for r in history.records] == [1]
    assert changed(before, model) == {"fc"}  # stem, blocks, their BN running stats: bit for bit
    frozen.undo()
    model.train()
    assert all(m.training for m in norms) and type(norms[0]) is nn.BatchNorm2d
    # the stem's whitening filters were frozen by FastNet itself and stay frozen
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["stem.0.weight"]


def test_stage2_unfreezes_the_top_groups_with_discriminative_lrs(recipe):
    setup = pretrained(recipe, "transfer.unfreeze=2", "train.lr_ratio=100", "train.optimizer=sgd",
                       "train.momentum=0", "train.weight_decay=0")
    model = setup.model
    (fine,) = transfer.stages(setup.config, model)  # freeze_epochs 0: stage 2 only
    t = fine.config.train
    assert t.layer_groups == [["block3"], ["fc"]]
    plan = LRPlan.make(fine.config)
    # each trained group keeps the scale it has when all 5 groups train: lr / 100^(1/4) for block3
    assert plan.scales == pytest.approx(layer_scales(5, 100)[3:]) and plan.group_names == ("block3", "fc")
    frozen = transfer.freeze(model, fine.trainable)
    optimizer = build_optimizer(t, model, plan.lr, plan.scales)
    trainer = Trainer(model, optimizer, Constant(optimizer, plan.lr), setup.compute)
    x, y = next(iter(eval_loader(setup, setup.data.train, 50)))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    old = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    trainer.step(setup.compute.to_device(x), y.to(setup.compute.device))
    for group in optimizer.param_groups:  # plain SGD: the step moved every parameter by lr_group x grad
        assert group["lr"] == pytest.approx(plan.lr * plan.scales[group["layer_group"]])
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            torch.testing.assert_close(old[name] - p.detach(), group["lr"] * p.grad, rtol=1e-4, atol=1e-7)
    assert {n.split(".")[0] for n in params} == {"block3", "fc"}

    before = states_of(model)
    history = train(Setup(fine.config, setup.compute, setup.data, model), plan, stage=2)
    assert [r["stage"] for r in history.records] == [2]
    assert changed(before, model) == {"block3", "fc"}  # stem, block1, block2 stay frozen
    frozen.undo()


def lrlab(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lrlab.cli", *args, "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


STAGED = ["transfer.freeze_epochs=1", "train.epochs=3", "train.lr_ratio=10", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    """An uninterrupted two-stage run: 1 epoch of the head (9 steps), 3 of fine-tuning (27)."""
    out = tmp_path_factory.mktemp("transfer_ref")
    assert main(["run", str(recipe), "--out", str(out), *STAGED, "--quiet"]) == 0
    (run,) = out.iterdir()
    return run


def test_run_in_stages_saves_both_range_tests_and_marks_the_boundary(reference):
    run = RunFolder.open(reference)
    history = json.loads(run.file("history").read_text())
    assert [r["stage"] for r in history] == [1, 2, 2, 2] and [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert run.file("history_csv").read_text().splitlines()[0].endswith(",stage")
    assert len(run.file("lr_steps").read_text().splitlines()) == 1 + 9 + 27
    head, fine = run.load_range_test(1), run.load_range_test()
    assert head is not None and fine is not None and head.losses != fine.losses  # two sweeps
    assert run.file("range_test_figure_stage1").is_file() and run.file("range_test_figure").is_file()
    assert run.load_plan(1).group_names == ("fc",) and len(run.load_plan().group_names) == 5
    summary = json.loads(run.file("summary").read_text())
    stages = summary["stages"]
    assert [(s["stage"], s["epochs"]) for s in stages] == [(1, 1), (2, 3)]
    assert stages[0]["lr"] == run.load_plan(1).lr and stages[1]["lr"] == summary["lr"] == run.load_plan().lr
    assert summary["best_epoch"] == max(history, key=lambda r: (r["val_acc"], -r["epoch"]))["epoch"]
    page = run.file("report").read_text()
    section = page[page.index('<section id="range-test">'):page.index('<section id="curves">')]
    assert section.count("<img") == 2 and "Stage 1: head only, backbone frozen" in section
    assert "Stage 2: fine-tuning" in section
    assert "stage boundary (between epochs 1 and 2)" in page and "<h3>Stages</h3>" in page


def test_bad_unfreeze_is_one_line_and_leaves_no_folder(recipe, tmp_path, capsys):
    assert main(["run", str(recipe), "--out", str(tmp_path), "transfer.unfreeze=6", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: transfer.unfreeze=6 is more than the 5 layer groups of fastnet; use all or 1 to 5"
    assert list(tmp_path.iterdir()) == []


def test_killed_in_stage2_resumes_in_stage2(recipe, reference, tmp_path):
    proc = lrlab("run", str(recipe), "--out", str(tmp_path), *STAGED)
    deadline = time.monotonic() + 300
    while True:  # stage 2's range test saved, then a checkpoint of stage 2: kill
        found = sorted(tmp_path.glob("*/lr_finder.json"))
        last = found[0].parent / "checkpoints" / "last.pt" if found else None
        if last is not None and last.stat().st_mtime_ns > found[0].stat().st_mtime_ns:
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = RunFolder.open(found[0].parent)
    state = run.load_checkpoint("last_checkpoint")
    assert state["stage"] == 2 and 9 < state["step"] < 36 and not run.file("summary").exists()
    stage1 = {k: run.file(k).stat().st_mtime_ns for k in ("range_test_stage1", "lr_plan_stage1", "range_test")}

    calls = []
    resume_pipeline(run, Callbacks(on_stage=lambda name, total: calls.append((name, total))))
    assert calls == [("train", 27), ("explain", 0)]  # no range test, no stage-1 training
    assert {k: run.file(k).stat().st_mtime_ns for k in stage1} == stage1
    ref = RunFolder.open(reference)
    ours, theirs = (json.loads(r.file("history").read_text()) for r in (run, ref))
    assert [{k: r[k] for k in KEYS} for r in ours] == [{k: r[k] for k in KEYS} for r in theirs]
    assert run.file("lr_steps").read_text() == ref.file("lr_steps").read_text()
    a, b = (r.load_checkpoint("last_checkpoint")["model"] for r in (run, ref))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_find_lr_on_a_transfer_recipe_sweeps_the_first_stage(recipe, tmp_path):
    assert main(["find-lr", str(recipe), "--out", str(tmp_path), "transfer.freeze_epochs=1", "--quiet"]) == 0
    (folder,) = tmp_path.iterdir()
    run = RunFolder.open(folder)
    assert run.load_plan().group_names == ("fc",)  # the head, as stage 1 trains it: not every group
    assert json.loads(run.file("summary").read_text())["stages"] == [{"stage": 1, "name": "head only, backbone frozen"}]
