"""Issue 22 section 2: every public name of the package, fed the bad inputs a learner will try.

A data-driven table, ``PROBES``: each row names the public function or method it probes, the kind of bad
input, how to build the call, and what must come of it. Every probe asserts

- EITHER the right result (when the row gives ``result``),
- OR an error raised by a ``raise`` statement in ``kvcourse`` (the traceback's last frame is in the
  package, on a ``raise`` line: not torch, sqlite, transformers, nor a dict lookup inside kvcourse), whose
  message contains the strings in ``names`` (what was expected, and what came: the bad value or shape);

AND that the failed call changed no state: the objects the row returns are snapshotted (every tensor,
list and dict reachable from them) before the call and compared after it.

``test_every_public_name_is_probed`` fails when a public function, class or method appears in a module
without a probe here, so coverage is countable: ``len(PROBES)`` rows over ``len(public_names())`` names.
Probes of behaviour owned elsewhere that is still wrong are ``xfail(strict=True)`` with what happens today;
they are listed in the report of issue 22.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import linecache
import shutil
import sqlite3
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

import kvcourse

PACKAGE = Path(kvcourse.__file__).resolve().parent
MODULES = ("batching", "window", "quant", "paged", "fast", "cache", "grading", "generate", "llama", "memory",
           "models", "shapes", "checks", "timing", "devices", "instructor", "cli", "plots", "serve",
           "speculative", "speculative.exercises", "speculative.plots", "mla",
           "int8_weights", "evict", "fewer_bytes")
V = 64  # vocab of the tiny models


# ---- tiny models, built from configs (no download) -----------------------------------------------------


@functools.cache
def hf() -> transformers.LlamaForCausalLM:
    """A tiny transformers Llama: 2 layers, 4 query heads, 2 KV heads, head_dim 8, vocab 64, fp32."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=128, initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg).eval()


@functools.cache
def llama() -> kvcourse.Llama:
    return kvcourse.Llama.from_hf(hf())


@functools.cache
def mistral() -> transformers.MistralForCausalLM:
    """A tiny transformers Mistral with a sliding window of 4."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                     max_position_embeddings=128)
    return transformers.MistralForCausalLM(cfg).eval()


@functools.cache
def gpt2() -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


@functools.cache
def fastgen():
    return mod("fast").FastGenerator(llama())


def ids(b: int = 1, t: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def kv(b: int = 1, h: int = 2, t: int = 3, d: int = 8, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 100 + t)
    return torch.randn(b, h, t, d, generator=g).to(dtype), torch.randn(b, h, t, d, generator=g).to(dtype)


def filled(cache, t: int = 3, b: int = 1):
    """The cache after one write of t tokens to every layer."""
    k, v = kv(b=b, t=t)
    for layer in range(cache.num_layers):
        cache.update(k, v, layer)
    return cache


def kvcache(cls_name: str = "KVCache", b: int = 1, cap: int = 8):
    from kvcourse import cache, quant, window

    return {"KVCache": lambda: cache.KVCache(2, b, 2, 8, cap), "StaticKVCache": lambda: cache.StaticKVCache(2, b, 2, 8, cap),
            "ConcatKVCache": lambda: cache.ConcatKVCache(2),
            "SlidingWindowCache": lambda: window.SlidingWindowCache(2, b, 2, 8, 4),
            "Int8KVCache": lambda: quant.Int8KVCache(2, b, 2, 8, cap, residual=2)}[cls_name]()


def paged(num_blocks: int = 4, block_size: int = 2, seqs=("a",), t: int = 0):
    from kvcourse.paged import PagedKVCache

    c = PagedKVCache(2, 2, 8, num_blocks=num_blocks, block_size=block_size)
    c.set_batch(list(seqs))
    if t:
        filled(c, t=t, b=len(seqs))
    return c


# ---- the probe table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One bad input to one public name.

    setup() -> (call, state): ``call()`` is the probed call; ``state`` the objects it must not change if it fails.
    names: strings the error message must contain (expected, and the bad value that came).
    result: None when only an error is right; otherwise a check of a normal return (an error is also fine).
    xfail: what happens today, for a module owned by another change (strict: an XPASS fails).
    """

    target: str
    kind: str
    setup: Callable[[], tuple[Callable[[], object], tuple]]
    names: tuple[str, ...] = ()
    result: Callable[[object], bool] | None = None
    xfail: str = ""

    @property
    def id(self) -> str:
        return f"{self.target}[{self.kind}]"


PROBES: list[Probe] = []


def probe(target: str, kind: str, setup, names=(), result=None, xfail: str = "") -> None:
    PROBES.append(Probe(target, kind, setup, tuple(names), result, xfail))


def call(fn, *a, **kw):
    """setup for a stateless call."""
    return lambda: ((lambda: fn(*a, **kw)), ())


def on(make, method: str, *a, **kw):
    """setup for ``make().method(*a, **kw)``: the object made is the state a failure must leave alone."""
    def setup():
        obj = make()
        return (lambda: getattr(obj, method)(*a, **kw)), (obj,)
    return setup


def mod(name: str):
    return importlib.import_module(f"kvcourse.{name}")


def _is(cls_path: str):
    return lambda r: type(r).__name__ == cls_path


# -- cache ----------------------------------------------------------------------------------------------
for _cls in ("KVCache", "StaticKVCache"):
    probe(f"cache.{_cls}", "float count", call(lambda c=_cls: getattr(mod("cache"), c)(2, 1, 2, 8, 8.5)),
          names=("max_seq_len", "8.5"))
    probe(f"cache.{_cls}", "negative count", call(lambda c=_cls: getattr(mod("cache"), c)(2, 1, 2, 8, -1)),
          names=("max_seq_len", "-1"))
probe("cache.KVCache", "block size 0 (capacity 0)", call(lambda: mod("cache").KVCache(2, 1, 2, 8, 0)),
      names=("max_seq_len", "0"))
probe("cache.KVCache.for_model", "transformers model", call(lambda: mod("cache").KVCache.for_model(hf(), 1, 8)),
      result=lambda c: c.keys[0].shape == (1, 2, 8, 8) and c.num_layers == 2)
probe("cache.KVCache.for_model", "float count", call(lambda: mod("cache").KVCache.for_model(llama(), 1.5, 8)),
      names=("batch_size", "1.5"))
for _cls in ("KVCache", "StaticKVCache", "ConcatKVCache", "SlidingWindowCache", "Int8KVCache"):
    _mod = {"SlidingWindowCache": "window", "Int8KVCache": "quant"}.get(_cls, "cache")
    _t = f"{_mod}.{_cls}.update"
    probe(_t, "wrong rank", on(lambda c=_cls: filled(kvcache(c)), "update", torch.randn(2, 1, 8),
                               torch.randn(2, 1, 8), 0), names=("(2, 1, 8)",))
    probe(_t, "wrong head_dim", on(lambda c=_cls: filled(kvcache(c)), "update", *kv(d=4), 0), names=("(1, 2, 3, 4)",))
    probe(_t, "wrong batch", on(lambda c=_cls: filled(kvcache(c)), "update", *kv(b=3), 0), names=("(3, 2, 3, 8)",))
    probe(_t, "dtype other than the model's", on(lambda c=_cls: filled(kvcache(c)), "update",
                                                 *kv(dtype=torch.float64), 0), names=("float64", "float32"))
    probe(_t, "float layer index", on(lambda c=_cls: filled(kvcache(c)), "update", *kv(), 1.0), names=("1.0",))
    probe(_t, "layer index out of range", on(lambda c=_cls: filled(kvcache(c)), "update", *kv(), 2),
          names=("2", "layers"))
    probe(f"{_mod}.{_cls}.get_seq_length", "layer index out of range",
          on(lambda c=_cls: filled(kvcache(c)), "get_seq_length", 5), names=("5", "layers"),
          result=None)
    probe(f"{_mod}.{_cls}.reset", "fresh cache", on(lambda c=_cls: kvcache(c), "reset"), result=lambda r: r is None)
probe("cache.KVCache.update", "batch-1 keys into a batch-3 cache", on(lambda: kvcache("KVCache", b=3), "update",
                                                                       *kv(b=1), 0), names=("(1, 2, 3, 8)",))
probe("quant.Int8KVCache.update", "batch-1 keys into a batch-3 cache (residual=0)",
      on(lambda: mod("quant").Int8KVCache(2, 3, 2, 8, 8, residual=0), "update", *kv(b=1), 0),
      names=("(1, 2, 3, 8)",))
probe("cache.CacheOverflowError", "one token past capacity", on(lambda: filled(kvcache("KVCache", cap=3)), "update",
                                                                *kv(t=1), 0), names=("max_seq_len=3", "4"))
probe("cache.KVCache.update", "zero new tokens", on(lambda: filled(kvcache("KVCache")), "update", *kv(t=0), 0),
      result=lambda r: r[0].shape == (1, 2, 3, 8))
probe("cache.KVCache.crop", "float", on(lambda: filled(kvcache("KVCache")), "crop", 1.5), names=("1.5",))
probe("cache.KVCache.crop", "negative past the length", on(lambda: filled(kvcache("KVCache")), "crop", -4),
      names=("-4", "3"))
probe("cache.ConcatKVCache.crop", "past the length", on(lambda: filled(kvcache("ConcatKVCache")), "crop", 9),
      names=("9", "3"))
probe("cache.KVCache.nbytes", "fp32 sizes", on(lambda: kvcache("KVCache"), "nbytes"),
      result=lambda n: n == 2 * 2 * 1 * 2 * 8 * 8 * 4)
probe("cache.ConcatKVCache", "zero layers", call(lambda: mod("cache").ConcatKVCache(0)), names=("num_layers", "0"))
probe("cache.StaticKVCache.lengths", "3 tokens", call(lambda: filled(kvcache("StaticKVCache")).lengths),
      result=lambda n: list(n) == [3, 3])
probe("cache.StaticKVCache.crop", "float", on(lambda: filled(kvcache("StaticKVCache")), "crop", 1.5), names=("1.5",))
probe("cache.StaticKVCache.cache_position", "negative count", on(lambda: filled(kvcache("StaticKVCache")),
                                                                 "cache_position", -2), names=("-2",))
probe("cache.StaticKVCache.cache_position", "past capacity", on(lambda: filled(kvcache("StaticKVCache")),
                                                                "cache_position", 6), names=("max_seq_len=8", "9"))
probe("cache.StaticKVCache.mask", "real of the wrong shape", on(lambda: filled(kvcache("StaticKVCache")), "mask",
                                                                torch.tensor([3]), torch.ones(1, 2, dtype=torch.bool)),
      names=("(1, 1)", "(1, 2)"))
probe("cache.StaticKVCache.mask", "slots past capacity", on(lambda: filled(kvcache("StaticKVCache")), "mask",
                                                            torch.tensor([8])), names=("8",))
probe("cache.StaticKVCache.update", "returns the whole buffer",
      on(lambda: kvcache("StaticKVCache"), "update", *kv(), 0), result=lambda r: r[0].shape == (1, 2, 8, 8))

# -- window ---------------------------------------------------------------------------------------------
probe("window.SlidingWindowCache", "window 0", call(lambda: mod("window").SlidingWindowCache(2, 1, 2, 8, 0)),
      names=("window", "0"))
probe("window.SlidingWindowCache", "float window", call(lambda: mod("window").SlidingWindowCache(2, 1, 2, 8, 2.5)),
      names=("window", "2.5"))
probe("window.SlidingWindowCache.for_model", "transformers Llama without a window",
      call(lambda: mod("window").SlidingWindowCache.for_model(hf(), 1)), names=("sliding_window",))
probe("window.SlidingWindowCache.for_model", "transformers Llama, window given",
      call(lambda: mod("window").SlidingWindowCache.for_model(hf(), 1, window=4)),
      result=lambda c: c.keys[0].shape == (1, 2, 4, 8))
probe("window.SlidingWindowCache.for_model", "negative window",
      call(lambda: mod("window").SlidingWindowCache.for_model(llama(), 1, window=-2)), names=("window", "-2"))
probe("window.SlidingWindowCache.for_model", "a ring smaller than a Mistral's sliding_window",
      call(lambda: mod("window").SlidingWindowCache.for_model(mistral(), 1, window=2)), names=("2", "4"))
probe("window.SlidingWindowCache.window_slots", "negative q_len",
      on(lambda: filled(kvcache("SlidingWindowCache")), "window_slots", -1), names=("q_len", "-1"))
probe("window.SlidingWindowCache.nbytes", "fp32 sizes", on(lambda: kvcache("SlidingWindowCache"), "nbytes"),
      result=lambda n: n == 2 * 2 * 1 * 2 * 4 * 8 * 4)

probe("window.model_window", "transformers Mistral", call(lambda: mod("window").model_window(mistral())),
      result=lambda w: w == 4)
probe("window.model_window", "transformers GPT-2 (no window)", call(lambda: mod("window").model_window(gpt2())),
      result=lambda w: w is None)
probe("window.check_window_fits", "a ring smaller than the model's window",
      call(lambda: mod("window").check_window_fits(mistral(), 2)), names=("2", "4"))
probe("window.check_window_fits", "a model without a window", call(lambda: mod("window").check_window_fits(llama(), 4)),
      names=("sliding_window",))
probe("window.check_window_cache", "a ring for a model without a window",
      call(lambda: mod("window").check_window_cache(llama(), kvcache("SlidingWindowCache"))), names=("sliding_window",))

# -- quant ----------------------------------------------------------------------------------------------
probe("quant.quantize_absmax", "empty tensor", call(lambda: mod("quant").quantize_absmax(torch.zeros(2, 0))),
      names=("(2, 0)",))
probe("quant.quantize_absmax", "dim out of range", call(lambda: mod("quant").quantize_absmax(torch.ones(2, 3), dim=4)),
      names=("dim", "4"))
probe("quant.quantize_absmax", "integer tensor",
      call(lambda: mod("quant").quantize_absmax(torch.tensor([[3, -6]]))),
      result=lambda r: r[0].tolist() == [[64, -127]] or r[0].tolist() == [[63, -127]])
probe("quant.dequantize", "scale of the wrong shape",
      call(lambda: mod("quant").dequantize(torch.ones(2, 3, dtype=torch.int8), torch.ones(3, 1))),
      names=("(2, 3)", "(3, 1)"))
probe("quant.dequantize", "float q", call(lambda: mod("quant").dequantize(torch.ones(2, 3), 2 * torch.ones(2, 1))),
      names=("int8", "float32"), result=lambda r: torch.equal(r, 2 * torch.ones(2, 3)))
probe("quant.Int8KVCache", "negative residual", call(lambda: mod("quant").Int8KVCache(2, 1, 2, 8, 8, residual=-1)),
      names=("residual", "-1"))
probe("quant.Int8KVCache", "float count", call(lambda: mod("quant").Int8KVCache(2, 1, 2, 8, 8.5)),
      names=("max_seq_len", "8.5"))
probe("quant.Int8KVCache.for_model", "transformers model",
      call(lambda: mod("quant").Int8KVCache.for_model(hf(), 1, 8)),
      result=lambda c: c.qk[0].shape == (1, 2, 8, 8))
probe("quant.Int8KVCache.update", "overflow", on(lambda: filled(kvcache("Int8KVCache", cap=3)), "update",
                                                 *kv(t=1), 0), names=("max_seq_len=3", "4"))
probe("quant.Int8KVCache.nbytes", "sizes", on(lambda: kvcache("Int8KVCache"), "nbytes"),
      result=lambda n: isinstance(n, int) and 0 < n < 2 * 2 * 1 * 2 * 8 * 8 * 4)
probe("quant.Int8KVCache.stored_nbytes", "empty cache", on(lambda: kvcache("Int8KVCache"), "stored_nbytes"),
      result=lambda n: n == 0)
probe("quant.Int8KVCache.lengths", "3 tokens", call(lambda: filled(kvcache("Int8KVCache")).lengths),
      result=lambda n: list(n) == [3, 3])

# -- paged ----------------------------------------------------------------------------------------------
probe("paged.PagedKVCache", "block size 0", call(lambda: mod("paged").PagedKVCache(2, 2, 8, num_blocks=4,
                                                                                   block_size=0)),
      names=("block_size", "0"))
probe("paged.PagedKVCache", "float num_blocks", call(lambda: mod("paged").PagedKVCache(2, 2, 8, num_blocks=2.5)),
      names=("num_blocks", "2.5"))
probe("paged.PagedKVCache.for_model", "transformers model",
      call(lambda: mod("paged").PagedKVCache.for_model(hf(), num_blocks=4)),
      result=lambda c: c.keys[0].shape == (4, 2, 16, 8))
probe("paged.UnknownSequenceError", "free of an id never added", on(lambda: paged(t=3), "free", "zz"),
      names=("'zz'",))
probe("paged.PagedKVCache.free", "id never added", on(lambda: paged(t=3), "free", "zz"), names=("'zz'",))
probe("paged.PagedKVCache.free", "freed twice", lambda: (lambda c: ((lambda: c.free("a")), (c,)))(
    (lambda c: (c.free("a"), c)[1])(paged(t=3))), names=("'a'",))
probe("paged.PagedKVCache.fork", "parent never added", on(lambda: paged(t=3), "fork", "zz", "child"),
      names=("'zz'",))
probe("paged.PagedKVCache.fork", "child already exists", on(lambda: paged(t=3, seqs=("a", "b")), "fork", "a", "b"),
      names=("'b'",))
probe("paged.PagedKVCache.add_sequence", "added twice", on(lambda: paged(t=3), "add_sequence", "a"), names=("'a'",))
probe("paged.PagedKVCache.set_batch", "the same id twice", on(lambda: paged(t=3), "set_batch", ["a", "a"]),
      names=("'a'",))
probe("paged.PagedKVCache.set_batch", "0 requests", on(lambda: paged(t=3), "set_batch", []),
      result=lambda r: r is None)
probe("paged.PagedKVCache.update", "dtype other than the model's", on(lambda: paged(t=3), "update",
                                                                      *kv(dtype=torch.float64), 0),
      names=("float64", "float32"))
probe("paged.PagedKVCache.update", "wrong head_dim", on(lambda: paged(t=3), "update", *kv(d=4), 0),
      names=("(1, 2, 3, 4)",))
probe("paged.PagedKVCache.update", "wrong kv heads", on(lambda: paged(t=3), "update", *kv(h=3), 0),
      names=("(1, 3, 3, 8)",))
probe("paged.PagedKVCache.update", "wrong batch", on(lambda: paged(t=3), "update", *kv(b=2), 0),
      names=("2", "1"))
probe("paged.PagedKVCache.update", "pool runs out on the second row",
      on(lambda: paged(num_blocks=3, block_size=2, seqs=("a", "b"), t=2), "update", *kv(b=2, t=2), 0),
      names=("blocks",))
probe("paged.PagedKVCache.get_seq_length", "after reset", on(lambda: (lambda c: (c.reset(), c)[1])(paged(t=3)),
                                                             "get_seq_length"), result=lambda n: n == 0)
probe("paged.PagedKVCache.blocks_in_use", "3 tokens in blocks of 2", on(lambda: paged(t=3), "blocks_in_use"),
      result=lambda n: n == 2)
probe("paged.PagedKVCache.reset", "fresh cache", on(lambda: paged(), "reset"), result=lambda r: r is None)
probe("paged.simulate_serving", "0 requests", call(lambda: mod("paged").simulate_serving(4096, 512, requests=0,
                                                                                         paged=True)),
      names=("requests", "0"))
probe("paged.simulate_serving", "block size 0", call(lambda: mod("paged").simulate_serving(4096, 512, block_size=0,
                                                                                           paged=True)),
      names=("block_size", "0"))
probe("paged.simulate_serving", "float budget", call(lambda: mod("paged").simulate_serving(4096.5, 512, requests=5,
                                                                                           paged=False)),
      names=("budget_tokens", "4096.5"))

# -- generate -------------------------------------------------------------------------------------------
probe("generate.check_generate_args", "float count", call(lambda: mod("generate").check_generate_args(ids(), 2.5)),
      names=("max_new_tokens", "2.5"))
probe("generate.check_generate_args", "empty prompt", call(lambda: mod("generate").check_generate_args(
    torch.zeros(1, 0, dtype=torch.long), 2)), names=("(1, 0)",))
probe("generate.as_llama", "a transformers GPT-2 where a Llama is expected", call(lambda: mod("generate").as_llama(gpt2())),
      names=("GPT2",))
probe("generate.as_llama", "transformers Llama", call(lambda: mod("generate").as_llama(hf())),
      result=lambda m: isinstance(m, kvcourse.Llama))
probe("generate.generate_uncached", "token id >= vocab_size",
      call(lambda: mod("generate").generate_uncached(llama(), torch.tensor([[1, V]]), 2)), names=("vocab_size", str(V)))
probe("generate.generate_uncached", "negative count",
      call(lambda: mod("generate").generate_uncached(llama(), ids(), -1)), names=("max_new_tokens", "-1"))
probe("generate.prefill", "transformers model", lambda: (lambda c: ((lambda: mod("generate").prefill(hf(), ids(), c)),
                                                                      (c,)))(kvcache("KVCache", cap=16)),
      names=("LlamaForCausalLM", "Llama.from_hf"))
probe("generate.prefill", "cache of another dtype than the model's",
      lambda: (lambda c: ((lambda: mod("generate").prefill(llama(), ids(), c)), (c,)))(
          mod("cache").KVCache(2, 1, 2, 8, 16, dtype=torch.float64)), names=("float64", "float32"))
probe("generate.prefill", "token id >= vocab_size",
      lambda: (lambda c: ((lambda: mod("generate").prefill(llama(), torch.tensor([[3, V + 5]]), c)), (c,)))(
          kvcache("KVCache", cap=16)), names=("vocab_size", str(V + 5)))
probe("generate.decode_one_token", "wrong batch for the cache",
      lambda: (lambda c: ((lambda: mod("generate").decode_one_token(llama(), ids(2, 1), c)), (c,)))(
          (lambda c: (mod("generate").prefill(llama(), ids(), c), c)[1])(kvcache("KVCache", cap=16))),
      names=("(2, 2, 1, 8)",))
probe("generate.decode_one_token", "transformers model",
      lambda: (lambda c: ((lambda: mod("generate").decode_one_token(hf(), ids(1, 1), c)), (c,)))(filled(kvcache("KVCache"))),
      names=("LlamaForCausalLM", "Llama.from_hf"))
probe("generate.decode_one_token", "token id >= vocab_size",
      lambda: (lambda c: ((lambda: mod("generate").decode_one_token(llama(), torch.tensor([[V]]), c)), (c,)))(
          filled(kvcache("KVCache"))), names=("vocab_size", str(V)))
probe("generate.generate", "empty prompt", call(lambda: mod("generate").generate(llama(), torch.zeros(1, 0, dtype=torch.long),
                                                                                 2)), names=("(1, 0)",))
probe("generate.generate", "token id >= vocab_size", call(lambda: mod("generate").generate(llama(), torch.tensor([[V]]), 2)),
      names=("vocab_size", str(V)))
probe("generate.generate", "eos_token_id from a tokenizer that has none (None) with pad None",
      call(lambda: mod("generate").generate(llama(), ids(), 3, eos_token_id=None, pad_token_id=None)),
      result=lambda r: r.shape == (1, 8))
probe("generate.generate", "eos but pad_token_id None (tokenizer without pad)",
      call(lambda: mod("generate").generate(llama(), ids(), 3, eos_token_id=2, pad_token_id=None)),
      names=("pad_token_id",))
@functools.cache
def first_new_token() -> int:
    """The first token greedy decoding gives after ids(): an EOS list holding it must stop after one token."""
    return int(mod("generate").generate_uncached(llama(), ids(), 1)[0, -1])


def eos_list() -> list[int]:
    return [V - 1 if first_new_token() != V - 1 else 0, first_new_token()]  # the hit is second, as Llama 3's eot


probe("generate.generate", "eos_token_id a list (Llama 3 Instruct)",
      call(lambda: mod("generate").generate(llama(), ids(), 4, eos_token_id=eos_list(), pad_token_id=0)),
      result=lambda r: r.shape == (1, 6))
probe("generate.generate", "a ring cache for a model without a sliding window",
      lambda: (lambda c: ((lambda: mod("generate").generate(llama(), ids(), 2, c)), (c,)))(kvcache("SlidingWindowCache")),
      names=("sliding_window",))
probe("generate.generate", "transformers GPT-2 model", call(lambda: mod("generate").generate(gpt2(), ids(), 2)),
      names=("GPT2",))
probe("generate.generate", "right-padded mask", call(lambda: mod("generate").generate(
    llama(), ids(2, 3), 2, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))), names=("pad",))

probe("generate.normalize_eos", "a list of two", call(lambda: mod("generate").normalize_eos([5, 6], vocab_size=V)),
      result=lambda r: r.tolist() == [5, 6])
probe("generate.normalize_eos", "id >= vocab_size", call(lambda: mod("generate").normalize_eos(V, vocab_size=V)),
      names=("eos_token_id", str(V)))
probe("generate.check_token_id", "pad_token_id None (tokenizer without pad)",
      call(lambda: mod("generate").check_token_id("pad_token_id", None, V)), names=("pad_token_id", "None"))
probe("generate.check_token_id", "float id", call(lambda: mod("generate").check_token_id("pad_token_id", 2.0, V)),
      names=("pad_token_id", "2.0"))
probe("generate.check_left_padded", "right-padded", call(lambda: mod("generate").check_left_padded(
    torch.tensor([[1, 1, 0]]))), names=("[0]", "left"))
probe("generate.check_left_padded", "1-D mask", call(lambda: mod("generate").check_left_padded(torch.tensor([1, 0]))),
      names=("(2,)",))

probe("generate.check_model_inputs", "token id >= vocab_size", call(lambda: mod("generate").check_model_inputs(
    llama(), torch.tensor([[V + 1]]))), names=("vocab_size", str(V + 1)))
probe("generate.check_model_inputs", "cache of another dtype than the model's",
      call(lambda: mod("generate").check_model_inputs(llama(), ids(), mod("cache").KVCache(2, 1, 2, 8, 8,
                                                                                           dtype=torch.float64))),
      names=("float64", "float32"))

# -- llama ----------------------------------------------------------------------------------------------
_x = functools.partial(torch.randn, generator=torch.Generator().manual_seed(1))
probe("llama.LlamaArgs.from_config", "a GPT-2 config", call(lambda: mod("llama").LlamaArgs.from_config(gpt2().config)),
      names=("GPT2Config",))
probe("llama.LlamaArgs", "negative heads", call(lambda: mod("llama").LlamaArgs.from_config(
    transformers.LlamaConfig(num_attention_heads=-4))), names=("num_attention_heads", "-4"))
probe("llama.RMSNorm", "zero dim", call(lambda: mod("llama").RMSNorm(0, 1e-5)), names=("dim", "0"))
probe("llama.RMSNorm.forward", "wrong hidden size", call(lambda: mod("llama").RMSNorm(8, 1e-5)(_x(2, 4))),
      names=("8", "4"))
probe("llama.rope_from_config", "a GPT-2 config (no rope)", call(lambda: mod("llama").rope_from_config(gpt2().config)),
      names=("rope",))
probe("llama.rope_cos_sin", "float positions", call(lambda: mod("llama").rope_cos_sin(
    torch.tensor([0.5, 1.5]), torch.ones(4), torch.float32)), result=lambda r: r[0].shape[-1] == 8)
probe("llama.apply_rope", "cos of another head_dim", call(lambda: mod("llama").apply_rope(
    _x(1, 2, 3, 8), torch.ones(1, 3, 4), torch.zeros(1, 3, 4))), names=("8", "4"))
probe("llama.repeat_kv", "n_rep 0", call(lambda: mod("llama").repeat_kv(_x(1, 2, 3, 8), 0)), names=("n_rep", "0"))
probe("llama.repeat_kv", "wrong rank", call(lambda: mod("llama").repeat_kv(_x(2, 3, 8), 2)), names=("(2, 3, 8)",))
probe("llama.causal_mask", "more queries than keys", call(lambda: mod("llama").causal_mask(5, 3)),
      names=("5", "3"))
probe("llama.sliding_window_mask", "window 0", call(lambda: mod("llama").sliding_window_mask(None, 2, 4, 2, 0)),
      names=("window", "0"))
probe("llama.positions_from_mask", "1-D mask", call(lambda: mod("llama").positions_from_mask(torch.tensor([0, 1, 1]))),
      names=("(3,)",), result=lambda r: r.tolist()[1:] == [0, 1])
probe("llama.padding_causal_mask", "1-D mask", call(lambda: mod("llama").padding_causal_mask(torch.ones(4), 4)),
      names=("(4,)",))
probe("llama.sdpa_attention", "k of another head_dim", call(lambda: mod("llama").sdpa_attention(
    _x(1, 2, 3, 8), _x(1, 2, 3, 4), _x(1, 2, 3, 4))), names=("(1, 2, 3, 8)", "(1, 2, 3, 4)"))
probe("llama.Attention", "args of another kind", call(lambda: mod("llama").Attention(hf().config, 0)),
      names=("LlamaArgs",))
probe("llama.Attention.forward", "wrong hidden size", call(lambda: llama().layers[0].attn(
    _x(1, 3, 16), torch.ones(1, 3, 8), torch.zeros(1, 3, 8))), names=("32", "16"))
probe("llama.MLP", "args of another kind", call(lambda: mod("llama").MLP(hf().config)), names=("LlamaArgs",))
probe("llama.MLP.forward", "wrong hidden size", call(lambda: llama().layers[0].mlp(_x(1, 3, 16))), names=("32", "16"))
probe("llama.Block", "args of another kind", call(lambda: mod("llama").Block(hf().config, 0)), names=("LlamaArgs",))
probe("llama.Block.forward", "wrong rank", call(lambda: llama().layers[0](_x(3, 32), torch.ones(1, 3, 8),
                                                                         torch.zeros(1, 3, 8))), names=("(3, 32)",))
probe("llama.Llama", "args of another kind", call(lambda: mod("llama").Llama(hf().config)), names=("LlamaArgs",))
probe("llama.Llama.from_hf", "a GPT-2 model", call(lambda: kvcourse.Llama.from_hf(gpt2())), names=("GPT2",))
probe("llama.Llama.device", "cpu model", call(lambda: llama().device), result=lambda d: d == torch.device("cpu"))
probe("llama.Llama.dtype", "fp32 model", call(lambda: llama().dtype), result=lambda d: d == torch.float32)
probe("llama.Llama.forward", "token id >= vocab_size", call(lambda: llama()(torch.tensor([[1, V]]))),
      names=("vocab_size", str(V)))
probe("llama.Llama.forward", "negative token id", call(lambda: llama()(torch.tensor([[1, -1]]))), names=("-1",))
probe("llama.Llama.forward", "float ids", call(lambda: llama()(torch.ones(1, 3))), names=("float32",))
probe("llama.Llama.forward", "1-D ids", call(lambda: llama()(torch.ones(3, dtype=torch.long))), names=("(3,)",))
probe("llama.Llama.forward", "cache of another dtype",
      lambda: (lambda c: ((lambda: llama()(ids(), c)), (c,)))(mod("cache").KVCache(2, 1, 2, 8, 16, dtype=torch.float64)),
      names=("float64",))
probe("llama.Llama.forward", "empty prompt", call(lambda: llama()(torch.zeros(1, 0, dtype=torch.long))),
      names=("(1, 0)",), result=lambda r: r.shape == (1, 0, V))
probe("llama.check_attention_mask", "wrong shape", call(lambda: mod("llama").check_attention_mask(
    torch.ones(2, 3), 2, 4)), names=("(2, 3)", "(2, 4)"))

# -- fast -----------------------------------------------------------------------------------------------
def gen(kind: str = "DynamicGenerator", **kw):
    return getattr(mod("fast"), kind)(llama(), **kw)


def static_ready():
    g = gen("StaticGenerator")
    g.setup_caches(2, 8)
    return g


probe("fast.rms_norm", "weight of another size", call(lambda: mod("fast").rms_norm(_x(2, 8), torch.ones(4), 1e-5)),
      names=("8", "4"))
probe("fast.FusedBlock", "built from a Llama block", call(lambda: fastgen().blocks[0]),
      result=lambda b: type(b).__name__ == "FusedBlock")
probe("fast.FusedBlock.from_layer", "a transformers layer where the course's is expected",
      call(lambda: mod("fast").FusedBlock.from_layer(hf().model.layers[0])), names=("LlamaDecoderLayer",))
probe("fast.FastGenerator", "a GPT-2 model", call(lambda: mod("fast").FastGenerator(gpt2())), names=("GPT2",))
probe("fast.FastGenerator", "transformers Llama", call(lambda: mod("fast").FastGenerator(hf())),
      result=lambda g: g is not None)
probe("fast.FastGenerator", "negative max_seq_len", call(lambda: mod("fast").FastGenerator(llama(), max_seq_len=-4)),
      names=("max_seq_len", "-4"))
probe("fast.FastGeneratorBase", "a GPT-2 model", call(lambda: mod("fast").FastGeneratorBase(gpt2())), names=("GPT2",))
probe("fast.FastGeneratorBase.compile_capture_seconds", "fresh generator",
      call(lambda: gen().compile_capture_seconds), result=lambda s: s == 0.0)
probe("fast.FastGeneratorBase.setup_caches", "0 requests", on(gen, "setup_caches", 0, 8), names=("batch_size", "0"))
probe("fast.FastGeneratorBase.setup_caches", "float length", on(gen, "setup_caches", 1, 8.5),
      names=("max_seq_len", "8.5"))
probe("fast.FastGeneratorBase.prefill", "token id >= vocab_size", on(gen, "prefill", torch.tensor([[2, V]])),
      names=("vocab_size", str(V)))
probe("fast.FastGeneratorBase.check_inputs", "eos with pad_token_id None (tokenizer without pad)",
      on(gen, "check_inputs", ids(), 2, None, 3, None), names=("pad_token_id", "None"))
probe("fast.FastGeneratorBase.generate", "token id >= vocab_size", on(gen, "generate", torch.tensor([[2, V]]), 2),
      names=("vocab_size", str(V)))
probe("fast.FastGeneratorBase.generate", "empty prompt", on(gen, "generate", torch.zeros(1, 0, dtype=torch.long), 2),
      names=("(1, 0)",))
probe("fast.FastGeneratorBase.generate", "float count", on(gen, "generate", ids(), 2.5), names=("2.5",))
probe("fast.FastGeneratorBase.generate", "right-padded mask", on(gen, "generate", ids(2, 3), 2,
                                                                 attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]])),
      names=("pad",))
for _g in ("DynamicGenerator", "StaticGenerator"):
    probe("fast.FastGeneratorBase.generate", f"eos_token_id a list ({_g})",
          lambda g=_g: (lambda o: ((lambda: o.generate(ids(), 4, eos_token_id=eos_list(), pad_token_id=0)), ()))(gen(g)),
          result=lambda r: r.shape == (1, 6))
probe("fast.FastGeneratorBase.generate", "right-padded mask (StaticGenerator)",
      on(lambda: gen("StaticGenerator"), "generate", ids(2, 3), 2, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]])),
      names=("pad",))
probe("fast.FastGeneratorBase.decode_one_token", "the base class has no step", on(lambda: mod("fast").FastGeneratorBase(
    llama()), "decode_one_token", ids(1, 1)), names=("decode_one_token",))
probe("fast.FastGeneratorBase.warmup", "0 requests", on(gen, "warmup", batch_size=0), names=("batch_size", "0"))
probe("fast.DynamicGenerator", "negative max_seq_len", call(lambda: gen(max_seq_len=-1)), names=("max_seq_len", "-1"))
probe("fast.DynamicGenerator.decode_one_token", "before any prefill", on(gen, "decode_one_token", ids(1, 1)),
      names=("setup_caches",))
probe("fast.StaticGenerator", "a GPT-2 model", call(lambda: mod("fast").StaticGenerator(gpt2())), names=("GPT2",))
probe("fast.StaticGenerator.setup_caches", "float length", on(lambda: gen("StaticGenerator"), "setup_caches", 1, 8.5),
      names=("max_seq_len", "8.5"))
probe("fast.StaticGenerator.prefill_row", "row out of range", on(static_ready, "prefill_row", 2, ids()),
      names=("row", "2"))
probe("fast.StaticGenerator.prefill_row", "token id >= vocab_size", on(static_ready, "prefill_row", 0,
                                                                       torch.tensor([[1, V]])),
      names=("vocab_size", str(V)))
probe("fast.StaticGenerator.decode_one_token", "wrong batch", on(static_ready, "decode_one_token", ids(3, 1)),
      names=("(3, 1)", "(2, 1)"))
probe("fast.StaticGenerator.decode_one_token", "before setup_caches", on(lambda: gen("StaticGenerator"),
                                                                         "decode_one_token", ids(1, 1)),
      names=("setup_caches",))
probe("fast.StaticState", "fields", call(lambda: mod("fast").StaticState(ids(1, 1), torch.zeros(1, dtype=torch.long),
                                                                         torch.zeros(1, dtype=torch.long),
                                                                         torch.zeros(1, 4, dtype=torch.bool))),
      result=lambda st: st.graph is None and st.lengths == [])
probe("fast.GraphedStaticGenerator", "a CPU model", call(lambda: gen("GraphedStaticGenerator")), names=("cpu", "CUDA"))
probe("fast.CudaGraphs", "plain", call(lambda: mod("fast").CudaGraphs()), result=lambda g: g is not None)
probe("fast.CudaGraphs.available", "cpu", call(lambda: mod("fast").CudaGraphs().available(torch.device("cpu"))),
      result=lambda r: r is False)
probe("fast.CudaGraphs.capture", "cpu device", call(lambda: mod("fast").CudaGraphs().capture(
    torch.device("cpu"), lambda: torch.ones(1))), names=("cpu",))
probe("fast.CudaGraphs.run_on_side_stream", "cpu device", call(lambda: mod("fast").CudaGraphs().run_on_side_stream(
    torch.device("cpu"), lambda: None)), names=("cpu",))
probe("fast.CudaGraphs.synchronize", "cpu device", call(lambda: mod("fast").CudaGraphs().synchronize(
    torch.device("cpu"))), result=lambda r: r is None)
probe("fast.fast_generate", "negative count", call(lambda: mod("fast").fast_generate(llama(), ids(), -2)),
      names=("max_new_tokens", "-2"))
probe("fast.fast_generate", "transformers Llama", call(lambda: mod("fast").fast_generate(hf(), ids(), 2)),
      result=lambda r: torch.equal(r, mod("generate").generate(llama(), ids(), 2)))

# -- batching -------------------------------------------------------------------------------------------
probe("batching.pad_prompts", "pad_token_id None (tokenizer without pad)",
      call(lambda: mod("batching").pad_prompts([[1, 2], [3]], None)), names=("pad_token_id", "None"))
probe("batching.pad_prompts", "0 requests", call(lambda: mod("batching").pad_prompts([], 0)), names=("prompt",))
probe("batching.pad_prompts", "empty prompt", call(lambda: mod("batching").pad_prompts([[1], []], 0)),
      names=("empty",))
probe("batching.transformers_mask_and_positions", "course Llama where transformers' is expected",
      call(lambda: mod("batching").transformers_mask_and_positions(llama(), ids(), torch.ones(1, 5, dtype=torch.long))),
      names=("Llama",))
probe("batching.transformers_mask_and_positions", "mask of the wrong shape",
      call(lambda: mod("batching").transformers_mask_and_positions(hf(), ids(), torch.ones(1, 4, dtype=torch.long))),
      names=("(1, 4)", "(1, 5)"))
# top_k=50: transformers 5.25.0 generation/configuration_utils.py, the global defaults GenerationConfig falls back on
probe("batching.transformers_filter", "generate(do_sample=True)'s defaults (top_k=50)",
      call(lambda: mod("batching").transformers_filter(torch.randn(1, 100, generator=torch.Generator().manual_seed(0)),
                                                       **mod("batching").GENERATE_SAMPLING_DEFAULTS)),
      result=lambda r: int(torch.isfinite(r).sum()) == 50)
probe("batching.transformers_filter", "temperature 0", call(lambda: mod("batching").transformers_filter(
    _x(1, 8), temperature=0.0)), names=("temperature", "0"))
probe("batching.transformers_filter", "negative top_k", call(lambda: mod("batching").transformers_filter(
    _x(1, 8), top_k=-1)), names=("top_k", "-1"))
probe("batching.transformers_filter", "1-D logits", call(lambda: mod("batching").transformers_filter(_x(8), top_k=2)),
      names=("(8,)",))
probe("batching.generation_mismatch", "batch differs", call(lambda: mod("batching").generation_mismatch(
    ids(1, 6), ids(2, 6), 4)), result=lambda r: isinstance(r, str) and "B = 2" in r)
probe("batching.generation_mismatch", "ref not a tensor", call(lambda: mod("batching").generation_mismatch(
    ids(1, 6), [[1, 2]], 4)), names=("list",))
probe("batching.eos_rule", "eos/pad None (tokenizer without them)", call(lambda: mod("batching").eos_rule(
    ids(1, 6), 3, None, None)), names=("eos_token_id", "None"))
probe("batching.eos_rule", "prompt_len past the tokens", call(lambda: mod("batching").eos_rule(ids(1, 6), 9, 2, 0)),
      names=("prompt_len", "9"))
probe("batching.CallTimer", "not a model", call(lambda: mod("batching").CallTimer(None)), names=("None",))
probe("batching.CallTimer.__call__", "token id >= vocab_size", on(lambda: mod("batching").CallTimer(llama()),
                                                                  "__call__", torch.tensor([[V]])),
      names=("vocab_size", str(V)))
probe("batching.CallTimer.forward", "1-D ids", on(lambda: mod("batching").CallTimer(llama()), "forward",
                                                  torch.ones(3, dtype=torch.long)), names=("(3,)",))
probe("batching.plot_padded_batch", "mask of another shape than the tokens",
      call(lambda: mod("batching").plot_padded_batch([["a", "b"]], torch.ones(1, 3))), names=("(1, 3)",))

# -- grading --------------------------------------------------------------------------------------------


def quiet(fn, *a, **kw):
    """fn(*a, **kw) with stdout and stderr captured."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **kw)


def _tmp() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="kvcourse-probe-"))


def _gradebook(path: Path, assignment: str = "ps1") -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE assignment (id TEXT, name TEXT)")
    con.execute("INSERT INTO assignment VALUES ('a1', ?)", (assignment,))
    con.commit()
    con.close()
    return path


def _files(folder: Path) -> dict:
    """State of a folder: every file's bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Folder:
    """A temporary folder as probe state: a failed call must leave its files as they were."""

    def __init__(self):
        self.path = _tmp()

    def state(self) -> dict:
        return _files(self.path)


def in_folder(fn, prep=None):
    """setup for ``fn(folder)``, after ``prep(folder)``: the folder's files are the state."""
    def setup():
        f = Folder()
        if prep:
            prep(f.path)
        return (lambda: fn(f.path)), (f,)
    return setup


probe("grading.submitted_learners", "missing folder", call(lambda: mod("grading").submitted_learners(
    Path("/nonexistent/course"), "ps1")), names=("/nonexistent/course",))
probe("grading.split", "0 jobs", call(lambda: mod("grading").split(["a", "b"], 0)), names=("jobs", "0"))
probe("grading.split", "float jobs", call(lambda: mod("grading").split(["a", "b"], 1.5)), names=("jobs", "1.5"))
probe("grading.copy_gradebook", "missing source file",
      in_folder(lambda d: mod("grading").copy_gradebook(d / "missing.db", d / "dst.db"),
                lambda d: _gradebook(d / "dst.db")),
      names=("missing.db",))
probe("grading.copy_gradebook", "empty source file",
      in_folder(lambda d: mod("grading").copy_gradebook(d / "empty.db", d / "dst.db"),
                lambda d: ((d / "empty.db").write_bytes(b""), _gradebook(d / "dst.db"))),
      names=("empty.db",))
probe("grading.merge_gradebook", "missing worker gradebook",
      in_folder(lambda d: mod("grading").merge_gradebook(d / "main.db", d / "w.db", "ps1", ["x"]),
                lambda d: _gradebook(d / "main.db")),
      names=("w.db",))
probe("grading.merge_gradebook", "missing main gradebook",
      in_folder(lambda d: mod("grading").merge_gradebook(d / "main.db", d / "w.db", "ps1", ["x"]),
                lambda d: _gradebook(d / "w.db")),
      names=("main.db",))
probe("grading.autograde_parallel", "0 jobs", in_folder(
    lambda d: mod("grading").autograde_parallel("ps1", 0, root=d, log=lambda *a: None),
    lambda d: ((d / "submitted" / "x" / "ps1" / "a.ipynb").parent.mkdir(parents=True),
               (d / "submitted" / "x" / "ps1" / "a.ipynb").write_text("{}"), _gradebook(d / "gradebook.db"))),
      names=("jobs", "0"))
probe("grading.autograde_parallel", "no submissions", in_folder(lambda d: mod("grading").autograde_parallel(
    "ps1", 1, root=d, log=lambda *a: None)), names=("submitted", "ps1"))
probe("grading.bench", "0 submissions", in_folder(lambda d: mod("grading").bench("ps1", 0, 1, d)),
      names=("submissions", "0"))
probe("grading.bench", "assignment missing from the source", in_folder(lambda d: mod("grading").bench("ps1", 2, 1, d)),
      names=("ps1",))
probe("grading.main", "no submissions: exit 2", call(lambda: quiet(mod("grading").main, ["autograde", "nope-assignment"])),
      result=lambda rc: rc == 2)

# -- memory ---------------------------------------------------------------------------------------------
probe("memory.bytes_per_element", "a dtype name, not a dtype", call(lambda: mod("memory").bytes_per_element("float32")),
      names=("torch.dtype", "'float32'"))
probe("memory.kv_bytes_per_token_dims", "float count", call(lambda: mod("memory").kv_bytes_per_token_dims(
    2.5, 2, 8, 2)), names=("num_layers", "2.5"))
probe("memory.kv_bytes_per_token_dims", "negative count", call(lambda: mod("memory").kv_bytes_per_token_dims(
    2, -2, 8, 2)), names=("num_kv_heads", "-2"))
probe("memory.kv_bytes_per_token", "a GPT-2 config (one KV head per head)",
      call(lambda: mod("memory").kv_bytes_per_token(gpt2().config, torch.float32)), result=lambda n: n == 2 * 1 * 2 * 8 * 4)
probe("memory.kv_bytes_per_token", "unknown shape name", call(lambda: mod("memory").kv_bytes_per_token("nope")),
      names=("'nope'", "SmolLM2-135M"))
probe("memory.kv_bytes_per_token", "transformers config", call(lambda: mod("memory").kv_bytes_per_token(
    hf().config, torch.float32)), result=lambda n: n == 2 * 2 * 2 * 8 * 4)
probe("memory.kv_bytes_per_token", "a transformers model where its config is expected",
      call(lambda: mod("memory").kv_bytes_per_token(hf(), torch.float32)), result=lambda n: n == 2 * 2 * 2 * 8 * 4)
probe("memory.kv_bytes_per_token", "a number where a config is expected",
      call(lambda: mod("memory").kv_bytes_per_token(30)), names=("config", "int"))
probe("memory.kv_cache_bytes", "negative seq_len", call(lambda: mod("memory").kv_cache_bytes("SmolLM2-135M", -5)),
      names=("seq_len", "-5"))
probe("memory.kv_cache_bytes", "float batch", call(lambda: mod("memory").kv_cache_bytes("SmolLM2-135M", 8, 1.5)),
      names=("batch_size", "1.5"))
probe("memory.kv_cache_bytes", "0 requests", call(lambda: mod("memory").kv_cache_bytes("SmolLM2-135M", 8, 0)),
      result=lambda n: n == 0)
probe("memory.tensor_bytes", "not tensors", call(lambda: mod("memory").tensor_bytes([1, 2])), names=("int",))
probe("memory.tensor_bytes", "no tensors", call(lambda: mod("memory").tensor_bytes([])), result=lambda n: n == 0)
probe("memory.cache_tensors", "not a cache", call(lambda: mod("memory").cache_tensors(object())), names=("object",))
probe("memory.cache_tensors", "kvcourse paged cache", call(lambda: mod("memory").cache_tensors(paged())),
      result=lambda ts: len(ts) == 4)
probe("memory.param_count", "a GPT-2 config", call(lambda: mod("memory").param_count(gpt2().config)),
      names=("GPT2Config",))
probe("memory.param_count", "transformers Llama config", call(lambda: mod("memory").param_count(hf().config)),
      result=lambda n: n == sum(p.numel() for p in hf().parameters()))
probe("memory.format_bytes", "None", call(lambda: mod("memory").format_bytes(None)), names=("None",))
probe("memory.format_bytes", "negative", call(lambda: mod("memory").format_bytes(-2048)),
      result=lambda s: s == "-2 KiB")

# -- models ---------------------------------------------------------------------------------------------
probe("models.resolve_name", "not a name", call(lambda: mod("models").resolve_name(3)), names=("int",))
probe("models.load_model", "missing folder", call(lambda: mod("models").load_model("./no/such/model", device="cpu")),
      names=("no/such/model",))
probe("models.load_model", "empty folder", in_folder(lambda d: mod("models").load_model(d, device="cpu")),
      names=("empty",))
probe("models.load_model", "empty config and weights files", in_folder(
    lambda d: mod("models").load_model(d, device="cpu"),
    lambda d: ((d / "config.json").write_text(""), (d / "model.safetensors").write_bytes(b""),
               (d / "tokenizer.json").write_text(""))), names=("config.json",))
probe("models.load_model", "a file, not a folder", in_folder(
    lambda d: mod("models").load_model(d / "model.safetensors", device="cpu"),
    lambda d: (d / "model.safetensors").write_bytes(b"")), names=("model.safetensors", "folder"))
probe("models.load_model", "integer dtype", call(lambda: mod("models").load_model(device="cpu", dtype=torch.int8)),
      names=("int8",))
probe("models.ModelNotAvailableError", "offline, not cached", call(lambda: mod("models").load_model(
    "nobody/nothing-here", device="cpu", local_files_only=True)), names=("nobody/nothing-here", "load_model()"))

# -- shapes ---------------------------------------------------------------------------------------------
probe("shapes.get_shape", "None", call(lambda: mod("shapes").get_shape(None)), names=("None", "SmolLM2-135M"))
probe("shapes.get_shape", "unknown", call(lambda: mod("shapes").get_shape("gpt-5")), names=("'gpt-5'", "Llama-3-8B"))
probe("shapes.Shape", "heads that do not divide hidden", call(lambda: mod("shapes").Shape(
    "odd", 64, 10, 20, 1, 3, 1, 128, 1e4, True)), names=("hidden_size", "10", "3"))
probe("shapes.Shape", "kv heads that do not divide heads", call(lambda: mod("shapes").Shape(
    "odd", 64, 12, 20, 1, 3, 2, 128, 1e4, True)), names=("num_key_value_heads", "2", "3"))
probe("shapes.Shape.head_dim", "SmolLM2-135M", call(lambda: mod("shapes").get_shape("SmolLM2-135M").head_dim),
      result=lambda d: d == 64)
probe("shapes.Shape.config", "an override that is no config field", call(lambda: mod("shapes").get_shape(
    "SmolLM2-135M").config(num_layers=2)), names=("num_layers", "num_hidden_layers"))
probe("shapes.random_model", "0 layers", call(lambda: mod("shapes").random_model("SmolLM2-135M", num_hidden_layers=0)),
      names=("num_hidden_layers", "0"))
probe("shapes.random_model", "float layers", call(lambda: mod("shapes").random_model("SmolLM2-135M",
                                                                                    num_hidden_layers=1.5)),
      names=("num_hidden_layers", "1.5"))
probe("shapes.random_model", "unknown shape", call(lambda: mod("shapes").random_model("nope")), names=("'nope'",))

# -- checks ---------------------------------------------------------------------------------------------
_c = functools.partial(mod, "checks")
probe("checks.expect_tensor", "None", call(lambda: _c().expect_tensor(None, "q")), names=("q", "None"))
probe("checks.expect_shape", "wrong rank", call(lambda: _c().expect_shape(torch.ones(2, 3), (2, 3, 1), "q")),
      names=("(2, 3)", "(2, 3, 1)"))
probe("checks.expect_shape", "not a tensor", call(lambda: _c().expect_shape([1, 2], (2,), "q")), names=("list",))
probe("checks.expect_dtype", "another dtype", call(lambda: _c().expect_dtype(torch.ones(2), torch.long, "ids")),
      names=("int64", "float32"))
probe("checks.expect_close", "wrong shape", call(lambda: _c().expect_close(torch.ones(2, 3), torch.ones(3, 2), "y")),
      names=("(2, 3)", "(3, 2)"))
probe("checks.expect_close", "NaN in the answer", call(lambda: _c().expect_close(torch.tensor([1.0, float("nan")]),
                                                                                 torch.ones(2), "y")),
      names=("NaN",))
probe("checks.expect_close", "None", call(lambda: _c().expect_close(None, torch.ones(2), "y")), names=("None",))
probe("checks.expect_equal_tokens", "float tokens", call(lambda: _c().expect_equal_tokens(torch.ones(1, 2),
                                                                                         torch.ones(1, 2).long(),
                                                                                         "out")),
      names=("float32",))
probe("checks.expect_equal_tokens", "wrong length", call(lambda: _c().expect_equal_tokens(
    torch.ones(1, 2).long(), torch.ones(1, 3).long(), "out")), names=("(1, 2)", "(1, 3)"))
probe("checks.expect_raises", "nothing raised", call(lambda: _c().expect_raises(lambda: None, ValueError, "f")),
      names=("ValueError",))
probe("checks.expect_raises", "another error raised", call(lambda: _c().expect_raises(
    lambda: [][1], ValueError, "f")), names=("ValueError", "IndexError"))
probe("checks.expect", "false", call(lambda: _c().expect(False, "the cache is empty")), names=("the cache is empty",))
probe("checks.passed", "prints one line", call(lambda: quiet(_c().passed, "x")), result=lambda r: r is None)
def _inside_and_after(ns: dict) -> tuple[bool, bool]:
    with _c().reference_for(ns, f=len):
        inside = ns.get("f") is len
    return inside, "f" in ns


probe("checks.reference_for", "restores a name that was missing", call(lambda: _inside_and_after({})),
      result=lambda r: r == (True, False))

# -- timing ---------------------------------------------------------------------------------------------
probe("timing.under_autograder", "plain pytest", call(lambda: mod("timing").under_autograder()),
      result=lambda r: r is False)
probe("timing.Timing", "no times", call(lambda: mod("timing").Timing()), result=lambda t: t.times == [])
for _p in ("median", "min", "max"):
    probe(f"timing.Timing.{_p}", "no times", call(lambda p=_p: getattr(mod("timing").Timing(), p)),
          names=("no times",))
probe("timing.time_it", "0 repeats", call(lambda: mod("timing").time_it(lambda: None, repeats=0)),
      names=("repeats", "0"))
probe("timing.time_it", "float repeats", call(lambda: mod("timing").time_it(lambda: None, repeats=2.5)),
      names=("repeats", "2.5"))
probe("timing.StepTimer", "unknown device", call(lambda: mod("timing").StepTimer("gpu")), names=("'gpu'",))
probe("timing.StepTimer.step", "one step", on(lambda: mod("timing").StepTimer(), "step"),
      result=lambda ctx: hasattr(ctx, "__enter__"))
probe("timing.progress", "a count where an iterable is expected", call(lambda: quiet(lambda: list(mod("timing").progress(5)))),
      names=("range", "5"))

# -- devices --------------------------------------------------------------------------------------------
probe("devices.pick_device", "unknown name", call(lambda: kvcourse.pick_device("gpu")), names=("'gpu'", "cuda"))
probe("devices.pick_device", "None", call(lambda: kvcourse.pick_device(None)), names=("NoneType",))
probe("devices.pick_dtype", "integer dtype", call(lambda: kvcourse.pick_dtype(torch.int8, torch.device("cpu"))),
      names=("int8",))
probe("devices.pick_dtype", "unknown name", call(lambda: kvcourse.pick_dtype("fp8", torch.device("cpu"))),
      names=("'fp8'", "float32"))
probe("devices.synchronize", "unknown device", call(lambda: kvcourse.synchronize("gpu")), names=("'gpu'", "cuda"))
probe("devices.synchronize", "cuda, with or without a GPU", call(lambda: kvcourse.synchronize("cuda")),
      result=lambda r: r is None)
probe("devices.synchronize", "None", call(lambda: kvcourse.synchronize(None)), names=("None",))

# -- instructor, cli, plots -----------------------------------------------------------------------------
probe("instructor.sample_submissions", "assignment missing", in_folder(lambda d: mod("instructor").sample_submissions(
    "ps9", root=d)), names=("'ps9'",))
probe("instructor.summary", "missing grades.csv", in_folder(lambda d: mod("instructor").summary(d / "grades.csv")),
      names=("grades.csv", "nbgrader export"))
probe("instructor.summary", "empty grades.csv", in_folder(lambda d: mod("instructor").summary(d / "grades.csv"),
                                                          lambda d: (d / "grades.csv").write_text("")),
      names=("grades.csv", "empty"))
probe("instructor.summary", "a csv without the score columns", in_folder(
    lambda d: mod("instructor").summary(d / "grades.csv"),
    lambda d: (d / "grades.csv").write_text("student_id,assignment\na,ps1\n")), names=("score", "max_score"))
probe("instructor.main", "summary of a missing file: exit 2", in_folder(
    lambda d: quiet(mod("instructor").main, ["summary", str(d / "grades.csv")])), result=lambda rc: rc == 2)
probe("cli.usage", "plain", call(lambda: mod("cli").usage()), result=lambda u: "bench" in u and "train" in u)
probe("cli.main", "unknown command: exit 2", call(lambda: quiet(mod("cli").main, ["benchmark"])),
      result=lambda rc: rc == 2)
probe("cli.main", "no command: exit 2", call(lambda: quiet(mod("cli").main, [])), result=lambda rc: rc == 2)
probe("plots.line_plot", "a series longer than x", call(lambda: mod("plots").line_plot(
    [1, 2], {"a": [1, 2, 3]}, xlabel="x", ylabel="y")), names=("'a'", "3", "2"))
probe("plots.markdown_table", "rows with different keys", call(lambda: mod("plots").markdown_table(
    [{"a": 1, "b": 2}, {"a": 3}])), names=("row 1", "'b'"))
probe("plots.markdown_table", "0 rows", call(lambda: mod("plots").markdown_table([])), result=lambda t: t == "")
probe("plots.show_table", "rows that are not dicts", call(lambda: quiet(mod("plots").show_table, [1, 2])),
      names=("dict", "int"))


# Public names that take no input to probe, each with the reason.
# -- serve (the engine of notebook 09) -----------------------------------------------------------------------
def engine(num_blocks: int = 8, block_size: int = 4):
    return mod("serve").Engine(hf(), num_blocks=num_blocks, block_size=block_size)


def sreq(rid: str = "r", prompt=(1, 2, 3, 4, 5), n: int = 3, **kw):
    return mod("serve").Request(rid, list(prompt), n, **kw)


def bman(num_blocks: int = 8, block_size: int = 4):
    return mod("serve").BlockManager(num_blocks, block_size)


def admitted(tokens=(1, 2, 3, 4, 5, 6, 7, 8, 9)):
    """A block manager holding one request whose tokens are all computed and named."""
    bm, r = bman(), sreq(prompt=tokens)
    bm.admit(r, [], 0)
    bm.prepare_write(r, len(tokens))
    r.num_computed_tokens = len(tokens)
    bm.register_full_blocks(r)
    return bm, r


def sched():
    return mod("serve").Scheduler(bman(), max_num_batched_tokens=16)


def ragged(t: int = 3, h: int = 4, kvh: int = 2, d: int = 8, n: int = 6, bs: int = 4):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(t, h, d, generator=g)
    kp, vp = torch.randn(n, kvh, bs, d, generator=g), torch.randn(n, kvh, bs, d, generator=g)
    tables = torch.tensor([[0, 1], [2, 3]])
    return q, kp, vp, tables, torch.tensor([0, 0, 1][:t]), torch.tensor([5, 6, 2][:t])


probe("serve.Engine", "float block_size", call(lambda: mod("serve").Engine(hf(), num_blocks=4, block_size=2.5)),
      names=("block_size", "2.5"))
probe("serve.Engine", "a GPT-2", call(lambda: mod("serve").Engine(gpt2(), num_blocks=4)), names=("GPT2",))
probe("serve.Engine.add_request", "token id >= vocab", on(engine, "add_request", request_id="v", prompt=[1, V],
                                                       max_new_tokens=2), names=("'v'", str(V), f"0..{V - 1}"))
probe("serve.Engine.add_request", "longer than the KV budget", on(engine, "add_request", request_id="big",
                                                               prompt=list(range(1, 31)), max_new_tokens=4),
      names=("'big'", "33", "32"))
probe("serve.Engine.add_request", "not a Request", on(engine, "add_request", [1, 2, 3]), names=("Request", "list"))
probe("serve.Engine.has_unfinished", "fresh engine", on(engine, "has_unfinished"), result=lambda r: r is False)
probe("serve.Engine.now", "fresh engine", on(engine, "now"), result=lambda r: isinstance(r, float) and r >= 0)
probe("serve.Engine.run", "negative arrival", on(engine, "run", [sreq()], arrivals=[-1.0]), names=("-1.0",))
probe("serve.Engine.run", "arrivals of another length", on(engine, "run", [sreq()], arrivals=[0.0, 0.0]),
      names=("1 requests", "2 arrival"))
probe("serve.Engine.step", "nothing to do", on(engine, "step"), result=lambda r: r == [])
probe("serve.EngineStats", "fresh", call(lambda: mod("serve").EngineStats()), result=lambda r: r.steps == 0)
probe("serve.EngineStats.prefix_hit_rate", "no prompt yet", call(lambda: mod("serve").EngineStats().prefix_hit_rate),
      result=lambda r: r == 0.0)
probe("serve.StepRecord", "one step", call(lambda: engine().step() or mod("serve").StepRecord(1, 0.0, 0, 0, 8, 0, 0, 0,
                                                                                             0, [], [])),
      result=lambda r: r.num_free_blocks == 8)
probe("serve.Request", "float max_new_tokens, refused by check", call(lambda: sreq(n=2.5).check(V, 64)),
      names=("'r'", "max_new_tokens", "2.5"))
probe("serve.RequestError", "a duplicate id", lambda: (lambda e: ((lambda: e.add_request(sreq())), (e,)))(
    (lambda e: (e.add_request(sreq()), e)[1])(engine())), names=("'r'", "already used"))
probe("serve.Request.check", "2-D prompt", call(lambda: mod("serve").Request("r", torch.ones(2, 3, dtype=torch.long),
                                                                             2).check(V, 64)), names=("(2, 3)",))
probe("serve.Request.check", "eos id outside the vocabulary", call(lambda: sreq(eos_token_id=V).check(V, 64)),
      names=("'r'", str(V)))
probe("serve.Request.is_prefill", "nothing computed", call(lambda: sreq().is_prefill), result=lambda r: r is True)
probe("serve.Request.max_len", "5 + 3 - 1", call(lambda: sreq().max_len), result=lambda r: r == 7)
probe("serve.Request.token_slice", "across prompt and output",
      call(lambda: (lambda r: (r.output.extend([7, 8]), r.token_slice(3, 7))[1])(sreq())),
      result=lambda r: r == [4, 5, 7, 8])
probe("serve.Request.token_slice", "negative start", on(sreq, "token_slice", -1, 2), names=("'r'", "start=-1", "<= 5"))
probe("serve.Request.num_tokens", "prompt of 5", call(lambda: sreq().num_tokens), result=lambda r: r == 5)
probe("serve.Request.tokens", "prompt then output", call(lambda: (lambda r: (r.output.append(9), r.tokens)[1])(sreq())),
      result=lambda r: r == [1, 2, 3, 4, 5, 9])
probe("serve.RequestOutput", "built by hand", call(lambda: mod("serve").RequestOutput("r", [1], [2], 0.0, 0.1, [0.1],
                                                                                      0.1, "length")),
      result=lambda r: r.ttft == 0.1)
probe("serve.RequestOutput.from_request", "never ran", call(lambda: mod("serve").RequestOutput.from_request(sreq())),
      result=lambda r: r.tokens == [] and r.ttft is None)
probe("serve.RequestOutput.inter_token_times", "one token", call(lambda: mod("serve").RequestOutput(
    "r", [1], [2], 0.0, 0.1, [0.1], 0.1, "length").inter_token_times), result=lambda r: r == [])
probe("serve.RequestOutput.ttft", "no token yet", call(lambda: mod("serve").RequestOutput(
    "r", [1], [], 0.0, None, [], None, "error").ttft), result=lambda r: r is None)
probe("serve.SamplingParams", "negative temperature", call(lambda: mod("serve").SamplingParams(temperature=-1.0)),
      names=("temperature", "-1.0"))
probe("serve.SamplingParams", "top_p 0", call(lambda: mod("serve").SamplingParams(temperature=1.0, top_p=0.0)),
      names=("top_p", "0.0"))
probe("serve.SamplingParams.greedy", "temperature 0", call(lambda: mod("serve").SamplingParams().greedy),
      result=lambda r: r is True)
probe("serve.ScheduledBatch", "empty", call(lambda: bool(mod("serve").ScheduledBatch())), result=lambda r: r is False)
probe("serve.ScheduledBatch.num_tokens", "empty", call(lambda: mod("serve").ScheduledBatch().num_tokens),
      result=lambda r: r == 0)
probe("serve.Scheduler", "max_num_seqs 0", call(lambda: mod("serve").Scheduler(bman(), 16, 0)),
      names=("max_num_seqs", "0"))
probe("serve.Scheduler.add", "not a Request", on(sched, "add", "r"), names=("Request", "str"))
probe("serve.Scheduler.add", "added twice", lambda: (lambda s, r: ((lambda: s.add(r)), (s,)))(
    *(lambda s, r: (s.add(r), (s, r))[1])(sched(), sreq())), names=("'r'", "queued already"))
probe("serve.Scheduler.finish", "a request that is not running", on(sched, "finish", sreq()),
      names=("'r'", "not running"))
probe("serve.Scheduler.has_unfinished", "fresh", on(sched, "has_unfinished"), result=lambda r: r is False)
probe("serve.Scheduler.num_new_tokens", "budget 0", on(sched, "num_new_tokens", sreq(), 0), names=("budget", "0"))
probe("serve.Scheduler.schedule", "nothing queued", on(sched, "schedule"), result=lambda r: not r and r.num_tokens == 0)
probe("serve.BlockManager", "float num_blocks", call(lambda: mod("serve").BlockManager(2.5, 4)),
      names=("num_blocks", "2.5"))
probe("serve.BlockManager.blocks_for", "negative count", on(bman, "blocks_for", -1), names=("num_tokens", "-1"))
probe("serve.BlockManager.blocks_for", "9 tokens in blocks of 4", on(bman, "blocks_for", 9), result=lambda r: r == 3)
probe("serve.BlockManager.num_free_blocks", "fresh", call(lambda: bman().num_free_blocks), result=lambda r: r == 8)
probe("serve.BlockManager.num_used_blocks", "one request of 9 tokens", call(lambda: admitted()[0].num_used_blocks),
      result=lambda r: r == 3)
probe("serve.BlockManager.match_prefix", "a float token", on(bman, "match_prefix", [1.0, 2.0]),
      names=("int token ids",))
probe("serve.BlockManager.match_prefix", "two full blocks cached",
      lambda: (lambda bm, r: ((lambda: bm.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 0])), (bm,)))(*admitted()),
      result=lambda r: len(r) == 2)
probe("serve.BlockManager.register_full_blocks", "a table from another pool",
      lambda: (lambda bm, r: ((lambda: bman(num_blocks=2).register_full_blocks(r)), (bm, r)))(*admitted()),
      names=("'r'", "2 blocks"))
probe("serve.BlockManager.can_admit", "a request that holds blocks",
      lambda: (lambda bm, r: ((lambda: bm.can_admit(r, 4)), (bm, r)))(*admitted()), names=("'r'", "already holds"))
probe("serve.BlockManager.can_admit", "0 new tokens", on(bman, "can_admit", sreq(), 0), names=("num_new_tokens", "0"))
probe("serve.BlockManager.admit", "a block that is not cached", on(bman, "admit", sreq(), [5], 4), names=("[5]",))
probe("serve.BlockManager.admit", "a hit past the cached blocks",
      lambda: (lambda bm, r: (lambda r2: ((lambda: bm.admit(r2, bm.match_prefix(r2.tokens), 9)), (bm, r2)))(
          sreq("r2", prompt=r.tokens)))(*admitted()), names=("hit", "9", "0..8"))
probe("serve.BlockManager.prepare_write", "end before the computed tokens",
      lambda: (lambda bm, r: ((lambda: bm.prepare_write(r, 3)), (bm, r)))(*admitted()), names=("'r'", "9..9", "3"))
probe("serve.BlockManager.free", "freed twice by a stale table",
      lambda: (lambda bm, r: (lambda t: (bm.free(r), setattr(r, "block_table", t),
                                         ((lambda: bm.free(r)), (bm,)))[2])(list(r.block_table)))(*admitted()),
      names=("'r'", "freed already"))
probe("serve.block_hash", "negative token id", call(lambda: mod("serve").block_hash(None, [1, -2])), names=("-2",))
probe("serve.block_hash", "a float prev_hash", call(lambda: mod("serve").block_hash(1.5, [1, 2])),
      names=("prev_hash", "1.5"))
probe("serve.prefix_lookup", "empty tokens", call(lambda: mod("serve").prefix_lookup(bman(), [])), names=("empty",))
probe("serve.prefix_lookup", "fully cached: the last token is computed",
      lambda: (lambda bm, r: ((lambda: mod("serve").prefix_lookup(bm, [1, 2, 3, 4, 5, 6, 7, 8])), (bm,)))(*admitted()),
      result=lambda r: len(r[0]) == 2 and r[1] == 7)
probe("serve.slot_mapping", "position past the table", call(lambda: mod("serve").slot_mapping(
    torch.tensor([9]), torch.tensor([[0, 1]]), torch.tensor([0]), 4)), names=("9", "0..7"))
probe("serve.slot_mapping", "position 5 in blocks of 4", call(lambda: mod("serve").slot_mapping(
    torch.tensor([5]), torch.tensor([[3, 1]]), torch.tensor([0]), 4)), result=lambda r: r.tolist() == [5])
probe("serve.write_kv", "block_size other than the pool's", lambda: (lambda q, kp, vp, *_: (
    (lambda: mod("serve").write_kv(kp, vp, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), torch.tensor([0]), 3)),
    (kp, vp)))(*ragged()), names=("3", "(6, 2, 4, 8)"))
probe("serve.paged_attention", "limit past the table", lambda: (lambda q, kp, vp, tb, si, lim: (
    (lambda: mod("serve").paged_attention(q, kp, vp, tb, si, torch.tensor([5, 9, 2]), 0.35)), (kp, vp)))(*ragged()),
      names=("9", "8"))
probe("serve.paged_attention", "heads not a multiple of the KV heads", lambda: (lambda q, kp, vp, tb, si, lim: (
    (lambda: mod("serve").paged_attention(q[:, :3], kp, vp, tb, si, lim, 0.35)), (kp, vp)))(*ragged()),
      names=("H=3", "KV=2"))
probe("serve.gather_attention", "limit 0", lambda: (lambda q, kp, vp, tb, si, lim: (
    (lambda: mod("serve").gather_attention(q, kp, vp, tb, si, torch.tensor([0, 6, 2]), 0.35)), (kp, vp)))(*ragged()),
      names=(">= 1", "0"))
probe("serve.attention_bytes", "negative context", call(lambda: mod("serve").attention_bytes([4, -1], 2, 8,
                                                                                          torch.float32, 4)),
      names=("-1",))


# -- more rows, one file a topic: tests/probes_<topic>.py, each with ``register(t)`` where ``t`` is this module
# (its ``probe``, ``call``, ``on``, ``mod`` and model builders). Several changes can add rows without editing here.
for _extra in sorted(Path(__file__).parent.glob("probes_*.py")):
    importlib.import_module(_extra.stem).register(sys.modules[__name__])


EXEMPT = {
    "models.BUNDLED_MODEL": "a Path constant",
    "shapes.SHAPES": "a dict constant (get_shape is its checked lookup)",
}

# Probes of behaviour owned by another change that is still wrong: probe id -> what happens today.
XFAIL: dict[str, str] = {
}


# ---- the runner ----------------------------------------------------------------------------------------


# Attributes a failed call may change without changing what the object holds.
NOT_STATE = {"_version": "PagedKVCache's invalidation counter for its cached slot indices: a bump costs a cache miss"}


def snapshot(obj, seen=None):
    """Everything a call could change: tensors (cloned), lists, dicts, and the attributes of kvcourse objects."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.dtype, tuple(obj.shape), obj.detach().clone())
    if isinstance(obj, Folder):
        return obj.state()
    if isinstance(obj, torch.nn.Module):
        return "module"  # the probes never hand a model to a call that may write it
    if id(obj) in seen:
        return "seen"
    if isinstance(obj, list | tuple):
        seen.add(id(obj))
        return [snapshot(x, seen) for x in obj]
    if isinstance(obj, dict):
        seen.add(id(obj))
        return {k: snapshot(v, seen) for k, v in obj.items()}
    if type(obj).__module__.startswith("kvcourse") and hasattr(obj, "__dict__"):
        seen.add(id(obj))
        return {k: snapshot(v, seen) for k, v in vars(obj).items() if not callable(v) and k not in NOT_STATE}
    return obj if isinstance(obj, int | float | str | bool | type(None) | torch.dtype | torch.device) else repr(obj)


def same(a, b) -> bool:
    if isinstance(a, tuple) and a and a[0] == "tensor":
        return (isinstance(b, tuple) and b[:3] == a[:3] and torch.equal(a[3], b[3]))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def raised_by_kvcourse(err: BaseException) -> str | None:
    """None if ``err`` comes from a ``raise`` statement in kvcourse; else where it comes from."""
    frames = traceback.extract_tb(err.__traceback__)
    last = frames[-1]
    path = Path(last.filename).resolve()
    if PACKAGE not in path.parents:
        return f"raised in {last.filename}:{last.lineno} ({last.name})"
    line = linecache.getline(last.filename, last.lineno).strip()
    if not line.startswith("raise"):
        return f"raised by Python inside kvcourse, {path.name}:{last.lineno}: {line}"
    return None


def outcome(p: Probe) -> str | None:
    """None if the probe holds; else what went wrong, in words."""
    torch.manual_seed(0)
    fn, state = p.setup()
    try:
        return _judge(p, fn, state)
    finally:
        for s in state:
            if isinstance(s, Folder):
                shutil.rmtree(s.path, ignore_errors=True)


def _judge(p: Probe, fn, state) -> str | None:
    before = [snapshot(s) for s in state]
    try:
        got = fn()
    except Exception as err:  # noqa: BLE001 - judged below
        msg = f"{type(err).__name__}: {err}"
        where = raised_by_kvcourse(err)
        if where:
            return f"raw error, {where}: {msg[:300]}"
        missing = [n for n in p.names if n not in str(err)]
        if missing:
            return f"the message lacks {missing}: {msg[:300]}"
        after = [snapshot(s) for s in state]
        if not all(same(a, b) for a, b in zip(before, after, strict=True)):
            return f"the failed call changed the state: {msg[:200]}"
        return None
    if p.result is None:
        return f"no error: returned {repr(got)[:200]}"
    if not p.result(got):
        return f"wrong result: {repr(got)[:300]}"
    return None


def _param(p: Probe):
    reason = XFAIL.get(p.id)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(p, id=p.id, marks=marks)


@pytest.mark.parametrize("p", [_param(p) for p in PROBES])
def test_probe(p: Probe):
    problem = outcome(p)
    assert problem is None, f"{p.id}: {problem}"


# ---- coverage ------------------------------------------------------------------------------------------


def public_names() -> set[str]:
    """``module.name`` and ``module.Class.method`` for every public function, class and method of MODULES,
    and ``module.NAME`` for the constants of ``kvcourse.__all__``."""
    out = set()
    for m in MODULES:
        module = mod(m)
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for n in names:
            obj = getattr(module, n)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                if n in kvcourse.__all__ and n in vars(module) and getattr(kvcourse, n) is obj:
                    out.add(f"{m}.{n}")
                continue
            if not (obj.__module__ == module.__name__ or obj.__module__.startswith(module.__name__ + ".")):
                continue  # imported from elsewhere
            out.add(f"{m}.{n}")
            if inspect.isclass(obj) and not issubclass(obj, BaseException):
                for attr, val in vars(obj).items():
                    if attr.startswith("_") and attr != "__call__":
                        continue
                    if isinstance(val, staticmethod | classmethod | property) or inspect.isfunction(val):
                        out.add(f"{m}.{n}.{attr}")
    return out


def test_every_public_name_is_probed():
    probed = {p.target for p in PROBES}
    missing = sorted(public_names() - probed - set(EXEMPT))
    assert not missing, f"public names without a probe in tests/test_probes.py: {missing}"


def test_the_table_names_only_public_names():
    stale = sorted(({p.target for p in PROBES} | set(EXEMPT)) - public_names())
    assert not stale, f"probes of names that are not public (renamed or removed?): {stale}"


def test_every_name_of_kvcourse_all_is_in_a_probed_module():
    homes = {n.split(".")[1] for n in public_names()}
    assert not set(kvcourse.__all__) - homes, set(kvcourse.__all__) - homes


def test_xfails_name_existing_probes():
    ids = {p.id for p in PROBES}
    assert set(XFAIL) <= ids, sorted(set(XFAIL) - ids)
