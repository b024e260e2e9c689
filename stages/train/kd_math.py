"""Per-chunk math shared by the cached distillation losses.

Conventions. A chunk has n positions. `s` is the (n, V) student logits chunk in its own dtype;
`ids` is (n, K) int64 cached teacher ids, -1 at padding; `t_lp` is (n, K) teacher log-probs
(log-softmax at temperature 1 over the full teacher vocabulary). Every row has at least one
valid id and padding, if any, comes after the valid ids (the cache's layout), so column 0 is
always a real id.

A distribution over C classes is passed around as log-probs (n, C) plus a bool mask (n, C).
Masked classes have probability exactly 0 on both sides, and their log-prob slot holds a finite
placeholder (0). Gradients never touch the placeholders, which is what keeps `-inf` (and the NaN
that `0 * inf` makes in backward) out of the losses when a class is empty, e.g. the tail bucket
of a cache that holds the whole vocabulary.
"""

import math

import torch

__all__ = [
    "TAIL_FLOOR", "compute_dtype", "split_padding", "masked_logsumexp", "masked_log_softmax",
    "teacher_tail_mass", "uncovered_logprob", "teacher_top1",
    "top1_agreement", "is_row_max", "forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
]

# Smallest teacher tail mass used when the cache does not cover the vocabulary. The stored mass is
# 1 - sum(p_topK) in fp32 and can round to 0 or below; a zero tail against a student with mass
# there would make reverse KL infinite.
TAIL_FLOOR = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 logits, fp64 for fp64 (so gradcheck sees fp64 throughout)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_padding(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (safe_ids, valid): padding replaced by the row's first id (a real id), and the mask.

    Args:
        ids: (n, K) integer ids, -1 at padding.

    Returns:
        safe_ids: (n, K) int64, usable with gather/scatter.
        valid: (n, K) bool.
    """
    ids = ids.long()
    valid = ids >= 0
    return torch.where(valid, ids, ids[:, :1]), valid


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over the masked-in entries of each row, safe for rows with none.

    Args:
        x: (n, C) float.
        mask: (n, C) bool.

    Returns:
        lse: (n,) float; a finite placeholder where the row is empty.
        nonempty: (n,) bool.
    """
    nonempty = mask.any(-1)
    # An empty row keeps column 0 at 0 instead of all -inf, whose logsumexp backward is NaN.
    keep = mask | (~nonempty[:, None] & (torch.arange(x.shape[-1], device=x.device) == 0))
    x = x.masked_fill(~keep, float("-inf")).masked_fill(~mask & keep, 0.0)
    return torch.logsumexp(x, dim=-1), nonempty


def masked_log_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log-softmax over the masked-in entries; 0 placeholders elsewhere. x, mask: (n, C)."""
    lse, _ = masked_logsumexp(x, mask)
    return (x - lse[:, None]).masked_fill(~mask, 0.0)


def teacher_tail_mass(t_lp: torch.Tensor, valid: torch.Tensor, tail_mass: torch.Tensor | None) -> torch.Tensor:
    """Teacher probability outside the cached ids, floored at `TAIL_FLOOR`.

    Args:
        t_lp: (n, K) teacher log-probs at temperature 1.
        valid: (n, K) bool.
        tail_mass: (n,) stored tail mass, or None to derive it as 1 - sum(exp(t_lp)).

    Returns:
        (n,) tail mass in t_lp's dtype.
    """
    if tail_mass is None:
        tail_mass = 1.0 - torch.where(valid, t_lp.exp(), 0.0).sum(-1)
    return tail_mass.to(t_lp.dtype).clamp_min(TAIL_FLOOR)


def uncovered_logprob(t_lp: torch.Tensor, valid: torch.Tensor, tau: torch.Tensor, vocab: int) -> torch.Tensor:
    """Estimated teacher log-prob of one id outside the cache.

    The tail mass spread evenly over the V - K_valid uncovered ids, log(tau / (V - K_valid)),
    clamped to be <= the smallest cached log-prob (a top-K cache cannot hold an uncovered id above
    its K-th entry). Rows whose cache covers the vocabulary get the smallest cached log-prob; no id
    is uncovered there, so the value is never used.

    Args:
        t_lp: (n, K) teacher log-probs. valid: (n, K) bool. tau: (n,) tail mass (> 0).
        vocab: V, the teacher vocabulary size.

    Returns:
        (n,) float, finite.
    """
    uncovered = (vocab - valid.sum(-1)).to(t_lp.dtype)
    smallest = torch.where(valid, t_lp, math.inf).amin(-1)
    spread = tau.log() - uncovered.clamp_min(1.0).log()
    return torch.where(uncovered > 0, torch.minimum(spread, smallest), smallest)


def teacher_top1(ids: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
    """(n,) column index of the teacher's most probable valid cached id."""
    return torch.where(ids >= 0, t_lp, float("-inf")).argmax(-1)


def top1_agreement(s: torch.Tensor, ids: torch.Tensor, t_lp: torch.Tensor,
                   row_max: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) 1.0 where the student's largest logit is at the teacher's top-1 id (see `is_row_max`)."""
    top1 = ids.long().gather(1, teacher_top1(ids, t_lp)[:, None])[:, 0]
    return is_row_max(s, top1, row_max)


def is_row_max(s: torch.Tensor, ids: torch.Tensor, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) 1.0 where s[row, ids[row]] is the row's largest logit (a tie for the largest counts), else 0.0.

    The argmax metrics (accuracy, top1_agreement) compare with the row max rather than call
    argmax: an amax pass costs a fraction of an argmax pass on CPU, and the losses' own passes
    already yield it (`student_stats`'s row_max), so the metrics then read only the gathered logits.

    Args:
        s: (n, V) logits, any float dtype. ids: (n,) integer ids into V.
        row_max: (n,) s.amax(-1) in the compute dtype if already known, else None.
    """
    dtype = compute_dtype(s.dtype)
    if row_max is None:
        row_max = s.detach().amax(-1).to(dtype)
    value = s.detach().gather(1, ids.long()[:, None])[:, 0].to(dtype)
    return (value >= row_max).to(dtype)


def _expect(lp: torch.Tensor, mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_c p_c * value_c over masked-in classes; (n,)."""
    return torch.where(mask, lp.exp() * value, 0.0).sum(-1)


def _log_mix(lt: torch.Tensor, ls: torch.Tensor, w_teacher: float) -> torch.Tensor:
    """log(w * p_t + (1 - w) * p_s), computed in log space."""
    return torch.logaddexp(lt + math.log(w_teacher), ls + math.log1p(-w_teacher))


def forward_kl(lt, ls, mask):
    """KL(teacher || student) per row. lt, ls: (n, C) log-probs; mask: (n, C). Returns (n,)."""
    return _expect(lt, mask, lt - ls)


def reverse_kl(lt, ls, mask):
    """KL(student || teacher) per row; (n,)."""
    return _expect(ls, mask, ls - lt)


def generalized_jsd(lt, ls, mask, beta: float):
    """GKD's JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.

    P is the teacher, Q the student (Agarwal et al. 2024, eq. 2); 0 < beta < 1. (n,).
    """
    lm = _log_mix(lt, ls, beta)
    return beta * _expect(lt, mask, lt - lm) + (1.0 - beta) * _expect(ls, mask, ls - lm)


def skew_kl(lt, ls, mask, alpha: float):
    """DistiLLM's skew KL: KL(P || alpha P + (1 - alpha) Q); (n,). alpha = 0 is forward KL."""
    if alpha == 0.0:
        return forward_kl(lt, ls, mask)
    return _expect(lt, mask, lt - _log_mix(lt, ls, alpha))


def skew_reverse_kl(lt, ls, mask, alpha: float):
    """DistiLLM's skew reverse KL: KL(Q || (1 - alpha) P + alpha Q); (n,). alpha = 0 is reverse KL."""
    if alpha == 0.0:
        return reverse_kl(lt, ls, mask)
    return _expect(ls, mask, ls - _log_mix(lt, ls, 1.0 - alpha))
