"""Eviction caches (kvcourse.evict): StreamingLLM, H2O and SnapKV under a budget of kept tokens per KV head.

Bugs guarded, each by the test named after it: the budget overrun, sinks evicted, positions lost after eviction (a
kept key or a new query rotated at its kept index instead of its original position), top-B taken over all heads at
once, SnapKV's votes taken from the wrong end of the prompt, H2O scores not accumulated (or averaged), kept tokens
out of order, and a cache that under a budget >= the sequence differs from the full cache at all.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from kvcourse import KVCache, Llama
from kvcourse.evict import (
    EvictingCache,
    H2OCache,
    SnapKVCache,
    StreamingLLMCache,
    attention_weights,
    evict_generate,
    format_table,
    measure_retrieval,
)
from kvcourse.llama import repeat_kv, sdpa_attention

V = 64


def tiny(seed: int = 0) -> Llama:
    """2 layers, 4 query heads over 2 KV heads (GQA, 2 per group), head_dim 8; sharp random attention."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=256, initializer_range=0.2)
    return Llama.from_hf(transformers.LlamaForCausalLM(cfg).eval())


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed))  # (1, n)


def full_greedy(model, ids, n):
    """Greedy tokens and logits with a plain KVCache and the model's own attention (no hook)."""
    cache = KVCache.for_model(model, 1, ids.shape[1] + n)
    toks, logits = [], []
    with torch.no_grad():
        step = model(ids, cache, last_only=True)[:, -1]
        for i in range(n):
            logits.append(step)
            toks.append(step.argmax(-1))
            if i + 1 < n:
                step = model(toks[-1][:, None], cache)[:, -1]
    return torch.stack(toks, 1), torch.stack(logits, 1)


POLICIES = {
    "streamingllm": lambda m, b: StreamingLLMCache.for_model(m, 1, b, sinks=2),
    "window": lambda m, b: StreamingLLMCache.for_model(m, 1, b, sinks=0),
    "h2o": lambda m, b: H2OCache.for_model(m, 1, b),
    "snapkv": lambda m, b: SnapKVCache.for_model(m, 1, b, window=4, kernel_size=3),
}


def run_steps(model, cache, ids, n):
    """Prefill ids, then n greedy one-token steps; yields (tokens seen, logits of the step) after every forward."""
    with torch.no_grad():
        logits = model(ids, cache, attn_fn=cache.attention)[:, -1]
        yield ids.shape[1], logits
        for i in range(n):
            logits = model(logits.argmax(-1)[:, None], cache, attn_fn=cache.attention)[:, -1]
            yield ids.shape[1] + i + 1, logits


# ---- invariants -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES))
def test_budget_overrun_at_some_step(name):
    model, budget, prompt = tiny(), 10, 16
    cache = POLICIES[name](model, budget)
    for seen, _ in run_steps(model, cache, ids_of(prompt), 12):
        for layer in range(model.args.num_layers):
            assert cache.get_seq_length(layer) == seen  # tokens seen, the next position
            kept = cache.kept_length(layer)
            if name == "snapkv":  # one compression of the prompt, then generated tokens appended (as SnapKV's code)
                assert kept == budget + (seen - prompt), (seen, kept)
            else:
                assert kept == min(seen, budget), (seen, kept)
            assert cache.kept_positions(layer).shape == (1, model.args.num_kv_heads, kept)


def test_sinks_evicted_by_streamingllm():
    model, budget, sinks = tiny(), 8, 3
    cache = StreamingLLMCache.for_model(model, 1, budget, sinks=sinks)
    for seen, _ in run_steps(model, cache, ids_of(12), 10):
        expected = list(range(sinks)) + list(range(seen - (budget - sinks), seen))
        for layer in range(model.args.num_layers):
            for head in cache.kept_positions(layer)[0]:
                assert head.tolist() == expected, seen


@pytest.mark.parametrize("name", list(POLICIES))
def test_kept_positions_out_of_order(name):
    model = tiny(1)
    cache = POLICIES[name](model, 9)
    for _ in run_steps(model, cache, ids_of(20, 1), 8):
        for layer in range(model.args.num_layers):
            pos = cache.kept_positions(layer)
            assert (pos[..., 1:] > pos[..., :-1]).all()  # strictly ascending per head: order kept, no duplicate
            assert (pos[..., -1] == cache.get_seq_length(layer) - 1).all()  # the newest token is always kept


class Recorder:
    """An attn_fn for a cacheless forward that records each layer's q, k (repeated) and can mask the last query."""

    def __init__(self, allowed=None):
        self.calls, self.allowed = [], allowed  # allowed[layer]: (B, KV, n) positions the last query may see

    def __call__(self, q, k, v, mask=None):
        layer = len(self.calls)
        self.calls.append((q, k))
        if self.allowed is None:
            return sdpa_attention(q, k, v)
        b, h, t, _ = q.shape
        kept = self.allowed[layer]  # (B, KV, n) original positions
        last = torch.zeros(b, kept.shape[1], t, dtype=torch.bool).scatter(2, kept, True)  # (B, KV, T)
        last[..., t - 1] = True  # the query sees itself
        see = torch.ones(b, h, t, t, dtype=torch.bool).tril()  # (B, H, T, T): the prefill is causal, in full
        see[:, :, t - 1] = last.repeat_interleave(h // kept.shape[1], dim=1)  # the last query: kept keys only
        return F.scaled_dot_product_attention(q, k, v, attn_mask=see)


@pytest.mark.parametrize("name", list(POLICIES))
def test_positions_lost_after_eviction(name):
    """After the prefill was cut to the budget, the next step's logits equal full attention restricted, per head, to
    the kept ORIGINAL positions; and every kept key equals the key a full cache holds at that original position."""
    model, budget, prompt = tiny(2), 7, 15
    ids = ids_of(prompt + 1, 2)
    cache = POLICIES[name](model, budget)
    full = KVCache.for_model(model, 1, prompt + 1)
    with torch.no_grad():
        model(ids[:, :prompt], cache, attn_fn=cache.attention)
        model(ids[:, :prompt], full)
        kept = [cache.kept_positions(i) for i in range(model.args.num_layers)]  # before the step: what it attends to
        for layer in range(model.args.num_layers):
            assert cache.kept_length(layer) == budget
            n = cache.kept_length(layer)
            want = full.keys[layer][:, :, :prompt].gather(2, kept[layer][..., None].expand(-1, -1, n, 8))
            assert torch.equal(cache.keys[layer], want)  # rotated at the original position, never re-rotated
        got = model(ids[:, prompt:], cache, attn_fn=cache.attention)[:, -1]
        ref = model(ids, attn_fn=Recorder(kept))[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == prompt + 1


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_topb_over_all_heads_at_once(name):
    """Importance policies choose per KV head: the heads keep different positions (on this model and prompt)."""
    model = tiny(3)
    cache = POLICIES[name](model, 8)
    differs = False
    for _ in run_steps(model, cache, ids_of(24, 3), 6):
        for layer in range(model.args.num_layers):
            pos = cache.kept_positions(layer)[0]  # (KV, n)
            differs |= not torch.equal(pos[0], pos[1])
    assert differs, "every KV head kept the same positions at every step: top-B over all heads at once?"


def snapkv_by_hand(q, k, window, kernel, budget, n_kv):
    """SnapKVCluster.update_kv (FasterDecoding/SnapKV) for one layer, group-averaged as kvpress, written apart,
    from q (1, H, T, D) and the repeated k (1, H, T, D)."""
    h, t = q.shape[1], q.shape[2]
    out = []
    for g in range(n_kv):
        votes = []
        for head in range(g * (h // n_kv), (g + 1) * (h // n_kv)):
            s = (q[0, head, t - window:] @ k[0, head].T) / math.sqrt(q.shape[-1])  # (w, T): the LAST w queries
            causal = torch.arange(t)[None, :] <= torch.arange(t - window, t)[:, None]
            p = s.masked_fill(~causal, float("-inf")).softmax(-1)[:, : t - window].sum(0)  # (T - w,)
            votes.append(F.avg_pool1d(p[None, None], kernel, 1, kernel // 2)[0, 0])
        score = torch.stack(votes).mean(0)  # averaged over the group
        top = sorted(score.topk(budget - window).indices.tolist())
        out.append(top + list(range(t - window, t)))
    return out


def test_snapkv_scores_from_the_wrong_end_of_the_prompt():
    model, budget, window, prompt = tiny(4), 10, 4, 30
    ids = ids_of(prompt, 4)
    cache = SnapKVCache.for_model(model, 1, budget, window=window, kernel_size=3)
    rec = Recorder()
    with torch.no_grad():
        model(ids, cache, attn_fn=cache.attention)
        model(ids, attn_fn=rec)
    for layer, (q, k) in enumerate(rec.calls):
        assert cache.kept_positions(layer)[0].tolist() == snapkv_by_hand(q, k, window, 3, budget, 2), layer


def test_h2o_scores_not_accumulated_by_hand():
    """1 layer, 1 KV head serving 2 query heads, zero queries: every query attends uniformly to what it sees.

    Prefill of 3: key j gets 1/(i+1) from each query i >= j, summed over queries and the 2 heads:
    [2 (1 + 1/2 + 1/3), 2 (1/2 + 1/3), 2 (1/3)] = [11/3, 5/3, 2/3]. A decode step sees 4 keys: + 2 * 1/4 each,
    [25/6, 13/6, 7/6, 1/2]; budget 3 (heavy 1, recent 2) keeps position 0 (the heaviest older one) + 2, 3.
    The next step adds 1/2 to each of the 4 it sees: [14/3, 5/3, 1, 1/2], keeping 0 + 3, 4.
    """
    cache = H2OCache(1, 1, 1, 2, 3, heavy=1)

    def step(t):
        k = torch.randn(1, 1, t, 2)
        keys, values = cache.update(k, k.clone(), 0)
        q = torch.zeros(1, 2, t, 2)
        cache.attention(q, repeat_kv(keys, 2), repeat_kv(values, 2))

    step(3)
    torch.testing.assert_close(cache.scores[0][0, 0], torch.tensor([11 / 3, 5 / 3, 2 / 3]))
    step(1)
    assert cache.kept_positions(0)[0, 0].tolist() == [0, 2, 3]
    torch.testing.assert_close(cache.scores[0][0, 0], torch.tensor([25 / 6, 7 / 6, 1 / 2]))
    step(1)
    assert cache.kept_positions(0)[0, 0].tolist() == [0, 3, 4]
    torch.testing.assert_close(cache.scores[0][0, 0], torch.tensor([14 / 3, 1, 1 / 2]))


def test_h2o_eviction_differs_from_the_authors_rule_on_a_model():
    """After every forward, every head: kept = the `heavy` older tokens of highest accumulated score + the `recent`
    latest, replayed here by position from the weights the hook saw (bookkeeping apart from the cache's)."""
    model, budget, heavy = tiny(5), 9, 4
    recent, n_kv = budget - heavy, model.args.num_kv_heads
    cache = H2OCache.for_model(model, 1, budget, heavy=heavy)
    acc: dict[tuple[int, int], dict[int, float]] = {}  # (layer, head) -> {position: accumulated score}
    checked = []

    def spy(q, k, v, mask=None):
        layer = cache._pending[0]
        pos = cache.positions[layer][0].tolist()  # (KV, n) before the eviction
        w = attention_weights(q, k)[0]  # (H, T, n)
        rep = q.shape[1] // n_kv
        wants = []
        for g in range(n_kv):
            d = acc.setdefault((layer, g), {})
            tot = w[rep * g: rep * (g + 1)].sum(dim=(0, 1))  # (n,): over the group's query heads and the queries
            for j, p in enumerate(pos[g]):
                d[p] = d.get(p, 0.0) + float(tot[j])
            want = pos[g]
            if len(want) > budget:
                older = want[: len(want) - recent]
                want = sorted(sorted(older, key=lambda p: -d[p])[:heavy]) + want[len(want) - recent:]
            for p in set(d) - set(want):
                del d[p]
            wants.append(want)
        y = EvictingCache.attention(cache, q, k, v, mask)
        for g in range(n_kv):
            assert cache.kept_positions(layer)[0, g].tolist() == wants[g], (layer, g, len(pos[g]))
            checked.append(len(pos[g]) > budget)
        return y

    with torch.no_grad():
        logits = model(ids_of(14, 5), cache, attn_fn=spy)[:, -1]
        for _ in range(10):
            logits = model(logits.argmax(-1)[:, None], cache, attn_fn=spy)[:, -1]
    assert sum(checked) == 11 * model.args.num_layers * n_kv  # every forward evicted, and was checked


@pytest.mark.parametrize("name", list(POLICIES))
def test_budget_at_least_the_sequence_differs_from_the_full_cache(name):
    model, prompt, n = tiny(6), 12, 10
    ids = ids_of(prompt, 6)
    want_t, want_l = full_greedy(model, ids, n)
    got_t, got_l = evict_generate(model, ids, POLICIES[name](model, prompt + n), n)
    assert torch.equal(got_t, want_t)
    assert torch.equal(got_l, want_l)  # bit-equal: the hook's output is sdpa_attention on the same keys


def test_eviction_changes_logits_under_a_small_budget():
    """The equality above is not vacuous: a budget under the prompt changes the logits for every policy."""
    model, ids = tiny(6), ids_of(20, 6)
    want = full_greedy(model, ids, 4)[1]
    for name, make in POLICIES.items():
        got = evict_generate(model, ids, make(model, 6), 4, forced=want.argmax(-1)[:, :-1])[1]
        assert not torch.allclose(got, want, atol=1e-4), name


# ---- bad input ------------------------------------------------------------------------------------------


def test_update_without_the_attention_hook_silently_keeps_everything():
    model = tiny()
    cache = H2OCache.for_model(model, 1, 4)
    with pytest.raises(RuntimeError, match="attn_fn=cache.attention"):
        model(ids_of(6), cache)


def test_padded_batch_refused_by_name():
    model = tiny()
    cache = StreamingLLMCache.for_model(model, 1, 4, sinks=1)
    with pytest.raises(ValueError, match="padded batch"):
        model(ids_of(6), cache, attn_fn=cache.attention, attention_mask=torch.ones(1, 6, dtype=torch.long))
    assert cache.get_seq_length() == 0 and cache.kept_length() == 0  # the layer-0 update was taken back
    evict_generate(model, ids_of(6), cache, 2)  # and the cache still works
    assert cache.kept_length(1) == 4


@pytest.mark.parametrize("make,match", [
    (lambda: StreamingLLMCache(1, 1, 1, 2, 4, sinks=4), "sinks must be an int in 0..3"),
    (lambda: H2OCache(1, 1, 1, 2, 4, heavy=5), "heavy must be an int in 0..4"),
    (lambda: SnapKVCache(1, 1, 1, 2, 4, window=4), "window must be an int in 1..3"),
    (lambda: SnapKVCache(1, 1, 1, 2, 8, window=2, kernel_size=4), "kernel_size must be odd"),
    (lambda: SnapKVCache(1, 1, 1, 2, 8, window=2, pooling="mean"), "pooling must be 'avg' or 'max'"),
    (lambda: EvictingCache(1, 1, 1, 2, 0), "budget must be a positive int"),
])
def test_bad_settings_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---- the measurement (no timing) -------------------------------------------------------------------------


def test_measure_retrieval_rows_on_the_bundled_model():
    rows = measure_retrieval(budgets=(16,), secrets=("gold",), new_tokens=3)
    assert [(r["policy"], r["budget"]) for r in rows] == [
        ("full", None), ("window", 16), ("streamingllm", 16), ("h2o", 16), ("snapkv", 16)]
    assert rows[0]["agreement"] == 1.0 and rows[0]["max_logit_err"] == 0.0
    assert all(0 <= r["agreement"] <= 1 and 0 <= r["retrieval"] <= 1 for r in rows)
    assert any(r["max_logit_err"] > 0 for r in rows[1:])  # 16 of ~400 tokens kept: the logits move
    assert format_table(rows).count("\n") == len(rows) + 1
