"""``lrlab tune RECIPE``: an Optuna study over the search space of the recipe's ``tune`` section,
the learning rate first.

    storage.py   --storage URL -> an Optuna storage (RDB or journal file), heartbeats on both
    space.py     tune.space -> checked axes; a trial's values -> its Config
    slots.py     the study's budget in slots, stages and what a worker does next, from the study alone
    study.py     the worker: range test once, then trials (normal run folders) until the budget is met
    summary.py   the summary folder: trials table, best recipe, figures, tune.json
    pruners.py   tune.pruner names -> Optuna pruners

Nothing here is imported by ``lrlab.config`` but :mod:`lrlab.tune.pruners` (which imports no
Optuna until a pruner is built), so other commands do not load Optuna.
"""
