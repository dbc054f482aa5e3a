import pytest

from cnnkit.bench import bench, ratios, summarise
from cnnkit.config import Config, apply_overrides, load_config, recipe_names


def test_shipped_recipes_load_by_name():
    assert {"mnist-tutorial", "mnist-fast", "fashion-mnist-fast"} <= set(recipe_names())
    cfg = apply_overrides(Config(), load_config("mnist-fast"))
    assert (cfg.train.batch_size, cfg.optim.schedule, cfg.train.epochs) == (128, "onecycle", 3)
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
