"""Reference generators must equal transformers' greedy generate token for token (fp32), and refuse, with a kvcourse
error naming what was expected and what came, the inputs they cannot use (issue 22 §1.2 and §2)."""

import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kvcourse import CacheOverflowError, ConcatKVCache, KVCache, Llama, load_model
from kvcourse.generate import check_left_padded, check_token_id, generate, generate_uncached, prefill


@pytest.fixture(scope="module")
def models():
    hf, tok = load_model(device="cpu")
    return hf, tok, Llama.from_hf(hf)


@pytest.mark.parametrize("prompts", [["The red cat was"], ["ROMEO:", "JULIET:"]])
def test_cached_generate_diverges_from_transformers(models, prompts):
    hf, tok, ours = models
    rows = [tok(p, return_tensors="pt").input_ids for p in prompts]
    ids = torch.cat([r[:, : min(r.shape[1] for r in rows)] for r in rows])  # equal lengths: no padding
    n = 40
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, eos_token_id=None)
    assert torch.equal(generate(ours, ids, n), expected)
    assert torch.equal(generate(ours, ids, n, cache=ConcatKVCache(ours.args.num_layers)), expected)
    assert torch.equal(generate_uncached(ours, ids, n), expected)


def tiny_llama(vocab: int = 64) -> Llama:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    torch.manual_seed(0)
    return Llama.from_hf(LlamaForCausalLM(cfg).eval())


@pytest.mark.parametrize("bad,named", [
    ([], "empty"), (2.0, "2.0"), (True, "True"), ("2", "'2'"), ([2, 64], "64"), ([-1], "-1"),
    (torch.tensor([2.0]), "float32"),
], ids=["empty-list", "float", "bool", "str", "past-vocab", "negative", "float-tensor"])
def test_eos_token_id_of_the_wrong_kind_ignored(bad, named):
    """Issue 22 §1.2: anything but an int, a list/tuple or an integer tensor of ids in the vocab is refused."""
    with pytest.raises(ValueError, match=re.escape(named)):
        generate(tiny_llama(), torch.tensor([[1, 2, 3]]), 3, eos_token_id=bad, pad_token_id=0)


def test_token_ids_past_the_vocab_index_the_embedding():
    """An id >= vocab_size must be a kvcourse error naming the vocab size, not torch's IndexError."""
    model = tiny_llama()
    cache = KVCache.for_model(model, 1, 8)
    for call in (lambda: generate(model, torch.tensor([[1, 64]]), 2),
                 lambda: generate_uncached(model, torch.tensor([[1, 64]]), 2),
                 lambda: prefill(model, torch.tensor([[1, 70]]), cache)):
        with pytest.raises(ValueError, match="vocab_size"):
            call()
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="pad_token_id must be a token id in 0..63, got 64"):
        generate(model, torch.tensor([[1, 2]]), 2, eos_token_id=3, pad_token_id=64)


def test_pad_token_id_none_from_a_tokenizer_without_pad():
    model = tiny_llama()
    with pytest.raises(ValueError, match="pad_token_id=None"):
        generate(model, torch.tensor([[1, 2]]), 2, eos_token_id=[3, 4], pad_token_id=None)
    with pytest.raises(ValueError, match="tokenizer.pad_token"):
        check_token_id("pad_token_id", None, 64)
    assert generate(model, torch.tensor([[1, 2]]), 2, eos_token_id=None, pad_token_id=None).shape == (1, 4)


def test_gpt2_where_a_llama_is_expected():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        generate(gpt2, torch.tensor([[1, 2]]), 2)
    with pytest.raises(TypeError, match="Llama.from_hf"):
        prefill(gpt2, torch.tensor([[1, 2]]), None)


def test_cache_too_small_or_of_another_dtype_half_written():
    """A refused generate must not reset or half-fill the cache given."""
    model = tiny_llama()
    small = KVCache.for_model(model, 1, 4)
    prefill(model, torch.tensor([[1, 2]]), small)
    with pytest.raises(CacheOverflowError, match="max_seq_len=4"):
        generate(model, torch.tensor([[1, 2, 3]]), 5, cache=small)
    assert small.get_seq_length() == 2, "the cache was reset by a call that could not finish"
    f64 = KVCache.for_model(model, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64.*float32"):
        prefill(model, torch.tensor([[1, 2]]), f64)
    with pytest.raises(ValueError, match="batch"):
        generate(model, torch.tensor([1, 2]), 2)  # 1-D: no batch axis
    with pytest.raises(ValueError, match=r"\(1, 0\)"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        check_left_padded(torch.tensor([1, 0]))
