"""lrlab.data on real CIFAR-10 images: loading, caching, augmentation, loaders, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, make_subset_tree
from lrlab.data import BatchLoader, Split, batch_augment, build_albumentations, load_dataset
from lrlab.errors import LrlabError


def _listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


@pytest.fixture(scope="module")
def small(small_tree, tmp_path_factory):
    """The small_tree loaded once (500 train / 200 test)."""
    return load_dataset(small_tree, cache_dir=tmp_path_factory.mktemp("small_cache"))


def _write_batches(dst: Path, ds) -> Path:
    """Write ds as a cifar-10-batches-py folder (train split over data_batch_1..5)."""
    folder = dst / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def rows(images: torch.Tensor) -> np.ndarray:  # NHWC -> (N, 3072) CHW rows
        return images.numpy().transpose(0, 3, 1, 2).reshape(len(images), -1).copy()

    tr = rows(ds.train.images)
    labels = ds.train.labels.tolist()
    chunks = np.array_split(np.arange(len(tr)), 5)
    for i, idx in enumerate(chunks, start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": tr[idx],
                         b"labels": [labels[j] for j in idx]}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": rows(ds.test.images), b"labels": ds.test.labels.tolist()}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in ds.classes], b"num_vis": 3072}, f, protocol=2)
    return folder


# ------------------------------------------------------------------------------- loading


def test_imagefolder_subset(small, small_tree):
    assert (len(small.train), len(small.test)) == (500, 200)
    assert small.classes == CLASSES
    for split, per in ((small.train, 50), (small.test, 20)):
        assert split.images.shape == (10 * per, 32, 32, 3) and split.images.dtype == torch.uint8
        assert split.images.is_contiguous()
        assert split.labels.dtype == torch.int64
        assert torch.equal(split.labels, torch.arange(10).repeat_interleave(per))
    # train/cat/0007.jpg: class 3, 8th file
    expected = np.asarray(Image.open(small_tree / "train" / "cat" / "0007.jpg").convert("RGB"))
    assert np.array_equal(small.train.images[3 * 50 + 7].numpy(), expected)
    expected = np.asarray(Image.open(small_tree / "test" / "truck" / "0019.jpg").convert("RGB"))
    assert np.array_equal(small.test.images[-1].numpy(), expected)


def test_mean_std_from_train_split(small):
    px = small.train.images.numpy().reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(small.mean, px.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(small.std, px.std(0), rtol=0, atol=1e-12)
    test_px = small.test.images.numpy().reshape(-1, 3).astype(np.float64) / 255.0
    assert not np.allclose(small.mean, test_px.mean(0), atol=1e-6)


def test_python_batches_match_imagefolder(small, tmp_path):
    folder = _write_batches(tmp_path / "data", small)
    before = _listing(tmp_path / "data")
    for source in (folder, folder.parent):  # the folder itself, or one that contains it
        ds = load_dataset(source, cache_dir=tmp_path / "cache")
        assert (len(ds.train), len(ds.test)) == (500, 200)
        assert ds.classes == CLASSES
        assert torch.equal(ds.train.images, small.train.images)
        assert torch.equal(ds.train.labels, small.train.labels)
        assert torch.equal(ds.test.images, small.test.images)
        assert torch.equal(ds.test.labels, small.test.labels)
        assert ds.mean == pytest.approx(small.mean) and ds.std == pytest.approx(small.std)
    assert _listing(tmp_path / "data") == before  # nothing written beside the data


def test_full_cifar10_and_cached_load(cifar_dir, cache_dir, monkeypatch):
    first = load_dataset(cifar_dir, cache_dir=cache_dir)
    assert (len(first.train), len(first.test)) == (50000, 10000)
    assert first.classes == CLASSES
    assert torch.equal(torch.bincount(first.train.labels), torch.full((10,), 5000))

    def no_decoding(path):  # the second load must come from the cache, not from the JPEGs
        raise AssertionError(f"decoded {path} although the cache is fresh")

    monkeypatch.setattr("lrlab.data.sources._decode_image", no_decoding)
    second = load_dataset(cifar_dir, cache_dir=cache_dir)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.images, second.test.images)
    assert torch.equal(first.train.labels, second.train.labels)
    assert first.mean == second.mean and first.std == second.std


def test_cache_rebuilt_when_corrupt_or_stale(tmp_path):
    tree = make_subset_tree(tmp_path / "tree", 3, 2)
    cache = tmp_path / "cache"
    ds = load_dataset(tree, cache_dir=cache)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(b"garbage, not a zip file")
    again = load_dataset(tree, cache_dir=cache)
    assert torch.equal(again.train.images, ds.train.images)
    assert list(cache.glob("*.npz")) == [cache_file] and cache_file.stat().st_size > 1000
    # a new image in the tree changes the listing signature: decoded again, not served stale
    (tree / "train" / "cat" / "0000.jpg").rename(tree / "train" / "cat" / "extra.jpg")
    make_subset_tree(tree, 3, 2)
    assert len(load_dataset(tree, cache_dir=cache).train) == 31
    assert not list(cache.glob("*.tmp"))


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    tree = make_subset_tree(tmp_path / "tree", 1, 1)
    monkeypatch.setenv("LRLAB_CACHE", str(tmp_path / "envcache"))
    load_dataset(tree)
    assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1


def test_download_failure_and_existing_download(small, tmp_path, monkeypatch):
    import torchvision

    class NoNetwork:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoNetwork)
    with pytest.raises(LrlabError, match="--data PATH") as err:
        load_dataset(None, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value)
    # already downloaded into <cache>/downloads: loaded without touching the network
    _write_batches(tmp_path / "cache" / "downloads", small)
    ds = load_dataset(None, cache_dir=tmp_path / "cache")
    assert len(ds.train) == 500 and ds.classes == CLASSES


def test_subset_is_balanced_and_deterministic(small):
    sub = small.train.subset(100, seed=1)
    assert len(sub) == 100 and sub.images.shape == (100, 32, 32, 3)
    assert torch.equal(torch.bincount(sub.labels, minlength=10), torch.full((10,), 10))
    again = small.train.subset(100, seed=1)
    assert torch.equal(sub.images, again.images) and torch.equal(sub.labels, again.labels)
    assert not torch.equal(small.train.subset(100, seed=2).images, sub.images)
    odd = small.train.subset(23)
    assert sorted(torch.bincount(odd.labels, minlength=10).tolist()) == [2] * 7 + [3] * 3
    with pytest.raises(LrlabError):
        small.train.subset(501)


# ------------------------------------------------------------------------------- augmentation


def _square(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(rows, cols, count, 0) of the bounding box of a boolean (H, W) mask."""
    ys, xs = np.nonzero(mask)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1, int(mask.sum()), 0


def test_albumentations_cutout_is_16x16_mean_coloured(small):
    mean = (0.1, 0.2, 0.3)
    fill = np.array([26, 51, 76], dtype=np.uint8)  # round(255 * mean)
    compose = build_albumentations(crop_padding=0, flip=False, cutout=16, mean=mean, seed=0)
    img = np.full((32, 32, 3), 200, dtype=np.uint8)  # no JPEG noise: every change is the hole
    for _ in range(30):
        out = compose(image=img.copy())["image"]
        hole = np.all(out == fill, axis=-1)
        assert _square(hole) == (16, 16, 256, 0)  # fully inside, never clipped
        assert np.all(out[~hole] == 200)
    # the whole recipe on a real image keeps shape and dtype
    full = build_albumentations(mean=small.mean, rotate=10.0, seed=0)
    out = full(image=small.train.images[0].numpy())["image"]
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_tensor_cutout_is_16x16_zeros():
    x = torch.ones(64, 3, 32, 32)
    out = batch_augment(x, crop_padding=0, flip=False, cutout=16, generator=torch.Generator().manual_seed(0))
    for img in out:
        hole = (img == 0).numpy()
        assert np.array_equal(hole[0], hole[1]) and np.array_equal(hole[0], hole[2])
        assert _square(hole[0]) == (16, 16, 256, 0)
        assert torch.all(img[torch.from_numpy(~hole)] == 1)
    tops = {int(np.nonzero((img[0] == 0).numpy())[0].min()) for img in out}
    assert len(tops) > 5  # per-image positions


def test_batch_augment_crop_is_exact_integer_shift_and_per_image(small):
    img = small.train.images[5].permute(2, 0, 1).float()  # (3, 32, 32)
    x = img.expand(64, 3, 32, 32)
    out = batch_augment(x, crop_padding=4, flip=False, cutout=0, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    shifts = []
    for o in out:
        match = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(o, padded[:, dy:dy + 32, dx:dx + 32])]
        assert match, "output is not an integer shift of the zero-padded image"
        shifts.append(match[0])
    assert len(set(shifts)) > 20  # two identical inputs get different crops


def test_batch_augment_flip_is_exact_and_fills_per_channel(small):
    img = small.train.images[9].permute(2, 0, 1).contiguous()  # uint8 (3, 32, 32)
    x = img.expand(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out = batch_augment(x, crop_padding=0, flip=True, cutout=0, generator=torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, torch.flip(img, [2])) for o in out]
    assert all(f or torch.equal(o, img) for f, o in zip(flipped, out))
    assert 0 < sum(flipped) < 32
    # padding fill is per channel; a shifted image shows it at the border
    out = batch_augment(x, crop_padding=4, flip=True, cutout=0, pad_fill=(7, 8, 9),
                        generator=torch.Generator().manual_seed(2))
    padded = torch.stack([torch.nn.functional.pad(img[c], (4, 4, 4, 4), value=7 + c) for c in range(3)])
    for o in out:
        assert any(torch.equal(o, padded[:, dy:dy + 32, dx:dx + 32])
                   or torch.equal(o, torch.flip(padded[:, dy:dy + 32, dx:dx + 32], [2]))
                   for dy in range(9) for dx in range(9))


def test_batch_augment_smaller_crops_are_windows_of_the_padded_image(small):
    img = small.train.images[3].permute(2, 0, 1).float()
    out = batch_augment(img.expand(40, 3, 32, 32), crop_padding=2, flip=False, cutout=8, size=24,
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == (40, 3, 24, 24)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    offsets = set()
    for o in out:
        hole = (o == 0).all(0)  # the Cutout square, 8 x 8, fully inside the crop
        assert hole.sum() >= 64
        match = [(dy, dx) for dy in range(13) for dx in range(13)
                 if torch.equal(o[:, ~hole], padded[:, dy:dy + 24, dx:dx + 24][:, ~hole])]
        assert match
        offsets.add(match[0])
    assert len(offsets) > 20


def test_batch_augment_reflect_padding_is_torch_reflect_pad(small):
    img = small.train.images[7].permute(2, 0, 1).contiguous()  # uint8 (3, 32, 32)
    x = img.expand(64, 3, 32, 32)
    out = batch_augment(x, crop_padding=2, flip=True, cutout=0, pad_mode="reflect",
                        generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(img[None].float(), (2, 2, 2, 2), mode="reflect")[0].to(torch.uint8)
    seen = set()
    for o in out:
        match = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if torch.equal(o, torch.flip(padded[:, dy:dy + 32, dx:dx + 32], [2]) if f
                                else padded[:, dy:dy + 32, dx:dx + 32])]
        assert match, "output is not a (flipped) window of the reflect-padded image"
        seen.add(match[0])
    assert len(seen) > 20
    with pytest.raises(ValueError, match="reflected padding of 32 pixels"):
        batch_augment(x, crop_padding=32, flip=False, cutout=0, pad_mode="reflect")
    with pytest.raises(ValueError, match="pad_mode must be one of constant, reflect"):
        batch_augment(x, crop_padding=2, flip=False, cutout=0, pad_mode="wrap")


def test_loader_reflect_padding_on_both_paths_and_errors(small):
    for augment in ("tensor", "albumentations"):
        loader = BatchLoader(small.train, 50, mean=small.mean, std=small.std, shuffle=False, augment=augment,
                             crop_padding=4, pad_mode="reflect", flip=False, seed=0)
        x, _ = next(iter(loader))
        black = ((torch.tensor(0.0) - torch.tensor(small.mean)) / torch.tensor(small.std)).view(1, 3, 1)
        border = x[:, :, 0, :].reshape(len(x), 3, -1)
        # reflected borders copy image pixels; a constant (black) border row would appear in most images
        assert (border - black).abs().amax(dim=(1, 2)).gt(1e-4).all()
    with pytest.raises(LrlabError, match="crop_padding 32 with pad_mode reflect"):
        BatchLoader(small.train, 50, mean=small.mean, std=small.std, shuffle=True, augment="tensor",
                    crop_padding=32, pad_mode="reflect")


def test_batch_augment_is_seeded():
    x = torch.randn(16, 3, 32, 32)
    a = batch_augment(x, 4, True, 16, torch.Generator().manual_seed(3))
    b = batch_augment(x, 4, True, 16, torch.Generator().manual_seed(3))
    c = batch_augment(x, 4, True, 16, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------- loader


@pytest.mark.parametrize("augment", ["none", "tensor", "albumentations"])
def test_loader_batches(small, augment):
    loader = BatchLoader(small.train, 64, mean=small.mean, std=small.std, shuffle=True,
                         augment=augment, cutout=8, seed=5)
    assert len(loader) == 8
    batches = list(loader)
    assert [len(y) for _, y in batches] == [64] * 7 + [52]
    x, y = batches[0]
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = list(BatchLoader(small.train, 64, mean=small.mean, std=small.std, shuffle=True,
                             augment=augment, cutout=8, seed=5))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    second_epoch = list(loader)
    assert not torch.equal(second_epoch[0][1], batches[0][1])


def test_loader_normalises_and_covers_every_image_once(small):
    loader = BatchLoader(small.test, 50, mean=small.mean, std=small.std, shuffle=False)
    x, y = next(iter(loader))
    mean = torch.tensor(small.mean).view(1, 3, 1, 1)
    std = torch.tensor(small.std).view(1, 3, 1, 1)
    expected = (small.test.images[:50].permute(0, 3, 1, 2).double() / 255 - mean) / std
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(y, small.test.labels[:50])
    # unique labels = image ids: each epoch delivers every image exactly once
    ids = Split(small.train.images, torch.arange(len(small.train)))
    loader = BatchLoader(ids, 96, mean=small.mean, std=small.std, shuffle=True,
                         augment="tensor", cutout=16, channels_last=True, seed=1)
    for _ in range(2):
        seen = torch.cat([y for _, y in loader])
        assert torch.equal(seen.sort().values, torch.arange(500))
    assert x.is_contiguous()
    assert next(iter(loader))[0].is_contiguous(memory_format=torch.channels_last)
    loader.batch_size = 200
    loader.drop_last = True
    assert len(loader) == 2 and [len(y) for _, y in loader] == [200, 200]
    with pytest.raises(LrlabError):
        loader.batch_size = 0


def test_alternating_flip_flips_each_image_every_other_epoch(small):
    ids = Split(small.train.images, torch.arange(len(small.train)))
    loader = BatchLoader(ids, 128, mean=small.mean, std=small.std, shuffle=True, augment="tensor",
                         crop_padding=0, flip="alternate", cutout=0, seed=3)
    plain = BatchLoader(ids, 500, mean=small.mean, std=small.std, shuffle=False)
    originals = next(iter(plain))[0]
    flipped = []
    for _ in range(3):
        state = torch.zeros(len(ids), dtype=torch.bool)
        for x, y in loader:
            for image, i in zip(x, y.tolist()):
                if torch.equal(image, torch.flip(originals[i], [2])) and not torch.equal(image, originals[i]):
                    state[i] = True
                else:
                    assert torch.equal(image, originals[i])
        flipped.append(state)
    assert 0.4 < flipped[0].float().mean() < 0.6  # random in the first epoch
    assert torch.equal(flipped[1], ~flipped[0]) and torch.equal(flipped[2], flipped[0])
    with pytest.raises(LrlabError, match="alternate"):
        BatchLoader(ids, 8, mean=small.mean, std=small.std, shuffle=True, augment="albumentations",
                    flip="alternate")


def test_progressive_crop_sizes_per_epoch(small):
    loader = BatchLoader(small.train, 100, mean=small.mean, std=small.std, shuffle=True, augment="tensor",
                         cutout=0, crop_sizes=[24, 28], channels_last=True)
    assert [tuple(next(iter(loader))[0].shape[2:]) for _ in range(3)] == [(24, 24), (28, 28), (28, 28)]
    with pytest.raises(LrlabError, match="crop_sizes"):
        BatchLoader(small.train, 100, mean=small.mean, std=small.std, shuffle=True, augment="tensor",
                    cutout=16, crop_sizes=[12])


# ------------------------------------------------------------------------------- errors


def _assert_error(path, *names):
    with pytest.raises(LrlabError) as err:
        load_dataset(path, cache_dir=Path(path).parent / "cache_for_errors")
    msg = str(err.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, msg
    return msg


def test_errors_name_the_problem(tmp_path):
    _assert_error(tmp_path / "nowhere", "nowhere", "does not exist")

    no_train = make_subset_tree(tmp_path / "no_train", 1, 1)
    (no_train / "train").rename(no_train / "images")
    _assert_error(no_train, "no train/", "no_train")

    empty = make_subset_tree(tmp_path / "empty", 1, 1)
    (empty / "train" / "dog" / "0000.jpg").unlink()
    _assert_error(empty, str(empty / "train" / "dog"), "empty")

    bad = make_subset_tree(tmp_path / "bad", 1, 1)
    (bad / "train" / "cat" / "foo.jpg").write_bytes(b"not an image")
    _assert_error(bad, "foo.jpg", "not a readable image")

    mismatch = make_subset_tree(tmp_path / "mismatch", 1, 1)
    (mismatch / "test" / "frog").rename(mismatch / "test" / "toad")
    _assert_error(mismatch, "frog", "toad")

    neither = tmp_path / "neither"
    (neither / "images").mkdir(parents=True)
    _assert_error(neither, "neither", "cifar-10-batches-py")

    sizes = make_subset_tree(tmp_path / "sizes", 1, 1)
    Image.new("RGB", (40, 40)).save(sizes / "test" / "ship" / "big.png")
    _assert_error(sizes, "big.png", "same size")


def test_train_alone_or_with_valid_folder(tmp_path):
    """val/ (or valid/) and test/ are optional; each split present becomes a Split."""
    tree = make_subset_tree(tmp_path / "tree", 2, 1)
    (tree / "test").rename(tree / "valid")
    ds = load_dataset(tree, cache_dir=tmp_path / "cache")
    assert ds.test is None and len(ds.val) == 10 and len(ds.train) == 20
    assert ds.val.labels.tolist() == list(range(10))
    for p in sorted((tree / "valid").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (tree / "valid").rmdir()
    alone = load_dataset(tree, cache_dir=tmp_path / "cache")
    assert alone.test is None and alone.val is None and torch.equal(alone.train.images, ds.train.images)


def test_hidden_files_ignored_and_other_extensions_accepted(tmp_path):
    tree = make_subset_tree(tmp_path / "tree", 1, 1)
    (tree / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    (tree / "train" / ".hidden").mkdir()
    Image.open(tree / "train" / "cat" / "0000.jpg").convert("L").save(tree / "train" / "cat" / "GRAY.PNG")
    ds = load_dataset(tree, cache_dir=tmp_path / "cache")
    assert len(ds.train) == 11 and ds.classes == CLASSES
    assert torch.equal(ds.train.labels, torch.tensor([0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9]))
    g = ds.train.images[4]  # train/cat/GRAY.PNG sorts after 0000.jpg; decoded as RGB
    assert torch.equal(g[..., 0], g[..., 1]) and torch.equal(g[..., 1], g[..., 2])
