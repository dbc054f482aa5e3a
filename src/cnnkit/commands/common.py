"""Helpers several command groups share: tables and the console, the deploy extras
check, writability, stale-output notes and MLflow logging."""

from __future__ import annotations

import sys
from pathlib import Path


def _table(title: str | None, *columns: str, text_columns: int = 1):
    """A rich table whose first ``text_columns`` columns are left-aligned, the rest numbers.

    Its title, headers and string cells are plain text, never rich markup: they hold class
    names and paths, and a class named ``[red]cat`` must print as itself.
    """
    from rich.table import Table
    from rich.text import Text

    class PlainTextTable(Table):
        def add_row(self, *renderables, **kwargs) -> None:
            cells = [Text(r) if isinstance(r, str) else r for r in renderables]
            super().add_row(*cells, **kwargs)

    t = PlainTextTable(
        title=Text(title) if title is not None else None,
        title_justify="left",
        header_style="bold",
    )
    for i, c in enumerate(columns):
        # fold, never elide: a path or class name cut to "..." is information lost
        t.add_column(Text(c), justify="left" if i < text_columns else "right", overflow="fold")
    return t


# Width of the output when it goes to a pipe or file: wide enough that no line is folded.
PIPED_WIDTH = 10_000


def _console():
    import os

    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped or redirected: there is no screen to fit, and a path folded mid-word at
        # rich's default 80 columns breaks grep and copy-paste.
        console = Console(highlight=False, soft_wrap=True, width=PIPED_WIDTH)
    return console


# What `pip install 'cnnkit[deploy]'` brings (pyproject.toml); the core runs without it.
DEPLOY_MODULES = (
    "fastapi",
    "uvicorn",
    "prometheus_client",
    "python_multipart",
    "onnx",
    "onnxruntime",
    "onnxscript",
)


def _require_deploy_extras(command: str, *modules: str) -> None:
    """Import ``modules`` now, so a missing deploy extra is one line naming the install
    command, before a run is loaded or a file written, instead of "No module named ..."."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if (e.name or module).split(".")[0] not in DEPLOY_MODULES:
                raise  # something else is broken: its own message says what
            raise ImportError(
                f"cnnkit {command} needs {e.name or module}, which is not installed: "
                "pip install 'cnnkit[deploy]'"
            ) from None


def _require_extra(command: str, module: str, extra: str) -> None:
    """One line naming the install command when an optional package is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"cnnkit {command} needs {module}, which is not installed: "
            f"pip install 'cnnkit[{extra}]'"
        )


def _check_writable(folder: Path, hint: str) -> None:
    """Fail before any work when nothing can be written in ``folder`` (made if missing).

    A probe file, not os.access: access() says yes to root on a read-only mount.
    """
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {folder} ({e.strerror or e}); {hint}") from None


def _say_rebuilding(run, output: str, stream) -> None:
    """Say so when the ``output`` file about to be rewritten was made from other weights."""
    for stale in run.stale_outputs():
        if stale.files[0].name == output:
            print(f"rebuilding a stale output: {stale.describe()}", file=stream)


def _log_to_mlflow(run_dir: Path, files: list[Path], folder: str | None = None) -> None:
    """Files made after training go to the run's MLflow run too, when it was tracked."""
    from cnnkit.train.tracking import log_outputs

    line = log_outputs(run_dir, files, folder)
    if line:
        print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
