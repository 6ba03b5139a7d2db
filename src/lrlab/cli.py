"""The ``lrlab`` command: run, find-lr, train, explain, compare, tune, resume, report.

    lrlab run RECIPE [--data PATH] [--out DIR] [--quiet] [--resume RUN_DIR] [section.key=value ...]
    lrlab compare RECIPE --vary KEY=V1,V2 [--vary ...] [--variant "[LABEL:] KEY=V ..."] [...]
    lrlab tune RECIPE [--study NAME] [--storage URL] [--trials K] [--out DIR] [section.key=value ...]
    lrlab resume RUN_DIR   # continue a killed or interrupted run in its own folder
    lrlab report RUN_DIR   # rebuild RUN_DIR/report.html from the run's files
    lrlab predict RUN_DIR IMAGE_OR_FOLDER... [--top-k K] [--out CSV] [--device DEV]
    lrlab export RUN_DIR   # RUN_DIR/export/model.pt2 + model.json, loadable with plain torch

    torchrun --nproc-per-node=N -m lrlab run RECIPE ...   # data-parallel (also train, find-lr, resume)

Every failure ends with one line ``error: ...`` on stderr and no traceback. Exit status: 0 done,
1 a file could not be written, 2 bad input, 3 training stopped at a non-finite loss, 130 / 143
stopped by SIGINT / SIGTERM (after a checkpoint when it came during training). Under torchrun
every rank exits so, and only rank 0 prints (:mod:`lrlab.distributed`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from lrlab import distributed, interrupts
from lrlab.config import load_config
from lrlab.errors import LrlabError
from lrlab.lr_finder.spread import STABLE_RANGE
from lrlab.pipeline import Callbacks, explain_run, resume_pipeline, run_pipeline
from lrlab.run_folder import RunFolder

STAGES = {"run": dict(range_test_stage=True, train_stage=True, explain_stage=True),
          "find-lr": dict(range_test_stage=True, train_stage=False, explain_stage=False),
          "train": dict(range_test_stage=False, train_stage=True, explain_stage=False)}
"""The pipeline stages each training command runs."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrlab", description=(
        "LR range test, training with curves, and Grad-CAM on the mistakes, in one run folder."))
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"run": "the whole workflow: range test, training, mistakes + Grad-CAM",
             "find-lr": "the LR range test only",
             "train": "training only, at train.lr (no range test)",
             "explain": "mistakes + Grad-CAM from the best checkpoint of an earlier run",
             "compare": "train variants of a recipe (--vary grid, --variant) and draw them on the same axes",
             "tune": "Optuna search over the recipe's tune.space, the lr first; workers share a study by --storage",
             "resume": "continue a killed or interrupted run in its own folder, from its last checkpoint"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        if name == "resume":
            p.add_argument("run_dir", type=Path, help="the run folder to continue")
            p.add_argument("--quiet", action="store_true", help="print nothing but errors and the final line")
            continue
        if name in STAGES:
            p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                           help="continue this earlier run of the same recipe instead of starting a new folder")
        if name == "explain":
            p.add_argument("run_dir", type=Path, help="folder of an earlier run (only read)")
        else:
            p.add_argument("recipe", type=Path, help="YAML recipe, e.g. recipes/cifar10-quick.yaml")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="config overrides, e.g. train.epochs=3")
        p.add_argument("--data", type=Path, help="ImageFolder tree with train/ and test/, or cifar-10-batches-py")
        p.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of run folders (default: runs)")
        p.add_argument("--quiet", action="store_true", help="print nothing but errors and the final line")
        if name in _OPTIONS:
            _OPTIONS[name](p)
    text = "rebuild the report page of a run folder from its files (the only file written there)"
    p = sub.add_parser("report", help=text, description=text)
    p.add_argument("run_dir", type=Path, help="a run folder, e.g. runs/cifar10-quick-20261122-052508")
    text = "top-k classes of new images with a run's best checkpoint and its own preprocessing"
    p = sub.add_parser("predict", help=text, description=text)
    p.add_argument("run_dir", type=Path, help="folder of a run that trained")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders of them")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes per image (default: 3)")
    p.add_argument("--out", type=Path, metavar="CSV", help="also write the predictions to this CSV file")
    p.add_argument("--device", help="compute on this device instead of the recipe's (e.g. cpu)")
    text = "write the run's best model with its preprocessing as a torch.export program"
    p = sub.add_parser("export", help=text, description=text)
    p.add_argument("run_dir", type=Path, help="folder of a run that trained")
    return parser


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lrlab compare``."""
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one axis of the grid, e.g. train.optimizer=sgd,adam (repeat for a grid)")
    p.add_argument("--variant", action="append", default=[], metavar='"[LABEL:] KEY=V ..."',
                   help='one variant setting several keys, e.g. "sgd: train.optimizer=sgd train.momentum=0"')
    p.add_argument("--train-only", action="store_true",
                   help="no range test per variant: train at train.lr (train.max_lr for onecycle/cyclic)")


def _tune_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lrlab tune``."""
    p.add_argument("--study", metavar="NAME", help="the study every worker joins (default: the recipe's name)")
    p.add_argument("--storage", metavar="URL", help="sqlite:///PATH (one machine), postgresql://..., or "
                   "journal:PATH (default: a SQLite file in the summary folder OUT/STUDY)")
    p.add_argument("--trials", type=int, metavar="K", help="the study's budget of trials (default: tune.trials)")


_OPTIONS = {"compare": _compare_arguments, "tune": _tune_arguments}
"""The options of the commands that have their own."""


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
                   f"acc {100 * r['train_acc']:.2f}%  val loss {r['val_loss']:.3f} "
                   f"acc {100 * r['val_acc']:.2f}%  lr {r['lr']:.3g}  {r['seconds']:.0f}s", file=sys.stderr)

    def trial(self, number: int, stage: int, values: dict) -> None:
        self.close()
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        tqdm.write(f"trial {number} (stage {stage}): {shown}", file=sys.stderr)

    def variant(self, i: int, n: int, label: str) -> None:
        self.close()
        tqdm.write(f"variant {i}/{n}: {label}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _result_line(r) -> None:
    if r.status == "ok":
        tqdm.write(f"  {r.label}: best val top-1 {100 * r.best_val_acc:.2f}% at epoch {r.best_epoch} "
                   f"({r.wall_seconds:.0f}s)", file=sys.stderr)
    else:
        tqdm.write(f"  {r.label}: failed: {r.error}", file=sys.stderr)


def _final_line(command: str, summary: dict) -> str:
    if command == "compare":
        n, failed = len(summary["variants"]), summary["failed"]
        best = f"; best: {summary['best']}" if summary["best"] else ""
        return f"compared {n} variants ({failed} failed){best}: {summary['compare_dir']}"
    if command == "tune":
        c, best = summary["counts"], summary["best"]
        text = (f"study {summary['study']}: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed "
                f"of {summary['budget']} trials")
        if best is not None:
            text += (f"; best val top-1 {100 * best['val_acc']:.2f}% (trial {best['trial']}, stage {best['stage']}, "
                     f"lr {best['lr']:.3g})")
        return f"{text}: {summary['tune_dir']}"
    where = summary["run_dir"]
    if "best_val_acc" in summary:
        tested = [f"{name} {100 * summary[key]:.2f}%" for key, name in
                  (("test_acc_at_best", "at best"), ("final_test_acc", "final")) if summary.get(key) is not None]
        on = " (val = the test split)" if summary.get("val_split") == "test" else ""
        return (f"best val top-1{on} {100 * summary['best_val_acc']:.2f}% at epoch {summary['best_epoch']}/"
                f"{summary['epochs']}{'; test top-1 ' + ', '.join(tested) if tested else ''} "
                f"(lr {summary['lr']:.3g}, {summary['wall_seconds']:.0f}s): {where}")
    if "target_layer" not in summary:  # find-lr, or a resumed find-lr
        return f"suggested lr {summary['lr']:.3g} ({summary.get('lr_method', 'steepest')}): {where}"
    layer = summary["target_layer"]
    layer = "+".join(layer) if isinstance(layer, list) else layer
    return f"{len(summary['mistakes'])} mistakes explained with {summary.get('method', 'gradcam')} on {layer}: {where}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lrlab`` console script; returns the exit status."""
    parser = _parser()
    # Overrides may come before or after the options; argparse only collects a trailing run.
    args, extra = parser.parse_known_args(argv)
    if args.command in ("report", "predict", "export"):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        try:
            return {"report": _report, "predict": _predict, "export": _export}[args.command](args)
        except LrlabError as e:
            return _fail(str(e), e.exit_status)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = list(getattr(args, "overrides", [])) + extra
    if args.command == "resume" and overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)} (a run resumes with its own config)")
    if getattr(args, "data", None) is not None:
        if not args.data.exists():
            return _fail(f"--data path {args.data} does not exist")
        overrides.append(f"data.path={args.data.resolve()}")
    try:
        with interrupts.handle_signals(), distributed.process_group(args.command):
            summary = _command(args, overrides)
    except LrlabError as e:
        return _fail(str(e), e.exit_status)
    except KeyboardInterrupt as e:
        return _interrupted(e)
    if not distributed.is_main():  # another rank of a torchrun job: rank 0 reports
        return 0
    if args.command == "find-lr" and not args.quiet:
        print(suggestion_table_text(summary.get("lr_suggestions") or [], summary.get("lr_window_cut"),
                                    summary.get("lr_repeats", 1)))
        if "lr_muon_suggestions" in summary:
            print("Muon's sweep, the rest held at the first sweep's lr (x lr_factor):\n"
                  + suggestion_table_text(summary["lr_muon_suggestions"], summary.get("lr_muon_window_cut"),
                                          summary.get("lr_repeats", 1)))
    print(_final_line(args.command, summary))
    return 0


def _command(args: argparse.Namespace, overrides: list[str]) -> dict:
    """Run the command of ``args``; returns its summary."""
    if args.command == "explain":
        source = RunFolder.open(args.run_dir)
        return explain_run(source, source.load_config(overrides), args.out)
    if args.command == "resume":
        run = distributed.from_main(lambda: RunFolder.open(args.run_dir))
        config, command = None, None
    else:
        config, command = load_config(args.recipe, overrides), args.command
        run = distributed.from_main(lambda: RunFolder.open(args.resume)) if getattr(args, "resume", None) else None
    quiet = args.quiet or not distributed.is_main()
    progress = None if quiet else _Progress((config or run.load_config()).train.epochs)
    try:
        if run is not None:
            return resume_pipeline(run, progress or Callbacks(), config, command).summary
        if args.command == "tune":
            return _tune(args, overrides, progress)
        if args.command == "compare":
            from lrlab.compare import run_compare

            return run_compare(args.recipe, overrides, args.vary, args.variant, args.out,
                               range_test_stage=not args.train_only, callbacks=progress,
                               on_variant=None if args.quiet else progress.variant,
                               on_result=None if args.quiet else _result_line)
        return run_pipeline(config, args.out, progress or Callbacks(), command=args.command,
                            **STAGES[args.command]).summary
    finally:
        if progress is not None:
            progress.close()


def _tune(args: argparse.Namespace, overrides: list[str], progress: _Progress | None) -> dict:
    """``lrlab tune``: this process is one worker of the study (Optuna's own log lines, one per
    trial, are kept unless --quiet)."""
    import optuna

    from lrlab.tune.study import run_tune

    optuna.logging.set_verbosity(optuna.logging.ERROR if args.quiet else optuna.logging.INFO)
    return run_tune(args.recipe, overrides, study_name=args.study, storage=args.storage, trials=args.trials,
                    out=args.out, callbacks=progress or Callbacks(), on_trial=progress.trial if progress else None)


def _interrupted(e: KeyboardInterrupt) -> int:
    """One line for a SIGINT/SIGTERM: how far the run got and the command that resumes it."""
    signum = getattr(e, "signum", signal.SIGINT)
    where = getattr(e, "where", "")
    run_dir = getattr(e, "run_dir", None)
    text = f"interrupted by {signal.Signals(signum).name}"
    if where:
        text += f" {where} (checkpoint written)"
    if run_dir is not None:
        text += f"; resume with: lrlab resume {run_dir}"
    return _fail(text, 128 + signum)


def suggestion_table_text(rows: list[dict], cut_lr: float | None = None, repeats: int = 1) -> str:
    """The range test's suggestions (``RangeTestResult.rows()``) as a small text table: method,
    lr, range of good lrs, with ``repeats`` > 1 the spread of the repeats' suggestions (max/min)
    and its verdict, and "<- used" on the method the run trains with; a method without a
    suggestion says why. A last line names the lr where the analysed window was cut, if it was."""
    extra = any(r.get("verdict") for r in rows)
    lines = [f"{'method':<10}{'lr':>10}   {'range of good lrs':<21}" + (f"{'spread':>8}  verdict" if extra else "")]
    for r in rows:
        used = "   <- used" if r["used"] else ""
        if r["lr"] is None:
            lines.append(f"{r['method']:<10}{'-':>10}   none: {r['note'].split(': ', 1)[-1]}{used}")
            continue
        band = f"{r['low']:.2e} - {r['high']:.2e}"
        spread = ""
        if extra:
            ratio = "-" if r.get("spread") is None else f"{r['spread']:.2f}x"
            spread = f"{ratio:>8}  {r.get('verdict') or '-':<8}"
        lines.append(f"{r['method']:<10}{r['lr']:>10.2e}   {band:<21}{spread}{used}")
    if extra:
        lines.append(f"lr from the mean of {repeats} sweeps; spread: max/min of the single sweeps' suggestions "
                     f"(stable: <= {STABLE_RANGE}x)")
    if cut_lr is not None:
        lines.append(f"window cut at lr {cut_lr:.2e}: a sustained rise of the loss; the suggestions read only the lrs below it")
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    """``lrlab report RUN_DIR``: rebuild RUN_DIR/report.html (atomically) and print its path."""
    from lrlab.report import write_report

    print(f"report: {write_report(RunFolder.open(args.run_dir))}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    """``lrlab predict``: one line per image (its top-k classes with probabilities), and the CSV."""
    from lrlab.inference import image_files, load_trained, predict_images, predictions_csv, top_k
    from lrlab.io import atomic_write_text

    if args.top_k < 1:
        raise LrlabError(f"--top-k must be a positive integer, not {args.top_k}")
    files = image_files(args.images)
    trained = load_trained(RunFolder.open(args.run_dir), args.device)
    rows = top_k(predict_images(trained, files), trained.preprocessing.classes, args.top_k)
    for f, row in zip(files, rows):
        print(f"{f}  " + "  ".join(f"{c} {100 * p:.1f}%" for c, p in row))
    if args.out is not None:
        atomic_write_text(args.out, predictions_csv(files, rows))
        print(f"predictions: {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """``lrlab export RUN_DIR``: the exported program and its JSON description, paths printed."""
    from lrlab.inference import export_info, export_program, load_trained

    run = RunFolder.open(args.run_dir)
    trained = load_trained(run, "cpu")
    program, info = run.save_export(export_program(trained), export_info(trained))
    print(f"exported: {program} (classes and preprocessing: {info})")
    return 0


def _fail(message: str, status: int = 2) -> int:
    if distributed.is_main():
        print(f"error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
