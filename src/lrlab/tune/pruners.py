"""``tune.pruner``: the names and the Optuna pruner each builds. Pruning reads the validation
accuracy each trial reports after every epoch (``trial.report(val_acc, epoch)``)."""

from __future__ import annotations

from lrlab.registry import Registry

PRUNERS = Registry("pruner", "tune.pruner")


@PRUNERS.register("median")
def _median():
    """Stop a trial whose accuracy at an epoch is below the median of the earlier trials' at that
    epoch (Optuna's MedianPruner; Golovin et al. 2017, Google Vizier's median stopping rule),
    once 5 trials have finished."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)


@PRUNERS.register("successive_halving")
def _successive_halving():
    """Asynchronous successive halving (Li et al. 2020, arXiv:1810.05934; Optuna's
    SuccessiveHalvingPruner): at epochs 1, 4, 16, ... keep the top quarter of the trials that
    reached that epoch."""
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=4)


@PRUNERS.register("none")
def _none():
    """No pruning: every trial trains all its epochs."""
    import optuna

    return optuna.pruners.NopPruner()


def build_pruner(name: str):
    """The Optuna pruner of ``tune.pruner`` ``name`` (an unknown name raises LrlabError)."""
    return PRUNERS.get(name)()
