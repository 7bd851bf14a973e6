"""Speculative decoding (notebook 10): drafters, verification, and the draft-and-verify loop.

- ``verify.py``: greedy acceptance, the speculative-sampling rejection rule, the expected tokens per pass;
- ``drafters.py``: prompt lookup (no model) and a small draft model with its own rewinding cache;
- ``decode.py``: ``speculative_generate``, which crops the target's cache after every verification.
"""

from .decode import SpeculativeOutput, speculative_generate
from .drafters import ModelDrafter, PromptLookupDrafter
from .verify import expected_tokens_per_pass, greedy_accept, residual_distribution, sample_accept

__all__ = [
    "ModelDrafter", "PromptLookupDrafter", "SpeculativeOutput", "expected_tokens_per_pass", "greedy_accept",
    "residual_distribution", "sample_accept", "speculative_generate",
]
