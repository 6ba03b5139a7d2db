"""Time to accuracy of a recipe on this machine, epoch by epoch.

    python benchmarks/time_to_accuracy.py recipes/cifar10-quick.yaml --data ../shared/data/cifar10 [key=value ...]

Trains through the same stages as ``lrlab run`` (lrlab.pipeline: prepare, range_test, make_plan,
train), so every training option of the recipe applies. Prints, per epoch: wall seconds since
start (data load and range test included), validation top-1 (plain images; the split of the
recipe's data.val_split), training images/s, achieved GFLOP/s (FLOPs of one training step counted by
torch.utils.flop_counter, forward + backward; counted again after an epoch at which train.freeze_after
freezes a module) and its share of this CPU's measured bfloat16
matrix-product peak (a 4096x4096 bf16 matmul). At the end: seconds to reach 85/88/90/92/93%,
the final test top-1 (with the recipe's TTA) and the time including that test pass, peak RSS, and the
share of step time spent fetching and augmenting batches (the data path, timed on one separate pass
over the training loader). Every time is also given as on a machine of
this kind with a bf16 peak of 700 GFLOP/s (``@700``: seconds x peak / 700; machines of this kind
differ by up to 1.8x, so figures from different machines are compared only this way).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lrlab import pipeline
from lrlab.compute import matmul_gflops as matmul_peak
from lrlab.config import load_config
from lrlab.engine import freeze_due

TARGETS = (0.85, 0.88, 0.90, 0.92, 0.93)
REFERENCE_PEAK = 700.0  # GFLOP/s: the bf16 matmul peak the normalised times refer to


def seconds_text(seconds: float, peak: float) -> str:
    """``seconds`` on this machine and as at :data:`REFERENCE_PEAK` (x peak / 700), e.g. '120.0s (@700: 28.1s)'."""
    return f"{seconds:.1f}s (@700: {seconds * peak / REFERENCE_PEAK:.1f}s)"


def train_flops_per_image(model, compute, size: int = 32, batch: int = 64) -> float:
    """FLOPs of one forward + backward pass per size x size image (convolutions and matmuls)."""
    x = compute.to_device(torch.randn(batch, 3, size, size))
    y = torch.zeros(batch, dtype=torch.long, device=compute.device)
    counter = FlopCounterMode(display=False)
    with counter, compute.autocast():
        F.cross_entropy(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def data_path_seconds(setup) -> tuple[float, int]:
    """(seconds, images) of one pass over the training loader alone: indexing + augmentation."""
    loader = pipeline.train_loader(setup, setup.config.train.batch_size)
    start, images = time.perf_counter(), 0
    for _, y in loader:
        images += len(y)
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", help="also keep the run's files (lr_steps.csv, history, checkpoints) in a "
                                      "new run folder under this folder")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    config = load_config(args.recipe, [f"data.path={args.data}", *args.overrides])
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"matmul peak: bf16 {peak_bf16:.0f} GFLOP/s, float32 {peak_fp32:.0f} GFLOP/s "
          f"(4096^3, {torch.get_num_threads()} threads)")
    start = time.perf_counter()  # the peak measurement is not part of the recipe's time
    setup = pipeline.prepare(config, range_test=config.lr_finder.enabled, train=True, explain=False)
    sizes = config.data.crop_sizes or [setup.data.train.images.shape[1]]
    flops = {s: train_flops_per_image(setup.model, setup.compute, s) for s in sorted(set(sizes))}
    print(f"data loaded at {seconds_text(time.perf_counter() - start, peak_bf16)}; GFLOP per training image: "
          + ", ".join(f"{f / 1e9:.3f} at {s}x{s}" for s, f in flops.items()))
    run = None
    if args.out:
        from lrlab.run_folder import RunFolder
        run = RunFolder.create(args.out, config.name)
        run.save_config(config)
    result = pipeline.range_test(setup) if config.lr_finder.enabled else None
    plan = pipeline.make_plan(setup, result)
    if run is not None:
        run.save_plan(plan)
    print(f"range test done at {seconds_text(time.perf_counter() - start, peak_bf16)}: lr {plan.lr:.3g} ({plan.source})")
    reached: dict[float, float] = {}

    def on_epoch(r: dict) -> None:
        now = time.perf_counter() - start
        rate = r["steps"] * r["batch_size"] / r["train_seconds"]
        gflops = rate * flops[sizes[min(r["epoch"] - 1, len(sizes) - 1)]] / 1e9
        for t in TARGETS:
            if r["val_acc"] >= t and t not in reached:
                reached[t] = now
        print(f"epoch {r['epoch']:>3}  {seconds_text(now, peak_bf16)}  val {100 * r['val_acc']:.2f}%  {rate:7.0f} img/s  "
              f"{gflops:6.1f} GFLOP/s = {100 * gflops / peak_bf16:.0f}% of bf16 peak", flush=True)
        if r["epoch"] in config.train.freeze_after.values():  # frozen before the next epoch: fewer FLOPs per image
            freeze_due(setup.model, config.train.freeze_after, r["epoch"])  # as engine.fit is about to
            for s in flops:
                flops[s] = train_flops_per_image(setup.model, setup.compute, s)
            print("GFLOP per training image from now on: " + ", ".join(f"{f / 1e9:.3f} at {s}x{s}" for s, f in flops.items()))

    history = pipeline.train(setup, plan, pipeline.Callbacks(on_epoch=on_epoch), run)
    total = time.perf_counter() - start
    print(f"total {seconds_text(total, peak_bf16)} (data load, range test, training, evaluation)")
    if setup.data.test is not None and history.stopped is None:
        top1 = pipeline.test_accuracy(setup)
        with_test = time.perf_counter() - start
        print(f"final model: test top-1 {100 * top1:.2f}% (with the recipe's TTA) after {seconds_text(with_test, peak_bf16)} "
              f"in all (the test pass took {with_test - total:.1f}s)")
    data_seconds, images = data_path_seconds(setup)
    train_seconds = sum(r["train_seconds"] for r in history.records)
    train_images = sum(r["steps"] * r["batch_size"] for r in history.records)
    print("seconds to reach: " + ", ".join(
        f"{100 * t:.0f}%: {seconds_text(reached[t], peak_bf16)}" if t in reached else f"{100 * t:.0f}%: -" for t in TARGETS))
    print(f"bf16 matmul peak {peak_bf16:.0f} GFLOP/s; @700 = seconds x {peak_bf16:.0f} / {REFERENCE_PEAK:.0f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB; data path "
          f"{100 * (data_seconds / images) / (train_seconds / train_images):.1f}% of step time")


if __name__ == "__main__":
    main()
