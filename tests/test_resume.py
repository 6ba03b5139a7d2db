"""Nothing lost: a killed, interrupted, diverged or disk-full run of real images, resumed.

The killed runs are real ``lrlab`` processes (SIGKILL / SIGINT / a file-size limit set from
outside with prlimit) on the 500-image CIFAR tree; each is compared with an uninterrupted run of
the same recipe and seed.
"""

from __future__ import annotations

import hashlib
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lrlab.cli import main
from lrlab.compute import Compute, cuda_autocast_dtype
from lrlab.data import BatchLoader
from lrlab.engine import Trainer, fit
from lrlab.models import build
from lrlab.schedules import Constant
from test_cli import write_recipe

KEYS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "steps", "batch_size"]


def lrlab(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lrlab.cli", *args, "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The first file matching ``pattern`` under ``root``, polled every 5 ms while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError(f"{pattern} did not appear under {root}")


def only_run(out: Path) -> Path:
    (run,) = out.iterdir()
    return run


def digests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


def assert_same_run(run: Path, ref: Path) -> None:
    """Same per-epoch history and lr of every step; bit-identical final weights."""
    history = [{k: r[k] for k in KEYS} for r in json.loads((run / "history.json").read_text())]
    assert history == [{k: r[k] for k in KEYS} for r in json.loads((ref / "history.json").read_text())]
    assert (run / "lr_steps.csv").read_text() == (ref / "lr_steps.csv").read_text()
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "summary.json").read_text())["best_val_acc"] > 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_tree, cache_dir):
    """The tiny recipe (3 epochs of 10 steps, a checkpoint every 3 steps), run without a stop."""
    root = tmp_path_factory.mktemp("resume")
    recipe = write_recipe(root / "tiny.yaml", cache_dir, data={"path": str(small_tree)},
                          train={"epochs": 3, "checkpoint_every": 3}, explain={"num_images": 4})
    proc = lrlab("run", str(recipe), "--out", str(root / "ref"))
    assert proc.wait() == 0, proc.communicate()
    return {"root": root, "recipe": recipe, "run": only_run(root / "ref")}


def test_sigkill_mid_training_then_resume_is_exact(reference, tmp_path):
    proc = lrlab("run", str(reference["recipe"]), "--out", str(tmp_path))
    wait_for("*/checkpoints/last.pt", tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(tmp_path)
    assert not (run / "summary.json").exists()  # killed before the end
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 3 <= state["step"] < 30 and state["config"]["train"]["epochs"] == 3
    resumed = lrlab("resume", str(run))
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert str(run) in out
    assert_same_run(run, reference["run"])
    assert sorted(p.name for p in run.rglob("*.tmp*")) == []


def test_sigint_mid_epoch_checkpoints_and_resume_finishes(reference, tmp_path):
    proc = lrlab("run", str(reference["recipe"]), "--out", str(tmp_path), "train.checkpoint_every=0")
    first = wait_for("*/checkpoints/last.pt", tmp_path, proc)  # end of epoch 1: epoch 2 starts now
    mtime = first.stat().st_mtime_ns
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    run = only_run(tmp_path)
    assert proc.returncode == 130
    assert err.splitlines() == [err.strip()] and "Traceback" not in err
    assert err.startswith("error: interrupted by SIGINT ") and "epoch 2" in err and "(checkpoint written)" in err
    assert err.strip().endswith(f"lrlab resume {run}")
    assert first.stat().st_mtime_ns > mtime  # the interrupt wrote a checkpoint of its own
    state = torch.load(first, weights_only=True)
    assert state["epoch"] == 2 or state["epoch_progress"]["steps"] > 0
    # `lrlab run RECIPE --resume RUN_DIR` is the same as `lrlab resume RUN_DIR`, for the same recipe only
    other = main(["run", str(reference["recipe"]), "--resume", str(run), "train.epochs=4", "--quiet"])
    assert other == 2
    assert main(["run", str(reference["recipe"]), "--resume", str(run), "train.checkpoint_every=0", "--quiet"]) == 0
    assert_same_run(run, reference["run"])


def test_file_size_limit_keeps_the_last_checkpoint_then_resumes(reference, tmp_path):
    """A full disk (here a file-size limit of 1 kB set on the running process after its first
    epoch-end checkpoint): one line, exit 1, every file of the run unchanged; resume finishes."""
    proc = lrlab("run", str(reference["recipe"]), "--out", str(tmp_path), "train.checkpoint_every=0")
    wait_for("*/checkpoints/last.pt", tmp_path, proc)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1000, 1000))
    run = only_run(tmp_path)
    time.sleep(0.2)  # let a rename under way finish
    before = digests(run)
    _, err = proc.communicate()
    assert proc.returncode == 1
    assert err.splitlines() == [err.strip()] and "cannot write" in err and f"lrlab resume {run}" in err
    assert digests(run) == before
    assert main(["resume", str(run), "--quiet"]) == 0
    assert_same_run(run, reference["run"])


def test_unwritable_output_folder_is_one_line_before_any_work(reference, capsys):
    earlier = digests(reference["run"])
    assert main(["run", str(reference["recipe"]), "--out", "/sys/lrlab-runs", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output folder /sys/lrlab-runs is not writable") and "\n" not in err
    assert digests(reference["run"]) == earlier


def test_corrupt_checkpoint_is_one_line_naming_it(reference, tmp_path, capsys):
    run = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(reference["run"]), str(run)], check=True)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert main(["resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint {last} is corrupt or truncated") and "\n" not in err


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_at_its_step_or_is_skipped(reference, tmp_path, capsys, policy):
    """An lr of 1000 per step makes FastNet's loss NaN within the first epoch."""
    code = main(["run", str(reference["recipe"]), "--out", str(tmp_path), "--quiet", "lr_finder.enabled=false",
                 "train.lr=1000", "train.schedule=constant", "train.checkpoint_every=1",
                 f"train.on_nonfinite={policy}"])
    run = only_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    err = capsys.readouterr().err.strip()
    if policy == "skip":
        assert code == 0 and summary["stopped"] is None and summary["skipped_steps"] > 0
        assert sum(r["skipped_steps"] for r in json.loads((run / "history.json").read_text())) == summary["skipped_steps"]
        return
    stopped = summary["stopped"]
    assert code == 3 and "\n" not in err
    assert err.startswith(f"error: training stopped at a non-finite loss (nan) at step {stopped['step']} (epoch 1, lr 1e+03")
    # the last good checkpoint is the state right before step k, whose loss was the last finite one
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == stopped["step"] > 0 and state["last_finite_loss"] == stopped["last_finite_loss"]
    report = (run / "report.html").read_text()
    assert "Training stopped early: non-finite training loss" in report and f"step {stopped['step']}" in report
    assert not (run / "history.json").exists()  # no epoch completed


def test_float16_training_uses_a_grad_scaler(small_tree, cache_dir):
    """float16 autocast (CPU here, CUDA in use) steps through a GradScaler: a step whose scaled
    gradients overflow is skipped and the scale backs off; the scaler's state is checkpointed."""
    from lrlab.data import load_dataset

    data = load_dataset(small_tree, cache_dir)
    loader = BatchLoader(data.train, 50, mean=data.mean, std=data.std, shuffle=True, augment="tensor", seed=0)
    test = BatchLoader(data.test, 100, mean=data.mean, std=data.std, shuffle=False)
    torch.manual_seed(0)
    model = build("fastnet", 10, width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fp16 = Compute(torch.device("cpu"), torch.float16)
    assert fp16.grad_scaler().is_enabled() and not Compute(dtype=torch.bfloat16).grad_scaler().is_enabled()
    trainer = Trainer(model, opt, Constant(opt, 0.05), fp16)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients x 2^40 overflow
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    assert torch.isfinite(torch.tensor(trainer.step(x, y)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert trainer.scaler.get_scale() == 2.0**39
    saved = []
    history = fit(model, loader, test, opt, Constant(opt, 0.05), 2, fp16, checkpoint=lambda s, best: saved.append(s))
    assert history.records[-1]["train_loss"] < history.records[0]["train_loss"]
    assert saved[-1]["scaler"]["scale"] > 0 and saved[-1]["epoch"] == 2


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_bf16_only_on_gpus_that_compute_it_natively(capability, dtype):
    """V100 (7.0) and T4 (7.5) report bf16 support through emulation: they get float16."""
    assert cuda_autocast_dtype(capability) == dtype
