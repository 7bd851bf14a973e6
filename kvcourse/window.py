"""A sliding-window KV cache: a ring buffer of the last ``window`` positions, for Mistral-style attention.

With a sliding window of W, a query at position q attends to the keys at positions q - W + 1 .. q only
(``transformers``' ``masking_utils.sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``, on
top of the causal mask; Mistral's config calls W ``sliding_window``). Keys older than that are never
read again, so a cache needs to keep only the latest ones, and its memory stays constant however
long the generation runs.

``SlidingWindowCache`` keeps them in a ring: one buffer of ``window`` slots per layer, ``(B, KV, W, D)``,
and the token at position ``p`` lives in slot ``p % W``. ``update`` returns what attention needs, in
time order: the ``W - 1`` latest cached tokens (fewer at the start) followed by the new ones, the
same tensors that ``transformers``' ``DynamicSlidingWindowLayer.update`` returns
(``transformers/cache_utils.py``). ``window_slots(q_len)`` says which absolute positions those are,
so the model can cut its mask to them (``Llama.forward`` does, for a ``MistralForCausalLM``).

The cache keeps its own position, ``get_seq_length()``: the number of tokens seen, which keeps
growing while the buffers do not.
"""

from __future__ import annotations

import torch

from .cache import _check_kv, _check_same_kind


class SlidingWindowCache:
    """Ring buffers of ``window`` slots per layer; ``update`` returns the window in time order."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, window: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if min(num_layers, batch_size, num_kv_heads, head_dim, window) <= 0:
            raise ValueError("num_layers, batch_size, num_kv_heads, head_dim and window must all be positive")
        shape = (batch_size, num_kv_heads, window, head_dim)  # (B, KV, W, D): the ring
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers  # tokens seen per layer: positions keep counting, the ring does not grow
        self.num_layers, self.window = num_layers, window

    @classmethod
    def for_model(cls, model, batch_size: int, window: int | None = None, **kw) -> SlidingWindowCache:
        """Size a cache for a ``kvcourse.llama.Llama`` (or a ``transformers`` Mistral): its own window by default."""
        a = getattr(model, "args", None)
        if a is not None:
            layers, kv, d, w = a.num_layers, a.num_kv_heads, a.head_dim, a.sliding_window
        else:
            c = model.config
            layers, kv, w = c.num_hidden_layers, c.num_key_value_heads, getattr(c, "sliding_window", None)
            d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        window = window or w
        if not window:
            raise ValueError("this model has no sliding_window in its config: pass window=")
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("device", p.device)
        return cls(layers, batch_size, kv, d, window, **kw)

    def _slots(self, start: int, stop: int) -> torch.Tensor:
        """Ring slots of positions start..stop-1."""
        return torch.arange(start, stop, device=self.keys[0].device) % self.window

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value (B, KV, T, D); return the kept past (up to W - 1 tokens) and the new ones, in time order."""
        _check_kv(key, value, layer_idx, self.num_layers)
        ring_k, ring_v = self.keys[layer_idx], self.values[layer_idx]
        if key.shape[0] != ring_k.shape[0] or key.shape[1] != ring_k.shape[1] or key.shape[3] != ring_k.shape[3]:
            raise ValueError(f"key {tuple(key.shape)} does not fit this cache's (batch, kv_heads, seq, head_dim) = "
                             f"{tuple(ring_k.shape[:2])} + (seq, {ring_k.shape[3]})")
        _check_same_kind(key, ring_k, layer_idx)
        seen, t = self.lengths[layer_idx], key.shape[2]
        kept = min(seen, self.window - 1)
        past = self._slots(seen - kept, seen)  # (kept,): the slots of the latest kept positions, oldest first
        keys = torch.cat([ring_k.index_select(2, past), key], dim=2)  # (B, KV, kept + T, D), time order
        values = torch.cat([ring_v.index_select(2, past), value], dim=2)
        n = min(t, self.window)  # of a long prompt, only the last W tokens can still be attended to later
        slots = self._slots(seen + t - n, seen + t)  # (n,): position p goes to slot p % W
        ring_k.index_copy_(2, slots, key[:, :, t - n:])
        ring_v.index_copy_(2, slots, value[:, :, t - n:])
        self.lengths[layer_idx] = seen + t
        return keys, values

    def window_slots(self, q_len: int, layer_idx: int = 0) -> tuple[int, int]:
        """(number of keys update returns, absolute position of the first) for ``q_len`` new tokens.

        Called before ``update``: the model cuts its mask, built over positions 0..seen+q_len-1, to these.
        Like ``transformers``' ``get_mask_sizes`` for its sliding-window layer.
        """
        seen = self.lengths[layer_idx]
        kept = min(seen, self.window - 1)
        return kept + q_len, seen - kept

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (the position of the next one), not the number kept."""
        return self.lengths[layer_idx]

    def reset(self) -> None:
        self.lengths = [0] * self.num_layers

    def nbytes(self) -> int:
        """Bytes allocated: ``window`` slots per layer for keys and values, whatever the length."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
