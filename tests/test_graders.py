"""The graders, proven honest through real ``nbgrader autograde`` runs.

For every assignment one autograde run grades, side by side:
- ``solution``: the instructor's solution notebook, submitted as a learner -> full marks;
- ``release``: the unsolved notebook learners receive -> 0 on every graded test;
- ``m-<id>``: the solution with one learner's real mistake patched in (``[[mutant]]`` in
  ``tests/mutants.toml``) -> it loses the points of the test meant to catch it, and that test's
  message names the mistake;
- ``v-<id>``: the solution with one answer rewritten in a different but correct way (``[[correct]]``
  in the same file: einsum for matmul, a while loop, another container) -> full marks.

Each mutant is its own submission: answer cells build on each other (a later exercise calls an
earlier answer), so two mistakes in one notebook could take credit for each other's failures.
Submissions are split over ``KVCOURSE_GRADE_JOBS`` (default 2) course folders graded at once.
"""

from __future__ import annotations

import os

import pytest
from graders import (
    ASSIGNMENTS,
    ROOT,
    Mutant,
    autograde_many,
    failure_text,
    graded_cells,
    load_mutants,
    load_variants,
    make_course,
    nbgrader,
    notebook_name,
    read_release,
    read_solution,
    scores,
    submit,
)

MUTANTS = load_mutants()
VARIANTS = load_variants()
JOBS = int(os.environ.get("KVCOURSE_GRADE_JOBS", "2"))
RESULTS: list[tuple[str, str, str, float, float, str]] = []  # printed at the end of the run (conftest.py)


_GRADED: dict[str, tuple] = {}


def graded(assignment: str, tmp_path_factory):
    """Autograde solution, release and mutants of one assignment, once per test session."""
    if assignment not in _GRADED:
        base = tmp_path_factory.mktemp(assignment)
        courses = [make_course(base / f"job{j}") for j in range(JOBS)]
        for course in courses:
            release = nbgrader(course, "generate_assignment", assignment, "--force")  # registers it in the gradebook
            assert release.returncode == 0, release.stdout + release.stderr
        submissions = [("solution", read_solution(assignment)), ("release", read_release(assignment))]
        submissions += [(f"m-{m.id}", m.apply(read_solution(assignment))) for m in MUTANTS if m.assignment == assignment]
        submissions += [(f"v-{v.id}", v.apply(read_solution(assignment))) for v in VARIANTS if v.assignment == assignment]
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


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_committed_release_is_stale(assignment, tmp_path_factory):
    """notebooks/ must be exactly what nbgrader generates from solutions/ (never hand-edited)."""
    course = graded(assignment, tmp_path_factory)[0]["solution"]
    name = notebook_name(assignment)
    fresh = (course / "notebooks" / assignment / name).read_bytes()
    committed = (ROOT / "notebooks" / assignment / name).read_bytes()
    assert fresh == committed, f"notebooks/{assignment}/{name} differs from the release generated from solutions/: run make release"


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
    course_of, result, procs = graded(mutant.assignment, tmp_path_factory)
    student = f"m-{mutant.id}"
    course = course_of[student]
    got = result.get(student)
    assert got, f"submission {student} was not graded{_explain(procs)}"
    for grade_id in mutant.catches:
        assert grade_id in got, f"mutant {mutant.id} names test cell {grade_id!r}, which {mutant.assignment} lacks"
        score, max_score = got[grade_id]
        message = failure_text(course, student, mutant.assignment, grade_id)
        RESULTS.append((mutant.id, mutant.why, grade_id, max_score - score, max_score, message.split("\n")[0][:90]))
        assert score < max_score, f"mutant {mutant.id} ({mutant.why}) keeps its points on {grade_id}"
        assert mutant.message.lower() in message.lower(), (
            f"mutant {mutant.id} ({mutant.why}) fails {grade_id}, but the message does not name the mistake "
            f"(expected it to contain {mutant.message!r}):\n{message}"
        )


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_correct_answer_written_another_way_loses_points(variant, tmp_path_factory):
    course_of, result, procs = graded(variant.assignment, tmp_path_factory)
    student = f"v-{variant.id}"
    got = result.get(student)
    assert got, f"submission {student} was not graded{_explain(procs)}"
    lost = {g: s for g, s in got.items() if s[0] != s[1]}
    details = {g: failure_text(course_of[student], student, variant.assignment, g)[:500] for g in lost}
    assert not lost, f"correct variant {variant.id} ({variant.why}) loses points on {lost}: {details}"


def test_bank_has_three_mistakes_per_exercise():
    for assignment in ASSIGNMENTS:
        nb = read_solution(assignment)
        answers = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells
                   if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"]
        for cell in answers:
            n = sum(m.cell == cell and m.assignment == assignment for m in MUTANTS)
            assert n >= 3, f"{assignment}: answer cell {cell} has {n} mutants in tests/mutants.toml, want >= 3"
