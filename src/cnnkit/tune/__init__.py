"""``cnnkit tune``: hyperparameter search with Optuna, each trial a normal run.

A search space is a YAML file::

    params:                                              # what the sampler chooses
      optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # float; log-uniform with log: true
      optim.optimizer: [adam, adamw, sgd]                # a list: one of these
      train.batch_size: {low: 32, high: 256, step: 32}   # int when low and high are ints
      width: [16, 32, 64]                                # not a setting: a template parameter
      dropout: {low: 0.0, high: 0.5, step: 0.05}
    fixed:                                               # the same in every trial
      model.name: "conv{width}-pool-conv{width*2}-pool-drop{dropout}-fc64"

A name that ``cnnkit.config.resolve_key`` accepts (``optim.lr``, or flat: ``lr``) is a
setting; any other name is a template parameter, used as ``{name}`` or ``{name*K}`` (K a
whole number) in the string values of ``fixed``. A range takes ``low``, ``high`` and either
``step`` or ``log: true``. Settings given as flags (or keyword arguments) fix them: they are
taken out of the space.

Each worker asks the study (Optuna's RDB storage: SQLite by default, PostgreSQL or MySQL for
several machines) for a trial, trains it as ``<runs-dir>/<study>/trial-<number>``, and tells
the study its best validation accuracy, until the study holds ``trials`` finished (complete
or pruned) trials. Two workers that ask at the same moment can overshoot by one: the trial
whose number has ``trials`` unfailed trials before it is told FAIL with the user attribute
``surplus`` and is not trained. A trial stopped by Ctrl-C is told FAIL (user attribute
``interrupted``: its run directory); the next invocation enqueues its settings once more
and the new trial resumes that run.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from cnnkit.config import Config, apply_overrides, resolve_key

from .report import _html, _plots, _print_table, _trial_rows
from .space import (
    DEFAULT_SPACE,
    SPACES,
    Param,
    SearchSpace,
    _write_atomic,
    check_space,
    load_space,
    parse_space,
    render,
    write_best_recipe,
)
from .study import (
    GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    POLL_SECONDS,
    _optuna,
    _storage,
    _Worker,
    default_study_name,
    make_pruner,
)

# Re-exported: what was importable from cnnkit.tune before it was a package. Patch the
# constants in cnnkit.tune.study, where the code reads them.
__all__ = [
    "DEFAULT_SPACE",
    "GRACE_SECONDS",
    "HEARTBEAT_SECONDS",
    "POLL_SECONDS",
    "SPACES",
    "Param",
    "SearchSpace",
    "TuneResult",
    "check_space",
    "default_study_name",
    "load_space",
    "make_pruner",
    "parse_space",
    "render",
    "run_tune_command",
    "tune",
    "write_best_recipe",
]


# ---- results -------------------------------------------------------------------------


@dataclass
class TuneResult:
    """A study after this worker: its trials, the best one and the files written."""

    study: str
    storage: str
    trials: list[dict]
    best: dict | None
    files: dict[str, str] = field(default_factory=dict)  # best_recipe, html, plots
    notes: list[str] = field(default_factory=list)
    interrupted: str | None = None

    def to_dict(self) -> dict:
        return {
            "study": self.study,
            "storage": self.storage,
            "trials": self.trials,
            "best": self.best,
            "files": self.files,
            "notes": self.notes,
        }


def _summarise(worker: _Worker, study_name: str, storage_url: str) -> TuneResult:
    """The trial table, best.yaml, the plots and study.html."""
    study, root = worker.study, worker.root
    rows, notes, files = _trial_rows(study), [], {}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = None
    if complete:
        trial = max(complete, key=lambda t: t.value)
        best = next(r for r in rows if r["number"] == trial.number)
        root.mkdir(parents=True, exist_ok=True)
        recipe = root / "best.yaml"
        try:
            write_best_recipe(trial, worker.space, worker.base, recipe)
            files["best_recipe"] = str(recipe)
        except KeyError as e:  # the space changed since that trial: a value is missing
            notes.append(f"no best.yaml: trial {trial.number} has no value for {e}")
        plots = _plots(study, root, notes)
        files.update({name: str(p) for name, p in plots.items()})
    else:
        plots = {}
        notes.append("no complete trial: no best.yaml and no plots")
    root.mkdir(parents=True, exist_ok=True)
    page = root / "study.html"
    _write_atomic(page, _html(study_name, rows, best, plots).encode())
    files["html"] = str(page)
    return TuneResult(study_name, storage_url, rows, best, files, notes, worker.interrupted)


# ---- entry points --------------------------------------------------------------------


def _tune(
    cfg: Config,
    fixed_keys: set[str],
    *,
    space,
    trials: int,
    study: str | None,
    storage: str | None,
    pruner,
    timeout: float | None,
    quiet: bool,
    say,
) -> TuneResult:
    """tune() and run_tune_command(): check the space, open the study, run this worker,
    summarise. ``fixed_keys``: the settings the user gave, which the space may not vary."""
    optuna = _optuna()
    if trials < 1:
        raise ValueError(f"trials = {trials}: give 1 or more")
    if cfg.data.val_split <= 0:
        raise ValueError("cnnkit tune maximises validation accuracy: give --val-split > 0")
    if not isinstance(space, SearchSpace):
        space = load_space(space)
    space, notes = space.without(fixed_keys)
    if not space.params:
        raise ValueError(f"{space.source}: your settings fix every searched name; nothing left")
    check_space(space, cfg)
    for note in notes:
        say(note)
    study_name = study or default_study_name(cfg)
    runs = Path(cfg.run.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(runs / 'optuna.db').resolve()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # ask/tell with heartbeats is what this module does on purpose (_heartbeat).
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            rdb = _storage(url)
            # Each worker's own seed: workers with one seed would propose the same settings.
            seed = (cfg.train.seed * 1_000_003 + os.getpid()) % 2**32
            the_study = optuna.create_study(
                study_name=study_name,
                storage=rdb,
                direction="maximize",
                load_if_exists=True,
                sampler=optuna.samplers.TPESampler(seed=seed),
                pruner=make_pruner(pruner, cfg.train.epochs),
            )
            worker = _Worker(the_study, rdb, space, cfg, trials, runs / study_name, quiet, say)
            say(f"study  {study_name} in {url}: {trials} finished trials wanted")
            worker.loop(timeout)
            return _summarise(worker, study_name, url)
        finally:
            optuna.logging.set_verbosity(verbosity)


def tune(
    config: Config | None = None,
    *,
    space: str | Path | SearchSpace | None = None,
    trials: int = 20,
    study: str | None = None,
    storage: str | None = None,
    pruner="median",
    timeout: float | None = None,
    quiet: bool = False,
    **settings,
) -> TuneResult:
    """Search ``space`` with Optuna until the study holds ``trials`` finished trials.

    ``settings`` (like cnnkit.train's: ``epochs=2, limit=2000``) fix settings for every
    trial and take them out of the space. ``pruner``: median, hyperband, none or an Optuna
    pruner. Ctrl-C stops the current trial and raises KeyboardInterrupt; the study is kept
    and calling tune again continues it.
    """
    cfg = apply_overrides(config or Config(), settings)
    fixed = {resolve_key(k) for k in settings}
    result = _tune(
        cfg,
        fixed,
        space=space,
        trials=trials,
        study=study,
        storage=storage,
        pruner=pruner,
        timeout=timeout,
        quiet=quiet,
        say=print,
    )
    if result.interrupted:
        raise KeyboardInterrupt(result.interrupted)
    return result


def run_tune_command(args, cfg: Config) -> int:
    """``cnnkit tune``: run this worker's trials, then print the study's table."""
    import json

    given = {k for k in vars(args) if "." in k}
    given |= {resolve_key(item.split("=", 1)[0].strip()) for item in args.set if "=" in item}
    out = sys.stderr if args.json else sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    try:
        result = _tune(
            cfg,
            given,
            space=args.space,
            trials=args.trials,
            study=args.study,
            storage=args.storage,
            pruner=args.pruner,
            timeout=args.timeout,
            quiet=args.quiet or args.json,
            say=say,
        )
    except KeyboardInterrupt:  # outside a trial: nothing to record
        print(
            "\nInterrupted. The study is kept; run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_table(result)
    if result.interrupted:
        print(f"\n{result.interrupted}", file=sys.stderr)
        return 130
    return 0
