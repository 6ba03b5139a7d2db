"""Image files to uint8 RGB pixels: modes, EXIF orientation, the stored square, parallel decoding.

One owner for "how a file becomes RGB pixels", used by both ImageFolder paths of
:mod:`lrlab.data.sources`:

* :func:`read_rgb`: any Pillow-readable file to an RGB ``PIL.Image``: EXIF orientation applied
  (``PIL.ImageOps.exif_transpose``), then the mode converted by :func:`to_rgb`;
* :func:`decode_stored`: a photo to its stored uint8 square (see :func:`stored_side`), optionally
  centre-cropped further;
* :func:`decode_into_files`: many photos, in worker processes, each writing its rows straight into
  the memory-mapped ``.npy`` files of the cache (:mod:`lrlab.data.cache`).

Mode conversions (:func:`to_rgb`):

* RGB: as is; L (grayscale) and 1 (bilevel): the gray value in R, G and B;
* RGBA, LA, PA, P with a transparent colour, RGB/L with a ``transparency`` entry: alpha-composited
  over a WHITE background (transparent pixels become white: a transparent-background product photo
  or logo then shows on white, as in a browser, instead of on whatever colour the transparent
  pixels happen to store, often black);
* 16-bit grayscale (I;16, I;16B, I;16L and 32-bit I holding 16-bit PNG values): rescaled to 8 bit
  as ``round(v * 255 / 65535) = round(v / 257)`` (values clipped to 0..65535);
* CMYK (also Adobe's inverted CMYK JPEGs, which Pillow un-inverts on load), YCbCr, P without
  transparency and any other mode Pillow can convert: ``Image.convert("RGB")``.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

import numpy as np

from lrlab.errors import LrlabError

EVAL_CROP_FRACTION = 0.875  # evaluation's centre crop covers 87.5% of the resized shorter side
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def stored_side(image_size: int) -> int:
    """Side S in pixels of the stored square for training images of ``image_size``:
    ``round(image_size / 0.875)`` (e.g. 256 for 224, 73 for 64).

    Every photo is resized so that its shorter side is S and centre-cropped to S x S. Evaluation's
    standard "resize the shorter side to size / 0.875, centre-crop size" (the ImageNet protocol of
    Krizhevsky et al. 2012 and torchvision's reference scripts) is then an exact centre crop of the
    stored square, and training's RandomResizedCrop samples its boxes from the stored square (the
    photo's centre square: the strips beyond it on the longer side are never seen).
    """
    return int(round(image_size / EVAL_CROP_FRACTION))


def to_rgb(im):
    """An RGB ``PIL.Image`` of ``im`` (any mode), converted as the module docstring lists."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT:
        v = np.asarray(im).astype(np.float64)
        gray = np.rint(np.clip(v, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if "A" in mode or "a" in mode or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def read_rgb(path: str, draft: tuple[int, int] | None = None):
    """Decode one image file to an RGB ``PIL.Image``, upright (EXIF orientation applied).

    Args:
        path: the image file.
        draft: (w, h) lower bound for JPEG's DCT-domain downscaling (``Image.draft``: decode at
            1/2, 1/4 or 1/8 scale while both sides stay >= the bound; much faster for large
            photos); None decodes at full size.

    Raises:
        LrlabError: the file is truncated, is not an image Pillow can read, or cannot be converted.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            if draft is not None:
                im.draft(None, draft)
            im.load()
            if "exif" in im.info:  # cheap test first: most small images carry no EXIF
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise LrlabError(f"file {path!r} is not a readable image ({reason}); replace or remove it") from None


def decode_stored(path: str, side: int, crop: int | None = None) -> np.ndarray:
    """A photo as its stored square: uint8 (S, S, 3) RGB, or (crop, crop, 3) centre-cropped.

    Shorter side resized to S = ``side`` and centre-cropped to S x S (``PIL.ImageOps.fit``, bilinear
    with Pillow's antialiasing; crop box and resize in one step); then, when ``crop`` < S, the centre
    ``crop`` x ``crop`` of it (torchvision ``center_crop``, the same crop the evaluation loader takes).

    Raises:
        LrlabError: as :func:`read_rgb`.
    """
    from PIL import Image, ImageOps

    im = ImageOps.fit(read_rgb(path, draft=(side, side)), (side, side), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    if crop is not None and crop < side:
        import torch
        from torchvision.transforms.v2 import functional as F

        a = F.center_crop(torch.from_numpy(a.copy()).permute(2, 0, 1), [crop]).permute(1, 2, 0).numpy()
    return a


def _decode_chunk(file: str, start: int, paths: list[str], side: int, crop: int | None) -> None:
    """Worker: decode ``paths`` into rows start.. of the ``.npy`` file ``file`` (opened r+)."""
    out = np.load(file, mmap_mode="r+")
    for i, p in enumerate(paths):
        out[start + i] = decode_stored(p, side, crop)
    out.flush()
    del out


def decode_into_files(jobs: list[tuple[str, list[str], int | None]], side: int,
                      workers: int | None = None) -> None:
    """Decode photos into existing uint8 (N, s, s, 3) ``.npy`` files, in parallel processes.

    Args:
        jobs: per file, (path of the ``.npy`` file, the N image paths of its rows in order, crop
            side s or None for s = ``side``).
        side: stored side S (:func:`stored_side`).
        workers: processes (default ``os.cpu_count()``); 1, or a single chunk of work, decodes in
            this process. Work goes out in chunks of up to 64 images, about 4 chunks per worker;
            each worker opens the file as a read-write memmap and writes its rows (no pixels pass
            through pipes). Workers are forked where the platform allows (as torch's DataLoader
            does on Linux), so they start in milliseconds.

    Raises:
        LrlabError: the first file that cannot be decoded (the remaining chunks are cancelled).
    """
    workers = max(1, int(workers or os.cpu_count() or 1))
    total = sum(len(paths) for _, paths, _ in jobs)
    step = max(1, min(64, -(-total // (4 * workers))))
    chunks = [(str(f), s, paths[s:s + step], side, crop)
              for f, paths, crop in jobs for s in range(0, len(paths), step)]
    if workers == 1 or len(chunks) <= 1:
        for chunk in chunks:
            _decode_chunk(*chunk)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
        futures = [pool.submit(_decode_chunk, *chunk) for chunk in chunks]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()
            raise failed[0].exception()

