"""The run: for each model and prompt, check the tokens, warm up, time every method in rounds; then write.

How one case (model, prompt) is measured, the same for every method:

1. **Warm-up, untimed.** A method with a cache runs at the full N new tokens (a first call at a new
   length allocates the cache, and on CUDA ``transformers`` compiles its static cache for each cache
   size, with ``mode="reduce-overhead"``: CUDA graphs, recorded on a later call than the compiling
   one, so on CUDA these run twice); a method without one runs once at min(N, 8) (nothing there is
   sized by N, and those are the slow calls). The course's ``--compile`` and ``course_graph`` compile
   or capture in set-up, timed apart (``compile_s``, ``capture_s``).
2. **Rounds, interleaved.** ``--repeats`` rounds (3 by default, 2 with ``--quick``); in each, every
   method makes one timed call of N new tokens (``kvcourse.bench.measure``), round-robin, starting one
   method later each round. A copy-bandwidth sample is taken in every round.
3. **Correctness before any figure.** Round 1 runs ``generate(use_cache=True)`` first and compares
   every method's tokens with its tokens as soon as that method's call returns: one that differs stops
   the run with ``TokenMismatchError`` naming it, before any figure is computed or written.
   ``--separate-check`` does the check in an extra, untimed run before the rounds instead (about 3 more
   minutes in full mode: the uncached loops are slow); so does a run in reduced precision (in float32).
4. **A line as soon as a row exists.** When a method's last round returns, its figures are printed on
   one line (flushed), so a run cut off at a time limit still says something; the tables follow at the
   end. A method that cannot run here (``course_graph`` without CUDA) gets an n/a line at once.
5. **Fixed work.** ``do_sample=False``, exactly N new tokens (EOS ignored: ``min_new_tokens=N`` and
   ``eos_token_id=[]`` for ``transformers``), batch 1, fixed ``torch.set_num_threads`` (recorded).

``run`` does every case, then the batch sweep if asked (``kvcourse.bench.sweep``), the cache-update
costs, and writes ``bench.json``, ``bench.md`` and the plots.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..devices import synchronize
from ..memory import kv_bytes_per_token
from .bandwidth import Bandwidth, cache_resident, cache_update_costs, weight_bytes_per_token
from .measure import (
    LOAD_MARGIN,
    SPREAD_LIMIT_PCT,
    CallTimes,
    busy_reason,
    compare_to_reference,
    load_average,
    method_figures,
    timed_call,
    unavailable_row,
)
from .methods import METHODS, REFERENCE, check_tokens, make_runners
from .plan import SHORT_PROMPT, Model, Plan, bundled_tokenizer, load_models, prompt_ids
from .plots import plot_cache, plot_steps, plot_sweep
from .report import case_label, markdown, row_line, say, targets
from .sweep import batch_sweep


def run_case(model: Model, prompt: str, ids: torch.Tensor, n: int, plan: Plan, bar, bw: Bandwidth,
             own_threads_at_start: int = 0) -> dict:
    """Check, warm up and time every method on one model and prompt; return the figures."""
    hf, device = model.hf, plan.device
    where = f"{model.name}, {prompt} prompt ({ids.shape[1]} tokens), {n} new tokens"
    label = case_label(model.name, prompt, ids.shape[1], n)
    methods = plan.methods
    load_start = load_average()

    def step(desc):
        bar.set_description(f"{model.name} | {prompt} | {desc}")

    say(f"[bench] {label}: {len(methods)} method(s), {plan.repeats} timed round(s)")
    # 1. the token check, untimed, when asked for (--separate-check) or when timing in reduced precision
    #    (then it runs in float32, before the cast); otherwise the first timed round is the check
    runners = make_runners(hf, ids, methods, compile=plan.compile, new_tokens=n)
    live = [m for m in methods if runners[m].unavailable is None]  # the methods that can run here
    for m in methods:
        if runners[m].unavailable is not None:
            say(row_line(label, {"label": METHODS.get(m, (m,))[0], "unavailable": runners[m].unavailable}))
    reference = REFERENCE if REFERENCE in live else (live[0] if live else None)
    agreement = None
    if plan.separate_check or plan.dtype != torch.float32:
        outputs = {}
        for m in methods:
            step(f"check {m}")
            if m in live:
                outputs[m] = runners[m].run(n)
            bar.update(1)
        if reference is not None:
            check_tokens(outputs, reference, where)
    if plan.dtype != torch.float32:  # rebuild in the timing dtype; record (not enforce) token agreement
        hf.to(plan.dtype)
        runners = make_runners(hf, ids, methods, compile=plan.compile, new_tokens=n)
        low = {m: runners[m].run(n) for m in live}
        if reference is not None:
            ref = low[reference].cpu()
            agreement = {m: float((o.cpu() == ref).float().mean()) for m, o in low.items()}

    # 2. warm-up, untimed: a cached method at the full length (cache allocation, CUDA static-cache
    #    compilation), twice on CUDA (CUDA graphs are recorded on a later call than the compilation);
    #    an uncached one once, at a few tokens
    warmup_s: dict[str, float | None] = dict.fromkeys(methods)
    for m in methods:
        step(f"warm-up {m}")
        if m in live:
            cached = METHODS.get(m, (m, True))[1]
            t0 = time.perf_counter()
            for _ in range(2 if cached and device.type == "cuda" else 1):
                runners[m].run(n if cached else min(n, 8))
            synchronize(device)
            warmup_s[m] = time.perf_counter() - t0  # includes any compilation
        bar.update(1)

    # 3. timed rounds, round-robin, each call read after every token. Round 1 runs the reference first and
    #    checks every method's tokens as soon as its call returns: a mismatch stops the run before any figure
    #    exists. Later rounds start one method later each time. A bandwidth sample is taken in every round.
    #    After its last round, each method's figures are printed on one line.
    calls: dict[str, list[CallTimes]] = {m: [] for m in live}
    bw_samples: list[float] = []
    first = [reference] + [m for m in live if m != reference] if live else []
    for r in range(plan.repeats):
        order = first if r == 0 or not live else live[r % len(live):] + live[: r % len(live)]
        outputs = {}
        for m in order:
            step(f"round {r + 1}/{plan.repeats} {m}")
            out, times = timed_call(runners[m].run, n, device)
            calls[m].append(times)
            if r == 0 and not plan.separate_check and plan.dtype == torch.float32:
                outputs[m] = out
                check_tokens(outputs, reference, where)
            if r == plan.repeats - 1:  # this row's calls are all done: its figures exist, print them
                say(row_line(label, {"label": METHODS.get(m, (m,))[0], **runners[m].notes,
                                     **method_figures(calls[m], n, None, "in the tables", None)}))
            bar.update(1)
        bar.update(len(methods) - len(live))
        bw_samples += bw.sample()

    # 4. figures
    load_end = load_average()
    busy = busy_reason([("at the start of this case", load_start, own_threads_at_start),
                        ("at its end", load_end, plan.threads)], os.cpu_count() or 1, plan.threads)
    wbytes = weight_bytes_per_token(hf)
    kv_tok = kv_bytes_per_token(hf.config, plan.dtype)
    mean_ctx = ids.shape[1] + n / 2  # decode step j (1..N-1) attends over T + j positions
    floor_bytes = wbytes + kv_tok * mean_ctx
    case_bw = statistics.median(bw_samples) if bw_samples else None  # GB/s, measured in this case's rounds
    floor_s = floor_bytes / (case_bw * 1e9) if case_bw else None
    floor_why = None if floor_s else "no bandwidth sample in this case's rounds (the clock did not see the copies)"
    if floor_s is not None and (resident := cache_resident(floor_bytes, device)) is not None:
        floor_s, floor_why = None, resident
    res = {}
    for m in methods:
        row = (method_figures(calls[m], n, floor_s, floor_why, busy) if m in live
               else unavailable_row(runners[m].unavailable))
        res[m] = {"label": METHODS.get(m, (m,))[0], "cached": METHODS.get(m, (m, True))[1], **row,
                  "warmup_s": warmup_s[m], "setup_s": runners[m].setup_s, **runners[m].notes}
        steps = [c.step_ms() for c in calls.get(m, [])]
        res[m]["step_ms"] = ([statistics.median(col) for col in zip(*steps, strict=True)]
                             if plan.profiles(prompt) and steps and all(s and len(s) == n for s in steps) else None)
        if agreement is not None and m in agreement:
            res[m]["token_agreement_with_reference"] = agreement[m]
    if reference is not None:
        compare_to_reference(res, reference)
    if plan.dtype != torch.float32:
        hf.float()
    return {
        "model": model.name, "model_note": model.note, "prompt": prompt, "prompt_tokens": ids.shape[1],
        "new_tokens": n, "batch": ids.shape[0], "reference": reference,
        "params": sum(p.numel() for p in hf.parameters()),
        "floor": {"weight_bytes_per_token": wbytes, "kv_bytes_per_token": kv_tok, "mean_context": mean_ctx,
                  "bytes_per_token": floor_bytes, "ms_per_token": floor_s and floor_s * 1e3, "copy_GBps": case_bw,
                  "copy_samples_GBps": bw_samples, "missing": floor_why},
        "load_average": {"start": load_start, "end": load_end, "busy": busy},
        "methods": res,
    }


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def environment(plan: Plan) -> dict:
    """Where and with what the run was made: device, CPU/GPU, threads, versions, commit, load average."""
    import transformers

    cpu = cpu_name()
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    env = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": str(plan.device), "dtype": str(plan.dtype).replace("torch.", ""),
        "cpu": cpu, "cpu_count": os.cpu_count(), "gpu": None,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "git_commit": commit,
        "load_average_at_start": load_average(),
    }
    if plan.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(plan.device)
    return env


def run(plan: Plan, out_dir: Path, progress: bool = True) -> dict:
    """Run the whole benchmark; write bench.json, bench.md and the plots into ``out_dir``; return the results."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(plan.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(plan)
    tokenizer = bundled_tokenizer()
    prompts = {p: prompt_ids(tokenizer, p, plan.long_prompt_tokens) for p in plan.prompts}
    check = plan.separate_check or plan.dtype != torch.float32
    per_model = len(plan.prompts) * len(plan.methods) * (check + 1 + plan.repeats)
    if plan.batch_sweep:
        per_model += len(plan.batch_sizes) * (1 + plan.repeats)
    bar = tqdm(total=1 + len(plan.models) * per_model + 1, unit="run", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    bar.set_description("memory bandwidth")
    bw = Bandwidth(plan.device, plan.bandwidth_mib)
    bandwidth = bw.measure()
    bar.update(1)
    cases, sweeps = [], []
    if plan.device.type == "cuda":  # transformers compiles generate(cache_implementation="static") per cache size
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    for model in load_models(plan.models, plan.device, plan.seed):
        if plan.dtype != torch.float32:  # weights that bf16 holds exactly: checked in fp32, timed in bf16, same model
            model.hf.to(plan.dtype).float()
        for p in plan.prompts:
            ids = prompts[p].to(plan.device)
            gc.collect()
            own = plan.threads if cases else 0  # the benchmark's own threads in the load average (an estimate)
            cases.append(run_case(model, p, ids, plan.n_new(model, p), plan, bar, bw, own))
        if plan.batch_sweep:
            p = plan.prompts[0]
            sweeps.append(batch_sweep(model, p, prompts[p].to(plan.device), plan.n_new(model, p), plan, bar, bw))
        del model
        gc.collect()
    del bw
    bar.set_description("cache update cost")
    costs = cache_update_costs(plan.cache_lengths, plan.dtype, plan.device)
    bar.update(1)
    bar.close()
    result = {
        "schema": "kvcourse-bench/2",
        "environment": env,
        "settings": {
            "quick": plan.quick, "preset": plan.preset, "models": plan.models, "prompts": plan.prompts,
            "methods": plan.methods, "new_tokens": plan.new_tokens, "long_new_tokens": plan.long_new_tokens,
            "big_new_tokens": plan.big_new_tokens, "long_prompt_tokens": plan.long_prompt_tokens,
            "repeats": plan.repeats, "threads": plan.threads, "compile": plan.compile, "seed": plan.seed,
            "batch_sweep": plan.batch_sweep, "batch_sizes": list(plan.batch_sizes) if plan.batch_sweep else None,
            "short_prompt": SHORT_PROMPT, "prompt_ids": "bundled tokenizer (for every model)",
            "timing": "one call of N new tokens per round, clock read at its start (t0), after each token "
                      "(tick_1..tick_N) and at its return: TTFT = tick_1 - t0, decode/token = (tick_N - tick_1) / "
                      "(N - 1), total = return - t0; medians over interleaved rounds after warm-up; a figure that "
                      "is not positive and finite is None, with the reason under 'missing'",
            "unreliable_when": f"spread (max - min) / median over the rounds > {SPREAD_LIMIT_PCT:.0f}% (decode or "
                               f"TTFT), a round missing, or load average beyond the benchmark's own threads > free "
                               f"cores + {LOAD_MARGIN}",
            "eos": "ignored: min_new_tokens = max_new_tokens and eos_token_id=[] for transformers",
        },
        "bandwidth": bandwidth,
        "cases": cases,
        "cache_update": costs,
    }
    if plan.batch_sweep:
        result["batch_sweep"] = sweeps
    env["load_average_at_end"] = load_average()
    env["busy"] = busy_reason([("at the start of the run", env["load_average_at_start"], 0),
                               ("at its end", env["load_average_at_end"], plan.threads)],
                              os.cpu_count() or 1, plan.threads)
    result["targets"] = targets(cases, plan.device)
    result["runtime_s"] = time.perf_counter() - start
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot_steps(cases, out_dir / "time_per_token.png")
    plot_cache(costs, out_dir / "cache_update.png")
    if plan.batch_sweep:
        plot_sweep(sweeps, out_dir / "batch_sweep.png")
    text = markdown(result)
    (out_dir / "bench.md").write_text(text, encoding="utf-8")
    print(text, flush=True)
    return result
