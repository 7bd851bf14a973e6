"""Benchmark: greedy generation with and without a KV cache, the course's generators against ``transformers``.

    python -m kvcourse.bench            # full run (about 14 minutes on 2 CPU cores), results in bench-out/
    python -m kvcourse.bench --quick    # under a minute: bundled model + a 4-layer SmolLM2-135M shape
    python -m kvcourse.bench --help

Every method runs on the same model, prompt and number of new tokens:

- ``uncached``: ``kvcourse.generate.generate_uncached``, re-runs the whole sequence every step;
- ``course_concat``: ``kvcourse.generate.generate`` with the ``torch.cat`` cache (``ConcatKVCache``);
- ``course_kvcache``: ``kvcourse.generate.generate`` with the preallocated ``KVCache`` (the reference);
- ``course_fast``: ``kvcourse.fast.FastGenerator`` (the course's fast path);
- ``hf_no_cache`` / ``hf_dynamic`` / ``hf_static``: ``transformers`` ``generate`` with ``use_cache=False``,
  ``use_cache=True`` (its dynamic cache) and ``cache_implementation="static"``.

How it measures (the same for every method):

1. **Correctness first.** Each method generates the full sequence once; the tokens must equal those of
   ``generate(use_cache=True)`` exactly, else the run stops with ``TokenMismatchError`` naming the method,
   before any timing. In float32 only: with ``--dtype bfloat16`` the check runs on a float32 copy first.
2. **Warm-up.** That first run, and one 1-token run, are untimed. On the CPU the first run also records
   the per-step times for the plot (a clock read per token); on a GPU that needs a sync per token, so
   there it is a separate run after the timing.
3. **Repeats, interleaved.** ``--repeats`` rounds (>= 3 by default); in each round every method runs once,
   round-robin, starting one method later each round. Reported: the median, and the spread
   (max - min) / median.
4. **TTFT and decode separately, by subtraction.** Each round times a whole call with 1 new token
   (t1: prompt + first token = time to first token) and one with N new tokens (tN); decode time per
   token = (tN - t1) / (N - 1). Whole calls, nothing instrumented; the GPU is synchronised after each call.
5. **Fixed work.** ``do_sample=False``, exactly N new tokens (EOS ignored: ``min_new_tokens=N`` and
   ``eos_token_id=[]`` for ``transformers``), batch 1, fixed ``torch.set_num_threads`` (recorded).
6. **The limit.** A decode step must read every weight once and the KV cache once. The machine's copy
   bandwidth is measured in the same run (a large tensor copy, bytes read + written / time); the
   *bandwidth floor* of a model is (weight bytes read per token + KV-cache bytes at the mean
   context) / bandwidth, and each method's *fraction of the floor* is floor / its time per token.

Models: the bundled model (``load_model()``, trained) and random-weight models of the published
SmolLM2-135M and SmolLM2-1.7B shapes (``kvcourse.shapes.random_model``; 1.7B by default on a GPU only,
``--big`` on the CPU). Their linear weights are redrawn at std 1/sqrt(fan_in): with ``random_model``'s
std 0.02 init a random model repeats one token forever, and a token check could not see, for example,
a position bug. Prompts are token ids of the bundled tokenizer for every model (they are inside every
vocabulary): "The red cat was", and a fixed Shakespeare passage cut to ``--long-prompt-tokens``.

Outputs in ``--out`` (default ``bench-out/``): ``bench.json`` (every figure, raw times, environment),
``bench.md`` (the tables, also printed), ``time_per_token.png`` and ``cache_update.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import ConcatKVCache, KVCache
from .devices import pick_device, pick_dtype, synchronize
from .fast import FastGenerator
from .generate import generate, generate_uncached
from .llama import Llama
from .memory import kv_bytes_per_token

SHORT_PROMPT = "The red cat was"
# Public domain (Hamlet III.i and Sonnet 18); repeated as needed, then cut to the asked number of tokens.
LONG_TEXT = """\
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;
For who would bear the whips and scorns of time,
The oppressor's wrong, the proud man's contumely,
The pangs of despised love, the law's delay,
The insolence of office and the spurns
That patient merit of the unworthy takes,
When he himself might his quietus make
With a bare bodkin? who would fardels bear,
To grunt and sweat under a weary life,
But that the dread of something after death,
The undiscover'd country from whose bourn
No traveller returns, puzzles the will
And makes us rather bear those ills we have
Than fly to others that we know not of?
Thus conscience does make cowards of us all;
And thus the native hue of resolution
Is sicklied o'er with the pale cast of thought,
And enterprises of great pith and moment
With this regard their currents turn awry,
And lose the name of action.
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""

# name -> (label in the tables, whether it uses a KV cache)
METHODS: dict[str, tuple[str, bool]] = {
    "uncached": ("course: no cache (re-run all)", False),
    "course_concat": ("course: torch.cat cache", True),
    "course_kvcache": ("course: preallocated KVCache", True),
    "course_fast": ("course: fast path (kvcourse.fast)", True),
    "hf_no_cache": ("transformers generate(use_cache=False)", False),
    "hf_dynamic": ("transformers generate(use_cache=True)", True),
    "hf_static": ('transformers generate(cache_implementation="static")', True),
}
REFERENCE = "hf_dynamic"  # every method must reproduce its tokens; speeds are relative to it
SOURCE_SPEEDUP = 5.2  # the source material: SmolLM2-1.7B on a T4, "The red cat was", 300 new tokens


class TokenMismatchError(RuntimeError):
    """A method generated different tokens from the reference: it must not be timed against the others."""


# ---- models and prompts ---------------------------------------------------------------------------------


@dataclass
class Model:
    """A model under test; ``hf`` is a ``transformers`` ``LlamaForCausalLM``."""

    name: str
    hf: object
    note: str
    big: bool = False


def random_llama(shape: str, layers: int | None, *, seed: int = 0, device: torch.device | str = "cpu"):
    """``random_model`` of a published shape, linear weights redrawn at std 1/sqrt(fan_in) (seeded).

    LeCun-style init keeps every layer's output at unit scale, so greedy output varies from token to
    token (with the 0.02 default a random model echoes one token), and a wrong position, mask or cache
    changes the tokens. Shapes, and so every timing, are those of the published model.
    """
    from .shapes import random_model

    model = random_model(shape, device=device, num_hidden_layers=layers, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(p.shape[1])))
    return model


def parse_model_spec(spec: str) -> tuple[str, int | None]:
    """``"bundled"``, ``"SmolLM2-135M"`` or ``"SmolLM2-135M:4"`` (4 layers) -> (name, layers)."""
    name, _, layers = spec.partition(":")
    if layers:
        if not layers.isdigit() or int(layers) < 1:
            raise ValueError(f"bad model spec {spec!r}: expected NAME or NAME:LAYERS with LAYERS >= 1")
        return name, int(layers)
    return name, None


def load_models(specs: list[str], device: torch.device, seed: int):
    """Yield a Model for each spec, one at a time (so a big model can be freed before the next loads)."""
    from .models import BUNDLED_NAMES, load_model
    from .shapes import get_shape

    for spec in specs:
        name, layers = parse_model_spec(spec)
        if name in BUNDLED_NAMES:
            if layers is not None:
                raise ValueError(f"the bundled model has a fixed depth; use 'bundled', not {spec!r}")
            hf, _ = load_model(device=device)
            yield Model("bundled", hf, f"trained, kvcourse/bard, {hf.config.num_hidden_layers} layers")
        else:
            shape = get_shape(name)  # KeyError naming the known shapes
            hf = random_llama(shape.name, layers, seed=seed, device=device)
            depth = layers or shape.num_hidden_layers
            label = shape.name if layers is None else f"{shape.name} ({layers} layers)"
            yield Model(label, hf, f"random weights, published shape, {depth} layers", big="1.7B" in shape.name)


def bundled_tokenizer():
    from transformers import AutoTokenizer

    from .models import resolve_name

    return AutoTokenizer.from_pretrained(resolve_name(None), local_files_only=True)


def prompt_ids(tokenizer, kind: str, long_tokens: int) -> torch.Tensor:
    """(1, T) token ids: the short prompt, or the long text repeated and cut to ``long_tokens``."""
    if kind == "short":
        return tokenizer(SHORT_PROMPT, return_tensors="pt").input_ids
    ids = tokenizer(LONG_TEXT, return_tensors="pt").input_ids
    reps = -(-long_tokens // ids.shape[1])
    return ids.repeat(1, reps)[:, :long_tokens]


# ---- the methods ----------------------------------------------------------------------------------------


class _StepClock:
    """Wraps a kvcourse ``Llama``: notes the time after each forward call (one per generated token)."""

    def __init__(self, model: Llama, device: torch.device):
        self.model, self.device, self.ticks = model, device, []

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        synchronize(self.device)
        self.ticks.append(time.perf_counter())
        return out

    def __getattr__(self, name):  # args, parameters(), ...: as the wrapped model
        return getattr(self.model, name)


def _hf_streamer(ticks: list[float], device: torch.device):
    from transformers.generation.streamers import BaseStreamer

    class StreamClock(BaseStreamer):
        """``generate`` calls put() with the prompt, then with each new token (already on the host)."""

        def __init__(self):
            self.seen_prompt = False

        def put(self, value):
            if self.seen_prompt:
                ticks.append(time.perf_counter())
            self.seen_prompt = True

        def end(self):
            pass

    return StreamClock()


@dataclass
class Runner:
    """``run(n)`` generates n new tokens from the case's prompt; ``run(n, ticks)`` also notes per-step times."""

    name: str
    run: Callable[..., torch.Tensor]
    setup_s: float = 0.0
    notes: dict = field(default_factory=dict)


def hf_generate(hf, ids: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    """Greedy ``transformers`` generate of exactly n tokens, EOS ignored."""
    pad = hf.generation_config.pad_token_id
    if pad is None:
        pad = 0
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, eos_token_id=[], pad_token_id=pad, **kwargs)


def make_runners(hf, ids: torch.Tensor, methods: list[str], *, compile: bool = False) -> dict[str, Runner]:
    """One Runner per method for this model and prompt (the factories are in ``RUNNERS``)."""
    ctx = {"hf": hf, "ids": ids, "device": ids.device, "llama": Llama.from_hf(hf), "compile": compile}
    return {m: RUNNERS[m](ctx) for m in methods}


def _course(fn):
    def factory(ctx) -> Runner:
        llama, ids, device = ctx["llama"], ctx["ids"], ctx["device"]

        def run(n, ticks=None):
            if ticks is None:
                return fn(llama, ids, n)
            clock = _StepClock(llama, device)
            out = fn(clock, ids, n)
            ticks.extend(clock.ticks)
            return out

        return Runner("", run)

    return factory


def _fast(ctx) -> Runner:
    ids, device = ctx["ids"], ctx["device"]
    t0 = time.perf_counter()
    gen = FastGenerator(ctx["hf"], compile=ctx["compile"])
    setup = time.perf_counter() - t0
    notes = {}
    if ctx["compile"]:
        notes["compile_s"] = gen.warmup(ids.shape[0], ids.shape[1])
        notes["compiled"] = gen.compiled

    def run(n, ticks=None):
        if ticks is None:
            return gen.generate(ids, n)

        def tick(_token):
            synchronize(device)
            ticks.append(time.perf_counter())

        return gen.generate(ids, n, callback=tick)

    return Runner("", run, setup_s=setup, notes=notes)


def _hf(**kwargs):
    def factory(ctx) -> Runner:
        hf, ids, device = ctx["hf"], ctx["ids"], ctx["device"]

        def run(n, ticks=None):
            if ticks is None:
                return hf_generate(hf, ids, n, **kwargs)
            return hf_generate(hf, ids, n, streamer=_hf_streamer(ticks, device), **kwargs)

        return Runner("", run)

    return factory


RUNNERS: dict[str, Callable[[dict], Runner]] = {
    "uncached": _course(generate_uncached),
    "course_concat": _course(lambda model, ids, n: generate(model, ids, n, cache=ConcatKVCache(model.args.num_layers))),
    "course_kvcache": _course(generate),
    "course_fast": _fast,
    "hf_no_cache": _hf(use_cache=False),
    "hf_dynamic": _hf(use_cache=True),
    "hf_static": _hf(cache_implementation="static"),
}


def check_tokens(outputs: dict[str, torch.Tensor], reference: str, where: str) -> None:
    """Every output must equal the reference's, token for token; raise ``TokenMismatchError`` naming the method."""
    ref = outputs[reference].cpu()
    for name, out in outputs.items():
        out = out.cpu()
        label = METHODS.get(name, (name,))[0]
        if out.shape != ref.shape:
            raise TokenMismatchError(
                f"{name} ({label}) returned shape {tuple(out.shape)}, but {reference} returned {tuple(ref.shape)} "
                f"on {where}. Nothing was timed."
            )
        if not torch.equal(out, ref):
            b, p = (out != ref).nonzero()[0].tolist()
            raise TokenMismatchError(
                f"{name} ({label}) generated different tokens from {reference} on {where}: first at (batch, "
                f"position) ({b}, {p}), expected token {int(ref[b, p])}, got {int(out[b, p])}. Nothing was timed: "
                f"a method that computes something else cannot be compared for speed."
            )


# ---- measurements ---------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure_bandwidth(device: torch.device, mib: int, repeats: int = 5) -> dict:
    """Copy bandwidth: a ``mib`` MiB float32 tensor copied ``repeats`` times; (read + written bytes) / time."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)  # ones: the pages are really allocated
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()

    def copy():
        dst.copy_(src)

    def read():
        src.sum()

    copy(), read()  # warm-up (first touch of dst)
    copy_times = [timed(copy, device) for _ in range(repeats)]
    read_times = [timed(read, device) for _ in range(repeats)]
    return {
        "tensor_mib": mib, "repeats": repeats,
        "copy_GBps": 2 * nbytes / statistics.median(copy_times) / 1e9,
        "read_GBps": nbytes / statistics.median(read_times) / 1e9,
        "copy_times_s": copy_times, "read_times_s": read_times,
    }


def weight_bytes_per_token(hf, batch: int = 1) -> int:
    """Bytes of weights one decode step reads: every matrix and norm once, plus ``batch`` embedding rows.

    With tied embeddings the lm_head *is* the embedding matrix, read in full once.
    """
    total = 0
    for name, p in hf.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.numel() * p.element_size()
    emb = hf.get_input_embeddings().weight
    if hf.config.tie_word_embeddings:
        total += emb.numel() * emb.element_size()  # the lm_head, once
    total += batch * emb.shape[1] * emb.element_size()  # the rows looked up
    return total


def cache_update_costs(lengths: list[int], dtype: torch.dtype, device: torch.device, reps: int = 10) -> dict:
    """Seconds for one token's cache update (all layers, K and V) at each cache length, SmolLM2-135M shape.

    ``ConcatKVCache`` copies the whole cache every update (cost grows with length); ``KVCache`` writes
    one slot in place (constant).
    """
    from .shapes import get_shape

    s = get_shape("SmolLM2-135M")
    layers, kv, d = s.num_hidden_layers, s.num_key_value_heads, s.head_dim
    one = torch.randn(1, kv, 1, d, dtype=dtype, device=device)
    out = {"shape": s.name, "layers": layers, "kv_heads": kv, "head_dim": d, "lengths": lengths,
           "concat_ms": [], "prealloc_ms": [], "reps": reps}
    for length in lengths:
        past = torch.randn(1, kv, length, d, dtype=dtype, device=device)
        for key, cache in (("concat_ms", ConcatKVCache(layers)),
                           ("prealloc_ms", KVCache(layers, 1, kv, d, length + reps + 1, dtype=dtype, device=device))):
            for i in range(layers):
                cache.update(past, past, i)

            def step(cache=cache):
                for i in range(layers):
                    cache.update(one, one, i)

            step()  # warm-up (and one more token)
            times = [timed(step, device) for _ in range(reps)]
            out[key].append(statistics.median(times) * 1e3)
            del cache
        del past
        gc.collect()
    return out


@dataclass
class Plan:
    """What one run does (see ``parse_args`` for the meaning of each field)."""

    models: list[str]
    prompts: list[str]
    methods: list[str]
    new_tokens: int
    long_new_tokens: int
    big_new_tokens: int
    long_prompt_tokens: int
    repeats: int
    threads: int
    device: torch.device
    dtype: torch.dtype
    bandwidth_mib: int
    cache_lengths: list[int]
    profile: bool
    compile: bool
    seed: int
    quick: bool

    def profiles(self, prompt: str) -> bool:
        """Whether this prompt's per-step times are recorded (the first prompt only: they are for the plot)."""
        return self.profile and prompt == self.prompts[0]

    def separate_profile(self, prompt: str) -> bool:
        """Whether that takes an extra run (GPU, or reduced precision) rather than riding on the check run."""
        return self.profiles(prompt) and not (self.device.type == "cpu" and self.dtype == torch.float32)

    def n_new(self, model: Model, prompt: str) -> int:
        if model.big:
            return self.big_new_tokens
        return self.new_tokens if prompt == "short" else self.long_new_tokens


def _step_ms(t0: float, ticks: list[float]) -> list[float]:
    """Milliseconds of each generation step from the clock readings after each token."""
    return [(b - a) * 1e3 for a, b in zip([t0, *ticks[:-1]], ticks, strict=True)]


def run_case(model: Model, prompt: str, ids: torch.Tensor, n: int, plan: Plan, bar, bandwidth: dict) -> dict:
    """Check, warm up, time and profile every method on one model and prompt; return the figures."""
    hf, device = model.hf, plan.device
    where = f"{model.name}, {prompt} prompt ({ids.shape[1]} tokens), {n} new tokens"
    methods = plan.methods
    reference = REFERENCE if REFERENCE in methods else methods[0]

    def step(desc):
        bar.set_description(f"{model.name} | {prompt} | {desc}")

    # 1. correctness, in float32. This first run of each method is also its warm-up and, on the CPU, the
    #    per-step profile for the plot (a clock read per step; a GPU would need a sync per step, so it
    #    gets a separate instrumented run after the timing instead). Nothing is timed until all agree.
    profile = plan.profiles(prompt)
    profile_now = profile and not plan.separate_profile(prompt)
    first_call, outputs, steps = {}, {}, {}
    runners = make_runners(hf, ids, methods, compile=plan.compile)
    for m in methods:
        step(f"check {m}")
        ticks: list[float] = []
        t0 = time.perf_counter()
        outputs[m] = runners[m].run(n, ticks) if profile_now else runners[m].run(n)
        synchronize(device)
        first_call[m] = time.perf_counter() - t0
        if profile_now and ticks:  # a runner that takes no clock (a test's stand-in) gets no plot line
            steps[m] = _step_ms(t0, ticks)
        bar.update(1)
    check_tokens(outputs, reference, where)
    agreement = None
    if plan.dtype != torch.float32:  # time in reduced precision: rebuild, warm up, record (not enforce) agreement
        hf.to(plan.dtype)
        runners = make_runners(hf, ids, methods, compile=plan.compile)
        low = {m: runners[m].run(n) for m in methods}
        ref = low[reference].cpu()
        agreement = {m: float((o.cpu() == ref).float().mean()) for m, o in low.items()}
    for m in methods:  # warm-up of the 1-token call
        runners[m].run(1)
        bar.update(1)

    # 2. timed rounds, round-robin, the start rotating; whole calls, nothing instrumented
    t1 = {m: [] for m in methods}
    tn = {m: [] for m in methods}
    for r in range(plan.repeats):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            step(f"round {r + 1}/{plan.repeats} {m}")
            run = runners[m].run
            t1[m].append(timed(lambda run=run: run(1), device))
            tn[m].append(timed(lambda run=run: run(n), device))
            bar.update(2)

    # 3. on a GPU (or in reduced precision): a separate instrumented run for the per-step plot
    if profile and not profile_now:
        for m in methods:
            step(f"profile {m}")
            ticks = []
            t0 = time.perf_counter()
            runners[m].run(n, ticks)
            if ticks:
                steps[m] = _step_ms(t0, ticks)
            bar.update(1)

    # 4. figures
    cfg = hf.config
    wbytes = weight_bytes_per_token(hf)
    kv_tok = kv_bytes_per_token(cfg, plan.dtype)
    mean_ctx = ids.shape[1] + n / 2  # decode step j (1..N-1) attends over T + j positions
    floor_bytes = wbytes + kv_tok * mean_ctx
    floor_s = floor_bytes / (bandwidth["copy_GBps"] * 1e9)
    res = {}
    for m in methods:
        dec = [(b - a) / (n - 1) for a, b in zip(t1[m], tn[m], strict=True)]
        med = statistics.median(dec)
        res[m] = {
            "label": METHODS.get(m, (m,))[0],
            "cached": METHODS.get(m, (m, True))[1],
            "ttft_ms": statistics.median(t1[m]) * 1e3,
            "decode_ms_per_token": med * 1e3,
            "decode_tokens_per_s": 1.0 / med if med > 0 else float("inf"),
            "total_s": statistics.median(tn[m]),
            "spread_pct": (max(dec) - min(dec)) / med * 100 if len(dec) > 1 and med > 0 else None,
            "bandwidth_floor_fraction": floor_s / med if med > 0 else None,
            "first_call_s": first_call[m],
            "setup_s": runners[m].setup_s,
            **runners[m].notes,
            "t1_s": t1[m], "tN_s": tn[m], "decode_s_per_token": dec,
            "step_ms": steps.get(m),
        }
        if agreement is not None:
            res[m]["token_agreement_with_reference"] = agreement[m]
    if reference in res:
        ref_dec, ref_tot = res[reference]["decode_ms_per_token"], res[reference]["total_s"]
        for r in res.values():
            r["speed_vs_hf_cache_decode"] = ref_dec / r["decode_ms_per_token"] if r["decode_ms_per_token"] > 0 else None
            r["speed_vs_hf_cache_total"] = ref_tot / r["total_s"]
    if plan.dtype != torch.float32:
        hf.float()
    return {
        "model": model.name, "model_note": model.note, "prompt": prompt, "prompt_tokens": ids.shape[1],
        "new_tokens": n, "batch": ids.shape[0], "reference": reference,
        "params": sum(p.numel() for p in hf.parameters()),
        "floor": {"weight_bytes_per_token": wbytes, "kv_bytes_per_token": kv_tok, "mean_context": mean_ctx,
                  "bytes_per_token": floor_bytes, "ms_per_token": floor_s * 1e3},
        "methods": res,
    }


# ---- environment and output -----------------------------------------------------------------------------


def environment(plan: Plan) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
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
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if plan.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(plan.device)
    return env


def _fmt_s(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.0f} ms"


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def _prompt_label(case: dict) -> str:
    return f'"{SHORT_PROMPT}" ({case["prompt_tokens"]} tok)' if case["prompt"] == "short" else \
        f'long ({case["prompt_tokens"]} tok)'


def summary_table(cases: list[dict]) -> str:
    """With cache / without cache / speedup, per model and prompt, as in the source material (total times)."""
    lines = ["| model | prompt | new tokens | generator | with cache | without cache | speedup |",
             "|---|---|---|---|---|---|---|"]
    for c in cases:
        ms = c["methods"]
        pairs = [("transformers generate", "hf_dynamic", "hf_no_cache"),
                 ("course (fast path / uncached loop)", "course_fast", "uncached")]
        for label, with_m, without_m in pairs:
            if with_m in ms and without_m in ms:
                w, wo = ms[with_m]["total_s"], ms[without_m]["total_s"]
                lines.append(f"| {c['model']} | {_prompt_label(c)} | {c['new_tokens']} | {label} | {_fmt_s(w)} | "
                             f"{_fmt_s(wo)} | {wo / w:.1f}x |")
    return "\n".join(lines)


def full_table(cases: list[dict]) -> str:
    lines = ["| model | prompt | method | TTFT (ms) | decode (ms/token) | tokens/s | spread | of bandwidth floor "
             "| vs generate(use_cache=True) |", "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        for r in c["methods"].values():
            frac = r["bandwidth_floor_fraction"]
            lines.append(
                f"| {c['model']} | {_prompt_label(c)}, {c['new_tokens']} new | {r['label']} | {r['ttft_ms']:.1f} | "
                f"{r['decode_ms_per_token']:.2f} | {r['decode_tokens_per_s']:.0f} | "
                f"{_fmt(r['spread_pct'], '.0f', '%')} | {_fmt(None if frac is None else frac * 100, '.0f', '%')} | "
                f"{_fmt(r.get('speed_vs_hf_cache_decode'), '.2f', 'x')} |")
    return "\n".join(lines)


def targets(cases: list[dict], device: torch.device) -> list[dict]:
    """The issue's targets, measured: fast path >= generate(use_cache=True) everywhere, >= 1.5x on the
    bundled model; >= 70% of the bandwidth floor on the SmolLM2-135M shape (CPU); cached vs uncached."""
    out = []
    for c in cases:
        ms = c["methods"]
        if "course_fast" in ms and REFERENCE in ms:
            need = 1.5 if c["model"] == "bundled" else 1.0
            got = ms["course_fast"]["speed_vs_hf_cache_decode"]
            out.append({"target": f"fast path vs generate(use_cache=True), decode, {c['model']}, {c['prompt']} prompt",
                        "want": f">= {need}x", "got": f"{got:.2f}x", "met": got >= need,
                        "end_to_end": f"{ms['course_fast']['speed_vs_hf_cache_total']:.2f}x"})
        if c["model"] == "SmolLM2-135M" and "course_fast" in ms:
            frac = ms["course_fast"]["bandwidth_floor_fraction"]
            hf_frac = ms[REFERENCE]["bandwidth_floor_fraction"] if REFERENCE in ms else None
            out.append({"target": f"fast path, fraction of bandwidth floor, SmolLM2-135M, {c['prompt']} prompt",
                        "want": ">= 70%" if device.type == "cpu" else "(CPU target)",
                        "got": f"{frac * 100:.0f}% (transformers: {_fmt(hf_frac and hf_frac * 100, '.0f', '%')})",
                        "met": frac >= 0.7 if device.type == "cpu" else None})
        if c["prompt"] == "short" and c["model"].startswith("SmolLM2") and "uncached" in ms:
            for label, w, wo in (("course", "course_fast", "uncached"), ("transformers", "hf_dynamic", "hf_no_cache")):
                if w in ms and wo in ms:
                    sp = ms[wo]["total_s"] / ms[w]["total_s"]
                    out.append({"target": f"cached vs uncached ({label}), {c['model']}, short prompt, "
                                          f"{c['new_tokens']} new tokens",
                                "want": f"report (source: {SOURCE_SPEEDUP}x, SmolLM2-1.7B on a T4)",
                                "got": f"{sp:.1f}x", "met": None})
    return out


def markdown(result: dict) -> str:
    env, bw, plan = result["environment"], result["bandwidth"], result["settings"]
    where = env["gpu"] or env["cpu"]
    lines = [
        "# kvcourse benchmark",
        "",
        f"{env['date']}, {where} ({env['device']}), {env['torch_threads']} torch threads, {env['dtype']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, {'quick' if plan['quick'] else 'full'} mode, "
        f"{plan['repeats']} timed round(s) after warm-up, medians. Memory copy bandwidth {bw['copy_GBps']:.1f} GB/s "
        f"(read {bw['read_GBps']:.1f} GB/s). Load average at start: {env['load_average_at_start']}.",
        "",
        "Models: " + "; ".join(dict.fromkeys(f"{c['model']} ({c['model_note']}, {c['params'] / 1e6:.1f}M "
                                                    f"parameters)" for c in result["cases"])) + ". Prompt token ids from the bundled tokenizer.",
        "",
        "## With and without a KV cache (total time for all new tokens)",
        "",
        summary_table(result["cases"]),
        "",
        "## Every method",
        "",
        "TTFT: a 1-token call. Decode: (t(N) - t(1)) / (N - 1). Spread: (max - min) / median of decode over the "
        "rounds. Bandwidth floor: (weights + KV cache at the mean context) / copy bandwidth.",
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
    lines += ["", f"Total runtime {result['runtime_s']:.0f} s. Figures: `bench.json`; plots: "
              f"`time_per_token.png`, `cache_update.png`.", ""]
    return "\n".join(lines)


def plot_steps(cases: list[dict], path: Path) -> None:
    """Per-step decode time against sequence length, one panel per model (the prompt with per-step times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        floor = c["floor"]["ms_per_token"]
        ax.axhline(floor, color="k", ls=":", lw=1, label=f"bandwidth floor ({floor:.2g} ms)")
        ax.set_ylim(0, 1.15 * max(top, floor))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# ---- command line ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kvcourse.bench",
        description="Time greedy generation with and without a KV cache: the course's generators (uncached, "
                    "torch.cat cache, preallocated cache, fast path) against transformers generate "
                    "(use_cache=False/True, static cache), after checking they all produce the same tokens.",
        epilog="Full mode takes about 14 minutes on 2 CPU cores; --quick under a minute. "
               "Results: OUT/bench.json, OUT/bench.md, OUT/time_per_token.png, OUT/cache_update.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="bundled model + a 4-layer SmolLM2-135M shape, short prompts, few tokens, 1 round")
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
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick: 1)")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="size of the bandwidth-test tensor (default 1024: well above the CPU caches)")
    p.add_argument("--cache-lengths", type=int, nargs="+", default=None,
                   help="cache lengths for the torch.cat vs preallocated plot")
    p.add_argument("--no-profile", action="store_true", help="record no per-step times (no time_per_token plot)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the fast path's decode step (compile time reported separately)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-weight models")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device) if args.dtype else (torch.bfloat16 if device.type == "cuda"
                                                               else torch.float32)
    big = args.big if args.big is not None else device.type == "cuda"
    q = args.quick

    def pick(value, full, quick):
        return value if value is not None else (quick if q else full)

    models = args.models or (["bundled", "SmolLM2-135M:4"] if q else ["bundled", "SmolLM2-135M"])
    if big and args.models is None and not q:
        models = models + ["SmolLM2-1.7B"]
    plan = Plan(
        models=models,
        prompts=args.prompts or (["short", "long"]),
        methods=args.methods or list(METHODS),
        new_tokens=pick(args.new_tokens, 300, 16),
        long_new_tokens=pick(args.long_new_tokens, 16, 8),
        big_new_tokens=args.big_new_tokens or (args.new_tokens or 300 if device.type == "cuda" else 32),
        long_prompt_tokens=pick(args.long_prompt_tokens, 400, 64),
        repeats=pick(args.repeats, 3, 1),
        threads=args.threads or torch.get_num_threads(),
        device=device, dtype=dtype,
        bandwidth_mib=pick(args.bandwidth_mib, 1024, 256),
        cache_lengths=args.cache_lengths or ([1, 256, 1024] if q else [1, 512, 1024, 2048, 4096, 8192]),
        profile=not args.no_profile, compile=args.compile, seed=args.seed, quick=q,
    )
    for name in ("new_tokens", "long_new_tokens", "big_new_tokens"):
        if getattr(plan, name) < 2:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 2 (decode time per token needs 2 tokens)")
    if plan.repeats < 1 or plan.threads < 1 or plan.long_prompt_tokens < 1 or plan.bandwidth_mib < 1:
        raise SystemExit("--repeats, --threads, --long-prompt-tokens and --bandwidth-mib must be >= 1")
    if any(n < 1 for n in plan.cache_lengths):
        raise SystemExit("--cache-lengths must be >= 1")
    from .models import BUNDLED_NAMES
    from .shapes import get_shape

    for spec in plan.models:
        try:
            name, layers = parse_model_spec(spec)
            if name in BUNDLED_NAMES and layers is not None:
                raise ValueError(f"the bundled model has a fixed depth: use 'bundled', not {spec!r}")
            if name not in BUNDLED_NAMES:
                get_shape(name)
        except (ValueError, KeyError) as err:
            raise SystemExit(f"--models: {err.args[0]}") from err
    return plan


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
    per_model = sum(len(plan.methods) * (2 + 2 * plan.repeats + plan.separate_profile(p)) for p in plan.prompts)
    bar = tqdm(total=1 + len(plan.models) * per_model + 1, unit="run", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    bar.set_description("memory bandwidth")
    bandwidth = measure_bandwidth(plan.device, plan.bandwidth_mib)
    bar.update(1)
    cases = []
    if plan.device.type == "cuda":  # transformers compiles generate(cache_implementation="static") per cache size
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    for model in load_models(plan.models, plan.device, plan.seed):
        if plan.dtype != torch.float32:  # weights that bf16 holds exactly: checked in fp32, timed in bf16, same model
            model.hf.to(plan.dtype).float()
        for p in plan.prompts:
            ids = prompts[p].to(plan.device)
            gc.collect()
            cases.append(run_case(model, p, ids, plan.n_new(model, p), plan, bar, bandwidth))
        del model
        gc.collect()
    bar.set_description("cache update cost")
    costs = cache_update_costs(plan.cache_lengths, plan.dtype, plan.device)
    bar.update(1)
    bar.close()
    result = {
        "schema": "kvcourse-bench/1",
        "environment": env,
        "settings": {
            "quick": plan.quick, "models": plan.models, "prompts": plan.prompts, "methods": plan.methods,
            "new_tokens": plan.new_tokens, "long_new_tokens": plan.long_new_tokens,
            "big_new_tokens": plan.big_new_tokens, "long_prompt_tokens": plan.long_prompt_tokens,
            "repeats": plan.repeats, "threads": plan.threads, "compile": plan.compile, "seed": plan.seed,
            "short_prompt": SHORT_PROMPT, "prompt_ids": "bundled tokenizer (for every model)",
            "timing": "t1 = one call with 1 new token (TTFT); decode/token = (tN - t1) / (N - 1); medians over "
                      "interleaved rounds after warm-up",
            "eos": "ignored: min_new_tokens = max_new_tokens and eos_token_id=[] for transformers",
        },
        "bandwidth": bandwidth,
        "cases": cases,
        "cache_update": costs,
    }
    result["environment"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["targets"] = targets(cases, plan.device)
    result["runtime_s"] = time.perf_counter() - start
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot_steps(cases, out_dir / "time_per_token.png")
    plot_cache(costs, out_dir / "cache_update.png")
    text = markdown(result)
    (out_dir / "bench.md").write_text(text, encoding="utf-8")
    print(text)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    try:
        run(plan, args.out, progress=not args.no_progress)
    except TokenMismatchError as err:
        print(f"kvcourse.bench: token check failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
