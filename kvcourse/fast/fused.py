"""The fused weights every fast generator shares: one block's matrices stacked so that a decode step does
one matrix-vector product where the model does three (q, k, v) or two (gate, up).

q/k/v as gpt-fast's ``wqkv`` (``model.py``, which keeps ``w1``/``w3`` apart) and vLLM's ``QKVParallelLinear``;
gate/up as vLLM's ``gate_up_proj`` (``MergedColumnParallelLinear``).
The rows are the model's own rows, stacked: every output element is the same dot product, so float32
tokens stay identical to ``transformers``' ``LlamaForCausalLM``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in float32, op for op as ``transformers``' ``LlamaRMSNorm``."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight must be ({x.shape[-1]},), the hidden size of x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_table(inv_freq: torch.Tensor, rope_scale: float, length: int, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin for positions 0..length-1, each (length, D), as ``LlamaRotaryEmbedding``.

    ``rotate_half(x) * sin == x.roll(D/2, -1) * [-sin_1, sin_2]``: the minus sign of ``rotate_half`` is folded
    into the table, so RoPE is ``x * cos + x.roll(D // 2, dims=-1) * sin_signed``.
    """
    pos = torch.arange(length, device=device)
    freqs = pos[:, None].float() * inv_freq.to(device).float()[None, :]  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    cos = (emb.cos() * rope_scale).to(dtype)  # (S, D)
    sin = (emb.sin() * rope_scale).to(dtype)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # (S, D) each


@dataclass
class FusedBlock:
    """One transformer block's weights, fused. C = hidden, H/KV = query/key-value heads, D = head_dim, I = MLP."""

    attn_norm: torch.Tensor  # (C,)
    wqkv: torch.Tensor  # ((H + 2 KV) D, C): rows of q_proj, then k_proj, then v_proj
    bqkv: torch.Tensor | None  # ((H + 2 KV) D,) or None
    wo: torch.Tensor  # (C, H D)
    bo: torch.Tensor | None
    mlp_norm: torch.Tensor  # (C,)
    w_gate_up: torch.Tensor  # (2 I, C): rows of gate_proj, then up_proj
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor  # (C, I)
    b_down: torch.Tensor | None

    @classmethod
    def from_layer(cls, layer) -> FusedBlock:
        """Fuse one ``kvcourse.llama`` decoder layer (copies of q/k/v and gate/up, the rest shared)."""
        if not all(hasattr(layer, name) for name in ("attn", "mlp", "attn_norm", "mlp_norm")):
            raise TypeError(f"FusedBlock.from_layer takes a decoder layer of the course's Llama (.attn, .mlp), got "
                            f"{type(layer).__name__}: wrap a transformers model first, kvcourse.Llama.from_hf(model)")
        att, mlp = layer.attn, layer.mlp
        wqkv, bqkv = _cat_rows(att.q_proj, att.k_proj, att.v_proj)
        w_gu, b_gu = _cat_rows(mlp.gate_proj, mlp.up_proj)
        return cls(attn_norm=layer.attn_norm.weight.detach(), wqkv=wqkv, bqkv=bqkv,
                   wo=att.o_proj.weight.detach(), bo=_bias(att.o_proj),
                   mlp_norm=layer.mlp_norm.weight.detach(), w_gate_up=w_gu, b_gate_up=b_gu,
                   w_down=mlp.down_proj.weight.detach(), b_down=_bias(mlp.down_proj))


def _cat_rows(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weight rows (and biases) of several nn.Linear with the same input size."""
    w = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse linear layers where only some have a bias")
    b = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    return w, b


def _bias(lin) -> torch.Tensor | None:
    return None if lin.bias is None else lin.bias.detach()


def check_one_dtype_and_device(model) -> None:
    """Refuse a model whose weights are not all one dtype on one device: fusing would promote them silently
    (``torch.cat`` of float32 and bfloat16 rows is float32) or fail inside torch."""
    first_name, first = next(iter(model.named_parameters()))
    for name, p in model.named_parameters():
        if p.dtype != first.dtype or p.device != first.device:
            raise ValueError(
                f"FastGenerator needs every weight in one dtype on one device: expected {first.dtype} on "
                f"{first.device} (as {first_name}), got {p.dtype} on {p.device} for {name}; call model.to(dtype) first"
            )
