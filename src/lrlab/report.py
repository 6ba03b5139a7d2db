"""One self-contained HTML page per run folder: ``report.html``.

The page reads only the files of the run folder, through :class:`lrlab.run_folder.RunFolder`
(the config, summary, history, range test, LR plan, per-class table, mistakes, faithfulness and
the PNG figures), so it needs no model and no second pass over the data. Figures are embedded as base64 ``data:``
URIs (re-encoded as 256-colour PNGs, at most :data:`MAX_WIDTH` pixels wide, to keep the page
light); there is no JavaScript and no external CSS, so the page reads the same offline, from
a file:// URL, in any browser. Every section is always present: when its files are missing
(e.g. a find-lr-only run) it says so in one sentence instead.

    lrlab report runs/cifar10-quick-20261122-052508     # rebuilds report.html in that folder
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from lrlab.errors import LrlabError
from lrlab.lr_finder import STABLE_RANGE, RangeTestResult
from lrlab.lr_plan import LRPlan
from lrlab.engine import STAGE
from lrlab.plots import stage_boundaries
from lrlab.run_folder import RunFolder, stage_kind
from lrlab.transfer import FINE_TUNE_STAGE, HEAD_STAGE, STAGE_NAMES

__all__ = ["MAX_WIDTH", "SECTIONS", "build_report", "embed_png", "write_report"]

MAX_WIDTH = 1600
"""Embedded figures wider than this many pixels are scaled down (aspect ratio kept)."""

SECTIONS = (
    ("summary", "Summary"),
    ("config", "Config"),
    ("range-test", "LR range test"),
    ("curves", "Loss and accuracy"),
    ("lr-schedule", "Learning-rate schedule"),
    ("confusion", "Confusion and per-class accuracy"),
    ("mistakes", "Mistakes and class activation maps"),
    ("faithfulness", "CAM faithfulness"),
    ("files", "Files"),
)
"""(id, heading) of every section of the page, in order."""

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2430;
background:#f6f7f9;margin:0}
main{max-width:1180px;margin:0 auto;padding:8px 20px 40px}
header{background:#1f3a5f;color:#fff;padding:18px 20px}
header h1{margin:0 0 4px;font-size:24px}header p{margin:0;opacity:.85}
nav{max-width:1180px;margin:0 auto;padding:8px 20px;font-size:14px}
nav a{margin-right:14px;color:#1f3a5f}
section{background:#fff;border:1px solid #dde2ea;border-radius:8px;margin:18px 0;padding:6px 20px 16px}
h2{font-size:19px;border-bottom:1px solid #e6e9ef;padding-bottom:6px}
h3{font-size:15px;margin:18px 0 6px}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.row{display:flex;flex-wrap:wrap;gap:12px}.row figure{flex:1 1 480px;margin:0}
figure{margin:8px 0}figcaption{font-size:13px;color:#5a6472}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
th,td{border:1px solid #dde2ea;padding:3px 9px;text-align:left}th{background:#f0f2f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f4f5f8;border:1px solid #e1e4ea;padding:10px;overflow:auto;max-height:420px;font-size:13px}
.missing{color:#7a5a00;background:#fff8e1;border:1px solid #f3e2a9;padding:8px 12px;border-radius:6px}
.big{font-size:30px;font-weight:600;color:#1f3a5f}
.note{font-size:13px;color:#5a6472}
"""


# --------------------------------------------------------------------------- reading the run folder


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def embed_png(path: str | os.PathLike, max_width: int = MAX_WIDTH) -> str | None:
    """A ``data:image/png;base64,...`` URI of the image at ``path``, or None if it is unreadable.

    The image is flattened onto white, scaled down to at most ``max_width`` pixels wide
    (Lanczos) and re-encoded as a 256-colour PNG (fast octree palette, no dithering): about 3x
    smaller than matplotlib's RGBA output, at little visible cost for plots and heatmaps.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                rgba = im.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                rgb.paste(rgba, mask=rgba.getchannel("A"))
            else:
                rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError):
        return None
    if rgb.width > max_width:
        rgb = rgb.resize((max_width, round(rgb.height * max_width / rgb.width)), Image.Resampling.LANCZOS)
    small = rgb.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- HTML helpers


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: Any, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _num(value: Any, fmt: str = ".3g") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """An HTML table; cells are escaped here; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if j in numeric else f"<td>{_e(c)}</td>"
                                    for j, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(run: RunFolder, kind: str, caption: str) -> str | None:
    """A <figure> embedding the run's figure ``kind``, or None when it is missing or unreadable."""
    path = run.file(kind)
    uri = embed_png(path) if path.is_file() else None
    if uri is None:
        return None
    return (f'<figure><img src="{uri}" alt="{_e(caption)}" title="{_e(path.name)}">'
            f"<figcaption>{_e(caption)} ({_e(path.name)})</figcaption></figure>")


def _figures(run: RunFolder, items: list[tuple[str, str]], row: bool = False) -> str:
    figs = [f for f in (_figure(run, n, c) for n, c in items) if f]
    if not figs:
        return ""
    return f'<div class="row">{"".join(figs)}</div>' if row else "".join(figs)


# --------------------------------------------------------------------------- sections


def _best(summary: dict, history: list | None) -> tuple[float | None, int | None, int | None]:
    """(top validation accuracy, its epoch, number of epochs) from the summary, else the history."""
    if "best_val_acc" in summary:
        return summary.get("best_val_acc"), summary.get("best_epoch"), summary.get("epochs")
    if history:
        best = max(history, key=lambda r: (r.get("val_acc") or -1, -r.get("epoch", 0)))
        return best.get("val_acc"), best.get("epoch"), len(history)
    return None, None, None


def _reported(ctx: dict) -> str:
    """The name of the split the predictions, mistakes and maps were made on: "test", or
    "validation" for data without a test split (summary key ``report_split``)."""
    return "validation" if ctx["summary"].get("report_split") == "val" else "test"


def _selection_note(summary: dict) -> str:
    """The header's sentence on which split made the decisions (``data.val_split``)."""
    if summary.get("val_split") == "test":
        return ("Best epoch, schedule and every other decision selected on the test set (data.val_split: test), "
                "so its test accuracy is optimistic.")
    if summary.get("val_split") == "val":
        return ("Best epoch, schedule and every other decision selected on the validation split; the test split "
                "is only reported.")
    return ""


def _summary_section(run: RunFolder, ctx: dict) -> str:
    summary, history = ctx["summary"], ctx["history"]
    if not summary and not history:
        return _missing(f"{run.file('summary').name} and {run.file('history').name} are missing: "
                        f"this run did not finish.")
    acc, epoch, epochs = _best(summary, history)
    parts = []
    if summary.get("test_acc_at_best") is not None:
        parts.append(f'<p><span class="big">{_pct(summary["test_acc_at_best"])}</span> top-1 test accuracy of the '
                     f"best checkpoint: epoch {_e(epoch)} of {_e(epochs)}, best validation accuracy {_pct(acc)}.</p>")
    elif acc is not None:
        parts.append(f'<p><span class="big">{_pct(acc)}</span> top-1 validation accuracy, reached at epoch '
                     f"{_e(epoch)} of {_e(epochs)}.</p>")
    else:
        parts.append("<p>No training in this run (no accuracy).</p>")
    early = summary.get("early_stop")
    if early:
        parts.append(f'<p>Early stopping: {_e(early.get("reason"))}; training ended after epoch '
                     f'{_e(early.get("epoch"))} (best epoch {_e(early.get("best_epoch"))}).</p>')
    stopped = summary.get("stopped")
    if stopped:
        last = stopped.get("last_finite_loss")
        parts.append(f'<p class="missing">Training stopped early: {_e(stopped.get("reason"))} '
                     f'({_e(stopped.get("loss"))}) at optimizer step {_e(stopped.get("step"))} (0-based, as in '
                     f'{_e(run.FILES["lr_steps"])}) of epoch {_e(stopped.get("epoch"))}, lr {_num(stopped.get("lr"))}; '
                     f'last finite loss {_num(last) if last is not None else "none"}. The checkpoints and '
                     f'curves are those of the epochs completed before it.</p>')
    rows = []
    labels = [("final_test_acc", "test accuracy of the final model", _pct),
              ("final_val_acc", "validation accuracy of the final epoch", _pct),
              ("val_split", "validation split (data.val_split)", str),
              ("lr", "learning rate (peak / initial, per step)", _num),
              ("lr_suggestion", "range-test suggestion", _num), ("train_images", "training images", str),
              ("val_images", "validation images", str), ("test_images", "test images", str),
              ("device", "device", str), ("autocast", "autocast dtype", str),
              ("train_seconds", "training time (s)", lambda v: _num(v, ".0f")),
              ("wall_seconds", "wall time, whole command (s)", lambda v: _num(v, ".0f")),
              ("skipped_steps", "skipped steps (non-finite loss)", str),
              ("source_run", "explained run", str)]
    for key, label, fmt in labels:
        if summary.get(key) is not None:
            rows.append([label, fmt(summary[key])])
    if rows:
        parts.append(_table(["", "value"], rows))
    if summary.get("stages"):
        parts.append("<h3>Stages</h3>" + _table(
            ["stage", "trains (layer groups)", "epochs", "lr (per step, top group)", "from"],
            [[f"{st.get('stage')}: {st.get('name')}", ", ".join(st.get("trainable_groups") or []), st.get("epochs"),
              _num(st.get("lr")), (st.get("lr_plan") or [{}])[0].get("source")] for st in summary["stages"]], {2, 3}))
    return "".join(parts)


def _config_section(run: RunFolder, ctx: dict) -> str:
    text = _read_text(run.file("config"))
    name = run.file("config").name
    if text is None:
        return _missing(f"{name} is missing.")
    return f'<p class="note">The fully resolved config of this run ({_e(name)}).</p><pre>{_e(text)}</pre>'


def _range_test_section(run: RunFolder, ctx: dict) -> str:
    """The range test and LR plan; in a transfer run one of each per stage (lrlab.transfer)."""
    if not any(run.file(stage_kind(k, HEAD_STAGE)).is_file() for k in ("range_test", "lr_plan")):
        return _range_test_block(run, None)
    return "".join(f"<h3>Stage {n}: {_e(STAGE_NAMES[n])}</h3>" + _range_test_block(run, n)
                   for n in (HEAD_STAGE, FINE_TUNE_STAGE))


def _range_test_block(run: RunFolder, stage: int | None) -> str:
    fig_kind, kind = stage_kind("range_test_figure", stage), stage_kind("range_test", stage)
    fig = _figure(run, fig_kind, "loss against learning rate during the range test")
    try:
        result = RangeTestResult.load_json(run.file(kind))
    except (OSError, LrlabError):
        result = None
    if result is None and fig is None:
        parts = [_missing(f"No LR range test in this run ({run.file(kind).name} not found).")]
        return "".join(parts + [_plan_table(run, stage)])
    parts = [fig or _missing(f"{run.file(fig_kind).name} is missing.")]
    if result is not None:
        parts += _suggestion_parts(result)
    if result is not None and result.muon is not None:
        parts += ['<p class="note">Muon\'s own sweep (right panel): Muon\'s lr alone, the rest held at the first '
                  'sweep\'s lr (x lr_factor); its suggestion is Muon\'s lr.</p>', *_suggestion_parts(result.muon)]
    parts.append(_plan_table(run, stage))
    return "".join(parts)


def _suggestion_parts(result: RangeTestResult) -> list[str]:
    """The suggestion table (with the repeats' spread and verdict when there are repeats) and
    a note on the sweep: range, points, stop, spike cut, repeats."""
    k = len(result.repeats)
    rows = [[r["method"] + (" (used)" if r["used"] else ""), _num(r["lr"]),
             f"{_num(r['low'])} to {_num(r['high'])}" if r["lr"] is not None else r["note"]]
            + ([f"{r['spread']:.2f}x" if r["spread"] is not None else "-", r["verdict"] or "-"] if k else [])
            for r in result.rows()]
    head = ["suggestion method", "learning rate", "range of good lrs"]
    loss = "validation" if result.loss == "val" else "training"
    note = (f'Range tested: {_e(_num(result.start_lr))} to {_e(_num(result.end_lr))}, {len(result.lrs)} points '
            f'of the {loss} loss, stopped: {_e(result.stop_reason)} at lr {_e(_num(result.stop_lr))}. ')
    if result.cut_lr is not None:
        note += (f'The loss rose for a sustained stretch from lr {_e(_num(result.cut_lr))}; the suggestions read '
                 f'only the lrs below it (dotted line). ')
    if k:
        note += (f'The sweep was repeated {k} times over different data orders (thin curves); the lrs come from '
                 f'their mean curve, and the spread is max/min of the {k} single-sweep suggestions (tick marks), '
                 f'"stable" when it is at most {STABLE_RANGE}x. ')
    note += 'The band of the method used is shaded in the figure; the methods are described in lrlab.lr_finder.suggest.'
    return [_table(head + (["spread over repeats", "verdict"] if k else []), rows), f'<p class="note">{note}</p>']


def _plan_table(run: RunFolder, stage: int | None) -> str:
    plan = run.read_json(stage_kind("lr_plan", stage))
    if not isinstance(plan, dict):
        return ""
    plan = LRPlan.from_dict(plan)
    what = "the run" if stage is None else f"stage {stage}"
    return f"<h3>Learning rates of {what} (LR plan)</h3>" + _table(
        ["layer group", "lr (per step)", "meaning", "from"],
        [[r["group"], _num(r["lr"]), r["kind"], r["source"]] for r in plan.rows()], {1}) + "".join(
        f'<p class="note">{_e(n)}.</p>' for n in plan.notes)


def _curves_section(run: RunFolder, ctx: dict) -> str:
    figs = _figures(run, [("loss_figure", "train and validation loss per epoch"),
                          ("accuracy_figure", "train and validation top-1 accuracy per epoch")], row=True)
    history = ctx["history"]
    if not figs and not history:
        return _missing(f"No training in this run ({run.file('history').name} and the curves are missing).")
    parts = [figs]
    if history:
        staged = any(r.get(STAGE) is not None for r in history)
        parts.append(_stages_note(history) if staged else "")
        rows = [[r.get("epoch"), _num(r.get("train_loss"), ".4f"), _pct(r.get("train_acc")),
                 _num(r.get("val_loss"), ".4f"), _pct(r.get("val_acc")), _num(r.get("lr")),
                 _num(r.get("seconds"), ".1f")] + [r.get(STAGE)] * staged for r in history]
        parts.append("<h3>Per epoch</h3>" + _table(
            ["epoch", "train loss", "train acc", "val loss", "val acc", "lr", "seconds"] + ["stage"] * staged,
            rows, set(range(8))))
    return "".join(parts)


def _stages_note(history: list[dict]) -> str:
    """Which epochs each transfer stage trained, and where the figures mark the boundary."""
    spans = {}
    for r in history:
        spans.setdefault(r.get(STAGE), []).append(r.get("epoch"))
    text = "; ".join(f"stage {n} ({STAGE_NAMES.get(n, n)}): epochs {e[0]} to {e[-1]}" for n, e in spans.items())
    bounds = ", ".join(f"between epochs {b - 0.5:g} and {b + 0.5:g}" for b in stage_boundaries(history))
    return (f'<p class="stages">Trained in stages: {_e(text)}. The dashed line in the figures marks the stage '
            f'boundary ({_e(bounds)}); each stage has its own range test and schedule, and '
            f'the best checkpoint is the best validation epoch of the whole run.</p>')


def _lr_section(run: RunFolder, ctx: dict) -> str:
    figs = _figures(run, [("lr_figure", "learning rate at the end of each epoch"),
                          ("lr_steps_figure", "learning rate (and batch size) at every optimizer step"),
                          ("plateaus_figure", "validation-loss plateaus")])
    return figs or _missing(f"No training in this run ({run.file('lr_figure').name} not found).")


def _confusion_section(run: RunFolder, ctx: dict) -> str:
    data = run.read_json("per_class")
    fig = _figure(run, "confusion_figure", "confusion matrix: counts and percent of each true class")
    if data is None and fig is None:
        return _missing(f"No confusion matrix in this run ({run.file('per_class').name} not found; "
                        f"it is written by explain).")
    parts = [fig or ""]
    if isinstance(data, dict):
        parts.append(f"<p>Top-1 accuracy {_pct(data.get('accuracy'))} on {_e(data.get('num_images'))} "
                     f"{_reported(ctx)} images "
                     f"(the predictions of the best checkpoint, saved in {_e(run.file('predictions').name)}).</p>")
        per_class = sorted(data.get("per_class", []), key=lambda c: (c.get("accuracy") is None, c.get("accuracy")))
        rows = [[c.get("class"), _pct(c.get("accuracy"), 1), c.get("correct"), c.get("images"), c.get("predicted")]
                for c in per_class]
        pairs = [[p.get("true"), p.get("pred"), p.get("count"), _pct(p.get("fraction"), 1)]
                 for p in data.get("most_confused", [])]
        parts.append('<div class="row"><div><h3>Per-class accuracy (worst first)</h3>'
                     + _table(["class", "accuracy", "correct", "images", "times predicted"], rows, {1, 2, 3, 4})
                     + "</div><div><h3>Most-confused pairs</h3>"
                     + (_table(["true class", "predicted as", "images", "% of true class"], pairs, {2, 3})
                        if pairs else "<p>No mistakes.</p>") + "</div></div>")
    return "".join(parts)


def _mistakes_section(run: RunFolder, ctx: dict) -> str:
    data = run.read_json("mistakes")
    if not isinstance(data, dict):
        return _missing(f"No mistakes studied in this run ({run.file('mistakes').name} not found; "
                        f"it is written by explain).")
    mistakes = data.get("mistakes", [])
    layer = data.get("target_layer")
    layer = ", ".join(layer) if isinstance(layer, list) else layer
    method = data.get("method", "gradcam")
    select = {"loss": "highest loss first", "confidence": "most confident wrong first",
              "first": f"in {_reported(ctx)}-set order"}.get(data.get("select", "loss"), data.get("select"))
    parts = [f"<p>{len(mistakes)} misclassified {_reported(ctx)} images, {_e(select)}; class activation maps by "
             f"<b>{_e(method)}</b> on layer <b>{_e(layer)}</b>. Left: the image; middle: where the map of the "
             f"predicted class is high (why it said so); right: the map of the true class.</p>"]
    if not mistakes:
        parts.append(f"<p>The model made no mistakes on the {_reported(ctx)} set.</p>")
        return "".join(parts)
    fig = (_figure(run, "cam_pairs_figure", "image | map of the predicted class | map of the true class")
           or _figure(run, "cam_figure", "class activation map of the predicted class")
           or _figure(run, "mistakes_figure", f"misclassified {_reported(ctx)} images"))
    parts.append(fig or _missing("The mistake figures are missing."))
    rows = [[k + 1, m.get("index"), m.get("pred"), _num(m.get("prob"), ".2f"), m.get("true"),
             _num(m.get("prob_true"), ".2f") if "prob_true" in m else "-"] for k, m in enumerate(mistakes)]
    parts.append("<h3>The images</h3>" + _table(
        ["#", f"{_reported(ctx)} index", "predicted", "p(predicted)", "true", "p(true)"], rows, {0, 1, 3, 5}))
    return "".join(parts)


def _faithfulness_section(run: RunFolder, ctx: dict) -> str:
    data = run.read_json("faithfulness")
    if not isinstance(data, dict):
        return _missing("Not measured in this run (set explain.faithfulness_images=200 to compare the CAM methods, "
                        "or run benchmarks/cam_faithfulness.py on this folder).")
    from lrlab.interpret import FaithfulnessResult, table_rows

    try:
        result = FaithfulnessResult.from_dict(data)
        rows = table_rows(result)
    except (TypeError, KeyError, ValueError, LrlabError):
        return _missing(f"{run.file('faithfulness').name} could not be read.")
    parts = [f"<p>On {result.num_images} {_reported(ctx)} images: the probability of the predicted class when only the "
             f"top-k% pixels of its map are kept (the rest set to the dataset mean), against a random smooth map "
             f"of the same area; and when those pixels are removed instead. Intact images: "
             f"{_pct(result.intact_confidence, 1)} mean confidence. A small drop and a low deletion AUC "
             f"mean the map points at what the model uses.</p>",
             _figure(run, "faithfulness_figure", "keep and delete curves per CAM method") or "",
             _table(rows[0], rows[1:], set(range(1, len(rows[0]))))]
    return "".join(parts)


def _files_section(run: RunFolder, ctx: dict) -> str:
    names = [n for n in run.files() if n != run.FILES["report"]]
    if not names:
        return _missing("The run folder is empty.")
    items = "".join(f'<li><a href="{_e(n)}">{_e(n)}</a></li>' for n in names)
    return f'<p class="note">Everything in the run folder, next to this page:</p><ul>{items}</ul>'


_BUILDERS = {
    "summary": _summary_section,
    "config": _config_section,
    "range-test": _range_test_section,
    "curves": _curves_section,
    "lr-schedule": _lr_section,
    "confusion": _confusion_section,
    "mistakes": _mistakes_section,
    "faithfulness": _faithfulness_section,
    "files": _files_section,
}


# --------------------------------------------------------------------------- the page


def build_report(run: RunFolder) -> str:
    """The HTML text of the report of ``run`` (nothing is written).

    Every section of :data:`SECTIONS` is present, as ``<section id="...">`` with an ``<h2>``;
    one whose files are missing holds a ``<p class="missing">`` sentence instead.
    """
    summary, history = run.read_json("summary"), run.read_json("history")
    ctx = {"summary": summary if isinstance(summary, dict) else {},
           "history": history if isinstance(history, list) else None}
    body = []
    for sid, heading in SECTIONS:
        try:
            content = _BUILDERS[sid](run, ctx)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # a malformed file
            content = _missing(f"This section could not be built ({type(exc).__name__}: {exc}).")
        body.append(f'<section id="{sid}"><h2>{_e(heading)}</h2>{content}</section>')
    nav = "".join(f'<a href="#{sid}">{_e(h)}</a>' for sid, h in SECTIONS)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    name = run.path.name
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>lrlab report: {_e(name)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{_e(name)}</h1><p>lrlab run report, built {_e(stamp)} from the files of "
            f"{_e(run.path.resolve())}. {_e(_selection_note(ctx['summary']))}</p></header>"
            f"<nav>{nav}</nav><main>{''.join(body)}</main></body></html>\n")


def write_report(run: RunFolder) -> Path:
    """Build the report of ``run`` and write it as the run's report.html atomically (temporary
    file, then rename; ASCII with character references, so the page reads right whatever the
    file system's encoding); return its Path. Rebuilding replaces only that file."""
    return run.save_report(build_report(run))
