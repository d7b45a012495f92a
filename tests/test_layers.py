"""The import graph: the library's modules in layers, the command line outside them.

Read from the source (every ``import``, at module level or inside a function), so a lazy
import cannot hide an edge; then confirmed by importing the library in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mpeventfd

PACKAGE = Path(mpeventfd.__file__).parent

# README, "Development": each module imports only modules after it in this list.
LAYERS = ["__init__", "_osfuncs", "_transfer", "_eventfd", "_aio", "_attach", "_create",
          "_registry", "_janitor", "_liveness", "_names", "_probe", "_errors", "_faults",
          "_core"]
CLI = ["__main__", "_cli", "_cli.demo", "_cli.bench", "_cli.benchwork", "_cli.peers",
       "_cli.tools"]


def module_name(path: Path) -> str:
    """``_eventfd``, ``_cli.bench``; a package by its own name (``__init__`` for the top)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """What ``path`` imports from the package: its modules, relative to the package, or the
    public names of ``mpeventfd`` itself (``from mpeventfd import EventFD``)."""
    name = module_name(path)
    package = [] if name == "__init__" else name.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names
                         if a.name.startswith("mpeventfd."))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
        elif node.module and node.module.split(".")[0] == "mpeventfd":
            base, node.module = [], ".".join(node.module.split(".")[1:]) or None
        else:
            continue
        if node.module:
            found.add(".".join([*base, *node.module.split(".")]))
        else:
            found.update(".".join([*base, a.name]) for a in node.names)
    return found


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_placed_in_a_layer_or_in_the_command_line() -> None:
    assert set(sources()) == set(LAYERS[:-1]) | set(CLI)


def test_each_library_module_imports_only_modules_after_it() -> None:
    src = sources()
    for i, name in enumerate(LAYERS[:-1]):
        path = src[name]
        later = set(LAYERS[i + 1:])
        wrong = imports_of(path) - later
        assert not wrong, f"{name} imports {sorted(wrong)}, which are not after it"


def test_the_library_never_imports_the_command_line() -> None:
    src = sources()
    for name in LAYERS[:-1]:
        path = src[name]
        assert not {m for m in imports_of(path) if m in CLI}, name


def test_the_demo_uses_the_public_api_only() -> None:
    # It is the program a new user reads first: what it does, a user's program can do.
    used = imports_of(sources()["_cli.demo"])
    assert used <= set(mpeventfd.__all__), sorted(used)


def test_importing_and_using_the_library_loads_no_command_line_module() -> None:
    code = ("import sys, mpeventfd\n"
            "e = mpeventfd.EventFD(1)\n"
            "e.read(); e.close()\n"
            "print(sorted(m for m in sys.modules if m.startswith('mpeventfd')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = eval(out)
    assert loaded, out
    assert not [m for m in loaded if m == "mpeventfd.__main__" or m.startswith("mpeventfd._cli")]
