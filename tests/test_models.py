import pytest
import torch

from lrlab.errors import LrlabError
from lrlab.models import build_model, model_names


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "fastnet"])
def test_output_shape_and_cam_layer_resolution(name):
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = {}
    layer = dict(model.named_modules())[model.default_cam_layer]
    handle = layer.register_forward_hook(lambda m, i, o: maps.setdefault("out", o))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    assert out.shape == (2, 10) and out.dtype == torch.float32
    assert maps["out"].shape[-2:] == (8, 8)  # Grad-CAM default: 8x8 maps, not the 4x4 last stage


def test_resnet_parameter_counts():
    assert sum(p.numel() for p in build_model("resnet18", 10).parameters()) == 11_173_962
    assert sum(p.numel() for p in build_model("resnet34", 10).parameters()) == 21_282_122


def test_unknown_model_lists_valid_names():
    with pytest.raises(LrlabError, match="valid models: fastnet, resnet18, resnet34"):
        build_model("vgg", 10)
    assert model_names() == ["fastnet", "resnet18", "resnet34"]
