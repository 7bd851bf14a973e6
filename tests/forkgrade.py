"""Grade many one-cell patches of a solution notebook at once: run the solution once, fork at each patch.

``nbgrader autograde`` starts a fresh kernel for every submission, which then imports torch and
``transformers``, loads the model and re-runs every cell before the learner's answer: about 20 of the
25 s a notebook takes here, 200 times over for the mutant bank. A mutant (or a correct variant) changes
one answer cell, so everything before that cell is the solution's own run. This runner:

- executes the solution notebook once, cell by cell, in an IPython shell set up like nbgrader's kernels
  (``NBGRADER_EXECUTION=autograde``, warnings ignored as ``nbgrader_config.py`` does, offline, Agg plots);
- just before each cell that a submission patches, forks: the child runs the patched cell and the cells
  after it, up to the last test cell the submission asks about (every test cell when it asks for none: the
  ungraded cells after the last test cell, demos and timing tables, cannot change a grade and are skipped), and
  writes each test cell's verdict the way nbgrader scores it: an error, or anything on stderr, scores 0
  (``nbgrader.utils.determine_grade``), with the error and stderr a learner would see;
- the parent goes on with the solution's own cells up to the last test cell, so its verdicts are the solution's
  (that the solution's later cells run without an error is ``test_solution_notebook_crashes``' business).

``tests/test_graders.py`` runs every mutant and variant through it, and grades a sample of them with real
``nbgrader autograde`` as well: both must give the same verdicts and messages on every cell.

Usage: ``python tests/forkgrade.py REQUEST.json RESULT.json``. REQUEST: ``{"notebook": path, "jobs": 2,
"timeout": seconds per submission, "submissions": [{"student", "patches": {grade_id: source},
"until": [grade_id, ...]}]}``. RESULT: ``{student: {grade_id: {"ok", "error", "stderr"}}}``, with
``"solution"`` for the unpatched run and ``{"__crash__": text}`` for a submission that could not finish.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings


def run_cell(shell, source: str) -> dict:
    """Execute one cell; its verdict as nbgrader would score a test cell."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = shell.run_cell(source, store_history=False)
    exc = result.error_in_exec or result.error_before_exec
    error = f"{type(exc).__name__}: {exc}" if exc is not None else ""
    return {"ok": exc is None and not err.getvalue(), "error": error, "stderr": err.getvalue()}


def main(request_path: str, result_path: str) -> None:
    request = json.load(open(request_path))
    os.environ["NBGRADER_EXECUTION"] = "autograde"  # kvcourse.timing.under_autograder() reads it
    os.environ["PYTHONWARNINGS"] = "ignore"  # as nbgrader_config.py sets for the grading kernels
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["MPLBACKEND"] = "Agg"
    ipython_dir = os.environ["IPYTHONDIR"] = tempfile.mkdtemp(prefix="forkgrade-ipython-")  # not ~/.ipython
    warnings.simplefilter("ignore")

    import nbformat
    from IPython.core.interactiveshell import InteractiveShell

    nb = nbformat.read(request["notebook"], as_version=4)
    work = tempfile.mkdtemp(prefix="forkgrade-")  # the notebook's folder, as nbgrader runs it in a copy
    shutil.copytree(os.path.dirname(os.path.abspath(request["notebook"])), work, dirs_exist_ok=True)
    home = os.getcwd()
    os.chdir(work)

    cells = [(c.metadata.get("nbgrader", {}).get("grade_id", f"#{i}"), c) for i, c in enumerate(nb.cells)
             if c.cell_type == "code"]
    index = {gid: i for i, (gid, _) in enumerate(cells)}
    graded = {gid for gid, c in cells if c.metadata.get("nbgrader", {}).get("grade")}
    subs = request["submissions"]
    for s in subs:
        unknown = [g for g in [*s["patches"], *s.get("until", [])] if g not in index]
        if unknown:
            raise SystemExit(f"{s['student']}: no code cells {unknown} in {request['notebook']}")
    first = {s["student"]: min(index[g] for g in s["patches"]) for s in subs}
    last_test = max((i for i, (gid, _) in enumerate(cells) if gid in graded), default=len(cells) - 1)
    last = {s["student"]: max((index[g] for g in s.get("until") or []), default=last_test) for s in subs}
    parent_end = max([last_test, *first.values()])  # the parent must reach every fork point

    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False  # no sqlite history shared by forked children
    shell = InteractiveShell.instance(config=config)
    results: dict[str, dict] = {"solution": {}}
    outdir = tempfile.mkdtemp(prefix="forkgrade-out-")
    alive: dict[int, tuple[str, float]] = {}  # pid -> (student, start time)
    jobs, timeout = int(request.get("jobs", 2)), float(request.get("timeout", 900))

    def reap(block: bool) -> None:
        while alive:
            for pid, (student, started) in list(alive.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    del alive[pid]
                    path = os.path.join(outdir, f"{pid}.json")
                    if os.path.exists(path):
                        results[student] = json.load(open(path))
                    else:
                        results[student] = {"__crash__": f"the forked run ended with status {status} and no result"}
                elif time.monotonic() - started > timeout:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    del alive[pid]
                    results[student] = {"__crash__": f"timed out after {timeout:.0f} s"}
            if not block or len(alive) < jobs:
                return
            time.sleep(0.05)

    def child(sub: dict, start: int) -> None:
        verdicts = dict(results["solution"])  # the cells before the patch are the solution's
        try:
            for i in range(start, last[sub["student"]] + 1):
                gid, cell = cells[i]
                verdict = run_cell(shell, sub["patches"].get(gid, cell.source))
                if gid in graded:
                    verdicts[gid] = verdict
            payload = verdicts
        except BaseException:  # noqa: BLE001 - report anything, the parent must go on
            payload = {"__crash__": traceback.format_exc()}
        with open(os.path.join(outdir, f"{os.getpid()}.json"), "w") as f:
            json.dump(payload, f)

    for i, (gid, cell) in enumerate(cells[:parent_end + 1]):
        for sub in subs:
            if first[sub["student"]] != i:
                continue
            reap(block=True)  # at most `jobs` children at once
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    child(sub, i)
                finally:
                    os._exit(0)
            alive[pid] = (sub["student"], time.monotonic())
        verdict = run_cell(shell, cell.source)
        if gid in graded:
            results["solution"][gid] = verdict
    while alive:
        reap(block=False)
        time.sleep(0.05)
    for s in subs:  # only the cells up to `until` were run: report those
        keep = {cells[j][0] for j in range(last[s["student"]] + 1)}
        if "__crash__" not in results[s["student"]]:
            results[s["student"]] = {g: v for g, v in results[s["student"]].items() if g in keep}
    with open(result_path, "w") as f:
        json.dump(results, f, indent=1)
    os.chdir(home)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(outdir, ignore_errors=True)
    shutil.rmtree(ipython_dir, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
