"""Fault injection: kill, interrupt, poison and starve a real ``lrlab run``, and check nothing is lost.

    python benchmarks/faults.py [--data ../shared/data/cifar10] [--kills 10] [--seed 0] [--out DIR]

A small recipe (FastNet x0.5, 2,000 CIFAR-10 training images, 4 epochs of 20 steps, a checkpoint
every 5 steps) runs once without interruption. Then, as separate ``lrlab`` processes:

* **SIGKILL x N**: one run killed N times at random moments (during the range test, during epochs,
  while ``checkpoints/last.pt`` is being written, during the explain/report stage) and resumed
  with ``lrlab resume`` after each kill. After every kill each JSON file of the folder must parse
  and the checkpoint must load (``torch.load(..., weights_only=True)``); at the end the per-epoch
  history, the lr of every step and the final weights must equal the uninterrupted run's.
* **SIGINT / SIGTERM** mid-training: exit 130 / 143, one line naming the resume command; resumed,
  identical to the uninterrupted run.
* **NaN**: an lr of 1000 per step makes the loss non-finite: exit 3, one line, the report says
  where; the last checkpoint is the state right before that step.
* **Full disk**: a file-size limit (RLIMIT_FSIZE, as ``ulimit -f``) set on the running process
  after its first checkpoint: exit 1, one line, no file of the run changed; resumed, identical.
* **Unwritable folder**: ``--out`` under /sys: exit 1, one line, nothing created.

Prints one line per trial and "N trials, N identical, 0 lost". Never time anything else meanwhile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"name": "faults", "seed": 0,
          "data": {"train_subset": 2000, "test_subset": 1000, "cutout": 8},
          "model": {"name": "fastnet", "kwargs": {"width": 0.5}},
          "lr_finder": {"start_lr": 1e-4, "end_lr": 10, "num_iter": 30, "skip_start": 3},
          "train": {"epochs": 4, "batch_size": 100, "schedule": "onecycle", "checkpoint_every": 5},
          "explain": {"num_images": 9}}
KEYS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "steps", "batch_size"]


def lrlab(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lrlab.cli", *args, "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait(condition, proc: subprocess.Popen, poll: float = 0.001) -> bool:
    """Poll ``condition()`` until it holds (True) or ``proc`` ends (False)."""
    while proc.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


def the_run(out: Path) -> Path | None:
    runs = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
    return runs[0] if runs else None


def intact(run: Path) -> bool:
    """Every JSON file parses and every checkpoint loads with weights_only=True (hidden temporary
    files of an unfinished write are not files of the run: no command reads them)."""
    try:
        for p in [*run.glob("*.json"), *run.glob("checkpoints/*.pt")]:
            if not p.name.startswith("."):
                torch.load(p, weights_only=True) if p.suffix == ".pt" else json.loads(p.read_text())
    except Exception:  # noqa: BLE001 - any unreadable file is a loss
        return False
    return True


def same_as(run: Path, ref: Path) -> bool:
    """Same per-epoch history, lr steps and bit-identical final weights."""
    try:
        h = [{k: r[k] for k in KEYS} for r in json.loads((run / "history.json").read_text())]
        href = [{k: r[k] for k in KEYS} for r in json.loads((ref / "history.json").read_text())]
        a = torch.load(run / "checkpoints/last.pt", weights_only=True)["model"]
        b = torch.load(ref / "checkpoints/last.pt", weights_only=True)["model"]
    except (OSError, ValueError, RuntimeError, KeyError):
        return False
    return (h == href and (run / "lr_steps.csv").read_text() == (ref / "lr_steps.csv").read_text()
            and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


def digests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def finish(run: Path) -> int:
    proc = lrlab("resume", str(run))
    proc.communicate()
    return proc.returncode


class Kill:
    """One SIGKILL at a moment of ``kind``; returns (killed as planned, description)."""

    def __init__(self, rng: random.Random, checkpoint_interval: float):
        self.rng, self.interval = rng, checkpoint_interval

    def __call__(self, kind: str, proc: subprocess.Popen, out: Path) -> tuple[bool, str]:
        def run_file(pattern: str):
            run = the_run(out)
            return next(iter(run.glob(pattern)), None) if run else None

        if kind == "range test":
            ok = wait(lambda: run_file("config.yaml") is not None, proc)
            time.sleep(self.rng.uniform(0.5, 2.0))
            ok = ok and run_file("lr_plan.json") is None
        elif kind == "checkpoint write":
            ok = wait(lambda: run_file("checkpoints/.last.*.tmp*") is not None, proc, poll=0.0002)
        elif kind == "report":
            ok = wait(lambda: run_file("predictions.pt") is not None, proc)
        else:  # during an epoch: after 1-3 new checkpoints, then a random part of the interval
            last = run_file("checkpoints/last.pt")
            mtimes = {last.stat().st_mtime_ns} if last else set()
            for _ in range(self.rng.randint(1, 3)):
                ok = wait(lambda: (p := run_file("checkpoints/last.pt")) is not None
                          and p.stat().st_mtime_ns not in mtimes, proc)
                p = run_file("checkpoints/last.pt")
                mtimes.add(p.stat().st_mtime_ns if p else 0)
            time.sleep(self.rng.uniform(0, self.interval))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        if kind == "checkpoint write":  # did the kill land before the rename?
            ok = ok and run_file("checkpoints/.last.*.tmp*") is not None
        state = torch.load(run_file("checkpoints/last.pt"), weights_only=True) if run_file("checkpoints/last.pt") else None
        where = f"at step {state['step']}" if state else "before any checkpoint"
        return ok and killed, f"{kind}, last checkpoint {where}"


def sigkill_trials(recipe: Path, ref: Path, work: Path, kills: int, rng: random.Random, interval: float) -> list[tuple]:
    """One run killed ``kills`` times and resumed after each; a kind that missed its moment
    (the run moved on) is tried again on the next process."""
    kinds = ["range test"] + ["checkpoint write"] * 2 + ["epoch"] * (kills - 4) + ["report"]
    kinds = kinds[:1] + rng.sample(kinds[1:-1], len(kinds) - 2) + kinds[-1:]
    out, rows, kill = work / "sigkill", [], Kill(rng, interval)
    proc = lrlab("run", str(recipe), "--out", str(out))
    while kinds:
        planned, what = kill(kinds[0], proc, out)
        run = the_run(out)
        if planned:
            kinds.pop(0)
            rows.append(("SIGKILL", what, -9, intact(run)))
        elif proc.returncode == 0:  # the run finished before the moment came: no later kill is possible
            rows += [("SIGKILL", f"{k}: missed, the run had finished", 0, True) for k in kinds]
            break
        proc = lrlab("resume", str(run))
    proc.communicate()
    identical = proc.returncode == 0 and same_as(run, ref)
    return [(kind, what, code, "resumed, identical" if identical and whole else "DIFFERENT" if whole else "LOST A FILE")
            for kind, what, code, whole in rows]


def signal_trial(recipe: Path, ref: Path, work: Path, signum: int) -> tuple:
    out = work / signal.Signals(signum).name
    proc = lrlab("run", str(recipe), "--out", str(out))
    wait(lambda: any(out.glob("*/checkpoints/last.pt")), proc)
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate()
    run = the_run(out)
    ok = proc.returncode == 128 + signum and one_line(err) and f"lrlab resume {run}" in err
    ok = ok and finish(run) == 0 and same_as(run, ref)
    return (signal.Signals(signum).name, err.strip()[7:70] + "...", proc.returncode,
            "resumed, identical" if ok else "DIFFERENT")


def nan_trial(recipe: Path, work: Path) -> tuple:
    out = work / "nan"
    proc = lrlab("run", str(recipe), "--out", str(out), "lr_finder.enabled=false", "train.lr=1000",
                 "train.schedule=constant", "train.checkpoint_every=1")
    _, err = proc.communicate()
    run = the_run(out)
    stopped = json.loads((run / "summary.json").read_text())["stopped"]
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)
    ok = (proc.returncode == 3 and one_line(err) and state["step"] == stopped["step"]
          and "Training stopped early" in (run / "report.html").read_text())
    return ("NaN loss", f"stopped at step {stopped['step']}, report says so", proc.returncode,
            "as expected" if ok else "WRONG")


def full_disk_trial(recipe: Path, ref: Path, work: Path) -> tuple:
    out = work / "full_disk"
    proc = lrlab("run", str(recipe), "--out", str(out), "train.checkpoint_every=0")
    wait(lambda: any(out.glob("*/checkpoints/last.pt")), proc)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1000, 1000))
    run = the_run(out)
    time.sleep(0.2)
    before = digests(run)
    _, err = proc.communicate()
    ok = proc.returncode == 1 and one_line(err) and digests(run) == before
    ok = ok and finish(run) == 0 and same_as(run, ref)
    return ("full disk", "RLIMIT_FSIZE 1 kB after epoch 1", proc.returncode,
            "resumed, identical" if ok else "DIFFERENT")


def unwritable_trial(recipe: Path) -> tuple:
    out = Path("/sys/lrlab-faults")
    proc = lrlab("run", str(recipe), "--out", str(out))
    _, err = proc.communicate()
    ok = proc.returncode == 1 and one_line(err) and "not writable" in err and not out.exists()
    return ("unwritable", str(out), proc.returncode, "nothing written" if ok else "WRONG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    from time_to_accuracy import matmul_peak

    print(f"bf16 matmul peak {matmul_peak(torch.bfloat16):.0f} GFLOP/s", flush=True)
    work = args.out or Path(tempfile.mkdtemp(prefix="lrlab-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "faults.yaml"
    recipe.write_text(json.dumps({**RECIPE, "data": {**RECIPE["data"], "path": str(args.data.resolve())}}))
    start = time.perf_counter()
    proc = lrlab("run", str(recipe), "--out", str(work / "reference"))
    assert proc.wait() == 0, proc.communicate()
    ref = the_run(work / "reference")
    seconds = json.loads((ref / "summary.json").read_text())["wall_seconds"]
    interval = seconds / (RECIPE["train"]["epochs"] * 20 / 5 + 4)
    print(f"uninterrupted run: {seconds:.0f} s ({time.perf_counter() - start:.0f} s with start-up): {ref}", flush=True)
    rng = random.Random(args.seed)
    rows = sigkill_trials(recipe, ref, work, args.kills, rng, interval)
    rows += [signal_trial(recipe, ref, work, signal.SIGINT), signal_trial(recipe, ref, work, signal.SIGTERM),
             nan_trial(recipe, work), full_disk_trial(recipe, ref, work), unwritable_trial(recipe)]
    for i, (kind, what, code, result) in enumerate(rows, start=1):
        print(f"{i:>2}  {kind:<10} {what:<58} exit {code:>4}  {result}")
    good = sum(r[3] in ("resumed, identical", "as expected", "nothing written") for r in rows)
    print(f"{len(rows)} trials, {good} identical, {len(rows) - good} lost  (work folder {work})")


if __name__ == "__main__":
    main()
