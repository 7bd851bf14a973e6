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

Rewinding (``crop``, for speculative decoding, notebook 10) needs spare slots. After ``crop(n)`` the next
``update`` returns positions ``n - W + 1 .. n - 1``: the window as it was before the rejected tokens came. But
those tokens were written into the ring too, each over the oldest slot, so a ring of exactly ``W`` slots that
took ``d`` tokens since has lost positions ``n - W + 1 .. n - W + d - 1`` of that window: once it has wrapped it
can drop 1 token, no more. ``SlidingWindowCache(..., rewind=k)`` allocates ``W + k - 1`` slots (``slots``), so
``crop`` can always drop the latest ``k`` tokens (the ``k`` drafted tokens a verification step may reject);
``update`` still returns at most ``W - 1`` past tokens. ``crop`` refuses, with an error naming the oldest
position still held, any rewind whose window is no longer all in the ring; it never returns a wrong window.
``transformers`` solves it the same way with unbounded room: once ``sliding_window`` tokens were seen its
``DynamicSlidingWindowLayer.crop`` raises unless ``activate_past_recording()`` was called, after which ``update``
keeps every token until the next ``crop`` cuts the layer back to ``sliding_window - 1``
(``transformers/cache_utils.py``, 5.25).
"""

from __future__ import annotations

import torch

from .cache import _check_fits, _check_kv, _check_same_kind, _cropped_length


def model_window(model) -> int | None:
    """The sliding window a model attends with (``Llama.args.sliding_window``, or a ``transformers`` Mistral's
    ``config.sliding_window``), ``None`` for a model that attends to every past token (Llama)."""
    a = getattr(model, "args", None)
    if a is not None and hasattr(a, "sliding_window"):
        return a.sliding_window
    c = getattr(model, "config", None)
    return getattr(c, "sliding_window", None) if getattr(c, "model_type", None) == "mistral" else None


def check_window_fits(model, window: int | None) -> None:
    """Refuse a ring of ``window`` slots for ``model`` unless the model attends with a sliding window <= ``window``.

    - No window (Llama): the prefill would attend to the whole prompt and each decode step only to the ring, so
      the output would be neither the model's nor a windowed model's.
    - A ring smaller than the model's ``sliding_window``: it drops keys the model's mask still attends to.
    A ring larger than the window is fine: the mask hides what the model would not see.
    """
    w = model_window(model)
    given = "" if window is None else f"(window={window})"
    if w is None:
        raise ValueError(
            f"SlidingWindowCache{given} needs a model that attends with a sliding window (Mistral's "
            f"config.sliding_window); this {type(model).__name__} has sliding_window=None and attends to every past "
            f"token, so a ring that drops old keys would make the prefill and the decode steps disagree with it. "
            f"Use KVCache, which keeps every token"
        )
    if window < w:
        raise ValueError(
            f"SlidingWindowCache(window={window}) is smaller than the model's sliding_window={w}: the ring would drop "
            f"keys the model's mask still attends to; use window >= {w} (SlidingWindowCache.for_model's default)"
        )


def check_window_cache(model, cache) -> None:
    """``check_window_fits(model, cache.window)`` if ``cache`` is a ``SlidingWindowCache``; nothing otherwise.

    For ``generate``/``prefill``/``decode_one_token`` (and any runner that knows both the model and the cache)."""
    if isinstance(cache, SlidingWindowCache):
        check_window_fits(model, cache.window)


def _check_count(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class SlidingWindowCache:
    """Ring buffers of ``window + max(0, rewind - 1)`` slots per layer; ``update`` returns the window in time order.

    Built directly, it does not know the model; ``generate``, ``prefill`` and ``decode_one_token`` check it
    against the model's ``sliding_window`` (``check_window_cache``), and ``for_model`` sizes it from it.
    ``rewind``: how many of the latest tokens ``crop`` must always be able to drop (module docstring).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, window: int,
                 *, rewind: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("window", window)):
            _check_count(name, value)
        _check_count("rewind", rewind, 0)
        self.slots = window + max(0, rewind - 1)  # W - 1 past tokens + 1 new, and room for the rejected ones
        shape = (batch_size, num_kv_heads, self.slots, head_dim)  # (B, KV, slots, D): the ring
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers  # tokens seen per layer: positions keep counting, the ring does not grow
        self.oldest = [0] * num_layers  # per layer, the oldest position whose slot still holds it
        self.num_layers, self.window, self.rewind = num_layers, window, rewind

    @classmethod
    def for_model(cls, model, batch_size: int, window: int | None = None, *, rewind: int = 0,
                  **kw) -> SlidingWindowCache:
        """Size a cache for a ``kvcourse.llama.Llama`` (or a ``transformers`` Mistral): its own window by default.

        ``window`` may be larger than the model's ``sliding_window`` (wasted slots), never smaller, and a model
        without a sliding window is refused (``check_window_fits``). ``rewind``: as for ``__init__``."""
        a = getattr(model, "args", None)
        if a is not None:
            layers, kv, d = a.num_layers, a.num_kv_heads, a.head_dim
        else:
            c = model.config
            layers, kv = c.num_hidden_layers, c.num_key_value_heads
            d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if window is None:
            window = model_window(model)
        if window is not None:
            _check_count("window", window)
        check_window_fits(model, window)
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("device", p.device)
        return cls(layers, batch_size, kv, d, window, rewind=rewind, **kw)

    def _check_layer(self, layer_idx) -> None:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx {layer_idx!r} out of range: this cache has {self.num_layers} layers")

    def _slots(self, start: int, stop: int) -> torch.Tensor:
        """Ring slots of positions start..stop-1."""
        return torch.arange(start, stop, device=self.keys[0].device) % self.slots

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value (B, KV, T, D); return the kept past (up to W - 1 tokens) and the new ones, in time order."""
        _check_kv(key, value, layer_idx, self.num_layers)
        ring_k, ring_v = self.keys[layer_idx], self.values[layer_idx]
        _check_fits(key, ring_k, layer_idx)
        _check_same_kind(key, ring_k, layer_idx)  # a silent cast would hide a model/cache dtype mismatch
        seen, t = self.lengths[layer_idx], key.shape[2]
        kept = min(seen, self.window - 1)
        past = self._slots(seen - kept, seen)  # (kept,): the slots of the latest kept positions, oldest first
        keys = torch.cat([ring_k.index_select(2, past), key], dim=2)  # (B, KV, kept + T, D), time order
        values = torch.cat([ring_v.index_select(2, past), value], dim=2)
        n = min(t, self.slots)  # of a long prompt, only the last ``slots`` tokens can be attended to or rewound to
        slots = self._slots(seen + t - n, seen + t)  # (n,): position p goes to slot p % slots
        ring_k.index_copy_(2, slots, key[:, :, t - n:])
        ring_v.index_copy_(2, slots, value[:, :, t - n:])
        self.lengths[layer_idx] = seen + t
        self.oldest[layer_idx] = max(self.oldest[layer_idx], seen + t - self.slots)  # the slots just overwritten
        return keys, values

    def window_slots(self, q_len: int, layer_idx: int = 0) -> tuple[int, int]:
        """(number of keys update returns, absolute position of the first) for ``q_len`` new tokens.

        Called before ``update``: the model cuts its mask, built over positions 0..seen+q_len-1, to these.
        Like ``transformers``' ``get_mask_sizes`` for its sliding-window layer.
        """
        if isinstance(q_len, bool) or not isinstance(q_len, int) or q_len < 1:
            raise ValueError(f"q_len must be an int >= 1 (the new tokens), got {q_len!r}")
        self._check_layer(layer_idx)
        seen = self.lengths[layer_idx]
        kept = min(seen, self.window - 1)
        return kept + q_len, seen - kept

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (the position of the next one), not the number kept."""
        self._check_layer(layer_idx)
        return self.lengths[layer_idx]

    def reset(self) -> None:
        self.lengths = [0] * self.num_layers
        self.oldest = [0] * self.num_layers

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value drops that many from the end (``KVCache.crop``).

        Allowed only if the window the next ``update`` returns, positions ``max(0, n - W + 1) .. n - 1``, is still
        in the ring: always for up to ``max(1, rewind)`` of the latest tokens, and for ``n = 0``. Otherwise a
        ``ValueError`` naming the oldest position held, and no layer changes.
        """
        new = [_cropped_length(max_length, n, i) for i, n in enumerate(self.lengths)]
        for i, n in enumerate(new):
            need = max(0, n - (self.window - 1))  # the oldest position the next update returns
            if n > 0 and need < self.oldest[i]:  # crop(0) needs none: a ring that saw nothing
                seen = self.lengths[i]
                raise ValueError(
                    f"crop({max_length}) cannot rewind layer {i} of this ring: it holds {seen} tokens and would keep "
                    f"{n}, whose window (window={self.window}: positions {need}..{n - 1}) is no longer all in the "
                    f"ring, as the oldest position still held is {self.oldest[i]} ({self.slots} slots; later "
                    f"tokens overwrote the older ones). To drop up to k tokens (k drafted tokens in speculative "
                    f"decoding), build it with SlidingWindowCache(..., rewind=k) (here k >= {seen - n})"
                )
        self.lengths = new
        self.oldest = [o if n else 0 for o, n in zip(self.oldest, new, strict=True)]

    def nbytes(self) -> int:
        """Bytes allocated: ``slots`` (``window + max(0, rewind - 1)``) per layer for keys and values, whatever
        the length."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
