"""kvcourse: helpers for a notebook course on the transformer KV cache.

Model loading (the bundled model works offline), a from-scratch Llama forward that accepts a KV
cache, reference caches and generators, learner-friendly checks, timing and plots.
"""

from .cache import CacheOverflowError, ConcatKVCache, KVCache, StaticKVCache
from .devices import pick_device, pick_dtype, synchronize
from .llama import Llama
from .models import BUNDLED_MODEL, ModelNotAvailableError, load_model
from .shapes import SHAPES, get_shape, random_model
from .window import SlidingWindowCache

__all__ = [
    "BUNDLED_MODEL", "SHAPES", "CacheOverflowError", "ConcatKVCache", "KVCache", "Llama",
    "ModelNotAvailableError", "SlidingWindowCache", "StaticKVCache", "get_shape", "load_model", "pick_device", "pick_dtype", "random_model", "synchronize",
]
__version__ = "0.1.0"
