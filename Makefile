# kvcourse: quick start is `make lab` (learners) and `make test` (checks).
# Every target builds the virtual environment first if it is missing or older than pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
# torch goes in first, from this spec, so pip never picks a torch build by itself.
# CUDA wheels, for example: make clean venv TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
NOTEBOOKS ?= notebooks
SOLUTIONS ?= solutions
# Lab server options, e.g. `make lab HEADLESS=1 PORT=8899`.
PORT ?= 8888
HEADLESS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Commands run with the venv first on PATH (nbgrader shells out to `alembic`, lab terminals
# want the course's python), and offline: the course runs on its bundled model only.
RUN := PATH="$(abspath $(BIN)):$$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Two Jupyter modes, chosen per run by JUPYTER_CONFIG_PATH (read before ~/.jupyter and the venv's own
# config); nothing in the venv is changed, so one mode never leaks into the other:
# jupyter/learner/ turns off nbgrader's formgrader, assignment_list and course_list server extensions and
# disables (and locks) their JupyterLab panels and the Create Assignment panel: learners keep Validate only.
# jupyter/instructor/ turns every nbgrader tool on, whatever an earlier setup left in the venv.
LEARNER_CONFIG := $(CURDIR)/jupyter/learner
INSTRUCTOR_CONFIG := $(CURDIR)/jupyter/instructor

# Jupyter refuses to run as root (containers, CI) unless told to.
SERVER_OPTS := --port=$(PORT) $(if $(HEADLESS),--ServerApp.open_browser=False) $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: venv lab lab-instructor test test-classroom hub-deps lint bench release collect grade sample-submissions need-assignment clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
		"kvcourse needs Python 3.11 or newer, found " + sys.version.split()[0] + ": run make PYTHON=python3.11 (or see README, Install)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

lab: $(STAMP)
	mkdir -p $(NOTEBOOKS)
	$(RUN) JUPYTER_CONFIG_PATH="$(LEARNER_CONFIG)$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
		$(BIN)/jupyter lab --ServerApp.root_dir=$(NOTEBOOKS) $(SERVER_OPTS)

lab-instructor: $(STAMP)
	$(RUN) JUPYTER_CONFIG_PATH="$(INSTRUCTOR_CONFIG)$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
		$(BIN)/jupyter lab --ServerApp.root_dir=. $(SERVER_OPTS)

# Lint first (fails on any ruff error), then the whole test suite. One torch thread per process unless
# OMP_NUM_THREADS says otherwise: the course's models are small, and on 2 cores shared with other jobs
# (nbgrader kernels, a neighbour's build) two spinning OpenMP threads per process made the suite 2-4x slower.
test: lint
	$(RUN) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest

# The classroom check (deploy/README.md): a real JupyterHub on localhost, an instructor and three learners going
# through nbgrader's exchange, a headless chromium; and `make grade JOBS=2` against the serial grader. Not in
# `make test`: it needs npm and Debian's chromium + chromium-driver (.ci/run installs them), and ~10 minutes.
HUB_STAMP := $(VENV)/.hub-installed
CHP_VERSION ?= 5.3.0
CHP_DIR := $(CURDIR)/.hub/chp
CHP := $(CHP_DIR)/node_modules/.bin/configurable-http-proxy

$(HUB_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e ".[dev,hub]"
	touch $@

$(CHP):
	@command -v npm >/dev/null || { echo "make test-classroom needs npm (Debian: apt-get install nodejs npm) for configurable-http-proxy" >&2; exit 1; }
	npm install --prefix $(CHP_DIR) --no-audit --no-fund --loglevel=error configurable-http-proxy@$(CHP_VERSION)

hub-deps: $(HUB_STAMP) $(CHP)

test-classroom: hub-deps
	$(RUN) KVCOURSE_CHP_DIR=$(dir $(CHP)) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -m classroom

lint: $(STAMP)
	$(RUN) $(BIN)/python -m ruff check .

bench: $(STAMP)
	$(RUN) $(BIN)/python -m kvcourse.bench

# Regenerate the learner notebooks ($(NOTEBOOKS)/ID/) from the instructor solutions ($(SOLUTIONS)/ID/).
release: $(STAMP)
	@set -e; for dir in $(SOLUTIONS)/*/; do \
		[ -d "$$dir" ] || { echo "no assignments in $(SOLUTIONS)/"; exit 1; }; \
		id=$$(basename "$$dir"); \
		echo "nbgrader generate_assignment $$id"; \
		$(RUN) $(BIN)/nbgrader generate_assignment "$$id" --force \
			--CourseDirectory.root=$(CURDIR) \
			--CourseDirectory.source_directory=$(SOLUTIONS) \
			--CourseDirectory.release_directory=$(NOTEBOOKS); \
	done

# Instructor workflow (docs/instructor-guide.md). ASSIGNMENT is a folder name in solutions/, e.g. 03_kv_cache.
ASSIGNMENT ?=
need-assignment:
	@test -n "$(ASSIGNMENT)" || { echo "set ASSIGNMENT, one of: $$(ls $(SOLUTIONS))"; exit 2; }

# An LMS export: put the zip(s) in downloaded/$(ASSIGNMENT)/archive/ first.
collect: $(STAMP) need-assignment
	$(RUN) $(BIN)/nbgrader zip_collect $(ASSIGNMENT) --force

# Autograde every submission in submitted/*/$(ASSIGNMENT)/, write feedback HTML and grades.csv.
# JOBS=N grades N submissions at a time, each worker with its own copy of the gradebook, merged at the end
# (kvcourse/grading.py says why that is safe with nbgrader's SQLite gradebook). One kernel per job.
JOBS ?= 1
AUTOGRADE := $(if $(filter-out 1,$(JOBS)),$(BIN)/python -m kvcourse.grading autograde $(ASSIGNMENT) --jobs $(JOBS),$(BIN)/nbgrader autograde $(ASSIGNMENT) --force)
grade: $(STAMP) need-assignment
	$(RUN) $(BIN)/nbgrader generate_assignment $(ASSIGNMENT) --force
	@status=0; $(RUN) $(AUTOGRADE) || status=$$?; \
	$(RUN) $(BIN)/nbgrader generate_feedback $(ASSIGNMENT) --force \
		&& $(RUN) $(BIN)/nbgrader export --assignment=$(ASSIGNMENT) --to grades.csv \
		&& $(RUN) $(BIN)/python -m kvcourse.instructor summary grades.csv || exit $$?; \
	if [ $$status -ne 0 ]; then echo "make grade: autograde could not grade some submissions (ERROR lines above); they have no feedback and 0 in grades.csv" >&2; exit $$status; fi

sample-submissions: $(STAMP) need-assignment
	$(RUN) $(BIN)/python -m kvcourse.instructor sample $(ASSIGNMENT)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
