"""Use a trained run on new images: ``lrlab predict`` (top-k classes) and ``lrlab export``
(a ``torch.export`` program + class names + preprocessing, loadable with plain torch).

A run's :class:`Preprocessing` is resolved once, when the run starts, from its data and model
(class names, the normalisation the model was trained with, the evaluation resize and centre
crop) and saved in the run folder, so both commands treat a new image exactly as the run's own
evaluation treated its test images.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lrlab.compute import Compute
from lrlab.config import Config
from lrlab.data import BatchLoader, Split
from lrlab.data.decode import decode_stored, stored_side
from lrlab.data.sources import IMAGE_EXTENSIONS
from lrlab.errors import LrlabError
from lrlab.interpret import predict
from lrlab.models import build
from lrlab.run_folder import RunFolder
from lrlab.tta import TTA


@dataclass(frozen=True)
class Preprocessing:
    """How a run turns an image file into the model's input.

    Attributes:
        classes: class names; logit i is ``classes[i]``.
        resize: length in pixels the shorter side is resized to (bilinear, antialiased).
        crop: side in pixels of the centre crop taken next (the model's input is crop x crop).
        mean: per-channel (R, G, B) mean subtracted from pixels in [0, 1].
        std: per-channel (R, G, B) standard deviation the pixels are divided by.
    """

    classes: list[str]
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The inverse of :meth:`to_dict`.

        Raises:
            LrlabError: a field is missing.
        """
        try:
            return cls(list(d["classes"]), int(d["resize"]), int(d["crop"]), tuple(d["mean"]), tuple(d["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise LrlabError(f"preprocessing record is incomplete ({e!r}); re-run the training") from None

    @classmethod
    def of(cls, classes: list[str], image_size: int | None, train_shape: tuple[int, ...], mean, std) -> Preprocessing:
        """A run's preprocessing: with ``data.image_size`` the photo policy (shorter side to
        ``round(image_size / 0.875)``, centre crop image_size); without, the training images' own
        side (CIFAR's 32: a 32 x 32 image is used as it is).

        Args:
            train_shape: shape of the training split's uint8 images, (N, H, W, 3).
        """
        side = int(train_shape[1])
        resize, crop = (stored_side(image_size), image_size) if image_size else (side, side)
        return cls(list(classes), resize, crop, tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def pixels(self, path: Path) -> torch.Tensor:
        """One image file as the run's evaluation sees it (:func:`lrlab.data.decode.decode_stored`,
        the same decoder that filled the run's cache): uint8 tensor (crop, crop, 3) RGB.

        Raises:
            LrlabError: the file is not a readable image.
        """
        return torch.from_numpy(decode_stored(str(path), self.resize, self.crop).copy())


class Exported(nn.Module):
    """A model plus its normalisation, for the exported file: float32 input (N, 3, crop, crop) with
    pixels in [0, 1] (resized and centre-cropped as the saved preprocessing says), logits (N, C) out."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def top_k(probs: torch.Tensor, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """The k most probable classes of each row.

    Args:
        probs: float tensor (N, C) of class probabilities.
        classes: C class names.
        k: how many classes per row (clipped to C).

    Returns:
        N lists of (class name, probability in [0, 1]) pairs, most probable first.
    """
    p, i = probs.float().topk(min(k, probs.shape[1]), dim=1)
    return [[(classes[c], float(q)) for q, c in zip(pr.tolist(), ir.tolist())] for pr, ir in zip(p, i)]


def image_files(paths: list[Path]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders searched recursively for files
    with an image extension (:data:`lrlab.data.sources.IMAGE_EXTENSIONS`, any case), sorted.

    Raises:
        LrlabError: a path does not exist, or nothing to predict was found.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            found.append(p)
        else:
            raise LrlabError(f"{p} does not exist; give image files or folders of images")
    if not found:
        raise LrlabError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, paths))}")
    return found


def predictions_csv(files: list[Path], rows: list[list[tuple[str, float]]]) -> str:
    """CSV text: a header ``file,class_1,prob_1,...,class_k,prob_k`` and one row per file."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    k = max(len(r) for r in rows)
    writer.writerow(["file"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "prob")])
    for f, row in zip(files, rows):
        writer.writerow([str(f)] + [v for c, p in row for v in (c, f"{p:.6f}")])
    return out.getvalue()


@dataclass
class Trained:
    """A run's best checkpoint, ready to use: the run's config, where to compute (the recipe's
    device and precision), the model in eval mode, the preprocessing."""

    config: Config
    compute: Compute
    model: nn.Module
    preprocessing: Preprocessing


def load_trained(run: RunFolder, device: str | None = None) -> Trained:
    """The model of ``run``'s best checkpoint (``checkpoints/best.pt``, the best validation epoch:
    the model the run's own predictions and report use).

    Args:
        device: overrides the recipe's ``compute.device`` (e.g. "cpu"); precision then follows
            ``compute.precision`` for that device.

    Raises:
        LrlabError: no config, preprocessing or best checkpoint, or a checkpoint that does not
            fit the recipe's model.
    """
    config = run.load_config()
    prep = run.load_preprocessing()
    compute = Compute.choose(device or config.compute.device, config.compute.precision)
    state = run.load_checkpoint("best_checkpoint", compute.device)
    model = build(config.model.name, len(prep.classes), None, **config.model.kwargs)  # weights: the checkpoint
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise LrlabError(f"{run.file('best_checkpoint')} does not fit model {config.model.name} ({first})") from None
    return Trained(config, compute, compute.prepare(model).eval(), prep)


def predict_images(trained: Trained, files: list[Path], chunk: int = 256) -> torch.Tensor:
    """Class probabilities of image files, computed as the run computed its test predictions
    (same decoder, normalisation, device, autocast precision and test-time augmentation).

    Returns:
        float32 tensor (len(files), C) on the CPU, softmax probabilities.

    Raises:
        LrlabError: a file is not a readable image (the message names it).
    """
    t, prep = trained.config.train, trained.preprocessing
    out = []
    for start in range(0, len(files), chunk):
        images = torch.stack([prep.pixels(f) for f in files[start:start + chunk]])
        split = Split(images, torch.zeros(len(images), dtype=torch.int64))
        loader = BatchLoader(split, chunk, mean=prep.mean, std=prep.std, shuffle=False, device=trained.compute.device,
                             channels_last=trained.compute.channels_last, image_size=trained.config.data.image_size)
        out.append(predict(trained.model, loader, trained.compute, tta=TTA.of(t)).probs)
    return torch.cat(out)


def export_program(trained: Trained) -> torch.export.ExportedProgram:
    """The model with its normalisation (:class:`Exported`) as a ``torch.export`` program in
    float32 on the CPU, with a dynamic batch size: input float32 (N, 3, crop, crop) RGB in
    [0, 1], output logits (N, C). Load it with ``torch.export.load(path).module()``.

    Raises:
        LrlabError: the model cannot be exported (the message gives torch's reason).
    """
    model = Exported(trained.model.float().to("cpu", memory_format=torch.contiguous_format), trained.preprocessing.mean,
                     trained.preprocessing.std).eval()
    crop = trained.preprocessing.crop
    example = torch.rand(2, 3, crop, crop)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds; all mean "not exportable"
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise LrlabError(f"model {trained.config.model.name} cannot be exported with torch.export ({first})") from None


def export_info(trained: Trained) -> dict:
    """The JSON description saved next to the exported program: classes and preprocessing, and
    how to feed it without lrlab."""
    p = trained.preprocessing
    return {"format": "torch.export program (torch.export.load(path).module())", "model": trained.config.model.name,
            "input": f"float32 (N, 3, {p.crop}, {p.crop}) RGB in [0, 1]: shorter side resized to {p.resize} "
                     f"(bilinear, antialiased), centre crop {p.crop}; the program normalises with mean/std itself",
            "output": f"logits (N, {len(p.classes)}); softmax for probabilities of classes[i]",
            "torch": torch.__version__, **p.to_dict()}
