"""Time to accuracy of a recipe on this machine, epoch by epoch.

    python benchmarks/time_to_accuracy.py recipes/cifar10-quick.yaml --data ../shared/data/cifar10 [key=value ...]

Prints, per epoch: wall seconds since start (data load and range test included), test top-1
(with the recipe's TTA at the final epoch, plain images before), training images/s, achieved GFLOP/s (FLOPs of one
training step counted by torch.utils.flop_counter, forward + backward) and its share of this
CPU's measured bfloat16 matrix-product peak (a 4096x4096 bf16 matmul). At the end: seconds to
reach 85/88/90/92/93%, peak RSS, and the share of step time spent fetching and augmenting
batches (the data path).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lrlab.config import load_config
from lrlab.engine import fit
from lrlab.optim import build_optimizer
from lrlab.runner import eval_loader, find_lr, load_data, new_model, precision_for, train_loader
from lrlab.schedules import build_schedule

TARGETS = (0.85, 0.88, 0.90, 0.92, 0.93)


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matrix product in ``dtype`` on the CPU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def train_flops_per_image(model, precision, size: int = 32, batch: int = 64) -> float:
    """FLOPs of one forward + backward pass per size x size image (convolutions and matmuls)."""
    x = torch.randn(batch, 3, size, size, device=precision.device)
    if precision.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.zeros(batch, dtype=torch.long, device=precision.device)
    counter = FlopCounterMode(display=False)
    with counter, precision.autocast():
        F.cross_entropy(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


class TimedLoader:
    """Wraps a loader; accumulates the seconds spent producing batches and in whole epochs."""

    def __init__(self, loader):
        self.loader, self.data_seconds, self.epoch_seconds, self.images = loader, 0.0, 0.0, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        start = time.perf_counter()
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            self.data_seconds += time.perf_counter() - t
            self.images += len(y)
            yield x, y
        self.epoch_seconds += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--data", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    start = time.perf_counter()
    config = load_config(args.recipe, [f"data.path={args.data}", *args.overrides])
    precision = precision_for(config)
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"matmul peak: bf16 {peak_bf16:.0f} GFLOP/s, float32 {peak_fp32:.0f} GFLOP/s "
          f"(4096^3, {torch.get_num_threads()} threads)")
    start = time.perf_counter()  # the peak measurement is not part of the recipe's time
    data = load_data(config)
    model = new_model(config, data, precision)
    sizes = config.data.crop_sizes or [data.train.images.shape[1]]
    flops = {s: train_flops_per_image(model, precision, s) for s in sorted(set(sizes))}
    print(f"data loaded at {time.perf_counter() - start:.1f}s; GFLOP per training image: "
          + ", ".join(f"{f / 1e9:.3f} at {s}x{s}" for s, f in flops.items()))
    lr = config.train.lr
    if config.lr_finder.enabled:
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as tmp:
            lr = find_lr(config, data, model, precision, Path(tmp)).suggestion * config.lr_finder.lr_factor
        print(f"range test done at {time.perf_counter() - start:.1f}s: lr {lr:.3g}")
    loader = TimedLoader(train_loader(config, data, precision, config.train.batch_size))
    optimizer = build_optimizer(config.train, model, lr)
    schedule = build_schedule(config.train, optimizer, lr, len(loader))
    reached: dict[float, float] = {}
    last = {"images": 0, "seconds": 0.0}

    def on_epoch(r: dict) -> None:
        now = time.perf_counter() - start
        images, seconds = loader.images - last["images"], loader.epoch_seconds - last["seconds"]
        last.update(images=loader.images, seconds=loader.epoch_seconds)
        rate = images / seconds
        gflops = rate * flops[sizes[min(r["epoch"] - 1, len(sizes) - 1)]] / 1e9
        for t in TARGETS:
            if r["test_acc"] >= t and t not in reached:
                reached[t] = now
        print(f"epoch {r['epoch']:>3}  {now:7.1f}s  test {100 * r['test_acc']:.2f}%  {rate:7.0f} img/s  "
              f"{gflops:6.1f} GFLOP/s = {100 * gflops / peak_bf16:.0f}% of bf16 peak", flush=True)

    fit(model, loader, eval_loader(data.test, data, precision), optimizer, schedule, config.train.epochs,
        precision, label_smoothing=config.train.label_smoothing, tta=config.train.tta,
        tta_shift=config.train.tta_shift, on_epoch=on_epoch)
    total = time.perf_counter() - start
    print(f"total {total:.1f}s (data load, range test, training, evaluation)")
    print("seconds to reach: " + ", ".join(
        f"{100 * t:.0f}%: {reached[t]:.0f}s" if t in reached else f"{100 * t:.0f}%: -" for t in TARGETS))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB; "
          f"data path {100 * loader.data_seconds / loader.epoch_seconds:.1f}% of step time")


if __name__ == "__main__":
    main()
