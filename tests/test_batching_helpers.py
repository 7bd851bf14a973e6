"""kvcourse.batching, the helpers of notebook 06: they must say what transformers does, since the notebook grades
against them."""

import matplotlib
import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from kvcourse import Llama, load_model
from kvcourse.batching import (
    GENERATE_SAMPLING_DEFAULTS,
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
from kvcourse.timing import StepTimer, Timing, progress, time_it

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


def tiny_hf(pad_token_id: int | None = None, vocab: int = 64) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      pad_token_id=pad_token_id, initializer_range=0.5)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_filter_defaults_are_not_generate_do_samples():
    """Issue 22 §1.7: transformers_filter() filters nothing (top_k=0) while generate(do_sample=True) keeps the 50 most
    likely tokens. GENERATE_SAMPLING_DEFAULTS must be transformers' own, and sampling with it must draw the same
    tokens as generate(do_sample=True) with the same seed."""
    want = GenerationConfig._get_default_generation_params()
    assert GENERATE_SAMPLING_DEFAULTS == {k: want[k] for k in ("temperature", "top_k", "top_p")}
    hf = tiny_hf(vocab=97)  # more tokens than top_k=50: the default filter removes some
    ids = torch.tensor([[5, 17, 3], [8, 2, 40]])
    n = 12
    torch.manual_seed(11)
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=n,
                           min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(11)
    out = ids
    with torch.inference_mode():
        for _ in range(n):
            scores = transformers_filter(hf(out).logits[:, -1].float(), **GENERATE_SAMPLING_DEFAULTS)  # (B, V)
            assert int(torch.isfinite(scores).sum(-1).max()) <= 50, "top_k=50 must remove tokens of a 97-token vocab"
            out = torch.cat([out, torch.multinomial(scores.softmax(-1), 1)], dim=1)
    assert torch.equal(out, expected)
    logits = torch.randn(2, 97, generator=torch.Generator().manual_seed(0))
    assert torch.equal(transformers_filter(logits), logits), "the function's own defaults filter nothing (documented)"


def test_eos_list_ignored_by_eos_rule_and_mismatch(models):
    """Issue 22 §1.2 in the helpers: a list of EOS ids (Llama 3.x Instruct) ends a row at any of them."""
    hf, tok, model = models
    ids, am = pad_prompts([tok(t).input_ids for t in TEXTS], 0)
    t, eos = ids.shape[1], [NEWLINE, tok(",", add_special_tokens=False).input_ids[-1]]
    ref = hf.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=40, eos_token_id=eos, pad_token_id=0)
    free = generate(model, ids, 40, attention_mask=am)
    single = hf.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=40, eos_token_id=NEWLINE,
                         pad_token_id=0)
    assert not torch.equal(ref, single), "test set-up: the second id must end some row earlier"
    assert torch.equal(eos_rule(free, t, eos, 0), ref)
    assert torch.equal(eos_rule(free, t, torch.tensor(eos), 0), ref)
    assert generation_mismatch(ref.clone(), ref, t, eos, 0) is None
    unpadded = free[:, : ref.shape[1]]
    assert "a finished row keeps emitting pad_token_id" in generation_mismatch(unpadded, ref, t, eos, 0)


def test_call_timer_never_synchronizes_a_gpu_model(monkeypatch):
    """Issue 22 §3: CallTimer(model) synchronised "cpu" whatever the model's device, so GPU calls timed their launch."""
    import kvcourse.batching as batching

    seen = []
    monkeypatch.setattr(batching, "synchronize", lambda device: seen.append(torch.device(device)))

    class OnGpu:
        device = torch.device("cuda", 0)

        def __call__(self, input_ids):
            return input_ids

    timed = CallTimer(OnGpu())
    timed(torch.tensor([[1, 2]]))
    assert timed.device == torch.device("cuda", 0) and set(seen) == {torch.device("cuda", 0)}
    assert CallTimer(tiny_hf()).device == torch.device("cpu")  # a transformers model: its parameters' device


def test_mask_and_positions_hard_code_pad_token_id(monkeypatch):
    """Issue 22 §3: transformers_mask_and_positions passed pad_token_id=0 whatever the model's."""
    hf = tiny_hf(pad_token_id=5)
    given = []
    real = hf.generate

    def spy(*args, **kwargs):
        given.append(kwargs["pad_token_id"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "generate", spy)
    ids, am = pad_prompts([[3, 4, 6], [7]], 5)
    transformers_mask_and_positions(hf, ids, am)
    transformers_mask_and_positions(hf, ids, am, pad_token_id=9)
    assert given == [5, 9]
    with pytest.raises(ValueError, match="pad_token_id must be a token id in 0..63, got 64"):
        transformers_mask_and_positions(hf, ids, am, pad_token_id=64)


_LOGITS = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
_ONES = torch.ones(1, 6, dtype=torch.long)
BAD_INPUTS = {  # the bug each guards: what the helper did with it before (a silent answer or a raw torch error)
    "pad_prompts-pad-None-filled-with-None": (lambda hf, m: pad_prompts([[1, 2], [3]], None), ValueError,
                                              "pad_token_id is None"),
    "pad_prompts-no-prompts": (lambda hf, m: pad_prompts([], 0), ValueError, "at least one prompt"),
    "pad_prompts-empty-prompt": (lambda hf, m: pad_prompts([[1], []], 0), ValueError, r"empty prompt at index \[1\]"),
    "filter-temperature-0-divides-by-0": (lambda hf, m: transformers_filter(_LOGITS, temperature=0.0), ValueError,
                                          "temperature must be a number > 0"),
    "filter-negative-top_k": (lambda hf, m: transformers_filter(_LOGITS, top_k=-1), ValueError,
                              r"top_k must be an int >= 0 \(0: no top-k\), got -1"),
    "filter-float-top_k": (lambda hf, m: transformers_filter(_LOGITS, top_k=2.5), ValueError, "got 2.5"),
    "filter-top_p-past-1": (lambda hf, m: transformers_filter(_LOGITS, top_p=1.5), ValueError, "top_p must be"),
    "filter-1-D-logits": (lambda hf, m: transformers_filter(_LOGITS[0], top_k=2), ValueError, r"\(10,\)"),
    "eos_rule-eos-None-compared-to-None": (lambda hf, m: eos_rule(_ONES, 3, None, None), ValueError,
                                           "eos_token_id.*None"),
    "eos_rule-pad-None": (lambda hf, m: eos_rule(_ONES, 3, 2, None), ValueError, "pad_token_id is None"),
    "eos_rule-prompt_len-past-the-tokens": (lambda hf, m: eos_rule(_ONES, 9, 2, 0), ValueError, "prompt_len.*got 9"),
    "mismatch-ref-a-list": (lambda hf, m: generation_mismatch(_ONES, [[1, 2]], 4), ValueError, "list"),
    "CallTimer-wraps-None": (lambda hf, m: CallTimer(None), TypeError, "NoneType None"),
    "CallTimer-id-past-vocab": (lambda hf, m: CallTimer(m)(torch.tensor([[m.args.vocab_size]])), ValueError,
                                "vocab_size"),
    "CallTimer-1-D-ids": (lambda hf, m: CallTimer(m)(torch.ones(3, dtype=torch.long)), ValueError, r"\(3,\)"),
    "plot-mask-of-another-shape": (lambda hf, m: plot_padded_batch([["a", "b"]], torch.ones(1, 3)), ValueError,
                                   r"\(1, 3\)"),
    "mask_and_positions-course-Llama": (lambda hf, m: transformers_mask_and_positions(m, _ONES, _ONES), TypeError,
                                        "Llama"),
    "mask_and_positions-mask-shape": (lambda hf, m: transformers_mask_and_positions(hf, _ONES[:, :5], _ONES[:, :4]),
                                      ValueError, r"\(1, 4\)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_helpers_take_bad_inputs_silently(models, case):
    """Issue 22 §2: each bad input a clear kvcourse error naming what was expected and what came."""
    hf, _, model = models
    fn, err, named = BAD_INPUTS[case]
    with pytest.raises(err, match=named):
        fn(hf, model)


# kvcourse.timing (CallTimer's siblings; no test file of their own)
TIMING_BAD_INPUTS = {
    "Timing-median-of-no-times": (lambda: Timing().median, ValueError, "no times"),
    "Timing-str-of-no-times": (lambda: str(Timing()), ValueError, "no times"),
    "time_it-0-repeats-empty-median": (lambda: time_it(lambda: None, repeats=0), ValueError, "repeats.*got 0"),
    "time_it-float-repeats": (lambda: time_it(lambda: None, repeats=2.5), ValueError, "repeats.*2.5"),
    "time_it-negative-warmup": (lambda: time_it(lambda: None, warmup=-1), ValueError, "warmup.*-1"),
    "time_it-not-a-function": (lambda: time_it(None), TypeError, "NoneType"),
    "StepTimer-unknown-device": (lambda: StepTimer("gpu"), ValueError, "'gpu'"),
    "progress-negative-total": (lambda: progress(range(2), total=-1), ValueError, "total.*-1"),
    "progress-a-count-not-an-iterable": (lambda: list(progress(5)), TypeError, r"range\(5\)"),
}


@pytest.mark.parametrize("case", TIMING_BAD_INPUTS)
def test_timing_takes_bad_inputs_silently(case):
    fn, err, named = TIMING_BAD_INPUTS[case]
    with pytest.raises(err, match=named):
        fn()
    assert len(time_it(lambda: None, repeats=2, warmup=0).times) == 2
