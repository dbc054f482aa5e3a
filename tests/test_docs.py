"""The documentation runs: every bash and Python block of the learning path, in page order,
each page in its own folder (tests/docs_blocks.py; docs/writing-docs.md says how a block is
marked long, not runnable here, or checked against a band). Quick settings unless
CNNKIT_DOCS_FULL=1. The notebooks run with nbclient. The site itself builds with
``make docs``, which fails on any Sphinx warning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cnnkit.deploy import webapp
from docs_blocks import (
    PageSession,
    check_expectations,
    docs_env,
    read_blocks,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
# Where onnxruntime-web is (make ort-web), decided before a test points the cache elsewhere:
# the deploy page's web app copies it.
ORT_WEB = os.environ.get(webapp.ORT_WEB_ENV) or str(webapp._package_in(webapp.ort_web_cache_dir()))
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
# Every other page: the how-to guides, and reference pages whose blocks are all text.
HOWTOS = sorted(p for p in DOCS.glob("*.md") if p.name != "index.md")
NOTEBOOKS = sorted((DOCS / "tutorials").glob("*.ipynb"))
QUICK = os.environ.get("CNNKIT_DOCS_FULL") != "1"


def _run_page(page: Path, workdir: Path) -> list[str]:
    """Run a page's blocks; fail at the first that errs, return the drifted figures."""
    session = PageSession(workdir, {**docs_env(), webapp.ORT_WEB_ENV: ORT_WEB})
    problems: list[str] = []
    try:
        for block in read_blocks(page):
            if not block.runs:
                continue
            ok, output = session.run(block, QUICK)
            if not ok:
                pytest.fail(f"{block.where} failed:\n{block.source(QUICK)}\n{output[-4000:]}")
            problems += check_expectations(block, output, QUICK)
    finally:
        session.close()
    return problems


@pytest.mark.parametrize("page", TUTORIALS + HOWTOS, ids=lambda p: p.stem)
def test_page_runs(page, tmp_path):
    if not os.environ.get("CNNKIT_DATA"):
        pytest.skip("the pages read MNIST from $CNNKIT_DATA (no download here)")
    problems = _run_page(page, tmp_path)
    assert not problems, "\n".join(problems)


def test_every_page_block_is_tagged():
    """An untagged fence would be neither run nor marked as output: say which it is."""
    for page in [*TUTORIALS, *HOWTOS, DOCS / "index.md"]:
        for block in read_blocks(page):
            assert block.language, f"{block.where}: tag the block (bash, python, text, ...)"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(notebook, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not os.environ.get("CNNKIT_DATA"):
        pytest.skip("the notebooks read MNIST from $CNNKIT_DATA (no download here)")
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:  # the same quick replacements as the pages, kept in cell metadata
        for old, new in cell.get("metadata", {}).get("test", {}).get("quick", []) if QUICK else []:
            assert old in cell.source, f"{notebook.name}: quick replacement '{old}' not in cell"
            cell.source = cell.source.replace(old, new)
    os.environ["MPLBACKEND"] = "Agg"
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_site_builds_without_warnings_or_a_cdn(tmp_path):
    """make docs's build: any warning fails it; no page loads a script, style or font from
    another host."""
    import re
    import subprocess
    import sys

    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    out = tmp_path / "html"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pages = list(out.rglob("*.html"))
    assert {"index.html", "first-cnn.html", "api.html", "cli.html"} <= {p.name for p in pages}
    remote = re.compile(r"""<(?:script|link|img)[^>]+(?:src|href)=["'](?:https?:)?//""")
    loading = [p.name for p in pages if remote.search(p.read_text())]
    assert not loading, f"pages that load from another host: {loading}"
    api = (out / "reference" / "api.html").read_text()
    assert "Train a model and return its Run" in api  # autodoc read the docstrings
    cli = (out / "reference" / "cli.html").read_text()
    assert "--feature-maps" in cli  # the help, made from the parser


# --- the runner itself, on small pages written here


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text)
    return page


def test_blocks_run_in_order_sharing_a_folder_and_a_python_session(tmp_path):
    page = _page(
        tmp_path,
        "```bash\necho 41 > n.txt\n```\n\n"
        "```python\nn = int(open('n.txt').read()) + 1\n```\n\n"
        "```text\nnot run\n```\n\n"
        "<!-- test: file: d/m.txt -->\n```text\n1\n```\n\n"
        '```bash\ntest "$(cat d/m.txt)" = 1\n```\n\n'
        '<!-- test: expect: "n=(\\d+)" in 42..42 -->\n'
        "```python\nprint(f'n={n}')\n```\n",
    )
    work = tmp_path / "work"
    work.mkdir()
    assert _run_page(page, work) == []


def test_quick_replacements_bands_and_skips(tmp_path):
    page = _page(
        tmp_path,
        '<!-- test: quick: "--epochs 30" -> "--epochs 3" -->\n'
        '<!-- test: expect: "epochs (\\d+)" in 30..30; quick 3..3 -->\n'
        "```bash\necho run --epochs 30 | sed 's/run --/epochs /'\n```\n\n"
        "<!-- test: skip: needs a GPU -->\n"
        "```bash\nexit 1\n```\n",
    )
    blocks = read_blocks(page)
    assert blocks[1].skip == "needs a GPU" and not blocks[1].runs and blocks[0].runs
    assert blocks[0].source(quick=True) == "echo run --epochs 3 | sed 's/run --/epochs /'\n"
    session = PageSession(tmp_path, docs_env())
    ok, out = session.run(blocks[0], quick=True)
    assert ok and check_expectations(blocks[0], out, quick=True) == []
    assert check_expectations(blocks[0], out, quick=False) == [
        f"{blocks[0].where}: 'epochs (\\\\d+)' gave 3.0, outside 30.0..30.0"
    ]


def test_blocks_print_as_piped_whatever_the_terminal_width(tmp_path):
    """A COLUMNS exported by the caller's terminal would fold cnnkit's tables, and figures
    the pages check would be cut."""
    env = docs_env({"COLUMNS": "40", "LINES": "10", "PATH": "/usr/bin"})
    assert "COLUMNS" not in env and "LINES" not in env
    page = _page(
        tmp_path, '<!-- test: contains: "unset" -->\n```bash\necho ${COLUMNS:-unset}\n```\n'
    )
    session = PageSession(tmp_path, env)
    block = read_blocks(page)[0]
    ok, out = session.run(block, quick=True)
    assert ok and check_expectations(block, out, quick=True) == []


def test_a_failing_block_or_a_drifted_figure_fails(tmp_path):
    from _pytest.outcomes import Failed

    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(Failed, match="page.md:1 failed"):
        _run_page(_page(tmp_path, "```python\nraise SystemExit('no')\n```\n"), work)
    drifted = '<!-- test: contains: "healthy" -->\n```bash\necho overfitting\n```\n'
    assert _run_page(_page(tmp_path, drifted), work) == ["page.md:2: did not print 'healthy'"]
    with pytest.raises(ValueError, match="must sit right above a fence"):
        read_blocks(_page(tmp_path, "<!-- test: skip: GPU -->\nsome text\n```bash\nx\n```\n"))
    with pytest.raises(ValueError, match="'skip' needs its reason"):
        read_blocks(_page(tmp_path, "<!-- test: skip: -->\n```bash\nx\n```\n"))
