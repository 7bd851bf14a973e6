"""Benchmark: greedy generation with and without a KV cache, the course's generators against ``transformers``.

    python -m kvcourse.bench              # full run (14+ minutes on 2 CPU cores), results in bench-out/
    python -m kvcourse.bench --quick      # under a minute: bundled model + a 4-layer SmolLM2-135M shape
    python -m kvcourse.bench --gpu-quick  # CUDA: SmolLM2-1.7B shape in bf16, fast path eager and CUDA-graphed
    python -m kvcourse.bench --batch-sweep  # also: the fast path at batch 1, 2, 4, ...: where decode stops
                                            # being memory-bound
    python -m kvcourse.bench --help

Every method runs on the same model, prompt and number of new tokens, after a check that they all
produce the same greedy tokens; each call reads the clock after every token, so time to first token
and decode time per token come from the same call. A figure the clock cannot give is "n/a" with the
reason, never a number; a row whose rounds disagree, or that was timed on a busy machine, is marked
unreliable. Each row is printed as soon as its calls are done; the tables follow at the end.

The parts, each readable on its own (its docstring derives what it computes):

- ``plan.py``: models (bundled, random weights of published shapes), prompts, and the ``Plan`` of a run;
- ``methods.py``: what is timed (the course's generators, ``transformers`` ``generate`` variants), the
  token check;
- ``measure.py``: the clock (a reading after every token), TTFT / decode / total per call, medians and
  spreads over rounds, the load average, unreliable rows;
- ``bandwidth.py``: copy bandwidth, the bytes a decode step moves, the bandwidth floor;
- ``harness.py``: one case (check, warm-up, rounds) and the whole run; ``sweep.py``: the batch sweep;
- ``report.py``: the tables, targets and printed lines; ``plots.py``: the plots;
- ``cli.py``: the options and presets (``__main__.py`` runs it).

The serving benchmark (issue 23), ``python -m kvcourse.bench.serve [--quick]`` or ``python -m kvcourse.bench
--serve``: ``serve_workload.py`` (the seeded workload), ``serve_systems.py`` (static batching, ``transformers``
continuous batching, the course engine), ``serve_report.py`` (figures, tables, targets, the sweep plot),
``serve.py`` (the run and its options; not imported here, so that ``python -m kvcourse.bench.serve`` runs it
cleanly); results in docs/bench/serve.md.

The speculative-decoding benchmark (issue 24), ``python -m kvcourse.bench.speculative [--quick]`` or ``python -m
kvcourse.bench --speculative``: ``speculative.py`` (prompts, systems, the run, the cost of each pass) and
``speculative_report.py`` (ratios, targets, the cost model, tables, the plot); results in docs/bench/speculative.md.

The int8-weight benchmark (issue 25), ``python -m kvcourse.bench.int8_weights [--quick]`` or ``python -m
kvcourse.bench --int8-weights``: ``int8_weights.py`` (models, the interleaved float / int8 rounds, tokens and the
teacher-forced logit error) and ``int8_weights_report.py`` (tables and markdown); results in
docs/bench/int8_weights.md. The MLA decode-step benchmark (issue 25), ``python -m kvcourse.bench.mla [--quick]`` or
``python -m kvcourse.bench --mla``: ``mla.py`` (absorbed, unabsorbed and ``transformers`` at 128 to 4,096 cached
tokens, with the bytes each cache holds); results in docs/bench/mla.md.

Outputs in ``--out`` (default ``bench-out/``): ``bench.json`` (every figure, raw times, environment),
``bench.md`` (the tables, also printed), ``time_per_token.png``, ``cache_update.png`` and, with
``--batch-sweep``, ``batch_sweep.png``.
"""

from __future__ import annotations

from . import (
    bandwidth,
    cli,
    harness,
    measure,
    methods,
    plan,
    plots,
    report,
    serve_report,
    serve_systems,
    serve_workload,
    sweep,
)
from .bandwidth import Bandwidth, cache_update_costs, memory_bound, step_bytes, weight_bytes_per_token
from .cli import PRESETS, main, make_plan, parse_args
from .harness import environment, run, run_case
from .measure import (
    LOAD_MARGIN,
    SPREAD_LIMIT_PCT,
    CallClock,
    CallTimes,
    busy_reason,
    compare_to_reference,
    load_average,
    method_figures,
    over_rounds,
    positive,
    timed,
    timed_call,
    unavailable_row,
)
from .methods import METHODS, REFERENCE, RUNNERS, Runner, TokenMismatchError, check_tokens, hf_generate, make_runners
from .plan import (
    LONG_TEXT,
    SHORT_PROMPT,
    Model,
    Plan,
    batch_sizes,
    bundled_tokenizer,
    load_models,
    parse_model_spec,
    prompt_ids,
    random_llama,
)
from .plots import plot_cache, plot_steps, plot_sweep
from .report import full_table, markdown, row_line, row_notes, summary_table, sweep_text, targets
from .sweep import batch_sweep

__all__ = [
    "LOAD_MARGIN", "LONG_TEXT", "METHODS", "PRESETS", "REFERENCE", "RUNNERS", "SHORT_PROMPT",
    "SPREAD_LIMIT_PCT", "Bandwidth", "CallClock", "CallTimes", "Model", "Plan", "Runner", "TokenMismatchError",
    "bandwidth", "batch_sizes", "batch_sweep", "bundled_tokenizer", "busy_reason", "cache_update_costs",
    "check_tokens", "cli", "compare_to_reference", "environment", "full_table", "harness", "hf_generate",
    "load_average", "load_models", "main", "make_plan", "make_runners", "markdown", "measure", "memory_bound",
    "method_figures", "methods", "over_rounds", "parse_args", "parse_model_spec", "plan", "plot_cache",
    "plot_steps", "plot_sweep", "plots", "positive", "prompt_ids", "random_llama", "report", "row_line",
    "row_notes", "run", "run_case", "serve_report", "serve_systems", "serve_workload", "step_bytes",
    "summary_table", "sweep", "sweep_text", "targets", "timed",
    "timed_call", "unavailable_row", "weight_bytes_per_token",
]
