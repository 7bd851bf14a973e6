"""Probe rows for kvcourse.int8_weights (issue 25, part 3): bad input to every public name, and the calls that
must work. Registered once "int8_weights" is in test_probes.MODULES."""

from __future__ import annotations

import torch
from torch import nn


def register(t) -> None:
    if "int8_weights" not in t.MODULES:  # until test_probes.MODULES names the module, its rows would be "stale"
        return
    iw = lambda: t.mod("int8_weights")  # noqa: E731

    def lin(in_f: int = 32, out_f: int = 8, dtype=torch.float32):
        torch.manual_seed(0)
        return nn.Linear(in_f, out_f).to(dtype)

    q8 = lambda **kw: iw().Int8Linear.from_linear(lin(), **kw)  # noqa: E731
    int8 = lambda: torch.ones(8, 32, dtype=torch.int8)  # noqa: E731

    # quantize_per_channel
    t.probe("int8_weights.quantize_per_channel", "a 1-D weight", t.call(
        lambda: iw().quantize_per_channel(torch.ones(8))), names=("2-D", "(8,)"))
    t.probe("int8_weights.quantize_per_channel", "an int weight", t.call(
        lambda: iw().quantize_per_channel(torch.ones(3, 4, dtype=torch.long))), names=("floating-point", "torch.int64"))
    t.probe("int8_weights.quantize_per_channel", "a NaN", t.call(
        lambda: iw().quantize_per_channel(torch.tensor([[1.0, float("nan")]]))), names=("inf/NaN", "1"))
    t.probe("int8_weights.quantize_per_channel", "a list", t.call(
        lambda: iw().quantize_per_channel([[1.0, 2.0]])), names=("tensor", "list"))
    t.probe("int8_weights.quantize_per_channel", "a zero row", t.call(
        lambda: iw().quantize_per_channel(torch.tensor([[0.0, 0.0], [1.0, -2.0]]))),
        result=lambda r: r[0].tolist() == [[0, 0], [64, -127]] and r[1][0] == 0)

    # Int8Linear
    t.probe("int8_weights.Int8Linear", "a float weight", t.call(
        lambda: iw().Int8Linear(torch.ones(8, 32), torch.ones(8))), names=("int8", "(8, 32) torch.float32"))
    t.probe("int8_weights.Int8Linear", "one scale per input channel", t.call(
        lambda: iw().Int8Linear(int8(), torch.ones(32))), names=("(8,)", "(32,)"))
    t.probe("int8_weights.Int8Linear", "a bias of the wrong size", t.call(
        lambda: iw().Int8Linear(int8(), torch.ones(8), torch.ones(32))), names=("(8,)", "(32,)"))
    t.probe("int8_weights.Int8Linear", "an unknown kernel", t.call(
        lambda: iw().Int8Linear(int8(), torch.ones(8), kernel="fast")), names=("int8pack", "'fast'"))
    t.probe("int8_weights.Int8Linear.from_linear", "an embedding", t.call(
        lambda: iw().Int8Linear.from_linear(nn.Embedding(4, 4))), names=("nn.Linear", "Embedding"))
    t.probe("int8_weights.Int8Linear.from_linear", "a bfloat16 linear", t.call(
        lambda: iw().Int8Linear.from_linear(lin(dtype=torch.bfloat16))),
        result=lambda r: r.scales.dtype == torch.bfloat16 and r.weight.dtype == torch.int8)
    t.probe("int8_weights.Int8Linear.forward", "x one feature short", t.on(q8, "forward", torch.randn(4, 31)),
            names=("in_features=32", "(4, 31)"))
    t.probe("int8_weights.Int8Linear.forward", "x in bfloat16, scales in float32", t.on(
        q8, "forward", torch.randn(4, 32).to(torch.bfloat16)), names=("torch.float32", "torch.bfloat16"))
    t.probe("int8_weights.Int8Linear.forward", "bfloat16 with in_features 30 on the CPU", t.on(
        lambda: iw().Int8Linear.from_linear(lin(30, dtype=torch.bfloat16)), "forward",
        torch.randn(1, 30).to(torch.bfloat16)), names=("multiple of 16", "in_features=30", "dequant"))
    t.probe("int8_weights.Int8Linear.forward", "a list", t.on(q8, "forward", [1.0] * 32),
            names=("in_features=32", "list"))
    t.probe("int8_weights.Int8Linear.forward", "(B, T, C)", t.on(q8, "forward", torch.randn(2, 3, 32)),
            result=lambda r: tuple(r.shape) == (2, 3, 8))
    t.probe("int8_weights.Int8Linear.dequantize", "fresh", t.on(q8, "dequantize"),
            result=lambda r: tuple(r.shape) == (8, 32) and r.dtype == torch.float32)
    t.probe("int8_weights.Int8Linear.nbytes", "with bias", t.on(q8, "nbytes"),
            result=lambda r: r == 8 * 32 + 4 * 8 + 4 * 8)
    t.probe("int8_weights.Int8Linear.extra_repr", "names the kernel", t.on(lambda: q8(kernel="dequant"), "extra_repr"),
            result=lambda r: "kernel='dequant'" in r and "in_features=32" in r)

    # Int8DynamicGenerator (the fast path)
    t.probe("int8_weights.Int8DynamicGenerator", "an unknown kernel", t.call(
        lambda: iw().Int8DynamicGenerator(t.llama(), kernel="fast")), names=("int8pack", "'fast'"))
    t.probe("int8_weights.Int8DynamicGenerator", "a GPT-2", t.call(lambda: iw().Int8DynamicGenerator(t.gpt2())),
            names=("Llama", "GPT2LMHeadModel"))
    t.probe("int8_weights.Int8DynamicGenerator.weight_nbytes", "fresh", t.on(
        lambda: iw().Int8DynamicGenerator(t.llama()), "weight_nbytes"),
        result=lambda r: r == iw().weight_bytes_per_step(iw().quantize_model(t.llama())))

    # quantize_model
    t.probe("int8_weights.quantize_model", "an nn.Linear", t.call(lambda: iw().quantize_model(lin())),
            names=("Llama", "Linear"))
    t.probe("int8_weights.quantize_model", "already quantized", t.call(
        lambda: iw().quantize_model(iw().quantize_model(t.llama()))), names=("already quantized",))
    t.probe("int8_weights.quantize_model", "an unknown kernel", t.call(
        lambda: iw().quantize_model(t.llama(), kernel="fast")), names=("int8pack", "'fast'"))
    t.probe("int8_weights.quantize_model", "a transformers Llama", t.call(lambda: iw().quantize_model(t.hf())),
            result=lambda r: sum(type(m).__name__ == "Int8Linear" for m in r.modules()) == 2 * 7 + 1)

    # weight_bytes_per_step
    t.probe("int8_weights.weight_bytes_per_step", "batch 0", t.call(
        lambda: iw().weight_bytes_per_step(t.llama(), 0)), names=(">= 1", "0"))
    t.probe("int8_weights.weight_bytes_per_step", "a GPT-2", t.call(
        lambda: iw().weight_bytes_per_step(t.gpt2())), names=("Llama",))

    # measure_decode
    t.probe("int8_weights.measure_decode", "steps 0", t.call(lambda: iw().measure_decode(t.llama(), steps=0)),
            names=("steps", ">= 1", "0"))
    t.probe("int8_weights.measure_decode", "an int dtype", t.call(
        lambda: iw().measure_decode(t.llama(), dtypes=(torch.int8,))), names=("float", "torch.int8"))
    def bf16_llama():
        import copy

        return copy.deepcopy(t.llama()).to(torch.bfloat16)

    t.probe("int8_weights.measure_decode", "a bfloat16 model", t.call(lambda: iw().measure_decode(bf16_llama())),
            names=("float32", "torch.bfloat16"))
