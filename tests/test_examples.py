"""Every script in ``examples/`` runs to exit 0 on a bounded budget and leaves nothing behind.

The scripts are found by glob, so a new example is covered as soon as it is added.  Each
runs in a fresh interpreter; the leak guard then checks that no ``mpefd-`` name it created
survives it (its children included).
"""

from __future__ import annotations

import ast
import resource
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
LIMIT = 5.0  # CPU seconds per example, its children included (each uses well under 1 s)
HANG = 600.0  # wall-clock seconds: only a hang guard (an example guards each wait with 120 s)


def test_the_examples_are_there() -> None:
    assert len(EXAMPLES) >= 8, [p.name for p in EXAMPLES]


def _children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_clean_within_5_s(path: Path) -> None:
    """Exit 0, a result printed, nothing on stderr, at most 5 s of CPU.

    An example bounds each of its own waits (a read's timeout, ``join``, ``wait_for``) and
    exits non-zero when one runs out, so a wake-up that never comes fails it by its exit
    code; ``HANG`` catches a hang outside them.  The budget is CPU time (the example's and
    its reaped children's: ``RUSAGE_CHILDREN``), which a busy loop spends and a run queue
    does not: beside busy loops an example's wall clock can grow many times over while
    its CPU time does not.
    """
    cpu0 = _children_cpu()
    done = subprocess.run(
        [sys.executable, str(path)], cwd=EXAMPLES_DIR.parent, capture_output=True,
        text=True, timeout=HANG,
    )
    cpu = _children_cpu() - cpu0
    report = f"exit {done.returncode} after {cpu:.2f} s of CPU\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, report
    assert cpu < LIMIT, report
    assert done.stdout.strip(), "an example prints its result"
    assert not done.stderr.strip(), report


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_documented_and_uses_only_the_public_api(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    doc = ast.get_docstring(tree)
    assert doc, "the module docstring says what the example shows"
    assert f"python examples/{path.name}" in doc, "the docstring says how to run it"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("mpeventfd."), node.module
            if node.module == "mpeventfd":
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, private
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("mpeventfd.")]
            assert not names, names
    last = tree.body[-1]
    assert isinstance(last, ast.If), "ends with: if __name__ == '__main__': ..."
    assert ast.unparse(last) == "if __name__ == '__main__':\n    raise SystemExit(main())"
