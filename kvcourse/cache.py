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
  ``static_shape`` and asks the cache for a mask of width ``max_seq_len``). Every decode step then
  sees the same shapes, which a CUDA graph needs, but that is not enough: the write position and the
  mask must come from tensors on the device, since a graph replays a Python-int slice as a fixed
  storage offset. So the cache keeps its position as a tensor, writes with ``index_copy_`` at
  ``cache_position``, and keeps a (B, S) bool slot mask updated in place.

gpt-fast's ``KVCache.update`` takes ``input_pos``, a tensor, writes ``k_out[:, :, input_pos] = k_val``
and returns ``k_cache``/``v_cache`` entire; its ``Transformer.forward`` masks with
``causal_mask[None, None, input_pos]``, a row of length ``max_seq_length`` (pytorch-labs/gpt-fast,
``model.py``). ``transformers``' ``StaticLayer.update`` keeps ``cumulative_length`` as a tensor ("to
avoid recompiling"), writes with ``index_copy_(2, cache_position, ...)`` and returns its full buffers;
its ``get_mask_sizes`` gives a mask of length ``max_cache_len`` (``transformers/cache_utils.py``, 5.25).
With a dense mask attention then reads the whole capacity every step, empty slots included (kernels
that take each row's length skip them). ``KVCache`` hands attention only the filled part, the same
tensors ``transformers``' ``DynamicCache`` would, so attention computes exactly what it computes there
(the course compares tokens for equality).

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
    _check_layer(layer_idx, num_layers)


def _check_fits(key: torch.Tensor, held: torch.Tensor, layer_idx: int) -> None:
    """New keys (B, KV, T, D) must match the held buffer (B, KV, S, D) in every axis but the sequence axis."""
    if key.shape[0] != held.shape[0] or key.shape[1] != held.shape[1] or key.shape[3] != held.shape[3]:
        raise ValueError(
            f"key {tuple(key.shape)} does not fit layer {layer_idx} of this cache: its (batch, kv_heads, seq, head_dim) "
            f"= {tuple(held.shape[:2])} + (seq, {held.shape[3]})"
        )


def _check_layer(layer_idx: int, num_layers: int) -> None:
    """A layer index is an int in 0..num_layers-1 (a Python int: checking it costs no device read)."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
        raise TypeError(f"layer_idx must be an int, got {layer_idx!r}")
    if not 0 <= layer_idx < num_layers:
        raise IndexError(f"layer_idx {layer_idx} out of range: this cache has {num_layers} layers")


def _check_sizes(**sizes: int) -> None:
    """Each size (num_layers, batch_size, ...) must be a positive int; the message names the first that is not."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
        if value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value}")


def _host_reads_allowed(t: torch.Tensor) -> bool:
    """False while ``torch.compile`` traces or a CUDA stream captures a graph (no check may read a tensor then), and
    for a "meta" tensor, which has shapes but no values (notebook 04 runs a learner's generator on a meta model to
    check devices: a value check there would fail every answer the same way)."""
    if t.is_meta:
        return False
    return not torch.compiler.is_compiling() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


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
        _check_layer(layer_idx, self.num_layers)
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
        _check_sizes(num_layers=num_layers, batch_size=batch_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     max_seq_len=max_seq_len)
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
        _check_fits(key, buf_k, layer_idx)
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
        _check_layer(layer_idx, self.num_layers)
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
    """``KVCache`` whose ``update`` returns the whole buffers, the same shape at every step, with its position on the device.

    Static shapes are necessary for a CUDA graph, not sufficient: a graph replays its kernels with the
    arguments they were captured with, so a write at ``buf[:, :, start:end]`` with a Python ``start`` is
    captured as a fixed storage offset, and every replay would write the same slot. Here nothing a decode
    step reads is a Python number:

    - ``position`` (num_layers,) long, on the cache's device, counts each layer's tokens; ``update`` writes
      at ``cache_position = position[layer] + arange(T)`` with ``index_copy_`` and advances it in place
      (``transformers``' ``StaticLayer.update`` keeps ``cumulative_length``, a tensor, and writes with
      ``index_copy_(2, cache_position, key_states)``, ``transformers/cache_utils.py``; gpt-fast's
      ``KVCache.update`` takes ``input_pos``, a tensor, and writes ``k_out[:, :, input_pos] = k_val``,
      pytorch-labs/gpt-fast ``model.py``);
    - ``slot_mask`` (B, S) bool marks the slots that hold a real token; ``mask`` updates it in place and
      returns it ANDed with the causal part, ``slot <= cache_position``, as a (B, 1, T, S) mask.

    The unwritten slots hold zeros (or an earlier prompt's keys after ``reset()``): finite values, which
    a masked weight of exactly 0 removes. The capacity check reads the position back to the host, so it
    runs in eager mode only (``torch.compiler.is_compiling()``): a compiled or captured step must be
    given a cache large enough, as ``kvcourse.fast`` sizes its own.
    """

    static_shape = True

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        _check_sizes(num_layers=num_layers, batch_size=batch_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     max_seq_len=max_seq_len)
        self.position = torch.zeros(num_layers, dtype=torch.long, device=device)  # (L,): tokens per layer
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, max_seq_len, dtype=dtype, device=device)
        self.slot_mask = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)  # (B, S)

    @property
    def lengths(self) -> list[int]:
        """Tokens held per layer, read back from the device (a host sync: not for a compiled step)."""
        return self.position.tolist()

    @lengths.setter
    def lengths(self, held: list[int]) -> None:
        self.position.copy_(torch.as_tensor(held, dtype=torch.long))  # in place: the same device tensor

    def cache_position(self, num_tokens: int, layer_idx: int = 0) -> torch.Tensor:
        """(T,) long on the cache's device: the slots the next ``num_tokens`` tokens of layer ``layer_idx`` go to.

        In eager mode it refuses to pass the capacity (``CacheOverflowError`` naming both). That check reads
        the position back to the host, which neither a traced nor a captured step may do: it is skipped while
        ``torch.compile`` traces and while a CUDA stream captures a graph.
        """
        _check_layer(layer_idx, self.num_layers)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int | torch.SymInt):
            raise TypeError(f"num_tokens must be an int (how many new tokens), got {num_tokens!r}")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0 (how many new tokens), got {num_tokens}")
        if _host_reads_allowed(self.position):
            held = int(self.position[layer_idx])
            if held + num_tokens > self.max_seq_len:
                raise CacheOverflowError(
                    f"KV cache overflow in layer {layer_idx}: it holds {held} tokens (position {held}), "
                    f"{num_tokens} more would make {held + num_tokens}, past its capacity "
                    f"max_seq_len={self.max_seq_len}. Allocate a larger cache or reset() it."
                )
        return self.position[layer_idx] + torch.arange(num_tokens, device=self.position.device)  # (T,)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value (B, KV, T_new, D) at the cache's position; return the whole buffers (B, KV, S_max, D)."""
        _check_kv(key, value, layer_idx, self.num_layers)
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        _check_fits(key, buf_k, layer_idx)
        _check_same_kind(key, buf_k, layer_idx)
        cache_position = self.cache_position(key.shape[2], layer_idx)  # (T,): checked before anything is written
        buf_k.index_copy_(2, cache_position, key)  # in place, at slots read from a tensor
        buf_v.index_copy_(2, cache_position, value)
        self.position[layer_idx] += key.shape[2]  # in place: the same tensor, a new value
        return buf_k, buf_v  # (B, KV, S_max, D): never changes shape

    def mask(self, cache_position: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, T, S) bool, True where a new token may look; marks the new slots in ``slot_mask``, in place.

        cache_position (T,) long: the slots of the new tokens (``cache_position(T)`` before they are written).
        real (B, T) bool, or ``None`` when every new token is real: False for left padding, which no query sees.
        Query i sees slot j when j holds a real token and j <= cache_position[i] (not its future, and not a
        slot left over from before ``reset()``). Slots outside 0..max_seq_len-1 are refused in eager mode
        (a device read, skipped while compiling or capturing, as in ``cache_position``).
        """
        if not isinstance(cache_position, torch.Tensor) or cache_position.dim() != 1 or cache_position.dtype != torch.long:
            got = (f"{tuple(cache_position.shape)} {cache_position.dtype}" if isinstance(cache_position, torch.Tensor)
                   else type(cache_position).__name__)
            raise ValueError(f"cache_position must be a (T,) torch.long tensor of slots, got {got}")
        if cache_position.numel() and _host_reads_allowed(cache_position):  # eager only: reads the slots back
            lo, hi = int(cache_position.min()), int(cache_position.max())
            if lo < 0 or hi >= self.max_seq_len:
                raise IndexError(
                    f"cache_position holds slots {lo}..{hi}, outside this cache's 0..{self.max_seq_len - 1} "
                    f"(max_seq_len={self.max_seq_len}): ask cache_position(T) for the slots before writing"
                )
        b, t = self.slot_mask.shape[0], cache_position.shape[0]
        if real is None:
            real = torch.ones(b, t, dtype=torch.bool, device=self.slot_mask.device)
        elif real.shape != (b, t) or real.dtype != torch.bool:
            raise ValueError(f"real must be a ({b}, {t}) bool tensor (batch, new tokens), got "
                             f"{tuple(real.shape)} {real.dtype}")
        self.slot_mask.index_copy_(1, cache_position, real)  # (B, S): in place
        slots = torch.arange(self.max_seq_len, device=self.slot_mask.device)  # (S,)
        causal = slots[None, :] <= cache_position[:, None]  # (T, S)
        return self.slot_mask[:, None, None, :] & causal[None, None]  # (B, 1, T, S)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        _check_layer(layer_idx, self.num_layers)
        return int(self.position[layer_idx])

    def reset(self) -> None:
        """Forget every token: position 0, no slot marked (the buffers are kept, and overwritten)."""
        self.position.zero_()
        self.slot_mask.zero_()

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value drops that many from the end."""
        new = [_cropped_length(max_length, n, i) for i, n in enumerate(self.lengths)]
        self.position.copy_(torch.tensor(new, dtype=torch.long))
