import re

import pytest

from cnnkit.config import (
    Config,
    apply_overrides,
    dump_config,
    load_config,
    recipe_names,
    setting_fields,
)


def test_recipe_then_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: 0.01, optimizer: sgd}\ntrain:\n  epochs: 3\nmodel: resnet20\n")
    cfg = apply_overrides(Config(), load_config(recipe))
    cfg = apply_overrides(cfg, {"lr": "0.05", "train.batch_size": "64", "data": "cifar10"})
    assert cfg.optim.lr == 0.05 and cfg.optim.optimizer == "sgd"
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 64
    assert cfg.model.name == "resnet20" and cfg.data.name == "cifar10"


def test_resolved_config_round_trips(tmp_path):
    cfg = apply_overrides(Config(), {"patience": "3", "time_budget": "none", "compile": "true"})
    dump_config(cfg, tmp_path / "config.yaml")
    again = Config.from_dict(__import__("yaml").safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and again.train.patience == 3 and again.train.compile is True


def test_bad_settings_get_clear_errors(tmp_path):
    with pytest.raises(
        KeyError, match="unknown setting 'learning_rate'; valid settings:.*optim.lr"
    ):
        apply_overrides(Config(), {"learning_rate": 0.1})
    with pytest.raises(ValueError, match="setting 'train.epochs' must be int, got 'five'"):
        apply_overrides(Config(), {"epochs": "five"})
    with pytest.raises(ValueError, match="optim.optimizer = 'rmsprop'; choose one of: adam"):
        apply_overrides(Config(), {"optimizer": "rmsprop"})
    with pytest.raises(ValueError, match=r"data.val_split = 1.5 must be in \[0, 1\)"):
        apply_overrides(Config(), {"val_split": 1.5})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lrr: 0.1}\n")
    with pytest.raises(KeyError, match="r.yaml: unknown setting 'optim.lrr'"):
        load_config(recipe)


def test_augment_choices_are_the_presets():
    # config.py cannot import cnnkit.data (torch), so it spells the preset names out.
    from cnnkit.data.augment import PRESETS

    choices = setting_fields()["data.augment"].metadata["choices"]
    assert set(choices) == set(PRESETS) | {"auto"}
    with pytest.raises(ValueError, match="data.augment = 'afine'; choose one of: auto, none"):
        apply_overrides(Config(), {"augment": "afine"})


def test_every_setting_has_help_and_its_documented_default_is_the_default():
    for key, setting_field in setting_fields().items():
        assert setting_field.metadata["help"], key
        documented = re.search(r"\(default ([^\s:,)]+)\)", setting_field.metadata["help"])
        if documented:  # e.g. "(default 0.1)": setting it must change nothing
            assert apply_overrides(Config(), {key: documented[1]}) == Config(), key


@pytest.mark.parametrize("name", recipe_names())
def test_shipped_recipes_leave_precision_to_the_hardware(name):
    # bf16 autocast is emulated on CPUs without AVX-512 BF16 or AMX and measured 10x slower
    # per step there; a recipe that fixes it would be the slow path on such a machine.
    cfg = apply_overrides(Config(), load_config(name))
    assert cfg.train.precision == "auto"


@pytest.mark.parametrize("name", ["mnist-gpu-fast", "mnist-gpu-accurate", "fashion-mnist-gpu"])
def test_gpu_recipes_build_their_models_and_compile(name):
    import torch

    from cnnkit.models import create_model

    cfg = apply_overrides(Config(), load_config(name))
    assert cfg.train.compile and cfg.train.batch_size >= 256
    model = create_model(cfg.model.name, 10, 1, (28, 28))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_a_list_or_mapping_where_a_value_belongs_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: [1, 2]}\ndata: {name: {a: 1}}\n")
    overrides = load_config(recipe)
    with pytest.raises(ValueError, match=r"setting 'optim.lr' must be float, got \[1, 2\]"):
        apply_overrides(Config(), {"optim.lr": overrides["optim.lr"]})
    # str() would have made the mapping the data set "{'a': 1}"
    with pytest.raises(ValueError, match=r"setting 'data.name' must be str, got \{'a': 1\}"):
        apply_overrides(Config(), {"data.name": overrides["data.name"]})
    with pytest.raises(ValueError, match=r"setting 'train.compile' must be bool, got \[\]"):
        apply_overrides(Config(), {"compile": []})


@pytest.mark.parametrize(
    ("key", "value"),
    [("lr", "inf"), ("lr", "nan"), ("momentum", "-inf"), ("time_budget", "inf")],
)
def test_float_settings_refuse_inf_and_nan(key, value):
    with pytest.raises(ValueError, match=r"= (-?inf|nan) must be a finite number"):
        apply_overrides(Config(), {key: value})
