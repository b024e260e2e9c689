"""RS-KD, random-sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling"), for sample-mode caches."""

import math

import torch

from logitcache.stages.train.losses.fused import KDRows
from logitcache.stages.train.losses.inputs import check_logits, check_rows, check_teacher
from logitcache.stages.train.losses.rowmath import compute_dtype, split_padding, top1_agreement
from logitcache.stages.train.losses.student_stats import student_stats
from logitcache.storage.errors import ConfigError

__all__ = ["rskd_rows"]


def rskd_rows(student_logits, teacher_ids, teacher_logprobs, *, counts, temperature, sample_temperature, tail_mass,
              want_metrics, n_rows=None) -> KDRows:
    """Random-sampling KD for sample-mode caches (Anshumann et al. 2025, "Sparse Logit Sampling").

    Stage one drew ids i with replacement from the teacher at its sampling temperature tau, i.e.
    from p_i^(1/tau) / Z; each cached id carries its draw count c_i and its temperature-1 log-prob
    log p_i. The target is the teacher at the loss temperature T, softmax(log p / T). The draws
    estimate it by self-normalized importance weights, computed from the stored log-probs alone:

        w_i = c_i * exp((1/T - 1/tau) * log p_i) / sum_j c_j * exp((1/T - 1/tau) * log p_j)
        loss = -sum_i w_i * log_softmax(student_logits / T)_i

    The student keeps its full-vocabulary normalizer. At T = tau the weights are the counts (the
    paper's case, tau = T = 1). The expected target is softmax(teacher / T), so the teacher's own
    logits are the loss's stationary point at every T and tau (the weights are consistent, with
    an O(1/N) bias from the normalization for N draws). It is a cross-entropy, so its minimum is
    the target's entropy rather than 0. A row whose counts are all 0 contributes 0.
    `tail_mass` is unused.

    Args:
        counts: (N, K) draws per id (integer or float), 0 at padding.
        temperature: T > 0, of both the target and the student.
        sample_temperature: tau > 0, the temperature stage one drew at (the cache index's
            sparsification.temperature; the trainer passes it).
    """
    n, _ = check_logits(student_logits)
    n = n if n_rows is None else n_rows
    k = check_teacher(student_logits, teacher_ids, teacher_logprobs, rows=n_rows)
    if counts is None:
        raise ConfigError("rskd needs counts=(N, K) sample counts from a sample-mode cache")
    check_rows("counts", counts, (n, k))
    check_rows("tail_mass", tail_mass, (n,))
    exponent = 1.0 / temperature - 1.0 / sample_temperature

    def row_fn(s, labels, ids, t_lp, c):
        dtype = compute_dtype(s.dtype)
        _, valid = split_padding(ids)
        st = student_stats(s, ids, temperature, labels=labels)
        log_w = torch.where(valid & (c > 0), c.to(dtype).clamp_min(torch.finfo(dtype).tiny).log(), -math.inf)
        if exponent != 0.0:
            log_w = log_w + exponent * t_lp.to(dtype)
        # Normalized in log space: the tilt exp(exponent * log p) spans many orders of magnitude.
        has_draws = (valid & (c > 0)).any(-1, keepdim=True)
        weights = torch.where(has_draws, (log_w - log_w.logsumexp(-1, keepdim=True)).exp(), 0.0).nan_to_num(0.0)
        stats = {"top1_agreement": top1_agreement(s, ids, t_lp, st.row_max)} if want_metrics else {}
        return -(weights * (st.x_k - st.lse[:, None])).sum(-1), st, stats

    return KDRows(row_fn, (teacher_ids, teacher_logprobs, counts))
