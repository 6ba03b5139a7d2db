"""Atomic file writes: write a temporary file beside the target, flush it to disk, then rename.

A run killed mid-write (even by SIGKILL or a power cut) never leaves a half-written file that a
later command trusts: the target is either the old complete file or the new complete one. A
write that fails (full disk, file-size limit, unwritable folder) raises
:class:`lrlab.errors.WriteError` naming the file, and leaves the old file as it was.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lrlab.errors import WriteError


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TEMPORARY_MARK = ".tmp"


def _temporary(path: Path) -> Path:
    # A fresh name rather than mkstemp, whose 0600 mode would survive the rename.
    return path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMPORARY_MARK}{path.suffix}"


def remove_temporaries(folder: str | Path) -> None:
    """Remove, under ``folder``, the temporary files of writes that a killed process never
    finished (no command reads them)."""
    for p in Path(folder).rglob(f".*{TEMPORARY_MARK}*"):
        p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path (same folder and suffix) for the caller to write; on success it is
    fsynced and renamed to ``path`` (and the folder fsynced), on any error removed.

    Raises:
        WriteError: an OSError while writing or renaming (ENOSPC, EFBIG, EACCES, EROFS, ...).
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {path} ({e.strerror or e}); the files written before it are intact") from None
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (raises WriteError as :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (raises WriteError as :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def check_writable(folder: str | Path, what: str) -> None:
    """Check, before any work, that files can be written in ``folder`` (or, when it does not exist
    yet, in its nearest existing parent, where it would be created): a probe file is written and
    removed; nothing is left behind.

    Raises:
        WriteError: naming ``what`` (e.g. "output folder") and the reason.
    """
    folder = Path(folder)
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    probe = existing / f".lrlab-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise WriteError(f"{what} {folder} is not writable ({e.strerror or e}); choose a folder you can write to") from None
