"""The report: the tables (printed, and written to ``bench.md``), the targets, and each row's one-line
summary, printed as soon as the row's timed calls are done.

Every figure goes through ``_fmt``: a figure that is not a finite number >= 0 prints as "n/a", and the
notes column (or the line) says why. A row marked unreliable says so, with its reasons.
"""

from __future__ import annotations

import math
import sys

import torch

from .bandwidth import FITS_IN_CACHE
from .measure import SPREAD_LIMIT_PCT
from .methods import REFERENCE
from .plan import SHORT_PROMPT


def _ok(x) -> bool:
    """A figure that may be printed: a finite number >= 0 (None, NaN, inf and negatives never are)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _fmt(x, spec: str, suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if _ok(x) else "n/a"


def _fmt_s(s) -> str:
    if not _ok(s):
        return "n/a"
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.0f} ms"


def _fmt_load(load) -> str:
    return "n/a (not available here)" if not load else "/".join(f"{x:.1f}" for x in load)


def _prompt_label(case: dict) -> str:
    return f'"{SHORT_PROMPT}" ({case["prompt_tokens"]} tok)' if case["prompt"] == "short" else \
        f'long ({case["prompt_tokens"]} tok)'


_SHOWN = {"ttft_ms": "TTFT", "decode_ms_per_token": "decode", "decode_tokens_per_s": "tokens/s", "total_s": "total",
          "bandwidth_floor_fraction": "floor fraction", "speed_vs_hf_cache_decode": "vs generate(use_cache=True)",
          "spread_pct": "spread"}


def row_notes(r: dict, keys=tuple(_SHOWN)) -> str:
    """The notes cell of a row: why it is unreliable, and why each shown figure is missing."""
    if r.get("unavailable"):
        return f"n/a: {r['unavailable']}".replace("|", "/")
    notes = []
    if r.get("unreliable"):
        notes.append("**unreliable**: " + "; ".join(r.get("unreliable_reasons") or ["no reason recorded"]))
    missing = r.get("missing") or {}
    for key in keys:
        if r.get(key) is None and key in missing and "one round" not in missing[key]:  # that one: in the header
            notes.append(f"{_SHOWN.get(key, key)} n/a: {missing[key]}")
    return "; ".join(dict.fromkeys(notes)).replace("|", "/")


def summary_table(cases: list[dict]) -> str:
    """With cache / without cache / speedup, per model and prompt, as in the source material (total times)."""
    lines = ["| model | prompt | new tokens | generator | with cache | without cache | speedup | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        ms = c["methods"]
        pairs = [("transformers generate", "hf_dynamic", "hf_no_cache"),
                 ("course (fast path / uncached loop)", "course_fast", "uncached")]
        for label, with_m, without_m in pairs:
            if with_m in ms and without_m in ms:
                w, wo = ms[with_m].get("total_s"), ms[without_m].get("total_s")
                speedup = wo / w if _ok(w) and _ok(wo) and w > 0 else None
                notes = [f"{m}: {row_notes(ms[m], ('total_s',))}" for m in (with_m, without_m)
                         if row_notes(ms[m], ("total_s",))]
                lines.append(f"| {c['model']} | {_prompt_label(c)} | {c['new_tokens']} | {label} | {_fmt_s(w)} | "
                             f"{_fmt_s(wo)} | {_fmt(speedup, '.1f', 'x')} | {'; '.join(notes)} |")
    return "\n".join(lines)


def full_table(cases: list[dict]) -> str:
    lines = ["| model | prompt | method | TTFT (ms) | decode (ms/token) | tokens/s | spread | of bandwidth floor "
             "| vs generate(use_cache=True) | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        for r in c["methods"].values():
            lines.append(
                f"| {c['model']} | {_prompt_label(c)}, {c['new_tokens']} new | {r['label']} | "
                f"{_fmt(r.get('ttft_ms'), '.1f')} | {_fmt(r.get('decode_ms_per_token'), '.2f')} | "
                f"{_fmt(r.get('decode_tokens_per_s'), '.0f')} | {_fmt(r.get('spread_pct'), '.0f', '%')} | "
                f"{_floor_cell(r)} | "
                f"{_fmt(r.get('speed_vs_hf_cache_decode'), '.2f', 'x')} | {_notes_cell(r)} |")
    return "\n".join(lines)


def _floor_cell(r: dict) -> str:
    """The share of the bandwidth floor, or "n/a: fits in cache" where the bytes a step reads fit in the CPU's
    last-level cache (harness.py): a DRAM bandwidth floor is then no floor."""
    frac = r.get("bandwidth_floor_fraction")
    if _ok(frac):
        return f"{frac * 100:.0f}%"
    return "n/a: fits in cache" if _why(r, "bandwidth_floor_fraction").startswith(FITS_IN_CACHE) else "n/a"


def _notes_cell(r: dict) -> str:
    return "; ".join(x for x in [*_setup_notes(r), row_notes(r)] if x)


def _setup_notes(r: dict) -> list[str]:
    """Compilation and graph capture, timed apart from the per-token figures: one "compile + capture" figure
    (with its two parts when both happened), each counted once."""
    failed = "" if r.get("compiled", True) else " (compile failed: eager)"
    if "compile_s" in r and "capture_s" in r:
        total = (r["compile_s"] or 0.0) + (r["capture_s"] or 0.0)
        return [f"compile + capture {_fmt_s(total)} (compile {_fmt_s(r['compile_s'])}, capture "
                f"{_fmt_s(r['capture_s'])}){failed}"]
    if "compile_s" in r:
        return [f"compile {_fmt_s(r['compile_s'])}{failed}"]
    if "capture_s" in r:
        return [f"graph capture {_fmt_s(r['capture_s'])}"]
    return []


def _why(r: dict, key: str) -> str:
    return (r.get("missing") or {}).get(key) or "not measured"


def _caveat(*rows: dict) -> str:
    return " (unreliable: see the table)" if any(r.get("unreliable") for r in rows) else ""


def targets(cases: list[dict], device: torch.device) -> list[dict]:
    """The issue's targets, measured: fast path >= generate(use_cache=True) everywhere, >= 1.5x on the
    bundled model; >= 70% of the bandwidth floor on the SmolLM2-135M shape (CPU); cached vs uncached.
    A missing figure gives "n/a (why)" and ``met`` None; one from an unreliable row says so."""
    out = []
    for c in cases:
        ms = c["methods"]
        if "course_fast" in ms and REFERENCE in ms:
            fast, ref = ms["course_fast"], ms[REFERENCE]
            need = 1.5 if c["model"] == "bundled" else 1.0
            got = fast.get("speed_vs_hf_cache_decode")
            ok = _ok(got)
            out.append({"target": f"fast path vs generate(use_cache=True), decode, {c['model']}, {c['prompt']} prompt",
                        "want": f">= {need}x",
                        "got": (f"{got:.2f}x" if ok else f"n/a ({_why(fast, 'speed_vs_hf_cache_decode')})")
                               + _caveat(fast, ref),
                        "met": got >= need if ok else None, "reliable": not _caveat(fast, ref),
                        "end_to_end": _fmt(fast.get("speed_vs_hf_cache_total"), ".2f", "x")})
        if c["model"] == "SmolLM2-135M" and "course_fast" in ms:
            fast = ms["course_fast"]
            frac = fast.get("bandwidth_floor_fraction")
            hf_frac = ms[REFERENCE].get("bandwidth_floor_fraction") if REFERENCE in ms else None
            ok = _ok(frac)
            got = f"{frac * 100:.0f}%" if ok else f"n/a ({_why(fast, 'bandwidth_floor_fraction')})"
            out.append({"target": f"fast path, fraction of bandwidth floor, SmolLM2-135M, {c['prompt']} prompt",
                        "want": ">= 70%" if device.type == "cpu" else "(CPU target)",
                        "got": f"{got} (transformers: {_fmt(hf_frac * 100 if _ok(hf_frac) else None, '.0f', '%')})"
                               + _caveat(fast),
                        "met": frac >= 0.7 if ok and device.type == "cpu" else None, "reliable": not _caveat(fast)})
        if c["prompt"] == "short" and c["model"].startswith("SmolLM2") and "uncached" in ms:
            for label, w, wo in (("course", "course_fast", "uncached"), ("transformers", "hf_dynamic", "hf_no_cache")):
                if w in ms and wo in ms:
                    tw, two = ms[w].get("total_s"), ms[wo].get("total_s")
                    got = (f"{two / tw:.1f}x" if _ok(tw) and _ok(two) and tw > 0
                           else f"n/a (total time missing: {_why(ms[w], 'total_s') if not _ok(tw) else _why(ms[wo], 'total_s')})")
                    out.append({"target": f"cached vs uncached ({label}), {c['model']}, short prompt, "
                                          f"{c['new_tokens']} new tokens",
                                "want": "report",
                                "got": got + _caveat(ms[w], ms[wo]), "met": None,
                                "reliable": not _caveat(ms[w], ms[wo])})
    return out


def markdown(result: dict) -> str:
    env, bw, plan = result["environment"], result["bandwidth"], result["settings"]
    case_bw = [c["floor"]["copy_GBps"] for c in result["cases"] if _ok(c["floor"].get("copy_GBps"))]
    in_rounds = f"{min(case_bw):.1f}-{max(case_bw):.1f} GB/s" if case_bw else "n/a (no sample)"
    where = env["gpu"] or env["cpu"]
    unreliable = sum(r.get("unreliable", False) for c in result["cases"] for r in c["methods"].values())
    rows = sum(len(c["methods"]) for c in result["cases"])
    lines = [
        "# kvcourse benchmark",
        "",
        f"{env['date']}, {where} ({env['device']}), {env['torch_threads']} torch threads, {env['dtype']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, {_preset(plan)} mode, "
        f"{plan['repeats']} timed round(s) after warm-up, medians. Memory copy bandwidth "
        f"{_fmt(bw.get('copy_GBps'), '.1f', ' GB/s')} at the start (read {_fmt(bw.get('read_GBps'), '.1f', ' GB/s')}), "
        f"{in_rounds} in the rounds (each case's floor uses its own). Load average (1/5/15 min) at the start "
        f"{_fmt_load(env.get('load_average_at_start'))}, at the end {_fmt_load(env.get('load_average_at_end'))}"
        f" on {env.get('cpu_count')} cores.",
        "",
    ]
    if env.get("busy"):
        lines += [f"**Warning: {env['busy']}.** Rows timed while it was busy are marked unreliable.", ""]
    if plan["repeats"] < 2:
        lines += ["One timed round: no spread, so no row can be judged by it (use `--repeats 3`).", ""]
    if unreliable:
        lines += [f"{unreliable} of {rows} rows are marked **unreliable** (spread over the rounds above "
                  f"{SPREAD_LIMIT_PCT:.0f}% of the median, a missing round, or a busy machine): see their notes.", ""]
    lines += [
        "Models: " + "; ".join(dict.fromkeys(f"{c['model']} ({c['model_note']}, {c['params'] / 1e6:.1f}M "
                                                    f"parameters)" for c in result["cases"])) + ". Prompt token ids from the bundled tokenizer.",
        "",
        "## With and without a KV cache (total time for all new tokens)",
        "",
        summary_table(result["cases"]),
        "",
        "## Every method",
        "",
        "One call of N new tokens per round, the clock read after every token. TTFT: start of the call to the "
        "first token. Decode: (time of token N - time of token 1) / (N - 1). Spread: (max - min) / median of "
        f"decode over the rounds; above {SPREAD_LIMIT_PCT:.0f}% (decode or TTFT) the row is unreliable. Bandwidth "
        "floor: (weights + KV cache at the mean context) / copy bandwidth. n/a: missing, the notes say why.",
        "",
        full_table(result["cases"]),
        "",
        "## Targets",
        "",
        "| target | want | got | met |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(f"| {t['target']} | {t['want']} | {t['got']} | {met} |")
    if result.get("batch_sweep"):
        lines += ["", "## Batch sweep", "", sweep_text(result["batch_sweep"])]
    plots = ["time_per_token.png", "cache_update.png"] + (["batch_sweep.png"] if result.get("batch_sweep") else [])
    lines += ["", f"Total runtime {_fmt_s(result.get('runtime_s'))}. Figures: `bench.json`; plots: "
              + ", ".join(f"`{p}`" for p in plots) + ".", ""]
    return "\n".join(lines)


def _preset(settings: dict) -> str:
    return settings.get("preset") or ("quick" if settings.get("quick") else "full")


# ---- one line per row, printed as soon as it exists ----------------------------------------------------


def say(line: str) -> None:
    """Print one line to stdout now, flushed (above the progress bar, if one is drawn)."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def case_label(model: str, prompt: str, prompt_tokens: int, new_tokens: int) -> str:
    """``bundled, short prompt (5 tok), 16 new``: where a printed line belongs."""
    return f"{model}, {prompt} prompt ({prompt_tokens} tok), {new_tokens} new"


def row_line(where: str, r: dict) -> str:
    """One method's figures on one line (median over its rounds), with what is n/a and why, set-up time
    apart. The bandwidth-floor fraction and the comparison with the reference follow in the tables."""
    if r.get("unavailable"):
        return f"[bench] {where} | {r['label']}: n/a ({r['unavailable']})"
    parts = [f"TTFT {_fmt(r.get('ttft_ms'), '.1f', ' ms')}",
             f"decode {_fmt(r.get('decode_ms_per_token'), '.2f', ' ms/token')}",
             f"{_fmt(r.get('decode_tokens_per_s'), '.0f')} tokens/s",
             f"total {_fmt_s(r.get('total_s'))}",
             f"spread {_fmt(r.get('spread_pct'), '.0f', '%')}",
             *_setup_notes(r)]
    notes = row_notes(r, ("ttft_ms", "decode_ms_per_token", "total_s")).replace("**", "")
    return f"[bench] {where} | {r['label']}: " + ", ".join(parts) + (f" | {notes}" if notes else "")


# ---- the batch sweep ------------------------------------------------------------------------------------


def _gb(x) -> str:
    """Bytes as GB (or MB below 1 GB)."""
    if _ok(x) and x < 1e9:
        return _fmt(x / 1e6, ".1f", " MB")
    return _fmt(x / 1e9 if _ok(x) else None, ".2f", " GB")


def sweep_line(model: str, method_label: str, p: dict) -> str:
    """One batch size of the sweep on one line."""
    bound = {True: "memory-bound", False: "not memory-bound", None: "memory-bound: n/a"}[p.get("memory_bound")]
    notes = row_notes(p, ("decode_ms_per_token", "tokens_per_s", "bandwidth_floor_fraction")).replace("**", "")
    return (f"[bench] batch sweep, {model}, {method_label}, batch {p['batch']}: "
            f"step {_fmt(p.get('decode_ms_per_token'), '.2f', ' ms')}, {_fmt(p.get('tokens_per_s'), '.0f')} tokens/s, "
            f"{_gb(p.get('bytes'))} per step, {_floor_pct(p)} of the bandwidth floor, {bound}"
            + (f" | {notes}" if notes else ""))


def _floor_pct(p: dict) -> str:
    frac = p.get("bandwidth_floor_fraction")
    return _fmt(frac * 100 if _ok(frac) else None, ".0f", "%")


def sweep_text(sweeps: list[dict]) -> str:
    """The batch sweep's tables, one per model."""
    out = []
    for s in sweeps:
        out += [f"{s['model']}, {s['method_label']}, {_prompt_label(s)}, {s['new_tokens']} new tokens per row, "
                f"{s['repeats']} round(s). Bytes per step: weights once + every row's KV cache at the mean "
                f"context; floor: bytes / {_fmt(s.get('copy_GBps'), '.1f', ' GB/s')} (copy bandwidth measured in "
                f"the sweep). Memory-bound: the step took at most {s['memory_bound_slack']:g}x what its extra bytes "
                f"explain, against batch 1. Largest memory-bound batch: {s.get('memory_bound_until') or 'n/a'}.",
                "",
                "| batch | step (ms) | tokens/s | bytes per step | floor (ms) | of floor | memory-bound | rows equal "
                "batch 1 | notes |",
                "|---|---|---|---|---|---|---|---|---|"]
        for p in s["points"]:
            bound = {True: "yes", False: "**no**", None: "n/a"}[p.get("memory_bound")]
            same = p.get("rows_equal_batch1")
            out.append(f"| {p['batch']} | {_fmt(p.get('decode_ms_per_token'), '.2f')} | "
                       f"{_fmt(p.get('tokens_per_s'), '.0f')} | {_gb(p.get('bytes'))} | "
                       f"{_fmt(p.get('floor_ms'), '.2f')} | {_floor_pct(p)} | {bound} | "
                       f"{_fmt(same * 100 if _ok(same) else None, '.0f', '%')} | {row_notes(p)} |")
        out.append("")
    return "\n".join(out)
