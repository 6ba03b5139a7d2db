"""Data-parallel scaling on this machine: one process against ``torchrun`` with N gloo ranks.

    python benchmarks/ddp_scaling.py --data ../shared/data/cifar10 [--ranks 2] [--epochs 2]
        [RECIPE] [section.key=value ...]

Trains the same recipe (default ``recipes/cifar10-quick.yaml`` on a class-balanced 10,000-image
subset, no range test, a fixed ``train.max_lr``) once as one process with all cores as threads and
once as ``torchrun --standalone --nproc-per-node=N -m lrlab train`` with the cores split over the
ranks (``OMP_NUM_THREADS`` = cores / N each), the same global batch. Prints, for each, the wall time
of every epoch (training + validation, from the run's history), training images per second after
the first epoch (training pass alone), the best validation top-1, and the bf16 matrix-product peak measured before both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_accuracy import matmul_peak  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def train(launcher: list[str], threads: int, args, out: Path) -> dict:
    """Run ``lrlab train`` under ``launcher``; its history and total wall seconds."""
    cmd = [*launcher, "-m", "lrlab", "train", str(args.recipe), "--data", args.data, "--out", str(out),
           "--quiet", "data.train_subset=10000", "data.test_subset=1000", f"train.epochs={args.epochs}",
           "lr_finder.enabled=false", "train.max_lr=0.4", *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - start
    (run,) = [p for p in out.iterdir() if (p / "history.json").exists()]
    return {"history": json.loads((run / "history.json").read_text()), "wall": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", type=Path, default=REPO / "recipes" / "cifar10-quick.yaml")
    parser.add_argument("--data", required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args()
    cores = os.cpu_count() or 1
    peak = matmul_peak(torch.bfloat16)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}"]
    with tempfile.TemporaryDirectory(prefix="lrlab-ddp-") as tmp:
        runs = {"1 process": train([sys.executable], cores, args, Path(tmp) / "one"),
                f"torchrun {args.ranks} ranks": train(torchrun, max(1, cores // args.ranks), args, Path(tmp) / "ddp")}
    print(f"\nbf16 matmul peak {peak:.0f} GFLOP/s; {cores} cores\n")
    print("| launcher | epoch seconds | training images/s (after epoch 1) | best validation top-1 | command wall s |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        epochs = run["history"]
        seconds = [e["seconds"] for e in epochs]
        later = [e for e in epochs[1:] or epochs]
        rate = sum(e["steps"] * e["batch_size"] for e in later) / sum(e["train_seconds"] for e in later)
        print(f"| {name} | {', '.join(f'{s:.1f}' for s in seconds)} | {rate:.0f} | "
              f"{max(e['val_acc'] for e in epochs):.2%} | {run['wall']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
