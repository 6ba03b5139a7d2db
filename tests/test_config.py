import pytest
import yaml

from lrlab.config import load_config, save_config
from lrlab.errors import LrlabError
from conftest import REPO


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")))
def test_recipes_validate(recipe):
    config = load_config(recipe)
    assert config.name == recipe.stem


def test_overrides_parse_yaml_values_and_round_trip(tmp_path):
    config = load_config(REPO / "recipes" / "cifar10-resnet18.yaml",
                         ["train.epochs=3", "lr_finder.start_lr=1e-4", "data.flip=false", "model.kwargs={width: 32}"])
    assert (config.train.epochs, config.lr_finder.start_lr, config.data.flip) == (3, 1e-4, False)
    assert config.model.kwargs == {"width": 32}
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 3


@pytest.mark.parametrize("override, message", [
    ("train.foo=1", "unknown config key 'train.foo'"),
    ("train.lr=0", "'train.lr'.*greater than 0"),
    ("train.lr=-1", "'train.lr'.*greater than 0"),
    ("lr_finder.start_lr=100", r"start_lr \(100\) must be below end_lr \(10\)"),
    ("data.augment=magic", "data.augment: 'magic' is not a valid data.augment; valid: none, tensor, albumentations"),
    ("epochs", "must look like section.key=value"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(LrlabError, match=message) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(LrlabError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(LrlabError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
