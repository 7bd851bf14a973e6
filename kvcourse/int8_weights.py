"""Int8 weights, one scale per output channel: the decode lever at batch 1 that a smaller KV cache is not.

A decode step at batch 1 reads every weight once (notebook 07), so its time is set by the bytes of the
weights. Storing each ``nn.Linear`` weight ``(out, in)`` as int8 plus one float scale per output row reads
about a quarter of the float32 bytes (half of bfloat16's) per step. Activations, norms, the embedding and
the KV cache stay in the model's dtype ("weight-only" quantization).

Quantization (``quantize_per_channel``) is symmetric absmax per output channel, as ``kvcourse.quant`` does
per token for the cache: row ``i`` gets ``s_i = max_j |W_ij| / 127`` and ``q_ij = round(W_ij / s_i)`` in
-127..127, so ``|W_ij - q_ij s_i| <= s_i / 2``. An outlier row blurs only its own row; one scale for the
whole matrix would give every row the outlier's step. gpt-fast does the same per-channel rounding
(``quantize.py``: ``dynamically_quantize_per_channel``, ``WeightOnlyInt8QuantHandler``,
``WeightOnlyInt8Linear``; https://github.com/pytorch-labs/gpt-fast), with the range -128..127 and
``s = max|w| / 127.5``; here -128 is left out so that ``-q`` is always representable.

The matmul (``Int8Linear``) is ``torch.ops.aten._weight_int8pack_mm(x (M, K), w_int8 (N, K), scales (N,))
-> (M, N)``: ``x @ (w * scales[:, None]).T`` without ever writing the dequantized matrix. gpt-fast itself
does NOT call it: its ``WeightOnlyInt8Linear.forward`` is ``F.linear(x, weight.to(x.dtype)) * scales`` and
relies on ``torch.compile`` to fuse the conversion into the matmul (quantize.py at commit 32971d3). What
torch 2.13 provides, checked here and in its source:

- dispatch (``torchgen/packaged/ATen/native/native_functions.yaml`` of torch 2.13): CPU, CUDA, MPS, XPU.
- CPU (``aten/src/ATen/native/cpu/int8mm_kernel.cpp``): x must be 2-D, float32, bfloat16 or float16,
  contiguous on its last axis; the weight int8 and contiguous; the scales of x's dtype. On x86 only
  bfloat16 has a vectorised kernel (AVX512: 16 values of K per load; AVX2: 8), with aligned loads and no
  remainder loop: with K = 30 it returned wrong numbers and with K = 7 it crashed the process (torch 2.13,
  AVX512), so ``Int8Linear`` refuses bfloat16 on the CPU unless ``in_features % 16 == 0`` and keeps x
  64-byte aligned. On x86, float32 and float16 take a scalar C++ loop: correct, but on this course's CPU
  about 17x slower than float32 ``F.linear`` (1.27 ms against 0.073 ms for 576 -> 1536, one thread). So on
  an x86 CPU the bytes saved pay off in bfloat16 only. On ARM (aarch64) the NEON kernel serves every dtype
  and reads K 8 at a time, also without a remainder: refused there too unless ``in_features % 16 == 0``
  (from the source; not run here).
- CUDA (``aten/src/ATen/native/cuda/int8mm.cu``, pytorch main): any float x, converted to float32, one warp
  per output element, scales converted to float32, the result cast back to x's dtype. Not run here (no GPU).

``Int8Linear(kernel="dequant")`` is the other path, named for what it does: it dequantizes the WHOLE
matrix to x's dtype at every call and then calls ``F.linear``; it reads the int8 bytes and then writes and
reads a full-precision copy, more bytes than the float weights. It exists for devices or shapes the kernel
refuses, and only when asked for by name.

``quantize_model(model)`` replaces every ``nn.Linear`` of the course's ``kvcourse.llama.Llama``: q/k/v/o,
gate/up/down in each layer, and the ``lm_head``. A tied ``lm_head`` (the bundled model, SmolLM2) gets its
own int8 copy and the embedding stays in full precision: a decode step reads the whole ``lm_head`` but only
one row of the embedding per token, so quantizing the embedding would save almost no bytes per step (it
would save memory held).

The fast path (``kvcourse.fast``) has no modules to swap: its ``FusedBlock`` holds raw tensors that
``F.linear`` reads. ``Int8DynamicGenerator`` is ``kvcourse.fast.DynamicGenerator`` with each fused matrix
(``wqkv``, ``wo``, ``w_gate_up``, ``w_down``, ``lm_head``) quantized per output row; one scale per row of the
fused matrix is one scale per output channel of q/k/v (gate/up), so the int8 values equal ``quantize_model``'s.
It overrides the one method through which ``FastGeneratorBase`` multiplies by a weight, ``_linear``, with the
layer's ``Int8Linear``; the float fused copies are dropped.

``measure_decode`` times decode steps and counts the bytes one step reads, for float and int8 weights.

Reference figure (gpt-fast README, "Benchmarks", https://github.com/pytorch-labs/gpt-fast#benchmarks, at
commit 32971d3: A100-80GB power-limited to 330 W, batch 1, a 5-token prompt; its tensor-parallel table gives
the same 104.9 for one GPU): Llama-2-7B, 104.9 tokens/s for the base model (``generate.py`` runs it in
bfloat16) against 155.58 with 8-bit weights, at 1397.31 and 1069.20 GB/s of effective memory bandwidth.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .fast import DynamicGenerator
from .generate import as_llama
from .llama import Llama

__all__ = ["QMAX", "Int8DynamicGenerator", "Int8Linear", "measure_decode", "quantize_model", "quantize_per_channel",
           "weight_bytes_per_step"]

QMAX = 127  # symmetric int8: -127..127, so that -q is always an int8 too
KERNELS = ("int8pack", "dequant")
_BF16_CPU_K = 16  # the AVX512 bfloat16 loop of _weight_int8pack_mm reads K 16 at a time, without a remainder loop
_ALIGN = 64  # bytes: the CPU kernel's aligned loads (32 for AVX512 on x, 16 on the weight); torch allocates at 64


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) float -> (int8 (out, in), float32 scales (out,)), ``weight ~= q * scales[:, None]``.

    Symmetric absmax per output row: ``scale = max|row| / 127``, ``q = round(row / scale)`` in -127..127. A row of
    zeros gets scale 0 and q 0 (dequantized: exact zeros). Computed in float32 whatever the weight's dtype.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize_per_channel expects a weight tensor (out_features, in_features), got "
                        f"{type(weight).__name__}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"quantize_per_channel expects a 2-D weight (out_features, in_features) with no empty axis, "
                         f"as nn.Linear.weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"quantize_per_channel expects a floating-point weight, got {weight.dtype}")
    w = weight.detach().float()  # (out, in)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"quantize_per_channel: the weight holds {int((~torch.isfinite(w)).sum())} inf/NaN values; "
                         f"absmax scales would be inf or NaN")
    scales = w.abs().amax(dim=1) / QMAX  # (out,): one scale per output channel
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a zero row divides by 1: q = 0
    q = torch.round(w / safe[:, None]).clamp(-QMAX, QMAX).to(torch.int8)  # (out, in)
    return q, scales


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % _ALIGN == 0


class Int8Linear(nn.Module):
    """y = x @ (q * scales[:, None]).T + bias, with q int8 (out, in) and one scale per output channel.

    ``kernel="int8pack"`` (default): ``torch.ops.aten._weight_int8pack_mm``, which never writes the dequantized
    matrix. ``kernel="dequant"``: dequantize the whole matrix to x's dtype at every call, then ``F.linear``
    (more bytes moved than the float weights; for what the kernel refuses). x must be in the dtype of
    ``scales`` (the model's): nothing is cast silently.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                 kernel: str = "int8pack"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"Int8Linear: kernel must be one of {KERNELS}, got {kernel!r}")
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
            got = f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"Int8Linear expects weight as int8 (out_features, in_features) (quantize_per_channel), "
                             f"got {got}")
        out_f, in_f = weight.shape
        if not isinstance(scales, torch.Tensor) or scales.shape != (out_f,) or not scales.is_floating_point():
            got = f"{tuple(scales.shape)} {scales.dtype}" if isinstance(scales, torch.Tensor) else type(scales).__name__
            raise ValueError(f"Int8Linear expects one float scale per output channel, ({out_f},), got {got}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out_f,)):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"Int8Linear expects bias None or ({out_f},), got {got}")
        weight = weight.detach().contiguous()
        if weight.device.type == "cpu" and not _aligned(weight):
            weight = weight.clone()  # the CPU kernel's aligned loads need an aligned row 0
        self.in_features, self.out_features, self.kernel = in_f, out_f, kernel
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scales", scales.detach().contiguous())  # (out,) in the model's dtype
        self.register_buffer("bias", None if bias is None else bias.detach().to(scales.dtype).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, kernel: str = "int8pack") -> Int8Linear:
        """Quantize an ``nn.Linear`` (``quantize_per_channel``); scales and bias keep the linear's dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        q, scales = quantize_per_channel(linear.weight)
        dtype = linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q.to(linear.weight.device), scales.to(device=linear.weight.device, dtype=dtype), bias,
                   kernel=kernel)

    def dequantize(self) -> torch.Tensor:
        """The float weight (out, in) that the int8 one stands for, in the dtype of ``scales`` (a new tensor)."""
        return self.weight.to(self.scales.dtype) * self.scales[:, None]  # (out, in)

    def nbytes(self) -> int:
        """Bytes held: int8 weight + scales (+ bias)."""
        held = [self.weight, self.scales] + ([] if self.bias is None else [self.bias])
        return sum(t.numel() * t.element_size() for t in held)

    def _kernel_refusal(self, x: torch.Tensor) -> str | None:
        """Why the CPU kernel would be wrong for this x, or None. Its vectorised loops read K in blocks with no
        remainder: bfloat16 on x86 (16 a block with AVX512), and every dtype on ARM (8 a block, NEON)."""
        if x.device.type != "cpu" or self.in_features % _BF16_CPU_K == 0:
            return None
        arm = platform.machine().lower() in ("arm64", "aarch64")
        if x.dtype == torch.bfloat16 or arm:
            where = "on an ARM CPU" if arm else "on the CPU in bfloat16"
            return (f"_weight_int8pack_mm {where} reads in_features in blocks of up to {_BF16_CPU_K} with no "
                    f"remainder loop (torch 2.13: wrong numbers or a crash); in_features={self.in_features} is not a "
                    f"multiple of {_BF16_CPU_K}. Use Int8Linear(kernel='dequant'), which dequantizes the whole "
                    f"matrix at every call" + ("" if arm else ", or float32"))
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Int8Linear expects x of shape (..., in_features={self.in_features}), got {got}")
        if x.dtype != self.scales.dtype or x.device != self.weight.device:
            raise ValueError(f"Int8Linear holds scales in {self.scales.dtype} on {self.weight.device}, got x in "
                             f"{x.dtype} on {x.device}: quantize (or .to()) the model in the dtype it runs in")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.kernel == "dequant":
            y = F.linear(x2, self.dequantize())  # (M, N): the whole matrix dequantized, every call
        else:
            refusal = self._kernel_refusal(x)
            if refusal:
                raise ValueError(f"Int8Linear(kernel='int8pack'): {refusal}")
            x2 = x2.contiguous()
            if x2.device.type == "cpu" and not _aligned(x2):
                x2 = x2.clone()  # a fresh allocation is 64-byte aligned
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)  # (..., N)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scales={self.scales.dtype}, kernel={self.kernel!r}")


def _as_course_llama(model, who: str):
    llama = as_llama(model) if not isinstance(model, Llama) else model
    if not isinstance(llama, Llama):
        raise TypeError(f"{who} takes the course's kvcourse.llama.Llama (or a transformers LlamaForCausalLM), got "
                        f"{type(model).__name__}")
    return llama


def quantize_model(model, *, lm_head: bool = True, inplace: bool = False, kernel: str = "int8pack"):
    """Every ``nn.Linear`` of a ``kvcourse.llama.Llama`` replaced by an ``Int8Linear``; returns the model.

    ``inplace=False`` (default) quantizes a deep copy and leaves ``model`` as it was (a transformers Llama is
    wrapped first, ``Llama.from_hf``, so a copy is always made for it). ``lm_head=False`` keeps the output
    projection in full precision. The embedding is never quantized (module docstring).
    """
    if kernel not in KERNELS:
        raise ValueError(f"quantize_model: kernel must be one of {KERNELS}, got {kernel!r}")
    llama = _as_course_llama(model, "quantize_model")
    linears = [(parent, name, child) for parent in llama.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and (lm_head or child is not getattr(llama, "lm_head", None))]
    if not linears:
        raise ValueError("quantize_model found no nn.Linear to quantize: the model is already quantized")
    dtypes = {child.weight.dtype for _, _, child in linears}
    if not all(d.is_floating_point for d in dtypes):
        raise ValueError(f"quantize_model expects float weights, got {sorted(map(str, dtypes))}")
    if not inplace or llama is not model:
        llama = copy.deepcopy(llama)
        linears = [(parent, name, child) for parent in llama.modules() for name, child in parent.named_children()
                   if isinstance(child, nn.Linear) and (lm_head or child is not llama.lm_head)]
    with torch.no_grad():
        for parent, name, child in linears:
            setattr(parent, name, Int8Linear.from_linear(child, kernel=kernel))
    return llama


def weight_bytes_per_step(model, batch: int = 1) -> int:
    """Bytes of weights one decode step reads: every linear (int8 + scales, or float) and norm once, plus
    ``batch`` rows of the embedding (a tied, unquantized lm_head is the embedding, read whole once)."""
    llama = _as_course_llama(model, "weight_bytes_per_step")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"weight_bytes_per_step: batch must be an int >= 1, got {batch!r}")
    total, seen = 0, set()
    for mod in llama.modules():
        if mod is llama.embed:
            continue
        if isinstance(mod, Int8Linear):
            total += mod.nbytes()
            continue
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    emb = llama.embed.weight
    return total + batch * emb.shape[1] * emb.element_size()


class Int8DynamicGenerator(DynamicGenerator):
    """``kvcourse.fast.DynamicGenerator`` whose fused matrices are ``Int8Linear`` (module docstring).

    >>> gen = Int8DynamicGenerator(llama)          # quantizes the fused weights once
    >>> out = gen.generate(input_ids, 64)          # (B, T) -> (B, T + 64), greedy
    """

    def __init__(self, model, *, compile: bool = False, max_seq_len: int | None = None,
                 kernel: str = "int8pack"):
        if kernel not in KERNELS:
            raise ValueError(f"Int8DynamicGenerator: kernel must be one of {KERNELS}, got {kernel!r}")
        super().__init__(model, compile=compile, max_seq_len=max_seq_len)

        def int8(w, b=None) -> Int8Linear:
            q, scales = quantize_per_channel(w)
            return Int8Linear(q, scales.to(w.dtype), b, kernel=kernel)

        self.int8_blocks = []  # per layer: {"qkv", "o", "gate_up", "down"} -> Int8Linear
        with torch.no_grad():
            for blk in self.blocks:
                self.int8_blocks.append({"qkv": int8(blk.wqkv, blk.bqkv), "o": int8(blk.wo, blk.bo),
                                         "gate_up": int8(blk.w_gate_up, blk.b_gate_up),
                                         "down": int8(blk.w_down, blk.b_down)})
                blk.wqkv = blk.wo = blk.w_gate_up = blk.w_down = None  # the float copies are not read again
            self.int8_lm_head = int8(self.lm_head)
        self._index = {id(blk): i for i, blk in enumerate(self.blocks)}

    def weight_nbytes(self) -> int:
        """Bytes of weights one decode step reads: the int8 matrices with their scales, the norms, one
        embedding row (batch 1)."""
        lins = [lin for d in self.int8_blocks for lin in d.values()] + [self.int8_lm_head]
        norms = [t for blk in self.blocks for t in (blk.attn_norm, blk.mlp_norm)] + [self.norm]
        return (sum(lin.nbytes() for lin in lins) + sum(t.numel() * t.element_size() for t in norms)
                + self.embed.shape[1] * self.embed.element_size())

    def _linear(self, x, blk, name):
        """FastGeneratorBase's one weight multiply, with the int8 matrix of that layer (or of the LM head)."""
        lin = self.int8_lm_head if blk is None else self.int8_blocks[self._index[id(blk)]][name]
        return lin(x)


def _decode_times(llama, prompt: torch.Tensor, steps: int, clock=time.perf_counter) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of ``steps`` greedy decode steps after a prefill, and the tokens (1, T + steps + 1)."""
    from .cache import KVCache
    from .devices import synchronize
    from .generate import decode_one_token, prefill

    cache = KVCache.for_model(llama, 1, prompt.shape[1] + steps + 1)
    times, out = [], [prompt]
    with torch.inference_mode():
        token = prefill(llama, prompt, cache).argmax(-1, keepdim=True)  # (1, 1)
        out.append(token)
        for _ in range(steps):
            synchronize(llama.device)
            t0 = clock()
            token = decode_one_token(llama, token, cache).argmax(-1, keepdim=True)  # (1, 1)
            synchronize(llama.device)
            times.append(clock() - t0)
            out.append(token)
    return times, torch.cat(out, dim=1)


def _fast_decode_times(gen, prompt: torch.Tensor, steps: int,
                       clock=time.perf_counter) -> tuple[list[float], torch.Tensor]:
    """Seconds of each decode step of a fast generator (between successive callbacks, gpt-fast's hook) and its
    tokens (1, T + steps + 1)."""
    from .devices import synchronize

    stamps = []

    def mark(_token):
        synchronize(gen.device)
        stamps.append(clock())

    out = gen.generate(prompt, steps + 1, callback=mark)  # the first callback follows the prefill
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], out


def measure_decode(model, *, dtypes=(torch.float32, torch.bfloat16), steps: int = 16, prompt_len: int = 16,
                   fast: bool = False, cpu_time: bool = False, seed: int = 0) -> list[dict]:
    """Decode ms/token and bytes per step, float weights against int8 weights, for each dtype.

    ``model``: a ``kvcourse.llama.Llama`` or a transformers Llama (e.g. ``shapes.random_model("SmolLM2-135M")``),
    float32; it is copied, never changed. For each dtype, the float model and its int8 version each prefill the
    same random prompt and decode ``steps`` greedy tokens. ``fast=False``: the course's Llama with a ``KVCache``
    (``kvcourse.generate``), int8 = ``quantize_model`` of the float32 weights, scales then cast to the dtype.
    ``fast=True``: ``kvcourse.fast.DynamicGenerator`` against ``Int8DynamicGenerator`` (which quantizes the
    weights in the dtype). Rows: ``dtype``, ``weights`` ("float"/"int8"), ``ms_per_token`` (median step),
    ``weight_bytes`` and ``kv_bytes`` read per step (the cache at the middle of the run), ``bytes_per_step``
    (their sum), and for int8 ``tokens_equal`` (greedy tokens equal to the float model's, of ``steps + 1``).
    Times depend on the machine and its load: report them, never assert them. ``cpu_time=True`` times with
    ``time.process_time`` (CPU seconds of this process: less disturbed by other work on a shared machine, and
    meaningful with one thread only; ``row["clock"]`` says which).
    """
    from .memory import kv_bytes_per_token_dims

    llama = _as_course_llama(model, "measure_decode")
    for name, value in (("steps", steps), ("prompt_len", prompt_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"measure_decode: {name} must be an int >= 1, got {value!r}")
    if not isinstance(dtypes, tuple | list) or not dtypes or not all(
            isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        raise ValueError(f"measure_decode: dtypes must be a tuple of float torch dtypes, got {dtypes!r}")
    if cpu_time and (llama.device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError(f"measure_decode(cpu_time=True) needs a CPU model and one thread (torch.set_num_threads(1)), "
                         f"got {llama.device} with {torch.get_num_threads()} threads: CPU seconds of several threads "
                         f"add up, and a GPU's work is not the process's")
    clock = time.process_time if cpu_time else time.perf_counter
    if llama.dtype != torch.float32:
        raise ValueError(f"measure_decode quantizes from float32 weights, got a {llama.dtype} model")
    a = llama.args
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, a.vocab_size, (1, prompt_len), generator=gen).to(llama.device)
    int8_base = None if fast else quantize_model(llama)  # from the float32 weights, once
    rows = []
    for dtype in dtypes:
        kv = kv_bytes_per_token_dims(a.num_layers, a.num_kv_heads, a.head_dim, torch.tensor([], dtype=dtype)
                                     .element_size()) * (prompt_len + 1 + steps // 2)
        tokens = {}
        for kind in ("float", "int8"):
            if fast:
                m = copy.deepcopy(llama).to(dtype)
                wb = weight_bytes_per_step(m)
                g = Int8DynamicGenerator(m) if kind == "int8" else DynamicGenerator(m)
                del m  # the generator holds what it reads
                wb = g.weight_nbytes() if kind == "int8" else wb
                times, tokens[kind] = _fast_decode_times(g, prompt, steps, clock)
            else:
                m = copy.deepcopy(llama if kind == "float" else int8_base).to(dtype)
                wb = weight_bytes_per_step(m)
                times, tokens[kind] = _decode_times(m, prompt, steps, clock)
            row = {"dtype": str(dtype).removeprefix("torch."), "weights": kind, "path": "fast" if fast else "generate",
                   "ms_per_token": 1e3 * statistics.median(times), "weight_bytes": wb, "kv_bytes": kv,
                   "bytes_per_step": wb + kv, "steps": steps, "device": str(llama.device),
                   "threads": torch.get_num_threads(), "clock": "cpu" if cpu_time else "wall"}
            if kind == "int8":
                row["tokens_equal"] = int((tokens["int8"][0, prompt_len:] == tokens["float"][0, prompt_len:]).sum())
            rows.append(row)
    return rows
