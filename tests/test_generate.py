"""Reference generators must equal transformers' greedy generate token for token (fp32)."""

import pytest
import torch

from kvcourse import ConcatKVCache, Llama, load_model
from kvcourse.generate import generate, generate_uncached


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
