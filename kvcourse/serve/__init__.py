"""A small serving engine on the course's model: continuous batching over a paged KV cache (notebook 09).

One idea a file, as nano-vllm's ``engine/`` (GeeeekExplorer/nano-vllm) splits it:

- ``request.py``: what a request is (prompt, ``max_new_tokens``, EOS, sampling) and what comes back;
- ``block_manager.py``: the block pool, reference counts, chained block hashes for the prefix cache, LRU
  eviction of cached free blocks, copy on write;
- ``scheduler.py``: one batch per step: FCFS admission under the KV budget, a token budget (chunked
  prefill), release, recompute preemption of the newest running request;
- ``attention.py``: paged attention that walks each sequence's blocks with an online softmax;
- ``model_runner.py``: one ragged forward pass over the step's tokens;
- ``engine.py``: ``Engine.add_request`` / ``step`` / ``run``.

References: Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP; arXiv:2309.06180); Yu et al. 2022, "Orca" (OSDI: iteration-level scheduling);
Agrawal et al. 2024, "Sarathi-Serve" (OSDI; arXiv:2403.02310: chunked prefill); nano-vllm.
"""

from __future__ import annotations

from .attention import attention_bytes, gather_attention, paged_attention, slot_mapping, write_kv
from .block_manager import BlockManager, block_hash, prefix_lookup
from .engine import Engine, EngineStats, StepRecord
from .request import Request, RequestError, RequestOutput, SamplingParams
from .scheduler import ScheduledBatch, Scheduler

__all__ = ["BlockManager", "Engine", "EngineStats", "Request", "RequestError", "RequestOutput", "SamplingParams",
           "ScheduledBatch", "Scheduler", "StepRecord", "attention_bytes", "block_hash", "gather_attention",
           "paged_attention", "prefix_lookup", "slot_mapping", "write_kv"]
