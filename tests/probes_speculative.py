"""Probe rows for kvcourse.speculative (notebook 10): bad input to every public name of the package."""

from __future__ import annotations

import torch


def register(t) -> None:
    spec = lambda: t.mod("speculative")  # noqa: E731
    logits = lambda: torch.randn(4, t.V, generator=torch.Generator().manual_seed(0))  # noqa: E731
    probs = lambda rows: torch.softmax(torch.randn(rows, t.V, generator=torch.Generator().manual_seed(rows)), -1)  # noqa: E731

    t.probe("speculative.greedy_accept", "draft as a list", t.call(lambda: spec().greedy_accept([1, 2, 3], logits())),
            names=("(k,)", "list"))
    t.probe("speculative.greedy_accept", "one row too few", t.call(
        lambda: spec().greedy_accept(torch.tensor([1, 2, 3, 4]), logits())), names=("5 rows", "got 4"))
    t.probe("speculative.greedy_accept", "draft id outside the vocabulary", t.call(
        lambda: spec().greedy_accept(torch.tensor([1, t.V, 3]), logits())), names=(str(t.V - 1), str(t.V)))
    t.probe("speculative.sample_accept", "q with a row missing", t.call(
        lambda: spec().sample_accept(torch.tensor([1, 2, 3]), probs(2), probs(4))), names=("(3,", "(2,"))
    t.probe("speculative.sample_accept", "p as int", t.call(
        lambda: spec().sample_accept(torch.tensor([1]), probs(1), torch.ones(2, t.V, dtype=torch.long))),
        names=("float", "torch.int64"))
    t.probe("speculative.residual_distribution", "shapes differ", t.call(
        lambda: spec().residual_distribution(probs(1)[0], probs(1)[0, :-1])), names=(f"({t.V},)", f"({t.V - 1},)"))
    t.probe("speculative.expected_tokens_per_pass", "alpha above 1", t.call(
        lambda: spec().expected_tokens_per_pass(1.5, 4)), names=("[0, 1]", "1.5"))
    t.probe("speculative.expected_tokens_per_pass", "negative k", t.call(
        lambda: spec().expected_tokens_per_pass(0.5, -1)), names=(">= 0", "-1"))
    t.probe("speculative.PromptLookupDrafter", "ngram size 0", t.call(
        lambda: spec().PromptLookupDrafter(max_ngram_size=0)), names=(">= 1", "0"))
    t.probe("speculative.PromptLookupDrafter.propose", "context a 2-D tensor", t.on(
        spec().PromptLookupDrafter, "propose", torch.ones(1, 5, dtype=torch.long), 2), names=("1-D", "(1, 5)"))
    t.probe("speculative.PromptLookupDrafter.propose", "a repeat", t.on(
        spec().PromptLookupDrafter, "propose", [1, 2, 3, 1, 2], 2), result=lambda r: r[0].tolist() == [3, 1])
    t.probe("speculative.PromptLookupDrafter.reset", "fresh", t.on(spec().PromptLookupDrafter, "reset"),
            result=lambda r: r is None)
    drafter = lambda: spec().ModelDrafter(t.llama(), 16)  # noqa: E731
    t.probe("speculative.ModelDrafter", "temperature 0", t.call(lambda: spec().ModelDrafter(t.llama(), 16,
                                                                                          temperature=0)),
            names=("> 0", "0"))
    t.probe("speculative.ModelDrafter.propose", "id outside the vocabulary", t.on(drafter, "propose", [1, t.V], 2),
            names=(f"vocab_size={t.V}", str(t.V)))
    t.probe("speculative.ModelDrafter.propose", "past its cache", t.on(drafter, "propose", list(range(15)), 4),
            names=("16", "18"))
    t.probe("speculative.ModelDrafter.propose", "negative k", t.on(drafter, "propose", [1, 2], -1),
            names=(">= 0", "-1"))
    t.probe("speculative.ModelDrafter.reset", "fresh", t.on(drafter, "reset"), result=lambda r: r is None)

    def proposed():
        d = drafter()
        d.propose([1, 2, 3], 3)
        return d

    t.probe("speculative.ModelDrafter.rewind", "past the end", t.on(proposed, "rewind", 9), names=("9", "5"))
    t.probe("speculative.speculative_generate", "k = 0", t.call(
        lambda: spec().speculative_generate(t.llama(), t.ids(), 4, spec().PromptLookupDrafter(), 0)),
        names=(">= 1", "0"))
    t.probe("speculative.speculative_generate", "a batch of 2", t.call(
        lambda: spec().speculative_generate(t.llama(), t.ids(b=2), 4, spec().PromptLookupDrafter(), 2)),
        names=("(1, T)", "(2, 5)"))
    t.probe("speculative.speculative_generate", "a draft of another vocabulary", t.call(
        lambda: spec().speculative_generate(t.llama(), t.ids(), 4, spec().ModelDrafter(_other_vocab(), 16), 2)),
        names=(str(t.V), "32"))
    t.probe("speculative.speculative_generate", "accept that keeps too many", t.call(
        lambda: spec().speculative_generate(t.llama(), t.ids(), 6, _AlwaysTwo(), 2, accept=lambda d, lg: (5, 0))),
        names=("0..2", "kept=5"))
    t.probe("speculative.speculative_generate", "a drafter without propose", t.call(
        lambda: spec().speculative_generate(t.llama(), t.ids(), 4, object(), 2)), names=("propose", "object"))
    t.probe("speculative.SpeculativeOutput", "empty", t.call(
        lambda: spec().SpeculativeOutput(tokens=t.ids())), result=lambda r: r.target_passes == 0)
    out = lambda: spec().SpeculativeOutput(tokens=t.ids(), target_passes=3, proposed=[2, 2], accepted=[2, 0])  # noqa: E731
    t.probe("speculative.SpeculativeOutput.acceptance_rate", "2 of 4", t.call(lambda: out().acceptance_rate),
            result=lambda r: r == 0.5)
    t.probe("speculative.SpeculativeOutput.new_tokens", "1 + 3 + 2", t.call(lambda: out().new_tokens),
            result=lambda r: r == 5)
    t.probe("speculative.SpeculativeOutput.tokens_per_pass", "5 over 3", t.call(lambda: out().tokens_per_pass),
            result=lambda r: abs(r - 5 / 3) < 1e-12)


class _AlwaysTwo:
    forward_passes = 0

    def reset(self) -> None:
        pass

    def propose(self, context, k):
        return torch.tensor([1, 2][:k], dtype=torch.long), None


def _other_vocab():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcourse import Llama

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return Llama.from_hf(LlamaForCausalLM(cfg).eval())
