"""Instructor helpers around nbgrader: sample submissions, and a readable summary of grades.

nbgrader does the real work (``generate_assignment``, ``zip_collect``, ``autograde``,
``generate_feedback``, ``export``); the Makefile wraps those. This module only adds what
nbgrader lacks for a workshop without JupyterHub:

- ``python -m kvcourse.instructor sample ID``: three made-up submissions of assignment ID in
  ``submitted/`` (``full``: the solution; ``partial``: the first answer solved, the rest not;
  ``empty``: the release as handed out), to rehearse grading before the class does.
- ``python -m kvcourse.instructor summary [grades.csv]``: per learner and assignment, score of
  max, from the CSV that ``nbgrader export`` writes.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import nbformat

ROOT = Path.cwd()


def _answer_ids(nb) -> list[str]:
    return [c.metadata["nbgrader"]["grade_id"] for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution")]


def sample_submissions(assignment: str, root: Path = ROOT, solved: int = 1) -> dict[str, Path]:
    """Write submitted/{full,partial,empty}/ID/<notebook>.ipynb; return their paths."""
    src_dir, rel_dir = root / "solutions" / assignment, root / "notebooks" / assignment
    notebooks = sorted(src_dir.glob("*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no assignment {assignment!r}: {src_dir} holds no notebook")
    out = {}
    for src in notebooks:
        solution = nbformat.read(src, as_version=4)
        release = nbformat.read(rel_dir / src.name, as_version=4)
        solved_ids = set(_answer_ids(release)[:solved])
        by_id = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in solution.cells}
        partial = nbformat.from_dict(release)
        for cell in partial.cells:
            gid = cell.metadata.get("nbgrader", {}).get("grade_id")
            if gid in solved_ids:
                cell.source = by_id[gid].source
        for student, nb in (("full", solution), ("partial", partial), ("empty", release)):
            path = root / "submitted" / student / assignment / src.name
            path.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, path)
            out[student] = path
    return out


def summary(csv_path: Path) -> str:
    """Learner x assignment table of 'score / max' from nbgrader's grades.csv (``nbgrader export``)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} is missing: write it with `nbgrader export` in the course folder")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []
    needed = ("student_id", "assignment", "score", "max_score")
    lacks = [c for c in needed if c not in columns]
    if lacks:
        raise ValueError(f"{csv_path} is not nbgrader's grades.csv: expected columns {', '.join(needed)}, "
                         f"{'it is empty' if not columns else 'it lacks ' + ', '.join(lacks)}")
    lines = ["| learner | assignment | score |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["student_id"], r["assignment"])):
        lines.append(f"| {r['student_id']} | {r['assignment']} | {float(r['score']):g} / {float(r['max_score']):g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcourse.instructor", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="write three sample submissions of an assignment into submitted/")
    s.add_argument("assignment")
    m = sub.add_parser("summary", help="print grades.csv as a table")
    m.add_argument("csv", nargs="?", default="grades.csv", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "sample":
            for student, path in sample_submissions(args.assignment).items():
                print(f"{student:8s} {path}")
        else:
            print(summary(args.csv))
    except (FileNotFoundError, ValueError) as e:  # a missing assignment or grades.csv: one line, not a traceback
        print(f"python -m kvcourse.instructor {args.cmd}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
