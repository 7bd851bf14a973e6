"""An int8 KV cache: absmax quantization with one scale per token and KV head, read back in the model's dtype,
with the newest tokens held in full precision until a residual of ``residual`` tokens fills.

Absmax quantization maps a vector x to ``round(x / s)`` with ``s = max|x| / 127``, an int8 in -127..127,
and back to ``q * s``. Each element is then off by at most ``s / 2``: half a step of the grid. Here the
vector is one token's ``head_dim`` values in one KV head, so every (token, head) has its own scale, and
an outlier in one token does not blur the others.

The residual follows ``transformers``' ``QuantizedLayer`` (``transformers/cache_utils.py``, 5.25; the
``residual_length`` of ``QuantizedCache``, 128 by default). Each token is stored ONCE: either as int8 or, while
it is among the newest, in full precision, never both. The first ``update`` of an empty layer (the prefill)
quantizes everything it gets; later tokens are appended to the residual, and when the residual plus the new
tokens reach ``residual`` (``transformers``: ``residual_length + new >= self.residual_length``) all of them are
quantized into the int8 store and the residual empties, so it holds at most ``residual - 1`` tokens. ``update``
returns, as ``transformers``' does, the tokens stored before the call (int8 ones dequantized, residual ones
exact) followed by the new ones exactly as given; they are quantized after being returned. With
``residual=0`` every token is quantized as it arrives.

What this is NOT: ``transformers``' integer ``QuantizedCache`` backends (quanto, HQQ) quantize per channel in
groups (``q_group_size=64``) with ``nbits=4`` by default (quanto accepts only 2 or 4 bits, ``QuantoQuantizedLayer``),
and re-quantize the whole layer at each flush; this cache is 8-bit, one scale per token and head, and quantizes
each token once.

Memory (``nbytes``): the buffers allocated, as ``KVCache.nbytes``: per layer, for keys and for values,
``B * KV * (max_seq_len * (D + 4) + residual * D * itemsize)`` bytes: ``max_seq_len`` int8 slots with a
float32 scale each (every token ends up there once the residual flushes) and ``residual`` full-precision slots.
``stored_nbytes`` counts only what the tokens now held occupy. The dequantized copies that ``update`` returns
are working memory of one layer at a time; a fused kernel would dequantize inside attention instead.

Rewinding (``crop``, for speculative decoding, notebook 10) must leave the cache as a cache that never saw the
dropped tokens would be, bit for bit. Dropping residual tokens is easy. But a flush may have quantized tokens
that such a cache holds exact: it got the same calls with the last ones cut, and a shorter last call may not
have filled the residual. So each layer keeps an undo record of its LAST flush: the length quantized before it,
whether it was the first update, and the exact tokens it quantized (not for the first update: that cache
quantizes its whole first update too, and with one scale per token the int8 values of a token do not depend on
the others). ``crop(n)`` back into the last flush replays its rule, ``first or n - q0 >= residual``: int8 up
to ``n``, or the exact tokens back into the residual. Tokens quantized by an earlier flush cannot be
restored: ``crop`` refuses to reach them (except with ``residual=0``, where every token is quantized as it
comes). A cache fed ``k`` drafted tokens after its accepted ones can always drop them if ``residual >= k``:
a flush that quantizes only drafted tokens needs a flush of a drafted token before it and ``residual`` more.
The record (at most ``residual - 1`` plus one update's tokens, exact) is working memory, not counted by
``nbytes``.
"""

from __future__ import annotations

import torch

from .cache import CacheOverflowError, _check_fits, _check_kv, _check_same_kind, _cropped_length

QMAX = 127  # int8 absmax uses -127..127, symmetric (-128 is left out)


def quantize_absmax(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int8 q, float scale) with x ~= q * scale, one scale per slice along ``dim``."""
    if not isinstance(x, torch.Tensor) or x.numel() == 0 or x.dim() == 0:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"quantize_absmax needs a non-empty tensor with at least one axis, got {got}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an axis of x, -{x.dim()}..{x.dim() - 1}, got {dim!r}")
    scale = x.abs().amax(dim=dim, keepdim=True).float() / QMAX  # (..., 1)
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero vector gets q = 0, not NaN
    q = torch.round(x.float() / scale).clamp(-QMAX, QMAX).to(torch.int8)  # round, THEN clamp: no wrap-around
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., D) int8 and scale (..., 1) -> q * scale in ``dtype``."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise ValueError(f"q must be an int8 tensor (quantize_absmax's first output), got "
                         f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}")
    if not isinstance(scale, torch.Tensor) or scale.shape != (*q.shape[:-1], 1):
        got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"scale must be one per vector of q {tuple(q.shape)}: shape {(*q.shape[:-1], 1)}, got {got}")
    return (q.float() * scale).to(dtype)


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class Int8KVCache:
    """Preallocated int8 keys/values (B, KV, S_max, D) with a scale per token and head, and a full-precision
    residual (B, KV, R, D) of the newest tokens; each token lives in exactly one of the two (module docstring)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 *, residual: int = 16, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 quantize=None):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("max_seq_len", max_seq_len)):
            _check_count(name, value, 1)
        _check_count("residual", residual, 0)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be the model's floating dtype (e.g. torch.float32), got {dtype!r}")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)  # (B, KV, S_max, D)
        self.qk = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(num_layers)]
        self.qv = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(num_layers)]
        scale_shape = (*shape[:3], 1)  # (B, KV, S_max, 1): one scale per token and head
        self.sk = [torch.zeros(scale_shape, dtype=torch.float32, device=device) for _ in range(num_layers)]
        self.sv = [torch.zeros(scale_shape, dtype=torch.float32, device=device) for _ in range(num_layers)]
        res_shape = (batch_size, num_kv_heads, residual, head_dim)  # (B, KV, R, D): the newest tokens, exact, in order
        self.rk = [torch.zeros(res_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rv = [torch.zeros(res_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.quantized = [0] * num_layers  # tokens in the int8 store, per layer: positions 0..quantized - 1
        self.in_residual = [0] * num_layers  # tokens in the residual, per layer: the positions right after
        # per layer, the undo record of the last flush (q0, first, exact keys, exact values) or None (``crop``)
        self.last_flush: list[tuple[int, bool, torch.Tensor | None, torch.Tensor | None] | None] = [None] * num_layers
        self.num_layers, self.max_seq_len, self.residual, self.dtype = num_layers, max_seq_len, residual, dtype
        self.quantize = quantize or quantize_absmax  # x -> (int8 q, float scale (..., 1)): notebook 08 plugs its own in

    @property
    def lengths(self) -> list[int]:
        """Tokens held per layer, int8 and residual together."""
        return [q + r for q, r in zip(self.quantized, self.in_residual, strict=True)]

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int, **kw) -> Int8KVCache:
        """Size a cache for a ``kvcourse.llama.Llama`` or a ``transformers`` Llama, in its dtype and on its device."""
        a = getattr(model, "args", None)
        if a is not None:
            layers, kv, d = a.num_layers, a.num_kv_heads, a.head_dim
        else:
            c = getattr(model, "config", None)
            if c is None or not hasattr(c, "num_key_value_heads"):
                raise TypeError(f"Int8KVCache.for_model takes the course's Llama or a transformers Llama, got "
                                f"{type(model).__name__}")
            layers, kv = c.num_hidden_layers, c.num_key_value_heads
            d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("device", p.device)
        return cls(layers, batch_size, kv, d, max_seq_len, **kw)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value (B, KV, T, D); return all (B, KV, end, D) in time order: the tokens held before this call
        as stored (int8 ones dequantized, residual ones exact), then the new ones as given."""
        _check_kv(key, value, layer_idx, self.num_layers)
        held = self.qk[layer_idx]
        _check_fits(key, held, layer_idx)
        _check_same_kind(key, self.rk[layer_idx], layer_idx)  # a silent cast would hide a model/cache dtype mismatch
        nq, nr, t = self.quantized[layer_idx], self.in_residual[layer_idx], key.shape[2]
        end = nq + nr + t
        if end > self.max_seq_len:
            raise CacheOverflowError(f"int8 KV cache overflow in layer {layer_idx}: it holds {nq + nr} tokens, {t} "
                                     f"more would make {end}, past max_seq_len={self.max_seq_len}")
        out, moved = [], []
        first = nq + nr == 0  # transformers quantizes the whole first update (the prefill) at once
        flush = first or nr + t >= self.residual
        for new, q, s, r in ((key, self.qk, self.sk, self.rk), (value, self.qv, self.sv, self.rv)):
            old_res = r[layer_idx][:, :, :nr]  # (B, KV, nr, D)
            out.append(torch.cat([dequantize(q[layer_idx][:, :, :nq], s[layer_idx][:, :, :nq], self.dtype),
                                  old_res, new], dim=2))  # (B, KV, end, D)
            if flush:  # the residual and the new tokens move into int8; the residual empties
                moved.append(torch.cat([old_res, new], 2))  # (B, KV, nr + t, D), exact: kept for crop
                q[layer_idx][:, :, nq:end], s[layer_idx][:, :, nq:end] = self.quantize(moved[-1])
            else:
                r[layer_idx][:, :, nr:nr + t] = new
        if flush:
            self.quantized[layer_idx], self.in_residual[layer_idx] = end, 0
            self.last_flush[layer_idx] = (nq, True, None, None) if first else (nq, False, *moved)
        else:
            self.in_residual[layer_idx] = nr + t
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx {layer_idx!r} out of range: this cache has {self.num_layers} layers")
        return self.quantized[layer_idx] + self.in_residual[layer_idx]

    def reset(self) -> None:
        """Forget every token (the buffers are kept); the next update quantizes its tokens, as a prefill."""
        self.quantized = [0] * self.num_layers
        self.in_residual = [0] * self.num_layers
        self.last_flush = [None] * self.num_layers

    def _earliest(self, layer_idx: int) -> int:
        """The shortest length > 0 that ``crop`` can go back to exactly in this layer."""
        if self.residual == 0:
            return 1
        record = self.last_flush[layer_idx]
        return self.quantized[layer_idx] if record is None else max(1, record[0])

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value drops that many from the end (``KVCache.crop``).

        Afterwards the cache holds what a cache fed the same updates, the last ones cut to the tokens kept, would
        hold, bit for bit: int8 where that one quantized, exact where it did not (module docstring). A length
        inside tokens quantized before the last flush is refused (``ValueError``, no layer changed), unless
        ``residual=0``; ``crop(0)`` always works.
        """
        new = [_cropped_length(max_length, self.get_seq_length(i), i) for i in range(self.num_layers)]
        for i, n in enumerate(new):
            if 0 < n < self._earliest(i):
                held, earliest = self.get_seq_length(i), self._earliest(i)
                raise ValueError(
                    f"crop({max_length}) cannot rewind layer {i} of this int8 cache exactly: it holds {held} tokens "
                    f"and would keep {n}, but tokens before position {earliest} were quantized by an earlier flush "
                    f"of the residual (residual={self.residual}) and their exact values are gone; it can go back "
                    f"to {earliest}..{held} tokens (or 0). A cache fed k drafted tokens (speculative decoding) "
                    f"needs Int8KVCache(..., residual=k) or more to drop them"
                )
        for i, n in enumerate(new):
            self._crop_layer(i, n)

    def _crop_layer(self, i: int, n: int) -> None:
        nq, record = self.quantized[i], self.last_flush[i]
        if n == 0:  # a cache that saw nothing
            self.quantized[i], self.in_residual[i], self.last_flush[i] = 0, 0, None
        elif n >= nq:  # only residual tokens dropped
            self.in_residual[i] = n - nq
        elif record is None or n < record[0]:  # residual == 0 (crop checked): each update flushed, int8 per token
            self.quantized[i], self.in_residual[i], self.last_flush[i] = n, 0, None
        else:  # back into the last flush: replay its rule on the shorter last update
            q0, first, k, v = record
            if n > q0 and (first or n - q0 >= self.residual):  # it flushes too: int8 up to n
                if k is not None:  # requantize from the exact tokens, as that cache would
                    k, v = k[:, :, :n - q0], v[:, :, :n - q0]
                    self.qk[i][:, :, q0:n], self.sk[i][:, :, q0:n] = self.quantize(k)
                    self.qv[i][:, :, q0:n], self.sv[i][:, :, q0:n] = self.quantize(v)
                self.quantized[i], self.in_residual[i], self.last_flush[i] = n, 0, (q0, first, k, v)
            else:  # it does not (or it was dropped whole): the exact tokens go back to the residual, and its
                # last flush is an older one
                self.rk[i][:, :, :n - q0] = k[:, :, :n - q0]
                self.rv[i][:, :, :n - q0] = v[:, :, :n - q0]
                self.quantized[i], self.in_residual[i], self.last_flush[i] = q0, n - q0, None

    def nbytes(self) -> int:
        """Bytes allocated: the int8 store and its scales (capacity ``max_seq_len``) and the residual (``residual``)."""
        return sum(t.numel() * t.element_size() for t in self.qk + self.qv + self.sk + self.sv + self.rk + self.rv)

    def stored_nbytes(self) -> int:
        """Bytes the tokens now held occupy: each int8 token ``D + 4`` bytes, each residual token ``D * itemsize``,
        per batch row, KV head, layer, for keys and for values."""
        b, kv, _, d = self.qk[0].shape
        item = self.rk[0].element_size()
        pairs = zip(self.quantized, self.in_residual, strict=True)
        return 2 * b * kv * sum(nq * (d + 4) + nr * d * item for nq, nr in pairs)
