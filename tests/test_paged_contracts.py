"""PagedKVCache's contracts (issue 22 sections 1.1, 2 and 3): a failed call changes nothing, layers may come in
any order, slot indices are built once per step, and every bad input is a clear kvcourse error.

Each test is named after the bug it guards and fails on the cache as it was before (kvcourse/paged.py at
c6004a5): see the report of issue 22 for how that was shown."""

import copy

import pytest
import torch

from kvcourse import CacheOverflowError, KVCache, Llama, load_model
from kvcourse.paged import PagedKVCache, UnknownSequenceError, simulate_serving


@pytest.fixture(scope="module")
def bundled():
    hf, tok = load_model(device="cpu")
    return tok, Llama.from_hf(hf), hf


def books(c: PagedKVCache) -> tuple:
    """Everything a failed call must leave as it was: the books and the pool's contents."""
    return (copy.deepcopy(c.tables), dict(c.lengths), copy.deepcopy(c.layer_lengths), list(c.refcount),
            list(c.free_blocks), list(c.batch), [k.clone() for k in c.keys], [v.clone() for v in c.values])


def same_books(a: tuple, b: tuple) -> bool:
    return a[:6] == b[:6] and all(torch.equal(x, y) for x, y in zip(a[6] + a[7], b[6] + b[7], strict=True))


def kv(b: int, t: int, fill: float = 1.0, heads: int = 1, d: int = 2, dtype=torch.float32):
    k = torch.full((b, heads, t, d), fill, dtype=dtype)
    return k, k.clone()


# ---- 1.1: an overflow in one row must not corrupt another ----------------------------------------------------------
def test_pool_exhausted_on_one_row_leaves_other_rows_untouched():
    c = PagedKVCache(1, 1, 2, num_blocks=3, block_size=2)
    c.set_batch(["a", "b"])
    c.update(*kv(2, 2), 0)  # a and b each fill one block; one block left
    before = books(c)
    with pytest.raises(CacheOverflowError) as failed:
        c.update(*kv(2, 1, fill=7.0), 0)  # a takes the last block, then b finds none
    assert same_books(before, books(c)), "the failed step changed a's books or wrote a's token"
    assert "changed nothing" in str(failed.value), "the error should say the step can be retried"
    assert c.get_seq_length() == 2 and c.lengths == {"a": 2, "b": 2}
    c.free("b")
    c.set_batch(["a"])
    k, _ = c.update(*kv(1, 1, fill=7.0), 0)
    assert k[0, 0, :, 0].tolist() == [1.0, 1.0, 7.0], "a must read its 2 tokens and the retried one, once"


@torch.inference_mode()
def test_serving_loop_that_frees_and_retries_gets_the_dense_logits(bundled):
    """Rows a and b decode together; c is parked. The step overflows on b; the loop frees c and retries."""
    tok, model, _ = bundled
    prompts = {s: tok(p, return_tensors="pt").input_ids for s, p in (("a", "ROMEO:"), ("b", "JULIET:"))}
    t = prompts["a"].shape[1]  # 5 tokens each: one full block of 5
    paged = PagedKVCache.for_model(model, num_blocks=4, block_size=5)
    paged.set_batch(["c"])
    model(prompts["b"], paged)  # c holds a block
    paged.set_batch(["a", "b"])
    model(torch.cat([prompts["a"], prompts["b"]]), paged)  # a and b: one block each; one block free
    dense = {s: KVCache.for_model(model, 1, t + 8) for s in "ab"}
    for s in "ab":
        model(prompts[s], dense[s])
    step = torch.tensor([[11], [57]])  # (2, 1): a new block for each row, only one is free
    with pytest.raises(CacheOverflowError):
        model(step, paged)
    paged.free("c")
    for i, (ta, tb) in enumerate([(11, 57), (3, 3), (90, 12)]):
        got = model(torch.tensor([[ta], [tb]]), paged)  # (2, 1, V)
        for row, (s, tok_id) in enumerate((("a", ta), ("b", tb))):
            want = model(torch.tensor([[tok_id]]), dense[s])
            torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-5, msg=f"{s}, step {i}")


# ---- 3: no hidden layer-order contract ---------------------------------------------------------------------------
def test_layers_updated_out_of_order_or_twice_corrupt_the_sequence():
    """Any order of layers, and a layer updated twice in one step, must read back what KVCache reads back."""
    paged = PagedKVCache(3, 2, 4, num_blocks=16, block_size=3)
    dense = KVCache(3, 1, 2, 4, 32)
    g = torch.Generator().manual_seed(0)
    # (layer, tokens): reversed layers, a layer twice in a row, a prefill that spans blocks
    for layer, t in [(2, 4), (1, 4), (0, 4), (0, 1), (2, 1), (1, 1), (1, 2), (0, 2), (2, 2), (1, 1)]:
        k, v = torch.randn(1, 2, t, 4, generator=g), torch.randn(1, 2, t, 4, generator=g)
        got, want = paged.update(k, v, layer), dense.update(k, v, layer)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"layer {layer} after {t} tokens"
        assert paged.get_seq_length(layer) == dense.get_seq_length(layer)


def test_fork_in_the_middle_of_a_step_is_refused():
    """Half the layers written: a block shared now would later be written without copy on write."""
    c = PagedKVCache(2, 1, 2, num_blocks=8, block_size=4)
    c.set_batch(["a"])
    for layer in range(2):
        c.update(*kv(1, 3), layer)
    c.update(*kv(1, 1), 0)
    before = books(c)
    with pytest.raises(ValueError, match="middle of a step"):
        c.fork("a", "b")
    assert same_books(before, books(c)) and "b" not in c.tables


# ---- 3: slot indices built once per step, on the device ---------------------------------------------------------
@torch.inference_mode()
def test_slot_indices_rebuilt_for_every_layer(bundled, monkeypatch):
    """One decode step through 5 layers builds the (block, slot) index tensors once, and they live on the device
    of the keys; a new step (or a changed table) builds them again."""
    tok, model, _ = bundled
    paged = PagedKVCache.for_model(model, num_blocks=16, block_size=4)
    built = []
    real = torch.tensor

    def counting_tensor(data, *a, **kw):
        built.append(1)
        return real(data, *a, **kw)

    model(tok("ROMEO:", return_tensors="pt").input_ids, paged)  # prefill (outside the count)
    monkeypatch.setattr(torch, "tensor", counting_tensor)
    for step in range(3):
        built.clear()
        model(real([[11 + step]]), paged)
        assert len(built) == 1, f"step {step}: {len(built)} host tensors for {model.args.num_layers} layers"
    assert all(t.device == paged.keys[0].device for t in paged._index[1:])


# ---- 2: bad inputs: a clear kvcourse error, and nothing changed -------------------------------------------------
def filled() -> PagedKVCache:
    c = PagedKVCache(2, 1, 2, num_blocks=6, block_size=2)
    c.set_batch(["a"])
    for layer in range(2):
        c.update(*kv(1, 3), layer)
    return c


def test_free_of_unknown_or_already_freed_id_raises_a_dict_keyerror():
    c = filled()
    before = books(c)
    with pytest.raises(UnknownSequenceError, match="'zz' was never added"):
        c.free("zz")
    assert same_books(before, books(c))
    c.free("a")
    before = books(c)
    with pytest.raises(UnknownSequenceError, match="'a' was freed"):
        c.free("a")
    assert same_books(before, books(c)) and c.blocks_in_use() == 0


def test_fork_of_unknown_parent_registers_the_child():
    c = filled()
    before = books(c)
    with pytest.raises(UnknownSequenceError, match="'zz' was never added"):
        c.fork("zz", "child")
    assert same_books(before, books(c)) and "child" not in c.tables
    c.fork("a", "child")  # the correct retry is accepted
    assert c.tables["child"] == c.tables["a"]


def test_fork_onto_an_existing_child_or_adding_twice_overwrites_it():
    c = filled()
    c.add_sequence("b")
    before = books(c)
    with pytest.raises(ValueError, match="'b' already exists"):
        c.fork("a", "b")
    with pytest.raises(ValueError, match="'a' already exists"):
        c.add_sequence("a")
    assert same_books(before, books(c))


def test_set_batch_with_duplicates_or_a_freed_id_is_accepted():
    c = filled()
    before = books(c)
    with pytest.raises(ValueError, match="same sequence twice: 'a'"):
        c.set_batch(["a", "a"])
    with pytest.raises(TypeError, match="list of sequence ids"):
        c.set_batch("ab")
    with pytest.raises(TypeError, match=r"must be hashable .* got \['x'\]"):
        c.set_batch(["b", ["x"]])
    assert same_books(before, books(c))
    c.free("a")
    before = books(c)
    with pytest.raises(UnknownSequenceError, match="'a' were freed"):
        c.set_batch(["new", "a"])  # a freed id would silently start from an empty cache
    assert same_books(before, books(c)) and "new" not in c.tables
    c.add_sequence("a")  # said explicitly: a new sequence under the old id
    c.set_batch(["a"])
    assert c.get_seq_length() == 0


def test_update_with_another_dtype_fails_inside_index_put():
    c = filled()
    before = books(c)
    with pytest.raises(ValueError, match="float32.*float64"):
        c.update(*kv(1, 1, dtype=torch.float64), 0)
    assert same_books(before, books(c))


@pytest.mark.parametrize("shape, says", [((1, 1, 2), "batch, kv_heads, seq, head_dim"), ((2, 1, 1, 2), "2 rows"),
                                         ((1, 3, 1, 2), r"\(1, 3, 1, 2\) does not fit"),
                                         ((1, 1, 1, 5), r"\(1, 1, 1, 5\) does not fit")])
def test_update_with_a_wrong_shape_crashes_in_torch(shape, says):
    """Wrong rank, batch (rows != sequences named), kv heads, head_dim."""
    c = filled()
    before = books(c)
    with pytest.raises(ValueError, match=says):
        c.update(torch.ones(shape), torch.ones(shape), 0)
    assert same_books(before, books(c))


def test_rows_at_different_lengths_are_written_before_the_error():
    c = filled()
    c.set_batch(["b"])
    c.update(*kv(1, 1), 0)
    c.set_batch(["a", "b"])
    before = books(c)
    with pytest.raises(ValueError, match="same length"):
        c.update(*kv(2, 1), 0)
    assert same_books(before, books(c))


@pytest.mark.parametrize("kw, says", [({"block_size": 0}, "block_size must be an int >= 1, got 0"),
                                      ({"block_size": -2}, "block_size .* got -2"),
                                      ({"block_size": 2.5}, "block_size .* got 2.5"),
                                      ({"num_blocks": 0}, "num_blocks .* got 0"),
                                      ({"num_blocks": True}, "num_blocks .* got True")])
def test_degenerate_pool_sizes_are_accepted(kw, says):
    with pytest.raises(ValueError, match=says):
        PagedKVCache(1, 1, 2, **{"num_blocks": 4, **kw})


def test_for_model_refuses_a_transformers_model(bundled):
    _, model, hf = bundled
    a, b = PagedKVCache.for_model(hf, num_blocks=4), PagedKVCache.for_model(model, num_blocks=4)
    assert a.keys[0].shape == b.keys[0].shape == (4, 2, 16, 32) and len(a.keys) == len(b.keys) == 5
    with pytest.raises(TypeError, match="kvcourse Llama .* or a transformers model"):
        PagedKVCache.for_model(torch.nn.Linear(2, 2), num_blocks=4)


@pytest.mark.parametrize("args, kw, says", [((65536, 2048), {"requests": 0}, "requests must be an int >= 1, got 0"),
                                            ((-1, 2048), {}, "budget_tokens .* got -1"),
                                            ((65536, 0), {}, "max_len .* got 0"),
                                            ((65536, 2048), {"block_size": 0}, "block_size .* got 0"),
                                            ((4096.5, 2048), {}, "budget_tokens .* got 4096.5"),
                                            ((64, 8), {"lengths": [(4, 5)]}, "together at most max_len=8")])
def test_simulate_serving_degenerate_arguments_crash_or_divide_by_zero(args, kw, says):
    with pytest.raises(ValueError, match=says):
        simulate_serving(*args, paged=True, **kw)
