"""BiLD, the Bi-directional Logits Difference loss (Li et al. 2024): the loss the cache is built for.

BiLD reads only each side's top-k logits, so a top-K cache (K >= k) holds everything its
teacher-led half needs, exactly. Its student-led half reads the teacher at the student's top-k
ids, some of which can lie outside the cache; see `bild_rows` for the estimate used there.
"""

import math

import torch

from logitcache.stages.train.losses.divergences import forward_kl
from logitcache.stages.train.losses.fused import KDRows
from logitcache.stages.train.losses.inputs import check_cache_rows, check_range
from logitcache.stages.train.losses.rowmath import agreement_stats, compute_dtype, masked_log_softmax, split_padding
from logitcache.stages.train.losses.student_stats import student_stats
from logitcache.storage.errors import ConfigError

__all__ = ["bild_rows"]

_POSITIVE = (0.0, math.inf)


def bild_rows(student_logits, teacher_ids, teacher_logprobs, *, top_k, temperature, tail_mass, want_metrics,
              n_rows=None) -> KDRows:
    """Bi-directional Logits Difference loss (Li et al. 2024): teacher-led + student-led halves.

    In each half, take that side's top-k ids in its own rank order, gather both models' logits
    there, form the k(k-1)/2 differences z_i - z_j (i < j) divided by T, softmax over the pairs for
    each model, and take KL(teacher || student). Cached log-probs are logits minus a row constant,
    so the teacher's differences are exact.

    - Teacher-led: the first k cached ids (the cache is sorted by teacher log-prob). Where they
      include -1 padding, only the pairs of the valid ones (a row with one valid id adds 0).
    - Student-led: the student's top-k, taken on the raw logits (no fp32 copy). The teacher's value
      at an id in the cache is the cached one; at an id outside it, the smallest cached log-prob
      of the row (for a top-K cache, the K-th), which bounds every uncovered value from above.
      Metric "bild_coverage": the share of the student's top-k ids found in the cache (1.0 for a
      full-vocabulary cache).

    The estimate's bias: an uncovered id's teacher logit is over-estimated (it ties with rank K),
    so the student-led half sees the uncovered ids as the teacher's near-equals of rank K and its
    value comes out low, never high, where coverage is low. The alternative, the tail mass spread
    evenly over the V - K uncovered ids, errs high; it is worse for near students on LLM-like
    synthetic tails (V = 151,936, K = 32, tests/support/llm_tails.py); on students from a real training run
    neither wins (benchmarks/bench_bild_trained.py: cos 0.78 / 0.90 against 0.86 / 0.84 over two
    seeds). docs/LOSSES.md has the figures and their commands. The teacher-led half is exact whenever K >= k.

    Args:
        top_k: k >= 2, at most the number of cached ids K.
        temperature: T > 0 (the paper's 3.0).
        tail_mass: accepted for a uniform call and unused.

    Returns:
        0-dim: mean teacher-led KL + mean student-led KL.
    """
    _, k_cached = check_cache_rows(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows)
    check_range("temperature", temperature, *_POSITIVE)
    if not isinstance(top_k, int) or top_k < 2:
        raise ConfigError(f"bild: top_k={top_k!r} must be an integer >= 2 (it compares pairs of logits)")
    if k_cached < top_k:
        raise ConfigError(f"bild: the cache holds K = {k_cached} ids per position, fewer than top_k = {top_k}; "
                          f"use top_k <= {k_cached} or a cache written with K >= {top_k}")
    pairs = torch.triu_indices(top_k, top_k, offset=1, device=teacher_ids.device)

    def pair_kl(t_vals, s_vals):
        dt = (t_vals[:, pairs[0]] - t_vals[:, pairs[1]]) / temperature
        ds = (s_vals[:, pairs[0]] - s_vals[:, pairs[1]]) / temperature
        # x - logsumexp(x) rather than log_softmax: the same here, and torch's CPU fp64 log_softmax
        # pays a thread-pool round trip even on a handful of elements.
        lt, ls = dt - dt.logsumexp(-1, keepdim=True), ds - ds.logsumexp(-1, keepdim=True)
        return (lt.exp() * (lt - ls)).sum(-1)

    def masked_pair_kl(t_vals, s_vals, valid):
        """pair_kl over the pairs of valid entries only; 0 for a row with fewer than two."""
        pair_valid = valid[:, pairs[0]] & valid[:, pairs[1]]
        dt = (t_vals[:, pairs[0]] - t_vals[:, pairs[1]]) / temperature
        ds = (s_vals[:, pairs[0]] - s_vals[:, pairs[1]]) / temperature
        return forward_kl(masked_log_softmax(dt, pair_valid), masked_log_softmax(ds, pair_valid), pair_valid)

    def row_fn(s, labels, ids, t_lp, _tail_mass):
        dtype = compute_dtype(s.dtype)
        ids = ids.long()
        _, valid = split_padding(ids)
        t_lp = t_lp.to(dtype)
        # Selection happens on the raw logits; both halves' values come from one gather.
        s_ids = s.detach().topk(top_k, dim=-1).indices
        st = student_stats(s, torch.cat([ids[:, :top_k], s_ids], dim=1), normalizers=False, labels=labels)
        both = st.x_k
        # A row with fewer than k valid ids (-1 padding from folding padded-vocabulary ids into the
        # tail) compares only the pairs of its valid ones.
        teacher_led = masked_pair_kl(t_lp[:, :top_k], both[:, :top_k], valid[:, :top_k])
        s_vals = both[:, top_k:]

        hit = s_ids[:, :, None] == ids[:, None, :]  # (n, k, K); at most one hit per student id, none at -1
        found = hit.any(-1)
        column = (hit * torch.arange(ids.shape[1], device=ids.device)).sum(-1)
        estimate = torch.where(valid, t_lp, math.inf).amin(-1)  # column 0 is always valid: finite
        t_vals = torch.where(found, t_lp.gather(1, column), estimate[:, None])
        student_led = pair_kl(t_vals, s_vals)

        stats = {}
        if want_metrics:
            stats = {"bild_coverage": found.to(dtype).mean(-1), **agreement_stats(want_metrics, s, ids, t_lp, st)}
        return teacher_led + student_led, st, stats

    return KDRows(row_fn, (teacher_ids, teacher_logprobs, tail_mass))
