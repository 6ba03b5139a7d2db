"""Using a trained run: `lrlab predict` (top-k with the run's own preprocessing) and `lrlab export`
(a torch.export program that plain torch loads), on a run over mixed-size photos."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR_DIR
from lrlab.cli import main
from lrlab.run_folder import RunFolder

CLASSES = ["cat", "ship"]
SIZE = 48


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    """A trained run (fastnet, 2 epochs, TTA on) on CIFAR photos upscaled to random sizes, with a
    grayscale and an RGBA test file; returns (run folder, data root)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for split, first, n in (("train", 0, 40), ("val", 40, 10), ("test", 50, 6)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(first, first + n):
                im = Image.open(CIFAR_DIR / "train" / cls / f"{i:04d}.jpg").convert("RGB")
                im = im.resize((int(rng.integers(60, 200)), int(rng.integers(60, 200))), Image.Resampling.BICUBIC)
                im.save(root / split / cls / (f"{i:04d}.jpg" if i % 2 else f"{i:04d}.png"))
    cat = Image.open(CIFAR_DIR / "train" / "cat" / "0099.jpg").resize((90, 70))
    cat.convert("L").save(root / "test" / "cat" / "z_gray.png")
    cat.convert("RGBA").save(root / "test" / "cat" / "z_rgba.png")
    out = tmp_path_factory.mktemp("runs")
    recipe = out.parent / "photos.yaml"
    recipe.write_text("name: photos\n")
    args = ["run", str(recipe), "--data", str(root), "--out", str(out), "--quiet", f"data.image_size={SIZE}",
            f"data.cache_dir={tmp_path_factory.mktemp('cache')}", "model.name=fastnet", "model.kwargs={width: 0.25}",
            "lr_finder.enabled=false", "train.lr=0.05", "train.epochs=2", "train.batch_size=16", "train.tta=true",
            "explain.num_images=2"]
    assert main(args) == 0
    (run_dir,) = out.iterdir()
    return RunFolder.open(run_dir), root


def test_predict_gives_the_runs_own_predictions(photo_run, tmp_path, capsys):
    run, root = photo_run
    saved = run.load_predictions()
    files = [root / "test" / c / f for c in CLASSES for f in sorted(os.listdir(root / "test" / c))]
    assert len(files) == len(saved) == 14
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run.path), str(root / "test"), "--top-k", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 15 and lines[-1] == f"predictions: {out}"
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == [str(f) for f in files]
    for row, probs in zip(rows, saved.probs):
        top = int(probs.argmax())
        assert row["class_1"] == CLASSES[top]
        assert float(row["prob_1"]) == pytest.approx(float(probs[top]), abs=1e-3)
        assert float(row["prob_1"]) >= float(row["prob_2"])
    # one file given by name: same answer as in the folder listing
    assert main(["predict", str(run.path), str(files[3]), "--top-k", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{files[3]}  {rows[3]['class_1']} ")


def test_export_loads_with_plain_torch_and_gives_the_same_logits(photo_run, capsys):
    run, root = photo_run
    assert main(["export", str(run.path)]) == 0
    assert "exported:" in capsys.readouterr().out
    info = json.loads(run.file("export_info").read_text())
    assert info["classes"] == CLASSES and info["crop"] == SIZE and info["resize"] == round(SIZE / 0.875)
    program = torch.export.load(str(run.file("export_program"))).module()
    # preprocessing as the JSON describes it, done with plain torchvision
    from torchvision.transforms.v2 import functional as F

    files = sorted((root / "test" / "ship").iterdir())[:3]
    x = torch.stack([F.center_crop(F.resize(F.pil_to_tensor(Image.open(f).convert("RGB")), info["resize"]),
                                   [info["crop"]]).float() / 255 for f in files])
    logits = program(x)
    assert logits.shape == (3, 2)
    # the same logits as the run's best model, in float32, on the same inputs
    from lrlab.inference import load_trained

    trained = load_trained(run, "cpu")
    mean, std = torch.tensor(info["mean"]).view(1, 3, 1, 1), torch.tensor(info["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = trained.model.float()((x - mean) / std)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_bad_input_is_one_line_exit_2(photo_run, tmp_path, capsys):
    run, root = photo_run
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cases = [(["predict", str(run.path), str(tmp_path / "nothing.png")], "does not exist"),
             (["predict", str(run.path), str(broken)], "broken.jpg"),
             (["predict", str(run.path), str(root / "test"), "--top-k", "0"], "--top-k"),
             (["predict", str(tmp_path), str(root / "test")], "is not a run folder"),
             (["export", str(tmp_path)], "is not a run folder")]
    before = sorted(run.files())
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert sorted(run.files()) == before
