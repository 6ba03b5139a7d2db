"""How good is each range-test suggestion, how sure is it, and do LR-free optimizers need one at all?

    python benchmarks/lr_suggestion_quality.py --data ../shared/data/cifar10
        --out benchmarks/results/lr_suggestion_quality.json
        [--setups fastnet-sgd,...] [--seeds 3] [--parts grid,suggestions,lrfree,confidence,muon] [--smoke]
        [--merge OTHER.json ...]

benchmarks/results/lr_suggestion_quality.json holds the figures measured so far (committed: the
whole benchmark takes ~12 hours of a 2-core machine, more than one session); ``--parts ''`` only
prints its tables.

Setups (``role``: "choice" setups were seen when lrlab's defaults were chosen; "check" setups were
held back and only measured):

    fastnet-sgd     choice  FastNet x0.5, Nesterov SGD 0.9, batch 256, 10,000 CIFAR images, 5 epochs
    fastnet-adam    choice  FastNet x0.5, Adam, batch 256, 10,000 images, 5 epochs
    resnet18-sgd    choice  ResNet18 at half width (32-256 channels), SGD 0.9, batch 128, 10,000 images,
                            2 epochs (test top-1 recorded on 2,000 test images)
    fastnet-muon    choice  FastNet x0.5, Muon + Nesterov SGD for the rest, batch 256, 10,000 images, 5 epochs
                            (held back until it measured the first Muon rule, auto = steepest; the
                            rule auto = max_lr for Muon + SGD was then chosen on it)
    fastnet-adamw   check   FastNet x0.5, AdamW weight decay 0.05, batch 256, 10,000 images, 5 epochs
    resnet18-muon   choice  resnet18-sgd with Muon + SGD (held back as the check of auto = max_lr for
                            Muon + SGD, which failed it: 0.890; the rule for Muon's own lr was then
                            chosen on it and fastnet-muon)
    fastnet-muon-adamw  check  fastnet-muon with AdamW for the rest (the check of Muon's own sweep)
    finetune-lite0  choice  EfficientNet-Lite0 with ImageNet weights (recipes/transfer-lite0.yaml), every
                            layer fine-tuned with discriminative lrs (lr_ratio 10), a photo folder of
                            CIFAR-10 upscaled to 96 px, 100 per class (20% validation), 3 epochs
                            (held back until it measured auto = max_lr at 0.939; the rule auto =
                            descent when fine-tuning with SGD was then chosen on it)
    finetune-lite0-64  check  the same fine-tuning on another photo folder: 200 per class, 64 px
                            (the check of the fine-tuning rule)
    fastnet-muon-renorm  check  fastnet-muon with airbench94's weight renormalisation (train.muon.renorm): Muon's
                            curve turns (the check of Muon's max_lr branch)

Everything else comes from recipes/cifar10-quick.yaml (transfer-lite0.yaml for the finetune setups):
one-cycle with the candidate lr as its peak, label smoothing, augmentation, no TTA, and bf16
autocast for every setup (not ``compute.precision: auto``, which picks by the machine: a cache
resumed on another machine must not change precision halfway). Training is
``lrlab.pipeline.train`` (what ``lrlab train`` runs) with the plan ``LRPlan.make`` gives for
``train.max_lr`` = the candidate, so layer-group ratios and Muon's ratio apply as in a run.

For every setup and seed (0, 1, 2: seed = initial weights, data order, the validation hold-out):

    grid         a 7-point log grid over the range test's planned window (lr_finder.start_lr to
                 end_lr), every point trained
    suggestions  one range test (``lrlab.pipeline.range_test``), then a training at every method's
                 suggestion (x lr_factor), the ``auto`` default among them, and at "steepest-ema",
                 the plain steepest-slope rule on the running EMA as other LR finders apply it
    lrfree       the LR-free optimizers at their packages' defaults, the same epochs, no range test
    confidence   (seed 0 only) the range test repeated over k = 5 data orders: the spread of each
                 method's suggestion, and whether each single sweep lands in the grid's 97% band
    muon         (Muon setups) a training at the default (first sweep's rule for the rest, Muon's
                 sweep's rule for Muon), and a 7-point log grid of Muon's lr (1e-3 to 1), the rest
                 at each seed's first-sweep suggestion. The range test of a Muon setup has a second sweep, of
                 Muon's lr alone (``lr_finder.muon``); "suggestions" then also trains at each
                 method's suggestion on it (rows "Muon: METHOD"), and the default row is the
                 first sweep's rule for the rest with Muon's sweep's rule for Muon

The score is the final-epoch validation top-1 (the hold-out; the test split is evaluated and
recorded, never used). Ratio = mean top-1 at the suggestion / best mean top-1 of the grid (of
both grids for a Muon setup).

``--out`` is a cache as well as the result: every training and range test is saved as soon as it
ends, and a later call with the same file skips what it holds (same setup, seed and lr or
optimizer), so the benchmark can run in pieces across sessions; ``--parts`` chooses what to run.
A training whose whole config equals a cached one (the LR-free rows of fastnet-sgd, fastnet-adam
and fastnet-muon, and of resnet18-sgd and resnet18-muon: the setups differ only in the optimizer
those rows replace) is not run again.
Two processes with one thread each and their own ``--out`` (different setups) make ~9% more
trainings per hour on 2 cores than one; ``--merge`` then adds their caches to ``--out``.
``--smoke`` shrinks everything (1,000 images, 1 epoch, a 3-point grid, 30-step range tests, 1 seed) to
check the script; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from lrlab import pipeline
from lrlab.config import MuonConfig, load_config
from lrlab.errors import LrlabError
from lrlab.io import write_json
from lrlab.lr_finder import RangeTestResult
from lrlab.lr_finder.suggest import steepest
from lrlab.lr_plan import LRPlan

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
QUICK, LITE0 = REPO / "recipes" / "cifar10-quick.yaml", REPO / "recipes" / "transfer-lite0.yaml"
FASTNET = ("model.name=fastnet", "model.kwargs={width: 0.5}", "data.train_subset=10000")
RESNET18 = ("model.name=resnet18", "model.kwargs={width: 32}", "data.train_subset=10000", "data.test_subset=2000")


@dataclass(frozen=True)
class Bench:
    """One setup: whether it chose the defaults, its epochs, its overrides, recipe and data."""

    role: str
    epochs: int
    overrides: tuple[str, ...]
    recipe: Path = QUICK
    photos: int = 0  # > 0: a photo folder of that many CIFAR-10 training images per class


SETUPS = {
    "fastnet-sgd": Bench("choice", 5, (*FASTNET, "train.optimizer=sgd", "train.momentum=0.9", "train.nesterov=true",
                                       "train.batch_size=256")),
    "fastnet-adam": Bench("choice", 5, (*FASTNET, "train.optimizer=adam", "train.batch_size=256")),
    "resnet18-sgd": Bench("choice", 2, (*RESNET18, "train.optimizer=sgd", "train.momentum=0.9", "train.nesterov=false",
                                        "train.batch_size=128")),
    "fastnet-muon": Bench("choice", 5, (*FASTNET, "train.optimizer=muon", "train.momentum=0.9",
                                       "train.nesterov=true", "train.batch_size=256")),
    "fastnet-adamw": Bench("check", 5, (*FASTNET, "train.optimizer=adamw", "train.weight_decay=0.05",
                                        "train.batch_size=256")),
    "resnet18-muon": Bench("choice", 2, (*RESNET18, "train.optimizer=muon", "train.momentum=0.9",
                                         "train.nesterov=false", "train.batch_size=128")),
    "finetune-lite0": Bench("choice", 3, ("transfer.freeze_epochs=0", "data.image_size=96", "data.val_fraction=0.2"),
                     recipe=LITE0, photos=100),
    "fastnet-muon-adamw": Bench("check", 5, (*FASTNET, "train.optimizer=muon", "train.muon.aux_optimizer=adamw",
                                             "train.batch_size=256")),
    "finetune-lite0-64": Bench("check", 3, ("transfer.freeze_epochs=0", "data.image_size=64", "data.val_fraction=0.2"),
                               recipe=LITE0, photos=200),
    "fastnet-muon-renorm": Bench("check", 5, (*FASTNET, "train.optimizer=muon", "train.momentum=0.9",
                                              "train.nesterov=true", "train.batch_size=256", "train.muon.renorm=true")),
}
COMMON = ("train.schedule=onecycle", "train.max_lr=null", "lr_finder.enabled=true", "train.tta=false",
          "train.batch_size_milestones=[]", "compute.precision=bf16")
SMOKE = ("data.train_subset=1000", "data.test_subset=300", "lr_finder.num_iter=30", "lr_finder.skip_start=5",
         "lr_finder.skip_end=3")
LRFREE = ("schedulefree_sgd", "schedulefree_adamw", "prodigy", "dadapt_adam", "dog")
EMA_STEEPEST = "steepest-ema"
PARTS = ("grid", "suggestions", "lrfree", "confidence", "muon")
MUON_GRID = tuple(float(f"{v:.9g}") for v in np.geomspace(1e-3, 1.0, 7))  # Muon's lrs, the rest at its auto lr
REPEATS = 5
GRID_BAND = 0.97  # the grid band: lrs whose interpolated mean top-1 is >= this share of the grid's best


def photo_tree(root: Path, per_class: int, test_per_class: int) -> Path:
    """An ImageFolder tree of symbolic links into the CIFAR-10 copy (a seeded choice per class)."""
    if root.exists():
        return root
    rng = random.Random(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in sorted(p.name for p in (CIFAR / split).iterdir()):
            (root / split / c).mkdir(parents=True)
            for f in sorted(rng.sample(sorted((CIFAR / split / c).iterdir()), n)):
                (root / split / c / f.name).symlink_to(f)
    return root


def repeats(args) -> int:
    """k of the confidence part: REPEATS (2 with --smoke)."""
    return 2 if args.smoke else REPEATS


def lr_key(lr: float) -> str:
    """Learning rates equal to 9 significant digits are one training."""
    return f"lr={float(lr):.9g}"


def cache_key(name: str, seed: int, label: str) -> str:
    """The cache's key of one training or range test: "setup|seed=S|label"."""
    return f"{name}|seed={seed}|{label}"


def split_key(key: str) -> tuple[str, int, str]:
    """Inverse of :func:`cache_key`."""
    name, seed, label = key.split("|", 2)
    return name, int(seed.removeprefix("seed=")), label


def stored(result: dict) -> dict:
    """A range test's ``to_dict()`` without what :meth:`RangeTestResult.from_dict` derives again
    (the zero-lag curve, the spread, the chosen lr), in its repeats and Muon's sweep too: the
    cache keeps the measurements only."""
    keep = {f.name for f in fields(RangeTestResult)}
    out = {k: v for k, v in result.items() if k in keep}
    out["repeats"] = [stored(r) for r in out.get("repeats") or []]
    if out.get("muon"):
        out["muon"] = stored(out["muon"])
    return out


def muon_key(lr: float, muon_lr: float) -> str:
    """The label of a Muon training: one-cycle peak ``lr`` for the auxiliary optimizer, ``muon_lr`` for Muon."""
    return f"{lr_key(lr)},muon={float(muon_lr):.9g}"


def label_overrides(label: str) -> tuple[str, ...]:
    """The config overrides of a training's cache label: "lr=X" (one-cycle peak X), "lr=X,muon=Y"
    (and Muon's peak Y: ``train.muon.lr_ratio`` Y / X) or "optimizer=NAME" (an LR-free optimizer
    at its default)."""
    pairs = dict(part.split("=", 1) for part in label.split(","))
    if "optimizer" in pairs:
        return (f"train.optimizer={pairs['optimizer']}",)
    ratio = (f"train.muon.lr_ratio={float(pairs['muon']) / float(pairs['lr']):.9g}",) if "muon" in pairs else ()
    return (f"train.max_lr={pairs['lr']}", *ratio)


class Bencher:
    """Runs the parts of one setup and keeps every number in the cache file."""

    def __init__(self, args, cache: dict, save, log):
        self.args, self.cache, self.save, self.log = args, cache, save, log

    def training_config(self, name: str, seed: int, label: str):
        """The whole config of one training, and its digest: two setups whose trainings resolve
        to one config (LR-free rows of setups that differ only in their optimizer) train once.
        ``train.muon`` is read by Muon only, so another optimizer's training digests its defaults."""
        config = self.config(name, seed, (*label_overrides(label), "lr_finder.enabled=false"))
        if config.train.optimizer != "muon":
            config = config.model_copy(update={"train": config.train.model_copy(update={"muon": MuonConfig()})})
        return config, hashlib.sha1(config.model_dump_json().encode()).hexdigest()

    def same_training(self, label: str, digest: str) -> tuple[str, dict] | None:
        """A cached training with the same ``label`` (another setup's) whose config, as this code
        resolves its key now (config sections gain fields over time, so no digest is stored), has
        the digest ``digest``."""
        for k, rec in self.cache["trainings"].items():
            name, seed, other = split_key(k)
            if other == label and "same_as" not in rec and self.training_config(name, seed, label)[1] == digest:
                return k, rec
        return None

    def config(self, name: str, seed: int, extra: tuple[str, ...] = ()):
        b = SETUPS[name]
        data = photo_tree(self.args.work / f"photos-{b.photos}", b.photos, 100) if b.photos else self.args.data
        smoke = (*SMOKE, "train.epochs=1") if self.args.smoke else ()
        return load_config(b.recipe, [f"data.path={data}", *COMMON, *b.overrides, f"train.epochs={b.epochs}",
                                      f"seed={seed}", *smoke, *self.args.overrides, *extra])

    def setup(self, name: str, seed: int) -> pipeline.Setup:
        config = self.config(name, seed)
        return pipeline.prepare(config.model_copy(update={"name": f"lrq-{name}"}), range_test=True, train=True,
                                explain=False)

    def grid(self, name: str, seed: int) -> list[float]:
        cfg = self.config(name, seed).lr_finder
        n = 3 if self.args.smoke else self.args.grid
        return [float(v) for v in np.geomspace(cfg.start_lr, cfg.end_lr, n)]

    def range_test(self, setup: pipeline.Setup, name: str, seed: int, repeats: int = 1) -> RangeTestResult:
        """The range test of ``setup`` (cached): ``repeats`` sweeps over as many data orders."""
        k = cache_key(name, seed, f"repeats={repeats}")
        if k not in self.cache["range_tests"]:
            t0 = time.perf_counter()
            config = setup.config
            if repeats > 1:
                lr_finder = config.lr_finder.model_copy(update={"repeats": repeats})
                config = config.model_copy(update={"lr_finder": lr_finder})
            result = pipeline.range_test(replace(setup, config=config)).to_dict()
            seconds = round(time.perf_counter() - t0, 1)
            self.cache["range_tests"][k] = {**stored(result), "seconds": seconds}
            self.save()
            self.log(f"{name} seed {seed}: range test x{repeats} in {seconds:.0f}s")
        return RangeTestResult.from_dict(self.cache["range_tests"][k])

    def train(self, setup: pipeline.Setup, name: str, seed: int, label: str) -> dict:
        """Train ``setup``'s model afresh with the overrides of ``label`` (cached under it)."""
        k = cache_key(name, seed, label)
        if k in self.cache["trainings"]:
            return self.cache["trainings"][k]
        config, digest = self.training_config(name, seed, label)
        same = self.same_training(label, digest)
        if same is not None:
            self.cache["trainings"][k] = {**same[1], "same_as": same[0]}
            self.save()
            self.log(f"{name} seed {seed} {label}: the same training as {same[0]}")
            return self.cache["trainings"][k]
        t0 = time.perf_counter()
        run = replace(setup, config=config, model=pipeline.new_model(config, setup.data, setup.compute))
        try:
            history = pipeline.train(run, LRPlan.make(config))
            final = history.records[-1]["val_acc"]
            rec = {"final_val_acc": final if math.isfinite(final) else None, "best_val_acc": history.best()["val_acc"],
                   "final_test_acc": pipeline.test_accuracy(run) if history.stopped is None else None, "error": None}
        except LrlabError as e:
            rec = {"final_val_acc": None, "best_val_acc": None, "final_test_acc": None, "error": str(e)}
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        self.cache["trainings"][k] = rec
        self.save()
        shown = f"val top-1 {rec['final_val_acc']:.2%}" if rec["final_val_acc"] is not None else f"failed: {rec['error']}"
        self.log(f"{name} seed {seed} {label}: {shown} ({rec['seconds']:.0f}s)")
        return rec

    def muon_suggestions(self, result: RangeTestResult, factor: float) -> dict[str, str]:
        """Muon setups: the training label of every method of Muon's own sweep (Muon's lr x
        ``factor``), the rest at the first sweep's suggestion x ``factor``; empty otherwise."""
        if result.muon is None or result.suggestion is None:
            return {}
        return {m: muon_key(result.suggestion * factor, s.lr * factor) for m, s in result.muon.suggestions.items()}

    def suggestions(self, result: RangeTestResult, factor: float) -> dict[str, float]:
        """Every method's lr (x ``factor``), plus the plain steepest rule on the running EMA."""
        out = {m: s.lr * factor for m, s in result.suggestions.items()}
        try:
            out[EMA_STEEPEST] = steepest(result.lrs, result.smoothed, result.skip_start, result.skip_end).lr * factor
        except LrlabError:
            pass
        return out

    def run(self, name: str, parts: list[str]) -> None:
        """The asked parts of setup ``name`` for every seed.

        Raises:
            SystemExit: the cache holds this setup measured with other settings."""
        b = SETUPS[name]
        fingerprint = {"recipe": b.recipe.name, "epochs": b.epochs, "overrides": [*b.overrides, *self.args.overrides],
                       "smoke": self.args.smoke}
        held = self.cache.setdefault("setups", {}).setdefault(name, fingerprint)
        if held != fingerprint:
            raise SystemExit(f"error: {self.args.out} holds {name} measured with {held}, not {fingerprint}; "
                             f"use another --out")
        if not parts:
            return
        for seed in range(1 if self.args.smoke else self.args.seeds):
            setup = self.setup(name, seed)
            if "grid" in parts:
                for lr in self.grid(name, seed):
                    self.train(setup, name, seed, lr_key(lr))
            if "suggestions" in parts:
                result = self.range_test(setup, name, seed)
                factor = setup.config.lr_finder.lr_factor
                for lr in sorted(set(self.suggestions(result, factor).values())):
                    self.train(setup, name, seed, lr_key(lr))
                for label in sorted(set(self.muon_suggestions(result, factor).values())):
                    self.train(setup, name, seed, label)
            if "muon" in parts and setup.config.train.optimizer == "muon":
                result, factor = self.range_test(setup, name, seed), setup.config.lr_finder.lr_factor
                default = self.muon_suggestions(result, factor).get(result.muon.method)
                for label in ([default] if default is not None else []) + [
                        muon_key(result.suggestion * factor, muon_lr) for muon_lr in MUON_GRID]:
                    self.train(setup, name, seed, label)
            if "lrfree" in parts:
                for opt in LRFREE:
                    self.train(setup, name, seed, f"optimizer={opt}")
            if "confidence" in parts and seed == 0:
                self.range_test(setup, name, seed, repeats(self.args))


# ---------------------------------------------------------------------------- tables


def mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals or len(vals) < len(values):
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


def cell(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{100 * mean:.2f} ± {100 * std:.2f}%"


def grid_band(lrs: list[float], means: list[float]) -> tuple[float, float]:
    """The lrs (log-linear interpolation of the grid's mean top-1) within GRID_BAND of the best."""
    x = np.log10(lrs)
    fine = np.linspace(x[0], x[-1], 2001)
    acc = np.interp(fine, x, means)
    inside = fine[acc >= GRID_BAND * max(means)]
    return float(10 ** inside.min()), float(10 ** inside.max())


def top1(cache: dict, name: str, seed: int, label: str) -> float | None:
    """The final-epoch validation top-1 of one cached training (None: not trained yet)."""
    rec = cache["trainings"].get(cache_key(name, seed, label))
    return None if rec is None else rec["final_val_acc"]


def grid_means(name: str, cache: dict, seeds: int, b: Bencher) -> list[float | None]:
    """The mean top-1 over the seeds at each grid lr (None where a seed is missing)."""
    return [mean_std([top1(cache, name, s, lr_key(lr)) for s in range(seeds)])[0] for lr in b.grid(name, 0)]


def range_test_of(cache: dict, name: str, seed: int) -> RangeTestResult | None:
    rt = cache["range_tests"].get(cache_key(name, seed, "repeats=1"))
    return None if rt is None else RangeTestResult.from_dict(rt)


def muon_grid_means(name: str, cache: dict, seeds: int, b: Bencher) -> list[float | None] | None:
    """Muon setups: the mean top-1 at each of Muon's lrs (:data:`MUON_GRID`), the rest at each
    seed's first-sweep suggestion; None for the other setups."""
    if b.config(name, 0).train.optimizer != "muon":
        return None
    rest = []  # per seed, the lr the rest trained at (None: no range test yet)
    for s in range(seeds):
        result = range_test_of(cache, name, s)
        ok = result is not None and result.suggestion is not None
        rest.append(result.suggestion * b.config(name, s).lr_finder.lr_factor if ok else None)
    return [mean_std([None if lr is None else top1(cache, name, s, muon_key(lr, muon_lr))
                      for s, lr in enumerate(rest)])[0] for muon_lr in MUON_GRID]


def best_of(*grids: list[float | None] | None) -> float | None:
    return max((m for g in grids if g for m in g if m is not None), default=None)


@dataclass(frozen=True)
class Row:
    """One row of a setup's table: the lr per seed (None: LR-free), mean and std of top-1, ratio."""

    lrs: list | None
    mean: float | None
    std: float | None
    ratio: float | None


def setup_rows(name: str, cache: dict, seeds: int, b: Bencher, best: float | None) -> dict[str, Row]:
    """Per method (and the default, steepest-ema, the LR-free optimizers; with Muon, each method of
    Muon's own sweep as "Muon: METHOD", the lr shown being Muon's) the suggested lrs, mean and std
    of top-1 over the seeds and the ratio to ``best``, the best mean of the grids."""
    picks: dict[str, tuple[list, list]] = {}

    def pick(row: str, lr: float | None, label: str | None) -> None:
        lrs, accs = picks.setdefault(row, ([], []))
        lrs.append(lr)
        accs.append(None if label is None else top1(cache, name, seed, label))

    for seed in range(seeds):
        result = range_test_of(cache, name, seed)
        if result is None:
            continue
        factor = b.config(name, seed).lr_finder.lr_factor
        sugg = b.suggestions(result, factor)
        muon = b.muon_suggestions(result, factor)
        for m, lr in sugg.items():
            pick(m, lr, lr_key(lr))
        for m, label in muon.items():
            pick(f"Muon: {m}", result.muon.suggestions[m].lr * factor, label)
        if muon:  # the default: the first sweep's rule for the rest, Muon's sweep's rule for Muon
            pick(f"auto ({result.method} + Muon {result.muon.method})", result.muon.suggestion * factor,
                 muon.get(result.muon.method))
        else:
            lr = sugg.get(result.method)
            pick(f"auto ({result.method})", lr, None if lr is None else lr_key(lr))
    picks.update({f"{opt} (LR-free)": (None, [top1(cache, name, s, f"optimizer={opt}") for s in range(seeds)])
                  for opt in LRFREE})
    rows = {}
    for m, (lrs, accs) in picks.items():
        mean, std = mean_std(accs)
        rows[m] = Row(lrs, mean, std, None if mean is None or not best else mean / best)
    return rows


def ratio_text(row: Row) -> str:
    return "-" if row.ratio is None else f"{row.ratio:.3f}"


def setup_table(name: str, rows: dict[str, Row], means: list[float | None], muon_means: list[float | None] | None,
                seeds: int, b: Bencher) -> list[str]:
    """Markdown lines: the setup's ``rows`` (:func:`setup_rows`) and the grids' mean top-1 per lr."""
    lines = [f"\n### {name} ({SETUPS[name].role}, {b.config(name, 0).train.epochs} epochs, {seeds} seeds)\n",
             "| row | lr (per seed) | top-1 mean ± std | ratio to grid best |", "|---|---|---|---|"]
    for m, row in rows.items():
        lrs = "package default" if row.lrs is None else ", ".join("-" if v is None else f"{v:.3g}" for v in row.lrs)
        lines.append(f"| {m} | {lrs} | {cell(row.mean, row.std)} | {ratio_text(row)} |")

    overall = best_of(means, muon_means)

    def grid_row(title: str, lrs, grid_means) -> str:
        top = best_of(grid_means)
        return (f"| {title} | " + ", ".join(f"{lr:.3g}: {'-' if m is None else f'{100 * m:.2f}%'}"
                                            for lr, m in zip(lrs, grid_means))
                + f" | best {'-' if top is None else f'{100 * top:.2f}%'} | "
                + f"{'-' if top is None or not overall else f'{top / overall:.3f}'} |")

    lines.append(grid_row("grid" if muon_means is None else
                          f"grid (Muon at x {b.config(name, 0).train.muon.lr_ratio:g})", b.grid(name, 0), means))
    if muon_means is not None:
        lines.append(grid_row("Muon grid (Muon's lr; the rest at auto)", MUON_GRID, muon_means))
    return lines


def summary_table(rows_by_setup: dict[str, dict[str, Row]]) -> list[str]:
    """Markdown lines: every row (the default as "auto") by setup, as ratio to the grid best and
    mean ± std top-1."""
    def short(m):  # "auto (max_lr)" -> "auto": one row for the default whatever it picked
        return "auto" if m.startswith("auto (") else m.replace("Muon: ", "Muon ")

    tables = {name: {short(m): r for m, r in rows.items()} for name, rows in rows_by_setup.items()}
    names = list(dict.fromkeys(m for rows in tables.values() for m in rows))
    lines = ["\n### Summary: ratio to the grid's best mean top-1 (mean ± std top-1 over the seeds)\n",
             "| row | " + " | ".join(f"{n} ({SETUPS[n].role})" for n in tables) + " |",
             "|---|" + "---|" * len(tables)]
    for m in names:
        cells = []
        for rows in tables.values():
            row = rows.get(m)
            cells.append("-" if row is None or row.mean is None else
                         f"{ratio_text(row)} ({100 * row.mean:.1f} ± {100 * row.std:.1f})")
        if any(c != "-" for c in cells):  # a row trained nowhere on every seed is left out
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def confidence_row(name: str, cache: dict, means: list[float | None], b: Bencher, muon: bool = False) -> str | None:
    """Markdown row: the default method's k single-sweep lrs, their geometric range and verdict,
    how many land in the grid's band (from the grid's ``means``), whether the k-sweep (mean-curve)
    suggestion does, and the seconds of one sweep and of k (what k costs). ``muon``: the same for
    Muon's own sweep (its lrs Muon's, ``means`` those of the Muon grid)."""
    rt = cache["range_tests"].get(cache_key(name, 0, f"repeats={repeats(b.args)}"))
    if rt is None or not means or any(m is None for m in means):
        return None
    result, factor = RangeTestResult.from_dict(rt), b.config(name, 0).lr_finder.lr_factor
    if muon and result.muon is None:
        return None
    low, high = grid_band(list(MUON_GRID) if muon else b.grid(name, 0), means)
    shown = result.muon if muon else result
    spread = shown.spread[shown.method]
    singles = [None if lr is None else lr * factor for lr in spread.lrs]
    inside = sum(lr is not None and low <= lr <= high for lr in singles)
    pooled = shown.suggestion * factor if shown.suggestion is not None else None
    pooled_in = "yes" if pooled is not None and low <= pooled <= high else "no"
    one = cache["range_tests"].get(cache_key(name, 0, "repeats=1"), {}).get("seconds")
    cost = " / ".join("-" if v is None else f"{v:.0f}" for v in (one, rt.get("seconds")))
    return (f"| {name}{' (Muon)' if muon else ''} | {shown.method} | "
            f"{', '.join('-' if v is None else f'{v:.3g}' for v in singles)} | "
            f"{spread.geo_range:.2f}x, {spread.verdict} | {low:.3g}-{high:.3g} | {inside}/{len(singles)} | "
            f"{'-' if pooled is None else f'{pooled:.3g}'} ({pooled_in}) | {cost} |")


def confidence_table(means_by_setup: dict[str, list[float | None]], cache: dict, b: Bencher,
                     muon_means: dict[str, list[float | None] | None]) -> list[str]:
    rows = [r for n, means in means_by_setup.items()
            for r in (confidence_row(n, cache, means, b), confidence_row(n, cache, muon_means[n], b, muon=True))
            if r is not None]
    head = [f"\n### Confidence: the default rule over k = {repeats(b.args)} sweeps (seed 0), the grid's "
            f"{GRID_BAND:.0%} band\n",
            "| setup | rule | single-sweep lrs | spread | grid band | singles in band | k-sweep lr (in band) "
            "| seconds, 1 / k sweeps |",
            "|---|---|---|---|---|---|---|---|"]
    return head + rows if rows else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(CIFAR), help="CIFAR-10 ImageFolder tree")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {', '.join(SETUPS)}")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", type=int, default=7, help="points of the log grid")
    parser.add_argument("--out", type=Path, required=True, help="JSON cache and result, rewritten after each step")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes to check the script")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="other caches (e.g. of a parallel process) whose entries join --out's")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra config overrides")
    args = parser.parse_intermixed_args()
    setups = [s for s in args.setups.split(",") if s]
    parts = [p for p in args.parts.split(",") if p]
    if not setups or set(setups) - set(SETUPS) or set(parts) - set(PARTS):
        raise SystemExit(f"error: --setups from {', '.join(SETUPS)}; --parts from {', '.join(PARTS)}")
    args.work = args.out.with_suffix(".d")
    cache = json.loads(args.out.read_text()) if args.out.exists() else {"range_tests": {}, "trainings": {}}
    for other in args.merge:
        for part, entries in json.loads(other.read_text()).items():
            for k, v in entries.items():
                cache.setdefault(part, {}).setdefault(k, v)
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:8.1f}s] {text}", flush=True)

    bench = Bencher(args, cache, lambda: write_json(args.out, cache), log)
    if args.merge:
        bench.save()
    for name in setups:
        bench.run(name, parts)
    seeds = 1 if args.smoke else args.seeds
    means = {name: grid_means(name, cache, seeds, bench) for name in setups}
    muon_means = {name: muon_grid_means(name, cache, seeds, bench) for name in setups}
    rows = {name: setup_rows(name, cache, seeds, bench, best_of(means[name], muon_means[name])) for name in setups}
    print("\n".join(line for name in setups
                    for line in setup_table(name, rows[name], means[name], muon_means[name], seeds, bench)))
    print("\n".join(summary_table(rows)))
    print("\n".join(confidence_table(means, cache, bench, muon_means)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
