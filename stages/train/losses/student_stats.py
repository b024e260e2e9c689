"""What a cached loss reads from one chunk of student logits, with a hand-written backward.

Every loss here sees the (n, V) student logits through a few statistics: the (scaled) logits at
some ids, the full-vocabulary logsumexp, the logsumexp over the ids outside that set (the tail
bucket) and, when the step also trains on the labels, the label cross entropy. Through plain
autograd each logsumexp costs several (n, V) fp32 passes and temporaries in each direction (CPU
logsumexp alone is amax, sub, exp, sum, log), and a separate cross entropy costs all of that again
plus a second (n, V) gradient to add. Here the forward is one copy, one amax and one in-place exp
over (n, V), exact for both logsumexps, and the backward writes the (n, V) gradient of every
statistic, the cross entropy included, in one in-place pass plus scatters. Only a temperature
T != 1 with both the normalizers and the cross entropy (which is at T = 1) costs a second pass.
"""

from typing import NamedTuple

import torch

from logitcache.stages.train.losses.rowmath import compute_dtype, masked_logsumexp, split_padding

__all__ = ["StudentStats", "student_stats"]

# Rows per block of the backward's second temporary (T != 1 with the cross entropy): 16 MiB of fp32.
_BLOCK_ELEMENTS = 1 << 22


class StudentStats(NamedTuple):
    """See `student_stats`. Every field is in the compute dtype (fp32, or fp64 for fp64 logits)."""

    x_k: torch.Tensor
    lse: torch.Tensor | None
    tail_lse: torch.Tensor | None
    ce: torch.Tensor | None
    row_max: torch.Tensor | None


def student_stats(
    s: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    normalizers: bool = True,
    labels: torch.Tensor | None = None,
) -> StudentStats:
    """The student's scaled logits at `ids`, and optionally its normalizers and label cross entropy.

    Args:
        s: (n, V) student logits chunk, any float dtype; differentiable.
        ids: (n, K) integer ids into V, -1 at padding. With `normalizers` they must be unique per
            row (they define the tail); without, repeats are fine.
        temperature: T > 0; x_k, lse and tail_lse are of x = s / T.
        normalizers: also return the two logsumexps (skipped for losses that only gather).
        labels: (n,) integer ids into V: also return the cross entropy at T = 1.

    Returns:
        StudentStats with
        x_k: (n, K) x at ids; padding slots hold the row's first id's value.
        lse: (n,) logsumexp of x over the vocabulary, or None without `normalizers`.
        tail_lse: (n,) logsumexp of x over the ids not in `ids`; -inf where `ids` cover the
            vocabulary. None without `normalizers`.
        ce: (n,) logsumexp(s) - s[label], the labels' cross entropy at temperature 1, or None.
        row_max: (n,) the largest raw logit s of each row (not scaled, no gradient), for the
            argmax metrics; None when neither the normalizers nor the cross entropy are asked for.
    """
    return StudentStats(*_StudentStats.apply(s, ids, labels, float(temperature), normalizers))


class _StudentStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, ids, labels, temperature, normalizers):
        dtype = compute_dtype(s.dtype)
        scale = 1.0 / temperature
        safe_ids, valid = split_padding(ids)
        raw_k = s.gather(1, safe_ids).to(dtype)
        x_k = raw_k * scale
        lse = tail_lse = tail_max = ce = ce_lse = row_max = rest = None
        if normalizers:
            rest = s.to(dtype, copy=True)  # the chunk's one (n, V) compute-dtype temporary
            rest.scatter_(1, safe_ids, float("-inf"))
            # The tail's own max keeps its logsumexp exact however small the tail is. Taken before
            # scaling, it is also the raw row max; scaling by 1/T > 0 rounds monotonically, so
            # tail_max below is exactly the max of the scaled tail.
            raw_tail_max = rest.amax(-1)
            has_tail = torch.isfinite(raw_tail_max)
            raw_tail_max = torch.where(has_tail, raw_tail_max, 0.0)
            tail_max = raw_tail_max * scale
            if scale != 1.0:
                rest.mul_(scale)
            tail_lse = rest.sub_(tail_max[:, None]).exp_().sum(-1).log() + tail_max
            tail_lse = torch.where(has_tail, tail_lse, float("-inf"))
            cached_lse, _ = masked_logsumexp(x_k, valid)
            lse = torch.logaddexp(tail_lse, cached_lse)
            row_max = torch.maximum(torch.where(has_tail, raw_tail_max, float("-inf")),
                                    torch.where(valid, raw_k, float("-inf")).amax(-1))
        if labels is not None:
            labels = labels.long()
            if normalizers and scale == 1.0:
                ce_lse = lse  # the cross entropy's normalizer is the one above
            else:
                # At T != 1 the normalizers' temporary is reused rather than a second one made.
                full = s.to(dtype, copy=True) if rest is None else rest.copy_(s)
                row_max = full.amax(-1)
                ce_lse = full.sub_(row_max[:, None]).exp_().sum(-1).log() + row_max
            ce = ce_lse - s.gather(1, labels[:, None])[:, 0].to(dtype)
        ctx.scale, ctx.normalizers = scale, normalizers
        ctx.shared_ce = ce_lse is not None and ce_lse is lse
        ctx.save_for_backward(s, safe_ids, valid, x_k, lse, tail_lse, tail_max, labels,
                              None if ctx.shared_ce else ce_lse)
        if row_max is not None:
            ctx.mark_non_differentiable(row_max)
        return x_k, lse, tail_lse, ce, row_max

    @staticmethod
    def backward(ctx, g_xk, g_lse, g_tail, g_ce, _):
        scale = ctx.scale
        s, safe_ids, valid, x_k, lse, tail_lse, tail_max, labels, ce_lse = ctx.saved_tensors
        dtype = x_k.dtype
        g_xk = torch.zeros_like(x_k) if g_xk is None else g_xk
        with_ce = labels is not None and g_ce is not None
        # The cross entropy's gradient is softmax(s) - onehot(label). Its softmax part goes into
        # the normalizer's own term when it shares the normalizer, else into a pass of its own.
        shared_ce = with_ce and ctx.shared_ce
        if not ctx.normalizers and not with_ce:
            grad = torch.zeros_like(s)
            grad.scatter_add_(1, safe_ids, (torch.where(valid, g_xk, 0.0) * scale).to(s.dtype))
            return grad, None, None, None, None

        grad = None
        if ctx.normalizers:
            g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
            if shared_ce:
                g_lse = g_lse + g_ce
            g_tail = torch.zeros_like(lse) if g_tail is None else g_tail
            has_tail = torch.isfinite(tail_lse)
            # An id j outside `ids` gets g_lse * softmax_j + g_tail * softmax_j|tail, both of which
            # are exp(x_j - tail_max) times a per-row factor whose exponents are <= 0: no overflow.
            tail_coef = g_tail * (tail_max - tail_lse).exp() + g_lse * (tail_max - lse).exp()
            tail_coef = torch.where(has_tail, tail_coef * scale, 0.0)
            grad = s.to(dtype, copy=True)
            if scale != 1.0:
                grad.mul_(scale)
            grad.sub_(tail_max[:, None]).exp_().mul_(tail_coef[:, None])
            # The cached ids (where the line above may have overflowed) are overwritten.
            g_cached = (g_lse[:, None] * (x_k - lse[:, None]).exp() + g_xk) * scale
            grad.scatter_(1, safe_ids, 0.0).scatter_add_(1, safe_ids, torch.where(valid, g_cached, 0.0))
        else:
            g_cached = torch.where(valid, g_xk * scale, 0.0)
        if with_ce and not shared_ce:
            if grad is None:
                grad = s.to(dtype, copy=True).sub_(ce_lse[:, None]).exp_().mul_(g_ce[:, None])
                grad.scatter_add_(1, safe_ids, g_cached)
            else:
                # A second (n, V) temporary, made a block of rows at a time: on a CPU a block this
                # size is recycled by the allocator, where a chunk-sized one costs a page fault per
                # 4 KiB every time.
                block = max(1, _BLOCK_ELEMENTS // s.shape[1])
                for start in range(0, s.shape[0], block):
                    rows = slice(start, start + block)
                    part = s[rows].to(dtype, copy=True).sub_(ce_lse[rows, None]).exp_().mul_(g_ce[rows, None])
                    grad[rows] += part
        if with_ce:
            grad.scatter_add_(1, labels[:, None], -g_ce[:, None])
        return grad.to(s.dtype), None, None, None, None
