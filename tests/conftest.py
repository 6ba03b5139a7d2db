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
