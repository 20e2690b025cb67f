"""The user guide: every python example in docs/ and the README runs, and mkdocs builds it strictly."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


PAGES = [p for p in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"] if python_blocks(p)]


def test_the_guide_has_examples() -> None:
    """The guide's main pages carry runnable examples."""
    names = {p.name for p in PAGES}
    assert {"tutorial.md", "semantics.md", "time.md", "agents.md", "durability.md", "web.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_examples_run(page: Path) -> None:
    """The page's python blocks run in order in one namespace (top-level await allowed)."""
    blocks = python_blocks(page)

    async def run() -> None:
        namespace: dict[str, Any] = {"__name__": f"docs_{page.stem}"}
        for i, src in enumerate(blocks):
            code = compile(src, f"{page.name}[{i}]", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(code, namespace)
            if result is not None:
                await result

    anyio.run(run)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """mkdocs build --strict succeeds (no broken links or missing pages)."""
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "semantics" / "index.html").exists()
