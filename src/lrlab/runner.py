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
from lrlab.config import Config, save_config
from lrlab.data import BatchLoader, Dataset, Split, load_dataset
from lrlab.device import autocast_dtype, pick_device
from lrlab.engine import History, Precision, fit
from lrlab.errors import LrlabError
from lrlab.interpret import class_activation_maps, layer_names, predict, select_misclassified
from lrlab.io import write_json
from lrlab.lr_finder import RangeTestResult, range_test
from lrlab.models import build_model
from lrlab.optim import build_optimizer
from lrlab.schedules import build_schedule


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
                       drop_last=True, seed=config.seed)


def eval_loader(split: Split, data: Dataset, precision: Precision, batch_size: int = 500) -> BatchLoader:
    """Batches of ``split`` in order, normalised, without augmentation."""
    return BatchLoader(split, batch_size, mean=data.mean, std=data.std, shuffle=False, augment="none",
                       device=precision.device, channels_last=precision.channels_last)


def new_model(config: Config, data: Dataset, precision: Precision) -> nn.Module:
    """The configured model, freshly initialised from ``config.seed``, on the device."""
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, len(data.classes), **config.model.kwargs)
    return precision.prepare(model)


def find_lr(config: Config, data: Dataset, model: nn.Module, precision: Precision, run_dir: Path,
            callbacks: Callbacks = Callbacks()) -> RangeTestResult:
    """Run the LR range test on ``model`` (restored afterwards) and save
    ``lr_finder.json`` and ``lr_finder.png`` into ``run_dir``."""
    cfg = config.lr_finder
    optimizer = build_optimizer(config.train, model, cfg.start_lr)
    loader = train_loader(config, data, precision, cfg.batch_size or config.train.batch_size)

    def loss_fn(logits, y):
        return F.cross_entropy(logits, y, label_smoothing=config.train.label_smoothing)

    callbacks.stage("range test", cfg.num_iter)
    step = callbacks.on_step
    result = range_test(model, optimizer, loss_fn, loader, start_lr=cfg.start_lr, end_lr=cfg.end_lr,
                        num_iter=cfg.num_iter, mode=cfg.mode, smooth=cfg.smooth,
                        diverge_factor=cfg.diverge_factor, skip_start=cfg.skip_start,
                        skip_end=cfg.skip_end, device=precision.device,
                        autocast_dtype=precision.dtype, channels_last=precision.channels_last,
                        progress=(lambda i, lr, loss: step(i, loss)) if step else None)
    result.save_json(run_dir / "lr_finder.json")
    plots.plot_range_test(result.lrs, result.losses, result.smoothed, result.suggestion,
                          run_dir / "lr_finder.png")
    return result


def train(config: Config, data: Dataset, model: nn.Module, precision: Precision, lr: float,
          run_dir: Path, callbacks: Callbacks = Callbacks()) -> History:
    """Train ``model`` with SGD at (peak) learning rate ``lr`` and the configured schedule;
    write history.csv/json, loss.png, accuracy.png, lr.png and checkpoints/ into ``run_dir``."""
    cfg = config.train
    loader = train_loader(config, data, precision, cfg.batch_size)
    optimizer = build_optimizer(cfg, model, lr)
    schedule = build_schedule(cfg, optimizer, lr, len(loader))
    extra = {"config": config.model_dump(mode="json"), "classes": data.classes,
             "mean": data.mean, "std": data.std}
    callbacks.stage("train", cfg.epochs * len(loader))
    history = fit(model, loader, eval_loader(data.test, data, precision), optimizer, schedule, cfg.epochs,
                  precision, label_smoothing=cfg.label_smoothing, tta=cfg.tta,
                  checkpoint_dir=run_dir / "checkpoints", checkpoint_extra=extra,
                  on_step=callbacks.on_step, on_epoch=callbacks.on_epoch)
    history.save(run_dir)
    plots.plot_loss(history.records, run_dir / "loss.png")
    plots.plot_accuracy(history.records, run_dir / "accuracy.png")
    plots.plot_lr(history.records, run_dir / "lr.png")
    return history


def cam_layer(config: Config, model: nn.Module) -> str:
    """The Grad-CAM target layer: ``explain.target_layer`` or the model's default.

    Raises:
        LrlabError: the layer does not exist (the message lists the valid names).
    """
    layer = config.explain.target_layer or getattr(model, "default_cam_layer", None)
    if layer not in layer_names(model):
        raise LrlabError(f"explain.target_layer {layer!r} does not exist in {config.model.name}; "
                         f"valid layers: {', '.join(layer_names(model))}")
    return layer


def explain(config: Config, data: Dataset, model: nn.Module, precision: Precision, run_dir: Path) -> dict:
    """Find the misclassified test images; write misclassified.png (titled
    "pred: <class> (<prob>) / true: <class>") and gradcam.png (Grad-CAM of the predicted
    class) for the ``explain.num_images`` highest-loss mistakes. Returns their details."""
    cfg = config.explain
    layer = cam_layer(config, model)
    pred = predict(model, eval_loader(data.test, data, precision), device=precision.device,
                   autocast_dtype=precision.dtype, channels_last=precision.channels_last)
    idx = select_misclassified(pred, cfg.num_images, by="loss")
    shown = Split(data.test.images[idx], data.test.labels[idx])
    x = torch.cat([xb for xb, _ in eval_loader(shown, data, precision)])
    classes = data.classes
    titles = [plots.mistake_title(classes[p], pred.probs[i, p].item(), classes[t])
              for i, p, t in zip(idx.tolist(), pred.preds[idx].tolist(), pred.targets[idx].tolist())]
    images = shown.images.numpy()
    plots.plot_mistakes(images, titles, run_dir / "misclassified.png")
    maps = class_activation_maps(model, x, pred.preds[idx], target_layer=layer, device=precision.device)
    plots.plot_cam_grid(images, maps.cpu().numpy(), titles, run_dir / "gradcam.png", alpha=cfg.alpha)
    mistakes = [{"index": i, "pred": classes[p], "prob": pred.probs[i, p].item(), "true": classes[t]}
                for i, p, t in zip(idx.tolist(), pred.preds[idx].tolist(), pred.targets[idx].tolist())]
    write_json(run_dir / "mistakes.json", {"target_layer": layer, "test_accuracy": pred.accuracy,
                                           "mistakes": mistakes})
    return {"target_layer": layer, "mistakes": mistakes}


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
    run_dir = new_run_dir(out, config.name)
    save_config(config, run_dir / "config.yaml")
    lr = config.train.lr
    summary: dict = {"run_dir": str(run_dir), "device": str(precision.device),
                     "autocast": str(precision.dtype).removeprefix("torch.") if precision.dtype else "float32",
                     "train_images": len(data.train), "test_images": len(data.test),
                     "classes": data.classes}
    if "find-lr" in steps and config.lr_finder.enabled:
        result = find_lr(config, data, model, precision, run_dir, callbacks)
        summary["lr_suggestion"] = result.suggestion
        if result.suggestion is None:
            raise LrlabError(f"the range test stopped after {len(result.lrs)} steps ({result.stop_reason}) "
                             f"without a suggestion; widen lr_finder.start_lr/end_lr or set lr_finder.enabled=false")
        lr = result.suggestion * config.lr_finder.lr_factor
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
    return summary


def explain_run(source: Path, config: Config, out: str | Path) -> dict:
    """Mistakes + Grad-CAM of the best checkpoint of the earlier run ``source``, written
    into a new run folder under ``out`` (``source`` is only read). Returns the summary."""
    ckpt_path = source / "checkpoints" / "best.pt"
    if not ckpt_path.is_file():
        raise LrlabError(f"{source} has no checkpoints/best.pt; pass the folder of a run that trained")
    precision = precision_for(config)
    data = load_data(config)
    model = new_model(config, data, precision)
    model.load_state_dict(torch.load(ckpt_path, map_location=precision.device)["model"])
    cam_layer(config, model)
    run_dir = new_run_dir(out, f"{config.name}-explain")
    save_config(config, run_dir / "config.yaml")
    summary = {"run_dir": str(run_dir), "source_run": str(source),
               **explain(config, data, model, precision, run_dir)}
    write_json(run_dir / "summary.json", summary)
    return summary
