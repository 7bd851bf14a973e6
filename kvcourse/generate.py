"""Reference greedy generation with and without a KV cache, split as gpt-fast does.

- ``generate_uncached``: every step re-runs the whole sequence (O(T) work per step).
- ``prefill``: run the prompt once, filling the cache; return the last position's logits.
- ``decode_one_token``: run one new token against the cache; return its logits.
- ``generate``: prefill, then decode one token at a time.

Greedy (argmax) decoding, so outputs are deterministic and can be compared token for token
with ``transformers``' ``generate(do_sample=False)``. EOS is not special here: exactly
``max_new_tokens`` are produced. To match, call ``generate(..., eos_token_id=None)`` (neither
stop at EOS nor forbid it); ``min_new_tokens`` alone would *forbid* EOS, so wherever EOS is the
argmax ``transformers`` would pick the runner-up and the two would part ways.
"""

from __future__ import annotations

import torch

from .cache import KVCache


@torch.inference_mode()
def generate_uncached(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """(B, T) -> (B, T + max_new_tokens), recomputing the full forward pass each step."""
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(ids)  # (B, T_so_far, V): every position, every step
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Fill the cache with the prompt's keys/values; return the last position's logits (B, V)."""
    return model(input_ids, cache, last_only=True)[:, -1]


@torch.inference_mode()
def decode_one_token(model, token: torch.Tensor, cache) -> torch.Tensor:
    """One step: token (B, 1) at position cache.get_seq_length(); returns logits (B, V)."""
    return model(token, cache, last_only=True)[:, -1]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, cache=None) -> torch.Tensor:
    """(B, T) -> (B, T + max_new_tokens) with a KV cache (a new ``KVCache`` unless one is given)."""
    if max_new_tokens < 1:
        return input_ids
    if cache is None:
        cache = KVCache.for_model(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
    next_id = prefill(model, input_ids, cache).argmax(dim=-1, keepdim=True)  # (B, 1)
    out = [input_ids, next_id]
    for _ in range(max_new_tokens - 1):
        next_id = decode_one_token(model, next_id, cache).argmax(dim=-1, keepdim=True)  # (B, 1)
        out.append(next_id)
    return torch.cat(out, dim=1)
