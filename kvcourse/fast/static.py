"""The static-shape fast path: a decode step whose tensor shapes never change, what a CUDA graph can capture.

Each step attends over the whole buffer ``(B, KV, S_max, D)`` and masks the slots not yet written, as
gpt-fast's ``model.py`` and ``transformers``' ``StaticLayer`` (``cache_utils.py``) do. Everything that
changes from step to step is read from a tensor, never from a Python int (a captured graph would
replay a Python int as a constant):

- ``slot`` (B,): where each row writes its new key and value (``scatter_``; ``transformers``'
  ``StaticLayer.update`` writes at ``cache_position`` with ``index_copy_``, gpt-fast at ``input_pos``);
- ``rope_pos`` (B,): each row's position for RoPE (its slot minus its left padding);
- ``slot_mask`` (B, S): the slots each row may attend to, updated in place for the new token.

Rows may sit at different lengths (``prefill_row``), which is what a serving engine needs. Masked
slots add exact zeros, so float32 tokens equal the dynamic step's; but reading the whole capacity costs
bandwidth, so size ``max_seq_len`` to what the calls need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cache import CacheOverflowError
from .base import FastGeneratorBase


@dataclass
class StaticState:
    """The fixed buffers a static decode step reads its inputs from (and the graph captured over them)."""

    token: torch.Tensor  # (B, 1) long: the token to run
    slot: torch.Tensor  # (B,) long: the cache slot each row writes to
    rope_pos: torch.Tensor  # (B,) long: its position in each row
    slot_mask: torch.Tensor  # (B, S) bool: the slots each row may attend to
    lengths: list[int] = field(default_factory=list)  # the slots, mirrored on the host (overflow check, no sync)
    graph: object | None = None  # a captured torch.cuda.CUDAGraph (GraphedStaticGenerator)
    logits: torch.Tensor | None = None  # (B, V): the graph's output buffer


class StaticGenerator(FastGeneratorBase):
    """Greedy generation with the static-shape decode step, run eagerly (or compiled with ``compile=True``:
    ``torch.compile(dynamic=False)``, its norms, RoPE and SiLU fused into fewer kernels)."""

    static, cuda_graph = True, False

    def __init__(self, model, *, compile: bool = False, max_seq_len: int | None = None):
        self._step = self._decode_static  # the step: eager, or its compiled version
        self._states: dict[int, StaticState] = {}  # per batch size
        self.state: StaticState | None = None  # the batch being decoded
        super().__init__(model, compile=compile, max_seq_len=max_seq_len)

    def _compile_step(self) -> None:
        # static shapes: one graph per batch size (a CUDA graph can then capture the compiled step)
        self._step = torch.compile(self._decode_static, dynamic=False, fullgraph=True)

    def _uncompile(self) -> None:
        self._step = self._decode_static
        self._cache_reallocated()  # a graph captured over the failed step is dropped too

    def _cache_reallocated(self) -> None:
        self._states.clear()  # buffers sized to the old cache, graphs reading the old buffers
        self.state = None

    def setup_caches(self, batch_size: int, max_seq_len: int) -> None:
        """Size the cache (see ``FastGeneratorBase``) and make the buffers of ``batch_size`` rows current."""
        super().setup_caches(batch_size, max_seq_len)
        st = self._states.get(batch_size)
        if st is None:
            dev, s = self.device, self.max_seq_len
            st = StaticState(token=torch.zeros(batch_size, 1, dtype=torch.long, device=dev),
                             slot=torch.zeros(batch_size, dtype=torch.long, device=dev),
                             rope_pos=torch.zeros(batch_size, dtype=torch.long, device=dev),
                             slot_mask=torch.zeros(batch_size, s, dtype=torch.bool, device=dev),
                             lengths=[0] * batch_size)
            self._states[batch_size] = st
        self.state = st

    def _decode_static(self, token: torch.Tensor, slot: torch.Tensor, rope_pos: torch.Tensor,
                       slot_mask: torch.Tensor) -> torch.Tensor:
        """One decode step, the same shapes every time: logits (B, V).

        token (B, 1); slot (B,) and rope_pos (B,) long; slot_mask (B, S) bool, updated here for the new token.
        """
        b = token.shape[0]
        x = F.embedding(token, self.embed)  # (B, 1, C)
        cos = self.cos[rope_pos][:, None, None, :]  # (B, 1, 1, D): each row its own position
        sin = self.sin_signed[rope_pos][:, None, None, :]
        slot_mask.scatter_(1, slot[:, None], True)  # (B, S): each row's new slot is real
        mask = slot_mask[:, None, None, :]  # (B, 1, 1, S): one query per row
        where = slot.view(b, 1, 1, 1).expand(b, self.n_kv, 1, self.head_dim)  # (B, KV, 1, D): row r -> slot[r]
        for i, blk in enumerate(self.blocks):
            q, k, v = self._qkv(blk, x, cos, sin)
            keys, values = self.k_cache[i, :b], self.v_cache[i, :b]  # (B, KV, S, D): the whole buffer, always
            keys.scatter_(2, where, k)  # in place, at positions read from a tensor
            values.scatter_(2, where, v)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                               enable_gqa=self.gqa)  # (B, H, 1, D)
            x = self._out_and_mlp(blk, x, y)
        return self._logits(x)

    # ---- the loop's two halves ----------------------------------------------------------------------
    def _begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int) -> torch.Tensor:
        """Prefill every row (left-padded rows share one length T), then point each row's buffers at slot T."""
        b, t = input_ids.shape
        logits = self._prefill(input_ids, attention_mask)  # eager: the prompt's length changes from call to call
        st = self.state
        prompt_mask = (torch.ones(b, t, dtype=torch.bool, device=self.device) if attention_mask is None
                       else attention_mask.bool())  # (B, T)
        st.slot_mask.zero_()
        st.slot_mask[:, :t] = prompt_mask  # (B, S): the prompt's real tokens; the step adds each new one
        st.slot.fill_(t)
        st.rope_pos.copy_(prompt_mask.sum(dim=1))  # (B,): each row's next position
        st.lengths = [t] * b
        return logits

    @torch.inference_mode()
    def prefill_row(self, row: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Prefill one row alone, at its own length: input_ids (1, T) into slots 0..T-1 of ``row`` of the
        current batch (``setup_caches``). Returns its logits (1, V); the other rows are untouched."""
        st = self.state
        if st is None:
            raise ValueError("prefill_row needs the batch's buffers first: call setup_caches(batch_size, max_seq_len)")
        self.check_inputs(input_ids, 0)
        b, t = len(st.lengths), input_ids.shape[1]
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < b:
            raise ValueError(f"row must be an int in 0..{b - 1} (the batch set up), got {row!r}")
        if input_ids.shape[0] != 1:
            raise ValueError(f"prefill_row takes one prompt, shape (1, T), got {tuple(input_ids.shape)}")
        if t >= self.max_seq_len:
            raise CacheOverflowError(f"a {t}-token prompt leaves no slot to decode into: max_seq_len={self.max_seq_len}")
        logits = self._forward(input_ids, 0, causal=t > 1, rows=slice(row, row + 1))  # (1, V)
        st.slot_mask[row] = False
        st.slot_mask[row, :t] = True
        st.slot[row], st.rope_pos[row], st.lengths[row] = t, t, t
        return logits

    @torch.inference_mode()
    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        """token (B, 1), each row at its own slot: logits (B, V); every row then moves on by one slot."""
        st = self.state
        if st is None:
            raise ValueError("decode_one_token needs the batch's buffers: call setup_caches(batch_size, max_seq_len) "
                             "and prefill_row (or generate) first")
        if token.shape != st.token.shape:
            raise ValueError(f"token must be (batch, 1) = {tuple(st.token.shape)}, got {tuple(token.shape)}")
        if max(st.lengths) >= self.max_seq_len:
            raise CacheOverflowError(f"the cache holds max_seq_len={self.max_seq_len} tokens per row; row "
                                     f"{st.lengths.index(max(st.lengths))} is full (position {max(st.lengths)})")
        st.token.copy_(token)
        logits = self._run_step(st)
        st.slot.add_(1)  # outside the step: capturing or re-running the step changes nothing
        st.rope_pos.add_(1)
        st.lengths = [n + 1 for n in st.lengths]
        return logits

    def _run_step(self, st: StaticState) -> torch.Tensor:
        return self._step(st.token, st.slot, st.rope_pos, st.slot_mask)
