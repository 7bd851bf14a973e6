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
