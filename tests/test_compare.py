"""``lrlab compare``: parsing, one-line errors before any training, and a tiny real-image grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lrlab.cli import main
from lrlab.compare import build_variants, check_key, split_values, split_words
from lrlab.errors import LrlabError
from test_cli import write_recipe


def test_values_and_words_split_outside_brackets():
    assert split_values("sgd,adam") == ["sgd", "adam"]
    assert split_values("[3,6],[5,8]") == ["[3,6]", "[5,8]"]
    assert split_values("{width: 0.5, head_scale: 0.1},{width: 1}") == ["{width: 0.5, head_scale: 0.1}", "{width: 1}"]
    assert split_words("model.kwargs={norm: layer, dropout: 0.1} train.lr=0.1 name='a b'") == [
        "model.kwargs={norm: layer, dropout: 0.1}", "train.lr=0.1", "name=a b"]


def test_keys_are_checked_against_the_config():
    for key in ("train.optimizer", "train.cyclic.mode", "model.kwargs.dropout", "seed", "data.cutout"):
        check_key(key)
    cases = {"train.optimiser": "--vary key 'train.optimiser' does not exist; valid keys in train: epochs, batch_size,",
             "trian.lr": "--vary key 'trian.lr' does not exist; valid keys: name, seed,",
             "train.plateau": "--vary key 'train.plateau' is a section; vary one of its keys: factor, patience",
             "train.lr.peak": "--vary key 'train.lr.peak' does not exist; train.lr is a value, not a section"}
    for key, message in cases.items():
        with pytest.raises(LrlabError) as e:
            check_key(key)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_grid_and_explicit_variants():
    variants = build_variants(["train.optimizer=sgd,adam", "train.multistep.milestones=[3,6],[5,8],[]"],
                              ["plain sgd: train.optimizer=sgd train.momentum=0"])
    assert len(variants) == 1 + 2 * 3
    assert variants[0].label == "plain sgd" and variants[0].overrides == ["train.optimizer=sgd", "train.momentum=0"]
    assert variants[1].label == "optimizer=sgd multistep.milestones=[3,6]"
    assert variants[-1].overrides == ["train.optimizer=adam", "train.multistep.milestones=[]"]
    assert build_variants([], ["train.lr=0.1 train.epochs=2"])[0].label == "lr=0.1 epochs=2"
    for varies, variants, message in (
            (["train.lr=0.1", "train.lr=0.2"], [], "names the same key twice"),
            ([], [], "needs at least one --vary"),
            (["train.lr"], [], "must look like section.key=value1,value2"),
            ([], ["x: train.lr=0.1", "x: train.lr=0.2"], "both labelled 'x'"),
            ([], ["train.bogus=1"], "--variant key 'train.bogus' does not exist")):
        with pytest.raises(LrlabError, match=message):
            build_variants(varies, variants)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_tree, cache_dir):
    root = tmp_path_factory.mktemp("compare")
    recipe = write_recipe(root / "tiny.yaml", cache_dir, train={"schedule": "constant", "lr": 0.05},
                          data={"train_subset": 200, "test_subset": 100})
    return {"root": root, "recipe": recipe, "data": small_tree}


@pytest.mark.parametrize("argv, fragment", [
    (["--vary", "train.optimiser=sgd,adam"], "--vary key 'train.optimiser' does not exist; valid keys in train:"),
    (["--vary", "train.optimizer=sgd,lamb"], "variant 'optimizer=lamb': "),
    (["--vary", "train.schedule=onecycle", "--train-only"], "needs a max_lr: set train.max_lr or let the range test"),
    (["--variant", "c: train.schedule=cyclic train.max_lr=0.1 train.cyclic.base_lr=0.2"],
     "cyclic.base_lr (0.2) must be below the cyclic max_lr (0.1, train.max_lr)"),
])
def test_bad_compare_input_fails_before_any_training(tiny, tmp_path, capsys, argv, fragment):
    out = tmp_path / "out"
    status = main(["compare", str(tiny["recipe"]), "--data", str(tiny["data"]), "--out", str(out), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert fragment in err
    assert not out.exists()  # nothing trained, no folder


def test_one_cycle_without_max_lr_and_range_test_off_is_one_line(tiny, tmp_path, capsys):
    status = main(["run", str(tiny["recipe"]), "--data", str(tiny["data"]), "--out", str(tmp_path / "out"),
                   "train.schedule=onecycle", "lr_finder.enabled=false"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and not (tmp_path / "out").exists()
    assert err == ("error: train.schedule 'onecycle' needs a max_lr: set train.max_lr or let the range test "
                   "find it (lr_finder.enabled=true, the run command)")


def test_compare_end_to_end_on_real_images(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", str(tiny["recipe"]), "--data", str(tiny["data"]), "--out", str(out), "--train-only",
            "--variant", "a: train.weight_decay=0.0005 train.epochs=1",
            "--variant", "b: train.weight_decay=5.0e-4 train.epochs=1",
            "--variant", "broken: model.kwargs={width: 0.25, bogus: 1}",
            "--vary", "train.batch_size_milestones=[1]", "--vary", "train.schedule=cyclic,step", "train.max_lr=0.05"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    (compare_dir,) = out.iterdir()
    assert captured.out.strip() == f"compared 5 variants (1 failed); best: {json.loads((compare_dir / 'compare.json').read_text())['best']}: {compare_dir}"
    assert "variant 3/5: broken" in captured.err and "broken: failed: model 'fastnet' does not accept" in captured.err
    for name in ("accuracy.png", "loss.png", "lr.png", "results.csv", "results.md", "compare.json"):
        assert (compare_dir / name).stat().st_size > 0, name
    rows = {r["variant"]: r for r in csv.DictReader((compare_dir / "results.csv").open())}
    ramp_c, ramp_s = "batch_size_milestones=[1] schedule=cyclic", "batch_size_milestones=[1] schedule=step"
    assert list(rows) == ["a", "b", "broken", ramp_c, ramp_s]
    assert rows["broken"]["status"] == "failed" and "bogus" in rows["broken"]["error"]
    assert all(rows[k]["status"] == "ok" and float(rows[k]["wall_seconds"]) > 0 for k in rows if k != "broken")
    md = (compare_dir / "results.md").read_text().splitlines()
    assert md[0].startswith("| variant | best val top-1 (%) | at epoch | test top-1 there (%) |") and len(md) == 2 + 5
    assert any(line.startswith("| broken | failed: model 'fastnet'") for line in md)

    def history(label):
        return json.loads((Path(rows[label]["run_dir"]) / "history.json").read_text())

    # same seed and data order: two spellings of one config give the same run
    ha, hb = history("a"), history("b")
    assert [(r["train_loss"], r["val_acc"]) for r in ha] == [(r["train_loss"], r["val_acc"]) for r in hb]
    assert [(r["batch_size"], r["steps"]) for r in history(ramp_c)] == [(50, 4), (100, 2)]  # 200 images
    steps = list(csv.DictReader((Path(rows[ramp_c]["run_dir"]) / "lr_steps.csv").open()))
    assert len(steps) == 6 and [s["batch_size"] for s in steps] == ["50"] * 4 + ["100"] * 2
    cyclic = [float(s["lr"]) for s in steps]  # base 0.05 / 4 at the start, rising for 2 of 4 cycle epochs
    assert cyclic[0] == pytest.approx(0.0125) and cyclic == sorted(cyclic) and cyclic[-1] < 0.05
    assert float(rows[ramp_s]["lr"]) == 0.05
