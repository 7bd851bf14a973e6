"""``make grade JOBS=N`` (kvcourse/grading.py): the merge of the workers' gradebooks into the course's.

The workers themselves (real ``nbgrader autograde`` processes) are checked against the serial grader in
tests/test_classroom.py (``make test-classroom``); here, the merge alone, on gradebooks built with
nbgrader's own API. In ``make test-classroom``: each ``Gradebook`` opened runs nbgrader's ``alembic``
check in a subprocess, about 30 s of CPU for this file.
"""

import contextlib
import sqlite3
from pathlib import Path

import pytest
from nbgrader.api import Gradebook, MissingEntry

from kvcourse.grading import copy_gradebook, merge_gradebook, split

pytestmark = pytest.mark.classroom


def course_gradebook(path: Path) -> Path:
    """What ``generate_assignment`` leaves: an assignment with one notebook and two graded cells."""
    with Gradebook(f"sqlite:///{path}") as gb:
        gb.add_assignment("a1")
        gb.add_notebook("nb", "a1")
        gb.add_grade_cell("c1", "nb", "a1", max_score=2, cell_type="code")
        gb.add_grade_cell("c2", "nb", "a1", max_score=3, cell_type="code")
        gb.add_solution_cell("s1", "nb", "a1")  # an answer cell: the one that gets a comment
    return path


def worker_grades(main: Path, worker: Path, scores: dict[str, tuple[float, float]]) -> Path:
    """A worker: a copy of the course gradebook in which some learners were autograded."""
    copy_gradebook(main, worker)
    with Gradebook(f"sqlite:///{worker}") as gb:
        for learner, (s1, s2) in scores.items():
            gb.update_or_create_student(learner)
            with contextlib.suppress(MissingEntry):  # autograde --force drops the copy's earlier grades first
                gb.remove_submission("a1", learner)
            gb.add_submission("a1", learner)
            gb.find_grade("c1", "nb", "a1", learner).auto_score = s1
            gb.find_grade("c2", "nb", "a1", learner).auto_score = s2
            gb.db.commit()
    return worker


def scores(db: Path) -> dict[str, float]:
    with Gradebook(f"sqlite:///{db}") as gb:
        return {s.student.id: s.score for s in gb.find_assignment("a1").submissions}


def test_merge_loses_or_duplicates_a_workers_grades(tmp_path):
    main = course_gradebook(tmp_path / "gradebook.db")
    w0 = worker_grades(main, tmp_path / "w0.db", {"ada": (2, 3), "cy": (0, 0)})
    w1 = worker_grades(main, tmp_path / "w1.db", {"bo": (2, 1)})
    assert merge_gradebook(main, w0, "a1", ["ada", "cy"]) == 2
    assert merge_gradebook(main, w1, "a1", ["bo"]) == 1
    assert scores(main) == {"ada": 5, "bo": 3, "cy": 0}
    with Gradebook(f"sqlite:///{main}") as gb:  # every graded cell's grade and the answer's comment, once
        assert gb.find_grade("c2", "nb", "a1", "bo").auto_score == 1
        assert len(gb.find_submission("a1", "ada").notebooks[0].grades) == 2
        assert len(gb.find_submission_notebook("nb", "a1", "ada").comments) == 1


def test_regrade_keeps_the_old_submission_beside_the_new(tmp_path):
    """A second ``make grade`` replaces a learner's grades, as ``autograde --force`` does."""
    main = course_gradebook(tmp_path / "gradebook.db")
    merge_gradebook(main, worker_grades(main, tmp_path / "w0.db", {"ada": (0, 0)}), "a1", ["ada"])
    merge_gradebook(main, worker_grades(main, tmp_path / "w1.db", {"ada": (2, 3)}), "a1", ["ada"])
    assert scores(main) == {"ada": 5}
    with sqlite3.connect(main) as con:  # one submission, two grades: the old rows are gone
        assert con.execute("SELECT count(*) FROM submitted_assignment").fetchone() == (1,)
        assert con.execute("SELECT count(*) FROM grade").fetchone() == (2,)
    con.close()


def test_merge_from_a_gradebook_that_is_not_a_copy_is_refused(tmp_path):
    main = course_gradebook(tmp_path / "gradebook.db")
    other = worker_grades(course_gradebook(tmp_path / "other.db"), tmp_path / "w.db", {"ada": (2, 3)})
    with pytest.raises(ValueError, match="not a copy"):
        merge_gradebook(main, other, "a1", ["ada"])
    assert scores(main) == {}


def test_split_drops_or_repeats_a_learner():
    learners = [f"l{i}" for i in range(7)]
    shares = split(learners, 3)
    assert sorted(sum(shares, [])) == learners and len(shares) == 3
    assert split(learners[:2], 4) == [["l0"], ["l1"]]
    with pytest.raises(ValueError, match=r"jobs must be an int, 1 or more, got 0"):
        split(learners, 0)
