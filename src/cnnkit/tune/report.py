"""What a ``cnnkit tune`` study leaves: the trial rows, the plots, the HTML page and the
table printed at the end."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from .space import _format, _write_atomic


def _trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = t.duration.total_seconds() if t.duration is not None else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": dict(t.params),
                "run_dir": t.user_attrs.get("run_dir"),
                "seconds": seconds,
                "note": _note(t.user_attrs),
            }
        )
    return rows


def _note(attrs: dict) -> str:
    if attrs.get("surplus"):
        return "surplus (another worker filled the study)"
    if "interrupted" in attrs:
        return "interrupted"
    if "resumes_trial" in attrs:
        return f"continues trial {attrs['resumes_trial']}"
    return attrs.get("error", "")


def _plots(study, root: Path, notes: list[str]) -> dict[str, Path]:
    """Optimisation history and parameter importances as PNGs (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    plots = {"history": vis.plot_optimization_history}  # each takes target_name
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    varied = any(len({repr(t.params.get(n)) for t in complete}) > 1 for n in study.best_params)
    if len(complete) >= 2 and varied:
        plots["importances"] = vis.plot_param_importances
    else:
        notes.append("no parameter importances: they need 2 complete trials of varied settings")
    out = {}
    for name, plot in plots.items():
        try:
            ax = plot(study, target_name="validation accuracy")
        except (ValueError, RuntimeError) as e:
            notes.append(f"no {name} plot: {e}")
            continue
        buffer = io.BytesIO()
        ax.figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        path = root / f"{name}.png"
        _write_atomic(path, buffer.getvalue())
        out[name] = path
    return out


def _html(study_name: str, rows: list[dict], best: dict | None, plots: dict[str, Path]) -> str:
    """One self-contained page: the trials and the plots (embedded, nothing fetched)."""
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _row_cells(r)) + "</tr>\n"
        for r in rows
    )
    headers = "".join(f"<th>{h}</th>" for h in _COLUMNS)
    images = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">\n'
        for name, path in plots.items()
    )
    summary = (
        f"best: trial {best['number']}, val acc {best['value']:.4f}"
        if best
        else "no complete trial yet"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study_name)}"
        "</title><style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;"
        "text-align:left}tr:nth-child(even){background:#f4f4f4}img{max-width:100%}</style>"
        f"</head><body><h1>{html.escape(study_name)}</h1><p>{html.escape(summary)}</p>"
        f"<table><tr>{headers}</tr>\n{cells}</table>{images}</body></html>\n"
    )


_COLUMNS = ("trial", "state", "val acc", "params", "run", "seconds", "note")


def _row_cells(r: dict) -> list[str]:
    return [
        str(r["number"]),
        r["state"],
        f"{r['value']:.4f}" if r["value"] is not None else "-",
        " ".join(f"{k}={_format(v)}" for k, v in r["params"].items()),
        r["run_dir"] or "-",
        f"{r['seconds']:.1f}" if r["seconds"] is not None else "-",
        r["note"],
    ]


def _print_table(result: Any) -> None:
    """A TuneResult's trials as a rich table of plain text (params and paths are no
    markup)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, soft_wrap=True, width=10_000)  # as commands/common.py
    table = Table(title=f"study {result.study}")
    for column in _COLUMNS:
        table.add_column(column, justify="right" if column in ("val acc", "seconds") else "left")
    for r in result.trials:
        table.add_row(*(Text(c) for c in _row_cells(r)))
    console.print(table)
    if result.best:
        b = result.best
        console.print(f"best   trial {b['number']}: val acc {b['value']:.4f}", markup=False)
    for name, path in result.files.items():
        console.print(f"{name:<12} {path}", markup=False)
    for note in result.notes:
        console.print(f"note   {note}", markup=False)
