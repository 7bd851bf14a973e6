"""Notebook 11's plumbing: the hooks that plug a learner's function into ``kvcourse.mla``, ``kvcourse.evict`` and
``kvcourse.int8_weights``, the graders' checks (each names the mistake it recognised), and the timing helpers.

Every check compares the learner's answer with the package's own implementation on the same inputs and, when
they differ, recomputes the realistic wrong answers (RoPE on the latent, the scale of the latent width, scores
from the wrong end of the prompt, top-B over all heads at once, one scale per matrix, ...) to say which one it was.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .checks import expect
from .evict import H2OCache, SnapKVCache, evict_generate
from .llama import rope_cos_sin
from .mla import LatentCache, MLAModel, rope_decoupled
from .quant import Int8KVCache

__all__ = ["PASSAGE", "LearnerH2O", "LearnerSnapKV", "absorbed_hook", "check_absorbed", "check_cache_bytes",
           "check_h2o", "check_h2o_on_model", "check_latent_update", "check_quantize_rows", "check_snapkv",
           "check_saving", "check_snapkv_on_model", "h2o_case", "int8_rows", "latent_hook", "retrieval_plot", "run_checked",
           "time_decode", "time_mla_paths", "tiny_deepseek"]


def _check_count(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def tiny_deepseek(q_lora_rank: int | None = None, *, rope_interleave: bool = True, seed: int = 0):
    """A random-weight ``transformers`` ``DeepseekV3ForCausalLM``, float32, dense MLP layers only (tests/test_mla.py's).

    Sizes: hidden 64, 2 layers, 4 heads, kv_lora_rank 32, qk_rope_head_dim 8, qk_nope_head_dim 16, v_head_dim 12,
    vocabulary 128, plain RoPE. Weights drawn with std 0.2 so that logits differ clearly between tokens.
    """
    import transformers

    if q_lora_rank is not None:
        _check_count("q_lora_rank", q_lora_rank)
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=12, first_k_dense_replace=2, max_position_embeddings=512, initializer_range=0.2,
        num_mtp_layers=0, eos_token_id=None, rope_interleave=rope_interleave)
    torch.manual_seed(seed)
    return transformers.DeepseekV3ForCausalLM(config).eval()


def run_checked(what: str, fn: Callable, *args, **kwargs):
    """Call fn; a learner's exception becomes an AssertionError that says whose call raised what."""
    __tracebackhide__ = True
    try:
        return fn(*args, **kwargs)
    except AssertionError:
        raise
    except Exception as err:  # noqa: BLE001 - the learner's error, reported with what was being run
        raise AssertionError(f"{what} raised {type(err).__name__}: {err}") from None


# ---- 1. the latent projection and the cache's update ------------------------------------------------------


def _rotator(attn, positions: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """RoPE at ``positions`` for the last axis of any even width (the model's base and layout)."""
    a = attn.a

    def rotate(t: torch.Tensor) -> torch.Tensor:
        d = t.shape[-1]
        inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        cos, sin = rope_cos_sin(positions, inv_freq, dtype)  # (T, d)
        return rope_decoupled(t, cos, sin, a.rope_interleave)

    return rotate


@contextlib.contextmanager
def latent_hook(model: MLAModel, fn: Callable, log: list | None = None) -> Iterator[None]:
    """Inside: every layer's latents come from ``fn(attn, x, rotate, cache)`` (``MLAAttention._latents``).

    ``rotate(t)`` applies RoPE to the last axis of t at the new tokens' positions. ``log`` (a list) receives
    ``(layer, T, x, returned shapes)`` for each call.
    """
    if not isinstance(model, MLAModel):
        raise TypeError(f"latent_hook takes a kvcourse.mla.MLAModel, got {type(model).__name__}")
    attns = [layer.self_attn for layer in model.layers]

    def make(attn):
        def hooked(x, cos, sin, cache):
            if cache is None:
                raise ValueError("notebook 11 runs latent_update with a LatentCache only")
            past = cache.get_seq_length(attn.layer_idx)
            positions = torch.arange(past, past + x.shape[1], device=x.device)  # (T,)
            out = fn(attn, x, _rotator(attn, positions, x.dtype), cache)
            if log is not None:
                log.append((attn.layer_idx, x.shape[1], x.detach().clone(),
                            tuple(tuple(t.shape) for t in out) if isinstance(out, tuple | list) else None))
            return out
        return hooked

    for attn in attns:
        attn._latents = make(attn)
    try:
        yield
    finally:
        for attn in attns:
            del attn._latents  # the class's method again


def _latent_hint(attn, x: torch.Tensor, got_c: torch.Tensor, got_r: torch.Tensor, past: int) -> str:
    """Which known mistake gives these cached latents for the layer input x (B, T, C)."""
    a = attn.a
    with torch.no_grad():
        raw_c, raw_r = attn.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        rotate = _rotator(attn, torch.arange(past, past + x.shape[1]), x.dtype)
        normed = attn.kv_a_layernorm(raw_c)
        close = lambda u, v: u.shape == v.shape and torch.allclose(u, v, atol=1e-5)  # noqa: E731
        dr = a.qk_rope_head_dim

        def rotated(c):  # the whole latent, its first or its last Dr numbers rotated
            return [rotate(c), torch.cat([rotate(c[..., :dr]), c[..., dr:]], -1),
                    torch.cat([c[..., :-dr], rotate(c[..., -dr:])], -1)]

        hints = []
        if any(close(got_c, v) for v in rotated(normed) + rotated(raw_c)):
            hints.append("RoPE was applied to the latent c_kv: it belongs on the decoupled key k_rope only (the "
                         "latent must stay position-free so that kv_b_proj can be absorbed)")
        elif close(got_c, raw_c) or close(got_c, attn.kv_a_layernorm(rotate(raw_c))):
            hints.append("the latent c_kv is cached without its RMSNorm (kv_a_layernorm)")
        if close(got_r, raw_r):
            hints.append("k_rope is cached without RoPE: rotate the decoupled key before it is cached")
    return "; and ".join(hints)


def check_latent_update(fn: Callable, hf_model, prompt_len: int = 10, new_tokens: int = 6, batch: int = 2,
                        seed: int = 0) -> dict:
    """Grade ``fn(attn, x, rotate, cache)`` on the course's MLA model of ``hf_model``; returns what was checked.

    1. the shapes it returns (everything the cache holds: (B, S, R), (B, S, Dr)) and the tokens held per layer;
    2. what the cache holds after the prefill, layer by layer, against the course's own ``_latents``;
    3. logits of the prefill and of ``new_tokens`` cached decode steps against ``transformers``' own
       ``DeepseekV3ForCausalLM`` with its own cache, and the greedy tokens.
    """
    __tracebackhide__ = True
    from transformers import DynamicCache

    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("batch", batch)):
        _check_count(name, value)
    model = MLAModel.from_hf(hf_model)
    a = model.args
    ids = torch.randint(0, a.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    ref_cache = LatentCache.for_model(model, batch, prompt_len + new_tokens)
    ref_log: list = []
    with torch.no_grad(), latent_hook(model, lambda attn, x, rotate, cache: type(attn)._latents(
            attn, x, *_cos_sin(attn, cache, x), cache), ref_log):
        model(ids, ref_cache)
    cache = LatentCache.for_model(model, batch, prompt_len + new_tokens)
    log: list = []
    with torch.no_grad(), latent_hook(model, fn, log):
        got = run_checked("latent_update (in the prefill)", model, ids, cache)
    want_shapes = ((batch, prompt_len, a.kv_lora_rank), (batch, prompt_len, a.qk_rope_head_dim))
    for layer, _, _, shapes in log:
        expect(shapes == want_shapes, f"layer {layer}: latent_update returned shapes {shapes} after a prefill of "
               f"{prompt_len} tokens; expected {want_shapes}, c_kv and k_rope of every token the cache holds",
               hint="return what cache.update returns" if shapes and shapes[0][-1] == a.kv_lora_rank else "")
    held = [cache.get_seq_length(i) for i in range(a.num_layers)]
    expect(held == [prompt_len] * a.num_layers, f"after a prefill of {prompt_len} tokens the layers hold {held} "
           f"tokens: latent_update must write the new tokens once per layer, with cache.update(c_kv, k_rope, "
           f"attn.layer_idx)")
    for layer in range(a.num_layers):
        got_c, got_r = cache.latents[layer][:, :prompt_len], cache.rope_keys[layer][:, :prompt_len]
        want_c, want_r = ref_cache.latents[layer][:, :prompt_len], ref_cache.rope_keys[layer][:, :prompt_len]
        if not (torch.allclose(got_c, want_c, atol=1e-5) and torch.allclose(got_r, want_r, atol=1e-5)):
            attn = model.layers[layer].self_attn
            hint = _latent_hint(attn, ref_log[layer][2], got_c, got_r, 0)
            what = "c_kv" if not torch.allclose(got_c, want_c, atol=1e-5) else "k_rope"
            expect(False, f"layer {layer}: the cache holds another {what} than the normed latent and the rotated "
                   f"shared key of these tokens", hint=hint)
    # against transformers, step by step: its cache and ours are fed the same tokens
    hf_cache = DynamicCache(config=hf_model.config)
    with torch.no_grad():
        want = hf_model(input_ids=ids, cache=hf_cache, use_cache=True).logits
    expect(torch.allclose(got, want, atol=1e-4), f"prefill logits differ from transformers' DeepSeek-V3 by "
           f"{(got - want).abs().max():.3g}")
    token = want[:, -1:].argmax(-1)  # (B, 1)
    tokens_got, tokens_want = [], []
    for step in range(new_tokens):
        log.clear()
        with torch.no_grad(), latent_hook(model, fn, log):
            got = run_checked(f"latent_update (decode step {step + 1})", model, token, cache)
        with torch.no_grad():
            want = hf_model(input_ids=token, cache=hf_cache, use_cache=True).logits
        s = prompt_len + step + 1
        for layer, _, _, shapes in log:
            expect(shapes and shapes[0][:2] == (batch, s), f"decode step {step + 1}, layer {layer}: latent_update "
                   f"returned shapes {shapes}, but the cache holds {s} tokens: attention must read all of them",
                   hint="return what cache.update returns, not the new token's latent alone")
        expect(torch.allclose(got, want, atol=1e-4), f"decode step {step + 1}: logits differ from transformers' "
               f"by {(got - want).abs().max():.3g} (the prefill matched)")
        tokens_got.append(got[:, -1].argmax(-1))
        tokens_want.append(want[:, -1].argmax(-1))
        token = tokens_want[-1][:, None]
    expect(torch.equal(torch.stack(tokens_got), torch.stack(tokens_want)), "greedy tokens differ from transformers'")
    return {"layers": a.num_layers, "prompt": prompt_len, "decode steps": new_tokens,
            "bytes per token (LatentCache)": cache.bytes_per_token()}


def _cos_sin(attn, cache, x):
    past = cache.get_seq_length(attn.layer_idx)
    d = attn.a.qk_rope_head_dim
    inv_freq = 1.0 / (attn.a.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    return rope_cos_sin(torch.arange(past, past + x.shape[1]), inv_freq, x.dtype)


# ---- 2. the absorbed decode step --------------------------------------------------------------------------


@contextlib.contextmanager
def absorbed_hook(model: MLAModel, fn: Callable) -> Iterator[None]:
    """Inside: ``model(token, cache, absorbed=True)`` calls ``fn(attn, q_nope, q_rope, c_kv, k_rope)`` per layer
    for a one-token step (a prefill, with its causal mask, still runs the package's own absorbed attention)."""
    if not isinstance(model, MLAModel):
        raise TypeError(f"absorbed_hook takes a kvcourse.mla.MLAModel, got {type(model).__name__}")
    attns = [layer.self_attn for layer in model.layers]

    def make(attn):
        def hooked(q_nope, q_rope, c_kv, k_rope, mask):
            if mask is not None:
                return type(attn)._absorbed(attn, q_nope, q_rope, c_kv, k_rope, mask)
            return fn(attn, q_nope, q_rope, c_kv, k_rope)
        return hooked

    for attn in attns:
        attn._absorbed = make(attn)
    try:
        yield
    finally:
        for attn in attns:
            del attn._absorbed


class _NaNCastSpy(torch.overrides.TorchFunctionMode):
    """Records the torch functions that turn a float tensor holding NaN into an int8 tensor (an undefined cast in
    C++: x86 happens to give 0, so the result can look right while the answer divided 0 by 0)."""

    def __init__(self):
        super().__init__()
        self.casts: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        if (isinstance(out, torch.Tensor) and out.dtype == torch.int8 and isinstance(src, torch.Tensor)
                and src.is_floating_point() and bool(torch.isnan(src).any())):
            self.casts.append(getattr(func, "__name__", str(func)))
        return out


class _ShapeSpy(torch.overrides.TorchFunctionMode):
    """Records the shape of every tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((getattr(func, "__name__", str(func)), tuple(t.shape)))
        return out


def _absorbed_variants(attn, q_nope, q_rope, c_kv, k_rope):
    """(output, hint) of the realistic wrong absorbed steps, for naming the learner's mistake."""
    a = attn.a
    h, dn, dv, r = a.num_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank
    w = attn.kv_b_proj.weight

    def step(w_uk, w_uv, scale, rope=True):
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        scores = q_lat @ c_kv[:, None].transpose(-1, -2)
        if rope:
            scores = scores + q_rope @ k_rope[:, None].transpose(-1, -2)
        p = torch.softmax(scores * scale, dim=-1)
        return torch.einsum("bhtr,hvr->bhtv", p @ c_kv[:, None], w_uv)

    right = w.view(h, dn + dv, r)
    wrong = w.view(h, r, dn + dv).transpose(1, 2)
    full = a.qk_head_dim ** -0.5
    layout_hint = "kv_b_proj.weight is (heads x (Dn + Dv), R), head after head, each head's Dn key rows then its " \
                  "Dv value rows: view it as (H, Dn + Dv, R) and split the middle axis into W_UK and W_UV"
    scale_hint = "the softmax scale is 1/sqrt of the FULL head's query-key width, the nope and the rope parts " \
                 "together, not of the latent or of one part"
    return [(step(right[:, :dn], right[:, dn:], r ** -0.5), scale_hint),
            (step(right[:, :dn], right[:, dn:], dn ** -0.5), scale_hint),
            (step(right[:, :dn], right[:, dn:], 1.0), scale_hint),
            (step(right[:, :dn], right[:, dn:], full, rope=False), "the scores miss the decoupled RoPE part: "
             "q_rope . k_rope is added to the latent part's score"),
            (step(wrong[:, :dn], wrong[:, dn:], full), layout_hint),
            (step(w[:h * dn].view(h, dn, r), w[h * dn:].view(h, dv, r), full), layout_hint)]


def check_absorbed(fn: Callable, hf_model, prompt_len: int = 40, steps: int = 4, batch: int = 2,
                   seed: int = 0) -> dict:
    """Grade ``fn(attn, q_nope, q_rope, c_kv, k_rope)`` -> (B, H, 1, Dv) against the unabsorbed step.

    The course's model prefills (unabsorbed), then at each decode step runs the unabsorbed path, crops that token
    away and runs the same token through ``fn``: logits must agree within fp32 rounding. Meanwhile ``kv_b_proj``
    must never be called, and no tensor fn makes may hold a per-head key or value for every cached token (a shape
    with the cache length S and Dn or Dv): the cache is read as latents, never expanded.
    """
    __tracebackhide__ = True
    for name, value in (("prompt_len", prompt_len), ("steps", steps), ("batch", batch)):
        _check_count(name, value)
    model = MLAModel.from_hf(hf_model)
    a = model.args
    ids = torch.randint(0, a.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    cache = LatentCache.for_model(model, batch, prompt_len + steps)
    calls = []
    seen: list = []
    spy_fn = _spied(fn, seen)
    handles = [layer.self_attn.kv_b_proj.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
               for layer in model.layers]
    worst = 0.0
    try:
        with torch.no_grad():
            logits = model(ids, cache)
            token = logits[:, -1:].argmax(-1)
            for step in range(steps):
                want = model(token, cache)
                cache.crop(-1)
                calls.clear()
                with absorbed_hook(model, spy_fn):
                    got = run_checked(f"absorbed_attention (decode step {step + 1})", model, token, cache,
                                      absorbed=True)
                s = cache.get_seq_length()
                expect(not calls, f"decode step {step + 1}: kv_b_proj was called on {calls[0] if calls else ''}: "
                       f"the cache was re-expanded into per-head keys and values; absorption multiplies the "
                       f"QUERY by W_UK and the weighted latent by W_UV instead (use kv_b_proj.weight)")
                big = [(f, sh) for f, sh in seen if s in sh and (a.qk_nope_head_dim in sh or a.v_head_dim in sh)]
                expect(not big, f"decode step {step + 1}: {big[0][0] if big else ''} made a tensor of shape "
                       f"{big[0][1] if big else ''}: a per-head key or value for each of the {s} cached tokens; the "
                       f"absorbed step reads the latents as they are")
                seen.clear()
                err = float((got - want).abs().max())
                worst = max(worst, err)
                if err > 1e-4:
                    hint = _hint_absorbed(model, fn, cache, token)
                    expect(False, f"decode step {step + 1}: logits of your absorbed step differ from the "
                           f"unabsorbed step's by {err:.3g}", hint=hint)
                token = want[:, -1:].argmax(-1)
    finally:
        for hnd in handles:
            hnd.remove()
    return {"decode steps": steps, "context": prompt_len, "max |logit difference|": worst}


def _spied(fn, seen):
    def call(*args):
        spy = _ShapeSpy()
        with spy:
            out = fn(*args)
        seen.extend(spy.shapes)
        return out
    return call


def _hint_absorbed(model, fn, cache, token) -> str:
    """Rerun layer 0's attention inputs through fn and the known wrong steps."""
    attn = model.layers[0].self_attn
    captured = {}

    def grab(attn_, q_nope, q_rope, c_kv, k_rope):
        captured.setdefault("args", (q_nope, q_rope, c_kv, k_rope))
        return fn(attn_, q_nope, q_rope, c_kv, k_rope)

    cache.crop(-1)
    with torch.no_grad(), absorbed_hook(model, grab):
        model(token, cache, absorbed=True)
    args = captured["args"]
    with torch.no_grad():
        got = fn(attn, *args)
        for wrong, hint in _absorbed_variants(attn, *args):
            if got.shape == wrong.shape and torch.allclose(got, wrong, atol=1e-5):
                return hint
    return ""


# ---- 3. bytes per token -----------------------------------------------------------------------------------


def _bytes_variants(cfg: dict, context: int) -> list[tuple[int, str]]:
    b, L = cfg["bytes"], cfg["num_layers"]
    out = []
    if cfg["kind"] in ("gqa", "window"):
        held = min(context, cfg["window"]) if cfg["kind"] == "window" else context
        per = L * cfg["num_kv_heads"] * cfg["head_dim"] * b
        out.append((per * held, "a token caches a key AND a value in every layer"))
        if cfg["kind"] == "window":
            out.append((2 * per * context, "a window of W tokens holds at most W tokens, whatever the context"))
    else:
        lat = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
        out.append((2 * lat * b * L * context, "MLA caches ONE latent and one shared RoPE key per token and layer: "
                                               "no separate key and value"))
        out.append((cfg["kv_lora_rank"] * b * L * context, "the decoupled RoPE key is cached too, next to the latent"))
        if "num_heads" in cfg:
            out.append((lat * b * L * context * cfg["num_heads"], "the latent is shared by every head: it is cached "
                                                                   "once per token, not once per head"))
    return out


def check_cache_bytes(fn: Callable, cfg: dict, context: int, want: int, what: str) -> None:
    """``fn(cfg, context)`` must equal ``want`` bytes; a known wrong formula is named."""
    __tracebackhide__ = True
    if not isinstance(cfg, dict) or cfg.get("kind") not in ("gqa", "mla", "window"):
        raise ValueError(f"check_cache_bytes takes a config dict with kind 'gqa', 'mla' or 'window' "
                         f"(kvcourse.mla.PUBLISHED's rows), got {cfg!r}")
    got = run_checked(f"cache_bytes({what}, {context})", fn, dict(cfg), context)
    expect(isinstance(got, int | float) and not isinstance(got, bool),
           f"cache_bytes({what}, {context}) returned {type(got).__name__}, expected a number of bytes")
    hint = next((h for wrong, h in _bytes_variants(cfg, context) if got == wrong != want), "")
    expect(got == want, f"cache_bytes({what}, context={context}) = {got:,}, expected {want:,}", hint=hint)


# ---- 4. SnapKV's selection --------------------------------------------------------------------------------


class LearnerSnapKV(SnapKVCache):
    """``SnapKVCache`` whose kept indices come from ``fn(weights, window, kernel_size, budget)``."""

    _fn: Callable | None = None  # set by the check that uses it

    def _select(self, layer, t, weights):
        if weights is None:
            return None
        idx = type(self)._fn(weights, self.window, self.kernel_size, self.budget)
        _check_indices(idx, weights.shape[0], self.num_kv_heads, self.budget, t, "snapkv_keep")
        return idx


def _check_indices(idx, b, kv, budget, n, who) -> None:
    if not isinstance(idx, torch.Tensor) or tuple(idx.shape) != (b, kv, budget) or idx.dtype != torch.long:
        got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"{who} must return (batch, kv_heads, budget) = {(b, kv, budget)} torch.long indices, got "
                         f"{got}")
    if bool(((idx < 0) | (idx >= n)).any()):
        raise ValueError(f"{who} returned indices outside 0..{n - 1}")


def _snapkv_reference(weights, window, kernel_size, budget):
    ref = SnapKVCache(1, weights.shape[0], weights.shape[1], 1, budget, window=window, kernel_size=kernel_size)
    vote = ref.votes(weights)
    top = vote.topk(budget - window, dim=-1).indices.sort(dim=-1).values
    t = weights.shape[3]
    win = torch.arange(t - window, t).expand(*top.shape[:2], -1)
    return torch.cat([top, win], dim=-1)


def _snapkv_variants(weights, window, kernel_size, budget):
    b, kv, rep, t, _ = weights.shape
    w = window
    win = torch.arange(t - w, t).expand(b, kv, w)

    def finish(vote, sort=True, heads_merged=False):
        if heads_merged:
            vote = vote.mean(dim=1, keepdim=True).expand(b, kv, -1)
        top = vote.topk(budget - w, dim=-1).indices
        return torch.cat([top.sort(-1).values if sort else top, win], dim=-1)

    def pooled(vote):
        v = F.avg_pool1d(vote.reshape(b, kv * rep, -1), kernel_size, stride=1, padding=kernel_size // 2)
        return v.view(b, kv, rep, -1).mean(dim=2)

    right = weights[:, :, :, t - w:, : t - w].sum(dim=3)  # (B, KV, rep, T - w)
    front = weights[:, :, :, :w, : t - w].sum(dim=3)
    return [(finish(pooled(front)), "the votes come from the queries of the observation window at the END of the "
                                    "prompt (its last `window` rows), not from its first rows"),
            (finish(pooled(right), heads_merged=True), "each KV head takes its own top-B along the sequence axis; "
                                                       "here every head kept the same positions (heads ranked at once)"),
            (finish(right.mean(dim=2)), "the votes are pooled along the sequence (avg_pool1d, kernel_size, padding "
                                        "kernel_size // 2, stride 1) before the top-B"),
            (finish(pooled(right), sort=False), "the kept positions must be in ascending order: sort the top-B "
                                                "indices before the window is appended")]


def check_snapkv(fn: Callable, weights: torch.Tensor, window: int, kernel_size: int, budget: int, what: str) -> None:
    """``fn(weights, window, kernel_size, budget)`` must give SnapKV's kept indices (B, KV, budget), ascending."""
    __tracebackhide__ = True
    if not isinstance(weights, torch.Tensor) or weights.dim() != 5 or weights.shape[3] != weights.shape[4] \
            or not 0 < window < budget or budget - window > weights.shape[3] - window:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"check_snapkv takes prefill weights (B, KV, G, T, T) and 0 < window < budget <= T, got "
                         f"weights {got}, window {window}, budget {budget}")
    got = run_checked(f"snapkv_keep on {what}", fn, weights.clone(), window, kernel_size, budget)
    b, kv, _, t, _ = weights.shape
    expect(isinstance(got, torch.Tensor) and tuple(got.shape) == (b, kv, budget),
           f"snapkv_keep on {what}: expected indices of shape {(b, kv, budget)}, got "
           f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}",
           hint="budget kept tokens per KV head: budget - window by vote, and the window itself")
    want = _snapkv_reference(weights, window, kernel_size, budget)
    if not torch.equal(got.long(), want):
        hint = next((h for wrong, h in _snapkv_variants(weights, window, kernel_size, budget)
                     if torch.equal(got.long(), wrong)), "")
        row = next(i for i in range(kv) if not torch.equal(got[0, i].long(), want[0, i]))
        expect(False, f"snapkv_keep on {what}: KV head {row} keeps positions {got[0, row].tolist()}, SnapKV keeps "
               f"{want[0, row].tolist()}", hint=hint)


def check_snapkv_on_model(fn: Callable, llama, ids: torch.Tensor, budget: int, new_tokens: int = 8) -> dict:
    """The learner's selection inside ``evict_generate`` on a real model: same kept positions, tokens and logits."""
    __tracebackhide__ = True
    _check_count("budget", budget, 3)
    LearnerSnapKV._fn = staticmethod(fn)
    mine = LearnerSnapKV.for_model(llama, 1, budget, window=min(32, budget // 2))
    ref = SnapKVCache.for_model(llama, 1, budget, window=min(32, budget // 2))
    toks, logits = run_checked("snapkv_keep inside SnapKVCache", evict_generate, llama, ids, mine, new_tokens)
    want_toks, want_logits = evict_generate(llama, ids, ref, new_tokens)
    for layer in range(llama.args.num_layers):
        expect(torch.equal(mine.kept_positions(layer)[..., :budget], ref.kept_positions(layer)[..., :budget]),
               f"on the bundled model, layer {layer}: the cache kept other positions than SnapKV's")
    expect(torch.equal(toks, want_toks) and torch.allclose(logits, want_logits, atol=1e-5),
           "on the bundled model: tokens or logits differ from SnapKV's")
    return {"prompt": ids.shape[1], "budget": budget, "kept per head": mine.kept_length(0) - new_tokens + 1}


# ---- 5. H2O's eviction step -------------------------------------------------------------------------------


class LearnerH2O(H2OCache):
    """``H2OCache`` whose eviction step is ``fn(keys, values, positions, scores, weights, heavy, recent)``."""

    _fn: Callable | None = None  # set by the check that uses it

    def _select(self, layer, t, weights):
        old = (self.keys[layer], self.values[layer], self.positions[layer], self.scores[layer])
        out = type(self)._fn(*(x.clone() for x in old), weights, self.heavy, self.recent)
        if not isinstance(out, tuple | list) or len(out) != 4:
            raise ValueError(f"h2o_evict must return (keys, values, positions, scores), got {type(out).__name__}")
        self.keys[layer], self.values[layer], self.positions[layer], self.scores[layer] = out
        return None


def _h2o_reference(keys, values, positions, scores, weights, heavy, recent):
    b, kv, n, d = keys.shape
    c = H2OCache(1, b, kv, d, heavy + recent, heavy=heavy)
    c.keys, c.values, c.positions, c.scores = [keys], [values], [positions], [scores]
    idx = c._select(0, weights.shape[3], weights)
    if idx is not None:
        c._keep(0, idx)
    return c.keys[0], c.values[0], c.positions[0], c.scores[0]


def _h2o_case(n: int, heavy: int, recent: int, seed: int, b: int = 1, kv: int = 2, rep: int = 2, t: int = 1,
              start: int = 0):
    """A layer's state before an eviction: n tokens held (the last t new, with zero scores), random weights."""
    for name, value in (("n", n), ("b", b), ("kv", kv), ("rep", rep), ("t", t)):
        _check_count(name, value)
    _check_count("start", start, 0)
    if t > n:
        raise ValueError(f"h2o_case: t={t} new tokens cannot exceed the n={n} tokens held")
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(b, kv, n, 4, generator=g), torch.randn(b, kv, n, 4, generator=g)
    positions = (start + torch.arange(n)).expand(b, kv, n).clone()
    positions[..., : n - t] = torch.sort(torch.randperm(start + n - t, generator=g)[: n - t]).values \
        if start else positions[..., : n - t]
    scores = torch.rand(b, kv, n, generator=g) * 3
    scores[..., n - t:] = 0
    weights = torch.softmax(torch.randn(b, kv, rep, t, n, generator=g) * 3, dim=-1)
    return keys, values, positions, scores, weights


def _h2o_positions(case, heavy: int, recent: int, *, accumulate=True, over_all=False, sort=True) -> torch.Tensor:
    """Kept positions of one step under H2O's rule or one of its realistic variants."""
    positions, scores, weights = case[2], case[3], case[4]
    total = (scores if accumulate else torch.zeros_like(scores)) + weights.sum(dim=(2, 3))  # (B, KV, n)
    n = total.shape[2]
    if n <= heavy + recent:
        return positions
    top = (total if over_all else total[..., : n - recent]).topk(heavy, dim=-1).indices
    top = top.sort(-1).values if sort else top
    recent_idx = torch.arange(n - recent, n).expand(*top.shape[:2], -1)
    return positions.gather(2, torch.cat([top, recent_idx], dim=-1))


def check_h2o(fn: Callable, case: tuple, heavy: int, recent: int, what: str) -> None:
    """One eviction step: ``fn`` must return H2O's keys, values, original positions and accumulated scores."""
    __tracebackhide__ = True
    if not isinstance(case, tuple) or len(case) != 5 or not all(isinstance(x, torch.Tensor) for x in case):
        raise ValueError(f"check_h2o takes a case (keys, values, positions, scores, weights) as h2o_case makes it, "
                         f"got {type(case).__name__}")
    _check_count("heavy", heavy, 0)
    _check_count("recent", recent, 1)
    out = run_checked(f"h2o_evict on {what}", fn, *(x.clone() for x in case), heavy, recent)
    expect(isinstance(out, tuple | list) and len(out) == 4,
           f"h2o_evict on {what} must return (keys, values, positions, scores), got {type(out).__name__}")
    keys, values, positions, scores = out
    want = _h2o_reference(*(x.clone() for x in case), heavy, recent)
    kept = want[0].shape[2]
    expect(isinstance(positions, torch.Tensor) and positions.shape == want[2].shape,
           f"h2o_evict on {what}: positions of shape "
           f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__}, "
           f"expected {tuple(want[2].shape)} ({kept} tokens kept per head, budget {heavy + recent})")
    if not torch.equal(positions, want[2]):
        variants = [
            (_h2o_positions(case, heavy, recent, accumulate=False), "a score is the attention a token received over "
             "EVERY query so far: add this step's weights to the scores held, do not replace them"),
            (_h2o_positions(case, heavy, recent, over_all=True), "the heavy hitters are chosen among the tokens OLDER "
             "than the recent window (the recent ones are kept anyway): rank scores[..., :n - recent] only"),
            (_h2o_positions(case, heavy, recent, sort=False), "the kept tokens must stay in their original order: "
             "sort the heavy hitters' indices before the recent ones are appended"),
            (torch.arange(kept).expand_as(want[2]), "positions lost after eviction: gather the positions with the "
             "same indices as the keys, so that each kept token keeps its ORIGINAL position (RoPE rotated its key "
             "there, and the next token's position counts every token seen)"),
            (case[2][..., :kept], "positions lost after eviction: gather the positions with the same indices as the "
             "keys, so that each kept token keeps its ORIGINAL position")]
        hint = next((h for wrong, h in variants if torch.equal(positions, wrong)), "")
        expect(False, f"h2o_evict on {what}: head 0 holds positions {positions[0, 0].tolist()}, H2O keeps "
               f"{want[2][0, 0].tolist()}", hint=hint)
    expect(isinstance(scores, torch.Tensor) and scores.shape == want[3].shape
           and torch.allclose(scores, want[3], atol=1e-5), f"h2o_evict on {what}: the kept tokens' scores are not "
           f"their accumulated attention", hint="add this step's weights (summed over the group's heads and the "
           "queries) to the scores held, and gather the scores with the kept tokens")
    expect(torch.equal(keys, want[0]) and torch.equal(values, want[1]), f"h2o_evict on {what}: the kept keys or "
           f"values are not those of the kept positions", hint="gather keys, values, positions and scores with the "
           "same indices")


def check_h2o_on_model(fn: Callable, llama, ids: torch.Tensor, budget: int, new_tokens: int = 8) -> dict:
    """The learner's step inside ``evict_generate``: the cache must hold H2O's positions after every step."""
    __tracebackhide__ = True
    _check_count("budget", budget, 2)
    LearnerH2O._fn = staticmethod(fn)
    mine, ref = LearnerH2O.for_model(llama, 1, budget), H2OCache.for_model(llama, 1, budget)
    toks, logits = run_checked("h2o_evict inside H2OCache", evict_generate, llama, ids, mine, new_tokens)
    want_toks, want_logits = evict_generate(llama, ids, ref, new_tokens)
    for layer in range(llama.args.num_layers):
        expect(mine.kept_length(layer) <= budget, f"layer {layer} holds {mine.kept_length(layer)} tokens per head, "
               f"over the budget {budget}")
        expect(torch.equal(mine.kept_positions(layer), ref.kept_positions(layer)),
               f"on the bundled model, layer {layer}: the cache kept other positions than H2O's")
    expect(torch.equal(toks, want_toks) and torch.allclose(logits, want_logits, atol=1e-5),
           "on the bundled model: tokens or logits differ from H2O's")
    return {"prompt": ids.shape[1], "budget": budget, "steps": new_tokens}


# ---- 6. int8 weights --------------------------------------------------------------------------------------


def check_quantize_rows(fn: Callable, weight: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(weight)`` -> (int8 (out, in), scales (out,)) must be symmetric absmax per output channel."""
    __tracebackhide__ = True
    from .int8_weights import QMAX, quantize_per_channel

    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"check_quantize_rows takes a float weight (out_features, in_features), got {got}")
    spy = _NaNCastSpy()
    with spy:
        got = run_checked(f"quantize_rows on {what}", fn, weight.clone())
    expect(isinstance(got, tuple | list) and len(got) == 2, f"quantize_rows on {what} must return (q, scales)")
    zero_rows = int((weight == 0).all(dim=1).sum())
    expect(not spy.casts, f"quantize_rows on {what}: a tensor holding NaN was cast to int8 (by "
           f"{spy.casts[0] if spy.casts else ''}): an undefined result, which happens to be 0 on some machines",
           hint=f"the weight has {zero_rows} row(s) of zeros: their scale is 0 and 0 / 0 is NaN; give such a row "
           f"q = 0 without dividing by its zero scale" if zero_rows else "")
    q, scales = got
    out_f, in_f = weight.shape
    expect(isinstance(q, torch.Tensor) and q.dtype == torch.int8 and tuple(q.shape) == (out_f, in_f),
           f"quantize_rows on {what}: q must be int8 of shape {(out_f, in_f)}, got "
           f"{(tuple(q.shape), q.dtype) if isinstance(q, torch.Tensor) else type(q).__name__}")
    scales = torch.as_tensor(scales)
    hint = ""
    if scales.numel() == 1 or (scales.numel() == out_f and bool((scales == scales.flatten()[0]).all())):
        hint = "one scale for the whole matrix gives every row the outlier row's step: one scale per OUTPUT row"
    elif tuple(scales.shape) == (in_f,):
        hint = "one scale per input column: the max is taken over the wrong axis (an output channel is a row)"
    expect(tuple(scales.shape) == (out_f,), f"quantize_rows on {what}: scales must be one per output channel, "
           f"({out_f},), got {tuple(scales.shape)}", hint=hint)
    want_q, want_s = quantize_per_channel(weight)
    expect(torch.allclose(scales.float(), want_s, rtol=1e-6, atol=0), f"quantize_rows on {what}: scales differ "
           f"from max|row| / {QMAX}", hint=hint)
    deq = q.float() * scales.float()[:, None]
    err = ((weight.float() - deq).abs() / want_s.clamp_min(1e-30)[:, None]).max()
    trunc = torch.equal(q, torch.trunc(weight.float() / want_s.clamp_min(1e-30)[:, None]).to(torch.int8))
    expect(torch.equal(q, want_q), f"quantize_rows on {what}: {int((q != want_q).sum())} int8 values differ from "
           f"round(w / scale); the worst error is {err:.2f} steps (round to nearest: at most 0.5)",
           hint="w / scale was truncated toward zero (.to(torch.int8) cuts the fraction): round first"
           if trunc else "")
    return q, scales


# ---- measuring: decode steps with int8 weights and an int8 cache ------------------------------------------


@torch.no_grad()
def time_decode(llama, batch: int, context: int, *, int8_cache: bool = False, steps: int = 4) -> dict:
    """CPU ms of one greedy decode step of ``llama`` (float or ``quantize_model``'s) at ``batch`` rows of ``context``
    cached tokens, and the bytes that step reads (weights + cache). The cache is filled with random keys and values
    (timing needs the sizes, not the text). CPU time of this process, one thread: run with torch.set_num_threads(1).
    """
    from .cache import KVCache
    from .generate import decode_one_token
    from .int8_weights import weight_bytes_per_step
    from .llama import Llama

    if not isinstance(llama, Llama):
        raise TypeError(f"time_decode takes the course's kvcourse.llama.Llama (Llama.from_hf(model)), got "
                        f"{type(llama).__name__}")
    for name, value in (("batch", batch), ("context", context), ("steps", steps)):
        _check_count(name, value)
    a = llama.args
    if int8_cache:
        cache = Int8KVCache.for_model(llama, batch, context + steps + 2, residual=0)
    else:
        cache = KVCache.for_model(llama, batch, context + steps + 2)
    g = torch.Generator().manual_seed(0)
    for layer in range(a.num_layers):
        k = torch.randn(batch, a.num_kv_heads, context, a.head_dim, generator=g).to(llama.dtype)
        cache.update(k, k.clone(), layer)
    token = torch.zeros(batch, 1, dtype=torch.long)
    decode_one_token(llama, token, cache)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        decode_one_token(llama, token, cache)
        times.append(time.process_time() - t0)
    per_value = 1 if int8_cache else torch.tensor([], dtype=llama.dtype).element_size()
    kv = 2 * a.num_layers * a.num_kv_heads * a.head_dim * per_value * context * batch
    return {"batch": batch, "context": context, "ms": 1e3 * statistics.median(times),
            "weight_bytes": weight_bytes_per_step(llama, batch), "cache_bytes": kv}


def int8_rows(hf_model, batches=(1, 64), context: int = 512) -> list[dict]:
    """``time_decode`` rows for float weights, int8 weights and an int8 cache, in float32 and bfloat16, with the
    bytes each step reads and the share of bytes saved against the float step of the same dtype and batch; each row
    also carries the float step's weight bytes and one row's cache bytes (what notebook 07's formula takes)."""
    from .int8_weights import quantize_model
    from .llama import Llama

    if not isinstance(batches, tuple | list) or not batches:
        raise ValueError(f"int8_rows: batches must be a non-empty tuple of ints >= 1, got {batches!r}")
    for b in batches:
        _check_count("each batch", b)
    _check_count("context", context)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        base = Llama.from_hf(hf_model)
        floats = base.to(dtype) if dtype != torch.float32 else base
        int8 = quantize_model(Llama.from_hf(hf_model)).to(dtype)
        for batch in batches:
            ref = time_decode(floats, batch, context)
            for what, r in (("float", ref), ("int8 weights", time_decode(int8, batch, context)),
                            ("int8 cache", time_decode(floats, batch, context, int8_cache=True))):
                total, ref_total = r["weight_bytes"] + r["cache_bytes"], ref["weight_bytes"] + ref["cache_bytes"]
                rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "what": what,
                             "bytes": total, "saved": 1 - total / ref_total, "ms": r["ms"],
                             "speedup": ref["ms"] / r["ms"], "float_weight_bytes": ref["weight_bytes"],
                             "float_row_cache_bytes": ref["cache_bytes"] // batch,
                             "bytes_per_value": floats.embed.weight.element_size()})
    return rows


def time_mla_paths(hf_model, contexts=(128, 512, 2048), repeats: int = 5) -> list[dict]:
    """``kvcourse.mla.time_decode_steps`` with few repeats (the notebook's budget)."""
    from .mla import time_decode_steps

    return time_decode_steps(hf_model, contexts=contexts, repeats=repeats)


def retrieval_plot(rows: list[dict]):
    """Agreement with the full cache and mean logit error against the budget, one line per policy."""
    import matplotlib.pyplot as plt

    need = ("policy", "budget", "agreement", "mean_logit_err", "retrieval")
    if not isinstance(rows, list) or not rows or any(not isinstance(r, dict) or any(k not in r for k in need)
                                                     for r in rows):
        raise ValueError(f"retrieval_plot takes kvcourse.evict.measure_retrieval's rows (dicts with keys "
                         f"{', '.join(need)}), got {rows!r:.200}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for policy in dict.fromkeys(r["policy"] for r in rows if r["budget"]):
        pts = [r for r in rows if r["policy"] == policy]
        axes[0].plot([r["budget"] for r in pts], [r["agreement"] for r in pts], marker="o", label=policy)
        axes[1].plot([r["budget"] for r in pts], [r["mean_logit_err"] for r in pts], marker="o", label=policy)
    full = next((r for r in rows if r["budget"] is None), None)
    axes[0].set(xscale="log", xlabel="kept tokens per head (budget)", ylabel="agreement with the full cache",
                title=f"retrieval: {full['retrieval']:.0%} with the full cache" if full else "")
    axes[1].set(xscale="log", xlabel="kept tokens per head (budget)", ylabel="mean |logit error|")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


h2o_case = _h2o_case

# A passage the bundled model trained on (Romeo and Juliet, Act 2 scene 2; public domain), for the eviction checks.
PASSAGE = """But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she:
Be not her maid, since she is envious;
Her vestal livery is but sick and green
And none but fools do wear it; cast it off.
It is my lady, O, it is my love!
O, that she knew she were!
She speaks yet she says nothing: what of that?
Her eye discourses; I will answer it.
I am too bold, 'tis not to me she speaks:
Two of the fairest stars in all the heaven,
Having some business, do entreat her eyes
To twinkle in their spheres till they return.
What if her eyes were there, they in her head?
The brightness of her cheek would shame those stars,
As daylight doth a lamp; her eyes in heaven
Would through the airy region stream so bright
That birds would sing and think it were not night.
"""


def check_saving(fn: Callable, weight_bytes: int, row_cache_bytes: int, batch: int, bytes_per_value: int, what: str,
                 case: str) -> None:
    """``fn(weight_bytes, row_cache_bytes, batch, bytes_per_value, what)``: the share of a step's bytes saved."""
    __tracebackhide__ = True
    if what not in ("weights", "cache"):
        raise ValueError(f"check_saving: what must be 'weights' or 'cache', got {what!r}")
    for name, value in (("weight_bytes", weight_bytes), ("row_cache_bytes", row_cache_bytes), ("batch", batch),
                        ("bytes_per_value", bytes_per_value)):
        _check_count(name, value)
    got = run_checked(f"predicted_saving on {case}", fn, weight_bytes, row_cache_bytes, batch, bytes_per_value, what)
    cache = batch * row_cache_bytes
    part = weight_bytes if what == "weights" else cache
    want = part * (1 - 1 / bytes_per_value) / (weight_bytes + cache)
    expect(isinstance(got, int | float | torch.Tensor), f"predicted_saving on {case} returned {type(got).__name__}")
    got = float(got)
    other = cache if what == "weights" else weight_bytes
    wrong = [
        (part * (1 - 1 / bytes_per_value) / (weight_bytes + row_cache_bytes) if what == "weights" else
         row_cache_bytes * (1 - 1 / bytes_per_value) / (weight_bytes + row_cache_bytes),
         "the weights are read once per step, but every row of the batch reads its own cache: a step reads "
         "weight_bytes + batch x row_cache_bytes"),
        (1 - 1 / bytes_per_value, "that is the saving on the quantized part alone; the step also reads the other "
                                  "part, unchanged: divide by the whole step's bytes"),
        (part * 0.5 / (part + other), "int8 replaces bytes_per_value bytes by 1: a quarter of float32, half of "
                                      "bfloat16"),
        (part * (1 / bytes_per_value) / (part + other), "the saving is what int8 removes, (1 - 1 / bytes_per_value) "
                                                        "of the part, not what remains")]
    close = lambda u, v: abs(u - v) <= 1e-6 * max(abs(v), 1e-12)  # noqa: E731 - float32 answers are fine
    hint = next((h for w, h in wrong if close(got, w) and not close(w, want)), "")
    expect(close(got, want), f"predicted_saving on {case} ({what}) = {got:.4f}, expected {want:.4f}", hint=hint)
