"""Pictures of speculative runs (notebook 10), drawn from ``SpeculativeOutput``s and ``exercises.sweep`` rows.

- ``accepted_per_step``: drafts kept at each verification step, with the target's own token on top;
- ``sweep_plot``: tokens per target pass and wall-clock speedup against k, one line per drafter and prompt;
- ``coloured_text``: the generated text, each token coloured by where it came from (a kept draft, or the target).
"""

from __future__ import annotations

from collections.abc import Sequence

from .decode import SpeculativeOutput
from .exercises import token_sources

_COLORS = {"prefill": "0.8", "draft": "tab:green", "target": "tab:orange"}


def _check_out(out) -> None:
    if not isinstance(out, SpeculativeOutput):
        raise TypeError(f"pass a SpeculativeOutput (what speculative_generate returns), got {type(out).__name__}")
    if not out.accepted:
        raise ValueError("this SpeculativeOutput has no verification step: generate at least 2 new tokens")


def accepted_per_step(out: SpeculativeOutput, title: str = "", ax=None):
    """Stacked bars: kept drafts (green) and the target's token (orange) at each step; a dashed line at the
    drafts proposed. Returns the axes."""
    import matplotlib.pyplot as plt

    _check_out(out)
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 2.6))
    steps = range(1, len(out.accepted) + 1)
    ax.bar(steps, out.accepted, color=_COLORS["draft"], label="drafts kept")
    ax.bar(steps, [1] * len(out.accepted), bottom=out.accepted, color=_COLORS["target"], label="the target's token")
    ax.step(steps, out.proposed, where="mid", color="k", ls="--", lw=1, label="drafts proposed")
    ax.set_xlabel("verification step (one target pass each)")
    ax.set_ylabel("tokens emitted")
    ax.set_title(title or f"{out.new_tokens} tokens in {out.target_passes} target passes")
    ax.legend(loc="upper right", fontsize=8)
    return ax


def sweep_plot(rows: Sequence[dict], axes=None):
    """Two panels against k: tokens per target pass, and wall-clock speedup over the plain loop (1 = no gain).
    ``rows`` as ``exercises.sweep`` returns them. Returns the axes."""
    import matplotlib.pyplot as plt

    if not rows or not all(isinstance(r, dict) and {"prompt", "drafter", "k"} <= set(r) for r in rows):
        raise ValueError("pass the rows exercises.sweep returns: a non-empty list of dicts with prompt, drafter, k")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for key, ax in zip(("tokens per pass", "speedup"), axes, strict=True):
        for prompt in dict.fromkeys(r["prompt"] for r in rows):
            for drafter in dict.fromkeys(r["drafter"] for r in rows):
                sel = [r for r in rows if r["prompt"] == prompt and r["drafter"] == drafter]
                if sel:
                    ax.plot([r["k"] for r in sel], [r[key] for r in sel], marker="o",
                            ls="-" if prompt == rows[0]["prompt"] else ":", label=f"{drafter}, {prompt!r}")
        ax.axhline(1.0, color="0.5", lw=0.8)
        ax.set_xlabel("k (drafts per step)")
        ax.set_ylabel(key)
    axes[0].set_title("new tokens per target pass")
    axes[1].set_title("wall-clock speedup over the plain cached loop")
    axes[0].legend(fontsize=7)
    return axes


def coloured_text(tokenizer, out: SpeculativeOutput, prompt_len: int, title: str = "", width: int = 72, ax=None):
    """The new tokens laid out as text in a monospace grid, each on the colour of its source: a kept draft
    (green) or the target's own token (orange; grey for the prefill's). Newlines shown as '⏎'. Returns the axes."""
    import matplotlib.pyplot as plt

    _check_out(out)
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 0 < prompt_len < out.tokens.shape[1]:
        raise ValueError(f"prompt_len must be the prompt's length, 1..{out.tokens.shape[1] - 1}, got {prompt_len!r}")
    ids = out.tokens[0, prompt_len:].tolist()
    kinds = token_sources(out)
    pieces = [tokenizer.decode([t]) for t in ids]
    rows, row, col = [], [], 0
    for piece, kind in zip(pieces, kinds, strict=True):
        text = piece.replace("\n", "⏎")
        if col + len(text) > width and row:
            rows.append(row)
            row, col = [], 0
        row.append((col, text, kind))
        col += len(text)
        if "\n" in piece:
            rows.append(row)
            row, col = [], 0
    rows.append(row)
    if ax is None:  # one data unit = one monospace character at 9 pt (0.602 em wide): the grid has no gaps
        fig = plt.figure(figsize=(9 * 0.602 / 72 * (width + 2), 0.22 * len(rows) + 0.5))
        ax = fig.add_axes((0, 0, 1, 1 - 0.4 / (0.22 * len(rows) + 0.5)))
    for r, line in enumerate(rows):
        for c, text, kind in line:
            ax.text(c, -r, text, family="monospace", fontsize=9, va="center", ha="left",
                    bbox=dict(boxstyle="square,pad=0.1", fc=_COLORS[kind], ec="none", alpha=0.6))
    ax.set_xlim(-1, width + 1)
    ax.set_ylim(-len(rows), 1)
    ax.axis("off")
    drafted = kinds.count("draft")
    ax.set_title(title or f"{drafted} of {len(kinds)} tokens were kept drafts (green); orange: the target's own")
    return ax
