"""The fast path (kvcourse.fast) must generate exactly what transformers' greedy generate does (fp32).

Each test is named after the bug it guards against.
"""

import pytest
import torch

from kvcourse import Llama, load_model
from kvcourse.bench import hf_generate, random_llama
from kvcourse.fast import FastGenerator, fast_generate
from kvcourse.generate import generate


@pytest.fixture(scope="module")
def bundled():
    hf, tok = load_model(device="cpu")
    return hf, tok


@pytest.fixture(scope="module")
def smol2():
    """A 2-layer SmolLM2-135M-shaped random model (weights redrawn so greedy output varies)."""
    return random_llama("SmolLM2-135M", 2, seed=0)


def _prompts(tok, batch: int) -> torch.Tensor:
    rows = [tok(p, return_tensors="pt").input_ids for p in ["The red cat was", "ROMEO: But soft, what light"][:batch]]
    n = min(r.shape[1] for r in rows)
    return torch.cat([r[:, :n] for r in rows])  # equal lengths: no padding


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("which", ["bundled", "smol2"])
def test_fast_tokens_diverge_from_hf_generate(request, bundled, which, batch):
    hf = bundled[0] if which == "bundled" else request.getfixturevalue("smol2")
    ids = _prompts(bundled[1], batch)
    n = 24
    expected = hf_generate(hf, ids, n)
    got = FastGenerator(hf).generate(ids, n)
    assert got.shape == (batch, ids.shape[1] + n)
    assert torch.equal(got, expected), f"fast path differs from transformers at {(got != expected).nonzero()[:3]}"


def test_fast_logits_drift_from_hf_logits(smol2, bundled):
    """Teacher-forced logits, step by step, against transformers' own (a token check alone can hide drift)."""
    ids = _prompts(bundled[1], 2)
    n = 6
    ref = smol2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=[], pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    gen = FastGenerator(smol2)
    t = ids.shape[1]
    gen.setup_caches(2, t + n)
    with torch.inference_mode():
        ours = [gen._forward(ids, 0, causal=True)]
        ours += [gen._forward(ref.sequences[:, i:i + 1], i) for i in range(t, t + n - 1)]
    for step, (a, b) in enumerate(zip(ours, ref.logits, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"logits differ at step {step}")


def test_rope_table_positions_off_by_one(smol2):
    """The precomputed cos/sin rows must be transformers' rotary embedding at exactly those positions."""
    gen = FastGenerator(smol2, max_seq_len=300)
    pos = torch.arange(300)[None]
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = smol2.model.rotary_emb(x, pos)  # (1, S, D)
    half = gen.head_dim // 2
    assert torch.equal(gen.cos, cos[0])
    assert torch.equal(gen.sin_signed[:, half:], sin[0, :, half:])
    assert torch.equal(gen.sin_signed[:, :half], -sin[0, :, :half])


def test_reused_generator_leaks_previous_prompt_into_cache(bundled):
    """One generator, several calls (shorter, then longer than its cache): each as if it were the first."""
    hf, tok = bundled
    gen = FastGenerator(hf, max_seq_len=8)
    for text, n in [("ROMEO:", 30), ("The red cat was", 5), ("JULIET: O Romeo, Romeo", 60)]:
        ids = tok(text, return_tensors="pt").input_ids
        assert torch.equal(gen.generate(ids, n), hf_generate(hf, ids, n)), text


def test_fast_accepts_course_llama_and_hf_model_alike(bundled):
    hf, tok = bundled
    ids = tok("The red cat was", return_tensors="pt").input_ids
    assert torch.equal(fast_generate(Llama.from_hf(hf), ids, 10), fast_generate(hf, ids, 10))


def test_callback_misses_or_repeats_tokens(bundled):
    hf, tok = bundled
    ids = tok("The red cat was", return_tensors="pt").input_ids
    seen = []
    out = FastGenerator(hf).generate(ids, 7, callback=lambda tok: seen.append(tok.clone()))
    assert torch.equal(torch.cat(seen, dim=1), out[:, ids.shape[1]:])


def test_zero_new_tokens_returns_more_than_the_prompt(bundled):
    hf, tok = bundled
    ids = tok("The red cat was", return_tensors="pt").input_ids
    assert torch.equal(FastGenerator(hf).generate(ids, 0), ids)


@pytest.mark.parametrize(
    "ids, n, match",
    [
        (torch.tensor([1, 2, 3]), 4, "batch, seq"),  # 1-D
        (torch.tensor([[1.0, 2.0]]), 4, "torch.long"),  # float ids
        (torch.zeros(1, 0, dtype=torch.long), 4, "at least one token"),
        (torch.tensor([[1, 2]]), -1, "max_new_tokens"),
        (torch.tensor([[1, 2]]), 2.5, "max_new_tokens"),
    ],
)
def test_bad_input_is_silently_accepted(bundled, ids, n, match):
    with pytest.raises(ValueError, match=match):
        FastGenerator(bundled[0]).generate(ids, n)


def test_non_llama_model_is_silently_accepted():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        FastGenerator(gpt2)


def test_compile_without_a_compiler_breaks_generation(bundled, monkeypatch):
    """No C++ compiler: compile=True must warn and run eagerly, not crash (no compiling in the test suite)."""
    import kvcourse.fast.base as base

    monkeypatch.setattr(base.shutil, "which", lambda name: None)
    hf, tok = bundled
    ids = tok("The red cat was", return_tensors="pt").input_ids
    with pytest.warns(RuntimeWarning, match="compiler"):
        gen = FastGenerator(hf, compile=True)
    assert not gen.compiled
    assert torch.equal(gen.generate(ids, 8), hf_generate(hf, ids, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_fast_decode_syncs_host_every_step(bundled, static):
    """The input checks read the ids once per call; the decode steps themselves must never wait for the device."""
    hf, tok = bundled
    hf_gpu = hf.to("cuda")
    try:
        ids = tok("The red cat was", return_tensors="pt").input_ids.cuda()
        gen = FastGenerator(hf_gpu, static=static)
        gen.generate(ids, 4)  # allocate first
        gen.setup_caches(1, ids.shape[1] + 16)
        token = gen._begin(ids, None, 16).argmax(-1, keepdim=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(15):
                token = gen.decode_one_token(token).argmax(-1, keepdim=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        hf.to("cpu")


# ---- issue 22: silent wrong results and bad inputs --------------------------------------------------------
KINDS = [{}, {"static": True}]
KIND_IDS = ["dynamic", "static"]


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_eos_token_id_list_is_silently_ignored(bundled, kind):
    """transformers takes an int or a list (Llama 3.x Instruct's generation_config has two): any id ends a row."""
    hf, tok = bundled
    ours = Llama.from_hf(hf)
    ids = torch.cat([tok(p, return_tensors="pt").input_ids[:, :4] for p in ["The red cat was", "ROMEO: But soft"]])
    free = generate(ours, ids, 20)
    eos = [int(free[0, 4 + 3]), int(free[1, 4 + 6])]  # row 0 ends at its 4th new token, row 1 by its 7th
    expected = generate(ours, ids, 20, eos_token_id=eos, pad_token_id=0)
    assert expected.shape[1] < ids.shape[1] + 20, "the chosen EOS ids should stop generation early"
    got = FastGenerator(hf, **kind).generate(ids, 20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_right_padded_mask_gives_padded_rows_wrong_tokens(bundled, kind):
    """kvcourse.generate refuses a right-padded batch; the fast generators must refuse it with the same words."""
    hf, tok = bundled
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"ends in padding in rows \[1\]: pad on the left"):
        FastGenerator(hf, **kind).generate(ids, 4, attention_mask=mask)
    with pytest.raises(ValueError, match="pad on the left"):
        generate(Llama.from_hf(hf), ids, 4, attention_mask=mask)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize(
    "ids, n, kw, match",
    [
        (torch.tensor([[1, 2048]]), 4, {}, r"token ids in 0\.\.2047 .*got ids from 1 to 2048"),  # = vocab_size
        (torch.tensor([[-1, 2]]), 4, {}, r"got ids from -1 to 2"),
        (torch.tensor([[1, 2]]), 4.0, {}, "max_new_tokens must be an int >= 0, got 4.0"),
        (torch.tensor([[1, 2]]), 4, {"eos_token_id": 2.0, "pad_token_id": 0}, "eos_token_id must be .*got float 2.0"),
        (torch.tensor([[1, 2]]), 4, {"eos_token_id": "</s>", "pad_token_id": 0}, "eos_token_id must be .*got str"),
        (torch.tensor([[1, 2]]), 4, {"eos_token_id": [3, -1], "pad_token_id": 0}, r"got \[3, -1\]"),
        (torch.tensor([[1, 2]]), 4, {"eos_token_id": True, "pad_token_id": 0}, "eos_token_id must be .*got bool"),
        (torch.tensor([[1, 2]]), 4, {"eos_token_id": 3}, "needs a pad_token_id.*got pad_token_id=None"),
        (torch.tensor([[1, 2]]), 4, {"attention_mask": torch.ones(1, 3, dtype=torch.long)}, r"\(1, 2\), got \(1, 3\)"),
    ],
    ids=["id=vocab_size", "negative-id", "float-n", "float-eos", "str-eos", "negative-eos", "bool-eos", "eos-no-pad",
         "mask-shape"],
)
def test_bad_generate_input_is_a_raw_error_or_changes_state(bundled, kind, ids, n, kw, match):
    """A clear kvcourse ValueError naming what was expected and what came, and the generator unchanged."""
    hf, tok = bundled
    gen = FastGenerator(hf, **kind)
    prompt = tok("ROMEO:", return_tensors="pt").input_ids
    before = gen.generate(prompt, 6)
    cache = gen.k_cache.clone()
    with pytest.raises(ValueError, match=match):
        gen.generate(ids, n, **kw)
    assert torch.equal(gen.k_cache, cache), "a refused call wrote into the cache"
    assert torch.equal(gen.generate(prompt, 6), before)


@pytest.mark.parametrize("max_seq_len", [0, -5, 2.5, True])
def test_bad_max_seq_len_is_accepted(bundled, max_seq_len):
    with pytest.raises(ValueError, match=f"max_seq_len must be None or an int >= 1, got {max_seq_len!r}"):
        FastGenerator(bundled[0], max_seq_len=max_seq_len)


def test_mixed_dtype_model_is_silently_promoted(bundled):
    """torch.cat of float32 and bfloat16 rows is float32: the fused weights would not be the model's."""
    ours = Llama.from_hf(bundled[0])
    ours.layers[1].mlp.up_proj.to(torch.bfloat16)
    try:
        with pytest.raises(ValueError, match=r"one dtype.*expected torch.float32.*got torch.bfloat16 .*layers\.1\.mlp"):
            FastGenerator(ours)
    finally:
        ours.layers[1].mlp.up_proj.to(torch.float32)


def test_other_model_gives_a_raw_attribute_error():
    """Neither the course's Llama nor a transformers model: named, not an AttributeError from inside."""
    with pytest.raises(TypeError, match="takes the course's Llama or a transformers LlamaForCausalLM, got Linear"):
        FastGenerator(torch.nn.Linear(4, 4))


def test_bench_prints_compile_and_capture_twice_or_not_at_all():
    """The bench's notes: one "compile + capture" figure, its parts each counted once."""
    from kvcourse.bench.report import _setup_notes

    assert _setup_notes({"compile_s": 16.0, "capture_s": 0.5, "compiled": True}) == [
        "compile + capture 16.50 s (compile 16.00 s, capture 500 ms)"]
    assert _setup_notes({"capture_s": 0.25}) == ["graph capture 250 ms"]
    assert _setup_notes({"compile_s": 2.0, "compiled": False}) == ["compile 2.00 s (compile failed: eager)"]
    assert _setup_notes({}) == []


@pytest.mark.parametrize("call, match", [
    (lambda g: g.setup_caches(0, 8), "batch_size must be an int >= 1, got 0"),
    (lambda g: g.setup_caches(1, 2.5), "max_seq_len must be an int >= 1, got 2.5"),
    (lambda g: g.warmup(-1, 4, 2), "batch_size must be an int >= 1, got -1"),
    (lambda g: g.warmup(1, 4, -2), "max_new_tokens must be an int >= 0, got -2"),
], ids=["batch-0", "float-length", "negative-batch", "negative-new-tokens"])
def test_bad_sizes_crash_inside_torch(bundled, call, match):
    gen = FastGenerator(bundled[0])
    with pytest.raises(ValueError, match=match):
        call(gen)
    assert gen.k_cache is None, "a refused call allocated a cache"


def test_public_pieces_crash_inside_torch(bundled):
    """rms_norm, FusedBlock.from_layer, prefill, decode before a prompt, CUDA graph calls on a CPU: kvcourse errors."""
    from kvcourse.fast import CudaGraphs, FastGeneratorBase, FusedBlock, StaticGenerator, rms_norm

    hf = bundled[0]
    with pytest.raises(ValueError, match=r"weight must be \(8,\).*got \(4,\)"):
        rms_norm(torch.ones(2, 8), torch.ones(4), 1e-5)
    with pytest.raises(TypeError, match="got LlamaDecoderLayer: wrap a transformers model first"):
        FusedBlock.from_layer(hf.model.layers[0])
    gen = FastGenerator(hf)
    with pytest.raises(ValueError, match=r"token ids in 0\.\.2047"):
        gen.prefill(torch.tensor([[2, 2048]]))
    with pytest.raises(ValueError, match=r"call setup_caches\(1, 2 \+ new tokens\) first"):
        gen.prefill(torch.tensor([[2, 3]]))
    with pytest.raises(ValueError, match="decode_one_token continues a prompt"):
        gen.decode_one_token(torch.tensor([[2]]))
    with pytest.raises(ValueError, match=r"call setup_caches\(batch_size, max_seq_len\)"):
        StaticGenerator(hf).decode_one_token(torch.tensor([[2]]))
    with pytest.raises(NotImplementedError, match="decode_one_token"):
        FastGeneratorBase(hf).decode_one_token(torch.tensor([[2]]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
            CudaGraphs().capture(torch.device("cpu"), lambda: torch.zeros(1))
        CudaGraphs().synchronize(torch.device("cpu"))  # nothing to wait for
