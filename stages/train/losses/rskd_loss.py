"""RS-KD, random-sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling"), for sample-mode caches."""

import math

import torch

from logitcache.stages.train.losses.fused import KDRows
from logitcache.stages.train.losses.inputs import check_logits, check_rows, check_teacher
from logitcache.stages.train.losses.rowmath import compute_dtype, split_padding, top1_agreement
from logitcache.stages.train.losses.student_stats import student_stats
from logitcache.storage.errors import ConfigError

__all__ = ["rskd_rows"]


def rskd_rows(student_logits, teacher_ids, teacher_logprobs, *, counts, draw_logprobs=None, temperature,
              sample_temperature, tail_mass, want_metrics, n_rows=None) -> KDRows:
    """Random-sampling KD for sample-mode caches (Anshumann et al. 2025, "Sparse Logit Sampling").

    Stage one drew N ids with replacement from the teacher at its sampling temperature tau, i.e.
    from r_i = p_i^(1/tau) / Z_tau; each cached id carries its draw count c_i (sum N), its
    temperature-1 log-prob log p_i and, in caches that store the normaliser (`sample_logz`), its
    exact draw log-prob log r_i (`draw_logprobs`). The loss estimates the cross entropy of the
    student at T to the teacher at T, -sum_i softmax(log p / T)_i log softmax(student / T)_i:

    - T = 1, with `draw_logprobs`: a plain importance-sampling estimate with a known normaliser,
      w_i = (c_i / N) * p_i / r_i. Unbiased, in value and gradient, at any tau and any N.
    - T = tau: w_i = c_i / N (the draws are from the target itself; the paper's case tau = T = 1).
      Unbiased.
    - otherwise: self-normalised weights w_i proportional to c_i * p_i^(1/T) / r_i (r_i from
      `draw_logprobs`, or, in older caches without it, p_i^(1/tau) up to its normaliser, from
      `sample_temperature`). The target's normaliser sum_j p_j^(1/T) is unknown at T != 1, so it
      is estimated from the same draws: consistent, with a bias of order 1/N (measured in
      benchmarks/bench_fidelity.py's rskd rows; docs/LOSSES.md).

        loss = -sum_i w_i * log_softmax(student_logits / T)_i

    The student keeps its full-vocabulary normalizer. The teacher's own logits are the expected
    loss's stationary point at every T and tau. It is a cross entropy, so its minimum is the
    target's entropy rather than 0. A row whose counts are all 0 contributes 0. `tail_mass` is unused.

    Args:
        counts: (N, K) draws per id (integer or float), 0 at padding.
        draw_logprobs: (N, K) log r_i, the probability each id was drawn with (the batch's
            sample_logprobs; 0 at padding), or None for a cache that does not store it.
        temperature: T > 0, of both the target and the student.
        sample_temperature: tau > 0, the temperature stage one drew at (the cache index's
            sparsification.temperature; the trainer passes it). Read only when `draw_logprobs` is None.
    """
    n, _ = check_logits(student_logits)
    n = n if n_rows is None else n_rows
    k = check_teacher(student_logits, teacher_ids, teacher_logprobs, rows=n_rows)
    if counts is None:
        raise ConfigError("rskd needs counts=(N, K) sample counts from a sample-mode cache")
    check_rows("counts", counts, (n, k))
    check_rows("draw_logprobs", draw_logprobs, (n, k))
    check_rows("tail_mass", tail_mass, (n,))
    # Which estimate (see above): known weights, or weights normalised over the row's draws.
    plain_is = temperature == 1.0 and draw_logprobs is not None
    counts_only = temperature == sample_temperature and draw_logprobs is None

    def row_fn(s, labels, ids, t_lp, c, d):
        dtype = compute_dtype(s.dtype)
        _, valid = split_padding(ids)
        st = student_stats(s, ids, temperature, labels=labels)
        drawn = valid & (c > 0)
        c = torch.where(drawn, c.to(dtype), 0.0)
        t_lp = t_lp.to(dtype)
        if plain_is:
            weights = c / c.sum(-1, keepdim=True).clamp_min(1.0) * (t_lp - d.to(dtype)).exp()
        elif counts_only:
            weights = c / c.sum(-1, keepdim=True).clamp_min(1.0)
        else:
            # p^(1/T) / r up to a row constant; normalised in log space (it spans many orders of magnitude).
            if d is None:
                log_ratio = (1.0 / temperature - 1.0 / sample_temperature) * t_lp
            else:
                log_ratio = t_lp / temperature - d.to(dtype)
            log_w = torch.where(drawn, c.clamp_min(torch.finfo(dtype).tiny).log() + log_ratio, -math.inf)
            has_draws = drawn.any(-1, keepdim=True)
            weights = torch.where(has_draws, (log_w - log_w.logsumexp(-1, keepdim=True)).exp(), 0.0).nan_to_num(0.0)
        weights = torch.where(drawn, weights, 0.0)
        stats = {"top1_agreement": top1_agreement(s, ids, t_lp, st.row_max)} if want_metrics else {}
        return -(weights * (st.x_k - st.lse[:, None])).sum(-1), st, stats

    return KDRows(row_fn, (teacher_ids, teacher_logprobs, counts, draw_logprobs))
