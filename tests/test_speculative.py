"""Speculative decoding (kvcourse.speculative, notebook 10): the oracle, the cost, the rewind and the sampler.

- Greedy speculative decoding gives exactly the target's greedy tokens, for k = 1..8 and both drafters, and the
  same tokens as transformers' assisted generation (assistant_model=) and prompt lookup (prompt_lookup_num_tokens=).
- It costs what it claims: target passes counted; a drafter that is always right needs ceil((N - 1) / (k + 1)) + 1
  passes, one that is always wrong N.
- After every step the target's cache holds exactly the context but the last token (nothing rejected stays).
- The sampler keeps the target's distribution: a chi-square test with a stated false-alarm rate, on the rule alone
  and on a whole run with a vocabulary of 6 where the exact probabilities are enumerable.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcourse import KVCache, Llama, load_model
from kvcourse.generate import generate
from kvcourse.models import DRAFT_MODEL
from kvcourse.speculative import (
    ModelDrafter,
    PromptLookupDrafter,
    expected_tokens_per_pass,
    greedy_accept,
    residual_distribution,
    sample_accept,
    speculative_generate,
)

SHAKESPEARE = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
REPETITIVE = "One, two, three, four, five, six, seven, eight, nine, ten, one, two, three, four, five,"


@pytest.fixture(scope="module")
def bard():
    hf, tok = load_model(device="cpu")
    return hf, tok, Llama.from_hf(hf)


@pytest.fixture(scope="module")
def draft():
    hf, _ = load_model("bard_draft", device="cpu")
    return hf, Llama.from_hf(hf)


def tiny(vocab: int = 6, seed: int = 0, layers: int = 2) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      initializer_range=0.5)
    return Llama.from_hf(LlamaForCausalLM(cfg).eval())


class Oracle:
    """A drafter that proposes the target's own greedy continuation (always right), or its runner-up (always
    wrong): for counting passes."""

    def __init__(self, reference: list[int], wrong: bool = False, vocab: int = 2048):
        self.reference, self.wrong, self.vocab = reference, wrong, vocab
        self.forward_passes = 0

    def reset(self) -> None:
        pass

    def propose(self, context, k):
        nxt = self.reference[len(context):len(context) + k]
        if self.wrong:
            nxt = [(t + 1) % self.vocab for t in nxt]
        return torch.tensor(nxt, dtype=torch.long), None


# ---- the oracle: the target's own greedy tokens -------------------------------------------------------------


@pytest.mark.parametrize("text", [SHAKESPEARE, REPETITIVE])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_speculative_tokens_differ_from_the_targets_greedy_tokens(bard, draft, text, k):
    _, tok, target = bard
    ids = tok(text, return_tensors="pt").input_ids
    ref = generate(target, ids, 40)
    for drafter in (PromptLookupDrafter(), ModelDrafter(draft[1])):
        out = speculative_generate(target, ids, 40, drafter, k)
        assert torch.equal(out.tokens, ref), f"{type(drafter).__name__} k={k}"
        assert out.new_tokens == 40
        assert out.target_passes == 1 + len(out.accepted)


def test_speculative_tokens_differ_from_transformers_assisted_generation(bard, draft):
    hf, tok, target = bard
    ids = tok(SHAKESPEARE, return_tensors="pt").input_ids
    n = 48
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
              eos_token_id=None)
    assisted = hf.generate(ids, assistant_model=draft[0], **kw)
    lookup = hf.generate(ids, prompt_lookup_num_tokens=4, **kw)
    ours_model = speculative_generate(target, ids, n, ModelDrafter(draft[1]), 4).tokens
    ours_lookup = speculative_generate(target, ids, n, PromptLookupDrafter(), 4).tokens
    assert torch.equal(ours_model, assisted)
    assert torch.equal(ours_lookup, lookup)


def test_prompt_lookup_proposes_other_tokens_than_transformers(bard):
    """Same candidates as transformers' PromptLookupCandidateGenerator (max_matching_ngram_size=2), call by call."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    _, tok, _ = bard
    ids = tok(REPETITIVE * 2, return_tensors="pt").input_ids
    theirs = PromptLookupCandidateGenerator(num_output_tokens=4, max_matching_ngram_size=2, max_length=10_000)
    ours = PromptLookupDrafter(max_ngram_size=2)
    for end in range(2, ids.shape[1]):
        cand, _ = theirs.get_candidates(ids[:, :end])
        expected = cand[0, end:].tolist()
        got = ours.propose(ids[0, :end].tolist(), 4)[0].tolist()
        assert got == expected, f"context of {end} tokens: ours {got}, transformers {expected}"


# ---- what it costs: passes counted ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 4, 7])
def test_target_passes_not_saved_by_a_drafter_that_is_always_right(bard, k):
    _, tok, target = bard
    ids = tok(SHAKESPEARE, return_tensors="pt").input_ids
    n = 30
    ref = generate(target, ids, n)[0].tolist()
    right = speculative_generate(target, ids, n, Oracle(ref), k)
    assert right.target_passes == 1 + math.ceil((n - 1) / (k + 1))
    assert right.acceptance_rate == 1.0
    wrong = speculative_generate(target, ids, n, Oracle(ref, wrong=True), k)
    assert wrong.target_passes == n  # the plain loop's count: one pass a token
    assert wrong.acceptance_rate == 0.0
    assert torch.equal(right.tokens, wrong.tokens)


def test_draft_model_passes_counted(bard, draft):
    _, tok, target = bard
    ids = tok(SHAKESPEARE, return_tensors="pt").input_ids
    drafter = ModelDrafter(draft[1])
    out = speculative_generate(target, ids, 30, drafter, 4)
    # each step: one pass to catch up on what the target emitted, then one per draft but the last
    assert out.draft_passes == sum(1 + (p - 1) for p in out.proposed if p)
    assert drafter.cache.get_seq_length() == len(drafter.held)  # the cache holds exactly the ids it says


# ---- the rewind: nothing rejected stays in the caches --------------------------------------------------------


class RecordingCache(KVCache):
    """A KVCache that records its length after every crop."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.after_crop: list[int] = []

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        self.after_crop.append(self.get_seq_length())


def test_rejected_drafts_left_in_the_target_cache(bard, draft):
    _, tok, target = bard
    ids = tok(REPETITIVE, return_tensors="pt").input_ids
    cache = RecordingCache.for_model(target, 1, 256)
    out = speculative_generate(target, ids, 40, ModelDrafter(draft[1]), 4, cache=cache)
    t = ids.shape[1]
    lengths = [t + 1 + sum(out.accepted[:i + 1]) + i for i in range(len(out.accepted))]
    assert cache.after_crop == lengths  # the context but its last token, after every step
    assert any(p > a for p, a in zip(out.proposed, out.accepted, strict=True)), "no draft was ever rejected"
    # what the cache holds is what a cache that never saw a rejected draft holds
    fresh = KVCache.for_model(target, 1, 256)
    with torch.inference_mode():
        target(out.tokens[:, :-1], fresh)
    for layer in range(target.args.num_layers):
        n = cache.get_seq_length()
        torch.testing.assert_close(cache.keys[layer][:, :, :n], fresh.keys[layer][:, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.values[layer][:, :, :n], fresh.values[layer][:, :, :n], rtol=1e-5, atol=1e-5)


def test_draft_cache_keeps_tokens_the_target_rejected(draft):
    drafter = ModelDrafter(draft[1])
    drafter.propose([5, 6, 7, 8], 4)  # holds 5 6 7 8 d1 d2 d3
    held = list(drafter.held)
    assert drafter.cache.get_seq_length() == len(held)
    other = (held[4] + 1) % 2048
    drafter.propose([5, 6, 7, 8, other], 2)  # the target rejected d1: the draft cache must forget d1..d3
    fresh = ModelDrafter(draft[1])
    fresh.propose([5, 6, 7, 8, other], 2)
    assert drafter.held == fresh.held
    n = fresh.cache.get_seq_length()
    for layer in range(len(fresh.cache.keys)):
        torch.testing.assert_close(drafter.cache.keys[layer][:, :, :n], fresh.cache.keys[layer][:, :, :n],
                                   rtol=1e-5, atol=1e-5)


# ---- verification rules --------------------------------------------------------------------------------------


def test_greedy_accept_counts_and_bonus():
    logits = torch.full((4, 10), -1.0)
    for i, best in enumerate([3, 4, 5, 6]):
        logits[i, best] = 1.0
    assert greedy_accept(torch.tensor([3, 4, 5]), logits) == (3, 6)  # all kept: the bonus from the last row
    assert greedy_accept(torch.tensor([3, 9, 5]), logits) == (1, 4)  # stops at the first disagreement
    assert greedy_accept(torch.tensor([0, 4, 5]), logits) == (0, 3)
    assert greedy_accept(torch.zeros(0, dtype=torch.long), logits[:1]) == (0, 3)


def test_residual_distribution_is_not_normalized_max_of_p_minus_q():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(residual_distribution(p, p), p)  # nothing to correct: p itself


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; p-value from the regularized upper incomplete gamma function."""
    n = counts.sum()
    keep = probs > 0
    expected = probs[keep] * n
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


ALPHA = 1e-3  # the false-alarm rate of each statistical test below: a correct sampler fails it 1 time in 1000


def test_sample_accept_changes_the_targets_distribution():
    """The first token a step emits is distributed as p[0], whatever q: 20,000 seeded draws, chi-square at ALPHA."""
    g = torch.Generator().manual_seed(0)
    v, k, n = 6, 3, 20_000
    p = torch.softmax(torch.randn(k + 1, v, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(k, v, generator=g, dtype=torch.float64) * 2, -1)
    counts = torch.zeros(v, dtype=torch.float64)
    for _ in range(n):
        drafts = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(k)])
        kept, nxt = sample_accept(drafts, q, p, g)
        first = int(drafts[0]) if kept > 0 else nxt
        counts[first] += 1
    assert chi_square_pvalue(counts, p[0]) > ALPHA


def test_sample_accept_from_p_instead_of_the_residual_is_caught():
    """The statistical test can fail: sampling the correction from p (a classic mistake) is rejected."""
    g = torch.Generator().manual_seed(0)
    v, n = 6, 20_000
    p = torch.softmax(torch.randn(2, v, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(1, v, generator=g, dtype=torch.float64) * 2, -1)
    counts = torch.zeros(v, dtype=torch.float64)
    for _ in range(n):
        d = torch.multinomial(q[0], 1, generator=g)
        if torch.rand((), generator=g, dtype=torch.float64) * q[0, d] <= p[0, d]:
            counts[d] += 1
        else:
            counts[torch.multinomial(p[0], 1, generator=g)] += 1  # the mistake
    assert chi_square_pvalue(counts, p[0]) < ALPHA


def test_speculative_sampling_changes_the_joint_distribution_of_a_whole_run():
    """Three new tokens from a 4-token vocabulary: 64 outcomes whose exact probabilities the target gives by
    enumeration. 8,000 seeded speculative runs (a different random model as the draft) match them. The first token
    comes from the prefill; the step after it drafts one token (the most that can still be emitted), so both the
    rejection branch and the bonus branch are exercised."""
    v, n = 4, 3
    target, draft_model = tiny(vocab=v, seed=0), tiny(vocab=v, seed=1, layers=1)
    prompt = torch.tensor([[1, 2, 3]])
    temp = 1.5
    joint = torch.zeros(*(v,) * n, dtype=torch.float64)
    with torch.no_grad():
        for seq in itertools.product(range(v), repeat=n):
            ids = torch.cat([prompt, torch.tensor([seq[:-1]], dtype=torch.long)], 1)
            probs = torch.softmax(target(ids)[0, -n:].double() / temp, -1)  # (n, V): each new token's distribution
            joint[seq] = math.prod(float(probs[i, t]) for i, t in enumerate(seq))
    g = torch.Generator().manual_seed(0)
    drafter = ModelDrafter(draft_model, 64, temperature=temp)
    counts = torch.zeros(v ** n, dtype=torch.float64)
    steps_with_bonus = 0
    for _ in range(8000):
        out = speculative_generate(target, prompt, n, drafter, 2, do_sample=True, temperature=temp, generator=g)
        a, b, c = out.tokens[0, -n:].tolist()
        counts[(a * v + b) * v + c] += 1
        steps_with_bonus += sum(p == k for p, k in zip(out.proposed, out.accepted, strict=True) if p)
    assert steps_with_bonus > 1000, "the all-accepted branch was hardly exercised"
    assert chi_square_pvalue(counts, joint.flatten()) > ALPHA


def test_seeded_speculative_sampling_not_reproducible(bard, draft):
    _, tok, target = bard
    ids = tok(SHAKESPEARE, return_tensors="pt").input_ids
    runs = [speculative_generate(target, ids, 24, ModelDrafter(draft[1]), 3, do_sample=True,
                                 generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].accepted == runs[1].accepted


# ---- the formula ---------------------------------------------------------------------------------------------


def test_expected_tokens_per_pass_formula():
    assert expected_tokens_per_pass(0.0, 4) == 1.0
    assert expected_tokens_per_pass(1.0, 4) == 5.0
    assert expected_tokens_per_pass(0.5, 2) == pytest.approx(1.75)
    # against a simulation of independent acceptances
    g = torch.Generator().manual_seed(0)
    accepted = torch.rand(100_000, 4, generator=g) < 0.7
    first_reject = torch.where(accepted.all(1), 4, (~accepted).float().argmax(1))
    assert (first_reject + 1).double().mean().item() == pytest.approx(expected_tokens_per_pass(0.7, 4), rel=0.01)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_draft_model_with_another_vocabulary_accepted(bard):
    _, tok, target = bard
    ids = tok(SHAKESPEARE, return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="2048"):
        speculative_generate(target, ids, 8, ModelDrafter(tiny(vocab=64)), 2)


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_k_below_one_accepted(bard, k):
    _, tok, target = bard
    ids = tok(SHAKESPEARE, return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="k"):
        speculative_generate(target, ids, 8, PromptLookupDrafter(), k)


def test_a_batch_accepted(bard):
    _, tok, target = bard
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        speculative_generate(target, torch.ones(2, 4, dtype=torch.long), 8, PromptLookupDrafter(), 2)


def test_draft_model_file_missing():
    assert (DRAFT_MODEL / "model.safetensors").exists()
    assert (DRAFT_MODEL / "README.md").read_text().count("bard_draft") >= 1


class ProposeOnly:
    """A third party's drafter: only ``propose``, returning what it is given (no reset, no pass counter)."""

    def __init__(self, reference: list[int], shape=None):
        self.reference, self.shape = reference, shape

    def propose(self, context, k):
        nxt = self.reference[len(context):len(context) + k]
        if self.shape == "list":
            return nxt, None
        offset = 5000 if self.shape == "big" else 0  # "big": ids past the 2048-token vocabulary
        return torch.tensor(nxt, dtype=torch.long) + offset, None


def test_drafter_with_only_propose_crashes(bard):
    _, tok, target = bard
    ids = tok(SHAKESPEARE, return_tensors="pt").input_ids
    plain = speculative_generate(target, ids, 12, Oracle([]), 1)  # drafts nothing: the target's greedy tokens
    out = speculative_generate(target, ids, 12, ProposeOnly(plain.tokens[0].tolist()), 3)
    assert torch.equal(out.tokens, plain.tokens) and out.draft_passes == 0
    assert out.target_passes == 1 + math.ceil(11 / 4)  # every draft kept


@pytest.mark.parametrize("shape, error, match", [("list", TypeError, "1-D tensor of token ids"),
                                                  ("big", ValueError, "outside the vocabulary")])
def test_bad_proposal_not_named(bard, shape, error, match):
    _, tok, target = bard
    ids = tok(SHAKESPEARE, return_tensors="pt").input_ids
    ref = ids[0].tolist() + [1] * 20
    with pytest.raises(error, match=match):
        speculative_generate(target, ids, 8, ProposeOnly(ref, shape), 2)
