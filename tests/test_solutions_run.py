"""Every ungraded extra runs top to bottom offline (nbval, outputs not compared).

The solution notebooks are run top to bottom by real nbgrader in tests/test_graders.py, whose
``test_solution_notebook_crashes`` reads every cell of the autograded solution for an error (a second run
here under nbval cost a whole notebook run per assignment and proved nothing more).

The extras (notebooks/extras/, served by `make lab` next to the assignments) are not graded: each
"Your turn" cell raises NotImplementedError until the learner writes it, and a collapsed answer cell
right after it defines the same function, so the notebook runs top to bottom and its checks are exercised.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks" / "extras").glob("*.ipynb"))


def run_nbval(path: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "--nbval-cell-timeout=300",
         "-p", "no:cacheprovider", "-q", path],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout.splitlines()[-1]


def test_extras_exist():
    assert EXTRAS, "notebooks/extras/ holds no notebook: the workshop's reserve for fast groups is gone"


@pytest.mark.parametrize("notebook", EXTRAS)
def test_extra_notebook_runs(notebook):
    run_nbval(notebook)


def defined_functions(source: str) -> set[str]:
    return {node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("notebook", EXTRAS)
def test_extra_notebook_is_ungraded_with_collapsed_answers(notebook):
    """No nbgrader cells (nothing there is graded); every exercise stub is followed by its collapsed answer."""
    nb = nbformat.read(ROOT / notebook, as_version=4)
    assert not [c for c in nb.cells if "nbgrader" in c.metadata], f"{notebook} has nbgrader cells: extras are not graded"
    code = [c for c in nb.cells if c.cell_type == "code"]
    stubs = [i for i, c in enumerate(code) if "raise NotImplementedError" in c.source]
    assert stubs, f"{notebook} has no exercise for the learner (no cell raising NotImplementedError)"
    for i in stubs:
        names = defined_functions(code[i].source)
        answer = code[i + 1] if i + 1 < len(code) else None
        assert names and answer is not None, f"{notebook}: exercise cell {i} defines no function or has no answer cell"
        assert answer.metadata.get("jupyter", {}).get("source_hidden"), (
            f"{notebook}: the answer to {sorted(names)} is not collapsed (metadata jupyter.source_hidden)")
        assert names <= defined_functions(answer.source), f"{notebook}: the cell after {sorted(names)} does not define it"
        assert "NotImplementedError" not in answer.source, f"{notebook}: the answer to {sorted(names)} is a stub"
