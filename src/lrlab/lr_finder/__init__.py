"""The LR range test (Smith 2015, arXiv:1506.01186), its result and the suggestion methods.

    with LRRangeTest(model, optimizer) as finder:          # restores everything on exit
        result = finder.run(loader, loss_fn, start_lr=1e-5, end_lr=10, num_iter=100)  # repeats=3: spread
    result.suggestions["valley"].lr, result.max_lr, result.plot()

A standalone library: it depends on torch, numpy and the standard library, plus matplotlib
only when a figure is drawn (imported inside :func:`range_test_figure`), and on nothing of
lrlab but ``lrlab.errors.LrlabError``, the one exception type it raises. Application policy
(which method a recipe or optimizer should use, where files and figures go) stays with the
caller: ``method`` is a name from ``METHODS`` (default ``steepest``), never picked for you.

Modules, one job each:
    sweep     the lr sequence (exp / linear, one per parameter group)
    state     the bit-exact snapshot and restore of model, optimizer, scheduler, grads, modes
    batches   the batch adapter ((x, y) tuples/lists, dicts) and loader cycling
    finder    ``LRRangeTest`` (the loop: accumulation, autocast, validation loss, EMA stop rules)
              and the one-call ``range_test``
    suggest   the suggestion methods (steepest, valley, min10, descent, max_lr), each with a band,
              registered in ``METHODS`` (the one list of their names), and ``centered_smooth``,
              the zero-lag curve they read
    window    ``spike_cut`` (the analysed window ends at the first sustained rise after the descent)
              and ``analyse`` (every suggestion inside that window)
    repeats   ``mean_of_repeats``: k repeated sweeps -> one result (mean curve, sweeps kept)
    spread    ``Spread``: per method the geometric range / std of the repeats' suggestions, verdict
    result    ``RangeTestResult``: curve, stop, cut, suggestions, repeats, JSON round trip, ``plot()``
    plot      ``range_test_figure``: the loss against lr with every suggestion and band drawn

Sources: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", 2015,
arXiv:1506.01186, section 3.3; L. N. Smith, "A disciplined approach to neural network
hyper-parameters: Part 1", 2018, arXiv:1803.09820; the exponential sweep and the bias-corrected
EMA as popularised by fastai (S. Gugger, "How Do You Find A Good Learning Rate", 2017).

Differences from common implementations, on purpose: the state is restored automatically (also
on error); a non-finite loss stops the sweep and never reaches a suggestion; suggestions are
plain functions of the recorded curve (not hidden in a plot), read its zero-lag centered
smoothing rather than the lagging EMA, use the real log10(lr) spacing (right for linear sweeps
too) and come with a band of good lrs; the EMA (``smooth``) only drives the divergence check,
which starts after ``skip_start``, where the EMA is meaningful.
"""

from lrlab.lr_finder.batches import INPUT_KEYS, TARGET_KEYS, default_batch_fn
from lrlab.lr_finder.finder import LRRangeTest, range_test
from lrlab.lr_finder.plot import RANGE_TEST_COLORS, range_test_figure
from lrlab.lr_finder.repeats import mean_of_repeats
from lrlab.lr_finder.result import STOP_REASONS, RangeTestResult
from lrlab.lr_finder.spread import STABLE_RANGE, Spread, suggestion_spread
from lrlab.lr_finder.suggest import (METHODS, MIN_POINTS, Suggestion, centered_smooth, descent, max_lr, min10,
                                     steepest, suggest, suggest_all, valley)
from lrlab.lr_finder.sweep import MODES, group_schedules, lr_schedule
from lrlab.lr_finder.window import analyse, spike_cut

__all__ = ["INPUT_KEYS", "LRRangeTest", "METHODS", "MIN_POINTS", "MODES", "RANGE_TEST_COLORS", "RangeTestResult",
           "STABLE_RANGE", "STOP_REASONS", "Spread", "Suggestion", "TARGET_KEYS", "analyse", "centered_smooth",
           "default_batch_fn", "descent", "group_schedules", "lr_schedule", "max_lr", "mean_of_repeats", "min10",
           "range_test", "range_test_figure", "spike_cut", "steepest", "suggest", "suggest_all",
           "suggestion_spread", "valley"]
