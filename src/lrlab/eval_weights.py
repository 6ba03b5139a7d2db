"""The weights a run evaluates and saves, when they are not the ones its optimizer trains.

Two of the LR-free optimizers (:mod:`lrlab.optim`) train one sequence of weights and are meant
to be used at another:

* Schedule-Free SGD/AdamW (Defazio et al. 2024, "The Road Less Scheduled", arXiv:2405.15682;
  the ``schedulefree`` package) take gradients at y and are evaluated at the average x. Its
  README: call ``optimizer.train()`` before training steps and ``optimizer.eval()`` before
  evaluation and before saving a checkpoint; with BatchNorm, recompute the running statistics
  at x (model in training mode, ``optimizer.eval()``, forward ~50 training batches without
  gradients) before evaluating. :class:`ScheduleFreeWeights`.
* DoG (Ivgi et al. 2023, "DoG is SGD's Best Friend", arXiv:2302.12022; ``dog-optimizer``) is
  used "combined with iterate averaging": the package's ``PolynomialDecayAverager`` (Shamir &
  Zhang 2013, gamma 8) steps after every optimizer step and the averaged model is the one to
  evaluate. :class:`AveragedWeights`.

The training loop (:class:`lrlab.engine.Trainer`) calls :meth:`EvalWeights.use_train` before
training steps, :meth:`EvalWeights.after_step` after each optimizer step and
:meth:`EvalWeights.use_eval` before evaluating or saving. ``use_eval`` keeps an exact copy of
the trained state (parameters and buffers) and ``use_train`` puts that copy back, so switching
to the eval weights and back changes nothing in training (no rounding of schedule-free's
interpolation, no trace of the BatchNorm recomputation): a run that saved a checkpoint, or was
stopped and resumed, trains bit for bit as one that did not. A checkpoint's ``model`` is the
eval weights (what ``best.pt`` / ``last.pt`` are used for); :meth:`EvalWeights.state_dict` holds
the trained state and the averager's for resuming.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


class EvalWeights:
    """Evaluate and save the trained weights themselves (every optimizer but the two above).

    Args:
        optimizer: the run's optimizer.
        model: the network it trains (not a DistributedDataParallel wrapper).
    """

    refresh_batchnorm = False
    """True: the caller recomputes BatchNorm statistics at the eval weights after :meth:`use_eval`."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.optimizer, self.model = optimizer, model
        self.trained: dict[str, torch.Tensor] | None = None  # the trained state while the eval weights are in

    @property
    def differs(self) -> bool:
        """True when the eval weights are not the trained ones."""
        return type(self) is not EvalWeights

    def use_train(self) -> None:
        """Put the trained state back (exactly); subclasses also switch the optimizer's mode."""
        if self.trained is not None:
            self.model.load_state_dict(self.trained)
            self.trained = None

    def use_eval(self) -> None:
        """Keep a copy of the trained state, then put the eval weights into the model."""
        if self.differs and self.trained is None:
            self.trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self._to_eval()

    def _to_eval(self) -> None:
        """Put the eval weights into the model (the trained state is saved already)."""

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def state_dict(self) -> dict | None:
        """The trained state (taken in :meth:`use_eval`) and any averager's; None when the eval
        weights are the trained ones."""
        return {"trained": self.trained} if self.differs else None

    def load_state_dict(self, state: dict | None) -> None:
        """Continue from :meth:`state_dict` of a checkpoint whose model holds the eval weights."""
        if state is not None:
            self.trained = state["trained"]


class ScheduleFreeWeights(EvalWeights):
    """Schedule-Free SGD/AdamW: the optimizer's ``train()`` / ``eval()`` switch between y (trained)
    and x (evaluated); BatchNorm statistics are recomputed at x (:attr:`refresh_batchnorm`)."""

    refresh_batchnorm = True

    def use_train(self) -> None:
        self.optimizer.train()  # sets its mode; the parameters are then overwritten with the exact y
        super().use_train()

    def _to_eval(self) -> None:
        self.optimizer.eval()


class AveragedWeights(EvalWeights):
    """DoG with the package's ``PolynomialDecayAverager`` (default gamma 8): stepped after every
    optimizer step; its averaged model (parameters and BatchNorm buffers) is evaluated."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        super().__init__(optimizer, model)
        from dog import PolynomialDecayAverager

        self.averager = PolynomialDecayAverager(model)

    def after_step(self) -> None:
        self.averager.step()

    def _to_eval(self) -> None:
        self.model.load_state_dict(self.averager.averaged_model.state_dict())

    def state_dict(self) -> dict:
        return {"trained": self.trained, "averager": self.averager.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        super().load_state_dict(state)
        if state is not None:
            self.averager.load_state_dict(state["averager"])


def eval_weights(optimizer: torch.optim.Optimizer, model: nn.Module) -> EvalWeights:
    """The :class:`EvalWeights` of ``optimizer``: :class:`ScheduleFreeWeights` for an optimizer with
    schedule-free's ``train()``/``eval()`` protocol, :class:`AveragedWeights` for DoG (``dog.DoG``
    and ``dog.LDoG``), else :class:`EvalWeights` (the trained weights are the eval weights)."""
    if callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None)):
        return ScheduleFreeWeights(optimizer, model)
    dog = sys.modules.get("dog")  # imported by lrlab.optim's builder when DoG is used
    if dog is not None and isinstance(optimizer, dog.DoG):
        return AveragedWeights(optimizer, model)
    return EvalWeights(optimizer, model)
