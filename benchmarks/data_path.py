"""The photo data path at 224 px against a resnet18 training step.

    python benchmarks/data_path.py [--tree PATH] [--images 1000] [--batch 64] [--batches 20]

Without ``--tree`` it builds a photo folder (real CIFAR-10 training images upscaled to random
sizes 200-500 px, JPEG) in a temporary folder. It prints: the first load (decoding every photo
once, in worker processes, into the memory-mapped cache), the second load (the cache mapped, no
decoding), the time to load + augment one training batch (RandomResizedCrop 224 + flip, what
``data.image_size: 224`` trains with), one resnet18 training step on that batch (torchvision's
ImageNet resnet18 as ``model.name: torchvision:resnet18`` builds it; bf16 autocast + channels_last
where the CPU has bf16), their ratio, and the machine's bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_throughput import seconds_per_step  # noqa: E402
from time_to_accuracy import matmul_peak  # noqa: E402

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def build_tree(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` real CIFAR-10 training images, upscaled to random sizes 200-500 px, as train/<class>/*.jpg
    (and 2 per class in val/)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (CIFAR / "train").iterdir())
    per_class = max(1, n // len(classes))
    for split, first, count in (("train", 0, per_class), ("val", per_class, 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(first, first + count):
                im = Image.open(CIFAR / "train" / c / f"{i:04d}.jpg").convert("RGB")
                size = (int(rng.integers(200, 501)), int(rng.integers(200, 501)))
                im.resize(size, Image.Resampling.BICUBIC).save(root / split / c / f"{i:04d}.jpg", quality=90)
    return root


def time_loads(tree: Path, cache: Path) -> tuple[float, float, object]:
    """Seconds of the first load (decode into the cache) and the second (map it), and the data."""
    from lrlab.data import load_dataset

    start = time.perf_counter()
    load_dataset(tree, cache, image_size=224)
    first = time.perf_counter() - start
    start = time.perf_counter()
    data = load_dataset(tree, cache, image_size=224)
    return first, time.perf_counter() - start, data


def time_batches(data, batch: int, batches: int, compute) -> float:
    """Seconds per training batch: sample, RandomResizedCrop 224 + flip, normalise, to the device."""
    from lrlab.data import BatchLoader

    loader = BatchLoader(data.train, batch, mean=data.mean, std=data.std, shuffle=True,
                         augment="random_resized_crop", image_size=224, device=compute.device,
                         channels_last=compute.channels_last, drop_last=True)
    done, start = 0, time.perf_counter()
    while done < batches:
        for _ in loader:
            done += 1
            if done == batches:
                break
    return (time.perf_counter() - start) / batches


def time_steps(batch: int, steps: int, compute) -> float:
    """Seconds per resnet18 training step (forward, backward, SGD) on a 224 px batch."""
    import torchvision

    model = compute.prepare(torchvision.models.resnet18(num_classes=10))
    return seconds_per_step(model, compute, 224, batch, steps, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="a photo folder with train/ (default: build one)")
    parser.add_argument("--images", type=int, default=1000, help="training photos of the built folder")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    from lrlab.compute import Compute

    compute = Compute.choose()
    with tempfile.TemporaryDirectory() as tmp:
        tree = args.tree or build_tree(Path(tmp) / "photos", args.images)
        first, second, data = time_loads(tree, Path(tmp) / "cache")
        n = len(data.train) + len(data.val or [])
        per_batch = time_batches(data, args.batch, args.batches, compute)
        per_step = time_steps(args.batch, args.steps, compute)
    print(f"bf16 matmul peak {matmul_peak(torch.bfloat16):.0f} GFLOP/s; device {compute.device}, "
          f"autocast {compute.dtype_name}")
    print(f"first load (decode {n} photos into the cache): {first:.1f} s ({n / first:.0f} images/s)")
    print(f"second load (cache mapped, nothing decoded):    {second:.2f} s")
    print(f"load + augment one batch of {args.batch} at 224: {1000 * per_batch:.1f} ms")
    print(f"resnet18 training step, batch {args.batch} at 224: {1000 * per_step:.0f} ms")
    print(f"data path / step: {100 * per_batch / per_step:.1f}% (target < 10%)")


if __name__ == "__main__":
    main()
