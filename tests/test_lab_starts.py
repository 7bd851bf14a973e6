"""`make lab` must give a working JupyterLab: start one headless on notebooks/, offline, and ask it for its status."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def lab_root(repo_root: Path, tmp_path: Path) -> Path:
    notebooks = repo_root / "notebooks"
    if notebooks.is_dir():
        return notebooks
    root = tmp_path / "notebooks"  # the course build has not made it yet
    root.mkdir()
    return root


@pytest.fixture
def lab_server(lab_root: Path, tmp_path: Path):
    """A JupyterLab on a free localhost port, with its own Jupyter config/runtime dirs: (base_url, token, log)."""
    port, token = free_port(), secrets.token_hex(16)
    home = tmp_path / "jupyter"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "IPYTHONDIR": str(home / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
        # the venv's scripts first, as `make lab` does
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    log = tmp_path / "lab.log"
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={lab_root}",
        "--allow-root",  # CI runs as root; harmless otherwise
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        yield f"http://127.0.0.1:{port}", token, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def test_jupyter_lab_starts_and_answers(lab_server):
    base, token, proc, log = lab_server
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            status, body = get(f"{base}/api/status", token)
            if status == 200:
                break
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    assert status == 200, f"no answer from {base}/api/status in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
    assert "started" in json.loads(body)

    code, page = get(f"{base}/lab", token)
    assert code == 200 and b"JupyterLab" in page, f"/lab answered {code}"

    code, _ = get(f"{base}/api/status")  # no token: the server must not be open to anyone
    assert code == 403
