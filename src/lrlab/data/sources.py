"""Data sources and :func:`load_dataset`: ImageFolder trees, CIFAR-10 python batches, download.

:func:`load_dataset` detects the layout of a data folder (or downloads CIFAR-10 when given
none), decodes it into uint8 NHWC arrays with int64 labels, the class names (always read
from the data, never hard-coded) and the per-channel mean and standard deviation of the
train split, and returns them as one :class:`~lrlab.data.containers.Dataset`.

This module owns the sources: layout detection, the ImageFolder tree (scan, decode), the
CIFAR-10 python batches (read through a numpy-only unpickler) and the torchvision download.
Decoded arrays are kept between runs by :mod:`lrlab.data.cache`.

CIFAR-10: Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009,
https://www.cs.toronto.edu/~kriz/cifar.html (python batch format described there).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from lrlab.data.cache import default_cache_dir, listing_signature, read_cache, write_cache
from lrlab.data.containers import Dataset, Split
from lrlab.errors import LrlabError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BATCHES_DIR = "cifar-10-batches-py"


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def load_dataset(path: str | Path | None, cache_dir: str | Path | None = None,
                 download: bool = True) -> Dataset:
    """Load an image-classification dataset into memory as uint8 tensors.

    Sources (detected from the folder's contents):

    * an ImageFolder tree ``path/train/<class>/*.jpg`` and ``path/test/<class>/*.jpg``
      (class names are the sorted folder names; train and test must have the same classes;
      extensions .jpg .jpeg .png .bmp .webp, any case; hidden files are ignored). Images are
      decoded with Pillow and converted to RGB, and all must have the same size;
    * the CIFAR-10 python batches folder ``cifar-10-batches-py`` (``data_batch_1..5``,
      ``test_batch``, ``batches.meta``), or a folder that contains it. Checksums are not
      verified, so re-packed copies load. Rows of 3072 uint8 in CHW order become NHWC;
    * ``None``: CIFAR-10 is downloaded with ``torchvision.datasets.CIFAR10`` into
      ``<cache_dir>/downloads`` (only when not already there) and read as python batches.

    Decoded arrays are cached in ``cache_dir`` (default ``$LRLAB_CACHE`` or
    ``~/.cache/lrlab``) as one uncompressed ``.npz`` per source, written atomically; a
    stale, corrupt or unreadable cache file is rebuilt. With the cache warm, full CIFAR-10
    (60,000 images) loads in about 0.5 s on a 2-core CPU.

    Args:
        path: the data folder, or None to use (and if needed download) CIFAR-10.
        cache_dir: where decoded arrays and downloads go.
        download: when path is None, whether a download may be attempted.

    Returns:
        A Dataset with uint8 (N, H, W, 3) images, int64 (N,) labels, class names, and the
        train split's per-channel mean/std in [0, 1] units.

    Raises:
        LrlabError: the path does not exist or is not a folder; a tree lacks train/ or test/;
            a class folder is empty; a file is not a decodable image; image sizes differ;
            train and test classes differ; a python-batches file is missing or malformed;
            a folder matches neither layout; or there is no data and no network.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if path is None:
        root = _downloaded_cifar10(cache, download).resolve()
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise LrlabError(f"data path {str(root)!r} does not exist; pass an ImageFolder tree "
                             f"with train/ and test/ or a {BATCHES_DIR} folder")
        if not root.is_dir():
            raise LrlabError(f"data path {str(root)!r} is a file, not a folder; pass an ImageFolder "
                             f"tree with train/ and test/ or a {BATCHES_DIR} folder")
        root = root.resolve()
    layout, root = _detect_layout(root)
    if layout == "batches":
        files = _batch_files(root)
        signature = listing_signature(root, files)
        arrays = read_cache(cache, layout, root, signature)
        if arrays is None:
            arrays = _read_batches(root, files)
            write_cache(cache, layout, root, signature, arrays)
    else:
        listing = _scan_tree(root)
        signature = listing_signature(root, [f for split in listing.values()
                                             for cls in split.values() for f in cls])
        arrays = read_cache(cache, layout, root, signature)
        if arrays is None:
            arrays = _read_tree(root, listing)
            write_cache(cache, layout, root, signature, arrays)
    return Dataset(
        train=Split(torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"])),
        test=Split(torch.from_numpy(arrays["test_images"]), torch.from_numpy(arrays["test_labels"])),
        classes=[str(c) for c in arrays["classes"]],
        mean=tuple(float(v) for v in arrays["mean"]),
        std=tuple(float(v) for v in arrays["std"]),
    )


# --------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------


def _detect_layout(root: Path) -> tuple[str, Path]:
    """("batches" | "tree", folder to read) for a data folder, or LrlabError."""
    if (root / "batches.meta").is_file() or (root / "test_batch").is_file() \
            or any(root.glob("data_batch_*")):
        return "batches", root
    if (root / BATCHES_DIR).is_dir():
        return "batches", root / BATCHES_DIR
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train and has_test:
        return "tree", root
    if has_train or has_test:
        missing = "test/" if has_train else "train/"
        raise LrlabError(f"data folder {str(root)!r} has no {missing} subfolder; an ImageFolder "
                         f"tree needs both train/<class>/<image> and test/<class>/<image>")
    raise LrlabError(f"data folder {str(root)!r} is neither an ImageFolder tree (train/<class>/"
                     f"<image> and test/<class>/<image>) nor a {BATCHES_DIR} folder "
                     f"(data_batch_1..5, test_batch, batches.meta)")


# --------------------------------------------------------------------------------------------
# ImageFolder trees
# --------------------------------------------------------------------------------------------


def _scan_tree(root: Path) -> dict[str, dict[str, list[os.DirEntry]]]:
    """{split: {class: [DirEntry of image files, sorted by name]}}, validated."""
    listing: dict[str, dict[str, list[os.DirEntry]]] = {}
    for split in ("train", "test"):
        split_dir = root / split
        with os.scandir(split_dir) as it:
            class_dirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        if not class_dirs:
            raise LrlabError(f"folder {str(split_dir)!r} has no class folders; expected "
                             f"{split}/<class>/<image> with one folder per class")
        classes: dict[str, list[os.DirEntry]] = {}
        for name in class_dirs:
            cls_dir = split_dir / name
            files = []
            with os.scandir(cls_dir) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():
                        raise LrlabError(f"unexpected folder {e.path!r} inside a class folder; "
                                         f"images must sit directly in {split}/<class>/")
                    if not e.name.lower().endswith(IMAGE_EXTENSIONS):
                        raise LrlabError(f"file {e.path!r} is not an image; accepted extensions "
                                         f"are {' '.join(IMAGE_EXTENSIONS)} (any case)")
                    files.append(e)
            if not files:
                raise LrlabError(f"class folder {str(cls_dir)!r} is empty; every class folder "
                                 f"needs at least one image ({' '.join(IMAGE_EXTENSIONS)})")
            files.sort(key=lambda e: e.name)
            classes[name] = files
        listing[split] = classes
    train_cls, test_cls = set(listing["train"]), set(listing["test"])
    if train_cls != test_cls:
        only_train = sorted(train_cls - test_cls)
        only_test = sorted(test_cls - train_cls)
        raise LrlabError(f"train and test classes of {str(root)!r} differ (only in train: "
                         f"{', '.join(only_train) or 'none'}; only in test: "
                         f"{', '.join(only_test) or 'none'}); both need the same class folders")
    return listing


def _decode_image(path: str) -> np.ndarray:
    """Decode one image file to uint8 (H, W, 3) RGB with Pillow, or LrlabError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "RGB":
                im = im.convert("RGB")
            else:
                im.load()
            h, w = im.height, im.width
            return np.frombuffer(im.tobytes(), dtype=np.uint8).reshape(h, w, 3)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise LrlabError(f"file {path!r} is not a readable image ({type(e).__name__}); "
                         f"replace or remove it") from None


def _read_tree(root: Path, listing: dict[str, dict[str, list[os.DirEntry]]]) -> dict[str, np.ndarray]:
    """Decode every image of a scanned tree into the cache's array dict."""
    classes = sorted(listing["train"])
    out: dict[str, np.ndarray] = {"classes": np.array(classes, dtype=np.str_)}
    size: tuple[int, int] | None = None
    first_path = ""
    for split in ("train", "test"):
        entries = [(e.path, ci) for ci, c in enumerate(classes) for e in listing[split][c]]
        labels = np.fromiter((ci for _, ci in entries), dtype=np.int64, count=len(entries))
        images = None
        # A tight single-threaded loop: for 32x32 JPEGs the cost is Python overhead in Pillow,
        # and neither a 2-thread nor a 2-process pool was measurably faster on 2 cores.
        for i, (p, _) in enumerate(entries):
            img = _decode_image(p)
            if size is None:
                size, first_path = img.shape[:2], p
            if img.shape[:2] != size:
                raise LrlabError(f"image {p!r} is {img.shape[1]}x{img.shape[0]} but {first_path!r} "
                                 f"is {size[1]}x{size[0]}; all images must have the same size")
            if images is None:
                images = np.empty((len(entries), *size, 3), dtype=np.uint8)
            images[i] = img
        out[f"{split}_images"] = images
        out[f"{split}_labels"] = labels
    out["mean"], out["std"] = _mean_std(out["train_images"])
    return out


# --------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# --------------------------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, lists, dicts, bytes and strings.

    The CIFAR batches are pickles; refusing every other global keeps a tampered file from
    running code.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if module.startswith("numpy.core"):  # pickles from numpy 1.x
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _batch_files(root: Path) -> list[Path]:
    """[data_batch_1.., test_batch, batches.meta] of a python-batches folder, or LrlabError."""
    train = sorted((p for p in root.glob("data_batch_*") if p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]))
    for need in ("batches.meta", "test_batch"):
        if not (root / need).is_file():
            raise LrlabError(f"python-batches folder {str(root)!r} has no {need} file; expected "
                             f"data_batch_1..5, test_batch and batches.meta")
    if not train:
        raise LrlabError(f"python-batches folder {str(root)!r} has no data_batch_<n> files; "
                         f"expected data_batch_1..5, test_batch and batches.meta")
    return [*train, root / "test_batch", root / "batches.meta"]


def _unpickle(path: Path) -> dict:
    """Load one batch pickle as a dict with str keys, or LrlabError."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure means a malformed file
        raise LrlabError(f"file {str(path)!r} is not a readable CIFAR python batch "
                         f"({type(e).__name__}); expected a pickled dict") from None
    if not isinstance(obj, dict):
        raise LrlabError(f"file {str(path)!r} holds a {type(obj).__name__}, not the dict "
                         f"a CIFAR python batch should hold")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N,32,32,3) NHWC images, int64 (N,) labels) of one python batch."""
    d = _unpickle(path)
    if "data" not in d or ("labels" not in d and "fine_labels" not in d):
        raise LrlabError(f"file {str(path)!r} lacks the 'data' or 'labels' entry of a CIFAR "
                         f"python batch")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"] if "labels" in d else d["fine_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or labels.shape != (data.shape[0],):
        raise LrlabError(f"file {str(path)!r} has data of shape {data.shape} ({data.dtype}) and "
                         f"{labels.size} labels; expected (N, 3072) uint8 rows and N labels")
    # rows are R plane (1024), G plane, B plane of a 32x32 image: CHW -> HWC
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_batches(root: Path, files: list[Path]) -> dict[str, np.ndarray]:
    """Read a python-batches folder into the cache's array dict."""
    *train_files, test_file, meta_file = files
    meta = _unpickle(meta_file)
    names = meta.get("label_names")
    if names is None:
        raise LrlabError(f"file {str(meta_file)!r} has no 'label_names' entry; expected the "
                         f"CIFAR-10 batches.meta")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    parts = [_batch_arrays(p) for p in train_files]
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = _batch_arrays(test_file)
    for p, lab in ((root / "data_batch_*", train_labels), (test_file, test_labels)):
        if lab.size and (lab.min() < 0 or lab.max() >= len(classes)):
            raise LrlabError(f"labels in {str(p)!r} run from {lab.min()} to {lab.max()} but "
                             f"batches.meta names {len(classes)} classes")
    mean, std = _mean_std(train_images)
    return {"train_images": train_images, "train_labels": train_labels,
            "test_images": test_images, "test_labels": test_labels,
            "classes": np.array(classes, dtype=np.str_), "mean": mean, "std": std}


def _downloaded_cifar10(cache: Path, download: bool) -> Path:
    """The cifar-10-batches-py folder under <cache>/downloads, downloading it if needed."""
    root = cache / "downloads"
    batches = root / BATCHES_DIR
    needed = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    if all((batches / n).is_file() for n in needed):
        return batches
    hint = (f"pass --data PATH (an ImageFolder tree with train/ and test/, or a {BATCHES_DIR} "
            f"folder)")
    if not download:
        raise LrlabError(f"no data path was given and CIFAR-10 is not in {str(root)!r}; {hint}")
    try:
        import torchvision

        root.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - any failure here means we have no data
        raise LrlabError(f"no data path was given and CIFAR-10 could not be downloaded to "
                         f"{str(root)!r} (no network? {type(e).__name__}); {hint}") from None
    if not all((batches / n).is_file() for n in needed):
        raise LrlabError(f"the CIFAR-10 download in {str(root)!r} is incomplete; delete it and "
                         f"retry, or {hint}")
    return batches


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _mean_std(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std (ddof=0) of uint8 (N, H, W, C) images, [0, 1] units.

    Built from an exact per-channel histogram of the 256 pixel values (np.bincount over
    chunks), then moments in float64: exact up to the final float64 arithmetic, and about
    3x faster than summing upcast chunks.
    """
    c = images.shape[-1]
    flat = images.reshape(-1, c)
    offsets = (np.arange(c, dtype=np.int32) * 256)[None, :]
    hist = np.zeros(256 * c, dtype=np.int64)
    step = 1 << 20
    for i in range(0, flat.shape[0], step):
        hist += np.bincount((flat[i:i + step] + offsets).ravel(), minlength=256 * c)
    hist = hist.reshape(c, 256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = np.maximum(hist.sum(1), 1.0)
    mean = (hist * values).sum(1) / n
    var = np.maximum((hist * values * values).sum(1) / n - mean * mean, 0.0)
    return mean, np.sqrt(var)
