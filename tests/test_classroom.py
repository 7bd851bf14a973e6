"""The classroom (issue 12, deploy/README.md): a real JupyterHub, and grading a class in parallel.

Run by ``make test-classroom`` (and by .ci/run after ``make test``), not by ``make test``: it needs the
``hub`` extra (jupyterhub, selenium), configurable-http-proxy from npm and Debian's chromium, and takes
several minutes.

- ``deploy/prove_hub.py`` starts JupyterHub on localhost with an instructor and three learners and plays
  release, fetch, submit, collect, autograde and feedback through HTTP, then checks the Assignment List
  in chromium (the script's docstring lists its steps).
- ``python -m kvcourse.grading bench`` grades made-up submissions with serial ``nbgrader autograde`` and
  with ``make grade JOBS=2``'s workers and requires the two gradebooks to be equal; nbgrader then writes
  feedback and grades.csv from the merged one.
"""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.classroom

REPO = Path(__file__).resolve().parent.parent
CHP_DIR = os.environ.get("KVCOURSE_CHP_DIR", str(REPO / ".hub" / "chp" / "node_modules" / ".bin"))


def tail(proc: subprocess.CompletedProcess, n: int = 6000) -> str:
    return "\n" + (proc.stdout or "")[-n:] + (proc.stderr or "")[-2000:]


def test_hub_release_submit_autograde_feedback_through_the_exchange(tmp_path):
    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not Path(p).exists()]
    missing += [] if shutil.which("configurable-http-proxy", path=CHP_DIR) else [f"configurable-http-proxy in {CHP_DIR}"]
    assert not missing, f"make test-classroom needs {missing} (Debian: apt-get install chromium chromium-driver; make hub-deps)"
    proc = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "prove_hub.py"), "--chp", CHP_DIR, "--selenium",
         "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, f"prove_hub.py failed:{tail(proc)}"
    summary = proc.stdout[proc.stdout.rindex("=== summary ==="):]
    for n in range(1, 9):  # every step ran and passed, the browser (8) included
        assert re.search(rf"^PASS\s+[\d.]+ s\s+{n}\. ", summary, re.M), f"step {n} did not pass:{summary}"
    assert "FAIL" not in summary, summary
    assert "learner1 12/12, learner2 0/12, learner3 10/12" in summary, summary


def test_parallel_grade_disagrees_with_serial_autograde(tmp_path):
    course = tmp_path / "course"
    proc = subprocess.run(
        [sys.executable, "-m", "kvcourse.grading", "bench", "05_cache_memory", "--submissions", "6", "--jobs", "2",
         "--keep", str(course)],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, f"serial and parallel gradebooks differ, or grading failed:{tail(proc)}"
    assert "gradebooks equal: True (6 learners" in proc.stdout, proc.stdout
    # nbgrader carries on from the merged gradebook: feedback for every learner, and the grades.
    for cmd in (["generate_feedback", "05_cache_memory", "--force"], ["export", "--to", "grades.csv"]):
        r = subprocess.run([sys.executable, "-m", "nbgrader", *cmd], cwd=course, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"nbgrader {cmd[0]} failed on the merged gradebook:{tail(r)}"
    learners = [f"learner{i:02d}" for i in range(1, 7)]
    assert sorted(p.name for p in (course / "feedback").iterdir()) == learners
    rows = {r["student_id"]: r for r in csv.DictReader((course / "grades.csv").open())}
    assert sorted(rows) == learners
    full, partial, empty = (float(rows[f"learner0{i}"]["score"]) for i in (1, 2, 3))  # full, partial, empty, ...
    assert full == float(rows["learner01"]["max_score"]) > partial > empty == 0, rows
    assert [float(rows[f"learner0{i}"]["score"]) for i in (4, 5, 6)] == [full, partial, empty]
