"""The decoded-image caches: one ``.npz`` per same-size source, a folder of memory-mapped
``.npy`` files per (photo tree, image size).

Decoding is done once per source and cached in a cache directory (never beside the data,
which may be read-only; default ``$LRLAB_CACHE`` or ``~/.cache/lrlab``). A cache is keyed by
the layout and the resolved source path (and the image size), and checked against a cheap
signature of the source listing (relative file names, sizes and modification times), so an
edited data folder is decoded again. Files are written atomically (temp file, then
``os.replace``); a stale, corrupt or unreadable cache reads as absent.

* Same-size sources (CIFAR python batches, ImageFolder trees of equal-size images): one
  uncompressed ``.npz`` with ``train_images``, ``train_labels``, ``classes``, ``mean``, ``std``
  and, for the splits present, ``val_images``/``val_labels`` and ``test_images``/``test_labels``,
  plus the ``signature``; loaded into memory. A cache that cannot be written is skipped.
* Photo trees at an image size (:func:`sized_cache_folder`): one uint8 ``<split>.npy`` per split
  (N, H, W, 3), opened as a copy-on-write memory map (``np.load(mmap_mode="c")``: pages are read
  from disk on demand, so a dataset larger than RAM works, and writes to the array never reach
  the file), plus ``meta.npz`` with the labels, classes, mean, std and signature, written last,
  so a cache without it is incomplete. Built under a file lock (:func:`cache_lock`), so two
  processes never decode the same cache at once; it must be writable.
"""
from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from lrlab.errors import WriteError
from lrlab.io import atomic_path, remove_temporaries

CACHE_VERSION = 1  # bump when the cache file layout changes


def default_cache_dir() -> Path:
    """The cache directory used when none is given: ``$LRLAB_CACHE`` or ``~/.cache/lrlab``."""
    env = os.environ.get("LRLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lrlab"


def listing_signature(root: Path, entries) -> str:
    """sha256 over (relative name, size, mtime_ns) of every source file, in listing order."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}\n".encode())
    prefix = len(str(root)) + 1  # every entry path is root + os.sep + relative name
    parts = []
    for e in entries:
        if isinstance(e, os.DirEntry):
            p, st = e.path, e.stat()
        else:
            p = str(e)
            st = os.stat(p)
        parts.append(f"{p[prefix:]}\0{st.st_size}\0{st.st_mtime_ns}\n")
    h.update("".join(parts).encode())
    return h.hexdigest()


def _cache_file(cache: Path, layout: str, root: Path) -> Path:
    """The cache file of a source: ``<layout>-<folder name>-<20 hex digits of sha256(path)>.npz``."""
    key = hashlib.sha256(str(root).encode()).hexdigest()[:20]
    return cache / f"{layout}-{root.name or 'root'}-{key}.npz"


_CACHE_KEYS = ("train_images", "train_labels", "classes", "mean", "std")  # val_*, test_*: when present
_SPLIT_KEYS = ("val_images", "val_labels", "test_images", "test_labels")


def read_cache(cache: Path, layout: str, root: Path, signature: str) -> dict[str, np.ndarray] | None:
    """The cached arrays for this source, or None if absent, stale or unreadable."""
    path = _cache_file(cache, layout, root)
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["signature"]) != signature:
                return None
            arrays = {k: z[k] for k in (*_CACHE_KEYS, *_SPLIT_KEYS) if k in _CACHE_KEYS or k in z.files}
    except Exception:  # noqa: BLE001 - a missing or corrupt cache is simply rebuilt
        return None
    return arrays if _splits_ok(arrays) else None


def _splits_ok(arrays: dict[str, np.ndarray]) -> bool:
    """Every ``<split>_images`` is uint8 (N, H, W, 3) with N int64 ``<split>_labels``."""
    for split in ("train", "val", "test"):
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if (images is None) != (labels is None):
            return False
        if images is not None and not (images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3
                                       and labels.dtype == np.int64 and labels.shape == (len(images),)):
            return False
    return "train_images" in arrays


def write_cache(cache: Path, layout: str, root: Path, signature: str,
                arrays: dict[str, np.ndarray]) -> None:
    """Atomically write the arrays (:func:`lrlab.io.atomic_path`: temp file, fsync, rename).

    A cache that cannot be written (read-only home, full disk) is skipped silently: the
    data was decoded and the caller can go on.
    """
    try:
        with atomic_path(_cache_file(cache, layout, root)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, signature=np.array(signature), **arrays)
    except WriteError:
        pass


# --------------------------------------------------------------------------------------------
# Photo trees at an image size: memory-mapped .npy files
# --------------------------------------------------------------------------------------------

META = "meta.npz"


def sized_cache_folder(cache: Path, root: Path, image_size: int) -> Path:
    """The cache folder of a photo tree at ``image_size``: ``<cache>/tree-<folder name>-<20 hex
    digits of sha256(path)>-<image_size>px``."""
    key = hashlib.sha256(str(root).encode()).hexdigest()[:20]
    return cache / f"tree-{root.name or 'root'}-{key}-{int(image_size)}px"


@contextmanager
def cache_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``fcntl.flock`` on ``folder/.lock``; no lock where
    fcntl does not exist); creates the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_sized_cache(folder: Path, signature: str) -> dict[str, np.ndarray] | None:
    """The arrays of a sized cache, the images as copy-on-write ``np.memmap`` (mode "c"), or
    None when absent, stale, incomplete or unreadable."""
    try:
        with np.load(folder / META, allow_pickle=False) as z:
            if str(z["signature"]) != signature:
                return None
            arrays = {k: z[k] for k in z.files if k != "signature"}
        for split in ("train", "val", "test"):
            if f"{split}_labels" in arrays:
                arrays[f"{split}_images"] = np.load(folder / f"{split}.npy", mmap_mode="c")
    except Exception:  # noqa: BLE001 - a missing or corrupt cache is simply rebuilt
        return None
    return arrays if _splits_ok(arrays) else None


@contextmanager
def new_sized_cache(folder: Path, shapes: dict[str, tuple[int, ...]]) -> Iterator[dict[str, Path]]:
    """Temporary uint8 ``.npy`` files of the given shapes, one per split, for the caller to fill
    (e.g. as ``np.load(path, mmap_mode="r+")``); renamed to ``<split>.npy`` when the block ends
    without error, removed otherwise. Call with :func:`cache_lock` held, then write
    :func:`write_sized_meta`. The old ``meta.npz`` is removed first and temporaries of killed
    builds are cleared. Disk space is reserved up front (``posix_fallocate``), so a full disk
    raises here rather than crashing a worker writing into a memory map.

    Raises:
        WriteError: a file cannot be created, reserved or renamed (see lrlab.io.atomic_path).
    """
    (folder / META).unlink(missing_ok=True)
    remove_temporaries(folder)  # the lock is held: no other process is building here
    with ExitStack() as stack:
        files = {}
        for split, shape in shapes.items():
            files[split] = stack.enter_context(atomic_path(folder / f"{split}.npy"))
            _allocate(files[split], shape)
        yield files


def _allocate(path: Path, shape: tuple[int, ...]) -> None:
    """Create the ``.npy`` file (header + zeros, sparse) and reserve its disk blocks."""
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise
                # EOPNOTSUPP / EINVAL: a file system without reservation; go on


def write_sized_meta(folder: Path, signature: str, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write ``meta.npz`` (labels, classes, mean, std and the signature) last.

    Raises:
        WriteError: the file cannot be written.
    """
    with atomic_path(folder / META) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, signature=np.array(signature), **arrays)
