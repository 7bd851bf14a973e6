"""Verification: which drafted tokens the target keeps, and the token it adds.

A drafter proposes ``k`` tokens ``d_1..d_k``. The target runs once on ``[x, d_1, .., d_k]`` (``x`` its last token)
and returns ``k + 1`` rows of logits: row ``i`` is the target's prediction for the token after ``d_i`` (row 0:
after ``x``). So draft ``d_{i+1}`` is checked against row ``i``, and row ``m`` (after the last kept draft) gives the
extra token that every step earns, the *bonus*.

- ``greedy_accept``: keep drafts while each equals the target's argmax; the bonus is the argmax of row ``m``.
  The output is the target's own greedy sequence, token for token.
- ``sample_accept``: the rejection rule of speculative sampling (Leviathan, Kalman and Matias 2023, "Fast
  Inference from Transformers via Speculative Decoding", arXiv:2211.17192, Algorithm 1; Chen et al. 2023,
  "Accelerating Large Language Model Decoding with Speculative Sampling", arXiv:2302.01318, Algorithm 2):
  accept ``d`` with probability ``min(1, p(d) / q(d))``; at the first rejection sample from
  ``norm(max(0, p - q))`` and stop; if all ``k`` are accepted, sample the bonus from ``p`` of the last row.
  Each emitted token is then distributed exactly as the target alone would sample it (Leviathan et al.,
  Appendix A.1; Chen et al., Theorem 1).
- ``expected_tokens_per_pass``: with each draft accepted independently with probability ``alpha``, a step emits
  ``(1 - alpha**(k + 1)) / (1 - alpha)`` tokens on average (Leviathan et al., Equation 1).
"""

from __future__ import annotations

import torch


def _check_draft(draft: torch.Tensor, rows: int, vocab: int, who: str) -> None:
    if not isinstance(draft, torch.Tensor) or draft.dim() != 1 or draft.dtype != torch.long:
        got = f"{tuple(draft.shape)} {draft.dtype}" if isinstance(draft, torch.Tensor) else type(draft).__name__
        raise ValueError(f"{who}: draft must be a (k,) torch.long tensor of token ids, got {got}")
    if rows != draft.shape[0] + 1:
        raise ValueError(f"{who}: {draft.shape[0]} drafted tokens need {draft.shape[0] + 1} rows of target logits "
                         f"(one per draft, and one for the bonus token), got {rows}")
    if draft.numel() and (int(draft.min()) < 0 or int(draft.max()) >= vocab):
        raise ValueError(f"{who}: draft ids must be in 0..{vocab - 1} (the target's vocabulary), got "
                         f"{draft.tolist()}")


def _check_rows(x: torch.Tensor, name: str, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who}: {name} must be a 2-D float tensor (positions, vocab), got {got}")


@torch.no_grad()
def greedy_accept(draft: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """(kept, bonus) for draft (k,) long and target_logits (k + 1, V): the number of leading drafts equal to the
    target's argmax, and the target's argmax after the last kept one."""
    _check_rows(target_logits, "target_logits", "greedy_accept")
    _check_draft(draft, target_logits.shape[0], target_logits.shape[1], "greedy_accept")
    best = target_logits.argmax(dim=-1)  # (k + 1,): the target's choice after x, d_1, .., d_k
    k = draft.shape[0]
    wrong = (best[:k] != draft).nonzero()  # positions where the target disagrees
    kept = int(wrong[0, 0]) if wrong.numel() else k
    return kept, int(best[kept])


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last axis: where the target puts more mass than the draft.

    When ``p == q`` (a draft that is never rejected) the residual is empty; ``p`` is returned then, so a caller
    that still samples gets the target's distribution."""
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape (vocab,), got {tuple(p.shape)} and {tuple(q.shape)}")
    r = (p - q).clamp_min(0)  # (V,)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


@torch.no_grad()
def sample_accept(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[int, int]:
    """(kept, next token) by speculative sampling.

    draft (k,) long: the drafted tokens; q (k, V): the draft's probabilities each was sampled from; p (k + 1, V):
    the target's probabilities after x, d_1, .., d_k. Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); on
    the first rejection the next token comes from norm(max(0, p_i - q_i)); if all are kept, from p_k.
    """
    _check_rows(p, "p", "sample_accept")
    _check_rows(q, "q", "sample_accept")
    _check_draft(draft, p.shape[0], p.shape[1], "sample_accept")
    k = draft.shape[0]
    if q.shape != (k, p.shape[1]):
        raise ValueError(f"sample_accept: q must be ({k}, {p.shape[1]}) (one draft distribution per drafted token), "
                         f"got {tuple(q.shape)}")
    idx = torch.arange(k)
    p_d, q_d = p[idx, draft], q[idx, draft]  # (k,): each draft's probability under target and draft
    u = torch.rand(k, generator=generator, dtype=p.dtype)  # (k,): one uniform per draft, drawn up front
    accept = u * q_d <= p_d  # u < p/q without dividing (q_d > 0 for a token the draft sampled)
    rejected = (~accept).nonzero()
    if not rejected.numel():
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    i = int(rejected[0, 0])
    return i, int(torch.multinomial(residual_distribution(p[i], q[i]), 1, generator=generator))


def expected_tokens_per_pass(alpha: float, k: int) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha): tokens a step emits on average (k + 1 when alpha == 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha is an acceptance rate, a number in [0, 1], got {alpha!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k (drafted tokens per step) must be an int >= 0, got {k!r}")
    if alpha == 1:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)
