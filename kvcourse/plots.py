"""Small plotting helpers shared by the notebooks (matplotlib), so no notebook copies plot code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def line_plot(x: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str, ylabel: str,
              title: str = "", logy: bool = False, ax=None):
    """One line per named series against a shared x; returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, ys in series.items():
        ax.plot(list(x)[: len(ys)], list(ys), marker="." if len(ys) < 60 else None, label=label)
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
    cols = list(rows[0])
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
