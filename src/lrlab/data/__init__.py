"""Data: in-memory uint8 datasets, augmentation (batched tensor ops or albumentations), loaders.

    dataset = load_dataset("../shared/data/cifar10")          # or a cifar-10-batches-py folder
    train = BatchLoader(dataset.train, 512, mean=dataset.mean, std=dataset.std,
                        shuffle=True, augment="tensor", cutout=16)
    for x, y in train: ...                                      # x float32 (B,3,H,W), y int64 (B,)

One owner per concept:

* :mod:`~lrlab.data.containers`: :class:`Split` and :class:`Dataset`, the generic in-memory
  uint8 containers;
* :mod:`~lrlab.data.sources`: :func:`load_dataset` and the sources it detects (ImageFolder
  trees with train/, val/, test/, CIFAR-10 python batches, the CIFAR-10 download);
* :mod:`~lrlab.data.decode`: image files to RGB pixels (modes, EXIF orientation), the stored
  square of photos at an image size, parallel decoding into memory-mapped files;
* :mod:`~lrlab.data.cache`: the decoded-image caches (one ``.npz`` per same-size source, one
  folder of memory-mapped ``.npy`` files per photo tree and image size);
* :mod:`~lrlab.data.augment`: crop, flip and Cutout, batched (:func:`batch_augment`) or per
  image (:func:`build_albumentations`);
* :mod:`~lrlab.data.photo_augment`: RandomResizedCrop, centre crop and TrivialAugmentWide of
  photos at an image size (torchvision.transforms.v2 on uint8 tensors);
* :mod:`~lrlab.data.loader`: :class:`BatchLoader`, :func:`normalize`, and the names of the
  loader's modes, :data:`AUGMENT_MODES`, :data:`PHOTO_MODES` and :data:`FLIP_MODES`
  (and :data:`PAD_MODES`, the random crop's padding, from :mod:`~lrlab.data.augment`).
"""

from lrlab.data.augment import PAD_MODES, batch_augment, build_albumentations
from lrlab.data.containers import Dataset, Split
from lrlab.data.decode import stored_side
from lrlab.data.loader import AUGMENT_MODES, FLIP_MODES, PHOTO_MODES, BatchLoader, normalize
from lrlab.data.photo_augment import CROP_SCALE
from lrlab.data.sources import load_dataset

__all__ = ["AUGMENT_MODES", "CROP_SCALE", "FLIP_MODES", "PAD_MODES", "PHOTO_MODES", "BatchLoader", "Dataset", "Split",
           "batch_augment", "build_albumentations", "load_dataset", "normalize", "stored_side"]
