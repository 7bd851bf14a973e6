"""Probe rows for kvcourse.fewer_bytes (notebook 11's plumbing): every public name, fed the bad inputs a learner
or an instructor will try, and the graders fed wrong answers (each must fail with a message naming the mistake).

Registered by tests/test_probes.py, which imports every tests/probes_*.py and calls ``register`` with itself; the
rows count only once "fewer_bytes" is in test_probes.MODULES.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _tiny():
    from kvcourse.fewer_bytes import tiny_deepseek

    return tiny_deepseek()


def register(t) -> None:
    if "fewer_bytes" not in t.MODULES:
        return
    probe, call, mod = t.probe, t.call, t.mod
    fb = mod("fewer_bytes")
    mla = mod("mla")
    ev = mod("evict")
    iw = mod("int8_weights")

    def right_latent(attn, x, rotate, cache):
        c, k = attn.kv_a_proj_with_mqa(x).split([attn.a.kv_lora_rank, attn.a.qk_rope_head_dim], dim=-1)
        return cache.update(attn.kv_a_layernorm(c), rotate(k), attn.layer_idx)

    def latent_no_rope(attn, x, rotate, cache):
        c, k = attn.kv_a_proj_with_mqa(x).split([attn.a.kv_lora_rank, attn.a.qk_rope_head_dim], dim=-1)
        return cache.update(attn.kv_a_layernorm(c), k, attn.layer_idx)

    def expanding(attn, q_nope, q_rope, c_kv, k_rope):
        attn.kv_b_proj(c_kv)  # re-expanded: the grader must notice
        return type(attn)._absorbed(attn, q_nope, q_rope, c_kv, k_rope, None)

    def ev_h2o(k, v, p, s, wt, h, r):
        c = ev.H2OCache(1, k.shape[0], k.shape[1], k.shape[3], h + r, heavy=h)
        c.keys, c.values, c.positions, c.scores = [k], [v], [p], [s]
        idx = c._select(0, wt.shape[3], wt)
        if idx is not None:
            c._keep(0, idx)
        return c.keys[0], c.values[0], c.positions[0], c.scores[0]

    cfg = dict(mla.PUBLISHED["DeepSeek-V3 (MLA)"])
    w = torch.softmax(torch.randn(1, 2, 2, 12, 12, generator=torch.Generator().manual_seed(0)), dim=-1)
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))

    # -- the model and the hooks --------------------------------------------------------------------------
    probe("fewer_bytes.tiny_deepseek", "q_lora_rank 0", call(lambda: fb.tiny_deepseek(q_lora_rank=0)),
          names=("q_lora_rank", "0"))
    probe("fewer_bytes.tiny_deepseek", "the default config", call(lambda: _tiny()),
          result=lambda m: (m.config.kv_lora_rank, m.config.qk_rope_head_dim, m.config.first_k_dense_replace) ==
          (32, 8, 2))
    probe("fewer_bytes.latent_hook", "a Llama instead of an MLAModel",
          call(lambda: fb.latent_hook(t.llama(), right_latent).__enter__()), names=("MLAModel", "Llama"))
    probe("fewer_bytes.absorbed_hook", "a transformers model instead of an MLAModel",
          call(lambda: fb.absorbed_hook(_tiny(), expanding).__enter__()), names=("MLAModel", "DeepseekV3ForCausalLM"))
    probe("fewer_bytes.run_checked", "the learner's function raises",
          call(lambda: fb.run_checked("my_fn", lambda: 1 / 0)), names=("my_fn", "ZeroDivisionError"))
    probe("fewer_bytes.run_checked", "returns what the function returns",
          call(lambda: fb.run_checked("my_fn", lambda x: x + 1, 2)), result=lambda r: r == 3)
    # -- the graders, fed wrong answers ------------------------------------------------------------------
    probe("fewer_bytes.check_latent_update", "k_rope not rotated",
          call(lambda: fb.check_latent_update(latent_no_rope, _tiny(), prompt_len=4, new_tokens=1)),
          names=("k_rope is cached without RoPE",))
    probe("fewer_bytes.check_latent_update", "prompt_len 0",
          call(lambda: fb.check_latent_update(right_latent, _tiny(), prompt_len=0)), names=("prompt_len", "0"))
    probe("fewer_bytes.check_absorbed", "re-expands the cache",
          call(lambda: fb.check_absorbed(expanding, _tiny(), prompt_len=20, steps=1)), names=("kv_b_proj was called",))
    probe("fewer_bytes.check_absorbed", "steps 0", call(lambda: fb.check_absorbed(expanding, _tiny(), steps=0)),
          names=("steps", "0"))
    probe("fewer_bytes.check_cache_bytes", "keys only",
          call(lambda: fb.check_cache_bytes(lambda c, n: 2 * 80 * 8 * 128 * n, dict(
              mla.PUBLISHED["Llama-3-70B (GQA)"]), 10, 2 * 2 * 80 * 8 * 128 * 10, "llama")),
          names=("a key AND a value", "expected"))
    probe("fewer_bytes.check_cache_bytes", "unknown kind",
          call(lambda: fb.check_cache_bytes(lambda c, n: 0, {"kind": "mqa"}, 10, 0, "x")), names=("'gqa'", "'mqa'"))
    probe("fewer_bytes.check_cache_bytes", "the right formula",
          call(lambda: fb.check_cache_bytes(lambda c, n: 70_272 * n, cfg, 3, 70_272 * 3, "DeepSeek-V3")),
          result=lambda r: r is None)
    probe("fewer_bytes.check_snapkv", "scores from the wrong end",
          call(lambda: fb.check_snapkv(lambda w_, win, k, b: fb._snapkv_variants(w_, win, k, b)[0][0], w, 3, 3, 6,
                                       "w")), names=("at the END of the prompt",))
    probe("fewer_bytes.check_snapkv", "window as large as the budget",
          call(lambda: fb.check_snapkv(lambda *a: None, w, 6, 3, 6, "w")), names=("0 < window < budget", "window 6"))
    probe("fewer_bytes.check_snapkv_on_model", "budget 1",
          call(lambda: fb.check_snapkv_on_model(lambda *a: None, t.llama(), t.ids(t=8), 1)), names=("budget", "1"))
    probe("fewer_bytes.check_snapkv_on_model", "selection over all heads at once",
          call(lambda: fb.check_snapkv_on_model(
              lambda w_, win, k, b: fb._snapkv_variants(w_, win, k, b)[1][0], t.llama(), t.ids(t=12), 6,
              new_tokens=2)), names=("kept other positions than SnapKV's",))
    probe("fewer_bytes.check_h2o", "positions renumbered",
          call(lambda: fb.check_h2o(lambda k, v, p, s, wt, h, r: ev_h2o(k, v, torch.zeros_like(p), s, wt, h, r),
                                    fb.h2o_case(10, 3, 3, seed=0), 3, 3, "case")),
          names=("head 0 holds positions",))
    probe("fewer_bytes.check_h2o", "not a case", call(lambda: fb.check_h2o(lambda *a: a, (1, 2), 3, 3, "case")),
          names=("(keys, values, positions, scores, weights)", "tuple"))
    probe("fewer_bytes.h2o_case", "more new tokens than held", call(lambda: fb.h2o_case(4, 2, 2, seed=0, t=5)),
          names=("t=5", "n=4"))
    probe("fewer_bytes.check_h2o_on_model", "budget 1",
          call(lambda: fb.check_h2o_on_model(lambda *a: a, t.llama(), t.ids(t=8), 1)), names=("budget", "1"))
    probe("fewer_bytes.check_h2o_on_model", "returns nothing",
          call(lambda: fb.check_h2o_on_model(lambda *a: None, t.llama(), t.ids(t=8), 4, new_tokens=2)),
          names=("h2o_evict", "(keys, values, positions, scores)"))
    probe("fewer_bytes.LearnerH2O", "heavy over the budget", call(lambda: fb.LearnerH2O(2, 1, 2, 8, 4, heavy=5)),
          names=("heavy", "5"))
    probe("fewer_bytes.LearnerSnapKV", "window as large as the budget",
          call(lambda: fb.LearnerSnapKV(2, 1, 2, 8, 4, window=4)), names=("window", "4"))
    probe("fewer_bytes.check_quantize_rows", "one scale per matrix",
          call(lambda: fb.check_quantize_rows(lambda x: (iw.quantize_per_channel(x)[0],
                                                         x.abs().max().expand(x.shape[0]) / 127), weight, "w")),
          names=("one scale for the whole matrix",))
    probe("fewer_bytes.check_quantize_rows", "an int8 weight",
          call(lambda: fb.check_quantize_rows(iw.quantize_per_channel, weight.to(torch.int8), "w")),
          names=("float weight", "torch.int8"))
    probe("fewer_bytes.check_saving", "cache of one row",
          call(lambda: fb.check_saving(lambda wb, rc, b, bpv, what: rc * 0.75 / (wb + rc), 100, 10, 8, 4, "cache",
                                       "c")), names=("every row of the batch reads its own cache",))
    probe("fewer_bytes.check_saving", "unknown part", call(lambda: fb.check_saving(lambda *a: 0, 100, 10, 8, 4,
                                                                                  "scales", "c")),
          names=("'weights'", "'scales'"))
    # -- measuring ----------------------------------------------------------------------------------------
    probe("fewer_bytes.time_decode", "batch 0", call(lambda: fb.time_decode(t.llama(), 0, 8)), names=("batch", "0"))
    probe("fewer_bytes.time_decode", "a transformers model", call(lambda: fb.time_decode(t.hf(), 1, 8)),
          names=("kvcourse.llama.Llama", "LlamaForCausalLM"))
    probe("fewer_bytes.time_decode", "bytes of a step", call(lambda: fb.time_decode(t.llama(), 2, 8, steps=1)),
          result=lambda r: r["cache_bytes"] == 2 * 2 * 2 * 8 * 4 * 8 * 2 and r["ms"] >= 0)
    probe("fewer_bytes.int8_rows", "no batches", call(lambda: fb.int8_rows(t.hf(), batches=())),
          names=("batches", "()"))
    probe("fewer_bytes.int8_rows", "batch 0", call(lambda: fb.int8_rows(t.hf(), batches=(0,))),
          names=("each batch", "0"))
    probe("fewer_bytes.time_mla_paths", "context 0", call(lambda: fb.time_mla_paths(_tiny(), contexts=(0,))),
          names=("context", "0"))
    probe("fewer_bytes.retrieval_plot", "rows of another table", call(lambda: fb.retrieval_plot([{"policy": "h2o"}])),
          names=("measure_retrieval", "agreement"))
