"""Experiment tracking (train/tracking.py): what a run leaves in TensorBoard's event files
and in an MLflow store, read back with each tracker's own reader; a broken tracker is a
warning, never a failed run; compare reads an MLflow experiment."""

import json

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

import cnnkit  # noqa: E402
from cnnkit.cli import main  # noqa: E402
from cnnkit.train.tracking import LOG_EVERY, TRACKING_FILE  # noqa: E402

STEPS = 2000 // 32 + 1  # steps per epoch of 2,000 images at batch 32


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return reader


def _mlflow_run(uri: str, experiment: str = "cnnkit"):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    return client, runs


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    from cnnkit.data import BUILTINS, is_available

    if is_available(BUILTINS["mnist"]) is None:
        pytest.skip("MNIST not available")
    runs = tmp_path_factory.mktemp("runs")
    run = cnnkit.train(
        data="mnist",
        model="seed-cnn",
        epochs=2,
        limit=2000,
        runs_dir=str(runs),
        name="tracked",
        log="tensorboard,mlflow",
        quiet=True,
    )
    return run, f"sqlite:///{runs / 'mlflow.db'}"


def test_tensorboard_events_hold_the_epochs_and_throttled_steps(logged_run):
    run, _ = logged_run
    events = _events(run.path / "tensorboard")
    tags = events.Tags()
    for tag in ("epoch/train_loss", "epoch/val_acc", "epoch/lr", "epoch/images_per_s"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    # one step-level value every LOG_EVERY steps of each epoch, at its global step
    expected = [e * STEPS + s for e in range(2) for s in range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
    assert [e.step for e in events.Scalars("step/train_loss")] == expected
    # the epoch's values are metrics.csv's
    val_acc = [e.value for e in events.Scalars("epoch/val_acc")]
    assert val_acc == pytest.approx([r["val_acc"] for r in run.history], abs=1e-6)
    assert set(tags["images"]) == {"confusion_matrix", "curves"}
    assert "hparam/best_val_acc" in tags["scalars"]


def test_mlflow_store_holds_params_epoch_metrics_and_artifacts(logged_run):
    run, uri = logged_run
    client, runs = _mlflow_run(uri)
    assert len(runs) == 1
    logged = runs[0]
    assert logged.info.status == "FINISHED"
    assert logged.data.params["optim.lr"] == "0.001"
    assert logged.data.params["data.limit"] == "2000"
    assert logged.data.tags["model"] == "seed-cnn"
    assert logged.data.tags["cnnkit.run_dir"] == str(run.path.resolve())
    history = client.get_metric_history(logged.info.run_id, "val_acc")
    assert [(m.step, round(m.value, 6)) for m in history] == [
        (r["epoch"], round(r["val_acc"], 6)) for r in run.history
    ]
    files = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"config.yaml", "metrics.csv", "best.pt", "train.log", "plots"} <= files
    plots = {a.path for a in client.list_artifacts(logged.info.run_id, "plots")}
    assert plots == {"plots/confusion_matrix.png", "plots/curves.png"}
    recorded = json.loads((run.path / TRACKING_FILE).read_text())["mlflow"]
    assert recorded["run_id"] == logged.info.run_id


def test_an_export_made_later_joins_the_mlflow_run(logged_run, capsys):
    pytest.importorskip("onnxruntime")
    run, uri = logged_run
    assert main(["export", str(run.path)]) == 0
    assert "logged to run" in capsys.readouterr().out
    client, runs = _mlflow_run(uri)
    files = {a.path for a in client.list_artifacts(runs[0].info.run_id, "export")}
    assert "export/model.onnx" in files


def test_a_broken_tracking_store_is_a_warning_not_a_failed_run(mnist_dir, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the database's folder should be")
    run = cnnkit.train(
        data="mnist",
        model="seed-cnn",
        epochs=1,
        limit=500,
        runs_dir=str(tmp_path / "runs"),
        log="mlflow",
        mlflow_uri=f"sqlite:///{blocker}/mlflow.db",
    )
    out = capsys.readouterr().out
    assert "warning: mlflow failed" in out and "training goes on" in out
    assert len(run.history) == 1 and (run.path / "best.pt").is_file()


def test_a_resumed_run_logs_on_into_the_same_mlflow_run(mnist_dir, tmp_path):
    runs = tmp_path / "runs"
    settings = dict(data="mnist", model="seed-cnn", limit=500, runs_dir=str(runs), quiet=True)
    first = cnnkit.train(epochs=1, log="mlflow", name="r", **settings)
    cnnkit.resume(first.path, epochs=2, quiet=True)
    client, runs_logged = _mlflow_run(f"sqlite:///{runs / 'mlflow.db'}")
    assert len(runs_logged) == 1
    steps = [m.step for m in client.get_metric_history(runs_logged[0].info.run_id, "val_acc")]
    assert steps == [1, 2]
    assert runs_logged[0].info.status == "FINISHED"


def test_compare_reads_an_mlflow_experiment(mnist_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    for lr in ("0.001", "0.003"):
        main(
            ["train", "--data", "mnist", "--limit", "500", "--epochs", "1", "--lr", lr]
            + ["--runs-dir", str(runs), "--log", "mlflow", "--experiment", "lrs", "--quiet"]
        )
    capsys.readouterr()
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    assert main(["compare", "--mlflow", "lrs", "--mlflow-uri", uri, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["differences"] == {"optim.lr": ["0.001", "0.003"]}
    assert [r["epochs"] for r in result["runs"]] == [1, 1]
    best = max(result["runs"], key=lambda r: r["val_accuracy"])
    assert result["best"] == best["run"]
    assert main(["compare", "--mlflow", "nothing", "--mlflow-uri", uri]) == 1
    assert "no MLflow experiment 'nothing'" in capsys.readouterr().err
