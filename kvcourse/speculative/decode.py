"""Speculative decoding: draft ``k`` tokens cheaply, check them all in one target pass, rewind what was wrong.

One step, with ``x`` the last emitted token (not yet in the target's cache, as in ``kvcourse.generate``):

1. the drafter proposes ``d_1..d_k`` from the context (``drafters.py``);
2. the target runs once on ``[x, d_1, .., d_k]`` against its cache: ``k + 1`` rows of logits, and ``k + 1`` new
   keys and values written to the cache;
3. the verifier keeps ``m`` drafts and adds one token of its own (``verify.py``), so a step emits ``m + 1``;
4. the target's cache is cropped to the context plus ``x`` plus the ``m`` kept drafts: the keys and values of
   the ``k - m`` rejected drafts are dropped (``cache.crop``). The drafter rewinds its own cache in its next
   ``propose``.

Greedy verification emits exactly the target's greedy tokens whatever the drafter proposes; sampling
verification emits tokens distributed exactly as the target's own samples. A drafter only changes how many target
passes the tokens cost. The loop follows gpt-fast's ``speculative_decode`` (pytorch-labs/gpt-fast,
``generate.py``) and ``transformers``' assisted generation (``generate(assistant_model=...)``), batch size 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import KVCache
from ..generate import _check_ids_in_vocab, _model_device, _vocab_size, as_llama, check_generate_args
from .drafters import ModelDrafter, PromptLookupDrafter
from .verify import greedy_accept, sample_accept


@dataclass
class SpeculativeOutput:
    """What a speculative run produced and what it cost."""

    tokens: torch.Tensor  # (1, T + new): the prompt and the new tokens
    target_passes: int = 0  # forward passes of the target, the prefill included
    draft_passes: int = 0  # forward passes of the draft model (0 for prompt lookup)
    proposed: list[int] = field(default_factory=list)  # drafts proposed at each verification step
    accepted: list[int] = field(default_factory=list)  # drafts kept at each verification step

    @property
    def acceptance_rate(self) -> float:
        """Kept drafts over proposed drafts (0.0 when nothing was proposed)."""
        total = sum(self.proposed)
        return sum(self.accepted) / total if total else 0.0

    @property
    def new_tokens(self) -> int:
        return 1 + sum(self.accepted) + len(self.accepted)  # the prefill's token, then m + 1 per step

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per target pass (1.0 for plain decoding)."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0


def _check_drafter(drafter, vocab: int | None) -> None:
    if not callable(getattr(drafter, "propose", None)):
        raise TypeError(f"drafter must have a propose(context, k) method (PromptLookupDrafter, ModelDrafter), got "
                        f"{type(drafter).__name__}")
    draft_vocab = getattr(drafter, "vocab_size", None)
    if vocab is not None and draft_vocab is not None and draft_vocab != vocab:
        raise ValueError(f"the draft model's vocabulary has {draft_vocab} tokens but the target's has {vocab}: a "
                         f"draft model must share its target's tokenizer, so that token ids mean the same thing")


def _check_proposal(drafts, q, want: int, vocab: int | None, drafter) -> None:
    """A drafter's ``propose`` returns ``(drafts, q)``: drafts a 1-D integer tensor of at most ``want`` ids (more are
    cut), ``q`` None or one row of draft probabilities per draft."""
    who = type(drafter).__name__
    if not isinstance(drafts, torch.Tensor) or drafts.dim() != 1 or drafts.dtype.is_floating_point:
        raise TypeError(f"{who}.propose must return (drafts, q) with drafts a 1-D tensor of token ids, got "
                        f"{type(drafts).__name__} {getattr(drafts, 'shape', '')} {getattr(drafts, 'dtype', '')}")
    if drafts.numel() and (int(drafts.min()) < 0 or (vocab is not None and int(drafts.max()) >= vocab)):
        raise ValueError(f"{who}.propose returned token ids {drafts.tolist()[:want]} outside the vocabulary 0..{vocab}")
    if q is not None and (not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[0] < min(want, len(drafts))):
        raise ValueError(f"{who}.propose must return q as None or (k, V) draft probabilities, one row a draft, got "
                         f"{getattr(q, 'shape', type(q).__name__)} for {min(want, len(drafts))} drafts")


def _check_verdict(kept, nxt, proposed: int, vocab: int | None, hook) -> tuple[int, int]:
    """(kept, next) as ints in range, or a ValueError naming what the verifier returned."""
    who = "accept" if hook is not None else "the verifier"
    kept = int(kept) if isinstance(kept, torch.Tensor) and kept.numel() == 1 else kept
    nxt = int(nxt) if isinstance(nxt, torch.Tensor) and nxt.numel() == 1 else nxt
    if isinstance(kept, bool) or not isinstance(kept, int) or not 0 <= kept <= proposed:
        raise ValueError(f"{who} must return (kept, next) with kept an int in 0..{proposed} (the drafts proposed), "
                         f"got kept={kept!r}")
    if isinstance(nxt, bool) or not isinstance(nxt, int) or not 0 <= nxt < (vocab or nxt + 1):
        raise ValueError(f"{who} must return (kept, next) with next a token id in 0..{(vocab or 1) - 1}, got "
                         f"next={nxt!r}")
    return kept, nxt


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


@torch.inference_mode()
def speculative_generate(target, input_ids: torch.Tensor, max_new_tokens: int,
                         drafter: PromptLookupDrafter | ModelDrafter, k: int = 4, *, do_sample: bool = False,
                         temperature: float = 1.0, generator: torch.Generator | None = None, cache=None,
                         accept: Callable | None = None, rewind: Callable | None = None) -> SpeculativeOutput:
    """(1, T) -> ``SpeculativeOutput`` with ``tokens`` (1, T + max_new_tokens).

    k: tokens drafted per step (>= 1); fewer near the end, so that exactly ``max_new_tokens`` come out.
    do_sample: ``False`` for greedy verification (the target's greedy tokens), ``True`` for speculative sampling at
    ``temperature`` (the drafter must be a ``ModelDrafter`` with the same temperature, or prompt lookup, whose
    drafts count as sampled from a one-hot q).
    cache: ``None`` for a new ``KVCache``, or any course cache with ``crop`` (reset before use).
    accept, rewind: notebook 10's hooks. ``accept(drafts, logits) -> (kept, next)`` replaces ``greedy_accept``
    (``accept(drafts, q, p, generator)`` replaces ``sample_accept`` with ``do_sample``); ``rewind(cache, length)``
    replaces ``cache.crop(length)``. Each result is checked, so a wrong one is named, not silently used.
    """
    target = as_llama(target)
    check_generate_args(input_ids, max_new_tokens, _model_device(target))
    vocab = _vocab_size(target)
    _check_ids_in_vocab(input_ids, vocab)
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate decodes one sequence: input_ids must be (1, T), got "
                         f"{tuple(input_ids.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (tokens drafted per step) must be an int >= 1, got {k!r}")
    _check_drafter(drafter, vocab)
    if do_sample:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if isinstance(drafter, ModelDrafter) and drafter.temperature != temperature:
            raise ValueError(f"the draft samples at temperature {drafter.temperature} but the target at {temperature}:"
                             f" build the ModelDrafter with temperature={temperature}")
    t = input_ids.shape[1]
    if cache is None:
        cache = KVCache.for_model(target, 1, t + max_new_tokens + k)
    else:
        cache.reset()
    if callable(getattr(drafter, "reset", None)):  # the course's drafters; a third party's need only propose
        drafter.reset()
    draft_before = getattr(drafter, "forward_passes", 0)
    out = SpeculativeOutput(tokens=input_ids)
    if max_new_tokens == 0:
        return out
    context = input_ids[0].tolist()
    logits = target(input_ids, cache, last_only=True)[0, -1]  # (V,): prefill
    out.target_passes = 1
    first = (int(torch.multinomial(_probs(logits, temperature), 1, generator=generator)) if do_sample
             else int(logits.argmax()))
    context.append(first)
    while len(context) - t < max_new_tokens:
        room = max_new_tokens - (len(context) - t) - 1  # drafts beyond this could not all be emitted
        want = min(k, room)
        if do_sample and isinstance(drafter, ModelDrafter):
            drafts, q = drafter.propose(context, want, sample=True, generator=generator)
        else:
            drafts, q = drafter.propose(context, want)
        _check_proposal(drafts, q, want, vocab, drafter)
        drafts = drafts[:want]
        held = len(context) - 1  # the target's cache holds everything but the last token
        step = torch.tensor([[context[-1], *drafts.tolist()]], device=input_ids.device)  # (1, 1 + k')
        logits = target(step, cache)[0]  # (1 + k', V): the target's next-token logits after each
        out.target_passes += 1
        if do_sample:
            p = _probs(logits, temperature)  # (1 + k', V)
            if q is None:  # a deterministic drafter: q is one-hot on each draft
                q = torch.nn.functional.one_hot(drafts, p.shape[1]).to(p.dtype)
            kept, nxt = (accept or sample_accept)(drafts, q[:len(drafts)].to(p.dtype), p, generator)
        else:
            kept, nxt = (accept or greedy_accept)(drafts, logits)
        kept, nxt = _check_verdict(kept, nxt, len(drafts), vocab, accept)
        keep = held + 1 + kept  # x and the kept drafts stay; the rejected drafts' keys and values go
        if rewind is None:
            cache.crop(keep)
        else:
            rewind(cache, keep)
            if cache.get_seq_length() != keep:
                raise ValueError(f"rewind(cache, {keep}) left the cache holding {cache.get_seq_length()} tokens, not "
                                 f"{keep}: the context but its last token ({held + 1} before this step's {kept} kept "
                                 f"drafts)")
        context.extend(drafts[:kept].tolist() + [nxt])
        out.proposed.append(len(drafts))
        out.accepted.append(kept)
    out.tokens = torch.tensor([context], dtype=torch.long, device=input_ids.device)
    out.draft_passes = getattr(drafter, "forward_passes", 0) - draft_before
    return out
