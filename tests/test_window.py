"""Sliding-window attention (Mistral) and the ring-buffer cache: the same logits and greedy tokens as
transformers' MistralForCausalLM for several times the window, and memory that stays flat. Bugs guarded: a
window applied off by one, a ring written at pos instead of pos % W, keys returned in ring order, a mask not
cut to the kept slots, a long prompt that overruns the ring."""

import pytest
import torch
from test_batching import hf_greedy
from transformers import MistralConfig, MistralForCausalLM

from kvcourse import KVCache, Llama, SlidingWindowCache
from kvcourse.batching import pad_prompts
from kvcourse.fast import FastGenerator
from kvcourse.generate import decode_one_token, generate, prefill


def tiny_mistral(window: int, kv_heads: int = 2, seed: int = 0) -> MistralForCausalLM:
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, sliding_window=window,
                        max_position_embeddings=512, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return MistralForCausalLM(cfg).eval()


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 97, (1, n), generator=torch.Generator().manual_seed(seed))  # (1, n)


@pytest.mark.parametrize("length", [3, 4, 5, 13])
def test_sliding_window_logits_drift_from_transformers(length):
    hf = tiny_mistral(window=4)
    ours = Llama.from_hf(hf)
    assert ours.args.sliding_window == 4
    ids = ids_of(length)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,prompt", [(4, 2), (5, 7), (3, 12)], ids=["short-prompt", "prompt>window", "long"])
def test_ring_cache_tokens_diverge_from_transformers(window, prompt):
    """At least 3x the window of greedy tokens, through the ring, a full cache and transformers' generate."""
    hf = tiny_mistral(window, seed=window)
    ours = Llama.from_hf(hf)
    ids, n = ids_of(prompt, seed=prompt), 4 * window + 5
    expected = hf_greedy(hf, ids, None, n)
    ring = SlidingWindowCache.for_model(ours, batch_size=1)
    assert torch.equal(generate(ours, ids, n, cache=ring), expected)
    assert torch.equal(generate(ours, ids, n), expected)  # a full KVCache, the window applied by the mask
    assert ring.get_seq_length() == prompt + n - 1


def test_padded_batch_through_the_ring_diverges_from_transformers():
    hf = tiny_mistral(window=4, seed=3)
    ours = Llama.from_hf(hf)
    g = torch.Generator().manual_seed(3)
    ids, mask = pad_prompts([torch.randint(1, 97, (n,), generator=g) for n in (6, 2, 4)], 0)
    n = 15
    expected = hf_greedy(hf, ids, mask, n)
    got = generate(ours, ids, n, cache=SlidingWindowCache.for_model(ours, batch_size=3), attention_mask=mask)
    assert torch.equal(got, expected)


def test_ring_memory_grows_with_the_generation():
    hf = tiny_mistral(window=4)
    ours = Llama.from_hf(hf)
    ring = SlidingWindowCache.for_model(ours, batch_size=1)
    full = KVCache.for_model(ours, 1, 200)
    before = ring.nbytes()
    generate(ours, ids_of(5), 150, cache=ring)
    assert ring.nbytes() == before == 2 * 2 * 1 * 2 * 4 * 16 * 4  # K and V, 2 layers, (1, 2, 4, 16) float32
    assert ring.get_seq_length() == 154 and full.nbytes() == before * 200 // 4


def test_ring_written_at_pos_not_pos_mod_w():
    ring = SlidingWindowCache(1, 1, 1, 2, window=3)
    for pos in range(7):  # one token at a time; its key holds its position
        k = torch.full((1, 1, 1, 2), float(pos))
        keys, _ = ring.update(k, k, 0)
        assert keys[0, 0, :, 0].tolist() == [float(p) for p in range(max(0, pos - 2), pos + 1)], \
            "update must return the latest W - 1 cached keys and the new one, oldest first"
    assert ring.keys[0][0, 0, :, 0].tolist() == [6.0, 4.0, 5.0], "position p lives in slot p % W"


def test_long_prompt_overruns_the_ring():
    ring = SlidingWindowCache(1, 1, 1, 2, window=3)
    k = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 2)
    assert ring.window_slots(8) == (8, 0)
    keys, _ = ring.update(k, k, 0)
    assert keys.shape[2] == 8, "a prompt's own queries need all its keys"
    assert ring.keys[0][0, 0, :, 0].tolist() == [6.0, 7.0, 5.0] and ring.window_slots(1) == (3, 6)


def test_window_cache_for_a_model_without_a_window():
    """Issue 22 §1.5: a ring on a model without a window gives neither model (the prefill sees the whole prompt,
    each decode step only the ring). for_model refused only without window=, and its message suggested window=."""
    hf = tiny_mistral(window=4)
    hf.config.sliding_window = None
    ours = Llama.from_hf(hf)
    for kw in ({}, {"window": 4}):
        with pytest.raises(ValueError, match="sliding_window=None") as err:
            SlidingWindowCache.for_model(ours, batch_size=1, **kw)
        assert "pass window=" not in str(err.value) and "KVCache" in str(err.value)
    ring = SlidingWindowCache(2, 1, 2, 16, window=4)  # built directly: generate knows the model
    with pytest.raises(ValueError, match="sliding_window=None"):
        generate(ours, ids_of(6), 3, cache=ring)
    with pytest.raises(ValueError, match="sliding_window=None"):
        prefill(ours, ids_of(6), ring)
    assert ring.get_seq_length() == 0, "a refused call must leave the cache empty"


def test_window_smaller_than_the_models_drops_attended_keys():
    """Issue 22 §1.4: a ring of 3 slots for a model with sliding_window=5 drops keys the mask still attends to."""
    hf = tiny_mistral(window=5)
    ours = Llama.from_hf(hf)
    with pytest.raises(ValueError, match="smaller than the model's sliding_window=5"):
        SlidingWindowCache.for_model(ours, batch_size=1, window=3)
    small = SlidingWindowCache(2, 1, 2, 16, window=3)
    with pytest.raises(ValueError, match="window >= 5"):
        generate(ours, ids_of(7), 4, cache=small)
    with pytest.raises(ValueError, match="window >= 5"):
        decode_one_token(ours, ids_of(1), small)
    assert small.get_seq_length() == 0
    larger = SlidingWindowCache.for_model(ours, batch_size=1, window=8)  # more slots than needed: same tokens
    assert torch.equal(generate(ours, ids_of(7), 12, cache=larger), generate(ours, ids_of(7), 12))


@pytest.mark.parametrize("kw,named", [({"window": 0}, "window"), ({"window": 2.5}, "2.5"), ({"window": True}, "True"),
                                      ({"batch_size": -1}, "batch_size")])
def test_degenerate_ring_sizes_accepted(kw, named):
    args = {"num_layers": 1, "batch_size": 1, "num_kv_heads": 2, "head_dim": 8, "window": 4} | kw
    with pytest.raises(ValueError, match=named):
        SlidingWindowCache(**args)


def test_ring_broadcasts_or_casts_bad_keys():
    ring = SlidingWindowCache(2, 1, 2, 8, window=4)
    ring.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 0)
    for k in (torch.randn(3, 2, 1, 8), torch.randn(1, 2, 1, 4)):  # batch, head_dim
        with pytest.raises(ValueError, match="does not fit"):
            ring.update(k, k, 0)
    with pytest.raises(ValueError, match="float64"):
        ring.update(torch.randn(1, 2, 1, 8, dtype=torch.float64), torch.randn(1, 2, 1, 8, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="q_len"):
        ring.window_slots(-1)
    with pytest.raises(IndexError, match="2 layers"):
        ring.get_seq_length(5)
    assert ring.lengths == [3, 0]


def test_fast_path_ignores_the_window():
    """The fast path has no sliding-window mask: it must refuse a Mistral model, not generate other tokens."""
    with pytest.raises(ValueError, match="sliding window of 4"):
        FastGenerator(tiny_mistral(window=4))
