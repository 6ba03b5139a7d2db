"""report.html of a real tiny run, opened in headless Chromium; `lrlab report`; predictions
reused by `lrlab explain`; TensorBoard scalars; one-line errors for CAM methods and layers."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageStat
from conftest import REPO
from test_cli import snapshot, write_recipe

from lrlab import pipeline
from lrlab.models import build
from lrlab.run_folder import RunFolder
from lrlab.cli import main
from lrlab.config import load_config
from lrlab.errors import LrlabError
from lrlab.interpret import Predictions, select_misclassified
from lrlab.report import SECTIONS, build_report

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
NEW_FILES = ["report.html", "predictions.pt", "per_class.json", "confusion.png", "gradcam_pred_true.png",
             "faithfulness.json", "faithfulness.png"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_tree, cache_dir):
    """One finished `lrlab run` of the quick recipe (flip TTA on), shrunk to the 500/200-image tree
    and 2 epochs, with the faithfulness of all CAM methods on 20 images."""
    root = tmp_path_factory.mktemp("report")
    recipe = write_recipe(root / "tiny.yaml", cache_dir, train={"tta": True}, explain={"faithfulness_images": 20})
    out = root / "runs"
    shrink = [f"data.cache_dir={cache_dir}", "train.epochs=2", "train.batch_size=50", "lr_finder.num_iter=30",
              "lr_finder.skip_start=5", "explain.num_images=9", "explain.faithfulness_images=20"]
    quick = str(REPO / "recipes" / "cifar10-quick.yaml")
    assert main(["run", quick, "--data", str(small_tree), "--out", str(out), "--quiet", *shrink]) == 0
    (run_dir,) = out.iterdir()
    return {"root": root, "recipe": recipe, "out": out, "run": run_dir, "data": small_tree}


def chromium() -> str:
    """Path of Chromium; in CI (CI=true) a missing browser fails the test instead of skipping it."""
    exe = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    if exe:
        return exe
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI is set but chromium is missing: .ci/run must apt-get install -y chromium")
    pytest.skip("chromium is not installed here (apt-get install -y chromium); CI requires it")


def open_in_chromium(page: Path, tmp: Path) -> dict:
    """Screenshot ``page`` (with console logging) and dump its DOM after load with a probe script
    that records every image's natural size and every section's rendered height."""
    exe = chromium()
    shot = tmp / "screenshot.png"
    common = [exe, *FLAGS, f"--user-data-dir={tmp / 'profile'}"]
    proc = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,3000", "--enable-logging=stderr",
                           "--v=0", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    probe = tmp / "probe.html"
    js = """<script>window.addEventListener("load", function () {
      var out = document.createElement("pre"); out.id = "probe";
      out.textContent = JSON.stringify({
        images: Array.from(document.images).map(function (i) {
          return {complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}; }),
        sections: Array.from(document.querySelectorAll("section")).map(function (s) {
          return {id: s.id, height: s.offsetHeight, heading: s.querySelector("h2").innerText,
                  missing: s.querySelectorAll(".missing").length}; })});
      document.body.appendChild(out); });</script>"""
    probe.write_text(page.read_text().replace("</body>", js + "</body>"))
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, "the probe script did not run"
    return {"console": console, "screenshot": shot, "dom": json.loads(html.unescape(found.group(1)))}


def embedded_pngs(text: str) -> list[Image.Image]:
    """Every <img> of the page: it must be a data: URI holding a valid PNG."""
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', text)
    images = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            im.verify()
        images.append(Image.open(io.BytesIO(raw)))
    return images


def test_run_writes_report_predictions_and_confusion(run):
    run_dir = run["run"]
    for name in NEW_FILES:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    per_class = json.loads((run_dir / "per_class.json").read_text())
    pred = Predictions.load(run_dir / "predictions.pt")
    # the confusion matrix covers the whole test set and its diagonal is the best checkpoint's test accuracy
    matrix = torch.tensor(per_class["confusion"])
    assert matrix.sum().item() == len(pred) == summary["test_images"] == 200
    assert matrix.trace().item() == round(summary["test_acc_at_best"] * 200)  # flip TTA, as reported
    assert per_class["accuracy"] == pytest.approx(pred.accuracy)
    # the mistakes are exactly the highest-loss wrong predictions of the saved predictions
    mistakes = json.loads((run_dir / "mistakes.json").read_text())
    assert mistakes["method"] == "layercam" and mistakes["select"] == "loss"
    assert [m["index"] for m in mistakes["mistakes"]] == select_misclassified(pred, 9, by="loss").tolist()
    assert all(m["pred"] != m["true"] for m in mistakes["mistakes"])
    faith = json.loads((run_dir / "faithfulness.json").read_text())
    assert faith["methods"] == ["gradcam", "gradcampp", "xgradcam", "layercam", "scorecam"]
    assert faith["num_images"] == 20


def test_tensorboard_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = json.loads((run["run"] / "history.json").read_text())
    events = EventAccumulator(str(run["run"] / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"} <= tags
    for tag, key in (("loss/train", "train_loss"), ("accuracy/val", "val_acc"), ("lr", "lr")):
        points = events.Scalars(tag)
        assert [p.step for p in points] == [r["epoch"] for r in history] == [1, 2]
        assert [p.value for p in points] == pytest.approx([r[key] for r in history], rel=1e-6)


def test_report_renders_in_headless_chromium(run, tmp_path):
    page = run["run"] / "report.html"
    text = page.read_text()
    assert len(text) < 3_000_000  # light: opens fast
    assert "<script" not in text and "<link" not in text and "http://" not in text and "https://" not in text
    images = embedded_pngs(text)
    assert len(images) >= 8  # range test, loss, accuracy, lr (+ per step), confusion, mistakes, faithfulness
    result = open_in_chromium(page, tmp_path)
    assert result["console"] == []  # no console error (nor any console output at all)
    dom = result["dom"]
    assert [s["id"] for s in dom["sections"]] == [sid for sid, _ in SECTIONS]
    for section in dom["sections"]:
        assert section["height"] > 60 and section["heading"], section
        assert section["missing"] == 0, section  # a full run: every section has its content
    assert len(dom["images"]) == len(images)
    for img, png in zip(dom["images"], images, strict=True):  # no broken image
        assert img["complete"] and (img["width"], img["height"]) == png.size
    with Image.open(result["screenshot"]) as shot:
        assert shot.size == (1200, 3000)
        gray = shot.convert("L")
        assert ImageStat.Stat(gray).stddev[0] > 20  # not blank
        assert len(gray.getcolors(256) or range(256)) > 50


def test_report_degrades_gracefully(run, tmp_path):
    """A find-lr-only folder and a folder with nothing but config.yaml still give every section."""
    src = run["run"]
    find_lr = tmp_path / "find-lr-only"
    find_lr.mkdir()
    for name in ("config.yaml", "lr_finder.json", "lr_finder.png"):
        shutil.copy(src / name, find_lr / name)
    (find_lr / "summary.json").write_text(json.dumps({"run_dir": str(find_lr), "lr": 0.1, "lr_suggestion": 0.1}))
    (find_lr / "per_class.json").write_text("{ not json")  # a damaged file is reported, not fatal
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(src / "config.yaml", bare / "config.yaml")
    for folder, complete in ((find_lr, {"summary", "config", "range-test", "files"}), (bare, {"config", "files"})):
        text = build_report(RunFolder(folder))
        for sid, heading in SECTIONS:
            block = re.search(rf'<section id="{sid}"><h2>{re.escape(heading)}</h2>(.*?)</section>', text, re.S)
            assert block, sid
            assert ('class="missing"' in block.group(1)) == (sid not in complete), (folder.name, sid)
    assert len(embedded_pngs(build_report(RunFolder(find_lr)))) == 1
    main(["report", str(find_lr)])
    result = open_in_chromium(find_lr / "report.html", tmp_path)
    assert result["console"] == [] and all(i["complete"] and i["width"] > 0 for i in result["dom"]["images"])
    assert len(result["dom"]["sections"]) == len(SECTIONS)


def test_report_command_rebuilds_only_report_html(run, tmp_path, capsys):
    run_dir = run["run"]
    report = run_dir / "report.html"
    before = {k: v for k, v in snapshot(run_dir).items() if k != "report.html"}
    report.write_text("stale")
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {report}"
    assert report.read_text().startswith("<!DOCTYPE html>")
    assert {k: v for k, v in snapshot(run_dir).items() if k != "report.html"} == before  # nothing else touched
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary left over
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "not a run folder" in err


def test_explain_reuses_predictions(run, capsys):
    source, out = run["run"], run["root"] / "explained"
    before = snapshot(source)
    assert main(["explain", str(source), "--out", str(out), "--quiet", "explain.method=layercam",
                 "explain.target_layer=[block1, block2]", "explain.select=confidence", "explain.colormap=turbo",
                 "explain.faithfulness_images=0"]) == 0
    assert "mistakes explained with layercam on block1+block2" in capsys.readouterr().out
    (new,) = out.iterdir()
    summary = json.loads((new / "summary.json").read_text())
    assert summary["predictions_reused"] is True
    old, again = Predictions.load(source / "predictions.pt"), Predictions.load(new / "predictions.pt")
    assert torch.equal(old.probs, again.probs)
    mistakes = json.loads((new / "mistakes.json").read_text())
    assert mistakes["target_layer"] == ["block1", "block2"] and mistakes["method"] == "layercam"
    assert [m["index"] for m in mistakes["mistakes"]] == select_misclassified(old, 9, by="confidence").tolist()
    for name in ("report.html", "gradcam_pred_true.png", "gradcam.png", "misclassified.png", "confusion.png"):
        assert (new / name).is_file(), name
    assert not (new / "faithfulness.json").exists()
    assert snapshot(source) == before
    # predictions of another test set are not reused
    config = load_config(source / "config.yaml", ["data.test_subset=100"])
    data = pipeline.load_data(config)
    assert pipeline.source_predictions(RunFolder(source), config, data) is None
    config = load_config(source / "config.yaml")
    assert pipeline.source_predictions(RunFolder(source), config, pipeline.load_data(config)) is not None


def bad_cam_inputs(ws: dict) -> dict[str, tuple[list[str], str]]:
    recipe, data, run_dir = str(ws["recipe"]), str(ws["data"]), str(ws["run"])
    methods = "is not a valid CAM method; valid: gradcam, gradcampp, xgradcam, layercam, scorecam"
    return {
        "unknown method (run)": (["run", recipe, "--data", data, "explain.method=gradcam++"], f"'gradcam++' {methods}"),
        "unknown method (explain)": (["explain", run_dir, "explain.method=rise"], f"'rise' {methods}"),
        "unknown layer in a list": (["explain", run_dir, "explain.target_layer=[block1, block9]"],
                                    "explain.target_layer 'block9' does not exist in fastnet; valid layers: stem, "),
        "unknown layer (run)": (["run", recipe, "--data", data, "explain.target_layer=layer4"],
                                "valid layers: stem, stem.0"),
        "unknown colormap": (["explain", run_dir, "explain.colormap=rainbowz"], "valid: e.g. jet, turbo"),
        "unknown selection": (["explain", run_dir, "explain.select=random"],
                              "'random' is not a valid mistake order; valid: loss, confidence, first"),
    }


@pytest.mark.parametrize("case", ["unknown method (run)", "unknown method (explain)", "unknown layer in a list",
                                  "unknown layer (run)", "unknown colormap", "unknown selection"])
def test_bad_cam_settings_are_one_line_errors(case, run, capsys):
    argv, fragment = bad_cam_inputs(run)[case]
    out = run["root"] / "bad"
    before = snapshot(run["out"])
    assert main(argv + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not out.exists() and snapshot(run["out"]) == before


def test_config_level_cam_errors(run):
    with pytest.raises(LrlabError, match="explain.method: 'cam' is not a valid CAM method; "
                                         "valid: gradcam, gradcampp, xgradcam, layercam, scorecam$"):
        load_config(run["recipe"], ["explain.method=cam"])
    config = load_config(run["recipe"], ["explain.target_layer=[block2, head]"])
    model = build("fastnet", 10, width=0.25)
    with pytest.raises(LrlabError) as err:
        pipeline.cam_layer(config, model)
    msg = str(err.value)
    assert "\n" not in msg and "'head'" in msg
    assert msg.endswith("valid layers: " + ", ".join(name for name, _ in model.named_modules() if name))
    assert pipeline.cam_layer(load_config(run["recipe"]), model) == "block2"
    assert yaml.safe_load((run["run"] / "config.yaml").read_text())["explain"]["method"] == "layercam"
