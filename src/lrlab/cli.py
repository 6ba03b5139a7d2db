"""The ``lrlab`` command: run, find-lr, train, explain.

    lrlab run RECIPE [--data PATH] [--out DIR] [--quiet] [section.key=value ...]

Bad input ends with one line ``error: ...`` on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from lrlab.config import load_config
from lrlab.errors import LrlabError
from lrlab.runner import Callbacks, explain_run, run_pipeline

STEPS = {"run": ("find-lr", "train", "explain"), "find-lr": ("find-lr",), "train": ("train",)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrlab", description=(
        "LR range test, training with curves, and Grad-CAM on the mistakes, in one run folder."))
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"run": "the whole workflow: range test, training, mistakes + Grad-CAM",
             "find-lr": "the LR range test only",
             "train": "training only, at train.lr (no range test)",
             "explain": "mistakes + Grad-CAM from the best checkpoint of an earlier run"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        if name == "explain":
            p.add_argument("run_dir", type=Path, help="folder of an earlier run (only read)")
        else:
            p.add_argument("recipe", type=Path, help="YAML recipe, e.g. recipes/cifar10-quick.yaml")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="config overrides, e.g. train.epochs=3")
        p.add_argument("--data", type=Path, help="ImageFolder tree with train/ and test/, or cifar-10-batches-py")
        p.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of run folders (default: runs)")
        p.add_argument("--quiet", action="store_true", help="print nothing but errors and the final line")
    return parser


class _Progress(Callbacks):
    """tqdm bars per stage and one line per epoch, on stderr."""

    def __init__(self, epochs: int):
        super().__init__(on_stage=self._stage, on_step=self._step, on_epoch=self._epoch)
        self.bar: tqdm | None = None
        self.epochs = epochs

    def _stage(self, name: str, total: int) -> None:
        self.close()
        self.bar = tqdm(total=total or None, desc=name, unit="step", dynamic_ncols=True, leave=False)

    def _step(self, step: int, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def _epoch(self, r: dict) -> None:
        tqdm.write(f"epoch {r['epoch']:>3}/{self.epochs}  train loss {r['train_loss']:.3f} "
                   f"acc {100 * r['train_acc']:.2f}%  test loss {r['test_loss']:.3f} "
                   f"acc {100 * r['test_acc']:.2f}%  lr {r['lr']:.3g}  {r['seconds']:.0f}s", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _final_line(command: str, summary: dict) -> str:
    where = summary["run_dir"]
    if "best_test_acc" in summary:
        return (f"top-1 test accuracy {100 * summary['best_test_acc']:.2f}% at epoch "
                f"{summary['best_epoch']}/{summary['epochs']} (lr {summary['lr']:.3g}, "
                f"{summary['wall_seconds']:.0f}s): {where}")
    if command == "find-lr":
        return f"suggested lr {summary['lr']:.3g}: {where}"
    return f"{len(summary['mistakes'])} mistakes explained with Grad-CAM on {summary['target_layer']}: {where}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lrlab`` console script; returns the exit status."""
    parser = _parser()
    # Overrides may come before or after the options; argparse only collects a trailing run.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = list(args.overrides) + extra
    if args.data is not None:
        if not args.data.exists():
            return _fail(f"--data path {args.data} does not exist")
        overrides.append(f"data.path={args.data.resolve()}")
    progress = None
    try:
        if args.command == "explain":
            recipe = args.run_dir / "config.yaml"
            if not recipe.is_file():
                raise LrlabError(f"{args.run_dir} is not a run folder (no config.yaml in it)")
            config = load_config(recipe, overrides)
            summary = explain_run(args.run_dir, config, args.out)
        else:
            config = load_config(args.recipe, overrides)
            progress = None if args.quiet else _Progress(config.train.epochs)
            summary = run_pipeline(config, args.out, progress or Callbacks(), STEPS[args.command])
    except LrlabError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    finally:
        if progress is not None:
            progress.close()
    print(_final_line(args.command, summary))
    return 0


def _fail(message: str, status: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
