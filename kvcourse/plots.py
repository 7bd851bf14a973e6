"""Small plotting helpers shared by the notebooks (matplotlib), so no notebook copies plot code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def line_plot(x: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str, ylabel: str,
              title: str = "", logy: bool = False, ax=None):
    """One line per named series against a shared x; returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    xs = list(x)
    for label, ys in series.items():
        if len(ys) > len(xs):
            raise ValueError(f"line_plot: series {label!r} has {len(ys)} values but x has {len(xs)}: each series "
                             f"needs one x per value (a shorter series is drawn against the first x's)")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, ys in series.items():
        ax.plot(xs[: len(ys)], list(ys), marker="." if len(ys) < 60 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return ax


def markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
    """A list of dicts (same keys) as a markdown table."""
    if not rows:
        return ""
    if not all(isinstance(r, Mapping) for r in rows):
        bad = next(r for r in rows if not isinstance(r, Mapping))
        raise TypeError(f"markdown_table takes a list of dicts (one per row), got a {type(bad).__name__}: {bad!r}")
    cols = list(rows[0])
    for i, r in enumerate(rows):
        if list(r) != cols and set(r) != set(cols):
            raise ValueError(f"markdown_table: row {i} has keys {list(r)}, but row 0 has {cols}: every row needs "
                             f"the same keys")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def show_table(rows: Sequence[Mapping[str, object]]) -> None:
    """Display a table as markdown in Jupyter, as text elsewhere."""
    text = markdown_table(rows)
    try:
        from IPython.display import Markdown, display

        display(Markdown(text))
    except ImportError:  # pragma: no cover - outside Jupyter
        print(text)
