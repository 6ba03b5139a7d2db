"""``lrlab compare``: train variants of one recipe and put them on the same axes.

    lrlab compare RECIPE --vary train.optimizer=sgd,adam --vary train.lr=0.01,0.1

Each ``--vary KEY=V1,V2,...`` is an axis (values are YAML, split at top-level commas, so
``train.multistep.milestones=[3,6],[5,8]`` has two values); several axes make a grid. Each
``--variant "[LABEL:] KEY=V KEY=V ..."`` adds one variant with several keys set together
(e.g. plain SGD: ``"sgd: train.optimizer=sgd train.momentum=0"``); the runs are the
explicit variants first, then the grid. Every variant is the recipe plus the common
overrides plus its own, with the same seed, so the same initial weights and (at the same
batch size) the same data order.

All keys are checked and every variant's config validated before any training: a key that
does not exist or an invalid value is a one-line error. A variant that fails while running
is recorded in the table with its error, and the others still run.

The compare folder ``<out>/<name>-compare-<stamp>/`` holds one run folder per variant and:

    accuracy.png  loss.png   validation top-1 accuracy / loss of every variant against epoch
    lr.png                   the lr of every step of every variant (and the batch size)
    results.csv results.md   variant, best validation accuracy, its epoch, the test accuracy there
                             and at the end (reported only), lr, wall time

Variants are ranked by their best validation accuracy (``data.val_split``); the test accuracies
are reported, never used to choose.
    compare.json             the recipe, overrides, variants and results
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel

from lrlab.config import Config, load_config
from lrlab.errors import LrlabError
from lrlab.io import check_writable
from lrlab.lr_plan import LRPlan
from lrlab.run_folder import CompareFolder


@dataclass
class Variant:
    """One variant: a label for tables and legends and its ``section.key=value`` overrides."""

    label: str
    overrides: list[str]


@dataclass
class VariantResult:
    """The outcome of one variant; metrics are None when it failed (see ``error``)."""

    label: str
    overrides: list[str]
    status: str  # "ok" or "failed"
    best_val_acc: float | None = None
    best_epoch: int | None = None
    test_acc_at_best: float | None = None
    final_test_acc: float | None = None
    epochs: int | None = None
    lr: float | None = None
    wall_seconds: float | None = None
    run_dir: str | None = None
    error: str | None = None
    history: list[dict] = field(default_factory=list, repr=False)
    step_lrs: list[float] = field(default_factory=list, repr=False)
    step_batch_sizes: list[int] = field(default_factory=list, repr=False)


def split_values(text: str) -> list[str]:
    """Split ``text`` at commas outside brackets, braces and quotes: ``"[3,6],[5,8]"`` ->
    ``["[3,6]", "[5,8]"]``."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def split_words(text: str) -> list[str]:
    """Split ``text`` at whitespace outside brackets, braces and quotes; quotes outside
    brackets are removed as a shell would: ``"a={x: 1} b='c d'"`` -> ``["a={x: 1}", "b=c d"]``.

    Raises:
        LrlabError: an unclosed quote or bracket.
    """
    words, depth, quote, current, started = [], 0, None, [], False
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
                if depth == 0:
                    continue
            current.append(ch)
        elif ch in "'\"":
            quote, started = ch, True
            if depth:
                current.append(ch)
        elif ch.isspace() and depth == 0:
            if started:
                words.append("".join(current))
            current, started = [], False
        else:
            depth += ch in "[{("
            depth -= ch in "]})"
            current.append(ch)
            started = True
    if quote or depth:
        raise LrlabError(f"{text!r} has an unclosed {'quote' if quote else 'bracket'}")
    if started:
        words.append("".join(current))
    return words


def check_key(key: str, flag: str = "--vary") -> None:
    """Raise unless ``key`` (``section.key``) is a key of the experiment config; anything
    below a free-form mapping (``model.kwargs.*``) is accepted.

    Raises:
        LrlabError: naming the key and listing the valid keys at the level it left the config.
    """
    parts = key.split(".")
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        fields = model.model_fields
        where = f" in {'.'.join(parts[:i])}" if i else ""
        if part not in fields:
            raise LrlabError(f"{flag} key {key!r} does not exist; valid keys{where}: {', '.join(fields)}")
        annotation = fields[part].annotation
        last = i == len(parts) - 1
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if last:
                raise LrlabError(f"{flag} key {key!r} is a section; vary one of its keys: "
                                 f"{', '.join(annotation.model_fields)}")
            model = annotation
        elif typing.get_origin(annotation) is dict or annotation is dict:
            return
        elif not last:
            raise LrlabError(f"{flag} key {key!r} does not exist; {'.'.join(parts[:i + 1])} is a value, not a section")


def _short(key: str) -> str:
    """``train.optimizer`` -> ``optimizer`` for labels (the section name dropped)."""
    return key.split(".", 1)[1] if "." in key else key


def parse_vary(text: str) -> tuple[str, list[str]]:
    """``"KEY=V1,V2"`` -> (KEY, [V1, V2]), the key checked with :func:`check_key`.

    Raises:
        LrlabError: no ``=``, no values, or a key that does not exist.
    """
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise LrlabError(f"--vary {text!r} must look like section.key=value1,value2, e.g. train.optimizer=sgd,adam")
    check_key(key)
    return key, [v for v in split_values(values) if v]


def parse_variant(text: str) -> Variant:
    """``"[LABEL:] KEY=V KEY=V"`` -> Variant (entries split by :func:`split_words`; the label
    defaults to the overrides without their section names).

    Raises:
        LrlabError: an entry without ``=`` or a key that does not exist.
    """
    label = None
    head, colon, rest = text.partition(":")
    if colon and "=" not in head:
        label, text = head.strip(), rest
    overrides = split_words(text)
    if not overrides:
        raise LrlabError(f"--variant {text!r} sets nothing; give KEY=VALUE pairs, e.g. \"train.optimizer=sgd train.momentum=0\"")
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise LrlabError(f"--variant entry {item!r} must look like section.key=value")
        check_key(key.strip(), "--variant")
    return Variant(label or " ".join(_short(o) for o in overrides), overrides)


def build_variants(varies: Sequence[str] = (), variants: Sequence[str] = ()) -> list[Variant]:
    """The explicit ``--variant`` variants, then the grid of the ``--vary`` axes.

    Raises:
        LrlabError: malformed input, a key that does not exist or is varied twice, no
            variant at all, or two variants with the same label.
    """
    result = [parse_variant(v) for v in variants]
    axes = [parse_vary(v) for v in varies]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise LrlabError(f"--vary names the same key twice ({', '.join(keys)}); give all its values in one --vary")
    if axes:
        for combo in itertools.product(*[values for _, values in axes]):
            overrides = [f"{k}={v}" for k, v in zip(keys, combo)]
            result.append(Variant(" ".join(_short(o) for o in overrides), overrides))
    if not result:
        raise LrlabError("compare needs at least one --vary KEY=V1,V2 or --variant \"KEY=V ...\"")
    labels = [v.label for v in result]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise LrlabError(f"two variants are both labelled {dupes[0]!r}; give each --variant its own \"LABEL: ...\"")
    return result


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")[:60] or "variant"


def _tables(results: list[VariantResult]) -> tuple[str, str]:
    cols = ["variant", "status", "best_val_acc", "best_epoch", "test_acc_at_best", "final_test_acc", "epochs", "lr",
            "wall_seconds", "run_dir", "error", "overrides"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for r in results:
        row = {k: v for k, v in asdict(r).items() if k in cols}
        writer.writerow({**row, "variant": r.label, "overrides": " ".join(r.overrides)})
    pct = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = ["| variant | best val top-1 (%) | at epoch | test top-1 there (%) | final test top-1 (%) | lr "
             "| wall time (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.status == "ok":
            lines.append(f"| {r.label} | {pct(r.best_val_acc)} | {r.best_epoch}/{r.epochs} | "
                         f"{pct(r.test_acc_at_best)} | {pct(r.final_test_acc)} | {r.lr:.3g} | {r.wall_seconds:.0f} |")
        else:
            lines.append(f"| {r.label} | failed: {(r.error or '').replace('|', '/')} | | | | | |")
    return buf.getvalue(), "\n".join(lines) + "\n"


def _variant_configs(recipe, overrides: Sequence[str], todo: list[Variant], range_test: bool) -> list[Config]:
    """Every variant's validated config, checked before any training (LRPlan.check included).

    Raises:
        LrlabError: naming the variant.
    """
    configs = []
    for v in todo:
        try:
            config = load_config(recipe, list(overrides) + v.overrides + [f"name={_slug(v.label)}"])
            LRPlan.check(config, range_test and config.lr_finder.enabled)
        except LrlabError as e:
            raise LrlabError(f"variant {v.label!r}: {e}") from None
        configs.append(config)
    return configs


def _run_variant(v: Variant, config: Config, folder: CompareFolder, range_test: bool, callbacks) -> VariantResult:
    """Train one variant into its own run folder inside the compare folder; a failure is recorded."""
    from lrlab.pipeline import Callbacks, run_pipeline

    try:
        outcome = run_pipeline(config, folder.path, callbacks or Callbacks(), range_test_stage=range_test,
                               train_stage=True, explain_stage=False)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a failed variant is reported, not fatal
        message = str(e) if isinstance(e, LrlabError) else f"{type(e).__name__}: {e}"
        dirs = sorted(folder.path.glob(f"{_slug(v.label)}-[0-9]*"))
        return VariantResult(v.label, v.overrides, "failed", error=message.splitlines()[0] if message else "",
                             run_dir=str(dirs[-1]) if dirs else None)
    s, history = outcome.summary, outcome.history
    steps = history.lr_steps()
    return VariantResult(v.label, v.overrides, "ok", s["best_val_acc"], s["best_epoch"], s.get("test_acc_at_best"),
                         s.get("final_test_acc"), s["epochs"], s["lr"], s["wall_seconds"], s["run_dir"],
                         history=history.records,
                         step_lrs=[lr for _, _, lr, _ in steps], step_batch_sizes=[b or 0 for *_, b in steps])


def run_compare(recipe: str | Path | None, overrides: Sequence[str], varies: Sequence[str] = (),
                variants: Sequence[str] = (), out: str | Path = "runs", *, range_test_stage: bool = True,
                callbacks=None, on_variant: Callable[[int, int, str], None] | None = None,
                on_result: Callable[[VariantResult], None] | None = None) -> dict:
    """Run every variant (see the module docstring) into one new compare folder under ``out``.

    Args:
        recipe: YAML recipe (None: defaults).
        overrides: ``section.key=value`` overrides common to every variant.
        varies: ``KEY=V1,V2,...`` axes of the grid.
        variants: ``"[LABEL:] KEY=V KEY=V"`` explicit variants.
        out: parent folder of the compare folder.
        range_test_stage: each variant runs its own range test (else it trains at its train.lr
            or train.max_lr).
        callbacks: ``lrlab.pipeline.Callbacks`` passed to each run (progress bars).
        on_variant: called as (index from 1, number of variants, label) before each run.
        on_result: called with each VariantResult when its run ends.

    Returns:
        {"compare_dir", "variants": [result dicts without the curves], "failed": count,
        "best": label of the best validation accuracy or None}; also written to compare.json.

    Raises:
        LrlabError: bad input found before any training (see :func:`build_variants`), a
            variant whose config is invalid, or a one-cycle / cyclic variant without a max_lr;
            WriteError: ``out`` is not writable.
    """
    check_writable(out, "output folder")
    todo = build_variants(varies, variants)
    configs = _variant_configs(recipe, overrides, todo, range_test_stage)
    folder = CompareFolder.create(out, f"{load_config(recipe, list(overrides)).name}-compare")
    results: list[VariantResult] = []
    for i, (v, config) in enumerate(zip(todo, configs), start=1):
        if on_variant is not None:
            on_variant(i, len(todo), v.label)
        results.append(_run_variant(v, config, folder, range_test_stage, callbacks))
        if on_result is not None:
            on_result(results[-1])
    done = [r for r in results if r.status == "ok" and r.history]
    best = max(done, key=lambda r: r.best_val_acc or 0.0).label if done else None
    rows = [{k: v for k, v in asdict(r).items() if k not in ("history", "step_lrs", "step_batch_sizes")}
            for r in results]
    summary = {"compare_dir": str(folder), "recipe": str(recipe) if recipe else None,
               "overrides": list(overrides), "range_test": range_test_stage, "variants": rows,
               "failed": sum(r.status != "ok" for r in results), "best": best}
    folder.save(done, *_tables(results), summary)
    return summary
