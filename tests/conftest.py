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
