"""Shared fixtures: real CIFAR-10 images from ../shared/data/cifar10, in small subsets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_DIR = Path(os.environ.get("LRLAB_TEST_DATA", REPO.parent / "shared" / "data" / "cifar10"))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The full read-only CIFAR-10 ImageFolder tree (train/ and test/)."""
    assert (CIFAR_DIR / "train").is_dir(), f"test data not found at {CIFAR_DIR}"
    return CIFAR_DIR


def make_subset_tree(dst: Path, per_class_train: int, per_class_test: int) -> Path:
    """Copy the first N images per class of the real data into an ImageFolder tree at dst."""
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for cls in CLASSES:
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                name = f"{i:04d}.jpg"
                shutil.copyfile(CIFAR_DIR / split / cls / name, dst / split / cls / name)
    return dst


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory) -> Path:
    """A real-image ImageFolder tree: 50 train and 20 test images per class."""
    return make_subset_tree(tmp_path_factory.mktemp("small_cifar"), 50, 20)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A session-wide decoded-array cache, so the full set is decoded once per test run."""
    return tmp_path_factory.mktemp("lrlab_cache")


MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_images(root: Path, split: str, per_class: int):
    """Decode the first ``per_class`` JPEGs of each class with PIL (no lrlab code involved).

    Returns (x, y, u8): x (N, 3, 32, 32) float32 normalised with CIFAR-10's mean/std, y (N,)
    int64 labels, u8 (N, 32, 32, 3) uint8 pixels; classes in CIFAR order, N = 10 * per_class.
    """
    import numpy as np
    import torch
    from PIL import Image

    raw, labels = [], []
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            with Image.open(root / split / name / f"{i:04d}.jpg") as im:
                raw.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            labels.append(c)
    u8 = np.stack(raw)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.contiguous(), torch.tensor(labels, dtype=torch.int64), u8
