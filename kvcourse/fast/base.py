"""What every fast generator shares: the fused weights, the preallocated cache, the prefill and the loop.

``FastGeneratorBase`` holds the model as fused matrices (``fused.FusedBlock``), a RoPE table, and one
preallocated cache ``(layers, B, KV, S_max, D)`` written in place (gpt-fast's ``KVCache``,
``transformers``' ``StaticCache``). Its ``forward`` is the dynamic-shape pass the prefill uses (and the
dynamic decode step). ``generate`` is gpt-fast's ``generate.py`` loop: ``prefill``, then
``decode_one_token`` until ``max_new_tokens`` (or every row has produced an EOS id). The subclasses
differ only in their decode step: ``DynamicGenerator`` (dynamic.py), ``StaticGenerator`` (static.py),
``GraphedStaticGenerator`` (graphed.py).

References: gpt-fast (PyTorch Labs, ``generate.py``: ``prefill``/``decode_one_token``/``generate``;
``model.py``); ``transformers`` ``models/llama/modeling_llama.py`` and ``cache_utils.StaticCache``.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..generate import as_llama
from ..llama import Llama, padding_causal_mask, positions_from_mask
from .checks import check_count as _check_count
from .checks import check_inputs
from .fused import FusedBlock, check_one_dtype_and_device, rms_norm, rope_table


class FastGeneratorBase:
    """Greedy generation for a Llama (``kvcourse.llama.Llama`` or a ``transformers`` ``LlamaForCausalLM``).

    Subclasses define ``_begin`` (the prefill, and what the decode steps need) and ``decode_one_token``.
    The cache is allocated on first use (or ``setup_caches``) and kept, grown when a call needs more.
    """

    def __init__(self, model, *, compile: bool = False, max_seq_len: int | None = None):
        llama = as_llama(model)  # a transformers Llama is wrapped (same weights); another model: a TypeError
        if not isinstance(llama, Llama):
            raise TypeError(f"{type(self).__name__} takes the course's Llama or a transformers LlamaForCausalLM, "
                            f"got {type(model).__name__}")
        if max_seq_len is not None:
            _check_count("max_seq_len", max_seq_len, 1, "None or an int")
        check_one_dtype_and_device(llama)
        a = llama.args
        if a.sliding_window is not None:
            raise ValueError(f"FastGenerator attends to every cached token; this model has a sliding window of "
                             f"{a.sliding_window} (Mistral), so its tokens would be wrong. Use kvcourse.generate.generate "
                             f"with a kvcourse.SlidingWindowCache")
        if a.num_heads % a.num_kv_heads:
            raise ValueError(f"num_heads {a.num_heads} is not a multiple of num_kv_heads {a.num_kv_heads}")
        self.args, self.vocab_size = a, a.vocab_size
        self.n_heads, self.n_kv, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.gqa = a.num_heads != a.num_kv_heads  # SDPA shares each KV head among H / KV query heads
        self.eps, self.scale = a.rms_norm_eps, a.head_dim**-0.5  # scale: what transformers passes to SDPA
        self.device, self.dtype = llama.device, llama.dtype
        self.embed = llama.embed.weight.detach()  # (V, C)
        self.norm = llama.norm.weight.detach()  # (C,)
        self.lm_head = llama.lm_head.weight.detach()  # (V, C), the embedding itself when tied
        with torch.no_grad():
            self.blocks = [FusedBlock.from_layer(layer) for layer in llama.layers]
        self.inv_freq, self.rope_scale = llama.inv_freq.detach(), llama.rope_scale
        self.batch_size = self.max_seq_len = 0
        self.k_cache = self.v_cache = None
        self.max_seq_len_requested = max_seq_len or 0
        self._rope_table(max_seq_len or 256)
        self.compiled = False
        self.compile_seconds = 0.0  # the first run of the compiled step: the compilation
        self.capture_seconds = 0.0  # CUDA graph capture alone (GraphedStaticGenerator)
        self._warm = not compile  # a compiled step is compiled by its first run: warmup()
        if compile:
            self.compiled = self._compile()

    @property
    def compile_capture_seconds(self) -> float:
        """The one-off cost paid before the first fast token: compilation + graph capture."""
        return self.compile_seconds + self.capture_seconds

    # ---- set-up -------------------------------------------------------------------------------------
    def _rope_table(self, length: int) -> None:
        """cos and (sign-folded) sin for positions 0..length-1, each (length, D): ``fused.rope_table``."""
        self.cos, self.sin_signed = rope_table(self.inv_freq, self.rope_scale, length, self.device, self.dtype)
        self.rope_len = length

    @torch.inference_mode()
    def setup_caches(self, batch_size: int, max_seq_len: int) -> None:
        """(Re)allocate the KV cache if it is too small for ``batch_size`` x ``max_seq_len``."""
        _check_count("batch_size", batch_size, 1)
        _check_count("max_seq_len", max_seq_len, 1)
        max_seq_len = max(max_seq_len, self.max_seq_len_requested)
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
        self._cache_reallocated()

    def _cache_reallocated(self) -> None:
        """Hook: the buffers are new (a static generator drops its state and graphs here)."""

    def _compile(self) -> bool:
        """Compile the decode step (``_compile_step``), or warn and stay eager when there is no C++ compiler."""
        if not any(name and shutil.which(name) for name in (os.environ.get("CXX"), "g++", "c++", "clang++")):
            warnings.warn("torch.compile needs a C++ compiler (g++ or clang++) and none was found: running eagerly",
                          RuntimeWarning, stacklevel=4)
            return False
        self._compile_step()
        return True

    def _compile_step(self) -> None:
        raise NotImplementedError

    def _uncompile(self) -> None:
        raise NotImplementedError

    # ---- the model ----------------------------------------------------------------------------------
    def _qkv(self, blk: FusedBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Norm, the fused q/k/v projection and RoPE for one layer: q (B, H, T, D), k and v (B, KV, T, D)."""
        b, t, _ = x.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        h = rms_norm(x, blk.attn_norm, self.eps)
        qkv = self._linear(h, blk, "qkv")  # (B, T, (H + 2KV) D)
        qk = qkv[..., : (nh + nkv) * d].view(b, t, nh + nkv, d)  # (B, T, H + KV, D)
        qk = qk * cos + qk.roll(d // 2, dims=-1) * sin  # RoPE on q and k at once
        q = qk[:, :, :nh].transpose(1, 2)  # (B, H, T, D)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, KV, T, D)
        v = qkv[..., (nh + nkv) * d:].view(b, t, nkv, d).transpose(1, 2)  # (B, KV, T, D)
        return q, k, v

    def _out_and_mlp(self, blk: FusedBlock, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attention output y (B, H, T, D) through o_proj into the residual, then the MLP: x (B, T, C)."""
        b, t, _ = x.shape
        x = x + self._linear(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), blk, "o")  # (B, T, C)
        h = rms_norm(x, blk.mlp_norm, self.eps)
        gate, up = self._linear(h, blk, "gate_up").chunk(2, dim=-1)  # (B, T, I) each
        return x + self._linear(F.silu(gate) * up, blk, "down")  # (B, T, C)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x[:, -1], self.norm, self.eps)  # (B, C): the last position only
        return self._linear(x, None, "lm_head")  # (B, V)

    _WEIGHTS = {"qkv": ("wqkv", "bqkv"), "o": ("wo", "bo"), "gate_up": ("w_gate_up", "b_gate_up"),
                "down": ("w_down", "b_down")}

    def _linear(self, x: torch.Tensor, blk: FusedBlock | None, name: str) -> torch.Tensor:
        """x times one fused weight of layer ``blk`` ("qkv", "o", "gate_up", "down"), or the LM head (``blk`` None).
        The one place a weight multiplies: ``kvcourse.int8_weights.Int8DynamicGenerator`` swaps it for int8."""
        if blk is None:
            return F.linear(x, self.lm_head)
        w, b = self._WEIGHTS[name]
        return F.linear(x, getattr(blk, w), getattr(blk, b))

    def _forward(self, ids: torch.Tensor, pos: int, causal: bool = False, positions: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, rows: slice | None = None) -> torch.Tensor:
        """Logits (B, V) for the last of ``ids`` (B, T), which sit in cache slots pos..pos+T-1 of ``rows``.

        Prefill: the whole prompt at pos == 0, ``causal=True``. Decode: one token (T == 1), ``causal=False``
        (the one query may see every cached key). A left-padded batch also passes its rows' RoPE
        ``positions`` (B, T) and a boolean attention ``mask`` (B, 1, T, pos + T) that holds the causal part.
        Attention reads the filled slots only, ``[:pos + T]``: a shape that grows every step.
        ``rows``: the cache rows these ids belong to (default the first B).
        """
        b, t = ids.shape
        rows = slice(0, b) if rows is None else rows
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
            self.k_cache[i, rows, :, pos:end] = k  # in place: no allocation, no copy of the past
            self.v_cache[i, rows, :, pos:end] = v
            keys, values = self.k_cache[i, rows, :, :end], self.v_cache[i, rows, :, :end]  # (B, KV, pos + T, D)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal and mask is None,
                                               scale=self.scale, enable_gqa=self.gqa)  # (B, H, T, D)
            x = self._out_and_mlp(blk, x, y)
        return self._logits(x)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Checked ``_prefill``: the cache must hold the batch (``setup_caches``). ``generate`` is the whole loop."""
        self.check_inputs(input_ids, 0, attention_mask)
        b, t = input_ids.shape
        if b > self.batch_size or t > self.max_seq_len:
            raise ValueError(f"the cache holds {self.batch_size} rows x {self.max_seq_len} slots, the prompt needs "
                             f"{b} x {t}: call setup_caches({b}, {t} + new tokens) first")
        return self._prefill(input_ids, attention_mask)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt at slots 0..T-1, eager (its length changes from call to call): logits (B, V) of its last
        position. A left-padded prompt gets each row's positions and the padding + causal mask from its mask."""
        t = input_ids.shape[1]
        if attention_mask is None:
            return self._forward(input_ids, 0, causal=t > 1)
        prompt_mask = attention_mask.bool()  # (B, T)
        return self._forward(input_ids, 0, positions=positions_from_mask(prompt_mask),
                             mask=padding_causal_mask(prompt_mask, t))

    # ---- generation ---------------------------------------------------------------------------------
    def check_inputs(self, input_ids, max_new_tokens, attention_mask=None, eos_token_id=None, pad_token_id=None):
        """Everything ``kvcourse.generate.generate`` refuses, refused with the same words (``checks.py``);
        returns the EOS ids (a 1-D tensor, or None) and the pad id. Nothing is changed when it raises."""
        return check_inputs(input_ids, max_new_tokens, self.device, self.vocab_size, attention_mask, eos_token_id,
                            pad_token_id)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 callback: Callable[[torch.Tensor], object] | None = None, *,
                 attention_mask: torch.Tensor | None = None, eos_token_id=None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """(B, T) -> (B, T + max_new_tokens): prompt, then greedy (argmax) tokens, as ``kvcourse.generate``.

        ``callback``, if given, is called with each new token (B, 1), still on the device (gpt-fast's hook:
        streaming, or per-step timing; reading the token there makes the host wait for the device).
        ``attention_mask``: ``None`` or (B, T) of 0/1 for a left-padded batch, as ``transformers`` takes it.
        ``eos_token_id``: ``None`` (exactly max_new_tokens; the host never waits for the device), an id or a
        list of ids: a finished row then emits ``pad_token_id`` and the call stops when every row is finished
        (one host read per step, as ``transformers``' stopping criteria).
        """
        eos, pad = self.check_inputs(input_ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id)
        b, t = input_ids.shape
        if max_new_tokens == 0:
            return input_ids.clone()
        if not self._warm:
            self.warmup(b, t, max_new_tokens)  # sized for this call: the timed calls reuse cache and graph
        self.setup_caches(b, t + max_new_tokens)
        out = torch.empty(b, t + max_new_tokens, dtype=torch.long, device=self.device)  # (B, T + N)
        out[:, :t] = input_ids
        finished = None if eos is None else torch.zeros(b, dtype=torch.bool, device=self.device)  # (B,)
        for i in range(t, t + max_new_tokens):
            if i == t:
                logits = self._begin(input_ids, attention_mask, max_new_tokens)  # (B, V)
            else:
                logits = self.decode_one_token(out[:, i - 1:i])  # the token just written
            nxt = logits.argmax(dim=-1)  # (B,)
            if eos is not None:
                nxt = nxt.masked_fill(finished, pad)  # a finished row keeps emitting padding
                finished |= torch.isin(nxt, eos)  # any of the EOS ids ends the row
            out[:, i] = nxt
            if callback is not None:
                callback(out[:, i:i + 1])
            if eos is not None and finished.all():
                return out[:, :i + 1]
        return out

    def _begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no decode path (_begin): use DynamicGenerator, "
                                  f"StaticGenerator or GraphedStaticGenerator")

    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no decode step (decode_one_token): use "
                                  f"DynamicGenerator, StaticGenerator or GraphedStaticGenerator")

    @torch.inference_mode()
    def warmup(self, batch_size: int = 1, seq_len: int = 8, max_new_tokens: int = 3) -> float:
        """Compile (compile=True) and capture (CUDA graph) for these sizes; return the seconds it took.

        ``generate`` calls it with its own sizes when needed. The cache is sized for ``seq_len +
        max_new_tokens`` here, so a later ``generate(ids, max_new_tokens)`` of those sizes neither regrows it
        nor captures again. ``compile_seconds`` and ``capture_seconds`` record the two costs apart. If
        compilation fails (no working toolchain, an unsupported op), warn and fall back to eager.
        """
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1),
                                 ("max_new_tokens", max_new_tokens, 0)):
            _check_count(name, value, low)
        t0 = time.perf_counter()
        self._warm = True
        self.setup_caches(batch_size, seq_len + max(max_new_tokens, 1))
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=self.device)
        try:
            self._warm_up(ids)
        except Exception as err:  # noqa: BLE001 - a failed compile must not break generation
            if not self.compiled:
                raise
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); running eagerly",
                          RuntimeWarning, stacklevel=2)
            self._uncompile()
            self.compiled = False
            self._warm_up(ids)
        self._sync()
        return time.perf_counter() - t0

    def _warm_up(self, ids: torch.Tensor) -> None:
        """Prefill a dummy prompt, then run the decode step once, timing its first (compiling) run."""
        first = self._begin(ids, None, 1).argmax(dim=-1, keepdim=True)  # (B, 1)
        self._sync()
        t0 = time.perf_counter()
        self.decode_one_token(first)
        self._sync()
        if self.compiled:
            self.compile_seconds += time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

