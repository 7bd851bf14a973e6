#!/usr/bin/env python3
"""Prove the kvcourse JupyterHub classroom end to end on localhost: no root, no network.

Starts JupyterHub (deploy/jupyterhub_config.py) with configurable-http-proxy on free localhost ports
in a fresh directory under --workdir, then plays a class through HTTP only, the way the browser
does it:

  1. start the hub;
  2. through the hub REST API: a token for each user, a server for one instructor and 3 learners;
  3. instructor (formgrader API on the instructor's server): generate and release 01_attention;
  4. each learner (Assignment List API on their own server): fetch, edit the notebook through the
     contents API (learner1: the solution, learner2: nothing, learner3: one broken answer), submit;
  5. instructor: collect, autograde each learner, generate and release feedback;
  6. each learner: fetch feedback; scores must be full / zero / partial, and each learner must get
     only their own feedback;
  7. a learner's server must refuse /formgrader, and the hub must refuse a learner another's server;
  8. (--selenium) Debian's chromium logs in as learner1 and sees 01_attention in the Assignment List.

Prints PASS/FAIL per step with timings, exits 0 only if every step passed.

`make test-classroom` runs it (tests/test_classroom.py) after installing what it needs. By hand, with
the Python of the course environment that has jupyterhub installed:

    .venv/bin/python deploy/prove_hub.py --chp .hub/chp/node_modules/.bin --selenium

It runs as the current user: nothing in it needs root. Started as root (a container, CI), it tells
the hub to pass --allow-root to the servers; or give --run-as USER to re-run itself as USER with
setpriv (then the course environment must be readable by USER: a venv made from a Python inside
/root, e.g. pyenv's, is not).
"""

import argparse
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ASSIGNMENT = "01_attention"
NOTEBOOK = "attention.ipynb"
COURSE_ID = "kvcourse"
INSTRUCTOR = "instructor"
LEARNERS = ["learner1", "learner2", "learner3"]  # full marks, unsolved, one broken answer

RESULTS = []  # (step, ok, seconds, detail)


def log(msg):
    print(msg, flush=True)


@contextlib.contextmanager
def step(name):
    """Time a step; record PASS, or FAIL with the exception, and keep going only if it passed."""
    t0 = time.monotonic()
    detail = {"text": ""}
    log(f"--- {name} ...")
    try:
        yield detail
    except Exception as e:  # noqa: BLE001 - any failure is a FAIL of this step
        dt = time.monotonic() - t0
        RESULTS.append((name, False, dt, f"{type(e).__name__}: {e}"))
        log(f"FAIL  {name}  ({dt:.1f} s): {type(e).__name__}: {e}")
        raise StepFailed(name) from e
    dt = time.monotonic() - t0
    RESULTS.append((name, True, dt, detail["text"]))
    log(f"PASS  {name}  ({dt:.1f} s){': ' + detail['text'] if detail['text'] else ''}")


class StepFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ------------------------------------------------------------------------------------------------
# Dropping root
# ------------------------------------------------------------------------------------------------


def drop_root_and_reexec(args):
    """As root: make the work directory the unprivileged user's, and run this script again as them."""
    user = pwd.getpwnam(args.run_as)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chown(workdir, user.pw_uid, user.pw_gid)
    setpriv = shutil.which("setpriv")
    if not setpriv:
        sys.exit("running as root and setpriv is not installed: run this script as an ordinary user")
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "USER", "LOGNAME", "XDG_RUNTIME_DIR")}
    env.update(HOME=str(workdir), USER=args.run_as, LOGNAME=args.run_as, KVCOURSE_PROVE_DROPPED="1")
    cmd = [
        setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--",
        sys.executable, str(Path(__file__).resolve()), *sys.argv[1:],
    ]
    log(f"running as root: re-running as {args.run_as} (uid {user.pw_uid}) with setpriv")
    os.chdir(workdir)
    os.execve(setpriv, cmd, env)


# ------------------------------------------------------------------------------------------------
# HTTP helpers
# ------------------------------------------------------------------------------------------------


class Hub:
    def __init__(self, base, admin_token):
        import requests

        self.requests = requests
        self.base = base
        self.admin = admin_token
        self.tokens = {}

    def api(self, method, path, token=None, **kw):
        kw.setdefault("timeout", 60)
        headers = kw.pop("headers", {})
        headers["Authorization"] = f"token {token or self.admin}"
        return self.requests.request(method, f"{self.base}/hub/api{path}", headers=headers, **kw)

    def user(self, method, name, path, token=None, as_user=None, **kw):
        """A request to /user/<name>/<path> through the proxy, with <as_user>'s token (default: name's)."""
        kw.setdefault("timeout", 120)
        headers = kw.pop("headers", {})
        headers["Authorization"] = f"token {token or self.tokens[as_user or name]}"
        return self.requests.request(
            method, f"{self.base}/user/{name}/{path.lstrip('/')}", headers=headers, allow_redirects=False, **kw
        )


def ok_json(r, what):
    check(r.status_code < 300, f"{what}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json() if r.text else None


# ------------------------------------------------------------------------------------------------
# Notebook editing, as a learner would do it in the browser
# ------------------------------------------------------------------------------------------------


def solution_sources():
    nb = json.loads((REPO / "solutions" / ASSIGNMENT / NOTEBOOK).read_text())
    out = {}
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("solution"):
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            # A learner's answer has no solution markers.
            src = "\n".join(line for line in src.splitlines() if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
            out[meta["grade_id"]] = src
    return out


BROKEN_CELL = "a01_repeat_kv_code"
BROKEN_FROM = "torch.repeat_interleave(x, n_rep, dim=1)"
BROKEN_TO = "x.repeat(1, n_rep, 1, 1)"  # tiles the heads instead of repeating each one: wrong for GQA


def marker(name):
    """A comment each learner puts in their first answer cell, to find whose code a feedback page shows."""
    return f"# notes-of-{name}-kvcourse"


def edit_notebook(nb, kind, name):
    """Fill the fetched notebook's answer cells: 'full' (solution), 'none', 'broken' (one wrong answer).

    Every learner also writes marker(name) at the top of the first answer cell ('none' keeps the stub
    below it, so the cell still raises NotImplementedError).
    """
    sols = solution_sources()
    changed = 0
    first = True
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if not (meta.get("solution") and meta.get("grade_id") in sols):
            continue
        if kind != "none":
            src = sols[meta["grade_id"]]
            if kind == "broken" and meta["grade_id"] == BROKEN_CELL:
                check(BROKEN_FROM in src, f"the solution of {BROKEN_CELL} changed: cannot break it")
                src = src.replace(BROKEN_FROM, BROKEN_TO)
            cell["source"] = src
            changed += 1
        if first:
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            cell["source"] = marker(name) + "\n" + src
            first = False
    return nb, changed


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def start_hub(args, run):
    ports = free_ports(3)
    public, hub_port, proxy_api = ports
    admin_token = secrets.token_hex(32)
    env = dict(os.environ)
    env_bin = Path(sys.executable).parent
    path = [str(env_bin)]
    if args.chp:
        path.insert(0, str(Path(args.chp).resolve()))
    env["PATH"] = os.pathsep.join(path + [env.get("PATH", os.defpath)])
    env.update(
        HOME=str(run),
        KVCOURSE_HUB_STATE=str(run),
        KVCOURSE_HUB_PUBLIC_PORT=str(public),
        KVCOURSE_HUB_PORT=str(hub_port),
        KVCOURSE_PROXY_API_PORT=str(proxy_api),
        KVCOURSE_HUB_ADMIN_TOKEN=admin_token,
        KVCOURSE_INSTRUCTORS=INSTRUCTOR,
        KVCOURSE_LEARNERS=",".join(LEARNERS),
        KVCOURSE_ENV_BIN=str(env_bin),
    )
    env.pop("JUPYTER_CONFIG_PATH", None)
    check(shutil.which("configurable-http-proxy", path=env["PATH"]), "configurable-http-proxy not on PATH (use --chp DIR)")
    logf = open(run / "hub.log", "w")
    proc = subprocess.Popen(
        [str(env_bin / "jupyterhub"), "-f", str(HERE / "jupyterhub_config.py")],
        cwd=run, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{public}"
    hub = Hub(base, admin_token)
    deadline = time.monotonic() + 120
    while True:
        check(proc.poll() is None, f"jupyterhub exited with {proc.returncode}; see {run / 'hub.log'}")
        try:
            r = hub.api("GET", "/", timeout=5)
            if r.status_code == 200:
                break
        except hub.requests.ConnectionError:
            pass
        check(time.monotonic() < deadline, "the hub did not answer within 120 s")
        time.sleep(1)
    return proc, hub, r.json().get("version")


def stop_hub(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the hub stops every server it started (cleanup_servers)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(hub, names, timeout=300):
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        for name in sorted(pending):
            info = ok_json(hub.api("GET", f"/users/{name}"), f"GET user {name}")
            server = (info.get("servers") or {}).get("")
            if server and server.get("ready"):
                pending.discard(name)
        check(time.monotonic() < deadline, f"servers not ready after {timeout} s: {sorted(pending)}")
        if pending:
            time.sleep(1)


def lab_disabled(hub, name):
    """The JupyterLab plugins <name>'s /lab page disables (its embedded page config)."""
    r = hub.user("GET", name, "lab")
    check(r.status_code == 200, f"GET /user/{name}/lab: HTTP {r.status_code}")
    m = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', r.text, re.S)
    check(m, f"no page config in /user/{name}/lab")
    disabled = json.loads(m.group(1)).get("disabledExtensions", [])
    return set(disabled if isinstance(disabled, list) else [k for k, v in disabled.items() if v])


def feedback_score(html):
    """The notebook's total from nbgrader's feedback page: '(Score: 12.0 / 12.0)'."""
    m = re.search(r"Score:\s*([0-9.]+)\s*/\s*([0-9.]+)", html)
    check(m, "no 'Score: x / y' in the feedback page")
    return float(m.group(1)), float(m.group(2))


def run_class(args, run):
    proc = None
    try:
        with step("1. start JupyterHub + configurable-http-proxy") as d:
            proc, hub, version = start_hub(args, run)
            d["text"] = f"JupyterHub {version} at {hub.base}, state in {run}"

        with step("2. hub API: tokens and servers for 1 instructor + 3 learners") as d:
            users = ok_json(hub.api("GET", "/users"), "list users")
            names = {u["name"] for u in users}
            for name in [INSTRUCTOR, *LEARNERS]:
                if name not in names:
                    ok_json(hub.api("POST", f"/users/{name}"), f"create {name}")
                tok = ok_json(
                    hub.api("POST", f"/users/{name}/tokens", json={"note": "prove_hub", "expires_in": 3600}),
                    f"token for {name}",
                )
                hub.tokens[name] = tok["token"]
            groups = ok_json(hub.api("GET", "/groups/instructors"), "group instructors")
            check(groups["users"] == [INSTRUCTOR], f"group instructors: {groups['users']}")
            for name in [INSTRUCTOR, *LEARNERS]:
                r = hub.api("POST", f"/users/{name}/server")
                check(r.status_code in (201, 202), f"start {name}: HTTP {r.status_code} {r.text[:300]}")
            wait_ready(hub, [INSTRUCTOR, *LEARNERS])
            d["text"] = "4 servers ready"

        with step(f"3. instructor: generate and release {ASSIGNMENT} (formgrader API)") as d:
            fg = "formgrader/api/assignment/" + ASSIGNMENT
            res = ok_json(hub.user("POST", INSTRUCTOR, fg + "/assign"), "generate_assignment")
            check(res.get("success"), f"generate_assignment failed: {res.get('error') or res}")
            res = ok_json(hub.user("POST", INSTRUCTOR, fg + "/release"), "release_assignment")
            check(res.get("success"), f"release_assignment failed: {res.get('error') or res}")
            outbound = run / "exchange" / COURSE_ID / "outbound" / ASSIGNMENT / NOTEBOOK
            check(outbound.exists(), f"not in the exchange: {outbound}")
            d["text"] = f"{outbound.relative_to(run)}"

        plans = {"learner1": "full", "learner2": "none", "learner3": "broken"}
        with step("4. learners: fetch, answer, submit (Assignment List API + contents API)") as d:
            body = {"course_id": COURSE_ID, "assignment_id": ASSIGNMENT}
            notes = []
            for name in LEARNERS:
                listing = ok_json(hub.user("GET", name, "assignments", params={"course_id": COURSE_ID}), "list")
                check(listing["success"], f"{name} list: {listing}")
                released = [a for a in listing["value"] if a["assignment_id"] == ASSIGNMENT and a["status"] == "released"]
                check(released, f"{name} does not see {ASSIGNMENT} as released: {listing['value']}")
                res = ok_json(hub.user("POST", name, "assignments/fetch", json=body), "fetch")
                check(res["success"], f"{name} fetch: {res}")
                fetched = [a for a in res["value"] if a["assignment_id"] == ASSIGNMENT and a["status"] == "fetched"]
                check(fetched, f"{name}: {ASSIGNMENT} not fetched: {res['value']}")
                nbpath = f"{ASSIGNMENT}/{NOTEBOOK}"
                model = ok_json(hub.user("GET", name, f"api/contents/{nbpath}", params={"content": 1}), "read nb")
                nb, n = edit_notebook(model["content"], plans[name], name)
                ok_json(
                    hub.user("PUT", name, f"api/contents/{nbpath}", json={"type": "notebook", "format": "json", "content": nb}),
                    "save nb",
                )
                res = ok_json(hub.user("POST", name, "assignments/submit", json=body), "submit")
                check(res["success"], f"{name} submit: {res.get('value')}")
                mine = [a for a in res["value"] if a["status"] == "submitted" and a["assignment_id"] == ASSIGNMENT]
                check(mine and all(a["student_id"] == name for a in mine), f"{name}: submitted list {mine}")
                notes.append(f"{name}: {plans[name]} ({n} cells written)")
            inbound = sorted(p.name.split("+")[0] for p in (run / "exchange" / COURSE_ID / "inbound").iterdir())
            check(inbound == LEARNERS, f"inbound holds {inbound}")
            d["text"] = "; ".join(notes)

        scores = {}
        with step("5. instructor: collect, autograde, generate and release feedback (formgrader API)") as d:
            fg = "formgrader/api/assignment/" + ASSIGNMENT
            res = ok_json(hub.user("POST", INSTRUCTOR, fg + "/collect"), "collect")
            check(res.get("success"), f"collect failed: {res.get('error') or res}")
            times = []
            for name in LEARNERS:
                t0 = time.monotonic()
                res = ok_json(
                    hub.user("POST", INSTRUCTOR, f"formgrader/api/submission/{ASSIGNMENT}/{name}/autograde", timeout=900),
                    f"autograde {name}",
                )
                check(res.get("success"), f"autograde {name} failed: {res.get('error') or res}")
                times.append(f"{name} {time.monotonic() - t0:.0f} s")
            res = ok_json(hub.user("POST", INSTRUCTOR, fg + "/generate_feedback", timeout=600), "generate_feedback")
            check(res.get("success"), f"generate_feedback failed: {res.get('error') or res}")
            res = ok_json(hub.user("POST", INSTRUCTOR, fg + "/release_feedback"), "release_feedback")
            check(res.get("success"), f"release_feedback failed: {res.get('error') or res}")
            subs = ok_json(hub.user("GET", INSTRUCTOR, f"formgrader/api/submissions/{ASSIGNMENT}"), "submissions")
            for s in subs:
                scores[s["student"]] = (float(s["score"]), float(s["max_score"]))
            check(set(scores) == set(LEARNERS), f"gradebook has {sorted(scores)}")
            d["text"] = "autograde " + ", ".join(times) + "; gradebook " + ", ".join(
                f"{k} {v[0]:g}/{v[1]:g}" for k, v in sorted(scores.items())
            )

        with step("6. learners: fetch feedback; full / zero / partial; only their own") as d:
            body = {"course_id": COURSE_ID, "assignment_id": ASSIGNMENT}
            seen = {}
            for name in LEARNERS:
                res = ok_json(hub.user("POST", name, "assignments/fetch_feedback", json=body), "fetch_feedback")
                check(res["success"], f"{name} fetch_feedback: {res}")
                subs = [s for a in res["value"] if a["status"] == "submitted" for s in a["submissions"]]
                check(len(subs) == 1 and subs[0]["student_id"] == name, f"{name} lists submissions {subs}")
                check(subs[0]["has_local_feedback"], f"{name}: no local feedback after fetch_feedback: {subs[0]}")
                fb_dir = ok_json(hub.user("GET", name, f"api/contents/{ASSIGNMENT}/feedback"), "feedback dir")
                stamps = [x["name"] for x in fb_dir["content"]]
                check(len(stamps) == 1, f"{name} has feedback folders {stamps}")
                f = ok_json(
                    hub.user("GET", name, f"api/contents/{ASSIGNMENT}/feedback/{stamps[0]}/{NOTEBOOK[:-6]}.html",
                             params={"type": "file", "format": "text"}),
                    "feedback html",
                )
                seen[name] = f["content"]
            got = {n: feedback_score(h) for n, h in seen.items()}
            full, zero, part = got["learner1"], got["learner2"], got["learner3"]
            check(full[0] == full[1] > 0, f"learner1 (solution) scored {full}")
            check(zero[0] == 0, f"learner2 (unsolved) scored {zero}")
            check(0 < part[0] < part[1], f"learner3 (one broken answer) scored {part}")
            for n in LEARNERS:
                check(abs(got[n][0] - scores[n][0]) < 1e-9, f"{n}: feedback {got[n]} but gradebook {scores[n]}")
            # Their own code, and nobody else's, in each page.
            for n in LEARNERS:
                check(marker(n) in seen[n], f"{n}'s feedback lacks {n}'s own notes")
                others = [o for o in LEARNERS if o != n and marker(o) in seen[n]]
                check(not others, f"{n}'s feedback shows the code of {others}")
            check("YOUR CODE HERE" in seen["learner2"], "learner2's feedback lacks the unsolved stubs")
            check("YOUR CODE HERE" not in seen["learner1"], "learner1's feedback shows unsolved stubs")
            d["text"] = ", ".join(f"{n} {s[0]:g}/{s[1]:g}" for n, s in got.items())

        with step("7. refusals: /formgrader on a learner's server; another learner's server") as d:
            codes = {}
            r = hub.user("GET", "learner1", "api/status")
            codes["learner1 -> own /api/status"] = r.status_code
            check(r.status_code == 200, f"learner1's own server: HTTP {r.status_code}")
            for path in ("formgrader", "formgrader/api/status", "formgrader/api/assignments"):
                r = hub.user("GET", "learner1", path)
                codes[path] = r.status_code
                check(r.status_code in (403, 404), f"learner1 GET /user/learner1/{path}: HTTP {r.status_code}")
            r = hub.user("GET", "learner2", "api/contents", as_user="learner1")
            codes["learner1 -> /user/learner2/api/contents"] = r.status_code
            check(r.status_code == 403, f"learner1 reading learner2's files: HTTP {r.status_code}")
            r = hub.user("GET", INSTRUCTOR, "formgrader/api/assignments", as_user="learner1")
            codes["learner1 -> /user/instructor/formgrader"] = r.status_code
            check(r.status_code == 403, f"learner1 on the instructor's formgrader: HTTP {r.status_code}")
            r = hub.user("GET", INSTRUCTOR, "formgrader/api/status")
            codes["instructor -> own /formgrader/api/status"] = r.status_code
            check(r.status_code == 200, f"the instructor's own formgrader: HTTP {r.status_code}")
            d["text"] = ", ".join(f"{k}: {v}" for k, v in codes.items())

        with step("7b. JupyterLab page config: learner mode + Assignment List; instructor mode") as d:
            fg_plugins = ["@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:course-list", "@jupyter/nbgrader:create-assignment"]
            list_plugins = ["@jupyter/nbgrader:assignment-list", "@jupyter/nbgrader:menu"]
            learner = lab_disabled(hub, "learner1")
            check(all(x in learner for x in fg_plugins), f"learner1's lab does not disable all of {fg_plugins}: {learner}")
            check(not any(x in learner for x in list_plugins), f"learner1's lab disables {list_plugins}: {learner}")
            instructor = lab_disabled(hub, INSTRUCTOR)
            check(not any("nbgrader" in x for x in instructor), f"the instructor's lab disables {instructor}")
            d["text"] = "learner1 disables " + ", ".join(sorted(x.split(":")[-1] for x in learner if "nbgrader" in x))

        if args.selenium:
            with step("8. chromium (Selenium): learner1's Assignment List shows the assignment") as d:
                d["text"] = browser_check(hub, args)
    finally:
        if proc is not None:
            t0 = time.monotonic()
            stop_hub(proc)
            log(f"hub stopped ({time.monotonic() - t0:.1f} s); its log: {run / 'hub.log'}")


def browser_check(hub, args):
    """Log in through the hub's login form as learner1, open the Assignment List from the command palette."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = args.chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(args.chromedriver), options=opts)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(f"{hub.base}/hub/login")
        driver.find_element(By.ID, "username_input").send_keys("learner1")
        driver.find_element(By.ID, "password_input").send_keys("any-password")
        driver.find_element(By.ID, "login_submit").click()
        wait.until(lambda d: "/user/learner1/" in d.current_url)
        driver.get(f"{hub.base}/user/learner1/lab")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-LabShell")))
        time.sleep(3)
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.CONTROL, Keys.SHIFT, "c")  # command palette
        box = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".lm-CommandPalette-input")))
        box.send_keys("Assignment List")
        time.sleep(1)
        box.send_keys(Keys.ENTER)
        panel = wait.until(ec.presence_of_element_located((By.ID, "nbgrader-assignment-list")))
        wait.until(lambda d: ASSIGNMENT in panel.text and "view feedback" in panel.text)
        # No exchange errors (what learner mode showed without a hub: "Error fetching courses!",
        # "exchange directory does not exist"), in the panel or anywhere on the page.
        check(not re.search(r"error|does not exist", panel.text, re.I), f"the Assignment List shows: {panel.text!r}")
        page = driver.find_element(By.TAG_NAME, "body").text
        for bad in ("Error fetching", "exchange directory", "Formgrader", "Course List"):
            check(bad not in page, f"learner1's lab shows {bad!r}")
        shot = Path(args.screenshot_dir) / "assignment_list.png"
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(shot))
        # nbgrader's menu: only the Assignment List (formgrader and course list plugins are off).
        menus = [m for m in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if m.text.strip() == "Nbgrader"]
        check(menus, "no Nbgrader menu")
        menus[0].click()
        time.sleep(1)
        items = [e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-content .lm-Menu-item") if e.is_displayed()]
        items = [i for i in items if i]
        check(items == ["Assignment List"], f"the Nbgrader menu holds {items}")
        return f"'{ASSIGNMENT}' and its feedback link in the Assignments panel; Nbgrader menu {items}; screenshot {shot}"
    finally:
        driver.quit()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/hubwork", help="a fresh run directory is made in here")
    p.add_argument("--chp", default=None, help="folder holding the configurable-http-proxy executable")
    p.add_argument("--run-as", default=None, help="when started as root, re-run as this user (e.g. nobody)")
    p.add_argument("--selenium", action="store_true", help="also check the Assignment List in chromium")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    p.add_argument("--keep", action="store_true", help="keep the run directory (default: keep on failure only)")
    args = p.parse_args()

    if os.geteuid() == 0 and args.run_as:
        drop_root_and_reexec(args)
    if os.geteuid() == 0:
        os.environ["KVCOURSE_HUB_ALLOW_ROOT"] = "1"  # read by jupyterhub_config.py

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    args.screenshot_dir = str(run)
    who = pwd.getpwuid(os.geteuid()).pw_name
    log(f"prove_hub: as {who} (uid {os.geteuid()}), python {sys.executable}, run directory {run}")
    t0 = time.monotonic()
    try:
        run_class(args, run)
    except StepFailed:
        pass
    total = time.monotonic() - t0
    passed = all(ok for _, ok, _, _ in RESULTS) and len(RESULTS) >= 8
    log("\n=== summary ===")
    for name, ok, dt, detail in RESULTS:
        log(f"{'PASS' if ok else 'FAIL'}  {dt:6.1f} s  {name}" + (f"\n              {detail}" if detail else ""))
    log(f"{'PASS' if passed else 'FAIL'}  total {total:.1f} s")
    if passed and not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    else:
        log(f"run directory kept: {run}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
