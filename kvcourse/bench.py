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

1. **Warm-up, untimed.** A method with a cache runs at the full N new tokens (a first call at a new
   length allocates the cache, and on CUDA ``transformers`` compiles its static cache for each cache
   size, with ``mode="reduce-overhead"``: CUDA graphs, recorded on a later call than the compiling
   one, so on CUDA these run twice); a method without one runs once at min(N, 8) (nothing there is
   sized by N, and those are the slow calls).
2. **Rounds, interleaved.** ``--repeats`` rounds (3 by default, 2 with ``--quick``); in each, every
   method makes one timed call of N new tokens, round-robin, starting one method later each round.
   Reported: the median over the rounds, and the spread (max - min) / median.
3. **Correctness before any figure.** Round 1 runs ``generate(use_cache=True)`` first and compares every
   method's tokens with its tokens as soon as that method's call returns: one that differs stops the run
   with ``TokenMismatchError`` naming it, before any figure is computed or written. ``--separate-check``
   does the check in an extra, untimed run before the rounds instead (about 3 more minutes in full mode:
   the uncached loops are slow). Exact equality needs float32: with ``--dtype bfloat16`` the check runs
   in float32 first, and bf16 agreement is only recorded.
4. **TTFT and decode from the same call, a clock reading after every token.** A timed call reads the
   clock when it starts (t0, the device synchronised), after each new token (tick_1 .. tick_N) and when
   it returns (t_end, synchronised). Per round::

       TTFT             = tick_1 - t0                 prompt + first token (with the call's set-up)
       decode per token = (tick_N - tick_1) / (N - 1)  the N - 1 decode steps
       total            = t_end - t0

   Each is a difference of two readings of one monotonic clock, the later minus the earlier, in one
   call: it cannot be negative. (The earlier design took decode as (t(N) - t(1)) / (N - 1) from two
   separate calls; when load slowed the 1-token call by more than the N - 1 steps cost, it went
   negative, and tokens/s infinite.) A figure can still be zero (a clock coarser than a step) or not
   finite (a broken clock): a figure that is not a positive finite number is *missing*: ``None`` in
   ``bench.json`` with the reason under ``"missing"``, "n/a" in the tables with the reason in the notes
   column; so is every figure derived from it. Never a number. The clock: ``time.perf_counter``
   (monotonic) on the CPU, well under a microsecond a reading; on CUDA, CUDA events recorded on the stream
   after each token (in stream order, so non-decreasing too) and read after the call, so the host never
   waits for the device inside a call, as untimed; on MPS a synchronize per token, then
   ``perf_counter``. The same readings give the per-step plot.
5. **Unreliable rows.** A row is marked unreliable (``"unreliable": true`` with ``"unreliable_reasons"``
   in ``bench.json``; "unreliable: ..." in the tables' notes column, also in targets that use it) when
   - its decode or TTFT spread over the rounds is above ``SPREAD_LIMIT_PCT`` (25 %), or a round's figure
     was missing; with a single round there is no spread, and the notes say so;
   - or the machine was busy (``busy_reason``): the 1-minute load average is read at the start and end
     of the run and of each model-and-prompt case; less the benchmark's own torch threads (for readings
     taken once it is running: an estimate), it must not exceed the cores the benchmark leaves free
     plus ``LOAD_MARGIN`` (0.5). With 2 threads on 2 cores: any other job using over half a core.
6. **Fixed work.** ``do_sample=False``, exactly N new tokens (EOS ignored: ``min_new_tokens=N`` and
   ``eos_token_id=[]`` for ``transformers``), batch 1, fixed ``torch.set_num_threads`` (recorded).
7. **The limit.** A decode step must read every weight once and the KV cache once. The machine's copy
   bandwidth (a large tensor copy, bytes read + written / time) is sampled in every round, next to the
   methods; the *bandwidth floor* of a model is (weight bytes read per token + KV-cache bytes at the
   mean context) / bandwidth, and each method's *fraction of the floor* is floor / its time per token.

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


class _TickingModel:
    """Wraps a kvcourse ``Llama``: calls ``tick()`` after each forward call (one per generated token)."""

    def __init__(self, model: Llama, tick: Callable[[], None]):
        self.model, self.tick = model, tick

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.tick()
        return out

    def __getattr__(self, name):  # args, parameters(), ...: as the wrapped model
        return getattr(self.model, name)


def _hf_streamer(tick: Callable[[], None]):
    from transformers.generation.streamers import BaseStreamer

    class StreamClock(BaseStreamer):
        """``generate`` calls put() with the prompt, then with each new token (already on the host)."""

        def __init__(self):
            self.seen_prompt = False

        def put(self, value):
            if self.seen_prompt:
                tick()
            self.seen_prompt = True

        def end(self):
            pass

    return StreamClock()


@dataclass
class Runner:
    """``run(n)`` generates n new tokens from the case's prompt; ``run(n, tick)`` also calls ``tick()``
    once after each new token (the timed calls read the clock there)."""

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
        llama, ids = ctx["llama"], ctx["ids"]

        def run(n, tick=None):
            return fn(llama if tick is None else _TickingModel(llama, tick), ids, n)

        return Runner("", run)

    return factory


def _fast(ctx) -> Runner:
    ids = ctx["ids"]
    t0 = time.perf_counter()
    gen = FastGenerator(ctx["hf"], compile=ctx["compile"])
    setup = time.perf_counter() - t0
    notes = {}
    if ctx["compile"]:
        notes["compile_s"] = gen.warmup(ids.shape[0], ids.shape[1])
        notes["compiled"] = gen.compiled

    def run(n, tick=None):
        return gen.generate(ids, n, callback=None if tick is None else (lambda _token: tick()))

    return Runner("", run, setup_s=setup, notes=notes)


def _hf(**kwargs):
    def factory(ctx) -> Runner:
        hf, ids = ctx["hf"], ctx["ids"]

        def run(n, tick=None):
            if tick is None:
                return hf_generate(hf, ids, n, **kwargs)
            return hf_generate(hf, ids, n, streamer=_hf_streamer(tick), **kwargs)

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


now: Callable[[], float] = time.perf_counter  # the host clock of every timing (a test swaps in a fake one)
SPREAD_LIMIT_PCT = 25.0  # a row whose (max - min) / median over the rounds is above this is unreliable
LOAD_MARGIN = 0.5  # load (runnable processes) beyond the cores the benchmark leaves free, tolerated


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, device synchronised before and after (>= 0: one monotonic clock, read in order)."""
    synchronize(device)
    t0 = now()
    fn()
    synchronize(device)
    return now() - t0


class CallClock:
    """Clock readings of one generation call: ``start()``, ``tick()`` after each new token, ``stop()``.

    ``elapsed()`` gives the seconds from the start to each tick, and to the stop. On CUDA every reading
    is a CUDA event recorded on the device's current stream, so a tick costs no host-device sync, and
    the events complete in stream order; elsewhere ``now()`` (after a synchronize on MPS).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.events = self.device.type == "cuda"
        self.marks: list = []
        self.start_mark = self.end_mark = None

    def _mark(self):
        if self.events:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        if self.device.type != "cpu":
            synchronize(self.device)
        return now()

    def start(self) -> None:
        synchronize(self.device)
        self.marks = []
        self.start_mark = self._mark()

    def tick(self) -> None:
        self.marks.append(self._mark())

    def stop(self) -> None:
        self.end_mark = self._mark()
        synchronize(self.device)

    def _since_start(self, mark) -> float:
        if self.events:
            return self.start_mark.elapsed_time(mark) / 1e3  # ms -> s
        return mark - self.start_mark

    def elapsed(self) -> tuple[list[float], float]:
        """(seconds from the start to each tick, seconds from the start to the stop)."""
        return [self._since_start(m) for m in self.marks], self._since_start(self.end_mark)


def positive(x: float | None, what: str) -> tuple[float | None, str | None]:
    """``(x, None)`` if x is a positive finite number, else ``(None, why)``: a figure that is not is missing."""
    if x is None:
        return None, f"{what}: not measured"
    if not math.isfinite(x):
        return None, f"{what} is not finite (a broken clock)"
    if x < 0:
        return None, f"{what} came out negative (the clock went backwards)"
    if x == 0:
        return None, f"{what} came out zero (the clock did not advance)"
    return x, None


@dataclass
class CallTimes:
    """One timed call of N new tokens: seconds from its start to each new token (``ticks``), and to its return."""

    ticks: list[float]
    end: float

    def figures(self, n: int) -> dict:
        """TTFT, decode per token and total of this call (seconds), ``None`` where missing, with ``why``."""
        why: dict[str, str] = {}
        total, why["total"] = positive(self.end, "total time of the call")
        if len(self.ticks) != n:
            reason = (f"{len(self.ticks)} clock readings for {n} new tokens (the method reports no per-token "
                      f"clock)" if self.ticks else "the method reports no per-token clock")
            return {"ttft": None, "decode": None, "total": total,
                    "why": {"ttft": reason, "decode": reason, "total": why["total"]}}
        ttft, why["ttft"] = positive(self.ticks[0], "TTFT (first token - start)")
        decode, why["decode"] = positive((self.ticks[-1] - self.ticks[0]) / (n - 1),
                                         "decode per token ((token N - token 1) / (N - 1))")
        return {"ttft": ttft, "decode": decode, "total": total, "why": why}

    def step_ms(self) -> list[float] | None:
        """Milliseconds of each step (step 0: prompt + first token), or None if the readings are unusable."""
        if not self.ticks:  # a method without a per-token clock (a test's stand-in) gets no plot line
            return None
        ms = [(b - a) * 1e3 for a, b in zip([0.0, *self.ticks[:-1]], self.ticks, strict=True)]
        return ms if all(math.isfinite(x) and x >= 0 for x in ms) else None


def over_rounds(values: list[float | None], whys: list[str | None], what: str) -> dict:
    """Median and spread of one figure over the rounds; a missing round is dropped and noted.

    Returns ``value`` (median, or None), ``missing`` (why None), ``spread_pct`` ((max - min) / median
    * 100, or None), ``spread_note`` (why no spread) and ``unreliable`` (reasons).
    """
    ok = [v for v in values if v is not None]
    out = {"value": None, "missing": None, "spread_pct": None, "spread_note": None, "unreliable": []}
    if not ok:
        out["missing"] = next((w for w in whys if w), f"{what}: not measured")
        return out
    out["value"] = med = statistics.median(ok)
    if len(ok) < len(values):
        dropped = next(w for v, w in zip(values, whys, strict=True) if v is None)
        out["unreliable"].append(f"{what}: {len(values) - len(ok)} of {len(values)} rounds missing ({dropped})")
    if len(ok) < 2:
        out["spread_note"] = f"{what}: one round, no spread"
    else:
        out["spread_pct"] = spread = (max(ok) - min(ok)) / med * 100
        if spread > SPREAD_LIMIT_PCT:
            out["unreliable"].append(f"{what} spread {spread:.0f}% over {len(ok)} rounds > {SPREAD_LIMIT_PCT:.0f}%")
    return out


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the system has none."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def busy_reason(readings: list[tuple[str, list[float] | None, int]], cpus: int, threads: int) -> str | None:
    """Why the machine counts as busy, or None. ``readings``: (when, load averages, own threads then).

    Others' load = 1-minute load average - the benchmark's own threads running at that reading (0
    before it starts timing, ``threads`` after: an estimate). Busy when it exceeds the cores the
    benchmark leaves free plus ``LOAD_MARGIN``.
    """
    allowed = max(cpus - threads, 0) + LOAD_MARGIN
    known = [(when, load[0], own) for when, load, own in readings if load]
    if not known:
        return None
    when, load1, own = max(known, key=lambda r: r[1] - r[2])
    if load1 - own <= allowed:
        return None
    return (f"machine busy: 1-min load average {load1:.1f} {when}, {load1 - own:.1f} beyond the benchmark's own "
            f"{own} thread(s), limit {allowed:.1f} ({cpus} cores, {threads} timed)")


class Bandwidth:
    """Memory copy bandwidth: a ``mib`` MiB float32 tensor copied into another; (read + written bytes) / time.

    ``sample()`` is cheap (a few copies), so the benchmark takes one in every timing round: each model's
    floor then uses the bandwidth measured alongside it, not only at the start of a 10-minute run.
    A copy the clock cannot see (zero time) gives no sample rather than an infinite one.
    """

    def __init__(self, device: torch.device, mib: int):
        self.device, self.mib = device, mib
        self.src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)  # ones: pages really allocated
        self.dst = torch.empty_like(self.src)
        self.nbytes = self.src.numel() * self.src.element_size()
        self.dst.copy_(self.src)  # first touch of dst

    def _copy(self):
        self.dst.copy_(self.src)

    def _rate(self, fn, nbytes: int, repeats: int) -> list[float]:
        times = [timed(fn, self.device) for _ in range(repeats)]
        return [nbytes / t / 1e9 for t in times if positive(t, "copy time")[0] is not None]

    def sample(self, repeats: int = 3) -> list[float]:
        """GB/s of ``repeats`` copies (fewer if the clock did not advance)."""
        return self._rate(self._copy, 2 * self.nbytes, repeats)

    def measure(self, repeats: int = 5) -> dict:
        """Copy bandwidth, and read bandwidth (a sum over the tensor), medians of ``repeats`` (None if none)."""
        copy = self.sample(repeats)
        self.src.sum()
        read = self._rate(self.src.sum, self.nbytes, repeats)
        return {"tensor_mib": self.mib, "repeats": repeats,
                "copy_GBps": statistics.median(copy) if copy else None,
                "read_GBps": statistics.median(read) if read else None,
                "copy_samples_GBps": copy, "read_samples_GBps": read}


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
    separate_check: bool
    compile: bool
    seed: int
    quick: bool

    def profiles(self, prompt: str) -> bool:
        """Whether this prompt's per-step times are kept (the first prompt only: they are for the plot)."""
        return self.profile and prompt == self.prompts[0]

    def n_new(self, model: Model, prompt: str) -> int:
        if model.big:
            return self.big_new_tokens
        return self.new_tokens if prompt == "short" else self.long_new_tokens


def timed_call(run: Callable[..., torch.Tensor], n: int, device: torch.device) -> tuple[torch.Tensor, CallTimes]:
    """One call of ``run(n, tick)``, the clock read at its start, after each new token and at its return."""
    clock = CallClock(device)
    clock.start()
    out = run(n, clock.tick)
    clock.stop()
    return out, CallTimes(*clock.elapsed())


def method_figures(calls: list[CallTimes], n: int, floor_s: float | None, floor_why: str | None,
                   busy: str | None) -> dict:
    """One method's row from its timed calls: medians over the rounds, spreads, what is missing and why,
    and whether the row is unreliable (spread above ``SPREAD_LIMIT_PCT``, a missing round, a busy machine)."""
    per_round = [c.figures(n) for c in calls]
    col = {k: over_rounds([f[k] for f in per_round], [f["why"][k] for f in per_round], name)
           for k, name in (("ttft", "TTFT"), ("decode", "decode"), ("total", "total"))}
    missing: dict[str, str] = {}

    def keep(key, value, why):
        if value is not None:  # positive and finite by construction; checked again, never printed otherwise
            value, why = positive(value, key)
        if value is None:
            missing[key] = why
        return value

    ttft, dec, tot = (col[k]["value"] for k in ("ttft", "decode", "total"))
    row = {
        "ttft_ms": keep("ttft_ms", ttft and ttft * 1e3, col["ttft"]["missing"]),
        "decode_ms_per_token": keep("decode_ms_per_token", dec and dec * 1e3, col["decode"]["missing"]),
        "decode_tokens_per_s": keep("decode_tokens_per_s", dec and 1.0 / dec, f"decode time missing: "
                                                                               f"{col['decode']['missing']}"),
        "total_s": keep("total_s", tot, col["total"]["missing"]),
        "spread_pct": col["decode"]["spread_pct"],
        "ttft_spread_pct": col["ttft"]["spread_pct"],
    }
    if dec is None:
        row["bandwidth_floor_fraction"] = keep("bandwidth_floor_fraction", None,
                                               f"decode time missing: {col['decode']['missing']}")
    else:
        row["bandwidth_floor_fraction"] = keep("bandwidth_floor_fraction", floor_s and floor_s / dec, floor_why)
    for key, k in (("spread_pct", "decode"), ("ttft_spread_pct", "ttft")):
        if row[key] is None:
            missing[key] = col[k]["spread_note"] or col[k]["missing"]
    reasons = col["ttft"]["unreliable"] + col["decode"]["unreliable"]  # total = TTFT + decode: nothing new
    if busy:
        reasons.append(busy)
    row.update({
        "rounds": [{"ttft_s": f["ttft"], "decode_s_per_token": f["decode"], "total_s": f["total"]}
                   for f in per_round],
        "missing": missing, "unreliable": bool(reasons), "unreliable_reasons": reasons,
    })
    return row


def compare_to_reference(res: dict[str, dict], reference: str) -> None:
    """Add ``speed_vs_hf_cache_decode`` / ``_total`` (reference time / this time) to every row, or say why not."""
    ref = res[reference]
    for name, r in res.items():
        for key, fig in (("speed_vs_hf_cache_decode", "decode_ms_per_token"), ("speed_vs_hf_cache_total", "total_s")):
            mine, theirs = r[fig], ref[fig]
            if mine is not None and theirs is not None:
                r[key], why = positive(theirs / mine, key)
            else:
                whose = name if mine is None else reference
                r[key], why = None, f"{fig} of {whose} missing: {res[whose]['missing'].get(fig)}"
            if r[key] is None:
                r["missing"][key] = why


def run_case(model: Model, prompt: str, ids: torch.Tensor, n: int, plan: Plan, bar, bw: Bandwidth,
             own_threads_at_start: int = 0) -> dict:
    """Check, warm up and time every method on one model and prompt; return the figures."""
    hf, device = model.hf, plan.device
    where = f"{model.name}, {prompt} prompt ({ids.shape[1]} tokens), {n} new tokens"
    methods = plan.methods
    reference = REFERENCE if REFERENCE in methods else methods[0]
    load_start = load_average()

    def step(desc):
        bar.set_description(f"{model.name} | {prompt} | {desc}")

    # 1. the token check, untimed, when asked for (--separate-check) or when timing in reduced precision
    #    (then it runs in float32, before the cast); otherwise the first timed round is the check
    runners = make_runners(hf, ids, methods, compile=plan.compile)
    agreement = None
    if plan.separate_check or plan.dtype != torch.float32:
        outputs = {}
        for m in methods:
            step(f"check {m}")
            outputs[m] = runners[m].run(n)
            bar.update(1)
        check_tokens(outputs, reference, where)
    if plan.dtype != torch.float32:  # rebuild in the timing dtype; record (not enforce) token agreement
        hf.to(plan.dtype)
        runners = make_runners(hf, ids, methods, compile=plan.compile)
        low = {m: runners[m].run(n) for m in methods}
        ref = low[reference].cpu()
        agreement = {m: float((o.cpu() == ref).float().mean()) for m, o in low.items()}

    # 2. warm-up, untimed: a cached method at the full length (cache allocation, CUDA static-cache
    #    compilation), twice on CUDA (CUDA graphs are recorded on a later call than the compilation);
    #    an uncached one once, at a few tokens
    warmup_s = {}
    for m in methods:
        step(f"warm-up {m}")
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
    calls: dict[str, list[CallTimes]] = {m: [] for m in methods}
    bw_samples: list[float] = []
    first = [reference] + [m for m in methods if m != reference]
    for r in range(plan.repeats):
        order = first if r == 0 else methods[r % len(methods):] + methods[: r % len(methods)]
        outputs = {}
        for m in order:
            step(f"round {r + 1}/{plan.repeats} {m}")
            out, times = timed_call(runners[m].run, n, device)
            calls[m].append(times)
            if r == 0 and not plan.separate_check and plan.dtype == torch.float32:
                outputs[m] = out
                check_tokens(outputs, reference, where)
            bar.update(1)
        bw_samples += bw.sample()

    # 4. figures
    load_end = load_average()
    busy = busy_reason([("at the start of this case", load_start, own_threads_at_start),
                        ("at its end", load_end, plan.threads)], os.cpu_count() or 1, plan.threads)
    cfg = hf.config
    wbytes = weight_bytes_per_token(hf)
    kv_tok = kv_bytes_per_token(cfg, plan.dtype)
    mean_ctx = ids.shape[1] + n / 2  # decode step j (1..N-1) attends over T + j positions
    floor_bytes = wbytes + kv_tok * mean_ctx
    case_bw = statistics.median(bw_samples) if bw_samples else None  # GB/s, measured in this case's rounds
    floor_s = floor_bytes / (case_bw * 1e9) if case_bw else None
    floor_why = None if floor_s else "no bandwidth sample in this case's rounds (the clock did not see the copies)"
    res = {}
    for m in methods:
        res[m] = {"label": METHODS.get(m, (m,))[0], "cached": METHODS.get(m, (m, True))[1],
                  **method_figures(calls[m], n, floor_s, floor_why, busy),
                  "warmup_s": warmup_s[m], "setup_s": runners[m].setup_s, **runners[m].notes}
        steps = [c.step_ms() for c in calls[m]]
        res[m]["step_ms"] = ([statistics.median(col) for col in zip(*steps, strict=True)]
                             if plan.profiles(prompt) and steps and all(s and len(s) == n for s in steps) else None)
        if agreement is not None:
            res[m]["token_agreement_with_reference"] = agreement[m]
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
        "load_average_at_start": load_average(),
    }
    if plan.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(plan.device)
    return env


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
            frac = r.get("bandwidth_floor_fraction")
            lines.append(
                f"| {c['model']} | {_prompt_label(c)}, {c['new_tokens']} new | {r['label']} | "
                f"{_fmt(r.get('ttft_ms'), '.1f')} | {_fmt(r.get('decode_ms_per_token'), '.2f')} | "
                f"{_fmt(r.get('decode_tokens_per_s'), '.0f')} | {_fmt(r.get('spread_pct'), '.0f', '%')} | "
                f"{_fmt(frac * 100 if _ok(frac) else None, '.0f', '%')} | "
                f"{_fmt(r.get('speed_vs_hf_cache_decode'), '.2f', 'x')} | {row_notes(r)} |")
    return "\n".join(lines)


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
                                "want": f"report (source: {SOURCE_SPEEDUP}x, SmolLM2-1.7B on a T4)",
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
        f"torch {env['torch']}, transformers {env['transformers']}, {'quick' if plan['quick'] else 'full'} mode, "
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
    lines += ["", f"Total runtime {_fmt_s(result.get('runtime_s'))}. Figures: `bench.json`; plots: "
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
        floor = c["floor"].get("ms_per_token")
        if _ok(floor):
            ax.axhline(floor, color="k", ls=":", lw=1, label=f"bandwidth floor ({floor:.2g} ms)")
            top = max(top, floor)
        ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)
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
                   help="bundled model + a 4-layer SmolLM2-135M shape, short prompts, few tokens, 2 rounds")
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
        repeats=pick(args.repeats, 3, 2),
        threads=args.threads or torch.get_num_threads(),
        device=device, dtype=dtype,
        bandwidth_mib=pick(args.bandwidth_mib, 1024, 256),
        cache_lengths=args.cache_lengths or ([1, 256, 1024] if q else [1, 512, 1024, 2048, 4096, 8192]),
        profile=not args.no_profile, separate_check=args.separate_check, compile=args.compile, seed=args.seed,
        quick=q,
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
    check = plan.separate_check or plan.dtype != torch.float32
    per_model = len(plan.prompts) * len(plan.methods) * (check + 1 + plan.repeats)
    bar = tqdm(total=1 + len(plan.models) * per_model + 1, unit="run", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    bar.set_description("memory bandwidth")
    bw = Bandwidth(plan.device, plan.bandwidth_mib)
    bandwidth = bw.measure()
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
            own = plan.threads if cases else 0  # the benchmark's own threads in the load average (an estimate)
            cases.append(run_case(model, p, ids, plan.n_new(model, p), plan, bar, bw, own))
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
            "quick": plan.quick, "models": plan.models, "prompts": plan.prompts, "methods": plan.methods,
            "new_tokens": plan.new_tokens, "long_new_tokens": plan.long_new_tokens,
            "big_new_tokens": plan.big_new_tokens, "long_prompt_tokens": plan.long_prompt_tokens,
            "repeats": plan.repeats, "threads": plan.threads, "compile": plan.compile, "seed": plan.seed,
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
    env["load_average_at_end"] = load_average()
    env["busy"] = busy_reason([("at the start of the run", env["load_average_at_start"], 0),
                               ("at its end", env["load_average_at_end"], plan.threads)],
                              os.cpu_count() or 1, plan.threads)
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
