"""Guards for the packaging: pyproject.toml, environment.yml, Makefile, .ci/run and README's quick start
must keep telling the same story. Each test is named after the bug it catches."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

# pip (PyPI) name -> conda-forge name, where they differ.
CONDA_NAME = {
    "torch": "pytorch",
    "matplotlib": "matplotlib-base",
}
# conda-only entries that are not Python packages of the course.
CONDA_TOOLING = {"python", "pip"}


# ---------------------------------------------------------------- parsing helpers


def pyproject_requirements(pyproject: dict, *, extras: bool) -> dict[str, Requirement]:
    reqs = list(pyproject["project"]["dependencies"])
    if extras:
        for group in pyproject["project"].get("optional-dependencies", {}).values():
            reqs += group
    parsed = [Requirement(r) for r in reqs]
    return {canonicalize_name(r.name): r for r in parsed}


def load_environment_yml(repo_root: Path) -> dict:
    return yaml.safe_load((repo_root / "environment.yml").read_text(encoding="utf-8"))


def conda_specs(env: dict) -> dict[str, SpecifierSet]:
    """conda dependency strings (``name``, ``name>=1,<2``, ``name=1.2``, ``name 1.2.*``) as pip specifier sets."""
    out = {}
    for dep in env["dependencies"]:
        if not isinstance(dep, str):  # the `pip:` sub-list
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", dep.strip())
        assert m, f"cannot parse environment.yml dependency {dep!r}"
        name, spec = m.group(1), m.group(2).replace(" ", "")
        parts = []
        for part in filter(None, spec.split(",")):
            if re.fullmatch(r"=[^=].*", part):  # conda's fuzzy `=1.2` means 1.2.*
                part = "=" + part + ("" if part.endswith("*") else ".*")
            elif re.fullmatch(r"[0-9].*", part):  # bare version: `1.2.*` or `1.2`
                part = "==" + part
            parts.append(part)
        out[canonicalize_name(name)] = SpecifierSet(",".join(parts))
    return out


def conda_pip_section(env: dict) -> list[str]:
    for dep in env["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            return [str(x) for x in dep["pip"]]
    return []


def makefile_text(repo_root: Path) -> str:
    return (repo_root / "Makefile").read_text(encoding="utf-8")


def makefile_targets(repo_root: Path) -> set[str]:
    targets = set()
    for line in makefile_text(repo_root).splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-$() /]+?)\s*:(?![=:])", line)
        if m and not line.startswith("\t"):
            targets.update(m.group(1).split())
    return targets


def make_goals(command: str) -> list[str]:
    """`make lab HEADLESS=1 -j2` -> ['lab']"""
    words = shlex.split(command, comments=True)
    assert words and words[0] == "make", command
    return [w for w in words[1:] if "=" not in w and not w.startswith("-")]


def readme_quick_start_commands(repo_root: Path) -> list[tuple[str, str]]:
    """(command, comment) for each line of the code block(s) in README's "## Quick start" section."""
    text = (repo_root / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Quick start\s*$(.*?)(?=^## )", text, flags=re.M | re.S)
    assert m, 'README.md has no "## Quick start" section'
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", m.group(1), flags=re.M | re.S):
        for line in block.splitlines():
            cmd, _, comment = line.partition("#")
            if cmd.strip():
                commands.append((cmd.strip(), comment.strip()))
    return commands


# ---------------------------------------------------------------- pyproject <-> environment.yml


def test_dependency_added_to_pyproject_but_missing_from_environment_yml(pyproject, repo_root):
    conda = conda_specs(load_environment_yml(repo_root))
    missing = [
        name
        for name in pyproject_requirements(pyproject, extras=True)
        if canonicalize_name(CONDA_NAME.get(name, name)) not in conda
    ]
    assert not missing, f"in pyproject.toml but not in environment.yml: {missing} (conda names: {CONDA_NAME})"


def test_dependency_added_to_environment_yml_but_missing_from_pyproject(pyproject, repo_root):
    pip_name = {canonicalize_name(v): k for k, v in CONDA_NAME.items()}
    ours = pyproject_requirements(pyproject, extras=True)
    extra = [
        name
        for name in conda_specs(load_environment_yml(repo_root))
        if name not in CONDA_TOOLING and pip_name.get(name, name) not in ours
    ]
    assert not extra, f"in environment.yml but not in pyproject.toml: {extra}"


def test_version_bounds_drift_between_pyproject_and_environment_yml(pyproject, repo_root):
    conda = conda_specs(load_environment_yml(repo_root))
    drift = []
    for name, req in pyproject_requirements(pyproject, extras=True).items():
        conda_spec = conda.get(canonicalize_name(CONDA_NAME.get(name, name)))
        if conda_spec is not None and conda_spec != req.specifier:
            drift.append(f"{name}: pyproject '{req.specifier}' vs environment.yml '{conda_spec}'")
    assert not drift, "version bounds differ:\n" + "\n".join(drift)


def test_environment_yml_python_outside_requires_python(pyproject, repo_root):
    python = conda_specs(load_environment_yml(repo_root)).get("python")
    assert python is not None, "environment.yml does not pin python"
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    # conda's `python=3.11` is `==3.11.*`: its first release must satisfy requires-python.
    pinned = re.search(r"(\d+\.\d+)", str(python))
    assert pinned and requires.contains(pinned.group(1) + ".0"), f"python {python} vs requires-python {requires}"


def test_environment_yml_forgets_to_install_the_course_package(repo_root):
    pip = [p.replace(" ", "") for p in conda_pip_section(load_environment_yml(repo_root))]
    assert "-e.[dev]" in pip, f"environment.yml's pip: section should install `-e .[dev]`, has {pip}"


def test_installed_packages_do_not_satisfy_pyproject(pyproject):
    """The environment running these tests was built from an older pyproject.toml (rebuild it: make clean venv)."""
    bad = []
    for name, req in pyproject_requirements(pyproject, extras=False).items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            bad.append(f"{name}: not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            bad.append(f"{name} {version} does not satisfy '{req.specifier}'")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- Makefile, CI, README


def test_makefile_default_torch_spec_outside_pyproject_torch_range(pyproject, repo_root):
    m = re.search(r"^TORCH_SPEC\s*\?=\s*(.+?)\s*$", makefile_text(repo_root), flags=re.M)
    assert m, "Makefile has no `TORCH_SPEC ?= ...` default"
    default = Requirement(shlex.split(m.group(1))[0])
    pins = [s.version for s in default.specifier if s.operator in ("==", "===")]
    assert default.name == "torch" and len(pins) == 1, (
        f"TORCH_SPEC default {m.group(1)!r} must pin one torch version (a bare torch pulls a CUDA build)"
    )
    torch_range = pyproject_requirements(pyproject, extras=False)["torch"].specifier
    assert torch_range.contains(pins[0]), f"TORCH_SPEC torch=={pins[0]} is outside pyproject's torch{torch_range}"


def test_ci_runs_a_different_make_target_than_readme_quick_start(repo_root):
    ci_lines = [
        line.strip()
        for line in (repo_root / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if re.match(r"\s*make\b", line)
    ]
    assert ci_lines, ".ci/run should run the tests with make, found no make call"
    readme_tests = [cmd for cmd, comment in readme_quick_start_commands(repo_root) if "test" in comment.lower()]
    assert len(readme_tests) == 1, "README's quick start should have one command commented as running the tests"
    assert make_goals(ci_lines[0]) == make_goals(readme_tests[0]), (
        f".ci/run first runs `{ci_lines[0]}` but README tells people to run `{readme_tests[0]}`"
    )
    # Anything CI runs after the quick-start tests (the classroom check) must be a real target too.
    targets = makefile_targets(repo_root)
    for line in ci_lines[1:]:
        for goal in make_goals(line):
            assert goal in targets, f".ci/run runs `{line}` but the Makefile has no `{goal}` target"


def test_readme_quick_start_names_a_make_target_that_does_not_exist(repo_root):
    commands = readme_quick_start_commands(repo_root)
    assert len(commands) == 2, f"the quick start is two commands, README has {[c for c, _ in commands]}"
    targets = makefile_targets(repo_root)
    for cmd, _ in commands:
        for goal in make_goals(cmd):
            assert goal in targets, f"README runs `{cmd}` but the Makefile has no `{goal}` target"


def test_ci_script_does_not_fail_fast(repo_root):
    text = (repo_root / ".ci" / "run").read_text(encoding="utf-8")
    assert "set -euo pipefail" in text, ".ci/run must `set -euo pipefail` so a failing step fails CI"


def test_gitignore_would_drop_notebooks_or_bundled_model(repo_root):
    if shutil.which("git") is None or not (repo_root / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        r = subprocess.run(
            ["git", "check-ignore", "--no-index", "-q", path], cwd=repo_root, capture_output=True, text=True
        )
        assert r.returncode in (0, 1), r.stderr
        return r.returncode == 0

    for tracked in [
        "notebooks/01/intro.ipynb",
        "solutions/01/intro.ipynb",
        "kvcourse/bard/model.safetensors",
        "kvcourse/bard/config.json",
        "kvcourse/bard/README.md",
        "kvcourse/bard_draft/model.safetensors",
    ]:
        assert not ignored(tracked), f".gitignore hides {tracked}, which must be committed"
    for junk in [
        ".venv/bin/python",
        "kvcourse/__pycache__/x.pyc",
        "gradebook.db",
        "submitted/a/b.ipynb",
        "notebooks/.ipynb_checkpoints/x.ipynb",
        "kvcourse.egg-info/PKG-INFO",
    ]:
        assert ignored(junk), f".gitignore lets {junk} be committed"


# ---------------------------------------------------------------- the wheel


def test_bundled_model_left_out_of_the_wheel(pyproject, repo_root, tmp_path):
    """Builds a wheel of a stub package with this pyproject.toml and checks kvcourse/bard/* and the draft model of
    notebook 10, kvcourse/bard_draft/*, are inside."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    (src / "kvcourse" / "bard").mkdir(parents=True)
    (src / "kvcourse" / "bard_draft").mkdir(parents=True)
    shutil.copy(repo_root / "pyproject.toml", src)
    (src / "README.md").write_text("# kvcourse\n")
    (src / "kvcourse" / "__init__.py").write_text("")
    model_files = ["config.json", "tokenizer.json", "generation_config.json", "model.safetensors", "README.md"]
    for name in model_files:
        (src / "kvcourse" / "bard" / name).write_text("{}")
        (src / "kvcourse" / "bard_draft" / name).write_text("{}")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("kvcourse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("bard", "bard_draft"):
        missing = [n for n in model_files if f"kvcourse/{folder}/{n}" not in names]
        assert not missing, f"wheel lacks kvcourse/{folder}/{missing}: check [tool.setuptools.package-data]"
    entry_points = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    )
    assert "kvcourse = kvcourse.cli:main" in entry_points
