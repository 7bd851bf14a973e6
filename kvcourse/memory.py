"""How many bytes a KV cache holds, from a model's config.

bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element;
the whole cache is that times batch size times sequence length. Grouped-query attention
shrinks it by num_heads / kv_heads compared with one K/V per query head.
"""

from __future__ import annotations

import torch

from .shapes import Shape, get_shape


def _dims(config) -> tuple[int, int, int, int]:
    """(layers, query heads, kv heads, head_dim) from a Shape, a transformers config or a name."""
    if isinstance(config, str):
        config = get_shape(config)
    if isinstance(config, Shape):
        return config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", heads), head_dim


def bytes_per_element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(config, dtype: torch.dtype = torch.bfloat16, *, per_query_head: bool = False) -> int:
    """Bytes of K and V one token adds to the cache; ``per_query_head`` ignores GQA."""
    layers, heads, kv_heads, head_dim = _dims(config)
    return 2 * layers * (heads if per_query_head else kv_heads) * head_dim * bytes_per_element(dtype)


def kv_cache_bytes(config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16, **kw) -> int:
    """Bytes of the whole cache for ``batch_size`` sequences of ``seq_len`` tokens."""
    return kv_bytes_per_token(config, dtype, **kw) * seq_len * batch_size


def tensor_bytes(tensors) -> int:
    """Bytes actually held by some tensors (e.g. a cache's buffers)."""
    return sum(t.numel() * t.element_size() for t in tensors)
