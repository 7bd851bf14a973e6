"""kvcourse.bench.mla: the MLA decode-step benchmark (issue 25, section 1). Tiny shapes only, no timing asserted:
that every (context, path) row is there with every field, that the bytes columns are what real caches hold after a
real prefill, that the paths are interleaved and each timed step sees exactly the context, that the stated cost per
cached token is what the code really multiplies, and that bad options are refused by name.

Each test is named after the bug it guards against.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from kvcourse.bench import mla as bench
from kvcourse.memory import cache_tensors, tensor_bytes
from kvcourse.mla import LatentCache

FIELDS = {"context", "path", "ms", "ms_wall", "cache_bytes", "max_abs_logit_diff"}
LINE_FIELDS = {"context", *bench.PATHS, "unabsorbed/absorbed", "transformers/absorbed", "latent_bytes",
               "transformers_bytes", "max_abs_logit_diff"}


@pytest.fixture(scope="module")
def models():
    return bench.build(bench.TINY)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mla")
    assert bench.main(["--tiny", "--contexts", "5", "17", "--repeats", "2", "--out", str(out)]) == 0
    return json.loads((out / "mla.json").read_text()), (out / "mla.md").read_text()


def test_a_row_or_field_missing(tiny_run):
    report, md = tiny_run
    assert [(r["context"], r["path"]) for r in report["rows"]] == [(c, p) for c in (5, 17) for p in bench.PATHS]
    assert all(set(r) == FIELDS for r in report["rows"])
    assert [t["context"] for t in report["table"]] == [5, 17] and all(set(t) == LINE_FIELDS for t in report["table"])
    by = {(r["context"], r["path"]): r for r in report["rows"]}
    for t in report["table"]:  # the ratios come from the rows of the same context
        c = t["context"]
        assert t["unabsorbed/absorbed"] == by[c, "unabsorbed"]["ms"] / by[c, "absorbed"]["ms"]
        assert t["transformers/absorbed"] == by[c, "transformers"]["ms"] / by[c, "absorbed"]["ms"]
    assert report["repeats"] == 2 and report["explanation"] in md
    assert all(f"| {c} |" in md for c in (5, 17))


def test_paths_compute_different_things(tiny_run):
    """The timing compares equal work only if the three paths give the same logits from the same caches."""
    rows = tiny_run[0]["rows"]
    assert all(r["max_abs_logit_diff"] == 0.0 for r in rows if r["path"] == "absorbed")
    assert all(r["max_abs_logit_diff"] < 1e-4 for r in rows)


@pytest.mark.parametrize("context", [3, 11])
def test_bytes_columns_not_what_a_real_prefill_holds(models, context):
    """The benchmark fills its caches with random latents; their bytes must be those a real prefill of as many
    tokens leaves in transformers' DynamicCache and in the course's LatentCache."""
    hf, ours = models
    rows = bench.measure_context(ours, hf, context, repeats=1)
    ids = torch.randint(0, bench.TINY["vocab_size"], (1, context), generator=torch.Generator().manual_seed(1))
    hf_cache = DynamicCache(config=hf.config)
    cache = LatentCache.for_model(ours, 1, 4 * context)  # preallocated past the tokens: only these count
    with torch.no_grad():
        hf(input_ids=ids, cache=hf_cache, use_cache=True)
        ours(ids, cache)
    real = {"transformers": sum(t.numel() * t.element_size() for t in cache_tensors(hf_cache)),
            "latent": cache.bytes_per_token() * context}
    for r in rows:
        assert r["cache_bytes"] == real["transformers" if r["path"] == "transformers" else "latent"], r
    assert bench.latent_bytes(cache) == real["latent"] < tensor_bytes(cache.latents + cache.rope_keys)


def test_paths_not_interleaved_or_a_step_sees_another_context(models):
    """Every round runs each path once, in an order that rotates; every step reads exactly ``context`` tokens."""
    hf, ours = models
    seen = []
    hooks = [ours.register_forward_pre_hook(
                 lambda m, a, kw: seen.append(("absorbed" if kw.get("absorbed") else "unabsorbed",
                                               a[1].get_seq_length())), with_kwargs=True),
             hf.register_forward_pre_hook(
                 lambda m, a, kw: seen.append(("transformers", kw["cache"].get_seq_length())), with_kwargs=True)]
    try:
        bench.measure_context(ours, hf, 7, repeats=3)
    finally:
        for h in hooks:
            h.remove()
    assert {n for _, n in seen} == {7}
    rounds = [[p for p, _ in seen[i:i + 3]] for i in range(0, len(seen), 3)]
    assert len(rounds) == 4 and all(sorted(r) == sorted(bench.PATHS) for r in rounds)
    assert len({r[0] for r in rounds}) == 3  # the first path of a round changes


@pytest.mark.parametrize("path", bench.PATHS)
def test_stated_cost_per_cached_token_not_what_the_code_multiplies(models, path):
    """macs_per_cached_token (quoted in the explanation) against the multiply-adds torch counts in one step."""
    hf, ours = models

    def flops(context):
        cache, hf_cache = bench.filled_caches(ours, hf, context, 0)
        token = torch.tensor([[3]])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if path == "transformers":
                hf(input_ids=token, cache=hf_cache, use_cache=True, logits_to_keep=1)
            else:
                ours(token, cache, absorbed=path == "absorbed", last_only=True)
        return counter.get_total_flops()

    per_token_layer = (flops(30) - flops(10)) / 20 / 2 / bench.TINY["num_hidden_layers"]  # 2 flops a multiply-add
    want = bench.macs_per_cached_token(ours.args)["absorbed" if path == "absorbed" else "unabsorbed"]
    assert per_token_layer == want


@pytest.mark.parametrize("argv, name", [(["--repeats", "0"], "--repeats"), (["--contexts", "128", "0"], "--contexts"),
                                        (["--threads", "0"], "--threads"), (["--repeats", "two"], "--repeats")])
def test_bad_option_not_refused_by_name(argv, name, capsys):
    with pytest.raises(SystemExit) as err:
        bench.parse_args(argv)
    assert name in str(err.value) + capsys.readouterr().err


def test_quick_preset_not_applied(tmp_path):
    assert bench.main(["--quick", "--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "mla.json").read_text())
    assert [t["context"] for t in report["table"]] == bench.PRESETS["quick"]["contexts"]
    assert report["repeats"] == bench.PRESETS["quick"]["repeats"] and report["preset"] == "quick, tiny"
    assert report["model"]["source"] == "the tests' tiny shape"
    args = bench.parse_args([])
    assert (args.contexts, args.repeats) == (bench.PRESETS["full"]["contexts"], bench.PRESETS["full"]["repeats"])


def test_bench_mla_flag_does_not_reach_this_benchmark(tmp_path):
    """``python -m kvcourse.bench --mla ...`` must run this benchmark with the options after the flag."""
    from kvcourse.bench import cli

    assert cli.main(["--mla", "--tiny", "--contexts", "5", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "mla.json").read_text())
    assert {r["context"] for r in report["rows"]} == {5}
