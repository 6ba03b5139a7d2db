"""The validation split: a stratified, seeded hold-out of train; every decision (best checkpoint,
ReduceLROnPlateau, early stopping) reads it, the test split is only reported; `val_split: test`."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch import nn
from test_cli import write_recipe

from lrlab import pipeline
from lrlab.cli import main
from lrlab.compute import Compute
from lrlab.config import load_config
from lrlab.data import load_dataset
from lrlab.engine import evaluate, fit
from lrlab.errors import LrlabError
from lrlab.interpret import predict
from lrlab.run_folder import RunFolder
from lrlab.schedules import Constant

TINY = ["train.epochs=3", "train.schedule=plateau", "train.plateau.patience=0", "train.plateau.factor=0.5",
        "lr_finder.enabled=false", "train.lr=0.3", "explain.num_images=4"]


def _rows(split) -> Counter:
    """The images of a split as a multiset of their bytes."""
    return Counter(img.numpy().tobytes() for img in split.images)


def _config(small_tree, cache_dir, *overrides):
    return load_config(None, [f"data.path={small_tree}", f"data.cache_dir={cache_dir}", *overrides])


def test_hold_out_is_stratified_disjoint_and_seeded(small_tree, cache_dir):
    train = load_dataset(small_tree, cache_dir).train  # 50 images per class
    rest, held = train.hold_out(0.1, seed=3)
    assert torch.bincount(held.labels).tolist() == [5] * 10 and torch.bincount(rest.labels).tolist() == [45] * 10
    assert not set(_rows(rest)) & set(_rows(held))  # disjoint
    assert _rows(rest) + _rows(held) == _rows(train)  # together: all of train
    again, held_again = train.hold_out(0.1, seed=3)
    assert torch.equal(held_again.images, held.images) and torch.equal(again.labels, rest.labels)
    assert not torch.equal(train.hold_out(0.1, seed=4)[1].images, held.images)
    # load_data makes the same hold-out from `seed`, then subsets the rest (train_subset)
    data = pipeline.load_data(_config(small_tree, cache_dir, "seed=3", "data.train_subset=100"))
    assert torch.equal(data.val.images, held.images) and len(data.train) == 100
    assert not set(_rows(data.train)) & set(_rows(data.val))
    assert data.report_split is data.test and data.report_split_name == "test"
    small = pipeline.load_data(_config(small_tree, cache_dir, "data.val_fraction=0.4", "data.val_subset=30"))
    assert torch.bincount(small.val.labels).tolist() == [3] * 10 and len(small.train) == 300


def test_bad_val_settings_are_one_line_errors(small_tree, cache_dir, tmp_path, capsys):
    for bad in ("0.7", "0", "-0.1"):
        with pytest.raises(LrlabError, match=r"data\.val_fraction: .* use a fraction of the training images in "
                                             r"\(0, 0\.5\]") as e:
            load_config(None, [f"data.val_fraction={bad}"])
        assert "\n" not in str(e.value)
    with pytest.raises(LrlabError, match="val_subset has no effect with val_split: test"):
        load_config(None, ["data.val_split=test", "data.val_subset=50"])
    with pytest.raises(LrlabError, match="class 'airplane' of the training split has no image in the validation"):
        pipeline.load_data(_config(small_tree, cache_dir, "data.val_fraction=0.005"))  # 0.25 image per class
    recipe = write_recipe(tmp_path / "tiny.yaml", cache_dir)
    code = main(["run", str(recipe), "--data", str(small_tree), "--out", str(tmp_path / "runs"), "--quiet",
                 "data.val_fraction=0.9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.val_fraction" in err[0] and "(0, 0.5]" in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.fixture(scope="module")
def val_run(tmp_path_factory, small_tree, cache_dir):
    """3 tiny epochs with ReduceLROnPlateau (patience 0, factor 0.5) judged on the hold-out."""
    root = tmp_path_factory.mktemp("val_run")
    recipe = write_recipe(root / "tiny.yaml", cache_dir)
    assert main(["run", str(recipe), "--data", str(small_tree), "--out", str(root / "runs"), "--quiet", *TINY]) == 0
    (run_dir,) = (root / "runs").iterdir()
    return RunFolder.open(run_dir)


def test_best_checkpoint_and_plateau_schedule_read_the_validation_split(val_run, small_tree, cache_dir):
    summary, history = val_run.read_json("summary"), val_run.read_json("history")
    accs, losses = [r["val_acc"] for r in history], [r["val_loss"] for r in history]
    assert summary["val_split"] == "val" and summary["val_images"] == 50 and summary["train_images"] == 450
    assert summary["best_epoch"] == 1 + max(range(len(accs)), key=lambda i: (accs[i], -i))
    assert summary["best_val_acc"] == max(accs) and summary["final_val_acc"] == accs[-1]
    assert summary["early_stop"] is None and summary["epochs"] == 3
    # best.pt holds the weights of the best validation epoch: they score its val accuracy on the hold-out
    config = load_config(val_run.file("config"))
    setup = pipeline.prepare(config, range_test=False, train=False, explain=False)
    best = val_run.load_checkpoint("best_checkpoint")
    assert best["history"][-1]["epoch"] == summary["best_epoch"]
    setup.model.load_state_dict(best["model"])
    loss, acc = evaluate(setup.model, pipeline.eval_loader(setup, setup.data.val), setup.compute)
    assert acc == pytest.approx(summary["best_val_acc"]) and loss == pytest.approx(losses[summary["best_epoch"] - 1])
    # ... and the test accuracy reported for it is that of the same weights on the test split
    pred = predict(setup.model, pipeline.eval_loader(setup, setup.data.test), setup.compute)
    assert summary["test_acc_at_best"] == pytest.approx(pred.accuracy) and len(pred) == summary["test_images"] == 200
    # ReduceLROnPlateau saw the validation losses: its best is their minimum, and each epoch
    # without a (relative 1e-4) improvement halved the lr (patience 0)
    plateau = val_run.load_checkpoint("last_checkpoint")["schedule"]["plateau"]
    assert plateau["best"] == min(losses)
    lr, low = 0.3, float("inf")
    for r in history:
        if r["val_loss"] < low * (1 - 1e-4):
            low = r["val_loss"]
        else:
            lr *= 0.5
        assert r["lr"] == pytest.approx(lr)


def test_early_stopping_on_validation_accuracy_and_resume():
    """A linear model trained at lr 0 never improves: with patience 2 training ends after epoch 3,
    and a run resumed from the epoch-2 checkpoint stops at the same place."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 4, 4), torch.arange(64) % 4
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    saved: list[tuple[dict, bool]] = []

    def run(resume=None):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return fit(model, batches, batches, opt, Constant(opt, 0.0), 10, Compute(), early_stop_patience=2,
                   checkpoint=lambda state, best: saved.append((state, best)), resume=resume)

    history = run()
    assert [r["epoch"] for r in history.records] == [1, 2, 3] and [b for _, b in saved] == [True, False, False]
    assert history.early_stop == {"reason": "the validation accuracy did not improve for 2 epochs", "epoch": 3,
                                  "best_epoch": 1, "patience": 2}
    resumed = run(resume=saved[1][0])
    assert [r["epoch"] for r in resumed.records] == [1, 2, 3] and resumed.early_stop == history.early_stop


def test_val_split_test_makes_the_test_split_decide_and_says_so(small_tree, cache_dir, tmp_path):
    data = pipeline.load_data(_config(small_tree, cache_dir, "data.val_split=test", "data.test_subset=100"))
    assert data.val is data.test and len(data.val) == 100 and len(data.train) == 500  # no hold-out
    recipe = write_recipe(tmp_path / "tiny.yaml", cache_dir)
    assert main(["run", str(recipe), "--data", str(small_tree), "--out", str(tmp_path / "runs"), "--quiet",
                 *TINY, "train.epochs=1", "data.val_split=test"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_split"] == "test" and summary["val_images"] == summary["test_images"] == 200
    assert summary["final_test_acc"] == pytest.approx(summary["final_val_acc"])  # same split, same model, no TTA
    header = (run_dir / "report.html").read_text().split("</header>")[0]
    assert "selected on the test set" in header



def test_one_test_pass_when_the_best_checkpoint_is_the_final_model(small_tree, cache_dir, tmp_path, monkeypatch):
    """With one epoch best.pt holds the final weights: the test split is predicted once (it is the
    slowest part of a run's end with TTA) and both reported accuracies are that pass's."""
    calls = []
    real = pipeline.predict_test
    monkeypatch.setattr(pipeline, "predict_test", lambda setup: calls.append(1) or real(setup))
    recipe = write_recipe(tmp_path / "tiny.yaml", cache_dir)
    assert main(["run", str(recipe), "--data", str(small_tree), "--out", str(tmp_path / "runs"), "--quiet",
                 *TINY, "train.epochs=1", "train.tta=true"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(calls) == 1 and summary["best_epoch"] == summary["epochs"] == 1
    assert 0 <= summary["final_test_acc"] == summary["test_acc_at_best"] <= 1
    # the check behind it: a state dict is the model's only while every weight and buffer is equal
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert pipeline._holds(model, state)
    state["1.running_mean"][0] += 1e-3
    assert not pipeline._holds(model, state)
    assert not pipeline._holds(model, {k: v for k, v in state.items() if k != "1.num_batches_tracked"})
