"""Progress of the long steps a person waits for (decoding, feature extraction, evaluation,
quantization, reports): a bar with a rate and the time left on a terminal, and one line per
step with its time and rate when the output is a file or a pipe (logs stay readable).

Both go to stderr, so ``--json`` output on stdout stays clean. rich draws the bar (it is a
core dependency already); this module only decides when and where.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_silenced = 0  # > 0 inside silenced(): a quiet run shows no progress at all


@contextmanager
def silenced() -> Iterator[None]:
    """No progress from anything called inside (``cnnkit train --quiet``)."""
    global _silenced
    _silenced += 1
    try:
        yield
    finally:
        _silenced -= 1


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@contextmanager
def progress(
    description: str,
    total: int | None,
    unit: str = "images",
    quiet: bool = False,
    summary: bool = True,
) -> Iterator[Callable[[int], None]]:
    """``with progress("backbone features", n) as advance: ... advance(len(batch))``.

    On a terminal a transient bar (count, rate, time left) while the block runs; then, on
    any output, one line: '<description>: <count> <unit> in <s>s (<rate> <unit>/s)'
    (``summary=False``: the caller reports the step itself); with no ``total`` and nothing
    counted, just the time. ``quiet``: nothing at all.
    """
    done = 0
    start = time.perf_counter()
    console = None if quiet or _silenced else _console()
    bar = task = None
    if console is not None and console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn(description),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        bar.start()
        task = bar.add_task(description, total=total, rate="")

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if bar is not None:
            seconds = time.perf_counter() - start
            rate = f"{done / seconds:,.0f} {unit}/s" if seconds > 0 else ""
            bar.update(task, completed=done, rate=rate)

    failed = True
    try:
        yield advance
        failed = False
    finally:
        if bar is not None:
            bar.stop()
        if console is not None and (summary or failed):
            seconds = time.perf_counter() - start
            rate = f" ({done / seconds:,.0f} {unit}/s)" if seconds > 0 and done else ""
            end = ", stopped" if failed else ""
            counted = f"{done:,} {unit} in " if total is not None or done else ""
            line = f"{description}: {counted}{seconds:.1f}s{rate}{end}"
            console.print(line, markup=False)
