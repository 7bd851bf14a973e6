"""The scheduler: which tokens of which requests go into the next forward pass.

Every step builds one batch under two budgets: the KV budget (the pool's blocks) and a token budget
(``max_num_batched_tokens``, the tokens one forward pass may take). Iteration-level scheduling, as Orca
(Yu et al., OSDI 2022) introduced it: requests join and leave the batch at every step, not per batch.

1. **Running requests first**, oldest first. A decoding request takes 1 token of the budget; a request
   still prefilling takes the next chunk of its prompt, as much as the budget has left (chunked prefill,
   Sarathi-Serve: Agrawal et al., OSDI 2024, arXiv:2403.02310), so a long prompt never stalls the decoding
   requests for a whole prefill. When a request needs a block and none is free, the *newest* running
   request is preempted: its blocks are freed and it goes back to the front of the queue, to be computed
   again from its prompt *and the tokens it already generated* (vLLM's recompute preemption, Kwon et al.
   2023, section 4.5). If the request itself is the newest, it is the one preempted.
2. **Then waiting requests**, first come first served, while the token budget, ``max_num_seqs`` and the
   pool allow. A request takes every leading block the prefix cache holds, and computes only the rest. The
   queue never skips ahead: if the first waiting request does not fit, none after it is admitted this
   step (no request waits forever behind smaller ones). No request is admitted in a step that preempted.

Release happens in the engine, in the same step that a request finishes: its blocks return to the pool
before the next ``schedule``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .request import Request, Status


@dataclass
class ScheduledBatch:
    """One step's work: ``items`` of (request, number of its tokens computed this step), in batch order;
    ``copies`` (src, dst) of shared blocks to copy before the forward pass; who was ``preempted``."""

    items: list[tuple[Request, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    """FCFS continuous batching with chunked prefill and recompute preemption."""

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int = 256, max_num_seqs: int = 64):
        for name, n in (("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be an int >= 1, got {n!r}")
        self.blocks = block_manager
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        """Queue a request at the back of the waiting queue (the engine checks it first: ``Engine.add_request``)."""
        if not isinstance(req, Request):
            raise TypeError(f"Scheduler.add takes a kvcourse.serve.Request, got {type(req).__name__}")
        if req.status is not Status.WAITING or req.block_table or any(r is req for r in self.waiting):
            raise ValueError(f"Scheduler.add: request {req.request_id!r} is {req.status.value}"
                             f"{' and queued already' if req in self.waiting else ''}; only a new request is added")
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = self.num_new_tokens(req, budget)
            while True:
                copies = self.blocks.prepare_write(req, req.num_computed_tokens + n)
                if copies is not None:
                    break
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                continue
            batch.copies += copies
            batch.items.append((req, n))
            budget -= n
        while (self.waiting and budget > 0 and not batch.preempted and len(self.running) < self.max_num_seqs):
            req = self.waiting[0]
            fit = self.blocks.can_admit(req, budget)
            if fit is None:
                break
            cached, hit = fit
            self.blocks.admit(req, cached, hit)
            n = self.num_new_tokens(req, budget)
            copies = self.blocks.prepare_write(req, hit + n)
            if copies is None:  # can_admit counted for this; refuse loudly rather than corrupt the books
                self.blocks.free(req)
                raise RuntimeError(f"scheduler: {req.request_id!r} was admitted for at most {budget} new tokens, but "
                                   f"num_new_tokens gave {n} and the pool cannot hold them")
            self.waiting.popleft()
            if req.num_preemptions == 0 and not req.output:
                req.num_cached_tokens = hit
            req.status = Status.RUNNING
            self.running.append(req)
            batch.copies += copies
            batch.items.append((req, n))
            batch.admitted.append(req)
            budget -= n
        return batch

    def num_new_tokens(self, req: Request, budget: int) -> int:
        """How many of ``req``'s known tokens to compute this step: all that are left (1 when decoding), but no
        more than the token budget left: a long prompt is prefilled in chunks (Sarathi-Serve)."""
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"num_new_tokens: budget must be an int >= 1 (tokens left this step), got {budget!r}")
        return min(req.num_tokens - req.num_computed_tokens, budget)

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        """Free ``req``'s blocks and put it at the front of the queue; its known tokens are kept."""
        self.running.remove(req)
        self.blocks.free(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        batch.preempted.append(req)  # never one already in the batch: running is walked oldest first

    def finish(self, req: Request) -> None:
        """Release a finished request: its blocks return to the pool now."""
        if not any(r is req for r in self.running):
            rid = getattr(req, "request_id", type(req).__name__)
            raise ValueError(f"Scheduler.finish: request {rid!r} is not running (running: "
                             f"{[r.request_id for r in self.running]})")
        self.running.remove(req)
        self.blocks.free(req)
        req.status = Status.FINISHED
