"""What a trained classifier predicts: probabilities, the mistakes, confusion.

Everything here takes an ``nn.Module`` and tensors and gives back tensors (or plain dicts);
drawing them is ``lrlab.plots``'s job; the class activation maps of the mistakes are
``lrlab.interpret.cam``'s.

Example::

    compute = Compute.choose()                               # or the run's device and precision
    pred = predict(model, test_loader, compute)
    wrong = select_misclassified(pred, k=25)                 # highest-loss mistakes first
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lrlab.compute import Compute
from lrlab.errors import LrlabError
from lrlab.io import atomic_path
from lrlab.registry import Registry
from lrlab.tta import TTA

__all__ = [
    "SELECT_BY",
    "Predictions",
    "confusion_matrix",
    "per_class_summary",
    "predict",
    "select_misclassified",
]


# --------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """The model's class probabilities for every image of a dataset, in dataset order.

    Attributes:
        probs: (N, K) float32 softmax probabilities on the CPU.
        targets: (N,) int64 true class indices on the CPU.
    """

    probs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        self.probs = torch.as_tensor(self.probs).detach().to("cpu", torch.float32)
        self.targets = torch.as_tensor(self.targets).detach().to("cpu", torch.int64)
        if self.probs.ndim != 2 or self.targets.ndim != 1 or len(self.probs) != len(self.targets):
            raise ValueError(
                f"Predictions needs probs (N, K) and targets (N,), got {tuple(self.probs.shape)} "
                f"and {tuple(self.targets.shape)}"
            )

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return self.probs.shape[1]

    @property
    def preds(self) -> torch.Tensor:
        """(N,) int64 predicted class (top-1, the argmax of ``probs``)."""
        return self.probs.argmax(dim=1)

    @property
    def confidence(self) -> torch.Tensor:
        """(N,) float32 probability of the predicted class."""
        return self.probs.max(dim=1).values

    @property
    def losses(self) -> torch.Tensor:
        """(N,) float32 per-image cross-entropy, ``-log p[target]`` (finite: p is clamped at 1e-38)."""
        p_true = self.probs.gather(1, self.targets.view(-1, 1)).squeeze(1)
        return -torch.log(p_true.clamp_min(torch.finfo(torch.float32).tiny))

    @property
    def correct(self) -> torch.Tensor:
        """(N,) bool, True where the top-1 prediction equals the target."""
        return self.preds == self.targets

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy as a fraction in [0, 1] (NaN for an empty set)."""
        if len(self) == 0:
            return float("nan")
        return self.correct.float().mean().item()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``probs`` and ``targets`` to ``path`` atomically (tmp file + rename); return the Path."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save({"probs": self.probs, "targets": self.targets}, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Predictions:
        """Read what :meth:`save` wrote.

        Raises:
            LrlabError: when the file is missing or does not hold saved predictions.
        """
        path = Path(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(probs=data["probs"], targets=data["targets"])
        except FileNotFoundError:
            raise LrlabError(f"predictions file {str(path)!r} does not exist") from None
        except (KeyError, TypeError, RuntimeError, ValueError, EOFError) as exc:
            raise LrlabError(
                f"predictions file {str(path)!r} is not a saved Predictions (needs keys probs, targets): {exc}"
            ) from None


def predict(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    compute: Compute,
    *,
    tta: TTA | None = None,
) -> Predictions:
    """Softmax probabilities of ``model`` on every batch of ``loader``, in loader order.

    Args:
        model: a classifier returning (B, K) logits, on ``compute.device``; put in eval mode for
            the call, and every submodule's train/eval flag is restored afterwards.
        loader: yields ``(x, y)``: x (B, 3, H, W) float, normalised; y (B,) int64 class indices.
            It must not shuffle if the indices are to match the dataset.
        compute: device, autocast dtype (e.g. torch.bfloat16; None for float32) and memory
            layout of the forward passes (:meth:`lrlab.compute.Compute.forward_batches`).
            Probabilities are always computed and returned in float32.
        tta: test-time augmentation (None: none): the probabilities are the mean of the softmax
            over the image and its horizontal mirror image (with ``tta.shift`` s > 0 also both
            translated by +-s pixels; :func:`lrlab.tta.tta_probs`), as ``lrlab.engine.evaluate``
            does, so the accuracy matches the final one recorded during training with ``train.tta``.

    Returns:
        Predictions with probs (N, K) float32 and targets (N,) int64, both on the CPU.

    Raises:
        ValueError: when the loader yields no batches.
    """
    probs, targets = [], []
    for p, y in compute.forward_batches(model, loader, _probabilities(tta)):
        probs.append(p.cpu())
        targets.append(y.to("cpu", torch.int64))
    if not probs:
        raise ValueError("predict() got a loader that yielded no batches")
    return Predictions(probs=torch.cat(probs), targets=torch.cat(targets))


def _probabilities(tta: TTA | None) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``forward(model, x) -> (B, K)`` float32 class probabilities, with or without TTA."""
    if tta is not None:
        return tta.probs
    return lambda model, x: torch.softmax(model(x).float(), dim=1)


# --------------------------------------------------------------------------- the mistakes


SELECT_BY: Registry[Callable[[Predictions], torch.Tensor]] = Registry("mistake order", "explain.select")
"""Orders of :func:`select_misclassified`: name -> key function ``key(pred) -> (N,)`` tensor; the
mistakes with the highest key come first, ties in dataset order."""


@SELECT_BY.register("loss")
def _by_loss(pred: Predictions) -> torch.Tensor:
    """Highest cross-entropy first, i.e. least probability on the true class."""
    return pred.losses


@SELECT_BY.register("confidence")
def _by_confidence(pred: Predictions) -> torch.Tensor:
    """Highest probability on the (wrong) predicted class first."""
    return pred.confidence


@SELECT_BY.register("first")
def _by_position(pred: Predictions) -> torch.Tensor:
    """Dataset order: every key is equal, so the stable sort keeps the order."""
    return torch.zeros(len(pred))


def select_misclassified(pred: Predictions, k: int = 25, by: str = "loss") -> torch.Tensor:
    """Dataset indices of up to ``k`` wrongly classified images.

    Args:
        pred: predictions from :func:`predict`.
        k: how many to return; when fewer than k are wrong, all wrong ones are returned.
        by: a name in :data:`SELECT_BY`: "loss" (highest cross-entropy first, i.e. least
            probability on the true class), "confidence" (highest probability on the wrong
            predicted class first) or "first" (dataset order).

    Returns:
        (min(k, n_wrong),) int64 indices into the dataset.

    Raises:
        LrlabError: for an unknown ``by`` (the message lists the valid orders) or a negative ``k``.
    """
    key = SELECT_BY.get(by)
    if k < 0:
        raise LrlabError(f"number of misclassified images k={k} must be >= 0")
    wrong = torch.nonzero(~pred.correct, as_tuple=False).flatten()
    # Stable sort so that ties keep dataset order (reproducible grids).
    order = torch.sort(key(pred)[wrong], descending=True, stable=True).indices
    return wrong[order[:k]]


# --------------------------------------------------------------------------- confusion


def confusion_matrix(pred: Predictions, num_classes: int | None = None) -> torch.Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class.

    The matrix sums to ``len(pred)`` and its trace is the number of correct predictions.
    """
    k = num_classes or pred.num_classes
    flat = pred.targets * k + pred.preds
    return torch.bincount(flat, minlength=k * k).reshape(k, k)


def per_class_summary(pred: Predictions, classes: Sequence[str], top_pairs: int = 10) -> dict:
    """Confusion matrix (counts and row-normalised), per-class accuracy and the most-confused pairs.

    Args:
        pred: predictions from :func:`predict`.
        classes: K class names, ``classes[i]`` for label i.
        top_pairs: how many (true, predicted) pairs to list, most frequent first.

    Returns:
        A JSON-ready dict (written as ``per_class.json`` in a run folder):
        ``num_images`` (int), ``accuracy`` (top-1, fraction), ``classes`` (K names),
        ``confusion`` (K x K int counts, row = true class, column = predicted),
        ``confusion_normalized`` (K x K fractions of each true class; a row without images is 0),
        ``per_class``: one dict per class with ``class``, ``images``, ``correct``, ``accuracy``
        (recall; NaN-free: null when the class has no images) and ``predicted`` (how often it was
        predicted), and ``most_confused``: up to ``top_pairs`` dicts ``{true, pred, count,
        fraction}`` (fraction of the true class's images), sorted by count, then by fraction;
        only pairs that occurred.

    Raises:
        LrlabError: when ``len(classes)`` differs from the number of classes K in ``pred``.
    """
    k = pred.num_classes
    if len(classes) != k:
        raise LrlabError(f"per-class summary got {len(classes)} class names for {k} classes; give one name per class")
    m = confusion_matrix(pred, k)
    rows = m.sum(1)
    frac = torch.where(rows[:, None] > 0, m.double() / rows.clamp_min(1)[:, None].double(), torch.zeros_like(m, dtype=torch.float64))
    per_class = [
        {"class": name, "images": int(rows[i]), "correct": int(m[i, i]),
         "accuracy": float(frac[i, i]) if rows[i] > 0 else None, "predicted": int(m[:, i].sum())}
        for i, name in enumerate(classes)
    ]
    pairs = [(int(m[t, p]), float(frac[t, p]), t, p) for t in range(k) for p in range(k) if t != p and m[t, p] > 0]
    pairs.sort(key=lambda q: (-q[0], -q[1], q[2], q[3]))
    return {
        "num_images": len(pred),
        "accuracy": pred.accuracy,
        "classes": list(classes),
        "confusion": m.tolist(),
        "confusion_normalized": [[round(v, 6) for v in row] for row in frac.tolist()],
        "per_class": per_class,
        "most_confused": [{"true": classes[t], "pred": classes[p], "count": c, "fraction": round(f, 6)}
                          for c, f, t, p in pairs[:top_pairs]],
    }
