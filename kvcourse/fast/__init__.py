"""The course's fast path: greedy generation with a KV cache, written the way inference engines do it.

``kvcourse.generate.generate`` is the readable reference. The fast generators do the same arithmetic, in
the same order as ``transformers``' ``LlamaForCausalLM`` (so float32 tokens are identical to
``generate(do_sample=False)``), but remove everything a decode step does not need. One idea per file:

- ``fused.py``: q/k/v and gate/up stacked into one matrix each (gpt-fast's ``wqkv``, vLLM's ``gate_up_proj``);
- ``base.py``: ``FastGeneratorBase``: the fused model, a RoPE table, one preallocated cache
  ``(layers, B, KV, S_max, D)`` written in place, the prefill (last position only, as
  ``logits_to_keep=1``), the checks ``kvcourse.generate`` makes, and gpt-fast's loop: ``prefill``, then
  ``decode_one_token``. Tokens stay on the device (no ``.item()``: the host never waits unless EOS
  ids are given); ``torch.inference_mode``; ``warmup()`` compiles and captures, timed apart;
- ``checks.py``: the argument checks, ``kvcourse.generate``'s own (EOS ids, left padding, vocab range);
- ``dynamic.py``: ``DynamicGenerator``: decode attends over the filled slots ``[:pos + 1]``;
- ``static.py``: ``StaticGenerator``: decode attends over the whole buffer with a mask, every input
  read from a tensor (per-row slots, so rows may sit at different lengths);
- ``graphed.py``: ``GraphedStaticGenerator``: the static step captured in a CUDA graph and replayed.

``FastGenerator(model, static=..., cuda_graph=..., compile=...)`` picks one of the three (kept for the
benchmark and the notebooks). Decoding one token reads every weight once and the whole KV cache once,
with about two flops per weight: it is limited by memory bandwidth, not arithmetic; ``kvcourse.bench``
reports how close each path gets to that floor, and compile + capture apart from per-token times.

References: gpt-fast (PyTorch Labs, ``generate.py``/``model.py``, 2023); ``transformers``
``models/llama/modeling_llama.py`` and ``cache_utils.StaticCache``; Pope et al. 2022, "Efficiently
Scaling Transformer Inference" (decode is memory-bound); Kwon et al. 2023 (vLLM); Karpathy's nanoGPT.
"""

from __future__ import annotations

import warnings

import torch

from .base import FastGeneratorBase
from .dynamic import DynamicGenerator
from .fused import FusedBlock, rms_norm
from .graphed import CudaGraphs, GraphedStaticGenerator
from .static import StaticGenerator, StaticState

__all__ = ["CudaGraphs", "DynamicGenerator", "FastGenerator", "FastGeneratorBase", "FusedBlock",
           "GraphedStaticGenerator", "StaticGenerator", "StaticState", "fast_generate", "rms_norm"]


def FastGenerator(model, *, compile: bool = False, max_seq_len: int | None = None, static: bool = False,  # noqa: N802
                  cuda_graph: bool = False) -> FastGeneratorBase:
    """The generator for these flags (a factory, named as the class it once was):

    - default: ``DynamicGenerator``; ``static=True``: ``StaticGenerator``;
    - ``cuda_graph=True``: ``GraphedStaticGenerator`` on a CUDA device; elsewhere it warns and returns a
      ``StaticGenerator`` (the same step, eager).

    ``compile=True`` compiles the decode step (in ``warmup()``, or the first ``generate``); without a C++
    compiler, or if compilation fails, it warns and runs eagerly.
    """
    kw = {"compile": compile, "max_seq_len": max_seq_len}
    if cuda_graph:
        if GraphedStaticGenerator.graphs.available(torch.device(getattr(model, "device", "cpu"))):
            return GraphedStaticGenerator(model, **kw)
        warnings.warn(f"CUDA graphs need a CUDA device, the model is on {getattr(model, 'device', 'cpu')}: running "
                      f"the static-shape decode step eagerly", RuntimeWarning, stacklevel=2)
        return StaticGenerator(model, **kw)
    return StaticGenerator(model, **kw) if static else DynamicGenerator(model, **kw)


def fast_generate(model, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """One-off convenience: ``DynamicGenerator(model).generate(input_ids, max_new_tokens, **kwargs)``."""
    return DynamicGenerator(model).generate(input_ids, max_new_tokens, **kwargs)
