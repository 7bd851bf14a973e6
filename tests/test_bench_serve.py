"""kvcourse.bench.serve: the serving benchmark (issue 23). No timing is asserted: only that the workload is
seeded and what it states is true, that the table has every system and every column (n/a, never a made-up
number, where a system has no such figure), that a wrong token is reported, and that a tiny run completes with
the course engine, every request's tokens checked against kvcourse.generate.

Each test is named after the bug it guards against.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from kvcourse import bench
from kvcourse.batching import pad_prompts
from kvcourse.bench import serve, serve_report, serve_systems
from kvcourse.bench.serve_systems import Budget, RequestRecord, SystemResult
from kvcourse.bench.serve_workload import WorkloadSpec, make_workload, percentile


@pytest.fixture(scope="module")
def tokenizer():
    return bench.bundled_tokenizer()


def _spec(**kw) -> WorkloadSpec:
    return WorkloadSpec(**{"num_requests": 40, "rate": 20.0, **kw})


def test_same_seed_gives_a_different_workload(tokenizer):
    a = make_workload(_spec(seed=3), tokenizer)
    b = make_workload(_spec(seed=3), tokenizer)
    c = make_workload(_spec(seed=4), tokenizer)
    assert [(r.prompt, r.max_new_tokens, r.arrival, r.shared) for r in a.requests] == \
        [(r.prompt, r.max_new_tokens, r.arrival, r.shared) for r in b.requests]
    assert a.stats() == b.stats()
    assert [r.prompt for r in a.requests] != [r.prompt for r in c.requests]
    assert a.arrivals != c.arrivals


def test_workload_states_what_it_is_not(tokenizer):
    """The stated figures are the workload's: half shared, whole-block system prompt, lengths clipped, Poisson
    arrivals in order starting at 0, text from the bundled tokenizer (inside its vocabulary)."""
    spec = _spec(seed=1)
    w = make_workload(spec, tokenizer)
    st = w.stats()
    sys_len = spec.system_blocks * spec.block_size
    assert len(w.system_prompt) == sys_len == st["system_prompt_tokens"]
    assert st["shared"] == round(spec.num_requests * spec.shared_fraction) == sum(r.shared for r in w.requests)
    for r in w.requests:
        own = r.prompt[sys_len:] if r.shared else r.prompt
        assert (r.prompt[:sys_len] == w.system_prompt) == r.shared, r.request_id
        assert spec.prompt_min <= len(own) <= spec.prompt_max
        assert spec.output_min <= r.max_new_tokens <= spec.output_max
        assert all(0 <= t < tokenizer.vocab_size for t in r.prompt)
    arr = w.arrivals
    assert arr[0] == 0.0 and all(b >= a for a, b in zip(arr, arr[1:], strict=False))
    assert st["num_requests"] == len(w.requests) == spec.num_requests
    assert st["prompt_tokens"] == sum(len(r.prompt) for r in w.requests)
    assert st["output_tokens"] == sum(r.max_new_tokens for r in w.requests)
    assert st["prompt_len"]["max"] == max(len(r.prompt) for r in w.requests)
    assert math.isclose(st["measured_rate"], (len(arr) - 1) / (arr[-1] - arr[0]))
    # the text is natural: it decodes to Shakespeare, not random ids
    assert "Shall I compare thee" in tokenizer.decode(w.system_prompt)


@pytest.mark.parametrize("bad, word", [({"rate": 0.0}, "rate"), ({"num_requests": 0}, "num_requests"),
                                       ({"prompt_min": 50, "prompt_max": 10}, "max below its min"),
                                       ({"shared_fraction": 1.5}, "shared_fraction")])
def test_bad_workload_spec_gives_a_silent_workload(bad, word):
    with pytest.raises(ValueError, match=word):
        WorkloadSpec(**bad)


def test_percentile_off_by_one():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    assert math.isclose(percentile(list(range(101)), 95), 95.0)
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_static_batch_exceeds_the_kv_budget_or_takes_requests_not_yet_arrived(tokenizer):
    w = make_workload(_spec(seed=2, num_requests=30, rate=5.0), tokenizer)
    budget = Budget(num_blocks=40, block_size=16, max_num_seqs=4)
    reqs = w.requests
    for first in range(len(reqs)):
        now = reqs[first].arrival + 0.5
        idx = serve_systems._next_batch(reqs, first, now, budget)
        assert idx[0] == first and idx == list(range(first, first + len(idx)))
        assert len(idx) <= budget.max_num_seqs
        longest = max(len(reqs[j].prompt) for j in idx)
        most = max(reqs[j].max_new_tokens for j in idx)
        assert len(idx) == 1 or len(idx) * (longest + most - 1) <= budget.kv_tokens
        assert all(reqs[j].arrival <= now for j in idx[1:])


def test_left_padding_on_the_wrong_side():
    """The static system pads with notebook 06's pad_prompts, on the left."""
    assert serve_systems.pad_prompts is pad_prompts
    ids, mask = pad_prompts([[5, 6, 7], [9]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _result(name, times, **kw) -> SystemResult:
    recs = {f"r{i}": RequestRecord(f"r{i}", arr, [1] * len(ts), ts, ts[-1]) for i, (arr, ts) in enumerate(times)}
    return SystemResult(name, recs, **kw)


def test_ttft_forgets_the_queue_and_tpot_counts_the_first_token():
    # r0 arrives at 0, tokens at 1, 2, 3; r1 arrives at 1, tokens at 4, 6
    res = _result("engine", [(0.0, [1.0, 2.0, 3.0]), (1.0, [4.0, 6.0])], peak_blocks=3, preemptions=0,
                  prefix_hit_rate=0.5)
    f = serve_report.figures(res)
    assert f["tokens"] == 5 and f["makespan_s"] == 6.0 and f["tokens_per_s"] == 5 / 6
    assert f["ttft_p50"] == 2.0  # (1 - 0) and (4 - 1): queueing counts
    assert f["tpot_p50"] == 1.5  # (3 - 1) / 2 = 1 and (6 - 4) / 1 = 2
    assert f["itl_p95"] == percentile([1.0, 1.0, 2.0], 95)


def test_table_drops_a_system_or_a_column():
    rows = [serve_report.figures(_result(name, [(0.0, [0.5, 0.75])], **kw)) for name, kw in (
        ("static_hf", {"peak_blocks": 4, "preemptions": 0}),
        ("hf_cb", {"peak_blocks": 3, "preemptions": 2, "prefix_hit_rate": 0.25}),
        ("engine", {"peak_blocks": 3, "preemptions": 1, "prefix_hit_rate": 0.5}))]
    text = serve_report.table(rows, {"engine": "1/1", "static_hf": "0/1 (1 differ; r0 first at token 0)"})
    lines = text.splitlines()
    assert lines[0] == "| " + " | ".join(serve_report.COLUMNS) + " |"
    assert len(lines) == 2 + 3
    for line, name in zip(lines[2:], ("static_hf", "hf_cb", "engine"), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(serve_report.COLUMNS)
        assert cells[0] == serve_systems.SYSTEMS[name]
    static = [c.strip() for c in lines[2].strip("|").split("|")]
    assert static[8] == "n/a"  # no prefix cache: n/a, not 0%
    assert static[9].startswith("0/1")
    assert [c.strip() for c in lines[3].strip("|").split("|")][9] == "not checked"
    assert [c.strip() for c in lines[4].strip("|").split("|")][8] == "50%"


def test_wrong_tokens_are_hidden():
    res = _result("engine", [(0.0, [1.0, 2.0, 3.0])])
    res.records["r0"].tokens = [7, 8, 9]
    assert serve_systems.token_mismatches(res, {"r0": [7, 8, 9]}) == []
    bad = serve_systems.token_mismatches(res, {"r0": [7, 5, 9]})
    assert bad == [{"request_id": "r0", "first_diff": 1, "expected": [5, 9], "got": [8, 9], "len_expected": 3,
                    "len_got": 3}]
    short = serve_systems.token_mismatches(res, {"r0": [7, 8, 9, 1]})
    assert short[0]["first_diff"] == 3 and short[0]["len_got"] == 3


def test_targets_hide_a_missed_target():
    rows = {"engine": {"tokens_per_s": 150.0, "ttft_p95": 2.0}, "static_hf": {"tokens_per_s": 100.0, "ttft_p95": 1.0},
            "hf_cb": {"tokens_per_s": 300.0}}
    lines = serve_report.targets(rows, [{"batch": 8, "context": 64, "ratio_static": 1.5}])
    text = "\n".join(lines)
    assert "1.50x (target >= 2x: MISSED)" in text
    assert "target lower: MISSED" in text
    assert "0.50x (target > 1x: MISSED)" in text
    assert "B=8, context 64: 1.50x (target <= 1.3x: MISSED)" in text


def test_bench_serve_flag_runs_the_old_benchmark(monkeypatch):
    seen = {}
    monkeypatch.setattr(serve, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert bench.cli.main(["--serve", "--quick", "--out", "x"]) == 0
    assert seen["argv"] == ["--quick", "--out", "x"]
    args = bench.parse_args(["--quick"])  # the old benchmark's options are unchanged
    assert args.quick and not args.serve


def test_quick_plan_and_bad_options():
    plan = serve.make_plan(serve.parse_args(["--quick"]))
    assert plan.preset == "quick" and "engine" in plan.systems and plan.budget.num_blocks >= 1
    plan = serve.make_plan(serve.parse_args(["--overhead", "4x32", "--budgets"]))
    assert plan.overhead == [(4, 32)] and plan.budgets == []
    with pytest.raises(SystemExit, match="BxCONTEXT"):
        serve.make_plan(serve.parse_args(["--overhead", "4by32"]))
    with pytest.raises(SystemExit, match="--num-blocks"):
        serve.make_plan(serve.parse_args(["--num-blocks", "0"]))


def test_quick_run_with_the_engine_gives_wrong_tokens_or_drops_a_system(tmp_path, tokenizer):
    """A tiny workload through every system, the engine included: all rows, every request's tokens equal to
    kvcourse.generate on its prompt alone, the overhead and the sweep present, the files written."""
    plan = serve.make_plan(serve.parse_args(["--quick", "--models", "bundled", "--num-requests", "6",
                                             "--budgets", "32", "--overhead", "2x16", "--overhead-steps", "2"]))
    plan.spec = replace(plan.spec, output_max=12, prompt_max=48)
    lines: list[str] = []
    report = serve.run(plan, tmp_path, say=lines.append)
    (m,) = report["models"]
    assert [r["system"] for r in m["rows"]] == plan.systems
    assert m["checked"] == 6
    assert m["checks"]["engine"] == "6/6", m["mismatches"]["engine"]
    for row in m["rows"]:
        assert row["tokens"] == m["workload"]["output_tokens"] and row["failed"] == 0, row["system"]
    (o,) = m["overhead"]
    assert o["batch"] == 2 and o["steady"] and o["engine_s"] > 0 and o["static_s"] > 0
    assert [p["budget"] for p in m["sweep"]] == [32] and m["sweep"][0]["tokens_ok"]
    md = (tmp_path / "serve.md").read_text()
    for label in (serve_systems.SYSTEMS[s] for s in plan.systems):
        assert label in md
    saved = json.loads((tmp_path / "serve.json").read_text())
    assert saved["models"][0]["workload"]["num_requests"] == 6
    assert (tmp_path / "serve_sweep.png").stat().st_size > 0
