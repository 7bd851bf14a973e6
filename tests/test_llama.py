"""The from-scratch Llama forward must reproduce transformers' logits, with and without a cache."""

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from kvcourse import KVCache, Llama, load_model, random_model
from kvcourse.llama import causal_mask


@pytest.fixture(scope="module")
def bundled():
    model, tok = load_model(device="cpu")
    return model, tok, Llama.from_hf(model)


@pytest.fixture(scope="module")
def smollm_random():
    model = random_model("SmolLM2-135M")  # full published shape, random weights
    return model, Llama.from_hf(model)


def _ids(vocab: int, shape=(2, 23), seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_drift_from_transformers_on_bundled_model(bundled):
    hf, _, ours = bundled
    ids = _ids(hf.config.vocab_size)
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_logits_drift_from_transformers_on_smollm2_135m_shape(smollm_random):
    hf, ours = smollm_random
    assert hf.config.num_hidden_layers == 30 and hf.config.num_key_value_heads == 3
    ids = _ids(hf.config.vocab_size, (1, 19))
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("cache_factory", ["kvcourse", "transformers"])
def test_cached_forward_disagrees_with_full_forward(bundled, cache_factory):
    hf, _, ours = bundled
    ids = _ids(hf.config.vocab_size, (2, 20), seed=1)
    full = ours(ids)
    cache = KVCache.for_model(ours, 2, 32) if cache_factory == "kvcourse" else DynamicCache(config=hf.config)
    parts = [ours(ids[:, :12], cache)] + [ours(ids[:, i : i + 1], cache) for i in range(12, 20)]
    assert cache.get_seq_length() == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_last_only_returns_a_different_last_row(bundled):
    _, _, ours = bundled
    ids = _ids(ours.args.vocab_size, (1, 9))
    torch.testing.assert_close(ours(ids, last_only=True), ours(ids)[:, -1:])


def test_position_offset_that_disagrees_with_cache_is_refused(bundled):
    _, _, ours = bundled
    cache = KVCache.for_model(ours, 1, 16)
    ours(_ids(ours.args.vocab_size, (1, 5)), cache)
    with pytest.raises(ValueError, match="cache already holds 5"):
        ours(_ids(ours.args.vocab_size, (1, 1)), cache, start_pos=6)


def test_non_llama_checkpoint_is_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(TypeError, match="LlamaForCausalLM.*GPT2LMHeadModel.*gpt2"):
        Llama.from_hf(gpt2)


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.long), torch.zeros(1, 3), [[1, 2, 3]]])
def test_malformed_input_ids_get_a_clear_error(bundled, bad):
    _, _, ours = bundled
    with pytest.raises(ValueError, match=r"\(batch, seq\) tensor of token ids"):
        ours(bad)


def test_causal_mask_lets_a_decode_query_see_every_cached_key():
    assert causal_mask(1, 7).all()
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


# ---- the static path: a decode step that torch.compile traces once for every position ------------------------------


def _compiled_static_decode(ours, cache, prompt, steps):
    """Prefill eagerly, then `steps` decode steps compiled (fullgraph, static shapes); a second trace is an error."""
    import torch._dynamo

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(lambda token: ours(token, cache=cache), backend=keep, fullgraph=True, dynamic=False)
    with torch.no_grad():
        token = ours(prompt, cache=cache)[:, -1:].argmax(-1)
        out = [prompt, token]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(steps):
                token = step(token)[:, -1:].argmax(-1)
                out.append(token)
    return torch.cat(out, 1), graphs


def test_static_decode_step_recompiles_at_every_position(bundled):
    """Static shapes are not enough for a graph: the position and the mask must come from tensors. With the course's
    StaticKVCache the step traces once and reads nothing back to Python; a cache that slices at a Python int (the old
    StaticKVCache) is traced again at the next position, which error_on_recompile turns into an error."""
    import torch._dynamo

    from kvcourse import StaticKVCache
    from kvcourse.generate import generate

    _, tok, ours = bundled
    prompt = tok("ROMEO:", return_tensors="pt").input_ids
    got, graphs = _compiled_static_decode(ours, StaticKVCache.for_model(ours, 1, 20), prompt, 6)
    assert torch.equal(got, generate(ours, prompt, 7))
    assert len(graphs) == 1
    ops = {n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_method"}
    assert not ops & {"item", "tolist", "cpu"}, f"the compiled step reads the position back to Python: {ops}"

    class PythonSlice(StaticKVCache):  # the bug this guards: a write at a Python-int offset
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.held = [0] * self.num_layers

        def update(self, key, value, layer_idx):
            start, end = self.held[layer_idx], self.held[layer_idx] + key.shape[2]
            self.keys[layer_idx][:, :, start:end] = key
            self.values[layer_idx][:, :, start:end] = value
            self.held[layer_idx] = end
            self.position[layer_idx] += key.shape[2]
            return self.keys[layer_idx], self.values[layer_idx]

    with pytest.raises(torch._dynamo.exc.RecompileError):
        _compiled_static_decode(ours, PythonSlice.for_model(ours, 1, 20), prompt, 3)


# ---- refusals by name (probe findings, issue 22 §2) -------------------------------------------------------

from kvcourse import llama as L  # noqa: E402
from kvcourse.llama import LlamaArgs  # noqa: E402
from kvcourse.window import SlidingWindowCache  # noqa: E402

_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8)


def _tiny(**kw) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaArgs(**{**_TINY, **kw})).eval()


def _llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, **kw})


def test_from_config_of_a_gpt2_config_fails_inside_transformers():
    with pytest.raises(TypeError, match=r"GPT2Config, which lacks intermediate_size"):
        LlamaArgs.from_config(GPT2Config())


def test_negative_head_count_builds_args_silently():
    with pytest.raises(ValueError, match=r"num_attention_heads must be a positive int, got -4"):
        LlamaArgs.from_config(_llama_config(num_attention_heads=-4))
    with pytest.raises(ValueError, match=r"num_heads=6 must be a multiple of num_kv_heads=4"):
        LlamaArgs(**{**_TINY, "num_heads": 6, "num_kv_heads": 4})


@pytest.mark.parametrize("cls", [L.Attention, L.MLP, L.Block, Llama])
def test_modules_built_from_a_transformers_config_fail_inside_it_or_build_silently(cls):
    args = (_llama_config(), 0) if cls in (L.Attention, L.Block) else (_llama_config(),)
    with pytest.raises(TypeError, match=r"takes a LlamaArgs, got LlamaConfig"):
        cls(*args)


def test_rope_from_a_config_without_rope_returns_default_frequencies_silently():
    with pytest.raises(ValueError, match=r"RoPE settings.*GPT2Config"):
        L.rope_from_config(GPT2Config(n_embd=8, n_head=1))


def test_rmsnorm_of_size_zero_or_of_the_wrong_width_is_not_refused():
    with pytest.raises(ValueError, match=r"dim must be a positive int, got 0"):
        L.RMSNorm(0, 1e-5)
    with pytest.raises(ValueError, match=r"size 8 on the last axis, got x of shape \(2, 4\)"):
        L.RMSNorm(8, 1e-5)(torch.randn(2, 4))


def test_shape_mismatches_fail_inside_torch_broadcasting():
    x = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"head_dim 8, but cos \(1, 3, 4\)"):
        L.apply_rope(x, torch.ones(1, 3, 4), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match=r"n_rep .* got 0"):
        L.repeat_kv(x, 0)
    with pytest.raises(ValueError, match=r"got \(2, 3, 8\)"):
        L.repeat_kv(torch.randn(2, 3, 8), 2)
    with pytest.raises(ValueError, match=r"q \(1, 2, 3, 8\), k \(1, 2, 3, 4\)"):
        L.sdpa_attention(x, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"got \(4,\)"):
        L.padding_causal_mask(torch.ones(4), 4)


def test_layers_given_the_wrong_hidden_size_or_rank_fail_inside_linear():
    model = _tiny()
    cos, sin = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    with pytest.raises(ValueError, match=r"hidden_size=32\), got \(1, 3, 16\)"):
        model.layers[0].attn(torch.randn(1, 3, 16), cos, sin)
    with pytest.raises(ValueError, match=r"size 32 on the last axis, got x of shape \(1, 3, 16\)"):
        model.layers[0].mlp(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match=r"got \(3, 32\)"):
        model.layers[0](torch.randn(3, 32), cos, sin)


def test_masks_with_more_queries_than_keys_or_an_empty_window_are_returned_silently():
    with pytest.raises(ValueError, match=r"q_len=5 > k_len=3"):
        causal_mask(5, 3)
    assert causal_mask(2, 5, q_offset=0).shape == (2, 5)  # padding_causal_mask's use: queries placed explicitly
    with pytest.raises(ValueError, match=r"window must be an int >= 1.*got 0"):
        L.sliding_window_mask(None, 2, 4, 2, 0)


@pytest.mark.parametrize("bad", [64, -1])
def test_token_ids_outside_the_vocab_fail_inside_embedding_and_leave_the_cache_alone(bad):
    model = _tiny()
    cache = KVCache.for_model(model, 1, 8)
    with pytest.raises(ValueError, match=rf"vocab_size=64\), got ids from {min(bad, 1)} to {max(bad, 1)}"):
        model(torch.tensor([[1, bad]]), cache)
    assert cache.get_seq_length() == 0


def test_vocab_check_reads_no_tensor_in_the_compiled_graph():
    """The data-dependent vocab check must be skipped while tracing: notebook 07 compiles forward with
    fullgraph=True and inspects the graph for item/tolist nodes."""
    model = _tiny()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(torch.tensor([[1, 2, 3]])), model(torch.tensor([[1, 2, 3]])))
    reads = [str(n.target) for g in graphs for n in g.graph.nodes
             if str(n.target) in ("item", "tolist") or "local_scalar_dense" in str(n.target)]
    assert graphs and not reads, reads
    torch._dynamo.reset()


def test_forward_with_a_ring_cache_on_a_model_without_a_window_drops_keys_silently():
    model = _tiny()
    ring = SlidingWindowCache(2, 1, 2, 8, window=4)
    with pytest.raises(ValueError, match=r"sliding_window=None"):
        model(torch.tensor([[1, 2, 3]]), ring)
    assert ring.get_seq_length() == 0
    windowed = _tiny(sliding_window=4)
    with pytest.raises(ValueError, match=r"window=2\) is smaller than the model's sliding_window=4"):
        windowed(torch.tensor([[1, 2, 3]]), SlidingWindowCache(2, 1, 2, 8, window=2))


def test_for_model_refuses_a_call_timer_wrapped_model():
    """Notebook 06 sizes its cache from a CallTimer-wrapped model (its .args come through __getattr__)."""
    from kvcourse.batching import CallTimer

    model = _tiny()
    cache = KVCache.for_model(CallTimer(model), 2, 8)
    assert cache.keys[0].shape == (2, 2, 8, 8) and cache.num_layers == 2


def test_a_value_check_on_a_meta_model_failed_every_answer_alike():
    """Notebook 04 runs a learner's generator on a "meta" model to check devices. The vocab checks of Llama.forward
    and kvcourse.generate read token values, which a meta tensor has not: every answer failed the same way there,
    and the grader (rightly) let that pass, so a learner's output built on the CPU kept its points."""
    import transformers

    from kvcourse.generate import prefill

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Llama.from_hf(transformers.LlamaForCausalLM(cfg).to("meta", torch.bfloat16))
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")  # (B, T)
    assert model(ids).shape == (2, 5, 300)
    cache = KVCache.for_model(model, 2, 8)
    assert prefill(model, ids, cache).device.type == "meta"
    with pytest.raises(ValueError, match="0..299"):  # on real tensors the check still reads the ids
        Llama.from_hf(transformers.LlamaForCausalLM(cfg))(torch.tensor([[300]]))
