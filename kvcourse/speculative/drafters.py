"""Drafters: cheap ways to guess the next ``k`` tokens, for the target to check in one pass.

- ``PromptLookupDrafter``: no model at all. It finds the last ``n`` tokens of the context earlier in the context
  and proposes what followed them there (Saxena 2023, "Prompt Lookup Decoding",
  github.com/apoorvumang/prompt-lookup-decoding). As ``transformers``' ``PromptLookupCandidateGenerator``
  (``generate(prompt_lookup_num_tokens=k)``, ``transformers/generation/candidate_generator.py``, 5.x) does, it
  tries the longest n-gram first (``max_ngram_size``, 2 there by default) down to 1, takes the earliest match that
  has a continuation, and proposes at most ``k`` tokens that are already in the context, maybe fewer, maybe none.
  It is right where the text repeats itself (code, quoted passages, a refrain) and silent elsewhere.
- ``ModelDrafter``: a small model on the target's tokenizer (``kvcourse/bard_draft``) runs ``k`` cached decode
  steps. It keeps its own ``KVCache`` and the token ids it holds; at each ``propose`` it crops the cache to the
  longest prefix it shares with the new context (the drafts the target rejected are dropped there) and feeds the
  rest in one call. With ``sample=True`` it samples each draft and returns the distributions ``q`` it sampled
  from, which the sampling verifier needs.

Both take the context as a list of ints and return ``(drafts (k',) long, q (k', V) or None)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..cache import KVCache
from ..generate import _vocab_size, as_llama


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k (tokens to draft) must be an int >= 0, got {k!r}")


def _check_context(context) -> list[int]:
    if isinstance(context, torch.Tensor):
        if context.dim() != 1 or context.dtype != torch.long:
            raise ValueError(f"context must be a 1-D list or torch.long tensor of token ids, got a tensor of shape "
                             f"{tuple(context.shape)} and dtype {context.dtype}")
        context = context.tolist()
    if not isinstance(context, Sequence) or not context or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise ValueError(f"context must be a non-empty list of int token ids, got {str(context)[:80]}")
    return list(context)


class PromptLookupDrafter:
    """Propose the continuation of the latest n-gram's earliest earlier occurrence in the context."""

    def __init__(self, max_ngram_size: int = 2):
        if isinstance(max_ngram_size, bool) or not isinstance(max_ngram_size, int) or max_ngram_size < 1:
            raise ValueError(f"max_ngram_size must be an int >= 1, got {max_ngram_size!r}")
        self.max_ngram_size = max_ngram_size
        self.forward_passes = 0  # it never runs a model

    def propose(self, context: Sequence[int], k: int) -> tuple[torch.Tensor, None]:
        """Up to ``k`` tokens (k',) long that followed the context's last n-gram where it first occurred."""
        ids = _check_context(context)
        _check_k(k)
        t = len(ids)
        for n in range(min(self.max_ngram_size, t - 1), 0, -1):
            tail = ids[t - n:]
            for start in range(t - n):  # earliest occurrence first, never the tail itself
                if ids[start:start + n] == tail:
                    follow = ids[start + n:min(start + n + k, t)]  # only tokens already in the context
                    if follow:
                        return torch.tensor(follow, dtype=torch.long), None
        return torch.zeros(0, dtype=torch.long), None

    def reset(self) -> None:
        """Nothing to forget: the context is the drafter's only state."""


class ModelDrafter:
    """A small model with its own ``KVCache``, rewound to the accepted tokens before each proposal."""

    def __init__(self, model, max_seq_len: int = 2048, *, temperature: float = 1.0):
        self.model = as_llama(model)
        self.vocab_size = _vocab_size(self.model)
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.cache = KVCache.for_model(self.model, 1, max_seq_len)
        self.held: list[int] = []  # the token ids whose keys/values the cache holds, in order
        self.forward_passes = 0

    def reset(self) -> None:
        self.cache.reset()
        self.held = []

    def rewind(self, length: int) -> None:
        """Keep the first ``length`` tokens of the cache (and of ``held``): the drafts the target rejected go."""
        self.cache.crop(length)
        del self.held[length:]

    def _sync(self, ids: list[int]) -> torch.Tensor:
        """Crop the cache to the longest prefix it shares with ``ids`` (keeping at least one token to feed), feed
        the rest; return the last position's logits (V,)."""
        same = 0
        for a, b in zip(self.held, ids, strict=False):
            if a != b:
                break
            same += 1
        same = min(same, len(ids) - 1)  # the last token is fed again for its logits
        self.rewind(same)  # drop what the target rejected (and anything else that differs)
        new = torch.tensor([ids[same:]], dtype=torch.long, device=self.model.device)  # (1, T_new)
        logits = self.model(new, self.cache, last_only=True)[0, -1]  # (V,)
        self.forward_passes += 1
        self.held = list(ids)
        return logits

    @torch.inference_mode()
    def propose(self, context: Sequence[int], k: int, *, sample: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k drafts (k,) long; with ``sample``, also q (k, V), the distributions they were sampled from."""
        ids = _check_context(context)
        _check_k(k)
        if max(ids) >= self.vocab_size:
            raise ValueError(f"context ids must be below the draft model's vocab_size={self.vocab_size}, got "
                             f"{max(ids)}")
        if k == 0:
            return torch.zeros(0, dtype=torch.long), (torch.zeros(0, self.vocab_size) if sample else None)
        if len(ids) + k - 1 > self.cache.max_seq_len:
            raise ValueError(f"the draft cache holds {self.cache.max_seq_len} tokens; a context of {len(ids)} and "
                             f"{k} drafts need {len(ids) + k - 1}: build the ModelDrafter with a larger max_seq_len")
        logits = self._sync(ids)
        drafts, qs = [], []
        for i in range(k):
            if sample:
                q = torch.softmax(logits.float() / self.temperature, dim=-1)  # (V,)
                token = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            else:
                token = int(logits.argmax())
            drafts.append(token)
            if i < k - 1:  # the last draft is never fed: the target checks it
                logits = self.model(torch.tensor([[token]], device=self.model.device), self.cache,
                                    last_only=True)[0, -1]  # (V,)
                self.forward_passes += 1
                self.held.append(token)
        return torch.tensor(drafts, dtype=torch.long), (torch.stack(qs) if sample else None)
