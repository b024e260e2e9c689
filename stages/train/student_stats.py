"""What a cached loss reads from one chunk of student logits, with a hand-written backward.

Every loss here sees the (n, V) student logits through at most three statistics: the (scaled)
logits at some ids, the full-vocabulary logsumexp, and the logsumexp over the ids outside that
set (the tail bucket). Through plain autograd the two logsumexps cost several (n, V) fp32 passes
and temporaries in each direction (CPU logsumexp alone is amax, sub, exp, sum, log). Here the
forward is one copy, one amax and one in-place exp over (n, V), exact for both logsumexps, and
the backward writes the (n, V) gradient in one in-place pass plus a scatter.
"""

import torch

from logitcache.stages.train.kd_math import compute_dtype, masked_logsumexp, split_padding

__all__ = ["student_stats"]


def student_stats(
    s: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    normalizers: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The student's scaled logits at `ids`, and optionally its two normalizers, at temperature T.

    Args:
        s: (n, V) student logits chunk, any float dtype; differentiable.
        ids: (n, K) integer ids into V, unique per row, -1 at padding after the valid ones.
        temperature: T > 0; the statistics are of x = s / T.
        normalizers: also return the two logsumexps (skipped for losses that only gather).

    Returns:
        x_k: (n, K) x at ids in the compute dtype (fp32, or fp64 for fp64 logits); padding slots
            hold the row's first id's value.
        lse: (n,) logsumexp of x over the vocabulary, or None.
        tail_lse: (n,) logsumexp of x over the ids not in `ids`; -inf where `ids` cover the
            vocabulary. None if not `normalizers`.
    """
    x_k, lse, tail_lse = _StudentStats.apply(s, ids, float(temperature), normalizers)
    return x_k, lse, tail_lse


class _StudentStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, ids, temperature, normalizers):
        dtype = compute_dtype(s.dtype)
        scale = 1.0 / temperature
        safe_ids, valid = split_padding(ids)
        x_k = s.gather(1, safe_ids).to(dtype) * scale
        ctx.scale, ctx.normalizers = scale, normalizers
        if not normalizers:
            ctx.save_for_backward(s, safe_ids, valid)
            return x_k, None, None

        rest = s.to(dtype, copy=True)  # the chunk's one (n, V) compute-dtype temporary
        if scale != 1.0:
            rest.mul_(scale)
        rest.scatter_(1, safe_ids, float("-inf"))
        # The tail's own max keeps its logsumexp exact however small the tail is.
        tail_max = rest.amax(-1)
        has_tail = torch.isfinite(tail_max)
        tail_max = torch.where(has_tail, tail_max, 0.0)
        tail_lse = rest.sub_(tail_max[:, None]).exp_().sum(-1).log() + tail_max
        tail_lse = torch.where(has_tail, tail_lse, float("-inf"))
        cached_lse, _ = masked_logsumexp(x_k, valid)
        lse = torch.logaddexp(tail_lse, cached_lse)
        ctx.save_for_backward(s, safe_ids, valid, x_k, lse, tail_lse, tail_max)
        return x_k, lse, tail_lse

    @staticmethod
    def backward(ctx, g_xk, g_lse, g_tail):
        scale = ctx.scale
        if not ctx.normalizers:
            s, safe_ids, valid = ctx.saved_tensors
            grad = torch.zeros_like(s)
            grad.scatter_add_(1, safe_ids, (torch.where(valid, g_xk, 0.0) * scale).to(s.dtype))
            return grad, None, None, None

        s, safe_ids, valid, x_k, lse, tail_lse, tail_max = ctx.saved_tensors
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
        g_tail = torch.zeros_like(lse) if g_tail is None else g_tail
        g_xk = torch.zeros_like(x_k) if g_xk is None else g_xk
        has_tail = torch.isfinite(tail_lse)
        # An id j outside `ids` gets g_lse * softmax_j + g_tail * softmax_j|tail, both of which are
        # exp(x_j - tail_max) times a per-row factor whose exponents are <= 0: no overflow.
        tail_coef = g_tail * (tail_max - tail_lse).exp() + g_lse * (tail_max - lse).exp()
        tail_coef = torch.where(has_tail, tail_coef * scale, 0.0)
        grad = s.to(g_lse.dtype, copy=True)
        if scale != 1.0:
            grad.mul_(scale)
        grad.sub_(tail_max[:, None]).exp_().mul_(tail_coef[:, None])
        # The cached ids (where the line above may have overflowed) are overwritten.
        g_cached = (g_lse[:, None] * (x_k - lse[:, None]).exp() + g_xk) * scale
        grad.scatter_(1, safe_ids, 0.0).scatter_add_(1, safe_ids, torch.where(valid, g_cached, 0.0))
        return grad.to(s.dtype), None, None, None
