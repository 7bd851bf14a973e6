"""Grading plumbing for notebook 10 (speculative decoding): measurements, a drafter whose cache the learner
rewinds, checks of what the caches hold, the statistics of the sampling test, and recognisers for the likely
mistakes, so the notebook's test cells stay short.

Nothing here is an answer to an exercise. The references the graders compare with are the package's own
(``verify.greedy_accept``, ``verify.sample_accept``, ``verify.expected_tokens_per_pass``, ``KVCache.crop``);
the ``*_variants`` and ``*_law`` functions compute what a *known mistake* gives, so that a test names the
mistake only when the learner's result equals (or fits) it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from ..cache import KVCache
from ..generate import _vocab_size, as_llama, generate
from ..timing import under_autograder
from .decode import SpeculativeOutput, speculative_generate
from .drafters import _check_context, _check_k
from .verify import residual_distribution

__all__ = ["ALPHA", "FRESH", "REPETITIVE", "UnsyncedDrafter", "cache_mismatch", "chi_square_pvalue",
           "call_rewind", "check_rewind_step", "count_forwards", "first_token_counts", "forward_ms", "greedy_variants", "rewind_hint", "rewind_hook",
           "reproducible", "run_checked", "sampling_law", "sampling_hint", "second_token_counts", "sweep", "tested_alpha",
           "token_sources"]

REPETITIVE = "The king, the king, the king"  # the bundled model's own greedy continuation repeats itself
FRESH = "ROMEO:\n"  # ... and here it does not
ALPHA = 1e-3  # the false-alarm rate of each chi-square test: a correct sampler fails one 1 time in 1000


# ---- measuring -------------------------------------------------------------------------------------------------
def _fastest_cpu(fn: Callable, repeats: int) -> tuple[float, object]:
    """(seconds, result): the least CPU time of this process over ``repeats`` calls of ``fn``. With one torch
    thread that is the wall time an idle machine would show; unlike the wall time, other jobs sharing the
    cores do not add to it (they still slow it a little, through the shared caches)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        result = fn()
        best = min(best, time.process_time() - t0)
    return best, result


def forward_ms(model, context_len: int, sizes: Sequence[int], repeats: int = 30) -> dict[int, float]:
    """CPU milliseconds of one forward pass of ``n`` new tokens against a ``KVCache`` already holding
    ``context_len`` tokens, for each ``n`` in ``sizes`` (the cache is cropped back after every pass): the
    least of ``repeats`` rounds that time every size in turn, after 2 rounds of warm-up (CPU time, as
    ``_fastest_cpu``). Under the autograder a few rounds only: this cell grades nothing."""
    model = as_llama(model)
    _check_k(context_len)
    if context_len < 1 or not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"forward_ms needs context_len >= 1 and sizes of ints >= 1, got {context_len!r} and "
                         f"{list(sizes)!r}")
    vocab = _vocab_size(model) or 2
    g = torch.Generator().manual_seed(0)
    cache = KVCache.for_model(model, 1, context_len + max(sizes))
    with torch.inference_mode():
        model(torch.randint(0, vocab, (1, context_len), generator=g), cache)
        xs = {n: torch.randint(0, vocab, (1, n), generator=g) for n in sizes}  # (1, n) each
        best = dict.fromkeys(sizes, float("inf"))
        for r in range(2 + (3 if under_autograder() else repeats)):  # the sizes interleaved: the same load for all
            for n in sizes:
                cache.crop(context_len)
                t0 = time.process_time()
                model(xs[n], cache)
                if r >= 2:  # 2 rounds of warm-up
                    best[n] = min(best[n], time.process_time() - t0)
        out = {n: 1e3 * best[n] for n in sizes}
    return out


@contextmanager
def count_forwards(model) -> Iterator[list[int]]:
    """Inside the block, every forward pass of ``model`` (a ``kvcourse.Llama``) appends its number of query
    tokens to the list yielded: proof of how many target passes a loop made, whatever it reports itself."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"count_forwards counts the forward passes of a torch module (a kvcourse Llama), got "
                        f"{type(model).__name__}")
    lengths: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: lengths.append(int(args[0].shape[1])))
    try:
        yield lengths
    finally:
        handle.remove()


def run_checked(what: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``; an error inside becomes an ``AssertionError`` that names ``what`` (the learner's
    answer) and the error. An ``AssertionError`` raised by a grader's hook passes through unchanged."""
    __tracebackhide__ = True
    try:
        return fn(*args, **kwargs)
    except AssertionError:
        raise
    except Exception as err:  # noqa: BLE001 - the learner's error, reported with what was running
        raise AssertionError(f"speculative decoding with {what} failed: {type(err).__name__}: {err}") from None


def token_sources(out: SpeculativeOutput) -> list[str]:
    """Where each new token came from: 'prefill' (the first, from the prompt's pass), then per step the kept
    drafts ('draft') and the target's own token ('target')."""
    kinds = ["prefill"]
    for kept in out.accepted:
        kinds += ["draft"] * kept + ["target"]
    return kinds


def tested_alpha(out: SpeculativeOutput) -> float:
    """The acceptance rate alpha of Leviathan et al. (section 3.1), estimated from a run: kept drafts over the
    drafts the verifier *tested*. A step that kept m of k drafts tested m + 1 of them (the first rejected one
    ends it) or all k; drafts after a rejection were never tested, so ``out.acceptance_rate`` (kept over
    proposed) underestimates alpha."""
    if not isinstance(out, SpeculativeOutput):
        raise TypeError(f"tested_alpha reads a SpeculativeOutput (what speculative_generate returns), got "
                        f"{type(out).__name__}")
    kept = sum(out.accepted)
    tested = sum(m + (m < p) for m, p in zip(out.accepted, out.proposed, strict=True))
    return kept / tested if tested else 0.0


def sweep(model, drafters: dict[str, Callable[[], object]], prompts: dict[str, torch.Tensor], ks: Sequence[int],
          max_new_tokens: int, repeats: int = 3) -> list[dict]:
    """For each prompt, drafter and k: a greedy speculative run, its target passes, tokens per pass, alpha
    (``tested_alpha``), and its CPU time against ``kvcourse.generate.generate``'s on the same prompt (checked to
    give the same tokens). Each time is the least of ``repeats`` runs (``_fastest_cpu``), the plain loop timed
    again before each drafter's runs (one run each under the autograder: the times grade nothing)."""
    model = as_llama(model)
    if not drafters or not prompts or not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"sweep needs drafters, prompts and ks (ints >= 1), got {len(drafters)} drafters, "
                         f"{len(prompts)} prompts and ks={list(ks)!r}")
    repeats = 1 if under_autograder() else repeats
    fastest = functools.partial(_fastest_cpu, repeats=repeats)

    rows = []
    for text, ids in prompts.items():
        for name, make in drafters.items():
            plain_s, plain = fastest(lambda ids=ids: generate(model, ids, max_new_tokens))
            for k in ks:
                sec, out = fastest(lambda ids=ids, k=k, make=make: speculative_generate(model, ids, max_new_tokens,
                                                                                          make(), k))
                if not torch.equal(out.tokens, plain):
                    raise AssertionError(f"sweep: {name} at k={k} on {text!r} gave other tokens than generate")
                rows.append({"prompt": text, "drafter": name, "k": k, "target passes": out.target_passes,
                             "tokens per pass": out.tokens_per_pass, "alpha": tested_alpha(out),
                             "draft passes": out.draft_passes, "seconds": sec, "plain seconds": plain_s,
                             "speedup": plain_s / sec, "out": out})
    return rows


# ---- exercise 1: greedy acceptance -----------------------------------------------------------------------------
def greedy_variants(drafts: torch.Tensor, logits: torch.Tensor) -> list[tuple[tuple[int, int], str]]:
    """(what a known mistake returns, the hint naming it) for drafts (k,) and target logits (k + 1, V)."""
    best = logits.argmax(dim=-1).tolist()  # (k + 1,)
    d = drafts.tolist()
    k = len(d)
    out = [((0, best[0]), "no draft was kept although the target agrees with the first one: this is the plain "
                          "loop, one target pass per token")]
    kept = next((i for i in range(k) if d[i] != best[i + 1]), k)
    out.append(((kept, best[min(kept, k)]), "draft d_(i+1) is checked against row i of the logits (row 0 is the "
                "target's prediction after x, before any draft), not against row i + 1"))
    kept = next((i for i in range(k) if d[i] != best[i]), k)
    if kept == k and k:
        out.append(((k, best[k - 1]), "when every draft is kept, the bonus token comes from the LAST row (row k, "
                    "the prediction after d_k)"))
    matches = sum(d[i] == best[i] for i in range(k))
    out.append(((matches, best[min(matches, k)]), "acceptance stops at the first draft the target disagrees with: "
                "a draft after a mismatch was conditioned on a wrong token, so it cannot be kept"))
    return out


# ---- exercise 2: rewinding both caches -------------------------------------------------------------------------
class UnsyncedDrafter:
    """A draft model that trusts its cache: at each ``propose`` it feeds only the context tokens *past* what its
    cache holds, without checking that what it holds is still the context. Whoever verifies must rewind its
    cache (``rewind_hook``); a rejected draft left in it would silently condition every later draft."""

    def __init__(self, model, max_seq_len: int = 512):
        self.model = as_llama(model)
        self.vocab_size = _vocab_size(self.model)
        self.cache = KVCache.for_model(self.model, 1, max_seq_len)
        self.fed: list[int] = []  # the token id at each cache position, as fed
        self.forward_passes = 0
        self.last_proposed = 0

    def reset(self) -> None:
        self.cache.reset()
        self.fed = []
        self.last_proposed = 0

    @torch.inference_mode()
    def propose(self, context: Sequence[int], k: int) -> tuple[torch.Tensor, None]:
        """k greedy drafts (k,) long. The cache then holds the context and the first k - 1 drafts."""
        ids = _check_context(context)
        _check_k(k)
        if k == 0:
            self.last_proposed = 0
            return torch.zeros(0, dtype=torch.long), None
        if len(ids) + k - 1 > self.cache.max_seq_len:
            raise ValueError(f"the draft cache holds {self.cache.max_seq_len} tokens; a context of {len(ids)} and "
                             f"{k} drafts need {len(ids) + k - 1}: build the UnsyncedDrafter with a larger max_seq_len")
        n = self.cache.get_seq_length()
        if n >= len(ids):
            raise AssertionError(f"the draft's cache holds {n} tokens but the context has only {len(ids)}: the "
                                 f"draft's cache was not rewound after the last verification (it still holds "
                                 f"rejected drafts)")
        self.last_proposed = k
        self.fed = self.fed[:n] + ids[n:]
        x = torch.tensor([ids[n:]], dtype=torch.long, device=self.model.device)  # (1, T_new)
        logits = self.model(x, self.cache, last_only=True)[0, -1]  # (V,)
        self.forward_passes += 1
        drafts = []
        for i in range(k):
            drafts.append(int(logits.argmax()))
            if i < k - 1:  # the last draft is never fed: the target checks it
                logits = self.model(torch.tensor([[drafts[-1]]], device=self.model.device), self.cache,
                                    last_only=True)[0, -1]  # (V,)
                self.forward_passes += 1
                self.fed.append(drafts[-1])
        return torch.tensor(drafts, dtype=torch.long), None


def rewind_hint(before: tuple[int, int], proposed: int, kept: int, got: tuple[int, int]) -> str:
    """The known mistake that turns caches of ``before`` (target, draft) lengths into ``got``, or ''."""
    n_t, n_d = before
    rejected = proposed - kept
    want_t = n_t - rejected
    want_d = min(want_t, n_d)
    if got[0] == 0 < want_t or got[1] == 0 < want_d:
        return ("crop(-0) is crop(0), which keeps NO token: when there is nothing to drop from a cache, crop(-r) with "
                "r = 0 empties it; crop to a length instead")
    if got[0] == want_t + 1:
        return ("one rejected draft is still in the target's cache: the target keeps x and the KEPT drafts; its own "
                "new token (the bonus) was never fed to it")
    if got[0] == n_t - kept and kept != rejected:
        return f"you dropped as many tokens as were KEPT ({kept}); drop the REJECTED drafts ({rejected})"
    if got[0] == want_t and got[1] == n_d and n_d != want_d:
        return "the target's cache was rewound but the DRAFT's was not: it still holds the rejected drafts"
    if got[0] == want_t and got[1] == n_d - rejected and rejected > 0:
        return ("the draft's cache never saw its last draft (d_k is proposed, never fed), so it holds one rejected "
                "draft fewer than the target's: you dropped a kept token from it")
    return ""


def call_rewind(fn: Callable, target_cache, draft_cache, proposed: int, kept: int,
                what: str = "rewind_caches") -> None:
    """``fn(target_cache, draft_cache, proposed, kept)``; an error becomes an ``AssertionError`` naming the call,
    with a hint when it is the known one (the draft's cache cropped past its length when every draft was kept)."""
    __tracebackhide__ = True
    call = f"{what}(target_cache, draft_cache, proposed={proposed}, kept={kept})"
    try:
        fn(target_cache, draft_cache, proposed, kept)
    except Exception as err:  # noqa: BLE001 - the learner's error, reported with its call
        hint = ""
        if kept == proposed and proposed and "crop" in str(err):
            hint = ("\nLikely cause: when every draft is kept, the draft's cache holds one token FEWER than the "
                    "target's (its last draft was never fed to it): there is nothing to drop from it")
        raise AssertionError(f"{call} raised {type(err).__name__}: {err}{hint}") from None


def rewind_hook(fn: Callable, drafter: UnsyncedDrafter, log: list, what: str = "your rewind_caches") -> Callable:
    """A ``rewind=`` hook for ``speculative_generate`` that calls ``fn(target_cache, draft_cache, proposed, kept)``
    and checks, after every step, the lengths both caches are left with (each step goes to ``log``)."""

    if not isinstance(getattr(drafter, "cache", None), KVCache) or not hasattr(drafter, "last_proposed"):
        raise TypeError(f"rewind_hook needs the UnsyncedDrafter whose cache the answer rewinds, got "
                        f"{type(drafter).__name__}")

    def hook(cache, length: int) -> None:
        __tracebackhide__ = True
        n_t, n_d = cache.get_seq_length(), drafter.cache.get_seq_length()
        proposed = drafter.last_proposed
        kept = proposed - (n_t - length)
        call_rewind(fn, cache, drafter.cache, proposed, kept, what)
        got = (cache.get_seq_length(), drafter.cache.get_seq_length())
        want = (length, min(length, n_d))
        log.append({"before": (n_t, n_d), "proposed": proposed, "kept": kept, "want": want, "got": got})
        if got != want:
            hint = rewind_hint((n_t, n_d), proposed, kept, got)
            raise AssertionError(f"step {len(log)}: before {what}(target_cache, draft_cache, proposed={proposed}, "
                                 f"kept={kept}) the target's cache held {n_t} tokens and the draft's {n_d}; after it "
                                 f"they hold {got[0]} and {got[1]}, expected {want[0]} and {want[1]}"
                                 + (f"\nLikely cause: {hint}" if hint else ""))

    return hook


def check_rewind_step(fn: Callable, target, draft, context: Sequence[int], k: int, kept: int) -> None:
    """One verified step built for real: the draft proposes ``k`` tokens after ``context`` (its cache: the
    context and d_1 .. d_(k-1)), the target runs the context but its last token x, then the verify pass over
    x, d_1 .. d_k. Then ``fn(target_cache, draft_cache, k, kept)``, and the lengths and contents of both caches
    against caches that saw only the context and the ``kept`` drafts. An ``AssertionError`` names what differs."""
    __tracebackhide__ = True
    target, draft = as_llama(target), as_llama(draft)
    ids = _check_context(context)
    _check_k(k)
    if isinstance(kept, bool) or not isinstance(kept, int) or not 0 <= kept <= k:
        raise ValueError(f"kept must be an int in 0..{k}, got {kept!r}")
    drafter = UnsyncedDrafter(draft, len(ids) + k + 1)
    drafts, _ = drafter.propose(ids, k)
    t_cache = KVCache.for_model(target, 1, len(ids) + k + 1)
    with torch.inference_mode():
        target(torch.tensor([ids[:-1]], device=target.device), t_cache)  # the context but x
        target(torch.tensor([[ids[-1], *drafts.tolist()]], device=target.device), t_cache)  # x, d_1 .. d_k
    before = (t_cache.get_seq_length(), drafter.cache.get_seq_length())
    call_rewind(fn, t_cache, drafter.cache, k, kept)
    got = (t_cache.get_seq_length(), drafter.cache.get_seq_length())
    want = (len(ids) + kept, min(len(ids) + kept, before[1]))
    if got != want:
        hint = rewind_hint(before, k, kept, got)
        raise AssertionError(f"rewind_caches(target_cache, draft_cache, proposed={k}, kept={kept}): the caches held "
                             f"{before[0]} (target) and {before[1]} (draft) tokens; after it {got[0]} and {got[1]}, "
                             f"expected {want[0]} and {want[1]}" + (f"\nLikely cause: {hint}" if hint else ""))
    accepted = ids + drafts[:kept].tolist()
    for model, cache, who in ((target, t_cache, "target"), (draft, drafter.cache, "draft")):
        bad = cache_mismatch(model, cache, accepted, who)
        if bad:
            raise AssertionError(f"rewind_caches(target_cache, draft_cache, proposed={k}, kept={kept}): {bad}")


def cache_mismatch(model, cache, tokens: Sequence[int], who: str) -> str:
    """'' when the first ``cache.get_seq_length()`` positions of ``cache`` hold what a cache that never saw a
    rejected draft holds after ``tokens[:n]`` (keys and values, every layer, to 1e-4); else what differs."""
    model = as_llama(model)
    n = cache.get_seq_length()
    if n > len(tokens):
        return f"the {who}'s cache holds {n} tokens, more than the {len(tokens)} the text has"
    fresh = KVCache.for_model(model, 1, max(n, 1))
    with torch.inference_mode():
        if n:
            model(torch.tensor([list(tokens[:n])], device=model.device), fresh)
    for layer in range(fresh.num_layers):
        for name, a, b in (("keys", cache.keys, fresh.keys), ("values", cache.values, fresh.values)):
            diff = (a[layer][:, :, :n] - b[layer][:, :, :n]).abs()  # (1, KV, n, D)
            if diff.numel() and float(diff.max()) > 1e-4:
                pos = int(diff.amax(dim=(0, 1, 3)).gt(1e-4).nonzero()[0])
                return (f"the {who}'s cache holds other {name} than a cache that never saw a rejected draft, first at "
                        f"position {pos} of layer {layer}: a rejected draft's keys and values are still in it")
    return ""


# ---- exercise 3: the sampling rule -----------------------------------------------------------------------------
def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit of ``counts`` to ``probs``; the p-value from the regularized upper
    incomplete gamma function. A count on an outcome of probability 0 gives 0.0 (impossible)."""
    if not isinstance(counts, torch.Tensor) or not isinstance(probs, torch.Tensor) or counts.shape != probs.shape \
            or counts.dim() != 1:
        got = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in (counts, probs)]
        raise ValueError(f"chi_square_pvalue takes counts and probabilities of the same shape (V,), got {got[0]} and "
                         f"{got[1]}")
    counts, probs = counts.double(), probs.double()
    if bool((counts[probs <= 0] > 0).any()):
        return 0.0
    n = counts.sum()
    keep = probs > 0
    expected = probs[keep] * n
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _steps(fn: Callable, q: torch.Tensor, p: torch.Tensor, n: int, g: torch.Generator, what: str):
    """``n`` steps of ``fn(drafts, q, p, g)`` on drafts sampled from ``q`` (k, V): yields (drafts, kept, next), each
    checked to be a (kept in 0..k, token id) pair; anything else is an AssertionError naming the call."""
    __tracebackhide__ = True
    k, v = q.shape
    drafts_all = torch.multinomial(q, n, replacement=True, generator=g).T  # (n, k): row i is one step's drafts
    for drafts in drafts_all:
        try:
            kept, nxt = fn(drafts, q, p, g)
            kept, nxt = int(kept), int(nxt)
        except Exception as err:  # noqa: BLE001 - the learner's error, reported with its call
            raise AssertionError(f"{what}(drafts={drafts.tolist()}, q, p, generator) raised or returned something "
                                 f"that is not (kept, next): {type(err).__name__}: {err}") from None
        if not 0 <= kept <= k or not 0 <= nxt < v:
            raise AssertionError(f"{what} returned kept={kept}, next={nxt}: expected kept in 0..{k} and a token id in "
                                 f"0..{v - 1}")
        yield drafts, kept, nxt


def first_token_counts(fn: Callable, q: torch.Tensor, p: torch.Tensor, n: int, seed: int,
                       what: str = "your my_sample_accept") -> torch.Tensor:
    """Counts (V,) of the first token a step emits, over ``n`` steps: drafts sampled from ``q`` (k, V), then
    ``fn(drafts, q, p, generator)``; the first token is d_1 if kept >= 1, else the token ``fn`` returned."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # an answer that draws from the global generator is still reproducible
    counts = torch.zeros(q.shape[1], dtype=torch.float64)
    for drafts, kept, nxt in _steps(fn, q, p, n, g, what):
        counts[int(drafts[0]) if kept else nxt] += 1
    return counts


def second_token_counts(fn: Callable, q: torch.Tensor, p: torch.Tensor, n: int, seed: int,
                        what: str = "your my_sample_accept") -> torch.Tensor:
    """Counts (V,) of the SECOND token a step emits, over the steps of ``n`` that kept their first draft: d_2 if
    kept >= 2, else the token ``fn`` returned. With p's rows fixed, it must follow p[1] (the first-token test
    cannot see a rule that mixes up rows, or correlates its acceptances, after the first draft)."""
    __tracebackhide__ = True
    if q.shape[0] < 2:
        raise ValueError(f"second_token_counts needs k >= 2 drafts (q of shape (k, V)), got q {tuple(q.shape)}")
    counts = torch.zeros(q.shape[1], dtype=torch.float64)
    for drafts, kept, nxt in _steps(fn, q, p, n, torch.Generator().manual_seed(seed), what):
        if kept >= 1:
            counts[int(drafts[1]) if kept >= 2 else nxt] += 1
    return counts


def reproducible(fn: Callable, q: torch.Tensor, p: torch.Tensor, drafts: torch.Tensor, seeds: Sequence[int]) -> str:
    """'' if ``fn`` gives the same (kept, next) for equal generator seeds whatever the global RNG's state, else what
    differed: a rule that draws from the global generator cannot be replayed from a seed."""
    for seed in seeds:
        runs = []
        for global_seed in (12345, 54321):
            torch.manual_seed(global_seed)  # a different global stream each time: only ``generator`` is the same
            kept, nxt = fn(drafts, q, p, torch.Generator().manual_seed(seed))
            runs.append((int(kept), int(nxt)))
        if runs[0] != runs[1]:
            return (f"two calls with torch.Generator().manual_seed({seed}) gave {runs[0]} and {runs[1]}: some random "
                    f"number came from the global generator, not from `generator`")
    return ""


def sampling_law(p: torch.Tensor, q: torch.Tensor, rule: str = "correct") -> torch.Tensor:
    """The exact distribution (V,) of the first token a step emits under a rule: 'correct' (it is p[0]),
    'from_p' (on rejection the token comes from p instead of the residual), 'q_over_p' (accept with
    probability min(1, q/p))."""
    p0, q0 = p[0].double(), q[0].double()
    if rule == "correct":
        return p0
    if rule == "from_p":
        acc = torch.minimum(p0, q0)  # q(x) min(1, p/q)
        return acc + (1 - acc.sum()) * p0
    if rule == "q_over_p":
        acc = q0 * torch.where(p0 > 0, (q0 / p0.clamp_min(1e-300)).clamp(max=1), torch.ones_like(q0))
        return acc + (1 - acc.sum()) * residual_distribution(p0, q0)
    raise ValueError(f"rule must be 'correct', 'from_p' or 'q_over_p', got {rule!r}")


_SAMPLING_HINTS = {
    "from_p": "on a rejection the new token must come from norm(max(0, p - q)), not from p: the accepted drafts "
              "already supplied the mass where q covers p",
    "q_over_p": "accept draft d with probability min(1, p(d) / q(d)): the TARGET's probability over the draft's",
}


def sampling_hint(counts: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> str:
    """The known mistake whose exact law the counts fit (chi-square p-value above ``ALPHA``), or ''."""
    for rule, hint in _SAMPLING_HINTS.items():
        if chi_square_pvalue(counts, sampling_law(p, q, rule)) > ALPHA:
            return hint
    return ""
