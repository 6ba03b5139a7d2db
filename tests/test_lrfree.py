"""LR-free optimizers (issue 14): Schedule-Free SGD/AdamW, Prodigy, D-Adaptation SGD/Adam and DoG
with its averager, selected by name; their plan (no range test, the package's default lr), their
state in checkpoints (a resumed run matches the uninterrupted one bit for bit), the eval weights
in best.pt, and bad combinations as one line; real CIFAR-10 images, FastNet at width 0.25."""

from __future__ import annotations

import io
import json
import math
import signal
import time

import pytest
import torch
import torch.nn.functional as F

from lrlab.cli import main
from lrlab.compute import Compute
from lrlab.config import load_config
from lrlab.data import BatchLoader, load_dataset
from lrlab.engine import evaluate, fit
from lrlab.eval_weights import eval_weights
from lrlab.lr_plan import LRPlan
from lrlab.models import build
from lrlab.optim import OPTIMIZERS, build_optimizer, lr_free
from lrlab.pipeline import eval_loader, prepare
from lrlab.schedules import Constant
from test_cli import write_recipe
from test_resume import assert_same_run, lrlab, only_run, wait_for

NAMES = ["schedulefree_sgd", "schedulefree_adamw", "prodigy", "dadapt_sgd", "dadapt_adam", "dog"]
DEFAULT_LR = {"schedulefree_sgd": 1.0, "schedulefree_adamw": 0.0025, "prodigy": 1.0, "dadapt_sgd": 1.0,
              "dadapt_adam": 1.0, "dog": 1.0}


def test_every_name_is_registered_once_with_its_packages_default_lr():
    assert [n for n in OPTIMIZERS.names() if lr_free(n) is not None] == NAMES
    assert lr_free("sgd") is None and lr_free("muon") is None
    for name in NAMES:
        plan = LRPlan.make(load_config(None, [f"train.optimizer={name}", "train.schedule=constant"]))
        assert plan.lr == DEFAULT_LR[name] and plan.lr_free and plan.kind == "initial"
        assert plan.source == f"LR-free optimizer: lr = {DEFAULT_LR[name]:g} (the package's default)"
        assert LRPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_the_plan_keeps_an_explicit_lr_and_replaces_undocumented_schedules():
    plan = LRPlan.make(load_config(None, ["train.optimizer=prodigy", "train.lr=0.5", "train.schedule=cosine"]))
    assert (plan.lr, plan.source, plan.schedule) == (0.5, "train.lr", None)  # cosine: in Prodigy's README
    plan = LRPlan.make(load_config(None, ["train.optimizer=schedulefree_sgd", "train.schedule=onecycle"]))
    assert plan.schedule == "constant" and plan.kind == "initial" and plan.lr == 1.0
    assert plan.notes[0] == ("train.schedule onecycle replaced by constant: schedulefree.SGDScheduleFree is "
                             "documented with constant")
    plan = LRPlan.make(load_config(None, ["train.optimizer=dog", "train.schedule=onecycle", "train.max_lr=0.4"]))
    assert plan.lr == 1.0 and plan.notes[1] == "train.max_lr 0.4 not used: the constant schedule has no peak"
    plan = LRPlan.make(load_config(None, ["train.optimizer=dadapt_sgd", "train.schedule=onecycle"]))
    assert plan.schedule is None and plan.kind == "peak" and plan.lr == 1.0  # D-Adaptation: any schedule


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_tree, cache_dir):
    """``lrlab run`` (dog, schedulefree_sgd) or ``lrlab train`` (the others) of the tiny recipe
    (one-cycle) with each LR-free optimizer: 2 epochs of 500 real images."""
    root = tmp_path_factory.mktemp("lrfree")
    recipe = write_recipe(root / "tiny.yaml", cache_dir, data={"path": str(small_tree)}, explain={"num_images": 4})
    out = {}
    for name in NAMES:
        command = "run" if name in ("dog", "schedulefree_sgd") else "train"
        assert main([command, str(recipe), "--out", str(root / name), f"train.optimizer={name}", "--quiet"]) == 0
        (out[name],) = (root / name).iterdir()
    return {"recipe": recipe, "runs": out, "data": small_tree}


@pytest.mark.parametrize("name", NAMES)
def test_each_name_learns_a_batch_at_its_default_lr(small_tree, cache_dir, name):
    """100 steps on one batch of 50 real images from FastNet's initialisation: the training
    loss falls to a quarter (DoG and D-Adaptation SGD ramp their step size up the slowest)."""
    data = load_dataset(small_tree, cache_dir)
    x, y = next(iter(BatchLoader(data.train, 50, mean=data.mean, std=data.std, shuffle=True, seed=0)))
    torch.manual_seed(0)
    model = build("fastnet", 10, width=0.25)
    config = load_config(None, [f"train.optimizer={name}"])
    opt = build_optimizer(config.train, model, LRPlan.make(config).lr)
    weights = eval_weights(opt, model)
    weights.use_train()
    losses = []
    for _ in range(100):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        weights.after_step()
        losses.append(loss.item())
    assert losses[0] > math.log(10) - 0.1 and max(losses[-5:]) < losses[0] / 4


@pytest.mark.parametrize("name", NAMES)
def test_each_name_trains_through_the_cli_without_a_range_test(runs, name):
    """2 epochs of 9 steps: too short for some to learn (see the test above), long enough to show
    the run trains with the name, its plan, its state and its report."""
    run = runs["runs"][name]
    history = json.loads((run / "history.json").read_text())
    assert [r["steps"] for r in history] == [9, 9] and all(math.isfinite(r["val_loss"]) for r in history)
    plan = json.loads((run / "lr_plan.json").read_text())
    assert plan["lr_free"] and plan["lr"] == DEFAULT_LR[name]
    assert not (run / "range_test.json").exists()  # `run` skips the range test
    report = (run / "report.html").read_text()
    assert "LR-free optimizer: lr = " in report and "no LR range test" in report
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    torch.manual_seed(0)
    start = build("fastnet", 10, width=0.25).state_dict()  # the run's initialisation (seed 0)
    assert not torch.equal(state["model"]["block2.conv1.weight"], start["block2.conv1.weight"])
    assert state["optimizer"]["state"] and (state["eval_weights"] is None) == (name not in ("dog", "schedulefree_sgd",
                                                                                           "schedulefree_adamw"))


@pytest.mark.parametrize("name", ["schedulefree_sgd", "dog"])
def test_best_checkpoint_holds_the_eval_weights(runs, name):
    """best.pt's model is schedule-free's x (BatchNorm statistics recomputed there) or DoG's average:
    evaluated again it gives the recorded validation accuracy; the trained weights differ."""
    run = runs["runs"][name]
    config = load_config(runs["recipe"], [f"train.optimizer={name}"])
    setup = prepare(config, range_test=False, train=False, explain=False, init_from_data=False)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    record = next(r for r in json.loads((run / "history.json").read_text()) if r["epoch"] == best["epoch"])
    val = eval_loader(setup, setup.data.val)
    setup.model.load_state_dict(best["model"])
    loss, acc = evaluate(setup.model, val, setup.compute)
    assert acc == record["val_acc"] and loss == pytest.approx(record["val_loss"], rel=1e-6)
    trained = best["eval_weights"]["trained"]
    assert not torch.equal(trained["fc.weight"], best["model"]["fc.weight"])
    setup.model.load_state_dict(trained)
    assert evaluate(setup.model, val, setup.compute)[0] != pytest.approx(record["val_loss"], rel=1e-6)


def _fit(name, data, epochs, checkpoint=None, checkpoint_every=0, resume=None):
    config = load_config(None, [f"train.optimizer={name}"])
    torch.manual_seed(0)
    model = build("fastnet", 10, width=0.25)
    plan = LRPlan.make(config)
    opt = build_optimizer(config.train, model, plan.lr, plan.scales)
    loader = BatchLoader(data.train, 50, mean=data.mean, std=data.std, shuffle=True, augment="tensor", seed=0)
    val = BatchLoader(data.test, 100, mean=data.mean, std=data.std, shuffle=False)
    fit(model, loader, val, opt, Constant(opt, plan.lr), epochs, Compute(torch.device("cpu"), None),
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)
    return model


def _saved(states: list):
    """A checkpoint callback keeping each state as it would come back from disk."""
    def save(state, best):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        states.append(torch.load(buf, weights_only=True))
    return save


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_mid_epoch_checkpoint_matches_the_uninterrupted_run(small_tree, cache_dir, name):
    """Optimizer state (schedule-free's z, Prodigy's and D-Adaptation's d, DoG's distances) and
    DoG's averager go into the checkpoint; switching to the eval weights for a checkpoint and
    back leaves training untouched, so resuming from step 3 of epoch 1 ends bit for bit where a
    run without any checkpoint ends."""
    data = load_dataset(small_tree, cache_dir)
    reference = _fit(name, data, 2)
    states: list = []
    _fit(name, data, 1, checkpoint=_saved(states), checkpoint_every=3)
    assert states[0]["step"] == 3 and states[0]["epoch"] == 0
    resumed = _fit(name, data, 2, resume=states[0])
    a, b = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer=prodigy"], "error: train.optimizer prodigy is LR-free (prodigyopt.Prodigy trains at lr 1, "
     "the package's default), so the LR range test does not apply; use 'lrlab run' or 'lrlab train'"),
    (["train.optimizer=dog", "train.lr_scale_rule=linear"], "error: train.lr_scale_rule linear does not apply to "
     "the LR-free train.optimizer dog (its lr is not meant for a batch size); set train.lr_scale_rule=none"),
    (["train.optimizer=prodigy", "train.lr_ratio=10", "train.layer_groups=[[stem], [block1, block2, block3]]"],
     "error: train.optimizer prodigy trains every parameter group at one lr"),
    (["train.optimizer=schedulefree_sgd", "train.momentum=0"], "error: train.optimizer schedulefree_sgd needs "
     "train.momentum in (0, 1)"),
])
def test_bad_combinations_are_one_line(runs, tmp_path, capsys, overrides, message):
    command = "find-lr" if len(overrides) == 1 else "run"
    assert main([command, str(runs["recipe"]), "--out", str(tmp_path), *overrides, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["schedulefree_sgd", "dog"])
def test_lrlab_resume_after_sigint_matches_the_uninterrupted_run(runs, tmp_path, name):
    """The real command: `lrlab train` stopped by SIGINT in epoch 2 (a checkpoint of its own, at
    the eval weights) and `lrlab resume` end bit for bit where the uninterrupted run ends."""
    args = ["train", str(runs["recipe"]), "train.epochs=3", f"train.optimizer={name}"]
    assert main([*args, "--out", str(tmp_path / "ref"), "--quiet"]) == 0
    proc = lrlab(*args, "--out", str(tmp_path / "stopped"))
    wait_for("*/checkpoints/last.pt", tmp_path / "stopped", proc)  # end of epoch 1
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate()
    assert proc.returncode == 130
    run = only_run(tmp_path / "stopped")
    assert not (run / "summary.json").exists()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] < 3 and state["eval_weights"]["trained"] is not None
    assert main(["resume", str(run), "--quiet"]) == 0
    assert_same_run(run, only_run(tmp_path / "ref"))
