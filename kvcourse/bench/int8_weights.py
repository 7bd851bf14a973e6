"""The int8-weight benchmark (issue 25, section 3): float weights against int8 weights on the course's fast path,
batch 1, in one run.

    OMP_NUM_THREADS=1 python -m kvcourse.bench.int8_weights          # bundled + SmolLM2-135M shape, fp32 and bf16
    OMP_NUM_THREADS=1 python -m kvcourse.bench.int8_weights --quick  # bundled + a 4-layer 135M shape, 8 steps
    python -m kvcourse.bench --int8-weights [--quick]                 # the same, from the main command line

For each model and dtype (CPU: float32 and bfloat16; CUDA: bfloat16, and the SmolLM2-1.7B shape too), the float
model is ``kvcourse.fast.DynamicGenerator`` and the int8 model ``kvcourse.int8_weights.Int8DynamicGenerator`` built
from the SAME weights in the same dtype (one scale per output channel, ``torch.ops.aten._weight_int8pack_mm``).

- **Time.** An untimed warm-up of each, then ``--rounds`` rounds; each round runs both once, float and int8 in turn
  (the order alternates), so a change of load hits both alike. A step is the time between two of ``generate``'s
  callbacks (gpt-fast's hook); ms/token is the median of every decode step of every round. On the CPU with one
  torch thread the clock is this process's CPU time (``time.process_time``: the work itself, which a loaded machine
  stretches less than the wall clock); with more threads, or on a GPU, the wall clock after a synchronize.
- **Bytes per step.** ``weight_bytes_per_step`` of the float model and ``Int8DynamicGenerator.weight_nbytes`` (int8
  matrices, their scales, the norms, one embedding row), plus the KV cache at the middle of the run.
- **Tokens.** Round 1's greedy tokens: how many of the int8 model's ``steps + 1`` new tokens equal the float
  model's, and the first position where they differ.
- **Logit error, teacher forced.** Both models are fed the float model's own tokens (prefill, then one decode step
  per token), so each position compares the two models on the same past, not on two texts that diverged: the max
  |int8 - float| over every position and vocabulary entry, that max relative to the float logits' max |logit|, and
  the positions whose argmax agrees (the float argmax is the float model's token).

Outputs in ``--out`` (default ``bench-out/int8_weights``): ``int8_weights.json`` and ``int8_weights.md``
(``kvcourse.bench.int8_weights_report``); ``--out docs/bench`` wrote docs/bench/int8_weights.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .int8_weights_report import environment, render, row_line

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
PRESETS = {  # models: + SmolLM2-1.7B on CUDA (full preset only)
    "full": {"models": ["bundled", "SmolLM2-135M"], "steps": 96, "rounds": 3, "prompt_tokens": 32},
    "quick": {"models": ["bundled", "SmolLM2-135M:4"], "steps": 8, "rounds": 1, "prompt_tokens": 16},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Plan:
    models: list[str]
    dtypes: list[str]
    steps: int
    rounds: int
    prompt_tokens: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    threads: int = 1
    seed: int = 0
    preset: str = "full"


def load_case(spec: str, device: torch.device, prompt_tokens: int, seed: int = 0):
    """(name, float32 kvcourse Llama, prompt (1, T), description) for ``bundled`` or ``SHAPE[:LAYERS]``. The bundled
    model reads a Shakespeare prompt; a random-weight shape, ``prompt_tokens`` seeded random ids."""
    from ..llama import Llama
    from ..models import BUNDLED_NAMES, load_model
    from ..shapes import get_shape, random_model
    from .plan import parse_model_spec

    name, layers = parse_model_spec(spec)
    if name in BUNDLED_NAMES:
        hf, tok = load_model(device=device, dtype=torch.float32)
        return "bundled", Llama.from_hf(hf), tok(PROMPT, return_tensors="pt").input_ids.to(device), "trained"
    shape = get_shape(name)
    hf = random_model(shape.name, device=device, num_hidden_layers=layers, seed=seed)
    prompt = torch.randint(0, shape.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    label = shape.name if layers is None else f"{shape.name}:{layers}"
    return label, Llama.from_hf(hf), prompt.to(device), "random weights"


def decode_times(gen, prompt: torch.Tensor, steps: int, clock) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of ``steps`` decode steps (between successive callbacks; the first follows the prefill), and
    the tokens (1, T + steps + 1)."""
    from ..devices import synchronize

    stamps: list[float] = []

    def mark(_token):
        synchronize(gen.device)
        stamps.append(clock())

    out = gen.generate(prompt, steps + 1, callback=mark)
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], out


@torch.inference_mode()
def teacher_forced_logits(gen, prompt: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) float32 of a fast generator that predict each of ``new_tokens`` (1, N) given the prompt and the
    tokens before it: the prefill, then one decode step per token (the decode path and kernels that were timed)."""
    n = new_tokens.shape[1]
    gen.setup_caches(1, prompt.shape[1] + n)
    logits = [gen._begin(prompt, None, n)]  # (1, V): the prefill, with the decode state set
    for i in range(n - 1):
        logits.append(gen.decode_one_token(new_tokens[:, i:i + 1]))  # (1, V)
    return torch.cat(logits).float()  # (N, V)


def logit_error(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Max |other - ref| over every position and vocabulary entry, relative to max |ref|, and how many positions'
    argmax agree; ``ref`` and ``other`` are (N, V) logits of the same positions."""
    if ref.shape != other.shape or ref.dim() != 2:
        raise ValueError(f"logit_error expects two (positions, vocab) logits of one shape, got {tuple(ref.shape)} and "
                         f"{tuple(other.shape)}")
    err, scale = float((other - ref).abs().max()), float(ref.abs().max())
    return {"max_abs_logit_error": err, "max_abs_logit": scale, "rel_logit_error": err / scale if scale else 0.0,
            "argmax_equal": int((other.argmax(-1) == ref.argmax(-1)).sum()), "positions": ref.shape[0]}


def measure(label: str, llama, prompt: torch.Tensor, dtype: torch.dtype, plan: Plan, clock_name: str,
            make_int8=None) -> dict:
    """One row: float against int8 weights for one model in one dtype (module docstring). ``make_int8`` builds the
    int8 generator from the float model (default ``Int8DynamicGenerator``; tests pass others)."""
    from ..fast import DynamicGenerator
    from ..int8_weights import Int8DynamicGenerator, weight_bytes_per_step
    from ..memory import kv_bytes_per_token_dims

    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    model = llama if llama.dtype == dtype else copy.deepcopy(llama).to(dtype)
    gens = {"float": DynamicGenerator(model), "int8": (make_int8 or Int8DynamicGenerator)(model)}
    wbytes = {"float": weight_bytes_per_step(model), "int8": gens["int8"].weight_nbytes()}
    del model
    times: dict[str, list[float]] = {"float": [], "int8": []}
    tokens = {}
    for gen in gens.values():
        gen.generate(prompt, 2)  # untimed warm-up: first calls allocate the cache and load kernels
    for r in range(plan.rounds):
        for kind in ("float", "int8") if r % 2 == 0 else ("int8", "float"):
            t, out = decode_times(gens[kind], prompt, plan.steps, clock)
            times[kind] += t
            tokens.setdefault(kind, out[:, prompt.shape[1]:])  # round 1's tokens (1, steps + 1)
    same = (tokens["int8"] == tokens["float"])[0]
    ref = teacher_forced_logits(gens["float"], prompt, tokens["float"])
    err = logit_error(ref, teacher_forced_logits(gens["int8"], prompt, tokens["float"]))
    a = llama.args
    kv = kv_bytes_per_token_dims(a.num_layers, a.num_kv_heads, a.head_dim, torch.empty(0, dtype=dtype).element_size())
    kv *= prompt.shape[1] + 1 + plan.steps // 2  # the cache at the middle of the run
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    row = {"model": label, "dtype": str(dtype).removeprefix("torch."), "device": str(prompt.device),
           "ms_float": ms["float"], "ms_int8": ms["int8"], "ms_ratio": ms["int8"] / ms["float"],
           "weight_bytes_float": wbytes["float"], "weight_bytes_int8": wbytes["int8"], "kv_bytes": kv,
           "bytes_per_step_float": wbytes["float"] + kv, "bytes_per_step_int8": wbytes["int8"] + kv,
           "tokens_equal": int(same.sum()), "tokens": int(same.numel()),
           "first_diff": None if bool(same.all()) else int((~same).nonzero()[0, 0]), **err,
           "steps": plan.steps, "rounds": plan.rounds, "prompt_tokens": prompt.shape[1], "clock": clock_name,
           "threads": torch.get_num_threads()}
    row["bytes_ratio"] = row["bytes_per_step_int8"] / row["bytes_per_step_float"]
    return row


def run(plan: Plan, out_dir: Path | None, say=print) -> dict:
    """Every model x dtype of the plan, each row printed as it finishes; then the table (and the files)."""
    old_threads = torch.get_num_threads()
    if plan.device.type == "cpu":
        torch.set_num_threads(plan.threads)
    clock = "cpu" if plan.device.type == "cpu" and plan.threads == 1 else "wall"
    t0 = time.perf_counter()
    env = environment(torch.get_num_threads(), clock)
    rows, models = [], {}
    try:
        for spec in plan.models:
            label, llama, prompt, kind = load_case(spec, plan.device, plan.prompt_tokens, plan.seed)
            a = llama.args
            models[label] = {"weights": kind, "layers": a.num_layers, "hidden": a.hidden_size,
                             "vocab": a.vocab_size, "params": sum(p.numel() for p in llama.parameters())}
            for name in plan.dtypes:
                rows.append(measure(label, llama, prompt, DTYPES[name], plan, clock))
                say(row_line(rows[-1]))
            del llama
    finally:
        torch.set_num_threads(old_threads)
    env["seconds"] = round(time.perf_counter() - t0, 1)
    from .serve import _load

    env["load_average_at_end"] = _load()
    report = {"schema": "kvcourse-int8-weights/1", "environment": env, "models": models, "rows": rows,
              "plan": {"preset": plan.preset, "models": plan.models, "dtypes": plan.dtypes, "steps": plan.steps,
                       "rounds": plan.rounds, "prompt_tokens": plan.prompt_tokens, "device": str(plan.device)}}
    if out_dir is not None:  # the measurements first: a report that fails to render loses nothing
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "int8_weights.json").write_text(json.dumps(report, indent=1, default=str))
    return render(report, out_dir, say)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvcourse.bench.int8_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="bundled + a 4-layer SmolLM2-135M shape, 8 steps, 1 round")
    p.add_argument("--out", type=Path, default=Path("bench-out/int8_weights"), help="output folder")
    p.add_argument("--models", nargs="+", default=None, metavar="SPEC",
                   help="bundled, SmolLM2-135M, SmolLM2-1.7B, NAME:LAYERS (default: bundled SmolLM2-135M, and "
                        "SmolLM2-1.7B on CUDA)")
    p.add_argument("--dtypes", nargs="+", default=None, help="default: float32 bfloat16 (CPU), bfloat16 (CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per call (default 96)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds, float and int8 in turn (default 3)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="random prompt length of the shapes (default 32)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1: CPU-time clock)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """The Plan of a run: the preset's values, overridden by the options given; SystemExit naming a bad option."""
    from ..devices import pick_device
    from .plan import check_model_specs

    name = "quick" if args.quick else "full"
    pre = PRESETS[name]
    try:
        device = pick_device(args.device)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"--device: {err}") from err
    cuda = device.type == "cuda"
    models = args.models or pre["models"] + (["SmolLM2-1.7B"] if cuda and name == "full" else [])
    dtypes = args.dtypes or (["bfloat16"] if cuda else ["float32", "bfloat16"])
    plan = Plan(models=models, dtypes=dtypes, steps=args.steps if args.steps is not None else pre["steps"],
                rounds=args.rounds if args.rounds is not None else pre["rounds"],
                prompt_tokens=args.prompt_tokens if args.prompt_tokens is not None else pre["prompt_tokens"],
                device=device, threads=args.threads, seed=args.seed, preset=name)
    for label, value, low in (("--steps", plan.steps, 1), ("--rounds", plan.rounds, 1),
                              ("--prompt-tokens", plan.prompt_tokens, 1), ("--threads", plan.threads, 1)):
        if value < low:
            raise SystemExit(f"{label} must be >= {low}, got {value}")
    bad = [d for d in plan.dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"--dtypes takes {', '.join(DTYPES)}; got {', '.join(bad)}")
    check_model_specs(plan.models)
    return plan


def main(argv: list[str] | None = None) -> int:
    """0 when the run is written (tokens that differ are a measurement here, not a failure)."""
    args = parse_args(argv)
    run(make_plan(args), args.out)
    print(f"\nwritten: {args.out / 'int8_weights.json'}, {args.out / 'int8_weights.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
