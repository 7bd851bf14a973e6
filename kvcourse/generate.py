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

import torch

from .cache import KVCache
from .llama import Llama, check_attention_mask


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


def _model_device(model) -> torch.device | None:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else None


@torch.inference_mode()
def generate_uncached(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """(B, T) -> (B, T + max_new_tokens), recomputing the full forward pass each step."""
    model = as_llama(model)
    check_generate_args(input_ids, max_new_tokens, _model_device(model))
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
    if attention_mask is None:
        return model(input_ids, cache, last_only=True)[:, -1]
    return model(input_ids, cache, attention_mask=attention_mask, last_only=True)[:, -1]


@torch.inference_mode()
def decode_one_token(model, token: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One step: token (B, 1) at position cache.get_seq_length(); returns logits (B, V).

    attention_mask: ``None`` or (B, cached + 1) of 0/1, the padded batch's mask including this token.
    """
    _refuse_transformers_model(model, "decode_one_token")
    if attention_mask is None:
        return model(token, cache, last_only=True)[:, -1]
    return model(token, cache, attention_mask=attention_mask, last_only=True)[:, -1]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, cache=None, *,
             attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
             pad_token_id: int | None = None) -> torch.Tensor:
    """(B, T) -> (B, T + max_new_tokens) with a KV cache (shorter if every row stops at EOS).

    cache: ``None`` for a new ``KVCache`` sized for this call, or a cache to ``reset()`` and reuse
    (a new prompt starts from an empty cache, as notebook 04 teaches).
    attention_mask: ``None`` or (B, T) of 0/1 for a left-padded batch.
    eos_token_id: ``None`` (exactly max_new_tokens) or the id after which a row is finished; finished
    rows then get ``pad_token_id`` (required with eos_token_id) and generation stops when all are.
    """
    model = as_llama(model)
    check_generate_args(input_ids, max_new_tokens, _model_device(model))
    b, t = input_ids.shape
    if attention_mask is not None:
        check_attention_mask(attention_mask, b, t, input_ids.device)
        if not attention_mask.bool()[:, -1].all():
            raise ValueError("attention_mask ends in padding in some row: pad on the left for generation, "
                             "so every row's last token is real and the next token follows it")
    if eos_token_id is not None and pad_token_id is None:
        raise ValueError("eos_token_id needs a pad_token_id: finished rows are filled with it (as in transformers)")
    if max_new_tokens == 0:
        return input_ids.clone()
    if cache is None:
        cache = KVCache.for_model(model, b, t + max_new_tokens)
    else:
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
        if eos_token_id is not None:
            next_id = next_id.masked_fill(finished, pad_token_id)  # a finished row keeps emitting padding
            finished = finished | (next_id == eos_token_id)
        out.append(next_id)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(next_id, dtype=mask.dtype)], dim=1)  # (B, T + step + 1)
        if eos_token_id is not None and finished.all():
            break
    return torch.cat(out, dim=1)
