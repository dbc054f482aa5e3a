"""Sphinx configuration of cnnkit's documentation site (``make docs``: docs/_build/html).

Sphinx with MyST: the pages are Markdown (the how-to guides were already), autodoc builds
the API reference from the docstrings, and the build fails on any warning (``-W``). The
furo theme ships its own CSS, JavaScript and fonts, so the site needs no CDN (Sphinx adds
MathJax only to a page with formulas, and no page has any; tests/test_docs.py checks).
"""

from cnnkit.version import __version__

project = "cnnkit"
author = "the cnnkit authors"
release = __version__
version = __version__

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples", "**/.ipynb_checkpoints"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links resolve

html_theme = "furo"
html_title = f"cnnkit {__version__}"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}


# ``{cli-help}`` blocks: the help of each cnnkit command, made from the parser at build time,
# so the command-line reference cannot drift from the code.
def _cli_help_directive():
    import argparse
    import os

    from docutils import nodes
    from sphinx.util.docutils import SphinxDirective

    class CliHelp(SphinxDirective):
        has_content = False
        required_arguments = 0
        optional_arguments = 1

        def run(self):
            from cnnkit.cli import build_parser

            parser = build_parser()
            os.environ["COLUMNS"] = "88"  # argparse wraps to the terminal width
            name = self.arguments[0] if self.arguments else None
            if name is None:
                text = parser.format_help()
            else:
                subparsers = next(
                    a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                )
                text = subparsers.choices[name].format_help()
            block = nodes.literal_block(text, text)
            block["language"] = "text"  # not highlighted as Python
            return [block]

    return CliHelp


def setup(app):
    app.add_directive("cli-help", _cli_help_directive())
