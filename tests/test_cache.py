"""Reference caches: in-place writes, overflow, reset, and agreement with torch.cat growth."""

import pytest
import torch

from kvcourse import CacheOverflowError, ConcatKVCache, KVCache


def _kv(b=2, kv=3, t=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, kv, t, d, generator=g), torch.randn(b, kv, t, d, generator=g)


def test_preallocated_cache_disagrees_with_concat_cache():
    pre, cat = KVCache(2, 2, 3, 8, max_seq_len=16), ConcatKVCache(2)
    for step, t in enumerate([5, 1, 1, 3]):
        for layer in range(2):
            k, v = _kv(t=t, seed=10 * step + layer)
            a, b = pre.update(k, v, layer), cat.update(k, v, layer)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert pre.get_seq_length() == cat.get_seq_length() == 10


def test_preallocated_cache_reallocates_on_update():
    cache = KVCache(1, 1, 2, 4, max_seq_len=8)
    ptr = cache.keys[0].data_ptr()
    keys, _ = cache.update(*_kv(1, 2, 3, 4), 0)
    assert keys.data_ptr() == ptr and cache.keys[0].data_ptr() == ptr


def test_overflow_is_silently_ignored():
    cache = KVCache(1, 1, 2, 4, max_seq_len=5)
    cache.update(*_kv(1, 2, 4, 4), 0)
    with pytest.raises(CacheOverflowError, match="holds 4 tokens.*capacity max_seq_len=5"):
        cache.update(*_kv(1, 2, 2, 4), 0)
    assert cache.get_seq_length() == 4


def test_reset_leaves_old_tokens_visible():
    cache = KVCache(1, 1, 2, 4, max_seq_len=8)
    cache.update(*_kv(1, 2, 6, 4), 0)
    cache.reset()
    k, v = _kv(1, 2, 2, 4, seed=5)
    keys, values = cache.update(k, v, 0)
    assert keys.shape[2] == 2 and torch.equal(keys, k) and torch.equal(values, v)


def test_key_with_query_head_count_is_refused():
    cache = KVCache(1, 1, 2, 4, max_seq_len=8)
    with pytest.raises(ValueError, match="does not fit"):
        cache.update(*_kv(1, 6, 1, 4), 0)


def test_crop_keeps_prefix():
    cache = KVCache(1, 1, 1, 2, max_seq_len=8)
    k, v = _kv(1, 1, 6, 2)
    cache.update(k, v, 0)
    cache.crop(3)
    keys, _ = cache.update(*_kv(1, 1, 1, 2, seed=3), 0)
    assert torch.equal(keys[:, :, :3], k[:, :, :3]) and cache.get_seq_length() == 4


def test_layer_index_out_of_range_is_refused():
    with pytest.raises(IndexError, match="2 layers"):
        KVCache(2, 1, 1, 2, 4).update(*_kv(1, 1, 1, 2), 2)
