"""cnnkit tune: the search-space format, workers sharing a study, pruning, Ctrl-C and
continuing, and the files a study leaves (best.yaml, study.html, plots)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from cnnkit.config import Config, apply_overrides, load_config
from cnnkit.tune import check_space, load_space, parse_space, render

optuna = pytest.importorskip("optuna")

# A tiny convnet on a little MNIST: a trial is a couple of seconds on two CPU cores.
TINY_SPACE = """\
params:
  optim.optimizer: [adam, sgd]
  width: [4, 8]
fixed:
  model.name: "conv{width}-pool-fc16"
"""
SMALL = ["--limit", "1000", "--val-split", "0.02", "--batch-size", "64"]


def tune_cmd(tmp_path, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    runs = str(tmp_path / "runs")
    common = ["--space", str(space), "--storage", storage, "--study", "s", "--runs-dir", runs]
    return [sys.executable, "-m", "cnnkit", "tune", *common, "--quiet", *SMALL, *extra]


def load(tmp_path):
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")


# ---- the search space ----------------------------------------------------------------


def test_space_kinds_and_templates():
    space = parse_space(
        {
            "params": {
                "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                "optim.optimizer": ["adam", "sgd"],
                "train.batch_size": {"low": 32, "high": 256, "step": 32},
                "width": [16, 32],
                "dropout": {"low": 0.0, "high": 0.5, "step": 0.05},
            },
            "fixed": {"model": {"name": "conv{width}-pool-conv{width*2}-drop{dropout}-fc64"}},
        },
        "s.yaml",
    )
    p = space.params
    assert p["optim.lr"].key == "optim.lr" and p["optim.lr"].log  # a flat name resolved
    assert p["optim.optimizer"].choices == ("adam", "sgd")
    assert p["width"].key is None and p["dropout"].key is None  # template parameters
    values = {
        "optim.lr": 3e-3,
        "optim.optimizer": "sgd",
        "train.batch_size": 64,
        "width": 16,
        "dropout": 0.15000000000000002,  # a stepped float, as Optuna gives it
    }
    assert {n: p[n].suggest(optuna.trial.FixedTrial(values)) for n in p} == values
    settings = space.settings(values)
    assert settings == {
        "model.name": "conv16-pool-conv32-drop0.15-fc64",
        "optim.lr": 3e-3,
        "optim.optimizer": "sgd",
        "train.batch_size": 64,
    }
    assert render("drop{dropout}", {"dropout": 0.0}) == "drop0"  # a valid spec token
    cfg = apply_overrides(Config(), settings)
    assert cfg.train.batch_size == 64 and cfg.model.name.startswith("conv16")


@pytest.mark.parametrize(
    "params, fixed, message",
    [
        (
            {"optim.lrr": [0.1]},
            {},
            "s.yaml: params.optim.lrr is not a setting; see 'cnnkit train --help'",
        ),
        (
            {"lr": [0.1]},
            {"train.epoch": 3},
            "s.yaml: fixed.train.epoch is not a setting; see 'cnnkit train --help'",
        ),
        (
            {"width": [8, 16]},
            {},
            "s.yaml: params.width is neither a setting nor used in fixed as {width}; "
            "use it in a fixed value, or remove it",
        ),
        (
            {"lr": {"low": 0.1, "high": 0.01}},
            {},
            "s.yaml: params.lr: low 0.1 >= high 0.01; give low < high",
        ),
        (
            {"lr": {"low": 0.0, "high": 0.1, "log": True}},
            {},
            "s.yaml: params.lr: log needs low > 0, got 0.0",
        ),
        (
            {"lr": [0.1]},
            {"model.name": "conv{width}"},
            "s.yaml: fixed uses {width}, which params does not define; add it",
        ),
        ({"run.name": ["a"]}, {}, "s.yaml: params.run.name is set by cnnkit tune itself"),
    ],
)
def test_space_errors_name_the_file_key_and_fix(params, fixed, message):
    with pytest.raises(ValueError) as e:
        parse_space({"params": params, "fixed": fixed}, "s.yaml")
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_a_bad_bound_is_caught_before_training():
    space = parse_space({"params": {"val_split": {"low": 0.1, "high": 1.5}}}, "s.yaml")
    with pytest.raises(ValueError, match=r"data.val_split = 1.5 must be in \[0, 1\)"):
        check_space(space, Config())
    spec = parse_space(
        {"params": {"w": [8, 0]}, "fixed": {"model.name": "conv{w}-pool-fc8"}}, "s.yaml"
    )
    with pytest.raises(ValueError, match="'conv0' needs at least 1 filter"):
        check_space(spec, Config())


def test_the_shipped_space_makes_valid_layer_specs():
    from cnnkit.models.spec import tokenize

    space = load_space()  # the default: seed-exercise
    check_space(space, Config())
    p = space.params
    steps = round((p["dropout"].high - p["dropout"].low) / p["dropout"].step)
    for width in p["width"].choices:
        for i in range(steps + 1):
            dropout = p["dropout"].low + i * p["dropout"].step  # float noise, as Optuna's
            name = space.settings({**{n: q.corners()[0] for n, q in p.items()},
                                   "width": width, "dropout": dropout})["model.name"]  # fmt: skip
            assert all(t.kind and not t.problem for t in tokenize(name)), name
            assert len(name) < 40, name  # rounded: drop0.15, never drop0.15000000000000002


def test_flags_fix_settings_and_take_them_out_of_the_space(tmp_path):
    space = load_space()
    smaller, notes = space.without({"optim.lr", "model.name"})
    assert set(smaller.params) == {"optim.optimizer", "data.augment"}  # width, dropout unused
    assert "optim.lr is fixed by your settings: not searched" in notes


def test_missing_optuna_is_one_line(monkeypatch, capsys):
    from cnnkit.cli import main

    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError) as e:
        from cnnkit.tune import _optuna

        _optuna()
    message = "cnnkit tune needs optuna: pip install 'cnnkit[tune]'"
    assert str(e.value) == message
    assert main(["tune", "--trials", "1"]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_bad_space_file_is_a_one_line_cli_error(tmp_path, capsys):
    from cnnkit.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  lr: {low: 1, high: 0.5}\n")
    assert main(["tune", "--space", str(bad), "--runs-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {bad}: params.lr: low 1 >= high 0.5; give low < high\n"


# ---- studies -------------------------------------------------------------------------


def test_two_workers_finish_exactly_n_trials(mnist_dir, tmp_path):
    cmd = tune_cmd(tmp_path, "--trials", "4", "--epochs", "1", "--pruner", "none")
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]  # fmt: skip
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = load(tmp_path).trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert all(t.user_attrs.get("surplus") for t in trials if t not in finished)
    run_dirs = [t.user_attrs["run_dir"] for t in finished]
    assert len(set(run_dirs)) == 4
    for t in finished:
        assert t.user_attrs["run_dir"].endswith(f"trial-{t.number:03d}")
        assert os.path.isfile(os.path.join(t.user_attrs["run_dir"], "last.pt"))
    started = [line for out in outputs for line in out.splitlines() if " starts: " in line]
    assert len(started) == 4, outputs  # each trial trained once, by one of the workers
    assert all("best   trial" in out for out in outputs)  # each printed the table


def test_a_planted_bad_region_is_pruned_and_best_yaml_trains(mnist_dir, tmp_path):
    """Three good trials first (the median pruner's start-up), then learning rates no
    optimizer survives: those are pruned after their first epoch."""
    from cnnkit.tune import tune

    space = parse_space(
        {
            "params": {"lr": {"low": 1.0e-4, "high": 10.0, "log": True}, "width": [4, 8]},
            "fixed": {"model.name": "conv{width}-pool-fc16"},
        },
        "planted.yaml",
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="p", storage=storage, direction="maximize")
    for lr in (1e-3, 2e-3, 1e-3, 8.0, 9.0):
        study.enqueue_trial({"optim.lr": lr, "width": 8})
    result = tune(space=space, trials=5, study="p", storage=storage, quiet=True,
                  data="mnist", epochs=2, limit=1000, val_split=0.02, batch_size=64,
                  runs_dir=str(tmp_path / "runs"))  # fmt: skip
    states = {t["params"]["optim.lr"]: t["state"] for t in result.trials}
    assert states == {1e-3: "COMPLETE", 2e-3: "COMPLETE", 8.0: "PRUNED", 9.0: "PRUNED"}
    assert result.best["params"]["optim.lr"] in (1e-3, 2e-3)

    recipe = load_config(result.files["best_recipe"])
    cfg = apply_overrides(Config(), recipe)  # what 'cnnkit train --config best.yaml' builds
    assert cfg.optim.lr == result.best["params"]["optim.lr"]
    assert cfg.model.name == "conv8-pool-fc16" and cfg.train.epochs == 2
    assert cfg.run.name is None  # not the trial's: training it makes a new run
    root = tmp_path / "runs" / "p"
    assert (root / "history.png").stat().st_size > 1000
    page = (root / "study.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page  # nothing fetched
    assert "PRUNED" in page and "trial-004" in page


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.1)


def test_ctrl_c_keeps_the_study_and_the_next_run_resumes_the_trial(mnist_dir, tmp_path):
    # Epochs enough that Ctrl-C, sent after the first, lands inside the first trial.
    cmd = tune_cmd(
        tmp_path, "--trials", "2", "--epochs", "6", "--limit", "3000", "--pruner", "none"
    )
    worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "runs" / "s" / "trial-000" / "metrics.csv"
    try:
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
                  120, "the first epoch of trial 0")  # fmt: skip
        worker.send_signal(signal.SIGINT)
        out = worker.communicate(timeout=60)[0]
    finally:
        worker.kill()
    assert worker.returncode == 130, out
    assert "The study is kept; run the same command again to continue" in out
    interrupted = load(tmp_path).trials[0]
    assert interrupted.state.name == "FAIL"
    assert interrupted.user_attrs["interrupted"].endswith("trial-000")

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    study = load(tmp_path)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 2
    resumed = next(t for t in finished if "resumes" in t.user_attrs)
    assert resumed.user_attrs["resumes"] == resumed.user_attrs["run_dir"]
    assert resumed.user_attrs["run_dir"].endswith("trial-000")
    assert resumed.params == interrupted.params
    assert study.user_attrs["requeued"] == [0]  # retried once, not on every later run
    rows = metrics.read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    # the old trial's epochs were reported to the new one
    assert sorted(resumed.intermediate_values) == [1, 2, 3, 4, 5, 6]


def test_a_trial_beyond_n_under_a_race_is_surplus(tmp_path):
    """Two workers that both counted N-1 trials ask at once: the later number is not run."""
    from cnnkit.tune import _Worker

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'race.db'}")
    worker = _Worker(study, None, load_space(), Config(), 2, tmp_path, True, print)
    first, second, third = study.ask(), study.ask(), study.ask()
    assert not worker.is_surplus(first) and not worker.is_surplus(second)
    assert worker.is_surplus(third)
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # a failed trial leaves room
    assert not worker.is_surplus(third)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage", "ignore:Argument ``heartbeat")
def test_a_killed_workers_trial_fails_and_is_replaced(mnist_dir, tmp_path, monkeypatch):
    """A worker killed mid-trial leaves it RUNNING; once its heartbeat is stale, the next
    worker marks it FAIL and trains another in its place."""
    # sys.modules: 'import cnnkit.tune as m' would find cnnkit.tune(), once cnnkit exports it
    tune_module = sys.modules["cnnkit.tune"]
    study_module = sys.modules["cnnkit.tune.study"]  # where the heartbeat constants are read

    monkeypatch.setattr(study_module, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(study_module, "GRACE_SECONDS", 1)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    rdb = tune_module._storage(storage)
    study = optuna.create_study(study_name="k", storage=rdb, direction="maximize")
    orphan = study.ask()  # the killed worker's trial: one beat, then silence
    rdb.record_heartbeat(orphan._trial_id)
    time.sleep(2.5)
    space = parse_space(
        {"params": {"width": [4]}, "fixed": {"model.name": "conv{width}-pool-fc16"}}, "k.yaml"
    )
    result = tune_module.tune(space=space, trials=1, study="k", storage=storage, quiet=True,
                              data="mnist", epochs=1, limit=500, val_split=0.02,
                              runs_dir=str(tmp_path / "runs"))  # fmt: skip
    assert [(t["number"], t["state"]) for t in result.trials] == [(0, "FAIL"), (1, "COMPLETE")]
