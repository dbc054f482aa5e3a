import json
import subprocess
import sys

import pytest
import yaml

from cnnkit.cli import main


def test_train_evaluate_through_main(mnist_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train: {epochs: 3, batch_size: 64}\noptim: {lr: 0.002}\n")
    code = main(
        [
            "train",
            "--config",
            str(recipe),
            "--epochs",
            "1",
            "--limit",
            "600",
            "--set",
            "optim.weight_decay=0.0001",
            "--runs-dir",
            str(tmp_path),
            "--name",
            "cli",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "img/s" in out and str(tmp_path / "cli") in out
    cfg = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    # defaults < recipe < flags
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["batch_size"] == 64
    assert cfg["optim"]["lr"] == 0.002 and cfg["optim"]["weight_decay"] == 0.0001

    assert main(["evaluate", str(tmp_path / "cli"), "--split", "val", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "val" and 0 < report["accuracy"] <= 1
    assert set(report["per_class"]["3"]) == {"precision", "recall", "f1", "support"}
    assert json.loads((tmp_path / "cli" / "eval-val.json").read_text())["split"] == "val"


def test_bad_input_is_one_clear_line(mnist_dir, tmp_path, capsys):
    assert main(["train", "--model", "conv32-pool-conx64", "--runs-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: layer spec") and "conx64" in err
    assert main(["evaluate", str(tmp_path / "nope")]) == 1
    assert "run not found" in capsys.readouterr().err
    assert main(["train", "--lr", "fast"]) == 1
    assert "must be float, got 'fast'" in capsys.readouterr().err


def test_a_bad_choice_fails_before_the_run_directory_exists(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    code = main(["train", "--data", "mnist", "--augment", "afine", "--runs-dir", str(runs_dir)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: data.augment = 'afine'; choose one of: ")
    assert "auto, none, affine, shift, crop-flip, flip, photo" in err
    assert not runs_dir.exists()


def test_train_help_shows_each_settings_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--augment {auto,none,affine,shift,crop-flip,flip,photo}" in out
    assert "--optimizer {adam,adamw,sgd}" in out and "--lr LR" in out


def test_building_the_parser_does_not_import_torch():
    # `cnnkit --help` answers at once only while the parser stays clear of torch.
    code = (
        "import sys; from cnnkit.cli import build_parser; build_parser(); "
        "assert 'torch' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_datasets_and_models_listings(mnist_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # long paths on one line
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "cifar100" in out and str(mnist_dir) in out
    assert main(["datasets", "info", "mnist"]) == 0
    out = capsys.readouterr().out
    assert "5,923" in out and "1,135" in out  # digit 0 in train, digit 1 in test
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "seed-cnn" in out and "121,930" in out and "resnet20" in out


def test_import_cnnkit_is_light_and_still_reaches_every_part():
    code = (
        "import sys, cnnkit\n"
        "assert 'torch' not in sys.modules\n"
        "assert callable(cnnkit.train) and callable(cnnkit.load_run)\n"
        "assert cnnkit.models.list_models()\n"  # subpackages resolve on first use
        "import cnnkit.train.loop\n"
        "assert callable(cnnkit.train), 'the subpackage must not shadow train()'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_pyproject_license_is_an_spdx_expression_setuptools_reads_without_warning():
    # The table form, license = { text = ... }, is deprecated: setuptools >= 77 warned on
    # every install.
    import warnings
    from pathlib import Path

    pytest.importorskip("setuptools", minversion="77")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), pyproject)
    assert dist.metadata.license_expression == "Apache-2.0"
    assert not [w for w in caught if "license" in str(w.message)]


def test_serve_flags_reach_the_service_and_absent_ones_keep_its_defaults(monkeypatch):
    import cnnkit.commands as commands
    from cnnkit.cli import build_parser

    monkeypatch.setattr(commands.deployment, "_require_deploy_extras", lambda *a: None)
    seen = {}
    import cnnkit.deploy.serve as serve_module

    monkeypatch.setattr(serve_module, "serve", lambda model, **kw: seen.update(kw))
    args = build_parser().parse_args(
        ["serve", "runs/x", "--decode-threads", "2", "--upload-timeout", "5"]
    )
    assert commands.cmd_serve(args) == 0
    assert seen["decode_threads"] == 2 and seen["upload_timeout_s"] == 5.0
    assert "max_request_pixels" not in seen and "header_timeout_s" not in seen
