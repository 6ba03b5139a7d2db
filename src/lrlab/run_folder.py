"""The run folder: the only code that knows its file names.

Every command that trains or explains writes one folder ``<out>/<name>-<YYYYmmdd-HHMMSS>[-k]``
that a person can read without lrlab (see README, "A run folder"). :class:`RunFolder` creates it,
saves each stage's result in its files (figures included) and loads them back typed; the report,
``compare``, ``explain`` and the CLI read a run only through it. Every write is atomic
(temporary name, fsync, rename: :mod:`lrlab.io`), so a killed run never leaves a half-written
file that a later command trusts.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from lrlab import plots
from lrlab.config import Config, load_config, save_config
from lrlab.engine import COLUMNS, STAGE, History
from lrlab.errors import LrlabError, WriteError
from lrlab.io import atomic_path, atomic_write_bytes, atomic_write_text, write_json
from lrlab.lr_plan import LRPlan

FILES = {
    "config": "config.yaml",
    "preprocessing": "preprocessing.json",
    "range_test": "lr_finder.json",
    "range_test_figure": "lr_finder.png",
    "lr_plan": "lr_plan.json",
    "range_test_stage1": "lr_finder_stage1.json",
    "range_test_figure_stage1": "lr_finder_stage1.png",
    "lr_plan_stage1": "lr_plan_stage1.json",
    "history": "history.json",
    "history_csv": "history.csv",
    "lr_steps": "lr_steps.csv",
    "loss_figure": "loss.png",
    "accuracy_figure": "accuracy.png",
    "lr_figure": "lr.png",
    "lr_steps_figure": "lr_steps.png",
    "plateaus_figure": "plateaus.png",
    "predictions": "predictions.pt",
    "per_class": "per_class.json",
    "confusion_figure": "confusion.png",
    "mistakes": "mistakes.json",
    "mistakes_figure": "misclassified.png",
    "cam_figure": "gradcam.png",
    "cam_pairs_figure": "gradcam_pred_true.png",
    "faithfulness": "faithfulness.json",
    "faithfulness_figure": "faithfulness.png",
    "summary": "summary.json",
    "status": "status.json",
    "report": "report.html",
    "tensorboard_dir": "tensorboard",
    "last_checkpoint": "checkpoints/last.pt",
    "best_checkpoint": "checkpoints/best.pt",
    "export_program": "export/model.pt2",
    "export_info": "export/model.json",
}
"""What a run folder holds: kind -> path relative to the folder."""


def stage_kind(kind: str, stage: int | None) -> str:
    """The file kind of ``kind`` (range_test, range_test_figure, lr_plan) in transfer stage
    ``stage``: stage 1 (head, backbone frozen; :mod:`lrlab.transfer`) has its own
    ``..._stage1`` files; stage 2 and single-stage runs have the usual ones."""
    return f"{kind}_stage1" if stage == 1 else kind


class RunFolder:
    """One run folder. Make one with :meth:`create` (a new folder) or :meth:`open` (an earlier
    run: read-only except for :meth:`save_report`, and for ``lrlab.pipeline.resume_pipeline``,
    which continues it).

    Attributes:
        path: the folder.
    """

    FILES = FILES

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ------------------------------------------------------------------ the folder

    @classmethod
    def create(cls, out: str | Path, name: str) -> RunFolder:
        """A new, empty folder ``out/<name>-<YYYYmmdd-HHMMSS>[-k]``; never an existing one, so a
        command cannot touch an earlier run.

        Raises:
            WriteError: ``out`` cannot be written; LrlabError: no free name is left.
        """
        out = Path(out)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for k in range(1, 1000):
            path = out / (f"{name}-{stamp}" if k == 1 else f"{name}-{stamp}-{k}")
            try:
                path.mkdir(parents=True, exist_ok=False)
                return cls(path)
            except FileExistsError:
                continue
            except OSError as e:
                raise WriteError(f"cannot create a run folder under {out} ({e.strerror})") from None
        raise LrlabError(f"could not create a new run folder under {out}")

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """An earlier run folder.

        Raises:
            LrlabError: ``path`` is not a run folder (it has no config.yaml).
        """
        run = cls(path)
        if not run.file("config").is_file():
            raise LrlabError(f"{path} is not a run folder (no {cls.FILES['config']} in it)")
        return run

    def discard(self) -> None:
        """Remove the folder and everything in it (a run whose recipe was rejected)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def file(self, kind: str) -> Path:
        """The path of ``kind`` (a key of :attr:`FILES`) in this folder."""
        return self.path / self.FILES[kind]

    def files(self) -> list[str]:
        """Every file in the folder (relative paths, sorted), hidden files left out."""
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def read_json(self, kind: str) -> Any:
        """The parsed JSON file ``kind``, or None when it is missing or unreadable."""
        try:
            return json.loads(self.file(kind).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ config, plan, summary

    def save_config(self, config: Config) -> None:
        save_config(config, self.file("config"))

    def load_config(self, overrides: list[str] = ()) -> Config:
        """The run's config.yaml with ``overrides`` applied (raises LrlabError as load_config)."""
        return load_config(self.file("config"), overrides)

    def save_preprocessing(self, preprocessing) -> None:
        """The run's :class:`lrlab.inference.Preprocessing` (class names, resize, crop, mean, std)."""
        write_json(self.file("preprocessing"), preprocessing.to_dict())

    def load_preprocessing(self):
        """The run's :class:`lrlab.inference.Preprocessing`.

        Raises:
            LrlabError: the file is missing or incomplete (a run made before lrlab saved it).
        """
        from lrlab.inference import Preprocessing

        d = self.read_json("preprocessing")
        if not isinstance(d, dict):
            raise LrlabError(f"{self.path} has no readable {self.FILES['preprocessing']}; re-run its recipe "
                             f"with this lrlab version to predict or export with it")
        return Preprocessing.from_dict(d)

    def save_export(self, program, info: dict) -> tuple[Path, Path]:
        """Write the exported program (``torch.export.ExportedProgram``) and its JSON description
        into the run's export folder; returns both paths."""
        from torch.export import save

        with atomic_path(self.file("export_program")) as tmp:
            save(program, tmp)
        write_json(self.file("export_info"), info)
        return self.file("export_program"), self.file("export_info")

    def save_plan(self, plan: LRPlan, stage: int | None = None) -> None:
        """lr_plan.json (of transfer stage ``stage``, :func:`stage_kind`)."""
        write_json(self.file(stage_kind("lr_plan", stage)), plan.to_dict())

    def save_summary(self, summary: dict) -> None:
        write_json(self.file("summary"), summary)

    # ------------------------------------------------------------------ range test

    def save_range_test(self, result, stage: int | None = None) -> None:
        """lr_finder.json and lr_finder.png (every suggestion marked, the used band shaded), of
        transfer stage ``stage`` (:func:`stage_kind`)."""
        result.save_json(self.file(stage_kind("range_test", stage)))
        plots.save_figure(result.plot(), self.file(stage_kind("range_test_figure", stage)))

    # ------------------------------------------------------------------ training

    def save_history(self, history: History, name: str, plateau_spans: list[tuple[int, int]]) -> None:
        """history.csv/.json, lr_steps.csv and the curves: loss, accuracy, lr, lr_steps and
        plateaus figures (``plateau_spans`` shaded; ``name`` labels the lr-steps legend)."""
        buf = io.StringIO()
        staged = any(STAGE in r for r in history.records)
        writer = csv.DictWriter(buf, fieldnames=COLUMNS + [STAGE] * staged, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history.records)
        atomic_write_text(self.file("history_csv"), buf.getvalue())
        write_json(self.file("history"), history.records)
        steps = history.lr_steps()
        lines = ["step,epoch,lr,batch_size"] + [f"{s},{e},{lr!r},{'' if b is None else b}" for s, e, lr, b in steps]
        atomic_write_text(self.file("lr_steps"), "\n".join(lines) + "\n")
        plots.plot_plateaus(history.records, plateau_spans, self.file("plateaus_figure"))
        plots.plot_lr_steps({name: ([lr for _, _, lr, _ in steps], [b for *_, b in steps])},
                            self.file("lr_steps_figure"))
        plots.plot_loss(history.records, self.file("loss_figure"))
        plots.plot_accuracy(history.records, self.file("accuracy_figure"))
        plots.plot_lr(history.records, self.file("lr_figure"))

    def save_checkpoint(self, state: dict, is_best: bool) -> None:
        """checkpoints/last.pt, and best.pt (the same bytes) when ``is_best``; each atomic, so a
        kill at any moment leaves the previous complete file.

        Raises:
            WriteError: a file could not be written (the previous one is intact).
        """
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        atomic_write_bytes(self.file("last_checkpoint"), data)
        if is_best:
            atomic_write_bytes(self.file("best_checkpoint"), data)

    def load_checkpoint(self, kind: str = "best_checkpoint", map_location: Any = "cpu") -> dict:
        """The saved training state (``kind``: best_checkpoint or last_checkpoint), read with
        ``torch.load(..., weights_only=True)``.

        Raises:
            LrlabError: the file is missing, truncated or not a checkpoint.
        """
        path = self.file(kind)
        if not path.is_file():
            raise LrlabError(f"{self.path} has no {self.FILES[kind]}; pass the folder of a run that trained")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, wrong types: all one message
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise LrlabError(f"checkpoint {path} is corrupt or truncated ({reason}); delete it to "
                             f"start that stage again") from None

    def clear_tensorboard(self) -> None:
        """Remove the TensorBoard event files (a resumed run writes them again from its history)."""
        shutil.rmtree(self.file("tensorboard_dir"), ignore_errors=True)

    def save_status(self, command: str, stages: dict[str, bool]) -> None:
        """status.json: the command that made the run and its stages, which ``lrlab resume`` repeats."""
        write_json(self.file("status"), {"command": command, "stages": stages})

    def load_status(self) -> tuple[str, dict[str, bool]]:
        """(command, stages) from status.json.

        Raises:
            LrlabError: the file is missing or malformed (a run made before lrlab could resume).
        """
        status = self.read_json("status")
        if not isinstance(status, dict) or not isinstance(status.get("stages"), dict):
            raise LrlabError(f"{self.file('status')} is missing or malformed, so {self.path} cannot be resumed; "
                             f"start a new run")
        return str(status.get("command")), {k: bool(v) for k, v in status["stages"].items()}

    # ------------------------------------------------------------------ range test and plan, read back

    def load_plan(self, stage: int | None = None) -> LRPlan | None:
        """The saved LRPlan (of transfer stage ``stage``), or None when lr_plan.json is missing
        or malformed."""
        data = self.read_json(stage_kind("lr_plan", stage))
        try:
            return LRPlan.from_dict(data) if isinstance(data, dict) else None
        except (KeyError, TypeError, ValueError):
            return None

    def load_range_test(self, stage: int | None = None):
        """The saved ``lrlab.lr_finder.RangeTestResult`` (of transfer stage ``stage``), or None
        when missing or malformed."""
        from lrlab.lr_finder import RangeTestResult

        try:
            return RangeTestResult.load_json(self.file(stage_kind("range_test", stage)))
        except (LrlabError, OSError):
            return None

    # ------------------------------------------------------------------ interpretation

    def save_predictions(self, pred) -> None:
        pred.save(self.file("predictions"))

    def load_predictions(self):
        """The saved test-set predictions (``lrlab.interpret.Predictions``), or None if missing/invalid."""
        from lrlab.interpret import Predictions

        if not self.file("predictions").is_file():
            return None
        try:
            return Predictions.load(self.file("predictions"))
        except LrlabError:
            return None

    def save_interpretation(self, found, classes: list[str], alpha: float, colormap: str) -> None:
        """per_class.json + confusion.png; for the chosen mistakes misclassified.png, gradcam.png,
        gradcam_pred_true.png and mistakes.json; faithfulness.json/.png when measured.

        Args:
            found: a ``lrlab.pipeline.Interpretation``.
        """
        write_json(self.file("per_class"), found.per_class)
        plots.plot_confusion(found.per_class["confusion"], classes, self.file("confusion_figure"))
        m = found.mistakes
        if m:
            titles = [plots.mistake_title(r["pred"], r["prob"], r["true"]) for r in m]
            plots.plot_mistakes(found.images, titles, self.file("mistakes_figure"))
            plots.plot_cam_grid(found.images, found.maps_pred, titles, self.file("cam_figure"),
                                alpha=alpha, cmap=colormap)
            plots.plot_cam_pairs(found.images, found.maps_pred, found.maps_true, [r["pred"] for r in m],
                                 [r["prob"] for r in m], [r["true"] for r in m], self.file("cam_pairs_figure"),
                                 alpha=alpha, cmap=colormap)
        if found.faithfulness is not None:
            self.save_faithfulness(found.faithfulness)
        write_json(self.file("mistakes"), {**found.details, "mistakes": m})

    def save_faithfulness(self, result) -> None:
        """faithfulness.json and faithfulness.png (keep and delete curves per CAM method)."""
        result.save(self.file("faithfulness"))
        plots.plot_faithfulness(result.fractions, result.keep, result.delete, self.file("faithfulness_figure"),
                                intact=result.intact_confidence)

    # ------------------------------------------------------------------ report

    def save_report(self, html: str) -> Path:
        """Write report.html atomically (the only file a command writes into an earlier run)."""
        atomic_write_text(self.file("report"), html.encode("ascii", "xmlcharrefreplace").decode("ascii"))
        return self.file("report")


COMPARE_FILES = {
    "accuracy_figure": "accuracy.png",
    "loss_figure": "loss.png",
    "lr_figure": "lr.png",
    "results_csv": "results.csv",
    "results_md": "results.md",
    "compare": "compare.json",
}
"""What a compare folder holds besides one run folder per variant: kind -> file name."""


class CompareFolder(RunFolder):
    """The folder of ``lrlab compare``: a run folder per variant, and the figures and tables
    that put the variants side by side."""

    FILES = COMPARE_FILES

    def save(self, done: list, results_csv: str, results_md: str, summary: dict) -> None:
        """accuracy.png, loss.png (validation accuracy / loss of every finished variant on one set of
        axes), lr.png (lr and batch size of every step), results.csv/.md and compare.json.

        Args:
            done: the finished ``lrlab.compare.VariantResult``s (label, history, step_lrs,
                step_batch_sizes).
        """
        if done:
            plots.plot_compare({r.label: r.history for r in done}, "val_acc", self.file("accuracy_figure"))
            plots.plot_compare({r.label: r.history for r in done}, "val_loss", self.file("loss_figure"))
            plots.plot_lr_steps({r.label: (r.step_lrs, r.step_batch_sizes) for r in done}, self.file("lr_figure"))
        atomic_write_text(self.file("results_csv"), results_csv)
        atomic_write_text(self.file("results_md"), results_md)
        write_json(self.file("compare"), summary)


TUNE_FILES = {
    "trials_csv": "trials.csv",
    "best_recipe": "best.yaml",
    "history_figure": "history.png",
    "lr_figure": "lr.png",
    "importance_figure": "importance.png",
    "tune": "tune.json",
    "study_db": "study.db",
    "trials_dir": "trials",
}
"""What the summary folder of ``lrlab tune`` holds (``lrlab.tune.summary``): kind -> name; the
trials' run folders are under ``trials/``, the default SQLite storage is ``study.db``."""


class TuneFolder(RunFolder):
    """The summary folder of an ``lrlab tune`` study, ``<out>/<study>/``: shared by every worker
    and every run of the study's command (not a new folder per command), with the trials' run
    folders under ``trials/``."""

    FILES = TUNE_FILES

    @classmethod
    def create(cls, out: str | Path, name: str) -> TuneFolder:
        """The folder ``out/name`` and its ``trials/``, made if missing (never emptied).

        Raises:
            WriteError: it cannot be made.
        """
        folder = cls(Path(out) / name)
        try:
            folder.file("trials_dir").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(f"cannot create the tune folder {folder.path} ({e.strerror})") from None
        return folder

    def save(self, rows: list[dict], trials_csv: str, summary: dict, importances: dict[str, float] | None,
             lr_range: tuple[float, float] | None) -> None:
        """trials.csv, tune.json and the figures: history.png and lr.png (from the rows of
        ``lrlab.tune.summary.trial_rows``; stage 1's ``lr_range`` shaded), importance.png (when
        ``importances`` are given)."""
        atomic_write_text(self.file("trials_csv"), trials_csv)
        write_json(self.file("tune"), summary)
        plots.plot_tune_history(rows, self.file("history_figure"))
        plots.plot_tune_lr(rows, self.file("lr_figure"), lr_range)
        if importances:
            plots.plot_importances(importances, self.file("importance_figure"))
