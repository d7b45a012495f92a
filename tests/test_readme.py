"""Every ``python`` block of the README runs as pasted into a file (in a subprocess).

A block whose first line says ``# needs X`` is skipped when X cannot be imported here.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from helpers import python

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(block: str) -> None:
    needs = re.match(r"# needs (\w+)", block)
    if needs and importlib.util.find_spec(needs.group(1)) is None:
        pytest.skip(f"needs {needs.group(1)}")
    out = python(block)
    assert out.returncode == 0, out.stderr


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 5
