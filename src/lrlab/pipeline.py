"""The stages behind ``lrlab run`` / ``find-lr`` / ``train`` / ``explain``, each returning a value.

    setup = prepare(config, range_test=True, train=True, explain=True)   # may reject the recipe
    result = range_test(setup)                  # RangeTestResult (model restored afterwards)
    plan = make_plan(setup, result)             # LRPlan: the learning rates, resolved once
    history = train(setup, plan)                # History (checkpoints through a RunFolder if given)
    pred = predict_test(setup)                  # Predictions of the model as it is
    found = interpret(setup, pred)              # Interpretation: confusion, mistakes, CAMs

:func:`run_pipeline` chains them into a new :class:`~lrlab.run_folder.RunFolder`, which persists
each value; benchmarks call the same stages without a folder. Nothing here prints: progress
reaches the caller through :class:`Callbacks`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrlab.compute import Compute
from lrlab.config import Config
from lrlab.data import BatchLoader, Dataset, Split, load_dataset
from lrlab import distributed, transfer
from lrlab.engine import History, evaluate, fit, modules_to_freeze, seed_everything
from lrlab.errors import Diverged, LrlabError, RunStopped, WriteError
from lrlab.inference import Preprocessing
from lrlab.io import check_writable, remove_temporaries
from lrlab.interpret import (FaithfulnessResult, Predictions, cam_faithfulness, class_activation_maps,
                             layer_names, per_class_summary, predict, select_misclassified)
from lrlab.lr_finder import RangeTestResult, range_test as sweep
from lrlab.lr_plan import (LRPlan, check_range_test_applies, layer_scales, muon_method, range_test_applies,
                           suggestion_method)
from lrlab.models import build, check_name, model_spec
from lrlab.optim import GradientNoise, MuonWithAux, build_optimizer
from lrlab.plateau import find_plateaus
from lrlab.report import write_report
from lrlab.run_folder import RunFolder
from lrlab.scalars import TensorBoardScalars
from lrlab.schedules import Clock, batch_sizes, build_schedule, check_batch_sizes
from lrlab.tta import TTA


@dataclass
class Callbacks:
    """Progress hooks for the caller (the CLI draws tqdm bars with them); all optional."""

    on_stage: Callable[[str, int], None] | None = None  # (stage name, total steps)
    on_step: Callable[[int, float], None] | None = None  # (step, loss)
    on_epoch: Callable[[dict], None] | None = None  # one History record

    def stage(self, name: str, total: int) -> None:
        if self.on_stage is not None:
            self.on_stage(name, total)


@dataclass
class Setup:
    """What every stage works on: the config, where to compute, the data and the model."""

    config: Config
    compute: Compute
    data: Dataset
    model: nn.Module


# ---------------------------------------------------------------------------- building blocks


def load_data(config: Config) -> Dataset:
    """Load the dataset named by ``config.data``, make its validation split and apply the
    configured subsets.

    ``data.val_split: val``: the data's own val split (a val/ or valid/ folder) or, without one,
    a stratified hold-out of ``data.val_fraction`` of train seeded by ``seed``
    (:meth:`Split.hold_out`; the same on every load, so a resumed run sees the same split);
    ``train_subset`` then applies to the rest. ``data.val_split: test``: the validation split is
    the (subset) test split itself, and decisions read the test split.

    Raises:
        LrlabError: ``val_split: test`` without a test split, or a class of train without an
            image in the validation split.
    """
    d = config.data
    data = load_dataset(d.path, d.cache_dir, image_size=d.image_size)
    if d.val_split == "val" and data.val is None:
        data.train, data.val = data.train.hold_out(d.val_fraction, seed=config.seed)
    if d.train_subset and d.train_subset < len(data.train):
        data.train = data.train.subset(d.train_subset, seed=config.seed)
    if data.test is not None and d.test_subset and d.test_subset < len(data.test):
        data.test = data.test.subset(d.test_subset, seed=config.seed)
    if d.val_split == "test":
        if data.test is None:
            raise LrlabError(f"data.val_split is 'test' but {d.path or 'the data'} has no test split; "
                             f"use data.val_split=val")
        data.val = data.test
    elif d.val_subset and d.val_subset < len(data.val):
        data.val = data.val.subset(d.val_subset, seed=config.seed)
    missing = sorted(set(data.train.labels.unique().tolist()) - set(data.val.labels.unique().tolist()))
    if missing:
        raise LrlabError(f"class {data.classes[missing[0]]!r} of the training split has no image in the validation "
                         f"split ({d.val_split}); raise data.val_fraction or data.val_subset, or add images of it")
    return data


def train_loader(setup: Setup, batch_size: int, shard: tuple[int, int] = (0, 1)) -> BatchLoader:
    """Shuffled, augmented batches of the training split on the device (with ``shard`` =
    (rank, world): this rank's part of each, see :class:`BatchLoader`)."""
    d, data, compute = setup.config.data, setup.data, setup.compute
    return BatchLoader(data.train, batch_size, mean=data.mean, std=data.std, shuffle=True,
                       augment=d.augment, crop_padding=d.crop_padding, pad_mode=d.pad_mode, flip=d.flip,
                       cutout=d.cutout,
                       rotate=d.rotate, device=compute.device, channels_last=compute.channels_last,
                       drop_last=True, seed=setup.config.seed, crop_sizes=d.crop_sizes,
                       image_size=d.image_size, crop_scale=d.crop_scale, trivial_augment=d.trivial_augment,
                       shard=shard)


def eval_loader(setup: Setup, split: Split, batch_size: int = 500, shard: tuple[int, int] = (0, 1)) -> BatchLoader:
    """Batches of ``split`` in order, normalised, without augmentation (``shard``: this rank's part)."""
    return BatchLoader(split, batch_size, mean=setup.data.mean, std=setup.data.std, shuffle=False,
                       augment="none", device=setup.compute.device, channels_last=setup.compute.channels_last,
                       image_size=setup.config.data.image_size, shard=shard)


def new_model(config: Config, data: Dataset, compute: Compute, init_from_data: bool = True) -> nn.Module:
    """The configured model with ``model.weights`` (None: freshly initialised from
    ``config.seed``), on the device.

    ``init_from_data=False`` skips data-dependent initialisation (e.g. patch whitening) for a
    model whose weights come from a checkpoint next; so do given weights.

    Raises:
        LrlabError: as :func:`lrlab.models.build` (unknown name, weights that do not fit, ...).
    """
    torch.manual_seed(config.seed)
    model = build(config.model.name, data.classes, config.model.weights, **config.model.kwargs)
    if init_from_data and config.model.weights is None and hasattr(model, "init_from_data"):
        sample = data.train.subset(min(len(data.train), 5000), seed=config.seed)
        loader = BatchLoader(sample, len(sample), mean=data.mean, std=data.std, shuffle=False,
                             image_size=config.data.image_size)
        model.init_from_data(next(iter(loader))[0])
    return compute.prepare(model)


def cam_layer(config: Config, model: nn.Module) -> str | list[str]:
    """The CAM target layer(s): ``explain.target_layer`` (a name or a list of names to fuse)
    or the model's default.

    Raises:
        LrlabError: a layer does not exist (the message lists the valid names).
    """
    layer = config.explain.target_layer or getattr(model, "default_cam_layer", None)
    valid = layer_names(model)
    if layer is None:
        raise LrlabError(f"model {config.model.name} has no default Grad-CAM layer; set explain.target_layer "
                         f"to one of: {', '.join(valid)}")
    for name in layer if isinstance(layer, list) else [layer]:
        if name not in valid:
            raise LrlabError(f"explain.target_layer {name!r} does not exist in {config.model.name}; "
                             f"valid layers: {', '.join(valid)}")
    return layer


def new_optimizer(setup: Setup, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer over the model, every layer group at ``lr`` x its plan scale."""
    t = setup.config.train
    return build_optimizer(t, setup.model, lr, layer_scales(max(1, len(t.layer_groups)), t.lr_ratio))


def prepare(config: Config, *, range_test: bool, train: bool, explain: bool,
            init_from_data: bool = True) -> Setup:
    """Load data and model and check everything that can reject the recipe, before any work is
    written: the model and its weights, augmentation options, optimizer and layer groups, the lr
    sources (LRPlan.check), the batch-size schedule (under torchrun: split evenly over the
    ranks, :func:`lrlab.distributed.check_batch_sizes`), ``train.freeze_after``, the CAM layer. Under torchrun rank 0
    loads the data first (filling the cache), then the other ranks.

    Pretrained weights bring their input normalisation (``model_spec(model).mean/std``, e.g.
    ImageNet's): it replaces the training split's in ``setup.data``, which every loader,
    checkpoint and the report read.

    Raises:
        LrlabError: the first problem found, in one sentence.
    """
    compute = Compute.choose(config.compute.device, config.compute.precision)
    check_name(config.model.name)  # before the (possibly long) first decoding of the data
    if train:
        distributed.check_batch_sizes(batch_sizes(config.train), compute.device, config.train.sync_bn)
    data = distributed.main_first(lambda: load_data(config))
    setup = Setup(config, compute, data, new_model(config, data, compute, init_from_data))
    spec = model_spec(setup.model)
    if spec.mean is not None:
        data.mean, data.std = spec.mean, spec.std
    if explain:
        cam_layer(config, setup.model)
    if range_test or train:
        train_loader(setup, config.train.batch_size)
        new_optimizer(setup, config.train.lr)
    if train:
        LRPlan.check(config, range_test and config.lr_finder.enabled)
        check_batch_sizes(config.train, len(data.train))
        modules_to_freeze(setup.model, config.train.freeze_after)
        if config.train.freeze_after and distributed.is_distributed():
            raise LrlabError("train.freeze_after does not work under torchrun (DistributedDataParallel expects every "
                             "parameter that trained at the start to keep getting gradients); run in one process")
        if config.transfer.active:
            for stage in transfer.stages(config, setup.model):
                LRPlan.check(stage.config, range_test and config.lr_finder.enabled)
                distributed.check_batch_sizes(batch_sizes(stage.config.train), compute.device, config.train.sync_bn)
    return setup


# ---------------------------------------------------------------------------- the stages


def range_test(setup: Setup, callbacks: Callbacks = Callbacks()) -> RangeTestResult:
    """The LR range test on the model (restored afterwards) with the ``lr_finder`` settings; every
    layer group is swept at its plan scale, so the recorded lrs are the top group's.

    With ``train.optimizer: muon`` and ``lr_finder.muon.enabled``, a second sweep follows (the
    idea of sweeping each optimizer in turn): Muon's lr alone from ``lr_finder.muon.start_lr``
    to ``end_lr`` (every Muon group at that lr x its layer scale), the auxiliary optimizer held
    at the first sweep's suggestion x ``lr_factor``; it becomes ``result.muon``, whose lrs are
    those of the Muon group of the highest layer scale s (Muon's lr x s). Its window is not cut
    at a rise (:mod:`lrlab.lr_finder.window`): Muon's curve on a normalised network falls, rises
    a little where the filters' growth takes over, and falls again below it (benchmarks/
    lr_suggestion_quality.py), which is training, not a breakdown. It is skipped when the
    first sweep gives no suggestion (``make_plan`` then says why) or nothing trains with Muon.

    With ``lr_finder.loss: val`` the validation points use ``lr_finder.val_images``
    class-balanced images of the validation split (without augmentation), as the training
    history's val loss does. ``result.method`` is the suggestion the run trains with."""
    config, cfg = setup.config, setup.config.lr_finder
    optimizer = new_optimizer(setup, cfg.start_lr)
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    batch_size = cfg.batch_size or config.train.batch_size
    val_batches = None
    if cfg.loss == "val":
        held_out = setup.data.val.subset(min(cfg.val_images, len(setup.data.val)), seed=config.seed)
        val_batches = list(eval_loader(setup, held_out, batch_size))
    result = _sweep(setup, optimizer, [cfg.start_lr * s for s in scales], [cfg.end_lr * s for s in scales], 0,
                    suggestion_method(cfg.method, optimizer, transfer.fine_tunes(config, setup.model)),
                    "range test", callbacks, val_batches)
    if (isinstance(optimizer, MuonWithAux) and optimizer.muon is not None and cfg.muon.enabled
            and result.suggestion is not None):
        aux_lr, ratio, groups = result.suggestion * cfg.lr_factor, config.train.muon.lr_ratio, optimizer.param_groups
        layer = [g["lr_scale"] / ratio if g["use_muon"] else None for g in groups]
        top = max((i for i, g in enumerate(groups) if g["use_muon"]), key=lambda i: layer[i])

        def group_lrs(muon_lr: float) -> list[float]:  # Muon's groups at muon_lr x their layer scale, the rest held
            return [aux_lr * g["lr_scale"] if s is None else muon_lr * s for g, s in zip(groups, layer)]

        muon = _sweep(setup, optimizer, group_lrs(cfg.muon.start_lr), group_lrs(cfg.muon.end_lr), top, "min10",
                      "Muon's range test", callbacks, val_batches, cut_spikes=False)
        muon.method = muon_method(cfg.muon.method, muon)  # auto depends on the curve: resolved after the sweep
        result.muon = muon
    return result


def _sweep(setup: Setup, optimizer: torch.optim.Optimizer, start_lr: list[float], end_lr: list[float],
           record_group: int, method: str, stage: str, callbacks: Callbacks, val_batches: list | None,
           cut_spikes: bool = True) -> RangeTestResult:
    """One range test (``lr_finder``'s settings, the validation loss on ``val_batches`` when
    given) of ``optimizer`` from each group's start to end lr, recording group
    ``record_group``'s lr (see :func:`range_test`)."""
    config, cfg = setup.config, setup.config.lr_finder
    batch_size = cfg.batch_size or config.train.batch_size

    def loss_fn(logits, y):
        return F.cross_entropy(logits, y, label_smoothing=config.train.label_smoothing)

    callbacks.stage(stage, cfg.num_iter * cfg.repeats)
    step = callbacks.on_step
    return sweep(setup.model, optimizer, loss_fn, train_loader(setup, batch_size), start_lr=start_lr, end_lr=end_lr,
                 num_iter=cfg.num_iter, mode=cfg.mode, smooth=cfg.smooth, diverge_factor=cfg.diverge_factor,
                 skip_start=cfg.skip_start, skip_end=cfg.skip_end, accumulation_steps=cfg.accumulation_steps,
                 val_batches=val_batches, val_every=cfg.val_every, repeats=cfg.repeats, record_group=record_group,
                 cut_spikes=cut_spikes, method=method, device=setup.compute.device,
                 autocast_dtype=setup.compute.dtype, channels_last=setup.compute.channels_last,
                 progress=(lambda i, lr, loss: step(i, loss)) if step else None)


def make_plan(setup: Setup, result: RangeTestResult | None) -> LRPlan:
    """The run's :class:`LRPlan` from the config and the range test (None: no range test).

    Raises:
        LrlabError: the range test gave no suggestion by its method, or as :meth:`LRPlan.make`.
    """
    if result is None:
        return LRPlan.make(setup.config)
    if result.suggestion is None:
        why = result.suggestion_errors.get(result.method, "")
        raise LrlabError(f"the range test stopped after {len(result.lrs)} points ({result.stop_reason}) "
                         f"without a {result.method!r} suggestion ({why}); widen lr_finder.start_lr/end_lr, "
                         f"pick another lr_finder.method or set lr_finder.enabled=false")
    m = result.muon
    if m is not None and m.suggestion is None:
        why = m.suggestion_errors.get(m.method, "")
        raise LrlabError(f"Muon's range test stopped after {len(m.lrs)} points ({m.stop_reason}) without a "
                         f"{m.method!r} suggestion ({why}); widen lr_finder.muon.start_lr/end_lr, pick another "
                         f"lr_finder.muon.method or set lr_finder.muon.enabled=false to keep train.muon.lr_ratio")
    # Muon's sweep records its group of the highest layer scale s at Muon's lr x s (range_test)
    muon = None if m is None else (m.suggestion * setup.config.lr_finder.muon.start_lr / m.start_lr, m.method)
    return LRPlan.make(setup.config, result.suggestion, result.method, muon)


def _steps_per_epoch(loader: BatchLoader, sizes: list[int]) -> list[int]:
    """Optimizer steps of each epoch at its batch size (the loader drops the last partial batch)."""
    steps = []
    for bs in sizes:
        loader.batch_size = bs
        steps.append(len(loader))
    loader.batch_size = sizes[0]
    return steps


def _tensorboard(run: RunFolder | None, resume: dict | None) -> TensorBoardScalars | None:
    """The run's TensorBoard writer; a resumed run's event files are written again from the
    checkpoint's history, so no epoch appears twice."""
    if run is None:
        return None
    if resume is not None:
        run.clear_tensorboard()
    scalars = TensorBoardScalars(run.file("tensorboard_dir"))
    for record in (resume or {}).get("history", []):
        scalars(record)
    return scalars


def train(setup: Setup, plan: LRPlan, callbacks: Callbacks = Callbacks(), run: RunFolder | None = None,
          resume: dict | None = None, earlier: History | None = None, stage: int | None = None) -> History:
    """Train the model with the configured optimizer and schedule over ``plan``, the batch-size
    schedule and gradient noise; from the checkpoint state ``resume`` when given. Under torchrun
    (:mod:`lrlab.distributed`) the model trains in DistributedDataParallel on this rank's part of
    every batch (``run`` only on rank 0). With ``run``:
    checkpoints every epoch (and every ``train.checkpoint_every`` steps), TensorBoard scalars,
    and the history with its figures (``RunFolder.save_history``). The global random states are
    seeded from ``seed`` first, so training does not depend on what ran before it.

    A transfer stage (:mod:`lrlab.transfer`) continues the history ``earlier`` of the stages
    before it (see :func:`lrlab.engine.fit`) and writes ``stage`` into its records and checkpoints.

    Raises:
        Interrupted: SIGINT/SIGTERM while training, after a checkpoint (see :func:`lrlab.engine.fit`).
    """
    config, cfg = setup.config, setup.config.train
    seed_everything(config.seed)
    sizes = batch_sizes(cfg)
    loader = train_loader(setup, sizes[0], distributed.shard())
    clock = Clock(_steps_per_epoch(loader, sizes))
    if plan.muon_lr_ratio is not None:  # the plan's (Muon's sweep may have set it), not the recipe's
        cfg = cfg.model_copy(update={"muon": cfg.muon.model_copy(update={"lr_ratio": plan.muon_lr_ratio})})
    optimizer = build_optimizer(cfg, setup.model, plan.lr, plan.scales)
    noise = GradientNoise(cfg.grad_noise.eta, cfg.grad_noise.gamma, seed=config.seed) if cfg.grad_noise.eta > 0 else None
    if noise is not None:
        noise.attach(optimizer)
    schedule = build_schedule(cfg if plan.schedule is None else cfg.model_copy(update={"schedule": plan.schedule}),
                              optimizer, plan.lr, clock)
    callbacks.stage("train", clock.total_steps)
    extra = {"config": config.model_dump(mode="json"), "classes": setup.data.classes,
             "mean": setup.data.mean, "std": setup.data.std}
    # epochs of the stages before this one (transfer runs), which fit counts on
    start = resume.get("stage_start_epoch", 0) if resume is not None else (len(earlier.records) if earlier else 0)
    if stage is not None:
        extra.update(stage=stage, stage_start_epoch=start)
    scalars = _tensorboard(run, resume)
    try:
        def on_epoch(record: dict) -> None:
            if scalars is not None:
                scalars(record)
            if callbacks.on_epoch is not None:
                callbacks.on_epoch(record)

        history = fit(distributed.wrap(setup.model, cfg.sync_bn), loader,
                      eval_loader(setup, setup.data.val, shard=distributed.shard()), optimizer, schedule,
                      start + cfg.epochs, setup.compute,
                      label_smoothing=cfg.label_smoothing, grad_noise=noise,
                      batch_sizes=[sizes[0]] * start + sizes if cfg.batch_size_milestones else None,
                      on_nonfinite=cfg.on_nonfinite, checkpoint_every=cfg.checkpoint_every,
                      early_stop_patience=cfg.early_stop_patience, resume=resume, earlier=earlier, stage=stage,
                      checkpoint=(lambda state, best: run.save_checkpoint({**state, **extra}, best)) if run else None,
                      on_step=callbacks.on_step, on_epoch=on_epoch,
                      sync=distributed.all_reduce_sums if distributed.is_distributed() else None,
                      freeze_after=cfg.freeze_after)
    finally:
        if scalars is not None:
            scalars.close()
    if run is not None and history.records:
        pd = cfg.plateau_detect
        spans = find_plateaus([r["val_loss"] for r in history.records], pd.window, pd.rel_threshold)
        run.save_history(history, config.name, spans)
    return history


def predict_test(setup: Setup) -> Predictions:
    """Class probabilities of the model on the whole report split (``Dataset.report_split``: the
    test split, else the validation split), with the recipe's TTA, as the summary's reported
    test accuracies are measured. Reported only: no decision reads it."""
    t = setup.config.train
    return predict(setup.model, eval_loader(setup, setup.data.report_split), setup.compute, tta=TTA.of(t))


def test_accuracy(setup: Setup) -> float:
    """Top-1 accuracy in [0, 1] of the model as it is on the whole test split, with the recipe's
    TTA (``train.tta``, ``train.tta_shift``, ``train.tta_fraction``). Reported only: no decision reads it.

    Raises:
        LrlabError: the data has no test split.
    """
    if setup.data.test is None:
        raise LrlabError("the data has no test split to evaluate")
    t = setup.config.train
    return evaluate(setup.model, eval_loader(setup, setup.data.test), setup.compute, TTA.of(t))[1]


@dataclass
class Interpretation:
    """What :func:`interpret` found; ``RunFolder.save_interpretation`` writes it.

    Attributes:
        per_class: confusion counts and fractions, per-class accuracy, most-confused pairs
            (``lrlab.interpret.per_class_summary``).
        mistakes: per shown mistake: index in the report split, pred/true class names, their probabilities, loss.
        details: target_layer, method, select, split (report split: "test" or "val"), accuracy.
        images: (M, H, W, 3) uint8 pixels of the shown mistakes.
        maps_pred, maps_true: (M, H, W) float32 maps in [0, 1] of the predicted / true class.
        faithfulness: the keep/delete test of every CAM method, when asked for.
    """

    per_class: dict
    mistakes: list[dict]
    details: dict
    images: np.ndarray
    maps_pred: np.ndarray
    maps_true: np.ndarray
    faithfulness: FaithfulnessResult | None = field(default=None)


def interpret(setup: Setup, pred: Predictions) -> Interpretation:
    """Study the mistakes of the model on the report split (``Dataset.report_split``: the test
    split, else the validation split): per-class confusion, the ``explain.num_images`` mistakes
    chosen by ``explain.select`` with their ``explain.method`` maps of the predicted and the true
    class, and (``explain.faithfulness_images`` > 0) the faithfulness of every CAM method.
    ``pred`` must be this model's predictions on that split (:func:`predict_test`)."""
    config, cfg, data, report = setup.config, setup.config.explain, setup.data, setup.data.report_split
    layer, classes = cam_layer(config, setup.model), data.classes
    idx = select_misclassified(pred, cfg.num_images, by=cfg.select)
    rows = zip(idx.tolist(), pred.preds[idx].tolist(), pred.targets[idx].tolist())
    mistakes = [{"index": i, "pred": classes[p], "prob": pred.probs[i, p].item(), "true": classes[t],
                 "prob_true": pred.probs[i, t].item(), "loss": pred.losses[i].item()} for i, p, t in rows]
    shown = Split(report.images[idx], report.labels[idx])
    maps = [np.zeros((0, *shown.images.shape[1:3]), np.float32)] * 2  # predicted, true class
    if mistakes:
        x = torch.cat([xb for xb, _ in eval_loader(setup, shown)])
        maps = [class_activation_maps(setup.model, x, classes_[idx], target_layer=layer, method=cfg.method).numpy()
                for classes_ in (pred.preds, pred.targets)]
    faithfulness = None
    if cfg.faithfulness_images:
        sample = report.subset(min(cfg.faithfulness_images, len(report)), seed=config.seed)
        xs = torch.cat([xb for xb, _ in eval_loader(setup, sample)]).contiguous()
        faithfulness = cam_faithfulness(setup.model, xs, setup.compute, target_layer=layer, seed=config.seed)
    details = {"target_layer": layer, "method": cfg.method, "select": cfg.select, "split": data.report_split_name,
               "accuracy": pred.accuracy}
    return Interpretation(per_class_summary(pred, classes), mistakes, details, shown.images.numpy(), *maps,
                          faithfulness=faithfulness)


# ---------------------------------------------------------------------------- commands


@dataclass
class Outcome:
    """What :func:`run_pipeline` returns: the summary (as in summary.json) and the training
    history (None without training)."""

    summary: dict
    history: History | None = None


STAGE_NAMES = ("range_test", "train", "explain")
"""The stages a command runs, as the run folder's status records them for ``lrlab resume``."""


def run_pipeline(config: Config, out: str | Path, callbacks: Callbacks = Callbacks(), *,
                 range_test_stage: bool = True, train_stage: bool = True, explain_stage: bool = True,
                 command: str = "run") -> Outcome:
    """The workflow into a new run folder under ``out``: config.yaml, status.json, range test,
    LRPlan, training, the best checkpoint's predictions and mistakes, summary.json and report.html.

    ``out`` is checked writable before any work. Everything that can reject the recipe is checked
    before the folder is created, and a recipe rejected later (e.g. a range test without a
    suggestion) removes its folder, so bad input leaves nothing behind; a run stopped on the way
    (:class:`~lrlab.errors.RunStopped`, :class:`~lrlab.interrupts.Interrupted`) keeps its folder
    for :func:`resume_pipeline`.

    Under torchrun only rank 0 makes and writes the folder, runs the range test and everything
    after training; the other ranks get its plan, train their part of every batch and return
    an empty summary.

    Raises:
        LrlabError: rejected input; WriteError: ``out`` or a file cannot be written; Diverged:
            a non-finite loss stopped training (after the report was written); Interrupted.
    """
    start = time.perf_counter()
    distributed.from_main(lambda: check_writable(out, "output folder"))
    if range_test_stage and not train_stage:
        check_range_test_applies(config)
    testing = range_test_stage and range_test_applies(config)
    setup = prepare(config, range_test=testing, train=train_stage, explain=explain_stage)
    if not distributed.is_main():
        return _run_stages(setup, None, callbacks, testing, train_stage, explain_stage)
    run = RunFolder.create(out, config.name)
    run.save_status(command, dict(zip(STAGE_NAMES, (range_test_stage, train_stage, explain_stage))))
    with _stopping(run, discard=True):
        run.save_config(setup.config)
        return _finish(run, _run_stages(setup, run, callbacks, testing, train_stage, explain_stage), start)


def resume_pipeline(run: RunFolder, callbacks: Callbacks = Callbacks(), config: Config | None = None,
                    command: str | None = None) -> Outcome:
    """Continue the run in ``run`` with its own config and stages (status.json): reuse its LRPlan
    and range test when saved, continue training from checkpoints/last.pt exactly (see
    :class:`lrlab.engine.Trainer`), then explain, summary and report, all in the same folder.

    ``config`` / ``command`` (``lrlab run RECIPE --resume RUN_DIR``) must be the run's own.
    Under torchrun rank 0 reads the folder and hands config, plan and checkpoint to the other
    ranks (which need no copy of it); the number of ranks may differ from the first start's.

    Raises:
        LrlabError: not a resumable run folder, a different recipe or command, a corrupt
            checkpoint; and as :func:`run_pipeline` (never removes the folder).
    """
    start = time.perf_counter()
    saved, stages = distributed.from_main(lambda: _resumable(run, config, command))
    testing = stages["range_test"] and range_test_applies(saved)
    setup = prepare(saved, range_test=testing, train=stages["train"], explain=stages["explain"])
    if not distributed.is_main():
        return _run_stages(setup, None, callbacks, testing, stages["train"], stages["explain"], resume=True)
    with _stopping(run, discard=False):
        outcome = _run_stages(setup, run, callbacks, testing, stages["train"], stages["explain"], resume=True)
        return _finish(run, outcome, start)


def _resumable(run: RunFolder, config: Config | None, command: str | None) -> tuple[Config, dict]:
    """The saved config and stages of ``run``, checked against ``config`` / ``command`` when
    given; the folder checked writable and cleared of temporary files."""
    saved_command, stages = run.load_status()
    saved = run.load_config()
    if command is not None and command != saved_command:
        raise LrlabError(f"{run.path} was made by 'lrlab {saved_command}'; resume it with 'lrlab resume {run.path}'")
    if config is not None and config != saved:
        raise LrlabError(f"the recipe differs from {run.file('config')} in {', '.join(_differing_keys(config, saved))}; "
                         f"resume with the run's own recipe ('lrlab resume {run.path}')")
    check_writable(run.path, "run folder")
    remove_temporaries(run.path)
    return saved, stages


def _differing_keys(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


@contextlib.contextmanager
def _stopping(run: RunFolder, discard: bool):
    """Tag an interrupt with the run folder to resume; remove the folder (``discard``) when the
    recipe was rejected, never when the run was stopped on the way."""
    try:
        yield
    except KeyboardInterrupt as e:
        e.run_dir = run.path
        raise
    except WriteError as e:
        raise WriteError(f"{e}; once it can be written: lrlab resume {run.path}") from None
    except LrlabError as e:
        if discard and not isinstance(e, RunStopped):
            run.discard()
        raise


def _finish(run: RunFolder, outcome: Outcome, start: float) -> Outcome:
    """summary.json (with the wall time) and report.html; then raise Diverged for a run whose
    training stopped at a non-finite loss."""
    outcome.summary["wall_seconds"] = time.perf_counter() - start
    run.save_summary(outcome.summary)
    report = write_report(run)
    stopped = outcome.history.stopped if outcome.history is not None else None
    if stopped is not None:
        last = stopped["last_finite_loss"]
        raise Diverged(f"training stopped at a non-finite loss ({stopped['loss']}) at step {stopped['step']} "
                       f"(epoch {stopped['epoch']}, lr {stopped['lr']:.3g}, last finite loss "
                       f"{'none' if last is None else f'{last:.4g}'}); the last good checkpoint is kept and "
                       f"{report} says so")
    return outcome


def _plan(setup: Setup, run: RunFolder, callbacks: Callbacks, testing: bool,
          resume: bool, stage: int | None = None) -> tuple[LRPlan, RangeTestResult | None]:
    """The run's LRPlan and range test (of transfer stage ``stage``): read back when resuming a
    run that saved them, else made (range test first when ``testing``) and saved."""
    if resume:
        plan, result = run.load_plan(stage), run.load_range_test(stage) if testing else None
        if plan is not None and (result is not None or not testing):
            return plan, result
    result = None
    if testing:
        result = range_test(setup, callbacks)
        run.save_range_test(result, stage)
    plan = make_plan(setup, result)
    run.save_plan(plan, stage)
    return plan, result


def _plan_summary(plan: LRPlan, result: RangeTestResult | None) -> dict:
    """The summary's lr keys of a plan and its range test."""
    out = {"lr": plan.lr, "lr_plan": plan.rows()}
    if result is not None:
        out.update(lr_suggestion=result.suggestion, lr_method=result.method, lr_suggestions=result.rows(),
                   lr_repeats=max(len(result.repeats), 1), lr_window_cut=result.cut_lr)
        if result.muon is not None:
            out.update(lr_muon_suggestions=result.muon.rows(), lr_muon_window_cut=result.muon.cut_lr)
    return out


def _transfer_stages(setup: Setup, run: RunFolder, callbacks: Callbacks, testing: bool, resume: bool,
                     summary: dict) -> History:
    """Train in the stages of :func:`lrlab.transfer.stages`, each with its own range test, LR plan
    and schedule, one history across them; ``summary["stages"]`` gets each stage's lrs and
    epochs, and the summary's lr keys are the last stage's. Resuming skips the stages that
    checkpoints/last.pt has passed (their saved plans are reused) and continues its own.
    ``run`` None: a rank other than 0 under torchrun (plans and checkpoint come from rank 0)."""
    state = _resume_state(run, resume)
    at = state.get("stage") if state is not None else None
    history, rows = None, []
    for stage in transfer.stages(setup.config, setup.model):
        if at is not None and at > stage.number:  # finished before the stop: nothing to redo
            plan, result = distributed.from_main(lambda: (run.load_plan(stage.number),
                                                          run.load_range_test(stage.number)))
        else:
            sub = Setup(stage.config, setup.compute, setup.data, setup.model)
            frozen = transfer.freeze(setup.model, stage.trainable)
            try:
                seed_everything(setup.config.seed)
                plan, result = distributed.from_main(lambda: _plan(sub, run, callbacks, testing, resume, stage.number))
                history = train(sub, plan, callbacks, run, state if at == stage.number else None, history,
                                stage.number)
            finally:
                frozen.undo()
        rows.append({"stage": stage.number, "name": stage.name, "epochs": stage.config.train.epochs,
                     "trainable_groups": plan.group_names, **_plan_summary(plan, result)})
        summary.update(_plan_summary(plan, result), stages=rows)
        if history is not None and history.stopped is not None:
            break
    return history


def _first_stage_plan(setup: Setup, run: RunFolder, callbacks: Callbacks, testing: bool, resume: bool) -> dict:
    """The range test and LR plan of a transfer recipe's first stage, as training would run it
    (its groups frozen, its lr ratios), saved under the usual names; their summary keys."""
    stage = transfer.stages(setup.config, setup.model)[0]
    frozen = transfer.freeze(setup.model, stage.trainable)
    try:
        plan, result = _plan(Setup(stage.config, setup.compute, setup.data, setup.model), run, callbacks, testing,
                             resume)
    finally:
        frozen.undo()
    return {**_plan_summary(plan, result), "stages": [{"stage": stage.number, "name": stage.name}]}


def _run_stages(setup: Setup, run: RunFolder, callbacks: Callbacks, testing: bool, training: bool,
                explaining: bool, resume: bool = False) -> Outcome:
    """The stages of :func:`run_pipeline` inside its folder; returns the summary so far. The test
    split is evaluated for the summary only: the final model, and the best checkpoint (the best
    validation epoch), whose predictions explain then studies (one pass serves both when the
    best checkpoint holds the final weights). ``run`` None: a rank other than 0
    under torchrun, which receives plan and checkpoint from rank 0, trains and returns."""
    compute, data = setup.compute, setup.data
    if run is not None:
        run.save_preprocessing(Preprocessing.of(data.classes, setup.config.data.image_size,
                                                tuple(data.train.images.shape), data.mean, data.std))
    summary: dict = {"run_dir": str(run), "device": str(compute.device), "autocast": compute.dtype_name,
                     "train_images": len(data.train), "val_images": len(data.val),
                     "test_images": len(data.test) if data.test is not None else None,
                     "val_split": setup.config.data.val_split, "report_split": data.report_split_name,
                     "classes": data.classes}
    history = None
    if training and setup.config.transfer.active:
        history = _transfer_stages(setup, run, callbacks, testing, resume, summary)
    elif setup.config.transfer.active:  # find-lr on a transfer recipe
        summary.update(distributed.from_main(lambda: _first_stage_plan(setup, run, callbacks, testing, resume)))
    else:
        plan, result = distributed.from_main(lambda: _plan(setup, run, callbacks, testing, resume))
        summary.update(_plan_summary(plan, result))
        if training:
            history = train(setup, plan, callbacks, run, _resume_state(run, resume))
    if run is None:  # rank 0 evaluates the test split, explains and reports
        return Outcome(summary, history)
    if distributed.is_distributed():
        summary["world_size"] = distributed.world_size()
    final = None
    if history is not None:
        summary.update(_training_summary(history))
        if data.test is not None and history.stopped is None:
            final = predict_test(setup)
            summary["final_test_acc"] = final.accuracy
    if (training or explaining) and run.file("best_checkpoint").is_file():
        best = run.load_checkpoint("best_checkpoint", compute.device)["model"]
        pred = final if final is not None and _holds(setup.model, best) else None
        if pred is None:
            setup.model.load_state_dict(best)
            pred = predict_test(setup)
        if training and data.test is not None:
            summary["test_acc_at_best"] = pred.accuracy
        if explaining:
            callbacks.stage("explain", 0)
            explain_into(setup, run, pred)
    return Outcome(summary, history)


def _resume_state(run: RunFolder | None, resume: bool) -> dict | None:
    """The state of checkpoints/last.pt when resuming a run that has one (read on rank 0 and
    handed to every rank under torchrun), else None."""
    if not resume:
        return None
    return distributed.from_main(lambda: run.load_checkpoint("last_checkpoint")
                                 if run.file("last_checkpoint").is_file() else None)


def _training_summary(history: History) -> dict:
    """The summary's training keys: the best validation epoch and accuracy (best.pt), the final
    validation accuracy, epochs, time, why training stopped early (``stopped``: a non-finite loss;
    ``early_stop``: early stopping)."""
    out: dict = {}
    if history.records:
        best, last = history.best(), history.records[-1]
        out.update(best_val_acc=best["val_acc"], best_epoch=best["epoch"], final_val_acc=last["val_acc"],
                   epochs=len(history.records), train_seconds=sum(r["seconds"] for r in history.records))
    skipped = sum(r.get("skipped_steps") or 0 for r in history.records)
    out.update(stopped=history.stopped, early_stop=history.early_stop, **({"skipped_steps": skipped} if skipped else {}))
    return out


def _holds(model: nn.Module, state: dict) -> bool:
    """Whether ``state`` (a state dict) is exactly ``model``'s weights and buffers, so that the
    model's predictions are also the state's (one test pass instead of two when the best
    checkpoint is the final epoch's)."""
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k].to(own[k].device)) for k in own)


def explain_into(setup: Setup, run: RunFolder, pred: Predictions | None = None) -> dict:
    """Predictions (unless given), confusion, mistakes and CAMs of the model, saved into ``run``;
    returns the interpretation's details and mistakes."""
    pred = pred if pred is not None else predict_test(setup)
    run.save_predictions(pred)
    found = interpret(setup, pred)
    run.save_interpretation(found, setup.data.classes, setup.config.explain.alpha, setup.config.explain.colormap)
    return {**found.details, "mistakes": found.mistakes}


def source_predictions(source: RunFolder, config: Config, data: Dataset) -> Predictions | None:
    """The earlier run's predictions (made from its best checkpoint), if valid for ``config``: the
    run's config has the same data, model, compute and TTA settings, and the labels match
    ``data.report_split``. None otherwise (then the caller predicts again)."""
    pred = source.load_predictions()
    if pred is None:
        return None
    try:
        earlier = source.load_config()
    except LrlabError:
        return None
    same = (earlier.data == config.data and earlier.model == config.model and earlier.compute == config.compute
            and TTA.of(earlier.train) == TTA.of(config.train))
    if not same or len(pred) != len(data.report_split) or pred.num_classes != len(data.classes):
        return None
    return pred if torch.equal(pred.targets, data.report_split.labels.to(torch.int64)) else None


def explain_run(source: RunFolder, config: Config, out: str | Path) -> dict:
    """Mistakes + CAMs of the best checkpoint of the earlier run ``source``, written into a new
    run folder under ``out`` with its report.html (``source`` is only read; its predictions are
    reused when valid, see :func:`source_predictions`). Returns the summary.

    Raises:
        LrlabError: no best checkpoint in ``source``, or one that does not fit the model.
    """
    state = source.load_checkpoint("best_checkpoint")
    check_writable(out, "output folder")
    setup = prepare(config, range_test=False, train=False, explain=True, init_from_data=False)
    try:
        setup.model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise LrlabError(f"checkpoint {source.file('best_checkpoint')} does not fit model {config.model.name} "
                         f"{config.model.kwargs} of this lrlab version ({str(e).splitlines()[0]})") from None
    run = RunFolder.create(out, f"{config.name}-explain")
    run.save_config(config)
    pred = source_predictions(source, config, setup.data)
    summary = {"run_dir": str(run), "source_run": str(source.path), "predictions_reused": pred is not None,
               **explain_into(setup, run, pred)}
    run.save_summary(summary)
    write_report(run)
    return summary
