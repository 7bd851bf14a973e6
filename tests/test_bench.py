"""kvcourse.bench and the kvcourse command. No timing is asserted anywhere: only that the benchmark runs,
writes what it promises, and refuses to time a generator whose tokens are wrong.

Each test is named after the bug it guards against.
"""

import json

import pytest
import torch

from kvcourse import KVCache, bench, cli
from kvcourse.generate import generate

# A configuration well under the --quick one: two tiny models, a few tokens, one round.
TINY = ["--models", "bundled", "SmolLM2-135M:1", "--new-tokens", "4", "--long-new-tokens", "3",
        "--long-prompt-tokens", "20", "--repeats", "1", "--bandwidth-mib", "8", "--cache-lengths", "1", "32",
        "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", *TINY, "--out", str(out)]) == 0
    return out


def test_bench_leaves_out_an_output_file(tiny_run):
    for name in ["bench.json", "bench.md", "time_per_token.png", "cache_update.png"]:
        path = tiny_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    for png in ["time_per_token.png", "cache_update.png"]:
        assert (tiny_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_json_misses_a_method_or_figure(tiny_run):
    result = json.loads((tiny_run / "bench.json").read_text())
    env = result["environment"]
    for key in ["cpu", "gpu", "device", "dtype", "torch", "transformers", "torch_threads"]:
        assert key in env, key
    assert env["dtype"] == ("float32" if env["device"] == "cpu" else "bfloat16")
    assert result["bandwidth"]["copy_GBps"] > 0
    cases = result["cases"]
    assert [(c["model"], c["prompt"]) for c in cases] == [
        ("bundled", "short"), ("bundled", "long"), ("SmolLM2-135M (1 layers)", "short"),
        ("SmolLM2-135M (1 layers)", "long")]
    for case in cases:
        assert set(case["methods"]) == set(bench.METHODS)
        assert case["floor"]["bytes_per_token"] > case["floor"]["weight_bytes_per_token"] > 0
        for name, m in case["methods"].items():
            for key in ["ttft_ms", "decode_ms_per_token", "decode_tokens_per_s", "total_s", "spread_pct",
                        "bandwidth_floor_fraction", "speed_vs_hf_cache_decode", "t1_s", "tN_s"]:
                assert key in m, (name, key)
            assert len(m["tN_s"]) == 1
    short = cases[0]["methods"]
    assert all(len(m["step_ms"]) == 4 for m in short.values())  # the per-step plot's data
    assert result["cache_update"]["lengths"] == [1, 32]
    assert len(result["cache_update"]["concat_ms"]) == len(result["cache_update"]["prealloc_ms"]) == 2
    assert {t["target"].split(",")[0] for t in result["targets"]} >= {"fast path vs generate(use_cache=True)"}


def test_bench_markdown_drops_a_method_or_table(tiny_run):
    text = (tiny_run / "bench.md").read_text()
    for heading in ["With and without a KV cache", "Every method", "Targets"]:
        assert heading in text
    assert "| with cache | without cache | speedup |" in text
    for label, _ in bench.METHODS.values():
        assert label in text


class OffByOneCache(KVCache):
    """A bug: once the prompt is in, the cache reports one token too many, so decode positions are off by one."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        n = super().get_seq_length(layer_idx)
        return n + 1 if n else n


def _off_by_one_runner(ctx):
    llama, ids = ctx["llama"], ctx["ids"]

    def run(n, ticks=None):
        return generate(llama, ids, n, cache=OffByOneCache.for_model(llama, ids.shape[0], ids.shape[1] + n + 1))

    return bench.Runner("", run)


def test_bench_times_a_generator_with_wrong_tokens(tmp_path, monkeypatch, capsys):
    model = bench.random_llama("SmolLM2-135M", 1, seed=0)
    ids = bench.prompt_ids(bench.bundled_tokenizer(), "short", 0)
    broken = _off_by_one_runner({"llama": bench.Llama.from_hf(model), "ids": ids}).run(8)
    assert not torch.equal(broken, bench.hf_generate(model, ids, 8)), "precondition: the bug must change tokens"

    monkeypatch.setitem(bench.RUNNERS, "course_fast", _off_by_one_runner)
    argv = [*TINY, "--models", "SmolLM2-135M:1", "--prompts", "short", "--new-tokens", "8", "--out", str(tmp_path)]
    with pytest.raises(bench.TokenMismatchError, match=r"course_fast .*different tokens from hf_dynamic"):
        bench.run(bench.make_plan(bench.parse_args(argv)), tmp_path, progress=False)
    assert not (tmp_path / "bench.json").exists()  # nothing timed, nothing written
    assert bench.main(argv) == 1
    assert "token check failed: course_fast" in capsys.readouterr().err


def test_check_tokens_misreports_the_first_difference():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = a.clone()
    b[1, 2] = 9
    with pytest.raises(bench.TokenMismatchError, match=r"uncached .*\(1, 2\), expected token 7, got 9"):
        bench.check_tokens({"hf_dynamic": a, "uncached": b}, "hf_dynamic", "here")
    with pytest.raises(bench.TokenMismatchError, match="shape"):
        bench.check_tokens({"hf_dynamic": a, "uncached": a[:, :3]}, "hf_dynamic", "here")
    bench.check_tokens({"hf_dynamic": a, "uncached": a.clone()}, "hf_dynamic", "here")


def test_weight_bytes_count_tied_lm_head_twice_or_not_at_all():
    model = bench.random_llama("SmolLM2-135M", 1, seed=0)
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    per_layer = c.hidden_size * d * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)  # q, o, k, v
    per_layer += 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size  # MLP, two norms
    expected = per_layer + c.hidden_size + c.vocab_size * c.hidden_size + c.hidden_size  # final norm, lm_head, 1 row
    assert bench.weight_bytes_per_token(model) == 4 * expected


def test_long_prompt_is_not_the_asked_length():
    tok = bench.bundled_tokenizer()
    assert bench.prompt_ids(tok, "long", 450).shape == (1, 450)
    assert bench.prompt_ids(tok, "short", 450).shape[1] < 10


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--new-tokens", "1"], "new-tokens"),
        (["--models", "SmolLM2-9B"], "known shapes"),
        (["--models", "bundled:3"], "fixed depth"),
        (["--models", "SmolLM2-135M:x"], "NAME:LAYERS"),
        (["--repeats", "0"], "repeats"),
    ],
)
def test_bad_cli_input_runs_anyway(argv, match):
    with pytest.raises(SystemExit, match=match):
        bench.make_plan(bench.parse_args(argv))


def test_cli_does_not_reach_bench_or_train(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0 and "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0 and "--out" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
