"""The serving benchmark's figures, table, targets and plot.

Per system, from its ``SystemResult`` (times in seconds after the run's start, the first request arriving at 0):

- generated tokens/s = all generated tokens / the time of the last generated token;
- TTFT of a request = its first token's time - its arrival (queueing included); p50 and p95 over requests;
- time per output token (TPOT) of a request = (last token - first token) / (tokens - 1), for requests with >= 2
  tokens; p50 and p95 over requests. Inter-token latency (ITL): every gap between two consecutive tokens of a
  request, p95 over all gaps (the sweep's y axis, as tiny-llm's "p95 decode gap");
- peak blocks, preemptions, prefix-hit rate: as the system counts them; "n/a" with the reason where it has none.

Percentiles: linear between order statistics (``serve_workload.percentile``).
"""

from __future__ import annotations

from pathlib import Path

from .serve_systems import SYSTEMS, SystemResult
from .serve_workload import percentile

COLUMNS = ["system", "tokens/s", "TTFT p50 (ms)", "TTFT p95 (ms)", "TPOT p50 (ms)", "TPOT p95 (ms)", "peak blocks",
           "preemptions", "prefix-hit rate", "tokens = reference"]


def figures(res: SystemResult) -> dict:
    """The row of one system: see the module docstring."""
    recs = [r for r in res.records.values() if r.error is None and r.token_times]
    toks = sum(len(r.tokens) for r in recs)
    end = max((r.token_times[-1] for r in recs), default=None)
    ttft = [r.token_times[0] - r.arrival for r in recs]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in recs if len(r.token_times) > 1]
    gaps = [b - a for r in recs for a, b in zip(r.token_times[:-1], r.token_times[1:], strict=True)]

    def q(xs: list[float], p: float) -> float | None:
        return percentile(xs, p) if xs else None

    return {
        "system": res.name, "label": SYSTEMS.get(res.name, res.name),
        "requests": len(res.records), "failed": len(res.records) - len(recs),
        "tokens": toks, "makespan_s": end, "tokens_per_s": toks / end if end else None,
        "ttft_p50": q(ttft, 50), "ttft_p95": q(ttft, 95), "tpot_p50": q(tpot, 50), "tpot_p95": q(tpot, 95),
        "itl_p50": q(gaps, 50), "itl_p95": q(gaps, 95),
        "peak_blocks": res.peak_blocks, "preemptions": res.preemptions, "prefix_hit_rate": res.prefix_hit_rate,
        "steps": res.steps, "config": res.config, "na": res.na, "notes": res.notes,
    }


def concurrency(history) -> dict | None:
    """From the engine's per-step records: how many ran at once, and how often requests waited."""
    if not history:
        return None
    running = [h.num_running for h in history]
    waiting = [h.num_waiting for h in history]
    return {"max_running": max(running), "mean_running": sum(running) / len(running),
            "steps_with_waiting": sum(w > 0 for w in waiting) / len(waiting), "steps": len(history),
            "min_free_blocks": min(h.num_free_blocks for h in history)}


def _ms(x) -> str:
    return "n/a" if x is None else f"{1000 * x:.1f}"


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "n/a"
    if key == "prefix_hit_rate":
        return f"{100 * v:.0f}%"
    return str(v)


def table(rows: list[dict], checks: dict[str, str]) -> str:
    """The markdown table, one row per system, every column (n/a where a system has no such figure)."""
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        tps = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        out.append("| " + " | ".join([
            r["label"], tps, _ms(r["ttft_p50"]), _ms(r["ttft_p95"]), _ms(r["tpot_p50"]), _ms(r["tpot_p95"]),
            _cell(r, "peak_blocks"), _cell(r, "preemptions"), _cell(r, "prefix_hit_rate"),
            checks.get(r["system"], "not checked")]) + " |")
    return "\n".join(out)


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def targets(rows: dict[str, dict], overhead: list[dict]) -> list[str]:
    """The issue's targets as ratios from this run, each with met / missed (never hidden)."""
    lines = []
    eng, st, cb = rows.get("engine"), rows.get("static_hf"), rows.get("hf_cb")

    def verdict(ok):
        return "met" if ok else "MISSED"

    if eng and st:
        r = ratio(eng["tokens_per_s"], st["tokens_per_s"])
        lines.append(f"engine tokens/s vs static batching (transformers generate): "
                     f"{'n/a' if r is None else f'{r:.2f}x'} (target >= 2x: {verdict(r is not None and r >= 2)})")
        a, b = eng["ttft_p95"], st["ttft_p95"]
        if a is not None and b is not None:
            lines.append(f"engine TTFT p95 vs static batching: {_ms(a)} ms vs {_ms(b)} ms "
                         f"(target lower: {verdict(a < b)})")
    if eng and cb:
        r = ratio(eng["tokens_per_s"], cb["tokens_per_s"])
        lines.append(f"engine tokens/s vs transformers continuous batching: "
                     f"{'n/a' if r is None else f'{r:.2f}x'} (target > 1x: {verdict(r is not None and r > 1)})")
    for o in overhead:
        r = o.get("ratio_static")
        lines.append(f"engine step vs fast-path static decode step, B={o['batch']}, context {o['context']}: "
                     f"{'n/a' if r is None else f'{r:.2f}x'} (target <= 1.3x: {verdict(r is not None and r <= 1.3)})")
    return lines


def sweep_table(points: list[dict]) -> str:
    out = ["| chunk budget (tokens/step) | tokens/s | TTFT p95 (ms) | ITL p95 (ms) | TPOT p95 (ms) | steps | preemptions |",
           "|---|---|---|---|---|---|---|"]
    for p in points:
        tps = "n/a" if p["tokens_per_s"] is None else f"{p['tokens_per_s']:.0f}"
        out.append(f"| {p['budget']} | {tps} | {_ms(p['ttft_p95'])} | {_ms(p['itl_p95'])} | {_ms(p['tpot_p95'])} | "
                   f"{p['steps']} | {p['preemptions']} |")
    return "\n".join(out)


def overhead_table(rows: list[dict]) -> str:
    out = ["| B | context | engine step (ms) | fast static step (ms) | fast dynamic step (ms) | engine / static | "
           "engine / dynamic |", "|---|---|---|---|---|---|---|"]
    for o in rows:
        def x(v):
            return "n/a" if v is None else f"{v:.2f}x"
        out.append(f"| {o['batch']} | {o['context']} | {_ms(o['engine_s'])} | {_ms(o['static_s'])} | "
                   f"{_ms(o['dynamic_s'])} | {x(o['ratio_static'])} | {x(o['ratio_dynamic'])} |")
    return "\n".join(out)


def plot_sweep(per_model: dict[str, list[dict]], path: Path) -> Path | None:
    """TTFT p95 against ITL p95 (each point a chunk budget), and tokens/s against the budget, per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency of the course
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model, pts in per_model.items():
        pts = [p for p in pts if p["itl_p95"] is not None and p["ttft_p95"] is not None]
        if not pts:
            continue
        xs = [1000 * p["itl_p95"] for p in pts]
        ys = [1000 * p["ttft_p95"] for p in pts]
        line = ax1.plot(xs, ys, "o-", label=model)[0]
        for p, x, y in zip(pts, xs, ys, strict=True):
            ax1.annotate(str(p["budget"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                         color=line.get_color())
        ax2.plot([p["budget"] for p in pts], [p["tokens_per_s"] for p in pts], "o-", label=model,
                 color=line.get_color())
    ax1.set(xlabel="inter-token latency p95 (ms)", ylabel="TTFT p95 (ms)",
            title="chunked prefill: each point a token budget per step")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax2.set(xlabel="token budget per step (chunk)", ylabel="generated tokens/s", title="throughput")
    ax2.set_xscale("log", base=2)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
