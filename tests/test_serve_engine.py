"""The serving engine (kvcourse.serve, issue 23): the oracle, the scheduler, the prefix cache, bad input.

The oracle: in float32, every greedy request gets exactly the tokens ``kvcourse.generate.generate`` gives for
its prompt alone, whatever the arrival order, batch mix, token budget, preemptions and prefix hits. Each
test is named after the bug it guards; mechanism tests check what was reused or computed, not only tokens.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcourse import Llama, load_model
from kvcourse.generate import generate
from kvcourse.serve import BlockManager, Engine, Request, RequestError, SamplingParams, Scheduler, block_hash
from kvcourse.serve.request import Status

_REFERENCE: dict[tuple, list[int]] = {}


@pytest.fixture(scope="module")
def model():
    hf, _ = load_model(device="cpu")
    return Llama.from_hf(hf)


def alone(model, prompt: list[int], n: int) -> list[int]:
    """kvcourse.generate's greedy tokens for this prompt alone (memoised: prompts repeat across tests)."""
    key = (id(model), tuple(prompt), n)
    if key not in _REFERENCE:
        _REFERENCE[key] = generate(model, torch.tensor([prompt]), n)[0, len(prompt):].tolist()
    return _REFERENCE[key]


def workload(seed: int, n: int, vocab: int = 2048, shared: int = 40, max_prompt: int = 70, max_new: int = 24):
    """Seeded requests; every other one starts with the same 'system prompt' of ``shared`` tokens."""
    rng = random.Random(seed)
    system = [rng.randrange(1, vocab) for _ in range(shared)]
    reqs = []
    for i in range(n):
        own = [rng.randrange(1, vocab) for _ in range(rng.randrange(1, max_prompt))]
        reqs.append(Request(f"s{seed}r{i}", (system if i % 2 else []) + own, rng.randrange(1, max_new)))
    return reqs


def assert_oracle(model, reqs, outs) -> None:
    wrong = [r.request_id for r in reqs if outs[r.request_id].tokens != alone(model, r.prompt, r.max_new_tokens)]
    assert not wrong, f"greedy tokens differ from kvcourse.generate alone for {wrong}"


# ---- the oracle ------------------------------------------------------------------------------------------------
CONFIGS = [  # (seed, requests, num_blocks, block_size, token budget, max_num_seqs, prefix caching)
    (0, 10, 64, 16, 256, 64, True),  # roomy: continuous batching alone
    (1, 12, 24, 8, 48, 8, True),  # tight pool: preemption
    (2, 12, 40, 4, 7, 16, True),  # a budget of 7 tokens: chunked prefill everywhere
    (3, 10, 30, 16, 32, 3, False),  # no prefix cache, 3 running at most
    (4, 14, 18, 8, 64, 64, True),  # very tight pool: repeated preemption with prefix hits on recompute
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"seed{c[0]}" for c in CONFIGS])
def test_greedy_tokens_differ_from_the_prompt_alone_under_batching(model, cfg):
    seed, n, blocks, bs, budget, seqs, prefix = cfg
    reqs = workload(seed, n)
    eng = Engine(model, num_blocks=blocks, block_size=bs, max_num_batched_tokens=budget, max_num_seqs=seqs,
                 prefix_caching=prefix)
    outs = eng.run(reqs)
    assert sorted(outs) == sorted(r.request_id for r in reqs)
    assert all(o.finish_reason == "length" and len(o.tokens) == r.max_new_tokens for r, o in
               zip(reqs, (outs[r.request_id] for r in reqs), strict=True))
    assert_oracle(model, reqs, outs)
    assert eng.block_manager.num_used_blocks == 0, "finished requests left blocks held"
    assert all(rec.num_tokens <= budget for rec in eng.stats.history), "a step went over the token budget"


def test_workload_configs_exercise_preemption_chunking_and_prefix_hits(model):
    """The oracle above means something only if its configs really preempt, chunk and hit."""
    runs = {}
    for cfg in (CONFIGS[1], CONFIGS[2], CONFIGS[4]):
        seed, n, blocks, bs, budget, seqs, prefix = cfg
        eng = Engine(model, num_blocks=blocks, block_size=bs, max_num_batched_tokens=budget, max_num_seqs=seqs,
                     prefix_caching=prefix)
        eng.run(workload(seed, n))
        runs[seed] = eng.stats
    assert runs[1].preemptions > 0 and runs[4].preemptions > 0
    assert runs[1].prefix_hit_tokens > 0
    chunked = [rid for rec in runs[2].history for rid, k, kind in rec.requests if kind == "prefill" and k < 7]
    assert chunked and max(rec.num_tokens for rec in runs[2].history) == 7


@pytest.mark.parametrize("order_seed", [1, 2])
def test_arrival_order_changes_tokens(model, order_seed):
    reqs = workload(7, 9)
    random.Random(order_seed).shuffle(reqs)
    outs = Engine(model, num_blocks=20, block_size=8, max_num_batched_tokens=40, max_num_seqs=6).run(reqs)
    assert_oracle(model, reqs, outs)


def test_random_gqa_model_tokens_differ_from_generate():
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=24, max_position_embeddings=256)
    torch.manual_seed(5)
    hf = LlamaForCausalLM(cfg).eval()
    reqs = workload(11, 8, vocab=101, shared=12)
    outs = Engine(hf, num_blocks=30, block_size=4, max_num_batched_tokens=20, max_num_seqs=8).run(reqs)
    assert_oracle(Llama.from_hf(hf), reqs, outs)


# ---- continuous batching, release, chunked prefill ------------------------------------------------------------
def test_request_added_mid_run_never_joins_the_running_batch(model):
    eng = Engine(model, num_blocks=64, block_size=8, max_num_batched_tokens=64)
    a = eng.add_request(request_id="a", prompt=list(range(5, 25)), max_new_tokens=20)
    for _ in range(4):
        eng.step()
    b = eng.add_request(request_id="b", prompt=list(range(100, 130)), max_new_tokens=5)
    eng.step()
    rec = eng.stats.history[-1]
    assert dict((rid, kind) for rid, _, kind in rec.requests) == {"a": "decode", "b": "prefill"}, \
        "a request that arrived while another decoded should join its batch (one forward pass, both requests)"
    while eng.has_unfinished():
        eng.step()
    for r in (a, b):
        assert r.output == alone(model, r.prompt, r.max_new_tokens)


def test_finished_request_keeps_its_blocks_until_a_later_step(model):
    eng = Engine(model, num_blocks=32, block_size=4, prefix_caching=False)
    eng.add_request(request_id="short", prompt=list(range(1, 10)), max_new_tokens=2)
    eng.add_request(request_id="long", prompt=list(range(1, 6)), max_new_tokens=12)
    done = []
    while not done:
        used_before = eng.block_manager.num_used_blocks
        done = eng.step()
    assert [o.request_id for o in done] == ["short"]
    long_blocks = len(eng.requests["long"].block_table)
    assert eng.block_manager.num_used_blocks == long_blocks < used_before, \
        "the finished request's blocks must be back in the pool when step() returns"


def test_long_prompt_stalls_decoding_requests_without_chunking(model):
    eng = Engine(model, num_blocks=64, block_size=8, max_num_batched_tokens=16)
    eng.add_request(request_id="dec", prompt=list(range(3, 11)), max_new_tokens=30)
    eng.step()
    eng.add_request(request_id="long", prompt=[(7 * i) % 2000 + 1 for i in range(120)], max_new_tokens=3)
    while eng.requests["long"].first_token_time is None:
        eng.step()
    steps = [rec for rec in eng.stats.history if any(rid == "long" for rid, _, _ in rec.requests)]
    assert len(steps) >= 120 // 15, "a 120-token prompt under a 16-token budget takes at least 8 steps"
    for rec in steps:
        kinds = {rid: (k, kind) for rid, k, kind in rec.requests}
        assert kinds["dec"] == (1, "decode"), "every chunk step must also decode the running request"
        assert kinds["long"][0] <= 15
    while eng.has_unfinished():
        eng.step()
    for rid in ("dec", "long"):
        r = eng.requests[rid]
        assert r.output == alone(model, r.prompt, r.max_new_tokens)


def test_each_token_computed_more_than_once_without_preemption(model):
    reqs = workload(21, 8)
    eng = Engine(model, num_blocks=200, block_size=16, max_num_batched_tokens=64, prefix_caching=False)
    outs = eng.run(reqs)
    assert eng.stats.preemptions == 0
    expected = sum(len(r.prompt) + len(outs[r.request_id].tokens) - 1 for r in reqs)
    assert eng.stats.forward_tokens == expected == eng.runner.forward_tokens, \
        "each prompt token and each generated token but the last goes through the model exactly once"


def test_eos_does_not_stop_and_release(model):
    prompt = list(range(40, 60))
    ref = alone(model, prompt, 12)
    eos = ref[4]
    first = ref.index(eos)
    eng = Engine(model, num_blocks=16, block_size=8)
    out = eng.run([Request("e", prompt, 12, eos_token_id=[2047, eos])])["e"]
    assert out.tokens == ref[:first + 1] and out.finish_reason == "eos"
    assert eng.block_manager.num_used_blocks == 0


def test_timestamps_out_of_order(model):
    reqs = workload(3, 4)
    outs = Engine(model, num_blocks=64, block_size=8).run(reqs, arrivals=[0.0, 0.0, 0.02, 0.05])
    for r, a in zip(reqs, [0.0, 0.0, 0.02, 0.05], strict=True):
        o = outs[r.request_id]
        assert o.arrival_time == a
        assert a <= o.first_token_time == o.token_times[0] <= o.token_times[-1] == o.finish_time
        assert len(o.token_times) == len(o.tokens) and o.ttft >= 0
        assert all(g >= 0 for g in o.inter_token_times)


# ---- preemption ------------------------------------------------------------------------------------------------
def test_preempted_request_loses_its_generated_tokens(model):
    """Two requests that outgrow a 6-block pool: the newer is preempted, recomputed from prompt + its own
    tokens, and ends with the tokens it would have had alone."""
    eng = Engine(model, num_blocks=6, block_size=4, max_num_batched_tokens=64, prefix_caching=False)
    a = eng.add_request(request_id="old", prompt=list(range(1, 9)), max_new_tokens=12)
    b = eng.add_request(request_id="new", prompt=list(range(50, 58)), max_new_tokens=12)
    seen_before = None
    while eng.has_unfinished():
        eng.step()
        if eng.stats.preemptions and seen_before is None:
            seen_before = list(b.output)
            assert b.status is Status.WAITING and eng.scheduler.waiting[0] is b, \
                "the preempted request goes back to the FRONT of the queue"
            assert a.status is Status.RUNNING, "the newest running request is the one preempted"
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert seen_before and b.output[:len(seen_before)] == seen_before, "a preemption dropped generated tokens"
    assert a.output == alone(model, a.prompt, 12) and b.output == alone(model, b.prompt, 12)


def test_scheduler_preempts_the_oldest_running_request():
    bm = BlockManager(num_blocks=4, block_size=2, prefix_caching=False)
    sch = Scheduler(bm, max_num_batched_tokens=16, max_num_seqs=8)
    old, new = Request("old", [1, 2, 3, 4], 9), Request("new", [5, 6, 7, 8], 9)
    for r in (old, new):
        sch.add(r)
    first = sch.schedule()
    assert [(r.request_id, n) for r, n in first.items] == [("old", 4), ("new", 4)]
    for r, n in first.items:  # as the engine does: computed, then one sampled token each
        r.num_computed_tokens += n
        r.output.append(7)
    second = sch.schedule()  # both need slot 4, i.e. a third block each, and none is free
    assert [r.request_id for r in second.preempted] == ["new"]
    assert [(r.request_id, n) for r, n in second.items] == [("old", 1)]
    assert new.num_computed_tokens == 0 and new.tokens == [5, 6, 7, 8, 7] and not new.block_table
    assert bm.num_free_blocks == 4 - len(old.block_table)


def test_scheduler_admits_past_a_waiting_request_that_does_not_fit():
    """FCFS: a small request never overtakes the first waiting request."""
    bm = BlockManager(num_blocks=4, block_size=4, prefix_caching=False)
    sch = Scheduler(bm, max_num_batched_tokens=64)
    sch.add(Request("running", list(range(1, 9)), 4))
    sch.schedule()
    sch.add(Request("big", list(range(1, 13)), 1))  # needs 3 blocks, 2 are free
    sch.add(Request("small", [1, 2], 1))  # would fit
    batch = sch.schedule()
    assert [r.request_id for r in batch.admitted] == []
    assert [r.request_id for r in sch.waiting] == ["big", "small"]


# ---- the prefix cache ------------------------------------------------------------------------------------------
def test_prefix_cache_never_reuses_a_shared_system_prompt(model):
    system = [(11 * i) % 1999 + 1 for i in range(37)]
    eng = Engine(model, num_blocks=64, block_size=8)
    eng.run([Request("first", system + [5, 6, 7], 4)])
    before = eng.stats.forward_tokens
    out = eng.run([Request("second", system + [9, 10], 4)])["second"]
    assert out.num_cached_tokens == 32, "37 shared tokens hold 4 full blocks of 8: 32 tokens from the cache"
    assert eng.stats.forward_tokens - before == 39 - 32 + 3, "only the 7 uncached prompt tokens are computed"
    assert out.tokens == alone(model, system + [9, 10], 4)


def test_block_hash_unchained_collides_at_another_depth():
    a, b = (1, 2, 3, 4), (5, 6, 7, 8)
    assert block_hash(None, b) != block_hash(block_hash(None, a), b)
    assert block_hash(block_hash(None, a), b) == block_hash(block_hash(None, a), list(b))
    bm = BlockManager(num_blocks=8, block_size=4)
    r = Request("x", list(a + b), 1)
    cached, hit = bm.can_admit(r, 8)
    bm.admit(r, cached, hit)
    bm.prepare_write(r, 8)
    r.num_computed_tokens = 8
    bm.register_full_blocks(r)
    assert bm.match_prefix(list(a + b)) == r.block_table
    assert bm.match_prefix(list(b + a)) == [], "block b after a is not block b at depth 0"
    assert bm.match_prefix(list(a) + [5, 6, 7, 9]) == r.block_table[:1]


def test_fully_cached_prompt_crashes_or_skips_its_last_token(model):
    """nano-vllm issue 144: a prompt whose blocks are all cached has nothing left to prefill; its last
    token must still be computed, since its logits give the first new token."""
    prompt = [(13 * i) % 1999 + 1 for i in range(32)]  # exactly 4 blocks of 8
    eng = Engine(model, num_blocks=32, block_size=8)
    eng.run([Request("one", prompt, 6)])
    before = eng.stats.forward_tokens
    out = eng.run([Request("two", prompt, 6)])["two"]
    assert out.num_cached_tokens == 31
    assert eng.stats.forward_tokens - before == 1 + 5, "the last prompt token, then 5 decode tokens"
    assert out.tokens == alone(model, prompt, 6)


def test_append_into_a_shared_block_changes_the_other_request(model):
    """Two requests with the same fully cached prompt run together: the second recomputes the last token,
    which lies in a block the first still holds, so it must copy that block first."""
    prompt = [(17 * i) % 1999 + 1 for i in range(24)]
    eng = Engine(model, num_blocks=32, block_size=8)
    eng.run([Request("warm", prompt, 2)])
    eng.add_request(request_id="a", prompt=prompt, max_new_tokens=8)
    eng.step()  # "a" alone holds the cached blocks: it recomputes its last prompt token in place
    a = eng.requests["a"]
    shared = a.block_table[2]
    eng.add_request(request_id="b", prompt=prompt, max_new_tokens=8)
    k_before = eng.runner.k_pool[:, shared].clone()
    eng.step()
    b = eng.requests["b"]
    assert b.block_table[:2] == a.block_table[:2], "the first two blocks stay shared"
    assert b.block_table[2] != shared, "b wrote into a block that a holds: copy on write"
    assert torch.equal(eng.runner.k_pool[:, shared], k_before), "b's write changed the block a reads"
    while eng.has_unfinished():
        eng.step()
    assert a.output == b.output == alone(model, prompt, 8)


def test_freed_blocks_evicted_most_recently_used_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    reqs = []
    for name, toks in (("a", [1, 2, 3, 4]), ("b", [5, 6, 7, 8])):
        r = Request(name, toks, 1)
        cached, hit = bm.can_admit(r, 4)
        bm.admit(r, cached, hit)
        bm.prepare_write(r, 4)
        r.num_computed_tokens = 4
        bm.register_full_blocks(r)
        reqs.append((r, list(r.block_table)))
    for r, _ in reqs:
        bm.free(r)
    assert bm.num_free_blocks == 4 and bm.match_prefix([1, 2, 3, 4]) and bm.match_prefix([5, 6, 7, 8])
    c = Request("c", [9, 9], 1)
    bm.admit(c, [], 0)
    bm.prepare_write(c, 2)  # one block: evicts the least recently freed, a's deepest block (freed last first)
    assert c.block_table == [reqs[0][1][1]]
    assert len(bm.match_prefix([1, 2, 3, 4])) == 1 and len(bm.match_prefix([5, 6, 7, 8])) == 2


# ---- sampling ------------------------------------------------------------------------------------------------
def test_seeded_sampled_request_changes_with_its_batch(model):
    def sampled():
        return Request("s", list(range(30, 50)), 16, sampling=SamplingParams(temperature=0.9, top_k=40, seed=123))

    alone_out = Engine(model, num_blocks=16, block_size=8).run([sampled()])["s"].tokens
    busy = workload(31, 7) + [sampled()]
    busy_out = Engine(model, num_blocks=40, block_size=4, max_num_batched_tokens=24,
                      max_num_seqs=5).run(busy)["s"].tokens
    assert alone_out == busy_out
    other = Engine(model, num_blocks=16, block_size=8).run(
        [Request("s", list(range(30, 50)), 16, sampling=SamplingParams(temperature=0.9, top_k=40, seed=124))])
    assert other["s"].tokens != alone_out, "another seed should draw other tokens (or the seed is ignored)"


# ---- bad input -----------------------------------------------------------------------------------------------
BAD = [
    (dict(request_id="huge", prompt=list(range(1, 60)), max_new_tokens=10), ["'huge'", "68", "64"]),
    (dict(request_id="zero", prompt=[1, 2], max_new_tokens=0), ["'zero'", "max_new_tokens", ">= 1", "0"]),
    (dict(request_id="neg", prompt=[1, 2], max_new_tokens=-3), ["'neg'", "-3"]),
    (dict(request_id="vocab", prompt=[1, 2048, 5], max_new_tokens=2), ["'vocab'", "0..2047", "2048"]),
    (dict(request_id="neg-id", prompt=[-1, 3], max_new_tokens=2), ["'neg-id'", "-1"]),
    (dict(request_id="empty", prompt=[], max_new_tokens=2), ["'empty'", "empty"]),
    (dict(request_id="floats", prompt=[1.0, 2.0], max_new_tokens=2), ["'floats'", "int token ids"]),
    (dict(request_id="eos", prompt=[1, 2], max_new_tokens=2, eos_token_id=5000), ["'eos'", "5000"]),
]


@pytest.mark.parametrize("kwargs,words", BAD, ids=[b[0]["request_id"] for b in BAD])
def test_bad_request_raises_a_raw_error_or_changes_state(model, kwargs, words):
    eng = Engine(model, num_blocks=8, block_size=8)  # a KV budget of 64 tokens
    with pytest.raises(RequestError) as e:
        eng.add_request(**kwargs)
    for w in words:
        assert w in str(e.value), f"{w!r} missing from: {e.value}"
    assert not eng.requests and not eng.has_unfinished()


def test_duplicate_request_id_is_accepted(model):
    eng = Engine(model, num_blocks=8, block_size=8)
    eng.add_request(request_id="r", prompt=[1, 2], max_new_tokens=2)
    with pytest.raises(RequestError, match="'r'.*already used"):
        eng.add_request(request_id="r", prompt=[3, 4], max_new_tokens=2)
    assert eng.requests["r"].prompt == [1, 2] and len(eng.scheduler.waiting) == 1


def test_bad_request_in_run_stops_the_others(model):
    good = [Request("g1", [5, 6, 7], 3), Request("g2", [8, 9], 4)]
    bad = [Request("bad-empty", [], 3), Request("g1", [1], 2), Request("bad-vocab", [99999], 2)]
    outs = Engine(model, num_blocks=8, block_size=8).run([good[0], bad[0], bad[1], good[1], bad[2]])
    assert outs["g1"].tokens == alone(model, [5, 6, 7], 3) and outs["g2"].tokens == alone(model, [8, 9], 4)
    assert outs["bad-empty"].finish_reason == "error" and "empty" in outs["bad-empty"].error
    assert outs["bad-vocab"].finish_reason == "error" and "99999" in outs["bad-vocab"].error
    dup = [o for k, o in outs.items() if k.startswith("g1#")]
    assert len(dup) == 1 and "already used" in dup[0].error


def test_bad_engine_settings_raise_raw_errors(model):
    with pytest.raises(ValueError, match="num_blocks must be an int >= 1, got 0"):
        Engine(model, num_blocks=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be an int >= 1, got 0"):
        Engine(model, num_blocks=4, max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="one time per request"):
        Engine(model, num_blocks=4).run([Request("a", [1], 1)], arrivals=[0.0, 1.0])
    with pytest.raises(TypeError, match="course's Llama"):
        Engine(torch.nn.Linear(2, 2), num_blocks=4)


def test_slot_mapping_hook_of_another_dtype_fails_deep_in_attention(model):
    """A swapped-in slot mapping (notebook 09's hook) that returns int32 was refused inside write_kv, with a message
    about attention plans the learner never built; the engine names the hook and what it must return."""
    eng = Engine(model, num_blocks=8, block_size=4)
    eng.slot_mapping = lambda pos, table, seq, bs: (table[seq, pos // bs] * bs + pos % bs).int()
    eng.add_request(request_id="a", prompt=[1, 2, 3], max_new_tokens=2)
    with pytest.raises(TypeError, match=r"engine.slot_mapping must return .* \(3,\) torch.long tensor, got \(3,\) "
                                        r"torch.int32"):
        eng.step()
