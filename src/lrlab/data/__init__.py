"""Data: in-memory uint8 datasets, augmentation (batched tensor ops or albumentations), loaders.

    dataset = load_dataset("../shared/data/cifar10")          # or a cifar-10-batches-py folder
    train = BatchLoader(dataset.train, 512, mean=dataset.mean, std=dataset.std,
                        shuffle=True, augment="tensor", cutout=16)
    for x, y in train: ...                                      # x float32 (B,3,H,W), y int64 (B,)
"""

from lrlab.data.augment import batch_augment, build_albumentations
from lrlab.data.cifar import Dataset, Split, load_dataset
from lrlab.data.loader import BatchLoader, normalize

__all__ = ["BatchLoader", "Dataset", "Split", "batch_augment", "build_albumentations",
           "load_dataset", "normalize"]
