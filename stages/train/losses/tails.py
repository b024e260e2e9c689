"""Teacher and student as distributions over the cached ids, with or without a tail bucket.

This is where the divergences (kl, rkl, jsd, skl, srkl, topk_kl) decide what to do with the
teacher probability the cache does not hold.
"""

import torch

from logitcache.stages.train.losses.rowmath import (compute_dtype, masked_log_softmax, split_padding,
                                                    teacher_tail_mass)
from logitcache.stages.train.losses.student_stats import StudentStats, student_stats

__all__ = ["TAILS", "kd_classes"]

TAILS = ("bucket", "renorm")


def kd_classes(
    s: torch.Tensor,
    ids: torch.Tensor,
    t_lp: torch.Tensor,
    tail_mass: torch.Tensor | None,
    *,
    temperature: float,
    tail: str,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StudentStats]:
    """Teacher and student over the cached ids (+ a tail bucket), both at temperature T.

    tail="renorm": C = K classes, both sides renormalized over the valid cached ids. Exact for the
    teacher at any T, since its log-probs are logits minus a row constant. Needs no student
    normalizer, so the student's logits are only gathered.

    tail="bucket": C = K + 1 classes, the cached ids at their full-vocabulary probability plus one
    bucket for every other id. Student: its exact mass outside the cached ids at temperature T.
    Teacher: at T = 1, the stored tail mass tau, exactly. At T != 1 the bucket's tempered weight
    is sum over the tail of p_i^(1/T), which depends on the tail's shape, and the cache does not
    hold it. It is taken from the student: the teacher's tail is assumed to be the student's tail
    scaled to mass tau, p_i = tau * q_i / q_tail, so its weight is
    tau^(1/T) * exp(R), R = lse_T(tail of s) - lse_1(tail of s) / T. Equivalently, both sides are
    the (K + 1)-class grouped distributions at temperature 1, tempered as classes, with the same
    term R added to both buckets (R is differentiated through: the loss is a function of s).
    Consequences: exact at T = 1; exact at any T when the teacher's tail has the student's shape,
    in particular at student = teacher, so the teacher is a stationary point of every divergence
    at every T (the old flat-tail guess was not: it put 81-99 % of the tempered teacher mass in
    the bucket at T = 2, K = 32). Measured against KL over the exact grouped classes at T = 2
    (benchmarks/bench_tail_bucket.py, docs/LOSSES.md): gradient cosine 0.98-0.996 for near students
    (noise 0.5), but 0.37-0.88 for far ones (noise 2), where a flat tail does better (0.85-0.99) at
    the price of a teacher that is no longer stationary.
    It costs one more pass over the (n, V) logits at T != 1. A row whose cache covers the
    vocabulary has no bucket (both sides' mass there is exactly 0).

    Args:
        s: (n, V) student logits chunk. ids: (n, K) cached ids, -1 padding.
        t_lp: (n, K) teacher log-probs at T = 1. tail_mass: (n,) or None (derived from t_lp).
        temperature: T > 0. tail: "bucket" or "renorm".
        labels: (n,) label ids: the student's statistics also carry their cross entropy.

    Returns:
        lt: (n, C) teacher log-probs, ls: (n, C) student log-probs in the compute dtype, with 0
        placeholders at masked classes; mask: (n, C) bool; the `StudentStats` they came from
        (its `ce` and `row_max` serve the caller).
    """
    dtype = compute_dtype(s.dtype)
    _, valid = split_padding(ids)
    t_lp = t_lp.to(dtype)
    t_scaled = t_lp if temperature == 1.0 else t_lp / temperature
    if tail == "renorm":
        st = student_stats(s, ids, temperature, normalizers=False, labels=labels)
        return masked_log_softmax(t_scaled, valid), masked_log_softmax(st.x_k, valid), valid, st

    st = student_stats(s, ids, temperature, labels=labels)
    x_k, lse, s_tail = st.x_k, st.lse, st.tail_lse
    has_tail = torch.isfinite(s_tail)
    mask = torch.cat([valid, has_tail[:, None]], dim=1)
    ls = torch.cat([x_k, s_tail[:, None]], dim=1) - lse[:, None]

    tau = teacher_tail_mass(t_lp, valid, tail_mass)
    t_tail = tau.log()
    if temperature != 1.0:
        t_tail = t_tail / temperature + torch.where(
            has_tail, s_tail - student_stats(s, ids).tail_lse / temperature, 0.0)
    lt = masked_log_softmax(torch.cat([t_scaled, t_tail[:, None]], dim=1), mask)
    return lt, ls.masked_fill(~mask, 0.0), mask, st
