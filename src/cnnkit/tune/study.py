"""The study of ``cnnkit tune``: its storage and pruner, the heartbeat of a running trial,
the hook that reports epochs and prunes, and a worker's loop of trials (with resuming an
interrupted one)."""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit.config import Config, apply_overrides

from .space import SearchSpace, _format

# A killed worker's RUNNING trial is failed by the next worker that looks, once its
# heartbeat is this stale: a few missed beats, never one slow epoch of a live worker (the
# beat comes from a thread, which training does not block).
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 120
POLL_SECONDS = 2.0  # a worker waiting for other workers' trials looks this often


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("cnnkit tune needs optuna: pip install 'cnnkit[tune]'") from None
    return optuna


def _storage(url: str):
    """Optuna's RDB storage with heartbeats; SQLite waits for its lock instead of failing
    when another worker writes."""
    optuna = _optuna()
    from sqlalchemy.exc import SQLAlchemyError

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
            )
        except SQLAlchemyError as e:
            # Workers that start together race to create the tables and write the schema
            # version (an IntegrityError or "table already exists" for all but one): the
            # losers find them made when they try again.
            if attempt == 4:
                first = str(e).strip().splitlines()[0]
                raise RuntimeError(f"cannot open the Optuna storage {url}: {first}") from None
            time.sleep(0.2 + 0.3 * attempt)
        except (ValueError, ImportError) as e:  # a malformed URL, a missing database driver
            raise RuntimeError(f"cannot open the Optuna storage {url}: {e}") from None


def make_pruner(name: str, epochs: int):
    """median (default): after 3 finished trials, stop a trial whose validation accuracy
    after an epoch is below the median of the earlier trials' after the same epoch; from
    the first epoch on, since cnnkit runs are a few epochs and the first tells a lot.
    hyperband: Optuna's HyperbandPruner over 1..epochs. none: every trial runs to the end."""
    optuna = _optuna()
    if not isinstance(name, str):
        return name  # an Optuna pruner object (the Python API)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner '{name}'; use median, hyperband or none")


def default_study_name(cfg: Config) -> str:
    """tune-<data>-<model>, in characters safe for a directory name."""
    data = Path(cfg.data.name.rstrip("/\\")).name or "data"
    return re.sub(r"[^\w.-]+", "_", f"tune-{data}-{cfg.model.name}")


def _pruning_hook(trial, first_step: int = 1):
    """A training Hook that reports each epoch's validation accuracy to the trial and stops
    a lagging trial (optuna.TrialPruned, raised after the epoch's last.pt is saved). Made
    here, not at import, so that importing cnnkit.tune does not import torch."""
    from cnnkit.train.hooks import Hook

    class PruningHook(Hook):
        def __init__(self):
            self.step = first_step  # the trial's epochs so far, over all stages

        def on_epoch_end(self, row: dict) -> None:
            step, self.step = self.step, self.step + 1
            if row.get("val_acc") is None:
                return
            trial.report(float(row["val_acc"]), step)
            if trial.should_prune():
                raise _optuna().TrialPruned(f"validation accuracy {row['val_acc']:.4f} lags")

    return PruningHook()


@contextlib.contextmanager
def _heartbeat(storage, trial):
    """Beat for a RUNNING trial from a thread (study.optimize does this; ask/tell not)."""
    trial_id = trial._trial_id  # Optuna has no public name for it
    stop = threading.Event()

    def beat():
        while True:
            with contextlib.suppress(Exception):  # a missed beat is no reason to stop
                storage.record_heartbeat(trial_id)
            if stop.wait(HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=beat, daemon=True, name="cnnkit-tune-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


# ---- one worker ----------------------------------------------------------------------


@dataclass
class _Worker:
    """What a worker needs to run trials: the study, space, base config and options."""

    study: Any
    storage: Any
    space: SearchSpace
    base: Config
    trials: int
    root: Path  # <runs-dir>/<study>
    quiet: bool
    say: Any
    interrupted: str | None = None  # the message, when Ctrl-C stopped a trial

    def requeue_interrupted(self) -> None:
        """Enqueue each interrupted trial's settings once more; its run is resumed."""
        done = set(self.study.user_attrs.get("requeued", []))
        for t in self.study.get_trials(deepcopy=False):
            if t.state.name == "FAIL" and "interrupted" in t.user_attrs and t.number not in done:
                attrs = {"resumes_trial": t.number}
                run_dir = t.user_attrs["interrupted"]
                if run_dir and (Path(run_dir) / "last.pt").exists():
                    attrs["resumes"] = run_dir
                self.study.enqueue_trial(t.params, user_attrs=attrs)
                done.add(t.number)
                self.say(f"trial {t.number} was interrupted: enqueued again to continue it")
        self.study.set_user_attr("requeued", sorted(done))

    def counts(self) -> tuple[int, int]:
        states = [t.state.name for t in self.study.get_trials(deepcopy=False)]
        return states.count("COMPLETE") + states.count("PRUNED"), states.count("RUNNING")

    def is_surplus(self, trial) -> bool:
        """True when ``trials`` unfailed trials have lower numbers (a race between workers)."""
        optuna = _optuna()
        alive = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        alive += (optuna.trial.TrialState.RUNNING,)
        before = self.study.get_trials(deepcopy=False, states=alive)
        return sum(t.number < trial.number for t in before) >= self.trials

    def loop(self, timeout: float | None) -> None:
        optuna = _optuna()
        start, waiting_said = time.monotonic(), False
        self.requeue_interrupted()
        while True:
            optuna.storages.fail_stale_trials(self.study)
            finished, running = self.counts()
            if finished >= self.trials:
                return
            if timeout is not None and time.monotonic() - start > timeout:
                self.say(f"timeout: {timeout:g}s passed, no new trial started")
                return
            if finished + running >= self.trials:  # the rest run elsewhere; one may fail
                if not waiting_said:
                    self.say(f"waiting for {running} trial(s) running in other workers")
                    waiting_said = True
                time.sleep(POLL_SECONDS)
                continue
            trial = self.study.ask()
            if self.is_surplus(trial):
                if "resumes_trial" in trial.user_attrs:  # not lost: the next run takes it
                    params = {n: p.suggest(trial) for n, p in self.space.params.items()}
                    self.study.enqueue_trial(params, user_attrs=dict(trial.user_attrs))
                trial.set_user_attr("surplus", True)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            if not self.run_trial(trial):
                return

    def trial_config(self, values: dict, number: int) -> Config:
        settings = self.space.settings(values)
        try:
            cfg = apply_overrides(self.base, settings)
        except (ValueError, KeyError) as e:
            message = e.args[0] if isinstance(e, KeyError) else e
            raise ValueError(f"{self.space.source}: {message}") from None
        name, root = f"trial-{number:03d}", str(self.root)
        own = {"run.runs_dir": root, "run.name": name, "run.experiment": self.root.name}
        if "mlflow" in cfg.run.log and not cfg.run.mlflow_uri:
            from cnnkit.train.tracking import mlflow_uri

            # the store beside the runs (runs/mlflow.db), not one inside the study's folder
            own["run.mlflow_uri"] = mlflow_uri(self.base)
        return apply_overrides(cfg, own)

    def prepare(self, trial):
        """The trial's values, run directory and a function that trains it."""
        # cnnkit.train.api's train, not cnnkit.train(): importing the root package from
        # here would make an import cycle (cnnkit -> cnnkit.tune -> cnnkit).
        from cnnkit.train.api import train as train_run

        values = {n: p.suggest(trial) for n, p in self.space.params.items()}
        resumes = trial.user_attrs.get("resumes")
        hook = _pruning_hook(trial)
        if resumes:  # the old trial's epochs count for pruning as if this trial ran them
            number = trial.user_attrs["resumes_trial"]
            old = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
            for step, value in sorted(old.intermediate_values.items()):
                trial.report(value, step)
            hook = _pruning_hook(trial, max(old.intermediate_values, default=0) + 1)
            run_dir = Path(resumes)
            train = functools.partial(_resume, run_dir, hook, self.quiet)
        else:
            cfg = self.trial_config(values, trial.number)  # a bad value fails here, untrained
            run_dir = Path(cfg.run.runs_dir) / cfg.run.name
            train = functools.partial(train_run, cfg, hooks=[hook], quiet=self.quiet)
        trial.set_user_attr("run_dir", str(run_dir))
        shown = " ".join(f"{k}={_format(v)}" for k, v in values.items())
        self.say(f"trial {trial.number} {'resumes' if resumes else 'starts'}: {shown}")
        return run_dir, train

    def run_trial(self, trial) -> bool:
        """Train one trial and tell the study; False when Ctrl-C stopped it. Whatever
        happens, the trial does not stay RUNNING."""
        optuna = _optuna()
        from cnnkit.train.loop import TrainingInterrupted

        FAIL, PRUNED = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED
        t0, run_dir = time.perf_counter(), None
        state, value = None, None
        try:
            run_dir, train = self.prepare(trial)
            with _heartbeat(self.storage, trial):
                run = train()
            value = _best_val_acc(run.history)
        except optuna.TrialPruned:
            state = PRUNED
        except (TrainingInterrupted, KeyboardInterrupt):
            kept = str(run_dir) if run_dir and (run_dir / "last.pt").exists() else ""
            trial.set_user_attr("interrupted", kept)
            self.study.tell(trial, state=FAIL)
            where = f" ({kept})" if kept else ""
            self.interrupted = (
                f"Interrupted trial {trial.number}{where}. The study is kept; run the "
                "same command again to continue"
            )
            return False
        except BaseException as e:
            trial.set_user_attr("error", str(e).splitlines()[0] if str(e) else repr(e))
            self.study.tell(trial, state=FAIL)
            raise
        seconds = time.perf_counter() - t0
        frozen = self.study.tell(trial, value, state=state)
        shown = f"val acc {frozen.value:.4f}" if frozen.value is not None else "no value"
        self.say(f"trial {trial.number} {frozen.state.name.lower()}: {shown} ({seconds:.1f}s)")
        return True


def _resume(run_dir: Path, hook, quiet: bool):
    """Continue an interrupted trial's run; one that had finished its epochs is as it is."""
    from cnnkit.runs.run import load_run
    from cnnkit.train.api import resume

    try:
        return resume(run_dir, hooks=[hook], quiet=quiet)
    except ValueError as e:
        if "already finished" not in str(e):
            raise
        return load_run(run_dir)


def _best_val_acc(history: list[dict]) -> float:
    accs = [r["val_acc"] for r in history if r.get("val_acc") is not None]
    if not accs:
        raise ValueError(
            "the trial's run has no validation accuracy to maximise; give it a validation "
            "split (--val-split 0.1)"
        )
    return max(accs)
