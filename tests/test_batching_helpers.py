"""kvcourse.batching, the helpers of notebook 06: they must say what transformers does, since the notebook grades
against them."""

import matplotlib
import pytest
import torch

from kvcourse import Llama, load_model
from kvcourse.batching import (
    CallTimer,
    eos_rule,
    generation_mismatch,
    pad_prompts,
    plot_padded_batch,
    transformers_filter,
    transformers_mask_and_positions,
)
from kvcourse.generate import generate
from kvcourse.llama import padding_causal_mask, positions_from_mask

matplotlib.use("Agg")

TEXTS = ["ROMEO:", "The red cat was", "To be, or not to be, that is the question:"]
NEWLINE = 199


@pytest.fixture(scope="module")
def models():
    hf, tok = load_model(device="cpu")
    return hf, tok, Llama.from_hf(hf)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_prompts_pads_as_the_tokenizer(models, side):
    _, tok, _ = models
    want = tok(TEXTS, padding=True, padding_side=side, return_tensors="pt")
    ids, am = pad_prompts([tok(t).input_ids for t in TEXTS], tok.pad_token_id, side=side)
    assert torch.equal(ids, want.input_ids) and torch.equal(am, want.attention_mask)
    with pytest.raises(ValueError, match="side"):
        pad_prompts([[1]], 0, side="middle")


def test_course_mask_and_positions_are_what_transformers_generate_uses(models):
    """The course's padding_causal_mask and positions_from_mask (the notebook's references) equal what transformers'
    generate hands its model, in the prefill and in decode steps, for padded batches and for one without padding."""
    hf, tok, _ = models
    assert tok("\n").input_ids == [NEWLINE]
    for texts in (TEXTS, ["A", "KING HENRY V: Once more unto the breach"], ["JULIET.", "ROMEO:"]):
        ids, am = pad_prompts([tok(t).input_ids for t in texts], 0)
        calls = transformers_mask_and_positions(hf, ids, am, steps=3)
        assert len(calls) == 3
        for step, (am_k, positions, mask) in enumerate(calls):
            q_len = ids.shape[1] if step == 0 else 1
            assert am_k.shape == (len(texts), ids.shape[1] + step)
            assert torch.equal(positions, positions_from_mask(am_k)[:, -q_len:])
            assert mask.dtype == torch.bool and torch.equal(mask, padding_causal_mask(am_k, q_len))


def test_transformers_filter_applies_the_warpers_in_generate_order():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04]])
    logits = probs.log()
    assert torch.equal(transformers_filter(logits), logits)  # nothing asked, nothing done
    assert torch.isfinite(transformers_filter(logits, top_p=0.6)).tolist() == [[True, True, False, False, False]]
    # temperature first: the nucleus is taken in the tempered probabilities (3 tokens, not 2)
    assert torch.isfinite(transformers_filter(logits, temperature=2.0, top_p=0.7)).sum() == 3
    tied = torch.tensor([[3.0, 2.0, 1.0, 2.0, 0.5, 2.0]])
    assert torch.isfinite(transformers_filter(tied, top_k=2)).sum() == 4  # ties with the k-th are kept
    assert torch.isfinite(transformers_filter(logits, top_p=0.0)).sum() == 1  # min_tokens_to_keep=1
    out = transformers_filter(logits, temperature=0.5, top_k=50)  # k > V is fine
    assert torch.allclose(out, logits / 0.5)


def test_eos_rule_and_mismatch_messages_match_transformers(models):
    hf, tok, model = models
    ids, am = pad_prompts([tok(t).input_ids for t in TEXTS], 0)
    t = ids.shape[1]
    ref = hf.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=40, eos_token_id=NEWLINE, pad_token_id=0)
    free = generate(model, ids, 40, attention_mask=am)  # no stopping
    assert ref.shape[1] < t + 40, "test set-up: every row should end its line within 40 tokens"
    assert torch.equal(eos_rule(free, t, NEWLINE, 0), ref)
    assert generation_mismatch(ref.clone(), ref, t, NEWLINE, 0) is None
    longer = torch.cat([ref, torch.zeros(len(TEXTS), 5, dtype=torch.long)], dim=1)  # five more steps of padding
    assert "stop as soon as every row is finished" in generation_mismatch(longer, ref, t, NEWLINE, 0)
    short = ref[:, : t + 1]
    assert "stop only when EVERY row is finished" in generation_mismatch(short, ref, t, NEWLINE, 0)
    unpadded = free[:, : ref.shape[1]]
    assert "a finished row keeps emitting pad_token_id" in generation_mismatch(unpadded, ref, t, NEWLINE, 0)
    other = ref.clone()
    other[0, -1] += 1
    assert "differs" in generation_mismatch(other, ref, t)
    assert "expected a (B, T + new) tensor" in generation_mismatch(ref[0], ref, t)


def test_call_timer_times_each_call_and_passes_attributes(models):
    _, tok, model = models
    ids, am = pad_prompts([tok(t).input_ids for t in TEXTS[:2]], 0)
    timed = CallTimer(model)
    out = generate(timed, ids, 5, attention_mask=am)
    assert torch.equal(out, generate(model, ids, 5, attention_mask=am))
    assert [n for n, _ in timed.calls] == [ids.shape[1], 1, 1, 1, 1]
    assert all(s > 0 for _, s in timed.calls) and timed.args is model.args


def test_plot_padded_batch_draws_batch_and_masks(models):
    _, tok, _ = models
    ids, am = pad_prompts([tok(t).input_ids for t in TEXTS], 0)
    tokens = [[tok.decode([i]) for i in row] for row in ids.tolist()]
    fig = plot_padded_batch(tokens, am, positions_from_mask(am), padding_causal_mask(am, ids.shape[1]))
    assert len(fig.axes) == 1 + len(TEXTS)
    assert len(plot_padded_batch(tokens, am).axes) == 1
