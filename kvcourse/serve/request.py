"""A request to the engine, its sampling settings, and what comes back.

A ``Request`` is a prompt (token ids), ``max_new_tokens``, optional EOS ids and ``SamplingParams``. While
it runs, the engine keeps its state here: the tokens generated so far, how many of its tokens the cache
holds (``num_computed_tokens``), its block table, and its timestamps. Its *known* tokens are the prompt
followed by what it generated: after a preemption, all of them are computed again (recompute), and the
next token follows the last one, so nothing already generated is lost or changed.

Sampling: greedy when ``temperature == 0`` (``argmax``), else ``transformers``' temperature / top-k / top-p
filters (``kvcourse.batching.transformers_filter``) and one draw from the request's own seeded
``torch.Generator``: a request draws once per generated token, whatever batch it lands in, so a seeded
request is reproducible.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..generate import normalize_eos


class RequestError(ValueError):
    """A request the engine cannot serve: the message names the request and the limit."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0``: greedy. Otherwise temperature, then top-k (0: off), then top-p (1: off), as
    ``transformers``' ``generate(do_sample=True)`` applies them; ``seed`` seeds the request's own generator."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise RequestError(f"temperature must be a number >= 0 (0: greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise RequestError(f"top_k must be an int >= 0 (0: no top-k), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise RequestError(f"top_p must be a number in (0, 1] (1: no top-p), got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RequestError(f"seed must be None or an int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Request:
    """One request. ``request_id`` must be unique among the engine's requests."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    eos_token_id: int | list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # ---- engine state (set by the engine) ----
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)  # generated tokens
    num_computed_tokens: int = 0  # known tokens whose K/V the cache holds
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # names of its full blocks, in order
    num_preemptions: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    eos_ids: frozenset[int] = frozenset()

    def check(self, vocab_size: int, kv_tokens: int) -> None:
        """Refuse what the engine cannot serve, naming this request and the limit (the engine calls it in
        ``add_request``; a refused request changes nothing). ``kv_tokens``: the whole pool, in tokens."""
        who = f"request {self.request_id!r}"
        if isinstance(self.prompt, torch.Tensor):
            if self.prompt.dim() == 2 and self.prompt.shape[0] == 1:
                self.prompt = self.prompt[0]
            if self.prompt.dim() != 1 or self.prompt.is_floating_point():
                raise RequestError(f"{who}: prompt must be a 1-D sequence of int token ids, "
                                   f"got a {tuple(self.prompt.shape)} {self.prompt.dtype} tensor")
            self.prompt = self.prompt.tolist()
        if not isinstance(self.prompt, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.prompt):
            raise RequestError(f"{who}: prompt must be a list of int token ids, got {type(self.prompt).__name__}")
        self.prompt = list(self.prompt)
        if not self.prompt:
            raise RequestError(f"{who}: the prompt is empty; a request needs at least one token (its logits give "
                               f"the first new token)")
        bad = [t for t in self.prompt if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"{who}: token ids must be in 0..{vocab_size - 1} (the model's vocabulary), "
                               f"got {bad[:5]}{' ...' if len(bad) > 5 else ''}")
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise RequestError(f"{who}: max_new_tokens must be an int >= 1, got {m!r}")
        if self.max_len > kv_tokens:
            raise RequestError(f"{who}: a prompt of {len(self.prompt)} tokens and max_new_tokens={m} need up to "
                               f"{self.max_len} tokens in the cache, but the whole KV budget holds {kv_tokens}: "
                               f"it could never finish")
        if not isinstance(self.sampling, SamplingParams):
            raise RequestError(f"{who}: sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        try:
            eos = normalize_eos(self.eos_token_id, vocab_size)
        except ValueError as e:
            raise RequestError(f"{who}: {e}") from None
        self.eos_ids = frozenset() if eos is None else frozenset(eos.tolist())
        if self.generator is None and not self.sampling.greedy:
            self.generator = torch.Generator()
            if self.sampling.seed is not None:
                self.generator.manual_seed(self.sampling.seed)
            else:
                self.generator.seed()

    # ---- token counts ----
    @property
    def tokens(self) -> list[int]:
        """The known tokens: prompt, then generated."""
        return self.prompt + self.output

    def token_slice(self, start: int, end: int) -> list[int]:
        """``tokens[start:end]`` without building the whole prompt + output list (the engine asks every step)."""
        p = len(self.prompt)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= p + len(self.output)):
            raise ValueError(f"request {self.request_id!r}: token_slice needs 0 <= start <= end <= {p + len(self.output)} "
                             f"(its known tokens), got start={start!r}, end={end!r}")
        if start >= p:
            return self.output[start - p:end - p]
        if end <= p:
            return self.prompt[start:end]
        return self.prompt[start:] + self.output[:end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def max_len(self) -> int:
        """The most tokens this request can ever hold in the cache (the last new token is never written)."""
        return len(self.prompt) + self.max_new_tokens - 1

    @property
    def is_prefill(self) -> bool:
        """More than one known token still to compute (a prompt, or a recompute after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1


@dataclass
class RequestOutput:
    """What the engine returns for one request. Times are seconds after the run's start (``perf_counter``)."""

    request_id: str
    prompt: list[int]
    tokens: list[int]
    arrival_time: float
    first_token_time: float | None
    token_times: list[float]
    finish_time: float | None
    finish_reason: str  # "eos", "length" or "error"
    error: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_times(self) -> list[float]:
        """The gaps between consecutive generated tokens (time per output token)."""
        return [b - a for a, b in zip(self.token_times[:-1], self.token_times[1:], strict=True)]

    @classmethod
    def from_request(cls, r: Request, error: str | None = None) -> RequestOutput:
        return cls(request_id=r.request_id, prompt=list(r.prompt), tokens=list(r.output),
                   arrival_time=r.arrival_time, first_token_time=r.first_token_time, token_times=list(r.token_times),
                   finish_time=r.finish_time, finish_reason=r.finish_reason or ("error" if error else "length"),
                   error=error, num_preemptions=r.num_preemptions, num_cached_tokens=r.num_cached_tokens)
