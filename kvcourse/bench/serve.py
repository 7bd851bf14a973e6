"""The serving benchmark (issue 23): the course engine against static batching and ``transformers``' continuous
batching, on one seeded workload and one KV budget.

    python -m kvcourse.bench.serve            # full: bundled + SmolLM2-135M shape, about 16 minutes on a loaded
                                              # 2-core machine with 1 torch thread (docs/bench/serve.md)
    python -m kvcourse.bench.serve --quick    # a 16-request workload, SmolLM2-135M cut to 2 layers: 72-103 s
    python -m kvcourse.bench --serve [--quick]   # the same, from the main benchmark's command line

For each model (``kvcourse.bench.plan``: the bundled model, and the SmolLM2-135M shape with random weights):

1. the workload (``serve_workload``: Poisson arrivals, lognormal lengths, half the requests behind a shared
   system prompt of whole blocks, Shakespeare text) and its stated figures;
2. a short untimed warm-up of every system, then each system once on the workload (``serve_systems``), in the
   same process, one after the other: static batching (``transformers`` ``generate``, and the course's
   ``generate`` in full mode), ``transformers`` continuous batching, the course engine;
3. the token check: every request's tokens against ``kvcourse.generate.generate`` on its prompt alone (all
   requests on the bundled model; a seeded sample of ``--check-big`` on the random-weight shape, where the
   single-prompt reference is slow). Mismatches are reported per system, never hidden; no figure is withheld;
4. the engine's own overhead: at a steady batch of B decoding requests, one ``Engine.step()`` against one
   ``decode_one_token`` of the fast path (``kvcourse.fast`` ``StaticGenerator``, the issue's bar, and
   ``DynamicGenerator``) at the same B and context; medians over ``--overhead-steps`` steps;
5. the chunked-prefill sweep: the engine on the same workload at each token budget per step.

Outputs in ``--out`` (default ``bench-out/serve``): ``serve.json`` (every figure, per-request times, the
workload's stats, the environment), ``serve.md`` (the tables and targets, also printed) and ``serve_sweep.png``.
Timings on a loaded machine are slower and noisier: the load average is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .harness import cpu_name
from .serve_report import concurrency, figures, overhead_table, plot_sweep, sweep_table, table, targets
from .serve_systems import (
    SYSTEMS,
    Budget,
    SystemResult,
    course_static_generate,
    hf_static_generate,
    reference_tokens,
    run_engine,
    run_hf_cb,
    run_static,
    token_mismatches,
)
from .serve_workload import Workload, WorkloadSpec, make_workload, text_tokens

PRESETS: dict[str, dict] = {
    # static_course (kvcourse.generate) runs on the bundled model only unless --systems names it: on the 30-layer
    # SmolLM2-135M shape it took 186 s of a loaded 2-core machine, for the same batches as static_hf
    "full": {"models": ["bundled", "SmolLM2-135M"], "num_requests": 96, "num_blocks": 128,
             "systems": list(SYSTEMS), "budgets": [32, 64, 128, 256, 512], "budgets_big": [32, 128, 512],
             "overhead": [(1, 128), (8, 128), (32, 128)], "overhead_steps": 20, "check_big": 24},
    "quick": {"models": ["bundled", "SmolLM2-135M:2"], "num_requests": 16, "num_blocks": 40,
              "systems": ["static_hf", "hf_cb", "engine"], "budgets": [32, 256], "budgets_big": [32, 256],
              "overhead": [(8, 64)],
              "overhead_steps": 5, "check_big": 16},
}


@dataclass
class ServePlan:
    models: list[str]
    spec: WorkloadSpec
    budget: Budget
    systems: list[str]
    budgets: list[int]
    overhead: list[tuple[int, int]]
    overhead_steps: int
    check_big: int
    seed: int = 0
    preset: str = "full"
    hf_variants: bool = False
    hf_defaults: bool = False
    budgets_big: list[int] | None = None  # the sweep on random-weight shapes (None: as budgets)
    course_static_big: bool = False  # static_course on random-weight shapes too
    extra: dict = field(default_factory=dict)


# ---- the engine's overhead ------------------------------------------------------------------------------

def _prompts(tokens: list[int], batch: int, context: int) -> list[list[int]]:
    """``batch`` distinct windows of the text, ``context`` tokens each (wrapping around)."""
    n = len(tokens)
    return [[tokens[(7 * i + 31 * i * i + j) % n] for j in range(context)] for i in range(batch)]


@torch.inference_mode()
def step_overhead(hf, tokens: list[int], batch: int, context: int, steps: int, warm: int = 3) -> dict:
    """Median seconds of one engine step at a steady batch of ``batch`` decoding requests of context ``context``,
    and of one fast-path decode step (``StaticGenerator``, ``DynamicGenerator``) at the same batch and context.
    Each timed step includes picking the next tokens (argmax), as the engine's step does. The three are timed
    in turn, one step each per round, so that a change of load on a shared machine hits all three alike."""
    from ..fast import DynamicGenerator, StaticGenerator
    from ..serve import Engine, Request

    prompts = _prompts(tokens, batch, context)
    ids = torch.tensor(prompts, dtype=torch.long)  # (B, context)
    gens, toks = {}, {}
    for name, cls in (("static", StaticGenerator), ("dynamic", DynamicGenerator)):
        gen = cls(hf, max_seq_len=context + warm + steps + 2)
        gen.setup_caches(batch, context + warm + steps + 2)
        toks[name] = gen._begin(ids, None, warm + steps + 1).argmax(dim=-1, keepdim=True)  # (B, 1)
        gens[name] = gen
    bs = 16
    need = batch * math.ceil((context + warm + steps + 8) / bs)
    eng = Engine(hf, num_blocks=need + batch, block_size=bs, max_num_batched_tokens=max(256, batch * context),
                 max_num_seqs=batch, prefix_caching=True)
    for i, p in enumerate(prompts):
        eng.add_request(Request(f"o{i}", prompt=p, max_new_tokens=warm + steps + 6, eos_token_id=None))
    for _ in range(batch * context + 8):  # prefill (chunked as the budget says) until every request decodes
        eng.step()
        h = eng.stats.history[-1]
        if h.prefill_tokens == 0 and h.decode_tokens == batch:
            break
    times: dict[str, list[float]] = {"static": [], "dynamic": [], "engine": []}
    steady = True
    for i in range(warm + steps):
        for name, gen in gens.items():
            t = time.perf_counter()
            toks[name] = gen.decode_one_token(toks[name]).argmax(dim=-1, keepdim=True)
            dt = time.perf_counter() - t
            if i >= warm:
                times[name].append(dt)
        t = time.perf_counter()
        eng.step()
        dt = time.perf_counter() - t
        h = eng.stats.history[-1]
        steady &= h.decode_tokens == batch and h.prefill_tokens == 0
        if i >= warm:
            times["engine"].append(dt)
    out = {"batch": batch, "context": context, "steps": steps, "steady": steady,
           **{f"{k}_s": _median(v) for k, v in times.items()}}
    out["ratio_static"] = out["engine_s"] / out["static_s"] if out["static_s"] else None
    out["ratio_dynamic"] = out["engine_s"] / out["dynamic_s"] if out["dynamic_s"] else None
    return out


def _median(xs: list[float]) -> float | None:
    s = sorted(xs)
    if not s:
        return None
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


# ---- one model --------------------------------------------------------------------------------------------

def run_system(name: str, hf, llama, workload: Workload, budget: Budget) -> SystemResult:
    if name == "static_hf":
        return run_static(workload, budget, hf_static_generate(hf), name)
    if name == "static_course":
        return run_static(workload, budget, course_static_generate(llama), name)
    if name == "hf_cb":
        return run_hf_cb(hf, workload, budget)
    if name == "engine":
        return run_engine(hf, workload, budget)
    raise ValueError(f"unknown system {name!r}: expected one of {', '.join(SYSTEMS)}")


def _check_summary(bad: list[dict], checked: int) -> str:
    if not bad:
        return f"{checked}/{checked}"
    first = bad[0]
    return (f"{checked - len(bad)}/{checked} ({len(bad)} differ; {first['request_id']} first at token "
            f"{first['first_diff']})")


def run_model(spec_name: str, plan: ServePlan, tokenizer, say=print) -> dict:
    """Everything for one model: workload, systems, token check, overhead, sweep."""
    from ..llama import Llama
    from .plan import load_models

    model = next(load_models([spec_name], torch.device("cpu"), plan.seed))
    hf = model.hf.eval()
    llama = Llama.from_hf(hf)
    workload = make_workload(plan.spec, tokenizer)
    if workload.max_len() > plan.budget.kv_tokens:
        raise SystemExit(f"the KV budget ({plan.budget.kv_tokens} tokens) is smaller than the longest request "
                         f"({workload.max_len()} tokens): raise --num-blocks")
    say(f"\n## {model.name} ({model.note})")
    wstats = workload.stats()
    say(f"workload: {wstats['num_requests']} requests ({wstats['shared']} behind a {wstats['system_prompt_tokens']}-token "
        f"system prompt), Poisson at {plan.spec.rate:g}/s (arrivals over {wstats['arrival_span_s']:.2f} s), prompts "
        f"p50 {wstats['prompt_len']['p50']:.0f} / max {wstats['prompt_len']['max']} tokens, new tokens p50 "
        f"{wstats['output_len']['p50']:.0f} / max {wstats['output_len']['max']}; KV budget {plan.budget.num_blocks} "
        f"blocks x {plan.budget.block_size} = {plan.budget.kv_tokens} tokens")
    # warm-up: every system once on a small workload of the same kind (first calls allocate, load kernels)
    warm = make_workload(replace(plan.spec, num_requests=4, seed=plan.spec.seed + 1000), tokenizer)
    for name in [s for s in plan.systems if model.name == "bundled" or s != "static_course" or plan.course_static_big]:
        run_system(name, hf, llama, warm, plan.budget)
    systems = [s for s in plan.systems if model.name == "bundled" or s != "static_course" or plan.course_static_big]
    results: dict[str, SystemResult] = {}
    for name in systems:
        t = time.perf_counter()
        results[name] = run_system(name, hf, llama, workload, plan.budget)
        say(f"  {SYSTEMS[name]}: done in {time.perf_counter() - t:.1f} s")
    if plan.hf_variants:
        for label, kw in (("hf_cb paged|eager", {"attn_implementation": "paged|eager"}),
                          ("hf_cb prefill_first", {"scheduler_type": "prefill_first"})):
            r = run_hf_cb(hf, workload, plan.budget, **kw)
            r.name = label
            results[label] = r
    hf_defaults = None
    if plan.hf_defaults:
        from .serve_systems import hf_cb_config, hf_cb_setup_cost

        prompts = [r.prompt for r in workload.requests[:16]]
        hf_defaults = {"requests": len(prompts), "max_new_tokens": 32,
                       "defaults": hf_cb_setup_cost(hf, prompts, 32),
                       "budget": hf_cb_setup_cost(hf, prompts, 32, hf_cb_config(plan.budget))}
        for key in ("defaults", "budget"):
            d = hf_defaults[key]
            say(f"  transformers continuous batching, {key}: set-up {d['setup_s']:.2f} s, generation "
                f"{d['generation_s']:.2f} s ({d['forwards']} forwards, {d['forward_s']:.2f} s in them); "
                f"{d['num_blocks']} blocks, max_batch_tokens {d['max_batch_tokens']}, mask {d['mask_shapes']} = "
                f"{d['mask_bytes'] / 2**30:.2f} GiB")
    # the oracle: every request (bundled), or a seeded sample (random-weight shapes: the reference is slow)
    ids = [r.request_id for r in workload.requests]
    if model.name != "bundled" and plan.check_big < len(ids):
        ids = sorted(random.Random(plan.seed).sample(ids, plan.check_big), key=lambda s: int(s[1:]))
    t = time.perf_counter()
    ref = reference_tokens(llama, workload, ids)
    say(f"  reference (kvcourse.generate, one prompt at a time): {len(ref)} requests in {time.perf_counter() - t:.1f} s")
    rows, checks, mismatches = [], {}, {}
    for name, res in results.items():
        bad = token_mismatches(res, ref)
        mismatches[name] = bad
        checks[name] = _check_summary(bad, len(ref))
        row = figures(res)
        row["system"] = name
        if name not in SYSTEMS:
            row["label"] = name
        rows.append(row)
    say(table(rows, checks))
    overhead = []
    for b, c in plan.overhead:
        o = step_overhead(hf, text_tokens(tokenizer)[0], b, c, plan.overhead_steps)
        overhead.append(o)
    if overhead:
        say(overhead_table(overhead))
    sweep = []
    budgets = plan.budgets if model.name == "bundled" or plan.budgets_big is None else plan.budgets_big
    for budget in budgets:
        res = run_engine(hf, workload, replace(plan.budget, max_num_batched_tokens=budget))
        f = figures(res)
        sweep.append({"budget": budget, **{k: f[k] for k in ("tokens_per_s", "ttft_p50", "ttft_p95", "itl_p50",
                                                              "itl_p95", "tpot_p95", "steps", "preemptions")},
                      "tokens_ok": not token_mismatches(res, ref)})
    if sweep:
        say(sweep_table(sweep))
    by_name = {r["system"]: r for r in rows}
    tgt = targets(by_name, overhead)
    for line in tgt:
        say(f"  {line}")
    return {"model": model.name, "note": model.note, "workload": wstats, "rows": rows, "checks": checks,
            "mismatches": mismatches, "checked": len(ref),
            "engine_concurrency": concurrency(results["engine"].history) if "engine" in results else None,
            "overhead": overhead, "sweep": sweep, "targets": tgt, "hf_defaults": hf_defaults,
            "per_request": {name: {rid: asdict(rec) for rid, rec in res.records.items()} for name, res in
                            results.items()}}


def environment() -> dict:
    import transformers

    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "git_commit": _git("rev-parse", "--short", "HEAD"),
            "engine_uncommitted": bool(_git("status", "--porcelain", "--", "kvcourse/serve")),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "dtype": "float32",
            "load_average_at_start": _load()}


def _git(*args: str) -> str | None:
    """``git args`` in the package's checkout (the commit the engine ran from), or None outside one."""
    import subprocess

    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def markdown(report: dict) -> str:
    env, plan = report["environment"], report["plan"]
    lines = ["# Serving benchmark (issue 23)", "",
             f"{env['date']}, {env['cpu']}, {env['torch_threads']} torch threads, float32, torch {env['torch']}, "
             f"transformers {env['transformers']}, preset {plan['preset']}, commit {env.get('git_commit')}"
             f"{' (kvcourse/serve with uncommitted changes)' if env.get('engine_uncommitted') else ''}. "
             f"Load average at start "
             f"{env['load_average_at_start']}, at end {env.get('load_average_at_end')}. One timed run per system "
             f"after an untimed warm-up; a loaded machine slows and spreads every figure.", "",
             f"Workload spec: `{plan['spec']}`. KV budget: {plan['budget']}.", ""]
    for m in report["models"]:
        w = m["workload"]
        lines += [f"## {m['model']} ({m['note']})", "",
                  f"{w['num_requests']} requests, {w['shared']} behind the {w['system_prompt_tokens']}-token system "
                  f"prompt; prompt tokens {w['prompt_len']}; new tokens {w['output_len']}; arrivals over "
                  f"{w['arrival_span_s']:.2f} s (measured rate {w['measured_rate']:.1f}/s).", "",
                  table(m["rows"], m["checks"]), ""]
        c = m.get("engine_concurrency")
        if c:
            lines += [f"Engine concurrency: at most {c['max_running']} running at once (mean {c['mean_running']:.1f}); "
                      f"requests waiting in {100 * c['steps_with_waiting']:.0f}% of its {c['steps']} steps; fewest "
                      f"free blocks {c['min_free_blocks']}.", ""]
        for name, bad in m["mismatches"].items():
            if bad:
                lines.append(f"Token mismatches, {name}: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
        if m["overhead"]:
            lines += ["", "Engine step vs fast-path decode step (median milliseconds per step, the three timed in turn):", "",
                      overhead_table(m["overhead"]), ""]
        if m["sweep"]:
            lines += ["Chunked-prefill sweep (the engine, same workload):", "", sweep_table(m["sweep"]), ""]
        d = m.get("hf_defaults")
        if d:
            lines += [f"transformers continuous batching on the first {d['requests']} requests x {d['max_new_tokens']} "
                      f"tokens, all at once:", "",
                      "| config | set-up (s) | generation (s) | forwards | in forwards (s) | blocks | max_batch_tokens "
                      "| attention mask | mask GiB |", "|---|---|---|---|---|---|---|---|---|"]
            for key in ("defaults", "budget"):
                x = d[key]
                lines.append(f"| {key} | {x['setup_s']:.2f} | {x['generation_s']:.2f} | {x['forwards']} | "
                             f"{x['forward_s']:.2f} | {x['num_blocks']} | {x['max_batch_tokens']} | "
                             f"{x['mask_shapes']} | {x['mask_bytes'] / 2**30:.3f} |")
            lines.append("")
        lines += ["Targets:", ""] + [f"- {t}" for t in m["targets"]] + [""]
    return "\n".join(lines)


def run(plan: ServePlan, out_dir: Path, say=print) -> dict:
    from .plan import bundled_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    tok = bundled_tokenizer()
    models = [run_model(m, plan, tok, say) for m in plan.models]
    env["load_average_at_end"] = _load()
    report = {"schema": "kvcourse-serve/1", "environment": env,
              "plan": {"preset": plan.preset, "models": plan.models, "spec": asdict(plan.spec),
                       "budget": asdict(plan.budget), "systems": plan.systems, "budgets": plan.budgets,
                       "overhead": plan.overhead, "overhead_steps": plan.overhead_steps},
              "models": models}
    (out_dir / "serve.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report)
    (out_dir / "serve.md").write_text(md)
    if any(m["sweep"] for m in models):
        png = plot_sweep({m["model"]: m["sweep"] for m in models if m["sweep"]}, out_dir / "serve_sweep.png")
        report["plot"] = str(png) if png else None
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvcourse.bench.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 requests, bundled + SmolLM2-135M:2, under 2 minutes")
    p.add_argument("--out", type=Path, default=Path("bench-out/serve"))
    p.add_argument("--models", nargs="+", default=None, help="bundled, SmolLM2-135M, NAME:LAYERS")
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=None)
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default 100)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV budget in blocks of --block-size tokens")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=256, help="token budget per step (chunked prefill)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--budgets", type=int, nargs="*", default=None, help="the sweep's token budgets (none: no sweep)")
    p.add_argument("--overhead", nargs="*", default=None, metavar="BxCONTEXT",
                   help="batch x context of the overhead measurement, e.g. 8x128 (none: skip)")
    p.add_argument("--overhead-steps", type=int, default=None)
    p.add_argument("--check-big", type=int, default=None,
                   help="requests checked against the single-prompt reference on random-weight shapes")
    p.add_argument("--hf-variants", action="store_true",
                   help="also run transformers continuous batching with paged|eager attention and prefill_first")
    p.add_argument("--hf-defaults", action="store_true",
                   help="also time transformers continuous batching with its default ContinuousBatchingConfig "
                        "(set-up apart from generation) on 16 requests x 32 tokens: on a CPU it sizes its cache and "
                        "a float mask from the machine's RAM (about 60%% of it: over 12 GiB here) and takes tens of "
                        "seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> ServePlan:
    name = "quick" if args.quick else "full"
    pre = PRESETS[name]

    def pick(value, default):
        return default if value is None else value

    for label, v in (("--num-requests", args.num_requests), ("--num-blocks", args.num_blocks),
                     ("--block-size", args.block_size), ("--max-num-seqs", args.max_num_seqs),
                     ("--max-num-batched-tokens", args.max_num_batched_tokens),
                     ("--overhead-steps", args.overhead_steps), ("--check-big", args.check_big)):
        if v is not None and v < 1:
            raise SystemExit(f"{label} must be >= 1, got {v}")
    if args.rate is not None and not args.rate > 0:
        raise SystemExit(f"--rate must be a positive number of requests per second, got {args.rate}")
    spec = WorkloadSpec(num_requests=pick(args.num_requests, pre["num_requests"]),
                        rate=pick(args.rate, WorkloadSpec.rate), block_size=args.block_size, seed=args.seed)
    budget = Budget(num_blocks=pick(args.num_blocks, pre["num_blocks"]), block_size=args.block_size,
                    max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    overhead = pre["overhead"]
    if args.overhead is not None:
        try:
            overhead = [tuple(int(x) for x in s.lower().split("x")) for s in args.overhead]
        except ValueError:
            raise SystemExit(f"--overhead takes BxCONTEXT pairs such as 8x128, got {args.overhead}") from None
        if any(len(o) != 2 or min(o) < 1 for o in overhead):
            raise SystemExit(f"--overhead takes BxCONTEXT pairs of ints >= 1, got {args.overhead}")
    return ServePlan(models=args.models or pre["models"], spec=spec, budget=budget,
                     systems=args.systems or pre["systems"],
                     budgets=pre["budgets"] if args.budgets is None else args.budgets, overhead=overhead,
                     overhead_steps=pick(args.overhead_steps, pre["overhead_steps"]),
                     check_big=pick(args.check_big, pre["check_big"]), seed=args.seed, preset=name,
                     hf_variants=args.hf_variants, hf_defaults=args.hf_defaults,
                     budgets_big=pre["budgets_big"] if args.budgets is None else args.budgets,
                     course_static_big=args.systems is not None and "static_course" in args.systems)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = make_plan(args)
    report = run(plan, args.out)
    print(f"\nwritten: {args.out / 'serve.json'}, {args.out / 'serve.md'}"
          + (f", {report['plot']}" if report.get("plot") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
