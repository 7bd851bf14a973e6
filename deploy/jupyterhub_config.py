"""JupyterHub for a kvcourse classroom, with nbgrader's exchange: a PROTOTYPE.

Run from a scratch directory (the hub writes its database, cookie secret and generated Jupyter
config there), as an ordinary user:

    PATH=/path/to/configurable-http-proxy/bin:$PATH jupyterhub -f /path/to/kvcourse/deploy/jupyterhub_config.py

What it sets up (deploy/README.md explains each part, deploy/prove_hub.py tests it end to end):

- users log in with DummyAuthenticator (any password), or SharedPasswordAuthenticator when
  KVCOURSE_HUB_PASSWORD is set; only the listed instructors and learners may log in;
- every user's server is a local process of the *current* Unix user, with its own home directory
  (KVCOURSE_HOMES/<name>): no root, no system accounts, and NO isolation between users, so this
  spawner is for a trusted localhost test only (deploy/README.md says what to use instead);
- the single-user server is the course environment (the Python environment the hub runs in, or
  KVCOURSE_ENV_BIN), offline (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE) and with one torch thread;
- learners get learner mode (jupyter/learner/) plus nbgrader's Assignment List, which learner mode
  turns off and a classroom needs; members of the `instructors` group get instructor mode
  (jupyter/instructor/: formgrader and every nbgrader tool) and a course directory in their home;
- nbgrader's exchange is one shared directory (KVCOURSE_EXCHANGE), course id KVCOURSE_COURSE_ID.

Settings come from environment variables so that the same file serves localhost tests and, as a
base, a real deployment. All of them are optional.
"""

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from jupyterhub.spawner import SimpleLocalProcessSpawner

c = get_config()  # noqa: F821 - provided by JupyterHub


def _env_list(name, default):
    """A comma-separated list from the environment."""
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


# ---------------------------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------------------------

# The course repository (this file is deploy/jupyterhub_config.py inside it).
REPO = Path(os.environ.get("KVCOURSE_REPO", Path(__file__).resolve().parent.parent))
# The hub's own state: jupyterhub.sqlite, the cookie secret, the generated Jupyter config.
STATE = Path(os.environ.get("KVCOURSE_HUB_STATE", os.getcwd())).resolve()
# One home directory per user, created on first start: KVCOURSE_HOMES/<username>.
HOMES = Path(os.environ.get("KVCOURSE_HOMES", STATE / "home")).resolve()
# nbgrader's exchange, shared by everyone: release, submit, collect and feedback go through it.
EXCHANGE = Path(os.environ.get("KVCOURSE_EXCHANGE", STATE / "exchange")).resolve()
COURSE_ID = os.environ.get("KVCOURSE_COURSE_ID", "kvcourse")
# The course environment: its bin/ holds jupyterhub-singleuser, jupyter, nbgrader, python.
# By default, the environment the hub itself runs in.
ENV_BIN = Path(os.environ.get("KVCOURSE_ENV_BIN", Path(sys.executable).parent))

INSTRUCTORS = _env_list("KVCOURSE_INSTRUCTORS", "instructor")
LEARNERS = _env_list("KVCOURSE_LEARNERS", "learner1,learner2,learner3")
INSTRUCTOR_GROUP = "instructors"
# The instructor's copy of the course (solutions/, notebooks/, nbgrader_config.py), in their home.
COURSE_DIR_NAME = "kvcourse"

# ---------------------------------------------------------------------------------------------
# Network: everything on localhost
# ---------------------------------------------------------------------------------------------

# Users (and prove_hub.py) talk to the proxy; the proxy forwards to the hub and to each server.
c.JupyterHub.bind_url = "http://127.0.0.1:{}".format(os.environ.get("KVCOURSE_HUB_PUBLIC_PORT", "8000"))
# Where the hub itself listens (the proxy and the single-user servers reach it here).
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{}".format(os.environ.get("KVCOURSE_HUB_PORT", "8081"))
# configurable-http-proxy's REST API; the hub starts the proxy (it must be on PATH) and
# generates the token between them.
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{}".format(os.environ.get("KVCOURSE_PROXY_API_PORT", "8001"))

c.JupyterHub.db_url = "sqlite:///" + str(STATE / "jupyterhub.sqlite")
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
# Stop every single-user server when the hub stops (the default, said out loud).
c.JupyterHub.cleanup_servers = True

# ---------------------------------------------------------------------------------------------
# Who may log in, and who is an instructor
# ---------------------------------------------------------------------------------------------

if os.environ.get("KVCOURSE_HUB_PASSWORD"):
    # One password for the whole class (JupyterHub >= 5); still no system accounts.
    c.JupyterHub.authenticator_class = "shared-password"
    c.SharedPasswordAuthenticator.user_password = os.environ["KVCOURSE_HUB_PASSWORD"]
else:
    # Any password: for localhost tests only.
    c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = set(INSTRUCTORS + LEARNERS)

# The group that decides instructor mode (Spawner.group_overrides and prepare_home below).
c.JupyterHub.load_groups = {INSTRUCTOR_GROUP: {"users": INSTRUCTORS}}

c.JupyterHub.load_roles = [
    {
        # Instructors may see the user list and open a learner's server (to help them debug).
        # Remove "access:servers" if learners' servers should stay private to them.
        "name": "instructor",
        "description": "Course instructors: list learners and open their servers",
        "scopes": ["list:users", "read:users", "access:servers"],
        "groups": [INSTRUCTOR_GROUP],
    },
]

# An API token for scripts (prove_hub.py, or your own automation): a hub service with the admin
# role. Without KVCOURSE_HUB_ADMIN_TOKEN there is no such service.
if os.environ.get("KVCOURSE_HUB_ADMIN_TOKEN"):
    c.JupyterHub.services = [{"name": "course-admin", "api_token": os.environ["KVCOURSE_HUB_ADMIN_TOKEN"]}]
    c.JupyterHub.load_roles.append(
        {
            "name": "course-admin",
            "description": "Create users, start and stop their servers, issue tokens",
            "scopes": ["admin:users", "admin:servers", "admin:groups", "tokens", "list:users", "read:users"],
            "services": ["course-admin"],
        }
    )

# ---------------------------------------------------------------------------------------------
# Jupyter and nbgrader configuration the single-user servers read
# ---------------------------------------------------------------------------------------------
# Two folders, written here at hub start, each put in front of the course's own mode folder on
# JUPYTER_CONFIG_PATH (the first folder on that path wins):
#
#   STATE/jupyter/learner-hub:    jupyter/learner/ turns the Assignment List off (the course has
#                                 no exchange without a hub); here it comes back on: the server
#                                 extension, the JupyterLab panel and nbgrader's menu (which holds
#                                 the only way to open the panel). formgrader, course list and
#                                 Create Assignment stay off.
#   STATE/jupyter/instructor-hub: the instructor's course directory and the exchange.
#
# Both hold an nbgrader_config.py: nbgrader reads nbgrader_config.py from every folder on the
# Jupyter config path (and from the server's working directory).

LEARNER_OVERLAY = STATE / "jupyter" / "learner-hub"
INSTRUCTOR_OVERLAY = STATE / "jupyter" / "instructor-hub"

_EXCHANGE_CONFIG = f"""
c.CourseDirectory.course_id = {COURSE_ID!r}
c.Exchange.root = {str(EXCHANGE)!r}
"""

_LEARNER_NBGRADER_CONFIG = f'''"""nbgrader for a learner's server on the kvcourse hub (generated by deploy/jupyterhub_config.py)."""
import os

c = get_config()  # noqa: F821
{_EXCHANGE_CONFIG}
# Fetched assignments land in the server's root directory (the learner's home): ~/01_attention/.
c.Exchange.assignment_dir = "."
# nbgrader names a submission after the Unix user. On this hub every server runs as the same Unix
# user, so name it after the hub user instead (JupyterHub sets JUPYTERHUB_USER in every server).
c.CourseDirectory.student_id = os.environ["JUPYTERHUB_USER"]
'''

_INSTRUCTOR_NBGRADER_CONFIG = f'''"""nbgrader for an instructor's server on the kvcourse hub (generated by deploy/jupyterhub_config.py)."""
import os

c = get_config()  # noqa: F821

# The course's own settings (cell timeout, offline, sanitizers, ...) from the course copy in the
# instructor's home; that file sets CourseDirectory.root to its own folder.
_course = os.path.join(os.environ["HOME"], {COURSE_DIR_NAME!r}, "nbgrader_config.py")
load_subconfig(_course)  # noqa: F821 - provided by traitlets
{_EXCHANGE_CONFIG}
# Every server here runs as one Unix user, so "... claims to be submitted by learner1 but is owned
# by <you>; cheating attempt?" would be logged for every submission: switch that ownership check off
# (keep it on with real Unix users). The warning names CollectApp.check_owner, but in nbgrader 0.9
# the option lives on ExchangeCollect, which is what both `nbgrader collect` and formgrader use.
c.ExchangeCollect.check_owner = False
'''


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_overlays():
    _write(
        LEARNER_OVERLAY / "jupyter_server_config.json",
        json.dumps({"ServerApp": {"jpserver_extensions": {"nbgrader.server_extensions.assignment_list": True}}}, indent=2),
    )
    # The panel, and nbgrader's menu and command palette entries, the only way to open it in
    # JupyterLab. The menu only shows commands whose plugins are loaded: with formgrader and course
    # list still disabled, it holds "Assignment List" alone.
    back_on = {"@jupyter/nbgrader:assignment-list": False, "@jupyter/nbgrader:menu": False}
    _write(
        LEARNER_OVERLAY / "labconfig" / "page_config.json",
        json.dumps({"disabledExtensions": back_on, "lockedExtensions": back_on}, indent=2),
    )
    _write(LEARNER_OVERLAY / "nbgrader_config.py", _LEARNER_NBGRADER_CONFIG)
    _write(INSTRUCTOR_OVERLAY / "nbgrader_config.py", _INSTRUCTOR_NBGRADER_CONFIG)
    # nbgrader wants the exchange root writable by everyone (it would chmod it to 0o777 itself on the
    # first release); each course folder in it gets nbgrader's own modes.
    EXCHANGE.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):  # not ours: then the owner must have set it up
        EXCHANGE.chmod(0o777)
    HOMES.mkdir(parents=True, exist_ok=True)


write_overlays()

# ---------------------------------------------------------------------------------------------
# The spawner: a local process per user, as the current Unix user, with its own home
# ---------------------------------------------------------------------------------------------


def is_instructor(spawner):
    return any(group.name == INSTRUCTOR_GROUP for group in spawner.user.groups)


class KVCourseSpawner(SimpleLocalProcessSpawner):
    """SimpleLocalProcessSpawner with the course environment first on PATH.

    SimpleLocalProcessSpawner needs no system users and no root: it starts each server as the Unix
    user running the hub, in home_dir_template, with HOME, USER and SHELL set for it. JupyterHub's
    own warning: "only use this for testing". Nothing below depends on it but PATH.
    """

    def get_env(self):
        env = super().get_env()
        # The course environment first on PATH: nbgrader runs `alembic`, kernels run its python.
        env["PATH"] = os.pathsep.join([str(ENV_BIN), env.get("PATH", os.defpath)])
        return env


def prepare_home(spawner):
    """pre_spawn_hook: make the user's home; give an instructor a course directory in it."""
    home = Path(spawner.home_dir)
    home.mkdir(parents=True, exist_ok=True)
    if is_instructor(spawner):
        course = home / COURSE_DIR_NAME
        if not course.exists():
            # The instructor source, the learner release and the course's nbgrader settings; no
            # gradebook.db: the class starts with an empty one.
            course.mkdir()
            shutil.copy2(REPO / "nbgrader_config.py", course / "nbgrader_config.py")
            ignore = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__")
            shutil.copytree(REPO / "solutions", course / "solutions", ignore=ignore)
            shutil.copytree(REPO / "notebooks", course / "notebooks", ignore=ignore)


c.JupyterHub.spawner_class = KVCourseSpawner
c.KVCourseSpawner.home_dir_template = str(HOMES / "{username}")
c.Spawner.pre_spawn_hook = prepare_home
# The server serves the user's home; an instructor's course directory (~/kvcourse) is inside it,
# as nbgrader's formgrader requires.
c.Spawner.notebook_dir = str(HOMES / "{username}")
c.Spawner.default_url = "/lab"
c.Spawner.cmd = [str(ENV_BIN / "jupyterhub-singleuser")]
c.Spawner.environment = {
    # Learner mode for everyone (jupyter/README.md), plus the Assignment List (see above).
    "JUPYTER_CONFIG_PATH": os.pathsep.join([str(LEARNER_OVERLAY), str(REPO / "jupyter" / "learner")]),
    "HF_HUB_OFFLINE": "1",  # the course runs on its bundled model, never waits on the network
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",  # many servers share few cores; the course's models are tiny
    "PYTHONUNBUFFERED": "1",
}
# ...and instructor mode for the instructors group. Spawner.group_overrides is a JupyterHub setting,
# not a spawner's, so it works with SystemdSpawner (TLJH) and KubeSpawner (Z2JH) too, on JupyterHub 5.1
# or newer (its changelog, 5.1.0: "Add Spawner.group_overrides", #4822; tested here on 6.1.1). The
# environment dict is merged, so only JUPYTER_CONFIG_PATH changes.
c.Spawner.group_overrides = {
    "10-instructor-mode": {
        "groups": [INSTRUCTOR_GROUP],
        "spawner_override": {
            "environment": {
                "JUPYTER_CONFIG_PATH": os.pathsep.join([str(INSTRUCTOR_OVERLAY), str(REPO / "jupyter" / "instructor")]),
            },
        },
    },
}
# Jupyter servers refuse to run as root unless told to. Only for the localhost test in a root container
# (deploy/prove_hub.py sets it when it runs as root): a real hub starts each server as its user.
if os.environ.get("KVCOURSE_HUB_ALLOW_ROOT") == "1":
    c.Spawner.args = ["--allow-root"]
# A cold JupyterLab import on a busy machine can take a while.
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
