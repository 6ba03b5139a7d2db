"""The pipeline behind the CLI commands: run folders, range test, training, mistakes.

Each function takes a validated Config and plain values and writes its files into a
run folder; none of them prints. Progress reaches the caller through callbacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrlab import plots
from lrlab.config import Config, load_config, save_config
from lrlab.data import BatchLoader, Dataset, Split, load_dataset
from lrlab.compute import Compute, autocast_dtype, pick_device
from lrlab.engine import History, Precision, fit
from lrlab.errors import LrlabError
from lrlab.interpret import (Predictions, cam_faithfulness, class_activation_maps, layer_names, per_class_summary,
                             predict, select_misclassified)
from lrlab.io import write_json
from lrlab.lr_finder import RangeTestResult, range_test
from lrlab.models import build_model
from lrlab.optim import GradientNoise, build_optimizer
from lrlab.plateau import find_plateaus
from lrlab.report import write_report
from lrlab.scalars import TensorBoardScalars
from lrlab.schedules import batch_sizes, build_schedule, check_batch_sizes, check_lr_source, schedule_lr


@dataclass
class Callbacks:
    """Progress hooks for the caller (the CLI draws tqdm bars with them); all optional."""

    on_stage: Callable[[str, int], None] | None = None  # (stage name, total steps)
    on_step: Callable[[int, float], None] | None = None  # (step, loss)
    on_epoch: Callable[[dict], None] | None = None  # one History record

    def stage(self, name: str, total: int) -> None:
        if self.on_stage is not None:
            self.on_stage(name, total)


def new_run_dir(out: str | Path, name: str) -> Path:
    """Create and return a new, empty folder ``out/<name>-<YYYYmmdd-HHMMSS>[-k]``.

    Never reuses an existing folder, so a command cannot touch an earlier run.
    """
    out = Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        path = out / (f"{name}-{stamp}" if k == 1 else f"{name}-{stamp}-{k}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise LrlabError(f"could not create a new run folder under {out}")


def precision_for(config: Config) -> Precision:
    """Device, autocast dtype and memory layout for this config on this machine.

    bfloat16 autocast + channels_last on bf16-capable CPUs and on CUDA; float32 elsewhere.
    """
    device = pick_device(config.device)
    dtype = autocast_dtype(device, config.train.precision)
    return Precision(device, dtype, channels_last=dtype is not None)


def load_data(config: Config) -> Dataset:
    """Load the dataset named by ``config.data`` and apply the configured subsets."""
    data = load_dataset(config.data.path, config.data.cache_dir)
    if config.data.train_subset and config.data.train_subset < len(data.train):
        data.train = data.train.subset(config.data.train_subset, seed=config.seed)
    if config.data.test_subset and config.data.test_subset < len(data.test):
        data.test = data.test.subset(config.data.test_subset, seed=config.seed)
    return data


def train_loader(config: Config, data: Dataset, precision: Precision, batch_size: int) -> BatchLoader:
    """Shuffled, augmented batches of the training split on the device."""
    d = config.data
    return BatchLoader(data.train, batch_size, mean=data.mean, std=data.std, shuffle=True,
                       augment=d.augment, crop_padding=d.crop_padding, flip=d.flip, cutout=d.cutout,
                       rotate=d.rotate, device=precision.device, channels_last=precision.channels_last,
                       drop_last=True, seed=config.seed, crop_sizes=d.crop_sizes)


def eval_loader(split: Split, data: Dataset, precision: Precision, batch_size: int = 500) -> BatchLoader:
    """Batches of ``split`` in order, normalised, without augmentation."""
    return BatchLoader(split, batch_size, mean=data.mean, std=data.std, shuffle=False, augment="none",
                       device=precision.device, channels_last=precision.channels_last)


def new_model(config: Config, data: Dataset, precision: Precision, init_from_data: bool = True) -> nn.Module:
    """The configured model, freshly initialised from ``config.seed``, on the device.

    ``init_from_data=False`` skips data-dependent initialisation (e.g. patch whitening) for a
    model whose weights come from a checkpoint next."""
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, len(data.classes), **config.model.kwargs)
    if init_from_data and hasattr(model, "init_from_data"):
        sample = data.train.subset(min(len(data.train), 5000), seed=config.seed)
        model.init_from_data(next(iter(eval_loader(sample, data, Precision(torch.device("cpu")), len(sample))))[0])
    return precision.prepare(model)


def find_lr(config: Config, data: Dataset, model: nn.Module, precision: Precision, run_dir: Path,
            callbacks: Callbacks = Callbacks()) -> RangeTestResult:
    """Run the LR range test on ``model`` (restored afterwards) with the ``lr_finder`` settings
    and save ``lr_finder.json`` and ``lr_finder.png`` (every suggestion marked, the band of
    ``lr_finder.method`` shaded) into ``run_dir``.

    With ``lr_finder.loss: val`` the validation points use ``lr_finder.val_images``
    class-balanced images of the test split (without augmentation), as the training history's
    test loss does. Returns the result; ``result.suggestion`` is ``lr_finder.method``'s lr."""
    cfg = config.lr_finder
    optimizer = build_optimizer(config.train, model, cfg.start_lr)
    batch_size = cfg.batch_size or config.train.batch_size
    loader = train_loader(config, data, precision, batch_size)
    val_batches = None
    if cfg.loss == "val":
        held_out = data.test.subset(min(cfg.val_images, len(data.test)), seed=config.seed)
        val_batches = list(eval_loader(held_out, data, precision, batch_size))

    def loss_fn(logits, y):
        return F.cross_entropy(logits, y, label_smoothing=config.train.label_smoothing)

    callbacks.stage("range test", cfg.num_iter)
    step = callbacks.on_step
    result = range_test(model, optimizer, loss_fn, loader, start_lr=cfg.start_lr, end_lr=cfg.end_lr,
                        num_iter=cfg.num_iter, mode=cfg.mode, smooth=cfg.smooth,
                        diverge_factor=cfg.diverge_factor, skip_start=cfg.skip_start,
                        skip_end=cfg.skip_end, accumulation_steps=cfg.accumulation_steps,
                        val_batches=val_batches, val_every=cfg.val_every, method=cfg.method,
                        device=precision.device, autocast_dtype=precision.dtype,
                        channels_last=precision.channels_last,
                        progress=(lambda i, lr, loss: step(i, loss)) if step else None)
    result.save_json(run_dir / "lr_finder.json")
    plots.plot_range_test(result.lrs, result.losses, result.centered, result.suggestion, run_dir / "lr_finder.png",
                          suggestions={k: (s.lr, s.low, s.high) for k, s in result.suggestions.items()},
                          chosen=result.method,
                          ylabel="validation loss" if result.loss == "val" else "training loss")
    return result


def suggestion_table(result: RangeTestResult) -> list[dict]:
    """One row per suggestion method: method, lr, low, high (None when the method gave none),
    used (the method ``train.lr`` comes from) and note (why a method gave none)."""
    from lrlab.lr_finder import METHODS

    rows = []
    for name in METHODS:
        s = result.suggestions.get(name)
        rows.append({"method": name, "lr": s.lr if s else None, "low": s.low if s else None,
                     "high": s.high if s else None, "used": name == result.method,
                     "note": "" if s else result.suggestion_errors.get(name, "")})
    return rows


def train(config: Config, data: Dataset, model: nn.Module, precision: Precision, lr: float,
          run_dir: Path, callbacks: Callbacks = Callbacks()) -> History:
    """Train ``model`` with the configured optimizer, schedule (``lr``: the peak for onecycle
    and cyclic, else the initial lr, per step), batch-size schedule and gradient noise; write
    history.csv/json, lr_steps.csv, loss.png, accuracy.png, lr.png, lr_steps.png, plateaus.png
    and checkpoints/ into ``run_dir``."""
    cfg = config.train
    sizes = batch_sizes(cfg)
    loader = train_loader(config, data, precision, sizes[0])
    steps = []
    for bs in sizes:  # optimizer steps of each epoch (the loader drops the last partial batch)
        loader.batch_size = bs
        steps.append(len(loader))
    loader.batch_size = sizes[0]
    optimizer = build_optimizer(cfg, model, lr)
    if cfg.grad_noise.eta > 0:
        GradientNoise(cfg.grad_noise.eta, cfg.grad_noise.gamma, seed=config.seed).attach(optimizer)
    schedule = build_schedule(cfg, optimizer, lr, steps)
    extra = {"config": config.model_dump(mode="json"), "classes": data.classes,
             "mean": data.mean, "std": data.std}
    callbacks.stage("train", sum(steps))
    with TensorBoardScalars(run_dir / "tensorboard") as tensorboard:
        def on_epoch(record: dict) -> None:
            tensorboard(record)
            if callbacks.on_epoch is not None:
                callbacks.on_epoch(record)

        history = fit(model, loader, eval_loader(data.test, data, precision), optimizer, schedule, cfg.epochs,
                      precision, label_smoothing=cfg.label_smoothing, tta=cfg.tta, tta_shift=cfg.tta_shift,
                      checkpoint_dir=run_dir / "checkpoints", checkpoint_extra=extra,
                      on_step=callbacks.on_step, on_epoch=on_epoch,
                      batch_sizes=sizes if cfg.batch_size_milestones else None)
    history.save(run_dir)
    pd = cfg.plateau_detect
    spans = find_plateaus([r["test_loss"] for r in history.records], pd.window, pd.rel_threshold)
    plots.plot_plateaus(history.records, spans, run_dir / "plateaus.png")
    step_batch_sizes = [r["batch_size"] for r in history.records for _ in range(r["steps"])]
    plots.plot_lr_steps({config.name: (history.step_lrs, step_batch_sizes)}, run_dir / "lr_steps.png")
    plots.plot_loss(history.records, run_dir / "loss.png")
    plots.plot_accuracy(history.records, run_dir / "accuracy.png")
    plots.plot_lr(history.records, run_dir / "lr.png")
    return history


def cam_layer(config: Config, model: nn.Module) -> str | list[str]:
    """The CAM target layer(s): ``explain.target_layer`` (a name or a list of names to fuse)
    or the model's default.

    Raises:
        LrlabError: a layer does not exist (the message lists the valid names).
    """
    layer = config.explain.target_layer or getattr(model, "default_cam_layer", None)
    valid = layer_names(model)
    for name in layer if isinstance(layer, list) else [layer]:
        if name not in valid:
            raise LrlabError(f"explain.target_layer {name!r} does not exist in {config.model.name}; "
                             f"valid layers: {', '.join(valid)}")
    return layer


def predict_test_set(config: Config, data: Dataset, model: nn.Module, precision: Precision) -> Predictions:
    """Class probabilities of ``model`` on the whole test split (with flip TTA when
    ``train.tta``, so the accuracy matches the training history's)."""
    compute = Compute(precision.device, precision.dtype, precision.channels_last)
    return predict(model, eval_loader(data.test, data, precision), compute, tta=config.train.tta,
                   tta_shift=config.train.tta_shift)


def explain(config: Config, data: Dataset, model: nn.Module, precision: Precision, run_dir: Path,
            pred: Predictions | None = None) -> dict:
    """Study the mistakes of ``model`` (the best checkpoint) on the test split; write into ``run_dir``:

    predictions.pt (probabilities and labels of every test image, reused by later commands),
    per_class.json + confusion.png (confusion counts and row-normalised, per-class accuracy,
    most-confused pairs), and for the ``explain.num_images`` mistakes chosen by
    ``explain.select``: misclassified.png (titled "pred: <class> (<prob>) / true: <class>"),
    gradcam.png (the ``explain.method`` map of the predicted class), gradcam_pred_true.png
    (image | map of the predicted class | map of the true class) and mistakes.json; with
    ``explain.faithfulness_images`` > 0 also faithfulness.json/.png (lrlab.interpret.faithfulness).

    Args:
        pred: the test-set predictions of this very model, when already computed
            (``predict_test_set``); None computes them.

    Returns:
        dict with target_layer, method, select, test_accuracy and the mistakes' details.
    """
    cfg = config.explain
    layer = cam_layer(config, model)
    if pred is None:
        pred = predict_test_set(config, data, model, precision)
    pred.save(run_dir / "predictions.pt")
    classes = data.classes
    per_class = per_class_summary(pred, classes)
    write_json(run_dir / "per_class.json", per_class)
    plots.plot_confusion(per_class["confusion"], classes, run_dir / "confusion.png")

    idx = select_misclassified(pred, cfg.num_images, by=cfg.select)
    rows = list(zip(idx.tolist(), pred.preds[idx].tolist(), pred.targets[idx].tolist()))
    mistakes = [{"index": i, "pred": classes[p], "prob": pred.probs[i, p].item(), "true": classes[t],
                 "prob_true": pred.probs[i, t].item(), "loss": pred.losses[i].item()} for i, p, t in rows]
    if mistakes:
        shown = Split(data.test.images[idx], data.test.labels[idx])
        x = torch.cat([xb for xb, _ in eval_loader(shown, data, precision)])
        titles = [plots.mistake_title(m["pred"], m["prob"], m["true"]) for m in mistakes]
        images = shown.images.numpy()
        plots.plot_mistakes(images, titles, run_dir / "misclassified.png")
        cam = dict(target_layer=layer, method=cfg.method, device=precision.device)
        maps_pred = class_activation_maps(model, x, pred.preds[idx], **cam).numpy()
        maps_true = class_activation_maps(model, x, pred.targets[idx], **cam).numpy()
        plots.plot_cam_grid(images, maps_pred, titles, run_dir / "gradcam.png", alpha=cfg.alpha, cmap=cfg.colormap)
        plots.plot_cam_pairs(images, maps_pred, maps_true, [m["pred"] for m in mistakes],
                             [m["prob"] for m in mistakes], [m["true"] for m in mistakes],
                             run_dir / "gradcam_pred_true.png", alpha=cfg.alpha, cmap=cfg.colormap)
    if cfg.faithfulness_images:
        sample = data.test.subset(min(cfg.faithfulness_images, len(data.test)), seed=config.seed)
        xs = torch.cat([xb for xb, _ in eval_loader(sample, data, precision)]).contiguous()
        compute = Compute(precision.device, precision.dtype, precision.channels_last)
        result = cam_faithfulness(model, xs, compute, target_layer=layer, seed=config.seed)
        result.save(run_dir / "faithfulness.json")
        plots.plot_faithfulness(result.fractions, result.keep, result.delete, run_dir / "faithfulness.png",
                                intact=result.intact_confidence)
    details = {"target_layer": layer, "method": cfg.method, "select": cfg.select, "test_accuracy": pred.accuracy}
    write_json(run_dir / "mistakes.json", {**details, "mistakes": mistakes})
    return {**details, "mistakes": mistakes}


def source_predictions(source: Path, config: Config, data: Dataset) -> Predictions | None:
    """The earlier run's ``predictions.pt`` (made from its best.pt), if it is valid for ``config``:
    the run's config.yaml has the same data, model, device, precision and TTA settings, and the
    labels match ``data.test``. None otherwise (then the caller predicts again)."""
    path = source / "predictions.pt"
    if not path.is_file():
        return None
    try:
        earlier = load_config(source / "config.yaml")
        pred = Predictions.load(path)
    except LrlabError:
        return None
    same = (earlier.data == config.data and earlier.model == config.model and earlier.device == config.device
            and earlier.train.tta == config.train.tta
            and earlier.train.tta_shift == config.train.tta_shift and earlier.train.precision == config.train.precision)
    if not same or len(pred) != len(data.test) or pred.num_classes != len(data.classes):
        return None
    return pred if torch.equal(pred.targets, data.test.labels.to(torch.int64)) else None


def run_pipeline(config: Config, out: str | Path, callbacks: Callbacks = Callbacks(),
                 steps: tuple[str, ...] = ("find-lr", "train", "explain")) -> dict:
    """The workflow into a new run folder under ``out``: config.yaml, range test, training,
    mistakes, summary.json. ``steps`` picks the stages ("find-lr", "train", "explain").

    Data, model and Grad-CAM layer are checked before the folder is created, so bad input
    leaves nothing behind. Returns the summary dict (also written to summary.json).
    """
    start = time.perf_counter()
    precision = precision_for(config)
    data = load_data(config)
    model = new_model(config, data, precision)
    if "explain" in steps:
        cam_layer(config, model)
    if "train" in steps:
        check_lr_source(config.train, "find-lr" in steps and config.lr_finder.enabled)
        check_batch_sizes(config.train, len(data.train))
    run_dir = new_run_dir(out, config.name)
    save_config(config, run_dir / "config.yaml")
    lr, found = config.train.lr, None
    summary: dict = {"run_dir": str(run_dir), "device": str(precision.device),
                     "autocast": str(precision.dtype).removeprefix("torch.") if precision.dtype else "float32",
                     "train_images": len(data.train), "test_images": len(data.test),
                     "classes": data.classes}
    if "find-lr" in steps and config.lr_finder.enabled:
        result = find_lr(config, data, model, precision, run_dir, callbacks)
        summary["lr_suggestion"] = result.suggestion
        summary["lr_method"] = result.method
        summary["lr_suggestions"] = suggestion_table(result)
        if result.suggestion is None:
            why = result.suggestion_errors.get(result.method, "")
            raise LrlabError(f"the range test stopped after {len(result.lrs)} points ({result.stop_reason}) "
                             f"without a {result.method!r} suggestion ({why}); widen lr_finder.start_lr/end_lr, "
                             f"pick another lr_finder.method or set lr_finder.enabled=false")
        lr = found = result.suggestion * config.lr_finder.lr_factor
    if "train" in steps:
        lr = schedule_lr(config.train, found)  # onecycle/cyclic: train.max_lr wins over the range test
    summary["lr"] = lr
    if "train" in steps:
        history = train(config, data, model, precision, lr, run_dir, callbacks)
        best, last = history.best(), history.records[-1]
        summary.update(best_test_acc=best["test_acc"], best_epoch=best["epoch"],
                       final_test_acc=last["test_acc"], epochs=len(history.records),
                       train_seconds=sum(r["seconds"] for r in history.records))
    if "explain" in steps:
        best_state = torch.load(run_dir / "checkpoints" / "best.pt", map_location=precision.device)
        model.load_state_dict(best_state["model"])
        callbacks.stage("explain", 0)
        explain(config, data, model, precision, run_dir)
    summary["wall_seconds"] = time.perf_counter() - start
    write_json(run_dir / "summary.json", summary)
    write_report(run_dir)
    return summary


def explain_run(source: Path, config: Config, out: str | Path) -> dict:
    """Mistakes + Grad-CAM of the best checkpoint of the earlier run ``source``, written
    into a new run folder under ``out`` with its report.html (``source`` is only read; its
    predictions.pt is reused when valid, see ``source_predictions``). Returns the summary."""
    ckpt_path = source / "checkpoints" / "best.pt"
    if not ckpt_path.is_file():
        raise LrlabError(f"{source} has no checkpoints/best.pt; pass the folder of a run that trained")
    precision = precision_for(config)
    data = load_data(config)
    model = new_model(config, data, precision, init_from_data=False)
    try:
        model.load_state_dict(torch.load(ckpt_path, map_location=precision.device)["model"])
    except (RuntimeError, KeyError, EOFError) as e:
        raise LrlabError(f"checkpoint {ckpt_path} does not fit model {config.model.name} "
                         f"{config.model.kwargs} of this lrlab version ({str(e).splitlines()[0]})") from None
    cam_layer(config, model)
    run_dir = new_run_dir(out, f"{config.name}-explain")
    save_config(config, run_dir / "config.yaml")
    pred = source_predictions(source, config, data)
    summary = {"run_dir": str(run_dir), "source_run": str(source), "predictions_reused": pred is not None,
               **explain(config, data, model, precision, run_dir, pred)}
    write_json(run_dir / "summary.json", summary)
    write_report(run_dir)
    return summary
