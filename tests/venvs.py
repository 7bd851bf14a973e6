"""A stand-in virtual environment for tests that run the Makefile without installing anything.

``make`` builds ``$(VENV)`` when its install stamp is missing or older than pyproject.toml. Tests that
run ``make lab`` or ``make grade`` in a copy of the repository point ``VENV`` at a folder of links to
the running environment, with a fresh stamp, and check that make agrees it is up to date.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

STAMP = ".installed"  # the Makefile's $(STAMP) is $(VENV)/.installed


def make_env(venv: Path) -> dict[str, str]:
    """The caller's environment, with make told to use ``venv`` (and nothing of a parent make)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    env["MAKEFLAGS"] = f"VENV={venv}"
    env.setdefault("OMP_NUM_THREADS", "1")  # be gentle on a small CI machine
    return env


def stand_in_venv(tmp: Path, course: Path) -> Path:
    """A VENV for make: the running environment's entries, linked, plus a fresh install stamp."""
    venv = tmp / "venv"
    assert " " not in str(venv), f"make cannot take a VENV path with spaces: {venv}"
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if entry.name != STAMP:
            (venv / entry.name).symlink_to(entry)
    (venv / STAMP).touch()  # newer than the copied pyproject.toml
    # If make thought the venv out of date it would pip install into the *running* environment.
    q = subprocess.run(["make", "-q", str(venv / STAMP)], cwd=course, env=make_env(venv),
                       capture_output=True, text=True)
    assert q.returncode == 0, (
        f"make would rebuild the environment ({venv / STAMP} not up to date or not the Makefile's stamp); "
        f"this test must not install anything:\n{q.stdout}{q.stderr}")
    return venv
