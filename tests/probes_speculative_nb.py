"""Probe rows for notebook 10's helpers, kvcourse.speculative.exercises and kvcourse.speculative.plots.

Registered only when tests/test_probes.py lists the modules in MODULES ("speculative.exercises",
"speculative.plots"): before that their names are not public names there, and rows for them would be stale.
"""

from __future__ import annotations

import torch


def register(t) -> None:
    if "speculative.exercises" in t.MODULES:
        _exercises(t)
    if "speculative.plots" in t.MODULES:
        _plots(t)


def _out(t):
    spec = t.mod("speculative")
    return spec.SpeculativeOutput(tokens=t.ids(t=6), target_passes=3, proposed=[2, 2], accepted=[2, 0])


def _exercises(t) -> None:
    ex = lambda: t.mod("speculative.exercises")  # noqa: E731
    onehot = lambda: torch.nn.functional.one_hot(torch.tensor([3, 4, 5, 6]), 10).float()  # noqa: E731
    p = lambda: torch.softmax(torch.randn(2, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)  # noqa: E731
    q = lambda: torch.softmax(torch.randn(1, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)  # noqa: E731

    def right(drafts, qq, pp, generator=None):
        return 1, 0

    def boom(*args):
        raise ValueError("boom")

    t.probe("speculative.exercises.forward_ms", "sizes holding 0", t.call(lambda: ex().forward_ms(t.llama(), 4, [1, 0])),
            names=("sizes", "0"))
    t.probe("speculative.exercises.forward_ms", "1 and 2 tokens", t.call(lambda: ex().forward_ms(t.llama(), 4, [1, 2], 2)),
            result=lambda r: set(r) == {1, 2} and all(v > 0 for v in r.values()))
    t.probe("speculative.exercises.count_forwards", "not a module", t.call(
        lambda: ex().count_forwards(object()).__enter__()), names=("torch module", "object"))
    t.probe("speculative.exercises.count_forwards", "two passes", t.call(lambda: _counted(ex(), t)),
            result=lambda r: r == [5, 1])
    t.probe("speculative.exercises.run_checked", "the call raises", t.call(
        lambda: ex().run_checked("your answer", boom)), names=("your answer", "ValueError", "boom"))
    t.probe("speculative.exercises.token_sources", "2 kept, then 0", t.call(lambda: ex().token_sources(_out(t))),
            result=lambda r: r == ["prefill", "draft", "draft", "target", "target"])
    pq = lambda: (torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), -1),  # noqa: E731
                  torch.softmax(torch.randn(2, 4, generator=torch.Generator().manual_seed(1)), -1))
    t.probe("speculative.exercises.second_token_counts", "one draft only", t.call(
        lambda: ex().second_token_counts(t.mod("speculative").sample_accept, pq()[1][:1], pq()[0][:2], 10, 0)),
        names=("k >= 2", "(1, 4)"))
    t.probe("speculative.exercises.second_token_counts", "the reference rule", t.call(
        lambda: ex().second_token_counts(t.mod("speculative").sample_accept, pq()[1], pq()[0], 50, 0)),
        result=lambda r: r.shape == (4,) and 0 < r.sum() <= 50)
    t.probe("speculative.exercises.reproducible", "the reference rule", t.call(
        lambda: ex().reproducible(t.mod("speculative").sample_accept, pq()[1], pq()[0], torch.tensor([1, 2]), [0, 1])),
        result=lambda r: r == "")
    t.probe("speculative.exercises.reproducible", "a rule on the global generator", t.call(
        lambda: ex().reproducible(lambda d, q, p, g: (0, int(torch.randint(0, 4, ()))), pq()[1], pq()[0],
                                  torch.tensor([1, 2]), range(8))), result=lambda r: "global generator" in r)
    t.probe("speculative.exercises.tested_alpha", "2 kept of 3 tested", t.call(lambda: ex().tested_alpha(_out(t))),
            result=lambda r: abs(r - 2 / 3) < 1e-12)
    t.probe("speculative.exercises.tested_alpha", "a list", t.call(lambda: ex().tested_alpha([1, 2])),
            names=("SpeculativeOutput", "list"))
    t.probe("speculative.exercises.sweep", "k = 0", t.call(lambda: ex().sweep(
        t.llama(), {"lookup": t.mod("speculative").PromptLookupDrafter}, {"p": t.ids()}, [0], 4)), names=("ks", "0"))
    t.probe("speculative.exercises.greedy_variants", "one position ahead", t.call(
        lambda: ex().greedy_variants(torch.tensor([4, 5, 6]), onehot())),
        result=lambda r: r[0][0] == (0, 3) and r[1][0] == (3, 6))
    t.probe("speculative.exercises.UnsyncedDrafter", "max_seq_len 0", t.call(
        lambda: ex().UnsyncedDrafter(t.llama(), 0)), names=("max_seq_len", "0"))
    drafter = lambda: ex().UnsyncedDrafter(t.llama(), 16)  # noqa: E731
    t.probe("speculative.exercises.UnsyncedDrafter.propose", "negative k", t.on(drafter, "propose", [1, 2], -1),
            names=(">= 0", "-1"))
    t.probe("speculative.exercises.UnsyncedDrafter.propose", "past its cache", t.on(drafter, "propose",
                                                                                    list(range(15)), 4),
            names=("16", "18"))

    def proposed():
        d = drafter()
        d.propose([1, 2, 3], 3)
        return d

    t.probe("speculative.exercises.UnsyncedDrafter.propose", "a cache never rewound",
            t.on(proposed, "propose", [1, 2, 3, 4], 2), names=("holds 5 tokens", "only 4", "not rewound"))
    t.probe("speculative.exercises.UnsyncedDrafter.reset", "after a proposal", t.on(proposed, "reset"),
            result=lambda r: r is None)
    t.probe("speculative.exercises.rewind_hint", "one rejected draft kept", t.call(
        lambda: ex().rewind_hint((10, 9), 4, 2, (9, 8))), result=lambda r: "one rejected draft" in r)
    t.probe("speculative.exercises.rewind_hint", "right lengths", t.call(
        lambda: ex().rewind_hint((10, 9), 4, 2, (8, 8))), result=lambda r: r == "")
    t.probe("speculative.exercises.call_rewind", "the answer raises", t.call(
        lambda: ex().call_rewind(boom, None, None, 2, 2)), names=("proposed=2", "kept=2", "boom"))
    def rewind(target_cache, draft_cache, proposed, kept):
        keep = target_cache.get_seq_length() - (proposed - kept)
        target_cache.crop(keep)
        draft_cache.crop(min(keep, draft_cache.get_seq_length()))

    t.probe("speculative.exercises.check_rewind_step", "kept above k", t.call(
        lambda: ex().check_rewind_step(rewind, t.llama(), t.llama(), [1, 2, 3], 2, 5)), names=("kept", "0..2", "5"))
    t.probe("speculative.exercises.check_rewind_step", "a right rewind", t.call(
        lambda: ex().check_rewind_step(rewind, t.llama(), t.llama(), [1, 2, 3], 3, 1)), result=lambda r: r is None)
    t.probe("speculative.exercises.check_rewind_step", "a rewind that keeps the draft's cache", t.call(
        lambda: ex().check_rewind_step(lambda tc, dc, p, k: tc.crop(tc.get_seq_length() - (p - k)), t.llama(),
                                       t.llama(), [1, 2, 3], 3, 0)), names=("the DRAFT's was not",))
    t.probe("speculative.exercises.rewind_hook", "a drafter without a cache", t.call(
        lambda: ex().rewind_hook(boom, t.mod("speculative").PromptLookupDrafter(), [])),
        names=("UnsyncedDrafter", "PromptLookupDrafter"))
    t.probe("speculative.exercises.cache_mismatch", "a cache that saw the text", t.call(
        lambda: ex().cache_mismatch(t.llama(), _fed(t, [1, 2, 3]), [1, 2, 3, 4], "target")), result=lambda r: r == "")
    t.probe("speculative.exercises.cache_mismatch", "a cache that saw another token", t.call(
        lambda: ex().cache_mismatch(t.llama(), _fed(t, [1, 9, 3]), [1, 2, 3, 4], "draft")),
        result=lambda r: "position 1" in r and "draft" in r)
    t.probe("speculative.exercises.chi_square_pvalue", "shapes differ", t.call(
        lambda: ex().chi_square_pvalue(torch.ones(3), torch.ones(4) / 4)), names=("(3,)", "(4,)"))
    t.probe("speculative.exercises.chi_square_pvalue", "counts equal to the law", t.call(
        lambda: ex().chi_square_pvalue(torch.tensor([25.0, 75.0]), torch.tensor([0.25, 0.75]))),
        result=lambda r: abs(r - 1.0) < 1e-9)
    t.probe("speculative.exercises.first_token_counts", "an answer that raises", t.call(
        lambda: ex().first_token_counts(boom, q(), p(), 10, seed=0)), names=("my_sample_accept", "boom"))
    t.probe("speculative.exercises.first_token_counts", "always keeps d_1", t.call(
        lambda: ex().first_token_counts(right, q(), p(), 50, seed=0)), result=lambda r: float(r.sum()) == 50)
    t.probe("speculative.exercises.sampling_law", "unknown rule", t.call(
        lambda: ex().sampling_law(p(), q(), "p_over_q")), names=("rule", "p_over_q"))
    t.probe("speculative.exercises.sampling_law", "each law sums to 1", t.call(
        lambda: [ex().sampling_law(p(), q(), r).sum().item() for r in ("correct", "from_p", "q_over_p")]),
        result=lambda r: all(abs(x - 1) < 1e-9 for x in r))
    t.probe("speculative.exercises.sampling_hint", "counts of the right law", t.call(
        lambda: ex().sampling_hint(10_000 * p()[0], p(), q())), result=lambda r: r == "")


def _counted(ex, t):
    m = t.llama()
    with ex.count_forwards(m) as lengths:
        cache = t.mod("cache").KVCache.for_model(m, 1, 8)
        m(t.ids(), cache)
        m(t.ids(t=1), cache)
    return lengths


def _fed(t, tokens):
    cache = t.mod("cache").KVCache.for_model(t.llama(), 1, 8)
    with torch.no_grad():
        t.llama()(torch.tensor([tokens]), cache)
    return cache


def _plots(t) -> None:
    plots = lambda: t.mod("speculative.plots")  # noqa: E731
    t.probe("speculative.plots.accepted_per_step", "a list", t.call(lambda: plots().accepted_per_step([1, 2])),
            names=("SpeculativeOutput", "list"))
    t.probe("speculative.plots.accepted_per_step", "no step", t.call(lambda: plots().accepted_per_step(
        t.mod("speculative").SpeculativeOutput(tokens=t.ids()))), names=("no verification step",))
    t.probe("speculative.plots.sweep_plot", "no rows", t.call(lambda: plots().sweep_plot([])), names=("rows",))
    t.probe("speculative.plots.coloured_text", "prompt_len past the tokens", t.call(
        lambda: plots().coloured_text(None, _out(t), 9)), names=("prompt_len", "1..5", "9"))
