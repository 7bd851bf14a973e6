"""`make lab` gives learners a working JupyterLab without nbgrader's instructor tools; `make lab-instructor` keeps them.

Each test starts the lab exactly as the README says, ``make lab HEADLESS=1 PORT=<free port>`` (or
``make lab-instructor``), in a fresh copy of what a clone holds for it (Makefile, pyproject.toml,
nbgrader_config.py, jupyter/, notebooks/), headless and offline, then asks the server over HTTP.
``make`` gets ``VENV=`` a stand-in for the running environment (its entries, linked, plus the
Makefile's install stamp), so nothing is built or installed. Jupyter's per-user folders point into the
test's temporary folder, so the tester's own ~/.jupyter neither changes nor is changed.

Learner mode must not serve the formgrader (it opened the full instructor UI and wrote gradebook.db
into the learner's clone) nor the exchange-based panels (Assignment List: "Error fetching courses!";
Course List: a useless "local" entry); Validate must keep working. Nothing may be changed in the
environment itself, so the two modes cannot leak into each other.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbgrader import __version__ as NBGRADER_VERSION
from venvs import stand_in_venv

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("Makefile", "pyproject.toml", "nbgrader_config.py", "jupyter", "notebooks")
STARTUP_TIMEOUT_S = 240  # generous: a loaded 2-core machine can take minutes to import everything
REQUEST_TIMEOUT_S = 120

# nbgrader's JupyterLab plugins (ids in its labextension) and server extensions (modules).
LEARNER_OFF_PLUGINS = (
    "@jupyter/nbgrader:assignment-list", "@jupyter/nbgrader:course-list", "@jupyter/nbgrader:create-assignment",
    "@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:menu",
)
VALIDATE_PLUGIN = "@jupyter/nbgrader:validate-assignment"
NEWS_PLUGIN = "@jupyterlab/apputils-extension:announcements"  # "get notified about Jupyter news?" (offline course)
# URL -> the server extension that serves it (nbgrader/server_extensions/*/handlers.py, default_handlers).
LEARNER_OFF_URLS = {
    "/formgrader": "formgrader",
    "/formgrader/manage_assignments": "formgrader",
    "/formgrader/gradebook": "formgrader",
    "/assignments": "assignment_list",
    "/courses": "assignment_list",
    "/formgraders": "course_list",
}

TINY_TEST = "assert x == 2  # fails: Validate must say so"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    """(status, body) of one request; redirects are followed, HTTP errors returned, not raised."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                 headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def page_config(html: bytes) -> dict:
    """The JSON page config JupyterLab embeds in /lab: what the browser is told to load."""
    m = re.search(rb'<script id="jupyter-config-data" type="application/json">(.*?)</script>', html, re.S)
    assert m, "no jupyter-config-data in the /lab page"
    return json.loads(m.group(1))


def tree_state(root: Path) -> dict[str, bytes]:
    """Every file under root with its content (for 'nothing changed here')."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fresh_clone(tmp: Path) -> Path:
    course = tmp / "course"
    course.mkdir()
    junk = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "gradebook.db")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, course / name, ignore=junk)
        else:
            shutil.copy2(src, course / name)
    return course


def make_env(venv: Path, home: Path, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "JUPYTER_CONFIG_PATH")}
    env.update({
        "MAKEFLAGS": f"VENV={venv}",
        "JUPYTER_TOKEN": token,  # jupyter_server reads it: no token to fish out of the log
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "IPYTHONDIR": str(home / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
    })
    return env


class Lab:
    """A `make lab...` process and how to reach its server."""

    def __init__(self, course: Path, target: str, tmp: Path):
        self.course, self.token, self.port = course, secrets.token_hex(16), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.home = tmp / "jupyter-home"
        self.log = tmp / f"{target}.log"
        venv = stand_in_venv(tmp, course)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["make", target, "HEADLESS=1", f"PORT={self.port}"], cwd=course,
                env=make_env(venv, self.home, self.token), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: make, the shell and jupyter stop together
            )

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"make exited with code {self.proc.returncode} before the lab answered:\n{self.tail()}")
            # The server writes where it listens into its runtime dir: if PORT was taken meanwhile, it moved on.
            for info in (self.home / "runtime").glob("jpserver-*.json"):
                try:
                    self.base = f"http://127.0.0.1:{json.loads(info.read_text())['port']}"
                except (OSError, ValueError, KeyError):  # being written
                    pass
            try:
                status, body = self.get("/api/status")
                if status == 200 and "started" in json.loads(body):
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(1)
        pytest.fail(f"no answer from {self.base}/api/status in {STARTUP_TIMEOUT_S} s:\n{self.tail()}")

    def get(self, path: str, *, token: bool = True, method: str = "GET") -> tuple[int, bytes]:
        return request(self.base + path, self.token if token else None, method)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture
def course(tmp_path: Path) -> Path:
    return fresh_clone(tmp_path)


@pytest.fixture
def start_lab(course: Path, tmp_path: Path):
    labs: list[Lab] = []

    def start(target: str) -> Lab:
        lab = Lab(course, target, tmp_path)
        labs.append(lab)
        lab.wait_ready()
        return lab

    yield start
    for lab in labs:
        lab.stop()


def tiny_assignment(folder: Path) -> str:
    """A notebook with one answer cell and one failing test cell, for Validate; its path from folder."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    answer = nbformat.v4.new_code_cell("x = 1")
    answer.metadata["nbgrader"] = {"schema_version": 3, "grade": False, "solution": True, "locked": False,
                                   "grade_id": "answer"}
    test = nbformat.v4.new_code_cell(TINY_TEST)
    test.metadata["nbgrader"] = {"schema_version": 3, "grade": True, "solution": False, "locked": True,
                                 "grade_id": "test", "points": 1}
    nb.cells = [answer, test]
    (folder / "00_tiny").mkdir()
    nbformat.write(nb, folder / "00_tiny" / "tiny.ipynb")
    return "00_tiny/tiny.ipynb"


def test_make_lab_serves_learners_without_instructor_tools(course, start_lab):
    notebooks = course / "notebooks"
    tiny = tiny_assignment(notebooks)
    venv_config = Path(sys.prefix) / "etc" / "jupyter"
    before = tree_state(venv_config)
    lab = start_lab("lab")

    code, page = lab.get("/lab")
    assert code == 200 and b"JupyterLab" in page, f"/lab answered {code}"
    code, _ = lab.get("/api/status", token=False)  # no token: the server must not be open to anyone
    assert code == 403
    code, body = lab.get("/api/contents/01_attention")  # serves notebooks/, not the repository root
    assert code == 200 and b"attention.ipynb" in body, f"/api/contents/01_attention answered {code}"
    code, body = lab.get("/api/contents/extras")  # the ungraded stretch notebooks are reachable too
    assert code == 200 and b".ipynb" in body, f"/api/contents/extras answered {code}"

    # the instructor and exchange server extensions are not loaded
    for path, extension in LEARNER_OFF_URLS.items():
        code, _ = lab.get(path)
        assert code == 404, f"learner lab serves {path} (nbgrader's {extension} server extension): HTTP {code}"
    assert not list(course.rglob("gradebook.db")), "learner lab created a gradebook.db in the clone"

    # the browser is told to leave their panels out, locked (no turning them back on in the Plugin Manager)
    config = page_config(page)
    for plugin in LEARNER_OFF_PLUGINS:
        assert plugin in config["disabledExtensions"], f"learner lab loads {plugin}"
        assert plugin in config.get("lockedExtensions", []), f"learner lab lets {plugin} be turned back on"
    assert VALIDATE_PLUGIN not in config["disabledExtensions"], "learner lab lost the Validate button"
    assert config["news"] == {"disabled": True}, f"learner lab fetches news from the internet: {config['news']}"
    assert NEWS_PLUGIN in config["disabledExtensions"], "learner lab asks learners to subscribe to Jupyter news"

    # Validate, as its button does it: version check, then validate the open notebook
    code, body = lab.get(f"/nbgrader_version?version={NBGRADER_VERSION}")
    assert code == 200 and json.loads(body)["success"], f"/nbgrader_version: {code} {body[:300]!r}"
    code, body = lab.get(f"/assignments/validate?path={tiny}", method="POST")
    assert code == 200, f"Validate answered {code}: {body[:500]!r}\n{lab.tail()}"
    result = json.loads(body)
    failed = [cell["source"] for cell in result["value"].get("failed", [])] if result["success"] else []
    assert failed == [TINY_TEST], f"Validate did not run the notebook and report its failing test: {result}"

    # learner mode changes nothing in the environment (it is chosen per run, not written into the venv)
    assert tree_state(venv_config) == before, f"make lab changed {venv_config}"


def test_make_lab_instructor_keeps_nbgrader_tools(course, start_lab):
    lab = start_lab("lab-instructor")
    code, page = lab.get("/lab")
    assert code == 200 and b"JupyterLab" in page, f"/lab answered {code}"
    config = page_config(page)
    for plugin in (*LEARNER_OFF_PLUGINS, VALIDATE_PLUGIN):
        assert plugin not in config["disabledExtensions"], f"instructor lab disables {plugin}"
    code, body = lab.get("/api/contents/notebooks")  # serves the repository root
    assert code == 200, f"/api/contents/notebooks answered {code}"
    code, body = lab.get("/formgraders")  # course_list
    assert code == 200 and json.loads(body)["success"], f"/formgraders: {code} {body[:300]!r}"
    code, body = lab.get("/formgrader")
    assert code == 200 and b"nbgrader" in body.lower(), f"/formgrader answered {code}\n{lab.tail()}"
