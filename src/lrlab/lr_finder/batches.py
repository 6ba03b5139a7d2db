"""Turning whatever a loader yields into (inputs, targets), and cycling a loader."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from lrlab.errors import LrlabError

INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values", "data")
TARGET_KEYS = ("label", "labels", "target", "targets", "y")


def default_batch_fn(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) of one batch.

    Accepts an ``(x, y, ...)`` tuple or list (the first two entries are used) or a mapping with
    one of the keys ``INPUT_KEYS`` (image, images, input, inputs, x, pixel_values, data) and one
    of ``TARGET_KEYS`` (label, labels, target, targets, y); the first key present wins.

    Raises:
        LrlabError: any other layout; pass your own ``batch_fn(batch) -> (inputs, targets)``.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        x = next((k for k in INPUT_KEYS if k in batch), None)
        y = next((k for k in TARGET_KEYS if k in batch), None)
        if x is not None and y is not None:
            return batch[x], batch[y]
        raise LrlabError(f"batch dict has the keys {sorted(map(str, batch))}; it needs an input key "
                         f"({', '.join(INPUT_KEYS)}) and a target key ({', '.join(TARGET_KEYS)}), "
                         f"or pass batch_fn(batch) -> (inputs, targets)")
    raise LrlabError(f"loader yielded a {type(batch).__name__}; each batch must be an (x, y) tuple or list, "
                     f"a dict with input and target keys, or pass batch_fn(batch) -> (inputs, targets)")


def cycle(loader: Iterable) -> Iterator[Any]:
    """Yield batches forever, restarting ``loader`` whenever it is exhausted.

    Raises:
        LrlabError: the loader yields nothing, or it ran out and yields nothing when restarted
            (a one-shot iterator or generator).
    """
    served = 0
    while True:
        fresh = True
        for batch in loader:
            fresh = False
            served += 1
            yield batch
        if fresh:
            if served == 0:
                raise LrlabError("loader yielded no batches; the range test needs at least one batch")
            raise LrlabError(f"loader ran out after {served} batches and could not be restarted; "
                             f"pass a re-iterable loader such as a DataLoader or a list, or lower num_iter")
