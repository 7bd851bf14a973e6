"""Probe rows for kvcourse.mla (issue 25, part 1): every public name, fed the bad inputs a learner will try.

Registered by tests/test_probes.py, which imports every tests/probes_*.py and calls ``register`` with itself.
The rows name ``mla.*`` targets, which count as public only once "mla" is in test_probes.MODULES; until then
``register`` adds nothing, so ``test_the_table_names_only_public_names`` stays green.
"""

from __future__ import annotations

import functools

import torch
import transformers

V = 64


@functools.cache
def deepseek(q_lora_rank=None, yarn: bool = False, **kw) -> transformers.DeepseekV3ForCausalLM:
    """A tiny dense DeepSeek-V3: 2 layers, 4 heads, latent 16, RoPE key 4, nope 8, value 8, vocab 64, fp32;
    ``yarn``: DeepSeek-V3's published RoPE type (with a small factor), which the course's model refuses."""
    torch.manual_seed(0)
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_rope_head_dim=4,
                qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=2, max_position_embeddings=64,
                num_mtp_layers=0, eos_token_id=None)
    base.update(kw)
    if yarn:
        base["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                   "original_max_position_embeddings": 16}
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**base)).eval()


def register(t) -> None:
    if "mla" not in t.MODULES:
        return
    probe, on, call, mod = t.probe, t.on, t.call, t.mod
    mla = mod("mla")

    @functools.cache
    def model():
        return mla.MLAModel.from_hf(deepseek())

    def args(**kw):
        base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, kv_lora_rank=16,
                    qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
        base.update(kw)
        return mla.MLAArgs(**base)

    def cache(t_filled: int = 0, cap: int = 8, b: int = 1):
        c = mla.LatentCache(2, b, 16, 4, cap)
        for layer in range(2):
            if t_filled:
                c.update(torch.ones(b, t_filled, 16), torch.ones(b, t_filled, 4), layer)
        return c

    def with_cache(fn, make):
        """setup for ``fn(cache)``; the cache is the state a failure must leave alone."""
        def setup():
            c = make()
            return (lambda: fn(c)), (c,)
        return setup

    # -- MLAArgs -----------------------------------------------------------------------------------------
    probe("mla.MLAArgs", "odd RoPE width", call(lambda: args(qk_rope_head_dim=5)), names=("qk_rope_head_dim", "5"))
    probe("mla.MLAArgs", "q_lora_rank 0", call(lambda: args(q_lora_rank=0)), names=("q_lora_rank", "0"))
    probe("mla.MLAArgs", "float latent width", call(lambda: args(kv_lora_rank=16.0)), names=("kv_lora_rank", "16.0"))
    probe("mla.MLAArgs.qk_head_dim", "nope 8 + rope 4", call(lambda: args().qk_head_dim), result=lambda r: r == 12)
    probe("mla.MLAArgs.from_config", "a Llama config", call(lambda: mla.MLAArgs.from_config(t.hf().config)),
          names=("DeepseekV3Config", "LlamaConfig", "'llama'"))
    probe("mla.MLAArgs.from_config", "MoE layers", call(lambda: mla.MLAArgs.from_config(
        transformers.DeepseekV3Config(num_hidden_layers=2, first_k_dense_replace=1, vocab_size=V, hidden_size=32,
                                      num_attention_heads=4, num_key_value_heads=4))),
          names=("first_k_dense_replace=1", "num_hidden_layers=2"))
    probe("mla.MLAArgs.from_config", "tiny DeepSeek", call(lambda: mla.MLAArgs.from_config(deepseek().config)),
          result=lambda a: a.kv_lora_rank == 16 and a.qk_head_dim == 12 and a.rope_interleave is True)
    # -- LatentCache ---------------------------------------------------------------------------------------
    probe("mla.LatentCache", "float capacity", call(lambda: mla.LatentCache(2, 1, 16, 4, 8.5)),
          names=("max_seq_len", "8.5"))
    probe("mla.LatentCache", "zero latent width", call(lambda: mla.LatentCache(2, 1, 0, 4, 8)),
          names=("kv_lora_rank", "0"))
    probe("mla.LatentCache.for_model", "a Llama", call(lambda: mla.LatentCache.for_model(t.llama(), 1, 8)),
          names=("MLAModel", "DeepseekV3ForCausalLM", "Llama"))
    probe("mla.LatentCache.for_model", "transformers DeepSeek", call(lambda: mla.LatentCache.for_model(deepseek(), 2, 8)),
          result=lambda c: c.latents[0].shape == (2, 8, 16) and c.rope_keys[1].shape == (2, 8, 4))
    probe("mla.LatentCache.for_model", "float batch", call(lambda: mla.LatentCache.for_model(model(), 1.5, 8)),
          names=("batch_size", "1.5"))
    up = "mla.LatentCache.update"
    probe(up, "latent of the wrong width", on(lambda: cache(2), "update", torch.ones(1, 1, 12), torch.ones(1, 1, 4), 0),
          names=("c_kv", "(1, seq, 16)", "(1, 1, 12)"))
    probe(up, "per-head 4-D keys", on(lambda: cache(2), "update", torch.ones(1, 4, 1, 16), torch.ones(1, 1, 4), 0),
          names=("c_kv", "(1, 4, 1, 16)"))
    probe(up, "RoPE key of another length", on(lambda: cache(2), "update", torch.ones(1, 2, 16), torch.ones(1, 1, 4), 0),
          names=("same tokens", "(1, 2, 16)", "(1, 1, 4)"))
    probe(up, "float64", on(lambda: cache(2), "update", torch.ones(1, 1, 16, dtype=torch.float64),
                            torch.ones(1, 1, 4), 0), names=("float64", "float32"))
    probe(up, "float layer index", on(lambda: cache(2), "update", torch.ones(1, 1, 16), torch.ones(1, 1, 4), 1.0),
          names=("1.0",))
    probe(up, "layer out of range", on(lambda: cache(2), "update", torch.ones(1, 1, 16), torch.ones(1, 1, 4), 2),
          names=("2", "2 layers"))
    probe(up, "overflow", on(lambda: cache(6), "update", torch.ones(1, 3, 16), torch.ones(1, 3, 4), 0),
          names=("holds 6", "3 more", "max_seq_len=8"))
    probe(up, "numpy latent", on(lambda: cache(2), "update", torch.ones(1, 1, 16).numpy(), torch.ones(1, 1, 4), 0),
          names=("c_kv", "ndarray"))
    probe("mla.LatentCache.get_seq_length", "layer out of range", on(lambda: cache(2), "get_seq_length", 5),
          names=("5", "2 layers"))
    probe("mla.LatentCache.get_seq_length", "after 3", on(lambda: cache(3), "get_seq_length"), result=lambda r: r == 3)
    probe("mla.LatentCache.reset", "after 3", call(lambda: (lambda c: (c.reset(), c.lengths)[1])(cache(3))),
          result=lambda r: r == [0, 0])
    cr = "mla.LatentCache.crop"
    probe(cr, "float", on(lambda: cache(3), "crop", 1.5), names=("1.5",))
    probe(cr, "bool", on(lambda: cache(3), "crop", True), names=("True",))
    probe(cr, "past the length", on(lambda: cache(3), "crop", 4), names=("crop(4)", "3 tokens"))
    probe(cr, "drop more than held", on(lambda: cache(3), "crop", -4), names=("crop(-4)", "3 tokens"))
    probe(cr, "drop 2 of 3", call(lambda: (lambda c: (c.crop(-2), c.lengths)[1])(cache(3))), result=lambda r: r == [1, 1])
    probe("mla.LatentCache.bytes_per_token", "fp32, 2 layers", on(lambda: cache(0), "bytes_per_token"),
          result=lambda r: r == (16 + 4) * 4 * 2)
    # -- the model -----------------------------------------------------------------------------------------
    probe("mla.MLAAttention", "a transformers config", call(lambda: mla.MLAAttention(deepseek().config, 0)),
          names=("MLAArgs", "DeepseekV3Config"))
    probe("mla.MLAAttention.forward", "x without the batch axis",
          call(lambda: model().layers[0].self_attn(torch.ones(3, 32), *_cos_sin(mla, model(), 3))),
          names=("hidden_size=32", "(3, 32)"))
    probe("mla.MLAAttention.forward", "x of another width",
          call(lambda: model().layers[0].self_attn(torch.ones(1, 3, 16), *_cos_sin(mla, model(), 3))),
          names=("hidden_size=32", "(1, 3, 16)"))
    probe("mla.MLAModel", "a transformers config", call(lambda: mla.MLAModel(deepseek().config)),
          names=("MLAArgs", "DeepseekV3Config"))
    probe("mla.MLAModel.from_hf", "a Llama", call(lambda: mla.MLAModel.from_hf(t.hf())),
          names=("DeepseekV3ForCausalLM", "LlamaForCausalLM", "'llama'"))
    probe("mla.MLAModel.from_hf", "yarn RoPE", call(lambda: mla.MLAModel.from_hf(deepseek(yarn=True))),
          names=("'yarn'", "'default'"))
    probe("mla.MLAModel.from_hf", "fewer KV heads", call(lambda: mla.MLAModel.from_hf(deepseek(num_key_value_heads=2))),
          names=("num_key_value_heads=2", "num_attention_heads=4"))
    probe("mla.MLAModel.device", "cpu model", call(lambda: model().device), result=lambda d: d == torch.device("cpu"))
    probe("mla.MLAModel.dtype", "fp32 model", call(lambda: model().dtype), result=lambda d: d == torch.float32)
    fw = "mla.MLAModel.forward"
    probe(fw, "token id >= vocab_size", call(lambda: model()(torch.tensor([[1, V]]))), names=(f"0..{V - 1}", str(V)))
    probe(fw, "negative token id", call(lambda: model()(torch.tensor([[1, -1]]))), names=("-1",))
    probe(fw, "float ids", call(lambda: model()(torch.ones(1, 3))), names=("torch.long", "float32"))
    probe(fw, "1-D ids", call(lambda: model()(torch.ones(3, dtype=torch.long))), names=("(3,)",))
    probe(fw, "empty prompt", call(lambda: model()(torch.zeros(1, 0, dtype=torch.long))), names=("(1, 0)",))
    probe(fw, "a KVCache instead of a LatentCache",
          call(lambda: model()(torch.ones(1, 2, dtype=torch.long), mod("cache").KVCache(2, 1, 4, 12, 8))),
          names=("LatentCache", "KVCache"))
    probe(fw, "cache of another batch", with_cache(lambda c: model()(torch.ones(2, 2, dtype=torch.long), c),
                                                   lambda: cache(1)), names=("batch 1", "batch 2"))
    probe(fw, "cache of another dtype", with_cache(lambda c: model()(torch.ones(1, 2, dtype=torch.long), c),
                                                   lambda: mla.LatentCache(2, 1, 16, 4, 8, dtype=torch.float64)),
          names=("float64", "float32"))
    probe(fw, "overflow", with_cache(lambda c: model()(torch.ones(1, 3, dtype=torch.long), c), lambda: cache(6)),
          names=("holds 6", "3 more", "max_seq_len=8"))
    probe(fw, "absorbed decode step", with_cache(lambda c: model()(torch.ones(1, 1, dtype=torch.long), c,
                                                                   absorbed=True), lambda: cache(2)),
          result=lambda r: r.shape == (1, 1, V))
    gen = "mla.MLAModel.generate"
    probe(gen, "max_new_tokens 0", call(lambda: model().generate(torch.ones(1, 2, dtype=torch.long), 0)),
          names=("max_new_tokens", "0"))
    probe(gen, "float max_new_tokens", call(lambda: model().generate(torch.ones(1, 2, dtype=torch.long), 2.0)),
          names=("max_new_tokens", "2.0"))
    probe(gen, "a list prompt", call(lambda: model().generate([[1, 2]], 2)), names=("input_ids", "list"))
    probe(gen, "3 tokens", call(lambda: model().generate(torch.ones(1, 2, dtype=torch.long), 3, absorbed=True)),
          result=lambda r: r.shape == (1, 5))
    # -- the table and the timer ----------------------------------------------------------------------------
    probe("mla.published_table", "context 0", call(lambda: mla.published_table(0)), names=("context", "0"))
    probe("mla.published_table", "float context", call(lambda: mla.published_table(1024.0)), names=("context", "1024.0"))
    probe("mla.published_table", "three rows", call(lambda: mla.published_table()),
          result=lambda r: len(r) == 3 and r[1]["bytes_per_token"] == 70_272)
    probe("mla.time_decode_steps", "repeats 0", call(lambda: mla.time_decode_steps(deepseek(), (4,), repeats=0)),
          names=("repeats", "0"))
    probe("mla.time_decode_steps", "context 0", call(lambda: mla.time_decode_steps(deepseek(), (0,), repeats=1)),
          names=("context", "0"))
    probe("mla.time_decode_steps", "a Llama", call(lambda: mla.time_decode_steps(t.hf(), (4,), repeats=1)),
          names=("DeepseekV3ForCausalLM", "LlamaForCausalLM"))


def _cos_sin(mla, model, t: int):
    return mla.rope_cos_sin(torch.arange(t), model.inv_freq, torch.float32)
