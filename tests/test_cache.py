"""Reference caches: in-place writes, overflow, reset, and agreement with torch.cat growth."""

import pytest
import torch

from kvcourse import CacheOverflowError, ConcatKVCache, KVCache, Llama, StaticKVCache


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


# ---- StaticKVCache: what a captured decode step needs (position and mask in tensors, written in place) ----------


def test_static_cache_keeps_its_position_in_python():
    """The write position must live in a device tensor that update advances in place (a graph reads it there)."""
    from kvcourse import StaticKVCache

    cache = StaticKVCache(2, 2, 3, 8, max_seq_len=7)
    position = cache.position
    ptr = position.data_ptr()
    k, v = _kv(t=3, seed=1)
    keys, values = cache.update(k, v, 1)
    assert keys is cache.keys[1] and values is cache.values[1] and keys.shape == (2, 3, 7, 8)
    assert cache.position is position and position.data_ptr() == ptr, "the position tensor was replaced"
    assert position.tolist() == [0, 3] and cache.get_seq_length(1) == 3 and cache.get_seq_length(0) == 0
    assert torch.equal(keys[:, :, :3], k) and not keys[:, :, 3:].any() and not cache.keys[0].any()
    k2, v2 = _kv(t=4, seed=2)  # exactly full: slots 3..6
    cache.update(k2, v2, 1)
    assert torch.equal(cache.keys[1][:, :, 3:], k2) and torch.equal(cache.values[1][:, :, 3:], v2)


def test_static_cache_overflow_is_silent_or_changes_state():
    from kvcourse import StaticKVCache

    cache = StaticKVCache(1, 2, 3, 8, max_seq_len=5)
    cache.update(*_kv(t=4, seed=3), 0)
    before = [t.clone() for t in cache.keys + cache.values]
    with pytest.raises(CacheOverflowError, match=r"holds 4 tokens.*max_seq_len=5"):
        cache.update(*_kv(t=2, seed=4), 0)
    assert cache.get_seq_length() == 4 and all(torch.equal(a, b) for a, b in zip(before, cache.keys + cache.values, strict=True))
    with pytest.raises(CacheOverflowError, match="max_seq_len=5"):
        cache.mask(cache.cache_position(2))
    assert not cache.slot_mask.any(), "a refused mask call marked slots"


def test_static_mask_sees_future_padding_or_stale_slots():
    """mask: slot_mask updated in place (padding False), and query i sees slot j only if j <= cache_position[i]."""
    from kvcourse import StaticKVCache

    cache = StaticKVCache(1, 2, 1, 4, max_seq_len=6)
    buffer = cache.slot_mask
    real = torch.tensor([[False, True, True], [True, True, True]])
    m = cache.mask(cache.cache_position(3), real)  # (B, 1, T, S)
    assert cache.slot_mask is buffer and m.shape == (2, 1, 3, 6) and m.dtype == torch.bool
    assert buffer.tolist() == [[False, True, True, False, False, False], [True, True, True, False, False, False]]
    assert m[1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert not m[0, 0, :, 0].any(), "row 0's padding slot is visible"
    cache.update(*_kv(b=2, kv=1, t=3, d=4), 0)
    m = cache.mask(cache.cache_position(1))  # one decode step at slot 3
    assert m[:, 0, 0].int().tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.slot_mask.any() and cache.slot_mask is buffer
    m = cache.mask(cache.cache_position(1))  # after reset: slot 0 only, the stale slots 1..3 hidden
    assert m[:, 0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0]] * 2


def test_static_cache_crop_leaves_position():
    from kvcourse import StaticKVCache

    cache = StaticKVCache(2, 1, 1, 4, max_seq_len=8)
    for layer in range(2):
        cache.update(*_kv(b=1, kv=1, t=5, d=4), layer)
    cache.crop(-2)
    assert cache.position.tolist() == [3, 3]
    cache.crop(1)
    assert cache.lengths == [1, 1]
    with pytest.raises(ValueError, match="out of range"):
        cache.crop(4)


# ---- refusals by name (probe findings, issue 22 §2) -------------------------------------------------------


@pytest.mark.parametrize("cls", [KVCache, StaticKVCache])
@pytest.mark.parametrize("bad, err", [(8.5, TypeError), (-1, ValueError), (0, ValueError)])
def test_cache_size_that_is_not_a_positive_int_fails_inside_torch_or_unnamed(cls, bad, err):
    with pytest.raises(err, match=rf"max_seq_len must be a positive int, got {bad}"):
        cls(2, 1, 2, 8, bad)


def test_for_model_with_a_float_batch_size_fails_inside_torch():
    from kvcourse.llama import LlamaArgs

    model = Llama(LlamaArgs(vocab_size=16, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                            num_kv_heads=1, head_dim=8))
    with pytest.raises(TypeError, match=r"batch_size must be a positive int, got 1\.5"):
        KVCache.for_model(model, 1.5, 8)


@pytest.mark.parametrize("make", [lambda: KVCache(2, 1, 2, 8, 8), lambda: StaticKVCache(2, 1, 2, 8, 8),
                                  lambda: ConcatKVCache(2)])
def test_get_seq_length_of_a_layer_past_the_last_gives_a_raw_index_error(make):
    cache = make()
    with pytest.raises(IndexError, match=r"layer_idx 5 out of range: this cache has 2 layers"):
        cache.get_seq_length(5)


def test_static_cache_position_with_a_negative_count_fails_inside_torch():
    cache = StaticKVCache(2, 1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"num_tokens must be >= 0.*got -2"):
        cache.cache_position(-2)


def test_static_mask_at_slots_past_capacity_fails_inside_index_copy_and_marks_nothing():
    cache = StaticKVCache(2, 1, 2, 8, 8)
    before = cache.slot_mask.clone()
    with pytest.raises(IndexError, match=r"slots 7\.\.8, outside this cache's 0\.\.7"):
        cache.mask(torch.tensor([7, 8]))
    assert torch.equal(cache.slot_mask, before)  # slot 7 was not marked before the refusal


@pytest.mark.parametrize("cls", [KVCache, StaticKVCache])
def test_keys_of_another_batch_are_refused_naming_the_layer(cls):
    cache = cls(2, 3, 2, 8, 8)
    with pytest.raises(ValueError, match=r"key \(1, 2, 3, 8\) does not fit layer 1 of this cache"):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 1)
    assert cache.get_seq_length(1) == 0
