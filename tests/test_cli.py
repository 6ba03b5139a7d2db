"""The lrlab command end to end on a tiny recipe of real images, and its bad-input errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lrlab.cli import main
from conftest import REPO
from lrlab.models import build

RUN_FILES = ["config.yaml", "lr_finder.json", "lr_finder.png", "lr_plan.json", "history.csv", "history.json", "loss.png",
             "accuracy.png", "misclassified.png", "gradcam.png", "summary.json", "mistakes.json",
             "checkpoints/last.pt", "checkpoints/best.pt"]


def write_recipe(path: Path, cache_dir: Path, **sections) -> Path:
    recipe = {"name": "tiny", "data": {"cache_dir": str(cache_dir), "cutout": 8},
              "model": {"name": "fastnet", "kwargs": {"width": 0.25}},
              "lr_finder": {"start_lr": 1e-4, "end_lr": 10, "num_iter": 30, "skip_start": 5},
              "train": {"epochs": 2, "batch_size": 50, "schedule": "onecycle"},
              "explain": {"num_images": 9}}
    for key, value in sections.items():
        recipe[key].update(value)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, small_tree, cache_dir):
    """One finished tiny run (the 'earlier run' every bad command must leave alone)."""
    root = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(root / "tiny.yaml", cache_dir)
    out = root / "runs"
    assert main(["run", str(recipe), "--data", str(small_tree), "--out", str(out), "--quiet"]) == 0
    (run_dir,) = out.iterdir()
    return {"root": root, "recipe": recipe, "out": out, "run": run_dir, "data": small_tree}


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")}


def test_run_writes_the_whole_run_folder(workspace, capsys):
    run = workspace["run"]
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    summary = json.loads((run / "summary.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert summary["epochs"] == len(history) == 2
    assert summary["best_val_acc"] == max(r["val_acc"] for r in history) and summary["val_split"] == "val"
    assert 0 <= summary["test_acc_at_best"] <= 1 and 0 <= summary["final_test_acc"] <= 1
    assert (summary["train_images"], summary["val_images"]) == (450, 50)  # 10% of train held out
    assert summary["test_images"] == 200 and summary["lr"] == summary["lr_suggestion"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["path"] == str(workspace["data"].resolve())


def test_mistakes_are_really_misclassified(workspace):
    """Every image in the grid is wrong, with the predicted and true labels shown."""
    from lrlab.data import BatchLoader, load_dataset

    run = workspace["run"]
    mistakes = json.loads((run / "mistakes.json").read_text())
    assert mistakes["target_layer"] == "block2" and len(mistakes["mistakes"]) == 9
    ckpt = torch.load(run / "checkpoints" / "best.pt")
    model = build("fastnet", 10, width=0.25)
    model.load_state_dict(ckpt["model"])
    model.eval()
    data = load_dataset(workspace["data"], ckpt["config"]["data"]["cache_dir"])
    x, y = next(iter(BatchLoader(data.test, len(data.test), mean=data.mean, std=data.std, shuffle=False)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        probs = model(x.to(memory_format=torch.channels_last)).float().softmax(1)
    for m in mistakes["mistakes"]:
        i = m["index"]
        assert data.classes[y[i]] == m["true"] != m["pred"] == data.classes[probs[i].argmax()]
        assert probs[i].max().item() == pytest.approx(m["prob"], abs=0.02)


def test_explain_and_find_lr_write_new_folders(workspace, capsys):
    before = snapshot(workspace["run"])
    out = workspace["root"] / "more"
    assert main(["explain", str(workspace["run"]), "--out", str(out), "--quiet",
                 "explain.alpha=0.3", "explain.target_layer=block1"]) == 0
    assert main(["find-lr", str(workspace["recipe"]), "--data", str(workspace["data"]), "--out", str(out),
                 "--quiet"]) == 0
    (explain_dir,) = out.glob("tiny-explain-*")
    (find_dir,) = set(out.iterdir()) - {explain_dir}
    assert (explain_dir / "gradcam.png").is_file() and (explain_dir / "misclassified.png").is_file()
    assert json.loads((explain_dir / "summary.json").read_text())["target_layer"] == "block1"
    assert (find_dir / "lr_finder.png").is_file() and not (find_dir / "history.csv").exists()
    lines = capsys.readouterr().out.strip().splitlines()
    assert "mistakes explained" in lines[0] and lines[1].startswith("suggested lr")
    assert snapshot(workspace["run"]) == before


def test_find_lr_prints_the_suggestion_table(workspace, capsys):
    out = workspace["root"] / "find"
    assert main(["find-lr", str(workspace["recipe"]), "--data", str(workspace["data"]), "--out", str(out),
                 "lr_finder.method=min10"]) == 0
    (find_dir,) = out.iterdir()
    lines = capsys.readouterr().out.strip().splitlines()
    cut = sum(line.startswith("window cut at lr") for line in lines)  # printed when the window was cut
    assert lines[0].split()[:2] == ["method", "lr"] and len(lines) == 7 + cut  # header, 5 methods, final line
    rows = {line.split()[0]: line for line in lines[1:6]}
    assert set(rows) == {"steepest", "valley", "min10", "descent", "max_lr"}
    assert rows["min10"].endswith("<- used") and sum("<- used" in r for r in rows.values()) == 1
    data = json.loads((find_dir / "lr_finder.json").read_text())
    assert data["method"] == "min10" and data["suggestion"] == data["suggestions"]["min10"]["lr"]
    assert f"{data['suggestion']:.2e}" in rows["min10"]
    assert lines[-1].startswith(f"suggested lr {data['suggestion']:.3g} (min10)")
    assert (find_dir / "lr_finder.png").stat().st_size > 0


def bad_inputs(ws: dict, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, expected fragment of the error line)."""
    recipe, data = str(ws["recipe"]), str(ws["data"])
    no_test = tmp / "no_test"
    (no_test / "train" / "cat").mkdir(parents=True)
    empty_class = tmp / "empty_class"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (empty_class / split / cls).mkdir(parents=True)
            if not (split == "train" and cls == "dog"):
                (empty_class / split / cls / "0000.jpg").write_bytes((ws["data"] / "test/cat/0000.jpg").read_bytes())
    not_image = tmp / "not_image"
    for split in ("train", "test"):
        (not_image / split / "cat").mkdir(parents=True)
        (not_image / split / "cat" / "0000.jpg").write_bytes((ws["data"] / "test/cat/0000.jpg").read_bytes())
    (not_image / "train" / "cat" / "0001.jpg").write_bytes(b"this is not an image")
    return {
        "missing data path": (["run", recipe, "--data", str(tmp / "nowhere")], "does not exist"),
        "tree without test/": (["run", recipe, "--data", str(no_test)], "test"),
        # the model name is checked before any image is decoded (this tree's bad file is never reached)
        "unknown model before the data": (["run", recipe, "--data", str(not_image), "model.name=torchvision:resnet19"],
                                          "close names: resnet18"),
        "empty class folder": (["run", recipe, "--data", str(empty_class)], "dog"),
        "file that is not an image": (["train", recipe, "--data", str(not_image)], "0001.jpg"),
        "unknown config key": (["run", recipe, "--data", data, "train.epoch=3"], "unknown config key 'train.epoch'"),
        "lr <= 0": (["train", recipe, "--data", data, "train.lr=0"], "train.lr"),
        "start_lr >= end_lr": (["find-lr", recipe, "--data", data, "lr_finder.start_lr=20"],
                               "start_lr (20) must be below end_lr (10)"),
        "unknown suggestion method": (["find-lr", recipe, "--data", data, "lr_finder.method=fastest"],
                                      "lr_finder.method"),
        "unknown Grad-CAM layer": (["run", recipe, "--data", data, "explain.target_layer=layer9"],
                                   "valid layers: stem"),
        "explain of a missing layer": (["explain", str(ws["run"]), "explain.target_layer=nope"], "block2"),
        # rejected by the checks before the run folder exists
        "rotation on the tensor path": (["run", recipe, "--data", data, "data.rotate=10"], "needs augment 'albumentations'"),
        "unknown layer group": (["train", recipe, "--data", data, "train.layer_groups=[[stem], [head9]]"],
                                "train.layer_groups names 'head9'"),
        "batch ramp beyond the data": (["run", recipe, "--data", data, "train.batch_size_milestones=[1]",
                                        "train.batch_size_factor=20"], "is larger than the 450 training images"),
        # rejected after the range test, inside the new run folder: the folder is removed
        "range test without a suggestion": (["run", recipe, "--data", data, "--quiet", "lr_finder.start_lr=1000",
                                             "lr_finder.end_lr=1e6"], "without a 'max_lr' suggestion"),
        "cyclic base_lr above the found peak": (["run", recipe, "--data", data, "--quiet", "train.schedule=cyclic",
                                                 "train.cyclic.base_lr=50"], "must be below the cyclic max_lr"),
    }


@pytest.mark.parametrize("case", ["missing data path", "tree without test/", "unknown model before the data",
                                  "empty class folder",
                                  "file that is not an image", "unknown config key", "lr <= 0",
                                  "start_lr >= end_lr", "unknown suggestion method", "unknown Grad-CAM layer",
                                  "explain of a missing layer", "rotation on the tensor path", "unknown layer group",
                                  "batch ramp beyond the data", "range test without a suggestion",
                                  "cyclic base_lr above the found peak"])
def test_bad_input_is_one_line_error_and_touches_nothing(case, workspace, tmp_path, capsys):
    argv, fragment = bad_inputs(workspace, tmp_path)[case]
    before = snapshot(workspace["out"])
    status = main(argv + ["--out", str(workspace["out"])])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert fragment in err
    assert snapshot(workspace["out"]) == before  # no earlier file changed, no new run folder


def test_no_data_and_no_network(workspace, tmp_path, capsys, monkeypatch):
    import torchvision
    from urllib.error import URLError

    class Offline:
        def __init__(self, *args, **kwargs):
            raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    recipe = write_recipe(tmp_path / "nodata.yaml", tmp_path / "empty_cache")
    assert main(["run", str(recipe), "--out", str(workspace["out"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "--data" in err and "\n" not in err


def test_console_script_exits_nonzero_without_traceback(workspace, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lrlab.cli", "run", str(workspace["recipe"]),
                           "--data", str(tmp_path / "missing"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --data path {tmp_path / 'missing'} does not exist"]


def test_time_to_accuracy_trains_through_the_same_stages(small_tree, cache_dir, tmp_path):
    """benchmarks/time_to_accuracy.py and `lrlab run` give the long recipe the same LR plan and the
    same lr at every step (shrunk to the 500-image tree and 2 epochs)."""
    shrink = [f"data.cache_dir={cache_dir}", "train.epochs=2", "train.batch_size=50", "lr_finder.num_iter=20",
              "lr_finder.skip_start=2", "lr_finder.skip_end=2", "explain.num_images=4"]
    recipe = str(REPO / "recipes" / "cifar10-long.yaml")
    assert main(["run", recipe, "--data", str(small_tree), "--out", str(tmp_path / "run"), "--quiet", *shrink]) == 0
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "time_to_accuracy.py"), recipe, "--data",
                           str(small_tree.resolve()), "--out", str(tmp_path / "bench"), *shrink],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (run,), (bench,) = (tmp_path / "run").iterdir(), (tmp_path / "bench").iterdir()
    plan = json.loads((run / "lr_plan.json").read_text())
    assert plan == json.loads((bench / "lr_plan.json").read_text()) and plan["source"].endswith("lr_factor 2")
    steps = (run / "lr_steps.csv").read_text()
    assert steps == (bench / "lr_steps.csv").read_text() and len(steps.splitlines()) == 1 + 2 * 9  # 450 images
    peak = float(re.search(r"^bf16 matmul peak (\d+) GFLOP/s", proc.stdout, re.M).group(1))
    total, at700 = map(float, re.search(r"^total ([\d.]+)s \(@700: ([\d.]+)s\)", proc.stdout, re.M).groups())
    assert at700 == pytest.approx(total * peak / 700, rel=0.01, abs=0.1)  # times as at a 700 GFLOP/s peak
