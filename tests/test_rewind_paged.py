"""Rewind for the paged caches (issue 24): ``PagedKVCache.crop`` and ``Engine.rewind``.

Speculative decoding verifies k drafted tokens in one forward pass of k + 1 tokens, keeps m + 1 and drops the
rest. The contract tested here: after a rewind and an append of other tokens, a cache holds exactly, bit for bit,
what a cache that never kept the rejected tokens holds; the blocks past the new end go back to the pool; a block
shared with another sequence is never written under it; the engine's rewound request continues to the tokens
``kvcourse.generate`` gives its prompt alone, recomputing only the rewound tokens. Each test is named after the
bug it guards.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvcourse import KVCache, Llama, load_model
from kvcourse.generate import generate
from kvcourse.paged import PagedKVCache, UnknownSequenceError
from kvcourse.serve import Engine, Request, RequestError, SamplingParams
from kvcourse.serve.request import Status


@pytest.fixture(scope="module")
def model():
    hf, _ = load_model(device="cpu")
    return Llama.from_hf(hf)


def kv(b: int, t: int, seed: int, heads: int = 2, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, heads, t, d, generator=g), torch.randn(b, heads, t, d, generator=g)


def books(c: PagedKVCache) -> tuple:
    return ({s: list(t) for s, t in c.tables.items()}, dict(c.lengths), {s: list(v) for s, v in c.layer_lengths.items()},
            list(c.refcount), list(c.free_blocks), list(c.batch))


# ---- PagedKVCache.crop ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("form", ["drop", "keep"])
def test_cropped_cache_still_returns_the_rejected_tokens(block_size, form):
    """Two rows, two layers: prompt 5, a verify chunk of 6 (draft 5 + 1), keep 2 of it, then append 3 others.
    Every ``update`` after the crop returns what a cache fed only the kept tokens returns, and the pool holds
    no more blocks than that cache."""
    layers, batch = 2, ["a", "b"]
    spec = PagedKVCache(layers, 2, 4, num_blocks=32, block_size=block_size)
    plain = PagedKVCache(layers, 2, 4, num_blocks=32, block_size=block_size)
    spec.set_batch(batch)
    plain.set_batch(batch)
    prompt, chunk, after = kv(2, 5, 0), kv(2, 6, 1), kv(2, 3, 2)
    for layer in range(layers):
        spec.update(*prompt, layer)
        plain.update(*prompt, layer)
        spec.update(*chunk, layer)
        plain.update(chunk[0][:, :, :2], chunk[1][:, :, :2], layer)
    spec.crop(-4 if form == "drop" else 7)
    assert spec.lengths == plain.lengths == {"a": 7, "b": 7} and spec.get_seq_length(1) == 7
    assert spec.blocks_in_use() == plain.blocks_in_use() == 2 * -(-7 // block_size), \
        "blocks wholly past the new length must go back to the pool"
    for layer in range(layers):
        got, want = spec.update(*after, layer), plain.update(*after, layer)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"layer {layer} after the crop"
    assert spec.blocks_in_use() == plain.blocks_in_use()


@torch.inference_mode()
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_rejected_draft_tokens_change_the_logits_after_a_crop(model, block_size):
    """The model on a paged cache: verify a 5-token chunk, keep 2 of it, go on with 2 other tokens. The logits
    equal, bit for bit, those of a cache whose chunk had other tokens after the kept 2 (the rejected tokens
    leave no trace) and those of the dense ``KVCache`` cropped the same way."""
    g = torch.Generator().manual_seed(3)
    prompt, chunk = torch.randint(1, 2048, (1, 7), generator=g), torch.randint(1, 2048, (1, 5), generator=g)
    other = chunk.clone()
    other[:, 2:] = torch.randint(1, 2048, (1, 3), generator=g)
    nxt = torch.randint(1, 2048, (1, 2), generator=g)
    logits = []
    for c, drafts, rewind in ((PagedKVCache.for_model(model, num_blocks=32, block_size=block_size), chunk, -3),
                              (PagedKVCache.for_model(model, num_blocks=32, block_size=block_size), other, 9),
                              (KVCache.for_model(model, 1, 32), chunk, -3)):
        model(prompt, c)
        model(drafts, c)
        c.crop(rewind)
        logits.append(model(nxt, c))
    assert torch.equal(logits[0], logits[1]), "the rejected draft tokens changed the logits after the crop"
    assert torch.equal(logits[0], logits[2]), "the paged cache's crop differs from the dense cache's"


@torch.inference_mode()
def test_speculative_loop_on_a_paged_cache_differs_from_greedy(model):
    """A greedy speculative loop (drafts: the right tokens with one wrong one at a seeded place) on a paged
    cache, rewinding after every verification: exactly ``generate``'s tokens, and the pool holds only the
    kept tokens' blocks."""
    prompt = torch.tensor([[5, 99, 342, 17, 1200, 8, 64]])
    n, k, bs = 30, 4, 4
    want = generate(model, prompt, n)[0, prompt.shape[1]:].tolist()
    rng = random.Random(0)
    cache = PagedKVCache.for_model(model, num_blocks=32, block_size=bs)
    out = [int(model(prompt, cache)[0, -1].argmax())]
    rewound = 0
    while len(out) < n:
        drafts = want[len(out):len(out) + k]
        if drafts and rng.random() < 0.7:
            drafts[rng.randrange(len(drafts))] = (drafts[0] + 1) % 2048  # a wrong draft
        logits = model(torch.tensor([[out[-1]] + drafts]), cache)[0]  # (k + 1, V): verify in one pass
        pred = logits.argmax(-1).tolist()
        m = 0
        while m < len(drafts) and drafts[m] == pred[m]:
            m += 1
        out += drafts[:m] + [pred[m]]
        held = prompt.shape[1] + len(out) - 1  # the new last token is not in the cache yet
        cache.crop(held)  # keep-form: crop(-0) would be crop(0), which keeps nothing
        rewound += len(drafts) - m
        assert cache.get_seq_length() == held and cache.blocks_in_use() == -(-held // bs)
    assert rewound > 0, "the drafts were never wrong: the test rewound nothing"
    assert out[:n] == want


def test_shared_block_written_under_the_other_sequence_after_a_crop():
    """Parent and child share a 4-token prompt (one full block of 4). The child drafts 3 tokens, rewinds into the
    shared block (keeps 2), and appends: the parent's keys and values stay bit for bit, its block stays at 2
    references until the child's append copies it, and the child reads the 2 kept tokens, then its own."""
    c = PagedKVCache(1, 2, 4, num_blocks=8, block_size=4)
    c.set_batch(["parent"])
    c.update(*kv(1, 4, 0), 0)
    parent_keys = c.update(*kv(1, 1, 1), 0)  # the parent goes on to 5 tokens (a second block)
    parent_block = c.tables["parent"][0]
    c.crop(4)  # back to the shared prompt: the parent's second block goes
    c.fork("parent", "child")
    c.set_batch(["child"])
    c.update(*kv(1, 3, 2), 0)  # the child drafts 3 tokens into a block of its own
    c.crop(2)  # keeps 2 of the shared prompt's tokens
    assert c.tables["child"] == [parent_block] and c.refcount[parent_block] == 2, \
        "the kept shared block must stay shared (one reference each), not be released or taken"
    mine = kv(1, 3, 3)
    k, v = c.update(*mine, 0)
    assert c.tables["child"][0] != parent_block and c.refcount[parent_block] == 1, "no copy on write after the crop"
    assert torch.equal(k[:, :, :2], parent_keys[0][:, :, :2]) and torch.equal(k[:, :, 2:], mine[0])
    c.set_batch(["parent"])
    assert c.layer_lengths["parent"] == [4]
    again = c.update(*kv(1, 1, 1), 0)
    assert torch.equal(again[0], parent_keys[0]) and torch.equal(again[1], parent_keys[1]), \
        "the child's append after its crop changed the parent's tokens"


def test_crop_frees_a_block_the_other_sequence_still_holds():
    """Blocks of 2: parent 4 tokens (2 full blocks), fork, the child appends 3 and crops to 1. The child's own
    block goes back to the pool; the second shared block loses the child's reference but stays the parent's."""
    c = PagedKVCache(1, 2, 4, num_blocks=8, block_size=2)
    c.set_batch(["parent"])
    c.update(*kv(1, 4, 0), 0)
    shared = list(c.tables["parent"])
    c.fork("parent", "child")
    c.set_batch(["child"])
    c.update(*kv(1, 3, 1), 0)
    own = c.tables["child"][2:]
    c.crop(1)
    assert c.tables["child"] == shared[:1] and c.refcount[shared[0]] == 2 and c.refcount[shared[1]] == 1
    assert all(c.refcount[b] == 0 and b in c.free_blocks for b in own), "the child's own blocks were not freed"
    assert shared[1] not in c.free_blocks, "a block the parent still holds went back to the pool"
    assert c.blocks_in_use() == 2
    c.free("child")
    c.free("parent")
    assert c.blocks_in_use() == 0 and sorted(c.free_blocks) == list(range(8)), "the pool leaks after a crop"


@pytest.mark.parametrize("bad, kind, words", [
    (-6, ValueError, ("-6", "'b'", "5")), (6, ValueError, ("crop(6)", "5")), (2.0, TypeError, ("2.0", "int")),
    (True, TypeError, ("True",)), (None, TypeError, ("None",))])
def test_bad_crop_changes_some_rows(bad, kind, words):
    """All or nothing: sequence 'a' holds 7 tokens, 'b' 5 (set_batch over both); a crop that fits 'a' but not
    'b' must change neither."""
    c = PagedKVCache(1, 2, 4, num_blocks=8, block_size=2)
    c.set_batch(["a"])
    c.update(*kv(1, 7, 0), 0)
    c.set_batch(["b"])
    c.update(*kv(1, 5, 1), 0)
    c.set_batch(["a", "b"])
    before = books(c)
    with pytest.raises(kind) as err:
        c.crop(bad)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert books(c) == before, "a refused crop changed the books"


def test_crop_in_the_middle_of_a_step_leaves_layers_unequal():
    c = PagedKVCache(2, 2, 4, num_blocks=8, block_size=2)
    c.set_batch(["a"])
    for layer in (0, 1):
        c.update(*kv(1, 4, 0), layer)
    c.update(*kv(1, 1, 1), 0)  # layer 0 is one token ahead: the middle of a step
    before = books(c)
    with pytest.raises(ValueError, match=r"middle of a step.*\[5, 4\]"):
        c.crop(-1)
    assert books(c) == before
    c.crop(3)  # a length brings every layer to it
    assert c.layer_lengths["a"] == [3, 3] and c.lengths["a"] == 3 and c.blocks_in_use() == 2


def test_crop_of_a_freed_sequence_is_silent():
    """Rewinding one sequence is set_batch([it]) then crop; a freed one is refused by name, nothing changed."""
    c = PagedKVCache(1, 2, 4, num_blocks=8, block_size=2)
    c.set_batch(["a", "b"])
    c.update(*kv(2, 3, 0), 0)
    c.free("b")
    before = books(c)
    with pytest.raises(UnknownSequenceError, match="'b'"):
        c.set_batch(["b"])
    assert books(c) == before
    c.crop(-1)
    assert c.lengths == {"a": 2} and c.blocks_in_use() == 1
    empty = PagedKVCache(1, 2, 4, num_blocks=2, block_size=2)
    empty.crop(0)
    with pytest.raises(ValueError, match="holds 0 tokens"):
        empty.crop(-1)


# ---- Engine.rewind -------------------------------------------------------------------------------------------------
_ALONE: dict[tuple, list[int]] = {}


def alone(model, prompt: list[int], n: int) -> list[int]:
    key = (tuple(prompt), n)
    if key not in _ALONE:
        _ALONE[key] = generate(model, torch.tensor([prompt]), n)[0, len(prompt):].tolist()
    return _ALONE[key]


def three_requests() -> list[Request]:
    """Three requests, two sharing a 12-token system prompt (prefix hits in blocks of 4)."""
    rng = random.Random(24)
    system = [rng.randrange(1, 2048) for _ in range(12)]
    own = [[rng.randrange(1, 2048) for _ in range(n)] for n in (5, 9, 6)]
    return [Request("a", system + own[0], 22), Request("b", own[1], 24), Request("c", system + own[2], 20)]


def per_request_forward(eng: Engine) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in eng.stats.history:
        for rid, n, _ in rec.requests:
            out[rid] = out.get(rid, 0) + n
    return out


def serve(model, rewind: tuple[str, int, int] | None = None, *, block_size: int = 4) -> Engine:
    """Run the three requests; ``rewind = (id, after that many of its tokens, by how many)``."""
    eng = Engine(model, num_blocks=64, block_size=block_size, max_num_batched_tokens=64, prefix_caching=True)
    a, b, c = three_requests()
    eng.add_request(a)
    eng.add_request(b)
    eng.step()  # 'a''s prompt blocks are named now: 'c' will find its system prompt there
    eng.add_request(c)
    done = False
    while eng.has_unfinished():
        eng.step()
        if rewind and not done and len(eng.requests[rewind[0]].output) == rewind[1]:
            req = eng.requests[rewind[0]]
            used = eng.block_manager.num_used_blocks
            before = len(req.block_table)
            eng.rewind(rewind[0], rewind[2])
            keep = eng.block_manager.blocks_for(req.num_tokens - 1)
            assert req.num_computed_tokens == req.num_tokens - 1 and len(req.block_table) == keep, \
                "the rewound request must keep exactly the blocks of the tokens before its new last one"
            assert eng.block_manager.num_used_blocks == used - (before - keep), "released blocks are still held"
            done = True
    assert not rewind or done, "the rewind never happened"
    return eng


@pytest.mark.parametrize("rid, after, by", [("b", 14, 1), ("b", 14, 4), ("b", 14, 11), ("c", 10, 9)],
                         ids=["one-token", "one-block", "several-blocks", "the-request-with-a-prefix-hit"])
def test_rewound_request_differs_from_its_prompt_alone(model, rid, after, by):
    """A batch of 3 with prefix caching ('c' finds 'a''s system prompt); one request is rewound by ``by`` tokens
    after its ``after``-th (blocks of 4: by 4 crosses exactly one block boundary, by 11 several) and continues.
    Every request's greedy tokens equal ``kvcourse.generate`` alone, and the forward passes computed exactly ``by``
    tokens more, all of them the rewound request's."""
    base = serve(model)
    eng = serve(model, (rid, after, by))
    for other, r in eng.requests.items():
        assert r.status is Status.FINISHED and r.output == alone(model, r.prompt, r.max_new_tokens), other
        assert len(r.token_times) == len(r.output), f"{other}: the rewound tokens' timestamps are still there"
        assert r.output == base.requests[other].output
    assert eng.stats.prefix_hit_tokens == base.stats.prefix_hit_tokens > 0, "the workload should hit the prefix cache"
    assert eng.stats.rewound_tokens == by
    assert eng.stats.forward_tokens == base.stats.forward_tokens + by, "more than the rewound tokens were recomputed"
    got, want = per_request_forward(eng), per_request_forward(base)
    assert got == {**want, rid: want[rid] + by}, "the other requests' work changed, or the rewound one recomputed more"
    assert eng.block_manager.num_used_blocks == 0


def test_released_blocks_lose_their_right_names(model):
    """The blocks a rewind releases still hold the keys and values of the tokens they were named for, so they keep
    their names (as ``BlockManager.free`` keeps them). A sampled request fills 5 blocks of 4 (8 prompt + 12
    generated tokens), is rewound to exactly 3 full blocks and draws other tokens. A later greedy prompt made of
    its old 20 tokens finds all 5 blocks (19 tokens: its last is computed anyway), the 2 released ones included,
    and gets ``kvcourse.generate``'s tokens."""
    eng = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=64, prefix_caching=True)
    a = eng.add_request(request_id="a", prompt=[11, 200, 7, 1500, 42, 9, 300, 18], max_new_tokens=16,
                        sampling=SamplingParams(temperature=1.5, seed=4))
    while len(a.output) < 13:
        eng.step()
    old = a.tokens[:20]
    eng.rewind("a", 8)  # 13 known tokens, 12 kept: 3 full blocks, the 4th and 5th released
    assert len(a.block_table) == 3 and len(eng.block_manager.match_prefix(old)) == 5
    while eng.has_unfinished():
        eng.step()
    assert a.tokens[:14] != old[:14], "the request drew the same token again: the test shows nothing (change the seed)"
    d = eng.add_request(request_id="d", prompt=old, max_new_tokens=5)
    while eng.has_unfinished():
        eng.step()
    assert d.num_cached_tokens == 19, f"found {d.num_cached_tokens} of the 20 tokens cached, not 19"
    assert d.output == alone(model, old, 5)


def test_rewind_of_every_generated_token_misses_the_prompt_end(model):
    """Rewinding all of 'a''s tokens: it recomputes its last prompt token (1 token) and starts again."""
    base = serve(model)
    eng = serve(model, ("a", 3, 3))
    assert eng.requests["a"].output == alone(model, eng.requests["a"].prompt, 22)
    assert eng.stats.forward_tokens == base.stats.forward_tokens + 3


def test_preempted_request_rewound_keeps_its_tokens(model):
    """A waiting request that was preempted (no blocks) is rewound: only its tokens go; readmitted, it
    recomputes what is left and ends with generate's tokens."""
    reqs = [Request(f"p{i}", [(37 * i + 5 * j) % 2000 + 1 for j in range(9)], 16) for i in range(4)]
    eng = Engine(model, num_blocks=12, block_size=4, max_num_batched_tokens=64)
    for r in reqs:
        eng.add_request(r)
    victim = None
    while eng.has_unfinished() and victim is None:
        eng.step()
        victim = next((r for r in eng.scheduler.waiting if r.output and not r.block_table), None)
    assert victim is not None, "no request was preempted: the pool is too roomy for this test"
    free = eng.block_manager.num_free_blocks
    made = len(victim.output)
    eng.rewind(victim.request_id, made - 1)
    assert victim.output and len(victim.output) == 1 and victim.num_computed_tokens == 0
    assert eng.block_manager.num_free_blocks == free and victim.status is Status.WAITING
    while eng.has_unfinished():
        eng.step()
    for r in reqs:
        assert r.output == alone(model, r.prompt, 16), r.request_id
        assert len(r.token_times) == len(r.output) and r.first_token_time == r.token_times[0], \
            f"{r.request_id}: a timestamp per token, the rewound ones' gone"


def test_stale_prefix_hit_after_a_rewind(model):
    """A sampled request fills 4 blocks of 4 (8 prompt + 8 generated tokens, each named), is rewound by 7, so its
    3rd block is kept partly filled, then draws other tokens. A later greedy prompt equal to its old first 16
    tokens must find only the 2 prompt blocks: the 3rd block's old name must be gone before it is rewritten."""
    prompt = [11, 200, 7, 1500, 42, 9, 300, 18]
    eng = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=64, prefix_caching=True)
    a = eng.add_request(request_id="a", prompt=prompt, max_new_tokens=14,
                        sampling=SamplingParams(temperature=1.5, seed=4))
    while len(a.output) < 9:
        eng.step()
    old = a.tokens[:16]
    bm = eng.block_manager
    assert len(bm.match_prefix(old)) == 4
    third = a.block_table[2]
    eng.rewind("a", 7)  # 10 known tokens, 9 kept: block 3 holds 1 of its 4
    assert a.block_hashes == a.block_hashes[:2] and len(a.block_table) == 3 and a.block_table[2] == third
    assert len(bm.match_prefix(old)) == 2 and bm.blocks[third].hash is None, \
        "the partly kept block keeps a name it will no longer deserve"
    while eng.has_unfinished():
        eng.step()
    assert a.tokens[:16] != old, "the request drew the same tokens again: the test shows nothing (change the seed)"
    c = eng.add_request(request_id="c", prompt=old, max_new_tokens=6)
    while eng.has_unfinished():
        eng.step()
    assert c.num_cached_tokens == 8, f"the later prompt found {c.num_cached_tokens} tokens cached, not the 8 of " \
                                     f"its 2 unchanged blocks"
    assert c.output == alone(model, old, 6)


def test_rewind_writes_into_a_block_another_request_holds(model):
    """'late' reuses the two full prompt blocks of 'first' (prefix hit). 'first' is rewound by all its tokens, so
    its last prompt token, in a block both hold, is computed again: that block must be copied first, and 'late''s
    blocks stay bit for bit; both end with generate's tokens."""
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    eng = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=64, prefix_caching=True)
    first = eng.add_request(request_id="first", prompt=prompt, max_new_tokens=10)
    for _ in range(3):
        eng.step()
    late = eng.add_request(request_id="late", prompt=prompt + [500, 600], max_new_tokens=10)
    eng.step()
    assert late.num_cached_tokens == 8 and late.block_table[:2] == first.block_table[:2]
    shared = late.block_table[:2]
    pool = (eng.runner.k_pool[:, shared].clone(), eng.runner.v_pool[:, shared].clone())
    eng.rewind("first", len(first.output))
    assert first.num_computed_tokens == 7 and first.block_table == shared
    assert [eng.block_manager.blocks[b].ref_count for b in shared] == [2, 2], "a shared block lost a reference"
    assert eng.block_manager.blocks[shared[1]].hash is not None, "a shared block's name is still right for 'late'"
    while eng.has_unfinished():
        eng.step()
    assert torch.equal(eng.runner.k_pool[:, shared], pool[0]) and torch.equal(eng.runner.v_pool[:, shared], pool[1]), \
        "the rewound request wrote into a block another request holds"
    assert first.output == alone(model, prompt, 10) and late.output == alone(model, late.prompt, 10)


def test_bad_rewind_changes_the_request(model):
    eng = Engine(model, num_blocks=32, block_size=4)
    r = eng.add_request(request_id="r", prompt=[5, 6, 7, 8, 9], max_new_tokens=4)
    with pytest.raises(RequestError, match=r"'r' has generated no token yet.*prompt.*num_tokens=1"):
        eng.rewind("r", 1)  # waiting, nothing generated: the prompt is never rewound
    eng.step()
    eng.step()

    def state():
        return (list(r.output), r.num_computed_tokens, list(r.block_table), list(r.block_hashes), list(r.token_times),
                eng.block_manager.num_free_blocks, eng.stats.rewound_tokens)

    before = state()
    for bad, words in ((3, ("generated 2", "1..2", "3")), (0, ("1..2", "0")), (-1, ("-1",)), (1.0, ("1.0",)),
                       (True, ("True",))):
        with pytest.raises(RequestError) as err:
            eng.rewind("r", bad)
        assert all(w in str(err.value) for w in words), str(err.value)
        assert state() == before, f"a refused rewind({bad!r}) changed the request"
    with pytest.raises(RequestError, match="no request 'zz'.*'r'"):
        eng.rewind("zz", 1)
    while eng.has_unfinished():
        eng.step()
    with pytest.raises(RequestError, match="'r' has finished"):
        eng.rewind("r", 1)
