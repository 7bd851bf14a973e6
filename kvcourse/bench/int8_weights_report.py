"""The int8-weight benchmark's printed line per row, its table and its markdown (``kvcourse.bench.int8_weights``).

Each ratio is int8 / float of the same model in the same dtype: below 1 is a saving. The effective bandwidth is
the bytes a step reads over its median time (gpt-fast's README reports the same figure, in GB/s); with the CPU-time
clock it is bytes per CPU second of the one thread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

COLUMNS = ["model", "dtype", "ms/token float", "ms/token int8", "time int8/float", "MB/step float", "MB/step int8",
           "bytes int8/float", "GB/s float", "GB/s int8", "tokens equal", "first diff", "max abs Δlogit",
           "of max abs logit", "argmax equal (forced)"]


def environment(threads: int, clock: str) -> dict:
    """Where and with what the run was made: CPU, threads, clock, versions, commit, the load average at the start."""
    import os
    import platform

    import torch

    from .harness import cpu_name
    from .serve import _git, _load

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_name(), "cpu_count": os.cpu_count(), "gpu": gpu,
            "torch_threads": threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "clock": clock,
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "git_commit": _git("rev-parse", "--short", "HEAD"), "load_average_at_start": _load()}


def _gbs(row: dict, kind: str) -> float:
    return row[f"bytes_per_step_{kind}"] / (row[f"ms_{kind}"] * 1e-3) / 1e9


def cells(row: dict) -> list[str]:
    """The table's cells for one row, in COLUMNS' order."""
    return [row["model"], row["dtype"], f"{row['ms_float']:.2f}", f"{row['ms_int8']:.2f}", f"{row['ms_ratio']:.2f}",
            f"{row['bytes_per_step_float'] / 1e6:.1f}", f"{row['bytes_per_step_int8'] / 1e6:.1f}",
            f"{row['bytes_ratio']:.3f}", f"{_gbs(row, 'float'):.2f}", f"{_gbs(row, 'int8'):.2f}",
            f"{row['tokens_equal']}/{row['tokens']}", "-" if row["first_diff"] is None else str(row["first_diff"]),
            f"{row['max_abs_logit_error']:.3g}", f"{row['rel_logit_error']:.2%}",
            f"{row['argmax_equal']}/{row['positions']}"]


def row_line(row: dict) -> str:
    """The line printed as soon as a row is measured."""
    return (f"{row['model']} {row['dtype']}: float {row['ms_float']:.2f} ms/token, int8 {row['ms_int8']:.2f} "
            f"(x{row['ms_ratio']:.2f}, {row['clock']} clock); bytes/step {row['bytes_per_step_float'] / 1e6:.1f} -> "
            f"{row['bytes_per_step_int8'] / 1e6:.1f} MB (x{row['bytes_ratio']:.3f}); tokens equal "
            f"{row['tokens_equal']}/{row['tokens']}; max |dlogit| {row['max_abs_logit_error']:.3g} "
            f"({row['rel_logit_error']:.2%} of max |logit| {row['max_abs_logit']:.3g}), argmax equal teacher forced "
            f"{row['argmax_equal']}/{row['positions']}")


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cells(r)) + " |" for r in rows])


def markdown(report: dict) -> str:
    env, plan, rows = report["environment"], report["plan"], report["rows"]
    clock = ("CPU time of this process (time.process_time), one torch thread" if env["clock"] == "cpu"
             else "wall clock (time.perf_counter) after a device synchronize")
    where = env["gpu"] if plan["device"].startswith("cuda") else env["cpu"]
    models = "; ".join(f"{name}: {m['weights']}, {m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']}, "
                       f"{m['params'] / 1e6:.1f} M parameters" for name, m in report["models"].items())
    return "\n".join([
        "# Int8 weights at batch 1 (issue 25, section 3)", "",
        f"`python -m kvcourse.bench --int8-weights{' --quick' if plan['preset'] == 'quick' else ''}`, {env['date']}, "
        f"{where} ({env['cpu_count']} cores), device {plan['device']}, {env['torch_threads']} torch thread(s), "
        f"clock: {clock}; torch {env['torch']}, commit {env['git_commit']}; load average (1, 5, 15 min) "
        f"{env['load_average_at_start']} at the start and {env.get('load_average_at_end')} at the end; the run took "
        f"{env.get('seconds')} s.", "",
        f"Models: {models}. Fast path (`kvcourse.fast.DynamicGenerator`) against `Int8DynamicGenerator` (one scale "
        f"per output channel, `torch.ops.aten._weight_int8pack_mm`), built from the same weights in each dtype; "
        f"{plan['steps']} decode steps a call, {plan['rounds']} round(s), float and int8 in turn; ms/token is the "
        f"median step. Bytes per step: the weights one decode step reads plus the KV cache at the middle of the run. "
        f"Tokens equal: of the int8 model's greedy tokens (the first from the prefill), those equal to the float "
        f"model's; first diff: the first position that differs. Logit error: both models fed the float model's own "
        f"tokens (teacher forced), max over every position and vocabulary entry, and relative to the float logits' "
        f"max |logit|; argmax equal (forced): positions whose next-token choice agrees on the same past.", "",
        table(rows), "",
        "Times depend on the machine and its load; they are reported, never asserted. Ratios compare rows timed in the "
        "same rounds. On an x86 CPU torch's `_weight_int8pack_mm` is vectorised for bfloat16 only and takes a scalar "
        "loop for float32 (`kvcourse/int8_weights.py` cites the source), so there the float32 int8 rows read a quarter "
        "of the weight bytes and still take longer than float32: the saving in bytes becomes a saving in time only "
        "where the kernel streams the int8 weights as fast as the float matmul streams float ones. Tokens equal "
        "compares two free-running texts: after the first difference the two models continue different texts, so "
        "the teacher-forced argmax count is the position-by-position agreement.", ""])


def render(report: dict, out_dir: Path | None, say=print) -> dict:
    """Print the table; write int8_weights.json and int8_weights.md into ``out_dir`` (None: print only)."""
    md = markdown(report)
    say("\n" + md)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "int8_weights.json").write_text(json.dumps(report, indent=1, default=str))
        (out_dir / "int8_weights.md").write_text(md)
    return report
