"""Run real ``nbgrader autograde`` on made-up submissions and read the scores back.

A throwaway course directory is built under a temporary folder: the repository's
``nbgrader_config.py`` and ``solutions/`` (the source nbgrader grades against), and one
``submitted/<student>/<assignment>/`` folder per submission. ``autograde`` runs nbgrader's own
command on every submission of an assignment at once; ``scores`` and ``failure_text`` read the
gradebook and the autograded notebooks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ASSIGNMENTS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.is_dir()) if (ROOT / "solutions").is_dir() else []


def notebook_name(assignment: str) -> str:
    (nb,) = sorted((ROOT / "solutions" / assignment).glob("*.ipynb"))
    return nb.name


def make_course(tmp: Path) -> Path:
    course = tmp / "course"
    course.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "nbgrader_config.py", course)
    if not (course / "solutions").exists():
        shutil.copytree(ROOT / "solutions", course / "solutions")
    return course


def released_courses(base: Path, assignment: str, n: int) -> list[Path]:
    """``n`` course folders with ``assignment`` generated and registered, for ``n`` autograde processes at once.

    ``nbgrader generate_assignment`` runs once; the other folders are copies of the first (its gradebook and
    release included), which saves one nbgrader run per extra folder.
    """
    first = make_course(base / "job0")
    release = nbgrader(first, "generate_assignment", assignment, "--force")  # registers it in the gradebook
    assert release.returncode == 0, release.stdout + release.stderr
    courses = [first]
    for j in range(1, n):
        courses.append(Path(shutil.copytree(first, base / f"job{j}" / "course")))  # makes job{j}/ too
    return courses


def grading_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # nbgrader shells out to alembic
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def submit(course: Path, student: str, assignment: str, nb) -> Path:
    folder = course / "submitted" / student / assignment
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / notebook_name(assignment)
    nbformat.write(nb, path)
    return path


def autograde_many(courses: list[Path], assignment: str, *extra: str) -> list[subprocess.CompletedProcess]:
    """Autograde several course folders at once (one nbgrader process each, one core each)."""
    cmd = [str(BIN / "nbgrader"), "autograde", assignment, "--force", *extra]
    procs = [subprocess.Popen(cmd, cwd=c, env=grading_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in courses]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=3000)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "nbgrader"), *args], cwd=course, env=grading_env(),
                          capture_output=True, text=True, timeout=600)


def scores(course: Path, assignment: str) -> dict[str, dict[str, tuple[float, float]]]:
    """{student: {test grade_id: (score, max_score)}} from the gradebook."""
    from nbgrader.api import Gradebook

    out: dict[str, dict[str, tuple[float, float]]] = {}
    nb_id = Path(notebook_name(assignment)).stem
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for sub in gb.assignment_submissions(assignment):
            nb = gb.find_submission_notebook(nb_id, assignment, sub.student.id)
            out[sub.student.id] = {g.name: (float(g.score), float(g.max_score)) for g in nb.grades
                                   if g.cell_type == "code"}
    return out


def autograded_path(course: Path, student: str, assignment: str) -> Path:
    """Where ``nbgrader autograde`` wrote ``student``'s executed notebook."""
    return course / "autograded" / student / assignment / notebook_name(assignment)


def failure_text(course: Path, student: str, assignment: str, grade_id: str) -> str:
    """The error a learner sees under test cell ``grade_id`` of their autograded notebook."""
    path = autograded_path(course, student, assignment)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == grade_id:
            parts = []
            for o in cell.get("outputs", []):
                if o.output_type == "error":
                    parts.append(f"{o.ename}: {o.evalue}")
                elif o.output_type == "stream" and o.name == "stderr":
                    parts.append(o.text)
            return "\n".join(parts)
    raise KeyError(f"no cell {grade_id!r} in {path}")


def graded_cells(nb) -> list[str]:
    return [c.metadata["nbgrader"]["grade_id"] for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("grade") and c.cell_type == "code"]


def read_solution(assignment: str):
    return nbformat.read(ROOT / "solutions" / assignment / notebook_name(assignment), as_version=4)


def read_release(assignment: str):
    return nbformat.read(ROOT / "notebooks" / assignment / notebook_name(assignment), as_version=4)


@dataclass
class Mutant:
    """A learner's mistake: replace ``find`` by ``replace`` in the solution cell ``cell``."""

    id: str
    assignment: str
    cell: str
    find: str
    replace: str
    catches: list[str]
    message: str
    why: str = ""
    extra: dict = field(default_factory=dict)

    def apply(self, nb):
        cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == self.cell]
        if len(cells) != 1:
            raise ValueError(f"mutant {self.id}: no single cell {self.cell!r} in {self.assignment}")
        src = cells[0].source
        if src.count(self.find) != 1:
            raise ValueError(f"mutant {self.id}: {self.find!r} occurs {src.count(self.find)} times in cell "
                             f"{self.cell!r}; the mutant bank is stale, update tests/mutants/{self.assignment}.toml")
        cells[0].source = src.replace(self.find, self.replace)
        return nb


@dataclass
class Variant:
    """A learner's answer that is correct but written differently (``[[correct]]`` in the bank): full marks."""

    id: str
    assignment: str
    cell: str
    find: str
    replace: str
    why: str = ""

    apply = Mutant.apply


MUTANT_BANK = ROOT / "tests" / "mutants"


def _bank(folder: Path, key: str) -> list[dict]:
    """Every ``[[key]]`` entry of the bank's files (one per assignment, ``NN_topic.toml``), in file order."""
    entries = []
    for path in sorted(folder.glob("*.toml")):
        for entry in tomllib.loads(path.read_text()).get(key, []):
            if entry.get("assignment") != path.stem:
                raise ValueError(f"{path.name}: entry {entry.get('id')!r} is for {entry.get('assignment')!r}; "
                                 f"each file holds its own assignment's entries")
            entries.append(entry)
    return entries


def load_mutants(folder: Path = MUTANT_BANK) -> list[Mutant]:
    return [Mutant(**m) for m in _bank(folder, "mutant")]


def load_variants(folder: Path = MUTANT_BANK) -> list[Variant]:
    return [Variant(**m) for m in _bank(folder, "correct")]
