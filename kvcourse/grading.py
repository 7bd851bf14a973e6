"""Grade a large class on one machine: ``nbgrader autograde`` in N worker processes, one gradebook at the end.

nbgrader's ``autograde`` grades one submission at a time, each in a fresh kernel, so a class of 40 means
40 notebook runs back to back. :func:`autograde_parallel` splits the learners in ``submitted/`` into
``jobs`` shares and runs one ``nbgrader autograde`` per share at the same time, then merges every
worker's grades into the course's ``gradebook.db``.

Why this is safe with nbgrader's SQLite gradebook: no two processes ever write to one database file.

- SQLite lets one process write a database file at a time; the others wait for its lock, and give up
  with "database is locked" after their timeout (https://www.sqlite.org/lockingv3.html,
  https://www.sqlite.org/faq.html#q5). N ``autograde`` processes on one ``gradebook.db`` would queue
  on that lock at every write, and a slow one could fail the others.
- So each worker gets its own copy of ``gradebook.db`` (made with SQLite's backup API after
  ``generate_assignment``, so the assignment and its cells have the same ids everywhere) and its own
  ``submitted/`` folder holding links to its share of learners only. Its autograded notebooks go to the
  shared ``autograded/<learner>/<assignment>/``: a different folder for every learner.
- As each worker exits, this one process merges its grades (workers never open ``gradebook.db``): in
  one transaction per worker, it deletes the main gradebook's earlier rows for those learners and that
  assignment (what ``autograde --force`` does to a regraded submission) and copies the worker's rows
  (student, submitted assignment and notebooks, grades, comments). nbgrader's row ids are random UUIDs (``nbgrader.api.new_uuid``), so rows from
  different workers never collide.

Use it through ``make grade ASSIGNMENT=ID JOBS=4``, or::

    python -m kvcourse.grading autograde ID --jobs 4     # in the course root, after generate_assignment
    python -m kvcourse.grading bench ID --submissions 40 --jobs 2   # serial vs parallel, side by side

Each worker runs its own kernel, so memory grows with ``jobs`` (a solution notebook of this course
peaks at about 0.6 GB, docs/instructor-guide.md); more workers than CPU cores only adds waiting.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# Tables that hold one learner's graded submission, parents first (deletes go in reverse order).
SUBMISSION_TABLES = ("submitted_assignment", "submitted_notebook", "grade", "comment")


def submitted_learners(root: Path, assignment: str) -> list[str]:
    """Learners with a ``submitted/<learner>/<assignment>/`` folder, sorted (none if ``submitted/`` is missing)."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"course root {root} is not a folder: run in (or pass) the folder that holds "
                                f"nbgrader_config.py and submitted/")
    return sorted(p.parent.name for p in (root / "submitted").glob(f"*/{assignment}") if p.is_dir())


def split(learners: Sequence[str], jobs: int) -> list[list[str]]:
    """Round-robin shares, none empty: ``split([a, b, c], 2) == [[a, c], [b]]``."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int, 1 or more, got {jobs!r}")
    shares = [list(learners[k::jobs]) for k in range(jobs)]
    return [s for s in shares if s]


def copy_gradebook(src: Path, dst: Path) -> None:
    """A consistent copy of an SQLite file, through SQLite's backup API (not a file copy mid-write)."""
    _check_gradebook(src)  # sqlite3.connect would create a missing src, and copy its emptiness over dst
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def _check_gradebook(db: Path) -> None:
    """A gradebook must be an existing, non-empty file: ``sqlite3.connect`` would create an empty one instead."""
    db = Path(db)
    if not db.is_file():
        raise FileNotFoundError(f"gradebook {db} is missing: expected an SQLite file written by nbgrader "
                                f"(run nbgrader generate_assignment first)")
    if db.stat().st_size == 0:
        raise ValueError(f"gradebook {db} is an empty file, not an nbgrader gradebook")


def _ids(db: str) -> dict[str, str]:
    """SQL selecting the ids of one (learner, assignment) submission's rows in database ``db``."""
    sa = f"SELECT id FROM {db}.submitted_assignment WHERE student_id = :student AND assignment_id = :aid"
    sn = f"SELECT id FROM {db}.submitted_notebook WHERE assignment_id IN ({sa})"
    return {
        "submitted_assignment": f"id IN ({sa})",
        "submitted_notebook": f"id IN ({sn})",
        "grade": f"notebook_id IN ({sn})",
        "comment": f"notebook_id IN ({sn})",
    }


def merge_gradebook(main_db: Path, worker_db: Path, assignment: str, learners: Sequence[str]) -> int:
    """Copy ``learners``' submissions of ``assignment`` from ``worker_db`` into ``main_db``; return how many.

    Replaces what ``main_db`` held for them (a regrade), in one transaction. ``worker_db`` must be a copy
    of ``main_db`` made after ``generate_assignment`` (same assignment id).
    """
    _check_gradebook(main_db)
    _check_gradebook(worker_db)
    con = sqlite3.connect(main_db, timeout=60)
    try:
        con.execute("ATTACH DATABASE ? AS w", (str(worker_db),))
        query = "SELECT id FROM {}.assignment WHERE name = ?"
        aid = con.execute(query.format("main"), (assignment,)).fetchone()
        waid = con.execute(query.format("w"), (assignment,)).fetchone()
        if aid is None:
            raise ValueError(f"{main_db} has no assignment {assignment!r}: run nbgrader generate_assignment first")
        if waid != aid:
            raise ValueError(f"{worker_db} is not a copy of {main_db}: assignment ids {waid} and {aid} differ")
        ours, theirs = _ids("main"), _ids("w")
        merged = 0
        with con:  # one transaction: all of this worker's learners, or none
            for learner in learners:
                args = {"student": learner, "aid": aid[0]}
                for table in reversed(SUBMISSION_TABLES):
                    con.execute(f"DELETE FROM main.{table} WHERE {ours[table]}", args)
                con.execute("INSERT OR IGNORE INTO main.student SELECT * FROM w.student WHERE id = :student", args)
                for table in SUBMISSION_TABLES:
                    con.execute(f"INSERT INTO main.{table} SELECT * FROM w.{table} WHERE {theirs[table]}", args)
                query = f"SELECT count(*) FROM w.submitted_assignment WHERE {theirs['submitted_assignment']}"
                merged += con.execute(query, args).fetchone()[0]
        return merged
    finally:
        con.close()


def _env() -> dict[str, str]:
    """The environment for nbgrader: this Python's bin first on PATH (nbgrader runs ``alembic``)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return env


def autograde_parallel(assignment: str, jobs: int, root: Path | None = None, log=print) -> int:
    """``nbgrader autograde ASSIGNMENT --force`` over ``jobs`` workers; return the worst exit status.

    Run in a course root (``nbgrader_config.py``, ``gradebook.db`` from ``generate_assignment``).
    """
    root = (root or Path.cwd()).resolve()
    main_db = root / "gradebook.db"
    split([], jobs)  # jobs checked before anything runs
    learners = submitted_learners(root, assignment)
    if not learners:
        raise FileNotFoundError(f"no submissions: {root / 'submitted'} has no <learner>/{assignment}/ folder")
    if not main_db.is_file():
        raise FileNotFoundError(f"{main_db} is missing: run nbgrader generate_assignment {assignment} first")
    shares = split(learners, jobs)
    log(f"autograde {assignment}: {len(learners)} submissions over {len(shares)} workers")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvcourse-grade-") as tmp:
        workers = []
        for k, share in enumerate(shares):
            wdir = Path(tmp) / f"worker{k}"
            (wdir / "submitted").mkdir(parents=True)
            for learner in share:
                (wdir / "submitted" / learner).symlink_to(root / "submitted" / learner, target_is_directory=True)
            copy_gradebook(main_db, wdir / "gradebook.db")
            cmd = [sys.executable, "-m", "nbgrader", "autograde", assignment, "--force",
                   f"--CourseDirectory.submitted_directory={wdir / 'submitted'}",
                   f"--CourseDirectory.db_url=sqlite:///{wdir / 'gradebook.db'}"]
            out = open(wdir / "autograde.log", "w")  # closed after the worker exits
            proc = subprocess.Popen(cmd, cwd=root, env=_env(), stdout=out, stderr=subprocess.STDOUT)
            workers.append((k, share, wdir, proc, out))
        status = 0
        for k, share, wdir, proc, out in workers:
            rc = proc.wait()
            out.close()
            status = max(status, rc)
            text = (wdir / "autograde.log").read_text(errors="replace")
            for line in text.splitlines():
                log(f"[worker {k}] {line}")
            n = merge_gradebook(main_db, wdir / "gradebook.db", assignment, share)
            log(f"[worker {k}] exit {rc}: {n} of {len(share)} submissions merged into {main_db.name}"
                f" ({time.monotonic() - t0:.0f} s)")
    return status


# ------------------------------------------------------------------------------------------------ bench


def _scores(db: Path, assignment: str) -> dict[tuple[str, str], tuple]:
    """(learner, grade cell) -> (auto_score, needs_manual_grade) for one assignment."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            """SELECT sa.student_id, bc.name, g.auto_score, g.needs_manual_grade
               FROM grade g JOIN submitted_notebook sn ON g.notebook_id = sn.id
               JOIN submitted_assignment sa ON sn.assignment_id = sa.id
               JOIN assignment a ON sa.assignment_id = a.id JOIN base_cell bc ON g.cell_id = bc.id
               WHERE a.name = ?""", (assignment,)).fetchall()
    finally:
        con.close()
    return {(s, c): (score, manual) for s, c, score, manual in rows}


def bench(assignment: str, submissions: int, jobs: int, source_root: Path, keep: Path | None = None) -> int:
    """Grade ``submissions`` made-up submissions serially, then over ``jobs`` workers; print both; 0 if equal."""
    from kvcourse.instructor import sample_submissions

    if isinstance(submissions, bool) or not isinstance(submissions, int) or submissions < 1:
        raise ValueError(f"submissions must be an int, 1 or more, got {submissions!r}")
    split([], jobs)
    source_root = Path(source_root)
    needed = [source_root / "nbgrader_config.py", source_root / "solutions" / assignment,
              source_root / "notebooks" / assignment]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"bench {assignment!r} copies the course from {source_root}, which lacks "
                                f"{', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="kvcourse-grade-bench-") as tmp:
        course = Path(keep or tmp)
        course.mkdir(parents=True, exist_ok=True)
        shutil.copy(source_root / "nbgrader_config.py", course)
        for part in ("solutions", "notebooks"):
            shutil.copytree(source_root / part / assignment, course / part / assignment, dirs_exist_ok=True)
        nbgrader = [sys.executable, "-m", "nbgrader"]
        subprocess.run([*nbgrader, "generate_assignment", assignment, "--force"], cwd=course, env=_env(),
                       check=True, capture_output=True)
        kinds = list(sample_submissions(assignment, root=course))  # submitted/{full,partial,empty}
        for i in range(submissions):  # learner01 full, learner02 partial, learner03 empty, learner04 full, ...
            shutil.copytree(course / "submitted" / kinds[i % len(kinds)], course / "submitted" / f"learner{i + 1:02d}")
        for kind in kinds:
            shutil.rmtree(course / "submitted" / kind)
        fresh = course / "gradebook-after-generate.db"
        copy_gradebook(course / "gradebook.db", fresh)

        def timed(run) -> float:
            shutil.rmtree(course / "autograded", ignore_errors=True)
            copy_gradebook(fresh, course / "gradebook.db")
            t = time.monotonic()
            rc = run()
            if rc != 0:
                raise SystemExit(f"autograde exited {rc}")
            return time.monotonic() - t

        load0 = os.getloadavg()
        serial = timed(lambda: subprocess.run([*nbgrader, "autograde", assignment, "--force"], cwd=course,
                                              env=_env(), capture_output=True).returncode)
        serial_scores = _scores(course / "gradebook.db", assignment)
        parallel = timed(lambda: autograde_parallel(assignment, jobs, root=course, log=lambda _: None))
        parallel_scores = _scores(course / "gradebook.db", assignment)
        load1 = os.getloadavg()

    same = serial_scores == parallel_scores and len(serial_scores) > 0
    learners = len({s for s, _ in serial_scores})
    print(f"| {assignment}, {submissions} submissions | seconds | speedup |")
    print("|---|---|---|")
    print(f"| nbgrader autograde (serial) | {serial:.0f} | 1.00x |")
    print(f"| {jobs} workers + merge | {parallel:.0f} | {serial / parallel:.2f}x |")
    print(f"CPU cores: {os.cpu_count()}; load average at start {load0[0]:.1f}, at end {load1[0]:.1f}")
    print(f"gradebooks equal: {same} ({learners} learners, {len(serial_scores)} graded cells in each)")
    return 0 if same and learners == submissions else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcourse.grading", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("autograde", help="autograde every submission of ASSIGNMENT over --jobs workers")
    a.add_argument("assignment")
    a.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    b = sub.add_parser("bench", help="time serial against parallel autograde on made-up submissions")
    b.add_argument("assignment")
    b.add_argument("--submissions", type=int, default=40)
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    b.add_argument("--keep", type=Path, default=None, help="build the throwaway course here and keep it")
    args = p.parse_args(argv)
    try:
        if args.cmd == "autograde":
            return autograde_parallel(args.assignment, args.jobs)
        return bench(args.assignment, args.submissions, args.jobs, Path.cwd(), keep=args.keep)
    except (FileNotFoundError, ValueError) as e:  # no submissions, no gradebook, jobs < 1: say which
        print(f"python -m kvcourse.grading {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
