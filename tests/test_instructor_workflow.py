"""A fresh clone can follow docs/instructor-guide.md verbatim and grade a class.

The guide's "Rehearse" block (``make sample-submissions`` then ``make grade`` on three made-up
learners: one full, one partial, one empty) runs as written in a fresh copy of the course, and
must give the expected grades CSV and one feedback page per learner. The LMS route
(``make collect`` on a zip export) is checked the same way.

The copy holds what a clone holds for grading (Makefile, nbgrader_config.py, pyproject.toml,
solutions/, notebooks/; ``kvcourse`` is imported from the running environment). ``make`` gets
``VENV=`` a stand-in for the running environment (its entries, linked, plus the Makefile's
install stamp), so nothing is rebuilt or installed.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from venvs import make_env, stand_in_venv

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "instructor-guide.md"
REHEARSAL = "## Rehearse: grade three sample submissions"
A = "05_cache_memory"  # the quickest assignment to grade
NOTEBOOK = "cache_memory.ipynb"
LEARNERS = ("full", "partial", "empty")
COPIED = ("Makefile", "nbgrader_config.py", "pyproject.toml", "solutions", "notebooks")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def guide_commands(heading: str) -> list[str]:
    """The commands of the first ```bash block in the guide's section ``heading``."""
    text = GUIDE.read_text(encoding="utf-8")
    assert heading in text, f"{GUIDE.name} lost its section {heading!r}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no ```bash block under {heading!r} in {GUIDE.name}"
    lines = [ln.strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def fresh_clone(tmp: Path) -> Path:
    course = tmp / "course"
    course.mkdir()
    junk = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, course / name, ignore=junk)
        else:
            shutil.copy2(src, course / name)
    return course


def run_commands(course: Path, venv: Path, commands: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
    return subprocess.run(["bash", "-c", script], cwd=course, env=make_env(venv), capture_output=True, text=True,
                          timeout=timeout)


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"\n--- stdout ---\n{proc.stdout[-n:]}\n--- stderr ---\n{proc.stderr[-n:]}"


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """The guide's rehearsal block, run verbatim in a fresh clone: (course folder, finished process)."""
    commands = guide_commands(REHEARSAL)
    for needed in (f"make sample-submissions ASSIGNMENT={A}", f"make grade ASSIGNMENT={A}"):
        assert needed in commands, f"the guide's rehearsal block must run {needed!r}; it has {commands}"
    tmp = tmp_path_factory.mktemp("guide")
    course = fresh_clone(tmp)
    proc = run_commands(course, stand_in_venv(tmp, course), commands)
    assert proc.returncode == 0, f"the guide's rehearsal commands failed ({proc.returncode}):{tail(proc)}"
    return course, proc


def _grades(course: Path) -> dict[str, tuple[float, float]]:
    path = course / "grades.csv"
    assert path.is_file(), "make grade wrote no grades.csv"
    rows = [r for r in csv.DictReader(path.open(encoding="utf-8")) if r["assignment"] == A]
    return {r["student_id"]: (float(r["score"]), float(r["max_score"])) for r in rows}


def test_guide_commands_give_wrong_grades_csv(rehearsal):
    course, proc = rehearsal
    got = _grades(course)
    assert set(LEARNERS) <= set(got), f"grades.csv has no row for some sample learners: {got}{tail(proc)}"
    (full, max_score), (partial, _), (empty, _) = (got[s] for s in LEARNERS)
    assert max_score > 0
    assert full == max_score, f"the solution scored {full} of {max_score}: a grader fails a correct answer"
    assert 0 < partial < max_score, f"one solved exercise scored {partial} of {max_score}"
    assert empty == 0, f"the unsolved release scored {empty} of {max_score}"


def test_guide_commands_print_no_summary(rehearsal):
    course, proc = rehearsal
    got = _grades(course)
    for learner in LEARNERS:
        score, max_score = got[learner]
        line = f"| {learner} | {A} | {score:g} / {max_score:g} |"
        assert line in proc.stdout, f"the summary lacks {line!r}:{tail(proc)}"


def test_guide_commands_leave_learners_without_feedback(rehearsal):
    course, _ = rehearsal
    got = _grades(course)
    for learner in LEARNERS:
        html = course / "feedback" / learner / A / NOTEBOOK.replace(".ipynb", ".html")
        assert html.is_file(), f"no feedback for {learner}: {html.relative_to(course)} is missing"
        score, max_score = got[learner]
        header = f"(Score: {score:.1f} / {max_score:.1f})"
        assert header in html.read_text(encoding="utf-8"), f"{html.name} for {learner} does not say {header}"


def test_lms_zip_export_is_not_collected(tmp_path):
    """An LMS export (one folder per learner in a zip) lands in submitted/ via ``make collect``."""
    assert "make collect ASSIGNMENT=" in GUIDE.read_text(encoding="utf-8"), "the guide no longer shows make collect"
    course = fresh_clone(tmp_path)
    venv = stand_in_venv(tmp_path, course)
    archive = course / "downloaded" / A / "archive"
    archive.mkdir(parents=True)
    notebooks = {"alice": ROOT / "notebooks" / A / NOTEBOOK, "bob": ROOT / "solutions" / A / NOTEBOOK}
    with zipfile.ZipFile(archive / "lms-export.zip", "w") as z:
        for learner, src in notebooks.items():
            z.write(src, f"{learner}/{NOTEBOOK}")
    proc = run_commands(course, venv, [f"make collect ASSIGNMENT={A}"], timeout=900)
    assert proc.returncode == 0, f"make collect failed:{tail(proc)}"
    for learner, src in notebooks.items():
        got = course / "submitted" / learner / A / NOTEBOOK
        assert got.is_file(), f"{learner}'s notebook was not collected into {got.relative_to(course)}:{tail(proc)}"
        assert got.read_bytes() == src.read_bytes(), f"{learner}'s collected notebook differs from the one in the zip"


def test_grade_hides_a_submission_it_could_not_grade(tmp_path):
    """A submission autograde cannot process (here: not JSON) must make ``make grade`` fail, not score a silent 0.

    Beside it, one learner who can be graded: with none at all, generate_feedback fails for another reason.
    """
    course = fresh_clone(tmp_path)
    venv = stand_in_venv(tmp_path, course)
    for learner in ("broken", "empty"):
        (course / "submitted" / learner / A).mkdir(parents=True)
    (course / "submitted" / "broken" / A / NOTEBOOK).write_text("{this is not a notebook", encoding="utf-8")
    shutil.copy(ROOT / "notebooks" / A / NOTEBOOK, course / "submitted" / "empty" / A / NOTEBOOK)
    proc = run_commands(course, venv, [f"make grade ASSIGNMENT={A}"], timeout=900)
    assert (course / "feedback" / "empty" / A / NOTEBOOK.replace(".ipynb", ".html")).is_file(), \
        f"the learner who could be graded got no feedback:{tail(proc, 1500)}"
    assert proc.returncode != 0, f"make grade exited 0 although 'broken' was not graded:{tail(proc, 1500)}"
