"""The project's promises to a new user: the README commands, CI, the examples and the benchmark run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_commands() -> None:
    """The quick start is two commands: run the main job, run the tests."""
    cmds = _quick_start_commands()
    assert len(cmds) == 2
    assert "pytest" not in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs the README's test command verbatim, nothing less."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert _quick_start_commands()[1] in ci.splitlines()


def test_agents_example_runs() -> None:
    """examples/agents.py runs and its checks pass."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "agents.py")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "exactly one confirmation" in out.stdout


def test_transfer_example_runs() -> None:
    """examples/transfer.py runs and reports that its invariant holds."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "transfer.py")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "invariant holds" in out.stdout


def test_benchmark_quick_run(tmp_path: Path) -> None:
    """python -m astm.bench --quick runs every case and draws its chart (figures are not asserted: noisy)."""
    chart = tmp_path / "chart.png"
    out = subprocess.run(
        [sys.executable, "-m", "astm.bench", "--quick", "--json", "--plot", str(chart)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    import json

    rows = json.loads(out.stdout)
    assert len(rows) >= 6
    assert all(r["astm"] > 0 and r["baseline"] > 0 for r in rows)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
