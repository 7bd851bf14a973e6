"""The systems the serving benchmark runs, each on the same workload, KV budget and wall clock.

- ``static_hf``: **static batching** as notebook 06 does it, with ``transformers`` ``generate`` on left-padded
  batches taken in arrival order. When the model is free, the next batch is the requests that have arrived (at
  least the next one: it waits for it), as many as fit: a padded batch of B rows holds B x (longest prompt +
  most new tokens - 1) slots, which must fit the KV budget, and B <= ``max_num_seqs``. The batch runs until its
  longest request is done (``max_new_tokens`` of the batch = its largest); each request keeps its own count.
- ``static_course``: the same batches with the course's ``kvcourse.generate.generate`` (``attention_mask``).
- ``hf_cb``: ``transformers``' continuous batching: its ``ContinuousBatchingManager``
  (``model.init_continuous_batching``, what ``generate_batch`` drives), requests added at their arrival times,
  configured with the same KV budget as the engine (``hf_cb_config``: see docs/bench/serve.md for why its
  defaults are slow on a CPU).
- ``engine``: the course engine, ``kvcourse.serve.Engine.run(requests, arrivals=...)``.

Every system returns a ``SystemResult``: per request its tokens and the clock readings (seconds after the
run's start, ``time.perf_counter``) of its arrival, each generated token and its finish, plus peak blocks,
preemptions and prefix hits where the system has them (``None``: it has no such thing, with the reason).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..batching import pad_prompts
from .methods import _hf_streamer, _TickingModel
from .serve_workload import Workload

SYSTEMS: dict[str, str] = {
    "static_hf": "static batching (transformers generate, left-padded)",
    "static_course": "static batching (kvcourse.generate, left-padded)",
    "hf_cb": "transformers continuous batching (generate_batch's manager)",
    "engine": "course engine (kvcourse.serve)",
}


@dataclass
class Budget:
    """The shared limits: ``num_blocks`` x ``block_size`` KV slots (every layer), a per-step token budget
    (chunked prefill; static batching has none) and the most requests running at once."""

    num_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 256
    max_num_seqs: int = 64

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass
class RequestRecord:
    request_id: str
    arrival: float
    tokens: list[int]
    token_times: list[float]
    finish: float | None
    error: str | None = None

    @property
    def first_token(self) -> float | None:
        return self.token_times[0] if self.token_times else None


@dataclass
class SystemResult:
    name: str
    records: dict[str, RequestRecord]
    peak_blocks: int | None = None
    preemptions: int | None = None
    prefix_hit_rate: float | None = None
    steps: int | None = None
    config: dict = field(default_factory=dict)
    na: dict[str, str] = field(default_factory=dict)  # figure -> why it is n/a for this system
    notes: list[str] = field(default_factory=list)
    history: list | None = None  # the engine's per-step records


# ---- static batching ------------------------------------------------------------------------------------

def _next_batch(reqs, first: int, now: float, budget: Budget) -> list[int]:
    """Indices first, first+1, ... that have arrived by ``now`` (the first always taken) and fit the budget."""
    batch = [first]
    longest, most = len(reqs[first].prompt), reqs[first].max_new_tokens
    j = first + 1
    while j < len(reqs) and reqs[j].arrival <= now and len(batch) < budget.max_num_seqs:
        t, n = max(longest, len(reqs[j].prompt)), max(most, reqs[j].max_new_tokens)
        if (len(batch) + 1) * (t + n - 1) > budget.kv_tokens:
            break
        batch.append(j)
        longest, most = t, n
        j += 1
    return batch


def run_static(workload: Workload, budget: Budget, generate_batch: Callable, name: str) -> SystemResult:
    """Serve the workload with static batches; ``generate_batch(ids, mask, n, tick)`` -> (B, T + n) ids."""
    reqs = workload.requests
    records: dict[str, RequestRecord] = {}
    peak, batches = 0, []
    t0 = time.perf_counter()
    i = 0
    while i < len(reqs):
        now = time.perf_counter() - t0
        if reqs[i].arrival > now:
            time.sleep(reqs[i].arrival - now)
            now = time.perf_counter() - t0
        idx = _next_batch(reqs, i, now, budget)
        prompts = [reqs[j].prompt for j in idx]
        n = max(reqs[j].max_new_tokens for j in idx)
        ids, mask = pad_prompts(prompts, 0, side="left")  # notebook 06's padding
        ticks: list[float] = []

        def tick(ticks=ticks) -> None:
            ticks.append(time.perf_counter() - t0)

        out = generate_batch(ids, mask, n, tick)
        t = ids.shape[1]
        peak = max(peak, math.ceil(len(idx) * (t + n - 1) / budget.block_size))
        batches.append(len(idx))
        for row, j in enumerate(idx):
            r = reqs[j]
            k = r.max_new_tokens
            records[r.request_id] = RequestRecord(r.request_id, r.arrival, out[row, t:t + k].tolist(), ticks[:k],
                                                  ticks[k - 1] if len(ticks) >= k else None)
        i = idx[-1] + 1
    return SystemResult(
        name, records, peak_blocks=peak, preemptions=0, prefix_hit_rate=None, steps=None,
        config={"batches": len(batches), "batch_size_mean": sum(batches) / len(batches), "batch_size_max": max(batches)},
        na={"prefix_hit_rate": "no prefix cache: each batch recomputes its prompts"},
        notes=["peak blocks: the padded cache of the largest batch, B x (longest prompt + most new tokens - 1) slots, "
               "in blocks; preemptions: none (a batch runs to its end)"])


def hf_static_generate(hf) -> Callable:
    pad = hf.generation_config.pad_token_id or 0

    @torch.inference_mode()
    def gen(ids, mask, n, tick):
        return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=[], pad_token_id=pad, streamer=_hf_streamer(tick))

    return gen


def course_static_generate(llama) -> Callable:
    from ..generate import generate

    def gen(ids, mask, n, tick):
        return generate(_TickingModel(llama, tick), ids, n, attention_mask=mask)

    return gen


# ---- transformers continuous batching -------------------------------------------------------------------

def hf_cb_config(budget: Budget, **overrides):
    """``ContinuousBatchingConfig`` with the engine's budget: ``num_blocks`` blocks of ``page_size`` =
    ``block_size`` tokens, ``max_batch_tokens`` = the per-step token budget, ``max_requests_per_batch`` =
    ``max_num_seqs``, prefix sharing on. Left to its defaults on a CPU, it sizes the cache and a float mask
    (max_batch_tokens x (cache tokens + max_batch_tokens)) from the machine's RAM: see docs/bench/serve.md."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    kw = {"num_blocks": budget.num_blocks, "page_size": budget.block_size,
          "max_batch_tokens": budget.max_num_batched_tokens, "max_requests_per_batch": budget.max_num_seqs,
          "allow_block_sharing": True, "scheduler_type": "fifo", "use_cuda_graph": False}
    kw.update(overrides)
    return ContinuousBatchingConfig(**kw)


def run_hf_cb(hf, workload: Workload, budget: Budget, *, attn_implementation: str = "sdpa", timeout_s: float = 600.0,
              **overrides) -> SystemResult:
    """``transformers``' continuous batching on the workload, requests added at their arrival times."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching import requests as cb_requests

    original_attn = hf.config._attn_implementation
    if attn_implementation != original_attn:
        hf.set_attn_implementation(attn_implementation)
    gc = GenerationConfig(max_new_tokens=max(r.max_new_tokens for r in workload.requests), do_sample=False,
                          eos_token_id=-1, pad_token_id=hf.generation_config.pad_token_id or 0)
    cfg = hf_cb_config(budget, **overrides)
    manager = hf.init_continuous_batching(generation_config=gc, continuous_batching_config=cfg)
    counts = {"preempt": 0, "hit": 0, "prompt": 0, "steps": 0, "peak": 0}
    lock = threading.Lock()
    # one-off, untimed: the batch processor (cache, static tensors) is built before the clock starts
    with torch.inference_mode():
        manager.warmup()
    bp = manager.batch_processor
    cache = bp.cache
    orig_search, orig_update = cache.search_prefix_match, bp.update_batch
    orig_reset = cb_requests.RequestState.create_equivalent_initial_request

    searched: set[str] = set()

    def search(request_id, prompt_ids):
        n = orig_search(request_id, prompt_ids)
        with lock:
            if request_id not in searched:  # first admission only, as the engine counts (not a recompute)
                searched.add(request_id)
                counts["hit"] += n
        return n

    def update():
        orig_update()
        # blocks some request holds (a shared block once), as the engine counts: cached blocks that no request
        # holds are reusable, not used
        used = sum(len({b for table in ca.block_table.values() for b in table})
                   for ca in cache.cache_allocators.values())
        counts["steps"] += 1
        counts["peak"] = max(counts["peak"], used)

    def reset(self):
        counts["preempt"] += 1
        return orig_reset(self)

    cache.search_prefix_match, bp.update_batch = search, update
    cb_requests.RequestState.create_equivalent_initial_request = reset
    reqs = sorted(workload.requests, key=lambda r: r.arrival)
    results, errors = {}, []
    try:
        with torch.inference_mode():
            manager.start()
            t0 = time.perf_counter()
            i = 0
            while len(results) < len(reqs):
                now = time.perf_counter() - t0
                if now > timeout_s:
                    errors.append(f"timed out after {timeout_s:.0f} s with {len(results)} of {len(reqs)} done")
                    break
                while i < len(reqs) and reqs[i].arrival <= now:
                    r = reqs[i]
                    manager.add_request(r.prompt, request_id=r.request_id, max_new_tokens=r.max_new_tokens,
                                        record_timestamps=True, eos_token_id=-1)
                    i += 1
                wait = reqs[i].arrival - now if i < len(reqs) else 0.5
                out = manager.get_result(timeout=max(wait, 1e-4))
                if out is not None and out.is_finished():
                    results[out.request_id] = (out, time.perf_counter() - t0)
                elif out is None and not manager.is_running():
                    errors.append("the generation thread stopped")
                    break
    finally:
        manager.stop(block=True, timeout=30)
        cb_requests.RequestState.create_equivalent_initial_request = orig_reset
        if hf.config._attn_implementation != original_attn:
            hf.set_attn_implementation(original_attn)
    records = {}
    for r in workload.requests:
        got = results.get(r.request_id)
        if got is None:
            records[r.request_id] = RequestRecord(r.request_id, r.arrival, [], [], None, "no result")
            continue
        out, _seen = got
        times = [ts - t0 for ts in (out.timestamps or [])]
        records[r.request_id] = RequestRecord(r.request_id, r.arrival, list(out.generated_tokens), times,
                                              times[-1] if times else None, out.error)
    counts["prompt"] = sum(len(r.prompt) for r in workload.requests)
    return SystemResult(
        "hf_cb", records, peak_blocks=counts["peak"], preemptions=counts["preempt"],
        prefix_hit_rate=counts["hit"] / counts["prompt"] if counts["prompt"] else None, steps=counts["steps"],
        config={"attn_implementation": attn_implementation, "num_blocks": cache.num_blocks,
                "page_size": budget.block_size, "max_batch_tokens": cache.max_batch_tokens,
                "max_requests_per_batch": cfg.max_requests_per_batch, "scheduler": cfg.scheduler_type,
                "prefix_sharing": cache.use_prefix_sharing},
        notes=errors + ["preemptions: requests soft-reset (recomputed) by its offloading manager; prefix hits: "
                        "tokens its search_prefix_match returned at a request's first admission, over the prompt tokens"])


# ---- the course engine ----------------------------------------------------------------------------------

def run_engine(model, workload: Workload, budget: Budget, *, prefix_caching: bool = True) -> SystemResult:
    """``kvcourse.serve.Engine.run(requests, arrivals=...)`` on the workload."""
    from ..serve import Engine, Request

    eng = Engine(model, num_blocks=budget.num_blocks, block_size=budget.block_size,
                 max_num_batched_tokens=budget.max_num_batched_tokens, max_num_seqs=budget.max_num_seqs,
                 prefix_caching=prefix_caching)
    reqs = [Request(r.request_id, prompt=list(r.prompt), max_new_tokens=r.max_new_tokens, eos_token_id=None)
            for r in workload.requests]
    outs = eng.run(reqs, arrivals=workload.arrivals)
    records = {}
    for r in workload.requests:
        o = outs.get(r.request_id)
        if o is None:
            records[r.request_id] = RequestRecord(r.request_id, r.arrival, [], [], None, "no result")
        else:
            records[r.request_id] = RequestRecord(r.request_id, o.arrival_time, list(o.tokens), list(o.token_times),
                                                  o.finish_time, o.error)
    st = eng.stats
    return SystemResult(
        "engine", records, peak_blocks=st.peak_blocks_used, preemptions=st.preemptions,
        prefix_hit_rate=st.prefix_hit_rate if prefix_caching else None, steps=st.steps,
        config={"num_blocks": budget.num_blocks, "block_size": budget.block_size,
                "max_num_batched_tokens": budget.max_num_batched_tokens, "max_num_seqs": budget.max_num_seqs,
                "prefix_caching": prefix_caching, "forward_tokens": st.forward_tokens},
        na={} if prefix_caching else {"prefix_hit_rate": "prefix caching off"},
        history=st.history)


# ---- the oracle ------------------------------------------------------------------------------------------

def reference_tokens(llama, workload: Workload, ids: list[str] | None = None) -> dict[str, list[int]]:
    """Each request's greedy tokens from ``kvcourse.generate.generate`` on its prompt alone (the oracle)."""
    from ..generate import generate

    want = set(ids) if ids is not None else None
    ref = {}
    for r in workload.requests:
        if want is not None and r.request_id not in want:
            continue
        x = torch.tensor([r.prompt], dtype=torch.long)
        ref[r.request_id] = generate(llama, x, r.max_new_tokens)[0, len(r.prompt):].tolist()
    return ref


def token_mismatches(result: SystemResult, ref: dict[str, list[int]]) -> list[dict]:
    """One entry per checked request whose tokens differ from the reference: id, first differing index, both."""
    bad = []
    for rid, want in ref.items():
        got = result.records[rid].tokens
        if got != want:
            k = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            bad.append({"request_id": rid, "first_diff": k, "expected": want[k:k + 3], "got": got[k:k + 3],
                        "len_expected": len(want), "len_got": len(got)})
    return bad


# ---- why transformers' continuous batching is slow here with its defaults ----------------------------------

def hf_cb_setup_cost(hf, prompts: list[list[int]], max_new_tokens: int, cb_config=None) -> dict:
    """``transformers``' continuous batching on ``prompts`` (all at once, as ``generate_batch`` sends them), its
    set-up (cache and static tensors, ``manager.warmup()``) timed apart from the generation, with the sizes
    it chose: cache blocks, ``max_batch_tokens``, the float attention mask's shape and bytes, the forward
    passes and their time. ``cb_config=None``: its defaults (sized from the machine's RAM on a CPU)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1,
                          pad_token_id=hf.generation_config.pad_token_id or 0)
    fwd = {"n": 0, "s": 0.0}
    original_forward = hf.forward

    def counted(*args, **kwargs):
        t = time.perf_counter()
        out = original_forward(*args, **kwargs)
        fwd["n"] += 1
        fwd["s"] += time.perf_counter() - t
        return out

    with torch.inference_mode():
        t0 = time.perf_counter()
        manager = hf.init_continuous_batching(generation_config=gc,
                                              continuous_batching_config=cb_config or ContinuousBatchingConfig())
        manager.warmup()
        setup = time.perf_counter() - t0
        bp = manager.batch_processor
        masks = bp.inputs_and_outputs.attention_mask or {}
        sizes = {"num_blocks": bp.cache.num_blocks, "max_batch_tokens": bp.cache.max_batch_tokens,
                 "cache_bytes": bp.cache.cache_tensor.numel(),
                 "mask_shapes": {k: list(v.shape) for k, v in masks.items()},
                 "mask_bytes": sum(v.numel() * v.element_size() for v in masks.values()),
                 "max_requests_per_batch": bp.max_requests_per_batch if hasattr(bp, "max_requests_per_batch")
                 else None}
        hf.forward = counted
        try:
            t1 = time.perf_counter()
            manager.start()
            manager.add_requests(prompts, max_new_tokens=max_new_tokens)
            done = 0
            while done < len(prompts):
                out = manager.get_result(timeout=5)
                if out is None and not manager.is_running():
                    break
                done += out is not None and out.is_finished()
            generation = time.perf_counter() - t1
            manager.stop(block=True, timeout=30)
        finally:
            del hf.forward  # the instance attribute; the class's forward again
    return {"setup_s": setup, "generation_s": generation, "forwards": fwd["n"], "forward_s": fwd["s"],
            "tokens": len(prompts) * max_new_tokens, **sizes}
