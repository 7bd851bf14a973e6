"""What the docs state about the course must stay true: the bundled model's size, the workshop table of
exercises and points, and the pointers to the reserve notebook and the reading list."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BARD = ROOT / "kvcourse" / "bard"


def bundled_model_bytes() -> int:
    """Bytes of the bundled model as shipped: the files git tracks in kvcourse/bard (all of them outside git)."""
    try:
        out = subprocess.run(["git", "ls-files", "kvcourse/bard"], cwd=ROOT, capture_output=True, text=True, check=True)
        files = [ROOT / line for line in out.stdout.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        files = []
    files = files or [p for p in BARD.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files)


@pytest.mark.parametrize("doc", ["instructor-guide.md", "workshop.md"])
def test_docs_give_the_bundled_model_size_that_it_has(doc):
    text = (DOCS / doc).read_text(encoding="utf-8")
    stated = re.findall(r"`kvcourse/bard`, ([\d.]+) MB, i\.e\. ([\d.]+) MiB", text)
    assert stated, f"{doc} no longer states the bundled model's size as '`kvcourse/bard`, X MB, i.e. Y MiB'"
    n = bundled_model_bytes()
    for mb, mib in stated:
        assert float(mb) == round(n / 1e6, 1), f"{doc} says {mb} MB; kvcourse/bard holds {n:,} bytes ({n / 1e6:.1f} MB)"
        assert float(mib) == round(n / 2**20, 1), f"{doc} says {mib} MiB; kvcourse/bard is {n / 2**20:.1f} MiB"


def graded_counts(assignment: Path) -> tuple[int, int]:
    """(exercises, points) of an assignment's source notebook: answer cells, and points of its test cells."""
    (path,) = sorted(assignment.glob("*.ipynb"))
    cells = [c.metadata.get("nbgrader", {}) for c in nbformat.read(path, as_version=4).cells]
    return sum(1 for m in cells if m.get("solution")), sum(m.get("points", 0) for m in cells if m.get("grade"))


def test_workshop_table_has_the_notebooks_exercises_and_points():
    text = (DOCS / "workshop.md").read_text(encoding="utf-8")
    rows = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^\| `(\d\d_[a-z_]+)/[a-z_]+\.ipynb` \| (\d+) \| (\d+) \|",
                                                               text, re.M)}
    assignments = sorted(p for p in (ROOT / "solutions").iterdir() if p.is_dir())
    assert sorted(rows) == [p.name for p in assignments], f"workshop.md's table lists {sorted(rows)}"
    for a in assignments:
        assert rows[a.name] == graded_counts(a), (
            f"workshop.md says {a.name} has {rows[a.name][0]} exercises and {rows[a.name][1]} points; "
            f"solutions/{a.name} has {graded_counts(a)[0]} and {graded_counts(a)[1]}")


def test_reserve_notebook_and_reading_list_are_where_the_docs_say():
    workshop = (DOCS / "workshop.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    reserve = re.findall(r"`(notebooks/extras/[\w.-]+\.ipynb)`", workshop + readme)
    assert reserve, "neither workshop.md nor README.md points to the reserve notebook in notebooks/extras/"
    for path in reserve:
        assert (ROOT / path).is_file(), f"the docs point to {path}, which does not exist"
    assert (DOCS / "further-reading.md").is_file()
    assert "(further-reading.md)" in workshop, "workshop.md does not link further-reading.md"
    assert "(docs/further-reading.md)" in readme, "README.md does not link docs/further-reading.md"
    reading = (DOCS / "further-reading.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((https?://[^)\s]+)\)|<(https?://[^>\s]+)>", reading)
    assert len(links) >= 8, f"further-reading.md has {len(links)} links; every entry names its source"
    assert all((a or b).startswith("https://") for a, b in links), "further-reading.md links must be https"


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]


def test_readme_notebook_table_and_count_match_solutions():
    """The README said "Six graded notebooks" when there were eight: its count and its table follow solutions/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assignments = sorted(p for p in (ROOT / "solutions").iterdir() if p.is_dir())
    rows = re.findall(r"^\| (\d+) \| `(\d\d_[a-z_]+)/([a-z_]+\.ipynb)` \|", readme, re.M)
    assert [(int(n), a) for n, a, _ in rows] == [(int(p.name[:2]), p.name) for p in assignments], (
        f"README's notebook table lists {[a for _, a, _ in rows]}; solutions/ has {[p.name for p in assignments]}")
    for _, a, nb in rows:
        assert (ROOT / "solutions" / a / nb).is_file(), f"README names {a}/{nb}, which solutions/ does not have"
    count = re.search(r"(\w+) graded notebooks in `notebooks/`", readme)
    assert count, "README no longer says how many graded notebooks there are ('N graded notebooks in `notebooks/`')"
    assert count.group(1).lower() == NUMBER_WORDS[len(assignments)], (
        f"README says {count.group(1)} graded notebooks; solutions/ has {len(assignments)}")


def test_readme_names_the_benchmark_modules_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"one module per part: ((?:`\w+`,?\s*(?:and\s+)?)+)", readme)
    assert m, "README no longer lists kvcourse/bench's modules ('one module per part: `plan`, ...')"
    named = set(re.findall(r"`(\w+)`", m.group(1)))
    modules = {p.stem for p in (ROOT / "kvcourse" / "bench").glob("*.py") if not p.stem.startswith("_")}
    assert named == modules, f"README names {sorted(named)}; kvcourse/bench has {sorted(modules)}"
