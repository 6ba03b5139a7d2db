"""Plateau detection on synthetic series, the plateau_detect policy and the shaded figure (issue 4)."""

import numpy as np
import pytest
import torch

from lrlab.errors import LrlabError
from lrlab.plateau import find_plateaus
from lrlab.schedules import PlateauDetect


def planted(noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """fall 1.0 -> 0.55 (0..9), flat 0.5 (10..19), fall to 0.23 (20..29), flat 0.2 (30..41), fall."""
    rng = np.random.default_rng(seed)
    parts = [np.linspace(1.0, 0.55, 10), np.full(10, 0.5), np.linspace(0.47, 0.23, 10), np.full(12, 0.2),
             np.linspace(0.18, 0.08, 8)]
    values = np.concatenate(parts)
    values[10:20] += noise * rng.uniform(-1, 1, 10)
    values[30:42] += noise * rng.uniform(-1, 1, 12)
    return values, [(10, 19), (30, 41)]


def test_finds_the_planted_plateaus_exactly():
    values, spans = planted()
    assert find_plateaus(values.tolist(), window=3, rel_threshold=0.01) == spans


@pytest.mark.parametrize("seed", range(5))
def test_finds_noisy_plateaus(seed):
    values, spans = planted(noise=0.001, seed=seed)
    found = find_plateaus(values.tolist(), window=3, rel_threshold=0.01)
    assert len(found) == 2
    for (s, e), (ps, pe) in zip(found, spans):
        assert ps <= s <= ps + 3 and e == pe  # starts at the best point of the flat stretch


def test_none_in_steadily_falling_series():
    for series in (0.97 ** np.arange(60), np.linspace(2.0, 0.5, 60), 1 / (1 + np.arange(60))):
        assert find_plateaus(series.tolist(), window=3, rel_threshold=0.01) == []


def test_accuracy_mode_and_nan():
    acc = [0.3, 0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.8, 0.85]
    assert find_plateaus(acc, window=3, rel_threshold=0.01, mode="max") == [(3, 7)]
    assert find_plateaus([1.0, 0.5, float("nan"), float("nan"), float("nan"), 0.4], window=3) == [(1, 4)]
    assert find_plateaus([1.0, 0.9], window=3) == []


def test_bad_arguments_are_one_line_errors():
    for kwargs in ({"window": 0}, {"rel_threshold": -0.1}, {"mode": "up"}):
        with pytest.raises(LrlabError, match="window >= 1, rel_threshold >= 0 and mode 'min' or 'max'"):
            find_plateaus([1.0, 2.0], **kwargs)


def test_plateau_detect_policy_cuts_when_a_plateau_is_found():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    sched = PlateauDetect(opt, lr=0.1, window=3, rel_threshold=0.01, factor=0.5)
    values, _ = planted()
    lrs = []
    for v in values:
        sched.step_epoch(float(v))
        lrs.append(opt.param_groups[0]["lr"])
    # plateaus start at 10 and 30: found (and cut) window = 3 epochs later; the second
    # plateau is long enough (12 points) for one more cut 3 epochs after the first.
    assert sched.cuts == [13, 16, 19, 33, 36, 39]
    assert lrs[12] == 0.1 and lrs[13] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.1 * 0.5 ** 6)


def test_plateaus_are_shaded_on_the_curves(tmp_path):
    from lrlab import plots

    values, spans = planted()
    history = [{"epoch": i + 1, "train_loss": v * 0.9, "val_loss": v, "train_acc": 1 - v / 2, "val_acc": 1 - v / 2}
               for i, v in enumerate(values)]
    path = plots.plot_plateaus(history, spans, tmp_path / "plateaus.png")
    assert path.stat().st_size > 10_000
