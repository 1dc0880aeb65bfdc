"""README.md: every ```python block runs exactly as pasted, from the repository root, in a fresh interpreter."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT = 300  # seconds per block: the snippets run on the packaged SmolLM2 in seconds; a loaded CPU gets slack


def python_blocks(text: str) -> list:
    """(line of the opening fence, code) of every ```python block."""
    return [(text[:m.start()].count("\n") + 1, m["code"])
            for m in re.finditer(r"^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", text, re.S | re.M)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_a_snippet_to_run():
    assert BLOCKS, "README.md has no ```python block: the snippet a reader pastes is the one this file runs"


def test_python_blocks_are_found_with_their_lines():
    text = "intro\n```python\nprint(1)\n```\n```bash\nls\n```\n```python\nx = 2\nprint(x)\n```\n"
    assert python_blocks(text) == [(2, "print(1)\n"), (8, "x = 2\nprint(x)\n")]


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_as_pasted(line, code):
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md:{line}: the block ran past {TIMEOUT} s")
    assert r.returncode == 0, f"README.md:{line}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
