"""The fast generators' argument checks: the ones ``kvcourse.generate`` makes, imported, not copied.

Every check runs before anything is written, so a refused call changes nothing. The token-id range is
read from the device once per call (one host read), never inside the decode loop.
"""

from __future__ import annotations

import torch

from ..generate import check_generate_args, check_left_padded, check_token_id, normalize_eos
from ..llama import check_attention_mask


def check_count(name: str, value, low: int, what: str = "an int") -> None:
    """A clear ValueError unless ``value`` is an int (not a bool, not 2.5) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be {what} >= {low}, got {value!r}")


def check_inputs(input_ids, max_new_tokens, device: torch.device, vocab_size: int, attention_mask=None,
                 eos_token_id=None, pad_token_id=None) -> tuple[torch.Tensor | None, int | None]:
    """``generate``'s arguments: ids (B, T) in 0..vocab_size-1 on ``device``, a count, a left-padded 0/1 mask,
    EOS ids (``normalize_eos``) with a pad id. Returns (EOS ids as a 1-D tensor or None, pad id)."""
    check_generate_args(input_ids, max_new_tokens, device)
    b, t = input_ids.shape
    lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one host read, before anything runs
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must be token ids in 0..{vocab_size - 1} (the model's vocab_size), got "
                         f"ids from {lo} to {hi}")
    if attention_mask is not None:
        check_attention_mask(attention_mask, b, t, device)
        check_left_padded(attention_mask)  # the course's one check: right padding gives wrong tokens
    eos = normalize_eos(eos_token_id, vocab_size, device)
    if eos is not None:
        if pad_token_id is None:
            raise ValueError("eos_token_id needs a pad_token_id: finished rows are filled with it (as in "
                             "transformers); got pad_token_id=None")
        pad_token_id = check_token_id("pad_token_id", pad_token_id, vocab_size)
    return eos, pad_token_id
