import pytest
import torch

from conftest import load_images
from lrlab.errors import LrlabError
from lrlab.models import build, model_names


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "fastnet"])
def test_output_shape_and_cam_layer_resolution(name):
    model = build(name, 10).eval()
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
    assert sum(p.numel() for p in build("resnet18", 10).parameters()) == 11_173_962
    assert sum(p.numel() for p in build("resnet34", 10).parameters()) == 21_282_122


def test_unknown_model_lists_valid_names():
    with pytest.raises(LrlabError, match="valid models: fastnet, resnet18, resnet34"):
        build("vgg", 10)
    assert model_names() == ["fastnet", "resnet18", "resnet34"]


def test_dropout_options_and_resnet_norm_choice():
    """Issue 4: dropout before the classifier, channel dropout (Dropout2d), batch/group/layer norm."""
    x = torch.randn(4, 3, 32, 32)
    plain = build("fastnet", 10, width=0.25)
    assert not any(isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)) for m in plain.modules())
    for name, kwargs in (("fastnet", {"width": 0.25}), ("resnet18", {"width": 8})):
        model = build(name, 10, dropout=0.5, channel_dropout=0.2, **kwargs)
        assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.5
        assert isinstance(model.channel_dropout, torch.nn.Dropout2d) and model.channel_dropout.p == 0.2
        assert set(model.state_dict()) == set(build(name, 10, **kwargs).state_dict())
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), model(x))  # no dropout at test time
            model.train()
            torch.manual_seed(0)
            assert not torch.equal(model(x), model(x))
    counts = set()
    for norm, kind, groups in (("batch", torch.nn.BatchNorm2d, None), ("group", torch.nn.GroupNorm, 8),
                               ("layer", torch.nn.GroupNorm, 1)):
        model = build("resnet18", 10, width=8, norm=norm)
        norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
        assert norms and all(type(m) is kind for m in norms)
        if groups is not None:
            assert norms[0].num_groups == groups  # gcd(32, 8 channels) for group norm
        counts.add(sum(p.numel() for p in model.parameters()))
        assert model(x).shape == (4, 10)
    assert len(counts) == 1
    with pytest.raises(LrlabError, match="unknown model.kwargs norm 'instance'; valid norms: batch, group, layer"):
        build("resnet18", 10, norm="instance")
    with pytest.raises(LrlabError, match=r"model.kwargs channel_dropout=1.0 is not valid; use a probability in \[0, 1\)"):
        build("fastnet", 10, channel_dropout=1.0)


def test_fastnet_airbench_stem_and_blocks(cifar_dir):
    """Issue 13: the 2x2 whitening stem whitens real image patches; frozen BN scales; Dirac init."""
    x, _, _ = load_images(cifar_dir, "train", 30)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    model = build("fastnet", 10, width=0.25, whiten_kernel=2, bn_scale=False, dirac=True)
    conv = model.stem[0]
    assert conv.kernel_size == (2, 2) and conv.padding == (0, 0) and conv.out_channels == 24
    assert len(model.stem) == 2 and isinstance(model.stem[1], torch.nn.GELU)  # no BatchNorm in this stem
    model.init_from_data(x)
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    with torch.no_grad():
        out = torch.nn.functional.conv2d(x, conv.weight[:12])  # the 12 eigen-filters (the rest: negations)
    assert torch.equal(conv.weight[12:], -conv.weight[:12])
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1))
    off = cov - torch.diag(cov.diag())
    patches = torch.nn.functional.unfold(x, 2).transpose(1, 2).reshape(-1, 12)
    eig = torch.linalg.eigvalsh(torch.cov(patches.T))
    assert off.abs().max() < 0.01  # decorrelated; variance 1, shrunk by eps = 5e-4 where faint:
    assert torch.allclose(cov.diag(), eig / (eig + 5e-4), atol=0.01)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 6 and all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    for block in (model.block1, model.block2, model.block3):
        for c in (block.conv1, block.conv2):
            w = c.weight[: c.in_channels]
            assert torch.equal(w, torch.nn.init.dirac_(torch.empty_like(w)))
    assert model(x[:4]).shape == (4, 10)
    with torch.no_grad():
        feats = model.block3(model.block2(model.block1(model.stem(x[:2]))))
    assert feats.shape[-2:] == (3, 3)  # 31 -> 15 -> 7 -> 3, as airbench94
    with pytest.raises(LrlabError, match="model.kwargs.whiten_kernel must be an integer from 2 to 5"):
        build("fastnet", 10, whiten_kernel=1)
    # airbench94's BatchNorm momentum and unit-std head; their bad values are one line each
    model = build("fastnet", 10, width=0.25, bn_momentum=0.4, head_std=1.0)
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m is not model.stem[1]} == {0.4}
    assert model.fc.weight.std().item() == pytest.approx(1.0, rel=1e-5)
    default = build("fastnet", 10, width=0.25)
    assert default.fc.weight.std().item() < 0.1 and default.block1.bn1.momentum == 0.1
    with pytest.raises(LrlabError, match=r"model.kwargs.bn_momentum must be in \(0, 1\]"):
        build("fastnet", 10, bn_momentum=0)
    with pytest.raises(LrlabError, match="model.kwargs.head_std must be a positive number"):
        build("fastnet", 10, head_std=-1.0)
