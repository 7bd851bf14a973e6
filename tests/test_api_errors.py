"""Issue 8 section 4: inputs the API used to get silently wrong, or fail on with an unclear error.

Each test is named after the bug it guards against; each checks the right result or a clear error
that says what was expected and what came.
"""

import shutil
import types

import pytest
import torch
import transformers

import kvcourse
from kvcourse import ConcatKVCache, KVCache, Llama, ModelNotAvailableError, load_model
from kvcourse.fast import FastGenerator
from kvcourse.generate import decode_one_token, generate, generate_uncached, prefill
from kvcourse.llama import rope_from_config


@pytest.fixture(scope="module")
def bundled():
    hf, tok = load_model(device="cpu")
    return hf, tok, Llama.from_hf(hf)


def _ids(vocab: int, shape=(1, 12), seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _tiny_hf(seed=0, **config) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   initializer_range=0.2, **config)
    return transformers.LlamaForCausalLM(cfg).eval()


# ---- KVCache.crop ------------------------------------------------------------------------------------


@torch.no_grad()
def test_crop_minus_one_corrupts_the_cache(bundled):
    _, _, model = bundled
    ids = _ids(model.args.vocab_size, (1, 7), seed=3)
    full = model(ids)  # (1, 7, V)
    for cache in (KVCache.for_model(model, 1, 16), ConcatKVCache(model.args.num_layers)):
        model(ids, cache)  # 7 tokens cached
        cache.crop(-1)  # drop the last one, as transformers 5.x Cache.crop(-1)
        assert cache.get_seq_length() == 6, type(cache).__name__
        again = model(ids[:, 6:], cache)  # re-feed token 6 at position 6
        torch.testing.assert_close(again[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_cls", ["KVCache", "ConcatKVCache"])
@pytest.mark.parametrize("bad", [-6, 6, 100])
def test_crop_out_of_range_is_silently_accepted(cache_cls, bad):
    cache = KVCache(2, 1, 1, 2, max_seq_len=8) if cache_cls == "KVCache" else ConcatKVCache(2)
    for layer in range(2):
        cache.update(torch.randn(1, 1, 5, 2), torch.randn(1, 1, 5, 2), layer)
    with pytest.raises(ValueError, match=rf"crop\({bad}\) out of range: layer 0 holds 5 tokens; pass 0\.\.5"):
        cache.crop(bad)
    assert cache.get_seq_length() == 5


@pytest.mark.parametrize("bad", [2.5, True, "3"])
def test_crop_with_a_non_integer_is_silently_accepted(bad):
    cache = KVCache(1, 1, 1, 2, max_seq_len=8)
    with pytest.raises(TypeError, match="crop takes an int"):
        cache.crop(bad)


def test_crop_keeps_first_n_and_drops_last_n_alike():
    k, v = torch.randn(1, 1, 6, 2), torch.randn(1, 1, 6, 2)
    kept = {}
    for cls in ("KVCache", "ConcatKVCache"):
        for arg in (4, -2, 0, -6, 6):
            cache = KVCache(1, 1, 1, 2, max_seq_len=8) if cls == "KVCache" else ConcatKVCache(1)
            cache.update(k, v, 0)
            cache.crop(arg)
            kept[cls, arg] = cache.get_seq_length()
    assert kept == {(c, a): n for c in ("KVCache", "ConcatKVCache")
                    for a, n in ((4, 4), (-2, 4), (0, 0), (-6, 0), (6, 6))}


# ---- a cache of another dtype or device --------------------------------------------------------------


def test_kvcache_casts_keys_of_another_dtype_silently():
    cache = KVCache(1, 1, 2, 4, max_seq_len=8, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 3, 4)  # float32
    with pytest.raises(ValueError, match=r"holds torch\.bfloat16 on cpu, but the keys/values given are torch\.float32"):
        cache.update(k, k.clone(), 0)
    assert cache.get_seq_length() == 0


def test_kvcache_on_another_device_fails_deep_inside_torch():
    cache = KVCache(1, 1, 2, 4, max_seq_len=8, device="meta")
    k = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"holds torch\.float32 on meta, but the keys/values given are torch\.float32 on cpu"):
        cache.update(k, k.clone(), 0)


def test_concat_cache_promotes_a_different_dtype_silently():
    cache = ConcatKVCache(1)
    k = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    cache.update(k, k.clone(), 0)
    with pytest.raises(ValueError, match=r"holds torch\.float64 on cpu, but the keys/values given are torch\.float32"):
        cache.update(k.float(), k.float(), 0)
    assert cache.get_seq_length() == 3 and cache.keys[0].dtype == torch.float64


def test_key_and_value_of_different_dtypes_are_accepted():
    k = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="same dtype and device"):
        KVCache(1, 1, 2, 4, max_seq_len=8).update(k, k.double(), 0)


@torch.no_grad()
def test_model_with_a_cache_of_another_dtype_fails_inside_attention(bundled):
    _, _, model = bundled
    cache = KVCache.for_model(model, 1, 16, dtype=torch.bfloat16)  # the model is float32
    with pytest.raises(ValueError, match="Allocate the cache with the model's dtype"):
        model(_ids(model.args.vocab_size, (1, 5)), cache)


# ---- generate with a transformers model ---------------------------------------------------------------


@pytest.mark.parametrize("fn", [generate, generate_uncached])
def test_generate_with_a_transformers_model_crashes_inside_transformers(bundled, fn):
    hf, tok, model = bundled
    ids = tok("ROMEO:", return_tensors="pt").input_ids
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                           do_sample=False, eos_token_id=None)
    assert torch.equal(fn(hf, ids, 12), expected)
    assert torch.equal(fn(model, ids, 12), expected)


@pytest.mark.parametrize("fn", [prefill, decode_one_token])
def test_prefill_and_decode_with_a_transformers_model_crash_inside_transformers(bundled, fn):
    hf, _, model = bundled
    cache = KVCache.for_model(model, 1, 8)
    with pytest.raises(TypeError, match=r"got a transformers LlamaForCausalLM.*Llama\.from_hf"):
        fn(hf, _ids(model.args.vocab_size, (1, 1)), cache)


def test_generate_with_a_non_llama_transformers_model_crashes_inside_transformers():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                                                n_positions=16))
    with pytest.raises(TypeError, match="LlamaForCausalLM.*GPT2LMHeadModel"):
        generate(gpt2, torch.zeros(1, 3, dtype=torch.long), 2)


@torch.no_grad()
def test_generate_with_a_used_cache_appends_after_the_old_prompt(bundled):
    _, tok, model = bundled
    ids = tok("ROMEO:", return_tensors="pt").input_ids
    cache = KVCache.for_model(model, 1, 64)
    generate(model, tok("JULIET: a longer first prompt", return_tensors="pt").input_ids, 10, cache=cache)
    assert torch.equal(generate(model, ids, 10, cache=cache), generate(model, ids, 10))
    assert cache.get_seq_length() == ids.shape[1] + 10 - 1


# ---- generate's arguments, as FastGenerator checks them -----------------------------------------------


BAD_ARGS = {
    "1d_ids": (lambda ids: ids[0], 4, r"\(batch, seq\) tensor of token ids \(torch\.long\), got \(\d+,\)"),
    "empty_prompt": (lambda ids: ids[:, :0], 4, r"at least one token per row, got shape \(1, 0\)"),
    "negative_max_new_tokens": (lambda ids: ids, -1, r"max_new_tokens must be an int >= 0, got -1"),
    "fractional_max_new_tokens": (lambda ids: ids, 2.5, r"max_new_tokens must be an int >= 0, got 2\.5"),
    "float_ids": (lambda ids: ids.float(), 4, r"token ids \(torch\.long\), got \(1, \d+\) torch\.float32"),
    "ids_on_another_device": (lambda ids: ids.to("meta"), 4, r"input_ids are on meta but the model is on cpu"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
@pytest.mark.parametrize("fn", [generate, generate_uncached])
def test_generate_gives_raw_errors_or_quietly_returns_the_prompt_for_bad_arguments(bundled, fn, case):
    _, tok, model = bundled
    make_ids, n, message = BAD_ARGS[case]
    ids = make_ids(tok("ROMEO:", return_tensors="pt").input_ids)
    with pytest.raises(ValueError, match=message):
        fn(model, ids, n)
    with pytest.raises(ValueError, match=message):  # the same error FastGenerator gives
        FastGenerator(model).generate(ids, n)


def test_generate_with_zero_new_tokens_returns_the_prompt_itself(bundled):
    _, tok, model = bundled
    ids = tok("ROMEO:", return_tensors="pt").input_ids
    for fn in (generate, generate_uncached):
        out = fn(model, ids, 0)
        assert torch.equal(out, ids) and out is not ids


# ---- Llama.from_hf: what it cannot reproduce -----------------------------------------------------------


def test_from_hf_gives_wrong_logits_for_a_gelu_mlp():
    with pytest.raises(ValueError, match=r"config\.hidden_act is 'gelu', expected 'silu'"):
        Llama.from_hf(_tiny_hf(hidden_act="gelu"))


def test_from_hf_gives_wrong_logits_with_dynamic_rope_past_max_position_embeddings():
    hf = _tiny_hf(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                               "rope_theta": 10000.0})
    with pytest.raises(ValueError, match=r"RoPE type 'dynamic'.*max_position_embeddings=16.*Supported RoPE types"):
        Llama.from_hf(hf)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope", "proportional", "made_up"])
def test_from_hf_ignores_a_rope_type_it_does_not_implement(rope_type):
    config = types.SimpleNamespace(rope_parameters={"rope_type": rope_type, "rope_theta": 1e4},
                                   max_position_embeddings=32, hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match=rf"cannot reproduce RoPE type '{rope_type}'"):
        rope_from_config(config)


def test_from_hf_gives_wrong_logits_with_partial_rotary():
    hf = _tiny_hf(max_position_embeddings=32, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match=r"gave 4 frequencies for head_dim 16, expected 8"):
        Llama.from_hf(hf)


SCALED_ROPE = {
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 10000.0},
}


@torch.no_grad()
@pytest.mark.parametrize("rope_type", list(SCALED_ROPE))
def test_from_hf_drifts_from_transformers_with_scaled_rope(rope_type):
    hf = _tiny_hf(max_position_embeddings=32, rope_parameters=dict(SCALED_ROPE[rope_type]))
    plain = _tiny_hf(max_position_embeddings=32)  # same seed, same weights, unscaled RoPE
    ids = _ids(120, (2, 40), seed=4)  # past max_position_embeddings and original_max_position_embeddings
    ours, theirs = Llama.from_hf(hf), hf(ids).logits
    assert (plain(ids).logits - theirs).abs().max() > 1e-2, "the scaling must change the logits, or this tests nothing"
    torch.testing.assert_close(ours(ids), theirs, atol=1e-5, rtol=1e-5)
    cache = KVCache.for_model(ours, 2, 40)
    steps = [ours(ids[:, :30], cache)] + [ours(ids[:, i:i + 1], cache) for i in range(30, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_from_hf_gives_wrong_logits_for_a_swish_mlp():
    hf = _tiny_hf(hidden_act="swish")  # transformers' name for SiLU too
    ids = _ids(120, (1, 9))
    torch.testing.assert_close(Llama.from_hf(hf)(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_from_hf_copies_a_stale_inv_freq_buffer():
    hf = _tiny_hf(max_position_embeddings=32)
    ids = _ids(120, (1, 20))
    right = hf(ids).logits
    hf.model.rotary_emb.inv_freq.mul_(0.5)  # what a run-time RoPE update leaves behind
    assert (hf(ids).logits - right).abs().max() > 1e-2, "the stale buffer must matter, or this tests nothing"
    torch.testing.assert_close(Llama.from_hf(hf)(ids), right, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_from_hf_drifts_from_a_bfloat16_transformers_model():
    hf16 = _tiny_hf(max_position_embeddings=32).to(torch.bfloat16)  # casts transformers' inv_freq buffer too
    ours = Llama.from_hf(hf16)
    assert ours.inv_freq.dtype == torch.bfloat16
    ids = _ids(120, (1, 20))
    torch.testing.assert_close(ours(ids), hf16(ids).logits, atol=0, rtol=0)


# ---- load_model: the real cause first -------------------------------------------------------------------


def test_load_model_blames_the_hub_for_an_empty_folder(tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"folder .* is empty: a model folder holds config\.json") as err:
        load_model(tmp_path)
    assert "not in the Hugging Face cache" not in str(err.value)


def test_load_model_blames_the_hub_for_a_folder_without_a_tokenizer(tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(kvcourse.BUNDLED_MODEL / name, tmp_path / name)
    with pytest.raises(ModelNotAvailableError, match=r"has a model but no tokenizer .*tokenizer\.save_pretrained") as err:
        load_model(tmp_path)
    assert "not in the Hugging Face cache" not in str(err.value)


def test_load_model_blames_the_hub_for_a_folder_without_weights(tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(kvcourse.BUNDLED_MODEL / name, tmp_path / name)
    with pytest.raises(ModelNotAvailableError, match=r"has a config\.json but no weights"):
        load_model(tmp_path)


def test_load_model_blames_the_hub_for_a_folder_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotAvailableError, match=r"has no config\.json.*files: notes\.txt"):
        load_model(tmp_path)


def test_load_model_blames_the_hub_for_a_missing_folder(tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"there is no folder .*missing"):
        load_model(tmp_path / "missing")


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool, torch.complex64])
def test_load_model_blames_the_hub_for_an_integer_dtype(dtype):
    with pytest.raises(ValueError, match=rf"dtype {dtype} cannot hold model weights.*floating-point"):
        load_model(dtype=dtype)


# ---- issue 22 §2: what the probe suite (tests/test_probes.py) found in memory, shapes, checks, devices, grading ----


def test_copy_gradebook_of_a_missing_file_overwrites_the_destination_with_an_empty_gradebook(tmp_path):
    import sqlite3

    from kvcourse.grading import copy_gradebook

    dst = tmp_path / "dst.db"
    con = sqlite3.connect(dst)
    con.execute("CREATE TABLE grade (id TEXT)")
    con.commit()
    con.close()
    before = dst.read_bytes()
    with pytest.raises(FileNotFoundError, match=r"gradebook .*missing\.db is missing"):
        copy_gradebook(tmp_path / "missing.db", dst)
    assert dst.read_bytes() == before  # sqlite3.connect used to create the source, then back up its emptiness
    assert not (tmp_path / "missing.db").exists()
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.db is an empty file"):
        copy_gradebook(tmp_path / "empty.db", dst)
    assert dst.read_bytes() == before


@pytest.mark.parametrize("missing", ["main.db", "worker.db"])
def test_merge_gradebook_with_a_missing_file_fails_inside_sqlite(tmp_path, missing):
    import sqlite3

    from kvcourse.grading import merge_gradebook

    for name in {"main.db", "worker.db"} - {missing}:
        con = sqlite3.connect(tmp_path / name)
        con.execute("CREATE TABLE assignment (id TEXT, name TEXT)")
        con.commit()
        con.close()
    with pytest.raises(FileNotFoundError, match=rf"gradebook .*{missing} is missing"):
        merge_gradebook(tmp_path / "main.db", tmp_path / "worker.db", "ps1", ["a"])
    assert not (tmp_path / missing).exists()  # not created empty by sqlite3.connect


def test_grading_with_a_float_jobs_or_zero_submissions_fails_inside_range(tmp_path):
    from kvcourse.grading import bench, split

    with pytest.raises(ValueError, match=r"jobs must be an int, 1 or more, got 1\.5"):
        split(["a", "b"], 1.5)
    with pytest.raises(ValueError, match=r"submissions must be an int, 1 or more, got 0"):
        bench("ps1", 0, 1, tmp_path)


def test_bench_without_a_course_fails_inside_shutil(tmp_path):
    from kvcourse.grading import bench

    with pytest.raises(FileNotFoundError, match=r"lacks .*nbgrader_config\.py"):
        bench("ps1", 2, 1, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_submitted_learners_of_a_missing_course_root_says_there_are_none(tmp_path):
    from kvcourse.grading import submitted_learners

    with pytest.raises(FileNotFoundError, match=r"course root .*nowhere is not a folder"):
        submitted_learners(tmp_path / "nowhere", "ps1")
    assert submitted_learners(tmp_path, "ps1") == []  # a course with no submitted/ yet: none, rightly


@pytest.mark.parametrize(("call", "match"), [
    (lambda m: m.kv_bytes_per_token_dims(2.5, 2, 64, 2), r"num_layers must be an int >= 1, got 2\.5"),
    (lambda m: m.kv_bytes_per_token_dims(2, -2, 64, 2), r"num_kv_heads must be an int >= 1, got -2"),
    (lambda m: m.kv_cache_bytes("SmolLM2-135M", -5), r"seq_len must be an int >= 0, got -5"),
    (lambda m: m.kv_cache_bytes("SmolLM2-135M", 8, 1.5), r"batch_size must be an int >= 0, got 1\.5"),
])
def test_kv_bytes_of_a_negative_or_float_count_is_a_silent_wrong_number(call, match):
    from kvcourse import memory

    with pytest.raises(ValueError, match=match):
        call(memory)
    assert memory.kv_cache_bytes("SmolLM2-135M", 8, 0) == 0  # 0 requests: 0 bytes, rightly
    np = pytest.importorskip("numpy")
    assert memory.kv_cache_bytes("SmolLM2-135M", np.int64(8)) == memory.kv_cache_bytes("SmolLM2-135M", 8)


@pytest.mark.parametrize(("call", "match"), [
    (lambda m: m.bytes_per_element("float32"), r"dtype must be a torch\.dtype .*got str 'float32'"),
    (lambda m: m.tensor_bytes([1, 2]), r"tensor_bytes takes tensors .*got a int: 1"),
    (lambda m: m.format_bytes(None), r"format_bytes takes a number of bytes, got NoneType None"),
    (lambda m: m.param_count(transformers.GPT2Config()), r"Llama-family .*GPT2Config has no intermediate_size"),
    (lambda m: m.kv_bytes_per_token(30), r"expected a model config .*got a int without"),
])
def test_memory_helpers_fail_inside_torch_or_python_on_the_wrong_kind_of_argument(call, match):
    from kvcourse import memory

    with pytest.raises((TypeError, ValueError), match=match):
        call(memory)


def test_kv_bytes_per_token_of_a_model_instead_of_its_config_fails_with_an_attribute_error():
    from kvcourse.memory import kv_bytes_per_token

    hf = _tiny_hf()
    assert kv_bytes_per_token(hf, torch.float32) == kv_bytes_per_token(hf.config, torch.float32) == 2 * 2 * 2 * 16 * 4


def test_shape_with_heads_that_do_not_divide_hidden_gives_a_wrong_head_dim():
    from kvcourse.shapes import Shape

    with pytest.raises(ValueError, match=r"hidden_size 10 must be a multiple of num_attention_heads 3"):
        Shape("odd", 64, 10, 20, 1, 3, 1, 128, 1e4, True)  # head_dim was 10 // 3 = 3, silently
    with pytest.raises(ValueError, match=r"num_attention_heads 3 must be a multiple of num_key_value_heads 2"):
        Shape("odd", 64, 12, 20, 1, 3, 2, 128, 1e4, True)
    with pytest.raises(ValueError, match=r"num_hidden_layers must be an int >= 1, got 0"):
        Shape("odd", 64, 12, 20, 0, 3, 1, 128, 1e4, True)


def test_shape_config_keeps_a_misspelt_override_silently_unused():
    from kvcourse.shapes import get_shape

    shape = get_shape("SmolLM2-135M")
    with pytest.raises(TypeError, match=r"num_layers is not a LlamaConfig field.*num_hidden_layers"):
        shape.config(num_layers=2)  # LlamaConfig kept it as a stray attribute: still 30 layers
    assert shape.config(num_hidden_layers=2, rope_scaling=None).num_hidden_layers == 2


@pytest.mark.parametrize(("call", "match", "error"), [
    (lambda s: s.get_shape(None), r"get_shape takes a shape name \(one of SmolLM2-135M.*got NoneType None", TypeError),
    (lambda s: s.random_model("SmolLM2-135M", num_hidden_layers=0), r"num_hidden_layers must be .* got 0$", ValueError),
    (lambda s: s.random_model("SmolLM2-135M", num_hidden_layers=1.5), r"int >= 1, got 1\.5", ValueError),
])
def test_shapes_accept_zero_layers_or_fail_inside_transformers(call, match, error):
    from kvcourse import shapes

    with pytest.raises(error, match=match):
        call(shapes)


def test_expect_equal_tokens_passes_float_token_ids():
    from kvcourse.checks import expect_equal_tokens

    with pytest.raises(AssertionError, match=r"out: token ids must be integers .*got torch\.float32"):
        expect_equal_tokens(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.long), "out")
    expect_equal_tokens(torch.ones(1, 2, dtype=torch.int32), torch.ones(1, 2, dtype=torch.long), "out")


def test_synchronize_of_an_unknown_device_fails_inside_torch():
    with pytest.raises(ValueError, match=r"unknown device 'gpu': expected a torch\.device or 'cpu', 'cuda'"):
        kvcourse.synchronize("gpu")
    kvcourse.synchronize("cpu")  # a no-op
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"cannot synchronize 'cuda': this machine has no CUDA GPU"):
            kvcourse.synchronize("cuda")


def test_instructor_summary_of_a_missing_or_empty_grades_csv_fails_inside_csv(tmp_path, capsys):
    from kvcourse.instructor import main, summary

    with pytest.raises(FileNotFoundError, match=r"grades\.csv is missing: write it with `nbgrader export`"):
        summary(tmp_path / "grades.csv")
    (tmp_path / "grades.csv").write_text("")
    with pytest.raises(ValueError, match=r"not nbgrader's grades\.csv: expected columns .*it is empty"):
        summary(tmp_path / "grades.csv")  # was a header-only table, as if nobody had been graded
    (tmp_path / "grades.csv").write_text("student_id,assignment\na,ps1\n")
    with pytest.raises(ValueError, match=r"it lacks score, max_score"):
        summary(tmp_path / "grades.csv")  # was a KeyError from a dict
    assert main(["summary", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv is missing" in capsys.readouterr().err


def test_markdown_table_of_uneven_rows_fails_with_a_key_error():
    from kvcourse.plots import markdown_table, show_table

    with pytest.raises(ValueError, match=r"row 1 has keys \['a'\], but row 0 has \['a', 'b'\]"):
        markdown_table([{"a": 1, "b": 2}, {"a": 3}])
    with pytest.raises(TypeError, match=r"takes a list of dicts .*got a int: 1"):
        show_table([1, 2])


def test_line_plot_of_a_series_longer_than_x_fails_inside_matplotlib():
    from kvcourse.plots import line_plot

    with pytest.raises(ValueError, match=r"series 'a' has 3 values but x has 2"):
        line_plot([1, 2], {"a": [1, 2, 3]}, xlabel="x", ylabel="y")


@pytest.mark.parametrize("make", [
    lambda: KVCache(2, 3, 2, 8, 8),
    lambda: kvcourse.StaticKVCache(2, 3, 2, 8, 8),
    lambda: kvcourse.SlidingWindowCache(2, 3, 2, 8, window=4),
    lambda: __import__("kvcourse.quant", fromlist=["Int8KVCache"]).Int8KVCache(2, 3, 2, 8, 8, residual=0),
])
def test_keys_that_do_not_fit_are_refused_alike_by_every_preallocated_cache(make):
    """One shared check (cache._check_fits): the message names the key's shape and the layer, nothing is written."""
    cache = make()
    with pytest.raises(ValueError, match=r"key \(1, 2, 3, 8\) does not fit layer 1 of this cache"):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 1)
    assert cache.get_seq_length(1) == 0
