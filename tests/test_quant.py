"""The int8 KV cache: absmax round trip within half a grid step, the bytes it holds, each token stored once (int8
or the full-precision residual, flushed as transformers' QuantizedLayer does), and generation close to full
precision (measured as agreement and logit error, never as equality). Bugs guarded: a scale over the wrong axis,
rounding that wraps past 127, the residual kept twice or flushed at the wrong time, keys that do not fit broadcast
into the cache, an overflow written silently."""

import pytest
import torch
from transformers.cache_utils import QuantizedLayer

from kvcourse import CacheOverflowError, KVCache, Llama, load_model
from kvcourse.quant import Int8KVCache, dequantize, quantize_absmax


@pytest.fixture(scope="module")
def bundled():
    hf, tok = load_model(device="cpu")
    return tok, Llama.from_hf(hf)


def test_round_trip_exceeds_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 16, generator=g)
    x[0, 0, 7, 3] = 40.0  # an outlier: it must blur its own token's values only
    q, scale = quantize_absmax(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 50, 1), "one scale per token and head (over head_dim)"
    err = (dequantize(q, scale) - x).abs()
    assert bool((err <= scale / 2 + 1e-6).all()), "absmax int8 is off by at most half a step, scale / 2"
    others = torch.ones(50, dtype=torch.bool)
    others[7] = False
    assert err[0, 0, others].max() < 0.05, "the outlier's scale leaked into other tokens"


def test_extremes_wrap_around_int8():
    q, scale = quantize_absmax(torch.tensor([[1.0, -1.0, 0.5, 0.0]]))
    assert q.tolist() == [[127, -127, 64, 0]] and torch.allclose(scale, torch.tensor([[1 / 127]]))
    q, scale = quantize_absmax(torch.zeros(1, 4))
    assert not torch.isnan(dequantize(q, scale)).any(), "an all-zero vector must not divide by zero"


def test_int8_cache_holds_as_many_bytes_as_float32():
    L, B, KV, D, S = 3, 2, 2, 32, 100
    full = KVCache(L, B, KV, D, S).nbytes()
    q0 = Int8KVCache(L, B, KV, D, S, residual=0).nbytes()
    assert q0 == full * (D + 4) // (4 * D), "D int8 values and one float32 scale per token and head"
    assert Int8KVCache(L, B, KV, D, S, residual=8).nbytes() == q0 + 2 * L * B * KV * 8 * D * 4


def test_residual_tokens_counted_twice_in_stored_bytes():
    """Issue 21 item 7: every token was kept in int8 AND the newest again in float32. Each is stored once now."""
    L, B, KV, D = 2, 1, 2, 8
    cache = Int8KVCache(L, B, KV, D, 40, residual=4)
    for n in (9, 1, 1):  # the prefill is quantized; then 2 tokens wait in the residual
        for i in range(L):
            cache.update(torch.randn(B, KV, n, D), torch.randn(B, KV, n, D), i)
    assert cache.quantized == [9, 9] and cache.in_residual == [2, 2] and cache.get_seq_length() == 11
    per_layer = 2 * B * KV * (9 * (D + 4) + 2 * D * 4)  # keys and values: int8 + scale, or float32, never both
    assert cache.stored_nbytes() == L * per_layer


class _ReferenceLayer(QuantizedLayer):
    """transformers' own residual logic (QuantizedLayer.update) with our absmax quantizer as its backend."""

    def _quantize(self, tensor, axis):
        return dequantize(*quantize_absmax(tensor))

    def _dequantize(self, q_tensor):
        return q_tensor


@pytest.mark.parametrize("residual", [0, 4])
def test_residual_flushed_unlike_transformers(residual):
    """Which tokens come back exact after each update must be those transformers' QuantizedLayer returns exact:
    the prefill quantized at once, later tokens exact until residual + new >= residual_length, then all flushed."""
    ref = _ReferenceLayer(residual_length=residual)
    cache = Int8KVCache(1, 1, 2, 8, 40, residual=residual)
    g = torch.Generator().manual_seed(1)
    seen = []
    for n in (9, 1, 1, 3, 1, 1, 2, 1):
        k = torch.randn(1, 2, n, 8, generator=g)
        seen.append(k)
        everything = torch.cat(seen, dim=2)  # (1, 2, T, 8), in time order
        keys, values = cache.update(k, k.clone(), 0)
        want, _ = ref.update(k, k.clone())
        assert keys.shape == everything.shape and torch.equal(keys, values)
        exact = (keys == everything).all(-1)  # (1, 2, T): which tokens came back unquantized
        assert torch.equal(exact, (want == everything).all(-1)), (n, exact[0, 0].tolist())
        assert torch.allclose(keys, want, atol=1e-6)
    assert cache.in_residual[0] < max(residual, 1) and cache.get_seq_length() == 19


def test_overflow_written_silently():
    cache = Int8KVCache(1, 1, 2, 8, 20, residual=4)
    cache.update(torch.randn(1, 2, 15, 8), torch.randn(1, 2, 15, 8), 0)
    with pytest.raises(CacheOverflowError, match="max_seq_len=20"):
        cache.update(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), 0)
    assert cache.get_seq_length() == 15


def test_batch_one_keys_broadcast_into_every_row():
    """Issue 22 §1.6: with residual=0, keys of batch 1 were broadcast into all 3 rows of the int8 store."""
    cache = Int8KVCache(1, 3, 2, 8, 16, residual=0)
    for shape in [(1, 2, 4, 8), (3, 1, 4, 8), (3, 2, 4, 16)]:  # batch, kv_heads, head_dim that do not fit
        with pytest.raises(ValueError, match="does not fit"):
            cache.update(torch.randn(shape), torch.randn(shape), 0)
    with pytest.raises(ValueError, match="float32"):
        cache.update(torch.randn(3, 2, 4, 8, dtype=torch.float64), torch.randn(3, 2, 4, 8, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="head_dim"):
        cache.update(torch.randn(3, 2, 8), torch.randn(3, 2, 8), 0)  # rank 3
    assert cache.get_seq_length() == 0, "a refused update must leave the cache as it was"


@pytest.mark.parametrize("bad", [{"residual": -1}, {"residual": 2.5}, {"residual": True}, {"max_seq_len": 0},
                                 {"head_dim": 8.0}, {"dtype": torch.int8}])
def test_bad_sizes_accepted(bad):
    args = {"num_layers": 1, "batch_size": 1, "num_kv_heads": 2, "head_dim": 8, "max_seq_len": 16} | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        Int8KVCache(args.pop("num_layers"), args.pop("batch_size"), args.pop("num_kv_heads"), args.pop("head_dim"),
                    args.pop("max_seq_len"), **args)


@torch.inference_mode()
def _teacher_forced(model, full, t, cache):
    """Run the full-precision tokens through both caches; (share of steps with the same argmax, max logit error)."""
    ref = KVCache.for_model(model, 1, full.shape[1])
    steps = [full[:, :t]] + [full[:, i:i + 1] for i in range(t, full.shape[1] - 1)]  # prefill, then each step
    same, err = [], 0.0
    for ids in steps:
        a, b = model(ids, ref)[:, -1], model(ids, cache)[:, -1]  # (1, V)
        same.append(bool(a.argmax(-1) == b.argmax(-1)))
        err = max(err, (a - b).abs().max().item())
    return sum(same) / len(same), err


@pytest.mark.parametrize("text", ["ROMEO:"])
def test_int8_generation_drifts_from_full_precision(bundled, text):
    """100 steps of the full-precision greedy tokens: argmax agreement and logit error, with and without residual.

    Measured on 2026-12-07 (residual stored once, flushed as transformers' QuantizedLayer does; prompts "ROMEO:",
    "The red cat was", "JULIET:", "Once upon a time"): 99-100 % of steps agree; the largest logit error is
    0.13-0.20 with no residual and 0.08-0.13 with a residual of 16 (after each flush no token is exact, so the
    residual helps less than a permanent float copy would). A single flipped near-tie changes everything after it
    in free generation, so the test forces the reference tokens instead of comparing free runs.
    """
    from kvcourse.generate import generate

    tok, model = bundled
    ids = tok(text, return_tensors="pt").input_ids
    t, n = ids.shape[1], 100
    full = generate(model, ids, n)
    agree0, err0 = _teacher_forced(model, full, t, Int8KVCache.for_model(model, 1, t + n, residual=0))
    agree16, err16 = _teacher_forced(model, full, t, Int8KVCache.for_model(model, 1, t + n, residual=16))
    assert agree0 >= 0.95 and agree16 >= 0.95, (agree0, agree16)
    assert 0 < err16 < 0.5 and 0 < err0 < 0.5, (err0, err16)


@pytest.mark.parametrize("text", ["The red cat was"])
def test_int8_per_token_drifts_more_than_transformers_fp8(bundled, text):
    """transformers' QuantizedCache(backend="fp8") (transformers 5.24, cache_utils.Fp8QuantizedLayer) stores
    float8_e4m3fn with ONE scale per layer tensor, frozen at the prefill, and no exact residual; ours is int8 with
    one scale per token and head. Measured on 2026-12-07 (transformers 5.25) over 100 teacher-forced steps of the 4
    prompts above: fp8 0.87-2.23 largest logit error and 93-98 % argmax agreement, int8 (residual 0) 0.13-0.20 and
    99-100 %. Both run here on the CPU."""
    from transformers.cache_utils import QuantizedCache

    from kvcourse.generate import generate

    tok, model = bundled
    ids = tok(text, return_tensors="pt").input_ids
    t, n = ids.shape[1], 100
    full = generate(model, ids, n)
    _, err_fp8 = _teacher_forced(model, full, t, QuantizedCache("fp8", load_model(device="cpu")[0].config))
    agree, err_int8 = _teacher_forced(model, full, t, Int8KVCache.for_model(model, 1, t + n, residual=0))
    assert err_int8 < err_fp8 / 2 and agree >= 0.95, (err_int8, err_fp8, agree)


def test_plugged_in_quantize_is_ignored():
    """Notebook 08 grades the learner's quantize function through Int8KVCache(quantize=...): it must be the one used."""
    calls = []

    def mine(x):
        calls.append(tuple(x.shape))
        return quantize_absmax(x)

    k = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(0))
    ours = Int8KVCache(1, 1, 2, 8, 16, residual=0, quantize=mine)
    ref = Int8KVCache(1, 1, 2, 8, 16, residual=0)
    ours.update(k, k, 0), ref.update(k, k, 0)  # the prefill comes back as given; it is stored quantized
    got, want = ours.update(k[:, :, :1], k[:, :, :1], 0), ref.update(k[:, :, :1], k[:, :, :1], 0)
    assert calls == [(1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 1, 8), (1, 2, 1, 8)], \
        "keys and values must both go through the plugged-in function"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("call,named", [
    (lambda: quantize_absmax(torch.zeros(2, 0)), r"\(2, 0\)"),
    (lambda: quantize_absmax(torch.ones(2, 3), dim=4), "dim.*got 4"),
    (lambda: dequantize(torch.ones(2, 3, dtype=torch.int8), torch.ones(3, 1)), r"\(2, 1\), got \(3, 1\)"),
    (lambda: dequantize(torch.ones(2, 3), torch.ones(2, 1)), "int8.*float32"),
], ids=["empty-scale-of-nothing", "dim-out-of-range", "scale-broadcast", "float-q-read-as-levels"])
def test_quantize_helpers_take_bad_inputs_silently(call, named):
    with pytest.raises(ValueError, match=named):
        call()


def test_for_model_refuses_a_transformers_llama(bundled):
    """KVCache.for_model sizes a cache for either model; Int8KVCache.for_model must too, and refuse anything else."""
    hf, _ = load_model(device="cpu")
    _, model = bundled
    a, b = Int8KVCache.for_model(hf, 1, 8), Int8KVCache.for_model(model, 1, 8)
    assert a.qk[0].shape == b.qk[0].shape and a.num_layers == b.num_layers and a.dtype == b.dtype
    with pytest.raises(TypeError, match="object"):
        Int8KVCache.for_model(object(), 1, 8)
    with pytest.raises(IndexError, match="layers"):
        a.get_seq_length(a.num_layers)
