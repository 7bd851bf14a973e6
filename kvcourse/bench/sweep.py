"""The batch sweep (``--batch-sweep``): decode speed of the fast path at batch 1, 2, 4, ... up to a maximum.

One decode step reads every weight once whatever the batch, and each row's KV cache: with B rows it
moves ``weights + B x KV bytes per token x context`` bytes and produces B tokens. While the weights
dominate those bytes, a step with 16 rows costs about what a step with one does, so tokens/s grows
almost B-fold: decode is memory-bound. Each row also costs about 2 flops per weight; once that
arithmetic takes longer than moving the bytes, the step time climbs above what its bytes explain,
and decode has stopped being memory-bound (``kvcourse.bench.bandwidth.memory_bound``).

For each batch size the prompt is repeated B times; the method (``course_fast`` unless
``--batch-sweep METHOD`` names another) is set up for that batch, warmed up, and timed in
``--repeats`` rounds exactly as the cases are (a clock reading after every step; see
``kvcourse.bench.measure``). Recorded per batch: time per step, tokens/s (B / time per step), bytes
per step, the bandwidth floor (bytes / copy bandwidth, sampled at the start of the sweep) and the
fraction of it reached, whether the step is still memory-bound, and the fraction of rows whose tokens
equal batch 1's (recorded, not enforced: a matrix product may round differently at another batch
size). Each batch size is printed on one line as soon as it is timed; ``bench.json`` gets the whole
sweep under ``"batch_sweep"``, ``bench.md`` a table, and ``batch_sweep.png`` the roofline-style plot.
"""

from __future__ import annotations

import gc
import os
import statistics

import torch

from .bandwidth import MEMORY_BOUND_SLACK, Bandwidth, memory_bound, step_bytes
from .measure import busy_reason, load_average, method_figures, timed_call, unavailable_row
from .methods import METHODS, make_runners
from .plan import Model, Plan
from .report import say, sweep_line


def _tokens_per_s(point: dict) -> None:
    """All rows' tokens per second: B / time per step, or None with the reason."""
    steps = point.get("decode_tokens_per_s")
    point["tokens_per_s"] = point["batch"] * steps if steps is not None else None
    if steps is None:
        point["missing"]["tokens_per_s"] = point["missing"].get("decode_tokens_per_s", "not measured")


def batch_sweep(model: Model, prompt: str, ids1: torch.Tensor, n: int, plan: Plan, bar, bw: Bandwidth) -> dict:
    """Time ``plan.batch_sweep`` at each of ``plan.batch_sizes`` on this model and prompt ((1, T) ids)."""
    hf, device, method = model.hf, plan.device, plan.batch_sweep
    label = METHODS.get(method, (method,))[0]
    if plan.dtype != torch.float32:
        hf.to(plan.dtype)
    load_start = load_average()
    copy = bw.sample(5)
    copy_gbps = statistics.median(copy) if copy else None
    mean_ctx = ids1.shape[1] + n / 2  # as in the cases: decode step j attends over T + j positions
    say(f"[bench] batch sweep, {model.name}, {label}: batch {', '.join(map(str, plan.batch_sizes))}, "
        f"{n} new tokens per row, {plan.repeats} timed round(s)")
    points: list[dict] = []
    first_row = None
    stopped = None  # why the sweep stopped early (out of memory)
    for b in plan.batch_sizes:
        bar.set_description(f"{model.name} | batch sweep | batch {b}")
        sb = step_bytes(hf, plan.dtype, b, mean_ctx)
        floor_s = sb["bytes"] / (copy_gbps * 1e9) if copy_gbps else None
        floor_why = None if floor_s else "no bandwidth sample (the clock did not see the copies)"
        point = {"batch": b, **sb, "floor_ms": floor_s and floor_s * 1e3, "rows_equal_batch1": None}
        done = 0
        runner = None
        try:
            if stopped:
                raise _Skip(stopped)
            ids = ids1.expand(b, -1).contiguous()  # (B, T): the same prompt in every row
            runner = make_runners(hf, ids, [method], compile=plan.compile, new_tokens=n)[method]
            if runner.unavailable:
                raise _Skip(runner.unavailable)
            for _ in range(2 if device.type == "cuda" else 1):  # warm-up, untimed (as the cases)
                out = runner.run(n).cpu()
            done += 1
            bar.update(1)
            first_row = out[0] if first_row is None else first_row
            point["rows_equal_batch1"] = float((out == first_row).all(dim=1).float().mean())
            calls = []
            for _ in range(plan.repeats):
                calls.append(timed_call(runner.run, n, device)[1])
                done += 1
                bar.update(1)
            point.update(method_figures(calls, n, floor_s, floor_why, None))
        except _Skip as skip:
            point.update(unavailable_row(str(skip)))
        except torch.cuda.OutOfMemoryError:
            stopped = f"out of memory at batch {b} (and so above it)"
            point.update(unavailable_row(stopped))
        finally:
            del runner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        bar.update(1 + plan.repeats - done)
        _tokens_per_s(point)
        points.append(point)
        point["memory_bound"] = memory_bound(points)[-1]
        say(sweep_line(model.name, label, point))

    load_end = load_average()
    busy = busy_reason([("at the start of the sweep", load_start, plan.threads), ("at its end", load_end, plan.threads)],
                       os.cpu_count() or 1, plan.threads)
    if busy:
        for p in points:
            if not p.get("unavailable"):
                p["unreliable"], p["unreliable_reasons"] = True, [*p["unreliable_reasons"], busy]
    until = None
    for p in points:  # the largest batch up to which every step was memory-bound
        if p["memory_bound"] is not True:
            break
        until = p["batch"]
    if plan.dtype != torch.float32:
        hf.float()
    return {"model": model.name, "model_note": model.note, "method": method, "method_label": label,
            "prompt": prompt, "prompt_tokens": ids1.shape[1], "new_tokens": n, "repeats": plan.repeats,
            "mean_context": mean_ctx, "copy_GBps": copy_gbps, "copy_samples_GBps": copy,
            "memory_bound_slack": MEMORY_BOUND_SLACK, "memory_bound_until": until,
            "load_average": {"start": load_start, "end": load_end, "busy": busy}, "points": points}


class _Skip(Exception):
    """A batch size that is not timed, with the reason."""
