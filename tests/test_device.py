"""Precision chosen per device: bf16 autocast on CPUs where bf16 is the faster, float32 elsewhere; channels_last on CPUs."""

import pytest
import torch

from lrlab import compute as dev
from lrlab.config import load_config
from lrlab.errors import LrlabError
from lrlab.compute import Compute


@pytest.mark.parametrize("bf16_cpu, bf16_gflops, expected", [(True, 600.0, torch.bfloat16), (True, 150.0, None),
                                                             (False, 600.0, None)])
def test_auto_precision_is_bf16_only_where_its_matmul_is_faster(monkeypatch, bf16_cpu, bf16_gflops, expected):
    timed = []

    def gflops(dtype, n, reps):
        timed.append(dtype)
        return bf16_gflops if dtype == torch.bfloat16 else 280.0

    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: bf16_cpu)
    monkeypatch.setattr(dev, "matmul_gflops", gflops)
    dev.cpu_bf16_is_faster.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert dev.autocast_dtype(cpu, "auto") is expected
        assert dev.autocast_dtype(cpu, "fp32") is None and dev.autocast_dtype(cpu, "bf16") is torch.bfloat16
        c = load_config(None, ["compute.device=cpu"]).compute
        compute = Compute.choose(c.device, c.precision)
        assert compute.dtype is expected and compute.channels_last  # channels_last on every CPU
        assert timed == ([torch.bfloat16, torch.float32] if bf16_cpu else [])  # once, and only with the bf16 flags
    finally:
        dev.cpu_bf16_is_faster.cache_clear()  # the next caller measures the real CPU


def test_matmul_gflops_measures_a_real_product():
    assert 0.1 < dev.matmul_gflops(torch.float32, 256, 2) < 1e5


def test_autocast_context_runs_convolutions_in_bf16():
    conv = torch.nn.Conv2d(3, 4, 3)
    with Compute(torch.device("cpu"), torch.bfloat16).autocast():
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    with Compute(torch.device("cpu"), None).autocast():
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32
    assert conv.weight.dtype == torch.float32  # weights stay float32


def test_forward_batches_runs_in_eval_mode_and_restores_mixed_modes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model keeps its own mode
    batches = [(torch.randn(5, 4), torch.arange(5)) for _ in range(3)]
    compute = Compute(torch.device("cpu"), torch.bfloat16, channels_last=True)
    seen = []
    for out, y in compute.forward_batches(model, batches):
        seen.append((model.training, model[2].training, out.dtype, out.requires_grad, tuple(out.shape)))
    assert seen == [(False, False, torch.float32, False, (5, 8))] * 3  # eval mode, no grad, float32 out
    assert model.training and model[0].training and not model[1].training and model[2].training
    expected = model.eval()(batches[0][0]).detach()
    model.train()
    out, _ = next(iter(Compute().forward_batches(model, batches)))  # float32, deterministic in eval
    assert torch.allclose(out, expected)


def test_fp16_needs_cuda():
    with pytest.raises(LrlabError, match="fp16"):
        dev.autocast_dtype(torch.device("cpu"), "fp16")
