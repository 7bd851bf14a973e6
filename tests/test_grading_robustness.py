"""What learners do to notebooks must not fool the grader (real nbgrader autograde, assignment 05).

One autograde run grades six submissions built from the solution (or the release): an infinite
loop, a deleted test cell, a duplicated test cell, an answer that prints warnings, a notebook
saved with (faked) outputs, and a wrong answer that monkeypatches the visible checks to pass.
"""

from __future__ import annotations

import os

import nbformat
import pytest
from graders import autograde_many, failure_text, read_release, read_solution, released_courses, scores, submit

A = "05_cache_memory"
LOOP_TIMEOUT = 60  # seconds a cell may run in this test's grading (the course default is 180): every
# legitimate cell of notebook 05 takes a few seconds at most alone (the imports), so 60 s leaves room for a machine
# loaded many times over; the infinite loop costs this test those 60 s


def _cell(nb, grade_id):
    (cell,) = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id]
    return cell


def _infinite_loop():
    nb = read_solution(A)
    c = _cell(nb, "a05_def_max_concurrent")
    c.source = c.source.replace("    free = gpu_bytes - weight_bytes", "    while True:\n        pass")
    return nb


def _deleted_test():
    nb = read_solution(A)
    nb.cells.remove(_cell(nb, "a05_bytes_per_token"))
    return nb


def _duplicated_test():
    nb = read_solution(A)
    c = _cell(nb, "a05_llama70b")
    nb.cells.insert(nb.cells.index(c) + 1, nbformat.from_dict(dict(c)))
    return nb


def _warnings():
    nb = read_solution(A)
    c = _cell(nb, "a05_def_bytes_per_token")
    c.source = c.source.replace(
        "    ### BEGIN SOLUTION\n",
        "    ### BEGIN SOLUTION\n    import warnings\n    warnings.warn('a learner left a warning in', UserWarning)\n")
    return nb


def _faked_outputs():
    nb = read_release(A)  # unsolved, but every cell claims to have run fine
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            c.execution_count = i + 1
            c.outputs = [nbformat.v4.new_output("stream", name="stdout", text="all tests passed\n")]
    return nb


PATCH = """
import kvcourse.checks as _checks
for _name in dir(_checks):
    if _name.startswith("expect"):
        setattr(_checks, _name, lambda *a, **k: None)
        globals()[_name] = getattr(_checks, _name)
"""


def _monkeypatched_checks():
    nb = read_solution(A)
    c = _cell(nb, "a05_def_bytes_per_token")
    c.source = c.source.replace("return 2 * num_layers", "return num_layers") + "\n" + PATCH
    return nb


SUBMISSIONS = {
    "loop": _infinite_loop, "deleted": _deleted_test, "duplicated": _duplicated_test, "warnings": _warnings,
    "outputs": _faked_outputs, "patched": _monkeypatched_checks,
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    courses = released_courses(tmp_path_factory.mktemp("robust"), A, 2)
    course_of = {}
    for student, build in SUBMISSIONS.items():
        # the loop alone in one process: it waits out LOOP_TIMEOUT while the other five are graded in the other
        course_of[student] = courses[0] if student == "loop" else courses[1]
        submit(course_of[student], student, A, build())
    old = os.environ.get("KVCOURSE_CELL_TIMEOUT")
    os.environ["KVCOURSE_CELL_TIMEOUT"] = str(LOOP_TIMEOUT)
    try:
        autograde_many(courses, A)
    finally:
        os.environ.pop("KVCOURSE_CELL_TIMEOUT") if old is None else os.environ.__setitem__("KVCOURSE_CELL_TIMEOUT", old)
    result = {}
    for course in courses:
        result.update(scores(course, A))
    full = {g: m for g, (_, m) in scores(course_of["deleted"], A).get("deleted", {}).items()} or None
    return course_of, result, full


def _total(result, student):
    return sum(s for s, _ in result[student].values()), sum(m for _, m in result[student].values())


def test_infinite_loop_blocks_grading_of_other_cells(graded):
    course_of, result, _ = graded
    got = result["loop"]
    assert got["a05_max_concurrent"][0] == 0
    others = {g: s for g, s in got.items() if g != "a05_max_concurrent"}
    assert all(s == m for s, m in others.values()), f"cells after the timeout were not graded normally: {others}"
    assert "timeout" in failure_text(course_of["loop"], "loop", A, "a05_max_concurrent").lower()


def test_deleted_test_cell_is_not_graded(graded):
    _, result, _ = graded
    got = result["deleted"]
    assert "a05_bytes_per_token" in got, "a deleted test cell must be restored from the source and graded"
    assert got["a05_bytes_per_token"][0] == got["a05_bytes_per_token"][1]


def test_duplicated_test_cell_counts_twice(graded):
    _, result, _ = graded
    score, max_score = _total(result, "duplicated")
    _, solution_max = _total(result, "deleted")
    assert max_score == solution_max and score == max_score


def test_warning_in_correct_answer_scores_zero(graded):
    _, result, _ = graded
    score, max_score = _total(result, "warnings")
    assert score == max_score, f"a correct answer that warns lost points: {result['warnings']}"


def test_saved_outputs_are_believed(graded):
    _, result, _ = graded
    assert _total(result, "outputs")[0] == 0


def test_monkeypatched_checks_pass_a_wrong_answer(graded):
    course_of, result, _ = graded
    score, max_score = result["patched"]["a05_bytes_per_token"]
    assert score == 0, "hidden tests must catch a wrong answer whose visible checks were patched out"
    assert "kv_bytes_per_token" in failure_text(course_of["patched"], "patched", A, "a05_bytes_per_token")
