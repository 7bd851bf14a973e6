"""Probe rows for kvcourse.evict (issue 25, part 2): every public name, fed the bad inputs a learner will try.

Registered by tests/test_probes.py, which imports every tests/probes_*.py and calls ``register`` with itself.
The rows name ``evict.*`` targets, which count as public only once "evict" is in test_probes.MODULES; until then
``register`` adds nothing, so ``test_the_table_names_only_public_names`` stays green.
"""

from __future__ import annotations

import torch


def register(t) -> None:
    if "evict" not in t.MODULES:
        return
    probe, on, call, mod = t.probe, t.on, t.call, t.mod
    ev = mod("evict")

    def h2o(budget: int = 4):
        return ev.H2OCache(2, 1, 2, 8, budget)

    def run(cache, n: int = 6):
        """The cache after a prefill of n tokens through the tiny Llama and its hook (nothing pending)."""
        with torch.no_grad():
            t.llama()(t.ids(t=n), cache, attn_fn=cache.attention)
        return cache

    def pending():
        """A cache whose layer 0 was updated and not yet attended."""
        c = h2o()
        c.update(*t.kv(), 0)
        return c

    def q_k_v(tq: int = 3, tk: int = 3):
        g = torch.Generator().manual_seed(tq * 10 + tk)
        return (torch.randn(1, 4, tq, 8, generator=g), torch.randn(1, 4, tk, 8, generator=g),
                torch.randn(1, 4, tk, 8, generator=g))

    # -- construction -------------------------------------------------------------------------------------
    probe("evict.EvictingCache", "budget 0", call(lambda: ev.EvictingCache(2, 1, 2, 8, 0)), names=("budget", "0"))
    probe("evict.EvictingCache", "float budget", call(lambda: ev.EvictingCache(2, 1, 2, 8, 4.5)),
          names=("budget", "4.5"))
    probe("evict.StreamingLLMCache", "as many sinks as the budget",
          call(lambda: ev.StreamingLLMCache(2, 1, 2, 8, 4, sinks=4)), names=("sinks", "0..3", "4"))
    probe("evict.StreamingLLMCache", "negative sinks", call(lambda: ev.StreamingLLMCache(2, 1, 2, 8, 4, sinks=-1)),
          names=("sinks", "-1"))
    probe("evict.StreamingLLMCache", "sinks=0 is the window alone",
          call(lambda: ev.StreamingLLMCache(2, 1, 2, 8, 4, sinks=0)), result=lambda c: c.sinks == 0)
    probe("evict.H2OCache", "more heavy hitters than the budget", call(lambda: ev.H2OCache(2, 1, 2, 8, 4, heavy=5)),
          names=("heavy", "0..4", "5"))
    probe("evict.H2OCache", "default split", call(lambda: ev.H2OCache(2, 1, 2, 8, 5)),
          result=lambda c: (c.heavy, c.recent) == (2, 3))
    probe("evict.SnapKVCache", "window as large as the budget", call(lambda: ev.SnapKVCache(2, 1, 2, 8, 4, window=4)),
          names=("window", "1..3", "4"))
    probe("evict.SnapKVCache", "even kernel", call(lambda: ev.SnapKVCache(2, 1, 2, 8, 8, window=2, kernel_size=4)),
          names=("kernel_size", "odd", "4"))
    probe("evict.SnapKVCache", "unknown pooling", call(lambda: ev.SnapKVCache(2, 1, 2, 8, 8, window=2, pooling="mean")),
          names=("'avg'", "'max'", "'mean'"))
    probe("evict.EvictingCache.for_model", "transformers model", call(lambda: ev.H2OCache.for_model(t.hf(), 1, 4)),
          names=("kvcourse.llama.Llama", "LlamaForCausalLM"))
    probe("evict.EvictingCache.for_model", "course Llama", call(lambda: ev.SnapKVCache.for_model(t.llama(), 1, 8,
                                                                                               window=2)),
          result=lambda c: (c.num_layers, c.num_kv_heads, c.head_dim, c.budget) == (2, 2, 8, 8))

    # -- the cache API ------------------------------------------------------------------------------------
    probe("evict.EvictingCache.reset", "after a prefill", on(lambda: run(h2o()), "reset"), result=lambda r: r is None)
    for _m in ("get_seq_length", "kept_length", "kept_positions"):
        probe(f"evict.EvictingCache.{_m}", "layer index out of range", on(lambda: run(h2o()), _m, 5),
              names=("5", "layers"))
    probe("evict.EvictingCache.get_seq_length", "tokens seen, not kept", on(lambda: run(h2o()), "get_seq_length"),
          result=lambda n: n == 6)
    probe("evict.EvictingCache.kept_length", "budget after a longer prefill", on(lambda: run(h2o()), "kept_length", 1),
          result=lambda n: n == 4)
    probe("evict.EvictingCache.kept_positions", "fresh cache", on(h2o, "kept_positions"),
          result=lambda p: p.shape == (1, 2, 0))
    probe("evict.EvictingCache.update", "wrong head_dim", on(lambda: run(h2o()), "update", *t.kv(d=4), 0),
          names=("(1, 2, 3, 4)",))
    probe("evict.EvictingCache.update", "float64 keys", on(lambda: run(h2o()), "update", *t.kv(dtype=torch.float64), 0),
          names=("float64", "float32"))
    probe("evict.EvictingCache.update", "layer index out of range", on(lambda: run(h2o()), "update", *t.kv(), 2),
          names=("2", "layers"))
    probe("evict.EvictingCache.update", "two updates without the attention hook between",
          on(pending, "update", *t.kv(), 1), names=("layer 0", "attn_fn=cache.attention"))
    probe("evict.EvictingCache.attention", "no update before it", on(lambda: run(h2o()), "attention", *q_k_v()),
          names=("cache.update", "attn_fn=cache.attention"))
    probe("evict.EvictingCache.attention", "a padding mask",
          on(lambda: run(h2o()), "attention", *q_k_v(), mask=torch.ones(1, 1, 3, 3, dtype=torch.bool)),
          names=("padded batch", "attention_mask"))
    probe("evict.EvictingCache.nbytes", "kept tokens only, fp32", on(lambda: run(h2o()), "nbytes"),
          result=lambda n: n == 2 * 2 * (1 * 2 * 4 * 8) * 4)
    probe("evict.SnapKVCache.votes", "weights of a decode step (4 axes)",
          on(lambda: ev.SnapKVCache(2, 1, 2, 8, 8, window=2), "votes", torch.rand(1, 2, 1, 9)),
          names=("(1, 2, 1, 9)", "window=2"))
    probe("evict.SnapKVCache.votes", "a prompt no longer than the window",
          on(lambda: ev.SnapKVCache(2, 1, 2, 8, 8, window=2), "votes", torch.rand(1, 2, 2, 2, 2)),
          names=("(1, 2, 2, 2, 2)", "T > window=2"))

    # -- functions ----------------------------------------------------------------------------------------
    probe("evict.attention_weights", "k not repeated for GQA", call(lambda: ev.attention_weights(
        torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8))), names=("(1, 4, 2, 8)", "(1, 2, 5, 8)"))
    probe("evict.attention_weights", "rows sum to 1, causal",
          call(lambda: ev.attention_weights(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8))),
          result=lambda w: torch.allclose(w.sum(-1), torch.ones(1, 2, 3)) and float(w[0, 0, 0, 3:].abs().sum()) == 0)
    probe("evict.evict_generate", "a plain KVCache", call(lambda: ev.evict_generate(
        t.llama(), t.ids(), t.kvcache(), 2)), names=("EvictingCache", "KVCache"))
    probe("evict.evict_generate", "a cache already used", lambda: (lambda c: ((lambda: ev.evict_generate(
        t.llama(), t.ids(), c, 2)), (c,)))(run(h2o())), names=("empty cache", "6"))
    probe("evict.evict_generate", "max_new_tokens 0", lambda: (lambda c: ((lambda: ev.evict_generate(
        t.llama(), t.ids(), c, 0)), (c,)))(h2o()), names=("max_new_tokens", "0"))
    probe("evict.evict_generate", "forced of the wrong length", lambda: (lambda c: ((lambda: ev.evict_generate(
        t.llama(), t.ids(), c, 3, forced=t.ids(t=3))), (c,)))(h2o()), names=("forced", "(1, 2)", "(1, 3)"))
    probe("evict.evict_generate", "float ids", lambda: (lambda c: ((lambda: ev.evict_generate(
        t.llama(), t.ids().float(), c, 2)), (c,)))(h2o()), names=("input_ids", "(1, 5)"))
    probe("evict.evict_generate", "budget kept", lambda: (lambda c: ((lambda: (ev.evict_generate(
        t.llama(), t.ids(t=6), c, 3), c.kept_length(1))), ()))(h2o()), result=lambda r: r[0][0].shape == (1, 3)
          and r[1] == 4)
    probe("evict.measure_retrieval", "unknown policy", call(lambda: ev.measure_retrieval(
        t.llama(), object(), policies=("lru",))), names=("lru", "streamingllm"))
    probe("evict.measure_retrieval", "budget 1", call(lambda: ev.measure_retrieval(t.llama(), object(), budgets=(1,))),
          names=("budget", "1"))
    probe("evict.measure_retrieval", "a model without its tokenizer", call(lambda: ev.measure_retrieval(t.llama())),
          names=("tokenizer",))
    probe("evict.format_table", "rows of another function", call(lambda: ev.format_table([{"policy": "h2o"}])),
          names=("measure_retrieval", "budget", "policy"))
    row = {"policy": "h2o", "budget": 8, "retrieval": 0.0, "agreement": 0.5, "max_logit_err": 1.0,
           "mean_logit_err": 0.5}
    probe("evict.format_table", "one row", call(lambda: ev.format_table([row])),
          result=lambda s: "| h2o | 8 | 0.00 | 0.500 | 1.000 | 0.500 |" in s)
