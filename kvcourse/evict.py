"""Eviction by importance: caches that keep at most ``budget`` tokens per KV head (issue 25, part 2).

Three policies, each a small subclass of ``EvictingCache``:

- ``StreamingLLMCache``: the first ``sinks`` tokens (the "attention sinks") and the latest ``budget - sinks``
  (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453: "just 4 initial
  tokens sufficing", its introduction; kvpress' ``n_sink=4``). ``sinks=0`` is the window alone.
- ``H2OCache``: heavy hitters plus recent tokens (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle", arXiv:2306.14048,
  its greedy eviction as the authors' code runs it). Each kept token's score is the attention it received,
  summed over every query so far (prompt and generated); after every forward, once over budget, a head keeps
  its ``budget - heavy`` latest tokens and the ``heavy`` highest-scored older ones. The split follows the authors' code
  (FMInference/H2O, ``h2o_hf/utils_real_drop/modify_llama.py``: ``hh_size`` + ``recent_size``, scores accumulated
  as ``attn_weights.sum(0).sum(1)``, top-``hh_size`` of the non-recent tokens, sorted); the default is half and half,
  as llama-recipes' H2O recipe (``recipes/experimental/long_context/H2O/README.md``: "the number of local and
  heavy-hitter KV pairs equals to half of --num_window_length").
- ``SnapKVCache``: one compression after the prefill (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for
  Before Generation", arXiv:2404.14469: an "observation" window at the end of the prompt votes, per head, for
  clustered positions (its abstract); the steps below are the authors' ``SnapKVCluster.update_kv`` in
  FasterDecoding/SnapKV ``snapkv/monkeypatch/snapkv_utils.py``). The last ``window`` queries of the prompt vote:
  their attention weights over the prompt before the window are summed over those queries, pooled along the
  sequence (``avg`` or ``max``, ``kernel_size``, padding ``kernel_size // 2``, stride 1), and each head keeps its
  top ``budget - window`` prefix tokens plus the window itself. Only a prompt longer than ``budget`` is
  compressed; generated tokens are then appended, never evicted (the authors' code compresses in the prefill
  only), so after ``n`` generated tokens a head holds ``min(prompt, budget) + n``. Defaults ``window=32,
  kernel_size=5, pooling="avg"`` are the repository's ``init_snapkv`` defaults.

Design, shared by the three:

- **Original positions.** Keys are cached already rotated by RoPE at the position they were computed at, and
  ``get_seq_length()`` returns the number of tokens *seen*, not kept, so ``Llama.forward`` places a new token at
  its true position. ``kept_positions(layer)`` says, per head, which positions the cache holds, in order.
  StreamingLLM's paper assigns positions within the cache instead; kvpress' ``StreamingLLMPress`` keeps the
  original rotation and says that matching the paper needs its ``KeyRerotationPress`` (kvpress issue 158). The
  course keeps the original positions for all three policies, like kvpress.
- **Per-head selection.** Every KV head ranks its own tokens (``topk`` along the sequence axis of a
  (batch, kv_heads, seq) score), never over all heads at once; heads keep different tokens but the same count.
- **Attention weights come from the ``attn_fn`` hook.** ``Llama.forward(ids, cache, attn_fn=cache.attention)``:
  ``Attention`` calls ``cache.update`` and then ``attn_fn(q, k, v)`` with the KV heads repeated for GQA. The output
  is ``kvcourse.llama.sdpa_attention`` itself (bit-equal to the full cache while nothing was evicted); the weights
  are computed beside it only when the policy needs them, and the eviction happens right after, on the layer the
  last ``update`` touched. An ``update`` whose layer was never attended raises (the hook was not passed).
- **GQA.** A KV head serves ``num_heads // num_kv_heads`` query heads (``repeat_kv``'s order). H2O *sums* their
  weights (the authors' code targets multi-head attention, one score per query head; summing keeps "attention
  received" additive). SnapKV *averages* them after pooling, as kvpress does ("Average per group",
  FasterDecoding/SnapKV issue 22).

Where the course follows kvpress 0.5.5 (``presses/snapkv_press.py``, ``streaming_llm_press.py``,
``observed_attention_press.py``) and where it differs:

- SnapKV: same scores (kvpress averages over the window queries where the authors' code sums: the same ranking), same
  avg-pool and group mean; kvpress keeps the window by padding it with the maximum score and keeps its ``topk``
  indices unsorted, the course concatenates the window and sorts the kept positions. kvpress' default window is 64.
- StreamingLLM: kvpress prunes once, after the prefill, to a compression ratio; the course holds the budget at
  every step (the paper's rolling cache), with original positions in both.
- H2O: kvpress has no H2O press; its ``ObservedAttentionPress`` ("related to H2O") scores by the *average*
  attention a key received over the prompt and prunes once. The course follows H2O's own algorithm: sums, recent
  window protected, eviction after every forward including decode steps.

A padded batch (``attention_mask``) is refused: per-row positions and the kept-token mask are not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import _check_fits, _check_kv, _check_layer, _check_same_kind, _check_sizes
from .llama import causal_mask, sdpa_attention

__all__ = ["EvictingCache", "StreamingLLMCache", "H2OCache", "SnapKVCache", "attention_weights",
           "evict_generate", "measure_retrieval", "format_table"]


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax weights (B, H, Tq, Tk) in float32 of queries q (B, H, Tq, D) over keys k (B, H, Tk, D).

    The queries are the last Tq of the Tk positions (``causal_mask``); scale 1/sqrt(D), as in
    ``scaled_dot_product_attention``.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention_weights expects q (B, H, Tq, D) and k (B, H, Tk, D) with the same B, H, D, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    allowed = causal_mask(q.shape[2], k.shape[2], q.device)  # (Tq, Tk)
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # (B, H, Tq, Tk)


class EvictingCache:
    """Per layer, the kept keys/values (B, KV, n, D), their original positions (B, KV, n), and a score (B, KV, n).

    Subclasses choose what to keep (``_select``) and whether they need attention weights (``_wants_weights``).
    Use it through the hook: ``model(ids, cache, attn_fn=cache.attention)`` (``evict_generate`` does).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, budget: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        _check_sizes(num_layers=num_layers, batch_size=batch_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     budget=budget)
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.budget, self.dtype, self.device = budget, dtype, torch.device(device)
        self.reset()

    @classmethod
    def for_model(cls, model, batch_size: int, budget: int, **kw) -> EvictingCache:
        """Size a cache for a ``kvcourse.llama.Llama`` (its layers, KV heads, head_dim, dtype and device)."""
        a = getattr(model, "args", None)
        if a is None:
            raise TypeError(f"{cls.__name__}.for_model expects a kvcourse.llama.Llama (Llama.from_hf(model)), got "
                            f"{type(model).__name__}: the eviction caches use Llama's attn_fn hook")
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("device", p.device)
        return cls(a.num_layers, batch_size, a.num_kv_heads, a.head_dim, budget, **kw)

    # ---- the transformers-style API -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every token."""
        n = self.num_layers
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.positions: list[torch.Tensor | None] = [None] * n  # (B, KV, n) long: original positions, in order
        self.scores: list[torch.Tensor | None] = [None] * n  # (B, KV, n) float32: the policy's score (H2O)
        self.lengths = [0] * n  # tokens seen per layer: the position of the next one
        self._pending: tuple[int, int, int] | None = None  # (layer, new tokens, keys returned) awaiting attention
        self._undo: tuple | None = None  # the layer's state before that update, restored if attention refuses

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (the position of the next one), not the number kept."""
        _check_layer(layer_idx, self.num_layers)
        return self.lengths[layer_idx]

    def kept_length(self, layer_idx: int = 0) -> int:
        """Tokens each KV head of ``layer_idx`` holds now."""
        _check_layer(layer_idx, self.num_layers)
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    def kept_positions(self, layer_idx: int = 0) -> torch.Tensor:
        """(B, KV, n) long: the original positions each head of ``layer_idx`` holds, ascending (a copy)."""
        _check_layer(layer_idx, self.num_layers)
        p = self.positions[layer_idx]
        return torch.empty(self.batch_size, self.num_kv_heads, 0, dtype=torch.long) if p is None else p.clone()

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value (B, KV, T, D), rotated at positions seen..seen+T-1; return kept + new (B, KV, n + T, D).

        Eviction waits for ``attention`` (the hook), which needs these keys and sees the weights.
        """
        _check_kv(key, value, layer_idx, self.num_layers)
        if self._pending is not None:
            raise RuntimeError(
                f"{type(self).__name__}: layer {self._pending[0]} was updated but its attention never went through "
                f"cache.attention, so nothing was scored or evicted; call the model as "
                f"model(ids, cache, attn_fn=cache.attention) (or use kvcourse.evict.evict_generate)")
        shape = (self.batch_size, self.num_kv_heads, 1, self.head_dim)
        ref = self.keys[layer_idx]
        if ref is None:
            ref = torch.empty(shape, dtype=self.dtype, device=self.device)
        _check_fits(key, ref, layer_idx)
        _check_same_kind(key, ref, layer_idx)
        b, kv, t, _ = key.shape
        seen = self.lengths[layer_idx]
        new_pos = torch.arange(seen, seen + t, device=key.device).expand(b, kv, t)  # (B, KV, T)
        if self.keys[layer_idx] is None:
            keys, values, pos = key, value, new_pos.clone()
            scores = torch.zeros(b, kv, t, device=key.device)
        else:
            keys = torch.cat([self.keys[layer_idx], key], dim=2)  # (B, KV, n + T, D)
            values = torch.cat([self.values[layer_idx], value], dim=2)
            pos = torch.cat([self.positions[layer_idx], new_pos], dim=2)  # (B, KV, n + T)
            scores = torch.cat([self.scores[layer_idx], torch.zeros(b, kv, t, device=key.device)], dim=2)
        self._undo = (self.keys[layer_idx], self.values[layer_idx], self.positions[layer_idx],
                      self.scores[layer_idx], seen)  # nothing below is written in place: these stay valid
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        self.positions[layer_idx], self.scores[layer_idx] = pos, scores
        self.lengths[layer_idx] = seen + t
        self._pending = (layer_idx, t, keys.shape[2])
        return keys, values

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        """The ``attn_fn`` hook: ``sdpa_attention(q, k, v)`` (B, H, T, D), then score and evict the layer just updated.

        A refused call also takes back the ``update`` it belonged to, so the cache is as before that forward's layer.
        """
        if mask is not None:
            self._rollback()
            raise ValueError(f"{type(self).__name__} does not take a padded batch (attention_mask): every row must be "
                             f"real tokens, as kept positions are per head, not per padded row")
        if self._pending is None:
            raise RuntimeError(f"{type(self).__name__}.attention was called without a cache.update before it: pass "
                               f"the cache and the hook together, model(ids, cache, attn_fn=cache.attention)")
        layer, t, n = self._pending
        rep = q.shape[1] // self.num_kv_heads if q.dim() == 4 else 0
        if (q.dim() != 4 or k.shape[2] != n or q.shape[2] != t or rep < 1 or q.shape[1] != rep * self.num_kv_heads
                or k.shape[1] != q.shape[1]):
            self._rollback()
            raise ValueError(f"{type(self).__name__}.attention expects q (B, H, {t}, D) and k, v repeated to H heads "
                             f"with the {n} keys update returned for layer {layer}, H a multiple of "
                             f"{self.num_kv_heads}; got q {tuple(q.shape)}, k {tuple(k.shape)}")
        y = sdpa_attention(q, k, v)  # (B, H, T, D): what the full cache would compute on these keys
        weights = None
        if self._wants_weights(layer, t):
            w = attention_weights(q, k)  # (B, H, T, n)
            weights = w.view(q.shape[0], self.num_kv_heads, rep, t, n)  # (B, KV, rep, T, n): repeat_kv's order
        keep = self._select(layer, t, weights)  # (B, KV, m) ascending indices, or None
        self._pending = self._undo = None
        if keep is not None:
            self._keep(layer, keep)
        return y

    def _rollback(self) -> None:
        if self._pending is not None and self._undo is not None:
            layer = self._pending[0]
            (self.keys[layer], self.values[layer], self.positions[layer], self.scores[layer],
             self.lengths[layer]) = self._undo
        self._pending = self._undo = None

    # ---- policy ---------------------------------------------------------------------------------------
    def _wants_weights(self, layer: int, t: int) -> bool:
        return False

    def _select(self, layer: int, t: int, weights: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError

    def _keep(self, layer: int, idx: torch.Tensor) -> None:
        """Keep the entries ``idx`` (B, KV, m) of every per-token tensor of ``layer`` (per head)."""
        idx4 = idx[..., None].expand(*idx.shape, self.head_dim)  # (B, KV, m, D)
        self.keys[layer] = self.keys[layer].gather(2, idx4)  # (B, KV, m, D)
        self.values[layer] = self.values[layer].gather(2, idx4)
        self.positions[layer] = self.positions[layer].gather(2, idx)  # (B, KV, m)
        self.scores[layer] = self.scores[layer].gather(2, idx)

    def _index(self, *parts: torch.Tensor) -> torch.Tensor:
        """Concatenate index parts along the last axis and broadcast to (B, KV, m)."""
        parts = [p.expand(self.batch_size, self.num_kv_heads, -1) for p in parts]
        return torch.cat(parts, dim=-1)

    def nbytes(self) -> int:
        """Bytes of the kept keys and values now (what eviction saves)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class StreamingLLMCache(EvictingCache):
    """The first ``sinks`` tokens and the latest ``budget - sinks``, after every forward (``sinks=0``: a window)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, budget: int,
                 *, sinks: int = 4, **kw):
        _check_sizes(budget=budget)
        _check_int("sinks", sinks, 0, budget - 1)  # at least one recent slot: the newest token is always kept
        self.sinks = sinks
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, budget, **kw)

    def _select(self, layer, t, weights):
        n = self.keys[layer].shape[2]
        if n <= self.budget:
            return None
        dev = self.keys[layer].device
        # The sinks are never evicted, so once held they stay the first `sinks` entries of every head.
        return self._index(torch.arange(self.sinks, device=dev), torch.arange(n - (self.budget - self.sinks), n,
                                                                                 device=dev))


class H2OCache(EvictingCache):
    """Accumulated attention (summed over queries and a KV head's query heads); ``heavy`` hitters + recent."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, budget: int,
                 *, heavy: int | None = None, **kw):
        _check_sizes(budget=budget)
        heavy = budget // 2 if heavy is None else heavy
        _check_int("heavy", heavy, 0, budget)
        self.heavy, self.recent = heavy, budget - heavy
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, budget, **kw)

    def _wants_weights(self, layer, t):
        return True

    def _select(self, layer, t, weights):
        self.scores[layer] = self.scores[layer] + weights.sum(dim=(2, 3))  # (B, KV, n): + sum over rep and queries
        n = self.scores[layer].shape[2]
        if n <= self.budget:
            return None
        older = self.scores[layer][..., : n - self.recent]  # (B, KV, n - recent): candidates for heavy hitters
        top = older.topk(self.heavy, dim=-1).indices.sort(dim=-1).values  # (B, KV, heavy), per head
        recent = torch.arange(n - self.recent, n, device=top.device)
        return torch.cat([top, recent.expand(*top.shape[:2], -1)], dim=-1)  # (B, KV, budget), ascending


class SnapKVCache(EvictingCache):
    """One compression after the prefill: the window's pooled votes, top ``budget - window`` per head + the window."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, budget: int,
                 *, window: int = 32, kernel_size: int = 5, pooling: str = "avg", **kw):
        _check_sizes(budget=budget)
        _check_int("window", window, 1, budget - 1)  # budget - window prompt tokens are chosen by vote: >= 1
        _check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (padding kernel_size // 2 keeps the length), got {kernel_size}")
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max' (SnapKV's avgpool/maxpool), got {pooling!r}")
        self.window, self.kernel_size, self.pooling = window, kernel_size, pooling
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, budget, **kw)

    def _compresses(self, layer: int, t: int) -> bool:
        return self.lengths[layer] == t and t > self.budget  # the prefill, and only a prompt over budget

    def _wants_weights(self, layer, t):
        return self._compresses(layer, t)

    def votes(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, KV, T - window) pooled votes from prefill weights (B, KV, rep, T, T): SnapKV's scores per KV head."""
        if not isinstance(weights, torch.Tensor) or weights.dim() != 5 or weights.shape[1] != self.num_kv_heads \
                or weights.shape[3] != weights.shape[4] or weights.shape[3] <= self.window:
            got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"SnapKVCache.votes expects prefill weights (batch, kv_heads={self.num_kv_heads}, "
                             f"group, T, T) with T > window={self.window}, got {got}")
        b, kv, rep, t, _ = weights.shape
        w = self.window
        vote = weights[:, :, :, t - w:, : t - w].sum(dim=3)  # (B, KV, rep, T - w): the last w queries, prefix keys
        vote = vote.reshape(b, kv * rep, t - w)  # (B, H, T - w)
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        pad = self.kernel_size // 2
        vote = pool(vote, kernel_size=self.kernel_size, stride=1, padding=pad)  # (B, H, T - w): neighbours count
        return vote.view(b, kv, rep, t - w).mean(dim=2)  # (B, KV, T - w): average over the group

    def _select(self, layer, t, weights):
        if weights is None:
            return None
        vote = self.votes(weights)  # (B, KV, T - w)
        self.scores[layer][..., : t - self.window] = vote
        top = vote.topk(self.budget - self.window, dim=-1).indices.sort(dim=-1).values  # (B, KV, budget - w)
        window = torch.arange(t - self.window, t, device=top.device)
        return torch.cat([top, window.expand(*top.shape[:2], -1)], dim=-1)  # (B, KV, budget), ascending


# ---- running and measuring ------------------------------------------------------------------------------


def evict_generate(model, input_ids: torch.Tensor, cache: EvictingCache, max_new_tokens: int,
                   forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (B, max_new_tokens) and their logits (B, max_new_tokens, vocab) with an evicting cache.

    One prefill, then one token per forward, every forward through ``attn_fn=cache.attention``. ``forced``
    (B, max_new_tokens - 1): feed these tokens instead of the argmax (teacher forcing, to compare logits step by step).
    """
    if not isinstance(cache, EvictingCache):
        raise TypeError(f"evict_generate takes an EvictingCache (StreamingLLMCache, H2OCache, SnapKVCache), got "
                        f"{type(cache).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seq) torch.long tensor, got {got}")
    _check_int("max_new_tokens", max_new_tokens, 1)
    if forced is not None and (not isinstance(forced, torch.Tensor)
                               or forced.shape != (input_ids.shape[0], max_new_tokens - 1)):
        got = tuple(forced.shape) if isinstance(forced, torch.Tensor) else type(forced).__name__
        raise ValueError(f"forced must be (batch, max_new_tokens - 1) = {(input_ids.shape[0], max_new_tokens - 1)}, "
                         f"got {got}")
    if cache.get_seq_length() != 0:
        raise ValueError(f"evict_generate needs an empty cache (it holds {cache.get_seq_length()} tokens): reset() it")
    tokens, logits = [], []
    with torch.no_grad():
        step = model(input_ids, cache, attn_fn=cache.attention, last_only=True)[:, -1]  # (B, vocab)
        for i in range(max_new_tokens):
            logits.append(step)
            tokens.append(step.argmax(-1))
            if i + 1 == max_new_tokens:
                break
            nxt = tokens[-1] if forced is None else forced[:, i]
            step = model(nxt[:, None], cache, attn_fn=cache.attention)[:, -1]
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)


# A held-out passage (Macbeth is in kvcourse.train.VAL_WORKS: the bundled model never trained on it), Act 1 scene 3
# and Act 5 scene 5, public domain.
MACBETH = """BANQUO. How far is't call'd to Forres? What are these
So wither'd and so wild in their attire,
That look not like the inhabitants o' the earth,
And yet are on't? Live you? or are you aught
That man may question? You seem to understand me,
By each at once her chappy finger laying
Upon her skinny lips: you should be women,
And yet your beards forbid me to interpret
That you are so.
MACBETH. Speak, if you can: what are you?
FIRST WITCH. All hail, Macbeth! hail to thee, thane of Glamis!
SECOND WITCH. All hail, Macbeth! hail to thee, thane of Cawdor!
THIRD WITCH. All hail, Macbeth, that shalt be king hereafter!
BANQUO. Good sir, why do you start; and seem to fear
Things that do sound so fair? I' the name of truth,
Are ye fantastical, or that indeed
Which outwardly ye show? My noble partner
You greet with present grace and great prediction
Of noble having and of royal hope,
That he seems rapt withal: to me you speak not.
If you can look into the seeds of time,
And say which grain will grow and which will not,
Speak then to me, who neither beg nor fear
Your favours nor your hate.
MACBETH. She should have died hereafter;
There would have been a time for such a word.
To-morrow, and to-morrow, and to-morrow,
Creeps in this petty pace from day to day,
To the last syllable of recorded time;
And all our yesterdays have lighted fools
The way to dusty death. Out, out, brief candle!
Life's but a walking shadow, a poor player,
That struts and frets his hour upon the stage,
And then is heard no more. It is a tale
Told by an idiot, full of sound and fury,
Signifying nothing.
"""

SECRETS = ("gold", "France", "Rome", "crown", "sword", "horse", "Brutus")


def _policy(name: str, model, budget: int) -> EvictingCache | None:
    if name == "full":
        return None
    if name == "window":
        return StreamingLLMCache.for_model(model, 1, budget, sinks=0)
    if name == "streamingllm":
        return StreamingLLMCache.for_model(model, 1, budget, sinks=min(4, budget - 1))
    if name == "h2o":
        return H2OCache.for_model(model, 1, budget)
    if name == "snapkv":
        return SnapKVCache.for_model(model, 1, budget, window=min(32, budget // 2))
    raise ValueError(f"unknown policy {name!r}: expected full, window, streamingllm, h2o or snapkv")


def measure_retrieval(model=None, tokenizer=None, *, budgets=(32, 64, 128, 256),
                      policies=("window", "streamingllm", "h2o", "snapkv"), secrets=SECRETS, filler: str = MACBETH,
                      new_tokens: int = 16) -> list[dict]:
    """Retrieval from Shakespeare under eviction, one row per (policy, budget), plus the full cache's row.

    Prompt: ``"The password is {secret}.\\n" + filler + "\\nThe password is"``; the answer is the secret's token.
    Per row, over the secrets: ``retrieval`` (share of prompts whose first greedy token is the secret),
    ``agreement`` (share of the full cache's ``new_tokens`` greedy tokens that the policy's argmax equals, fed
    the full cache's tokens), ``max_logit_err`` and ``mean_logit_err`` (|policy - full| over those steps).
    No timing. Defaults to the bundled model (``load_model()``, fp32 CPU). That model was trained on 256-token
    blocks (``kvcourse/bard/training.json``), so the default prompt (585 tokens with ``MACBETH``) runs past the
    positions it has seen, full cache included; a shorter ``filler`` stays inside them. Measured once (issue 25's
    report): it retrieves no secret at all, not even with the full cache and no filler (the model copies nothing
    from its context), so only agreement and logit error tell the policies apart.
    """
    from .llama import Llama
    from .models import load_model

    known = ("full", "window", "streamingllm", "h2o", "snapkv")
    bad = [p for p in policies if p not in known]
    if bad:
        raise ValueError(f"measure_retrieval: unknown policies {bad}; expected some of {', '.join(known)}")
    for b in budgets:
        _check_int("each budget", b, 2)
    if model is not None and tokenizer is None:
        raise ValueError("measure_retrieval: a model given needs its tokenizer too (tokenizer=...); with neither, "
                         "the bundled model and its tokenizer are loaded")
    if model is None:
        model, tokenizer = load_model(device="cpu")
    llama = model if isinstance(model, Llama) else Llama.from_hf(model)
    rows, prompts = [], []
    for s in secrets:
        sid = tokenizer(" " + s, add_special_tokens=False).input_ids
        if len(sid) != 1:
            raise ValueError(f"secret {s!r} is {len(sid)} tokens for this tokenizer; retrieval scores one token")
        text = f"The password is {s}.\n{filler}\nThe password is"
        prompts.append((torch.tensor([tokenizer(text, add_special_tokens=False).input_ids]), sid[0]))
    ref = []
    for ids, _ in prompts:
        ref.append(evict_generate(llama, ids, _FullCache(llama), new_tokens))
    rows.append(_row("full", None, prompts, ref, ref))
    for budget in budgets:
        for name in policies:
            got = []
            for (ids, _), (toks, _) in zip(prompts, ref, strict=True):
                got.append(evict_generate(llama, ids, _policy(name, llama, budget), new_tokens, forced=toks[:, :-1]))
            rows.append(_row(name, budget, prompts, got, ref))
    return rows


class _FullCache(EvictingCache):
    """Never evicts: the reference, run through the same hook and code path."""

    def __init__(self, model):
        a = model.args
        super().__init__(a.num_layers, 1, a.num_kv_heads, a.head_dim, 10**9, dtype=model.dtype, device=model.device)

    def _select(self, layer, t, weights):
        return None


def _row(name, budget, prompts, got, ref) -> dict:
    hits = [int(toks[0, 0]) == sid for (_, sid), (toks, _) in zip(prompts, got, strict=True)]
    # agreement: the policy's argmax against the full cache's tokens, step by step (both fed the full cache's tokens)
    agree = torch.cat([(g[1].argmax(-1) == r[0]).flatten() for g, r in zip(got, ref, strict=True)]).float()
    err = torch.cat([(g[1] - r[1]).abs().amax(-1).flatten() for g, r in zip(got, ref, strict=True)])
    return {"policy": name, "budget": budget, "prompt_tokens": int(prompts[0][0].shape[1]),
            "retrieval": sum(hits) / len(hits), "agreement": float(agree.mean()),
            "max_logit_err": float(err.max()), "mean_logit_err": float(err.mean())}


def format_table(rows: list[dict]) -> str:
    """A markdown table of ``measure_retrieval``'s rows."""
    need = ("policy", "budget", "retrieval", "agreement", "max_logit_err", "mean_logit_err")
    for r in rows:
        if not isinstance(r, dict) or any(k not in r for k in need):
            raise ValueError(f"format_table takes measure_retrieval's rows, dicts with keys {', '.join(need)}; got "
                             f"{r if not isinstance(r, dict) else sorted(r)}")
    head = "| policy | budget | retrieval | agreement | max logit err | mean logit err |\n|---|---|---|---|---|---|"
    lines = [f"| {r['policy']} | {r['budget'] or 'all'} | {r['retrieval']:.2f} | {r['agreement']:.3f} | "
             f"{r['max_logit_err']:.3f} | {r['mean_logit_err']:.3f} |" for r in rows]
    return "\n".join([head, *lines])
