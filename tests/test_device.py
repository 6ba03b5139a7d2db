"""Precision chosen per device: bf16 autocast + channels_last on bf16 CPUs, float32 elsewhere."""

import pytest
import torch

from lrlab import compute as dev
from lrlab.config import load_config
from lrlab.errors import LrlabError
from lrlab.runner import precision_for


@pytest.mark.parametrize("bf16_cpu, expected", [(True, torch.bfloat16), (False, None)])
def test_autocast_follows_cpu_support(monkeypatch, bf16_cpu, expected):
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: bf16_cpu)
    cpu = torch.device("cpu")
    assert dev.autocast_dtype(cpu, "auto") is expected
    assert dev.autocast_dtype(cpu, "fp32") is None and dev.autocast_dtype(cpu, "bf16") is torch.bfloat16
    precision = precision_for(load_config(None, ["device=cpu"]))
    assert precision.dtype is expected and precision.channels_last == (expected is not None)


def test_autocast_context_runs_convolutions_in_bf16():
    conv = torch.nn.Conv2d(3, 4, 3)
    with dev.autocast(torch.device("cpu"), torch.bfloat16):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    with dev.autocast(torch.device("cpu"), None):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32
    assert conv.weight.dtype == torch.float32  # weights stay float32


def test_fp16_needs_cuda():
    with pytest.raises(LrlabError, match="fp16"):
        dev.autocast_dtype(torch.device("cpu"), "fp16")
