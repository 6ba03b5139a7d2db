"""Does ``lrlab tune``'s LR-first search find the lr an exhaustive grid finds?

    python benchmarks/lr_search.py --data ../shared/data/cifar10 [--trials 12] [--grid 7] [--epochs 3]
        [--out FOLDER] [section.key=value ...]

1. ``lrlab tune recipes/cifar10-quick.yaml`` with the lr as the only axis (``tune.space`` =
   ``{train.max_lr: {}}``: stage 1's range is the LR range test's max_lr x ``tune.lr_range_factors``,
   0.1 to 3) and a budget of ``--trials`` short trials (``--epochs`` epochs each, the recipe's
   median pruner), one worker, a journal-file study.
2. The same training (the quick recipe, ``train.max_lr`` set, no range test) at each point of a
   ``--grid``-point log grid spanning that same range, every point trained to the end with
   ``--grid-seeds`` seeds (0, 1, ...; the search's trials use the recipe's seed, 0); the grid's best
   lr is the one with the best mean.

Both score a training by its best validation top-1 (the 10% hold-out; the test split is not
read). Printed: the grid with its accuracies, the search's trials, the best grid lr, the lr the
search chose, and their distance in grid steps (the acceptance: within one). Training uses a
class-balanced 10,000-image subset of the training split (``data.train_subset``) and reports on
1,000 test images (``data.test_subset``), to keep the whole comparison to about an hour
here; add overrides to change that.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lrlab.config import load_config
from lrlab.pipeline import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_accuracy import matmul_peak  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "recipes" / "cifar10-quick.yaml"


def search(args, common: list[str], work: Path) -> dict:
    """Run the ``lrlab tune`` worker; its tune.json."""
    cmd = [sys.executable, "-m", "lrlab", "tune", str(QUICK), "--data", args.data, "--study", "lr-search",
           "--storage", f"journal:{work / 'study.journal'}", "--trials", str(args.trials), "--out", str(work),
           "--quiet", *common, f"tune.lr_trials={args.trials}", "tune.space={train.max_lr: {}}"]
    subprocess.run(cmd, check=True)
    return json.loads((work / "lr-search" / "tune.json").read_text())


def grid(lrs: list[float], seeds: int, common: list[str], work: Path, data: str, log) -> np.ndarray:
    """Best validation top-1 of a full training at each lr and seed: (len(lrs), seeds)."""
    out = np.zeros((len(lrs), seeds))
    for seed in range(seeds):
        for i, lr in enumerate(lrs):
            config = load_config(QUICK, [f"data.path={data}", *common, f"train.max_lr={lr}",
                                         "lr_finder.enabled=false", f"seed={seed}"])
            out[i, seed] = run_pipeline(config, work / "grid", explain_stage=False).summary["best_val_acc"]
            log(f"grid lr {lr:.4g} seed {seed}: best validation top-1 {out[i, seed]:.2%}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--grid-seeds", type=int, default=3, help="seeds per grid point (the grid's own noise)")
    parser.add_argument("--out", type=Path, help="keep the study and run folders here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args()
    common = ["data.train_subset=10000", "data.test_subset=1000", f"train.epochs={args.epochs}", *args.overrides]
    peak = matmul_peak(torch.bfloat16)
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="lrlab-lr-search-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tuned = search(args, common, work)
        low, high = tuned["lr_range"]["range"]
        log(f"search done: range {low:.4g}-{high:.4g}, best lr {tuned['best']['lr']:.4g} "
            f"({tuned['best']['val_acc']:.2%})")
        lrs = [float(v) for v in np.geomspace(low, high, args.grid)]
        accs = grid(lrs, args.grid_seeds, common, work, args.data, log)
    step = (high / low) ** (1 / (args.grid - 1))
    means = accs.mean(axis=1)
    best = lrs[int(np.argmax(means))]
    chosen = tuned["best"]["lr"]
    print(f"\nbf16 matmul peak {peak:.0f} GFLOP/s; total {time.perf_counter() - start:.0f} s")
    print(f"\n| grid lr | best validation top-1, mean of {args.grid_seeds} seeds | std | per seed |\n|---|---|---|---|")
    print("\n".join(f"| {lr:.4g} | {row.mean():.2%} | {row.std():.2%} | {', '.join(f'{a:.2%}' for a in row)} |"
                    for lr, row in zip(lrs, accs)))
    print("\n| trial | state | lr | best validation top-1 |\n|---|---|---|---|")
    print("\n".join(f"| {r['trial']} | {r['state']} | {r['lr']:.4g} | "
                    f"{'-' if r['val_acc'] is None else format(r['val_acc'], '.2%')} |"
                    for r in tuned["rows"] if r["lr"] is not None))
    print(f"\nbest grid lr {best:.4g} ({means.max():.2%} mean); search's lr {chosen:.4g} ({tuned['best']['val_acc']:.2%}); "
          f"distance {abs(math.log(chosen / best)) / math.log(step):.2f} grid steps (one step = x{step:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
