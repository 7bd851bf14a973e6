"""kvcourse.mla against transformers' DeepSeek-V3 (issue 25, part 1).

A random-weight ``DeepseekV3ForCausalLM`` with dense layers only (``first_k_dense_replace`` = the number of
layers), fp32 on the CPU, in two configs: the query straight from ``q_proj`` (``q_lora_rank=None``) and through
its low-rank bottleneck (``q_lora_rank=24``). The course's model must give its logits (tolerance: atol 1e-5,
rtol 1e-5, fp32 rounding; measured: 0.0 unabsorbed, <1e-5 absorbed on logits of magnitude ~6), its greedy
tokens, and hold in its ``LatentCache`` what transformers' cache holds. Hand mutants these tests caught (each
run against the whole file): RoPE on the latent instead of the decoupled key, the absorbed query missing the
full head's softmax scale, no RMSNorm on the latent (see the report of issue 25).
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from kvcourse.cache import CacheOverflowError
from kvcourse.memory import kv_bytes_per_token_dims
from kvcourse.mla import PUBLISHED, LatentCache, MLAArgs, MLAModel, published_table, time_decode_steps

V = 128
ATOL = RTOL = 1e-5  # fp32 rounding; the unabsorbed path measured bit-equal, the absorbed one within 1e-5
CONFIGS = {"q_proj": None, "q_lora": 24}


def _config(q_lora_rank=None, **kw) -> transformers.DeepseekV3Config:
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_rope_head_dim=8,
                qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=2, max_position_embeddings=256,
                initializer_range=0.2, num_mtp_layers=0, eos_token_id=None)  # no eos: 32 tokens every time
    base.update(kw)
    return transformers.DeepseekV3Config(**base)


@functools.cache
def hf(name: str = "q_proj", **kw) -> transformers.DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    return transformers.DeepseekV3ForCausalLM(_config(CONFIGS[name], **kw)).eval()


@functools.cache
def ours(name: str = "q_proj", **kw) -> MLAModel:
    return MLAModel.from_hf(hf(name, **kw))


def ids(b: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- against transformers ------------------------------------------------------------------------------


@pytest.mark.parametrize("absorbed", [False, True], ids=["unabsorbed", "absorbed"])
@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved_rope", "rotate_half_rope"])
@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_prefill_logits_equal_transformers(name, interleave, absorbed):
    x = ids()
    ref = hf(name, rope_interleave=interleave)(x).logits
    got = ours(name, rope_interleave=interleave)(x, absorbed=absorbed)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("absorbed", [False, True], ids=["unabsorbed", "absorbed"])
@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_cached_decode_logits_equal_transformers_step_by_step(name, absorbed):
    """Prefill 10 tokens, then 6 one-token steps; each step's logits against transformers' with its own cache."""
    x = ids(t=16, seed=1)
    model, ref = ours(name), hf(name)
    cache, hf_cache = LatentCache.for_model(model, 2, 16), transformers.DynamicCache(config=ref.config)
    got = model(x[:, :10], cache, absorbed=absorbed)
    want = ref(input_ids=x[:, :10], cache=hf_cache, use_cache=True).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for i in range(10, 16):
        got = model(x[:, i:i + 1], cache, absorbed=absorbed)
        want = ref(input_ids=x[:, i:i + 1], cache=hf_cache, use_cache=True).logits
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m, i=i: f"decode step at {i}: {m}")
    assert cache.get_seq_length() == hf_cache.get_seq_length() == 16


@pytest.mark.parametrize("absorbed", [False, True], ids=["unabsorbed", "absorbed"])
@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_32_tokens_equal_transformers_with_one_prefill_then_one_token_steps(name, absorbed):
    x = ids(t=8, seed=2)
    with torch.no_grad():
        want = hf(name).generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32,
                                 do_sample=False, pad_token_id=0)
    model = ours(name)
    seen = []  # the query lengths of every forward pass: one prefill, then one token a step
    handle = model.embed_tokens.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    try:
        cache = LatentCache.for_model(model, 2, 8 + 32)
        got = model.generate(x, 32, absorbed=absorbed, cache=cache)
    finally:
        handle.remove()
    assert torch.equal(got, want), f"first differing position: {(got != want).any(0).nonzero()[0].item()}"
    assert seen == [(2, 8)] + [(2, 1)] * 31, seen[:3]
    assert cache.get_seq_length() == 8 + 31  # the last token is sampled, never fed back


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_cache_holds_the_normed_latent_and_the_roped_shared_key_as_transformers_does(name):
    """Per layer, c_kv (normed, no RoPE) and k_rope (rotated) equal transformers' cached kv_nope and k_rot."""
    x = ids(t=9, seed=3)
    cache, hf_cache = LatentCache.for_model(ours(name), 2, 9), transformers.DynamicCache(config=hf(name).config)
    ours(name)(x, cache)
    hf(name)(input_ids=x, cache=hf_cache, use_cache=True)
    for i, layer in enumerate(hf_cache.layers):
        torch.testing.assert_close(cache.latents[i][:, :9], layer.keys[:, 0], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, i=i: f"layer {i} latent c_kv: {m}")
        torch.testing.assert_close(cache.rope_keys[i][:, :9], layer.values[:, 0], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, i=i: f"layer {i} shared RoPE key: {m}")


# ---- absorbed == unabsorbed ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_absorbed_decode_equals_unabsorbed_on_the_same_cache(name):
    """Two caches fed the same prefill; every later step's logits agree within fp32 rounding, and so do the caches:
    layer 0's bit for bit (its input does not depend on the path), later layers' within rounding."""
    model, x = ours(name), ids(t=20, seed=4)
    a, u = LatentCache.for_model(model, 2, 20), LatentCache.for_model(model, 2, 20)
    torch.testing.assert_close(model(x[:, :12], a, absorbed=True), model(x[:, :12], u), atol=ATOL, rtol=RTOL)
    for i in range(12, 20):
        torch.testing.assert_close(model(x[:, i:i + 1], a, absorbed=True), model(x[:, i:i + 1], u),
                                   atol=ATOL, rtol=RTOL)
    assert torch.equal(a.latents[0], u.latents[0]) and torch.equal(a.rope_keys[0], u.rope_keys[0])
    for la, lu in zip(a.latents + a.rope_keys, u.latents + u.rope_keys, strict=True):
        torch.testing.assert_close(la, lu, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_absorbed_attention_uses_the_full_head_scale_not_the_latent_width():
    """The absorbed scores are dot products of width kv_lora_rank + qk_rope_head_dim = 40, but the scale is the
    original head's 1/sqrt(qk_nope + qk_rope) = 1/sqrt(24): the attention module says so, and the logits prove it."""
    attn = ours().layers[0].self_attn
    assert attn.scale == pytest.approx(24 ** -0.5)
    x = ids(t=6, seed=5)
    torch.testing.assert_close(ours()(x, absorbed=True), hf()(x).logits, atol=ATOL, rtol=RTOL)


# ---- bytes per token -----------------------------------------------------------------------------------


def test_bytes_per_token_is_latent_plus_rope_key_times_dtype_times_layers_and_matches_transformers_cache():
    model, ref = ours(), hf()
    assert LatentCache.for_model(model, 1, 4).bytes_per_token() == (32 + 8) * 4 * 2  # fp32, 2 layers
    assert LatentCache(3, 1, 512, 64, 4, dtype=torch.bfloat16).bytes_per_token() == (512 + 64) * 2 * 3
    x = ids(b=1, t=10, seed=6)
    with torch.no_grad():
        out = ref.generate(x, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                           pad_token_id=0)
    held = out.past_key_values
    tokens = held.get_seq_length()
    assert tokens == 10 + 6 - 1
    hf_bytes = sum(t.numel() * t.element_size() for layer in held.layers for t in (layer.keys, layer.values))
    assert hf_bytes / tokens == LatentCache.for_model(model, 1, 4).bytes_per_token()


def test_published_table_bytes_per_token():
    rows = {r["model"]: r for r in published_table(context=8192)}
    llama = PUBLISHED["Llama-3-70B (GQA)"]
    assert rows["Llama-3-70B (GQA)"]["bytes_per_token"] == kv_bytes_per_token_dims(80, 8, 128, 2) == 327_680
    assert llama["num_layers"] == 80 and llama["num_kv_heads"] == 8
    assert rows["DeepSeek-V3 (MLA)"]["bytes_per_token"] == (512 + 64) * 2 * 61 == 70_272
    window = rows["Mistral-7B-v0.1 (GQA, window 4096)"]
    assert window["bytes_per_token"] == 131_072
    assert window["cache_bytes"] == 131_072 * 4096  # the window stops the growth at 4096 tokens
    assert rows["DeepSeek-V3 (MLA)"]["cache_bytes"] == 70_272 * 8192
    with pytest.raises(ValueError, match="context"):
        published_table(context=0)


# ---- crop / rewind -------------------------------------------------------------------------------------


@pytest.mark.parametrize("absorbed", [False, True], ids=["unabsorbed", "absorbed"])
@torch.no_grad()
def test_crop_then_reappend_equals_a_cache_that_never_saw_the_dropped_tokens(absorbed):
    model, x, alt = ours("q_lora"), ids(t=8, seed=7), ids(t=3, seed=8)
    a, b = LatentCache.for_model(model, 2, 16), LatentCache.for_model(model, 2, 16)
    model(x, a, absorbed=absorbed)
    model(x, b, absorbed=absorbed)
    for i in range(5):  # a sees 5 more tokens, b only the first 2 of them
        model(alt[:, :1] + i, a, absorbed=absorbed)
        if i < 2:
            model(alt[:, :1] + i, b, absorbed=absorbed)
    a.crop(-3)
    assert a.get_seq_length() == b.get_seq_length() == 10
    for j in range(3):
        la = model(alt[:, j:j + 1], a, absorbed=absorbed)
        lb = model(alt[:, j:j + 1], b, absorbed=absorbed)
        assert torch.equal(la, lb)
    for layer in range(a.num_layers):
        assert torch.equal(a.latents[layer][:, :13], b.latents[layer][:, :13])
        assert torch.equal(a.rope_keys[layer][:, :13], b.rope_keys[layer][:, :13])
    a.crop(4)  # the keep-n form
    assert a.lengths == [4, 4]
    a.reset()
    assert a.get_seq_length() == 0


@pytest.mark.parametrize("n", [5, -5, 1.0, True])
def test_crop_out_of_range_or_not_an_int_is_refused_and_changes_nothing(n):
    c = LatentCache(2, 1, 4, 2, 8)
    c.update(torch.ones(1, 4, 4), torch.ones(1, 4, 2), 0)
    c.update(torch.ones(1, 4, 4), torch.ones(1, 4, 2), 1)
    with pytest.raises((ValueError, TypeError), match=str(n)):
        c.crop(n)
    assert c.lengths == [4, 4]


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("c_kv, k_rope, layer, err, words", [
    (torch.ones(1, 2, 5), torch.ones(1, 2, 2), 0, ValueError, ("c_kv", "(1, seq, 4)", "(1, 2, 5)")),
    (torch.ones(1, 2, 4), torch.ones(1, 2, 3), 0, ValueError, ("k_rope", "(1, seq, 2)", "(1, 2, 3)")),
    (torch.ones(2, 2, 4), torch.ones(2, 2, 2), 0, ValueError, ("c_kv", "(2, 2, 4)")),
    (torch.ones(1, 1, 2, 4), torch.ones(1, 2, 2), 0, ValueError, ("c_kv", "(1, 1, 2, 4)")),
    (torch.ones(1, 2, 4), torch.ones(1, 3, 2), 0, ValueError, ("same tokens", "(1, 3, 2)")),
    (torch.ones(1, 2, 4, dtype=torch.float64), torch.ones(1, 2, 2), 0, ValueError, ("float64", "float32")),
    (torch.ones(1, 2, 4), torch.ones(1, 2, 2), 2, IndexError, ("2", "layers")),
    (torch.ones(1, 7, 4), torch.ones(1, 7, 2), 0, CacheOverflowError, ("holds 2", "7 more", "max_seq_len=8")),
    ([[1.0]], torch.ones(1, 2, 2), 0, TypeError, ("c_kv", "list")),
], ids=["latent_width", "rope_width", "batch", "rank", "seq_mismatch", "dtype", "layer", "overflow", "not_tensor"])
def test_update_refuses_bad_input_by_name_and_writes_nothing(c_kv, k_rope, layer, err, words):
    c = LatentCache(2, 1, 4, 2, 8)
    c.update(torch.full((1, 2, 4), 3.0), torch.full((1, 2, 2), 3.0), 0)
    before = [t.clone() for t in c.latents + c.rope_keys]
    with pytest.raises(err) as e:
        c.update(c_kv, k_rope, layer)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert c.lengths == [2, 0]
    assert all(torch.equal(x, y) for x, y in zip(before, c.latents + c.rope_keys, strict=True))


@torch.no_grad()
def test_model_overflow_is_refused_before_any_layer_writes():
    model = ours()
    c = LatentCache.for_model(model, 2, 10)
    model(ids(t=8), c)
    with pytest.raises(CacheOverflowError, match="holds 8 tokens, 3 more"):
        model(ids(t=3), c)
    assert c.lengths == [8, 8]


@pytest.mark.parametrize("make, err, words", [
    (lambda: ours()(ids() + V), ValueError, ("0..127", "vocab_size=128")),
    (lambda: ours()(ids().float()), ValueError, ("torch.long", "torch.float32")),
    (lambda: ours()(ids(), cache=object()), TypeError, ("LatentCache", "object")),
    (lambda: ours()(ids(b=3), LatentCache.for_model(ours(), 2, 16)), ValueError, ("batch 2", "batch 3")),
    (lambda: MLAModel.from_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4))),
     TypeError, ("DeepseekV3ForCausalLM", "llama")),
    (lambda: MLAArgs.from_config(_config(first_k_dense_replace=1)), ValueError,
     ("first_k_dense_replace=1", "num_hidden_layers=2", "first_k_dense_replace=2")),
    (lambda: MLAArgs.from_config(_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                          "original_max_position_embeddings": 64})),
     ValueError, ("'yarn'", "'default'")),
    (lambda: MLAArgs.from_config(_config(num_key_value_heads=2)), ValueError,
     ("num_key_value_heads=2", "num_attention_heads=4")),
    (lambda: MLAArgs(V, 64, 96, 2, 4, 32, 7, 16, 12), ValueError, ("qk_rope_head_dim", "7")),
    (lambda: MLAModel(_config()), TypeError, ("MLAArgs", "DeepseekV3Config")),
    (lambda: LatentCache.for_model(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=2)), 1, 8), TypeError, ("MLAModel", "GPT2")),
    (lambda: ours().generate(ids(), 0), ValueError, ("max_new_tokens", "0")),
], ids=["ids_out_of_vocab", "float_ids", "cache_not_latent", "cache_batch", "llama_model", "moe_layers", "yarn",
        "kv_heads", "odd_rope_dim", "config_not_args", "gpt2_for_model", "zero_new_tokens"])
def test_bad_input_is_named(make, err, words):
    with pytest.raises(err) as e:
        make()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_from_hf_shares_the_weights_and_keeps_the_plain_softmax_scale():
    model, ref = ours("q_lora"), hf("q_lora")
    a = ref.model.layers[1].self_attn
    b = model.layers[1].self_attn
    assert b.kv_b_proj.weight.data_ptr() == a.kv_b_proj.weight.data_ptr()
    assert b.q_a_proj.weight.data_ptr() == a.q_a_proj.weight.data_ptr()
    assert b.scale == pytest.approx(a.scaling)  # transformers' scale for rope_type "default": no yarn mscale


def test_time_decode_steps_reports_each_path_at_each_context():
    rows = time_decode_steps(hf(), contexts=(8, 16), repeats=1)
    assert [(r["context"], r["path"]) for r in rows] == [
        (8, "absorbed"), (8, "unabsorbed"), (8, "transformers"),
        (16, "absorbed"), (16, "unabsorbed"), (16, "transformers")]
    assert all(r["ms"] > 0 for r in rows)
