"""A paged KV cache (vLLM's PagedAttention layout, in plain PyTorch on any device): a pool of fixed-size
blocks, a block table per sequence, reference counts, and copy on write for shared prefixes.

A dense cache reserves ``max_seq_len`` slots per request up front. Kwon et al. 2023 ("Efficient Memory
Management for Large Language Model Serving with PagedAttention", SOSP; arXiv:2309.06180) measured
that the systems before vLLM kept only 20.4-38.2 % of their reserved KV-cache memory holding real
tokens. Paging reserves memory a block at a time instead:

- the pool holds ``num_blocks`` blocks of ``block_size`` token slots per layer, ``(N, KV, block_size, D)``;
- each sequence has a block table, the list of its blocks in order: token ``p`` of a sequence lives in
  block ``table[p // block_size]``, slot ``p % block_size``;
- a block is taken from the free list when a sequence's last block is full, and returned when the
  sequence is freed;
- ``fork(parent, child)`` gives the child the parent's table and adds one reference to each block: a
  shared prompt is stored once. When a sequence appends to a block that another sequence still
  references, that block is first copied (copy on write), so the other sequence never sees the change.

``update`` gathers each sequence's blocks through its table and returns its keys and values in time
order, ``(B, KV, length, D)``, so the course's ``Llama`` runs on it unchanged; the rows of one call
(``set_batch``) must have the same length. A real engine reads the blocks inside its attention kernel
instead of gathering them into a copy.
"""

from __future__ import annotations

import torch

from .cache import CacheOverflowError, _check_kv


class PagedKVCache:
    """Block pool + block tables + reference counts, with ``update``/``get_seq_length``/``reset`` like ``KVCache``."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if min(num_layers, num_kv_heads, head_dim, num_blocks, block_size) <= 0:
            raise ValueError("num_layers, num_kv_heads, head_dim, num_blocks and block_size must all be positive")
        shape = (num_blocks, num_kv_heads, block_size, head_dim)  # (N, KV, block_size, D)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_layers, self.block_size, self.num_blocks = num_layers, block_size, num_blocks
        self.reset()

    @classmethod
    def for_model(cls, model, *, num_blocks: int, block_size: int = 16, **kw) -> PagedKVCache:
        a = model.args
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("device", p.device)
        return cls(a.num_layers, a.num_kv_heads, a.head_dim, num_blocks=num_blocks, block_size=block_size, **kw)

    # ---- bookkeeping --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every sequence; every block back on the free list."""
        self.refcount = [0] * self.num_blocks
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self.tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}
        self.batch: list[object] = []

    def add_sequence(self, seq_id) -> None:
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already exists")
        self.tables[seq_id], self.lengths[seq_id] = [], 0

    def fork(self, parent, child) -> None:
        """The child shares every block of the parent (one more reference each); nothing is copied yet."""
        self.add_sequence(child)
        self.tables[child] = list(self.tables[parent])
        self.lengths[child] = self.lengths[parent]
        for block in self.tables[child]:
            self.refcount[block] += 1

    def free(self, seq_id) -> None:
        """Drop a sequence: each of its blocks loses a reference, and goes back to the pool at zero."""
        for block in self.tables.pop(seq_id):
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self.free_blocks.append(block)
        del self.lengths[seq_id]
        self.batch = [s for s in self.batch if s != seq_id]

    def set_batch(self, seq_ids: list) -> None:
        """The sequences that the rows of the next ``update`` calls belong to, in row order."""
        for s in seq_ids:
            if s not in self.tables:
                self.add_sequence(s)
        self.batch = list(seq_ids)

    def _allocate(self) -> int:
        if not self.free_blocks:
            raise CacheOverflowError(f"paged KV cache: all {self.num_blocks} blocks of {self.block_size} tokens are in "
                                     f"use; free a finished sequence or allocate more blocks")
        block = self.free_blocks.pop()
        self.refcount[block] = 1
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

    def _slots(self, seq_id, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, slot) index tensors of positions start..stop-1 of seq_id, through its block table."""
        pos = torch.arange(start, stop)
        table = torch.tensor(self.tables[seq_id], dtype=torch.long)
        return table[pos // self.block_size], pos % self.block_size

    # ---- the Cache API ------------------------------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value (B, KV, T, D), row b to sequence ``batch[b]``; return each row's (B, KV, length, D)."""
        _check_kv(key, value, layer_idx, self.num_layers)
        if not self.batch:  # nothing named (e.g. after reset() in generate): rows are sequences 0..B-1
            self.set_batch(list(range(key.shape[0])))
        if len(self.batch) != key.shape[0]:
            raise ValueError(f"update got {key.shape[0]} rows but set_batch named {len(self.batch)} sequences")
        t = key.shape[2]
        out_k, out_v = [], []
        for row, seq in enumerate(self.batch):
            start = self.lengths[seq] if layer_idx == 0 else self.lengths[seq] - t  # layer 0 advances the length
            if layer_idx == 0:
                self._reserve(seq, t)
                self.lengths[seq] += t
            blocks, slots = self._slots(seq, start, start + t)
            dev = key.device
            # (KV, T, D) rows written at (block, slot): advanced indexing puts the T axis first
            self.keys[layer_idx][blocks.to(dev), :, slots.to(dev)] = key[row].transpose(0, 1)
            self.values[layer_idx][blocks.to(dev), :, slots.to(dev)] = value[row].transpose(0, 1)
            blocks, slots = self._slots(seq, 0, start + t)  # the whole sequence, in time order
            out_k.append(self.keys[layer_idx][blocks.to(dev), :, slots.to(dev)].transpose(0, 1))  # (KV, len, D)
            out_v.append(self.values[layer_idx][blocks.to(dev), :, slots.to(dev)].transpose(0, 1))
        if len({k.shape[1] for k in out_k}) > 1:
            raise ValueError(f"the rows of one call must have the same length, got {[k.shape[1] for k in out_k]}")
        return torch.stack(out_k), torch.stack(out_v)  # (B, KV, length, D)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens of the batch's sequences (all equal); 0 before anything is written."""
        return self.lengths[self.batch[0]] if self.batch else 0

    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free_blocks)


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
    the Orca variants they simulate (Max, Pow2 and Oracle reservation: simulated baselines, not measurements of
    deployed systems); ``mean_running``, the mean number of sequences running at once; ``steps``; ``preempted``;
    ``recomputed_tokens``; ``recompute_share``.
    """
    _check_count("budget_tokens", budget_tokens, 1)
    _check_count("max_len", max_len, 2)  # a prompt of at least 1 token and an output of at least 1
    _check_count("block_size", block_size, 1)
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
