"""kvcourse.bench and the kvcourse command. No timing is asserted anywhere: only that the benchmark runs,
writes what it promises, never prints a negative, infinite or missing figure as a number, marks the rows it
cannot trust, and refuses to time a generator whose tokens are wrong. Where figures are checked, they come
from a fake clock, never from a measurement.

Each test is named after the bug it guards against.
"""

import copy
import json
import math
import re

import pytest
import torch

from kvcourse import KVCache, bench, cli
from kvcourse.generate import generate
from kvcourse.llama import Llama

# A configuration well under the --quick one: two tiny models, a few tokens, two rounds (so spreads exist).
TINY = ["--models", "bundled", "SmolLM2-135M:1", "--new-tokens", "4", "--long-new-tokens", "3",
        "--long-prompt-tokens", "20", "--repeats", "2", "--bandwidth-mib", "8", "--cache-lengths", "1", "32",
        "--no-progress"]
FIGURES = ["ttft_ms", "decode_ms_per_token", "decode_tokens_per_s", "total_s", "bandwidth_floor_fraction",
           "speed_vs_hf_cache_decode", "speed_vs_hf_cache_total"]
NEGATIVE_NUMBER = re.compile(r"(?<![\w.])-\d")  # "-39.73", not "SmolLM2-135M" or "2026-11-25"
NOT_FINITE = re.compile(r"\b(inf|nan)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", *TINY, "--batch-sweep", "--batch-max", "4", "--out", str(out)]) == 0
    return out


def _numbers(obj):
    """Every number in a JSON-like structure (bools excluded)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield obj


def _assert_rows_are_sound(result: dict) -> None:
    """Every figure is a positive finite number or None with a reason; unreliable rows say why."""
    for case in result["cases"]:
        for name, m in case["methods"].items():
            for key in FIGURES:
                assert key in m, (name, key)
                if m[key] is None:
                    assert isinstance(m["missing"].get(key), str) and m["missing"][key], (name, key)
                else:
                    assert isinstance(m[key], float) and math.isfinite(m[key]) and m[key] > 0, (name, key, m[key])
            assert isinstance(m["unreliable"], bool)
            assert bool(m["unreliable_reasons"]) == m["unreliable"], (name, m["unreliable_reasons"])
            assert all(isinstance(r, str) and r for r in m["unreliable_reasons"])
    bad = [x for x in _numbers(result) if not (math.isfinite(x) and x >= 0)]
    assert not bad, f"negative or non-finite numbers in bench.json: {bad}"


def test_bench_leaves_out_an_output_file(tiny_run):
    for name in ["bench.json", "bench.md", "time_per_token.png", "cache_update.png"]:
        path = tiny_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    for png in ["time_per_token.png", "cache_update.png"]:
        assert (tiny_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_json_misses_a_method_or_figure(tiny_run):
    result = json.loads((tiny_run / "bench.json").read_text())
    env = result["environment"]
    for key in ["cpu", "gpu", "device", "dtype", "torch", "transformers", "torch_threads", "load_average_at_start",
                "load_average_at_end", "busy"]:
        assert key in env, key
    assert env["dtype"] == ("float32" if env["device"] == "cpu" else "bfloat16")
    cases = result["cases"]
    assert [(c["model"], c["prompt"]) for c in cases] == [
        ("bundled", "short"), ("bundled", "long"), ("SmolLM2-135M (1 layers)", "short"),
        ("SmolLM2-135M (1 layers)", "long")]
    on_cuda = env["device"].startswith("cuda")
    for case in cases:
        assert set(case["methods"]) == set(bench.METHODS)
        assert case["floor"]["bytes_per_token"] > case["floor"]["weight_bytes_per_token"] > 0
        assert set(case["load_average"]) == {"start", "end", "busy"}
        for name, m in case["methods"].items():
            for key in ["spread_pct", "ttft_spread_pct", "warmup_s", "rounds", "missing", "unreliable",
                        "unreliable_reasons", "step_ms"]:
                assert key in m, (name, key)
            if m.get("unavailable"):  # only CUDA graphs without CUDA: n/a, never a static-eager time as a graph's
                assert name in ("course_graph", "course_graph_compiled") and not on_cuda
                assert m["unavailable"] == "CUDA graphs need a CUDA device"
                assert m["rounds"] == [] and m["step_ms"] is None and not m["unreliable"]
                continue
            assert len(m["rounds"]) == 2
            assert set(m["rounds"][0]) == {"ttft_s", "decode_s_per_token", "total_s"}
        assert on_cuda or case["methods"]["course_graph"].get("unavailable")
        assert not case["methods"]["course_static"].get("unavailable")  # static shapes run everywhere
    _assert_rows_are_sound(result)
    short = cases[0]["methods"]
    assert all(len(m["step_ms"]) == 4 for m in short.values() if not m.get("unavailable"))  # the per-step plot
    assert result["cache_update"]["lengths"] == [1, 32]
    assert len(result["cache_update"]["concat_ms"]) == len(result["cache_update"]["prealloc_ms"]) == 2
    assert {t["target"].split(",")[0] for t in result["targets"]} >= {"fast path vs generate(use_cache=True)"}


def test_batch_sweep_lost_a_batch_or_counted_its_bytes_wrong(tiny_run):
    """--batch-sweep on the real fast path (tiny models, real clock): the figures are checked for their
    arithmetic and soundness only, never for a speed."""
    result = json.loads((tiny_run / "bench.json").read_text())
    assert result["settings"]["batch_sweep"] == "course_fast" and result["settings"]["batch_sizes"] == [1, 2, 4]
    sweeps = result["batch_sweep"]
    assert [s["model"] for s in sweeps] == ["bundled", "SmolLM2-135M (1 layers)"]
    for s in sweeps:
        case = next(c for c in result["cases"] if c["model"] == s["model"] and c["prompt"] == s["prompt"])
        points = s["points"]
        assert [p["batch"] for p in points] == [1, 2, 4]
        assert s["new_tokens"] == case["new_tokens"] and s["mean_context"] == case["floor"]["mean_context"]
        # weights once, plus one embedding row per row; every row's KV cache at the mean context
        w1 = points[0]["weight_bytes"]
        emb_row = points[1]["weight_bytes"] - w1
        assert w1 == case["floor"]["weight_bytes_per_token"] and emb_row > 0
        for p in points:
            assert p["weight_bytes"] == w1 + (p["batch"] - 1) * emb_row
            assert p["kv_bytes_per_token"] == case["floor"]["kv_bytes_per_token"]
            assert p["bytes"] == pytest.approx(p["weight_bytes"] + p["batch"] * p["kv_bytes_per_token"] * s["mean_context"])
            assert p["rows_equal_batch1"] == 1.0  # the same prompt in every row: the same greedy tokens (fp32, CPU)
            assert len(p["rounds"]) == 2 and p["memory_bound"] in (True, False, None)
            for key in ["decode_ms_per_token", "tokens_per_s", "bandwidth_floor_fraction"]:
                assert p[key] is None or (math.isfinite(p[key]) and p[key] > 0), (key, p[key])
                assert p[key] is not None or p["missing"][key], (key, p)
            assert (p["floor_ms"] is None) == (s["copy_GBps"] is None)
            if p["tokens_per_s"] is not None:
                assert p["tokens_per_s"] == pytest.approx(p["batch"] * 1e3 / p["decode_ms_per_token"])
        assert [p["bytes"] for p in s["points"]] == sorted(p["bytes"] for p in s["points"])
    text = (tiny_run / "bench.md").read_text()
    assert "## Batch sweep" in text and "| batch | step (ms) | tokens/s | bytes per step |" in text
    assert (tiny_run / "batch_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_markdown_drops_a_method_or_table(tiny_run):
    text = (tiny_run / "bench.md").read_text()
    for heading in ["With and without a KV cache", "Every method", "Targets"]:
        assert heading in text
    assert "| with cache | without cache | speedup | notes |" in text
    assert "| vs generate(use_cache=True) | notes |" in text
    for label, _ in bench.METHODS.values():
        assert label in text
    assert not NEGATIVE_NUMBER.search(text), NEGATIVE_NUMBER.search(text)
    assert not NOT_FINITE.search(text), NOT_FINITE.search(text)


class FakeClock:
    """``bench.measure.now`` for tests: time moves only when a stand-in generator says so."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


STEP, STALL = 0.001, 0.2  # fake seconds per token, and a stall (another job on the core) before the first token


def _stalling_runner(clock: FakeClock):
    """A stand-in generator: every other call stalls before its first token, then each token takes STEP."""

    def factory(ctx):
        ids, calls = ctx["ids"], [0]

        def run(n, tick=None):
            calls[0] += 1
            if calls[0] % 2:
                clock.advance(STALL)
            for _ in range(n):
                clock.advance(STEP)
                if tick is not None:
                    tick()
            return torch.cat([ids, torch.zeros(ids.shape[0], n, dtype=ids.dtype)], dim=1)  # the same for all

        return bench.Runner("", run)

    return factory


def test_decode_by_subtraction_went_negative_under_load(tmp_path, monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(bench.measure, "now", clock)
    n = 4
    # precondition: the old design, (t(N) - t(1)) / (N - 1) from two whole calls, is negative on this clock
    ids = torch.tensor([[1, 2, 3]])
    old = _stalling_runner(clock)({"ids": ids})
    t1 = bench.timed(lambda: old.run(1), torch.device("cpu"))  # stalled
    tn = bench.timed(lambda: old.run(n), torch.device("cpu"))  # not stalled
    assert (tn - t1) / (n - 1) < 0, "precondition: the subtraction must go negative here"

    monkeypatch.setattr(bench.methods, "RUNNERS", {m: _stalling_runner(clock) for m in bench.METHODS})
    argv = ["--device", "cpu", "--models", "bundled", "--prompts", "short", "--new-tokens", str(n), "--repeats", "3",
            "--bandwidth-mib", "1", "--cache-lengths", "1", "--no-progress", "--out", str(tmp_path)]
    result = bench.run(bench.make_plan(bench.parse_args(argv)), tmp_path, progress=False)
    printed = capsys.readouterr().out

    _assert_rows_are_sound(result)
    assert json.loads((tmp_path / "bench.json").read_text())["cases"] == json.loads(json.dumps(result["cases"]))
    for name, m in result["cases"][0]["methods"].items():
        # decode from the same call's clock readings: (tick_N - tick_1) / (N - 1), one STEP, stall or not
        assert m["decode_ms_per_token"] == pytest.approx(STEP * 1e3), name
        assert m["decode_tokens_per_s"] == pytest.approx(1 / STEP), name
        assert m["spread_pct"] == pytest.approx(0, abs=1e-6)
        # the stall hit every other round's first token: TTFT spread is far above the limit
        assert m["unreliable"] and any("TTFT spread" in r for r in m["unreliable_reasons"]), name
        # the fake clock never moves during a memory copy: no bandwidth, so no floor, and it says why
        assert m["bandwidth_floor_fraction"] is None
        assert "bandwidth" in m["missing"]["bandwidth_floor_fraction"]
    assert result["bandwidth"]["copy_GBps"] is None
    for text in (printed, (tmp_path / "bench.md").read_text()):
        assert not NEGATIVE_NUMBER.search(text), NEGATIVE_NUMBER.search(text)
        assert not NOT_FINITE.search(text), NOT_FINITE.search(text)
        assert "**unreliable**: TTFT spread" in text and "floor fraction n/a: no bandwidth sample" in text
    assert any("(unreliable" in t["got"] for t in result["targets"])


def test_a_method_without_a_per_token_clock_crashed_the_figures(tmp_path, monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(bench.measure, "now", clock)
    ticking = _stalling_runner(clock)

    def no_clock(ctx):  # generates, but never calls tick()
        inner = ticking(ctx)
        return bench.Runner("", lambda n, tick=None: inner.run(n))

    monkeypatch.setattr(bench.methods, "RUNNERS", {m: ticking for m in bench.METHODS} | {"course_fast": no_clock})
    argv = ["--device", "cpu", "--models", "bundled", "--prompts", "short", "--new-tokens", "4", "--repeats", "2",
            "--bandwidth-mib", "1", "--cache-lengths", "1", "--no-progress", "--out", str(tmp_path)]
    result = bench.run(bench.make_plan(bench.parse_args(argv)), tmp_path, progress=False)
    capsys.readouterr()
    _assert_rows_are_sound(result)
    fast = result["cases"][0]["methods"]["course_fast"]
    assert fast["decode_ms_per_token"] is None and fast["ttft_ms"] is None and fast["step_ms"] is None
    assert "no per-token clock" in fast["missing"]["decode_ms_per_token"]
    assert fast["total_s"] is not None  # the whole call is still timed
    assert result["cases"][0]["methods"]["hf_dynamic"]["decode_ms_per_token"] is not None
    assert "decode n/a: the method reports no per-token clock" in (tmp_path / "bench.md").read_text()


def test_clock_readings_that_are_not_positive_and_finite_are_printed_as_numbers():
    n = 4
    cases = {
        "clock did not advance": bench.CallTimes([0.5, 0.5, 0.5, 0.5], 0.5),
        "clock went backwards": bench.CallTimes([0.5, 0.4, 0.3, 0.2], 0.6),
        "broken clock": bench.CallTimes([float("nan"), 0.1, 0.2, float("inf")], float("inf")),
        "no per-token clock": bench.CallTimes([], 0.3),
    }
    expect = {"clock did not advance": "zero", "clock went backwards": "negative", "broken clock": "not finite",
              "no per-token clock": "no per-token clock"}
    for what, call in cases.items():
        fig = call.figures(n)
        assert fig["decode"] is None and expect[what] in fig["why"]["decode"], (what, fig)
        row = bench.method_figures([call, call], n, 0.001, None, None)
        assert row["decode_ms_per_token"] is None and row["decode_tokens_per_s"] is None, what
        assert expect[what] in row["missing"]["decode_ms_per_token"], what
        assert row["bandwidth_floor_fraction"] is None and "decode time missing" in row["missing"]["bandwidth_floor_fraction"]
        assert all(v is None or (math.isfinite(v) and v > 0) for k, v in row.items() if k in FIGURES), (what, row)
        assert what == "clock did not advance" or call.step_ms() is None, what  # no bad step in the plot either
    for bad in (None, -1.0, float("inf"), float("nan"), -0.0001):
        assert bench.report._fmt(bad, ".2f", "x") == "n/a"
        assert bench.report._fmt_s(bad) == "n/a"


def test_one_round_in_many_was_missing_and_the_row_still_looked_reliable():
    good = bench.CallTimes([0.01, 0.02, 0.03, 0.04], 0.05)
    stuck = bench.CallTimes([0.01, 0.01, 0.01, 0.01], 0.02)
    row = bench.method_figures([good, stuck, good], 4, None, "no bandwidth sample", None)
    assert row["decode_ms_per_token"] == pytest.approx(10.0)  # the median of the rounds that have it
    assert row["unreliable"] and any("1 of 3 rounds missing" in r for r in row["unreliable_reasons"])


def test_row_with_a_large_spread_or_on_a_busy_machine_is_not_marked_unreliable():
    def call(decode_s):  # TTFT 10 ms, then 3 decode steps of decode_s
        return bench.CallTimes([0.01 + i * decode_s for i in range(4)], 0.01 + 4 * decode_s)

    steady = bench.method_figures([call(0.010), call(0.011), call(0.010)], 4, None, "no bandwidth", None)
    assert not steady["unreliable"] and steady["unreliable_reasons"] == []
    noisy = bench.method_figures([call(0.010), call(0.020), call(0.010)], 4, None, "no bandwidth", None)
    assert noisy["spread_pct"] == pytest.approx(100.0)
    assert noisy["unreliable"] and noisy["unreliable_reasons"] == ["decode spread 100% over 3 rounds > 25%"]
    busy = bench.method_figures([call(0.010)] * 3, 4, None, "no bandwidth", "machine busy: test")
    assert busy["unreliable"] and busy["unreliable_reasons"] == ["machine busy: test"]
    one = bench.method_figures([call(0.010)], 4, None, "no bandwidth", None)
    assert one["spread_pct"] is None and "one round" in one["missing"]["spread_pct"]

    # busy: others' load (1-min average - the benchmark's own threads) above free cores + LOAD_MARGIN
    assert bench.busy_reason([("at start", [0.2, 0.1, 0.1], 0), ("at end", [2.1, 1.0, 0.5], 2)], 2, 2) is None
    why = bench.busy_reason([("at start", [3.0, 1.0, 0.5], 0), ("at end", [2.1, 1.0, 0.5], 2)], 2, 2)
    assert why and "3.0 at start" in why and "2 cores" in why
    assert bench.busy_reason([("at end", [4.3, 1.0, 0.5], 2)], 2, 2)  # 2.3 beyond its own 2 threads
    assert bench.busy_reason([("at start", None, 0)], 2, 2) is None  # no load average on this system


def test_targets_crashed_on_a_missing_decode_figure(tiny_run):
    """The issue's crash: speed_vs_hf_cache_decode None -> TypeError in targets(); and the tables likewise."""
    result = json.loads((tiny_run / "bench.json").read_text())
    # 1. as computed now: the fast path's clock did not advance, so its decode and all that derive are missing
    case = copy.deepcopy(result["cases"][0])
    stuck = bench.CallTimes([0.002, 0.002, 0.002, 0.002], 0.003)
    case["methods"]["course_fast"].update(bench.method_figures([stuck, stuck], 4, 0.001, None, None))
    bench.compare_to_reference(case["methods"], bench.REFERENCE)
    fast = case["methods"]["course_fast"]
    assert fast["speed_vs_hf_cache_decode"] is None
    assert "decode_ms_per_token of course_fast missing" in fast["missing"]["speed_vs_hf_cache_decode"]
    # 2. as the old bench.json had it: None with no reason at all
    old = copy.deepcopy(result["cases"][0])
    for key in ["speed_vs_hf_cache_decode", "speed_vs_hf_cache_total", "bandwidth_floor_fraction", "decode_ms_per_token"]:
        old["methods"]["course_fast"][key] = None
    old["methods"]["course_fast"].pop("missing")
    # 3. the reference itself missing: every comparison says whose figure is missing
    ref_missing = copy.deepcopy(result["cases"][2])
    ref_missing["methods"][bench.REFERENCE].update(bench.method_figures([stuck, stuck], 4, None, "none", None))
    bench.compare_to_reference(ref_missing["methods"], bench.REFERENCE)
    assert all(f"of {bench.REFERENCE} missing" in m["missing"]["speed_vs_hf_cache_decode"]
               for m in ref_missing["methods"].values() if not m.get("unavailable"))  # (n/a here: says its own)
    ref_missing["model"] = "SmolLM2-135M"  # so that the bandwidth-floor target is built too

    cases = [case, old, ref_missing]
    tg = bench.targets(cases, torch.device("cpu"))
    fast_targets = [t for t in tg if t["target"].startswith("fast path vs")]
    assert len(fast_targets) == 3 and all(t["met"] is None and t["got"].startswith("n/a (") for t in fast_targets)
    assert "came out zero" in fast_targets[0]["got"] and "not measured" in fast_targets[1]["got"]
    text = bench.markdown({**result, "cases": cases, "targets": tg})
    assert "decode n/a: decode per token" in text and "came out zero" in text
    assert not NEGATIVE_NUMBER.search(text) and not NOT_FINITE.search(text)
    bench.summary_table(cases), bench.full_table(cases)


class OffByOneCache(KVCache):
    """A bug: once the prompt is in, the cache reports one token too many, so decode positions are off by one."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        n = super().get_seq_length(layer_idx)
        return n + 1 if n else n


def _off_by_one_runner(ctx):
    llama, ids = ctx["llama"], ctx["ids"]

    def run(n, tick=None):
        return generate(llama, ids, n, cache=OffByOneCache.for_model(llama, ids.shape[0], ids.shape[1] + n + 1))

    return bench.Runner("", run)


@pytest.mark.parametrize("check", [[], ["--separate-check"]], ids=["check-in-round-1", "separate-check"])
def test_bench_times_a_generator_with_wrong_tokens(tmp_path, monkeypatch, capsys, check):
    model = bench.random_llama("SmolLM2-135M", 1, seed=0)
    ids = bench.prompt_ids(bench.bundled_tokenizer(), "short", 0)
    broken = _off_by_one_runner({"llama": Llama.from_hf(model), "ids": ids}).run(8)
    assert not torch.equal(broken, bench.hf_generate(model, ids, 8)), "precondition: the bug must change tokens"

    monkeypatch.setitem(bench.RUNNERS, "course_fast", _off_by_one_runner)
    # on the CPU, where the precondition holds (on another device, or rounded to bf16, the bug may not show)
    argv = [*TINY, *check, "--device", "cpu", "--models", "SmolLM2-135M:1", "--prompts", "short", "--new-tokens", "8",
            "--methods", "course_kvcache", "course_fast", "hf_dynamic", "--out", str(tmp_path)]
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


def test_a_model_that_fits_in_the_cpu_cache_got_a_dram_floor(tmp_path):
    """The bundled model (9.6 MB) read from a 32 MiB last-level cache was shown as "76% of the DRAM floor"."""
    from kvcourse.bench.bandwidth import cache_resident, last_level_cache_bytes
    from kvcourse.bench.report import full_table

    for level, size in ((1, "48K"), (2, "2048K"), (3, "32768K")):
        index = tmp_path / f"index{level}"
        index.mkdir()
        (index / "level").write_text(f"{level}\n")
        (index / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert last_level_cache_bytes(tmp_path / "missing") is None
    cpu, llc = torch.device("cpu"), 32 * 2**20
    why = cache_resident(9.6e6, cpu, llc)
    assert why and why.startswith("fits in cache") and "9.6 MB" in why and "32 MiB" in why
    assert cache_resident(538e6, cpu, llc) is None  # SmolLM2-135M's weights: DRAM sets the floor
    assert cache_resident(9.6e6, torch.device("meta"), llc) is None  # not a CPU: no CPU cache to fit in
    row = {"label": "course: fast path", "bandwidth_floor_fraction": None, "missing": {"bandwidth_floor_fraction": why},
           "unreliable": False, "unreliable_reasons": []}
    case = {"model": "bundled", "prompt": "short", "prompt_tokens": 6, "new_tokens": 4, "methods": {"course_fast": row}}
    assert "| n/a: fits in cache |" in full_table([case])
    row.update(bandwidth_floor_fraction=0.76, missing={})
    assert "| 76% |" in full_table([case])
