"""The methods: what the benchmark times, and the check that they all compute the same tokens.

Every method runs on the same model, prompt and number of new tokens:

- ``uncached``: ``kvcourse.generate.generate_uncached``, re-runs the whole sequence every step;
- ``course_concat``: ``kvcourse.generate.generate`` with the ``torch.cat`` cache (``ConcatKVCache``);
- ``course_kvcache``: ``kvcourse.generate.generate`` with the preallocated ``KVCache`` (the reference);
- ``course_fast``: ``kvcourse.fast.FastGenerator`` (the course's fast path, eager; ``--compile``: its
  decode step ``torch.compile``d);
- ``course_static``: ``FastGenerator(static=True)``: decode attends over the whole preallocated cache
  with a mask, so every step has the same shapes;
- ``course_graph``: ``FastGenerator(cuda_graph=True)``: static, and the decode step captured once in a
  CUDA graph and replayed. CUDA only: elsewhere the row is n/a ("CUDA graphs need a CUDA device"), never
  a static-eager time under this name;
- ``course_graph_compiled``: ``FastGenerator(cuda_graph=True, compile=True)``: the static step
  ``torch.compile``d (its norms, RoPE and SiLU fused into fewer kernels), then captured in a CUDA graph.
  CUDA only, like ``course_graph`` (compiling on a CPU takes minutes and is not what this row measures);
- ``hf_no_cache`` / ``hf_dynamic`` / ``hf_static``: ``transformers`` ``generate`` with ``use_cache=False``,
  ``use_cache=True`` (its dynamic cache) and ``cache_implementation="static"``.

Each method is a factory in ``RUNNERS``: given the case (model, prompt ids, device, new tokens), it
returns a ``Runner`` whose ``run(n, tick)`` generates n new tokens and calls ``tick()`` after each one
(the timed calls read the clock there). Set-up, compilation and graph capture happen in the factory
and are recorded in the runner's ``setup_s`` and ``notes`` (``compile_s``: the first run of the compiled
step; ``capture_s``: the CUDA graph capture alone), apart from the per-token figures; the tables print
their sum as one "compile + capture" figure.

**Correctness before any figure.** ``check_tokens`` compares every method's tokens with the
reference's (``generate(use_cache=True)``): one that differs raises ``TokenMismatchError`` naming it,
and nothing is timed or written. Exact equality needs float32: with ``--dtype bfloat16`` the check
runs in float32 first, and bf16 agreement is only recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import ConcatKVCache
from ..fast import FastGenerator
from ..generate import generate, generate_uncached
from ..llama import Llama

# name -> (label in the tables, whether it uses a KV cache)
METHODS: dict[str, tuple[str, bool]] = {
    "uncached": ("course: no cache (re-run all)", False),
    "course_concat": ("course: torch.cat cache", True),
    "course_kvcache": ("course: preallocated KVCache", True),
    "course_fast": ("course: fast path (kvcourse.fast)", True),
    "course_static": ("course: fast path, static shapes", True),
    "course_graph": ("course: fast path, static + CUDA graph", True),
    "course_graph_compiled": ("course: fast path, static + compiled + CUDA graph", True),
    "hf_no_cache": ("transformers generate(use_cache=False)", False),
    "hf_dynamic": ("transformers generate(use_cache=True)", True),
    "hf_static": ('transformers generate(cache_implementation="static")', True),
}
REFERENCE = "hf_dynamic"  # every method must reproduce its tokens; speeds are relative to it


class TokenMismatchError(RuntimeError):
    """A method generated different tokens from the reference: it must not be timed against the others."""


@dataclass
class Runner:
    """``run(n)`` generates n new tokens from the case's prompt; ``run(n, tick)`` also calls ``tick()``
    once after each new token (the timed calls read the clock there).

    ``unavailable``: why this method cannot run here (then ``run`` is never called, and every figure of
    its row is n/a with this reason).
    """

    name: str
    run: Callable[..., torch.Tensor]
    setup_s: float = 0.0
    notes: dict = field(default_factory=dict)
    unavailable: str | None = None


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


def hf_generate(hf, ids: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    """Greedy ``transformers`` generate of exactly n tokens, EOS ignored."""
    pad = hf.generation_config.pad_token_id
    if pad is None:
        pad = 0
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, eos_token_id=[], pad_token_id=pad, **kwargs)


def make_runners(hf, ids: torch.Tensor, methods: list[str], *, compile: bool = False,
                 new_tokens: int | None = None) -> dict[str, Runner]:
    """One Runner per method for this model and prompt (the factories are in ``RUNNERS``).

    ``new_tokens``: the calls' length, for the methods that size a static cache (and capture a graph)
    once, in set-up.
    """
    ctx = {"hf": hf, "ids": ids, "device": ids.device, "llama": Llama.from_hf(hf), "compile": compile,
           "new_tokens": new_tokens}
    return {m: RUNNERS[m](ctx) for m in methods}


def _course(fn: Callable[..., torch.Tensor]) -> Callable[[dict], Runner]:
    def factory(ctx: dict) -> Runner:
        llama, ids = ctx["llama"], ctx["ids"]

        def run(n, tick=None):
            return fn(llama if tick is None else _TickingModel(llama, tick), ids, n)

        return Runner("", run)

    return factory


def _fast(kind: str = "eager") -> Callable[[dict], Runner]:
    """The fast path: ``kind`` "eager" (``--compile`` compiles it), "static", "graph" or "graph_compiled"."""

    def factory(ctx: dict) -> Runner:
        ids, device = ctx["ids"], ctx["device"]
        kwargs = {}
        if kind == "static":
            kwargs = {"static": True}
        elif kind in ("graph", "graph_compiled"):
            if torch.device(device).type != "cuda":
                return Runner("", _unavailable, unavailable="CUDA graphs need a CUDA device")
            kwargs = {"cuda_graph": True, "compile": kind == "graph_compiled"}
        if kind == "eager" and ctx["compile"]:
            kwargs["compile"] = True  # --compile compiles the eager row; course_graph_compiled is its own row
        new_tokens = ctx.get("new_tokens")
        if new_tokens and kind != "eager":
            kwargs["max_seq_len"] = ids.shape[1] + new_tokens  # the static cache: one size, for every call
        t0 = time.perf_counter()
        gen = FastGenerator(ctx["hf"], **kwargs)
        setup = time.perf_counter() - t0
        notes = {}
        if kind == "eager" and ctx["compile"]:
            gen.warmup(ids.shape[0], ids.shape[1], new_tokens or 3)  # sized for the timed calls
            notes["compile_s"], notes["compiled"] = gen.compile_seconds, gen.compiled
        elif kind in ("graph", "graph_compiled"):
            # the cache at its final size first (a graph reads the buffers it was captured on), then the capture;
            # the first run of a compiled step (its compilation) is timed apart from the capture
            gen.warmup(ids.shape[0], ids.shape[1], new_tokens or 3)
            notes["capture_s"], notes["graphed"] = gen.capture_seconds, gen.cuda_graph
            if kind == "graph_compiled":
                notes["compile_s"], notes["compiled"] = gen.compile_seconds, gen.compiled

        def run(n, tick=None):
            return gen.generate(ids, n, callback=None if tick is None else (lambda _token: tick()))

        return Runner("", run, setup_s=setup, notes=notes)

    return factory


def _unavailable(n: int, tick: Callable[[], None] | None = None) -> torch.Tensor:
    raise RuntimeError("this method is unavailable here: its Runner.unavailable says why")


def _hf(**kwargs) -> Callable[[dict], Runner]:
    def factory(ctx: dict) -> Runner:
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
    "course_fast": _fast("eager"),
    "course_static": _fast("static"),
    "course_graph": _fast("graph"),
    "course_graph_compiled": _fast("graph_compiled"),
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
