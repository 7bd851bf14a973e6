"""Helpers for notebook 06, batched generation: padding, what ``transformers`` computes for a padded batch, its
sampling filters, a diagnosis of generations that differ, per-call timing, and the picture of a padded batch.

- ``pad_prompts``: token-id lists of different lengths -> ``(input_ids, attention_mask)``, padded on the left
  (or the right, to show why not), as a ``transformers`` tokenizer with ``padding_side="left"`` does.
- ``transformers_mask_and_positions``: the ``position_ids`` and the 4D boolean attention mask that
  ``transformers``' ``generate`` actually hands its model, step by step, read with forward pre-hooks (no private
  API, so it keeps working when ``masking_utils.sdpa_mask`` or ``create_causal_mask`` change their signatures,
  as they did within 5.x).
- ``transformers_filter``: ``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``, each added
  only when it changes something, in the order and under the conditions of
  ``GenerationMixin._get_logits_processor`` (``transformers/generation/utils.py``).
- ``generation_mismatch``: why two generations of a padded batch with end-of-sequence handling differ, in words;
  ``eos_rule``: the end-of-sequence rule of ``generate`` applied to rows generated without stopping.
- ``CallTimer``: wraps a model and records the wall time of every forward call (prefill, then decode steps).
- ``plot_padded_batch``: a padded batch as a grid of tokens with their positions, and each row's attention mask.

References: ``transformers`` 5.x ``generation/utils.py`` (``_prepare_position_ids_for_generation``,
``_update_model_kwargs_for_generation``, the sampling loop ``_sample``), ``masking_utils.py`` (``sdpa_mask``,
``padding_mask_function``), ``generation/logits_process.py`` (the three warpers); Holtzman et al. 2020,
"The Curious Case of Neural Text Degeneration" (top-p, nucleus sampling), arXiv:1904.09751; Fan et al. 2018,
"Hierarchical Neural Story Generation" (top-k sampling), arXiv:1805.04833.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .devices import synchronize
from .generate import _check_ids_in_vocab, _vocab_size, check_generate_args, check_token_id, normalize_eos

# transformers' defaults for generate(do_sample=True) when neither the model's generation_config nor the call sets
# them: GenerationConfig._get_default_generation_params() (transformers 5.25, generation/configuration_utils.py).
GENERATE_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int, *, side: str = "left",
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to the longest: ``input_ids`` (B, T) ``torch.long`` and ``attention_mask`` (B, T) of 0/1.

    ``side="left"`` puts the padding before each prompt (for generation: every row ends in its last real token);
    ``side="right"`` after it (fine for a classifier, wrong for generation). 1 marks a real token, 0 padding.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    pad_token_id = check_token_id("pad_token_id", pad_token_id)
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("pad_prompts needs at least one prompt, got an empty list")
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"pad_prompts got an empty prompt at index {empty}: every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def transformers_mask_and_positions(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int = 1,
                                    pad_token_id: int | None = None,
                                    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Run ``hf_model.generate`` for ``steps`` greedy tokens and return, for each forward call (prefill, then
    each decode step), ``(attention_mask_2d, position_ids, mask_4d)`` as ``transformers`` handed them to the model.

    ``attention_mask_2d`` (B, cached + new) is ``attention_mask`` grown by a column of ones per generated token, as
    ``_update_model_kwargs_for_generation`` grows it (checked against what the model received, when it received
    one: ``generate`` drops an all-ones mask). ``position_ids`` (B, new) are the positions the model received, and
    ``mask_4d`` (B, 1, new, cached + new) the mask the first attention layer received, as booleans (True: may
    attend); an additive float mask (the eager attention) is turned into booleans (0 -> True). Where
    ``transformers`` passed no mask at all (no padding), SDPA applies plain causality itself (``is_causal``), and
    that causal mask is returned. Two forward pre-hooks read them; nothing else is changed.

    ``pad_token_id``: passed on to ``generate``; by default the model's ``generation_config.pad_token_id``, else
    its ``config.pad_token_id`` (``None`` if neither has one: with ``eos_token_id=None`` no row finishes, so
    ``generate`` never emits padding and needs none).
    """
    from .llama import check_attention_mask

    if not hasattr(getattr(hf_model, "config", None), "model_type") or not hasattr(hf_model, "generate"):
        raise TypeError(f"transformers_mask_and_positions takes a transformers model (e.g. load_model()'s "
                        f"LlamaForCausalLM), got {type(hf_model).__name__}: the course's Llama has no generate")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 (tokens to generate), got {steps!r}")
    check_generate_args(input_ids, steps, getattr(hf_model, "device", None))
    check_attention_mask(attention_mask, *input_ids.shape, input_ids.device)
    vocab_size = _vocab_size(hf_model)
    _check_ids_in_vocab(input_ids, vocab_size)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(hf_model, "generation_config", None), "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(hf_model.config, "pad_token_id", None)
    if pad_token_id is not None:
        pad_token_id = check_token_id("pad_token_id", pad_token_id, vocab_size)
    inner = hf_model.model  # LlamaModel: receives attention_mask and position_ids
    first_attn = inner.layers[0].self_attn
    calls: list[list] = []

    def on_model(module, args, kwargs):
        calls.append([kwargs.get("attention_mask"), kwargs.get("position_ids"), None])

    def on_attention(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dtype != torch.bool:
            mask = mask == 0
        calls[-1][2] = mask

    hooks = [inner.register_forward_pre_hook(on_model, with_kwargs=True),
             first_attn.register_forward_pre_hook(on_attention, with_kwargs=True)]
    try:
        with torch.inference_mode():
            hf_model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=steps,
                              min_new_tokens=steps, eos_token_id=None, pad_token_id=pad_token_id)
    finally:
        for h in hooks:
            h.remove()
    out = []
    b = attention_mask.shape[0]
    for step, (received, positions, mask_4d) in enumerate(calls):
        mask_2d = torch.cat([attention_mask, attention_mask.new_ones(b, step)], dim=1)  # (B, T + step)
        if received is not None and not torch.equal(received.to(mask_2d.dtype), mask_2d):
            raise RuntimeError(f"transformers' generate passed attention mask {received.tolist()} at call {step}, "
                               f"expected {mask_2d.tolist()}")
        if positions is None:  # transformers 5.x passes them from generate; kept for safety
            raise RuntimeError("transformers' generate did not pass position_ids to the model")
        q_len, k_len = positions.shape[1], mask_2d.shape[1]
        if mask_4d is None:  # no padding: SDPA's own causal mask
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=mask_2d.device).tril(diagonal=k_len - q_len)
            mask_4d = causal.expand(b, 1, q_len, k_len)
        out.append((mask_2d, positions.expand(b, q_len), mask_4d))
    return out


def transformers_filter(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0) -> torch.Tensor:
    """``transformers``' own sampling filters on ``logits`` (B, V), as ``generate(do_sample=True, ...)`` applies them
    for the ``temperature``, ``top_k`` and ``top_p`` given.

    ``GenerationMixin._get_logits_processor`` adds ``TemperatureLogitsWarper`` when ``temperature != 1.0``, then
    ``TopKLogitsWarper`` when ``top_k != 0``, then ``TopPLogitsWarper`` when ``top_p < 1.0``, each with
    ``min_tokens_to_keep=1`` (no beam search) and filter value ``-inf``; they run in that order.

    The defaults here filter NOTHING (``top_k=0``): they are not ``generate(do_sample=True)``'s, which, unless the
    model's ``generation_config`` or the call says otherwise, keeps the ``top_k=50`` most likely tokens. For
    exactly what ``generate(do_sample=True)`` does with its defaults, pass ``**GENERATE_SAMPLING_DEFAULTS``.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a (batch, vocab) float tensor, got {got}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 (greedy decoding is do_sample=False, not temperature 0),"
                         f" got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be a number in 0..1 (1: no top-p), got {top_p!r}")
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    dummy_ids = torch.zeros((logits.shape[0], 1), dtype=torch.long, device=logits.device)  # unused by these three
    return warpers(dummy_ids, logits.float())


def generation_mismatch(got: torch.Tensor, ref: torch.Tensor, prompt_len: int,
                        eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
                        pad_token_id: int | None = None) -> str | None:
    """``None`` if ``got`` equals ``ref`` (both (B, prompt_len + new)); else what differs, in words.

    Knows the usual mistakes of end-of-sequence handling: a loop that stops when the first row finishes, or goes
    on after every row has, and a finished row that keeps generating instead of emitting ``pad_token_id``.
    ``eos_token_id`` may be one id or a list of them (``normalize_eos``). A ``ref`` that is not a (B, T) tensor of
    token ids is the caller's mistake, not the learner's: it raises.
    """
    if not isinstance(ref, torch.Tensor) or ref.dim() != 2:
        got_ref = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise ValueError(f"ref must be transformers' output, a (batch, prompt_len + new) tensor, got {got_ref}")
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 0 <= prompt_len <= ref.shape[1]:
        raise ValueError(f"prompt_len must be an int in 0..{ref.shape[1]} (the padded prompt's width), "
                         f"got {prompt_len!r}")
    eos = normalize_eos(eos_token_id)
    if not isinstance(got, torch.Tensor) or got.dim() != 2 or got.shape[0] != ref.shape[0]:
        return (f"expected a (B, T + new) tensor with B = {ref.shape[0]}, got "
                f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
    got, ref = got.cpu(), ref.cpu()
    n_got, n_ref = got.shape[1] - prompt_len, ref.shape[1] - prompt_len
    if n_got < 0:
        return f"returned {got.shape[1]} tokens per row, fewer than the {prompt_len} of the padded prompt"
    if not torch.equal(got[:, :prompt_len], ref[:, :prompt_len]):
        return "the first T columns must be the padded prompt, unchanged (input_ids as given)"
    new_ref = ref[:, prompt_len:]
    finished_at = {}
    if eos is not None:
        for r in range(ref.shape[0]):
            hits = torch.isin(new_ref[r], eos).nonzero()
            if len(hits):
                finished_at[r] = int(hits[0])
    m = min(n_got, n_ref)
    diff = (got[:, prompt_len:prompt_len + m] != new_ref[:, :m]).nonzero()
    if len(diff):
        r, j = (int(x) for x in diff[0])
        if r in finished_at and j > finished_at[r] and int(new_ref[r, j]) == pad_token_id:
            return (f"row {r} produced the end-of-sequence token {int(new_ref[r, finished_at[r]])} at new token "
                    f"{finished_at[r]}; "
                    f"after that transformers emits pad_token_id={pad_token_id} in that row, but at new token {j} "
                    f"yours emitted {int(got[r, prompt_len + j])}: a finished row keeps emitting pad_token_id")
        return (f"new token {j} of row {r} differs: transformers chose {int(new_ref[r, j])}, yours "
                f"{int(got[r, prompt_len + j])}")
    if n_got > n_ref:
        if eos is not None and len(finished_at) == ref.shape[0]:
            return (f"transformers stopped after {n_ref} new tokens, when every row had produced the end-of-sequence "
                    f"token {_ids(eos)}; yours went on to {n_got}: stop as soon as every row is finished")
        return f"{n_got} new tokens, transformers produced {n_ref}"
    if n_got < n_ref:
        unfinished = [r for r in range(ref.shape[0]) if finished_at.get(r, n_ref) >= n_got]
        if eos is not None and finished_at and unfinished:
            return (f"yours stopped after {n_got} new tokens, but row {unfinished[0]} had not produced the "
                    f"end-of-sequence token yet (transformers went on to {n_ref}): stop only when EVERY row is "
                    f"finished, not when the first one is")
        return f"only {n_got} new tokens, transformers produced {n_ref}"
    return None


def _ids(eos: torch.Tensor) -> str:
    return str(int(eos[0])) if eos.numel() == 1 else str(eos.tolist())


def eos_rule(tokens: torch.Tensor, prompt_len: int, eos_token_id: int | Sequence[int] | torch.Tensor,
             pad_token_id: int) -> torch.Tensor:
    """What ``generate`` with ``eos_token_id`` returns, made from the same rows generated without stopping.

    ``tokens`` (B, prompt_len + N) from a run that ignores EOS. As in ``GenerationMixin._sample``: after a row's
    first new ``eos_token_id`` it gets ``pad_token_id``, and the output ends at the step where every row has
    finished (or after the N tokens). An EOS inside the prompt does not count. ``eos_token_id`` may be a list of
    ids, any of which finishes a row (``normalize_eos``, as ``transformers``' ``EosTokenCriteria``).
    """
    check_generate_args(tokens, 0)
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 0 <= prompt_len <= tokens.shape[1]:
        raise ValueError(f"prompt_len must be an int in 0..{tokens.shape[1]} (the padded prompt's width), "
                         f"got {prompt_len!r}")
    if eos_token_id is None:
        raise ValueError("eos_rule needs an eos_token_id (an int or a list of ints), got None: without one, "
                         "generate stops only at max_new_tokens")
    eos = normalize_eos(eos_token_id, device=tokens.device)
    pad_token_id = check_token_id("pad_token_id", pad_token_id)
    new = tokens[:, prompt_len:].clone()
    finished = torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
    steps = new.shape[1]
    for j in range(new.shape[1]):
        new[:, j] = torch.where(finished, torch.full_like(new[:, j], pad_token_id), new[:, j])
        finished |= torch.isin(new[:, j], eos)
        if bool(finished.all()):
            steps = j + 1
            break
    return torch.cat([tokens[:, :prompt_len], new[:, :steps]], dim=1)


def _device_of(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


class CallTimer:
    """Wraps a model; records ``(new tokens, seconds)`` for every forward call, the device synchronised.

    With a generator that prefills once and then decodes one token per call, ``calls[0]`` is the prefill (the time
    to first token) and the rest are decode steps. ``device``: the one to synchronise, by default the model's own
    (``model.device``, else its first parameter's), so that a GPU model's queued work is waited for.
    """

    def __init__(self, model, device: torch.device | str | None = None):
        if not callable(model):
            raise TypeError(f"CallTimer wraps a model (a callable taking input_ids), got {type(model).__name__} "
                            f"{model!r}")
        device = _device_of(model) if device is None else device
        synchronize(device)  # an unknown device fails here, not in the middle of a timed run
        self.model, self.device = model, device
        self.calls: list[tuple[int, float]] = []

    def __call__(self, input_ids, *args, **kwargs):
        check_generate_args(input_ids, 0)
        _check_ids_in_vocab(input_ids, _vocab_size(self.model))
        synchronize(self.device)
        t0 = time.perf_counter()
        out = self.model(input_ids, *args, **kwargs)
        synchronize(self.device)
        self.calls.append((int(input_ids.shape[-1]), time.perf_counter() - t0))
        return out

    forward = __call__

    def __getattr__(self, name):
        return getattr(self.model, name)


def plot_padded_batch(tokens: Sequence[Sequence[str]], attention_mask: torch.Tensor,
                      positions: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                      title: str = "a left-padded batch"):
    """Draw a padded batch: a grid of tokens (grey: padding) with each token's position under it, and, if ``mask``
    (B, 1, T, T) is given, each row's attention mask (dark: the query may look at that key). Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be (batch, seq), got {got}")
    shape = (len(tokens), max((len(row) for row in tokens), default=0))
    if any(len(row) != shape[1] for row in tokens) or tuple(attention_mask.shape) != shape:
        raise ValueError(f"tokens (rows of equal length, {shape}) and attention_mask {tuple(attention_mask.shape)} "
                         f"must have the same (batch, seq) shape")
    am = attention_mask.detach().cpu().bool()
    b, t = am.shape
    n_masks = b if mask is not None else 0
    fig, axes = plt.subplots(1, 1 + n_masks, figsize=(min(0.8 * t, 12) + 2.6 * n_masks, 0.75 * b + 1.8),
                             gridspec_kw={"width_ratios": [max(t / 4, 2)] + [1] * n_masks}, squeeze=False)
    ax = axes[0, 0]
    ax.imshow(am.float().numpy(), cmap=ListedColormap(["#e4e4e4", "#bcd7ee"]), vmin=0, vmax=1, aspect="auto")
    for i in range(b):
        for j in range(t):
            label = tokens[i][j] if am[i, j] else "pad"
            if positions is not None:
                label += f"\n{int(positions[i, j])}"
            ax.text(j, i, label, ha="center", va="center", fontsize=8, color="black" if am[i, j] else "gray")
    ax.set_xticks(range(t))
    ax.set_yticks(range(b))
    ax.set_xlabel("slot (left to right)" + (": token, then its position" if positions is not None else ""))
    ax.set_ylabel("row")
    ax.set_title(title)
    for i in range(n_masks):
        m = mask[i, 0].detach().cpu().float().numpy()
        axes[0, i + 1].imshow(m, cmap="Greys", vmin=0, vmax=1.3)
        axes[0, i + 1].set_title(f"row {i}: mask", fontsize=9)
        axes[0, i + 1].set_xlabel("key slot", fontsize=8)
        axes[0, i + 1].set_ylabel("query slot", fontsize=8)
        axes[0, i + 1].tick_params(labelsize=6)
    fig.tight_layout()
    return fig
