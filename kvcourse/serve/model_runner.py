"""The model runner: one forward pass over a ragged step, reading and writing the paged pool.

A step's tokens come from sequences of different lengths: a chunk of one prompt, one decode token of each
running request, all in one flat row of ``T`` tokens (vLLM's and nano-vllm's "varlen" batch). Nothing is
padded to a common length. Each token carries its own position (its RoPE angle) and the sequence it
belongs to; each sequence carries its own block table. Per layer:

- the fused q/k/v projection (``kvcourse.fast.fused``) and RoPE at each token's position;
- the token's key and value written into its slot ``table[p // block_size] * block_size + p % block_size``;
- ``attention.paged_attention``: each token's query attends to its own sequence's keys at positions
  ``0..p``, read block by block through the table;
- o_proj and the MLP, token by token.

Only the tokens whose logits are needed (the last token of each sequence that finished its known tokens
this step) go through the final norm and ``lm_head``.

The pool is one tensor per layer, ``(num_blocks, KV, block_size, D)``, notebook 08's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fast.fused import FusedBlock, check_one_dtype_and_device, rms_norm, rope_table
from ..generate import as_llama
from ..llama import Llama
from .attention import DEFAULT_BLOCKS_PER_TILE, paged_attention, plan_attention, write_kv


class ModelRunner:
    """The course's Llama as fused weights, plus the paged KV pool it reads and writes."""

    def __init__(self, model, num_blocks: int, block_size: int,
                 blocks_per_tile: int = DEFAULT_BLOCKS_PER_TILE):
        llama = as_llama(model)
        if not isinstance(llama, Llama):
            raise TypeError(f"the engine runs the course's Llama or a transformers LlamaForCausalLM, "
                            f"got {type(model).__name__}")
        check_one_dtype_and_device(llama)
        a = llama.args
        if a.sliding_window is not None:
            raise ValueError(f"the engine attends to every cached token; this model has a sliding window of "
                             f"{a.sliding_window} (Mistral), so its tokens would be wrong")
        self.args, self.vocab_size = a, a.vocab_size
        self.n_heads, self.n_kv, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.eps, self.scale = a.rms_norm_eps, a.head_dim**-0.5
        self.device, self.dtype = llama.device, llama.dtype
        self.block_size, self.num_blocks, self.blocks_per_tile = block_size, num_blocks, blocks_per_tile
        self.embed = llama.embed.weight.detach()  # (V, C)
        self.norm = llama.norm.weight.detach()  # (C,)
        self.lm_head = llama.lm_head.weight.detach()  # (V, C)
        with torch.no_grad():
            self.blocks = [FusedBlock.from_layer(layer) for layer in llama.layers]
        self.inv_freq, self.rope_scale = llama.inv_freq.detach(), llama.rope_scale
        self.cos, self.sin = rope_table(self.inv_freq, self.rope_scale, 256, self.device, self.dtype)
        shape = (len(self.blocks), num_blocks, self.n_kv, block_size, self.head_dim)  # (L, N, KV, bs, D)
        self.k_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.attention = paged_attention  # swappable: notebook 09 runs the engine on a learner's attention
        self.write_kv = write_kv
        self.forward_calls = 0
        self.forward_tokens = 0

    @property
    def pool_bytes(self) -> int:
        return 2 * self.k_pool.numel() * self.k_pool.element_size()

    def ensure_positions(self, length: int) -> None:
        """Grow the RoPE table to cover positions 0..length-1."""
        if length > self.cos.shape[0]:
            n = max(length, 2 * self.cos.shape[0])
            self.cos, self.sin = rope_table(self.inv_freq, self.rope_scale, n, self.device, self.dtype)

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy on write: block ``src`` into ``dst``, in every layer."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.k_pool[:, dst] = self.k_pool[:, src]
            self.v_pool[:, dst] = self.v_pool[:, src]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, seq_idx: torch.Tensor, slots: torch.Tensor,
                block_tables: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        """Logits (R, V) of the tokens ``logit_rows`` (R,) of a ragged step.

        ids, positions, seq_idx, slots: (T,) each: the token, its position in its sequence, its sequence's
        row of ``block_tables`` (S, M), and its flat slot in the pool.
        """
        t = ids.shape[0]
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        self.forward_calls += 1
        self.forward_tokens += t
        x = F.embedding(ids, self.embed)  # (T, C)
        cos = self.cos[positions][:, None, :]  # (T, 1, D): each token its own angle
        sin = self.sin[positions][:, None, :]
        limits = positions + 1  # token at position p sees keys 0..p of its sequence
        # the package's own attention and write get the step's plan: checks, query tiles, key tiles' pool rows and
        # masks, write rows, all built once here for every layer. A learner's function plugged in takes no plan.
        own_attn, own_write = self.attention is paged_attention, self.write_kv is write_kv
        plan = None
        if own_attn or own_write:
            plan = plan_attention(block_tables, seq_idx, limits, num_blocks=self.num_blocks, kv_heads=nkv,
                                  block_size=self.block_size, blocks_per_tile=self.blocks_per_tile,
                                  slots=slots if own_write else None)
        attn_kw = {"plan": plan} if own_attn else {}
        write_kw = {"plan": plan} if own_write else {}
        for blk, k_pool, v_pool in zip(self.blocks, self.k_pool, self.v_pool, strict=True):  # pools (N, KV, bs, D)
            h = rms_norm(x, blk.attn_norm, self.eps)
            qkv = F.linear(h, blk.wqkv, blk.bqkv)  # (T, (H + 2KV) D)
            qk = qkv[:, : (nh + nkv) * d].view(t, nh + nkv, d)  # (T, H + KV, D)
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin  # RoPE on q and k at once
            q, k = qk[:, :nh], qk[:, nh:]  # (T, H, D), (T, KV, D)
            v = qkv[:, (nh + nkv) * d:].view(t, nkv, d)  # (T, KV, D)
            self.write_kv(k_pool, v_pool, k, v, slots, self.block_size, **write_kw)
            y = self.attention(q, k_pool, v_pool, block_tables, seq_idx, limits, self.scale,
                               blocks_per_tile=self.blocks_per_tile, **attn_kw)  # (T, H, D)
            x = x + F.linear(y.reshape(t, nh * d), blk.wo, blk.bo)  # (T, C)
            h = rms_norm(x, blk.mlp_norm, self.eps)
            gate, up = F.linear(h, blk.w_gate_up, blk.b_gate_up).chunk(2, dim=-1)  # (T, I) each
            x = x + F.linear(F.silu(gate) * up, blk.w_down, blk.b_down)  # (T, C)
        x = rms_norm(x[logit_rows], self.norm, self.eps)  # (R, C)
        return F.linear(x, self.lm_head)  # (R, V)
