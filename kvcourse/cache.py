"""Reference KV caches: the simple one that grows with ``torch.cat``, and a preallocated one.

Both follow the API of ``transformers``' ``Cache`` (``update``, ``get_seq_length``, ``reset``,
``crop``) and its layout ``(batch, kv_heads, seq, head_dim)``, so the from-scratch
``kvcourse.llama.Llama`` or a learner's code can use either, and either maps onto the library.

- ``ConcatKVCache``: per layer, the keys and values so far; each ``update`` concatenates the new
  ones with ``torch.cat`` along the sequence axis. Simple, but every step allocates a new
  tensor and copies the whole cache: O(T) copying per step, O(T^2) over a generation.
- ``KVCache``: one buffer per layer of capacity ``max_seq_len``, allocated once; ``update``
  writes the new keys and values in place and returns a view of the filled part (gpt-fast's
  design). Writing past the capacity raises instead of silently dropping tokens.

The course's notebooks grade the learner's own cache; these are the references that later
notebooks fall back on and that the benchmark times.
"""

from __future__ import annotations

import torch


def _check_kv(key: torch.Tensor, value: torch.Tensor, layer_idx: int, num_layers: int) -> None:
    if not (isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)):
        raise TypeError(f"key and value must be tensors, got {type(key).__name__} and {type(value).__name__}")
    if key.dim() != 4 or key.shape != value.shape:
        raise ValueError(
            f"key and value must both be (batch, kv_heads, seq, head_dim); got key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )
    if not 0 <= layer_idx < num_layers:
        raise IndexError(f"layer_idx {layer_idx} out of range: this cache has {num_layers} layers")


class ConcatKVCache:
    """Grows by ``torch.cat`` along the sequence axis (dim 2). Simple; copies everything every step."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value (B, KV, T_new, D) to layer ``layer_idx``; return all (B, KV, T, D)."""
        _check_kv(key, value, layer_idx, self.num_layers)
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)  # (B, KV, T + T_new, D)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    def reset(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers

    def crop(self, max_length: int) -> None:
        """Keep only the first ``max_length`` positions."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][:, :, :max_length]
                self.values[i] = self.values[i][:, :, :max_length]


class CacheOverflowError(RuntimeError):
    """More tokens were written than the cache was allocated for."""


class KVCache:
    """Preallocated per-layer buffers (B, KV, max_seq_len, D), written in place."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if min(num_layers, batch_size, num_kv_heads, head_dim, max_seq_len) <= 0:
            raise ValueError("num_layers, batch_size, num_kv_heads, head_dim and max_seq_len must all be positive")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)  # (B, KV, S_max, D)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.num_layers, self.max_seq_len = num_layers, max_seq_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int, **kw) -> KVCache:
        """Size a cache for a ``kvcourse.llama.Llama`` or a ``transformers`` Llama."""
        a = getattr(model, "args", None)
        if a is not None:
            layers, kv, d = a.num_layers, a.num_kv_heads, a.head_dim
        else:
            c = model.config
            layers, kv = c.num_hidden_layers, c.num_key_value_heads
            d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("device", p.device)
        return cls(layers, batch_size, kv, d, max_seq_len, **kw)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value (B, KV, T_new, D) after the cached ones; return views of all (B, KV, T, D)."""
        _check_kv(key, value, layer_idx, self.num_layers)
        buf_k = self.keys[layer_idx]
        if key.shape[0] != buf_k.shape[0] or key.shape[1] != buf_k.shape[1] or key.shape[3] != buf_k.shape[3]:
            raise ValueError(
                f"key {tuple(key.shape)} does not fit this cache's (batch, kv_heads, seq, head_dim) = "
                f"{tuple(buf_k.shape[:2])} + (seq, {buf_k.shape[3]})"
            )
        start = self.lengths[layer_idx]
        end = start + key.shape[2]
        if end > self.max_seq_len:
            raise CacheOverflowError(
                f"KV cache overflow in layer {layer_idx}: it holds {start} tokens, {key.shape[2]} more would make "
                f"{end}, past its capacity max_seq_len={self.max_seq_len}. Allocate a larger cache or reset() it."
            )
        buf_k[:, :, start:end] = key  # in place: no new allocation
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return buf_k[:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def reset(self) -> None:
        """Forget every token (the buffers are kept for the next prompt)."""
        self.lengths = [0] * self.num_layers

    def crop(self, max_length: int) -> None:
        self.lengths = [min(n, max_length) for n in self.lengths]

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the full capacity)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
