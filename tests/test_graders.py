"""The graders, proven honest: every learner's mistake in the bank is caught, every correct answer keeps its marks.

Real ``nbgrader autograde`` grades, per assignment, side by side:
- ``solution``: the instructor's solution notebook, submitted as a learner -> full marks;
- ``release``: the unsolved notebook learners receive -> 0 on every graded test;
- a sample of the bank below: its first mutant.

The solution's autograded copy is also read for errors in any cell, graded or not
(``test_solution_notebook_crashes``): nbgrader has already run it top to bottom offline, so a second run under
nbval would prove nothing more.

The whole bank goes through ``tests/forkgrade.py``, which runs the solution once and forks a copy of its
kernel state before the patched cell (a fresh kernel per submission spent ~80 % of its time re-importing
and re-running the cells before the answer):
- ``m-<id>``: the solution with one learner's real mistake patched in (``[[mutant]]`` in
  ``tests/mutants/NN_topic.toml``) -> the test meant to catch it fails, and its message names the mistake;
- ``v-<id>``: the solution with one answer rewritten in a different but correct way (``[[correct]]``
  in the same file: einsum for matmul, a while loop, another container) -> every test cell passes.

``test_fork_grader_disagrees_with_nbgrader`` keeps the shortcut honest: on the solution and on the sample,
the fork runner's verdict and message on every cell it ran must be nbgrader's.

Each mutant is its own submission: answer cells build on each other (a later exercise calls an
earlier answer), so two mistakes in one notebook could take credit for each other's failures.
Real-nbgrader submissions are split over ``KVCOURSE_GRADE_JOBS`` (default 2) course folders graded at
once; the fork runner keeps as many children running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nbformat
import pytest
from graders import (
    ASSIGNMENTS,
    ROOT,
    Mutant,
    autograde_many,
    autograded_path,
    failure_text,
    graded_cells,
    grading_env,
    load_mutants,
    load_variants,
    notebook_name,
    read_release,
    read_solution,
    released_courses,
    scores,
    submit,
)
from nbformat import NotebookNode

MUTANTS = load_mutants()
VARIANTS = load_variants()
JOBS = int(os.environ.get("KVCOURSE_GRADE_JOBS", "2"))
RESULTS: list[tuple[str, str, str, float, float, str]] = []  # printed at the end of the run (conftest.py)


_GRADED: dict[str, tuple] = {}
_FORKED: dict[str, dict] = {}


def sample(assignment: str) -> list[str]:
    """The bank entries also graded by real nbgrader: the assignment's first mutant.

    A mutant exercises both of the fork runner's paths (a patched cell, then a failing test and its message); a
    correct variant only the patch, which the mutant and the solution's passing cells already cover, so real
    nbgrader no longer grades one (it cost a whole notebook run per assignment).
    """
    return [f"m-{m.id}" for m in MUTANTS if m.assignment == assignment][:1]


ENTRIES = {f"m-{m.id}": m for m in MUTANTS} | {f"v-{v.id}": v for v in VARIANTS}  # by student name


def patched(student: str, assignment: str) -> NotebookNode:
    return ENTRIES[student].apply(read_solution(assignment))


def graded(assignment: str, tmp_path_factory):
    """Autograde solution, release and the sample of one assignment with real nbgrader, once per session."""
    if assignment not in _GRADED:
        courses = released_courses(tmp_path_factory.mktemp(assignment), assignment, JOBS)
        submissions = [("solution", read_solution(assignment)), ("release", read_release(assignment))]
        submissions += [(s, patched(s, assignment)) for s in sample(assignment)]
        course_of = {}
        for i, (student, nb) in enumerate(submissions):
            course_of[student] = courses[i % JOBS]
            submit(course_of[student], student, assignment, nb)
        procs = autograde_many(courses, assignment)
        result = {}
        for course in courses:
            result.update(scores(course, assignment))
        _GRADED[assignment] = (course_of, result, procs)
    return _GRADED[assignment]


def forked(assignment: str, tmp_path_factory) -> dict:
    """Every mutant and variant of one assignment through tests/forkgrade.py, once per session."""
    if assignment not in _FORKED:
        subs = []
        for m in (m for m in MUTANTS if m.assignment == assignment):
            subs.append({"student": f"m-{m.id}", "until": m.catches})
        for v in (v for v in VARIANTS if v.assignment == assignment):
            subs.append({"student": f"v-{v.id}", "until": []})  # every later test cell must pass too
        for sub in subs:
            entry = ENTRIES[sub["student"]]
            nb = patched(sub["student"], assignment)
            (cell,) = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == entry.cell]
            sub["patches"] = {entry.cell: cell.source}
        base = tmp_path_factory.mktemp(f"fork-{assignment}")
        request, result = base / "request.json", base / "result.json"
        request.write_text(json.dumps({"notebook": str(ROOT / "solutions" / assignment / notebook_name(assignment)),
                                       "jobs": JOBS, "timeout": 1200, "submissions": subs}))
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "forkgrade.py"), str(request), str(result)],
                              env=grading_env(), capture_output=True, text=True, timeout=3000, cwd=base)
        assert proc.returncode == 0 and result.exists(), f"tests/forkgrade.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        _FORKED[assignment] = json.loads(result.read_text())
    return _FORKED[assignment]


def points_of(assignment: str) -> dict[str, float]:
    return {c.metadata["nbgrader"]["grade_id"]: float(c.metadata["nbgrader"].get("points", 0))
            for c in read_solution(assignment).cells if c.metadata.get("nbgrader", {}).get("grade")}


def fork_verdict(results: dict, student: str) -> dict:
    got = results.get(student)
    assert got, f"tests/forkgrade.py returned nothing for {student}"
    assert "__crash__" not in got, f"tests/forkgrade.py could not run {student}:\n{got['__crash__'][-3000:]}"
    return got


def fork_message(verdict: dict) -> str:
    """The learner-visible text of a failed cell: what it wrote to stderr, then the error."""
    return "\n".join(p for p in (verdict["stderr"], verdict["error"]) if p)


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_committed_release_is_stale(assignment, tmp_path_factory):
    """notebooks/ must be exactly what nbgrader generates from solutions/ (never hand-edited)."""
    course = graded(assignment, tmp_path_factory)[0]["solution"]
    name = notebook_name(assignment)
    fresh = (course / "notebooks" / assignment / name).read_bytes()
    committed = (ROOT / "notebooks" / assignment / name).read_bytes()
    assert fresh == committed, f"notebooks/{assignment}/{name} differs from the release generated from solutions/: run make release"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solution_notebook_crashes(assignment, tmp_path_factory):
    """Every cell of the solution, graded or not, runs offline without an error (nbgrader ran it top to bottom)."""
    course_of, result, procs = graded(assignment, tmp_path_factory)
    assert result.get("solution"), f"solution of {assignment} was not graded{_explain(procs)}"
    nb = nbformat.read(autograded_path(course_of["solution"], "solution", assignment), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code if c.source.strip()), f"{assignment}: nbgrader left cells of the solution unrun"
    errors = [(i, o.get("ename"), o.get("evalue", "")[:300]) for i, c in enumerate(nb.cells)
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{assignment}: the solution raises when run top to bottom (cell index, error): {errors}"


def _explain(procs) -> str:
    return "".join(f"\nnbgrader autograde said:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}" for p in procs)


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solution_loses_points(assignment, tmp_path_factory):
    course_of, result, procs = graded(assignment, tmp_path_factory)
    course = course_of["solution"]
    got = result.get("solution")
    assert got, f"solution of {assignment} was not graded{_explain(procs)}"
    expected_cells = set(graded_cells(read_solution(assignment)))
    assert set(got) == expected_cells
    lost = {g: s for g, s in got.items() if s[0] != s[1]}
    details = {g: failure_text(course, "solution", assignment, g)[:500] for g in lost}
    assert not lost, f"{assignment}: the solution loses points on {lost}: {details}"
    assert sum(m for _, m in got.values()) > 0


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_unsolved_release_earns_points(assignment, tmp_path_factory):
    _, result, procs = graded(assignment, tmp_path_factory)
    got = result.get("release")
    assert got, f"release of {assignment} was not graded{_explain(procs)}"
    earned = {g: s for g, s in got.items() if s[0] > 0}
    assert not earned, f"{assignment}: the unsolved release earns points on {earned}"


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_mutant_escapes_its_test(mutant: Mutant, tmp_path_factory):
    got = fork_verdict(forked(mutant.assignment, tmp_path_factory), f"m-{mutant.id}")
    for grade_id in mutant.catches:
        assert grade_id in got, f"mutant {mutant.id} names test cell {grade_id!r}, which {mutant.assignment} lacks"
        verdict = got[grade_id]
        message = fork_message(verdict)
        points = points_of(mutant.assignment)[grade_id]
        RESULTS.append((mutant.id, mutant.why, grade_id, 0 if verdict["ok"] else points, points,
                        message.split("\n")[0][:90]))
        assert not verdict["ok"], f"mutant {mutant.id} ({mutant.why}) keeps its points on {grade_id}"
        assert mutant.message.lower() in message.lower(), (
            f"mutant {mutant.id} ({mutant.why}) fails {grade_id}, but the message does not name the mistake "
            f"(expected it to contain {mutant.message!r}):\n{message}"
        )


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_correct_answer_written_another_way_loses_points(variant, tmp_path_factory):
    got = fork_verdict(forked(variant.assignment, tmp_path_factory), f"v-{variant.id}")
    expected = set(graded_cells(read_solution(variant.assignment)))
    assert set(got) == expected, f"variant {variant.id}: test cells run {sorted(got)}, expected {sorted(expected)}"
    lost = {g: fork_message(v)[:500] for g, v in got.items() if not v["ok"]}
    assert not lost, f"correct variant {variant.id} ({variant.why}) loses points on {lost}"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_fork_grader_disagrees_with_nbgrader(assignment, tmp_path_factory):
    """The fork runner's verdicts and messages equal real nbgrader's, on the solution and the sample."""
    course_of, result, procs = graded(assignment, tmp_path_factory)
    fork = forked(assignment, tmp_path_factory)
    for student in ["solution", *sample(assignment)]:
        real = result.get(student)
        assert real, f"{student} of {assignment} was not graded by nbgrader{_explain(procs)}"
        ours = fork_verdict(fork, student)
        assert ours, f"the fork runner ran no test cell of {student}"
        for grade_id, verdict in ours.items():
            score, max_score = real[grade_id]
            assert verdict["ok"] == (score == max_score), (
                f"{student}, {grade_id}: nbgrader scored {score} of {max_score}, the fork runner says "
                f"{'pass' if verdict['ok'] else 'fail'}: {fork_message(verdict)[:500]}")
            if not verdict["ok"]:
                text = "".join(failure_text(course_of[student], student, assignment, grade_id).split())
                assert "".join(fork_message(verdict).split()) in text, (
                    f"{student}, {grade_id}: the fork runner's message is not nbgrader's:\n"
                    f"fork: {fork_message(verdict)[:800]}\nnbgrader: {text[:800]}")


def test_bank_has_three_mistakes_per_exercise():
    for assignment in ASSIGNMENTS:
        nb = read_solution(assignment)
        answers = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells
                   if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"]
        for cell in answers:
            n = sum(m.cell == cell and m.assignment == assignment for m in MUTANTS)
            assert n >= 3, f"{assignment}: answer cell {cell} has {n} mutants in tests/mutants/{assignment}.toml, want >= 3"
