"""The course's fast path: greedy generation with a KV cache, written the way inference engines do it.

``kvcourse.generate.generate`` is the readable reference. ``FastGenerator`` does the same arithmetic, in
the same order as ``transformers``' ``LlamaForCausalLM`` (so float32 tokens are identical to
``generate(do_sample=False)``), but removes everything a decode step does not need:

1. **Preallocated cache.** One buffer for keys and one for values, ``(layers, B, KV, S_max, D)``,
   allocated once and written in place at the current position, as in gpt-fast's ``KVCache`` and
   ``transformers``' ``StaticCache``. Unlike those two, which attend over the whole buffer and mask
   the unfilled positions, attention here reads only the filled part, ``[:pos + 1]`` (``static=True``: see 8).
2. **Fused weights.** q, k and v projections stacked into one ``wqkv`` matrix, gate and up into one
   ``w_gate_up``: one matrix-vector product instead of three (or two) per layer, as gpt-fast's
   ``wqkv``/``w13`` and vLLM's ``QKVParallelLinear``/``MergedColumnParallelLinear``. The rows are the
   same, so every output element is the same dot product.
3. **RoPE from a table.** cos and sin for every position computed once; q and k are rotated together.
4. **Last position only.** Prefill computes logits for the last prompt token only (``logits_to_keep=1``
   in ``transformers``), decode for the one new token.
5. **Tokens stay on the device.** The output is one preallocated ``(B, T + N)`` tensor; each step
   writes its argmax into it and the next step reads its input from it. No ``.item()``, no
   ``.tolist()``, no ``.cpu()``: on a GPU the host never waits for the device until the caller reads
   the result.
6. ``torch.inference_mode`` (no autograd bookkeeping), no Python ``Cache`` objects, no logits
   processors, no stopping criteria: exactly ``max_new_tokens`` tokens, EOS not special.
7. Optionally ``torch.compile`` of the decode step (``compile=True``: dynamic shapes, one graph for
   every position; with ``static=True`` or ``cuda_graph=True`` the static-shape step is compiled, its
   norms, RoPE and SiLU fused into fewer kernels, and then captured). Compilation happens in
   ``warmup()``, so it stays out of per-token timings. Whether it pays depends on the machine, and
   compiling takes seconds to minutes: measure before relying on it (``python -m kvcourse.bench --compile`` reports compile time apart).
8. ``static=True``: a decode step whose shapes never change (``_decode_static``). It attends over the
   whole buffer ``(B, KV, S_max, D)`` and masks the slots not yet written, as gpt-fast's ``model.py``
   and ``transformers``' ``StaticLayer`` do, and reads the slot to write and each row's position from
   tensors. ``cuda_graph=True`` captures that step once in a ``torch.cuda.CUDAGraph`` (in ``warmup()``
   or the first call; ``capture_seconds``) and replays it each step: one launch instead of one per
   kernel. On a CPU it warns and runs the static step eagerly. The tokens equal the dynamic step's in
   float32 on CPU (tests/test_static.py); the masked slots add exact zeros, but reading the whole
   capacity costs bandwidth, so size ``max_seq_len`` to what the call needs.

Decoding one token reads every weight once and the whole KV cache once, and does about two flops
per weight: it is limited by memory bandwidth, not arithmetic. ``kvcourse.bench`` reports how close
this gets to that floor.

References: gpt-fast (PyTorch Labs, ``generate.py``/``model.py``, 2023); ``transformers``
``models/llama/modeling_llama.py`` and ``cache_utils.StaticCache``; Pope et al. 2022, "Efficiently
Scaling Transformer Inference" (decode is memory-bound); Kwon et al. 2023 (vLLM); Karpathy's nanoGPT.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .generate import check_generate_args
from .llama import Llama, check_attention_mask, padding_causal_mask, positions_from_mask


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in float32, op for op as ``LlamaRMSNorm``."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


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


class FastGenerator:
    """Greedy generation for a Llama (``kvcourse.llama.Llama`` or a ``transformers`` ``LlamaForCausalLM``).

    >>> gen = FastGenerator(hf_model)            # fuses q/k/v and gate/up once (copies of those weights)
    >>> out = gen.generate(input_ids, 300)       # (B, T) -> (B, T + 300), like generate(do_sample=False)

    The KV cache is allocated on first use and kept for later calls (grown when a call needs more
    batch or length). ``compile=True`` compiles the decode step with ``torch.compile``; if no C++
    compiler is found, or compilation fails, it warns and runs eagerly.
    """

    def __init__(self, model, *, compile: bool = False, max_seq_len: int | None = None, static: bool = False,
                 cuda_graph: bool = False):
        if not isinstance(model, Llama):
            model = Llama.from_hf(model)  # raises a clear TypeError for non-Llama models
        a = model.args
        if a.sliding_window is not None:
            raise ValueError(f"FastGenerator attends to every cached token; this model has a sliding window of "
                             f"{a.sliding_window} (Mistral), so its tokens would be wrong. Use kvcourse.generate.generate "
                             f"with a kvcourse.SlidingWindowCache")
        self.args = a
        self.n_heads, self.n_kv, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        if a.num_heads % a.num_kv_heads:
            raise ValueError(f"num_heads {a.num_heads} is not a multiple of num_kv_heads {a.num_kv_heads}")
        self.gqa = a.num_heads != a.num_kv_heads  # SDPA shares each KV head among H / KV query heads
        self.eps = a.rms_norm_eps
        self.scale = a.head_dim**-0.5  # what transformers passes to SDPA as `scaling`
        self.device, self.dtype = model.device, model.dtype
        with torch.no_grad():
            self.embed = model.embed.weight.detach()  # (V, C)
            self.norm = model.norm.weight.detach()  # (C,)
            self.lm_head = model.lm_head.weight.detach()  # (V, C), the embedding itself when tied
            self.blocks = []
            for layer in model.layers:
                att, mlp = layer.attn, layer.mlp
                wqkv, bqkv = _cat_rows(att.q_proj, att.k_proj, att.v_proj)
                w_gu, b_gu = _cat_rows(mlp.gate_proj, mlp.up_proj)
                self.blocks.append(FusedBlock(
                    attn_norm=layer.attn_norm.weight.detach(), wqkv=wqkv, bqkv=bqkv,
                    wo=att.o_proj.weight.detach(), bo=_bias(att.o_proj),
                    mlp_norm=layer.mlp_norm.weight.detach(), w_gate_up=w_gu, b_gate_up=b_gu,
                    w_down=mlp.down_proj.weight.detach(), b_down=_bias(mlp.down_proj),
                ))
        self.inv_freq, self.rope_scale = model.inv_freq.detach(), model.rope_scale
        self.max_seq_len = 0
        self.batch_size = 0
        self.k_cache = self.v_cache = None
        self._rope_table(max_seq_len or 256)
        self.compile_requested = compile
        self.compiled = False
        self.compile_seconds = 0.0
        self.capture_seconds = 0.0  # CUDA graph capture, included in warmup()'s time
        self._decode = self._forward  # the decode step: eager, or its compiled version
        self._step = self._decode_static  # the static-shape decode step: eager, or compiled
        self._warm = not compile  # a compiled step is compiled (and checked) by its first run: warmup()
        self.static = static or cuda_graph
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        if cuda_graph and not self.cuda_graph:
            warnings.warn(f"CUDA graphs need a CUDA device, the model is on {self.device}: running the static-shape "
                          f"decode step eagerly", RuntimeWarning, stacklevel=2)
        self._static_states: dict[int, _StaticState] = {}  # per batch size: input buffers (and the graph)
        self.max_seq_len_requested = max_seq_len or 0
        if compile:
            self._compile()

    # ---- set-up -------------------------------------------------------------------------------------
    def _rope_table(self, length: int) -> None:
        """cos and (sign-folded) sin for positions 0..length-1, each (length, D), as LlamaRotaryEmbedding."""
        pos = torch.arange(length, device=self.device)
        freqs = pos[:, None].float() * self.inv_freq.to(self.device).float()[None, :]  # (S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
        self.cos = (emb.cos() * self.rope_scale).to(self.dtype)  # (S, D)
        sin = (emb.sin() * self.rope_scale).to(self.dtype)
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_1, sin_2]: fold rotate_half's minus sign into the table
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # (S, D)
        self.rope_len = length

    def setup_caches(self, batch_size: int, max_seq_len: int) -> None:
        """(Re)allocate the KV cache if it is too small for ``batch_size`` x ``max_seq_len``."""
        if batch_size <= self.batch_size and max_seq_len <= self.max_seq_len:
            return
        batch_size, max_seq_len = max(batch_size, self.batch_size), max(max_seq_len, self.max_seq_len)
        shape = (len(self.blocks), batch_size, self.n_kv, max_seq_len, self.head_dim)  # (L, B, KV, S, D)
        # zeros, not empty: the static step reads every slot and masks the unwritten ones, and a masked weight
        # of exactly 0 times a NaN left in uninitialised memory is NaN (the dynamic step reads written slots only)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        if max_seq_len > self.rope_len:
            self._rope_table(max_seq_len)
        self._static_states.clear()  # captured graphs read the old buffers: capture again

    def _compile(self) -> None:
        """Compile the decode step, or warn and stay eager when there is no compiler to compile with."""
        if not any(name and shutil.which(name) for name in (os.environ.get("CXX"), "g++", "c++", "clang++")):
            warnings.warn("torch.compile needs a C++ compiler (g++ or clang++) and none was found: running eagerly",
                          RuntimeWarning, stacklevel=3)
            return
        if self.static:
            # static shapes: one graph per batch size, whose elementwise work (norms, RoPE, SiLU) inductor
            # fuses into a few kernels; with cuda_graph=True the compiled step is then captured like the eager one
            self._step = torch.compile(self._decode_static, dynamic=False, fullgraph=True)
        else:
            # dynamic: one graph for every position (the cache slice grows by one each step) and batch size
            self._decode = torch.compile(self._forward, dynamic=True, fullgraph=True)
        self.compiled = True

    # ---- the model ----------------------------------------------------------------------------------
    def _qkv(self, blk: FusedBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Norm, the fused q/k/v projection and RoPE for one layer: q (B, H, T, D), k and v (B, KV, T, D)."""
        b, t, _ = x.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        h = rms_norm(x, blk.attn_norm, self.eps)
        qkv = F.linear(h, blk.wqkv, blk.bqkv)  # (B, T, (H + 2KV) D)
        qk = qkv[..., : (nh + nkv) * d].view(b, t, nh + nkv, d)  # (B, T, H + KV, D)
        qk = qk * cos + qk.roll(d // 2, dims=-1) * sin  # RoPE on q and k at once
        q = qk[:, :, :nh].transpose(1, 2)  # (B, H, T, D)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, KV, T, D)
        v = qkv[..., (nh + nkv) * d:].view(b, t, nkv, d).transpose(1, 2)  # (B, KV, T, D)
        return q, k, v

    def _out_and_mlp(self, blk: FusedBlock, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attention output y (B, H, T, D) through o_proj into the residual, then the MLP: x (B, T, C)."""
        b, t, _ = x.shape
        x = x + F.linear(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), blk.wo, blk.bo)  # (B, T, C)
        h = rms_norm(x, blk.mlp_norm, self.eps)
        gate, up = F.linear(h, blk.w_gate_up, blk.b_gate_up).chunk(2, dim=-1)  # (B, T, I) each
        return x + F.linear(F.silu(gate) * up, blk.w_down, blk.b_down)  # (B, T, C)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x[:, -1], self.norm, self.eps)  # (B, C): the last position only
        return F.linear(x, self.lm_head)  # (B, V)

    def _forward(self, ids: torch.Tensor, pos: int, causal: bool = False, positions: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) for the last of ``ids`` (B, T), which sit in cache slots pos..pos+T-1.

        Prefill: the whole prompt at pos == 0, ``causal=True``. Decode: one token (T == 1), ``causal=False``
        (the one query may see every cached key). A left-padded batch also passes its rows' RoPE
        ``positions`` (B, T) and a boolean attention ``mask`` (B, 1, T, pos + T) that holds the causal part.
        Attention reads the filled slots only, ``[:pos + T]``: a shape that grows every step.
        """
        b, t = ids.shape
        end = pos + t
        x = F.embedding(ids, self.embed)  # (B, T, C)
        if positions is None:
            cos = self.cos[pos:end, None, :]  # (T, 1, D): broadcasts over heads
            sin = self.sin_signed[pos:end, None, :]
        else:
            cos = self.cos[positions][:, :, None, :]  # (B, T, 1, D): each row its own positions
            sin = self.sin_signed[positions][:, :, None, :]
        for i, blk in enumerate(self.blocks):
            q, k, v = self._qkv(blk, x, cos, sin)
            self.k_cache[i, :b, :, pos:end] = k  # in place: no allocation, no copy of the past
            self.v_cache[i, :b, :, pos:end] = v
            keys, values = self.k_cache[i, :b, :, :end], self.v_cache[i, :b, :, :end]  # (B, KV, pos + T, D)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal and mask is None,
                                               scale=self.scale, enable_gqa=self.gqa)  # (B, H, T, D)
            x = self._out_and_mlp(blk, x, y)
        return self._logits(x)

    def _decode_static(self, token: torch.Tensor, slot: torch.Tensor, rope_pos: torch.Tensor,
                       slot_mask: torch.Tensor) -> torch.Tensor:
        """One decode step whose tensor shapes never change: what a CUDA graph can capture.

        token (B, 1); slot (1,) long, the cache slot to write, a *tensor* so that a captured graph reads
        the current value; rope_pos (B, 1) long, each row's position; slot_mask (B, S) bool, the slots
        each row may attend to, updated here for the new token. Attention reads the whole buffer
        (B, KV, S, D) and masks the rest, as gpt-fast's ``model.py`` and ``transformers``' ``StaticLayer`` do.
        """
        b = token.shape[0]
        x = F.embedding(token, self.embed)  # (B, 1, C)
        cos = self.cos[rope_pos][:, :, None, :]  # (B, 1, 1, D)
        sin = self.sin_signed[rope_pos][:, :, None, :]
        slot_mask.index_fill_(1, slot, True)  # the new token is real for every row
        mask = slot_mask[:, None, None, :]  # (B, 1, 1, S): one query per row
        for i, blk in enumerate(self.blocks):
            q, k, v = self._qkv(blk, x, cos, sin)
            keys, values = self.k_cache[i, :b], self.v_cache[i, :b]  # (B, KV, S, D): the whole buffer, always
            keys.index_copy_(2, slot, k)  # in place, at a position read from a tensor
            values.index_copy_(2, slot, v)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                               enable_gqa=self.gqa)  # (B, H, 1, D)
            x = self._out_and_mlp(blk, x, y)
        return self._logits(x)

    # ---- generation ---------------------------------------------------------------------------------
    def _check(self, input_ids, max_new_tokens) -> None:
        check_generate_args(input_ids, max_new_tokens, self.device)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 callback: Callable[[torch.Tensor], object] | None = None, *,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T + max_new_tokens): prompt, then greedy (argmax) tokens. EOS is not special.

        ``callback``, if given, is called with each new token (B, 1), still on the device (gpt-fast's hook:
        streaming, or per-step timing; reading the token there makes the host wait for the device).
        ``attention_mask``: ``None`` or (B, T) of 0/1 for a left-padded batch, as ``transformers`` takes it.
        """
        self._check(input_ids, max_new_tokens)
        b, t = input_ids.shape
        if attention_mask is not None:
            check_attention_mask(attention_mask, b, t, self.device)
        if max_new_tokens == 0:
            return input_ids.clone()
        if not self._warm:
            self.warmup(b, t)
        self.setup_caches(b, t + max_new_tokens)
        if self.static:
            return self._generate_static(input_ids, max_new_tokens, callback, attention_mask)
        out = torch.empty(b, t + max_new_tokens, dtype=torch.long, device=self.device)  # (B, T + N)
        out[:, :t] = input_ids
        positions = mask = None
        if attention_mask is not None:
            # every generated token is real: the mask is the prompt's, then ones; positions follow from it
            mask = torch.ones(b, t + max_new_tokens, dtype=torch.bool, device=self.device)  # (B, T + N)
            mask[:, :t] = attention_mask.bool()
            positions = positions_from_mask(mask)  # (B, T + N)
        out[:, t] = self._prefill(input_ids, attention_mask).argmax(dim=-1)
        if callback is not None:
            callback(out[:, t:t + 1])
        for i in range(t, t + max_new_tokens - 1):
            if mask is None:
                logits = self._decode(out[:, i:i + 1], i)  # the token just written, at position i
            else:  # one query sees every real key so far: the mask's causal part is all True
                logits = self._decode(out[:, i:i + 1], i, positions=positions[:, i:i + 1],
                                      mask=mask[:, None, None, :i + 1])
            out[:, i + 1] = logits.argmax(dim=-1)
            if callback is not None:
                callback(out[:, i + 1:i + 2])
        return out

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The prompt at slots 0..T-1, eager (its length changes from call to call): logits (B, V) of its last position.

        A left-padded prompt gets each row's positions and the padding + causal mask from its attention_mask.
        """
        t = input_ids.shape[1]
        if attention_mask is None:
            return self._forward(input_ids, 0, causal=t > 1)
        prompt_mask = attention_mask.bool()  # (B, T)
        return self._forward(input_ids, 0, positions=positions_from_mask(prompt_mask),
                             mask=padding_causal_mask(prompt_mask, t))

    def _generate_static(self, input_ids: torch.Tensor, max_new_tokens: int, callback, attention_mask) -> torch.Tensor:
        """generate() with the static-shape decode step (replayed as a CUDA graph when captured).

        Prefill runs the eager ``_forward`` (its length changes from prompt to prompt); each decode step
        then has the same shapes: the token, the slot and the positions are written into fixed buffers
        and the step (or its graph) reads them from there.
        """
        b, t = input_ids.shape
        st = self._static_state(b)  # captures the graph first, before the cache holds anything
        out = torch.empty(b, t + max_new_tokens, dtype=torch.long, device=self.device)  # (B, T + N)
        out[:, :t] = input_ids
        prompt_mask = (torch.ones(b, t, dtype=torch.bool, device=self.device) if attention_mask is None
                       else attention_mask.bool())  # (B, T)
        out[:, t] = self._prefill(input_ids, attention_mask).argmax(dim=-1)
        if callback is not None:
            callback(out[:, t:t + 1])
        st.slot_mask.zero_()
        st.slot_mask[:, :t] = prompt_mask  # (B, S): the prompt's real tokens; the step adds each new one
        st.rope_pos.copy_(prompt_mask.sum(dim=1, keepdim=True))  # (B, 1): each row's next position
        for i in range(t, t + max_new_tokens - 1):
            st.token.copy_(out[:, i:i + 1])
            st.slot.fill_(i)
            if st.graph is not None:
                st.graph.replay()  # the whole step, one launch; reads token/slot/rope_pos/slot_mask
                logits = st.logits
            else:
                logits = self._step(st.token, st.slot, st.rope_pos, st.slot_mask)
            out[:, i + 1] = logits.argmax(dim=-1)
            st.rope_pos.add_(1)
            if callback is not None:
                callback(out[:, i + 1:i + 2])
        return out

    def _static_state(self, b: int) -> _StaticState:
        """The fixed input buffers for batch size b (and, on a GPU with cuda_graph=True, the captured step)."""
        st = self._static_states.get(b)
        if st is not None:
            return st
        dev = self.device
        st = _StaticState(token=torch.zeros(b, 1, dtype=torch.long, device=dev),
                          slot=torch.zeros(1, dtype=torch.long, device=dev),
                          rope_pos=torch.zeros(b, 1, dtype=torch.long, device=dev),
                          slot_mask=torch.zeros(b, self.max_seq_len, dtype=torch.bool, device=dev))
        if self.cuda_graph:
            t0 = time.perf_counter()
            # Warm-up runs on a side stream (kernels chosen, memory pooled), then one capture. They write
            # slot 0 of the cache, which the prefill that follows overwrites; capturing runs nothing.
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):  # (a compiled step compiles in the first)
                    self._step(st.token, st.slot, st.rope_pos, st.slot_mask)
            torch.cuda.current_stream(dev).wait_stream(side)
            st.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(st.graph):
                st.logits = self._step(st.token, st.slot, st.rope_pos, st.slot_mask)  # (B, V), reused
            torch.cuda.synchronize(dev)
            self.capture_seconds += time.perf_counter() - t0
        self._static_states[b] = st
        return st

    def warmup(self, batch_size: int = 1, seq_len: int = 8, max_new_tokens: int = 3) -> float:
        """Run once (compiling with compile=True, capturing with cuda_graph=True); return the seconds it took.

        generate() calls it if needed. Pass the real sizes so the cache (and any graph, which is tied to
        the cache's size) is ready for them. If compilation fails (no working toolchain, an unsupported
        op), warn and fall back to eager.
        """
        self._warm = True
        self.setup_caches(batch_size, max(seq_len + max_new_tokens, self.max_seq_len_requested))
        t0 = time.perf_counter()
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=self.device)
        try:
            self.generate(ids, 3)
        except Exception as err:  # noqa: BLE001 - a failed compile must not break generation
            if not self.compiled:
                raise
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); running eagerly",
                          RuntimeWarning, stacklevel=2)
            self._decode, self._step, self.compiled = self._forward, self._decode_static, False
            self._static_states.clear()  # a graph captured over the failed step is dropped too
            self.generate(ids, 3)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds


@dataclass
class _StaticState:
    """Fixed buffers a static decode step reads its inputs from, and the graph captured over them."""

    token: torch.Tensor  # (B, 1) long: the token to run
    slot: torch.Tensor  # (1,) long: its cache slot
    rope_pos: torch.Tensor  # (B, 1) long: its position in each row
    slot_mask: torch.Tensor  # (B, S) bool: the slots each row may attend to
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # (B, V): the graph's output buffer


def fast_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """One-off convenience: ``FastGenerator(model).generate(input_ids, max_new_tokens)``."""
    return FastGenerator(model).generate(input_ids, max_new_tokens)
