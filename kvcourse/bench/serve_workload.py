"""The serving benchmark's workload: seeded, stated, natural text for the bundled model.

- **Arrivals**: a Poisson process at ``rate`` requests per second (exponential gaps, ``random.expovariate``).
- **Lengths**: each request's own prompt part and its number of new tokens are lognormal
  (``random.lognormvariate`` around a median, with a shape ``sigma``), rounded and clipped to ``[min, max]``.
- **Shared system prompt**: exactly half the requests (a seeded choice) start with the same system prompt of
  ``system_blocks`` whole blocks; a prefix cache can reuse it, a system without one recomputes it.
- **Text**: token ids of the bundled tokenizer, from ``kvcourse.bench.plan.LONG_TEXT`` (public-domain
  Shakespeare): the system prompt is the start of Sonnet 18, each request's own part a window of the Hamlet
  soliloquy at a seeded offset (wrapping around), so the bundled model reads the kind of text it was trained on.
  The ids are inside every benchmarked vocabulary (the SmolLM2 shapes have 49152 ids).

Every request asks for exactly its ``max_new_tokens`` (no EOS), so every system produces the same number of
tokens. The same spec and seed give the same workload (``random.Random(seed)`` only; nothing global).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass, field

from ..serve.plots import percentile  # one percentile for notebook 09's plots and the benchmark
from .plan import LONG_TEXT

SONNET_START = "Shall I compare thee"


@dataclass(frozen=True)
class WorkloadSpec:
    """What the workload is drawn from (every field is printed with the results)."""

    num_requests: int = 96
    # requests per second (Poisson). Above every system's capacity, so that the KV budget, not the arrivals, limits
    # how many run at once: at 40/s the engine kept up with the arrivals on the bundled model (requests waited in 3%
    # of its steps, and it finished 0.25 s after the last arrival), so its tokens/s measured the arrival rate
    rate: float = 100.0
    prompt_median: float = 48.0  # a request's own prompt part, tokens
    prompt_sigma: float = 0.6
    prompt_min: int = 8
    prompt_max: int = 192
    output_median: float = 32.0  # new tokens
    output_sigma: float = 0.5
    output_min: int = 4
    output_max: int = 96
    shared_fraction: float = 0.5  # requests that start with the system prompt
    system_blocks: int = 4  # system prompt length, in blocks
    block_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_requests", "prompt_min", "output_min", "system_blocks", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"WorkloadSpec.{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.rate, (int, float)) and math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"WorkloadSpec.rate must be a positive number of requests per second, got {self.rate!r}")
        if self.prompt_max < self.prompt_min or self.output_max < self.output_min:
            raise ValueError(f"WorkloadSpec: a max below its min (prompt {self.prompt_min}..{self.prompt_max}, "
                             f"output {self.output_min}..{self.output_max})")
        if not 0.0 <= self.shared_fraction <= 1.0:
            raise ValueError(f"WorkloadSpec.shared_fraction must be in [0, 1], got {self.shared_fraction!r}")

    @property
    def system_tokens(self) -> int:
        return self.system_blocks * self.block_size


@dataclass
class WorkloadRequest:
    """One request: ``prompt`` (system prompt, if shared, then its own part), ``max_new_tokens``, ``arrival``
    (seconds after the start)."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    arrival: float
    shared: bool


@dataclass
class Workload:
    spec: WorkloadSpec
    requests: list[WorkloadRequest]
    system_prompt: list[int] = field(default_factory=list)

    @property
    def arrivals(self) -> list[float]:
        return [r.arrival for r in self.requests]

    def max_len(self) -> int:
        """The most cache slots one request can need (prompt + new tokens - 1)."""
        return max(len(r.prompt) + r.max_new_tokens - 1 for r in self.requests)

    def stats(self) -> dict:
        """The stated figures: counts, lengths (min/median/p95/max/mean), arrival span, measured rate."""
        prompts = [len(r.prompt) for r in self.requests]
        outs = [r.max_new_tokens for r in self.requests]
        arr = self.arrivals
        span = arr[-1] - arr[0] if len(arr) > 1 else 0.0
        return {
            "num_requests": len(self.requests),
            "shared": sum(r.shared for r in self.requests),
            "system_prompt_tokens": len(self.system_prompt),
            "prompt_tokens": sum(prompts),
            "output_tokens": sum(outs),
            "prompt_len": _describe(prompts),
            "output_len": _describe(outs),
            "arrival_span_s": span,
            "measured_rate": (len(arr) - 1) / span if span > 0 else None,
            "spec": asdict(self.spec),
        }


def _describe(xs: list[int]) -> dict:
    s = sorted(xs)
    return {"min": s[0], "p50": statistics.median(s), "p95": percentile(s, 95), "max": s[-1],
            "mean": statistics.fmean(s)}


def text_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(Hamlet ids, Sonnet ids): LONG_TEXT split at the sonnet, each tokenized without special tokens."""
    cut = LONG_TEXT.index(SONNET_START)
    hamlet = tokenizer(LONG_TEXT[:cut], add_special_tokens=False).input_ids
    sonnet = tokenizer(LONG_TEXT[cut:], add_special_tokens=False).input_ids
    return list(hamlet), list(sonnet)


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


def make_workload(spec: WorkloadSpec, tokenizer) -> Workload:
    """Draw the workload of ``spec`` (seeded): see the module docstring."""
    hamlet, sonnet = text_tokens(tokenizer)
    reps = -(-spec.system_tokens // len(sonnet))
    system = (sonnet * reps)[:spec.system_tokens]
    rng = random.Random(spec.seed)
    n = spec.num_requests
    shared_ids = set(rng.sample(range(n), round(n * spec.shared_fraction)))
    t, reqs = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(spec.rate)
        own = _lognormal_int(rng, spec.prompt_median, spec.prompt_sigma, spec.prompt_min, spec.prompt_max)
        new = _lognormal_int(rng, spec.output_median, spec.output_sigma, spec.output_min, spec.output_max)
        start = rng.randrange(len(hamlet))
        part = [hamlet[(start + j) % len(hamlet)] for j in range(own)]
        shared = i in shared_ids
        reqs.append(WorkloadRequest(f"r{i}", (system + part) if shared else part, new, t, shared))
    return Workload(spec, reqs, system)
