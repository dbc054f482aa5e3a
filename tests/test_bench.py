import pytest

from cnnkit.bench import ratios, summarise
from cnnkit.config import Config, apply_overrides, load_config, recipe_names


def test_shipped_recipes_load_by_name():
    assert {"mnist-tutorial", "mnist-fast", "fashion-mnist-fast"} <= set(recipe_names())
    cfg = apply_overrides(Config(), load_config("mnist-fast"))
    assert (cfg.train.batch_size, cfg.optim.schedule, cfg.train.precision) == (
        128,
        "onecycle",
        "bf16",
    )
    tutorial = apply_overrides(Config(), load_config("mnist-tutorial"))
    assert (tutorial.train.batch_size, tutorial.optim.lr, tutorial.train.epochs) == (32, 1e-3, 5)
    with pytest.raises(FileNotFoundError, match="shipped recipes: .*mnist-fast"):
        load_config("mnist-fastest")


def test_summary_and_ratios():
    runs = [
        {"train_seconds": t, "test_accuracy": a}
        for t, a in ((15.0, 0.991), (17.0, 0.993), (14.0, 0.990))
    ]
    s = summarise("mnist-fast", runs)
    assert (s["train_seconds_median"], s["train_seconds_min"], s["train_seconds_max"]) == (
        15.0,
        14.0,
        17.0,
    )
    assert s["test_accuracy_mean"] == pytest.approx(0.9913, abs=1e-4)
    r = dict(
        ratios(
            {
                "tutorial": {"images_per_s": 6000},
                "keras": {"images_per_s": 2000},
                "mnist-fast (summary)": {},
            }
        )
    )
    assert r == {"tutorial vs keras": 3.0}
