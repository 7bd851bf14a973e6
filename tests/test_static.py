"""The static-shape cache and decode step (what CUDA graphs need): same fp32 tokens as the dynamic cache,
the same tensor shapes at every decode step, and the unwritten slots masked. Bugs guarded: a static
cache that returns a growing view, a mask that lets attention read empty or stale slots, a graph
captured before (or over) a cache that is then reallocated, positions taken from the slot instead of the row."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_batching import padded_prompts, small_model

import kvcourse.fast.graphed as graphed
from kvcourse import CacheOverflowError, KVCache, Llama, StaticKVCache, load_model
from kvcourse.batching import pad_prompts
from kvcourse.fast import FastGenerator, GraphedStaticGenerator, StaticGenerator
from kvcourse.generate import generate


@pytest.fixture(scope="module")
def bundled():
    hf, tok = load_model(device="cpu")
    return hf, tok, Llama.from_hf(hf)


def test_static_cache_returns_a_growing_view():
    cache = StaticKVCache(2, 1, 2, 4, max_seq_len=6)
    for n in (3, 1, 1):
        k, v = cache.update(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4), 0)
        assert k.shape == v.shape == (1, 2, 6, 4), "update must return the whole (B, KV, S_max, D) buffer"
        assert k is cache.keys[0] and v is cache.values[0]
    assert cache.get_seq_length(0) == 5
    with pytest.raises(CacheOverflowError, match="max_seq_len=6"):
        cache.update(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), 0)


@pytest.mark.parametrize("padded", [False, True], ids=["one-prompt", "left-padded"])
def test_static_cache_tokens_diverge_from_dynamic(bundled, padded):
    _, tok, ours = bundled
    if padded:
        ids, mask = padded_prompts(tok)
    else:
        ids, mask = tok("ROMEO:", return_tensors="pt").input_ids, None
    n = 120
    expected = generate(ours, ids, n, attention_mask=mask)
    static = StaticKVCache.for_model(ours, ids.shape[0], ids.shape[1] + n + 7)  # room to spare: masked
    assert torch.equal(generate(ours, ids, n, cache=static, attention_mask=mask), expected)
    fast = FastGenerator(ours, static=True)
    assert torch.equal(fast.generate(ids, n, attention_mask=mask), expected)


@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["MQA", "GQA", "MHA"])
def test_static_decode_diverges_from_transformers(kv_heads):
    hf = small_model(kv_heads, seed=kv_heads)
    g = torch.Generator().manual_seed(kv_heads)
    ids, mask = pad_prompts([torch.randint(1, 97, (n,), generator=g) for n in (7, 2, 5)], 0)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=100, min_new_tokens=100, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    ours = Llama.from_hf(hf)
    assert torch.equal(generate(ours, ids, 100, cache=StaticKVCache.for_model(ours, 3, 107), attention_mask=mask),
                       expected)
    assert torch.equal(FastGenerator(hf, static=True).generate(ids, 100, attention_mask=mask), expected)


def test_unwritten_slots_leak_into_attention(bundled):
    """Garbage (or an earlier prompt) in the slots not yet written must not change a single token."""
    _, tok, ours = bundled
    ids = tok("JULIET:", return_tensors="pt").input_ids
    expected = generate(ours, ids, 40)
    static = StaticKVCache.for_model(ours, 1, ids.shape[1] + 60)
    for buf in static.keys + static.values:
        buf.normal_(0, 1e3)
    assert torch.equal(generate(ours, ids, 40, cache=static), expected)
    generate(ours, tok("The red cat was sitting", return_tensors="pt").input_ids, 50, cache=static)  # stale slots
    assert torch.equal(generate(ours, ids, 40, cache=static), expected)

    fast = FastGenerator(ours, static=True)
    fast.generate(tok("The red cat was sitting", return_tensors="pt").input_ids, 50)
    assert torch.equal(fast.generate(ids, 40), expected)


def test_uninitialised_cache_memory_poisons_static_attention(bundled, monkeypatch):
    """A masked slot gets weight exactly 0, but 0 * NaN is NaN: the buffers must not start as garbage."""
    _, tok, ours = bundled
    ids = tok("ROMEO:", return_tensors="pt").input_ids
    expected = generate(ours, ids, 20)
    real_empty = torch.empty

    def garbage(*args, **kw):  # what a reused block of memory may hold
        t = real_empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(12345)

    monkeypatch.setattr(torch, "empty", garbage)
    fast = FastGenerator(ours, static=True)
    assert torch.equal(fast.generate(ids, 20), expected)


def test_static_decode_shapes_change_between_steps(bundled, monkeypatch):
    _, tok, ours = bundled
    ids = tok("ROMEO:", return_tensors="pt").input_ids
    key_shapes = {"static": [], "dynamic": []}
    real_sdpa = F.scaled_dot_product_attention
    which = ["dynamic"]

    def spy(q, k, v, **kw):
        if q.shape[-2] == 1:  # decode steps only
            key_shapes[which[0]].append((tuple(k.shape), None if kw.get("attn_mask") is None
                                         else tuple(kw["attn_mask"].shape)))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for mode in ("dynamic", "static"):
        which[0] = mode
        FastGenerator(ours, static=mode == "static").generate(ids, 12)
    assert len(set(key_shapes["static"])) == 1, f"static decode saw several shapes: {set(key_shapes['static'])}"
    assert len(key_shapes["static"]) == 11 * ours.args.num_layers
    assert len(set(key_shapes["dynamic"])) == 11, "the dynamic step should grow by one slot per step"


def test_reused_static_generator_keeps_a_stale_state(bundled):
    """Batch sizes, cache growth (which re-creates the fixed buffers) and prompts in turn."""
    _, tok, ours = bundled
    fast = FastGenerator(ours, static=True)
    ids_a = tok("ROMEO:", return_tensors="pt").input_ids
    ids_b, mask_b = padded_prompts(tok)
    for ids, mask, n in ((ids_a, None, 20), (ids_b, mask_b, 30), (ids_a, None, 90), (ids_b, mask_b, 10)):
        assert torch.equal(fast.generate(ids, n, attention_mask=mask), generate(ours, ids, n, attention_mask=mask))


def test_cuda_graph_on_cpu_fails_instead_of_running_static(bundled):
    _, tok, ours = bundled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = FastGenerator(ours, cuda_graph=True)
    assert any("CUDA graphs need a CUDA device" in str(w.message) for w in caught)
    assert fast.static and not fast.cuda_graph
    ids = tok("ROMEO:", return_tensors="pt").input_ids
    assert torch.equal(fast.generate(ids, 30), generate(ours, ids, 30))


def test_kvcache_and_static_cache_keep_the_same_constructor():
    kw = dict(dtype=torch.float32, device="cpu")
    a, b = KVCache(2, 1, 2, 4, 8, **kw), StaticKVCache(2, 1, 2, 4, 8, **kw)
    assert [t.shape for t in a.keys] == [t.shape for t in b.keys]
    assert isinstance(b, KVCache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True], ids=["eager-step", "compiled-step"])
def test_cuda_graph_replays_a_different_token_stream(bundled, compile):
    """The static step captured in a CUDA graph (compiled first with compile=True): tokens as the eager step's."""
    hf, tok, _ = bundled
    model = Llama.from_hf(hf.to("cuda"))
    ids, mask = (t.to("cuda") for t in padded_prompts(tok))
    eager = FastGenerator(model, static=True).generate(ids, 60, attention_mask=mask)
    graphed = FastGenerator(model, cuda_graph=True, compile=compile)
    out = graphed.generate(ids, 60, attention_mask=mask)
    assert isinstance(graphed, GraphedStaticGenerator) and graphed.cuda_graph and graphed.compiled == compile, "compilation fell back to eager: see the warning"
    assert torch.equal(out, eager)
    assert graphed.capture_seconds > 0 and graphed._states[ids.shape[0]].graph is not None
    assert (graphed.compile_seconds > 0) == compile, "compilation is timed apart from the capture"
    hf.to("cpu")


# ---- per-row slots (issue 22 §3) -------------------------------------------------------------------------
class FakeGraph:
    """Replays what was captured on the same buffers, as a CUDA graph would (here: by running it again)."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


class FakeGraphs:
    """graphed.CudaGraphs' methods, on a CPU: records the capture plan."""

    def __init__(self):
        self.log = []

    def available(self, device):
        return True

    def run_on_side_stream(self, device, fn):
        self.log.append("warm-up")
        fn()

    def capture(self, device, fn):
        self.log.append("capture")
        out = fn()
        return FakeGraph(fn, out), out

    def synchronize(self, device):
        pass


@pytest.fixture
def fake_graphs(monkeypatch):
    fake = FakeGraphs()
    monkeypatch.setattr(GraphedStaticGenerator, "graphs", fake)
    return fake


@pytest.mark.parametrize("cls", [StaticGenerator, GraphedStaticGenerator], ids=["static", "graphed-fake"])
def test_one_slot_for_all_rows_breaks_rows_at_different_lengths(bundled, cls, fake_graphs):
    """Two rows prefilled alone at different lengths, then decoded together: each row's tokens as if alone."""
    _, tok, ours = bundled
    prompts = [tok(p, return_tensors="pt").input_ids for p in ["ROMEO:", "The red cat was sitting on the"]]
    assert prompts[0].shape[1] != prompts[1].shape[1]
    n = 30
    gen = cls(ours)
    gen.generate(prompts[0], 3)  # buffers made in inference mode: the row API must still write into them
    gen.setup_caches(2, prompts[1].shape[1] + n)
    token = torch.cat([gen.prefill_row(r, p).argmax(-1, keepdim=True) for r, p in enumerate(prompts)])  # (2, 1)
    new = [token]
    for _ in range(n - 1):
        token = gen.decode_one_token(token).argmax(-1, keepdim=True)
        new.append(token)
    new = torch.cat(new, dim=1)  # (2, N)
    for r, p in enumerate(prompts):
        assert torch.equal(new[r], generate(ours, p, n)[0, p.shape[1]:]), f"row {r} differs from the row alone"
    assert gen.state.slot.tolist() == [p.shape[1] + n - 1 for p in prompts]


def test_static_decode_past_capacity_corrupts_memory(bundled):
    """One slot too many: a clear CacheOverflowError naming the capacity, and nothing written or advanced."""
    _, tok, ours = bundled
    gen = StaticGenerator(ours)
    gen.setup_caches(1, 8)
    ids = tok("ROMEO:", return_tensors="pt").input_ids  # 5 tokens: slots 5, 6, 7 left
    token = gen.prefill_row(0, ids).argmax(-1, keepdim=True)
    for _ in range(3):
        token = gen.decode_one_token(token).argmax(-1, keepdim=True)
    keys, slot = gen.k_cache.clone(), gen.state.slot.clone()
    with pytest.raises(CacheOverflowError, match="max_seq_len=8"):
        gen.decode_one_token(token)
    assert torch.equal(gen.k_cache, keys) and torch.equal(gen.state.slot, slot)


# ---- the CUDA graph's capture plan, checked with a fake on the CPU -----------------------------------------
def test_first_timed_call_regrows_the_cache_and_captures_again(bundled, fake_graphs):
    """warmup(b, t, n) must size the cache for n new tokens: the timed generate(ids, n) then reuses cache and graph."""
    _, tok, ours = bundled
    ids = tok("ROMEO:", return_tensors="pt").input_ids
    gen = GraphedStaticGenerator(ours)
    gen.warmup(1, ids.shape[1], 40)
    assert fake_graphs.log == ["warm-up", "warm-up", "capture"]
    cache = gen.k_cache
    assert torch.equal(gen.generate(ids, 40), generate(ours, ids, 40))
    assert gen.k_cache is cache, "the first timed call reallocated the cache"
    assert fake_graphs.log.count("capture") == 1, "the first timed call captured the graph again"

    fresh = GraphedStaticGenerator(ours)  # no warmup(): generate() warms up with its own sizes
    fresh.generate(ids, 40)
    fresh.generate(ids, 40)
    assert fake_graphs.log.count("capture") == 2, "generate() captured more than once for one size"


def test_capture_seconds_include_the_compilation(bundled, fake_graphs, monkeypatch):
    """The first run of a compiled step is its compilation: timed as compile_seconds, not as capture."""
    _, tok, ours = bundled
    clock = [0.0]
    monkeypatch.setattr(graphed, "_clock", lambda: clock[0])
    gen = GraphedStaticGenerator(ours)
    gen.compiled = True  # as if compiled: the first run of the step is slow (100 s on the fake clock)
    real, runs = gen._step, []

    def step(*args):
        runs.append(1)
        clock[0] += 100.0 if len(runs) == 1 else 1.0
        return real(*args)

    gen._step = step
    gen.warmup(1, 5, 10)
    assert (gen.compile_seconds, gen.capture_seconds, gen.compile_capture_seconds) == (100.0, 2.0, 102.0)


def test_graph_replays_a_stale_token(bundled, fake_graphs):
    """Each replay must read the token, slots and mask of this step: same tokens as the eager static step."""
    _, tok, ours = bundled
    ids, mask = padded_prompts(tok)
    gen = GraphedStaticGenerator(ours)
    assert torch.equal(gen.generate(ids, 25, attention_mask=mask),
                       StaticGenerator(ours).generate(ids, 25, attention_mask=mask))
