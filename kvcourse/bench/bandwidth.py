"""The limit: memory bandwidth, the bytes a decode step must move, and the floor they set.

A decode step must read every weight once and the KV cache once, and does about two flops per
weight: it is limited by memory bandwidth, not arithmetic. The machine's copy bandwidth (a large
tensor copy, bytes read + written / time) is sampled in every timing round, next to the methods; the
*bandwidth floor* of a model is (weight bytes read per token + KV-cache bytes at the mean context) /
bandwidth, and each method's *fraction of the floor* is floor / its time per token.

With a batch of B rows a step still reads the weights once, but the KV cache of every row:
``step_bytes`` is weights + B x KV bytes per token x mean context. While the weights dominate, a step
costs about the same for 1 row as for 32, so tokens/s grows with B; once the arithmetic (2 flops per
weight per row) outgrows the bytes, the time per step rises above what its bytes explain: decode has
stopped being memory-bound. ``--batch-sweep`` measures that (``kvcourse.bench.harness.batch_sweep``).

``cache_update_costs`` times one token's cache update for the ``torch.cat`` cache against the
preallocated one, for the cache-update plot.
"""

from __future__ import annotations

import gc
import statistics
from pathlib import Path

import torch

from ..cache import ConcatKVCache, KVCache
from .measure import positive, timed


class Bandwidth:
    """Memory copy bandwidth: a ``mib`` MiB float32 tensor copied into another; (read + written bytes) / time.

    ``sample()`` is cheap (a few copies), so the benchmark takes one in every timing round: each model's
    floor then uses the bandwidth measured alongside it, not only at the start of a 10-minute run.
    A copy the clock cannot see (zero time) gives no sample rather than an infinite one.
    """

    def __init__(self, device: torch.device, mib: int):
        self.device, self.mib = device, mib
        self.src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)  # ones: pages really allocated
        self.dst = torch.empty_like(self.src)
        self.nbytes = self.src.numel() * self.src.element_size()
        self.dst.copy_(self.src)  # first touch of dst

    def _copy(self):
        self.dst.copy_(self.src)

    def _rate(self, fn, nbytes: int, repeats: int) -> list[float]:
        times = [timed(fn, self.device) for _ in range(repeats)]
        return [nbytes / t / 1e9 for t in times if positive(t, "copy time")[0] is not None]

    def sample(self, repeats: int = 3) -> list[float]:
        """GB/s of ``repeats`` copies (fewer if the clock did not advance)."""
        return self._rate(self._copy, 2 * self.nbytes, repeats)

    def measure(self, repeats: int = 5) -> dict:
        """Copy bandwidth, and read bandwidth (a sum over the tensor), medians of ``repeats`` (None if none)."""
        copy = self.sample(repeats)
        self.src.sum()
        read = self._rate(self.src.sum, self.nbytes, repeats)
        return {"tensor_mib": self.mib, "repeats": repeats,
                "copy_GBps": statistics.median(copy) if copy else None,
                "read_GBps": statistics.median(read) if read else None,
                "copy_samples_GBps": copy, "read_samples_GBps": read}


FITS_IN_CACHE = "fits in cache"


def last_level_cache_bytes(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the CPU's largest (last-level) cache from Linux's sysfs, or None where it cannot be read."""
    sizes = {}
    for index in sysfs.glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()  # e.g. "32768K"
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes[level] = int(text.rstrip("KMG")) * unit
        except (OSError, ValueError):
            continue
    return sizes[max(sizes)] if sizes else None


def cache_resident(step_bytes: float, device: torch.device, llc_bytes: int | None = None) -> str | None:
    """Why memory bandwidth sets no floor, or None where it does.

    On a CPU, a step whose bytes fit in the last-level cache (the bundled model: 9.6 MB, against 32 MiB on the
    course's test machines) reads them from that cache, not from DRAM, so a floor computed from the DRAM copy
    bandwidth is no floor: the figure is reported as "n/a: fits in cache", never as a fraction."""
    if device.type != "cpu":
        return None
    llc = last_level_cache_bytes() if llc_bytes is None else llc_bytes
    if not llc or step_bytes > llc:
        return None
    return (f"{FITS_IN_CACHE}: {step_bytes / 1e6:.1f} MB read per step, within the CPU's {llc / 2**20:.0f} MiB "
            f"last-level cache, so DRAM bandwidth sets no floor")


def weight_bytes_per_token(hf, batch: int = 1) -> int:
    """Bytes of weights one decode step reads: every matrix and norm once, plus ``batch`` embedding rows.

    With tied embeddings the lm_head *is* the embedding matrix, read in full once.
    """
    total = 0
    for name, p in hf.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.numel() * p.element_size()
    emb = hf.get_input_embeddings().weight
    if hf.config.tie_word_embeddings:
        total += emb.numel() * emb.element_size()  # the lm_head, once
    total += batch * emb.shape[1] * emb.element_size()  # the rows looked up
    return total


def cache_update_costs(lengths: list[int], dtype: torch.dtype, device: torch.device, reps: int = 10) -> dict:
    """Seconds for one token's cache update (all layers, K and V) at each cache length, SmolLM2-135M shape.

    ``ConcatKVCache`` copies the whole cache every update (cost grows with length); ``KVCache`` writes
    one slot in place (constant).
    """
    from ..shapes import get_shape

    s = get_shape("SmolLM2-135M")
    layers, kv, d = s.num_hidden_layers, s.num_key_value_heads, s.head_dim
    one = torch.randn(1, kv, 1, d, dtype=dtype, device=device)
    out = {"shape": s.name, "layers": layers, "kv_heads": kv, "head_dim": d, "lengths": lengths,
           "concat_ms": [], "prealloc_ms": [], "reps": reps}
    for length in lengths:
        past = torch.randn(1, kv, length, d, dtype=dtype, device=device)
        for key, cache in (("concat_ms", ConcatKVCache(layers)),
                           ("prealloc_ms", KVCache(layers, 1, kv, d, length + reps + 1, dtype=dtype, device=device))):
            for i in range(layers):
                cache.update(past, past, i)

            def step(cache=cache):
                for i in range(layers):
                    cache.update(one, one, i)

            step()  # warm-up (and one more token)
            times = [timed(step, device) for _ in range(reps)]
            out[key].append(statistics.median(times) * 1e3)
            del cache
        del past
        gc.collect()
    return out


def step_bytes(hf, dtype: torch.dtype, batch: int, mean_context: float) -> dict:
    """Bytes one decode step moves for ``batch`` rows at ``mean_context`` cached positions each:
    the weights once (plus one embedding row per row), and every row's KV cache."""
    from ..memory import kv_bytes_per_token

    weights = weight_bytes_per_token(hf, batch)
    kv = kv_bytes_per_token(hf.config, dtype)
    return {"weight_bytes": weights, "kv_bytes_per_token": kv, "kv_bytes": batch * kv * mean_context,
            "bytes": weights + batch * kv * mean_context}


MEMORY_BOUND_SLACK = 1.25  # a step may take up to 25% longer than its extra bytes explain and count as memory-bound


def memory_bound(points: list[dict]) -> list[bool | None]:
    """For each batch size: is its step still memory-bound, judged against batch 1?

    ``points``: dicts with ``bytes`` and ``decode_ms_per_token`` (the time of one step; None where
    missing), batch 1 first. A step is memory-bound while its time grew no more than
    ``MEMORY_BOUND_SLACK`` times what its extra bytes explain:
    t(B) / t(1) <= MEMORY_BOUND_SLACK x bytes(B) / bytes(1). None where a time is missing.
    """
    key = "decode_ms_per_token"
    base = points[0] if points else None
    if not base or base.get(key) is None:
        return [None] * len(points)
    return [None if p.get(key) is None else p[key] / base[key] <= MEMORY_BOUND_SLACK * p["bytes"] / base["bytes"]
            for p in points]
