"""kvcourse.bench.speculative: the speculative-decoding benchmark (issue 24). No timing is asserted: only that the
repetitive prompts are chosen by the stated rule, that the passes of transformers' systems are counted and the
assistant really drafts a fixed k, that every ratio column comes from the same run's sums, that a missed target
is reported as missed, and that a quick run checks every setting's tokens against the plain greedy tokens.

Each test is named after the bug it guards against.
"""

from __future__ import annotations

import json

import pytest
import torch

from kvcourse import bench
from kvcourse.bench import speculative as spec
from kvcourse.bench import speculative_report as report
from kvcourse.generate import generate


@pytest.fixture(scope="module")
def models():
    return spec.load()


def test_repeat_share_counts_the_prompt_or_misses_earlier_ngrams():
    # 4-grams ending in the output (positions 4..7): (2,3,4,1) (3,4,1,2) (4,1,2,3) new, (1,2,3,4) seen in the prompt
    assert spec.repeat_share([1, 2, 3, 4, 1, 2, 3, 4], 4) == 0.25
    assert spec.repeat_share([5] * 10, 4) == 1.0  # every output 4-gram is (5, 5, 5, 5), first seen in the prompt
    assert spec.repeat_share([1, 2, 3, 4, 5, 6], 4) == 0.0
    assert spec.repeat_share([1, 2, 1, 2, 1], 2, n=2) == pytest.approx(2 / 3)  # (2,1) new, (1,2) (2,1) seen
    assert spec.repeat_share([1, 2, 1, 2, 1], 3, n=2) == 1.0
    assert spec.repeat_share([7, 8], 2) == 0.0  # no output: no n-gram, 0.0 (not a division by zero)
    with pytest.raises(ValueError, match="n-gram size"):
        spec.repeat_share([1, 2, 3], 1, n=0)


def test_repetitive_prompts_chosen_by_another_rule(models, monkeypatch):
    """The chosen prompts are exactly the first ``count`` of the pool, in its order, whose share is >= the
    threshold; every share is recomputed here from the target's own greedy tokens."""
    monkeypatch.setattr(spec, "RULE_TOKENS", 48)
    fresh, rep, pool = spec.choose_prompts(models, 2)
    assert list(fresh) == list(spec.SHAKESPEARE)[:2]
    assert [p["name"] for p in pool] == list(spec.REPETITIVE_POOL)
    shares = {}
    for name, text in spec.REPETITIVE_POOL.items():
        ids = models.tokenizer(text, return_tensors="pt").input_ids
        shares[name] = spec.repeat_share(generate(models.target, ids, 48)[0].tolist(), ids.shape[1])
    assert {p["name"]: p["repeat_share"] for p in pool} == shares
    expected = [n for n in spec.REPETITIVE_POOL if shares[n] >= spec.REPEAT_SHARE_MIN][:2]
    assert list(rep) == expected == [p["name"] for p in pool if p["chosen"]]
    assert all(rep[n]["text"] == spec.REPETITIVE_POOL[n] for n in rep)


@pytest.mark.parametrize("k", [1, 3])
def test_transformers_passes_miscounted_or_assistant_not_at_a_fixed_k(models, k):
    """transformers' assisted rows: the same tokens as kvcourse.generate, one target pass per hook call, each pass
    but the last ones reading exactly k drafts (the default confidence threshold would cut drafts short), the
    accepted count from n - passes, and the assistant's generation_config left as it was."""
    ids = models.tokenizer(spec.REPETITIVE_POOL["counting"], return_tensors="pt").input_ids
    n = 40
    ref = generate(models.target, ids, n)
    gc = models.draft_hf.generation_config
    before = (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold)
    with spec.PassCounter(models.hf) as seen:
        tokens, stats = spec.run_setting(spec.Setting("hf_draft", k), models, ids, n, count=True)
    assert torch.equal(tokens, ref)
    assert stats["target_passes"] == len(seen.widths)
    assert seen.widths[0] == ids.shape[1] + k  # the prompt and k drafts
    rest = seen.widths[1:]
    full = [w for w in rest if w == k + 1]
    # k drafts a pass; fewer only in the last k passes, where the room left (n - tokens so far - 1) is below k
    assert rest[:len(full)] == full and len(rest) - len(full) <= k, seen.widths
    assert stats["accepted"] == n - stats["target_passes"]
    assert stats["proposed"] == seen.widths[0] - ids.shape[1] + sum(w - 1 for w in seen.widths[1:])
    assert 0 <= stats["accepted"] <= stats["proposed"]
    assert stats["draft_passes"] >= len(full)  # the assistant ran for every pass that read k drafts
    assert (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold) == before


def test_plain_transformers_generate_counted_as_speculative(models):
    ids = models.tokenizer(spec.SHAKESPEARE["macbeth"], return_tensors="pt").input_ids
    tokens, stats = spec.run_setting(spec.Setting("hf"), models, ids, 12, count=True)
    assert torch.equal(tokens, generate(models.target, ids, 12))
    assert stats == {"target_passes": 12, "draft_passes": 0}
    with pytest.raises(ValueError, match="unknown system"):
        spec.run_setting(spec.Setting("vllm"), models, ids, 4)


def _runs(course: float, hf: float, other: float, equal: bool = True) -> dict:
    base = {"target_passes": 10, "draft_passes": 0}
    return {"course": {**base, "median_s": course, "median_cpu_s": course / 2, "equal": True},
            "hf": {**base, "median_s": hf, "median_cpu_s": hf / 2, "equal": True},
            "lookup k=2": {"target_passes": 5, "draft_passes": 0, "proposed": 8, "accepted": 6, "median_s": other,
                           "median_cpu_s": other / 4, "equal": equal}}


def test_ratio_columns_from_another_run():
    """Every column of a row comes from the sums over the text's prompts: no mean of ratios, no other run."""
    per = {"a": {"runs": _runs(1.0, 2.0, 0.5)}, "b": {"runs": _runs(3.0, 2.0, 1.5, equal=False)}}
    sets = [spec.Setting("course"), spec.Setting("hf"), spec.Setting("lookup", 2)]
    rows = {r["setting"]: r for r in report.aggregate(per, sets, 10)}
    look = rows["lookup k=2"]
    assert look["tokens"] == 20 and look["seconds"] == 2.0 and look["tokens_per_s"] == 10.0
    assert look["x_course"] == 4.0 / 2.0 and look["x_hf"] == 4.0 / 2.0
    assert look["x_course_cpu"] == 2.0 / 0.5 and look["x_hf_cpu"] == 2.0 / 0.5
    assert look["passes_per_token"] == 10 / 20 and look["tokens_per_pass"] == 2.0
    assert look["acceptance"] == 12 / 16
    assert (look["equal"], look["checked"]) == (1, 2)
    assert rows["course"]["x_course"] == 1.0 and rows["course"]["acceptance"] is None


def _row(system: str, k, x: float, x_cpu: float, seconds: float = 1.0) -> dict:
    return {"setting": system if k is None else f"{system} k={k}", "system": system, "k": k, "x_course": x,
            "x_course_cpu": x_cpu, "tokens_per_s": 100 * x, "seconds": seconds, "cpu_seconds": seconds}


@pytest.mark.parametrize("wall, cpu, verdict", [(1.6, 1.7, "met"), (1.6, 1.4, "NOT met"), (1.2, 1.2, "NOT met")])
def test_targets_hide_a_missed_target(wall, cpu, verdict):
    rows = [_row("course", None, 1.0, 1.0), _row("lookup", 4, wall, cpu, 0.5), _row("draft", 4, 0.8, 0.5, 1.3),
            _row("hf_lookup", 4, 1.1, 1.1, 0.7), _row("hf_draft", 4, 0.3, 0.3, 3.0)]
    lines = report.targets({"texts": {"repetitive": {"rows": rows}}})
    assert lines[0].endswith(f"target >= 1.5x {verdict}") and "lookup k=4" in lines[0]
    assert "hf_lookup k=4" in lines[1] and "1.40x" in lines[1] and "faster: met" in lines[1]
    assert "speculation slower" in lines[-1] and "draft k=4" in lines[-1]
    assert report.targets({"texts": {}}) == ["no repetitive prompt passed the rule: the targets are not measured"]


def test_predicted_speedup_forgets_the_draft_cost():
    costs = {"cpu_ms": {"target_decode": 1.0, "draft_decode": 0.2, "verify_3": 1.5}}
    lookup = {"system": "lookup", "k": 2, "tokens_per_pass": 2.0, "draft_passes_per_token": 0.0}
    draft = {**lookup, "system": "draft", "draft_passes_per_token": 1.0}  # 2 draft passes a target pass
    assert report.predicted_speedup(lookup, costs) == pytest.approx(2.0 / 1.5)
    assert report.predicted_speedup(draft, costs) == pytest.approx(2.0 / (1.5 + 2 * 0.2))
    assert report.predicted_speedup({**lookup, "system": "hf_lookup"}, costs) is None


def test_bench_speculative_flag_runs_the_old_benchmark(monkeypatch):
    seen = {}
    monkeypatch.setattr(spec, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert bench.cli.main(["--speculative", "--quick", "--out", "x"]) == 0
    assert seen["argv"] == ["--quick", "--out", "x"]
    args = bench.parse_args(["--quick"])
    assert args.quick and not args.speculative


@pytest.mark.parametrize("argv, word", [(["--ks", "0"], "--ks"), (["--ks", "2", "2"], "--ks"),
                                        (["--hf-draft-ks", "0"], "--hf-draft-ks"),
                                        (["--new-tokens", "3"], "--new-tokens"), (["--prompts", "4"], "--prompts"),
                                        (["--repeats", "0"], "--repeats")])
def test_bad_options_accepted(argv, word):
    with pytest.raises(SystemExit, match=word):
        spec.make_plan(spec.parse_args(argv))


def test_quick_run_gives_wrong_tokens_or_drops_a_setting(tmp_path):
    """The quick run: every setting on both texts, every token equal to kvcourse.generate's, passes counted
    (the plain generators one per token, speculation fewer where a draft was kept), the costs measured for every
    k, the files written."""
    plan = spec.make_plan(spec.parse_args(["--quick"]))
    lines: list[str] = []
    rep = spec.run(plan, tmp_path, say=lines.append)
    names = [s.name for s in spec.settings(plan.ks, plan.hf_draft_ks)]
    assert "hf_draft k=2" not in names and "hf_draft k=4" in names  # the quick preset's hf_draft_ks: 1, 4
    assert set(rep["texts"]) == {"shakespeare", "repetitive"}
    for label, text in rep["texts"].items():
        rows = {r["setting"]: r for r in text["rows"]}
        assert list(rows) == names, label
        for r in rows.values():
            assert r["equal"] == r["checked"] == plan.prompts, (label, r["setting"])
            assert r["tokens"] == plan.new_tokens * plan.prompts
        assert rows["course"]["passes_per_token"] == rows["hf"]["passes_per_token"] == 1.0
        for k in plan.ks:
            look, their = rows[f"lookup k={k}"], rows[f"hf_lookup k={k}"]
            assert look["tokens_per_pass"] == pytest.approx(1 / look["passes_per_token"])
            assert look["draft_passes_per_token"] == their["draft_passes_per_token"] == 0.0
            assert 0 < their["passes_per_token"] <= 1 and 0 <= their["acceptance"] <= 1
            assert rows[f"draft k={k}"]["draft_passes_per_token"] > 0
        for p in text["prompts"].values():
            run = p["runs"]["course"]
            assert len(run["times"]) == plan.repeats and run["median_s"] > 0 and run["median_cpu_s"] > 0
    assert set(rep["costs"]["cpu_ms"]) == {"target_decode", "draft_decode", *(f"verify_{k + 1}" for k in plan.ks)}
    md = (tmp_path / "speculative.md").read_text()
    for name in names:
        assert f"| {name} |" in md
    assert json.loads((tmp_path / "speculative.json").read_text())["plan"]["ks"] == plan.ks
    assert (tmp_path / "speculative.png").stat().st_size > 0
    # --render rewrites the same tables from the saved json, measuring nothing
    again = tmp_path / "again"
    assert spec.main(["--render", str(tmp_path / "speculative.json"), "--out", str(again)]) == 0
    assert (again / "speculative.md").read_text() == md


def test_render_takes_any_json(tmp_path):
    with pytest.raises(SystemExit, match="not a file"):
        spec.main(["--render", str(tmp_path / "missing.json")])
    other = tmp_path / "serve.json"
    other.write_text(json.dumps({"schema": "kvcourse-serve/1"}))
    with pytest.raises(SystemExit, match="kvcourse-speculative/1"):
        spec.main(["--render", str(other)])
