"""The command line: ``python -m kvcourse.bench [--quick | --gpu-quick] [--batch-sweep] [options]``.

Three presets set the defaults; any option given explicitly overrides its preset's value:

- full (no preset flag): the bundled model and the SmolLM2-135M shape (and SmolLM2-1.7B on a GPU, or
  with ``--big``), short and long prompts, 300 new tokens, every method, 3 rounds. About 14 minutes on
  2 CPU cores.
- ``--quick``: the bundled model and a 4-layer SmolLM2-135M shape, 16 new tokens, 2 rounds: under a
  minute on a laptop CPU.
- ``--gpu-quick``: the SmolLM2-1.7B shape (random weights), the short prompt, bfloat16 on CUDA, 64 new
  tokens, 3 rounds, five methods: the course's fast path (eager), the fast path with static shapes and
  a CUDA graph (eager kernels, and compiled), ``transformers`` ``generate(use_cache=True)`` and its
  static cache. On one H100 it took 102 s before the compiled row was added, and 177 s with it at 256 new
  tokens (docs/bench/h100/). Without CUDA it refuses to run, and says to use ``--quick``.

``--serve`` runs the serving benchmark instead (``kvcourse.bench.serve``; ``--serve --quick`` for its short
variant). ``--speculative`` runs the speculative-decoding benchmark instead (``kvcourse.bench.speculative``;
``--speculative --quick`` for its short variant). ``--int8-weights`` runs the int8-weight benchmark instead
(``kvcourse.bench.int8_weights``: float against int8 weights on the fast path, batch 1; ``--int8-weights --quick``).
``--mla`` runs the MLA decode-step benchmark instead (``kvcourse.bench.mla``; ``--mla --quick``).

``--batch-sweep [METHOD]`` adds the batch sweep (``kvcourse.bench.sweep``) for each model, batch 1, 2,
4, ... up to ``--batch-max`` (64 on CUDA, 32 elsewhere).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..devices import pick_device, pick_dtype
from .harness import run
from .methods import METHODS, TokenMismatchError
from .plan import Plan, batch_sizes, check_model_specs

GPU_QUICK_METHODS = ["course_fast", "course_graph", "course_graph_compiled", "hf_dynamic", "hf_static"]
SWEEP_METHODS = ["course_fast", "course_static", "course_graph", "course_graph_compiled"]
# preset -> defaults (models: None means "bundled + SmolLM2-135M, + SmolLM2-1.7B on a GPU or with --big")
PRESETS: dict[str, dict] = {
    "full": {"models": None, "prompts": ["short", "long"], "methods": None, "new_tokens": 300, "long_new_tokens": 16,
             "long_prompt_tokens": 400, "repeats": 3, "bandwidth_mib": 1024,
             "cache_lengths": [1, 512, 1024, 2048, 4096, 8192]},
    "quick": {"models": ["bundled", "SmolLM2-135M:4"], "prompts": ["short", "long"], "methods": None, "new_tokens": 16,
              "long_new_tokens": 8, "long_prompt_tokens": 64, "repeats": 2, "bandwidth_mib": 256,
              "cache_lengths": [1, 256, 1024]},
    "gpu-quick": {"models": ["SmolLM2-1.7B"], "prompts": ["short"], "methods": GPU_QUICK_METHODS, "new_tokens": 64,
                  "big_new_tokens": 64, "long_new_tokens": 16, "long_prompt_tokens": 400, "repeats": 3,
                  "bandwidth_mib": 1024, "cache_lengths": [1, 256, 1024], "dtype": "bfloat16"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kvcourse.bench",
        description="Time greedy generation with and without a KV cache: the course's generators (uncached, "
                    "torch.cat cache, preallocated cache, fast path eager, static and CUDA-graphed) against "
                    "transformers generate (use_cache=False/True, static cache), after checking they all produce "
                    "the same tokens. Each row is printed as soon as its timed calls are done; the tables follow.",
        epilog="Full mode took about 14 minutes on 2 CPU cores before the static-shape rows were added; --quick about a minute; --gpu-quick is designed "
               "for about 3 minutes on an H100/H200 (177 s on one H100 at 256 new tokens). Results: OUT/bench.json, OUT/bench.md, "
               "OUT/time_per_token.png, OUT/cache_update.png (and OUT/batch_sweep.png with --batch-sweep).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="bundled model + a 4-layer SmolLM2-135M shape, short prompts, few tokens, 2 rounds")
    preset.add_argument("--gpu-quick", action="store_true",
                        help="CUDA only: SmolLM2-1.7B shape (random weights), short prompt, bfloat16, 64 new tokens, "
                             "3 rounds; the fast path eager, with static shapes + CUDA graph, and compiled + graph, "
                             "transformers generate(use_cache=True) and its static cache. About 3 minutes on an "
                             "H100, compilation included. Refuses without CUDA")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the core count)")
    p.add_argument("--models", nargs="+", default=None, metavar="SPEC",
                   help="bundled, SmolLM2-135M, SmolLM2-1.7B, ...; NAME:LAYERS for fewer layers "
                        "(default: bundled SmolLM2-135M, plus SmolLM2-1.7B with --big)")
    p.add_argument("--big", action=argparse.BooleanOptionalAction, default=None,
                   help="include SmolLM2-1.7B (default: on a GPU only; about 14 GB of RAM in float32 on the CPU)")
    p.add_argument("--prompts", nargs="+", choices=["short", "long"], default=None, help="default: short long")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="default: all")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens after the short prompt (default 300)")
    p.add_argument("--long-new-tokens", type=int, default=None, help="new tokens after the long prompt (default 16)")
    p.add_argument("--big-new-tokens", type=int, default=None,
                   help="new tokens for SmolLM2-1.7B (default: as --new-tokens on a GPU, 32 on the CPU)")
    p.add_argument("--long-prompt-tokens", type=int, default=None, help="length of the long prompt (default 400)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick: 2)")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="size of the bandwidth-test tensor (default 1024: well above the CPU caches)")
    p.add_argument("--cache-lengths", type=int, nargs="+", default=None,
                   help="cache lengths for the torch.cat vs preallocated plot")
    p.add_argument("--no-profile", action="store_true", help="keep no per-step times (no time_per_token plot)")
    p.add_argument("--separate-check", action="store_true",
                   help="check tokens in an extra untimed run before the rounds, instead of in round 1 "
                        "(full mode: about 3 minutes more)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the fast path's decode step (compile time reported separately)")
    p.add_argument("--batch-sweep", nargs="?", const="course_fast", default=None, choices=SWEEP_METHODS,
                   metavar="METHOD",
                   help="also time METHOD (default course_fast; or course_static, course_graph, course_graph_compiled) at batch 1, 2, 4, "
                        "... up to --batch-max, for each model: tokens/s, bytes per step against time per step "
                        "and the bandwidth line (OUT/batch_sweep.png): where decode stops being memory-bound")
    p.add_argument("--batch-max", type=int, default=None,
                   help="largest batch of the sweep (default: 64 on CUDA, 32 elsewhere)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-weight models")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--serve", action="store_true",
                   help="run the serving benchmark instead (kvcourse.bench.serve: static batching, transformers "
                        "continuous batching and the course engine on one workload); the options after it are "
                        "its own: python -m kvcourse.bench --serve --help")
    p.add_argument("--speculative", action="store_true",
                   help="run the speculative-decoding benchmark instead (kvcourse.bench.speculative: prompt lookup "
                        "and the draft model at k = 1..8 against kvcourse.generate and transformers' assisted "
                        "generation); the options after it are its own: python -m kvcourse.bench --speculative --help")
    p.add_argument("--int8-weights", action="store_true",
                   help="run the int8-weight benchmark instead (kvcourse.bench.int8_weights: float against int8 "
                        "weights, ms/token, bytes per step, tokens and logit error); the options after it are its "
                        "own: python -m kvcourse.bench --int8-weights --help")
    p.add_argument("--mla", action="store_true",
                   help="run the MLA decode-step benchmark instead (kvcourse.bench.mla: absorbed against unabsorbed "
                        "against transformers, contexts 128..4096); the options after it are its own: "
                        "python -m kvcourse.bench --mla --help")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """The Plan of a run: the preset's defaults, overridden by the options given; SystemExit on bad input."""
    name = "gpu-quick" if getattr(args, "gpu_quick", False) else "quick" if args.quick else "full"
    preset = PRESETS[name]
    device = pick_device(args.device)
    if name == "gpu-quick" and device.type != "cuda":
        raise SystemExit(f"--gpu-quick needs a CUDA device (SmolLM2-1.7B in bfloat16, CUDA graphs), and this run's "
                         f"device is {device.type}: no GPU timing can come from here. On the CPU use --quick.")
    dtype_name = args.dtype or preset.get("dtype")
    dtype = pick_dtype(dtype_name, device) if dtype_name else (torch.bfloat16 if device.type == "cuda"
                                                               else torch.float32)
    big = args.big if args.big is not None else device.type == "cuda"

    def pick(value, key):
        return value if value is not None else preset[key]

    models = args.models or preset["models"] or ["bundled", "SmolLM2-135M"]
    if big and args.models is None and name == "full":
        models = models + ["SmolLM2-1.7B"]
    big_default = (args.new_tokens or 300) if device.type == "cuda" else 32
    batch_max = args.batch_max if args.batch_max is not None else (64 if device.type == "cuda" else 32)
    plan = Plan(
        models=models,
        prompts=args.prompts or list(preset["prompts"]),
        methods=args.methods or list(preset["methods"] or METHODS),
        new_tokens=pick(args.new_tokens, "new_tokens"),
        long_new_tokens=pick(args.long_new_tokens, "long_new_tokens"),
        big_new_tokens=args.big_new_tokens or preset.get("big_new_tokens") or big_default,
        long_prompt_tokens=pick(args.long_prompt_tokens, "long_prompt_tokens"),
        repeats=pick(args.repeats, "repeats"),
        threads=args.threads or torch.get_num_threads(),
        device=device, dtype=dtype,
        bandwidth_mib=pick(args.bandwidth_mib, "bandwidth_mib"),
        cache_lengths=args.cache_lengths or list(preset["cache_lengths"]),
        profile=not args.no_profile, separate_check=args.separate_check, compile=args.compile, seed=args.seed,
        quick=name == "quick", preset=name,
        batch_sweep=args.batch_sweep, batch_sizes=batch_sizes(batch_max) if batch_max >= 1 else (),
    )
    for field in ("new_tokens", "long_new_tokens", "big_new_tokens"):
        if getattr(plan, field) < 2:
            raise SystemExit(f"--{field.replace('_', '-')} must be >= 2 (decode time per token needs 2 tokens)")
    if plan.repeats < 1 or plan.threads < 1 or plan.long_prompt_tokens < 1 or plan.bandwidth_mib < 1:
        raise SystemExit("--repeats, --threads, --long-prompt-tokens and --bandwidth-mib must be >= 1")
    if any(n < 1 for n in plan.cache_lengths):
        raise SystemExit("--cache-lengths must be >= 1")
    if batch_max < 1:
        raise SystemExit("--batch-max must be >= 1")
    check_model_specs(plan.models)
    return plan


def main(argv: list[str] | None = None) -> int:
    """``python -m kvcourse.bench``: 0 when the run is written, 1 when a method's tokens were wrong.

    ``--serve`` hands the other arguments to the serving benchmark (``kvcourse.bench.serve.main``), and
    ``--speculative`` to the speculative-decoding benchmark (``kvcourse.bench.speculative.main``), ``--int8-weights``
    to the int8-weight benchmark (``kvcourse.bench.int8_weights.main``), ``--mla`` to the MLA decode-step benchmark
    (``kvcourse.bench.mla.main``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--serve" in argv:
        from .serve import main as serve_main

        return serve_main([a for a in argv if a != "--serve"])
    if "--speculative" in argv:
        from .speculative import main as speculative_main

        return speculative_main([a for a in argv if a != "--speculative"])
    if "--int8-weights" in argv:
        from .int8_weights import main as int8_main

        return int8_main([a for a in argv if a != "--int8-weights"])
    if "--mla" in argv:
        from .mla import main as mla_main

        return mla_main([a for a in argv if a != "--mla"])
    args = parse_args(argv)
    plan = make_plan(args)
    try:
        run(plan, args.out, progress=not args.no_progress)
    except TokenMismatchError as err:
        print(f"kvcourse.bench: token check failed: {err}", file=sys.stderr)
        return 1
    return 0
