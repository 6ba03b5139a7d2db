"""Data-parallel training under torchrun (lrlab.distributed): two gloo ranks on this CPU train the
same weights as one process with the same global batch and seed; bad input stops every rank
with one line from rank 0; the lr scaling rule; the loader's shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import REPO, make_subset_tree
from lrlab.cli import main
from lrlab.config import load_config
from lrlab.data import BatchLoader, load_dataset
from lrlab.lr_plan import LRPlan
from lrlab.run_folder import RunFolder

# timm's small ConvNeXt test model: LayerNorm, no BatchNorm, so the two ranks' steps are exactly the
# one-process steps (BatchNorm would normalise over each rank's half of the batch instead).
RECIPE = {"name": "ddp", "seed": 3, "compute": {"device": "cpu", "precision": "fp32"},
          "data": {"train_subset": 512, "val_fraction": 0.1},
          "model": {"name": "timm:test_convnext"}, "lr_finder": {"enabled": False},
          "train": {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "schedule": "constant"},
          "explain": {"num_images": 2}}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """600 real training images (512 after the 10% hold-out and the subset) and 100 test images."""
    return make_subset_tree(tmp_path_factory.mktemp("ddp_tree"), 60, 10)


def _recipe(tmp_path, tree, cache, **train) -> str:
    recipe = {**RECIPE, "data": {**RECIPE["data"], "path": str(tree), "cache_dir": str(cache)},
              "train": {**RECIPE["train"], **train}}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def _torchrun(args: list[str], log_dir) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=2 -m lrlab ARGS`` (gloo, one thread per rank),
    each rank's output in ``log_dir``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--log-dir", str(log_dir), "--redirects", "3", "-m", "lrlab", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def _rank_logs(log_dir, name: str) -> list[str]:
    """Each rank's ``name`` (stdout.log / stderr.log) under torchrun's ``--log-dir``, rank 0 first."""
    files = sorted(log_dir.rglob(name), key=lambda p: int(p.parent.name))
    return [f.read_text() for f in files]


def _only_run(out) -> RunFolder:
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return RunFolder.open(folders[0])


def test_two_ranks_train_the_one_process_weights(tmp_path, tree):
    recipe = _recipe(tmp_path, tree, tmp_path / "cache")
    assert main(["run", recipe, "--out", str(tmp_path / "one"), "--quiet"]) == 0
    done = _torchrun(["run", recipe, "--out", str(tmp_path / "two"), "--quiet"], tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _only_run(tmp_path / "one"), _only_run(tmp_path / "two")  # rank 1 wrote no folder
    a, b = (r.load_checkpoint("last_checkpoint") for r in (one, two))
    assert a["step"] == b["step"] == 8  # 512 images / a global batch of 64
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    # the records: training metrics over the whole global batches, validation over the whole split
    ra, rb = a["history"][0], b["history"][0]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    summary = two.read_json("summary")
    assert summary["world_size"] == 2 and summary["train_images"] == 512
    outs = _rank_logs(tmp_path / "logs", "stdout.log")
    assert len(outs) == 2 and outs[0].startswith("best val top-1") and outs[1] == ""


def test_a_run_stopped_in_one_process_resumes_under_torchrun(tmp_path, tree):
    """SIGTERM after a few steps of a one-process run, then ``torchrun ... -m lrlab resume``: the
    two ranks continue from rank 0's checkpoint and end at the uninterrupted run's weights."""
    recipe = _recipe(tmp_path, tree, tmp_path / "cache", checkpoint_every=1)
    assert main(["train", recipe, "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "lrlab", "train", recipe, "--out", str(out), "--quiet"],
                            env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(out.glob("*/" + RunFolder.FILES["last_checkpoint"])) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read()
    run = _only_run(out)
    stopped_at = run.load_checkpoint("last_checkpoint")["step"]
    assert 1 <= stopped_at < 8
    done = _torchrun(["resume", str(run.path), "--quiet"], tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (r.load_checkpoint("last_checkpoint") for r in (_only_run(tmp_path / "whole"), run))
    assert b["step"] == 8 and b["epoch"] == 1
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_batch_that_does_not_split_over_the_ranks_is_one_line_on_rank_0(tmp_path, tree):
    recipe = _recipe(tmp_path, tree, tmp_path / "cache", batch_size=63)
    done = _torchrun(["train", recipe, "--out", str(tmp_path / "out")], tmp_path / "logs")
    assert done.returncode != 0
    errs = _rank_logs(tmp_path / "logs", "stderr.log")
    assert errs[0] == ("error: train.batch_size 63 (epoch 1) does not split evenly over 2 torchrun ranks; "
                       "use a multiple of 2 (it is the global batch)\n")
    assert not any(line.startswith("error") for line in errs[1].splitlines())
    assert "exitcode  : 2" in done.stderr and "Traceback" not in "".join(errs)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_lr_scale_rule_scales_recipe_lrs_and_range_test_suggestions():
    base = ["train.lr=0.1", "train.batch_size=512", "train.lr_base_batch=128", "train.schedule=constant"]
    plan = LRPlan.make(load_config(None, base + ["train.lr_scale_rule=linear"]))
    assert plan.lr == pytest.approx(0.4) and plan.batch_scale == pytest.approx(4.0)
    assert "linear: batch 512 / 128" in plan.source
    plan = LRPlan.make(load_config(None, base + ["train.lr_scale_rule=sqrt"]))
    assert plan.lr == pytest.approx(0.2) and plan.rows()[0]["source"] == plan.source
    assert LRPlan.make(load_config(None, base)).lr == 0.1  # none: as written
    # the range test's suggestion is for its own batch (lr_finder.batch_size, else train.batch_size)
    config = load_config(None, base + ["train.lr_scale_rule=linear", "lr_finder.batch_size=256"])
    assert LRPlan.make(config, 0.03, "steepest").lr == pytest.approx(0.06)
    config = load_config(None, base + ["train.lr_scale_rule=linear"])
    assert LRPlan.make(config, 0.03, "steepest").lr == pytest.approx(0.03)
    assert LRPlan.from_dict({k: v for k, v in plan.to_dict().items() if k != "batch_scale"}).batch_scale == 1.0


@pytest.mark.parametrize("augment", ["tensor", "none"])
def test_the_shards_of_a_batch_are_the_one_process_batch(tree, tmp_path, augment):
    split = load_dataset(tree, tmp_path / "cache").train.subset(200, seed=0)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=augment == "tensor", augment=augment, seed=5,
              drop_last=augment == "tensor")
    whole = list(BatchLoader(split, 64, **kw))
    parts = [list(BatchLoader(split, 64, shard=(r, 3), **kw)) for r in range(3)]
    assert len(whole) == (3 if augment == "tensor" else 4)
    for i, (x, y) in enumerate(whole):  # 64 = 21 + 21 + 22; the last of 200 (8) = 2 + 3 + 3
        torch.testing.assert_close(torch.cat([p[i][0] for p in parts]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
