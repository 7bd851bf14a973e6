"""Paged attention that reads the KV pool block by block, with an online softmax; no dense copy of a sequence.

Notebook 08's ``PagedKVCache.update`` gathers each sequence's blocks into a dense ``(B, KV, length, D)`` copy and
hands that to SDPA. A serving engine's attention reads the pool through the block tables instead:

- the pool of one layer is ``(N, KV, bs, D)`` (``kvcourse.paged`` layout): token ``p`` of a sequence lives in
  block ``table[p // bs]`` at offset ``p % bs``, i.e. at the flat *slot* ``table[p // bs] * bs + p % bs``
  (``slot_mapping``; ``write_kv`` stores a step's new keys and values there);
- a step is *ragged*: one query row per token, prefill chunks and decode tokens mixed, each row with its own
  sequence (``seq_idx``) and its own causal limit (``limits`` = position + 1);
- ``paged_attention`` walks every row's table a tile of ``blocks_per_tile`` blocks at a time. For each tile it
  computes the scores, and folds them into three running quantities per (row, head): the running max ``m``,
  the running sum of exponentials ``l`` and the output accumulator ``acc``. When the max grows from ``m_old``
  to ``m_new``, what was summed so far was exponentiated against the old max, so ``l`` and ``acc`` are both
  rescaled by ``exp(m_old - m_new)`` before the tile is added. At the end, ``acc / l`` is exactly softmax(s) @ V.

Sources. The running max and the rescaled running sum are the online normalizer of Milakov & Gimelshein 2018
("Online normalizer calculation for softmax", arXiv:1805.02867). FlashAttention (Dao et al. 2022,
arXiv:2205.14135) carries an output accumulator along with them, tile by tile. Flash-decoding (Dao, Haziza,
Massa & Sizov, "Flash-Decoding for long-context inference", 2023 blog post) splits the keys of a decode query
into chunks, attends to each in parallel with its log-sum-exp, and rescales them in a final reduction. vLLM's
PagedAttention (Kwon et al. 2023, arXiv:2309.06180) reads the keys through the block table inside the kernel;
its ``paged_attention_v2`` splits a sequence into partitions (``PARTITION_SIZE`` 512 tokens by default), writes
a max logit and an exp-sum per partition, and combines them in a reduce kernel (vllm-project/vllm,
``csrc/attention/paged_attention_v2.cu`` at 0e60ae8). Here the tiles are combined one after the other (the
same algebra, done sequentially).

How the rows are walked (PyTorch, vectorised over rows; the only Python loop is over tiles):

- a *query tile* is a set of rows that read the same keys: the rows of one sequence in this step (a prefill
  chunk), up to ``QUERY_TILE`` of them, or a single decode row. A key tile is gathered once per query tile and
  its scores are one matrix product for all its rows (FlashAttention's blocking over queries); a prefill chunk
  does not copy its sequence's keys once per row;
- query tiles are walked longest first, and one whose rows have all ended stops being read: one long sequence
  does not make the short ones beside it read masked tiles;
- GQA: the G = H // KV query heads of a KV head are rows of the same matrix product, so the KV heads are never
  repeated;
- everything derived from the step's tables, rows and limits (the checks, the query tiles, each key tile's pool
  rows and masks, the write rows) is the same in every layer: ``plan_attention`` builds it once per step as an
  ``AttentionPlan``, which the model runner passes to ``paged_attention`` and ``write_kv`` of every layer.
  Without a plan, each call plans for itself (same result). With one key tile, the online softmax is a plain
  softmax over that tile.

This is PyTorch on the CPU: each key tile is gathered into a small buffer ``(query tiles, KV,
blocks_per_tile * bs, D)`` (the plan's scratch, reused by every tile and layer), never a whole sequence unless one
tile covers it; a GPU kernel would read the blocks
in place. A Triton kernel of the same walk is future work when a GPU is lent (none was in this session).

Shapes: T query rows, H query heads, KV key/value heads (GQA: query head h reads KV head h // (H // KV), as
``repeat_kv`` gives), D head size, N blocks in the pool, bs tokens a block, S sequences, M table columns.
"""

from __future__ import annotations

import bisect
import itertools
import math

import torch
import torch.nn.functional as F

__all__ = ["slot_mapping", "write_kv", "paged_attention", "plan_attention", "AttentionPlan", "gather_attention",
           "attention_bytes", "benchmark", "DEFAULT_BLOCKS_PER_TILE"]

# 16 blocks (256 tokens at bs 16) a tile; vLLM's paged_attention_v2 partitions are 512 tokens. ``benchmark()`` on the
# bundled model's dims (H=6, KV=2, D=32), bs 16, fp32, one thread of a shared 2-core machine (load 3-5), median CPU
# time per call, after the step's plan (AttentionPlan) and the single-tile softmax landed:
# - decode rows x keys: 32 x 256: P=8 1.1 ms, P=16 0.74; 16 x 512: P=8 1.35, P=16 1.2, P=32 0.86; 32 x 512:
#   P=8 3.3, P=16 2.3, P=32 1.9;
# - a 256-row prefill chunk: P=8 3.1 ms, P=16 2.5; 16 decode rows x 512 beside a 64-row chunk: P=8 3.2, P=16 2.4.
# Each tile costs a fixed number of ops (the Python loop), so decode prefers few tiles; the engine's decode step at
# contexts <= 256 reads one tile. Engine step / static decode step (one sitting, interleaved, B = 4/16/32 at
# context 128): P=8 1.56/1.42/1.31, P=16 1.35/1.26/1.22. The earlier choice of 8 (per-call planning, per-layer
# checks) measured P=16 0.8-1.0 ms and P=8 1.0-1.4 for 32 x 256 decode, P=8 2.3 / P=16 2.7 for the 256 chunk.
DEFAULT_BLOCKS_PER_TILE = 16
# rows of one sequence that share each key tile: a prefill chunk is cut into query tiles of at most this many rows
QUERY_TILE = 64


# ---- checks ------------------------------------------------------------------------------------------------------
def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _tensor(name: str, x, dims: int, what: str, *, integer: bool | None = None) -> None:
    """x must be a tensor of ``dims`` dimensions (``what`` names them); integer True/False/None = any dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() != dims:
        raise ValueError(f"{name} must be a tensor of shape {what}, got {_shape(x)}")
    if integer is True and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers (torch.int64), got {x.dtype}")
    if integer is False and not x.is_floating_point():
        raise TypeError(f"{name} must be floating point (float32, bfloat16 or float16), got {x.dtype}")


def _int(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def _check_pools(k_pool, v_pool, who: str) -> None:
    _tensor("k_pool", k_pool, 4, "(num_blocks, kv_heads, block_size, head_dim)", integer=False)
    _tensor("v_pool", v_pool, 4, "(num_blocks, kv_heads, block_size, head_dim)", integer=False)
    if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype or k_pool.device != v_pool.device:
        raise ValueError(f"{who}: k_pool and v_pool must have the same shape, dtype and device, got k_pool "
                         f"{tuple(k_pool.shape)} {k_pool.dtype} on {k_pool.device}, v_pool {tuple(v_pool.shape)} "
                         f"{v_pool.dtype} on {v_pool.device}")


def _check_rows(name: str, x, t: int, who: str) -> None:
    _tensor(name, x, 1, f"(T,) with T = {t} query rows", integer=True)
    if x.shape[0] != t:
        raise ValueError(f"{who}: {name} must have one entry per query row, (T,) = ({t},), got {tuple(x.shape)}")


def _check_seq_idx(seq_idx: torch.Tensor, num_seqs: int, who: str) -> None:
    if num_seqs == 0:
        raise IndexError(f"{who}: block_tables has no rows, so no seq_idx can index it; got {seq_idx.numel()} rows")
    lo, hi = torch.aminmax(seq_idx)  # one pass, one host read: the common case has nothing to report
    if int(lo) < 0 or int(hi) >= num_seqs:
        i = int(((seq_idx < 0) | (seq_idx >= num_seqs)).nonzero()[0, 0])
        raise IndexError(f"{who}: seq_idx must index a row of block_tables, 0..{num_seqs - 1}; row {i} has "
                         f"seq_idx {int(seq_idx[i])}")


def _row_tables(block_tables: torch.Tensor, seq_idx: torch.Tensor, limits: torch.Tensor, block_size: int,
                num_blocks: int, who: str) -> torch.Tensor:
    """Each row's table, (T, M), with the columns past its limit set to block 0 (they are masked later).

    The columns a row needs (``ceil(limit / bs)``) must hold real block ids, 0..N-1: a padded id there would
    read another sequence's keys. Padding after them (-1 or anything) is replaced by 0 so no index leaves the pool.
    """
    tbl = block_tables.index_select(0, seq_idx).long()  # (T, M)
    needed = (limits + block_size - 1) // block_size  # (T,) blocks each row reads
    used = torch.arange(tbl.shape[1], device=tbl.device) < needed[:, None]  # (T, M)
    bad = used & ((tbl < 0) | (tbl >= num_blocks))
    if bool(bad.any()):
        i, c = (int(v) for v in bad.nonzero()[0])
        raise IndexError(f"{who}: row {i} (sequence {int(seq_idx[i])}, limit {int(limits[i])}) needs block column "
                         f"{c}, whose id is {int(tbl[i, c])}; the pool holds blocks 0..{num_blocks - 1}")
    return torch.where(used, tbl, 0)  # (T, M)


def _check_q_and_pools(q, k_pool, v_pool, scale, who: str) -> None:
    """The checks on what changes from layer to layer (q and the pools): attribute checks only, no host sync."""
    _tensor("q", q, 3, "(T, num_heads, head_dim)", integer=False)
    _check_pools(k_pool, v_pool, who)
    n, kv, bs, d = k_pool.shape
    t, h, dq = q.shape
    if dq != d:
        raise ValueError(f"{who}: q's head_dim must equal the pool's, {d}, got q {tuple(q.shape)} and pool "
                         f"{tuple(k_pool.shape)}")
    if h % kv:
        raise ValueError(f"{who}: the query heads must be a multiple of the KV heads (each KV head serves "
                         f"H // KV query heads), got H={h} and KV={kv}")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):  # read as one row per (block, kv head)
        raise ValueError(f"{who}: k_pool and v_pool must be contiguous (N, KV, bs, D) tensors, as the engine "
                         f"allocates them; got strides {k_pool.stride()} and {v_pool.stride()}")
    if q.dtype != k_pool.dtype or q.device != k_pool.device:
        raise ValueError(f"{who}: q and the pools must have the same dtype and device, got q {q.dtype} on "
                         f"{q.device}, pool {k_pool.dtype} on {k_pool.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{who}: scale must be a finite float > 0 (usually head_dim ** -0.5), got {scale!r}")


def _check_step(block_tables, seq_idx, limits, t: int, block_size: int, who: str) -> None:
    """The checks on what a whole step shares (tables, rows' sequences and limits); ``t`` query rows."""
    _tensor("block_tables", block_tables, 2, "(num_seqs, max_blocks) of block ids", integer=True)
    _check_rows("seq_idx", seq_idx, t, who)
    _check_rows("limits", limits, t, who)
    if t == 0:
        return
    _check_seq_idx(seq_idx, block_tables.shape[0], who)
    capacity = block_tables.shape[1] * block_size
    lo, hi = torch.aminmax(limits)
    lo, hi = int(lo), int(hi)
    if lo < 1:
        i = int((limits < 1).nonzero()[0, 0])
        raise ValueError(f"{who}: limits must be >= 1 (row t sees keys 0..limits[t]-1, and sees at least itself); "
                         f"row {i} has limit {lo}")
    if hi > capacity:
        i = int((limits > capacity).nonzero()[0, 0])
        raise ValueError(f"{who}: limits must be <= the table capacity, {block_tables.shape[1]} blocks x "
                         f"{block_size} = {capacity} tokens; row {i} has limit {hi}")


def _check_attention(q, k_pool, v_pool, block_tables, seq_idx, limits, scale, who: str) -> None:
    _check_q_and_pools(q, k_pool, v_pool, scale, who)
    _check_step(block_tables, seq_idx, limits, q.shape[0], k_pool.shape[2], who)


# ---- slots -------------------------------------------------------------------------------------------------------
def slot_mapping(positions: torch.Tensor, block_tables: torch.Tensor, seq_idx: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """Flat slot of each token of a ragged step: ``table[p // bs] * bs + p % bs`` (block, then offset in it).

    positions (T,) int64: each token's position in its sequence; seq_idx (T,): its row of ``block_tables``;
    block_tables (S, M) int64. Returns (T,) int64. The block column a position falls in must hold a real id
    (>= 0): an unallocated (padded) entry is refused, not turned into a slot.
    """
    who = "slot_mapping"
    _int("block_size", block_size, 1)
    _tensor("positions", positions, 1, "(T,) token positions", integer=True)
    _tensor("block_tables", block_tables, 2, "(num_seqs, max_blocks) of block ids", integer=True)
    _check_rows("seq_idx", seq_idx, positions.shape[0], who)
    if positions.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=positions.device)
    _check_seq_idx(seq_idx, block_tables.shape[0], who)
    positions, seq_idx = positions.long(), seq_idx.long()
    capacity = block_tables.shape[1] * block_size
    bad = (positions < 0) | (positions >= capacity)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{who}: positions must be in 0..{capacity - 1} ({block_tables.shape[1]} table columns x "
                         f"block_size {block_size}); token {i} has position {int(positions[i])}")
    col = positions // block_size  # (T,) which block of the sequence
    block = block_tables.long()[seq_idx, col]  # (T,) its id in the pool
    if bool((block < 0).any()):
        i = int((block < 0).nonzero()[0, 0])
        raise IndexError(f"{who}: token {i} (sequence {int(seq_idx[i])}, position {int(positions[i])}) falls in "
                         f"block column {int(col[i])}, which holds {int(block[i])}: no block allocated there")
    return block * block_size + positions % block_size  # (T,)


def _check_slots(slots, t: int, num_blocks: int, block_size: int, who: str) -> None:
    """slots (T,) ints, each in the pool (0..N*bs-1), none twice."""
    _check_rows("slots", slots, t, who)
    if t == 0:
        return
    n, bs = num_blocks, block_size
    slots = slots.long()
    bad = (slots < 0) | (slots >= n * bs)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"{who}: slots must be in 0..{n * bs - 1} ({n} blocks x {bs}); token {i} has slot "
                         f"{int(slots[i])}")
    srt = torch.sort(slots).values  # (T,) a slot written twice sits next to itself
    if t > 1 and bool((srt[1:] == srt[:-1]).any()):
        s, c = slots.unique(return_counts=True)
        raise ValueError(f"{who}: each token needs its own slot; slot {int(s[c > 1][0])} is written by "
                         f"{int(c[c > 1][0])} tokens of this call")


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
             block_size: int, *, plan: AttentionPlan | None = None) -> None:
    """Write token t's key and value (T, KV, D) at flat slot ``slots[t]`` of one layer's pools (N, KV, bs, D).

    In place. Everything is checked before anything is written (a refused call changes nothing): shapes,
    dtypes, slots in 0..N*bs-1, and no slot twice in one call (two tokens in one slot would keep either).
    ``plan``: an ``AttentionPlan`` built with these ``slots`` (``plan_attention(..., slots=slots)``): the slots
    were checked there, once per step, and the rows they write are read from it.
    """
    who = "write_kv"
    if isinstance(plan, AttentionPlan) and plan.write_signature is not None and \
            _signature((k, v), k_pool, v_pool, (slots,), (type(block_size), block_size)) == plan.write_signature:
        _write_planned(k_pool, v_pool, k, v, plan)  # every layer of a step passes the same: checked once
        return
    _check_pools(k_pool, v_pool, who)
    n, kv, bs, d = k_pool.shape
    if _int("block_size", block_size, 1) != bs:
        raise ValueError(f"{who}: block_size {block_size} does not match the pool's {tuple(k_pool.shape)} "
                         f"(num_blocks, kv_heads, block_size={bs}, head_dim)")
    _tensor("k", k, 3, f"(T, kv_heads={kv}, head_dim={d})")
    _tensor("v", v, 3, f"(T, kv_heads={kv}, head_dim={d})")
    if k.shape != v.shape or k.shape[1:] != (kv, d):
        raise ValueError(f"{who}: k and v must both be (T, kv_heads={kv}, head_dim={d}), got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.dtype != k_pool.dtype or v.dtype != k_pool.dtype or k.device != k_pool.device or v.device != k_pool.device:
        raise ValueError(f"{who}: k and v must have the pool's dtype and device, {k_pool.dtype} on "
                         f"{k_pool.device}; got k {k.dtype} on {k.device}, v {v.dtype} on {v.device}")
    if plan is not None:
        if not isinstance(plan, AttentionPlan) or plan.write_rows is None:
            raise TypeError(f"{who}: plan must be an AttentionPlan built with the step's slots "
                            f"(plan_attention(..., slots=slots)), got {plan!r}")
        plan.check(who, k_pool, slots=slots)
        if k.shape[0] != plan.num_rows:
            raise ValueError(f"{who}: the plan has {plan.num_rows} tokens, k has {k.shape[0]}")
        plan.write_signature = _signature((k, v), k_pool, v_pool, (slots,), (type(block_size), block_size))
        _write_planned(k_pool, v_pool, k, v, plan)
        return
    _check_slots(slots, k.shape[0], n, bs, who)
    if k.shape[0] == 0:
        return
    slots = slots.long()
    block, offset = slots // bs, slots % bs  # (T,), (T,)
    k_pool[block, :, offset] = k  # advanced indices on dims 0 and 2: the indexed pool is (T, KV, D)
    v_pool[block, :, offset] = v


def _write_planned(k_pool, v_pool, k, v, plan: AttentionPlan) -> None:
    d = k_pool.shape[-1]
    k_pool.view(-1, d).index_copy_(0, plan.write_rows, k.reshape(-1, d))  # (T * KV, D) rows of (N * KV * bs, D)
    v_pool.view(-1, d).index_copy_(0, plan.write_rows, v.reshape(-1, d))


def _signature(xs: tuple, k_pool, v_pool, step: tuple, values: tuple) -> tuple | None:
    """What a planned call's checks depend on, layer after layer: the shapes, dtypes and devices of ``xs`` (q, or
    k and v) and of the pools, the pools' contiguity, the step's tensors ``step`` by identity (the plan holds
    them, so no other tensor can take their id) and plain ``values``. A call whose signature equals the one
    checked for the plan needs no new check; ``None``: not tensors, check in full."""
    if not all(isinstance(x, torch.Tensor) for x in (*xs, k_pool, v_pool)):
        return None
    return (*((x.shape, x.dtype, x.device) for x in xs), k_pool.shape, v_pool.shape, k_pool.dtype, v_pool.dtype,
            k_pool.device, v_pool.device, k_pool.is_contiguous(), v_pool.is_contiguous(), *map(id, step), *values)


# ---- attention ---------------------------------------------------------------------------------------------------
def _online_update(state: tuple | None, s: torch.Tensor, v: torch.Tensor) -> tuple:
    """Fold one tile into (m, l, acc): scores s (B * KV, X, L) with -inf where masked, values v (B * KV, L, D).

    X = query rows x heads of a query tile. m (B * KV, X) running max, l (B * KV, X) running sum of exp(s - m),
    acc (B * KV, X, D) running sum of exp(s - m) @ v. A new max rescales what was summed against the old one by
    exp(m_old - m_new). ``s`` is a temporary: it is overwritten with exp(s - m) in place, and the walk owns the
    state, so it is updated in place too.
    """
    m_tile = s.amax(-1)  # (B * KV, X); -inf only for a tile fully masked in a row, never the first tile
    if state is None:
        p = s.sub_(m_tile[..., None]).exp_()  # (B * KV, X, L)
        return m_tile, p.sum(-1), torch.bmm(p, v)
    m, denom, acc = state
    m_new = torch.maximum(m, m_tile)  # (B * KV, X): finite, since the first tile holds key 0
    p = s.sub_(m_new[..., None]).exp_()  # (B * KV, X, L): masked keys give exp(-inf) = 0
    alpha = m.sub_(m_new).exp_()  # (B * KV, X): exp(m_old - m_new), 1 where the max did not change
    denom.mul_(alpha).add_(p.sum(-1))
    acc.mul_(alpha[..., None]).baddbmm_(p, v)  # (B * KV, X, D): rescaled, then += p @ v
    return m_new, denom, acc


class _Tile:
    """One key tile of a group's walk: the query tiles that still read it, the pool rows it gathers, its mask."""

    __slots__ = ("active", "ids", "length", "mask", "bias")

    def __init__(self, active: int, ids: torch.Tensor, length: int, mask: torch.Tensor | None,
                 bias: torch.Tensor | None):
        self.active = active  # query tiles 0..active-1 (longest first) read this tile
        self.ids = ids  # (active * KV * P,) rows of the (N * KV, bs * D) pool view, in (B', KV, P) order
        self.length = length  # L keys: P * bs
        self.mask = mask  # (B', 1, R, 1, L) True where a key is past its row's limit; None: no row ends here
        self.bias = bias  # one row a query tile: the mask as (B' * KV, 1, L) of 0 / -inf, added by the score bmm


class _Group:
    """Query tiles of ``r`` rows each, walked together, longest first.

    ``take`` (B * R,): the q row of each (query tile, place) in walk order, ``T`` (a zero row) for padding, or None:
    every row in its own order (B = T, R = 1). ``put_rows`` / ``put_from``: out[put_rows] = result[put_from]
    (``put_from`` None: every result row, in order)."""

    __slots__ = ("b", "r", "take", "put_rows", "put_from", "tiles")

    def __init__(self, take: torch.Tensor | None, lim: torch.Tensor, tbl: torch.Tensor, t: int, kv: int, bs: int,
                 p_tile: int):
        b, r = lim.shape
        if r == 1:  # one row a query tile (decode rows): its limit is both
            tops = lim[:, 0].tolist()
            lows = list(tops)
        else:
            tops, lows = lim.amax(1).tolist(), lim.amin(1).tolist()  # the longest and shortest row of each
        order = sorted(range(b), key=tops.__getitem__, reverse=True)  # longest first: the active are a prefix
        if order != list(range(b)):
            perm = torch.tensor(order, device=lim.device)
            take = perm[:, None] if take is None else take[perm]
            lim, tbl = lim[perm], tbl[perm]
            tops, lows = [tops[i] for i in order], [lows[i] for i in order]
        self.b, self.r = b, r
        self.take = None if take is None else take.reshape(-1)  # (B * R,)
        self.put_rows = self.put_from = None
        if self.take is not None:
            real = self.take < t  # (B * R,) not a padding place
            if bool(real.all()):
                self.put_rows = self.take
            else:
                self.put_rows, self.put_from = self.take[real], real.nonzero()[:, 0]
        lows = list(itertools.accumulate(lows, min))  # lows[i]: the shortest row among query tiles 0..i
        neg_tops = [-x for x in tops]  # ascending, for bisect
        width = -(-tops[0] // bs)  # table columns the longest query tile reads
        heads = torch.arange(kv, device=lim.device)
        # row block * KV + j of a pool holds head j of that block: gathering rows in (B, KV, P) order gives a
        # tile directly as (B, KV, P * bs, D), with no transpose
        rows = tbl[:, None, :width] * kv + heads[None, :, None]  # (B, KV, W)
        self.tiles = []
        for c0 in range(0, width, p_tile):
            c1, start = min(c0 + p_tile, width), c0 * bs
            length = (c1 - c0) * bs
            active = bisect.bisect_left(neg_tops, -start)  # query tiles with a row that reaches this tile
            mask = bias = None
            if start + length > lows[active - 1]:  # some row ends inside this tile: mask its keys >= its limit
                pos = torch.arange(start, start + length, device=lim.device)  # (L,)
                mask = (pos >= lim[:active, :, None])[:, None, :, None, :]  # (B', 1, R, 1, L)
                if r == 1:  # decode rows: scores = bias + q @ k^T in one baddbmm, no masked_fill per layer
                    bias = torch.zeros(active, kv, 1, length, device=lim.device).masked_fill_(mask[:, :, 0],
                                                                                               float("-inf"))
                    mask, bias = None, bias.view(active * kv, 1, length)  # (B' * KV, 1, L)
            self.tiles.append(_Tile(active, rows[:active, :, c0:c1].reshape(-1), length, mask, bias))


class AttentionPlan:
    """What every layer of one step shares, built once per step: ``plan_attention`` makes it.

    Everything ``paged_attention`` derives from (block_tables, seq_idx, limits, block_size) is the same in every
    layer: the checks (host syncs), each row's table, the sort of the rows into query tiles, each key tile's pool
    rows and masks. ``paged_attention(..., plan=plan)`` reads them from the plan and only walks the tiles; given
    ``slots``, ``write_kv(..., plan=plan)`` writes through rows checked once too. A plan is tied to the very
    tensors it was built from (compared by identity), so it cannot be used with another step's.
    """

    def __init__(self, block_tables: torch.Tensor, seq_idx: torch.Tensor, limits: torch.Tensor,
                 slots: torch.Tensor | None, num_blocks: int, kv_heads: int, block_size: int, blocks_per_tile: int,
                 groups: list, write_rows: torch.Tensor | None):
        self.block_tables, self.seq_idx, self.limits, self.slots = block_tables, seq_idx, limits, slots
        self.num_rows = seq_idx.shape[0]
        self.num_blocks, self.kv_heads, self.block_size = num_blocks, kv_heads, block_size
        self.blocks_per_tile = blocks_per_tile
        self.groups = groups  # list[_Group]
        self.write_rows = write_rows  # (T * KV,) rows of the (N * KV * bs, D) pool view, or None (no slots)
        self.attn_signature = self.write_signature = None  # what the first planned call checked (``_signature``)
        self.scratch: dict[str, torch.Tensor] = {}  # buffers the walk's temporaries reuse, layer after layer

    def buffer(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A scratch tensor of ``shape`` (contents undefined), reused by every layer: the walk's key and value
        tiles and scores are the same sizes in every layer, and fresh allocations of that size cost page faults."""
        numel = math.prod(shape)
        buf = self.scratch.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.scratch[name] = torch.empty(max(numel, buf.numel() if buf is not None else 0), dtype=like.dtype,
                                                   device=like.device)
        return buf[:numel].view(shape)

    def __repr__(self) -> str:
        return (f"AttentionPlan({self.num_rows} rows, {len(self.groups)} groups, "
                f"{sum(len(g.tiles) for g in self.groups)} key tiles, pool ({self.num_blocks}, {self.kv_heads}, "
                f"{self.block_size}, D), blocks_per_tile={self.blocks_per_tile})")

    def check(self, who: str, k_pool: torch.Tensor, block_tables=None, seq_idx=None, limits=None,
              blocks_per_tile: int | None = None, slots=None) -> None:
        """Refuse a plan built for another step or another pool (identity of the step's tensors, pool shape)."""
        mine = {"block_tables": self.block_tables, "seq_idx": self.seq_idx, "limits": self.limits,
                "slots": self.slots}
        given = {"block_tables": block_tables, "seq_idx": seq_idx, "limits": limits, "slots": slots}
        for name, x in given.items():
            if x is not None and x is not mine[name]:
                raise ValueError(f"{who}: the plan was built for other {name} than the ones given: build one plan "
                                 f"per step with plan_attention(...) from the very tensors this call gets")
        if tuple(k_pool.shape[:3]) != (self.num_blocks, self.kv_heads, self.block_size):
            raise ValueError(f"{who}: the plan was built for a pool of (num_blocks, kv_heads, block_size) = "
                             f"{(self.num_blocks, self.kv_heads, self.block_size)}, got {tuple(k_pool.shape)}")
        if blocks_per_tile is not None and blocks_per_tile != self.blocks_per_tile:
            raise ValueError(f"{who}: the plan was built for blocks_per_tile={self.blocks_per_tile}, the call asks "
                             f"for {blocks_per_tile!r}")


def plan_attention(block_tables: torch.Tensor, seq_idx: torch.Tensor, limits: torch.Tensor, *, num_blocks: int,
                   kv_heads: int, block_size: int, blocks_per_tile: int = DEFAULT_BLOCKS_PER_TILE,
                   slots: torch.Tensor | None = None) -> AttentionPlan:
    """Check one step's tables, rows and limits once, and plan its walk (``AttentionPlan``) for every layer.

    Same arguments as ``paged_attention`` (the pool given by its sizes), plus, optionally, the step's ``slots``
    (T,) for ``write_kv``: checked here (in the pool, no slot twice) so the layers' writes need not be.
    """
    return _plan(block_tables, seq_idx, limits, slots, num_blocks, kv_heads, block_size, blocks_per_tile,
                 "plan_attention")


def _plan(block_tables, seq_idx, limits, slots, num_blocks, kv_heads, block_size, blocks_per_tile,
          who: str) -> AttentionPlan:
    n, kv = _int("num_blocks", num_blocks, 1), _int("kv_heads", kv_heads, 1)
    bs, p_tile = _int("block_size", block_size, 1), _int("blocks_per_tile", blocks_per_tile, 1)
    _tensor("seq_idx", seq_idx, 1, "(T,) with T query rows", integer=True)
    t = seq_idx.shape[0]
    _check_step(block_tables, seq_idx, limits, t, bs, who)
    write_rows = None
    if slots is not None:
        _check_slots(slots, t, n, bs, who)
        slots = slots.long()
        # token t's head j goes to row (block * KV + j) * bs + offset = slot + block * (KV - 1) * bs + j * bs of the
        # (N * KV * bs, D) pool view
        block = torch.floor_divide(slots, bs)  # (T,)
        heads = torch.arange(0, kv * bs, bs, device=slots.device)  # (KV,) j * bs
        write_rows = (torch.add(slots, block, alpha=(kv - 1) * bs)[:, None] + heads).reshape(-1)  # (T * KV,)
    groups = []
    if t:
        seq, lim = seq_idx.long(), limits.long()
        tbl = _row_tables(block_tables, seq, lim, bs, n, who)  # (T, M), padding -> block 0
        # query tiles: rows sorted by sequence (stable), then cut into runs of at most QUERY_TILE rows of one sequence
        seq_sorted, order = torch.sort(seq, stable=True)  # (T,), (T,)
        first = torch.ones(t, dtype=torch.bool, device=seq.device)
        first[1:] = seq_sorted[1:] != seq_sorted[:-1]  # (T,) a sequence's first row
        if bool(first.all()):  # one row per sequence (a decode step): every row is its own query tile
            groups.append(_Group(None, lim[:, None], tbl, t, kv, bs, p_tile))
        else:
            groups = _plan_mixed(seq_sorted, order, first, lim, tbl, t, kv, bs, p_tile)
    return AttentionPlan(block_tables, seq_idx, limits, slots, n, kv, bs, p_tile, groups, write_rows)


def _plan_mixed(seq_sorted, order, first, lim, tbl, t: int, kv: int, bs: int, p_tile: int) -> list:
    """Groups of a step with prefill chunks: its single rows (decode tokens), then its multi-row query tiles."""
    dev = lim.device
    idx = torch.arange(t, device=dev)
    start_of_run = torch.cummax(torch.where(first, idx, 0), 0).values  # (T,) index of its sequence's first row
    rank = idx - start_of_run  # (T,) rank of the row within its sequence
    tile_id = torch.cumsum(first | (rank % QUERY_TILE == 0), 0) - 1  # (T,) query tile of each sorted row
    sizes = torch.bincount(tile_id)  # (tiles,)
    single = sizes[tile_id] == 1  # (T,) rows alone in their query tile: decode tokens
    groups = []
    rows_a = order[single]  # (TA,) decode-like rows
    if rows_a.numel():
        groups.append(_Group(rows_a[:, None], lim[rows_a][:, None], tbl[rows_a], t, kv, bs, p_tile))
    multi = ~single
    if bool(multi.any()):
        rows_b, tiles_b = order[multi], tile_id[multi]  # (TB,) rows of multi-row query tiles, sorted by tile
        _, counts = torch.unique_consecutive(tiles_b, return_counts=True)  # (NB,)
        r, nb = int(counts.max()), counts.numel()  # rows a query tile holds, padded to
        slot = torch.arange(rows_b.numel(), device=dev) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)  # (TB,) row's place in its query tile
        which = torch.repeat_interleave(torch.arange(nb, device=dev), counts)  # (TB,) its query tile
        take = torch.full((nb, r), t, dtype=torch.long, device=dev)  # (NB, R): padding places read row T (zeros)
        take[which, slot] = rows_b
        lim_b = lim.new_ones(nb, r)  # padding rows see key 0 only: finite, and discarded
        lim_b[which, slot] = lim[rows_b]
        longest = take[torch.arange(nb, device=dev), lim_b.argmax(1)]  # (NB,) its row of largest limit, whose
        groups.append(_Group(take, lim_b, tbl[longest], t, kv, bs, p_tile))  # table has every block the tile reads
    return groups


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    seq_idx: torch.Tensor, limits: torch.Tensor, scale: float,
                    blocks_per_tile: int = DEFAULT_BLOCKS_PER_TILE, *, plan: AttentionPlan | None = None
                    ) -> torch.Tensor:
    """Attention of ragged query rows over their sequences' blocks, one tile of blocks at a time.

    q (T, H, D): one row per query token (prefill chunks and decode tokens mixed). Row t attends to keys
    0..limits[t]-1 of sequence ``seq_idx[t]``, read through ``block_tables[seq_idx[t]]`` from the pools
    (N, KV, bs, D). ``limits[t]`` is the row's position + 1 (causal). Returns (T, H, D) in q's dtype; the
    scores, max, sum and accumulator are fp32 whatever the input dtype.

    The rows are walked in *query tiles*: the rows of one sequence in this step (a prefill chunk), up to
    ``QUERY_TILE`` of them, share each key tile, so its blocks are gathered once for all of them and their
    scores are one matrix product (FlashAttention's blocking over queries); a sequence with a single row (a
    decode token) is its own query tile, and those are walked together with no padding. Query tiles are
    walked longest first, and one whose rows have all ended stops being read: a long sequence does not make
    the short ones beside it read masked tiles. Only the table columns up to each tile's longest limit are
    read; entries past a row's last needed block may be anything (-1 padding): they are read as block 0 and
    masked.

    ``plan``: the step's ``AttentionPlan`` (``plan_attention``), the same for every layer: the checks and the
    planning of the walk are then done once per step instead of once per layer; without it, this call plans
    (and checks) for itself. The result is the same.
    """
    who = "paged_attention"
    if plan is None:
        _check_attention(q, k_pool, v_pool, block_tables, seq_idx, limits, scale, who)
        p_tile = _int("blocks_per_tile", blocks_per_tile, 1)
        n, kv, bs, _ = k_pool.shape
        plan = _plan(block_tables, seq_idx, limits, None, n, kv, bs, p_tile, who)
    else:
        if not isinstance(plan, AttentionPlan):
            raise TypeError(f"{who}: plan must be an AttentionPlan (from plan_attention), got {type(plan).__name__}")
        sig = _signature((q,), k_pool, v_pool, (block_tables, seq_idx, limits), (type(scale), scale, type(blocks_per_tile), blocks_per_tile))
        if sig is None or sig != plan.attn_signature:  # every layer of a step passes the same: checked once
            _check_q_and_pools(q, k_pool, v_pool, scale, who)
            plan.check(who, k_pool, block_tables, seq_idx, limits, blocks_per_tile)
            if q.shape[0] != plan.num_rows:
                raise ValueError(f"{who}: the plan has {plan.num_rows} query rows, q has {q.shape[0]}")
            plan.attn_signature = sig
    return _attend(plan, q, k_pool, v_pool, scale)


def _attend(plan: AttentionPlan, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Walk the plan's groups for one layer: (T, H, D) in q's dtype."""
    n, kv, bs, d = k_pool.shape
    t, h, _ = q.shape
    if t == 0:
        return q.new_empty(0, h, d)
    g = h // kv  # query heads per KV head
    qf = q.float() * scale  # (T, H, D) fp32; head h = kv_head * G + i, as repeat_kv
    pools = k_pool.view(n * kv, bs * d), v_pool.view(n * kv, bs * d)  # one row per (block, kv head)
    groups = plan.groups
    if len(groups) == 1 and groups[0].take is None:  # a decode step in walk order: no gather, no scatter
        return _walk(qf.view(t, kv, g, d), groups[0], pools, plan).view(t, h, d).to(q.dtype)  # (T, H, D)
    if any(grp.put_from is not None for grp in groups):
        qf = torch.cat([qf, qf.new_zeros(1, h, d)])  # (T + 1, H, D): row T, zeros, for padding places
    out = torch.empty(t, h, d, dtype=torch.float32, device=q.device)
    for grp in groups:
        b, r = grp.b, grp.r
        qg = qf.index_select(0, grp.take).view(b, r, kv, g, d).transpose(1, 2).reshape(b, kv, r * g, d)
        og = _walk(qg, grp, pools, plan)  # (B, KV, R * G, D)
        og = og.view(b, kv, r, g, d).transpose(1, 2).reshape(b * r, h, d)  # (B * R, H, D)
        if grp.put_from is None:
            out.index_copy_(0, grp.put_rows, og)
        else:
            out.index_copy_(0, grp.put_rows, og.index_select(0, grp.put_from))
    return out.to(q.dtype)  # (T, H, D)


def _walk(qg: torch.Tensor, grp: _Group, pools: tuple, plan: AttentionPlan) -> torch.Tensor:
    """The block walk of one group: B query tiles of R rows each, one sequence per query tile, longest first.

    qg (B, KV, R * G, D) scaled fp32 queries, rows then heads; pools: K and V as (N * KV, bs * D).
    Returns (B, KV, R * G, D).
    """
    b, kv, rg, d = qg.shape
    r, tiles = grp.r, grp.tiles
    to_fp32 = pools[0].dtype != torch.float32
    q3 = qg.reshape(b * kv, rg, d)  # (B * KV, R * G, D): one small matrix product per (query tile, KV head)
    if len(tiles) == 1:  # one key tile holds every key: the online softmax is a plain softmax over it
        tile = tiles[0]
        k, v = (_gather(pool, tile, plan, name) for pool, name in zip(pools, "kv", strict=True))  # (B * KV, L, D)
        if to_fp32:
            k, v = k.float(), v.float()
        s = _scores(q3, k, tile, plan.buffer("s", (b * kv, rg, tile.length), q3))  # (B * KV, R * G, L)
        if tile.mask is not None:
            s.view(b, kv, r, rg // r, tile.length).masked_fill_(tile.mask, float("-inf"))
        return torch.bmm(torch.softmax(s, dim=-1), v).view(b, kv, rg, d)  # (B, KV, R * G, D)
    out = None if tiles[-1].active == b else qg.new_empty(b * kv, rg, d)  # None: every query tile reads the last
    state, active = None, b
    for tile in tiles:
        now, length = tile.active, tile.length
        if now < active:  # the rest have ended: their result is final
            m, denom, acc = state
            out[now * kv:active * kv] = acc[now * kv:] / denom[now * kv:, :, None]
            state, active = (m[:now * kv], denom[:now * kv], acc[:now * kv]), now
        k, v = _gather(pools[0], tile, plan, "k"), _gather(pools[1], tile, plan, "v")  # (B' * KV, L, D)
        if to_fp32:
            k, v = k.float(), v.float()
        s = _scores(q3[:active * kv], k, tile, plan.buffer("s", (active * kv, rg, length), q3))  # (B'*KV, R*G, L)
        if tile.mask is not None:
            s.view(active, kv, r, rg // r, length).masked_fill_(tile.mask, float("-inf"))
        state = _online_update(state, s, v)
    _, denom, acc = state
    if out is None:
        return (acc / denom[:, :, None]).view(b, kv, rg, d)  # (B, KV, R * G, D)
    out[:active * kv] = acc / denom[:, :, None]
    return out.view(b, kv, rg, d)  # (B, KV, R * G, D)


def _scores(q3: torch.Tensor, k: torch.Tensor, tile: _Tile, out: torch.Tensor) -> torch.Tensor:
    """q3 (B' * KV, R * G, D) @ k^T (B' * KV, D, L) into ``out``, -inf past each row's limit (the decode rows'
    mask as an added bias, one op)."""
    if tile.bias is not None:
        return torch.baddbmm(tile.bias, q3, k.transpose(1, 2), out=out)
    return torch.bmm(q3, k.transpose(1, 2), out=out)


def _gather(pool: torch.Tensor, tile: _Tile, plan: AttentionPlan, name: str) -> torch.Tensor:
    """One key tile's rows of a (N * KV, bs * D) pool view, into the plan's scratch buffer: (B' * KV, L, D)."""
    rows, width = tile.ids.numel(), pool.shape[1]
    out = torch.index_select(pool, 0, tile.ids, out=plan.buffer(name, (rows, width), pool))  # (B' * KV * P, bs * D)
    return out.view(tile.active * plan.kv_heads, tile.length, -1)


def gather_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                     seq_idx: torch.Tensor, limits: torch.Tensor, scale: float,
                     blocks_per_tile: int = DEFAULT_BLOCKS_PER_TILE) -> torch.Tensor:
    """The reference: gather each row's keys and values densely, (T, KV, max_limit, D), and run SDPA with a mask.

    This is what notebook 08's ``PagedKVCache.update`` does per sequence: a copy of every key a row sees (padded
    to the longest row; every row gets its own copy, even rows of the same sequence). Same arguments and result
    as ``paged_attention`` (``blocks_per_tile`` is accepted and unused); computed in fp32, returned in q's dtype.
    """
    who = "gather_attention"
    _check_attention(q, k_pool, v_pool, block_tables, seq_idx, limits, scale, who)
    _int("blocks_per_tile", blocks_per_tile, 1)
    n, kv, bs, d = k_pool.shape
    t, h, _ = q.shape
    if t == 0:
        return q.new_empty(0, h, d)
    limits = limits.long()
    tbl = _row_tables(block_tables, seq_idx.long(), limits, bs, n, who)  # (T, M)
    length = int(limits.max())
    width = -(-length // bs)  # table columns any row reads
    ids = tbl[:, :width].reshape(-1)  # (T * W,)
    k = k_pool.view(n, -1).index_select(0, ids).view(t, width, kv, bs, d)  # (T, W, KV, bs, D): the dense copy
    v = v_pool.view(n, -1).index_select(0, ids).view(t, width, kv, bs, d)
    k = k.transpose(1, 2).reshape(t, kv, width * bs, d)[:, :, :length].float()  # (T, KV, L, D), time order
    v = v.transpose(1, 2).reshape(t, kv, width * bs, d)[:, :, :length].float()
    pos = torch.arange(length, device=q.device)  # (L,)
    mask = (pos < limits[:, None])[:, None, None, :]  # (T, 1, 1, L)
    # enable_gqa (torch >= 2.5): query head h reads KV head h // (H // KV), as repeat_kv pairs them
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=True)  # (T, H, 1, D)
    return out[:, :, 0].to(q.dtype)  # (T, H, D)


# ---- bytes -------------------------------------------------------------------------------------------------------
def attention_bytes(context_lens, num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int) -> dict:
    """Bytes of K and V that one layer's attention moves for query rows with these context lengths.

    Convention (per layer; K and V both counted; KV heads, before any GQA repeat; one entry of ``context_lens``
    per query row, the number of keys it sees):

    - ``dense_bytes``: the keys and values the rows see, ``sum(len) * 2 * KV * D * itemsize``.
    - ``gather_bytes``: a gather reads those slots from the pool, writes them into a dense copy, and attention
      reads the copy back: ``3 * dense_bytes``.
    - ``walk_bytes``: the block walk reads each row's blocks once, whole blocks, the unused tail of the last one
      included: ``sum(ceil(len / bs) * bs) * 2 * KV * D * itemsize``. Nothing is written.
    - ``tail_bytes``: ``walk_bytes - dense_bytes``, the unused slots the walk reads.
    - ``gather_over_walk``: ``gather_bytes / walk_bytes``.

    The query, the output and the block tables are not counted (they are the same for both).
    """
    if isinstance(context_lens, torch.Tensor):
        context_lens = context_lens.tolist()
    if isinstance(context_lens, (str, bytes)) or not hasattr(context_lens, "__iter__"):
        raise TypeError(f"context_lens must be a list of ints (keys each query row sees), got {context_lens!r}")
    lens = list(context_lens)
    for n in lens:
        _int("each of context_lens", n, 1)
    kv, d, bs = _int("num_kv_heads", num_kv_heads, 1), _int("head_dim", head_dim, 1), _int("block_size", block_size, 1)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    per_token = 2 * kv * d * torch.empty((), dtype=dtype).element_size()  # K and V of one token, one layer
    dense = sum(lens) * per_token
    walk = sum(-(-n // bs) * bs for n in lens) * per_token
    return {"dense_bytes": dense, "gather_bytes": 3 * dense, "walk_bytes": walk, "tail_bytes": walk - dense,
            "gather_over_walk": 3 * dense / walk if walk else 0.0}


# ---- timing ------------------------------------------------------------------------------------------------------
def benchmark(rows: int = 32, context: int = 256, *, prefill: int = 0, block_size: int = 16, heads: int = 6,
              kv_heads: int = 2, head_dim: int = 32, tiles: tuple = (1, 4, 8, 16), repeats: int = 7,
              calls: int = 10, seed: int = 0) -> dict:
    """Median CPU time per call (microseconds, this thread's CPU time) of ``paged_attention`` at each
    ``blocks_per_tile`` and of ``gather_attention``, on a seeded step: ``rows`` decode rows of ``context`` keys
    each, plus, if ``prefill`` > 0, one prefill chunk of ``prefill`` rows ending at ``context`` keys. Blocks
    are handed out in a shuffled order. Defaults: the bundled model's dims (H=6, KV=2, D=32), fp32.

    Returns ``{"walk P=1": us, ..., "gather": us}``. Timings depend on the machine and its load; the module's
    tests never assert on them.
    """
    import time

    g = torch.Generator().manual_seed(seed)
    nseq = rows + (1 if prefill else 0)
    width = -(-context // block_size)
    num_blocks = nseq * width
    tables = torch.randperm(num_blocks, generator=g).view(nseq, width)  # (S, M)
    k_pool = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g)  # (N, KV, bs, D)
    v_pool = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g)
    seq_idx = torch.cat([torch.arange(rows), torch.full((prefill,), rows)]).long()  # (T,)
    limits = torch.cat([torch.full((rows,), context), torch.arange(context - prefill + 1, context + 1)]).long()
    q = torch.randn(rows + prefill, heads, head_dim, generator=g)  # (T, H, D)
    args = (q, k_pool, v_pool, tables, seq_idx, limits, head_dim ** -0.5)
    cands = {f"walk P={p}": (lambda p=p: paged_attention(*args, blocks_per_tile=p)) for p in tiles}
    cands["gather"] = lambda: gather_attention(*args)
    times: dict[str, list[float]] = {name: [] for name in cands}
    for f in cands.values():
        f()  # warm up
    for _ in range(repeats):  # interleaved, so a burst of load hits every candidate alike
        for name, f in cands.items():
            t0 = time.thread_time()
            for _ in range(calls):
                f()
            times[name].append((time.thread_time() - t0) / calls * 1e6)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}

