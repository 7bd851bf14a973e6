"""kvcourse.bench.int8_weights: the int8-weight benchmark (issue 25, section 3). No timing is asserted: only that
every row has its fields and its ratios come from its own columns, that the token count and the first difference
are counted position by position, that the logit error compares the two models on the same past (teacher forced),
is exactly 0 for the same weights and at rounding level for weights already on the int8 grid, that bad options are
refused by name, and that ``python -m kvcourse.bench --int8-weights`` reaches this benchmark.

Each test is named after the bug it guards against.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kvcourse.bench import cli
from kvcourse.bench import int8_weights as bi
from kvcourse.bench import int8_weights_report as rep
from kvcourse.fast import DynamicGenerator
from kvcourse.int8_weights import quantize_per_channel
from kvcourse.llama import Llama

FIELDS = {"model", "dtype", "device", "ms_float", "ms_int8", "ms_ratio", "weight_bytes_float", "weight_bytes_int8",
          "kv_bytes", "bytes_per_step_float", "bytes_per_step_int8", "bytes_ratio", "tokens_equal", "tokens",
          "first_diff", "max_abs_logit_error", "max_abs_logit", "rel_logit_error", "argmax_equal", "positions",
          "steps", "rounds", "prompt_tokens", "clock", "threads"}


def tiny(grid: bool = False, seed: int = 0) -> Llama:
    """A 2-layer random Llama (every in_features a multiple of 16: the CPU's bfloat16 int8 kernel needs it); with
    ``grid``, every linear weight already on its int8 grid (dequantized ``quantize_per_channel``)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    if grid:
        with torch.no_grad():
            for mod in hf.modules():
                if isinstance(mod, nn.Linear):
                    q, s = quantize_per_channel(mod.weight)
                    mod.weight.copy_(q.float() * s[:, None])
    return Llama.from_hf(hf)


def plan(steps: int = 5, rounds: int = 2) -> bi.Plan:
    return bi.Plan(models=[], dtypes=["float32"], steps=steps, rounds=rounds, prompt_tokens=4)


PROMPT = torch.tensor([[3, 17, 5, 42]])


class FloatAsInt8(DynamicGenerator):
    """The float model standing in for the int8 one (``measure`` asks the int8 generator for its bytes)."""

    def weight_nbytes(self) -> int:
        return 1


class Scripted(FloatAsInt8):
    """A wrong 'int8' model whose new token j is ``script[j]`` whatever its past (one-hot logits)."""

    def __init__(self, model, script: torch.Tensor, prompt_len: int):
        super().__init__(model)
        self.script, self.prompt_len = script, prompt_len

    def _begin(self, input_ids, attention_mask, max_new_tokens):
        return self._one_hot(super()._begin(input_ids, attention_mask, max_new_tokens))

    def decode_one_token(self, token):
        return self._one_hot(super().decode_one_token(token))

    def _one_hot(self, logits):
        out = torch.zeros_like(logits)  # (1, V)
        out[0, self.script[self._pos - self.prompt_len]] = 1.0  # new token j is decided at cache slot T + j - 1
        return out


def test_row_misses_a_field_or_a_ratio_is_not_its_own_columns():
    for dtype in (torch.float32, torch.bfloat16):
        row = bi.measure("tiny", tiny(), PROMPT, dtype, plan(), "wall")
        assert set(row) == FIELDS
        assert row["dtype"] == str(dtype).removeprefix("torch.") and row["tokens"] == row["positions"] == 6
        assert row["ms_ratio"] == pytest.approx(row["ms_int8"] / row["ms_float"])
        assert row["bytes_per_step_float"] == row["weight_bytes_float"] + row["kv_bytes"]
        assert row["bytes_per_step_int8"] == row["weight_bytes_int8"] + row["kv_bytes"]
        assert row["bytes_ratio"] == pytest.approx(row["bytes_per_step_int8"] / row["bytes_per_step_float"])
        size = torch.empty(0, dtype=dtype).element_size()
        assert row["kv_bytes"] == 2 * 2 * 2 * 8 * size * (4 + 1 + 5 // 2)  # K and V, layers, KV heads, D, middle
        assert 0 < row["weight_bytes_int8"] < row["weight_bytes_float"]
        assert len(rep.cells(row)) == len(rep.COLUMNS) and not any("|" in c for c in rep.COLUMNS + rep.cells(row))


def test_tokens_equal_counted_as_a_prefix_or_first_diff_off_by_one():
    """The wrong model gives the float model's 8 tokens but at positions 2 and 5: 6 equal (a prefix count would say
    2), and the first difference at 2."""
    model = tiny()
    ref = DynamicGenerator(model).generate(PROMPT, 8)[0, 4:]  # the float model's 8 new tokens
    script = ref.clone()
    script[[2, 5]] = (script[[2, 5]] + 1) % 64
    row = bi.measure("tiny", model, PROMPT, torch.float32, plan(steps=7), "wall",
                     make_int8=lambda m: Scripted(m, script, 4))
    assert (row["tokens"], row["tokens_equal"], row["first_diff"]) == (8, 6, 2)


def test_logit_error_taken_on_the_int8_models_own_diverged_tokens():
    """Both models are fed the FLOAT model's tokens: the row's error and argmax count are the ones recomputed here
    that way. The stand-in 'int8' model is another random model, whose own tokens (another past) differ."""
    model, other = tiny(), tiny(seed=1)
    row = bi.measure("tiny", model, PROMPT, torch.float32, plan(steps=7), "wall",
                     make_int8=lambda _m: FloatAsInt8(other))
    ref = DynamicGenerator(model).generate(PROMPT, 8)[:, 4:]  # (1, 8)
    assert row["tokens_equal"] < 8
    want = bi.logit_error(bi.teacher_forced_logits(DynamicGenerator(model), PROMPT, ref),
                          bi.teacher_forced_logits(DynamicGenerator(other), PROMPT, ref))
    assert row["max_abs_logit_error"] == want["max_abs_logit_error"] > 0
    assert row["argmax_equal"] == want["argmax_equal"]


def test_logit_error_not_zero_for_the_same_weights():
    """The float model against itself: bit-identical logits, every argmax equal, no token differs."""
    row = bi.measure("tiny", tiny(), PROMPT, torch.float32, plan(), "wall", make_int8=FloatAsInt8)
    assert row["max_abs_logit_error"] == 0.0 and row["rel_logit_error"] == 0.0
    assert row["argmax_equal"] == row["positions"] and row["tokens_equal"] == row["tokens"]
    assert row["first_diff"] is None and row["max_abs_logit"] > 0


def test_logit_error_blind_to_quantization_or_charging_it_to_exact_weights():
    """Weights already on the int8 grid quantize to themselves: only the kernel's float32 rounding is left (a
    relative error below 1e-5). The same model off the grid loses its rounding: an error 100 times larger at least."""
    exact = bi.measure("tiny", tiny(grid=True), PROMPT, torch.float32, plan(), "wall")
    lossy = bi.measure("tiny", tiny(grid=False), PROMPT, torch.float32, plan(), "wall")
    assert exact["rel_logit_error"] < 1e-5 and exact["argmax_equal"] == exact["positions"]
    assert lossy["rel_logit_error"] > 100 * max(exact["rel_logit_error"], 1e-7)


def test_teacher_forced_logits_shifted_by_one_position():
    """Row i predicts new token i from the prompt and the new tokens before it: equal to the course Llama's logits
    over the whole sequence at positions T-1 .. T+N-2, and its argmax is the float model's own token."""
    model = tiny()
    gen = DynamicGenerator(model)
    new = gen.generate(PROMPT, 6)[:, 4:]  # (1, 6)
    forced = bi.teacher_forced_logits(gen, PROMPT, new)  # (6, V)
    with torch.inference_mode():
        full = model(torch.cat([PROMPT, new], dim=1))[0, 3:9]  # (6, V): positions T-1 .. T+N-2
    torch.testing.assert_close(forced, full.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(forced.argmax(-1), new[0])


def test_logit_error_of_mismatched_logits_is_a_broadcast_not_an_error():
    with pytest.raises(ValueError, match=r"one shape.*\(3, 8\).*\(1, 8\)"):
        bi.logit_error(torch.zeros(3, 8), torch.zeros(1, 8))


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--dtypes", "float32", "int4"], "--dtypes takes float32, bfloat16, float16; got int4"),
    (["--models", "NoSuchModel"], "--models: unknown model shape 'NoSuchModel'"),
    (["--models", "bundled:3"], "--models: the bundled model has a fixed depth"),
    (["--models", "SmolLM2-135M:x"], "--models: bad model spec"),
    (["--device", "tpu"], "--device: "),
])
def test_bad_option_runs_or_fails_without_its_name(argv, words):
    with pytest.raises(SystemExit, match=words.replace("(", r"\(")):
        bi.make_plan(bi.parse_args(argv))


def test_presets_on_the_cpu_include_the_big_shape_or_skip_a_dtype():
    full, quick = bi.make_plan(bi.parse_args([])), bi.make_plan(bi.parse_args(["--quick"]))
    assert full.models == ["bundled", "SmolLM2-135M"] and quick.models == ["bundled", "SmolLM2-135M:4"]
    assert full.dtypes == quick.dtypes == ["float32", "bfloat16"] and full.threads == 1
    assert quick.steps < full.steps and quick.rounds <= full.rounds


def test_bench_int8_weights_flag_does_not_reach_this_benchmark(tmp_path):
    """``python -m kvcourse.bench --int8-weights --quick`` runs this benchmark with the other options (the flag
    itself removed), writes its json and markdown, and leaves torch's thread count as it was."""
    threads = torch.get_num_threads()
    out = tmp_path / "i8"
    rc = cli.main(["--int8-weights", "--quick", "--models", "bundled", "--steps", "2", "--out", str(out)])
    assert rc == 0 and torch.get_num_threads() == threads
    report = json.loads((out / "int8_weights.json").read_text())
    assert report["schema"] == "kvcourse-int8-weights/1" and report["plan"]["preset"] == "quick"
    assert [(r["model"], r["dtype"], r["clock"], r["threads"]) for r in report["rows"]] == [
        ("bundled", "float32", "cpu", 1), ("bundled", "bfloat16", "cpu", 1)]
    md = (out / "int8_weights.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("|")]  # header, rule, 2 rows: every cell its column
    assert len(table) == 4 and all(ln.count("|") == len(rep.COLUMNS) + 1 for ln in table)
