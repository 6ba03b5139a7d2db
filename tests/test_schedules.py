import pytest
import torch

from lrlab.config import TrainConfig
from lrlab.optim import build_optimizer
from lrlab.schedules import OneCycle, Plateau


def _optimizer():
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0, momentum=0.9)


def test_one_cycle_is_linear_up_to_max_lr_then_down():
    opt = _optimizer()
    sched = OneCycle(opt, max_lr=0.4, total_steps=101, warmup_pct=0.25, div=10, final_div=1000)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(100):
        sched.step_batch()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.04)
    assert max(lrs) == pytest.approx(0.4) and lrs.index(max(lrs)) == 25
    assert lrs[-1] == pytest.approx(0.4 / 1000)
    up = torch.diff(torch.tensor(lrs[:26], dtype=torch.float64))
    down = torch.diff(torch.tensor(lrs[25:], dtype=torch.float64))
    assert torch.allclose(up, up[0]) and torch.allclose(down, down[0]) and down[0] < 0


def test_plateau_cuts_after_patience_plus_one_flat_epochs():
    opt = _optimizer()
    sched = Plateau(opt, lr=0.1, factor=0.1, patience=2)
    lrs = []
    for loss in [1.0, 0.9, 0.9, 0.9, 0.9, 0.9]:
        sched.step_epoch(loss)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(TrainConfig(weight_decay=5e-4, nesterov=True), model, lr=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4 and [p.ndim for p in decayed["params"]] == [4]
    assert plain["weight_decay"] == 0 and len(plain["params"]) == 3
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
