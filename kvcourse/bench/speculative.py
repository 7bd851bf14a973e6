"""The speculative-decoding benchmark (issue 24): both drafters of ``kvcourse.speculative`` at k = 1..8 against
the plain cached generator and ``transformers``' assisted generation, in one run, on the same prompts.

    OMP_NUM_THREADS=1 python -m kvcourse.bench.speculative          # main run: 2 + 2 prompts x 192 tokens,
                                                                     # 9 to 13 min on 2 loaded cores
    OMP_NUM_THREADS=1 python -m kvcourse.bench.speculative --quick  # 1 + 1 prompts x 24 tokens, k = 1, 2, 4: 12 s
    python -m kvcourse.bench --speculative [--quick]                 # the same, from the main command line

Target: the bundled model (``load_model()``), float32, CPU, batch 1, greedy; draft: ``kvcourse/bard_draft``
(``load_model("bard_draft")``, same tokenizer). Every system makes exactly ``--new-tokens`` tokens
(``eos_token_id=None``, and ``min_new_tokens = max_new_tokens`` for ``transformers``), and every system's tokens
are checked against the plain greedy tokens of ``kvcourse.generate.generate`` ("2/2" in the tables).

Systems, on each prompt (``settings``; labels in ``speculative_report.SYSTEMS``):

- ``course``: ``kvcourse.generate.generate`` with a ``KVCache`` (the baseline of every ratio);
- ``hf``: ``transformers`` ``generate(use_cache=True)``;
- ``lookup``, ``draft``: ``kvcourse.speculative.speculative_generate`` with ``PromptLookupDrafter()`` or
  ``ModelDrafter(bard_draft)``, at each k of ``--ks``;
- ``hf_lookup``: ``generate(prompt_lookup_num_tokens=k)`` (``max_matching_ngram_size`` left at its default, 2, as
  ``PromptLookupDrafter``'s), at each k of ``--ks``;
- ``hf_draft``: ``generate(assistant_model=draft)``, at each k of ``--hf-draft-ks``, with the assistant's
  ``generation_config`` set to ``num_assistant_tokens=k``, ``num_assistant_tokens_schedule="constant"`` and
  ``assistant_confidence_threshold=0`` (transformers 5.25: ``generation/utils.py`` adds ``ConfidenceCriteria``,
  which stops drafting when the draft's top probability is below the threshold, only for a threshold > 0);
- ``hf_draft_default``: the same with transformers' defaults for an assistant (``num_assistant_tokens`` 20,
  ``"constant"``, confidence threshold 0.4: ``GenerationConfig._get_default_generation_params``).

Two texts: lines of the works the models never trained on (``kvcourse.train.VAL_WORKS``), and a repetitive text:
prompts of ``REPETITIVE_POOL`` on which the target's own greedy output repeats itself, chosen by a stated rule
(``repeat_share`` >= ``REPEAT_SHARE_MIN`` over ``RULE_TOKENS`` greedy tokens, in the pool's order), never by their
speed-up. The bundled model does not copy a repeated passage, so a repeated prompt is not enough: its *output*
must loop.

Timing: an untimed warm-up of every setting, then ``--repeats`` rounds per prompt, each running every setting once
in turn (a change of load hits all alike); the first round also checks the tokens and counts the passes (forward
hooks on the ``transformers`` models, a few microseconds a pass). Each run is timed by the wall clock and by this
process's CPU time; medians per prompt. Then ``step_costs``: a target decode step, a draft decode step, a target
pass over k + 1 tokens, which say when speculation loses. Outputs in ``--out`` (default
``bench-out/speculative``): ``speculative.json``, ``speculative.md`` and ``speculative.png`` (speed-up against k);
``--render JSON`` rewrites the last two from a saved json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .speculative_report import SYSTEMS, aggregate, describe, environment, render

# Held-out works (kvcourse.train.VAL_WORKS: Macbeth, Twelfth Night, the Sonnets), public domain; a few lines each.
SHAKESPEARE = {
    "macbeth": "MACBETH.\nIs this a dagger which I see before me,\nThe handle toward my hand? Come, let me clutch "
               "thee.\n",
    "twelfth_night": "DUKE.\nIf music be the food of love, play on,\nGive me excess of it; that, surfeiting,\nThe "
                     "appetite may sicken, and so die.\n",
    "sonnet_116": "Let me not to the marriage of true minds\nAdmit impediments. Love is not love\nWhich alters when "
                  "it alteration finds,\n",
}
# Candidates for the repetitive text, in the order the rule takes them.
REPETITIVE_POOL = {
    "counting": "One, two, three, four, five, six, seven, eight, nine, ten, one, two, three, four, five,",
    "ha": "Ha, ha, ha, ha, ha, ha, ha, ha!",
    "words": "Words, words, words, words, words, words,",
    "double": "Double, double toil and trouble;\nFire burn and cauldron bubble.\nDouble, double toil and trouble;\n"
              "Fire burn and cauldron bubble.\n",
    "tomorrow": "Tomorrow, and tomorrow, and tomorrow, and tomorrow, and tomorrow,",
    "o": "O, O, O, O, O, O, O, O!",
}
REPEAT_NGRAM = 4
REPEAT_SHARE_MIN = 0.5  # a prompt is repetitive when most of its greedy output's 4-grams were seen before
WARM_TOKENS = 16  # the warm-up run of every setting
RULE_TOKENS = 192  # the rule reads this many greedy tokens (the loops of the bundled model take a while to start)

# hf_draft_ks: transformers' assisted generation with the draft model runs at fewer k: each of its steps calls the
# assistant's own generate(), and at k = 5..8 its rows took 3 to 7 s a prompt, 40% of a run with every k
PRESETS = {
    "full": {"new_tokens": 192, "ks": list(range(1, 9)), "hf_draft_ks": [1, 2, 4, 8], "prompts": 2, "repeats": 3,
             "cost_reps": 30},
    "quick": {"new_tokens": 24, "ks": [1, 2, 4], "hf_draft_ks": [1, 4], "prompts": 1, "repeats": 1, "cost_reps": 3},
}


def repeat_share(tokens: list[int], start: int, n: int = REPEAT_NGRAM) -> float:
    """The share of the n-grams ending at positions >= ``start`` (the output) that occurred earlier in ``tokens``
    (the prompt or the output before them). 0.0 for no such n-gram."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the n-gram size) must be an int >= 1, got {n!r}")
    seen: set[tuple[int, ...]] = set()
    hits = total = 0
    for end in range(n, len(tokens) + 1):  # the n-gram tokens[end - n:end]
        gram = tuple(tokens[end - n:end])
        if end - 1 >= start:
            total += 1
            hits += gram in seen
        seen.add(gram)
    return hits / total if total else 0.0


@dataclass(frozen=True)
class Setting:
    system: str
    k: int | None = None

    @property
    def name(self) -> str:
        return self.system if self.k is None else f"{self.system} k={self.k}"


def settings(ks: list[int], hf_draft_ks: list[int] | None = None, default_assist: bool = True) -> list[Setting]:
    """Every system once per k (``hf_draft`` at ``hf_draft_ks``, default: ``ks``), in the order they run."""
    out = [Setting("course"), Setting("hf")]
    for system in ("lookup", "draft", "hf_lookup", "hf_draft"):
        out += [Setting(system, k) for k in ((hf_draft_ks or ks) if system == "hf_draft" else ks)]
    if default_assist:
        out.append(Setting("hf_draft_default"))
    return out


@dataclass
class Models:
    hf: object  # the target, transformers
    target: object  # the same weights, kvcourse.Llama
    draft_hf: object
    draft: object
    tokenizer: object


def load(draft_name: str = "bard_draft") -> Models:
    from ..llama import Llama
    from ..models import load_model

    hf, tok = load_model(device="cpu", dtype=torch.float32)
    dhf, _ = load_model(draft_name, device="cpu", dtype=torch.float32)
    return Models(hf.eval(), Llama.from_hf(hf), dhf.eval(), Llama.from_hf(dhf), tok)


class PassCounter:
    """Counts the forward passes of a transformers model and the tokens each one reads (``input_ids`` width)."""

    def __init__(self, model):
        self.model, self.widths, self._handle = model, [], None

    def __enter__(self):
        def hook(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.widths.append(int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 0)

        self._handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _hf_kwargs(hf, ids: torch.Tensor, n: int) -> dict:
    pad = hf.generation_config.pad_token_id
    return dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                eos_token_id=None, pad_token_id=0 if pad is None else pad, use_cache=True)


def _assistant_config(draft_hf, k: int | None) -> dict:
    """Set the assistant's generation_config for a fixed k (None: transformers' defaults); return the old values."""
    gc = draft_hf.generation_config
    names = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    old = {a: getattr(gc, a, None) for a in names}
    new = dict(zip(names, (None, None, None), strict=True)) if k is None else dict(
        zip(names, (k, "constant", 0.0), strict=True))
    for a, v in new.items():
        setattr(gc, a, v)
    return old


@torch.inference_mode()
def run_setting(s: Setting, m: Models, ids: torch.Tensor, n: int, count: bool = False) -> tuple[torch.Tensor, dict]:
    """(1, T + n) tokens and what the run cost: target passes, draft passes, proposed and accepted drafts (where the
    system's counts give them; ``count`` turns on the forward hooks that count transformers' passes)."""
    from ..generate import generate
    from ..speculative import ModelDrafter, PromptLookupDrafter, speculative_generate

    t = ids.shape[1]
    if s.system == "course":
        return generate(m.target, ids, n), {"target_passes": n, "draft_passes": 0}
    if s.system in ("lookup", "draft"):
        drafter = PromptLookupDrafter() if s.system == "lookup" else ModelDrafter(m.draft, t + n + s.k)
        out = speculative_generate(m.target, ids, n, drafter, s.k)
        return out.tokens, {"target_passes": out.target_passes, "draft_passes": out.draft_passes,
                            "proposed": sum(out.proposed), "accepted": sum(out.accepted)}
    kw = _hf_kwargs(m.hf, ids, n)
    if s.system == "hf_lookup":
        kw["prompt_lookup_num_tokens"] = s.k
    elif s.system in ("hf_draft", "hf_draft_default"):
        kw["assistant_model"] = m.draft_hf
    elif s.system != "hf":
        raise ValueError(f"unknown system {s.system!r}: expected one of {', '.join(SYSTEMS)}")
    old = _assistant_config(m.draft_hf, s.k) if "assistant_model" in kw else None
    try:
        if not count:
            return m.hf.generate(ids, **kw), {}
        with PassCounter(m.hf) as tc, PassCounter(m.draft_hf) as dc:
            tokens = m.hf.generate(ids, **kw)
    finally:
        if old is not None:
            for a, v in old.items():
                setattr(m.draft_hf.generation_config, a, v)
    stats = {"target_passes": len(tc.widths), "draft_passes": len(dc.widths)}
    if s.system != "hf":
        # each target pass reads [last token, drafts] (the first: the prompt and its drafts) and emits m + 1 tokens
        stats["proposed"] = tc.widths[0] - t + sum(w - 1 for w in tc.widths[1:])
        stats["accepted"] = n - len(tc.widths)
    return tokens, stats


@torch.inference_mode()
def step_costs(m: Models, context: int, ks: list[int], reps: int) -> dict:
    """Median milliseconds, wall and CPU (this process's, ``time.process_time``), at a context of ``context``
    tokens: one target decode step, one draft decode step, one target pass over k + 1 tokens (a verification) for
    each k. Timed in turn, one of each per round. With one torch thread the CPU time is the work itself, which a
    loaded machine does not stretch as it stretches the wall time."""
    from ..cache import KVCache

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, m.target.args.vocab_size, (1, context), generator=g)
    caches = {}
    for name, model in (("target", m.target), ("draft", m.draft)):
        caches[name] = KVCache.for_model(model, 1, context + max(ks) + 2)
        model(prompt, caches[name], last_only=True)
    jobs = {"target_decode": (m.target, "target", 1), "draft_decode": (m.draft, "draft", 1),
            **{f"verify_{k + 1}": (m.target, "target", k + 1) for k in ks}}
    wall: dict[str, list[float]] = {name: [] for name in jobs}
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    for i in range(reps + 2):
        for name, (model, c, width) in jobs.items():
            x = torch.randint(0, m.target.args.vocab_size, (1, width), generator=g)
            t, ct = time.perf_counter(), time.process_time()
            model(x, caches[c])
            dt, dc = time.perf_counter() - t, time.process_time() - ct
            caches[c].crop(context)
            if i >= 2:  # two warm-up rounds
                wall[name].append(dt)
                cpu[name].append(dc)
    return {"context": context, "reps": reps, "wall_ms": {name: 1000 * _median(v) for name, v in wall.items()},
            "cpu_ms": {name: 1000 * _median(v) for name, v in cpu.items()}}


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def choose_prompts(m: Models, count: int, whole_pool: bool = True) -> tuple[dict, dict, list[dict]]:
    """(shakespeare, repetitive, pool): the first ``count`` Shakespeare prompts, and the first ``count`` pool
    prompts whose repeat share (over the target's first RULE_TOKENS greedy tokens, whatever the run's length) is
    >= REPEAT_SHARE_MIN; every candidate's share in ``pool`` (with ``whole_pool=False``, the pool is read only until
    ``count`` are chosen)."""
    from ..generate import generate

    def share(text: str) -> float:
        ids = m.tokenizer(text, return_tensors="pt").input_ids
        return repeat_share(generate(m.target, ids, RULE_TOKENS)[0].tolist(), ids.shape[1])

    fresh = {name: {"text": text, "repeat_share": share(text)} for name, text in list(SHAKESPEARE.items())[:count]}
    pool, rep = [], {}
    for name, text in REPETITIVE_POOL.items():
        if len(rep) == count and not whole_pool:
            break
        s = share(text)
        chosen = s >= REPEAT_SHARE_MIN and len(rep) < count
        pool.append({"name": name, "repeat_share": s, "chosen": chosen})
        if chosen:
            rep[name] = {"text": text, "repeat_share": s}
    return fresh, rep, pool


@dataclass
class Plan:
    new_tokens: int
    ks: list[int]
    hf_draft_ks: list[int]
    prompts: int
    repeats: int
    cost_reps: int
    preset: str = "full"
    draft: str = "bard_draft"
    default_assist: bool = True
    extra: dict = field(default_factory=dict)


def run_text(m: Models, prompts: dict, plan: Plan, say=print) -> dict:
    """Every setting on every prompt of one text: the check run, then the timed rounds."""
    from ..generate import generate

    sets = settings(plan.ks, plan.hf_draft_ks, plan.default_assist)
    per_prompt = {}
    for pname, p in prompts.items():
        ids = m.tokenizer(p["text"], return_tensors="pt").input_ids
        ref = generate(m.target, ids, plan.new_tokens)
        runs = {s.name: {"times": [], "cpu_times": []} for s in sets}
        for i in range(plan.repeats):
            for s in sets:  # round 0 also checks the tokens and counts the passes (the hooks cost microseconds)
                t, c = time.perf_counter(), time.process_time()
                tokens, stats = run_setting(s, m, ids, plan.new_tokens, count=i == 0)
                runs[s.name]["times"].append(time.perf_counter() - t)
                runs[s.name]["cpu_times"].append(time.process_time() - c)
                if i == 0:
                    runs[s.name].update(stats, equal=bool(torch.equal(tokens, ref)))
        for r in runs.values():
            r["median_s"], r["median_cpu_s"] = _median(r["times"]), _median(r["cpu_times"])
        per_prompt[pname] = {"prompt_tokens": ids.shape[1], "repeat_share": p["repeat_share"],
                             "run_repeat_share": repeat_share(ref[0].tolist(), ids.shape[1]), "runs": runs}
        say(f"  {pname}: {ids.shape[1]} prompt tokens, repeat share {p['repeat_share']:.2f}, course "
            f"{runs['course']['median_s']:.3f} s, best lookup "
            f"{min(r['median_s'] for k, r in runs.items() if k.startswith('lookup')):.3f} s")
    return {"prompts": per_prompt, "rows": aggregate(per_prompt, sets, plan.new_tokens)}


def run(plan: Plan, out_dir: Path | None, say=print) -> dict:
    from .serve import _load

    env = environment(torch.get_num_threads())
    m = load(plan.draft)
    t0 = time.perf_counter()
    fresh, rep, pool = choose_prompts(m, plan.prompts, whole_pool=plan.preset != "quick")
    say(f"repetitive pool (share of the output's {REPEAT_NGRAM}-grams seen before; chosen at >= {REPEAT_SHARE_MIN}): "
        + ", ".join(f"{p['name']} {p['repeat_share']:.2f}{'*' if p['chosen'] else ''}" for p in pool))
    warm_ids = m.tokenizer(SHAKESPEARE["macbeth"], return_tensors="pt").input_ids
    for s in settings(plan.ks, plan.hf_draft_ks, plan.default_assist):  # untimed warm-up: first calls allocate and load kernels
        run_setting(s, m, warm_ids, min(plan.new_tokens, WARM_TOKENS), count=True)
    texts = {}
    for label, prompts in (("shakespeare", fresh), ("repetitive", rep)):
        if not prompts:
            say(f"{label}: no prompt passed the rule; skipped")
            continue
        say(f"{label}:")
        texts[label] = run_text(m, prompts, plan, say)
    ctx = max(p["prompt_tokens"] for t in texts.values() for p in t["prompts"].values()) + plan.new_tokens // 2
    costs = step_costs(m, ctx, plan.ks, plan.cost_reps)
    env["load_average_at_end"] = _load()
    env["seconds"] = round(time.perf_counter() - t0, 1)
    report = {"schema": "kvcourse-speculative/1", "environment": env,
              "plan": {"preset": plan.preset, "new_tokens": plan.new_tokens, "ks": plan.ks,
                       "hf_draft_ks": plan.hf_draft_ks, "prompts": plan.prompts,
                       "repeats": plan.repeats, "cost_reps": plan.cost_reps, "draft": plan.draft,
                       "repeat_ngram": REPEAT_NGRAM, "repeat_share_min": REPEAT_SHARE_MIN,
                       "rule_tokens": RULE_TOKENS},
              "models": {"target": describe(m.hf), "draft": describe(m.draft_hf)},
              "pool": pool, "texts": texts, "costs": costs}
    if out_dir is not None:  # the measurements first: a report that fails to render loses nothing
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "speculative.json").write_text(json.dumps(report, indent=1, default=str))
    return render(report, out_dir, say)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvcourse.bench.speculative", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 + 1 prompts, 24 tokens, k = 1, 2, 4, one round")
    p.add_argument("--out", type=Path, default=Path("bench-out/speculative"),
                   help="output folder (default bench-out/speculative)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 192)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="draft lengths of ours and of prompt_lookup_num_tokens (default 1..8)")
    p.add_argument("--hf-draft-ks", type=int, nargs="+", default=None,
                   help="k of transformers' assisted generation with the draft model (default 1 2 4 8)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per text (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    p.add_argument("--cost-reps", type=int, default=None, help="rounds of the step-cost measurement (default 30)")
    p.add_argument("--draft", default="bard_draft", help="the draft model: bard_draft (default) or a model folder")
    p.add_argument("--no-default-assist", action="store_true", help="skip the transformers-defaults assisted row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (the main run: 1)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="measure nothing: write the tables, targets and plot of a saved speculative.json into --out")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    name = "quick" if args.quick else "full"
    pre = PRESETS[name]

    def pick(value, key):
        return pre[key] if value is None else value

    plan = Plan(new_tokens=pick(args.new_tokens, "new_tokens"), ks=pick(args.ks, "ks"),
                hf_draft_ks=pick(args.hf_draft_ks, "hf_draft_ks"),
                prompts=pick(args.prompts, "prompts"), repeats=pick(args.repeats, "repeats"),
                cost_reps=pick(args.cost_reps, "cost_reps"), preset=name, draft=args.draft,
                default_assist=not args.no_default_assist)
    for label, v in (("--new-tokens", plan.new_tokens), ("--prompts", plan.prompts), ("--repeats", plan.repeats),
                     ("--cost-reps", plan.cost_reps)):
        if v < 1:
            raise SystemExit(f"{label} must be >= 1, got {v}")
    if plan.new_tokens < REPEAT_NGRAM:
        raise SystemExit(f"--new-tokens must be >= {REPEAT_NGRAM} (the repeat rule reads {REPEAT_NGRAM}-grams)")
    for label, ks in (("--ks", plan.ks), ("--hf-draft-ks", plan.hf_draft_ks)):
        if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
            raise SystemExit(f"{label} must be distinct ints >= 1, got {ks}")
    if plan.prompts > min(len(SHAKESPEARE), len(REPETITIVE_POOL)):
        raise SystemExit(f"--prompts must be <= {len(SHAKESPEARE)} (the Shakespeare prompts), got {plan.prompts}")
    return plan


def main(argv: list[str] | None = None) -> int:
    """0 when every system's tokens equal the plain greedy tokens, 1 otherwise (the run is written either way)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render is not None:
        if not args.render.is_file():
            raise SystemExit(f"--render takes a speculative.json written by this benchmark; {args.render} is not a file")
        report = json.loads(args.render.read_text())
        if report.get("schema") != "kvcourse-speculative/1":
            raise SystemExit(f"--render: {args.render} is not a speculative.json (schema {report.get('schema')!r}, "
                             f"expected 'kvcourse-speculative/1')")
        report = render(report, args.out)
    else:
        report = run(make_plan(args), args.out)
    print(f"\nwritten: {args.out / 'speculative.json'}, {args.out / 'speculative.md'}, {args.out / 'speculative.png'}")
    bad = [r["setting"] for t in report["texts"].values() for r in t["rows"] if r["equal"] != r["checked"]]
    if bad:
        print(f"kvcourse.bench.speculative: tokens differ from the plain greedy tokens in {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
