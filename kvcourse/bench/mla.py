"""The MLA decode-step benchmark (issue 25, section 1): absorbed against unabsorbed against ``transformers``.

    OMP_NUM_THREADS=1 python -m kvcourse.bench.mla          # contexts 128 .. 4096, 20 rounds
    OMP_NUM_THREADS=1 python -m kvcourse.bench.mla --quick  # contexts 128 and 512, 3 rounds

Model: a random-weight dense ``DeepseekV3ForCausalLM``, float32, CPU, one torch thread, batch 1, with the attention
of DeepSeek-V2-Lite (``V2_LITE``, from its published config.json) and its hidden and dense-MLP sizes; only the
depth (2 layers, not 27) and the vocabulary (1,024, not 102,400) are cut, so that the output head does not
dominate a step. The MoE layers are dense here (kvcourse.mla reproduces dense layers only).

At each context S both caches, the course's ``LatentCache`` and ``transformers``' ``DynamicCache``, are filled with
the same random latents instead of a prefill (a decode step reads only what the cache holds; the tests check these
bytes against a real prefill's). Each round then times one decode step of each path in turn, in an order that
rotates each round (a change of load hits all alike), each step cropped away again: every step sees exactly S
cached tokens. The first round is an untimed warm-up whose logits are compared (max |Δlogit| against the absorbed
path: the paths do the same work). Clock: this process's CPU time (``time.process_time``, one thread: the work,
which load stretches less than the wall clock); the wall clock is kept too. Outputs in ``--out``: ``mla.json`` and ``mla.md`` (``--out docs/bench`` wrote docs/bench/mla.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..memory import cache_tensors, tensor_bytes
from ..mla import LatentCache, MLAModel

# https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json: hidden_size 2048, intermediate_size
# 10944 (its dense first layer; a MoE layer runs 2 shared + 6 routed experts of 1408, about as much), 16 heads,
# q_lora_rank null, kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128 (its model card:
# "16 attention heads, where each head has a dimension of 128"); rope_scaling yarn there, plain RoPE here.
V2_LITE = dict(hidden_size=2048, intermediate_size=10944, num_attention_heads=16, num_key_value_heads=16,
               q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
CUT = dict(num_hidden_layers=2, vocab_size=1024)  # 27 layers and 102,400 tokens in the published model
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_hidden_layers=2,
            vocab_size=128)  # --tiny: the tests' shape (kvcourse.fewer_bytes.tiny_deepseek)
PATHS = ("absorbed", "unabsorbed", "transformers")
PRESETS = {"full": {"contexts": [128, 256, 512, 1024, 2048, 4096], "repeats": 20},
           "quick": {"contexts": [128, 512], "repeats": 3}}


def build(sizes: dict, seed: int = 0):
    """A random-weight dense ``DeepseekV3ForCausalLM`` (float32, eval) of these sizes, and the course's model on
    the same weights."""
    import transformers

    n = sizes["num_hidden_layers"]
    config = transformers.DeepseekV3Config(**sizes, first_k_dense_replace=n, max_position_embeddings=8192,
                                           num_mtp_layers=0, eos_token_id=None, rope_interleave=True)
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    return hf, MLAModel.from_hf(hf)


def latent_bytes(cache: LatentCache) -> int:
    """Bytes of the tokens a ``LatentCache`` holds (its buffers are preallocated past them)."""
    held = zip(cache.latents, cache.rope_keys, cache.lengths, strict=True)
    return sum(tensor_bytes((c[:, :n], r[:, :n])) for c, r, n in held)


def filled_caches(ours: MLAModel, hf, context: int, seed: int):
    """Both caches holding the same ``context`` random latents per layer (normed latents have RMS 1, as randn)."""
    from transformers import DynamicCache

    a, g = ours.args, torch.Generator().manual_seed(seed)
    cache = LatentCache.for_model(ours, 1, context + 1)
    hf_cache = DynamicCache(config=hf.config)
    for i in range(a.num_layers):
        c_kv = torch.randn(1, context, a.kv_lora_rank, generator=g)  # (B, S, R)
        k_rope = torch.randn(1, context, a.qk_rope_head_dim, generator=g)  # (B, S, Dr)
        cache.update(c_kv, k_rope, i)
        hf_cache.update(c_kv[:, None].clone(), k_rope[:, None].clone(), i)  # (B, 1, S, R): transformers' layout
    return cache, hf_cache


def measure_context(ours: MLAModel, hf, context: int, repeats: int, seed: int = 0) -> list[dict]:
    """One row per path at this context: median CPU and wall ms of ``repeats`` rounds, the cache's bytes, and the
    warm-up step's max |Δlogit| against the absorbed path's."""
    cache, hf_cache = filled_caches(ours, hf, context, seed)
    held = {"latent": latent_bytes(cache), "transformers": tensor_bytes(cache_tensors(hf_cache))}
    token = torch.randint(0, ours.args.vocab_size, (1, 1), generator=torch.Generator().manual_seed(seed + 1))
    cpu, wall, logits = {p: [] for p in PATHS}, {p: [] for p in PATHS}, {}
    with torch.no_grad():
        for r in range(repeats + 1):
            for path in PATHS[r % 3:] + PATHS[:r % 3]:
                c0, w0 = time.process_time(), time.perf_counter()
                if path == "transformers":
                    out = hf(input_ids=token, cache=hf_cache, use_cache=True, logits_to_keep=1).logits[:, -1]
                else:
                    out = ours(token, cache, absorbed=path == "absorbed", last_only=True)[:, -1]
                c1, w1 = time.process_time(), time.perf_counter()
                (hf_cache if path == "transformers" else cache).crop(-1)
                if r == 0:
                    logits[path] = out
                else:
                    cpu[path].append(1e3 * (c1 - c0))
                    wall[path].append(1e3 * (w1 - w0))
    if cache.get_seq_length() != context or hf_cache.get_seq_length() != context:
        raise RuntimeError(f"a timed step was not cropped away: the caches hold {cache.get_seq_length()} and "
                           f"{hf_cache.get_seq_length()} tokens, expected {context}")
    return [{"context": context, "path": p, "ms": statistics.median(cpu[p]), "ms_wall": statistics.median(wall[p]),
             "cache_bytes": held["transformers" if p == "transformers" else "latent"],
             "max_abs_logit_diff": (logits[p] - logits["absorbed"]).abs().max().item()} for p in PATHS]


def macs_per_cached_token(a) -> dict:
    """Multiply-adds one more cached token adds to a decode step, per layer, as kvcourse/mla.py's code does them.
    Unabsorbed: kv_b_proj re-expands the latent, R x H(Dn + Dv), then scores and values, H(Dn + Dr) + H Dv.
    Absorbed: scores against the latent and the rope key, H(R + Dr), then the weighted latents, H R."""
    h, r, dn, dr, dv = a.num_heads, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    return {"unabsorbed": r * h * (dn + dv) + h * (dn + dr + dv), "absorbed": h * (r + dr) + h * r}


def table(rows: list[dict]) -> list[dict]:
    """One line per context: the three paths' ms side by side, the ratios over absorbed, the bytes held."""
    by = {(r["context"], r["path"]): r for r in rows}
    out = []
    for ctx in sorted({r["context"] for r in rows}):
        ab, un, tf = (by[ctx, p] for p in PATHS)
        out.append({"context": ctx, **{p: by[ctx, p]["ms"] for p in PATHS}, "unabsorbed/absorbed": un["ms"] / ab["ms"],
                    "transformers/absorbed": tf["ms"] / ab["ms"], "latent_bytes": ab["cache_bytes"],
                    "transformers_bytes": tf["cache_bytes"],
                    "max_abs_logit_diff": max(un["max_abs_logit_diff"], tf["max_abs_logit_diff"])})
    return out


def explain(lines: list[dict], model: dict) -> str:
    """Two or three sentences computed from the table: the cost per cached token (least-squares slope of ms against
    the context) of each path, against the multiply-adds the code does per cached token."""
    lo, hi, macs = lines[0], lines[-1], model["macs_per_cached_token"]
    text = (f"From {lo['context']} to {hi['context']} cached tokens, unabsorbed/absorbed goes from "
            f"{lo['unabsorbed/absorbed']:.2f} to {hi['unabsorbed/absorbed']:.2f} and transformers/absorbed from "
            f"{lo['transformers/absorbed']:.2f} to {hi['transformers/absorbed']:.2f}. ")
    if len(lines) > 1:
        ctx = [t["context"] for t in lines]
        us = {p: 1e3 * statistics.linear_regression(ctx, [t[p] for t in lines]).slope for p in PATHS}
        ratio = macs["unabsorbed"] / macs["absorbed"]
        text += (f"Each more cached token costs the unabsorbed step {us['unabsorbed']:.1f} µs over the "
                 f"{model['sizes']['num_hidden_layers']} layers ({us['transformers']:.1f} in transformers): it "
                 f"re-expands every cached latent through kv_b_proj, as transformers' expand_kv does, "
                 f"{macs['unabsorbed']:,} multiply-adds per token and layer, where the absorbed step scores the "
                 f"latents directly, {macs['absorbed']:,} (x{ratio:.0f} fewer). At the unabsorbed rate that is "
                 f"{us['unabsorbed'] / ratio:.2f} µs per token, {us['unabsorbed'] / ratio * (ctx[-1] - ctx[0]) / 1e3:.1f}"
                 f" ms over the whole range, small against the absorbed step's {lo['absorbed']:.0f} ms of "
                 f"projections and MLP (fitted here: {us['absorbed']:.2f} µs per token); "
                 + ("so the gap grows with the context. " if hi["unabsorbed/absorbed"] > lo["unabsorbed/absorbed"]
                    else "yet the gap did not grow here. "))
    same = all(t["latent_bytes"] == t["transformers_bytes"] for t in lines)
    return text + ("Both caches hold the same bytes (transformers 5.x caches c_kv and k_rope too), so the time "
                   "goes to the re-expansion, not to reading more cache." if same else
                   "The two caches hold different bytes: see the bytes columns.")


def markdown(report: dict) -> str:
    env, m = report["environment"], report["model"]
    head = ["context", "absorbed ms", "unabsorbed ms", "transformers ms", "unabsorbed/absorbed",
            "transformers/absorbed", "latent cache bytes", "transformers cache bytes", "max abs Δlogit"]
    md = [f"# MLA decode step: absorbed, unabsorbed, transformers ({report['preset']})", "",
          f"Model: random-weight dense DeepseekV3ForCausalLM ({m['source']}): "
          f"{', '.join(f'{k} {v}' for k, v in m['sizes'].items())}; float32, batch 1; transformers' attention "
          f"{m['transformers_attention']!r} (the unabsorbed path uses SDPA too). Clock: CPU time of "
          f"{env['torch_threads']} torch thread (median of {report['repeats']} rounds, paths interleaved). "
          f"{env['cpu']}, {env['cpu_count']} cores; load average {env['load_average_at_start']} at the start, "
          f"{env['load_average_at_end']} at the end; {env['seconds']} s in all; torch {env['torch']}, transformers "
          f"{env['transformers']}, commit {env['git_commit']}, {env['date']}.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in report["table"]:
        md.append(f"| {t['context']} | {t['absorbed']:.2f} | {t['unabsorbed']:.2f} | {t['transformers']:.2f} | "
                  f"{t['unabsorbed/absorbed']:.2f} | {t['transformers/absorbed']:.2f} | {t['latent_bytes']:,} | "
                  f"{t['transformers_bytes']:,} | {t['max_abs_logit_diff']:.2g} |")
    walls = ", ".join(f"{r['context']} {r['path']} {r['ms_wall']:.2f}" for r in report["rows"])
    return "\n".join(md + ["", f"Wall-clock ms (same steps): {walls}.", "", report["explanation"], ""])


def run(sizes: dict, contexts: list[int], repeats: int, *, threads: int = 1, seed: int = 0, preset: str = "custom",
        out_dir: Path | None = None, say=print) -> dict:
    from .serve import _load
    from .speculative_report import environment

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    env, t0 = environment(threads), time.perf_counter()
    try:
        hf, ours = build(sizes, seed)
        rows = []
        for ctx in contexts:
            rows += measure_context(ours, hf, ctx, repeats, seed + ctx)
            say("  ".join(f"S={ctx} {r['path']} {r['ms']:.2f} ms (x{r['ms'] / rows[-3]['ms']:.2f}) "
                          f"|Δlogit| {r['max_abs_logit_diff']:.1e}" for r in rows[-3:]))
    finally:
        torch.set_num_threads(old)
    env.update(seconds=round(time.perf_counter() - t0, 1), load_average_at_end=_load())
    lines = table(rows)
    cut = "DeepSeek-V2-Lite's config.json, cut to " + ", ".join(f"{k} {v}" for k, v in CUT.items())
    source = {"tiny": "the tests' tiny shape", "v2": cut}.get(
        "tiny" if sizes == TINY else "v2" if sizes == {**V2_LITE, **CUT} else "", "custom sizes")
    model = {"sizes": sizes, "source": source, "transformers_attention": hf.config._attn_implementation,
             "macs_per_cached_token": macs_per_cached_token(ours.args), "bytes_per_token": lines[0]["latent_bytes"]
             // lines[0]["context"]}
    report = {"schema": "kvcourse-mla/1", "preset": preset, "repeats": repeats, "environment": env, "model": model,
              "rows": rows, "table": lines}
    report["explanation"] = explain(lines, model)
    md = markdown(report)
    say(md)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "mla.json").write_text(json.dumps(report, indent=1, default=str))
        (out_dir / "mla.md").write_text(md)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvcourse.bench.mla", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="contexts 128 and 512, 3 rounds")
    p.add_argument("--out", type=Path, default=Path("bench-out/mla"), help="output folder (mla.json, mla.md)")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="cached tokens (default 128 .. 4096)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per context (default 20; --quick 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU-time clock)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and latents")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny shape instead of DeepSeek-V2-Lite's")
    args = p.parse_args(argv)
    pre = PRESETS["quick" if args.quick else "full"]
    args.contexts = args.contexts or pre["contexts"]
    args.repeats = pre["repeats"] if args.repeats is None else args.repeats
    for label, values in (("--contexts", args.contexts), ("--repeats", [args.repeats]), ("--threads", [args.threads])):
        if min(values) < 1:
            raise SystemExit(f"{label} must be >= 1, got {' '.join(map(str, values))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = TINY if args.tiny else {**V2_LITE, **CUT}
    run(sizes, args.contexts, args.repeats, threads=args.threads, seed=args.seed,
        preset=("quick" if args.quick else "full") + (", tiny" if args.tiny else ""), out_dir=args.out)
    print(f"\nwritten: {args.out / 'mla.json'}, {args.out / 'mla.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
