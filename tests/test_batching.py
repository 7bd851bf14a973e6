"""Left-padded batches: the from-scratch Llama, the reference generator and the fast path must give
transformers' greedy tokens on the same padded batch (fp32), with per-row positions, a padding mask,
and per-row EOS. Bugs guarded: positions not shifted for padding, padding keys attended, the mask
built for the prompt only, finished rows not padded, a loop that runs on after every row is done."""

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcourse import ConcatKVCache, KVCache, Llama, load_model
from kvcourse.batching import pad_prompts
from kvcourse.fast import FastGenerator
from kvcourse.generate import generate
from kvcourse.llama import padding_causal_mask, positions_from_mask, sdpa_attention

PROMPTS = ["ROMEO:", "The red cat was sitting on the", "JULIET: O Romeo", "A"]


@pytest.fixture(scope="module")
def bundled():
    hf, tok = load_model(device="cpu")
    return hf, tok, Llama.from_hf(hf)


def padded_prompts(tok) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_prompts([tok(p, return_tensors="pt").input_ids[0] for p in PROMPTS], tok.pad_token_id)


def hf_greedy(hf, ids, mask, n, **kw):
    kw.setdefault("eos_token_id", None)
    if kw["eos_token_id"] is None:
        kw["min_new_tokens"] = n
    return hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def test_padded_batch_diverges_from_transformers(bundled):
    hf, tok, ours = bundled
    ids, mask = padded_prompts(tok)
    assert not mask.all(), "the test needs prompts of different lengths"
    n = 120
    expected = hf_greedy(hf, ids, mask, n)
    assert torch.equal(generate(ours, ids, n, attention_mask=mask), expected)
    assert torch.equal(generate(hf, ids, n, attention_mask=mask.bool()), expected)
    assert torch.equal(generate(ours, ids, n, cache=ConcatKVCache(ours.args.num_layers), attention_mask=mask),
                       expected)
    assert torch.equal(FastGenerator(ours).generate(ids, n, attention_mask=mask), expected)


def small_model(kv_heads: int, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["MQA", "GQA", "MHA"])
def test_padded_random_shapes_diverge_from_transformers(kv_heads):
    hf = small_model(kv_heads, seed=kv_heads)
    g = torch.Generator().manual_seed(kv_heads)
    ids, mask = pad_prompts([torch.randint(1, 97, (n,), generator=g) for n in (9, 3, 1, 6)], 0)
    n = 100
    expected = hf_greedy(hf, ids, mask, n)
    ours = Llama.from_hf(hf)
    assert torch.equal(generate(ours, ids, n, attention_mask=mask), expected)
    assert torch.equal(FastGenerator(hf).generate(ids, n, attention_mask=mask), expected)


def test_padding_changes_the_row_it_pads(bundled):
    """Each row of a padded batch continues as the same prompt alone would (positions start at 0 per row)."""
    _, tok, ours = bundled
    ids, mask = padded_prompts(tok)
    n = 30
    batch = generate(ours, ids, n, attention_mask=mask)
    for i, p in enumerate(PROMPTS):
        alone = generate(ours, tok(p, return_tensors="pt").input_ids, n)
        assert torch.equal(batch[i, -n:], alone[0, -n:]), f"row {i} ({p!r}) generated differently when padded"


def test_positions_not_shifted_for_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    assert torch.equal(positions_from_mask(mask), expected)
    assert torch.equal(positions_from_mask(mask.bool()), expected)


@pytest.mark.parametrize("q_len", [5, 2, 1])
def test_padding_mask_differs_from_transformers(q_len):
    from transformers.masking_utils import sdpa_mask

    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]])
    k_len = am.shape[1]
    ours = padding_causal_mask(am, q_len)
    assert ours.shape == (4, 1, q_len, k_len) and ours.dtype == torch.bool
    theirs = sdpa_mask(batch_size=4, q_length=q_len, kv_length=k_len, q_offset=k_len - q_len,
                       attention_mask=am.bool(), allow_is_causal_skip=False)
    assert torch.equal(ours, theirs.expand_as(ours))


def test_mask_of_ones_changes_unpadded_tokens(bundled):
    _, tok, ours = bundled
    ids = tok("ROMEO:", return_tensors="pt").input_ids.repeat(2, 1)
    assert torch.equal(generate(ours, ids, 25, attention_mask=torch.ones_like(ids)), generate(ours, ids, 25))


def test_finished_rows_not_padded_or_loop_runs_on(bundled):
    hf, tok, ours = bundled
    ids, mask = padded_prompts(tok)
    eos = tok("\n", add_special_tokens=False).input_ids[-1]  # frequent in the bundled model's text
    n = 200
    expected = hf_greedy(hf, ids, mask, n, eos_token_id=eos)
    got = generate(ours, ids, n, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    new = got[:, ids.shape[1]:]
    assert (new == eos).any(dim=1).all(), "the test needs every row to finish"
    assert got.shape[1] < ids.shape[1] + n, "the loop ran on after every row had produced EOS"
    first = (new == eos).int().argmax(dim=1)
    assert len(set(first.tolist())) > 1, "the test needs rows that finish at different steps"
    for i, f in enumerate(first.tolist()):
        assert (new[i, f + 1:] == 0).all(), f"row {i} went on generating after its EOS"


def test_eos_list_ignored(bundled):
    """Issue 22 §1.2: Llama 3.x Instruct's generation_config.eos_token_id is a list; generate ignored it. Any id of
    the list ends a row, as transformers' EosTokenCriteria (torch.isin) does."""
    hf, tok, ours = bundled
    ids, mask = padded_prompts(tok)
    eos = [tok("\n", add_special_tokens=False).input_ids[-1], tok(",", add_special_tokens=False).input_ids[-1]]
    n = 60
    expected = hf_greedy(hf, ids, mask, n, eos_token_id=eos)
    for form in (eos, tuple(eos), torch.tensor(eos)):
        got = generate(ours, ids, n, attention_mask=mask, eos_token_id=form, pad_token_id=0)
        assert torch.equal(got, expected), type(form).__name__
    new = expected[:, ids.shape[1]:]
    hits = [torch.isin(new, torch.tensor([e])).any(dim=1) for e in eos]
    assert hits[0].any() and hits[1].any(), "the test needs rows that stop at each of the two ids"
    assert expected.shape[1] < ids.shape[1] + n, "the test needs every row to finish early"


def test_prompt_ending_in_eos_finishes_the_row(bundled):
    """transformers checks EOS on generated tokens only: a prompt that ends in EOS still generates."""
    hf, tok, ours = bundled
    eos = tok("\n", add_special_tokens=False).input_ids[-1]
    rows = [tok("ROMEO:", return_tensors="pt").input_ids[0], tok("JULIET: O", return_tensors="pt").input_ids[0]]
    rows[0] = torch.cat([rows[0], torch.tensor([eos])])
    ids, mask = pad_prompts(rows, 0)
    expected = hf_greedy(hf, ids, mask, 40, eos_token_id=eos)
    got = generate(ours, ids, 40, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    assert got[0, ids.shape[1]] != 0, "row 0 was treated as finished because its prompt ends in EOS"


@pytest.mark.parametrize("cache_kind", ["KVCache", "ConcatKVCache"])
def test_padded_batch_needs_a_special_cache(bundled, cache_kind):
    """A padded batch through the model, step by step with an ordinary cache, equals one full forward."""
    _, tok, ours = bundled
    ids, mask = padded_prompts(tok)
    full = ours(ids, attention_mask=mask)  # (B, T, V)
    cut = ids.shape[1] - 3
    cache = KVCache.for_model(ours, ids.shape[0], ids.shape[1]) if cache_kind == "KVCache" else ConcatKVCache(
        ours.args.num_layers)
    steps = [ours(ids[:, :cut], cache, attention_mask=mask[:, :cut])[:, -1]]
    for j in range(cut, ids.shape[1]):
        steps.append(ours(ids[:, j:j + 1], cache, attention_mask=mask[:, :j + 1])[:, -1])
    real = mask[:, cut - 1:].bool()
    stepped = torch.stack(steps, dim=1)  # (B, 4, V)
    torch.testing.assert_close(stepped[real], full[:, cut - 1:][real], atol=1e-5, rtol=1e-5)


def test_attn_fn_ignores_the_padding_mask(bundled):
    _, tok, ours = bundled
    ids, mask = padded_prompts(tok)
    seen = []

    def spy(q, k, v, mask=None):
        seen.append(mask)
        return sdpa_attention(q, k, v, mask)

    torch.testing.assert_close(ours(ids, attention_mask=mask, attn_fn=spy), ours(ids, attention_mask=mask))
    assert len(seen) == ours.args.num_layers and all(m is not None and m.shape[0] == len(PROMPTS) for m in seen)


@pytest.mark.parametrize("bad, message", [
    (lambda m: m[:, 1:], "attention_mask must be (batch, cached + new tokens)"),
    (lambda m: m.float(), "0/1 integers or bools"),
    (lambda m: m * 2, "only 0 (padding) and 1"),
    (lambda m: m.tolist(), "must be a (batch, seq) tensor"),
])
def test_bad_attention_mask_gets_a_silent_wrong_answer(bundled, bad, message):
    _, tok, ours = bundled
    ids, mask = padded_prompts(tok)
    with pytest.raises(ValueError, match=re.escape(message)):
        ours(ids, attention_mask=bad(mask))
    with pytest.raises(ValueError, match=re.escape(message)):
        FastGenerator(ours).generate(ids, 2, attention_mask=bad(mask))


def test_right_padding_generates_from_a_pad_token(bundled):
    _, tok, ours = bundled
    ids, mask = padded_prompts(tok)
    with pytest.raises(ValueError, match="pad on the left"):
        generate(ours, ids.flip(1), 5, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="needs a pad_token_id"):
        generate(ours, ids, 5, attention_mask=mask, eos_token_id=0)
