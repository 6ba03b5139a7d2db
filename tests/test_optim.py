"""Optimizers by name, weight-decay groups, gradient noise (issue 4)."""

import pytest
import torch

from lrlab.config import TrainConfig, load_config
from lrlab.errors import LrlabError
from lrlab.optim import OPTIMIZERS, GradientNoise, build_optimizer, param_groups


class Quadratic(torch.nn.Module):
    """f(W, b) = 0.5 sum(c * W^2) + 0.5 sum(b^2), convex, minimum 0 at the origin."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        self.register_buffer("c", torch.linspace(0.5, 2.0, 16, dtype=torch.float64).view(4, 4))

    def forward(self):
        return 0.5 * (self.c * self.weight ** 2).sum() + 0.5 * (self.bias ** 2).sum()


# muon needs hidden layers (a one-matrix model has none): tests/test_muon.py trains a real network
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "muon"])
def test_each_optimizer_lowers_a_convex_loss(name):
    model = Quadratic()
    opt = build_optimizer(TrainConfig(optimizer=name, weight_decay=1e-4), model, lr=0.1)
    losses = []
    for _ in range(5):
        loss = model()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses.append(model().item())
    assert losses[1] < losses[0], name  # the first step already lowers the loss
    assert losses[-1] < losses[0], name


def test_names_map_to_the_torch_optimizers():
    model = Quadratic()
    kinds = {name: type(build_optimizer(TrainConfig(optimizer=name), model, 0.1)).__name__
             for name in OPTIMIZERS if name != "muon"}  # muon: tests/test_muon.py
    assert kinds == {"sgd": "SGD", "nesterov": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
                     "adagrad": "Adagrad", "adadelta": "Adadelta", "schedulefree_sgd": "SGDScheduleFree",
                     "schedulefree_adamw": "AdamWScheduleFree", "prodigy": "Prodigy", "dadapt_sgd": "DAdaptSGD",
                     "dadapt_adam": "DAdaptAdam", "dog": "DoG"}
    plain = build_optimizer(TrainConfig(optimizer="sgd", momentum=0.0, nesterov=True), model, 0.1)
    assert plain.defaults["momentum"] == 0 and not plain.defaults["nesterov"]  # momentum 0 = plain SGD
    nest = build_optimizer(TrainConfig(optimizer="nesterov", momentum=0.8, nesterov=False), model, 0.1)
    assert nest.defaults["nesterov"] and nest.defaults["momentum"] == 0.8
    adam = build_optimizer(TrainConfig(optimizer="adam", betas=(0.8, 0.99), eps=1e-6), model, 0.1)
    assert adam.defaults["betas"] == (0.8, 0.99) and adam.defaults["eps"] == 1e-6


def test_weight_decay_on_norm_and_bias_is_optional():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    (only,) = param_groups(model, 1e-3, decay_norm_and_bias=True)
    assert only["weight_decay"] == 1e-3 and len(only["params"]) == 4
    decayed, plain = param_groups(model, 1e-3)
    assert len(decayed["params"]) == 1 and len(plain["params"]) == 3 and plain["weight_decay"] == 0
    opt = build_optimizer(TrainConfig(optimizer="adamw", decay_norm_and_bias=True, weight_decay=0.01), model, 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01]


def test_gradient_noise_variance_follows_the_formula_and_decays():
    eta, gamma = 0.3, 0.55
    noise = GradientNoise(eta, gamma, seed=1)
    p = torch.nn.Parameter(torch.zeros(200_000))
    variances = {}
    for t in (0, 1, 9, 100):
        noise.t = t  # the step counter; add_ counts it on
        p.grad = torch.zeros_like(p)
        noise.add_([p])
        assert noise.t == t + 1
        variances[t] = p.grad.var().item()
        assert abs(p.grad.mean().item()) < 5 * (noise.variance(t) / 200_000) ** 0.5
    for t, v in variances.items():
        assert v == pytest.approx(eta / (1 + t) ** gamma, rel=0.02), t
    assert variances[0] > variances[1] > variances[9] > variances[100]


def test_gradient_noise_runs_before_each_optimizer_step():
    p = torch.nn.Parameter(torch.zeros(50_000))
    opt = torch.optim.SGD([p], lr=1.0)
    noise = GradientNoise(eta=1.0, gamma=0.55, seed=0)
    handle = noise.attach(opt)
    p.grad = torch.zeros_like(p)
    opt.step()  # p = -noise, noise of variance 1 at t = 0
    assert noise.t == 1 and p.detach().var().item() == pytest.approx(1.0, rel=0.03)
    handle.remove()
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    opt.step()
    assert noise.t == 1 and torch.equal(p.detach(), before)  # zero gradient, no noise: unchanged


def test_bad_optimizer_input_is_one_line():
    with pytest.raises(LrlabError) as e:
        load_config(None, ["train.optimizer=lamb"])
    msg = str(e.value)
    assert "train.optimizer" in msg and "\n" not in msg
    assert f"'lamb' is not a valid optimizer; valid: {', '.join(OPTIMIZERS)}" in msg
    with pytest.raises(LrlabError) as e:
        load_config(None, ["train.momentum=-0.9"])
    assert str(e.value) == ("config: invalid value for 'train.momentum' (-0.9): "
                            "Input should be greater than or equal to 0")
    with pytest.raises(LrlabError, match="'nesterov' needs train.momentum > 0"):
        build_optimizer(TrainConfig(optimizer="nesterov", momentum=0.0), Quadratic(), 0.1)
    with pytest.raises(LrlabError, match=r"betas \[0.9, 1.0\] must both be in \[0, 1\)"):
        load_config(None, ["train.betas=[0.9, 1.0]"])
