"""Fixtures shared by the whole test suite. Keep this file small."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def pyproject(repo_root: Path) -> dict:
    """pyproject.toml, parsed."""
    return tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))


def pytest_terminal_summary(terminalreporter):
    """Print the mutant table (mutant -> test -> points lost) that tests/test_graders.py collected."""
    import sys

    mod = sys.modules.get("test_graders")
    rows = getattr(mod, "RESULTS", None)
    if not rows:
        return
    tr = terminalreporter
    tr.section("graders vs mutants (learners' mistakes)")
    tr.write_line(f"{'mutant':34s} {'test cell':28s} {'lost':>9s}  message")
    for mid, _why, grade_id, lost, max_score, message in sorted(rows):
        tr.write_line(f"{mid:34s} {grade_id:28s} {lost:g} of {max_score:g}  {message}")
