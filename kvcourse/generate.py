"""Reference greedy generation with and without a KV cache, split as gpt-fast does.

- ``generate_uncached``: every step re-runs the whole sequence (O(T) work per step).
- ``prefill``: run the prompt once, filling the cache; return the last position's logits.
- ``decode_one_token``: run one new token against the cache; return its logits.
- ``generate``: prefill, then decode one token at a time.

Greedy (argmax) decoding, so outputs are deterministic and can be compared token for token
with ``transformers``' ``generate(do_sample=False)``. By default EOS is not special: exactly
``max_new_tokens`` are produced. To match, call ``generate(..., eos_token_id=None)`` (neither
stop at EOS nor forbid it); ``min_new_tokens`` alone would *forbid* EOS, so wherever EOS is the
argmax ``transformers`` would pick the runner-up and the two would part ways.

``generate`` and ``generate_uncached`` take a ``kvcourse.llama.Llama`` or the ``transformers``
``LlamaForCausalLM`` that ``load_model`` returns (wrapped once with ``Llama.from_hf``, as
``FastGenerator`` does), and check their arguments the way ``FastGenerator`` does
(``check_generate_args``).

Batches of prompts of different lengths: left-pad them and pass ``attention_mask`` (B, T), 1 for a
real token and 0 for padding, as to ``transformers``' ``generate``; every generated token is real,
so the mask grows by a column of ones each step. With ``eos_token_id`` set, a row that has produced
EOS keeps emitting ``pad_token_id`` and the loop stops once every row has, as ``transformers`` does;
the output is then shorter than ``T + max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache import CacheOverflowError, KVCache, _host_reads_allowed
from .llama import Llama, check_attention_mask
from .window import check_window_cache


def check_generate_args(input_ids, max_new_tokens, device: torch.device | None = None) -> None:
    """Raise a clear ``ValueError`` for anything ``generate`` cannot use: what was expected, what came.

    input_ids: a (batch, seq) ``torch.long`` tensor with at least one row and one token per row;
    max_new_tokens: an int >= 0 (not a bool, not 2.5); device: where the model is, if known.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        hint = "; add a batch axis: input_ids[None]" if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1 else ""
        raise ValueError(f"input_ids must be a (batch, seq) tensor of token ids (torch.long), got {got}{hint}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if device is not None and input_ids.device != device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}")


def normalize_eos(eos_token_id, vocab_size: int | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor | None:
    """``eos_token_id`` as a 1-D ``torch.long`` tensor of ids, or ``None`` (no end-of-sequence handling).

    Accepts what ``transformers``' ``GenerationConfig.eos_token_id`` may be: ``None``, an int, or a list (Llama 3.x
    Instruct lists two, ``<|end_of_text|>`` and ``<|eot_id|>``); also a tuple or an integer tensor. Anything else
    (a bool, a float, a string, an empty list, a negative id, an id >= ``vocab_size``) raises a ``ValueError``
    naming what was expected and what came. Test membership with ``torch.isin(next_id, eos)``, as
    ``transformers``' ``EosTokenCriteria`` does.
    """
    if eos_token_id is None:
        return None
    expected = "eos_token_id must be None, an int, or a non-empty list/tuple/tensor of int token ids"
    if isinstance(eos_token_id, torch.Tensor):
        if eos_token_id.is_floating_point() or eos_token_id.is_complex() or eos_token_id.dtype == torch.bool:
            raise ValueError(f"{expected}, got a {eos_token_id.dtype} tensor")
        ids = eos_token_id.detach().reshape(-1).to(torch.long)
    elif isinstance(eos_token_id, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_token_id):
            raise ValueError(f"{expected}, got {eos_token_id!r}")
        ids = torch.tensor(list(eos_token_id), dtype=torch.long)
    elif isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
        ids = torch.tensor([eos_token_id], dtype=torch.long)
    else:
        raise ValueError(f"{expected}, got {type(eos_token_id).__name__} {eos_token_id!r}")
    if ids.numel() == 0:
        raise ValueError(f"{expected}, got an empty {type(eos_token_id).__name__}")
    if int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size):
        top = f"0..{vocab_size - 1}" if vocab_size is not None else ">= 0"
        raise ValueError(f"eos_token_id must be token ids in {top}, got {ids.tolist()}")
    return ids.to(device) if device is not None else ids


def check_token_id(name: str, token_id, vocab_size: int | None = None) -> int:
    """``token_id`` (e.g. ``pad_token_id``) as an int in ``0..vocab_size - 1``, or a clear ``ValueError``.

    A tokenizer without a padding token gives ``pad_token_id = None``: the message says to set one
    (``tokenizer.pad_token = tokenizer.eos_token`` is the usual choice).
    """
    if token_id is None:
        raise ValueError(f"{name} is None: an int token id is needed here (a tokenizer without a padding token "
                         f"gives None; set one, e.g. tokenizer.pad_token = tokenizer.eos_token)")
    if isinstance(token_id, torch.Tensor) and token_id.numel() == 1 and not token_id.is_floating_point():
        token_id = int(token_id)
    if isinstance(token_id, bool) or not isinstance(token_id, int):
        raise ValueError(f"{name} must be an int token id, got {type(token_id).__name__} {token_id!r}")
    if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
        top = f"0..{vocab_size - 1}" if vocab_size is not None else ">= 0"
        raise ValueError(f"{name} must be a token id in {top}, got {token_id}")
    return token_id


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Refuse a right-padded batch for generation: every row's last column must be a real token (1).

    With padding on the right the next token would follow a pad, not the prompt (``transformers`` warns
    "A decoder-only architecture is being used, but right-padding was detected!"; the course refuses).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a (batch, seq) tensor of 0/1, got {got}")
    if not attention_mask.bool()[:, -1].all():
        rows = (~attention_mask.bool()[:, -1]).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask ends in padding in rows {rows}: pad on the left for generation "
                         f"(pad_prompts(..., side='left')), so every row's last token is real and the next "
                         f"token follows it")


def _is_transformers_model(model) -> bool:
    return not isinstance(model, Llama) and hasattr(getattr(model, "config", None), "model_type")


def as_llama(model):
    """A ``transformers`` model becomes ``Llama.from_hf(model)`` (same weights, no copy; a clear
    ``TypeError`` if it is not a Llama); a ``kvcourse`` ``Llama`` or any other callable is returned as is."""
    return Llama.from_hf(model) if _is_transformers_model(model) else model


def _refuse_transformers_model(model, fn: str) -> None:
    if _is_transformers_model(model):
        raise TypeError(
            f"{fn} takes the course's Llama, got a transformers {type(model).__name__}: wrap it once, outside "
            f"the loop, with model = kvcourse.Llama.from_hf(hf_model) (same weights, no copy)"
        )


def _vocab_size(model) -> int | None:
    """The model's vocabulary size (``Llama.args`` or a ``transformers`` config), ``None`` if unknown."""
    for holder in (getattr(model, "args", None), getattr(model, "config", None)):
        v = getattr(holder, "vocab_size", None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _model_device(model) -> torch.device | None:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else None


def _check_ids_in_vocab(input_ids: torch.Tensor, vocab_size: int | None) -> None:
    if not _host_reads_allowed(input_ids):  # compiling, capturing, or a meta tensor: no values to read
        return
    if vocab_size is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must be token ids in 0..{vocab_size - 1} (the model's vocab_size), got ids "
                         f"from {int(input_ids.min())} to {int(input_ids.max())}")


def _cache_dtype(cache) -> torch.dtype | None:
    dtype = getattr(cache, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    keys = getattr(cache, "keys", None)
    first = keys[0] if isinstance(keys, list) and keys else None
    return first.dtype if isinstance(first, torch.Tensor) else None


def check_model_inputs(model, input_ids: torch.Tensor, cache=None) -> None:
    """What ``prefill``, ``decode_one_token`` and ``generate`` check before the first forward pass, so that a refused
    call leaves the cache as it was: input_ids a (B, T) long tensor on the model's device with ids below its
    ``vocab_size``; a cache in the model's dtype; a ``SlidingWindowCache`` only for a model with a sliding window
    no larger than the ring (``kvcourse.window.check_window_cache``)."""
    check_generate_args(input_ids, 0, _model_device(model))
    _check_ids_in_vocab(input_ids, _vocab_size(model))
    if cache is None:
        return
    dtype, model_dtype = _cache_dtype(cache), getattr(model, "dtype", None)
    if isinstance(model_dtype, torch.dtype) and dtype is not None and dtype != model_dtype:
        raise ValueError(f"the cache holds {dtype} but the model computes in {model_dtype}: allocate the cache "
                         f"with the model's dtype, e.g. KVCache.for_model(model, ...)")
    check_window_cache(model, cache)


@torch.inference_mode()
def generate_uncached(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """(B, T) -> (B, T + max_new_tokens), recomputing the full forward pass each step."""
    model = as_llama(model)
    check_generate_args(input_ids, max_new_tokens, _model_device(model))
    _check_ids_in_vocab(input_ids, _vocab_size(model))
    if max_new_tokens == 0:
        return input_ids.clone()
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(ids)  # (B, T_so_far, V): every position, every step
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fill the cache with the prompt's keys/values; return the last position's logits (B, V).

    attention_mask: ``None`` or (B, T) of 0/1 for a left-padded prompt batch.
    """
    _refuse_transformers_model(model, "prefill")
    check_model_inputs(model, input_ids, cache)
    if attention_mask is None:
        return model(input_ids, cache, last_only=True)[:, -1]
    return model(input_ids, cache, attention_mask=attention_mask, last_only=True)[:, -1]


@torch.inference_mode()
def decode_one_token(model, token: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One step: token (B, 1) at position cache.get_seq_length(); returns logits (B, V).

    attention_mask: ``None`` or (B, cached + 1) of 0/1, the padded batch's mask including this token.
    """
    _refuse_transformers_model(model, "decode_one_token")
    check_model_inputs(model, token, cache)
    if attention_mask is None:
        return model(token, cache, last_only=True)[:, -1]
    return model(token, cache, attention_mask=attention_mask, last_only=True)[:, -1]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, cache=None, *,
             attention_mask: torch.Tensor | None = None,
             eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
             pad_token_id: int | None = None) -> torch.Tensor:
    """(B, T) -> (B, T + max_new_tokens) with a KV cache (shorter if every row stops at EOS).

    cache: ``None`` for a new ``KVCache`` sized for this call, or a cache to ``reset()`` and reuse
    (a new prompt starts from an empty cache, as notebook 04 teaches).
    attention_mask: ``None`` or (B, T) of 0/1 for a left-padded batch.
    eos_token_id: ``None`` (exactly max_new_tokens), or the id, or a list of ids (Llama 3.x Instruct's
    ``generation_config.eos_token_id`` is a list), after any of which a row is finished (``normalize_eos``);
    finished rows then get ``pad_token_id`` (required with eos_token_id) and generation stops when all are.
    """
    model = as_llama(model)
    check_generate_args(input_ids, max_new_tokens, _model_device(model))
    b, t = input_ids.shape
    if attention_mask is not None:
        check_attention_mask(attention_mask, b, t, input_ids.device)
        check_left_padded(attention_mask)
    vocab_size = _vocab_size(model)
    check_model_inputs(model, input_ids, cache)
    eos = normalize_eos(eos_token_id, vocab_size, input_ids.device)
    if eos is not None:
        if pad_token_id is None:
            raise ValueError("eos_token_id needs a pad_token_id: finished rows are filled with it (as in "
                             "transformers); got pad_token_id=None")
        pad_token_id = check_token_id("pad_token_id", pad_token_id, vocab_size)
    if max_new_tokens == 0:
        return input_ids.clone()
    if cache is None:
        cache = KVCache.for_model(model, b, t + max_new_tokens)
    else:
        capacity = getattr(cache, "max_seq_len", None)
        if isinstance(capacity, int) and capacity < t + max_new_tokens - 1:  # the last token is never written
            raise CacheOverflowError(f"the cache holds max_seq_len={capacity} tokens, but a prompt of {t} and "
                                     f"{max_new_tokens} new tokens need {t + max_new_tokens - 1}: allocate a larger one")
        cache.reset()
    mask = attention_mask
    finished = torch.zeros(b, 1, dtype=torch.bool, device=input_ids.device)  # (B, 1)
    out = [input_ids]
    for step in range(max_new_tokens):
        if step == 0:
            logits = prefill(model, input_ids, cache, mask)  # (B, V)
        else:
            logits = decode_one_token(model, out[-1], cache, mask)  # (B, V)
        next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        if eos is not None:
            next_id = next_id.masked_fill(finished, pad_token_id)  # a finished row keeps emitting padding
            finished = finished | torch.isin(next_id, eos)  # any of the EOS ids ends the row
        out.append(next_id)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(next_id, dtype=mask.dtype)], dim=1)  # (B, T + step + 1)
        if eos is not None and finished.all():
            break
    return torch.cat(out, dim=1)
