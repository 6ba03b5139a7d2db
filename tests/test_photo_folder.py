"""Photos of any size and mode at data.image_size: decoding, the memory-mapped cache, loaders, errors.

The tree is built from real CIFAR-10 images upscaled to random sizes (100-400 px, JPEG and PNG)
plus hand-made files whose expected pixels are known: grayscale, RGBA, palette with transparency,
CMYK JPEG, 16-bit PNG and an EXIF-rotated JPEG.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from conftest import CIFAR_DIR
from lrlab.config import load_config
from lrlab.data import BatchLoader, load_dataset, stored_side
from lrlab.errors import LrlabError

CLASSES = ["cat", "dog", "ship"]
SIZE = 64  # image_size of the tests; stored squares are stored_side(64) = 73
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _cifar_photos(dst: Path, split: str, per_class: int, rng: np.random.Generator, first: int = 0) -> None:
    """Real CIFAR images upscaled to random sizes, saved alternately as JPEG and PNG."""
    for cls in CLASSES:
        (dst / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(first, first + per_class):
            im = Image.open(CIFAR_DIR / "train" / cls / f"{i:04d}.jpg").convert("RGB")
            im = im.resize((int(rng.integers(100, 401)), int(rng.integers(100, 401))), Image.Resampling.BICUBIC)
            im.save(dst / split / cls / (f"{i:04d}.jpg" if i % 2 else f"{i:04d}.png"))


def _halves(size: tuple[int, int], top, bottom, mode: str = "RGB") -> Image.Image:
    """An image of (w, h) ``size``: the top half filled with ``top``, the bottom half with ``bottom``."""
    im = Image.new(mode, size, top)
    im.paste(bottom, (0, size[1] // 2, size[0], size[1]))
    return im


def _special_files(folder: Path) -> None:
    """The mode and orientation cases, in train/cat (names sort after the CIFAR files)."""
    Image.open(CIFAR_DIR / "train" / "cat" / "0000.jpg").convert("L").resize((150, 120)).save(folder / "m_gray.png")
    left_clear = Image.new("RGBA", (160, 120), (0, 0, 0, 0))  # left half transparent black
    left_clear.paste((255, 0, 0, 255), (80, 0, 160, 120))
    left_clear.save(folder / "m_rgba.png")
    pal = _halves((120, 160), 0, 1, mode="P")
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(folder / "m_palette.png", transparency=0)  # index 0 (black) is transparent
    Image.new("RGB", (200, 130), (200, 50, 100)).convert("CMYK").save(folder / "m_cmyk.jpg", quality=95)
    deep = np.full((120, 200), 65535, dtype=np.uint16)
    deep[60:] = 257 * 100  # 16-bit value of 8-bit 100
    Image.fromarray(deep).save(folder / "m_sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise: portrait
    _halves((300, 150), RED, BLUE).save(folder / "m_exif.jpg", exif=exif, quality=95)


def build_photo_tree(root: Path, seed: int) -> Path:
    """CIFAR photos upscaled to random sizes 100-400 px (JPEG and PNG), 8 per class in train/ and 3 in val/,
    plus grayscale, RGBA, palette, CMYK, 16-bit and EXIF-rotated files in train/cat."""
    rng = np.random.default_rng(seed)
    _cifar_photos(root, "train", 8, rng)
    _cifar_photos(root, "val", 3, rng, first=8)
    _special_files(root / "train" / "cat")
    return root


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory) -> Path:
    return build_photo_tree(tmp_path_factory.mktemp("photos"), seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("photo_cache")


@pytest.fixture(scope="module")
def photos(photo_tree, cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch.from_numpy on a read-only memmap would warn
        return load_dataset(photo_tree, cache_dir=cache, image_size=SIZE, workers=2)


def _train_image(ds, tree: Path, name: str) -> np.ndarray:
    """The stored (S, S, 3) train image of train/cat/<name> (cat is class 0, files sorted by name)."""
    index = sorted(os.listdir(tree / "train" / "cat")).index(name)
    return ds.train.images[index].numpy()


def test_splits_shapes_and_labels(photos):
    s = stored_side(SIZE)
    assert s == 73 and photos.classes == CLASSES and photos.test is None
    assert photos.train.images.shape == (3 * 8 + 6, s, s, 3) and photos.train.images.dtype == torch.uint8
    assert photos.val.images.shape == (9, SIZE, SIZE, 3)  # stored as evaluation sees them
    assert photos.train.labels.tolist() == [0] * 14 + [1] * 8 + [2] * 8
    assert photos.val.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(0.1 < m < 0.9 for m in photos.mean) and all(0.05 < v < 0.5 for v in photos.std)


def test_val_image_is_the_centre_of_the_resized_photo(photos, photo_tree):
    """val/cat/0008.png: shorter side resized to 73, centre 73 square, centre 64 of that."""
    im = Image.open(photo_tree / "val" / "cat" / "0008.png")
    w, h = im.size
    scale = 73 / min(w, h)
    big = np.asarray(im.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR), np.float64)
    top, left = (big.shape[0] - SIZE) // 2, (big.shape[1] - SIZE) // 2
    expected = big[top:top + SIZE, left:left + SIZE]
    # the same crop up to sub-pixel rounding of the box: a small mean difference on a real image
    assert np.abs(photos.val.images[0].numpy() - expected).mean() < 12


def test_modes_give_the_expected_pixels(photos, photo_tree):
    gray = _train_image(photos, photo_tree, "m_gray.png").astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all() and gray.std() > 10
    rgba = _train_image(photos, photo_tree, "m_rgba.png")
    assert (rgba[30, :20] == 255).all() and (rgba[30, -20:] == RED).all()  # transparent -> white
    pal = _train_image(photos, photo_tree, "m_palette.png")
    assert (pal[:20, 30] == 255).all() and (pal[-20:, 30] == BLUE).all()
    cmyk = _train_image(photos, photo_tree, "m_cmyk.jpg").reshape(-1, 3).astype(int)
    assert np.abs(cmyk - np.array([200, 50, 100])).max() <= 6
    deep = _train_image(photos, photo_tree, "m_sixteen.png")
    assert (deep[:25] == 255).all() and (deep[-25:] == 100).all()  # round(v / 257), not v >> 8 or clipping


def test_exif_orientation_is_applied(photos, photo_tree):
    """Stored 300x150 with red top / blue bottom and orientation 6 (rotate 90 degrees clockwise):
    displayed 150x300 with blue left / red right; its centre square keeps that. Unrotated, the
    centre square would be red on top and blue below."""
    img = _train_image(photos, photo_tree, "m_exif.jpg").astype(int)
    left, right = img[10:-10, :25].reshape(-1, 3).mean(0), img[10:-10, -25:].reshape(-1, 3).mean(0)
    assert np.abs(left - BLUE).max() < 12 and np.abs(right - RED).max() < 12


def test_second_load_decodes_nothing_and_maps_the_cache(photos, photo_tree, cache, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded although the cache is warm")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    again = load_dataset(photo_tree, cache_dir=cache, image_size=SIZE)
    assert torch.equal(again.train.images, photos.train.images)
    assert torch.equal(again.val.images, photos.val.images) and again.mean == photos.mean
    # the tensor's memory is a mapping of the cache's train.npy file, not a copy in RAM
    ptr, mapped = again.train.images.data_ptr(), []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if start <= ptr < end:
                mapped.append(fields[-1])
    assert len(mapped) == 1 and mapped[0].endswith("train.npy") and str(cache) in mapped[0]
    assert not any(photo_tree.rglob("*.npy"))  # nothing written beside the data
    sub = again.train.subset(6, seed=1)  # a subset is a copy in memory
    assert sub.images.shape == (6, 73, 73, 3) and sorted(sub.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_training_batches_are_seeded_per_epoch(photos):
    def loader():
        return BatchLoader(photos.train, 8, mean=photos.mean, std=photos.std, shuffle=True,
                           augment="random_resized_crop", image_size=SIZE, cutout=8,
                           trivial_augment=True, channels_last=True, seed=3)

    a = loader()
    epoch0, epoch1 = list(a), list(a)
    assert len(epoch0) == 4 and epoch0[0][0].shape == (8, 3, SIZE, SIZE) and epoch0[-1][0].shape[0] == 6
    assert epoch0[0][0].is_contiguous(memory_format=torch.channels_last) and epoch0[0][0].dtype == torch.float32
    assert not torch.equal(epoch0[0][0], epoch1[0][0])
    b = loader()
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(epoch0, list(b)))
    c = loader()
    c.epoch = 1  # as resume sets it
    assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(epoch1, list(c)))
    assert sorted(torch.cat([y for _, y in epoch0]).tolist()) == sorted(photos.train.labels.tolist())


def test_evaluation_batches_are_centre_crops(photos):
    val = BatchLoader(photos.val, 4, mean=(0, 0, 0), std=(1, 1, 1), shuffle=False, image_size=SIZE)
    x = torch.cat([xb for xb, _ in val])
    assert torch.allclose(x * 255, photos.val.images.permute(0, 3, 1, 2).float(), atol=1e-3)
    train = BatchLoader(photos.train, 30, mean=(0, 0, 0), std=(1, 1, 1), shuffle=False, image_size=SIZE)
    x = next(iter(train))[0]
    # torchvision's centre crop of 64 from 73: top = left = round(9 / 2) = 4 (round half to even)
    expected = photos.train.images[:, 4:68, 4:68].permute(0, 3, 1, 2).float()
    assert x.shape == (30, 3, SIZE, SIZE) and torch.allclose(x * 255, expected, atol=1e-3)


def _tiny_tree(root: Path, *, val_classes=("cat", "dog")) -> Path:
    for split, classes in (("train", ("cat", "dog")), ("val", val_classes)):
        for i, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for j in range(2):
                Image.new("RGB", (120 + 40 * j, 100), (40 * i, 80, 20 * j)).save(root / split / cls / f"{j}.jpg")
    return root


def _error(path: Path, cache: Path, *parts: str, image_size=SIZE) -> str:
    with pytest.raises(LrlabError) as info:
        load_dataset(path, cache_dir=cache, image_size=image_size, workers=2)
    msg = str(info.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg
    return msg


def test_errors_name_the_problem(tmp_path):
    cache = tmp_path / "cache"
    good = _tiny_tree(tmp_path / "good")
    for bad in (8, "abc", 64.0):
        _error(good, cache, "image_size", ">= 16", image_size=bad)
    for value, words in (("8", "greater than or equal to 16"), ("abc", "valid integer")):
        with pytest.raises(LrlabError, match=words):
            load_config(None, [f"data.image_size={value}"])
    _error(good, cache, "same size", "data.image_size", image_size=None)

    truncated = _tiny_tree(tmp_path / "truncated")
    data = (truncated / "train" / "dog" / "1.jpg").read_bytes()
    (truncated / "train" / "dog" / "1.jpg").write_bytes(data[:len(data) // 2])
    _error(truncated, cache, str(truncated / "train" / "dog" / "1.jpg"), "truncated")

    fake = _tiny_tree(tmp_path / "fake")
    (fake / "val" / "cat" / "2.jpg").write_text("not an image")
    _error(fake, cache, str(fake / "val" / "cat" / "2.jpg"), "not a readable image")

    missing = _tiny_tree(tmp_path / "missing", val_classes=("cat",))
    _error(missing, cache, "'dog'", str(missing / "val"))
    extra = _tiny_tree(tmp_path / "extra", val_classes=("cat", "dog", "fox"))
    _error(extra, cache, str(extra / "val" / "fox"), "train/")

    # a failed decode leaves no temporary files behind in the cache, and a good tree then loads
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
    ds = load_dataset(good, cache_dir=cache, image_size=SIZE, workers=1)
    assert ds.train.images.shape == (4, 73, 73, 3) and ds.val.images.shape == (4, SIZE, SIZE, 3)
