"""The code blocks of the documentation pages, read and run the way tests/test_docs.py does.

Every fenced block tagged ``bash`` or ``python`` on a page runs, in page order, in one
working folder per page; ``bash`` blocks with ``bash -euo pipefail``, ``python`` blocks in
one Python process per page (a later block sees an earlier one's names, as in a notebook).
Blocks tagged otherwise (``text`` for shown output, ``yaml``, ``js``...) are not run.

A comment line right above a block's fence sets how it runs (docs/writing-docs.md):

    <!-- test: skip: needs a GPU -->                   not run here; the reason is required
    <!-- test: quick: "--epochs 5" -> "--epochs 1" --> in a quick run, this text replaced
    <!-- test: expect: "accuracy (\\d+\\.\\d+)%" in 97..100; quick 80..100 -->
    <!-- test: contains: "diagnosis: overfitting" -->   this text must be printed
    <!-- test: timeout: 900 -->                        seconds (default 600)
    <!-- test: file: my-space.yaml -->                 a shown file (yaml, ...): written
                                                       to the page's folder, for later blocks

``expect`` takes a regular expression whose first group is a number; the number printed
by the block must lie in the band (the ``quick`` band in a quick run), or the test fails.
Runs are quick unless ``CNNKIT_DOCS_FULL=1``: then the blocks run exactly as written, with
the times the pages state.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

RUN_LANGUAGES = ("bash", "python")
DEFAULT_TIMEOUT_S = 600
_DIRECTIVE = re.compile(r"^<!--\s*test:\s*(\w+)\s*:\s*(.*?)\s*-->\s*$")
_QUICK = re.compile(r'^"(.*)"\s*->\s*"(.*)"$')
_EXPECT = re.compile(
    r'^"(.+)"\s+in\s+([-\d.e]+)\.\.([-\d.e]+)(?:\s*;\s*quick\s+([-\d.e]+)\.\.([-\d.e]+))?$'
)


@dataclass
class Expect:
    pattern: str
    band: tuple[float, float]
    quick_band: tuple[float, float] | None = None


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None = None
    quick: list[tuple[str, str]] = field(default_factory=list)
    expects: list[Expect] = field(default_factory=list)
    contains: list[str] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT_S
    file: str | None = None  # a block that is a file: written there, not run

    @property
    def runs(self) -> bool:
        """Whether the test does something with the block: runs it, or writes its file."""
        return (self.language in RUN_LANGUAGES or self.file is not None) and not self.skip

    @property
    def where(self) -> str:
        return f"{self.page.name}:{self.line}"

    def source(self, quick: bool) -> str:
        """The code to run: as written, or with the quick replacements."""
        code = self.code
        for old, new in self.quick if quick else []:
            if old not in code:
                raise ValueError(f"{self.where}: quick replacement '{old}' is not in the block")
            code = code.replace(old, new)
        return code


def _directive(block: Block, name: str, value: str) -> None:
    if name == "skip":
        if not value:
            raise ValueError(f"{block.where}: 'skip' needs its reason")
        block.skip = value
    elif name == "quick":
        m = _QUICK.match(value)
        if not m:
            raise ValueError(f'{block.where}: write quick: "old" -> "new", got {value!r}')
        block.quick.append((m.group(1), m.group(2)))
    elif name == "expect":
        m = _EXPECT.match(value)
        if not m:
            raise ValueError(
                f'{block.where}: write expect: "regex (group)" in LO..HI[; quick LO..HI], '
                f"got {value!r}"
            )
        quick = (float(m.group(4)), float(m.group(5))) if m.group(4) else None
        block.expects.append(Expect(m.group(1), (float(m.group(2)), float(m.group(3))), quick))
    elif name == "contains":
        if not (len(value) > 2 and value[0] == value[-1] == '"'):
            raise ValueError(f'{block.where}: write contains: "text", got {value!r}')
        block.contains.append(value[1:-1])
    elif name == "timeout":
        block.timeout = float(value)
    elif name == "file":
        if not value or Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError(f"{block.where}: write file: a path inside the page's folder")
        block.file = value
    else:
        raise ValueError(f"{block.where}: unknown test directive '{name}'")


def read_blocks(page: Path) -> list[Block]:
    """Every fenced block of a Markdown page with its directives (run or not)."""
    blocks: list[Block] = []
    pending: list[tuple[str, str]] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(`{3,})\s*(\{[\w-]+\}|[\w+-]*)", line)  # ```bash, ```{note}
        if m := _DIRECTIVE.match(line.strip()):
            pending.append((m.group(1), m.group(2)))
        elif fence:
            ticks, language = fence.group(1), fence.group(2).lower()
            end = i + 1
            while end < len(lines) and not lines[end].startswith(ticks):
                end += 1
            if end == len(lines):
                raise ValueError(f"{page.name}:{i + 1}: the code block is never closed")
            block = Block(page, i + 1, language, "\n".join(lines[i + 1 : end]) + "\n")
            for name, value in pending:
                _directive(block, name, value)
            pending = []
            blocks.append(block)
            i = end
        elif line.strip() and pending:
            raise ValueError(f"{page.name}:{i + 1}: a test directive must sit right above a fence")
        i += 1
    return blocks


def check_expectations(block: Block, output: str, quick: bool) -> list[str]:
    """What drifted: each expect whose number is missing or outside its band, each
    ``contains`` text not printed."""
    problems = [
        f"{block.where}: did not print {text!r}" for text in block.contains if text not in output
    ]
    for e in block.expects:
        found = re.findall(e.pattern, output)
        if not found:
            problems.append(f"{block.where}: printed nothing matching {e.pattern!r}")
            continue
        value = float(found[-1] if isinstance(found[-1], str) else found[-1][0])
        lo, hi = e.quick_band if quick and e.quick_band else e.band
        if not lo <= value <= hi:
            problems.append(f"{block.where}: {e.pattern!r} gave {value}, outside {lo}..{hi}")
    return problems


_PYTHON_DRIVER = r"""
import json, sys, traceback
ns = {"__name__": "__main__"}
for line in sys.stdin:
    try:
        exec(compile(json.loads(line), "<docs block>", "exec"), ns)
        status = "ok"
    except BaseException:
        traceback.print_exc()
        status = "error"
    sys.stdout.flush()
    sys.stderr.flush()
    print("\n@@docs-block-" + status + "@@", flush=True)
"""


class PageSession:
    """Runs one page's blocks in order: a working folder, one Python process."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env = workdir, env
        self._python: subprocess.Popen | None = None

    def run(self, block: Block, quick: bool) -> tuple[bool, str]:
        """(succeeded, output) of one block."""
        code = block.source(quick)
        if block.file:
            target = self.workdir / block.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(code)
            return True, ""
        if block.language == "bash":
            try:
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", code],
                    cwd=self.workdir,
                    env=self.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=block.timeout,
                )
            except subprocess.TimeoutExpired as e:
                return False, f"{e.output or ''}\n(timed out after {block.timeout:.0f} s)"
            return done.returncode == 0, done.stdout
        return self._run_python(code, block.timeout)

    def _run_python(self, code: str, timeout: float) -> tuple[bool, str]:
        if self._python is None:
            self._python = subprocess.Popen(
                [sys.executable, "-u", "-c", _PYTHON_DRIVER],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        proc = self._python
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            proc.stdin.write(json.dumps(code) + "\n")
            proc.stdin.flush()
            lines = []
            for line in proc.stdout:
                if line.startswith("@@docs-block-"):
                    return line.strip() == "@@docs-block-ok@@", "".join(lines)
                lines.append(line)
            return False, "".join(lines) + f"\n(the Python process ended; timeout {timeout:.0f} s)"
        finally:
            timer.cancel()

    def close(self) -> None:
        if self._python is not None:
            self._python.stdin.close()
            self._python.wait(timeout=30)


def docs_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment blocks run in: this Python's scripts (cnnkit) first on PATH, plots
    to files, tables as wide as when piped (not as the caller's terminal)."""
    env = dict(base if base is not None else os.environ)
    for name in ("COLUMNS", "LINES"):  # the pages show piped output, whatever the terminal
        env.pop(name, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MPLBACKEND"] = "Agg"
    return env
