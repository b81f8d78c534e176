"""The package's layers, read from its source with `ast` (imports inside functions included): the model
code reaches the shapes world, the data code and the backbone builders only through `hub.resolve`, and no
modules import each other, directly or around a loop."""

import ast
import graphlib
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "minigpt5_cli"
APART = ("toyworld", "data", "builders")  # what modeling/ never imports


def graph(root: Path) -> dict[str, set[str]]:
    """Each module of the package at `root` -> the modules of the package it imports."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: _imports(name, path, files) for name, path in files.items()}


def _imports(name: str, path: Path, known) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, or `level - 1` packages above it
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            # `from a import b`: the module a.b where there is one, else a name defined in a
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {m for m in found if m in known and m != name}


def crossings(root: Path) -> dict[str, set[str]]:
    """Modules of modeling/ -> the modules they import from the layers kept apart from it."""
    found = {name: {m for m in imported if m.partition(".")[2].split(".")[0] in APART}
             for name, imported in graph(root).items() if name.startswith(f"{root.name}.modeling.")}
    return {name: imported for name, imported in found.items() if imported}


def cycle(root: Path) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph(root)).prepare()
    except graphlib.CycleError as e:
        return e.args[1]
    return None


def test_modeling_imports_no_shapes_world_data_or_builders():
    assert crossings(PACKAGE) == {}


def test_no_import_cycle():
    found = cycle(PACKAGE)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_checks_find_a_cycle_and_a_crossing(tmp_path):
    """A model module importing the data code lazily, which imports it back at the top: both checks fail."""
    files = {"__init__.py": "", "modeling/__init__.py": "", "data/__init__.py": "", "database.py": "",
             "modeling/model.py": "from pkg import database\n\n\ndef f():\n    from ..data.collate import TARGETS\n",
             "data/collate.py": "from pkg.modeling import model\n\nTARGETS = ()\n"}
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    assert crossings(tmp_path / "pkg") == {"pkg.modeling.model": {"pkg.data.collate"}}
    assert set(cycle(tmp_path / "pkg")) == {"pkg.data.collate", "pkg.modeling.model"}
