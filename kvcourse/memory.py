"""How many bytes a KV cache holds, from a model's config.

bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element;
the whole cache is that times batch size times sequence length. Grouped-query attention
shrinks it by num_heads / kv_heads compared with one K/V per query head.
"""

from __future__ import annotations

import operator

import torch

from .shapes import Shape, get_shape


def _dims(config) -> tuple[int, int, int, int]:
    """(layers, query heads, kv heads, head_dim) from a Shape, a transformers config or a name."""
    if isinstance(config, str):
        config = get_shape(config)
    if isinstance(config, Shape):
        return config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if not hasattr(config, "num_attention_heads") and hasattr(getattr(config, "config", None), "num_attention_heads"):
        config = config.config  # a transformers model: its config
    lacks = [f for f in ("num_hidden_layers", "num_attention_heads", "hidden_size") if not hasattr(config, f)]
    if lacks:
        raise TypeError(f"expected a model config (a Shape, a transformers config or a shape name such as "
                        f"'SmolLM2-135M'), got a {type(config).__name__} without {', '.join(lacks)}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", heads), head_dim


def _count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int if it is one (a numpy or 0-d torch integer too) >= minimum; else a ValueError naming both.
    A bool and a float (2.5, or 2.0) are refused: a count of layers or tokens is an integer."""
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return n


def bytes_per_element(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype`` (a ``torch.dtype``): 4 for float32, 2 for bfloat16."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, got {type(dtype).__name__} {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token_dims(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_element: int) -> int:
    """Bytes of K and V one token adds, from four numbers (notebook 05, exercise 1): 2 x layers x KV heads x head_dim x bytes."""
    dims = [_count(name, value) for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                                                   ("head_dim", head_dim), ("bytes_per_element", bytes_per_element))]
    layers, kv_heads, d, nbytes = dims
    return 2 * layers * kv_heads * d * nbytes


def kv_bytes_per_token(config, dtype: torch.dtype = torch.bfloat16, *, per_query_head: bool = False) -> int:
    """Bytes of K and V one token adds to the cache; ``per_query_head`` ignores GQA."""
    layers, heads, kv_heads, head_dim = _dims(config)
    return kv_bytes_per_token_dims(layers, heads if per_query_head else kv_heads, head_dim, bytes_per_element(dtype))


def kv_cache_bytes(config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16, **kw) -> int:
    """Bytes of the whole cache for ``batch_size`` sequences of ``seq_len`` tokens."""
    seq_len, batch_size = _count("seq_len", seq_len, 0), _count("batch_size", batch_size, 0)
    return kv_bytes_per_token(config, dtype, **kw) * seq_len * batch_size


def tensor_bytes(tensors) -> int:
    """Bytes actually held by some tensors (e.g. a cache's buffers)."""
    tensors = list(tensors)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor_bytes takes tensors (e.g. cache_tensors(cache)), got a {type(t).__name__}: {t!r}")
    return sum(t.numel() * t.element_size() for t in tensors)


def cache_tensors(cache) -> list[torch.Tensor]:
    """The key and value tensors a cache holds, for counting its bytes.

    Works for ``transformers``' ``DynamicCache``/``StaticCache`` (``cache.layers[i].keys``), the
    older ``key_cache``/``value_cache`` lists, ``kvcourse``'s caches (``keys``/``values`` lists)
    and the legacy tuple of ``(key, value)`` pairs. Layers not yet filled are skipped.
    """
    if hasattr(cache, "layers"):
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    elif hasattr(cache, "keys") and isinstance(cache.keys, list | tuple):
        pairs = list(zip(cache.keys, cache.values, strict=True))
    elif isinstance(cache, list | tuple):
        pairs = [tuple(p) for p in cache]
    else:
        raise TypeError(f"don't know where a {type(cache).__name__} keeps its keys and values")
    return [t for pair in pairs for t in pair if isinstance(t, torch.Tensor)]


def param_count(config) -> int:
    """Parameters of a Llama-family model of this shape (a ``Shape``, a config or a shape name).

    Embedding, per layer (q, k, v, o projections, SwiGLU MLP, two RMSNorm weights), final norm,
    and an output head unless it is tied to the embedding. Matches ``sum(p.numel())`` of the
    ``transformers`` model: SmolLM2-135M 134,515,008; Llama-3-8B 8,030,261,248;
    Llama-3-70B 70,553,706,496.
    """
    if isinstance(config, str):
        config = get_shape(config)
    lacks = [f for f in ("hidden_size", "intermediate_size", "vocab_size") if not hasattr(config, f)]
    if lacks:
        raise TypeError(f"param_count counts Llama-family models (a Shape, a LlamaConfig or a shape name); this "
                        f"{type(config).__name__} has no {', '.join(lacks)}")
    layers, heads, kv_heads, head_dim = _dims(config)
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    if getattr(config, "attention_bias", False):
        attn += heads * head_dim + 2 * kv_heads * head_dim + hidden
    mlp = 3 * hidden * inter + (2 * inter + hidden if getattr(config, "mlp_bias", False) else 0)
    per_layer = attn + mlp + 2 * hidden  # + input and post-attention RMSNorm
    embed = vocab * hidden
    head = 0 if getattr(config, "tie_word_embeddings", False) else vocab * hidden
    return embed + layers * per_layer + hidden + head


def format_bytes(n: float, binary: bool = True) -> str:
    """``1342177280`` -> ``'1.25 GiB'`` (binary, powers of 1024) or ``'1.34 GB'`` (decimal, powers of 1000)."""
    if n is None or isinstance(n, bool | str):  # float() would take "12" and True
        raise TypeError(f"format_bytes takes a number of bytes, got {type(n).__name__} {n!r}")
    try:
        value = float(n)  # an int, a float, a numpy number or a 0-d tensor
    except (TypeError, ValueError) as err:
        raise TypeError(f"format_bytes takes a number of bytes, got {type(n).__name__} {n!r}") from err
    base, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("B", "kB", "MB", "GB", "TB"))
    for unit in units:
        if abs(value) < base or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= base
    raise AssertionError("unreachable")
