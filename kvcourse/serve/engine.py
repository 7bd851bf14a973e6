"""The engine: requests in, tokens out, one scheduled forward pass per ``step``.

``add_request`` checks a request and queues it; ``step`` asks the scheduler for one batch, makes the
copies that copy on write needs, runs the ragged forward pass, samples a token for every request whose
known tokens are all computed, and releases the requests that finished (EOS or ``max_new_tokens``), their
blocks back in the pool in the same step. ``run`` drives a whole workload: requests arrive at their
arrival times (wall clock), and every request comes back with its tokens and timestamps. ``rewind`` drops a
request's last generated tokens between steps (speculative decoding, notebook 10); it carries on from there.

Greedy requests in float32 get exactly the tokens ``kvcourse.generate.generate`` gives for their prompt
alone, whatever else is in the batch, however the prompt was chunked, preempted or found in the cache:
tests/test_serve_engine.py checks this on seeded workloads.

References: nano-vllm ``engine/llm_engine.py`` (``add_request``, ``step``, ``generate``); vLLM's
``LLMEngine``; Kwon et al. 2023 (arXiv:2309.06180).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..batching import transformers_filter
from ..timing import progress as progress_bar
from .attention import DEFAULT_BLOCKS_PER_TILE, slot_mapping
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .request import Request, RequestError, RequestOutput, SamplingParams, Status
from .scheduler import ScheduledBatch, Scheduler


@dataclass
class StepRecord:
    """What one step did (for the plots of notebook 09)."""

    step: int
    time: float
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_used_blocks: int
    num_tokens: int
    prefill_tokens: int
    decode_tokens: int
    requests: list[tuple[str, int, str]]  # (request id, tokens this step, "prefill" | "decode")
    preempted: list[str]


@dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    peak_blocks_used: int = 0
    prompt_tokens: int = 0  # prompt tokens of the requests admitted (first admission)
    prefix_hit_tokens: int = 0  # of which found in the prefix cache
    forward_tokens: int = 0  # tokens through the model, recompute included
    rewound_tokens: int = 0  # generated tokens dropped by ``Engine.rewind``
    history: list[StepRecord] = field(default_factory=list)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class Engine:
    """Continuous batching over a paged KV cache for the course's Llama.

    ``num_blocks`` x ``block_size`` tokens is the KV budget (every layer); ``max_num_batched_tokens`` the
    tokens one step may compute; ``max_num_seqs`` the most running requests. ``scheduler_cls``: a
    ``Scheduler`` subclass (notebook 09 runs the engine on a learner's ``schedule``).
    """

    def __init__(self, model, *, num_blocks: int, block_size: int = 16, max_num_batched_tokens: int = 256,
                 max_num_seqs: int = 64, prefix_caching: bool = True,
                 blocks_per_tile: int = DEFAULT_BLOCKS_PER_TILE,
                 scheduler_cls: type[Scheduler] = Scheduler):
        self.block_manager = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = scheduler_cls(self.block_manager, max_num_batched_tokens, max_num_seqs)
        self.runner = ModelRunner(model, num_blocks, block_size, blocks_per_tile)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._counted: set[str] = set()
        self.slot_mapping = slot_mapping  # swappable: notebook 09 runs the engine on a learner's slot mapping
        self.t0 = time.perf_counter()

    def now(self) -> float:
        """Seconds since the engine's clock started (its creation, or the start of ``run``)."""
        return time.perf_counter() - self.t0

    # ---- requests ----
    def add_request(self, request: Request | None = None, *, arrival_time: float | None = None, **kwargs) -> Request:
        """Queue a ``Request`` (or build one from ``request_id=, prompt=, max_new_tokens=, ...``).

        Raises ``RequestError`` naming the request and the limit, and changes nothing, for a duplicate id, an
        empty prompt, ids outside the vocabulary, ``max_new_tokens < 1``, or a request longer than the whole
        KV budget.
        """
        if request is None:
            request = Request(**kwargs)
        elif kwargs:
            raise TypeError("add_request takes a Request, or keyword arguments to build one, not both")
        if not isinstance(request, Request):
            raise TypeError(f"add_request takes a kvcourse.serve.Request, got {type(request).__name__}")
        if request.request_id in self.requests:
            raise RequestError(f"request {request.request_id!r}: this id is already used by another request of this "
                               f"engine; ids must be unique")
        if request.status is not Status.WAITING or request.output or request.block_table:
            raise RequestError(f"request {request.request_id!r} has already run ({request.status.value}); add a new one")
        request.check(self.runner.vocab_size, self.num_blocks * self.block_size)
        request.arrival_time = self.now() if arrival_time is None else arrival_time
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def rewind(self, request_id: str, num_tokens: int) -> Request:
        """Drop the last ``num_tokens`` generated tokens of an unfinished request, between steps (a speculative
        decoder drops its rejected drafts this way); the next steps generate again from the new end.

        The request's cache keeps its tokens up to the new last one, which is computed again (its logits give
        the next token: vLLM's ``num_computed_tokens`` rolls back the same way, ``Scheduler.update_from_output``
        in vllm/v1/core/sched/scheduler.py); its blocks past them go back to the pool, and a block it will
        write again loses its prefix-cache name (``BlockManager.truncate``). A waiting request (preempted) holds
        no blocks: only its tokens are dropped. The other requests are not touched. A sampled request draws
        its next tokens anew from its generator, which is not rewound.

        Refused with a ``RequestError``, changing nothing: an unknown or finished request, ``num_tokens`` not an
        int in 1..(tokens it generated): a rewind never reaches into the prompt.
        """
        try:
            req = self.requests.get(request_id)
        except TypeError:  # an unhashable id (a list): no request has it
            req = None
        if req is None:
            known = sorted(self.requests)
            raise RequestError(f"rewind: no request {request_id!r} in this engine (it holds {len(known)}: "
                               f"{known[:8]}{' ...' if len(known) > 8 else ''})")
        if req.status is Status.FINISHED:
            raise RequestError(f"rewind: request {request_id!r} has finished ({req.finish_reason}) and its blocks are "
                               f"released; only a waiting or running request can be rewound")
        n, made = num_tokens, len(req.output)
        if not made:
            raise RequestError(f"rewind: request {request_id!r} has generated no token yet, so there is nothing to "
                               f"rewind (a rewind never reaches into the prompt); got num_tokens={n!r}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= made:
            raise RequestError(f"rewind: request {request_id!r} has generated {made} tokens; num_tokens must be an int "
                               f"in 1..{made} (a rewind never reaches into the prompt), got {n!r}")
        del req.output[-n:]
        del req.token_times[-n:]
        req.first_token_time = req.token_times[0] if req.token_times else None
        if req.status is Status.RUNNING:  # keep the cache up to the new last token, which is computed again
            self.block_manager.truncate(req, min(req.num_computed_tokens, req.num_tokens - 1))
        self.stats.rewound_tokens += n
        return req

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample, release. Returns the requests that finished."""
        batch = self.scheduler.schedule()
        self.stats.preemptions += len(batch.preempted)
        if not batch:
            if self.scheduler.has_unfinished():
                raise RuntimeError(f"the scheduler found nothing to run with {len(self.scheduler.waiting)} waiting "
                                   f"and {len(self.scheduler.running)} running requests; this is a bug")
            return []
        self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, self.block_manager.num_used_blocks)
        for r in batch.admitted:
            if r.request_id not in self._counted:
                self._counted.add(r.request_id)
                self.stats.prompt_tokens += len(r.prompt)
                self.stats.prefix_hit_tokens += r.num_cached_tokens
        self.runner.copy_blocks(batch.copies)
        logits, sampling, kinds = self._forward(batch)
        now = self.now()
        finished = []
        for req, row in zip(sampling, self._sample(sampling, logits), strict=True):
            req.output.append(row)
            req.token_times.append(now)
            if req.first_token_time is None:
                req.first_token_time = now
            if row in req.eos_ids:
                req.finish_reason = "eos"
            elif len(req.output) >= req.max_new_tokens:
                req.finish_reason = "length"
            if req.finish_reason is not None:
                req.finish_time = now
                self.scheduler.finish(req)
                finished.append(RequestOutput.from_request(req))
        self._record(batch, kinds, now)
        return finished

    def _forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Request], list[str]]:
        """Build the ragged step from the batch, run it, and advance each request's computed tokens. Returns the
        logits of the requests that sample, those requests, and each item's kind ("prefill": a prompt chunk or a
        recompute; "decode")."""
        ids, positions, seq_idx, logit_rows, sampling, tables, kinds = [], [], [], [], [], [], []
        for s, (req, n) in enumerate(batch.items):
            c = req.num_computed_tokens
            ids += req.token_slice(c, c + n)
            positions += range(c, c + n)
            seq_idx += [s] * n
            tables.append(req.block_table)
            kinds.append("decode" if n == 1 and c == req.num_tokens - 1 and c >= len(req.prompt) else "prefill")
            if c + n == req.num_tokens:  # every known token computed: its last token's logits are sampled
                logit_rows.append(len(ids) - 1)
                sampling.append(req)
        dev = self.runner.device
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev)  # (S, M)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)  # (T,)
        seq = torch.tensor(seq_idx, dtype=torch.long, device=dev)  # (T,)
        slots = self.slot_mapping(pos, table, seq, self.block_size)  # (T,)
        if not (isinstance(slots, torch.Tensor) and slots.shape == pos.shape and slots.dtype == torch.long):
            got = f"{tuple(slots.shape)} {slots.dtype}" if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise TypeError(f"engine.slot_mapping must return one flat slot per token, a ({len(ids)},) torch.long "
                            f"tensor, got {got}")
        self.runner.ensure_positions(max(positions) + 1)
        logits = self.runner.forward(torch.tensor(ids, dtype=torch.long, device=dev), pos, seq, slots, table,
                                     torch.tensor(logit_rows, dtype=torch.long, device=dev))  # (R, V)
        self.stats.forward_tokens += len(ids)
        for req, n in batch.items:
            req.num_computed_tokens += n
            self.block_manager.register_full_blocks(req)
        return logits, sampling, kinds

    @staticmethod
    def _sample(reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """Greedy rows by argmax in one call; each sampled row with its own filters and its own generator."""
        if not reqs:
            return []
        out = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(reqs):
            p = r.sampling
            if not p.greedy:
                filtered = transformers_filter(logits[i:i + 1], p.temperature, p.top_k, p.top_p)  # (1, V)
                probs = torch.softmax(filtered, dim=-1).cpu()
                out[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return out

    def _record(self, batch: ScheduledBatch, kinds: list[str], now: float) -> None:
        st = self.stats
        st.steps += 1
        rows = [(r.request_id, n, kind) for (r, n), kind in zip(batch.items, kinds, strict=True)]
        pre = sum(n for _, n, kind in rows if kind == "prefill")
        st.history.append(StepRecord(
            step=st.steps, time=now, num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.block_manager.num_free_blocks, num_used_blocks=self.block_manager.num_used_blocks,
            num_tokens=batch.num_tokens, prefill_tokens=pre, decode_tokens=batch.num_tokens - pre, requests=rows,
            preempted=[r.request_id for r in batch.preempted]))

    # ---- a whole workload ----
    def run(self, requests: Sequence[Request], arrivals: Sequence[float] | None = None, *,
            progress: bool = False) -> dict[str, RequestOutput]:
        """Serve ``requests``, each added when the clock reaches its arrival (seconds after the start; ``None``:
        all at once), and return every request's output by id. A request the engine refuses comes back with
        ``finish_reason="error"`` and the message; the others carry on. A refused request whose id another
        request holds (a duplicate) comes back under ``"<id>#<its index in requests>"``."""
        requests = list(requests)
        if arrivals is None:
            arrivals = [0.0] * len(requests)
        arrivals = [float(a) for a in arrivals]
        if len(arrivals) != len(requests):
            raise ValueError(f"arrivals must have one time per request: {len(requests)} requests, "
                             f"{len(arrivals)} arrival times")
        if any(not a >= 0 for a in arrivals):
            raise ValueError(f"arrival times must be seconds >= 0, got {min(arrivals)}")
        order = sorted(range(len(requests)), key=lambda i: arrivals[i])  # stable: ties keep their order
        results: dict[str, RequestOutput] = {}
        self.t0 = time.perf_counter()
        bar = progress_bar(total=len(requests), desc="requests", unit="req", disable=not progress)
        nxt = 0
        while nxt < len(order) or self.has_unfinished():
            now = self.now()
            while nxt < len(order) and arrivals[order[nxt]] <= now:
                req = requests[order[nxt]]
                nxt += 1
                try:
                    self.add_request(req, arrival_time=arrivals[order[nxt - 1]])
                except RequestError as e:
                    i = order[nxt - 1]
                    rid = getattr(req, "request_id", f"#{i}")
                    clash = rid in results or self.requests.get(rid) not in (None, req)
                    results[f"{rid}#{i}" if clash else rid] = _refused(req, e)
                    bar.update(1)
            if self.has_unfinished():
                for out in self.step():
                    results[out.request_id] = out
                    bar.update(1)
                if progress:
                    bar.set_postfix(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                                    free_blocks=self.block_manager.num_free_blocks, refresh=False)
            elif nxt < len(order):
                time.sleep(max(0.0, arrivals[order[nxt]] - self.now()))
        bar.close()
        return results


def _refused(req, err: Exception) -> RequestOutput:
    rid = getattr(req, "request_id", None)
    prompt = getattr(req, "prompt", [])
    return RequestOutput(request_id=rid, prompt=list(prompt) if isinstance(prompt, (list, tuple)) else [], tokens=[],
                         arrival_time=getattr(req, "arrival_time", 0.0), first_token_time=None, token_times=[],
                         finish_time=None, finish_reason="error", error=str(err))


__all__ = ["Engine", "EngineStats", "SamplingParams", "StepRecord"]
