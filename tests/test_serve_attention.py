"""Paged attention that walks blocks (issue 23): kvcourse.serve.attention against SDPA over dense keys and values.

The oracle never touches the module: each sequence's keys and values are drawn densely, put into the pool by
hand through a shuffled block table, and every query row is checked against ``F.scaled_dot_product_attention``
over that row's own dense prefix. Bugs guarded: an online softmax that does not rescale its accumulator (or
accumulates in bf16), a tile that reads past a row's limit (or a padded table id), GQA heads paired with the wrong
KV head, a whole sequence gathered at once (or once per row of a prefill chunk), rows of a chunk read through the
table of its shortest row, short rows that keep reading a long row's tiles, the block offset taken as
``pos // bs``, a write that lands in the wrong slot or half-writes a refused call, and bad input that surfaces as
a raw torch error. The step's plan (``plan_attention``, built once per step for every layer): a planned call that
differs from the checked one, a scratch buffer that a later layer overwrites under an earlier layer's result, a
plan used with another step's tensors or pool, a planned call that stops checking what changed, and a model
runner that hands a plan to a learner's function that takes none. Times are measured by ``benchmark()`` and
reported, never asserted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kvcourse.serve import attention as A
from kvcourse.serve.attention import (
    AttentionPlan,
    attention_bytes,
    gather_attention,
    paged_attention,
    plan_attention,
    slot_mapping,
    write_kv,
)

FUNCS = [paged_attention, gather_attention]


# ---- a ragged step, built by hand ------------------------------------------------------------------------------------
def ragged_step(seed: int, seqs: list[tuple[int, int]], *, heads: int = 6, kv: int = 2, d: int = 32, bs: int = 4,
                dtype=torch.float32, spare_blocks: int = 3, growing: bool = False, shared: int = 0):
    """Sequences given as (length, query rows): the last ``rows`` positions of each are this step's queries
    (rows == 1: a decode token; rows > 1: a prefill chunk). Returns the step and each sequence's dense K, V.

    ``growing``: keys get larger along the sequence, so the running max changes from tile to tile.
    ``shared``: sequence 1 reuses sequence 0's first ``shared`` blocks (same ids in both tables).
    """
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // bs) for n, _ in seqs]
    width = max(blocks) + 1  # one padded column past the longest sequence
    num_blocks = sum(blocks) - shared + spare_blocks
    order = torch.randperm(num_blocks, generator=g).tolist()  # blocks handed out in a shuffled order
    k_pool = torch.randn(num_blocks, kv, bs, d, generator=g).to(dtype)  # garbage everywhere not written
    v_pool = torch.randn(num_blocks, kv, bs, d, generator=g).to(dtype)
    tables = torch.full((len(seqs), width), -1, dtype=torch.long)
    dense_k, dense_v = [], []
    for s, (n, _) in enumerate(seqs):
        k = torch.randn(n, kv, d, generator=g)
        if growing:
            k = k * (1 + torch.arange(n, dtype=torch.float32) / bs)[:, None, None]
        v = torch.randn(n, kv, d, generator=g)
        k, v = k.to(dtype), v.to(dtype)
        if s == 1 and shared:
            k[: shared * bs], v[: shared * bs] = dense_k[0][: shared * bs], dense_v[0][: shared * bs]
            tables[1, :shared] = tables[0, :shared]
        for c in range(shared if s == 1 else 0, blocks[s]):
            tables[s, c] = order.pop()
        for p in range(n):  # by hand: token p in block table[p // bs], offset p % bs
            k_pool[tables[s, p // bs], :, p % bs] = k[p]
            v_pool[tables[s, p // bs], :, p % bs] = v[p]
        dense_k.append(k)
        dense_v.append(v)
    seq_idx = torch.tensor([s for s, (_, r) in enumerate(seqs) for _ in range(r)])
    limits = torch.tensor([p + 1 for n, r in seqs for p in range(n - r, n)])
    q = torch.randn(len(limits), heads, d, generator=g).to(dtype)
    return dict(q=q, k_pool=k_pool, v_pool=v_pool, block_tables=tables, seq_idx=seq_idx, limits=limits,
                scale=d ** -0.5), dense_k, dense_v


def oracle(step: dict, dense_k: list, dense_v: list) -> torch.Tensor:
    """SDPA, fp32, one row at a time over that row's dense prefix: (T, H, D)."""
    q, rows = step["q"].float(), []
    h, kv = q.shape[1], dense_k[0].shape[1]
    for t in range(q.shape[0]):
        s, n = int(step["seq_idx"][t]), int(step["limits"][t])
        k = dense_k[s][:n].float().transpose(0, 1).repeat_interleave(h // kv, dim=0)  # (H, n, D)
        v = dense_v[s][:n].float().transpose(0, 1).repeat_interleave(h // kv, dim=0)
        rows.append(F.scaled_dot_product_attention(q[t][:, None], k, v, scale=step["scale"])[:, 0])  # (H, D)
    return torch.stack(rows)


# lengths: 1 token, exactly one block, a block boundary +-1, several blocks; prefill chunks and decode rows mixed
MIXED = [(1, 1), (4, 1), (5, 1), (8, 3), (9, 9), (23, 1), (17, 6), (3, 2)]
# a decode step: one row per sequence (paged_attention walks it without grouping rows)
DECODE = [(1, 1), (4, 1), (5, 1), (8, 1), (23, 1), (16, 1), (17, 1), (3, 1)]


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("blocks_per_tile", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_ragged_rows_equal_sdpa_over_their_own_prefix(func, blocks_per_tile, seed, seqs):
    step, dk, dv = ragged_step(seed, seqs)
    out = func(**step, blocks_per_tile=blocks_per_tile)
    assert out.shape == step["q"].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, oracle(step, dk, dv), atol=1e-5, rtol=0)


def test_engine_sized_step_within_fp32_rounding():
    """The engine's sizes: bs 16, contexts up to 300, a 40-row chunk beside decode rows, the default tile."""
    step, dk, dv = ragged_step(19, [(300, 1), (17, 1), (256, 1), (120, 40), (16, 1), (33, 1)], bs=16)
    torch.testing.assert_close(paged_attention(**step), oracle(step, dk, dv), atol=1e-5, rtol=0)


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("heads,kv", [(6, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("blocks_per_tile", [1, 3])
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
def test_gqa_query_head_reads_kv_head_h_over_group(func, heads, kv, blocks_per_tile, seqs):
    step, dk, dv = ragged_step(3, seqs, heads=heads, kv=kv, d=16)
    torch.testing.assert_close(func(**step, blocks_per_tile=blocks_per_tile), oracle(step, dk, dv), atol=1e-5, rtol=0)


def test_gqa_head_grouping_is_not_interleaved():
    """Query head h must read KV head h // G (repeat_kv's order), not h % KV: the two differ for H=6, KV=2."""
    step, _, _ = ragged_step(4, MIXED, heads=6, kv=2)
    out = paged_attention(**step, blocks_per_tile=2)
    g = step["q"].shape[1] // step["k_pool"].shape[1]
    for h in range(step["q"].shape[1]):
        one = {**step, "q": step["q"][:, h:h + 1].contiguous(),
               "k_pool": step["k_pool"][:, h // g:h // g + 1].contiguous(),  # (N, 1, bs, D): KV head h // G alone
               "v_pool": step["v_pool"][:, h // g:h // g + 1].contiguous()}
        torch.testing.assert_close(out[:, h:h + 1], paged_attention(**one), atol=1e-6, rtol=0)


# ---- the online softmax --------------------------------------------------------------------------------------------
def _update_without_rescale(state, s, v):
    """The mistake: a new max is used for the new tile, but l and acc keep what was summed against the old one."""
    m_tile = s.amax(-1)
    if state is None:
        p = torch.exp(s - m_tile[..., None])
        return m_tile, p.sum(-1), p @ v
    m, denom, acc = state
    m_new = torch.maximum(m, m_tile)
    p = torch.exp(s - m_new[..., None])
    return m_new, denom + p.sum(-1), acc + p @ v


def test_accumulator_not_rescaled_when_the_max_grows_is_caught(monkeypatch):
    """The test data has a max that grows from tile to tile (growing keys), so the mutant is far off."""
    step, dk, dv = ragged_step(5, MIXED, growing=True)
    want = oracle(step, dk, dv)
    torch.testing.assert_close(paged_attention(**step, blocks_per_tile=1), want, atol=1e-5, rtol=0)
    monkeypatch.setattr(A, "_online_update", _update_without_rescale)
    wrong = paged_attention(**step, blocks_per_tile=1)
    assert (wrong - want).abs().max() > 1e-2, "a walk that never rescales its accumulator went unnoticed"


def test_row_whose_later_tiles_are_all_masked_gives_no_nan():
    """A 1-token row next to a long one: with 1 block a tile, every tile but the first is masked for it."""
    step, dk, dv = ragged_step(6, [(1, 1), (40, 1), (2, 2)])
    for p in (1, 2, 5):
        out = paged_attention(**step, blocks_per_tile=p)
        assert not out.isnan().any()
        torch.testing.assert_close(out, oracle(step, dk, dv), atol=1e-5, rtol=0)


def test_padded_table_ids_past_a_rows_blocks_are_never_read():
    """Columns past a row's last block may hold -1 or any id: they must neither index out of the pool nor count."""
    step, dk, dv = ragged_step(7, MIXED)
    want = oracle(step, dk, dv)
    tables = step["block_tables"]
    used = torch.arange(tables.shape[1]) < torch.tensor([-(-n // 4) for n, _ in MIXED])[:, None]
    for pad in (-1, 10 ** 6, 0):
        padded = torch.where(used, tables, pad)
        for func in FUNCS:
            torch.testing.assert_close(func(**{**step, "block_tables": padded}, blocks_per_tile=2), want,
                                       atol=1e-5, rtol=0)


def test_keys_past_the_limit_inside_the_last_block_are_masked():
    """The unused tail of a row's last block holds garbage (random in the pool): a limit off by one would read it."""
    step, dk, dv = ragged_step(8, [(5, 5), (6, 1)])
    out = paged_attention(**step, blocks_per_tile=4)
    torch.testing.assert_close(out, oracle(step, dk, dv), atol=1e-5, rtol=0)
    off_by_one = paged_attention(**{**step, "limits": step["limits"].clamp(max=7) + 1}, blocks_per_tile=4)
    assert (off_by_one - out).abs().max() > 1e-3


def test_two_sequences_sharing_a_table_prefix_each_see_their_own_tail():
    step, dk, dv = ragged_step(9, [(13, 3), (15, 2), (6, 1)], shared=2)
    tables = step["block_tables"]
    assert torch.equal(tables[0, :2], tables[1, :2]) and tables[0, 2] != tables[1, 2]
    for func in FUNCS:
        for p in (1, 2, 4):
            torch.testing.assert_close(func(**step, blocks_per_tile=p), oracle(step, dk, dv), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)])
@pytest.mark.parametrize("blocks_per_tile", [1, 3, 8])
def test_low_precision_inputs_accumulate_in_fp32(dtype, rtol, blocks_per_tile):
    """Tolerance: the fp32 oracle on the same (rounded) inputs, and one final rounding of the output to ``dtype``
    (unit roundoff 2^-8 for bf16, 2^-11 for fp16), plus fp32 noise. Accumulating in bf16 over 23 keys misses it."""
    step, dk, dv = ragged_step(10, MIXED, dtype=dtype)
    out = paged_attention(**step, blocks_per_tile=blocks_per_tile)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), oracle(step, dk, dv), atol=1e-5, rtol=rtol)
    torch.testing.assert_close(gather_attention(**step).float(), oracle(step, dk, dv), atol=1e-5, rtol=rtol)


class _PoolReads(TorchDispatchMode):
    """Records every op that reads the pools: its name and how many elements it makes from them."""

    def __init__(self, *pools):
        super().__init__()
        self.pools = {p.untyped_storage().data_ptr() for p in pools}
        self.reads: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(a.untyped_storage().data_ptr() in self.pools for a in ins) and isinstance(out, torch.Tensor):
            if out.untyped_storage().data_ptr() not in self.pools:  # not a view of the pool: a copy out of it
                self.reads.append((str(func.overloadpacket.__name__), out.numel()))
        return out


@pytest.mark.parametrize("seqs,rows_sharing", [([(64, 1)] * 4, 4), ([(64, 40), (30, 1)], 1)],
                         ids=["decode rows", "prefill chunk"])
def test_walk_never_gathers_a_whole_sequence(seqs, rows_sharing):
    """With 2 blocks a tile, each copy out of the pool holds at most one tile (2 x 4 keys) of each query tile
    (every decode row; the prefill chunk's rows share one), never a sequence's 64 keys; the gather copies them all."""
    step, _, _ = ragged_step(11, seqs, bs=4, d=8, spare_blocks=0)
    kv, d = 2, 8
    tile = rows_sharing * kv * 2 * 4 * d  # (query tiles, KV, P * bs, D)
    whole = kv * 64 * d  # one sequence's keys
    with _PoolReads(step["k_pool"], step["v_pool"]) as walk:
        paged_attention(**step, blocks_per_tile=2)
    assert walk.reads and all(name == "index_select" and n <= tile for name, n in walk.reads), walk.reads
    assert max(n for _, n in walk.reads) < whole
    with _PoolReads(step["k_pool"], step["v_pool"]) as gather:
        gather_attention(**step)
    assert max(n for _, n in gather.reads) >= whole


@pytest.mark.parametrize("seqs", [[(5, 1), (7, 1), (4, 1), (64, 1)], [(5, 5), (7, 1), (4, 4), (64, 3)]],
                         ids=["decode rows", "prefill chunks"])
def test_short_rows_stop_reading_once_they_end(seqs):
    """One 64-token sequence beside ones of 5, 7 and 4 tokens, 1 block (4 keys) a tile: block 0 of all four,
    block 1 of the three longer than 4, then blocks 2..15 of the long one only: 4 + 3 + 14 = 21 block reads
    (per K and V), not 16 for each of the four."""
    step, dk, dv = ragged_step(18, seqs, bs=4, d=8, spare_blocks=0)
    per_tile = 2 * 4 * 8  # KV x bs x D of one block
    with _PoolReads(step["k_pool"], step["v_pool"]) as walk:
        out = paged_attention(**step, blocks_per_tile=1)
    torch.testing.assert_close(out, oracle(step, dk, dv), atol=1e-5, rtol=0)
    read = sum(n for _, n in walk.reads) // 2  # K and V alike
    assert read == 21 * per_tile, f"read {read // per_tile} blocks, want 21 (not 64)"


@pytest.mark.parametrize("query_tile", [1, 2, 4, 64])
def test_prefill_chunk_cut_into_query_tiles_of_any_size(monkeypatch, query_tile):
    """The rows of one sequence share key tiles in query tiles of at most QUERY_TILE rows (9 rows: 4 + 4 + 1 ...)."""
    monkeypatch.setattr(A, "QUERY_TILE", query_tile)
    step, dk, dv = ragged_step(15, MIXED)
    for p in (1, 3):
        torch.testing.assert_close(paged_attention(**step, blocks_per_tile=p), oracle(step, dk, dv), atol=1e-5,
                                   rtol=0)


def test_rows_of_a_sequence_need_not_be_adjacent():
    """Rows in any order (a sequence's chunk split by other rows): each row's output follows it."""
    step, dk, dv = ragged_step(16, MIXED)
    want = oracle(step, dk, dv)
    perm = torch.randperm(len(step["limits"]), generator=torch.Generator().manual_seed(0))
    shuffled = {**step, "q": step["q"][perm], "seq_idx": step["seq_idx"][perm], "limits": step["limits"][perm]}
    for func in FUNCS:
        torch.testing.assert_close(func(**shuffled, blocks_per_tile=2), want[perm], atol=1e-5, rtol=0)


def test_query_sliced_from_a_fused_projection():
    """The model runner passes q as a slice of a (T, H + 2 KV, D) projection: a non-contiguous view."""
    step, dk, dv = ragged_step(17, MIXED)
    t, h, d = step["q"].shape
    fused = torch.randn(t, h + 4, d)
    fused[:, :h] = step["q"]
    q = fused[:, :h]
    assert not q.is_contiguous()
    for func in FUNCS:
        torch.testing.assert_close(func(**{**step, "q": q}, blocks_per_tile=2), oracle(step, dk, dv), atol=1e-5,
                                   rtol=0)


# ---- slots and writes ----------------------------------------------------------------------------------------------
def test_slot_mapping_block_then_offset_by_hand():
    """bs=4, tables [[7, 2, 9], [3, 5, -1]]: position p of sequence s is at table[s][p // 4] * 4 + p % 4."""
    tables = torch.tensor([[7, 2, 9], [3, 5, -1]])
    positions = torch.tensor([0, 3, 4, 9, 1, 6])
    seq_idx = torch.tensor([0, 0, 0, 0, 1, 1])
    want = torch.tensor([28, 31, 8, 37, 13, 22])  # 7*4+0, 7*4+3, 2*4+0, 9*4+1, 3*4+1, 5*4+2
    assert torch.equal(slot_mapping(positions, tables, seq_idx, 4), want)
    offset_as_quotient = tables[seq_idx, positions // 4] * 4 + positions // 4  # the mistake: pos // bs as offset
    assert not torch.equal(offset_as_quotient, want), "the example must tell the offset from the block column"


def test_slot_mapping_refuses_an_unallocated_block():
    tables = torch.tensor([[7, 2, 9], [3, 5, -1]])
    with pytest.raises(IndexError, match="block column 2, which holds -1"):
        slot_mapping(torch.tensor([8]), tables, torch.tensor([1]), 4)
    with pytest.raises(ValueError, match=r"positions must be in 0\.\.11"):
        slot_mapping(torch.tensor([12]), tables, torch.tensor([0]), 4)
    with pytest.raises(IndexError, match="seq_idx must index a row of block_tables, 0..1; row 0 has seq_idx 2"):
        slot_mapping(torch.tensor([0]), tables, torch.tensor([2]), 4)
    with pytest.raises(TypeError, match="positions must hold integers"):
        slot_mapping(torch.tensor([0.0]), tables, torch.tensor([0]), 4)


def test_write_kv_then_attention_round_trip():
    """Write every token through slot_mapping + write_kv; each slot reads back its token, and attention over the
    written pool equals the oracle."""
    step, dk, dv = ragged_step(12, MIXED)
    k_pool, v_pool = torch.zeros_like(step["k_pool"]), torch.zeros_like(step["v_pool"])
    seq_idx = torch.tensor([s for s, (n, _) in enumerate(MIXED) for _ in range(n)])
    positions = torch.tensor([p for n, _ in MIXED for p in range(n)])
    slots = slot_mapping(positions, step["block_tables"], seq_idx, 4)
    kv_proj = torch.cat([torch.cat(dk), torch.cat(dv)], dim=1)  # (T, 2 KV, D): k and v as the runner slices them
    write_kv(k_pool, v_pool, kv_proj[:, :2], kv_proj[:, 2:], slots, 4)
    assert torch.equal(k_pool[slots // 4, :, slots % 4], torch.cat(dk))
    assert torch.equal(v_pool[slots // 4, :, slots % 4], torch.cat(dv))
    written = k_pool.transpose(1, 2).reshape(-1, 2 * 32).ne(0).any(1).nonzero().flatten()  # (N * bs) slots
    assert sorted(written.tolist()) == sorted(slots.tolist()), "write_kv wrote outside its slots"
    out = paged_attention(**{**step, "k_pool": k_pool, "v_pool": v_pool}, blocks_per_tile=2)
    torch.testing.assert_close(out, oracle(step, dk, dv), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,err,match", [
    ("dup", ValueError, "slot 5 is written by 2 tokens"),
    ("range", IndexError, r"slots must be in 0\.\.31 \(4 blocks x 8\); token 1 has slot 32"),
    ("dtype", ValueError, "must have the pool's dtype and device, torch.float32"),
    ("shape", ValueError, r"k and v must both be \(T, kv_heads=2, head_dim=4\)"),
    ("bs", ValueError, "block_size 4 does not match the pool's"),
    ("rows", ValueError, r"slots must have one entry per query row, \(T,\) = \(2,\)"),
])
def test_refused_write_leaves_the_pool_unchanged(case, err, match):
    k_pool, v_pool = torch.zeros(4, 2, 8, 4), torch.zeros(4, 2, 8, 4)
    k, v, slots, bs = torch.ones(2, 2, 4), torch.ones(2, 2, 4), torch.tensor([5, 9]), 8
    if case == "dup":
        slots = torch.tensor([5, 5])
    elif case == "range":
        slots = torch.tensor([0, 32])
    elif case == "dtype":
        v = v.double()
    elif case == "shape":
        k, v = torch.ones(2, 2, 3), torch.ones(2, 2, 3)
    elif case == "bs":
        bs = 4
    elif case == "rows":
        slots = torch.tensor([1, 2, 3])
    with pytest.raises(err, match=match):
        write_kv(k_pool, v_pool, k, v, slots, bs)
    assert not k_pool.any() and not v_pool.any(), "a refused write changed the pool"


# ---- bad input to attention ----------------------------------------------------------------------------------------
BAD = [
    ("q 2-D", lambda s: {"q": s["q"][0]}, ValueError, r"q must be a tensor of shape \(T, num_heads, head_dim\)"),
    ("heads", lambda s: {"q": s["q"][:, :5]}, ValueError, "multiple of the KV heads .* got H=5 and KV=2"),
    ("head_dim", lambda s: {"q": s["q"][..., :16]}, ValueError, "q's head_dim must equal the pool's, 32"),
    ("dtype", lambda s: {"q": s["q"].double()}, ValueError, "q and the pools must have the same dtype"),
    ("pools", lambda s: {"v_pool": s["v_pool"][:, :1]}, ValueError, "k_pool and v_pool must have the same shape"),
    ("int pool", lambda s: {"k_pool": s["k_pool"].long()}, TypeError, "k_pool must be floating point"),
    ("float table", lambda s: {"block_tables": s["block_tables"].float()}, TypeError,
     "block_tables must hold integers"),
    ("limit 0", lambda s: {"limits": s["limits"] - s["limits"]}, ValueError, "limits must be >= 1 .* row 0 has limit 0"),
    ("limit > capacity", lambda s: {"limits": s["limits"] + 100}, ValueError,
     r"limits must be <= the table capacity, 7 blocks x 4 = 28 tokens"),
    ("seq_idx range", lambda s: {"seq_idx": s["seq_idx"] + 8}, IndexError, "seq_idx must index a row of block_tables, "
     r"0\.\.7; row 0 has seq_idx 8"),
    ("seq_idx float", lambda s: {"seq_idx": s["seq_idx"].float()}, TypeError, "seq_idx must hold integers"),
    ("limits rows", lambda s: {"limits": s["limits"][:-1]}, ValueError, "limits must have one entry per query row"),
    ("pad in use", lambda s: {"block_tables": s["block_tables"].index_fill(1, torch.tensor([0]), -1)}, IndexError,
     r"needs block column 0, whose id is -1; the pool holds blocks 0\.\.\d+"),
    ("id past pool", lambda s: {"block_tables": s["block_tables"].index_fill(1, torch.tensor([0]), 999)}, IndexError,
     "whose id is 999"),
    ("scale", lambda s: {"scale": 0.0}, ValueError, "scale must be a finite float > 0"),
    ("no tables", lambda s: {"block_tables": s["block_tables"][:0]}, IndexError, "block_tables has no rows"),
    ("strided pool", lambda s: {"k_pool": s["k_pool"].transpose(0, 1).contiguous().transpose(0, 1)}, ValueError,
     "k_pool and v_pool must be contiguous"),
    ("tile", lambda s: {"blocks_per_tile": 0}, ValueError, "blocks_per_tile must be an int >= 1, got 0"),
]


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("name,change,err,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named_not_a_raw_torch_error(func, name, change, err, match):
    step, _, _ = ragged_step(13, MIXED)
    args = {**step, "blocks_per_tile": 2, **change(step)}
    with pytest.raises(err, match=match):
        func(**args)


def test_no_query_rows_gives_an_empty_result():
    step, _, _ = ragged_step(14, MIXED)
    empty = {**step, "q": step["q"][:0], "seq_idx": step["seq_idx"][:0], "limits": step["limits"][:0]}
    for func in FUNCS:
        assert func(**empty).shape == (0, 6, 32)


# ---- bytes ---------------------------------------------------------------------------------------------------------
def test_attention_bytes_by_hand():
    """Rows of 1, 16 and 17 keys, KV=2, D=32, fp32, bs=16: one token's K and V of one layer is 2*2*32*4 = 512 B.
    dense 34 tokens = 17408 B; gather reads, writes and reads back: 52224 B; the walk reads whole blocks,
    16 + 16 + 32 = 64 slots = 32768 B, of which 30 slots (15360 B) are unused tails."""
    got = attention_bytes([1, 16, 17], num_kv_heads=2, head_dim=32, dtype=torch.float32, block_size=16)
    assert got == {"dense_bytes": 17408, "gather_bytes": 52224, "walk_bytes": 32768, "tail_bytes": 15360,
                   "gather_over_walk": 52224 / 32768}
    half = attention_bytes(torch.tensor([1, 16, 17]), 2, 32, torch.bfloat16, 16)
    assert half["walk_bytes"] == 16384 and half["dense_bytes"] == 8704
    one_block = attention_bytes([16] * 8, 2, 32, torch.float32, 16)
    assert one_block["tail_bytes"] == 0 and one_block["gather_over_walk"] == 3.0


@pytest.mark.parametrize("args,err,match", [
    (([0], 2, 32, torch.float32, 16), ValueError, "each of context_lens must be an int >= 1, got 0"),
    ((5, 2, 32, torch.float32, 16), TypeError, "context_lens must be a list of ints"),
    (([4], 2, 32, "fp32", 16), TypeError, "dtype must be a torch.dtype"),
    (([4], 2, 32, torch.float32, 0), ValueError, "block_size must be an int >= 1, got 0"),
])
def test_attention_bytes_refuses_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        attention_bytes(*args)


def test_benchmark_times_every_tile_size_and_the_gather():
    """A smoke run on a tiny step (no assertion on the times: the machine is shared)."""
    res = A.benchmark(4, 40, prefill=8, tiles=(1, 2), repeats=1, calls=1)
    assert set(res) == {"walk P=1", "walk P=2", "gather"} and all(v > 0 for v in res.values())


# ---- the step's plan (built once per step, used by every layer) -----------------------------------------------------
def _plan_for(step: dict, blocks_per_tile: int, slots=None) -> AttentionPlan:
    n, kv, bs, _ = step["k_pool"].shape
    return plan_attention(step["block_tables"], step["seq_idx"], step["limits"], num_blocks=n, kv_heads=kv,
                          block_size=bs, blocks_per_tile=blocks_per_tile, slots=slots)


@pytest.mark.parametrize("blocks_per_tile", [1, 2, 3, 16])
@pytest.mark.parametrize("seqs", [MIXED, DECODE, [(300, 1), (17, 1), (256, 1), (120, 40), (16, 1)]],
                         ids=["mixed", "decode", "engine-sized"])
def test_planned_call_equals_the_checked_call(blocks_per_tile, seqs):
    """Same rows, same tiles, same order of operations: the planned walk gives the very same floats."""
    step, dk, dv = ragged_step(20, seqs)
    plan = _plan_for(step, blocks_per_tile)
    want = paged_attention(**step, blocks_per_tile=blocks_per_tile)
    got = paged_attention(**step, blocks_per_tile=blocks_per_tile, plan=plan)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, oracle(step, dk, dv), atol=1e-5, rtol=0)


def test_planned_call_on_shuffled_rows_equals_the_oracle():
    step, dk, dv = ragged_step(21, MIXED)
    perm = torch.randperm(len(step["limits"]), generator=torch.Generator().manual_seed(1))
    shuffled = {**step, "q": step["q"][perm], "seq_idx": step["seq_idx"][perm], "limits": step["limits"][perm]}
    for p in (1, 2, 16):
        out = paged_attention(**shuffled, blocks_per_tile=p, plan=_plan_for(shuffled, p))
        torch.testing.assert_close(out, oracle(step, dk, dv)[perm], atol=1e-5, rtol=0)


@pytest.mark.parametrize("blocks_per_tile", [2, 16], ids=["several tiles", "one tile"])
@pytest.mark.parametrize("seqs", [MIXED, DECODE, sorted(DECODE, reverse=True)],
                         ids=["mixed", "decode", "decode longest first"])
def test_a_later_layer_never_overwrites_an_earlier_layers_result(seqs, blocks_per_tile):
    """Layers share the plan's scratch buffers; each result must stay what it was after the next layer ran.
    Decode rows already longest first (the engine's steady batch) are walked in place: no copy hides a shared
    buffer there."""
    step, dk, dv = ragged_step(22, seqs)
    p = blocks_per_tile
    plan = _plan_for(step, p)
    first = paged_attention(**step, blocks_per_tile=p, plan=plan)
    kept = first.clone()
    other = {**step, "q": torch.randn_like(step["q"]), "k_pool": step["k_pool"].flip(0).contiguous()}
    second = paged_attention(**other, blocks_per_tile=p, plan=plan)  # another layer: other q, other pool
    assert torch.equal(first, kept), "the second layer's call changed the first layer's output"
    assert torch.equal(second, paged_attention(**other, blocks_per_tile=p))
    torch.testing.assert_close(first, oracle(step, dk, dv), atol=1e-5, rtol=0)


PLAN_MISMATCH = [
    ("limits", lambda s: {"limits": s["limits"].clone()}, ValueError, "plan was built for other limits"),
    ("seq_idx", lambda s: {"seq_idx": s["seq_idx"].clone()}, ValueError, "plan was built for other seq_idx"),
    ("tables", lambda s: {"block_tables": s["block_tables"].clone()}, ValueError, "plan was built for other block_tables"),
    ("pool", lambda s: {"k_pool": s["k_pool"][:-1].contiguous(), "v_pool": s["v_pool"][:-1].contiguous()},
     ValueError, r"plan was built for a pool of \(num_blocks, kv_heads, block_size\)"),
    ("tile", lambda s: {"blocks_per_tile": 3}, ValueError, "plan was built for blocks_per_tile=2"),
    ("not a plan", lambda s: {"plan": "plan"}, TypeError, "plan must be an AttentionPlan"),
    ("q dtype", lambda s: {"q": s["q"].double()}, ValueError, "q and the pools must have the same dtype"),
    ("q heads", lambda s: {"q": s["q"][:, :5]}, ValueError, "multiple of the KV heads"),
]


@pytest.mark.parametrize("name,change,err,match", PLAN_MISMATCH, ids=[m[0] for m in PLAN_MISMATCH])
def test_plan_used_with_another_steps_tensors_or_a_changed_q_is_refused(name, change, err, match):
    """A first planned call passes (and is remembered); a later one that differs in anything is checked again."""
    step, _, _ = ragged_step(23, MIXED)
    plan = _plan_for(step, 2)
    paged_attention(**step, blocks_per_tile=2, plan=plan)
    with pytest.raises(err, match=match):
        paged_attention(**{**step, "blocks_per_tile": 2, "plan": plan, **change(step)})


PLAN_BAD = [b for b in BAD if b[0] in ("float table", "limit 0", "limit > capacity", "seq_idx range", "seq_idx float",
                                      "limits rows", "pad in use", "id past pool", "no tables", "tile")]


@pytest.mark.parametrize("name,change,err,match", PLAN_BAD, ids=[b[0] for b in PLAN_BAD])
def test_plan_attention_refuses_a_bad_step_by_name(name, change, err, match):
    step, _, _ = ragged_step(13, MIXED)
    bad = {**step, "blocks_per_tile": 2, **change(step)}
    n, kv, bs, _ = bad["k_pool"].shape
    with pytest.raises(err, match=match):
        plan_attention(bad["block_tables"], bad["seq_idx"], bad["limits"], num_blocks=n, kv_heads=kv, block_size=bs,
                       blocks_per_tile=bad["blocks_per_tile"])


def _write_case():
    step, _, _ = ragged_step(24, MIXED, spare_blocks=6)
    positions = step["limits"] - 1
    slots = slot_mapping(positions, step["block_tables"], step["seq_idx"], 4)
    t = len(slots)
    fused = torch.randn(t, 6 + 4, 32)  # k and v as non-contiguous slices of one projection, as the runner has them
    return step, slots, fused[:, 6:8], fused[:, 8:10]


def test_planned_write_equals_the_checked_write():
    step, slots, k, v = _write_case()
    plan = _plan_for(step, 2, slots=slots)
    pools = [(step["k_pool"].clone(), step["v_pool"].clone()) for _ in range(2)]
    write_kv(*pools[0], k, v, slots, 4)
    for _ in range(2):  # the second call takes the checked-once path
        write_kv(*pools[1], k, v, slots, 4, plan=plan)
    assert torch.equal(pools[0][0], pools[1][0]) and torch.equal(pools[0][1], pools[1][1])
    assert not torch.equal(pools[0][0], step["k_pool"]), "nothing was written"


@pytest.mark.parametrize("case", ["no slots in plan", "other slots", "k dtype", "rows"])
def test_planned_write_refuses_a_mismatch_and_writes_nothing(case):
    step, slots, k, v = _write_case()
    plan = _plan_for(step, 2, slots=slots)
    k_pool, v_pool = step["k_pool"].clone(), step["v_pool"].clone()
    write_kv(k_pool, v_pool, k, v, slots, 4, plan=plan)  # remembered as checked
    before = k_pool.clone(), v_pool.clone()
    err, match, args = ValueError, None, dict(k=k, v=v, slots=slots, plan=plan)
    if case == "no slots in plan":
        err, match, args["plan"] = TypeError, "built with the step's slots", _plan_for(step, 2)
    elif case == "other slots":
        match, args["slots"] = "plan was built for other slots", slots.clone()
    elif case == "k dtype":
        match, args["k"] = "k and v must have the pool's dtype", k.double()
    else:
        match, args["k"], args["v"] = "the plan has 24 tokens", k[:-1], v[:-1]
    with pytest.raises(err, match=match):
        write_kv(k_pool, v_pool, args["k"], args["v"], args["slots"], 4, plan=args["plan"])
    assert torch.equal(k_pool, before[0]) and torch.equal(v_pool, before[1]), "a refused write changed the pool"


def test_plan_attention_refuses_a_slot_written_twice():
    step, slots, _, _ = _write_case()
    slots = slots.clone()
    slots[1] = slots[0]
    with pytest.raises(ValueError, match="each token needs its own slot"):
        _plan_for(step, 2, slots=slots)


def test_model_runner_gives_no_plan_to_a_learners_attention(monkeypatch):
    """Notebook 09 plugs in a function with paged_attention's public signature and no ``plan``: the engine must
    call it without one, and its tokens must be the package's. The package's own function does get the plan
    (``AttentionPlan.check`` runs only on a planned call)."""
    from kvcourse import Llama, load_model
    from kvcourse.serve import Engine, Request

    hf, _ = load_model(device="cpu")
    model = Llama.from_hf(hf)
    calls = {"learner": 0, "planned": 0}

    def learners(q, k_pool, v_pool, block_tables, seq_idx, limits, scale, blocks_per_tile=1):
        calls["learner"] += 1
        return gather_attention(q, k_pool, v_pool, block_tables, seq_idx, limits, scale)

    check = AttentionPlan.check

    def counting_check(self, who, *args, **kwargs):
        calls["planned"] += who == "paged_attention"
        return check(self, who, *args, **kwargs)

    monkeypatch.setattr(AttentionPlan, "check", counting_check)

    def run(attention=None):
        eng = Engine(model, num_blocks=40, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
        if attention is not None:
            eng.runner.attention = attention
        reqs = [Request(f"r{i}", [(7 * i + j) % 500 + 1 for j in range(5 + 3 * i)], 6) for i in range(4)]
        return {rid: o.tokens for rid, o in eng.run(reqs).items()}

    own = run()
    assert calls["planned"] > 0, "the runner never passed its plan to the package's own attention"
    calls["planned"] = 0
    assert run(learners) == own and calls["learner"] > 0
    assert calls["planned"] == 0
