"""The decoded-array cache: one uncompressed ``.npz`` file per data source.

Decoding is done once per source and cached in a cache directory (never beside the data,
which may be read-only; default ``$LRLAB_CACHE`` or ``~/.cache/lrlab``). The cache file is
keyed by the layout and the resolved source path, and checked against a cheap signature of
the source listing (relative file names, sizes and modification times), so an edited data
folder is decoded again. Files are written atomically (temp file, then ``os.replace``); a
stale, corrupt or unreadable file reads as absent, and a cache that cannot be written is
skipped.

The arrays stored are those :mod:`lrlab.data.sources` decodes: ``train_images``,
``train_labels``, ``test_images``, ``test_labels``, ``classes``, ``mean`` and ``std``, plus
the ``signature``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from lrlab.errors import WriteError
from lrlab.io import atomic_path

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


_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "classes", "mean", "std")


def read_cache(cache: Path, layout: str, root: Path, signature: str) -> dict[str, np.ndarray] | None:
    """The cached arrays for this source, or None if absent, stale or unreadable."""
    path = _cache_file(cache, layout, root)
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["signature"]) != signature:
                return None
            arrays = {k: z[k] for k in _CACHE_KEYS}
    except Exception:  # noqa: BLE001 - a missing or corrupt cache is simply rebuilt
        return None
    ok = (arrays["train_images"].dtype == np.uint8 and arrays["train_images"].ndim == 4
          and arrays["test_images"].dtype == np.uint8 and arrays["test_images"].ndim == 4
          and arrays["train_labels"].dtype == np.int64 and arrays["test_labels"].dtype == np.int64
          and len(arrays["train_labels"]) == len(arrays["train_images"])
          and len(arrays["test_labels"]) == len(arrays["test_images"]))
    return arrays if ok else None


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
