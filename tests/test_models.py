"""Loading: the bundled model offline, clear errors for what cannot be loaded."""

import re
from pathlib import Path

import pytest
import torch

import kvcourse
from kvcourse import ModelNotAvailableError, load_model, pick_device
from kvcourse.shapes import SHAPES, get_shape, random_model

WORDS = set((Path(__file__).parent / "data" / "shakespeare_words.txt").read_text().split())


def test_bundled_model_needs_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model()
    assert model.config.model_type == "llama"
    assert model.config.num_key_value_heads < model.config.num_attention_heads, "bundled model must use GQA"
    assert next(model.parameters()).dtype == torch.float32
    size = sum(f.stat().st_size for f in kvcourse.BUNDLED_MODEL.iterdir())
    assert size <= 10_000_000, f"bundled model is {size / 1e6:.1f} MB, limit 10 MB"
    assert "validation" in (kvcourse.BUNDLED_MODEL / "README.md").read_text()


def test_greedy_output_is_token_soup_or_nondeterministic():
    model, tok = load_model(device="cpu")
    ids = tok("ROMEO:\n", return_tensors="pt").input_ids
    runs = [model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    text = tok.decode(runs[0][0, ids.shape[1]:])
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 20, f"too few words in {text!r}"
    known = sum(w in WORDS for w in words) / len(words)
    assert known >= 0.9, f"only {known:.0%} of generated words are words of the plays: {text!r}"


def test_unknown_model_offline_does_not_name_the_bundled_default():
    with pytest.raises(ModelNotAvailableError, match=r"(?s)HuggingFaceTB/SmolLM2-135M.*load_model\(\)"):
        load_model("HuggingFaceTB/SmolLM2-135M", local_files_only=True)


def test_offline_env_var_is_ignored(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="offline mode is on"):
        load_model("no-such-org/no-such-model")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu"])
def test_wrong_device_string_is_accepted(bad):
    with pytest.raises(ValueError, match="device"):
        pick_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_for_without_a_gpu_fails_late():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        load_model(device="cuda")


def test_auto_device_is_not_usable():
    dev = pick_device("auto")
    assert torch.zeros(1, device=dev).device.type == dev.type


def test_unknown_dtype_is_accepted():
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(dtype="float8")


@pytest.mark.parametrize(("name", "params"), [("SmolLM2-135M", 134_515_008)])
def test_random_shape_drifts_from_published_parameter_count(name, params):
    model = random_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_published_shapes_lose_gqa():
    assert {n: (s.num_attention_heads, s.num_key_value_heads) for n, s in SHAPES.items()} == {
        "SmolLM2-135M": (9, 3), "SmolLM2-1.7B": (32, 32), "Llama-3-8B": (32, 8), "Llama-3-70B": (64, 8)}
    assert get_shape("smollm2-135m").head_dim == 64 and get_shape("Llama-3-70B").head_dim == 128
    with pytest.raises(KeyError, match="known shapes"):
        get_shape("gpt-5")
