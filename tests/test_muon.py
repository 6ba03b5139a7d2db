"""train.optimizer muon (issue 13): Muon for the hidden conv filters, Nesterov SGD or AdamW for the
rest, as one optimizer; its state dict, the range test's restore and `lrlab run`, on real CIFAR-10
images with lrlab's FastNet at width 0.25."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from timm.optim import Muon
from torch import nn

from conftest import REPO, load_images
from lrlab.cli import main
from lrlab.config import TrainConfig, load_config
from lrlab.errors import LrlabError
from lrlab.lr_finder import range_test
from lrlab.models import build
from lrlab.optim import MuonWithAux, build_optimizer, hidden_weights
from lrlab.schedules import OneCycle
from lrlab.transfer import freeze
from test_cli import write_recipe
from test_lr_finder import assert_restored, assert_same, snapshot

FILTERS = {f"block{b}.conv{c}.weight" for b in (1, 2, 3) for c in (1, 2)}  # FastNet's hidden weights


@pytest.fixture(scope="module")
def batches(cifar_dir):
    """Four batches of 50 real training images (20 per class, shuffled)."""
    x, y, _ = load_images(cifar_dir, "train", 20)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return [(x[i], y[i]) for i in order.split(50)]


def fastnet() -> nn.Module:
    torch.manual_seed(0)
    return build("fastnet", 10, width=0.25)  # no init_from_data: the stem conv trains too


def train_step(model, optimizer, batch) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    optimizer.step()
    return loss.item()


def names_of(model, optimizer, use_muon: bool) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in optimizer.param_groups if g["use_muon"] is use_muon for p in g["params"]}


def test_muon_orthogonalises_every_hidden_filter_and_sgd_steps_the_rest(batches):
    model, lr = fastnet(), 0.2
    opt = build_optimizer(TrainConfig(optimizer="muon", momentum=0.9, weight_decay=0.0), model, lr)
    everything = {n for n, _ in model.named_parameters()}
    assert names_of(model, opt, True) == FILTERS == set(hidden_weights(model))
    aux = names_of(model, opt, False)
    assert aux == everything - FILTERS and {"stem.0.weight", "fc.weight"} <= aux  # first layer and head
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt.muon, Muon)
    assert isinstance(opt.aux, torch.optim.SGD) and opt.aux.defaults["nesterov"]
    assert all(g["lr"] == pytest.approx(lr * (0.1 if g["use_muon"] else 1.0)) for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    for n in FILTERS:  # the step is lr x an orthogonalised (out, in*3*3) matrix: all singular values ~1
        step = (before[n] - after[n].detach()).reshape(len(before[n]), -1) / (lr * 0.1)
        s = torch.linalg.svdvals(step.double())
        g = torch.linalg.svdvals(grads[n].reshape(len(before[n]), -1).double())
        assert len(s) == min(step.shape) and 0.9 < s.min() and s.max() < 1.1, n
        assert s.max() / s.median() < 0.5 * g.max() / g.median(), n  # far flatter than the gradient's
    for n in aux:  # first Nesterov step of torch's SGD: p - lr (1 + momentum) g
        assert torch.allclose(after[n].detach(), before[n] - lr * 1.9 * grads[n], rtol=1e-5, atol=1e-7), n


def _jordan_newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Jordan's quintic Newton-Schulz iteration (kellerjordan.github.io/posts/muon), bfloat16, as
    airbench94_muon runs it three times: X <- aX + (bA + cA^2)X with A = XX^T, X0 = G / |G|_F."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x = x / (x.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return (x.T if tall else x).float()


@pytest.mark.parametrize("coefficients", ["original", "quintic"])
def test_newton_schulz_coefficients(batches, coefficients):
    """train.muon.ns_coefficients=original is airbench94_muon's update (3 steps of Jordan's triple);
    timm's default quintic preset is another (flatter) one."""
    model, lr = fastnet(), 0.2
    cfg = TrainConfig(optimizer="muon", momentum=0.9, weight_decay=0.0,
                      muon={"ns_steps": 3, "momentum": 0.0, "ns_coefficients": coefficients})
    opt = build_optimizer(cfg, model, lr)
    before = {n: model.get_parameter(n).detach().clone() for n in FILTERS}
    opt.zero_grad()
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    grads = {n: model.get_parameter(n).grad.clone() for n in FILTERS}
    opt.step()
    for n in FILTERS:
        step = (before[n] - model.get_parameter(n).detach()) / (lr * 0.1)
        ref = _jordan_newton_schulz(grads[n].reshape(len(grads[n]), -1), 3).reshape(step.shape)
        close = torch.allclose(step, ref, atol=0.02)
        assert close if coefficients == "original" else not close, n
    with pytest.raises(ValueError, match="ns_coefficients"):
        TrainConfig(optimizer="muon", muon={"ns_coefficients": "cubic"})


def test_one_schedule_drives_every_group_at_the_fixed_ratio():
    model = fastnet()
    opt = build_optimizer(TrainConfig(optimizer="muon", muon={"lr_ratio": 0.25}), model, 0.1)
    schedule = OneCycle(opt, max_lr=0.4, total_steps=10)
    for step in range(10):
        assert all(g["lr"] == pytest.approx(schedule.lr_at(step) * (0.25 if g["use_muon"] else 1.0))
                   for g in opt.param_groups), step
        schedule.step_batch()


@pytest.mark.parametrize("aux", ["sgd", "adamw"])
def test_state_dict_round_trips_into_a_fresh_optimizer(batches, aux):
    cfg = TrainConfig(optimizer="muon", muon={"aux_optimizer": aux})
    model = fastnet()
    opt = build_optimizer(cfg, model, 0.05)
    assert isinstance(opt.aux, torch.optim.SGD if aux == "sgd" else torch.optim.AdamW)
    for batch in batches[:3]:
        train_step(model, opt, batch)
    state = opt.state_dict()["state"]
    assert len(state) == sum(1 for _ in model.parameters())  # both parts' state in one dict
    assert sum("use_muon" in s for s in state.values()) == len(FILTERS)
    file = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, file)  # as a checkpoint
    file.seek(0)
    saved = torch.load(file, weights_only=True)
    twin = fastnet()
    twin.load_state_dict(saved["model"])
    fresh = build_optimizer(cfg, twin, 0.05)
    fresh.load_state_dict(saved["optimizer"])
    assert fresh.muon.state is fresh.state and fresh.aux.state is fresh.state
    assert all(any(g is h for h in fresh.param_groups) for g in fresh.muon.param_groups + fresh.aux.param_groups)
    assert_same(opt.state_dict(), fresh.state_dict(), "loaded")
    assert train_step(model, opt, batches[3]) == train_step(twin, fresh, batches[3])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert_same(opt.state_dict(), fresh.state_dict(), "after a step")


def test_range_test_sweeps_all_groups_at_their_ratio_and_restores_both_parts(batches):
    model = fastnet()
    opt = build_optimizer(TrainConfig(optimizer="muon"), model, 0.05)
    for batch in batches[:2]:
        train_step(model, opt, batch)  # momentum buffers in both parts
    before = snapshot(model, opt)
    scales = [g["lr_scale"] for g in opt.param_groups]
    seen = []
    result = range_test(model, opt, F.cross_entropy, batches, start_lr=[1e-4 * s for s in scales],
                        end_lr=[10 * s for s in scales], num_iter=24, skip_start=2, skip_end=2,
                        progress=lambda i, lr, loss: seen.append([g["lr"] for g in opt.param_groups]))
    assert len(seen) >= 12 and all(lrs == pytest.approx([lrs[0] * s for s in scales]) for lrs in seen)
    assert result.lrs[:3] == pytest.approx([lrs[0] for lrs in seen[:3]])  # the recorded lr is the aux one
    assert result.suggestion is not None and 1e-4 < result.suggestion < 10
    assert_restored(model, opt, before)
    assert opt.muon.state is opt.state and opt.aux.state is opt.state
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(TrainConfig(optimizer="muon"), twin, 0.05)
    twin_opt.load_state_dict(before[1])
    assert train_step(model, opt, batches[2]) == train_step(twin, twin_opt, batches[2])  # both parts act alike
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_muon_sweep_holds_the_aux_groups_and_records_muons_lr(batches):
    model = fastnet()
    opt = build_optimizer(TrainConfig(optimizer="muon"), model, 0.05)
    train_step(model, opt, batches[0])
    before = snapshot(model, opt)
    muon = [i for i, g in enumerate(opt.param_groups) if g["use_muon"]]
    starts = [1e-4 if g["use_muon"] else 0.2 * g["lr_scale"] for g in opt.param_groups]
    ends = [3.0 if g["use_muon"] else 0.2 * g["lr_scale"] for g in opt.param_groups]
    seen = []
    result = range_test(model, opt, F.cross_entropy, batches, start_lr=starts, end_lr=ends, num_iter=20,
                        skip_start=2, skip_end=2, record_group=muon[0], method="descent",
                        progress=lambda i, lr, loss: seen.append([g["lr"] for g in opt.param_groups]))
    held = [i for i in range(len(starts)) if i not in muon]
    assert len(seen) == 20 and all(lrs[i] == starts[i] for lrs in seen for i in held)  # the aux part stays put
    assert seen[0][muon[0]] == pytest.approx(1e-4) and seen[-1][muon[0]] == pytest.approx(3.0)
    assert result.lrs == pytest.approx([lrs[muon[0]] for lrs in seen])  # the recorded lr is Muon's
    assert result.start_lr == pytest.approx(1e-4) and 1e-4 < result.suggestion < 3.0
    assert_restored(model, opt, before)
    with pytest.raises(LrlabError, match="record_group"):
        range_test(model, opt, F.cross_entropy, batches, start_lr=starts, end_lr=ends, num_iter=20,
                   skip_start=2, skip_end=2, record_group=held[0])
    assert_restored(model, opt, before)


def test_a_frozen_backbone_leaves_muon_nothing(batches):
    model = fastnet()
    freeze(model, ["fc"])  # transfer stage 1: only the head trains
    opt = build_optimizer(TrainConfig(optimizer="muon"), model, 0.05)
    assert opt.muon is None and names_of(model, opt, False) == {"fc.weight"}
    head = model.fc.weight.detach().clone()
    train_step(model, opt, batches[0])
    assert not torch.equal(head, model.fc.weight)


def test_lrlab_run_with_muon_trains_and_the_loss_falls(small_tree, cache_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "muon.yaml", cache_dir, train={"optimizer": "muon", "epochs": 3},
                          explain={"num_images": 2})
    assert main(["run", str(recipe), "--data", str(small_tree), "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    losses = [r["train_loss"] for r in json.loads((run / "history.json").read_text())]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05  # 450 images, 27 steps: from ln 10 = 2.30 down
    found, plan = json.loads((run / "lr_finder.json").read_text()), json.loads((run / "lr_plan.json").read_text())
    assert found["method"] == "max_lr" and plan["lr"] == found["suggestion"]
    muon = found["muon"]  # Muon's own sweep, the rest held at the first one's suggestion: Muon's lr
    assert muon["method"] == "min10" and muon["start_lr"] == 1e-4 and muon["end_lr"] == 3.0
    assert plan["muon_lr_ratio"] == pytest.approx(muon["suggestion"] / found["suggestion"])
    assert plan["muon_source"].startswith("Muon's range test: min10")
    rows = json.loads((run / "summary.json").read_text())["lr_plan"]
    assert [r["group"] for r in rows] == ["all", "all (Muon)"] and rows[1]["lr"] == pytest.approx(muon["suggestion"])
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # resumable: loads into a fresh one
    model = build("fastnet", 10, width=0.25)
    model.load_state_dict(ckpt["model"])
    model.stem[0].weight.requires_grad_(False)  # the run's patch-whitened stem is frozen
    opt = build_optimizer(load_config(recipe).train, model, 0.1)
    opt.load_state_dict(ckpt["optimizer"])
    momentum = {n for n, p in model.named_parameters() if "momentum_buffer" in opt.state.get(p, {})}
    assert FILTERS <= momentum and "fc.weight" in momentum  # Muon's and SGD's buffers
    trained = {g["use_muon"]: g["lr_scale"] for g in ckpt["optimizer"]["param_groups"]}
    assert trained == {False: 1.0, True: pytest.approx(plan["muon_lr_ratio"])}  # trained at the sweep's ratio
    assert "Muon's own sweep" in (run / "report.html").read_text()
    capsys.readouterr()
    assert main(["find-lr", str(recipe), "--data", str(small_tree), "--out", str(tmp_path / "find")]) == 0
    out = capsys.readouterr().out
    assert "Muon's sweep, the rest held at the first sweep's lr (x lr_factor):" in out
    assert main(["find-lr", str(recipe), "--data", str(small_tree), "--out", str(tmp_path / "ratio"),
                 "lr_finder.muon.enabled=false"]) == 0
    (kept,) = (tmp_path / "ratio").iterdir()
    assert json.loads((kept / "lr_finder.json").read_text())["muon"] is None
    assert json.loads((kept / "lr_plan.json").read_text())["muon_lr_ratio"] == 0.1  # the recipe's ratio


def test_bad_muon_input_is_one_line(small_tree, cache_dir, tmp_path, capsys):
    with pytest.raises(LrlabError, match="train.momentum > 0"):
        build_optimizer(TrainConfig(optimizer="muon", momentum=0.0), fastnet(), 0.1)
    no_hidden = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    with pytest.raises(LrlabError, match="Sequential has no hidden weight for Muon"):
        build_optimizer(TrainConfig(optimizer="muon"), no_hidden, 0.1)
    bare = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Conv2d(8, 8, 3, bias=False), nn.Flatten(),
                         nn.Linear(8 * 28 * 28, 10, bias=False))
    with pytest.raises(LrlabError, match="put the head in the last layer group"):
        build_optimizer(TrainConfig(optimizer="muon", layer_groups=[["0", "3"], ["1"]]), bare, 0.1, (0.1, 1.0))
    for override, fragment in (("train.muon.aux_optimizer=lion", "valid: sgd, adamw"),
                               ("train.muon.lr_ratio=0", "train.muon.lr_ratio")):
        with pytest.raises(LrlabError, match=fragment) as e:
            load_config(None, ["train.optimizer=muon", override])
        assert "\n" not in str(e.value)
    recipe = write_recipe(tmp_path / "bad.yaml", cache_dir)
    assert main(["train", str(recipe), "--data", str(small_tree), "--out", str(tmp_path / "runs"),
                 "train.optimizer=muon", "train.momentum=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.optimizer muon") and "\n" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert isinstance(build_optimizer(TrainConfig(optimizer="muon"), fastnet(), 0.1), MuonWithAux)


def test_renorm_and_bias_lr_ratio(batches):
    """airbench94_muon's settings: each Muon weight rescaled to norm sqrt(out) before its step (so
    after one step its norm is that of sqrt(out) plus an orthogonal step), biases and norm weights
    at bias_lr_ratio x the lr; the state dict still round-trips."""
    model, lr = fastnet(), 0.2
    cfg = TrainConfig(optimizer="muon", momentum=0.9, weight_decay=0.0, bias_lr_ratio=0.1,
                      muon={"renorm": True, "lr_ratio": 0.1})
    opt = build_optimizer(cfg, model, lr)
    params = dict(model.named_parameters())
    ids = {id(p): n for n, p in params.items()}
    for g in opt.param_groups:
        names = {ids[id(p)] for p in g["params"]}
        one_d = {params[n].ndim for n in names} == {1}
        assert g["lr"] == pytest.approx(lr * (0.1 if g["use_muon"] else 1.0) * (0.1 if one_d else 1.0)), names
    with torch.no_grad():
        for n in FILTERS:
            params[n].mul_(3.0)  # far from norm sqrt(out)
    train_step(model, opt, batches[0])
    for n in FILTERS:
        w = params[n].detach()
        out = len(w)
        expected = (out + min(out, w[0].numel()) * (lr * 0.1) ** 2) ** 0.5  # orthogonal-ish step on top
        assert w.norm().item() == pytest.approx(expected, rel=0.05), n
    state = copy.deepcopy(opt.state_dict())
    again = build_optimizer(cfg, model, lr)
    again.load_state_dict(state)
    assert again.renorm and [g["lr"] for g in again.param_groups] == [g["lr"] for g in opt.param_groups]


def test_airbench_recipe_runs_and_learns(small_tree, cache_dir, tmp_path):
    """recipes/cifar10-muon.yaml (airbench94_muon's recipe) shortened to 450 real images: Muon with
    renormalised weights, biases at bias_lr_ratio, the 2x2 whitening stem, selective TTA at the end."""
    args = ["run", str(REPO / "recipes" / "cifar10-muon.yaml"), "--data", str(small_tree), "--out",
            str(tmp_path / "runs"), "--quiet", f"data.cache_dir={cache_dir}", "train.epochs=8", "train.batch_size=75",
            "model.kwargs={width: 0.25, whiten_kernel: 2, bn_scale: false, dirac: true, head_scale: 0.0078125, "
            "bn_momentum: 0.4, head_std: 1.0}", "train.tta_fraction=0.5", "explain.num_images=2"]
    assert main(args) == 0
    (run,) = (tmp_path / "runs").iterdir()
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1 and history[-1]["val_acc"] > 0.2
    plan = json.loads((run / "lr_plan.json").read_text())
    assert plan["lr"] == 1340 and plan["muon_lr_ratio"] == pytest.approx(1.79e-4)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["pad_mode"] == "reflect" and config["train"]["muon"]["ns_coefficients"] == "original"
    assert config["train"]["freeze_after"] == {"stem": 3}
    model = build("fastnet", 10, width=0.25, whiten_kernel=2, bn_scale=False, dirac=True)
    model.load_state_dict(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"])
    for n in FILTERS:  # renormalised before every step: norm sqrt(out) plus one last small step
        w = model.get_parameter(n).detach()
        assert w.norm().item() == pytest.approx(len(w) ** 0.5, rel=0.02), n
    assert all(m.weight.eq(1).all() for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # scale frozen
    assert json.loads((run / "summary.json").read_text())["final_test_acc"] > 0.2


def test_freeze_after_trains_the_whitening_bias_for_its_epochs_only(small_tree, cache_dir):
    """train.freeze_after={stem: 1}: the 2x2 whitening stem's bias moves in epoch 1 and never after,
    while the blocks keep training; the stem's output then needs no gradient (airbench94's short-lived
    whitening bias). A name that is not a module is one line."""
    from lrlab import pipeline

    config = load_config(REPO / "recipes" / "cifar10-muon.yaml", [
        f"data.path={small_tree}", f"data.cache_dir={cache_dir}", "train.epochs=3", "train.batch_size=100",
        "model.kwargs={width: 0.25, whiten_kernel: 2, bn_scale: false, dirac: true, head_scale: 0.0078125}",
        "train.freeze_after={stem: 1}", "train.tta=false"])
    setup = pipeline.prepare(config, range_test=False, train=True, explain=False)
    model = setup.model
    seen = [(model.stem[0].bias.detach().clone(), model.block2.conv1.weight.detach().clone())]
    pipeline.train(setup, pipeline.make_plan(setup, None),
                   pipeline.Callbacks(on_epoch=lambda r: seen.append(
                       (model.stem[0].bias.detach().clone(), model.block2.conv1.weight.detach().clone()))))
    biases, convs = zip(*seen)
    assert not torch.equal(biases[0], biases[1])  # trained in epoch 1
    assert torch.equal(biases[1], biases[2]) and torch.equal(biases[2], biases[3])  # frozen after it
    assert all(not torch.equal(a, b) for a, b in zip(convs, convs[1:]))  # the blocks train on
    assert not any(p.requires_grad for p in model.stem.parameters())
    with torch.autocast("cpu", enabled=False):
        assert not model.stem(torch.randn(2, 3, 32, 32)).requires_grad
    bad = config.model_copy(update={"train": config.train.model_copy(update={"freeze_after": {"stemm": 1}})})
    with pytest.raises(LrlabError, match="train.freeze_after names 'stemm', which is not a module of the model; "
                                         "top-level modules: stem, block1"):
        pipeline.prepare(bad, range_test=False, train=True, explain=False)  # before any file is written
