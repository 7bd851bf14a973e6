"""Multi-head latent attention (MLA), readable top to bottom, that runs the weights of a ``DeepseekV3ForCausalLM``.

MLA (DeepSeek-V2, Liu et al. 2024, arXiv:2405.04434, section 2.1; kept in DeepSeek-V3, arXiv:2412.19437)
caches one small vector per token and layer instead of a key and a value per head:

- the **latent** ``c_kv`` (``kv_lora_rank`` numbers): the hidden state projected down by ``kv_a_proj_with_mqa``
  and RMS-normed (``kv_a_layernorm``). The per-head keys (their "nope" part, no position) and values are
  recovered from it by one up-projection, ``kv_b_proj``: (kv_lora_rank) -> heads x (qk_nope_head_dim + v_head_dim);
- the **decoupled RoPE key** ``k_rope`` (``qk_rope_head_dim`` numbers), projected by the same ``kv_a_proj_with_mqa``,
  rotated by its position and *shared by every head*. RoPE cannot act on the latent: a rotation between the
  query and the up-projection would stop the up-projection from being folded into the query (the paper's
  argument for the decoupled key, section 2.1).

A head's key is ``[k_nope_h ; k_rope]`` and its query ``[q_nope_h ; q_rope_h]``, both of
``qk_nope_head_dim + qk_rope_head_dim``, and the softmax scale is 1/sqrt of that sum. The query comes from
``q_proj`` or, with ``q_lora_rank``, through its own low-rank bottleneck ``q_b_proj(norm(q_a_proj(x)))``.

Two ways to decode from the same ``LatentCache``:

- **unabsorbed** (``absorbed=False``), as ``transformers`` does: every step re-expands all cached latents with
  ``kv_b_proj`` into per-head keys and values, S x heads x (qk_nope + v) numbers, then runs ordinary attention;
- **absorbed** (``absorbed=True``): the key up-projection W_UK is folded into the query
  (``q_nope_h . (W_UK_h c) = (W_UK_h^T q_nope_h) . c``), so each head's query lives in the latent space, and
  attention scores and weights are taken against the cached latents directly, all heads sharing them like one
  KV head (multi-query attention of width kv_lora_rank + qk_rope_head_dim). The value up-projection W_UV is
  applied after attention, to the (heads, kv_lora_rank) output, before ``o_proj`` (the paper folds it into
  W_O; applying it next to W_O is the same product and keeps ``o_proj`` as it is). The cache is read once and
  never expanded, so a decode step costs O(S x heads x (kv_lora_rank + qk_rope_head_dim)) instead of
  O(S x kv_lora_rank x heads x (qk_nope + v)): the gap grows with the context S. The scale stays
  1/sqrt(qk_nope_head_dim + qk_rope_head_dim): it belongs to the original head, not to the latent width.

What this matches in ``transformers`` 5.x (``models/deepseek_v3/modeling_deepseek_v3.py``, ``DeepseekV3Attention``):
``kv_a_proj_with_mqa`` gives ``[c_kv ; k_rope]``, the norm applies to ``c_kv`` only, RoPE to ``q_rope`` and
``k_rope`` only, with ``rope_interleave`` (default ``True``: pairs (x0, x1), (x2, x3), ... rotated and written
back as [evens ; odds], as ``apply_rotary_pos_emb_interleave``) or the rotate-half layout (``False``); the
cache holds ``c_kv`` (normed) and ``k_rope`` (rotated). Only the plain RoPE type ``"default"`` is reproduced:
``yarn`` (DeepSeek-V3's published setting) also rescales cos/sin and the softmax scale (``yarn_apply_mscale``),
and is refused by name, as are MoE layers (build the model with ``first_k_dense_replace`` = the number of layers)
and ``num_key_value_heads`` other than ``num_attention_heads``.

References: DeepSeek-V2 (arXiv:2405.04434) section 2.1; DeepSeek's reference inference code
(``deepseek-ai/DeepSeek-V3``, ``inference/model.py``, ``attn_impl = "absorb"``); ``transformers``
``modeling_deepseek_v3.py``; Karpathy's nanoGPT for the style.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import CacheOverflowError, _check_layer, _check_sizes, _cropped_length
from .llama import RMSNorm, apply_rope, causal_mask, rope_cos_sin

__all__ = ["PUBLISHED", "LatentCache", "MLAArgs", "MLAAttention", "MLAModel", "published_table", "time_decode_steps"]


# ---- configuration -------------------------------------------------------------------------------------


@dataclass
class MLAArgs:
    """The sizes of an MLA model (``transformers``' ``DeepseekV3Config`` names, shortened where Llama's are)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_lora_rank: int  # width of the cached latent c_kv
    qk_rope_head_dim: int  # width of the decoupled RoPE key, shared by every head (cached too)
    qk_nope_head_dim: int  # per-head key/query width without position, recovered from c_kv
    v_head_dim: int  # per-head value width, recovered from c_kv
    q_lora_rank: int | None = None  # None: q_proj; an int: q_b_proj(norm(q_a_proj(x)))
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    bias: bool = False  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj

    def __post_init__(self) -> None:
        _check_sizes(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                     intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
                     kv_lora_rank=self.kv_lora_rank, qk_rope_head_dim=self.qk_rope_head_dim,
                     qk_nope_head_dim=self.qk_nope_head_dim, v_head_dim=self.v_head_dim)
        if self.q_lora_rank is not None:
            _check_sizes(q_lora_rank=self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs of numbers), got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        """The width of one head's query and key: the nope part and the rope part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_config(cls, config) -> MLAArgs:
        """The sizes of a ``transformers`` ``DeepseekV3Config``; anything this forward cannot reproduce is refused."""
        if getattr(config, "model_type", None) != "deepseek_v3":
            raise TypeError(f"MLAArgs.from_config expects a DeepseekV3Config (model_type 'deepseek_v3'), got "
                            f"{type(config).__name__} with model_type {getattr(config, 'model_type', None)!r}")
        layers = config.num_hidden_layers
        dense = config.first_k_dense_replace
        if dense is None or dense < layers:
            raise ValueError(
                f"kvcourse's MLA model has dense MLP layers only, but this config has first_k_dense_replace={dense} < "
                f"num_hidden_layers={layers}: layers {dense}.. are mixture-of-experts. Build it with "
                f"first_k_dense_replace={layers}")
        if config.num_key_value_heads != config.num_attention_heads:
            raise ValueError(
                f"MLA expands the latent into one key and value per query head: num_key_value_heads="
                f"{config.num_key_value_heads} must equal num_attention_heads={config.num_attention_heads}")
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"the MLP is SwiGLU, silu(gate(x)) * up(x); config.hidden_act is {config.hidden_act!r}, "
                             f"expected 'silu'")
        rope = config.rope_parameters or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"kvcourse's MLA model reproduces the plain RoPE type 'default' only; this config has rope_type "
                f"{rope_type!r} (yarn also rescales cos/sin and the softmax scale, see transformers' "
                f"yarn_apply_mscale), so its logits would differ")
        return cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_layers=layers,
                   num_heads=config.num_attention_heads, kv_lora_rank=config.kv_lora_rank,
                   qk_rope_head_dim=config.qk_rope_head_dim, qk_nope_head_dim=config.qk_nope_head_dim,
                   v_head_dim=config.v_head_dim, q_lora_rank=config.q_lora_rank, rms_norm_eps=config.rms_norm_eps,
                   rope_theta=float(rope.get("rope_theta", 10000.0)), rope_interleave=bool(config.rope_interleave),
                   bias=bool(config.attention_bias))


def _check_args(a, who: str) -> None:
    if not isinstance(a, MLAArgs):
        raise TypeError(f"{who} takes an MLAArgs, got {type(a).__name__}; for a transformers config use "
                        f"MLAArgs.from_config(config)")


# ---- the latent cache ----------------------------------------------------------------------------------


class LatentCache:
    """Per layer, the normed latent c_kv (B, S, kv_lora_rank) and the rotated shared key k_rope (B, S, qk_rope_head_dim).

    Preallocated to ``max_seq_len`` and written in place like ``kvcourse.cache.KVCache``; ``update`` returns views
    of everything held so far. One token costs ``bytes_per_token()`` = (kv_lora_rank + qk_rope_head_dim) x
    dtype size x layers, the same for any number of heads. ``crop(n)`` keeps the first n tokens (n >= 0) or
    drops the last -n (n < 0), as ``KVCache.crop``.
    """

    def __init__(self, num_layers: int, batch_size: int, kv_lora_rank: int, qk_rope_head_dim: int, max_seq_len: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        _check_sizes(num_layers=num_layers, batch_size=batch_size, kv_lora_rank=kv_lora_rank,
                     qk_rope_head_dim=qk_rope_head_dim, max_seq_len=max_seq_len)
        self.latents = [torch.zeros(batch_size, max_seq_len, kv_lora_rank, dtype=dtype, device=device)
                        for _ in range(num_layers)]  # (B, S_max, R) per layer
        self.rope_keys = [torch.zeros(batch_size, max_seq_len, qk_rope_head_dim, dtype=dtype, device=device)
                          for _ in range(num_layers)]  # (B, S_max, Dr) per layer
        self.lengths = [0] * num_layers
        self.num_layers, self.max_seq_len = num_layers, max_seq_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int, **kw) -> LatentCache:
        """Size a cache for an ``MLAModel`` or a ``transformers`` ``DeepseekV3ForCausalLM``."""
        a = getattr(model, "args", None)
        if isinstance(a, MLAArgs):
            layers, rank, rope = a.num_layers, a.kv_lora_rank, a.qk_rope_head_dim
        elif getattr(getattr(model, "config", None), "model_type", None) == "deepseek_v3":
            c = model.config
            layers, rank, rope = c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim
        else:
            raise TypeError(f"LatentCache.for_model expects an MLAModel or a DeepseekV3ForCausalLM, got "
                            f"{type(model).__name__}: only MLA models cache latents")
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("device", p.device)
        return cls(layers, batch_size, rank, rope, max_seq_len, **kw)

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv (B, T, kv_lora_rank) and k_rope (B, T, qk_rope_head_dim) after the cached ones; return views
        of all (B, S, kv_lora_rank) and (B, S, qk_rope_head_dim). Nothing is written unless every check passes."""
        _check_layer(layer_idx, self.num_layers)
        held_c, held_r = self.latents[layer_idx], self.rope_keys[layer_idx]
        for name, x, held in (("c_kv", c_kv, held_c), ("k_rope", k_rope, held_r)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"LatentCache.update: {name} must be a tensor, got {type(x).__name__}")
            if x.dim() != 3 or x.shape[0] != held.shape[0] or x.shape[2] != held.shape[2]:
                raise ValueError(f"LatentCache.update: {name} must be (batch, seq, dim) = ({held.shape[0]}, seq, "
                                 f"{held.shape[2]}) for this cache, got {tuple(x.shape)}")
            if x.dtype != held.dtype or x.device != held.device:
                raise ValueError(f"LatentCache.update: the cache holds {held.dtype} on {held.device}, but {name} is "
                                 f"{x.dtype} on {x.device}; allocate it with LatentCache.for_model(model, ...)")
        if c_kv.shape[1] != k_rope.shape[1]:
            raise ValueError(f"LatentCache.update: c_kv {tuple(c_kv.shape)} and k_rope {tuple(k_rope.shape)} must "
                             f"cover the same tokens (seq axis 1)")
        start = self.lengths[layer_idx]
        end = start + c_kv.shape[1]
        if end > self.max_seq_len:
            raise CacheOverflowError(
                f"latent cache overflow in layer {layer_idx}: it holds {start} tokens, {c_kv.shape[1]} more would make "
                f"{end}, past its capacity max_seq_len={self.max_seq_len}. Allocate a larger cache or reset() it.")
        held_c[:, start:end] = c_kv  # in place
        held_r[:, start:end] = k_rope
        self.lengths[layer_idx] = end
        return held_c[:, :end], held_r[:, :end]  # (B, S, R), (B, S, Dr): views that grow

    def get_seq_length(self, layer_idx: int = 0) -> int:
        _check_layer(layer_idx, self.num_layers)
        return self.lengths[layer_idx]

    def reset(self) -> None:
        """Forget every token (the buffers are kept)."""
        self.lengths = [0] * self.num_layers

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value drops that many from the end."""
        self.lengths = [_cropped_length(max_length, n, i) for i, n in enumerate(self.lengths)]

    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x dtype size x layers: what one more token costs."""
        per_layer = self.latents[0].shape[2] + self.rope_keys[0].shape[2]
        return per_layer * self.latents[0].element_size() * self.num_layers


# ---- the model -----------------------------------------------------------------------------------------


def rope_decoupled(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE on the decoupled part x (..., T, Dr); cos/sin (T, Dr) as ``rope_cos_sin`` makes them.

    ``interleave``: pairs (x0, x1), (x2, x3), ... are rotated and written back as [evens ; odds] (``transformers``'
    ``apply_rotary_pos_emb_interleave``, DeepSeek's layout); otherwise the rotate-half pairs (x_i, x_{i+D/2}).
    """
    if not interleave:
        return apply_rope(x, cos, sin)
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # (T, Dr/2): one angle per pair
    even, odd = x[..., 0::2], x[..., 1::2]  # (..., T, Dr/2)
    return torch.cat((even * c - odd * s, odd * c + even * s), dim=-1)  # (..., T, Dr)


class MLAAttention(nn.Module):
    """Multi-head latent attention; ``transformers``' parameter names, so its weights load as they are."""

    def __init__(self, a: MLAArgs, layer_idx: int):
        super().__init__()
        _check_args(a, "MLAAttention")
        self.a, self.layer_idx = a, layer_idx
        h = a.num_heads
        if a.q_lora_rank is None:
            self.q_proj = nn.Linear(a.hidden_size, h * a.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(a.hidden_size, a.q_lora_rank, bias=a.bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, 1e-6)  # transformers builds it with its default eps
            self.q_b_proj = nn.Linear(a.q_lora_rank, h * a.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(a.hidden_size, a.kv_lora_rank + a.qk_rope_head_dim, bias=a.bias)
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * a.v_head_dim, a.hidden_size, bias=a.bias)
        self.scale = a.qk_head_dim ** -0.5  # the full head, nope + rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                absorbed: bool = False) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); the new tokens' latents are appended to ``cache`` if one is given."""
        a = self.a
        if x.dim() != 3 or x.shape[-1] != a.hidden_size:
            raise ValueError(f"MLAAttention expects x of shape (batch, seq, hidden_size={a.hidden_size}), "
                             f"got {tuple(x.shape)}")
        b, t, _ = x.shape
        h, dn, dr = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim
        # queries: (B, T, H * Dqk), optionally through the low-rank bottleneck
        q = self.q_proj(x) if a.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, h, a.qk_head_dim).transpose(1, 2)  # (B, H, T, Dqk)
        q_nope, q_rope = q.split([dn, dr], dim=-1)  # (B, H, T, Dn), (B, H, T, Dr)
        q_rope = rope_decoupled(q_rope, cos, sin, a.rope_interleave)  # (B, H, T, Dr)
        c_kv, k_rope = self._latents(x, cos, sin, cache)  # (B, S, R), (B, S, Dr): all that attention reads
        s = c_kv.shape[1]
        mask = causal_mask(t, s, x.device) if t > 1 else None  # (T, S): the new tokens are the last T
        if absorbed:
            y = self._absorbed(q_nope, q_rope, c_kv, k_rope, mask)  # (B, H, T, Dv)
        else:
            kv = self.kv_b_proj(c_kv).view(b, s, h, dn + a.v_head_dim).transpose(1, 2)  # (B, H, S, Dn + Dv)
            k_nope, v = kv.split([dn, a.v_head_dim], dim=-1)  # (B, H, S, Dn), (B, H, S, Dv)
            k = torch.cat((k_nope, k_rope[:, None].expand(b, h, s, dr)), dim=-1)  # (B, H, S, Dqk)
            q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, Dqk)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, H, T, Dv)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h * a.v_head_dim))  # (B, T, C)

    def _latents(self, x, cos, sin, cache):
        """The cached part of x (B, T, C): one normed latent and one rotated shared key per token, written to
        ``cache`` (if any); returns everything held, (B, S, R) and (B, S, Dr). Notebook 11 swaps it per layer."""
        a = self.a
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)  # (B, T, R)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, R)
        k_rope = rope_decoupled(k_rope, cos, sin, a.rope_interleave)  # (B, T, Dr): RoPE on the shared key only
        if cache is not None:
            c_kv, k_rope = cache.update(c_kv, k_rope, self.layer_idx)  # (B, S, R), (B, S, Dr)
        return c_kv, k_rope

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Attention on the latents: W_UK folded into the query, W_UV applied to the latent output."""
        a = self.a
        b, h, t, _ = q_nope.shape
        s = c_kv.shape[1]
        w = self.kv_b_proj.weight.view(h, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)  # (H, Dn + Dv, R)
        w_uk, w_uv = w[:, :a.qk_nope_head_dim], w[:, a.qk_nope_head_dim:]  # (H, Dn, R), (H, Dv, R)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, R): the query in latent space
        # every head reads the same latents: fold heads into rows, one matmul per batch row, no copy of the cache
        scores = (q_lat.reshape(b, h * t, -1) @ c_kv.transpose(1, 2)
                  + q_rope.reshape(b, h * t, -1) @ k_rope.transpose(1, 2))  # (B, H*T, S)
        scores = scores.view(b, h, t, s) * self.scale  # (B, H, T, S): the full head's scale, 1/sqrt(Dn + Dr)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(c_kv.dtype)  # (B, H, T, S)
        o_lat = p.reshape(b, h * t, s) @ c_kv  # (B, H*T, R): the weighted latents
        return torch.einsum("bhtr,hvr->bhtv", o_lat.view(b, h, t, -1), w_uv)  # (B, H, T, Dv)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (DeepSeek-V3's dense layers)."""

    def __init__(self, a: MLAArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: MLAArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = MLAAttention(a, layer_idx)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, cache=None, absorbed=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, absorbed)
        return x + self.mlp(self.post_attention_layernorm(x))


class MLAModel(nn.Module):
    """Embedding -> N x (MLA + dense MLP, each pre-normed, residual) -> norm -> logits."""

    def __init__(self, a: MLAArgs):
        super().__init__()
        _check_args(a, "MLAModel")
        self.args = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        d = a.qk_rope_head_dim  # RoPE acts on the decoupled part only
        self.register_buffer("inv_freq", 1.0 / (a.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)),
                             persistent=False)

    @classmethod
    def from_hf(cls, hf_model) -> MLAModel:
        """Wrap the weights of a ``transformers`` ``DeepseekV3ForCausalLM`` with dense layers only (shared, not copied)."""
        config = getattr(hf_model, "config", None)
        if getattr(config, "model_type", None) != "deepseek_v3" or not hasattr(hf_model, "lm_head"):
            raise TypeError(f"MLAModel.from_hf expects a DeepseekV3ForCausalLM, got {type(hf_model).__name__} with "
                            f"model_type {getattr(config, 'model_type', None)!r}")
        a = MLAArgs.from_config(config)
        with torch.device("meta"):
            model = cls(a)
        sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()
              if not k.startswith(f"model.layers.{a.num_layers}.")}  # multi-token-prediction layers, if any
        if "lm_head.weight" not in sd:  # tied embeddings
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        d = a.qk_rope_head_dim  # the meta buffer made above holds no values: compute the frequencies again
        inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        model.inv_freq = inv_freq.to(model.embed_tokens.weight.device)
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, cache: LatentCache | None = None, *, absorbed: bool = False,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T), after the ``cache.get_seq_length()`` cached tokens.

        ``absorbed``: attention on the latents with the up-projections folded in (see the module docstring);
        the default re-expands them as ``transformers`` does. Both give the same logits within fp32 rounding.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            got = (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids must be a (batch, seq) tensor of token ids (torch.long), got {got}")
        if cache is not None and not isinstance(cache, LatentCache):
            raise TypeError(f"MLAModel caches latents: cache must be a LatentCache (LatentCache.for_model(model, ...)), "
                            f"got {type(cache).__name__}")
        if input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
        vocab = self.args.vocab_size
        if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            raise ValueError(f"input_ids must be token ids in 0..{vocab - 1} (vocab_size={vocab}), got ids from "
                             f"{int(input_ids.min())} to {int(input_ids.max())}")
        b, t = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            if cache.latents[0].shape[0] != b:
                raise ValueError(f"the cache was made for batch {cache.latents[0].shape[0]}, input_ids have batch {b}")
            if past + t > cache.max_seq_len:  # refuse before any layer writes: a failed call leaves the cache alone
                raise CacheOverflowError(f"latent cache overflow: it holds {past} tokens, {t} more would make "
                                         f"{past + t}, past its capacity max_seq_len={cache.max_seq_len}")
        x = self.embed_tokens(input_ids)  # (B, T, C)
        positions = torch.arange(past, past + t, device=x.device)  # (T,)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # (T, Dr) each
        for layer in self.layers:
            x = layer(x, cos, sin, cache, absorbed)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(self.norm(x))  # (B, T, vocab)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, absorbed: bool = False,
                 cache: LatentCache | None = None) -> torch.Tensor:
        """Greedy tokens (B, T + max_new_tokens): one prefill, then one cached decode step per token."""
        _check_sizes(max_new_tokens=max_new_tokens)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seq) tensor of token ids, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        if cache is None:
            cache = LatentCache.for_model(self, input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        out = [input_ids]
        token = self(input_ids, cache, absorbed=absorbed, last_only=True)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(token)
        for _ in range(max_new_tokens - 1):
            token = self(token, cache, absorbed=absorbed, last_only=True)[:, -1].argmax(-1, keepdim=True)
            out.append(token)
        return torch.cat(out, dim=1)


# ---- published configs: bytes per token ---------------------------------------------------------------

# Each row from the model's published config.json (bf16, 2 bytes an element, as its torch_dtype says).
PUBLISHED = {
    # https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json (mirrored unchanged, e.g.
    # huggingface.co/kittn/Meta-Llama-3-70B-quant): num_hidden_layers 80, num_attention_heads 64,
    # num_key_value_heads 8, hidden_size 8192 (head_dim 8192 / 64 = 128).
    "Llama-3-70B (GQA)": {"kind": "gqa", "num_layers": 80, "num_kv_heads": 8, "head_dim": 128, "bytes": 2},
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (as mirrored by
    # huggingface.co/mmnga/DeepSeek-V3-slice-jp64 and in transformers' DeepseekV3Config defaults): num_hidden_layers
    # 61, kv_lora_rank 512, qk_rope_head_dim 64 (DeepSeek-V2 uses the same 512 + 64: DeepSeek-V3's
    # inference/configs/config_236B.json).
    "DeepSeek-V3 (MLA)": {"kind": "mla", "num_layers": 61, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "bytes": 2},
    # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json: num_hidden_layers 32,
    # num_key_value_heads 8, hidden_size 4096 / 32 heads = head_dim 128, sliding_window 4096.
    "Mistral-7B-v0.1 (GQA, window 4096)": {"kind": "window", "num_layers": 32, "num_kv_heads": 8, "head_dim": 128,
                                           "window": 4096, "bytes": 2},
}


def published_table(context: int = 32768) -> list[dict]:
    """Rows of ``PUBLISHED`` with bytes per token and the cache of one sequence of ``context`` tokens.

    GQA: 2 x layers x KV heads x head_dim x bytes; MLA: (kv_lora_rank + qk_rope_head_dim) x bytes x layers;
    a window holds at most ``window`` tokens, so its cache stops growing there.
    """
    _check_sizes(context=context)
    rows = []
    for name, c in PUBLISHED.items():
        if c["kind"] == "mla":
            per_token = (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * c["bytes"] * c["num_layers"]
        else:
            per_token = 2 * c["num_layers"] * c["num_kv_heads"] * c["head_dim"] * c["bytes"]
        held = min(context, c["window"]) if c["kind"] == "window" else context
        rows.append({"model": name, "bytes_per_token": per_token, "context": context, "cache_bytes": per_token * held})
    return rows


# ---- timing ---------------------------------------------------------------------------------------------


def _median_step_ms(ours, hf_model, token, cache, hf_cache, path: str, repeats: int) -> float:
    """Median ms of ``repeats`` decode steps (after two warm-up steps), each cropped away after it is timed."""
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        if path == "transformers":
            hf_model(input_ids=token, cache=hf_cache, use_cache=True, logits_to_keep=1)
        else:
            ours(token, cache, absorbed=path == "absorbed", last_only=True)
        times.append(time.perf_counter() - t0)
        (hf_cache if path == "transformers" else cache).crop(-1)
    return 1e3 * statistics.median(times[2:])


@torch.no_grad()
def time_decode_steps(hf_model, contexts=(128, 256, 512, 1024, 2048, 4096), repeats: int = 20) -> list[dict]:
    """Median ms of one decode step at each context length: absorbed, unabsorbed, and ``transformers``.

    The cache is filled once per context with a prefill of that many tokens; each timed step appends one token
    and is cropped away again, so every step sees exactly ``context`` cached tokens. No assertion is made on
    time (the machine may be loaded); for the benchmark and the notebook's plot.
    """
    from transformers import DynamicCache

    _check_sizes(repeats=repeats)
    ours = MLAModel.from_hf(hf_model)
    vocab = ours.args.vocab_size
    rows = []
    for ctx in contexts:
        _check_sizes(context=ctx)
        ids = torch.randint(0, vocab, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        token = torch.randint(0, vocab, (1, 1), generator=torch.Generator().manual_seed(ctx + 1))
        cache = LatentCache.for_model(ours, 1, ctx + 1)
        ours(ids, cache, last_only=True)
        hf_cache = DynamicCache(config=hf_model.config)
        hf_model(input_ids=ids, cache=hf_cache, use_cache=True, logits_to_keep=1)
        for path in ("absorbed", "unabsorbed", "transformers"):
            rows.append({"context": ctx, "path": path,
                         "ms": _median_step_ms(ours, hf_model, token, cache, hf_cache, path, repeats)})
    return rows
