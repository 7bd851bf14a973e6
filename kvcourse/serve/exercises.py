"""Grading plumbing for notebook 09 (the serving engine): workloads, the oracle, hooks that run the engine on a
learner's answer, and recognisers for the likely mistakes, so the notebook's test cells stay short; and
``static_run``, notebook 06's static batching as the baseline of the notebook's first section.

Nothing here is an answer to an exercise. The references the graders compare with are the package's own
(``attention.slot_mapping``, ``attention.gather_attention``, ``block_manager.block_hash``, ``Scheduler``);
the ``*_variant`` functions compute what a *known mistake* gives, so a test can name it when the learner's
result equals it (a hint only from a check that recognised the mistake).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from ..generate import generate
from .block_manager import prefix_lookup
from .engine import Engine
from .request import Request, RequestOutput, SamplingParams
from .scheduler import Scheduler

__all__ = ["Spec", "workload", "shared_prefix_workload", "oracle", "run_engine", "token_mismatch",
           "slot_variants", "ragged_case", "attention_variant", "attention_hint", "largest_tensor",
           "ChunkedScheduler", "lockstep", "use_prefix_lookup", "reference_lookup", "counted", "static_run"]


# ---- workloads and the oracle ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """What a request is, before an engine mutates it: ``request()`` builds a fresh ``Request``."""

    request_id: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    seed: int | None = None  # None: greedy; an int: sampled at temperature 1 with this seed

    def request(self) -> Request:
        sampling = SamplingParams() if self.seed is None else SamplingParams(temperature=1.0, seed=self.seed)
        return Request(self.request_id, list(self.prompt), self.max_new_tokens, sampling=sampling)


def workload(n: int, seed: int, vocab_size: int, *, prompt_lens: tuple[int, int] = (3, 40),
             new_tokens: tuple[int, int] = (4, 16), prefix: Sequence[int] = ()) -> list[Spec]:
    """``n`` seeded greedy requests: prompts of random ids (``prefix`` first, if given), lengths uniform in the
    ranges. Prompts differ from their first token on (unless ``prefix``), so context matters to every output."""
    g = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(n):
        t = int(torch.randint(prompt_lens[0], prompt_lens[1] + 1, (), generator=g))
        m = int(torch.randint(new_tokens[0], new_tokens[1] + 1, (), generator=g))
        ids = torch.randint(0, vocab_size, (t,), generator=g).tolist()
        specs.append(Spec(f"r{i}", tuple(prefix) + tuple(ids), m))
    return specs


def shared_prefix_workload(n: int, seed: int, vocab_size: int, prefix_len: int, **kwargs) -> list[Spec]:
    """Half the requests (even ones) start with one shared ``prefix_len``-token system prompt."""
    g = torch.Generator().manual_seed(seed + 1000)
    prefix = torch.randint(0, vocab_size, (prefix_len,), generator=g).tolist()
    with_p = workload(n, seed, vocab_size, prefix=prefix, **kwargs)
    without = workload(n, seed + 1, vocab_size, **kwargs)
    return [with_p[i] if i % 2 == 0 else without[i] for i in range(n)]


_ORACLE: dict[tuple, list[int]] = {}


def oracle(model, specs: Sequence[Spec]) -> dict[str, list[int]]:
    """Greedy tokens of each request alone, by ``kvcourse.generate.generate`` (memoised by model and prompt)."""
    out = {}
    for s in specs:
        if s.seed is not None:
            raise ValueError(f"oracle: request {s.request_id!r} is sampled; the oracle is for greedy requests")
        key = (id(model), s.prompt, s.max_new_tokens)
        if key not in _ORACLE:
            ids = torch.tensor([list(s.prompt)])  # (1, T)
            _ORACLE[key] = generate(model, ids, s.max_new_tokens)[0, len(s.prompt):].tolist()
        out[s.request_id] = _ORACLE[key]
    return out


def counted(fn: Callable, calls: list) -> Callable:
    """``fn`` that appends 1 to ``calls`` at every call: proof that the engine used it."""

    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper


def run_engine(model, specs: Sequence[Spec], what: str, *, slot_mapping: Callable | None = None,
               attention: Callable | None = None, hash_fn: Callable | None = None, lookup: Callable | None = None,
               scheduler_cls: type[Scheduler] = Scheduler, max_steps: int = 5000,
               **engine_kwargs) -> tuple[Engine, dict[str, RequestOutput]]:
    """Run ``specs`` on a fresh engine with the given answers plugged in through the engine's hooks.

    An error inside becomes an ``AssertionError`` naming ``what`` (the learner's answer) and the error; a
    workload that has not finished after ``max_steps`` steps (a scheduler that never makes progress) too.
    """
    __tracebackhide__ = True
    engine = Engine(model, scheduler_cls=scheduler_cls, **engine_kwargs)
    if slot_mapping is not None:
        engine.slot_mapping = slot_mapping
    if attention is not None:
        engine.runner.attention = attention
    if hash_fn is not None:
        engine.block_manager.hash_fn = hash_fn
    if lookup is not None:
        use_prefix_lookup(engine, lookup)
    outs: dict[str, RequestOutput] = {}
    try:
        for s in specs:
            engine.add_request(s.request())
        while engine.has_unfinished():
            if engine.stats.steps >= max_steps:
                raise AssertionError(f"the engine ran {max_steps} steps with {what} and {len(engine.scheduler.waiting)} "
                                     f"requests still waiting, {len(engine.scheduler.running)} running: it makes no "
                                     f"progress")
            for o in engine.step():
                outs[o.request_id] = o
    except AssertionError:
        raise
    except Exception as err:  # noqa: BLE001 - the learner's error, reported with what was running
        raise AssertionError(f"the engine failed with {what} at step {engine.stats.steps + 1}: "
                             f"{type(err).__name__}: {err}") from None
    return engine, outs


def token_mismatch(outs: dict[str, RequestOutput], want: dict[str, list[int]]) -> str:
    """'' when every request's tokens equal the oracle's; else the first request and position that differ."""
    for rid, tokens in want.items():
        got = outs[rid].tokens if rid in outs else None
        if got is None:
            return f"request {rid!r} never finished"
        if got != tokens:
            i = next((j for j, (a, b) in enumerate(zip(got, tokens, strict=False)) if a != b), min(len(got), len(tokens)))
            return (f"request {rid!r} (prompt of {len(outs[rid].prompt)} tokens): generated token {i} is "
                    f"{got[i] if i < len(got) else 'missing'}, the model alone gives "
                    f"{tokens[i] if i < len(tokens) else 'nothing more'}")
    return ""


# ---- 1. slot mapping ---------------------------------------------------------------------------------------------
def slot_variants(positions: torch.Tensor, block_tables: torch.Tensor, seq_idx: torch.Tensor,
                  block_size: int) -> list[tuple[torch.Tensor, str]]:
    """What the usual slot-mapping mistakes give, each with the hint that names it."""
    p, t, s, bs = positions, block_tables, seq_idx, block_size
    col = (p // bs).clamp(max=t.shape[1] - 1)
    return [
        (t[s, col] * bs + p // bs, "the offset in a block is position % block_size, not position // block_size"),
        (t[s, (p % bs).clamp(max=t.shape[1] - 1)] * bs + p % bs,
         "the block COLUMN of a position is position // block_size (the offset is position % block_size)"),
        (t[0, col] * bs + p % bs, "each token reads its OWN sequence's table: block_tables[seq_idx[t]], not row 0"),
        (t[s, col] + p % bs, "a block's first slot is block * block_size: multiply the block id by block_size"),
        (t[s, col], "a slot is block * block_size + offset, not the block id alone"),
        (col * bs + p % bs, "look the block id up in the table: blocks are scattered in the pool, not in order"),
        (p, "look the block id up in the table: a position is not a slot"),
    ]


# ---- 2. paged attention ------------------------------------------------------------------------------------------
def ragged_case(seed: int, lens: Sequence[int], rows: Sequence[tuple[int, int]], *, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 8, block_size: int = 4, num_blocks: int = 40, grow: float = 1.5,
                dtype: torch.dtype = torch.float32) -> dict:
    """A random ragged step over a scattered pool.

    ``lens``: each sequence's length; ``rows``: (sequence, position) of each query row. Each sequence's blocks are
    scattered at random in the pool, its table padded with -1. Keys grow with their block column (``grow`` ** column),
    so the running max of the scores changes from block to block: an online softmax that forgets to rescale is
    visibly wrong.
    """
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    if sum(need) > num_blocks:
        raise ValueError(f"ragged_case: {sum(need)} blocks needed, the pool has {num_blocks}")
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need) + 1
    tables, start = [], 0
    for k in need:
        tables.append(perm[start:start + k] + [-1] * (width - k))
        start += k
    k_pool = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g)
    v_pool = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g)
    for seq_tbl in tables:  # scale each block by grow ** its column in that sequence
        for c, b in enumerate(seq_tbl):
            if b >= 0:
                k_pool[b] *= grow ** c
    seq_idx = torch.tensor([s for s, _ in rows])
    limits = torch.tensor([p + 1 for _, p in rows])
    for (s, p) in rows:
        if not 0 <= p < lens[s]:
            raise ValueError(f"ragged_case: row at position {p} of sequence {s}, whose length is {lens[s]}")
    q = torch.randn(len(rows), heads, head_dim, generator=g)
    return {"q": q.to(dtype), "k_pool": k_pool.to(dtype), "v_pool": v_pool.to(dtype),
            "block_tables": torch.tensor(tables), "seq_idx": seq_idx, "limits": limits, "scale": head_dim ** -0.5}


def attention_variant(case: dict, *, rescale_acc: bool = True, rescale_sum: bool = True, causal_shift: int = 0,
                      gqa: str = "interleave", self_only: bool = False, skip_partial: bool = False) -> torch.Tensor:
    """The block walk with one known mistake switched on (all defaults: the right answer)."""
    q, kp, vp = case["q"].float(), case["k_pool"].float(), case["v_pool"].float()
    tbl, seq, lim, scale = case["block_tables"], case["seq_idx"], case["limits"], case["scale"]
    t, h, d = q.shape
    kv, bs = kp.shape[1], kp.shape[2]
    g = h // kv
    qg = q.view(t, kv, g, d) if gqa == "interleave" else q.view(t, g, kv, d).transpose(1, 2)  # (T, KV, G, D)
    rows = tbl[seq].clamp(min=0)  # (T, M)
    m = torch.full((t, kv, g), float("-inf"))
    lsum, acc = torch.zeros(t, kv, g), torch.zeros(t, kv, g, d)
    columns = int(lim.max()) // bs if skip_partial else -(-int(lim.max()) // bs)  # skip_partial: full columns only
    for c in range(columns):  # the columns the longest row reaches, as the answer walks them
        k, v = kp[rows[:, c]], vp[rows[:, c]]  # (T, KV, bs, D)
        s = (qg @ k.transpose(-1, -2)) * scale  # (T, KV, G, bs)
        pos = c * bs + torch.arange(bs)
        hide = pos != (lim[:, None] - 1) if self_only else pos >= lim[:, None] + causal_shift
        s = s.masked_fill(hide[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new)  # NaN where a row's blocks so far were all masked, as the answer's would be
        p = torch.exp(s - m_new[..., None])
        lsum = (lsum * alpha if rescale_sum else lsum) + p.sum(-1)
        acc = (acc * alpha[..., None] if rescale_acc else acc) + p @ v
        m = m_new
    out = acc / lsum[..., None]
    if gqa != "interleave":
        return out.reshape(t, h, d)
    return out.view(t, h, d)


def attention_hint(got: torch.Tensor, case: dict) -> str:
    """The likely cause, when ``got`` equals what a known mistake gives; otherwise ''."""
    if not isinstance(got, torch.Tensor) or got.shape != case["q"].shape:
        return ""
    got = got.float()
    for kwargs, hint in [({"rescale_acc": False}, "when the running max grows, rescale the accumulator by "
                          "exp(m_old - m_new) before adding the new block"),
                         ({"rescale_sum": False}, "when the running max grows, rescale the running sum of "
                          "exponentials too, not only the accumulator"),
                         ({"rescale_acc": False, "rescale_sum": False}, "when the running max grows, rescale the "
                          "running sum and the accumulator by exp(m_old - m_new)"),
                         ({"causal_shift": 1}, "row t sees keys 0..limits[t]-1: mask positions >= limits[t]"),
                         ({"causal_shift": -1}, "row t sees keys 0..limits[t]-1, itself included: mask positions "
                          ">= limits[t]"),
                         ({"gqa": "modulo"}, "query head h reads KV head h // (H // KV): view q as (T, KV, H // KV, D)"),
                         ({"self_only": True}, "each row must attend to every earlier key of its sequence, not only "
                          "its own"),
                         ({"skip_partial": True}, "walk every block column a row reaches, its last, partly filled "
                          "block too: the rows whose keys end inside a block came out wrong")]:
        if torch.allclose(got, attention_variant(case, **kwargs), atol=1e-4, rtol=1e-4, equal_nan=True):
            return hint
    return ""


class _Largest(TorchFunctionMode):
    """Records the largest tensor any torch call returns, except views of the pools (they copy nothing)."""

    def __init__(self, pools: Sequence[torch.Tensor]):
        super().__init__()
        self.pool_storages = {p.untyped_storage().data_ptr() for p in pools}
        self.largest, self.where = 0, ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in self.pool_storages:
                if x.numel() > self.largest:
                    self.largest = x.numel()
                    self.where = f"{getattr(func, '__name__', str(func))} -> {tuple(x.shape)}"
        return out


def largest_tensor(fn: Callable, case: dict) -> tuple[torch.Tensor, int, str]:
    """Run ``fn(**case)`` and return (its result, the largest tensor it made (elements), which call made it)."""
    mode = _Largest([case["k_pool"], case["v_pool"]])
    with mode:
        out = fn(case["q"], case["k_pool"], case["v_pool"], case["block_tables"], case["seq_idx"], case["limits"],
                 case["scale"])
    return out, mode.largest, mode.where


# ---- 3. chunked prefill: the scheduler with a learner's chunk rule -----------------------------------------------
class ChunkedScheduler(Scheduler):
    """The package's scheduling (running first with preemption of the newest, then FCFS admission), with the
    number of tokens each request gets this step decided by ``self.chunk(req, budget)`` (notebook 09's answer)."""

    chunk: Callable[[Request, int], int] = staticmethod(lambda req, budget: min(req.num_tokens - req.num_computed_tokens, budget))

    def _n(self, req: Request, budget: int) -> int:
        n = self.chunk(req, budget)
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"num_new_tokens must return an int, got {type(n).__name__} for request {req.request_id!r}")
        left = req.num_tokens - req.num_computed_tokens
        if not 1 <= n <= left:
            raise ValueError(f"num_new_tokens gave {n} tokens to request {req.request_id!r}, which has {left} known "
                             f"tokens not yet computed ({req.num_computed_tokens} of {req.num_tokens} computed; "
                             f"budget left {budget})")
        return n

    def num_new_tokens(self, req: Request, budget: int) -> int:  # the package's hook: the learner's rule
        return self._n(req, budget)


# ---- 4. one scheduler step, in lockstep with the package's ------------------------------------------------------
def _state(engine: Engine) -> dict:
    st = engine.stats.history[-1] if engine.stats.history else None
    return {"items": [(rid, n) for rid, n, _ in st.requests] if st else [], "preempted": list(st.preempted) if st else [],
            "hits": engine.stats.prefix_hit_tokens, "free": engine.block_manager.num_free_blocks, "running": [r.request_id for r in engine.scheduler.running],
            "waiting": [r.request_id for r in engine.scheduler.waiting]}


def lockstep(model, specs: Sequence[Spec], scheduler_cls: type[Scheduler], max_steps: int = 2000,
             **engine_kwargs) -> tuple[str, str]:
    """Step an engine on ``scheduler_cls`` and one on the package's ``Scheduler`` side by side on the same requests.

    Returns ('', '') when every step schedules the same tokens, preempts the same requests and leaves the same
    free blocks and queues; else (what differed at the first step that differs, the likely cause or '').
    """
    __tracebackhide__ = True
    ref = Engine(model, **engine_kwargs)
    mine = Engine(model, scheduler_cls=scheduler_cls, **engine_kwargs)
    for s in specs:
        ref.add_request(s.request())
        mine.add_request(s.request())
    not_newest: list[str] = []  # victims that were not the newest running request when preempted
    learners_preempt = mine.scheduler._preempt

    def recorded_preempt(req, batch):
        running = mine.scheduler.running
        if running and req is not running[-1]:
            not_newest.append(req.request_id)
        return learners_preempt(req, batch)

    mine.scheduler._preempt = recorded_preempt  # this engine's scheduler only
    batches: list = []  # the learner's batch of the step being run (for the message when the engine fails)
    learners_schedule = mine.scheduler.schedule

    def recorded_schedule():
        batches[:] = [learners_schedule()]
        return batches[0]

    mine.scheduler.schedule = recorded_schedule
    newest_hint = "preempt the NEWEST running request (the last in self.running), not the oldest"
    done_ref: set[str] = set()
    done_mine: set[str] = set()
    for step in range(1, max_steps + 1):
        if not ref.has_unfinished() and not mine.has_unfinished():
            return "", ""
        done_ref |= {o.request_id for o in ref.step()} if ref.has_unfinished() else set()
        try:
            if not mine.has_unfinished():
                return (f"step {step}: your scheduler has no request left (running and waiting both empty) while the "
                        f"reference still has {len(ref.scheduler.running) + len(ref.scheduler.waiting)}",
                        "a request must stay in self.running until it finishes, or go back to self.waiting")
            done_mine |= {o.request_id for o in mine.step()}
        except Exception as err:  # noqa: BLE001 - reported with the step it happened in
            return (f"step {step}: the engine failed with your scheduler: {type(err).__name__}: {err}",
                    newest_hint if not_newest else _why_failed(err, batches[0] if batches else None, mine.scheduler))
        a, b = _state(mine), _state(ref)
        if a == b:
            continue
        where = f"step {step} (budget {engine_kwargs.get('max_num_batched_tokens')}, {engine_kwargs.get('num_blocks')} blocks)"
        diff, hint = _first_difference(a, b, where, engine_kwargs.get("max_num_seqs", 64))
        return diff, newest_hint if not_newest else hint
    return f"the workload did not finish in {max_steps} steps", ""


def _first_difference(a: dict, b: dict, where: str, max_num_seqs: int) -> tuple[str, str]:
    """What differs first between the learner's state ``a`` and the reference's ``b`` after a step, and a hint
    when the difference is one a known mistake makes."""
    if a["preempted"] != b["preempted"]:
        return f"{where}: your scheduler preempted {a['preempted']}, the reference preempted {b['preempted']}", ""
    if a["items"] != b["items"]:
        ids_a, ids_b = [i for i, _ in a["items"]], [i for i, _ in b["items"]]
        hint = ""
        if set(ids_a) > set(ids_b) and b["preempted"]:
            hint = "admit no waiting request in a step that preempted one (the pool is full)"
        elif len(a["running"]) > max_num_seqs:
            hint = "admit no more than max_num_seqs running requests"
        elif set(ids_a) > set(ids_b):
            extra = [i for i in ids_a if i not in ids_b]
            if any(r in b["waiting"][1:] for r in extra):
                hint = ("first come, first served: when the first waiting request does not fit, admit none "
                        "after it this step (stop, do not skip ahead)")
        return (f"{where}: your scheduler ran (request, tokens) {a['items']}, the reference {b['items']}", hint)
    if a["hits"] != b["hits"]:  # the same requests ran the same tokens: only the recorded hit can differ
        return (f"{where}: the engine counts {a['hits']} prompt tokens found in the prefix cache with your scheduler, "
                f"{b['hits']} with the reference", "an admitted request records its prefix hit: req.num_cached_tokens "
                "(the engine's stats.prefix_hit_tokens adds them up)")
    if a["free"] != b["free"]:
        hint = ("a finished request's blocks go back to the pool: call self.blocks.free(req) in finish"
                if a["free"] < b["free"] else "")
        return f"{where}: {a['free']} free blocks after the step, the reference has {b['free']}", hint
    if a["waiting"] != b["waiting"]:
        hint = ""
        if sorted(a["waiting"]) == sorted(b["waiting"]) and a["waiting"][-1:] == b["waiting"][:1]:
            hint = "a preempted request goes back to the FRONT of the waiting queue (appendleft)"
        return f"{where}: waiting queue {a['waiting']}, the reference's {b['waiting']}", hint
    return f"{where}: running {a['running']}, the reference's {b['running']}", ""


def _why_failed(err: Exception, batch=None, scheduler: Scheduler | None = None) -> str:
    """A hint when the engine's error is one a known mistake makes (``batch``: the learner's last batch, from the
    step that failed unless ``schedule`` itself raised; ``scheduler``: the learner's, as the error left it)."""
    text = str(err)
    if "nothing to run" in text:
        return ("the pool ran out of blocks: check that finish returns a finished request's blocks "
                "(self.blocks.free(req)) and that preemption frees the victim's")
    # room made for fewer tokens than the step computes: the engine refuses to name blocks it does not hold
    short = re.search(r"register_full_blocks: request '([^']*)' says \d+ tokens are computed, but its", text)
    if short and batch is not None:
        admitted = {r.request_id: r for r in batch.admitted}
        req = admitted.get(short.group(1))
        if req is not None and req.num_cached_tokens > 0:
            return ("a new request's tokens start at its prefix hit, not at 0: make room for its n tokens after the "
                    "hit (prepare_write's end counts from the start of the request)")
        if req is None:
            return ("prepare_write(req, end) takes the END of the tokens to make room for: the tokens already "
                    "computed plus this step's")
    # an end before the prefix hit: raised in schedule, while the request is admitted but still at the queue's head
    early = re.search(r"prepare_write: end must be an int in (\d+)\.\.\d+ \(from request '([^']*)'", text)
    if early and scheduler is not None and int(early.group(1)) > 0:
        head = scheduler.waiting[0] if scheduler.waiting else None
        if head is not None and head.request_id == early.group(2) and head.block_table:
            return ("a new request's tokens start at its prefix hit, not at 0: make room for its n tokens after the "
                    "hit (prepare_write's end counts from the start of the request)")
    return ""


# ---- 5. the prefix cache -----------------------------------------------------------------------------------------
def reference_lookup(bm, tokens: Sequence[int]) -> tuple[list[int], int]:
    """The package's prefix lookup: (cached leading blocks, prompt tokens served from them, at most len - 1)."""
    return prefix_lookup(bm, tokens)


def use_prefix_lookup(engine: Engine, lookup: Callable) -> None:
    """Make ``engine`` admit requests through ``lookup(block_manager, tokens) -> (blocks, cached_tokens)``.

    The learner's lookup becomes the block manager's ``lookup_fn``; the rest of admission (the pool check, the
    copy of a shared last block) is the package's ``BlockManager.can_admit``. The answer's result is checked
    before it is used, with a message in the notebook's words.
    """
    bm = engine.block_manager

    def checked(bm_, tokens):
        got = lookup(bm_, tokens)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise TypeError(f"cached_prefix must return (blocks, num_cached_tokens), got {type(got).__name__}")
        cached, hit = list(got[0]), got[1]
        if isinstance(hit, bool) or not isinstance(hit, int) or not 0 <= hit <= len(cached) * bm_.block_size:
            raise ValueError(f"cached_prefix returned {len(cached)} blocks and num_cached_tokens={hit!r}: expected an "
                             f"int in 0..{len(cached) * bm_.block_size}")
        if hit >= len(tokens):
            raise ValueError(f"cached_prefix says all {len(tokens)} tokens of a request are cached: nothing is left "
                             f"to compute, so no logits give its next token")
        return cached, hit

    bm.lookup_fn = checked


# ---- section 0: the static-batching baseline ---------------------------------------------------------------------
def static_run(model, specs: Sequence[Spec], kv_tokens: int, max_num_seqs: int) -> dict:
    """Serve ``specs`` (all arrived at time 0) as notebook 06 does: left-padded batches in arrival order, each run
    until its longest request is done. A batch of B rows reserves B x (longest prompt + most new tokens - 1) cache
    slots, which must fit ``kv_tokens``; at most ``max_num_seqs`` rows. Returns per request its first-token and
    finish times (seconds after the start), the batch sizes, the wall time, and the decode rows computed for
    requests that had already finished (wasted)."""
    t0 = time.perf_counter()
    ttft, finish, batches, wasted, i = {}, {}, [], 0, 0
    while i < len(specs):
        batch = [specs[i]]
        while i + len(batch) < len(specs) and len(batch) < max_num_seqs:
            nxt = batch + [specs[i + len(batch)]]
            need = len(nxt) * (max(len(s.prompt) for s in nxt) + max(s.max_new_tokens for s in nxt) - 1)
            if need > kv_tokens:
                break
            batch = nxt
        longest = max(len(s.prompt) for s in batch)
        n = max(s.max_new_tokens for s in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, s in enumerate(batch):
            ids[row, longest - len(s.prompt):] = torch.tensor(s.prompt)
            mask[row, longest - len(s.prompt):] = 1
        ticks: list[float] = []

        def tick(*_args, ticks=ticks) -> None:
            ticks.append(time.perf_counter() - t0)

        handle = model.register_forward_hook(tick)  # one forward pass per generated token
        try:
            generate(model, ids, n, attention_mask=mask)
        finally:
            handle.remove()
        for s in batch:
            ttft[s.request_id], finish[s.request_id] = ticks[0], ticks[s.max_new_tokens - 1]
        wasted += sum(n - s.max_new_tokens for s in batch)
        batches.append(len(batch))
        i += len(batch)
    return {"ttft": ttft, "finish": finish, "batches": batches, "seconds": time.perf_counter() - t0,
            "wasted_rows": wasted}
