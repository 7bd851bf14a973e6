"""The plots: time per token against position, the cache-update cost, and the batch sweep's roofline.

All drawn with matplotlib's Agg backend (no display), from the figures in ``bench.json``; a figure that
is missing is left out of a plot, never drawn as zero.
"""

from __future__ import annotations

from pathlib import Path

from .report import _ok, _prompt_label


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_steps(cases: list[dict], path: Path) -> None:
    """Per-step decode time against sequence length, one panel per model (the prompt with per-step times)."""
    plt = _pyplot()
    shown = [c for c in cases if any(r.get("step_ms") for r in c["methods"].values())]
    if not shown:
        return
    fig, axes = plt.subplots(len(shown), 1, figsize=(7.5, 3.4 * len(shown)), squeeze=False)
    for ax, c in zip(axes[:, 0], shown, strict=True):
        top = 0.0
        for r in c["methods"].values():
            ms = (r.get("step_ms") or [])[1:]  # decode steps only (step 0 is the prompt)
            if ms:
                pos = range(c["prompt_tokens"] + 1, c["prompt_tokens"] + 1 + len(ms))
                ax.plot(list(pos), ms, label=r["label"], lw=1.1, ls="-" if r["cached"] else "--")
                top = max(top, sorted(ms)[int(0.98 * (len(ms) - 1))])  # ignore rare spikes (GC, other load)
        floor = c["floor"].get("ms_per_token")
        if _ok(floor):
            ax.axhline(floor, color="k", ls=":", lw=1, label=f"bandwidth floor ({floor:.2g} ms)")
            top = max(top, floor)
        ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)
        ax.set_title(f"{c['model']}, {_prompt_label(c)}", fontsize=10)
        ax.set_xlabel("sequence length (prompt + tokens so far)")
        ax.set_ylabel("ms per new token")
        ax.grid(True, alpha=0.3)
    axes[-1, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Time per generated token (dashed: no KV cache)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cache(costs: dict, path: Path) -> None:
    """Cost of one token's cache update against the cache length: torch.cat against preallocated."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(costs["lengths"], costs["concat_ms"], marker="o", label="torch.cat (ConcatKVCache)")
    ax.plot(costs["lengths"], costs["prealloc_ms"], marker="o", label="preallocated (KVCache)")
    ax.set_xlabel("tokens already in the cache")
    ax.set_ylabel("ms per one-token update (all layers)")
    ax.set_title(f"Cache update cost, {costs['shape']} shape ({costs['layers']} layers)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(sweeps: list[dict], path: Path) -> None:
    """The batch sweep, one row of two panels per model.

    Left, roofline-style: time per decode step against the bytes it moves (weights once + every row's KV
    cache), with the measured copy bandwidth as the line time = bytes / bandwidth. A memory-bound step sits
    near the line, at about the same time for every batch; where the points climb away from it, the
    arithmetic of the extra rows costs more than their bytes: decode has stopped being memory-bound.
    Right: tokens/s against the batch size, and the bandwidth ceiling B / floor(B).
    """
    plt = _pyplot()
    shown = [s for s in sweeps if any(_ok(p.get("decode_ms_per_token")) for p in s["points"])]
    if not shown:
        return
    fig, axes = plt.subplots(len(shown), 2, figsize=(11, 3.8 * len(shown)), squeeze=False)
    for (ax, ax2), s in zip(axes, shown, strict=True):
        pts = [p for p in s["points"] if _ok(p.get("decode_ms_per_token")) and _ok(p.get("bytes"))]
        unit, scale = ("GB", 1e9) if max(p["bytes"] for p in pts) >= 1e9 else ("MB", 1e6)
        gb = [p["bytes"] / scale for p in pts]
        ms = [p["decode_ms_per_token"] for p in pts]
        bound = [p.get("memory_bound") is not False for p in pts]
        ax.scatter([g for g, b in zip(gb, bound, strict=True) if b], [m for m, b in zip(ms, bound, strict=True) if b],
                   color="C0", zorder=3, label="step time grew with its bytes (memory-bound)")
        ax.scatter([g for g, b in zip(gb, bound, strict=True) if not b],
                   [m for m, b in zip(ms, bound, strict=True) if not b],
                   facecolors="none", edgecolors="C3", zorder=3,
                   label=f"step time grew over {s['memory_bound_slack']:g}x what its bytes explain")
        for p, g, m in zip(pts, gb, ms, strict=True):
            ax.annotate(f"B={p['batch']}", (g, m), textcoords="offset points", xytext=(4, 4), fontsize=7)
        bw = s.get("copy_GBps")
        if _ok(bw) and bw > 0 and gb:
            xs = [0.0, max(gb) * 1.15]
            ax.plot(xs, [x * scale / (bw * 1e9) * 1e3 for x in xs], "k:", lw=1,
                    label=f"bytes / copy bandwidth ({bw:.3g} GB/s)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(f"{unit} moved per decode step (weights + KV cache of all rows)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"{s['model']}, {s['method_label']}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")

        tp = [p for p in s["points"] if _ok(p.get("tokens_per_s"))]
        ax2.plot([p["batch"] for p in tp], [p["tokens_per_s"] for p in tp], marker="o", label="measured")
        ceil = [p for p in s["points"] if _ok(p.get("floor_ms")) and p["floor_ms"] > 0]
        if ceil:
            ax2.plot([p["batch"] for p in ceil], [p["batch"] / p["floor_ms"] * 1e3 for p in ceil], "k:", lw=1,
                     label="bandwidth ceiling: B / floor")
        ax2.set_xscale("log", base=2)
        batches = [p["batch"] for p in s["points"]]
        ax2.set_xticks(batches, [str(b) for b in batches])
        ax2.set_yscale("log")
        ax2.set_xlabel("batch (rows decoded together)")
        ax2.set_ylabel("tokens/s (all rows)")
        ax2.set_title(f"{_prompt_label(s)}, {s['new_tokens']} new tokens per row", fontsize=10)
        ax2.grid(True, alpha=0.3, which="both")
        ax2.legend(fontsize=7, loc="upper left")
    fig.suptitle("Batch sweep: where decode stops being memory-bound", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
