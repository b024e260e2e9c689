"""Per-chunk row math shared by the cached losses: padding, masked softmax, the teacher's tail.

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


import torch

__all__ = [
    "TAIL_FLOOR", "compute_dtype", "split_padding", "masked_logsumexp", "masked_log_softmax",
    "teacher_tail_mass", "teacher_top1",
    "top1_agreement", "agreement_stats", "is_row_max",
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


def agreement_stats(want_metrics, s, ids, t_lp, st) -> dict:
    """{"top1_agreement": (n,)} when metrics are wanted, else {}; st: the chunk's `StudentStats`."""
    return {"top1_agreement": top1_agreement(s, ids, t_lp, st.row_max)} if want_metrics else {}
