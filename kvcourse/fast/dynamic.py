"""The dynamic fast path: each decode step attends over the filled part of the cache, ``[:pos + 1]``.

The simplest of the three generators, and the fastest eager one on a CPU: attention reads only what
was written, so its key length grows by one each step (a new shape every step: no CUDA graph can
replay it, and ``torch.compile`` needs ``dynamic=True`` for one graph across positions). The prefill,
the fused weights and the loop come from ``FastGeneratorBase``; this file is only the decode step, as
gpt-fast's ``decode_one_token`` (``generate.py``).
"""

from __future__ import annotations

import torch

from ..cache import CacheOverflowError
from ..llama import positions_from_mask
from .base import FastGeneratorBase


class DynamicGenerator(FastGeneratorBase):
    """Greedy generation, decode over the filled slots only. ``compile=True``: ``torch.compile(dynamic=True)``.

    >>> gen = DynamicGenerator(hf_model)         # fuses q/k/v and gate/up once (copies of those weights)
    >>> out = gen.generate(input_ids, 300)       # (B, T) -> (B, T + 300), like generate(do_sample=False)
    """

    def __init__(self, model, *, compile: bool = False, max_seq_len: int | None = None):
        self._decode = self._forward  # the decode step: eager, or its compiled version
        self._pos = 0  # the slot the next token is written to (a Python int: the shapes change anyway)
        self._mask = self._positions = None  # (B, T + N) for a left-padded batch
        super().__init__(model, compile=compile, max_seq_len=max_seq_len)

    def _compile_step(self) -> None:
        # dynamic: one graph for every position (the cache slice grows by one each step) and batch size
        self._decode = torch.compile(self._forward, dynamic=True, fullgraph=True)

    def _uncompile(self) -> None:
        self._decode = self._forward

    def _begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int) -> torch.Tensor:
        """Prefill; remember where decoding starts and, for a padded batch, the whole call's mask and positions."""
        b, t = input_ids.shape
        self._pos, self._mask, self._positions = t, None, None
        if attention_mask is not None:
            # every generated token is real: the mask is the prompt's, then ones; positions follow from it
            mask = torch.ones(b, t + max_new_tokens, dtype=torch.bool, device=self.device)  # (B, T + N)
            mask[:, :t] = attention_mask.bool()
            self._mask, self._positions = mask, positions_from_mask(mask)  # (B, T + N) each
        return self._prefill(input_ids, attention_mask)

    @torch.inference_mode()
    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        """token (B, 1) at slot ``self._pos``: logits (B, V); the next token goes to the next slot."""
        i = self._pos
        if i == 0 or self.k_cache is None:
            raise ValueError("decode_one_token continues a prompt: call generate(), or setup_caches and then _begin "
                             "(prefill with the decode state), first")
        if i >= self.max_seq_len:
            raise CacheOverflowError(f"the cache holds max_seq_len={self.max_seq_len} tokens; position {i} does "
                                     f"not fit: call setup_caches with more, or generate() sizes it")
        if self._mask is None:
            logits = self._decode(token, i)
        else:  # one query sees every real key so far: the mask's causal part is all True
            logits = self._decode(token, i, positions=self._positions[:, i:i + 1], mask=self._mask[:, None, None, :i + 1])
        self._pos = i + 1
        return logits
