"""Experiment tracking: a run's metrics, settings and files in TensorBoard and MLflow.

``--log tensorboard`` writes event files into <run>/tensorboard/ (open it with
``tensorboard --logdir runs``): per epoch the training and validation loss and accuracy,
the learning rate, images/s and seconds; every LOG_EVERY steps the training loss and
accuracy of those steps; the settings as hyperparameters; at the end the confusion matrix
and the curves as images.

``--log mlflow`` logs to an MLflow tracking store: the settings as params, the epoch's
metrics (step = epoch), tags (model, data, cnnkit and torch versions, the git commit when
the working directory is in a repository) and the files as artifacts (config.yaml,
metrics.csv, train.log, best.pt, the plots; report.html and exports when they are made
later). The store is ``--mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite
database beside the runs (sqlite:///<runs-dir>/mlflow.db). The MLflow run's id is kept in
<run>/tracking.json, so a resumed run logs on into the same MLflow run.

Both are the trackers' own libraries (torch.utils.tensorboard, mlflow.MlflowClient); cnnkit
only feeds them. Only the main process logs. A tracker that fails (the server is down, the
database locked, the package missing) prints one warning and logs nothing more: it never
stops the training.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from cnnkit.config import Config
from cnnkit.runs.directory import CONFIG_FILE, LOG_FILE, METRICS_FILE

from .hooks import Hook

LOG_EVERY = 50  # steps between step-level scalars (each costs one host sync)
TRACKING_FILE = "tracking.json"  # <run>/tracking.json: where the run is tracked
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds")
DEFAULT_EXPERIMENT = "cnnkit"


def trackers_named(cfg: Config) -> list[str]:
    """The trackers ``run.log`` names, in order: 'tensorboard,mlflow' -> both."""
    names = [n for n in cfg.run.log.replace(" ", "").split(",") if n and n != "none"]
    return list(dict.fromkeys(names))


def make_trackers(cfg: Config, run_dir: Path, warn: Callable[[str], None]) -> list[Tracker]:
    """The trackers of ``run.log`` for the run in ``run_dir`` (main process only)."""
    kinds = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}
    return [kinds[name](cfg, run_dir, warn) for name in trackers_named(cfg)]


def flat_settings(cfg: Config) -> dict[str, object]:
    """{'optim.lr': 0.001, ...}: every setting by its dotted name."""
    return {f"{s}.{k}": v for s, section in cfg.to_dict().items() for k, v in section.items()}


class Tracker(Hook):
    """A Hook that logs to a tracker. Every call goes through ``_safely``: the first error
    is a warning naming the tracker and the fix, and the tracker is then switched off."""

    name = "tracker"
    install = ""

    def __init__(self, cfg: Config, run_dir: Path, warn: Callable[[str], None]):
        self.cfg, self.run_dir, self.warn = cfg, run_dir, warn
        self.broken = False
        self.epoch_steps = 0
        self.finished = False

    def _safely(self, action: str, fn: Callable, *args) -> None:
        if self.broken:
            return
        try:
            fn(*args)
        except ImportError as e:
            self.broken = True
            self.warn(
                f"warning: --log {self.name}: {e.name or e} is not installed "
                f"({self.install}); training goes on without {self.name} logging"
            )
        except Exception as e:  # a tracker's failure must never cost the training run
            self.broken = True
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.warn(
                f"warning: {self.name} failed while {action} ({type(e).__name__}: {text}); "
                f"training goes on without {self.name} logging"
            )

    # Hook events, each guarded
    def on_train_start(self, info: dict) -> None:
        self._safely("starting", self._start, info)

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int) -> None:
        self.epoch_steps, self.epoch = steps, epoch
        self.window = None  # (loss sum, correct, count) at the last step-level log

    def on_step(self, step: int, sums: torch.Tensor) -> None:
        if (step + 1) % LOG_EVERY == 0:
            self._safely("logging a step", self._step, step, sums)

    def on_epoch_end(self, row: dict) -> None:
        self._safely("logging the epoch", self._epoch, row)

    def on_train_end(self, summary: dict) -> None:  # once per stage
        if summary.get("stopped") == "interrupted":
            self.close("interrupted")

    def on_run_end(self, outputs: RunOutputs) -> None:
        """After the last stage: the final figures and files."""
        self._safely("logging the run's results", self._results, outputs)
        self.close("finished")

    def close(self, status: str = "failed") -> None:
        """Flush and end; 'finished', 'interrupted' or 'failed' (a crash)."""
        if not self.finished:
            self.finished = True
            self._safely("closing", self._close, status)

    # What each tracker does
    def _start(self, info: dict) -> None: ...
    def _step(self, step: int, sums: torch.Tensor) -> None: ...
    def _epoch(self, row: dict) -> None: ...
    def _results(self, outputs: RunOutputs) -> None: ...
    def _close(self, status: str) -> None: ...

    def _step_window(self, sums: torch.Tensor) -> tuple[float, float] | None:
        """(loss, accuracy) over the steps since the last step-level log: one host sync."""
        now = sums.tolist()
        before, self.window = self.window or [0.0, 0.0, 0.0], now
        count = now[2] - before[2]
        if count <= 0:
            return None
        return (now[0] - before[0]) / count, (now[1] - before[1]) / count


class RunOutputs:
    """The end of a trained run, shared by the trackers: its directory, the best value,
    and the validation confusion matrix and curves as PNG files, made once (lazily)."""

    def __init__(self, run_dir: Path, best: dict):
        self.run_dir, self.best = run_dir, best
        self._figures: dict[str, Path] | None = None
        self._folder = tempfile.TemporaryDirectory(prefix="cnnkit-tracking-")

    def figures(self) -> dict[str, Path]:
        if self._figures is None:
            from cnnkit.evaluate.plots import plot_confusion_matrix, plot_curves
            from cnnkit.runs.run import load_run

            folder = Path(self._folder.name)
            run = load_run(self.run_dir)
            self._figures = {}
            history = run.history
            if history:
                title = f"{self.run_dir.name}: {run.config.model.name}"
                self._figures["curves"] = plot_curves(history, title, folder / "curves.png")
            if any(r.get("val_acc") is not None for r in history):
                report = run.evaluate(split="val", save=False)
                self._figures["confusion_matrix"] = plot_confusion_matrix(
                    report.confusion_matrix,
                    report.classes,
                    f"validation ({report.num_images:,} images), accuracy {report.accuracy:.2%}",
                    folder / "confusion_matrix.png",
                )
        return self._figures

    def cleanup(self) -> None:
        self._folder.cleanup()


class TensorBoardTracker(Tracker):
    name, install = "tensorboard", "pip install 'cnnkit[track]'"

    def _start(self, info: dict) -> None:
        if getattr(self, "writer", None) is not None:
            return  # a later stage: the same writer
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run rewrites what came after its checkpoint: purge_step drops the
        # events of steps that were logged but not saved (a crash after the last epoch).
        resumed_at = info.get("resumed_step")
        if resumed_at is not None:  # and never an epoch-level event (step = epoch) logged
            resumed_at = max(resumed_at, info["epochs"] + 1)
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resumed_at)
        if resumed_at is None:
            self._hparams()
        where = self.run_dir / "tensorboard"
        self.warn(f"log    tensorboard: {where} (view: tensorboard --logdir {self.run_dir.parent})")

    def _hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in flat_settings(self.cfg).items()
        }
        experiment, start, _ = hparams(values, {"hparam/best_val_acc": 0.0})
        for summary in (experiment, start):
            self.writer.file_writer.add_summary(summary)

    def _global_step(self, step: int) -> int:
        return self.epoch * self.epoch_steps + step + 1

    def _step(self, step: int, sums: torch.Tensor) -> None:
        window = self._step_window(sums)
        if window is not None:
            loss, acc = window
            self.writer.add_scalar("step/train_loss", loss, self._global_step(step))
            self.writer.add_scalar("step/train_acc", acc, self._global_step(step))

    def _epoch(self, row: dict) -> None:
        for key in EPOCH_METRICS:
            if row.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", row[key], row["epoch"])
        self.writer.flush()

    def _results(self, outputs: RunOutputs) -> None:
        import numpy as np
        from PIL import Image
        from torch.utils.tensorboard.summary import hparams

        for name, path in outputs.figures().items():
            image = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(name, image, dataformats="HWC")
        value = outputs.best.get("val_acc")
        if value is not None:
            self.writer.add_scalar("hparam/best_val_acc", value)
            _, _, end = hparams({}, {})
            self.writer.file_writer.add_summary(end)

    def _close(self, status: str) -> None:
        if getattr(self, "writer", None) is not None:
            self.writer.close()


class MLflowTracker(Tracker):
    name, install = "mlflow", "pip install 'cnnkit[track]'"

    def _start(self, info: dict) -> None:
        if getattr(self, "client", None) is not None:
            return  # a later stage: the same MLflow run
        from mlflow import MlflowClient

        _quiet_mlflow()
        recorded = read_tracking(self.run_dir).get("mlflow")
        uri = mlflow_uri(self.cfg)
        self.client = MlflowClient(tracking_uri=uri)
        if recorded and recorded["uri"] == uri:  # a resumed run logs on into its MLflow run
            self.run_id = recorded["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.warn(f"log    mlflow: run {self.run_id} (resumed) at {uri}")
            return
        experiment = self.cfg.run.experiment or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            experiment_id = self.client.create_experiment(
                experiment, artifact_location=_artifact_location(uri, experiment)
            )
        run = self.client.create_run(
            experiment_id, run_name=self.run_dir.name, tags=run_tags(self.cfg, self.run_dir)
        )
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flat_settings(self.cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        record_tracking(self.run_dir, "mlflow", {"uri": uri, "run_id": self.run_id})
        self.warn(f"log    mlflow: run {self.run_id} in experiment '{experiment}' at {uri}")

    def _epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        stamp = _millis()
        metrics = [
            Metric(key, float(row[key]), stamp, row["epoch"])
            for key in EPOCH_METRICS
            if row.get(key) is not None
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def _results(self, outputs: RunOutputs) -> None:
        best = outputs.best
        if best.get("val_acc") is not None:
            self.client.log_metric(self.run_id, "best_val_acc", float(best["val_acc"]))
        if best.get("epoch") is not None:
            self.client.set_tag(self.run_id, "best_epoch", str(best["epoch"]))
        for name in (CONFIG_FILE, METRICS_FILE, LOG_FILE, "best.pt"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        for path in outputs.figures().values():
            self.client.log_artifact(self.run_id, str(path), "plots")

    def _close(self, status: str) -> None:
        if getattr(self, "client", None) is not None:
            mlflow_status = {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
            self.client.set_terminated(self.run_id, status=mlflow_status)


def _quiet_mlflow() -> None:
    """MLflow and Alembic log each database migration at INFO; cnnkit's own lines say
    where the run is logged."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def mlflow_uri(cfg: Config) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else SQLite beside the runs."""
    import os

    if cfg.run.mlflow_uri:
        return cfg.run.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(cfg.run.runs_dir) / 'mlflow.db').resolve()}"


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store go beside the database (MLflow's default is ./mlruns in
    whatever directory the command ran from); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / "mlartifacts" / experiment).resolve().as_uri()


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the git repository the command runs in, if any."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(cfg: Config, run_dir: Path) -> dict[str, str]:
    from cnnkit.version import __version__

    tags = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "cnnkit_version": __version__,
        "torch_version": str(torch.__version__),
        "cnnkit.run_dir": str(run_dir.resolve()),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit  # MLflow's own tag: its UI shows it
    return tags


def read_tracking(run_dir: Path) -> dict:
    path = Path(run_dir) / TRACKING_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def record_tracking(run_dir: Path, tracker: str, entry: dict) -> None:
    """Keep where the run is tracked in <run>/tracking.json (written whole, then renamed)."""
    data = read_tracking(run_dir)
    data[tracker] = entry
    path = Path(run_dir) / TRACKING_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, indent=2))
    partial.replace(path)


def log_outputs(run_dir: str | Path, files: list[Path], folder: str | None = None) -> str | None:
    """Add files made after training (report.html, an export) to the run's MLflow run, if
    it has one. A line saying so, a warning line when that failed (the files are made
    either way), or None for a run that is not tracked in MLflow."""
    recorded = read_tracking(Path(run_dir)).get("mlflow")
    if not recorded:
        return None
    try:
        from mlflow import MlflowClient

        _quiet_mlflow()
        client = MlflowClient(tracking_uri=recorded["uri"])
        logged = [Path(p) for p in files if Path(p).is_file()]
        for path in logged:
            client.log_artifact(recorded["run_id"], str(path), folder)
    except Exception as e:  # the files exist; only their copy in MLflow is missing
        return f"warning: not logged to MLflow ({type(e).__name__}: {e})"
    names = ", ".join(p.name for p in logged)
    return f"mlflow {names} logged to run {recorded['run_id']}"


def compare_experiment(experiment: str, uri: str | None = None) -> dict:
    """The runs of an MLflow experiment side by side: the params that differ and each
    run's results, as ``cnnkit compare`` shows them for run directories."""
    import os

    from mlflow import MlflowClient

    from cnnkit.runs.compare import NOT_COMPARED

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow_uri(Config())
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(
            f"no MLflow experiment '{experiment}' in {uri}; its experiments: "
            f"{', '.join(names) or 'none'} (another store: --mlflow-uri)"
        )
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    if not runs:
        raise ValueError(f"MLflow experiment '{experiment}' has no runs yet")
    params = [r.data.params for r in runs]
    keys = sorted({k for p in params for k in p})
    differing = [k for k in keys if len({p.get(k) for p in params}) > 1 and k not in NOT_COMPARED]
    rows = []
    for r in runs:
        m = r.data.metrics
        history = client.get_metric_history(r.info.run_id, "seconds")
        rows.append(
            {
                "run": r.info.run_name,
                "run_id": r.info.run_id,
                "status": r.info.status,
                "run_dir": r.data.tags.get("cnnkit.run_dir"),
                "val_accuracy": m.get("best_val_acc", m.get("val_acc")),
                "val_loss": m.get("val_loss"),
                "epochs": len(history),
                "training_seconds": sum(h.value for h in history),
                "images_per_s": m.get("images_per_s"),
            }
        )
    ranked = [r for r in rows if r["val_accuracy"] is not None]
    best = max(ranked, key=lambda r: r["val_accuracy"], default=None)
    return {
        "experiment": experiment,
        "tracking_uri": uri,
        "ranked_by": "val_accuracy",
        "differences": {k: [p.get(k) for p in params] for k in differing},
        "runs": rows,
        "best": best["run"] if best else None,
    }
