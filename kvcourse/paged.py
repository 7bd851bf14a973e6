"""A paged KV cache (vLLM's PagedAttention layout, in plain PyTorch on any device): a pool of fixed-size
blocks, a block table per sequence, reference counts, and copy on write for shared prefixes.

A dense cache reserves ``max_seq_len`` slots per request up front. Kwon et al. 2023 ("Efficient Memory
Management for Large Language Model Serving with PagedAttention", SOSP; arXiv:2309.06180, section 1 and
Fig. 2) found that only 20.4-38.2 % of the reserved KV-cache memory held real tokens in their own
reimplementation of Orca (not public; section 6.1, "Baseline 2") with three reservation policies: Max,
Pow2 and Oracle. Paging reserves memory a block at a time instead:

- the pool holds ``num_blocks`` blocks of ``block_size`` token slots per layer, ``(N, KV, block_size, D)``;
- each sequence has a block table, the list of its blocks in order: token ``p`` of a sequence lives in
  block ``table[p // block_size]``, slot ``p % block_size``;
- a block is taken from the free list when a sequence's last block is full, and returned when the
  sequence is freed;
- ``fork(parent, child)`` gives the child the parent's table and adds one reference to each block: a
  shared prompt is stored once. When a sequence appends to a block that another sequence still
  references, that block is first copied (copy on write), so the other sequence never sees the change.
- ``crop(n)`` rewinds the batch's sequences (speculative decoding drops the rejected draft tokens): blocks
  wholly past the new length lose a reference, and a kept block that is shared stays shared until the next
  append copies it, as above. After a crop and an append, a sequence holds exactly what a sequence that never
  saw the dropped tokens holds (tests/test_rewind_paged.py).

``update`` gathers each sequence's blocks through its table and returns its keys and values in time
order, ``(B, KV, length, D)``, so the course's ``Llama`` runs on it unchanged; the rows of one call
(``set_batch``) must have the same length. A real engine reads the blocks inside its attention kernel
instead of gathering them into a copy.

Contracts, so that no call can corrupt a sequence silently:

- Lengths are kept per layer and per sequence, as ``KVCache`` keeps them per layer: ``update`` on a layer
  appends after what that layer holds, whatever order the layers come in. A second ``update`` of one layer
  in one step appends again (as ``KVCache`` does); ``lengths[seq]`` is the number of positions whose slots are
  reserved, the most any layer holds.
- A step is all or nothing: blocks are reserved for every row before anything is written, and if the pool
  runs out on any row, every row's books are restored and the ``CacheOverflowError`` says so. Free a sequence
  and retry: the retried step computes what it would have.
- Bad input (an unknown or freed id, a duplicate, a wrong shape or dtype) raises before anything changes.
"""

from __future__ import annotations

import torch

from .cache import CacheOverflowError, _check_kv, _check_same_kind, _cropped_length


class UnknownSequenceError(KeyError):
    """A sequence id that this cache does not hold (never added, or already freed)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class PagedKVCache:
    """Block pool + block tables + reference counts, with ``update``/``get_seq_length``/``reset``/``crop`` like ``KVCache``."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        for name, n in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("num_blocks", num_blocks), ("block_size", block_size)):
            _check_count(name, n, 1)
        shape = (num_blocks, num_kv_heads, block_size, head_dim)  # (N, KV, block_size, D)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.num_blocks = block_size, num_blocks
        self.reset()

    @classmethod
    def for_model(cls, model, *, num_blocks: int, block_size: int = 16, **kw) -> PagedKVCache:
        """Size the pool for a ``kvcourse.llama.Llama`` or a ``transformers`` Llama (as ``KVCache.for_model``)."""
        a = getattr(model, "args", None)
        if a is not None:
            layers, kv, d = a.num_layers, a.num_kv_heads, a.head_dim
        elif getattr(model, "config", None) is not None:
            c = model.config
            layers, kv = c.num_hidden_layers, c.num_key_value_heads
            d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        else:
            raise TypeError(f"for_model takes a kvcourse Llama (with .args) or a transformers model (with .config), "
                            f"got {type(model).__name__}")
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("device", p.device)
        return cls(layers, kv, d, num_blocks=num_blocks, block_size=block_size, **kw)

    # ---- bookkeeping --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every sequence; every block back on the free list."""
        self.refcount = [0] * self.num_blocks
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self.tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}  # positions with a reserved slot: the most any layer holds
        self.layer_lengths: dict[object, list[int]] = {}  # tokens written, per layer
        self.batch: list[object] = []
        self.freed: set = set()  # ids freed since the last reset: set_batch does not bring them back silently
        self._version = 0  # bumped whenever a block table may change: the cached slot indices are then stale
        self._index: tuple | None = None  # (key, write blocks, write slots, read blocks, read slots) of this step

    def _known(self, seq_id, what: str) -> None:
        if seq_id not in self.tables:
            state = "was freed" if seq_id in self.freed else "was never added"
            raise UnknownSequenceError(f"{what}: sequence {seq_id!r} {state}; this cache holds "
                                       f"{len(self.tables)} sequences, e.g. {sorted(map(repr, self.tables))[:8]}")

    def add_sequence(self, seq_id) -> None:
        """Register an empty sequence (also one whose id was freed before: it starts again from nothing)."""
        _check_id(seq_id)
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already exists; free it first or pick another id")
        self.tables[seq_id], self.lengths[seq_id] = [], 0
        self.layer_lengths[seq_id] = [0] * self.num_layers
        self.freed.discard(seq_id)
        self._version += 1

    def fork(self, parent, child) -> None:
        """The child shares every block of the parent (one more reference each); nothing is copied yet."""
        self._known(parent, "fork")
        if child in self.tables:
            raise ValueError(f"fork({parent!r}, {child!r}): sequence {child!r} already exists")
        if len(set(self.layer_lengths[parent])) > 1:  # a block shared mid-step would be written without a copy
            raise ValueError(f"fork({parent!r}, {child!r}) in the middle of a step: the parent's layers hold "
                             f"{self.layer_lengths[parent]} tokens; fork after every layer has been updated")
        self.add_sequence(child)
        self.tables[child] = list(self.tables[parent])
        self.lengths[child] = self.lengths[parent]
        self.layer_lengths[child] = list(self.layer_lengths[parent])
        for block in self.tables[child]:
            self.refcount[block] += 1

    def free(self, seq_id) -> None:
        """Drop a sequence: each of its blocks loses a reference, and goes back to the pool at zero."""
        self._known(seq_id, "free")
        for block in self.tables.pop(seq_id):
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self.free_blocks.append(block)
        self._forget(seq_id)

    def _forget(self, seq_id) -> None:
        """The books of a freed sequence besides its blocks: its lengths, its row in the batch."""
        self.lengths.pop(seq_id, None)
        self.layer_lengths.pop(seq_id, None)
        self.freed.add(seq_id)
        self.batch = [s for s in self.batch if s != seq_id]
        self._version += 1

    def set_batch(self, seq_ids: list) -> None:
        """The sequences that the rows of the next ``update`` calls belong to, in row order.

        An id not seen before is added as an empty sequence (a new request); an id that was freed is refused,
        since its cache is gone: ``add_sequence`` it again to start it from nothing.
        """
        if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__iter__"):
            raise TypeError(f"set_batch takes a list of sequence ids, got {seq_ids!r}")
        seq_ids = list(seq_ids)
        for s in seq_ids:
            _check_id(s)
        seen: set = set()
        repeated = sorted({repr(s) for s in seq_ids if s in seen or seen.add(s)})
        if repeated:
            raise ValueError(f"set_batch got the same sequence twice: {', '.join(repeated)} in {seq_ids!r}")
        gone = [s for s in seq_ids if s in self.freed and s not in self.tables]
        if gone:
            raise UnknownSequenceError(f"set_batch: sequence(s) {', '.join(map(repr, gone))} were freed and their "
                                       f"cache is gone; add_sequence(id) starts one again from nothing")
        for s in seq_ids:
            if s not in self.tables:
                self.add_sequence(s)
        self.batch = seq_ids

    def _allocate(self) -> int:
        if not self.free_blocks:
            raise CacheOverflowError(f"paged KV cache: all {self.num_blocks} blocks of {self.block_size} tokens are in "
                                     f"use; free a finished sequence or allocate more blocks")
        block = self.free_blocks.pop()
        self.refcount[block] = 1
        self._version += 1
        return block

    def _reserve(self, seq_id, t: int) -> None:
        """Make room for t more tokens of seq_id: copy a shared last block (copy on write), add new blocks."""
        table, length = self.tables[seq_id], self.lengths[seq_id]
        if length % self.block_size and self.refcount[table[-1]] > 1:  # appending into a block others share
            old, new = table[-1], self._allocate()
            for layer in range(self.num_layers):
                self.keys[layer][new].copy_(self.keys[layer][old])
                self.values[layer][new].copy_(self.values[layer][old])
            self.refcount[old] -= 1
            table[-1] = new
        while len(table) * self.block_size < length + t:
            table.append(self._allocate())

    def _reserve_all(self, batch: list, end: int) -> None:
        """Reserve slots up to position ``end`` for every sequence of the batch, or for none of them."""
        short = [s for s in batch if self.lengths[s] < end]
        if not short:
            return
        saved = ({s: list(self.tables[s]) for s in short}, {s: self.lengths[s] for s in short},
                 list(self.refcount), list(self.free_blocks))
        try:
            for s in short:
                self._reserve(s, end - self.lengths[s])
                self.lengths[s] = end
        except CacheOverflowError as e:  # put every row's books back: a failed step changes nothing
            tables, lengths, self.refcount, self.free_blocks = saved
            self.tables.update(tables)
            self.lengths.update(lengths)
            self._version += 1
            raise CacheOverflowError(f"{e} (this step over {batch!r} needed blocks for {len(short)} sequence(s) "
                                     f"and changed nothing: retry it after freeing)") from None

    def _slot_index(self, batch: list, start: int, t: int, device) -> tuple[torch.Tensor, ...]:
        """(write blocks, write slots, read blocks, read slots), each (B, t) or (B, start + t), on ``device``.

        Built once per step (one host-to-device copy of the block tables) and reused by every layer whose
        write starts at the same position, until a block table changes.
        """
        key = (self._version, tuple(batch), start, t, str(device))
        if self._index is None or self._index[0] != key:
            width = -(-(start + t) // self.block_size)
            rows = [self.tables[s][:width] for s in batch]
            table = torch.tensor(rows, dtype=torch.long).to(device)  # (B, blocks): one copy per step
            pos = torch.arange(start + t, device=device)  # (L,)
            blocks = table[:, pos // self.block_size]  # (B, L): token p lives in block table[p // block_size]
            slots = (pos % self.block_size).expand(len(batch), -1)  # (B, L): at slot p % block_size
            self._index = (key, blocks[:, start:], slots[:, start:], blocks, slots)
        return self._index[1:]

    # ---- the Cache API ------------------------------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value (B, KV, T, D), row b to sequence ``batch[b]``; return each row's (B, KV, length, D)."""
        _check_kv(key, value, layer_idx, self.num_layers)
        b, kv, t, d = key.shape
        if (kv, d) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"key {tuple(key.shape)} does not fit this cache's (batch, kv_heads, seq, head_dim) = "
                             f"(batch, {self.num_kv_heads}, seq, {self.head_dim})")
        _check_same_kind(key, self.keys[layer_idx], layer_idx)
        batch = self.batch or list(range(b))  # nothing named (e.g. after reset() in generate): rows 0..B-1
        if len(batch) != b:
            raise ValueError(f"update got {b} rows but set_batch named {len(batch)} sequences: {batch!r}")
        if not self.batch:
            self.set_batch(batch)
        starts = [self.layer_lengths[s][layer_idx] for s in batch]
        if len(set(starts)) > 1:
            raise ValueError(f"the rows of one call must have the same length; layer {layer_idx} holds {starts} "
                             f"tokens for {batch!r}")
        start = starts[0]
        self._reserve_all(batch, start + t)  # every row's slots, or none: only then write
        wb, ws, rb, rs = self._slot_index(batch, start, t, key.device)
        # advanced indices (B, T) on either side of a slice: the indexed pool is (B, T, KV, D)
        self.keys[layer_idx][wb, :, ws] = key.transpose(1, 2)
        self.values[layer_idx][wb, :, ws] = value.transpose(1, 2)
        for s in batch:
            self.layer_lengths[s][layer_idx] = start + t
        k = self.keys[layer_idx][rb, :, rs].transpose(1, 2)  # (B, L, KV, D) -> (B, KV, L, D), in time order
        v = self.values[layer_idx][rb, :, rs].transpose(1, 2)
        return k, v

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens of every sequence of the batch; a negative value drops that many
        from the end (``KVCache.crop``'s semantics: ``transformers`` 5.x ``Cache.crop`` takes the negative form).

        Per sequence, per layer: a layer's length becomes what ``KVCache.crop`` would make it. Blocks wholly past
        a sequence's new length lose its reference and go back to the pool when nobody else holds them; a kept
        block another sequence shares (after ``fork``) stays shared, and the next ``update`` copies it before
        writing (copy on write), so the other sequence never sees the tokens written after the rewind. To rewind
        one sequence alone: ``set_batch([seq])``, then ``crop``.

        All or nothing: every sequence of the batch is checked before anything changes. Refused: a non-int, a
        value outside ``-length..length`` for some sequence, and ``crop(-n)`` in the middle of a step (layers
        holding different lengths: dropping n from each would leave them unequal; ``crop(n >= 0)`` levels them).
        """
        new: dict[object, list[int]] = {}
        for s in self.batch or []:
            held = self.layer_lengths[s]
            try:
                new[s] = [_cropped_length(max_length, n, i) for i, n in enumerate(held)]
            except ValueError as e:
                raise ValueError(f"sequence {s!r} of the batch {self.batch!r}: {e}") from None
            if len(set(new[s])) > 1:
                raise ValueError(f"crop({max_length}) in the middle of a step: sequence {s!r}'s layers hold {held} "
                                 f"tokens, and dropping {-max_length} from each would leave them unequal; finish "
                                 f"the step, or crop to a length 0..{min(held)} to bring every layer to it")
        if not self.batch:
            _cropped_length(max_length, 0, 0)  # an empty cache: only crop(0) is in range
        for s, lengths in new.items():
            keep = -(-lengths[0] // self.block_size)  # blocks that still hold a kept token
            table = self.tables[s]
            for block in reversed(table[keep:]):
                self.refcount[block] -= 1
                if self.refcount[block] == 0:
                    self.free_blocks.append(block)
            del table[keep:]
            self.layer_lengths[s] = lengths
            self.lengths[s] = lengths[0]
        self._version += 1  # block tables (and the positions of the next write) changed: slot indices are stale

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens that layer ``layer_idx`` holds for the batch's sequences (all equal); 0 before anything."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx must be an int in 0..{self.num_layers - 1}, got {layer_idx!r}")
        return self.layer_lengths[self.batch[0]][layer_idx] if self.batch else 0

    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free_blocks)


def _check_id(seq_id) -> None:
    """Sequence ids are dict keys: anything hashable (an int, a string, a tuple)."""
    try:
        hash(seq_id)
    except TypeError:
        raise TypeError(f"a sequence id must be hashable (an int, a str, a tuple), got {seq_id!r}") from None


def _check_count(name: str, value, least: int) -> None:
    """A count must be an int (not a bool or a float) of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def simulate_serving(budget_tokens: int, max_len: int, *, block_size: int = 16, requests: int = 2000,
                     paged: bool, seed: int = 0, lengths: list[tuple[int, int]] | None = None) -> dict:
    """A day of requests through a KV-cache budget of ``budget_tokens`` slots, one token per running sequence per step.

    Lengths (stated distribution): prompt ~ lognormal(median 200, sigma 1), output ~ lognormal(median 150,
    sigma 1), rounded, at least 1 each, together at most ``max_len``. Requests wait in a queue and are
    admitted first come, first served. ``lengths``, a list of (prompt, output) pairs, replaces the drawn requests.

    - ``paged=False``: each admitted request reserves ``max_len`` slots up front (a dense cache per request).
    - ``paged=True``: a request holds ceil(length / block_size) blocks and takes one more when its last one is
      full. It is admitted while its prompt's blocks, plus one spare block per running sequence, fit. When a
      sequence needs a block and none is free, the lowest-priority running request is preempted: under first come,
      first served that is the last one admitted (``running[-1]``), possibly the sequence itself. Its blocks are
      freed and it goes back to the front of the queue; when it is admitted again its prompt and the tokens it had
      generated are all prefilled again (recompute preemption). vLLM's scheduler does the same: when
      ``allocate_slots`` fails it takes ``self.running.pop()`` under FCFS (the highest ``(priority, arrival_time)``
      under priority scheduling) and retries, stopping when the victim is the request itself
      (vllm-project/vllm, ``vllm/v1/core/sched/scheduler.py``, ``Scheduler.schedule``); ``_preempt_request``
      frees the request's blocks and sets its ``num_computed_tokens`` to 0.

    The simulation counts slots and tokens, not time: a step is one decode token per running sequence, and a
    prefill (first or recomputed) costs no step. Recompute is charged as work instead: ``recomputed_tokens`` is the
    number of tokens prefilled a second (third, ...) time, and ``recompute_share`` their share of every token the
    model computed (prompts, recomputed tokens and generated tokens).

    Returns ``used_share``, the share of reserved slots that held real tokens (averaged over steps), to compare
    with the 20.4-38.2 % that Kwon et al. 2023 (vLLM paper, SOSP; arXiv:2309.06180, section 1 and Fig. 2) give for
    their own reimplementation of Orca with Max, Pow2 and Oracle reservation (section 6.1, "Baseline 2": Orca is
    not public), baselines they built, not measurements of deployed systems; ``mean_running``, the mean number of sequences running at once; ``steps``; ``preempted``;
    ``recomputed_tokens``; ``recompute_share``.
    """
    _check_count("budget_tokens", budget_tokens, 1)
    _check_count("max_len", max_len, 2)  # a prompt of at least 1 token and an output of at least 1
    _check_count("block_size", block_size, 1)
    if not isinstance(paged, bool):
        raise TypeError(f"paged must be True (blocks on demand) or False (max_len reserved per request), got {paged!r}")
    if lengths is None:
        _check_count("requests", requests, 1)
        g = torch.Generator().manual_seed(seed)
        median = torch.log(torch.tensor(200.0)), torch.log(torch.tensor(150.0))
        prompt = torch.exp(torch.randn(requests, generator=g) + median[0]).round().clamp(1, max_len - 1)
        output = torch.minimum(torch.exp(torch.randn(requests, generator=g) + median[1]).round().clamp(min=1),
                               max_len - prompt)
        lengths = list(zip(prompt.int().tolist(), output.int().tolist(), strict=True))
    if not lengths or any(not (isinstance(p, int) and isinstance(o, int) and p >= 1 and o >= 1 and p + o <= max_len)
                          for p, o in lengths):
        raise ValueError(f"lengths must be a non-empty list of (prompt, output) ints, each >= 1 and together at most "
                         f"max_len={max_len}, got {lengths if len(lengths) < 8 else lengths[:8] + ['...']!r}")
    queue = list(lengths)  # (tokens to prefill, tokens to generate), first come first served
    blocks_total = budget_tokens // block_size

    def blocks(length: int) -> int:
        return -(-length // block_size)

    running: list[list[int]] = []  # [current length, final length], in the order admitted
    held = 0  # blocks held (paged) or slots reserved (dense)
    used_share, concurrency, steps, preempted = [], [], 0, 0
    prefilled = decoded = recomputed = 0  # tokens computed: prompts (recomputes included), generated, recomputed
    while queue or running:
        while queue:  # admit in order while the next request fits
            p, o = queue[0]
            if paged and held + blocks(p) + len(running) + 1 > blocks_total:
                break
            if not paged and held + max_len > budget_tokens:
                break
            queue.pop(0)
            running.append([p, p + o])
            held += blocks(p) if paged else max_len
            prefilled += p
        if not running:
            raise ValueError(f"a request of {queue[0][0]} prompt tokens does not fit a budget of {budget_tokens} slots")
        assert held <= (blocks_total if paged else budget_tokens), "the simulation overdrew its budget"
        real = sum(r[0] for r in running)
        used_share.append(real / (held * block_size if paged else held))
        concurrency.append(len(running))
        i = 0
        while i < len(running):  # one decode step: every sequence grows by one token, in admission order
            r = running[i]
            if paged and r[0] % block_size == 0:  # its last block is full: it needs a new one
                while held >= blocks_total:  # none free: preempt the last admitted, to be recomputed later
                    victim = running.pop()
                    held -= blocks(victim[0])
                    queue.insert(0, (victim[0], victim[1] - victim[0]))  # its prompt: everything it has so far
                    recomputed += victim[0]
                    preempted += 1
                    if victim is r:
                        break
                if i >= len(running):  # r itself was preempted
                    break
                held += 1
            r[0] += 1
            decoded += 1
            if r[0] >= r[1]:
                running.pop(i)
                held -= blocks(r[0]) if paged else max_len
                continue
            i += 1
        steps += 1
    computed = prefilled + decoded
    return {"used_share": sum(used_share) / len(used_share), "mean_running": sum(concurrency) / len(concurrency),
            "steps": steps, "preempted": preempted, "recomputed_tokens": recomputed,
            "recompute_share": recomputed / computed}
