"""The package's layers (docs/architecture.md): a module imports only from its own layer or
below, and no import cycle exists. Imports are read from the source (every ``import`` and
``from ... import``, function-local ones included), nothing is executed."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Top to bottom. A module belongs to the layer with the longest prefix of its dotted name.
LAYERS = [
    (
        "entry points",
        ["cnnkit", "cnnkit.__main__", "cnnkit.cli", "cnnkit.commands", "cnnkit.bench"],
    ),
    ("deploy", ["cnnkit.deploy"]),
    ("train", ["cnnkit.train"]),
    ("runs", ["cnnkit.runs"]),
    ("evaluate", ["cnnkit.evaluate"]),
    ("data", ["cnnkit.data"]),
    ("models", ["cnnkit.models"]),
    ("foundation", ["cnnkit.config", "cnnkit.device", "cnnkit.progress", "cnnkit.version"]),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, package: str = "cnnkit") -> dict[str, set[str]]:
    """{module: the package's modules it imports} for every .py file under root/package."""
    files = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # 'from pkg import submodule' imports the submodule
                targets = [
                    f"{source}.{a.name}" if f"{source}.{a.name}" in files else source
                    for a in node.names
                ]
            else:
                continue
            for target in targets:
                while target and target not in files:  # 'cnnkit.data.x.y' -> nearest module
                    target = target.rpartition(".")[0]
                if target and target != name and target.split(".")[0] == package:
                    edges.add(target)
        graph[name] = edges
    return graph


def layer_of(module: str, layers=LAYERS) -> int:
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and the docs")
    return best


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """'a -> b (layer of a below layer of b)' for each import that runs upward."""
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target, layers) < layer_of(module, layers):
                out.append(
                    f"{module} ({layers[layer_of(module, layers)][0]}) imports {target} "
                    f"({layers[layer_of(target, layers)][0]})"
                )
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. A package's __init__ importing its own
    submodules is not a cycle unless a submodule imports the package back."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_a_layer_above_it():
    graph = import_graph(SRC)
    assert len(graph) > 30  # the parser found the package
    assert upward_imports(graph) == []


def test_no_import_cycle():
    assert find_cycle(import_graph(SRC)) is None


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "cnnkit" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_a_planted_upward_import_is_caught(tmp_path):
    root = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "config.py": "",
            "data/__init__.py": "",
            "data/folder.py": "def f():\n    from cnnkit.train.loop import fit\n",
            "train/__init__.py": "",
            "train/loop.py": "from ..data import folder\nfrom cnnkit import config\n",
        },
    )
    graph = import_graph(root)
    assert graph["cnnkit.train.loop"] == {"cnnkit.data.folder", "cnnkit.config"}
    assert upward_imports(graph) == ["cnnkit.data.folder (data) imports cnnkit.train.loop (train)"]


def test_a_planted_cycle_is_caught(tmp_path):
    root = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "models/__init__.py": "from .registry import register\n",
            "models/registry.py": "from . import seed\n",
            "models/seed.py": "from .registry import register\n",
        },
    )
    cycle = find_cycle(import_graph(root))
    assert cycle is not None and set(cycle) == {"cnnkit.models.registry", "cnnkit.models.seed"}


def test_the_root_package_is_an_entry_point_that_lower_modules_may_not_import(tmp_path):
    root = _plant(tmp_path, {"__init__.py": "", "device.py": "from cnnkit import __version__\n"})
    assert upward_imports(import_graph(root)) == [
        "cnnkit.device (foundation) imports cnnkit (entry points)"
    ]


@pytest.mark.parametrize("module", ["cnnkit.runs.run", "cnnkit.models.factory"])
def test_every_module_has_a_layer(module):
    assert 0 <= layer_of(module) < len(LAYERS)
