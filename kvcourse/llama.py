"""A from-scratch Llama forward pass, readable top to bottom, that runs the weights of a ``LlamaForCausalLM``.

RMSNorm, rotary position embeddings (RoPE), grouped-query attention (GQA) and a SwiGLU MLP, in
the style of nanoGPT: one file, shapes commented where they change. ``Llama.from_hf(model)``
takes the weights of a ``transformers`` ``LlamaForCausalLM`` (the bundled model, SmolLM2,
Llama 3) without copying them, and reproduces its logits in float32. It also takes a
``MistralForCausalLM``: Llama plus a sliding window, where a query sees only itself and the
``sliding_window - 1`` tokens before it (``sliding_window_mask``; the ring-buffer cache that keeps
just those is ``kvcourse.window.SlidingWindowCache``). What it cannot reproduce it
refuses by name: an MLP activation other than SiLU, RoPE types whose frequencies change at run
time (``dynamic``, ``longrope``) or that it does not implement; see ``SUPPORTED_ROPE_TYPES``.

Its attention takes an optional KV cache: any object with ``update(key, value, layer_idx) ->
(keys, values)`` and ``get_seq_length()``, laid out ``(batch, kv_heads, seq, head_dim)`` like
``transformers``' ``Cache``. The position of new tokens comes from the cache's length, so the
cache keeps the position and the model never has to be told twice.

Batches of prompts of different lengths are left-padded and come with an ``attention_mask``
``(batch, cached + new)``, 1 for a real token and 0 for padding, as in ``transformers``. Each row's
positions then count its real tokens only (``position_ids = attention_mask.cumsum(-1) - 1``, padding
at 0, as ``GenerationMixin._prepare_position_ids_for_generation``), and attention masks both the
future and the padding (``padding_causal_mask``, the boolean mask ``masking_utils.sdpa_mask`` builds).
A padded batch needs no special cache: padding is cached like any token and masked when read.

References: Touvron et al. 2023 (LLaMA); Su et al. 2021 (RoFormer, RoPE); Zhang & Sennrich 2019
(RMSNorm); Shazeer 2020 (SwiGLU); Ainslie et al. 2023 (GQA); Karpathy's nanoGPT ``model.py``;
``transformers/models/llama/modeling_llama.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import _check_sizes, _host_reads_allowed
from .window import check_window_cache

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# The config fields LlamaArgs.from_config reads (transformers' LlamaConfig names).
_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps")


def _check_args(a, who: str) -> None:
    if not isinstance(a, LlamaArgs):
        raise TypeError(f"{who} takes a LlamaArgs, got {type(a).__name__}; for a transformers config use "
                        f"LlamaArgs.from_config(config)")


def _check_last_dim(x: torch.Tensor, size: int, who: str, what: str) -> None:
    """A static shape check (free under torch.compile): x's last axis must be ``size``."""
    if x.shape[-1] != size:
        raise ValueError(f"{who} expects {what} of size {size} on the last axis, got x of shape {tuple(x.shape)} "
                         f"(last axis {x.shape[-1]})")


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query sees itself and the W - 1 tokens before it

    def __post_init__(self) -> None:
        _check_sizes(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                     intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
                     num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                             f"(grouped-query attention: each KV head serves the same number of query heads)")
        if self.sliding_window is not None:
            _check_sizes(sliding_window=self.sliding_window)

    @classmethod
    def from_config(cls, config) -> LlamaArgs:
        """The sizes of a Llama-style ``transformers`` config (LlamaConfig, MistralConfig); anything else is refused."""
        missing = [n for n in _CONFIG_FIELDS if getattr(config, n, None) is None]
        if missing:
            raise TypeError(
                f"LlamaArgs.from_config expects a Llama-style config (LlamaConfig, MistralConfig), got "
                f"{type(config).__name__}, which lacks {', '.join(missing)}"
            )
        _check_sizes(**{n: getattr(config, n) for n in _CONFIG_FIELDS if n != "rms_norm_eps"})
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        return cls(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps, rope_theta=rope.get("rope_theta", getattr(config, "rope_theta", 1e4)),
            bias=bool(getattr(config, "attention_bias", False)), mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_window=getattr(config, "sliding_window", None) if getattr(config, "model_type", None) == "mistral"
            else None,
        )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        _check_sizes(dim=dim)
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.weight.shape[0], "RMSNorm", "features")
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# RoPE variants whose frequencies are fixed by the config (transformers computes them once, at init).
# "dynamic" and "longrope" change them with the sequence length at run time; the rest are not Llama's.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ROPE_REFUSALS = {
    "dynamic": "dynamic NTK scaling: transformers recomputes the RoPE frequencies whenever a sequence runs past "
               "max_position_embeddings={mpe}, so they depend on the sequence length (and its inv_freq buffer "
               "keeps whatever the last call left there)",
    "longrope": "LongRoPE: transformers switches to its long factors whenever a sequence runs past "
                "original_max_position_embeddings, so the frequencies depend on the sequence length",
}


def rope_from_config(config) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies (head_dim / 2,) in float32 and the cos/sin scale, from the config alone.

    The same computation as ``transformers``' ``LlamaRotaryEmbedding`` at init (its
    ``compute_default_rope_parameters``, or ``modeling_rope_utils.ROPE_INIT_FUNCTIONS`` for the
    scaled types). Raises ``ValueError``, naming the type, for any type not in ``SUPPORTED_ROPE_TYPES``.
    """
    params = getattr(config, "rope_parameters", None) or {}
    if not params and getattr(config, "rope_theta", None) is None:
        raise ValueError(
            f"rope_from_config needs a config with RoPE settings (rope_parameters or rope_theta, as LlamaConfig has); "
            f"this {type(config).__name__} has neither: its model does not use rotary position embeddings"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = _ROPE_REFUSALS.get(rope_type, "a RoPE variant the from-scratch forward does not implement").format(
            mpe=getattr(config, "max_position_embeddings", "?"))
        raise ValueError(
            f"Llama.from_hf cannot reproduce RoPE type {rope_type!r} ({why}); kvcourse's Llama uses fixed "
            f"frequencies and would give wrong logits. Supported RoPE types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq, scale = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(
            f"Llama.from_hf rotates every dimension of a head: RoPE type {rope_type!r} gave {inv_freq.numel()} "
            f"frequencies for head_dim {head_dim}, expected {head_dim // 2} (partial_rotary_factor "
            f"{params.get('partial_rotary_factor', 1.0)} is not supported)"
        )
    return inv_freq.float(), float(scale)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos and sin of angle position * frequency: (T, head_dim) each for positions (T,), (B, T, head_dim) for (B, T)."""
    freqs = positions.float()[..., None] * inv_freq.float()  # (..., T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, D)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (first half, second half) pair of x by its position's angle. x: (B, H, T, D)."""
    if cos.shape[-1] != x.shape[-1] or sin.shape[-1] != x.shape[-1]:
        raise ValueError(f"apply_rope: x {tuple(x.shape)} has head_dim {x.shape[-1]}, but cos {tuple(cos.shape)} and "
                         f"sin {tuple(sin.shape)} were made for head_dim {cos.shape[-1]}")
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, H, T, D)
    return x * cos + rotated * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """GQA: each KV head serves n_rep query heads. (B, KV, T, D) -> (B, KV * n_rep, T, D)."""
    if isinstance(n_rep, bool) or not isinstance(n_rep, int) or n_rep < 1:
        raise ValueError(f"repeat_kv: n_rep (query heads per KV head) must be an int >= 1, got {n_rep!r}")
    if x.dim() != 4:
        raise ValueError(f"repeat_kv expects x of shape (batch, kv_heads, seq, head_dim), got {tuple(x.shape)}")
    if n_rep == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


def causal_mask(q_len: int, k_len: int, device: torch.device | str = "cpu", q_offset: int | None = None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where a query may look.

    The queries are the *last* q_len of the k_len positions, so query i sees keys 0..k_len-q_len+i:
    in prefill (q_len == k_len) this is the usual lower triangle; in a decode step (q_len == 1)
    the one new query sees every cached key. ``q_offset`` places the first query elsewhere (query i
    sees keys 0..q_offset+i): a static-shape cache has k_len = its capacity, with empty slots after.
    Without ``q_offset``, more queries than keys (q_len > k_len) is refused: they cannot be the last k_len.
    """
    if q_offset is None and q_len > k_len:
        raise ValueError(f"causal_mask({q_len}, {k_len}): the {q_len} queries are the last of the keys, so q_len must "
                         f"be <= k_len, got q_len={q_len} > k_len={k_len}")
    offset = k_len - q_len if q_offset is None else q_offset
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)


def sliding_window_mask(mask: torch.Tensor | None, q_len: int, k_len: int, start_pos: int, window: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """AND a sliding window into a boolean mask over key slots 0..k_len-1 for queries at slots start_pos + i.

    A query sees a key when the key is not in its future and is one of the ``window`` latest slots up to
    it: ``q - window < k <= q`` (``transformers``' ``sliding_window_overlay`` on a causal mask, as
    Mistral uses it). ``mask``: the causal (and padding) mask built so far, (B or 1, 1, q_len, k_len), or
    ``None`` for causal only. Returns (B or 1, 1, q_len, k_len).
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window_mask: window must be an int >= 1 (a query sees itself and window - 1 "
                         f"earlier tokens), got {window!r}")
    q_pos = torch.arange(start_pos, start_pos + q_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, K)
    inside = (k_pos > q_pos - window) & (k_pos <= q_pos)  # (Tq, K)
    return inside[None, None] if mask is None else mask & inside


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions (B, T) from a 0/1 ``attention_mask`` (B, T): each row's first real token is at 0.

    ``cumsum - 1`` counts the real tokens before each one; padding is put at position 0, as
    ``transformers``' ``_prepare_position_ids_for_generation`` does (its value is never attended to).
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T)


def padding_causal_mask(attention_mask: torch.Tensor, q_len: int, k_len: int | None = None) -> torch.Tensor:
    """Boolean (B, 1, q_len, K) mask, True where a query may look, for the last q_len of the masked positions.

    A query sees a key when the key is not in its future (``causal_mask``) *and* the key is a real
    token (``attention_mask`` is 1 there). By default K = attention_mask.shape[1], the cached plus new
    tokens; a static-shape cache passes its capacity as ``k_len``, and the slots past the mask count as
    padding. A padding query sees nothing at all; ``scaled_dot_product_attention`` returns zeros for such a row.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"padding_causal_mask: attention_mask must be (batch, seq) of 0/1, got {got}")
    filled = attention_mask.shape[1]
    k_len = filled if k_len is None else k_len
    future = causal_mask(q_len, k_len, attention_mask.device, q_offset=filled - q_len)  # (Tq, K)
    real = torch.zeros(attention_mask.shape[0], k_len, dtype=torch.bool, device=attention_mask.device)
    real[:, :filled] = attention_mask.bool()
    return future[None, None] & real[:, None, None, :]  # (B, 1, Tq, K): padding and empty slots are False


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q (B, H, Tq, D) over k, v (B, H, Tk, D), queries last in the sequence.

    mask: ``None`` (causal only) or a boolean (B, 1, Tq, Tk) that already holds the causal part
    (``padding_causal_mask``).
    """
    if (q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2]
            or q.shape[-1] != k.shape[-1]):
        raise ValueError(
            f"sdpa_attention expects q (B, H, Tq, D) and k, v (B, H, Tk, D) with the same B, H and D, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (repeat the KV heads with repeat_kv first)"
        )
    tq, tk = q.shape[-2], k.shape[-2]
    if mask is None and tq > 1:
        mask = causal_mask(tq, tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Tq, D)


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs, layer_idx: int):
        super().__init__()
        _check_args(a, "Attention")
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                attn_fn: AttentionFn = sdpa_attention, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(f"Attention expects x of shape (batch, seq, hidden_size={self.q_proj.in_features}), "
                             f"got {tuple(x.shape)}")
        b, t, _ = x.shape  # (B, T, C)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, KV, T_past + T, D): the cache holds KV heads only
        rep = self.n_heads // self.n_kv
        if mask is None:
            y = attn_fn(q, repeat_kv(k, rep), repeat_kv(v, rep))  # (B, H, T, D)
        else:  # a padded batch: an attn_fn must take the (B, 1, T, T_past + T) mask too
            y = attn_fn(q, repeat_kv(k, rep), repeat_kv(v, rep), mask=mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, a: LlamaArgs):
        super().__init__()
        _check_args(a, "MLP")
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.gate_proj.in_features, "MLP", "hidden_size")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: LlamaArgs, layer_idx: int):
        super().__init__()
        _check_args(a, "Block")
        self.attn_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.attn = Attention(a, layer_idx)
        self.mlp_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, cache=None, attn_fn: AttentionFn = sdpa_attention, mask=None):
        if x.dim() != 3:
            raise ValueError(f"Block expects x of shape (batch, seq, hidden_size), got {tuple(x.shape)}")
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, attn_fn, mask)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Embedding -> N x (attention + MLP, each pre-normed, residual) -> norm -> logits."""

    def __init__(self, a: LlamaArgs):
        super().__init__()
        _check_args(a, "Llama")
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float) / a.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scale = 1.0

    @classmethod
    def from_hf(cls, hf_model) -> Llama:
        """Wrap the weights of a ``transformers`` ``LlamaForCausalLM`` or ``MistralForCausalLM`` (shared, not copied).

        Refuses by name what this forward cannot reproduce: another architecture, an MLP activation
        other than SiLU, a RoPE type outside ``SUPPORTED_ROPE_TYPES``. The RoPE frequencies are
        recomputed from the config, never copied from the model's ``inv_freq`` buffer, which
        ``transformers`` rewrites at run time for dynamic RoPE.
        """
        config = getattr(hf_model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in ("llama", "mistral"):
            raise TypeError(
                f"Llama.from_hf expects a LlamaForCausalLM (config.model_type 'llama') or a MistralForCausalLM "
                f"(Llama with a sliding window, 'mistral'), got "
                f"{type(hf_model).__name__} with model_type {model_type!r}: the from-scratch forward only knows Llama"
            )
        if not hasattr(hf_model, "lm_head"):
            raise TypeError(
                f"Llama.from_hf expects a LlamaForCausalLM (with its lm_head), got a {type(hf_model).__name__}"
            )
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(
                f"Llama.from_hf reproduces Llama's SwiGLU MLP, silu(gate(x)) * up(x); this model's config.hidden_act "
                f"is {act!r}, expected 'silu', so its logits would be wrong"
            )
        inv_freq, rope_scale = rope_from_config(config)
        a = LlamaArgs.from_config(config)
        with torch.device("meta"):
            model = cls(a)
        sd = {}
        for name, tensor in hf_model.state_dict().items():
            new = (name.replace("model.embed_tokens.", "embed.").replace("model.norm.", "norm.")
                   .replace("model.layers.", "layers.").replace(".self_attn.", ".attn.")
                   .replace(".input_layernorm.", ".attn_norm.").replace(".post_attention_layernorm.", ".mlp_norm."))
            sd[new] = tensor
        if "lm_head.weight" not in sd:  # tied embeddings
            sd["lm_head.weight"] = sd["embed.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        # Round the fresh frequencies as transformers' buffer is (model.to(bfloat16) casts it too).
        held = getattr(getattr(getattr(hf_model, "model", None), "rotary_emb", None), "inv_freq", None)
        dtype = held.dtype if isinstance(held, torch.Tensor) and held.is_floating_point() else torch.float32
        model.inv_freq = inv_freq.to(device=model.embed.weight.device, dtype=dtype)
        model.rope_scale = rope_scale
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(self, input_ids: torch.Tensor, cache=None, *, attention_mask: torch.Tensor | None = None,
                start_pos: int | None = None, attn_fn: AttentionFn = sdpa_attention,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T); (B, 1, vocab) with ``last_only``.

        With a cache, the new tokens sit after the ``cache.get_seq_length()`` tokens already in
        it and their keys/values are appended to it. ``start_pos``, if given, must agree.

        attention_mask: ``None`` (every token is real) or (B, cached + T) of 0/1 (or bool), 0 for
        padding, covering the cached tokens and the new ones, as ``transformers`` takes it. Rows then
        get their own positions (``positions_from_mask``) and attention skips the padding
        (``padding_causal_mask``); an ``attn_fn`` is then called with ``mask=`` as well.

        Token ids outside 0..vocab_size-1 are refused in eager mode (one device read); while ``torch.compile``
        traces or a CUDA graph is captured that check is skipped, like ``StaticKVCache``'s capacity check.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            got = (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids must be a (batch, seq) tensor of token ids (torch.long), got {got}")
        t = input_ids.shape[1]
        if _host_reads_allowed(input_ids):  # one device read, skipped while compiling or capturing
            vocab = self.args.vocab_size
            if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
                lo, hi = int(input_ids.min()), int(input_ids.max())
                raise ValueError(f"input_ids must be token ids in 0..vocab_size-1 = 0..{vocab - 1} "
                                 f"(vocab_size={vocab}), got ids from {lo} to {hi}")
        x = self.embed(input_ids)  # (B, T, C)
        static = getattr(cache, "static_shape", False)  # the cache returns its whole (B, KV, S_max, D) buffers
        window = self.args.sliding_window
        if static and attention_mask is None and start_pos is None and window is None:
            # Nothing here is a Python number that changes from step to step: the position comes from the cache,
            # on the device, and so does the mask. torch.compile traces this once for every position.
            cache_position = cache.cache_position(t)  # (T,) long: the slots of the new tokens
            cos, sin = rope_cos_sin(cache_position, self.inv_freq, x.dtype, self.rope_scale)  # (T, D) each
            mask = cache.mask(cache_position)  # (B, 1, T, S): written slots up to each query's own
        else:
            cos, sin, mask = self._positions_and_mask(input_ids, cache, attention_mask, start_pos, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attn_fn, mask)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(self.norm(x))  # (B, T, vocab)

    def _positions_and_mask(self, input_ids, cache, attention_mask, start_pos, dtype):
        """RoPE cos/sin and the attention mask, from the cache's length read on the host (every cache but a
        static one in a plain step)."""
        b, t = input_ids.shape
        mask = None
        check_window_cache(self, cache)  # a ring on a model without a window, or one smaller than its window
        static = getattr(cache, "static_shape", False)
        past = cache.get_seq_length() if cache is not None else 0
        if start_pos is None:
            start_pos = past
        elif start_pos != past:
            raise ValueError(
                f"start_pos={start_pos} but the cache already holds {past} tokens: new tokens must be placed "
                f"right after the cached ones (position offset = cache length)"
            )
        if attention_mask is None:
            positions = torch.arange(start_pos, start_pos + t, device=input_ids.device)  # (T,)
            cos, sin = rope_cos_sin(positions, self.inv_freq, dtype, self.rope_scale)  # (T, D) each
            if static:  # the cache masks its own slots, from its device position
                mask = cache.mask(cache.cache_position(t))  # (B, 1, T, S)
        else:
            check_attention_mask(attention_mask, b, start_pos + t, input_ids.device)
            positions = positions_from_mask(attention_mask)[:, -t:]  # (B, T): each row counts its real tokens
            cos, sin = rope_cos_sin(positions, self.inv_freq, dtype, self.rope_scale)  # (B, T, D) each
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over heads
            if static:  # padding is marked False in the cache's slot mask
                mask = cache.mask(cache.cache_position(t), attention_mask[:, -t:].bool())  # (B, 1, T, S)
            else:
                mask = padding_causal_mask(attention_mask, t)  # (B, 1, T, cached + T)
        window = self.args.sliding_window
        if window is not None:  # Mistral: keys older than the window are masked too
            k_total = cache.max_seq_len if static else start_pos + t
            mask = sliding_window_mask(mask, t, k_total, start_pos, window, input_ids.device)  # (B|1, 1, T, K)
            if hasattr(cache, "window_slots"):  # a window cache returns only the slots it keeps
                k_len, k_offset = cache.window_slots(t)
                mask = mask[..., k_offset:k_offset + k_len]  # (B|1, 1, T, kept + T)
        return cos, sin, mask


def check_attention_mask(attention_mask, batch_size: int, length: int, device: torch.device | None = None) -> None:
    """Raise a clear ``ValueError`` unless attention_mask is a (batch_size, length) tensor of 0/1 (or bool)."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a (batch, seq) tensor of 0/1, got {type(attention_mask).__name__}")
    if attention_mask.shape != (batch_size, length):
        raise ValueError(
            f"attention_mask must be (batch, cached + new tokens) = {(batch_size, length)}, got "
            f"{tuple(attention_mask.shape)}: it covers every token the cache holds as well as the new ones"
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(f"attention_mask must hold 0/1 integers or bools, got {attention_mask.dtype}")
    if device is not None and attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids are on {device}")
    if attention_mask.dtype != torch.bool and not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
