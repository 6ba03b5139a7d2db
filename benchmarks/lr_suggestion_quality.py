"""How good is each range-test suggestion? Train at it and at a grid of lrs, same budget and seed.

    python benchmarks/lr_suggestion_quality.py --data ../shared/data/cifar10 [--setups fastnet-sgd,...]
        [--epochs 8 | --epochs fastnet-sgd=8 resnet18-sgd=3] [--out results/lr_quality.json] [--smoke]

Setups (each on a class-balanced 10,000-image subset of the training split, the full test split):

    fastnet-sgd    FastNet width 0.5, SGD momentum 0.9 Nesterov, batch 256, 8 epochs
    fastnet-adam   FastNet width 0.5, Adam, batch 256, 8 epochs
    resnet18-sgd   ResNet18, SGD momentum 0.9, batch 128, 3 epochs

Everything else comes from recipes/cifar10-quick.yaml (one-cycle schedule with the candidate lr
as its peak, label smoothing, augmentation, flip TTA), and training is ``lrlab.pipeline.train``,
exactly what ``lrlab train`` runs, from the same seed and the same initial weights each time.

Per setup: one range test (``lrlab.pipeline.range_test``, recorded), a 7-point log grid from the
range test's start_lr to the lr where it stopped, and every suggestion method's lr (x the
recipe's lr_factor; the methods work on the zero-lag smoothed curve), plus "steepest-ema",
the plain steepest-slope rule on the running EMA as other LR finders apply it; identical lrs
are trained once. The score is the final-epoch validation top-1 (the recipe's data.val_split:
a hold-out of train by default); the final model's test top-1 is recorded beside it, reported only.
Printed: a table per setup (method, suggested lr, its top-1, best grid top-1, ratio) and the
grid. ``--out`` saves every number as JSON after each training (and the range tests' JSON/PNG
beside it), so a long run can be inspected while it goes. ``--smoke`` shrinks everything
(1,000 training and 500 test images, 1 epoch, 3-point grid, 30-step range test) to check the
script in seconds; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from lrlab.config import load_config
from lrlab.errors import LrlabError
from lrlab.io import write_json
from lrlab.lr_finder import METHODS
from lrlab.lr_finder.suggest import steepest
from lrlab import pipeline
from lrlab.lr_plan import LRPlan
from lrlab.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
SETUPS = {
    "fastnet-sgd": (8, ["model.name=fastnet", "model.kwargs={width: 0.5}", "train.optimizer=sgd",
                        "train.momentum=0.9", "train.nesterov=true", "train.batch_size=256"]),
    "fastnet-adam": (8, ["model.name=fastnet", "model.kwargs={width: 0.5}", "train.optimizer=adam",
                         "train.batch_size=256"]),
    "resnet18-sgd": (3, ["model.name=resnet18", "model.kwargs={}", "train.optimizer=sgd", "train.momentum=0.9",
                         "train.nesterov=false", "train.batch_size=128"]),
}
EMA_STEEPEST = "steepest-ema"
COMMON = ["train.schedule=onecycle", "train.max_lr=null", "lr_finder.enabled=true", "data.train_subset=10000"]
SMOKE = ["data.train_subset=1000", "data.test_subset=500", "lr_finder.num_iter=30", "lr_finder.skip_start=5",
         "lr_finder.skip_end=3"]


def parse_epochs(items: list[str], setups: list[str]) -> dict[str, int]:
    """``["5"]`` -> every setup 5 epochs; ``["fastnet-sgd=4", ...]`` -> per setup."""
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        targets = [name] if sep else setups
        if sep and name not in SETUPS:
            raise SystemExit(f"error: --epochs {item}: unknown setup {name!r}; valid: {', '.join(SETUPS)}")
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"error: --epochs {item}: the number of epochs must be a positive integer")
        out.update({t: int(value) for t in targets})
    return out


def log_grid(low: float, high: float, n: int) -> list[float]:
    """``n`` learning rates evenly spaced in log10 from ``low`` to ``high`` (both included)."""
    return [float(v) for v in np.geomspace(low, high, n)]


def key(lr: float) -> float:
    """Learning rates equal to 9 significant digits are trained once."""
    return float(f"{lr:.9g}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 ImageFolder tree or cifar-10-batches-py")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {', '.join(SETUPS)}")
    parser.add_argument("--epochs", nargs="*", default=[], metavar="N|SETUP=N",
                        help="epochs for every setup, or per setup (default: fastnet 8, resnet18 3)")
    parser.add_argument("--grid", type=int, default=7, help="points of the log grid (default 7; --smoke: 3)")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "cifar10-quick.yaml"))
    parser.add_argument("--out", type=Path, help="JSON file for every number, rewritten after each training")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes to check the script in seconds")
    parser.add_argument("--reuse", type=Path, help="an earlier --out JSON: its trainings with the same setup, "
                        "overrides and lr are not repeated (training does not depend on the suggestions)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra config overrides")
    args = parser.parse_intermixed_args()

    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        raise SystemExit(f"error: unknown setup(s) {unknown}; valid: {', '.join(SETUPS)}")
    epochs = {s: 1 if args.smoke else SETUPS[s][0] for s in setups} | parse_epochs(args.epochs, setups)
    n_grid = 3 if args.smoke and args.grid == 7 else args.grid
    if n_grid < 2:
        raise SystemExit("error: --grid must be at least 2")

    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:8.1f}s] {text}", flush=True)

    earlier: dict = {}
    if args.reuse:
        for setup, e in json.loads(args.reuse.read_text())["setups"].items():
            for run in e.get("runs", []):
                if run.get("error") is None:
                    earlier[(setup, json.dumps(e["overrides"]), e["epochs"], key(run["lr"]))] = run
    report: dict = {"smoke": args.smoke, "recipe": args.recipe, "grid_points": n_grid, "setups": {}}
    save = (lambda: write_json(args.out, report)) if args.out else (lambda: None)
    for name in setups:
        overrides = [f"data.path={args.data}", *COMMON, *SETUPS[name][1], f"train.epochs={epochs[name]}",
                     *(SMOKE if args.smoke else []), *args.overrides]
        try:
            config = load_config(args.recipe, overrides)
        except LrlabError as e:
            raise SystemExit(f"error: {name}: {e}") from None
        config = config.model_copy(update={"name": f"lrq-{name}"})
        setup = pipeline.prepare(config, range_test=True, train=True, explain=False)
        data = setup.data
        entry: dict = {"overrides": overrides, "epochs": epochs[name], "train_images": len(data.train),
                       "val_images": len(data.val), "test_images": len(data.test), "runs": []}
        report["setups"][name] = entry

        log(f"{name}: range test ({config.lr_finder.num_iter} steps, batch {config.train.batch_size})")
        result = pipeline.range_test(setup)
        if args.out:
            RunFolder(args.out.parent / f"{args.out.stem}_{name}").save_range_test(result)
        entry["range_test"] = result.to_dict()
        factor = config.lr_finder.lr_factor
        suggested = {m: s.lr * factor for m, s in result.suggestions.items()}
        # the plain rule as other LR finders apply it: steepest slope of the running EMA
        try:
            suggested[EMA_STEEPEST] = steepest(result.lrs, result.smoothed, result.skip_start,
                                               result.skip_end).lr * factor
        except LrlabError:
            pass
        grid = log_grid(result.start_lr, result.stop_lr, n_grid)
        entry["grid"] = grid
        entry["suggested"] = suggested
        log(f"{name}: stopped {result.stop_reason} at lr {result.stop_lr:.3g}; grid "
            + ", ".join(f"{g:.3g}" for g in grid) + "; suggestions "
            + ", ".join(f"{m} {lr:.3g}" for m, lr in suggested.items())
            + "".join(f"; {m}: none ({why})" for m, why in result.suggestion_errors.items()))
        save()

        candidates: dict[float, list[str]] = {}
        for i, g in enumerate(grid):
            candidates.setdefault(key(g), []).append(f"grid{i + 1}")
        for m, lr in suggested.items():
            candidates.setdefault(key(lr), []).append(m)
        scores: dict[float, float | None] = {}
        for n, (lr, labels) in enumerate(candidates.items(), 1):
            old = earlier.get((name, json.dumps(overrides), epochs[name], lr))
            if old is not None and "final_val_acc" in old:
                scores[lr] = old["final_val_acc"]
                entry["runs"].append({**old, "labels": labels, "reused": True})
                log(f"{name}: {n}/{len(candidates)} lr {lr:.3g} ({', '.join(labels)}) -> val top-1 "
                    f"{100 * old['final_val_acc']:.2f}% (reused from {args.reuse})")
                continue
            t0 = time.perf_counter()
            setup.model = pipeline.new_model(config, data, setup.compute)  # same seed, same initial weights
            try:
                history = pipeline.train(setup, LRPlan(lr, "peak", f"candidate {', '.join(labels)}"))
                final, best = history.records[-1]["val_acc"], history.best()["val_acc"]
                test = pipeline.test_accuracy(setup) if history.stopped is None else None
                err = None
            except LrlabError as e:
                final = best = test = None
                err = str(e)
            acc = final if final is None or math.isfinite(final) else None
            scores[lr] = acc
            entry["runs"].append({"lr": lr, "labels": labels, "final_val_acc": acc, "best_val_acc": best,
                                  "final_test_acc": test, "seconds": time.perf_counter() - t0, "error": err})
            save()
            shown = "failed: " + err if err else f"val top-1 {100 * acc:.2f}%"
            log(f"{name}: {n}/{len(candidates)} lr {lr:.3g} ({', '.join(labels)}) -> {shown} "
                f"({time.perf_counter() - t0:.0f}s)")

        grid_accs = [scores[key(g)] for g in grid]
        best_grid = max((a for a in grid_accs if a is not None), default=None)
        entry["best_grid_acc"] = best_grid
        rows = []
        for m in [*METHODS, EMA_STEEPEST]:
            lr = suggested.get(m)
            acc = scores.get(key(lr)) if lr is not None else None
            ratio = acc / best_grid if acc is not None and best_grid else None
            rows.append({"method": m, "lr": lr, "acc": acc, "ratio": ratio})
        entry["table"] = rows
        save()
        print_tables(name, epochs[name], rows, grid, grid_accs, best_grid, result.method)
    log("done")
    return 0


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def print_tables(name: str, epochs: int, rows: list[dict], grid: list[float], grid_accs: list, best_grid,
                 default: str) -> None:
    print(f"\n{name} ({epochs} epochs, one-cycle peak = lr; final-epoch validation top-1)")
    print(f"  {'method':<10}{'suggested lr':>14}{'val top-1':>12}{'best grid':>12}{'ratio':>8}")
    for r in rows:
        lr = "-" if r["lr"] is None else f"{r['lr']:.3g}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        mark = "  (default)" if r["method"] == default else ""
        print(f"  {r['method']:<10}{lr:>14}{pct(r['acc']):>12}{pct(best_grid):>12}{ratio:>8}{mark}")
    print("  grid:  " + "  ".join(f"{g:.3g}: {pct(a)}" for g, a in zip(grid, grid_accs)))
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
