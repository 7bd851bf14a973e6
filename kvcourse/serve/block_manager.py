"""The block pool's books: free blocks, reference counts, the prefix cache (chained block hashes), LRU
eviction and copy on write. No tensors here: the model runner owns the pool, this class owns who may use
which block.

- A block holds ``block_size`` tokens of every layer. Token ``p`` of a request lives in block
  ``block_table[p // block_size]``, at offset ``p % block_size`` (notebook 08's slot mapping).
- **Prefix cache.** A full block is named by ``block_hash(previous block's hash, its tokens)``: the hash
  chains, so a block's name stands for *every* token before it, and two equal blocks at different depths, or
  after different prefixes, get different names. nano-vllm (``engine/block_manager.py``: ``compute_hash``,
  ``hash_to_block_id``) and vLLM (``vllm/v1/core/kv_cache_utils.py``: ``hash_block_tokens``) do the same. A
  new request takes every leading block whose name is already here, and adds a reference to it.
- **Eviction.** A block whose last reference goes keeps its name and stays findable, until its space is
  needed: then the least recently freed one is taken first (blocks that never had a name go before any
  that did). A request's blocks are freed last block first, so its deepest blocks are evicted first.
- **Copy on write.** A block with more than one reference is never written: a request that must write into
  one gets a copy first (``prepare_write`` returns the copies for the runner to make), as notebook 08's
  ``PagedKVCache.fork`` does.
- **Rewind.** ``truncate`` keeps a request's first tokens (speculative decoding drops rejected drafts):
  blocks past them are released, and a kept, partly filled block that only this request holds loses its
  name before it is written again.
- **The fully cached prompt.** When every token of a request is in the cache, the last one is computed again
  anyway, since its logits give the next token (nano-vllm issue 144 was this case crashing); its block is
  copied first if another request holds it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from .request import Request


def block_hash(prev_hash: int | None, tokens: Sequence[int]) -> int:
    """A 64-bit name for a full block: BLAKE2b over the previous block's name and this block's token ids.

    ``prev_hash`` is ``None`` for a request's first block. Equal tokens after a different prefix give a
    different name, so a lookup can only match a whole leading run of blocks.
    """
    if prev_hash is not None and (isinstance(prev_hash, bool) or not isinstance(prev_hash, int)
                                  or not 0 <= prev_hash < 2**64):
        raise ValueError(f"block_hash: prev_hash must be None (the first block) or a previous block's hash, an int "
                         f"in 0..2**64-1, got {prev_hash!r}")
    tokens = _token_list(tokens, "block_hash")
    h = hashlib.blake2b(digest_size=8)
    h.update(b"root" if prev_hash is None else prev_hash.to_bytes(8, "little"))
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return int.from_bytes(h.digest(), "little")


def _token_list(tokens, who: str) -> list[int]:
    """``tokens`` as a list of int ids >= 0 (a list, tuple or 1-D integer tensor), or a ValueError naming them."""
    if hasattr(tokens, "tolist") and hasattr(tokens, "dim"):
        if tokens.dim() != 1 or tokens.is_floating_point():
            raise ValueError(f"{who}: tokens must be a 1-D sequence of int token ids, got a {tuple(tokens.shape)} "
                             f"{tokens.dtype} tensor")
        tokens = tokens.tolist()
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ValueError(f"{who}: tokens must be a list of int token ids, got {type(tokens).__name__} "
                         f"{str(tokens)[:60]}")
    bad = [t for t in tokens if not 0 <= t < 2**32]
    if bad:
        raise ValueError(f"{who}: token ids must be in 0..2**32-1, got {bad[:5]}")
    return list(tokens)


def prefix_lookup(bm: BlockManager, tokens: Sequence[int]) -> tuple[list[int], int]:
    """The cached blocks a request with these known ``tokens`` reuses, and how many of its tokens need no
    computing. A fully cached request still computes its last token (its logits give the next one)."""
    if not isinstance(bm, BlockManager):
        raise TypeError(f"prefix_lookup takes a BlockManager, got {type(bm).__name__}")
    if len(tokens) == 0:
        raise ValueError("prefix_lookup: tokens is empty; a request has at least one token")
    cached = bm.match_prefix(tokens)
    return cached, min(len(cached) * bm.block_size, len(tokens) - 1)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set when the block is full and named
    tokens: tuple[int, ...] = ()  # the tokens it was named for: a hash match is checked against them


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` tokens; ``prefix_caching=False`` names no block."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        for name, n in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be an int >= 1, got {n!r}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_unnamed: deque[int] = deque(range(num_blocks))
        self.free_named: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self.hash_to_block: dict[int, int] = {}
        self.evictions = 0
        self.hash_fn = block_hash  # swappable: notebook 09 runs the engine on a learner's block hash
        self.lookup_fn = prefix_lookup  # swappable: notebook 09 runs the engine on a learner's prefix lookup

    # ---- counts ----
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (named ones included: they are evicted when needed)."""
        return len(self.free_unnamed) + len(self.free_named)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that ``num_tokens`` tokens fill: ceil(num_tokens / block_size)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"blocks_for: num_tokens must be an int >= 0, got {num_tokens!r}")
        return -(-num_tokens // self.block_size)

    def _check_request(self, req, who: str, first: int = 0) -> None:
        """``req`` is a Request whose table's blocks from column ``first`` on are blocks this pool gave it (the
        per-step callers check only the columns they touch: a whole-table scan per request per step cost more
        than the scheduler)."""
        if not isinstance(req, Request):
            raise TypeError(f"BlockManager.{who} takes a kvcourse.serve.Request, got {type(req).__name__}")
        held = [b for b in req.block_table[first:] if not (isinstance(b, int) and 0 <= b < self.num_blocks)
                or self.blocks[b].ref_count < 1]
        if held:
            raise ValueError(f"BlockManager.{who}: request {req.request_id!r} lists blocks {held} in its table that "
                             f"this pool ({self.num_blocks} blocks) does not give it: a table from another pool, or "
                             f"freed already")

    # ---- the prefix cache ----
    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """The blocks holding the longest leading run of ``tokens``' full blocks, from the cache."""
        tokens = _token_list(tokens, "match_prefix")
        if not self.prefix_caching:
            return []
        bs, found, h = self.block_size, [], None
        for i in range(len(tokens) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = self.hash_fn(h, chunk)
            b = self.hash_to_block.get(h)
            if b is None or self.blocks[b].tokens != chunk:
                break
            found.append(b)
        return found

    def register_full_blocks(self, req: Request) -> None:
        """Name every block of ``req`` that is now full of computed tokens (``req.block_hashes`` grows)."""
        self._check_request(req, "register_full_blocks", len(req.block_hashes))
        if req.num_computed_tokens > len(req.block_table) * self.block_size:
            raise ValueError(f"register_full_blocks: request {req.request_id!r} says {req.num_computed_tokens} tokens "
                             f"are computed, but its {len(req.block_table)} blocks hold "
                             f"{len(req.block_table) * self.block_size}")
        if not self.prefix_caching:
            return
        bs = self.block_size
        while len(req.block_hashes) < req.num_computed_tokens // bs:
            i = len(req.block_hashes)
            chunk = tuple(req.token_slice(i * bs, (i + 1) * bs))
            h = self.hash_fn(req.block_hashes[-1] if i else None, chunk)
            req.block_hashes.append(h)
            blk = self.blocks[req.block_table[i]]
            if blk.hash is None and h not in self.hash_to_block:
                blk.hash, blk.tokens = h, chunk
                self.hash_to_block[h] = blk.block_id

    # ---- admission, growth, release ----
    def can_admit(self, req: Request, num_new_tokens: int) -> tuple[list[int], int] | None:
        """For a waiting request: (cached blocks it would reuse, tokens they cover), if the pool can also hold
        ``num_new_tokens`` computed after them; else ``None``. Changes nothing."""
        self._check_request(req, "can_admit")
        if req.block_table:
            raise ValueError(f"can_admit: request {req.request_id!r} already holds blocks {req.block_table}; only a "
                             f"waiting request (no blocks) is admitted")
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int) or num_new_tokens < 1:
            raise ValueError(f"can_admit: num_new_tokens must be an int >= 1, got {num_new_tokens!r}")
        cached, hit = self.lookup_fn(self, req.tokens)
        end = min(hit + num_new_tokens, req.num_tokens)
        need = self.blocks_for(end) - len(cached)
        taken_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # free now, taken by the hit
        copies = 1 if end <= len(cached) * self.block_size and self.blocks[cached[-1]].ref_count > 0 else 0
        if self.num_free_blocks - taken_free < max(need, 0) + copies:
            return None
        return cached, hit

    def admit(self, req: Request, cached: list[int], hit: int) -> None:
        """Give ``req`` the cached blocks (one more reference each); ``req`` starts computing at ``hit``."""
        self._check_request(req, "admit")
        if req.block_table:
            raise ValueError(f"admit: request {req.request_id!r} already holds blocks {req.block_table}")
        named = [b for b in cached if not (isinstance(b, int) and 0 <= b < self.num_blocks)
                 or self.blocks[b].hash is None]
        if named or len(set(cached)) != len(cached):
            raise ValueError(f"admit: cached must be distinct blocks found in the prefix cache (from can_admit or "
                             f"match_prefix), got {cached}; not cached: {named}")
        if isinstance(hit, bool) or not isinstance(hit, int) or not 0 <= hit <= min(len(cached) * self.block_size,
                                                                                   req.num_tokens - 1):
            raise ValueError(f"admit: hit must be the tokens the cached blocks cover, 0..{min(len(cached) * self.block_size, req.num_tokens - 1)} "
                             f"for {len(cached)} blocks of {self.block_size} and {req.num_tokens} tokens, got {hit!r}")
        for b in cached:
            blk = self.blocks[b]
            if blk.ref_count == 0:
                self.free_named.pop(b, None)
            blk.ref_count += 1
        req.block_table = list(cached)
        req.block_hashes = [self.blocks[b].hash for b in cached]
        req.num_computed_tokens = hit

    def prepare_write(self, req: Request, end: int) -> list[tuple[int, int]] | None:
        """Make ``req``'s tokens ``num_computed_tokens .. end - 1`` writable: new blocks for the table, and a copy
        of any shared block they fall in. Returns the copies ``(src, dst)`` for the runner, or ``None`` if the
        pool cannot (nothing is changed then)."""
        self._check_request(req, "prepare_write", req.num_computed_tokens // self.block_size)
        if isinstance(end, bool) or not isinstance(end, int) or not req.num_computed_tokens <= end <= req.num_tokens:
            raise ValueError(f"prepare_write: end must be an int in {req.num_computed_tokens}..{req.num_tokens} (from "
                             f"request {req.request_id!r}'s computed tokens to its known tokens), got {end!r}")
        bs, start = self.block_size, req.num_computed_tokens
        new = self.blocks_for(end) - len(req.block_table)
        shared = [i for i in range(start // bs, min(self.blocks_for(end), len(req.block_table)))
                  if self.blocks[req.block_table[i]].ref_count > 1]
        if self.num_free_blocks < max(new, 0) + len(shared):
            return None
        copies = []
        for i in shared:
            src = req.block_table[i]
            dst = self._take()
            self.blocks[src].ref_count -= 1
            req.block_table[i] = dst
            copies.append((src, dst))
        for _ in range(max(new, 0)):
            req.block_table.append(self._take())
        return copies

    def truncate(self, req: Request, num_tokens: int) -> None:
        """Keep only ``req``'s first ``num_tokens`` computed tokens (a rewind): ``req.num_computed_tokens`` becomes
        ``num_tokens``, its blocks past them lose its reference (last block first, as ``free``), and the names of
        the blocks that no longer hold a full block of its computed tokens are dropped from ``req.block_hashes``.

        The kept partly filled last block will be written again. If ``req`` alone holds it, it is written in place,
        so a name it had is removed from the prefix cache: no later prompt may find it under tokens it will no
        longer hold. If another request shares it, it keeps its name (its contents stay right for that request)
        and ``prepare_write`` copies it before ``req`` writes. A released block keeps its name, as in ``free``:
        its contents are still those of the tokens it was named for. vLLM rolls back a request's
        ``num_computed_tokens`` the same way when speculative tokens are rejected (``Scheduler.update_from_output``,
        vllm/v1/core/sched/scheduler.py). Refused, changing nothing: ``num_tokens`` outside
        ``0..req.num_computed_tokens``."""
        self._check_request(req, "truncate")
        c = req.num_computed_tokens
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 0 <= num_tokens <= c:
            raise ValueError(f"truncate: request {req.request_id!r} has {c} computed tokens; num_tokens must be an int "
                             f"in 0..{c} (the tokens to keep), got {num_tokens!r}")
        keep = self.blocks_for(num_tokens)
        for b in reversed(req.block_table[keep:]):
            self._release(b)
        del req.block_table[keep:]
        del req.block_hashes[num_tokens // self.block_size:]
        if num_tokens % self.block_size:  # the kept last block is partly filled: it will be written again
            blk = self.blocks[req.block_table[-1]]
            if blk.ref_count == 1 and blk.hash is not None:  # written in place: its name would lie
                if self.hash_to_block.get(blk.hash) == blk.block_id:
                    del self.hash_to_block[blk.hash]
                blk.hash, blk.tokens = None, ()
        req.num_computed_tokens = num_tokens

    def _release(self, b: int) -> None:
        """Drop one reference to block ``b``; a block nobody holds goes back to the free lists (keeping its name)."""
        blk = self.blocks[b]
        blk.ref_count -= 1
        if blk.ref_count == 0:
            if blk.hash is not None:
                self.free_named[b] = None
                self.free_named.move_to_end(b)
            else:
                self.free_unnamed.append(b)

    def free(self, req: Request) -> None:
        """Drop ``req``'s references, last block first; a block nobody holds keeps its name (findable)."""
        self._check_request(req, "free")
        for b in reversed(req.block_table):
            self._release(b)
        req.block_table = []
        req.block_hashes = []

    def _take(self) -> int:
        """A free block with one reference: an unnamed one if any, else evict the least recently freed."""
        if self.free_unnamed:
            b = self.free_unnamed.popleft()
        else:
            b, _ = self.free_named.popitem(last=False)
            blk = self.blocks[b]
            if self.hash_to_block.get(blk.hash) == b:
                del self.hash_to_block[blk.hash]
            blk.hash, blk.tokens = None, ()
            self.evictions += 1
        self.blocks[b].ref_count = 1
        return b
