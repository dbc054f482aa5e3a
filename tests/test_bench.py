import pytest

from cnnkit.bench import (
    GPU_RECIPES,
    bench,
    default_measurements,
    measurement,
    ratios,
    run_recipe,
    summarise,
)
from cnnkit.config import Config, apply_overrides, load_config, recipe_names


def test_shipped_recipes_load_by_name():
    assert {"mnist-tutorial", "mnist-fast", "fashion-mnist-fast"} <= set(recipe_names())
    cfg = apply_overrides(Config(), load_config("mnist-fast"))
    assert (cfg.train.batch_size, cfg.optim.schedule, cfg.train.epochs) == (128, "onecycle", 2)
    tutorial = apply_overrides(Config(), load_config("mnist-tutorial"))
    assert (tutorial.train.batch_size, tutorial.optim.lr, tutorial.train.epochs) == (32, 1e-3, 5)
    with pytest.raises(FileNotFoundError, match="shipped recipes: .*mnist-fast"):
        load_config("mnist-fastest")


def test_summary_and_ratios():
    runs = [
        {"train_seconds": t, "test_accuracy": a, "images_per_s": n}
        for t, a, n in ((15.0, 0.991, 4000), (17.0, 0.993, 3500), (14.0, 0.990, 4300))
    ]
    s = summarise("mnist-fast", runs)
    assert (s["train_seconds_median"], s["train_seconds_min"], s["train_seconds_max"]) == (
        15.0,
        14.0,
        17.0,
    )
    assert s["images_per_s_median"] == 4000
    assert s["test_accuracy_mean"] == pytest.approx(0.9913, abs=1e-4)
    r = ratios(
        {
            "tutorial": {"images_per_s_median": 6000},
            "keras": {"images_per_s_median": 2000},
            "tutorial-fp32": {"images_per_s_median": 5000},
            "mnist-fast": {"images_per_s_median": 9000},  # a recipe, not a peer
        }
    )
    assert r == {"keras": 3.0, "tutorial-fp32": 1.2}
    assert ratios({"keras": {"images_per_s_median": 2000}}) == {}


def test_bench_names_unknown_measurements():
    with pytest.raises(ValueError, match="unknown measurement.*choose from tutorial"):
        bench(only=["tutorail"])


def test_compiling_steps_are_reported_apart_from_the_training_time():
    cfg = apply_overrides(Config(), load_config("mnist-gpu-fast"))
    history = [  # 10,000 images per epoch; the first epoch spent 3 s compiling
        {"seconds": 5.0, "images_per_s": 2000.0, "compile_seconds": 3.0, "val_acc": 0.98},
        {"seconds": 2.0, "images_per_s": 5000.0, "val_acc": 0.99123},
    ]
    r = measurement("mnist-gpu-fast", 0, cfg, history, 0.991)
    assert (r["train_seconds"], r["compile_seconds"]) == (4.0, 3.0)
    assert r["images_per_s"] == 5000 and r["seconds_per_epoch"] == [5.0, 2.0]
    assert r["val_acc_per_epoch"] == [0.98, 0.9912]
    assert r["dtype"] in ("float32", "bfloat16") and r["precision"] == "auto"
    fp32 = measurement("x", 0, apply_overrides(cfg, {"precision": "fp32"}), history, 0.99)
    assert fp32["dtype"] == "float32"
    s = summarise("mnist-gpu-fast", [r, {**r, "compile_seconds": 5.0}])
    assert s["compile_seconds_median"] == 4.0
    uncompiled = measurement("tutorial", 0, Config(), history[1:], 0.99)
    assert "compile_seconds" not in uncompiled and uncompiled["train_seconds"] == 2.0


def test_gpu_recipes_run_by_default_only_with_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "tutorial" in default_measurements()
    assert not set(GPU_RECIPES) & set(default_measurements())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert set(GPU_RECIPES) <= set(default_measurements())


def test_a_recipe_run_is_measured_from_its_own_epochs():
    r = run_recipe("small", None, 0, epochs=2, limit=640, batch_size=64)
    assert r["epochs"] == 2 and len(r["seconds_per_epoch"]) == 2
    assert r["train_seconds"] == pytest.approx(sum(r["seconds_per_epoch"]), abs=0.02)
    assert r["images_per_s"] > 0 and all(0 < a <= 1 for a in r["val_acc_per_epoch"])
    assert 0.5 < r["test_accuracy"] <= 1 and "compile_seconds" not in r
