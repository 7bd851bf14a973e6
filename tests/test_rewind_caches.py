"""Rewinding the ring (``SlidingWindowCache``) and the int8 cache (``Int8KVCache``) with ``crop`` (issue 24).

The contract, for speculative decoding (notebook 10): after ``crop`` and a re-append of other tokens, the cache
equals, bit for bit, a cache that never saw the rejected tokens: one fed the same ``update`` calls, the last ones
cut to the tokens kept (``torch.equal`` on what ``update`` returns, and on the model's logits). Where it cannot
(tokens it no longer holds), ``crop`` refuses with an error that names the fix, and changes nothing.

Bugs guarded: a ring without spare slots (rejected tokens overwrote the oldest slots of the rewound window), a
crop that does not check what the ring still holds, a spare slot returned as past, an int8 crop that forgets the
undo record of the last flush (tokens left int8 that the other cache holds exact), the flush rule replayed off by
one, the first update's flush taken for a residual one, a refused crop that changed a layer.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers

from kvcourse import KVCache, Llama
from kvcourse.generate import generate
from kvcourse.quant import Int8KVCache
from kvcourse.window import SlidingWindowCache

L, B, KV, D = 2, 1, 2, 8  # cache sizes for the cache-level tests


# ---- a cache that remembers its update calls, cut as crop cuts it -------------------------------------------


def recording(cls):
    """A subclass of ``cls`` that keeps every update call (one list of (k, v) per layer), cut by ``crop``: the
    calls a cache that never saw the dropped tokens would have been fed."""

    class Recording(cls):
        calls: list

        def update(self, key, value, layer_idx):
            if not hasattr(self, "calls"):
                self.calls = []
            if layer_idx == 0:
                self.calls.append([])
            self.calls[-1].append((key.clone(), value.clone()))
            return super().update(key, value, layer_idx)

        def crop(self, max_length):
            held = self.get_seq_length()
            super().crop(max_length)
            n, kept, pos = (max_length if max_length >= 0 else held + max_length), [], 0  # not what crop says
            for call in getattr(self, "calls", []):
                if pos >= n:
                    break
                kept.append([(k[:, :, :n - pos], v[:, :, :n - pos]) for k, v in call])  # the last one cut
                pos += call[0][0].shape[2]
            self.calls = kept

    return Recording


def never_saw(cache, make):
    """A fresh ``make()`` fed the calls ``cache`` kept: same calls, rejected tokens cut."""
    other = make()
    for call in getattr(cache, "calls", []):
        for i, (k, v) in enumerate(call):
            other.update(k, v, i)
    return other


def feed(cache, t: int, g: torch.Generator):
    """One update call of t new random tokens to every layer; returns the outputs per layer."""
    return [cache.update(torch.randn(B, KV, t, D, generator=g), torch.randn(B, KV, t, D, generator=g), i)
            for i in range(cache.num_layers)]


def assert_same(a, b, g: torch.Generator, what: str = ""):
    """a and b hold the same: lengths (and int8/residual split), then the same outputs, bit for bit, for the
    same re-appended tokens (1, then 2), on copies."""
    for i in range(a.num_layers):
        assert a.get_seq_length(i) == b.get_seq_length(i), what
    if isinstance(a, Int8KVCache):
        assert (a.quantized, a.in_residual) == (b.quantized, b.in_residual), \
            f"{what}: int8/residual split {a.quantized}/{a.in_residual}, a cache that never saw the rejected " \
            f"tokens has {b.quantized}/{b.in_residual}"
    a, b = copy.deepcopy(a), copy.deepcopy(b)
    for t in (1, 2):
        if isinstance(a, SlidingWindowCache):
            assert a.window_slots(t) == b.window_slots(t), what
        seed = g.initial_seed() + t
        got = feed(a, t, torch.Generator().manual_seed(seed))
        want = feed(b, t, torch.Generator().manual_seed(seed))
        for i, ((ka, va), (kb, vb)) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(ka, kb) and torch.equal(va, vb), \
                f"{what}: layer {i} returns other keys/values than a cache that never saw the rejected tokens"


def ring(window: int, rewind: int = 0):
    return recording(SlidingWindowCache)(L, B, KV, D, window, rewind=rewind)


def int8(residual: int, cap: int = 96):
    return recording(Int8KVCache)(L, B, KV, D, cap, residual=residual)


def speculate(make, make_plain, prompt: int, k: int, keeps: list[int], seed: int = 0):
    """Prefill, then per round k + 1 tokens (the last accepted one and k drafts) and a crop that keeps ``keep``
    of them; after every crop the cache must equal one that never saw the rejected drafts."""
    g = torch.Generator().manual_seed(seed)
    cache = make()
    feed(cache, prompt, g)
    for r, keep in enumerate(keeps):
        start = cache.get_seq_length()
        feed(cache, k + 1, g)
        cache.crop(start + keep)
        assert_same(cache, never_saw(cache, make_plain), g, f"round {r}: kept {keep} of {k + 1}")
    return cache


# ---- the ring ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window,k,prompt", [(4, 3, 9), (5, 1, 2), (3, 5, 12), (6, 2, 6)])
def test_ring_without_spare_slots_loses_the_rewound_window(window, k, prompt):
    """k drafts verified per round, any number rejected (keep 1..k+1), for rounds past several wraps."""
    keeps = [1 + r % (k + 1) for r in range(3 * (k + 1))] + [1] * 3
    cache = speculate(lambda: ring(window, rewind=k), lambda: ring(window), prompt, k, keeps)
    assert cache.slots == window + k - 1 and cache.keys[0].shape[2] == window + k - 1


def test_plain_ring_drops_one_token_after_it_wrapped_and_refuses_two_but_not_all():
    g = torch.Generator().manual_seed(1)
    cache = ring(4)
    feed(cache, 3, g)
    cache.crop(1)  # not wrapped yet: every position is still in the ring
    assert_same(cache, never_saw(cache, lambda: ring(4)), g, "before the wrap")
    for _ in range(7):
        feed(cache, 1, g)
    cache.crop(-1)
    assert_same(cache, never_saw(cache, lambda: ring(4)), g, "one token dropped")
    feed(cache, 1, g)
    before = copy.deepcopy(cache)
    with pytest.raises(ValueError) as e:
        cache.crop(-2)
    msg = str(e.value)
    for part in ("crop(-2)", "holds 8 tokens", "keep 6", "positions 3..5", "oldest position still held is 4",
                 "rewind=k", "k >= 2"):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert cache.lengths == before.lengths and cache.oldest == before.oldest
    assert all(torch.equal(x, y) for x, y in zip(cache.keys + cache.values, before.keys + before.values, strict=True))
    cache.crop(0)  # a ring that saw nothing needs no slot: always allowed
    assert cache.lengths == [0, 0]
    assert_same(cache, never_saw(cache, lambda: ring(4)), g, "crop(0)")


@pytest.mark.parametrize("k", [2, 4])
def test_ring_rewind_k_drops_k_tokens_not_k_plus_1(k):
    g = torch.Generator().manual_seed(k)
    cache = ring(4, rewind=k)
    feed(cache, 20, g)
    with pytest.raises(ValueError, match=rf"crop\({-(k + 1)}\).*k >= {k + 1}"):
        cache.crop(-(k + 1))
    assert cache.get_seq_length() == 20
    cache.crop(-k)
    assert_same(cache, never_saw(cache, lambda: ring(4)), g, f"{k} tokens dropped")


def test_ring_refused_crop_changes_no_layer():
    """Layer 0 could be cropped, layer 1 cannot: neither changes."""
    g = torch.Generator().manual_seed(2)
    cache = SlidingWindowCache(2, B, KV, D, 4)
    k, v = torch.randn(B, KV, 3, D, generator=g), torch.randn(B, KV, 3, D, generator=g)
    cache.update(k, v, 0)
    cache.update(torch.randn(B, KV, 9, D, generator=g), torch.randn(B, KV, 9, D, generator=g), 1)
    with pytest.raises(ValueError, match=r"layer 1"):
        cache.crop(1)
    assert cache.lengths == [3, 9]


def test_spare_slots_returned_as_past():
    """The ring has window + rewind - 1 slots, but update and window_slots stay at window - 1 past tokens."""
    g = torch.Generator().manual_seed(3)
    spare, plain = SlidingWindowCache(1, B, KV, D, 4, rewind=5), SlidingWindowCache(1, B, KV, D, 4)
    seen = 0
    for t in (6, 1, 3, 1):
        assert spare.window_slots(t) == plain.window_slots(t)
        k, v = torch.randn(B, KV, t, D, generator=g), torch.randn(B, KV, t, D, generator=g)
        (ks, vs), (kp, vp) = spare.update(k, v, 0), plain.update(k, v, 0)
        assert torch.equal(ks, kp) and torch.equal(vs, vp) and ks.shape[2] == min(seen, 3) + t
        seen += t
    assert spare.nbytes() == plain.nbytes() * 8 // 4  # 8 slots against 4, all allocated


def test_for_model_passes_rewind():
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)
    torch.manual_seed(0)
    model = Llama.from_hf(transformers.MistralForCausalLM(cfg).eval())
    cache = SlidingWindowCache.for_model(model, 1, rewind=3)
    assert (cache.window, cache.rewind, cache.slots) == (4, 3, 6) and cache.keys[0].shape == (1, 2, 6, 8)


# ---- the int8 cache ---------------------------------------------------------------------------------------


def test_int8_crop_within_the_residual_miscounts_it():
    """Only residual tokens dropped: int8 part untouched, residual cut."""
    g = torch.Generator().manual_seed(4)
    cache = int8(8)
    feed(cache, 5, g)
    feed(cache, 3, g)
    feed(cache, 2, g)
    cache.crop(6)
    assert (cache.quantized, cache.in_residual) == ([5, 5], [1, 1])
    assert_same(cache, never_saw(cache, lambda: int8(8)), g, "residual cut")


@pytest.mark.parametrize("keep", range(1, 7))
def test_int8_crop_forgets_the_undo_of_the_last_flush(keep):
    """residual=4 holding 2, then 6 tokens flush all 8 into int8. Keeping 1 leaves 3 < 4 tokens after the
    previous flush: the other cache never flushed and holds them exact. Keeping 2..6 leaves >= 4: it flushed."""
    g = torch.Generator().manual_seed(5)
    cache = int8(4)
    feed(cache, 5, g)  # the prefill: int8
    feed(cache, 2, g)  # residual 2
    feed(cache, 6, g)  # 2 + 6 >= 4: flush, quantized 13
    assert cache.quantized == [13, 13]
    cache.crop(7 + keep)
    flushed = 2 + keep >= 4
    assert (cache.quantized[0], cache.in_residual[0]) == ((7 + keep, 0) if flushed else (5, 2 + keep))
    assert_same(cache, never_saw(cache, lambda: int8(4)), g, f"kept {keep} of the flushing update")


def test_int8_crop_back_past_the_flushing_update_into_an_older_residual():
    """Drop the flushing update and part of the residual before it: the exact residual tokens come back."""
    g = torch.Generator().manual_seed(6)
    cache = int8(4)
    feed(cache, 5, g)
    for _ in range(4):  # 1 token each: residual 1, 2, 3, then a flush of 4
        feed(cache, 1, g)
    assert (cache.quantized, cache.in_residual) == ([9, 9], [0, 0])
    cache.crop(-3)
    assert (cache.quantized, cache.in_residual) == ([5, 5], [1, 1])
    assert_same(cache, never_saw(cache, lambda: int8(4)), g, "3 single-token updates dropped")


@pytest.mark.parametrize("keep", [1, 4, 9])
def test_int8_crop_into_the_prefill_takes_it_for_a_residual_flush(keep):
    """The first update quantizes whatever its length: a shorter prefill is int8 too."""
    g = torch.Generator().manual_seed(7)
    cache = int8(16)
    feed(cache, 10, g)
    feed(cache, 3, g)
    cache.crop(keep)
    assert (cache.quantized, cache.in_residual) == ([keep] * 2, [0, 0])
    assert_same(cache, never_saw(cache, lambda: int8(16)), g, f"prefill cut to {keep}")


def test_int8_crop_past_an_earlier_flush_is_refused_and_changes_nothing():
    g = torch.Generator().manual_seed(8)
    cache = int8(4)
    feed(cache, 6, g)
    feed(cache, 5, g)  # flush: quantized 11, last flush from 6
    feed(cache, 2, g)
    before = copy.deepcopy(cache)
    with pytest.raises(ValueError) as e:
        cache.crop(4)
    msg = str(e.value)
    for part in ("crop(4)", "holds 13 tokens", "keep 4", "6..13", "residual=4", "residual=k"):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert (cache.quantized, cache.in_residual) == (before.quantized, before.in_residual)
    for name in ("qk", "qv", "sk", "sv", "rk", "rv"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(cache, name), getattr(before, name), strict=True))
    cache.crop(0)  # a cache that saw nothing: always reachable
    assert cache.lengths == [0, 0]
    assert_same(cache, Int8KVCache(L, B, KV, D, 96, residual=4), g, "crop(0)")


def test_int8_residual_zero_crops_anywhere():
    """residual=0: every update quantizes, one scale per token, so any shorter history is int8 alike; a crop that
    drops the last update whole quantizes nothing (it once requantized 0 tokens and raised)."""
    g = torch.Generator().manual_seed(9)
    cache = int8(0)
    for t in (4, 3, 1, 2):
        feed(cache, t, g)
    for n in (8, 7, 2):  # the last update dropped whole, then the one before, then back into the prefill
        cache.crop(n)
        assert_same(cache, never_saw(cache, lambda: int8(0)), g, f"residual=0, back to {n}")


@pytest.mark.parametrize("residual,k", [(4, 3), (3, 5), (2, 2), (6, 6)])
def test_int8_speculative_rounds_lose_the_undo(residual, k):
    keeps = [1 + (3 * r) % (k + 1) for r in range(4 * (k + 1))]
    speculate(lambda: int8(residual, cap=200), lambda: int8(residual, cap=200), 5, k, keeps)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_int8_draft_cache_fed_k_drafts_rewinds_with_residual_k(k):
    """A draft model's cache: per round the accepted tokens in one call, then k drafts one at a time; it drops
    0..k of them. residual = k never refuses (module docstring's argument); residual = k - 1 does on the worst
    round: residual holding k - 2, k drafts, all rejected."""
    for residual in (k, k + 1):
        g = torch.Generator().manual_seed(10 + k)
        cache = int8(residual, cap=400)
        feed(cache, 4, g)
        for r in range(6 * (k + 1)):
            start = cache.get_seq_length()
            for _ in range(k):
                feed(cache, 1, g)
            cache.crop(start + r % (k + 1))  # 0..k drafts accepted
            assert_same(cache, never_saw(cache, lambda res=residual: int8(res, cap=400)), g,
                        f"residual={residual}, round {r}")
            feed(cache, 1 + r % 2, g)  # the bonus token (and one more, for varied residual fill)
    if k >= 2:
        cache = int8(k - 1)
        g = torch.Generator().manual_seed(0)
        feed(cache, 4, g)
        for _ in range(k - 2):
            feed(cache, 1, g)
        start = cache.get_seq_length()
        for _ in range(k):
            feed(cache, 1, g)
        with pytest.raises(ValueError, match=r"residual=k"):
            cache.crop(start)


# ---- random feeds and crops --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_feeds_and_crops_differ_from_a_cache_that_never_saw_them(seed):
    """Random calls of 1..6 tokens and crops (mostly 0..5 tokens dropped, else to any length). Every crop that succeeds leaves the cache equal
    to one fed the kept calls; every refusal is a clean ValueError that changed nothing, and only where the
    rewind is impossible: for the ring, a position of the rewound window was overwritten (a slot-by-slot
    simulation); for the int8 cache, inside tokens quantized before (residual > 0, 0 < n < quantized)."""
    rnd, g = random.Random(seed), torch.Generator().manual_seed(seed)
    if seed % 2:
        window, rewind = rnd.randint(1, 6), rnd.randint(0, 4)
        cache, plain = ring(window, rewind), lambda: ring(window)
        slot_of: dict[int, int] = {}  # slot -> the position written there last
    else:
        residual = rnd.randint(0, 5)
        cache = int8(residual, cap=200)
        plain = lambda: int8(residual, cap=200)  # noqa: E731
    crops = 0
    for step in range(30):
        seen = cache.get_seq_length()
        if seen == 0 or rnd.random() < 0.6:
            t = rnd.randint(1, 6)
            feed(cache, t, g)
            if seed % 2:
                slot_of.update({p % cache.slots: p for p in range(seen, seen + t)})
            continue
        n = max(0, seen - rnd.randint(0, 5)) if rnd.random() < 0.7 else rnd.randint(0, seen)  # mostly near the end
        before = copy.deepcopy(cache)
        try:
            cache.crop(n)
        except ValueError as e:
            assert str(e).startswith(f"crop({n}) cannot rewind"), e
            if seed % 2:
                held = set(slot_of.values())
                assert not all(p in held for p in range(max(0, n - window + 1), n)), f"step {step}: refused {n}"
                assert cache.lengths == before.lengths
            else:
                assert residual > 0 and 0 < n < cache.quantized[0], f"step {step}: refused {n}"
                assert (cache.quantized, cache.in_residual) == (before.quantized, before.in_residual)
            continue
        crops += 1
        assert_same(cache, never_saw(cache, plain), g, f"seed {seed} step {step}: crop({n}) of {seen}")
    assert crops >= 3


# ---- through the model: greedy speculative rounds, tokens and logits -------------------------------------


def _mistral_llama() -> Llama:
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                     max_position_embeddings=256)
    torch.manual_seed(0)
    return Llama.from_hf(transformers.MistralForCausalLM(cfg).eval())


def _llama() -> Llama:
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    return Llama.from_hf(transformers.LlamaForCausalLM(cfg).eval())


def _greedy_speculation(model, make, make_plain, k: int, new: int, seed: int = 0):
    """Greedy speculative decoding with a drafter that proposes the target's greedy tokens (a full cache's), wrong at
    random places. Returns the tokens, the accepted counts, and the rounds' (input, kept) for a replay."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 97, (1, 9), generator=g)
    ref = generate(model, prompt, new + k, cache=KVCache.for_model(model, 1, 64))[0, 9:]  # (new + k,)
    wrong = torch.rand(new + k, generator=g) < 0.35  # where the drafter misses
    cache = make()
    with torch.no_grad():
        out = [int(model(prompt, cache)[0, -1].argmax())]
        rounds, accepted = [], []
        while len(out) < new:
            drafts = ref[len(out):len(out) + k].clone()
            drafts[wrong[len(out):len(out) + k]] += 1
            x = torch.cat([torch.tensor([out[-1]]), drafts % 97])[None]  # (1, k + 1)
            start = cache.get_seq_length()
            best = model(x, cache)[0].argmax(-1)  # (k + 1,): the target's token after each input
            m = 0
            while m < k and int(x[0, m + 1]) == int(best[m]):
                m += 1
            cache.crop(start + m + 1)
            out += x[0, 1:m + 1].tolist() + [int(best[m])]
            rounds.append((x[:, :m + 1], int(best[m])))
            accepted.append(m)
            # bit for bit through the model: the next token's logits from this cache and from one fed its calls
            probe = torch.tensor([[out[-1]]])
            assert torch.equal(model(probe, copy.deepcopy(cache)), model(probe, never_saw(cache, make_plain))), \
                f"round {len(rounds)}: logits after crop differ from a cache that never saw the rejected drafts"
    return out, accepted, (prompt, rounds)


def _plain_run(model, make, prompt, rounds):
    """The same forward calls, each cut to the tokens speculation kept: a run that never saw a rejected draft."""
    cache = make()
    with torch.no_grad():
        out = [int(model(prompt, cache)[0, -1].argmax())]
        for x, _ in rounds:
            best = model(x, cache)[0].argmax(-1)
            out += x[0, 1:].tolist() + [int(best[-1])]
    return out


@pytest.mark.parametrize("kind", ["ring", "int8"])
def test_greedy_speculation_tokens_differ_after_a_rewind(kind):
    k = 3
    if kind == "ring":
        model = _mistral_llama()
        make = lambda: recording(SlidingWindowCache).for_model(model, 1, rewind=k)  # noqa: E731
        plain = lambda: SlidingWindowCache.for_model(model, 1)  # noqa: E731
    else:
        model = _llama()
        make = lambda: recording(Int8KVCache).for_model(model, 1, 96, residual=k)  # noqa: E731
        plain = lambda: Int8KVCache.for_model(model, 1, 96, residual=k)  # noqa: E731
    out, accepted, (prompt, rounds) = _greedy_speculation(model, make, plain, k, 40)
    assert set(accepted) >= {0, 1, 2}, accepted  # rejections of 3, 2 and 1 drafts all happened
    assert out == _plain_run(model, plain, prompt, rounds)
