"""Reference KV caches: the simple one that grows with ``torch.cat``, a preallocated one, and a static-shape one.

Both follow the API of ``transformers``' ``Cache`` (``update``, ``get_seq_length``, ``reset``,
``crop``) and its layout ``(batch, kv_heads, seq, head_dim)``, so the from-scratch
``kvcourse.llama.Llama`` or a learner's code can use either, and either maps onto the library.

- ``ConcatKVCache``: per layer, the keys and values so far; each ``update`` concatenates the new
  ones with ``torch.cat`` along the sequence axis. Simple, but every step allocates a new
  tensor and copies the whole cache: O(T) copying per step, O(T^2) over a generation.
- ``KVCache``: preallocated. One buffer per layer of capacity ``max_seq_len``, allocated once;
  ``update`` writes the new keys and values into it in place and returns a *view* of the filled
  part, ``buf[:, :, :end]``. Nothing is reallocated or copied, but that view grows by one
  position every decode step: its shape is dynamic, so no CUDA graph can be captured over it.
  Writing past the capacity raises instead of silently dropping tokens.

- ``StaticKVCache``: the same buffers, but ``update`` returns them *whole*, ``(B, KV, max_seq_len, D)``
  at every step, and the model masks the slots not yet written (``Llama.forward`` reads
  ``static_shape`` and builds a mask of width ``max_seq_len``). Every decode step then sees the same
  shapes, which is what a CUDA graph needs; the price is that attention reads the whole capacity.

Static caches for CUDA graphs keep every shape fixed: they return the *whole* buffer and mask the
positions not yet written. gpt-fast's ``KVCache.update`` returns
``k_cache``/``v_cache`` entire, and its ``Transformer.forward`` masks with
``causal_mask[None, None, input_pos]``, a row of length ``max_seq_length`` (pytorch-labs/gpt-fast,
``model.py``); ``transformers``' ``StaticLayer.update`` also returns its full buffers, and its
``get_mask_sizes`` gives a mask of length ``max_cache_len`` (``transformers/cache_utils.py``).
Attention then reads the whole capacity every step, empty slots included. ``KVCache`` hands
attention only the filled part, the same tensors ``transformers``' ``DynamicCache`` would, so
attention computes exactly what it computes there (the course compares tokens for equality).

``crop(n)`` keeps the first ``n`` tokens for ``n >= 0`` and drops the last ``-n`` for ``n < 0``
(``transformers`` 5.x ``Cache.crop`` takes only the negative form, "remove that many"; 4.x took
both). Anything outside ``-length..length`` is refused.

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
    if key.dtype != value.dtype or key.device != value.device:
        raise ValueError(
            f"key and value must have the same dtype and device; got key {key.dtype} on {key.device}, "
            f"value {value.dtype} on {value.device}"
        )
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
        raise TypeError(f"layer_idx must be an int, got {layer_idx!r}")
    if not 0 <= layer_idx < num_layers:
        raise IndexError(f"layer_idx {layer_idx} out of range: this cache has {num_layers} layers")


def _check_same_kind(key: torch.Tensor, held: torch.Tensor, layer_idx: int) -> None:
    """New keys must have the cache's dtype and device: a silent cast would change the arithmetic."""
    if key.dtype != held.dtype or key.device != held.device:
        raise ValueError(
            f"layer {layer_idx} of this cache holds {held.dtype} on {held.device}, but the keys/values given are "
            f"{key.dtype} on {key.device}. Allocate the cache with the model's dtype and device, e.g. "
            f"KVCache.for_model(model, ...) or KVCache(..., dtype=model.dtype, device=model.device)"
        )


def _cropped_length(max_length: int, length: int, layer_idx: int) -> int:
    """The new length after ``crop(max_length)``: keep the first n (n >= 0) or drop the last -n (n < 0)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"crop takes an int (keep that many, or drop that many if negative), got {max_length!r}")
    if not -length <= max_length <= length:
        raise ValueError(
            f"crop({max_length}) out of range: layer {layer_idx} holds {length} tokens; pass 0..{length} to keep "
            f"that many, or -1..-{length} to drop that many from the end"
        )
    return max_length if max_length >= 0 else length + max_length


class ConcatKVCache:
    """Grows by ``torch.cat`` along the sequence axis (dim 2). Simple; copies everything every step."""

    def __init__(self, num_layers: int):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.num_layers = num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value (B, KV, T_new, D) to layer ``layer_idx``; return all (B, KV, T, D)."""
        _check_kv(key, value, layer_idx, self.num_layers)
        held = self.keys[layer_idx]
        if held is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            _check_same_kind(key, held, layer_idx)  # torch.cat would silently promote the dtype
            if key.shape[:2] != held.shape[:2] or key.shape[3] != held.shape[3]:
                raise ValueError(
                    f"key {tuple(key.shape)} does not fit layer {layer_idx}, which holds {tuple(held.shape)} "
                    f"(batch, kv_heads, seq, head_dim): only the seq axis may differ"
                )
            self.keys[layer_idx] = torch.cat([held, key], dim=2)  # (B, KV, T + T_new, D)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    def reset(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions; a negative value drops that many from the end."""
        new = [_cropped_length(max_length, self.get_seq_length(i), i) for i in range(self.num_layers)]
        for i, n in enumerate(new):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][:, :, :n]
                self.values[i] = self.values[i][:, :, :n]


class CacheOverflowError(RuntimeError):
    """More tokens were written than the cache was allocated for."""


class KVCache:
    """Preallocated per-layer buffers (B, KV, max_seq_len, D), written in place; ``update`` returns a growing view."""

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
        """Write key/value (B, KV, T_new, D) after the cached ones; return views of all (B, KV, T, D).

        The views are ``buf[:, :, :T]``: no copy, but one position longer after every decode step.
        """
        _check_kv(key, value, layer_idx, self.num_layers)
        buf_k = self.keys[layer_idx]
        if key.shape[0] != buf_k.shape[0] or key.shape[1] != buf_k.shape[1] or key.shape[3] != buf_k.shape[3]:
            raise ValueError(
                f"key {tuple(key.shape)} does not fit this cache's (batch, kv_heads, seq, head_dim) = "
                f"{tuple(buf_k.shape[:2])} + (seq, {buf_k.shape[3]})"
            )
        _check_same_kind(key, buf_k, layer_idx)  # a silent cast would hide a model/cache dtype mismatch
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
        return buf_k[:, :, :end], self.values[layer_idx][:, :, :end]  # (B, KV, end, D): a view that grows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def reset(self) -> None:
        """Forget every token (the buffers are kept for the next prompt)."""
        self.lengths = [0] * self.num_layers

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value drops that many from the end.

        The buffers are untouched: the next ``update`` overwrites the dropped positions.
        """
        self.lengths = [_cropped_length(max_length, n, i) for i, n in enumerate(self.lengths)]

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the full capacity)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class StaticKVCache(KVCache):
    """``KVCache`` whose ``update`` returns the whole buffers, the same shape at every step.

    The attention must mask the slots not yet written: ``Llama.forward`` does, reading
    ``static_shape``, with a mask of width ``max_seq_len`` (keys after a query's own slot are
    masked; the unwritten ones are all after it). This is the layout of gpt-fast's ``KVCache``
    (``model.py``) and ``transformers``' ``StaticLayer``; the unwritten slots hold zeros (or an
    earlier prompt's keys after ``reset()``): finite values, which a masked weight of exactly 0 removes.
    """

    static_shape = True

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value (B, KV, T_new, D) after the cached ones; return the whole buffers (B, KV, S_max, D)."""
        super().update(key, value, layer_idx)
        return self.keys[layer_idx], self.values[layer_idx]  # (B, KV, S_max, D): never changes shape
