"""An int8 KV cache: keys and values quantized on write (absmax, one scale per token and head), read back
in the model's dtype, with the latest tokens kept in full precision.

Absmax quantization maps a vector x to ``round(x / s)`` with ``s = max|x| / 127``, an int8 in -127..127,
and back to ``q * s``. Each element is then off by at most ``s / 2``: half a step of the grid. Here the
vector is one token's ``head_dim`` values in one KV head, so every (token, head) has its own scale, and
an outlier in one token does not blur the others.

Like ``transformers``' ``QuantizedCache`` (``cache_utils.py``: ``residual_length``, 128 by default),
the ``residual`` most recent tokens are also kept unquantized and returned exactly: the next tokens
attend most to them. ``update`` returns every cached token, dequantized, in time order, with the
residual ones exact, so any attention (``kvcourse.llama.Llama``) can use the cache unchanged.

Memory per token and head: ``head_dim`` bytes plus one float scale, against ``head_dim * 4`` bytes in
float32 (``nbytes``). The dequantized copies that ``update`` returns are working memory of one layer at
a time; a fused kernel would dequantize inside attention instead.
"""

from __future__ import annotations

import torch

from .cache import CacheOverflowError, _check_kv, _check_same_kind

QMAX = 127  # int8 absmax uses -127..127, symmetric (-128 is left out)


def quantize_absmax(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int8 q, float scale) with x ~= q * scale, one scale per slice along ``dim``."""
    scale = x.abs().amax(dim=dim, keepdim=True).float() / QMAX  # (..., 1)
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero vector gets q = 0, not NaN
    q = torch.round(x.float() / scale).clamp(-QMAX, QMAX).to(torch.int8)  # round, THEN clamp: no wrap-around
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


class Int8KVCache:
    """Preallocated int8 keys/values (B, KV, S_max, D) with a scale per token and head, plus a full-precision
    copy of the latest ``residual`` tokens."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 *, residual: int = 16, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 quantize=None):
        if min(num_layers, batch_size, num_kv_heads, head_dim, max_seq_len) <= 0 or residual < 0:
            raise ValueError("num_layers, batch_size, num_kv_heads, head_dim and max_seq_len must be positive, "
                             "residual >= 0")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)  # (B, KV, S_max, D)
        self.qk = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(num_layers)]
        self.qv = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(num_layers)]
        scale_shape = (*shape[:3], 1)  # (B, KV, S_max, 1): one scale per token and head
        self.sk = [torch.zeros(scale_shape, dtype=torch.float32, device=device) for _ in range(num_layers)]
        self.sv = [torch.zeros(scale_shape, dtype=torch.float32, device=device) for _ in range(num_layers)]
        res_shape = (batch_size, num_kv_heads, residual, head_dim)  # (B, KV, R, D): exact copies, a ring
        self.rk = [torch.zeros(res_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rv = [torch.zeros(res_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.num_layers, self.max_seq_len, self.residual, self.dtype = num_layers, max_seq_len, residual, dtype
        self.quantize = quantize or quantize_absmax  # x -> (int8 q, float scale (..., 1)): notebook 08 plugs its own in

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int, **kw) -> Int8KVCache:
        a = model.args
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("device", p.device)
        return cls(a.num_layers, batch_size, a.num_kv_heads, a.head_dim, max_seq_len, **kw)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and store key/value (B, KV, T, D); return all cached (B, KV, end, D), dequantized, in order."""
        _check_kv(key, value, layer_idx, self.num_layers)
        _check_same_kind(key, self.rk[layer_idx], layer_idx)
        start = self.lengths[layer_idx]
        t = key.shape[2]
        end = start + t
        if end > self.max_seq_len:
            raise CacheOverflowError(f"int8 KV cache overflow in layer {layer_idx}: it holds {start} tokens, {t} more "
                                     f"would make {end}, past max_seq_len={self.max_seq_len}")
        for new, q, s, r in ((key, self.qk, self.sk, self.rk), (value, self.qv, self.sv, self.rv)):
            q[layer_idx][:, :, start:end], s[layer_idx][:, :, start:end] = self.quantize(new)
            n = min(t, self.residual)  # the latest tokens, exact, at slot position % residual
            if n:
                slots = torch.arange(end - n, end, device=key.device) % self.residual
                r[layer_idx].index_copy_(2, slots, new[:, :, t - n:])
        self.lengths[layer_idx] = end
        return self._read(self.qk, self.sk, self.rk, layer_idx), self._read(self.qv, self.sv, self.rv, layer_idx)

    def _read(self, q, s, r, layer_idx: int) -> torch.Tensor:
        end = self.lengths[layer_idx]
        out = dequantize(q[layer_idx][:, :, :end], s[layer_idx][:, :, :end], self.dtype)  # (B, KV, end, D)
        n = min(end, self.residual)
        if n:
            slots = torch.arange(end - n, end, device=out.device) % self.residual
            out[:, :, end - n:] = r[layer_idx].index_select(2, slots)  # the latest, exact
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def reset(self) -> None:
        self.lengths = [0] * self.num_layers

    def nbytes(self) -> int:
        """Bytes held: int8 values, their scales, and the full-precision residual."""
        return sum(t.numel() * t.element_size() for t in self.qk + self.qv + self.sk + self.sv + self.rk + self.rv)
