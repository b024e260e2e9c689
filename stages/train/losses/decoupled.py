"""Decoupled target/non-target losses from image classification: DKD, NKD, NormKD.

They come from image classification, where the classes are the whole label set. Here the classes
are the cached ids of each position: teacher and student are both renormalized over them (exact
for the teacher, whose cached log-probs are logits minus a row constant), so with a cache of the
whole vocabulary they are the published losses over the vocabulary. Their "target class" is the
teacher's top-1 cached id, not the label: the label is often outside the cached ids while the
teacher's top-1 never is (BiLD's LLM version of NKD makes the same choice).

Settings: the defaults are each original paper's weights (DKD alpha 1, beta 8, as in mdistiller's
CIFAR config, which also sets T = 4: pass --temperature 4 for it; NKD gamma 1.5, lambda 1; NormKD
t_norm 1.5). They are *not* the settings of the BiLD paper's code, which runs DKD with the label as
target, a per-row std-normalized T and alpha = beta = 0.5, NKD with gamma 0.25 and T 3 without the
T^2 factor, and NormKD with scale 3.0. What the options reproduce of that baseline: NormKD
(t_norm=3.0); NKD (temperature=3, gamma=0.25/9, since this nkd multiplies its non-target term by
lambda^2 = 9); DKD's alpha and beta, but neither its label target nor its std-normalized T, which
this port does not implement.
"""

import math

import torch

from logitcache.stages.train.losses.divergences import forward_kl
from logitcache.stages.train.losses.fused import KDRows
from logitcache.stages.train.losses.inputs import check_cache_rows, check_range
from logitcache.stages.train.losses.rowmath import (agreement_stats, compute_dtype, masked_log_softmax,
                                                    masked_logsumexp, split_padding, teacher_top1)
from logitcache.stages.train.losses.student_stats import student_stats

__all__ = ["dkd_rows", "nkd_rows", "normkd_rows"]

_POSITIVE = (0.0, math.inf)


def dkd_rows(student_logits, teacher_ids, teacher_logprobs, *, alpha, beta, temperature, tail_mass, want_metrics,
             n_rows=None) -> KDRows:
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, times T^2 as in the paper's code.

    Over the cached ids as classes, target = the teacher's top-1 cached id (see module docstring):
    TCKD is KL between the binary (target, rest) distributions, NCKD is KL between the distributions
    over the non-target cached ids, each renormalized; all at temperature T.
    `tail_mass` is accepted for a uniform call and unused.

    Args:
        alpha, beta: TCKD and NCKD weights (the paper's CIFAR defaults 1 and 8).
        temperature: T > 0.
    """
    check_cache_rows(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows, min_k=2)
    check_range("temperature", temperature, *_POSITIVE)

    def row_fn(s, labels, ids, t_lp):
        dtype, valid, st = _cached_classes(s, labels, ids, temperature)
        lt = masked_log_softmax(t_lp.to(dtype) / temperature, valid)
        ls = masked_log_softmax(st.x_k, valid)
        target, other = _target_and_others(ids, t_lp, valid)
        # log(1 - p_target) as the log of the other classes' mass: no cancellation near p = 1.
        lt_rest, has_rest = masked_logsumexp(lt, other)
        ls_rest, _ = masked_logsumexp(ls, other)
        binary_mask = torch.stack([torch.ones_like(has_rest), has_rest], dim=1)
        tckd = forward_kl(torch.stack([lt.gather(1, target)[:, 0], lt_rest], 1),
                          torch.stack([ls.gather(1, target)[:, 0], ls_rest], 1), binary_mask)
        nckd = forward_kl(lt - lt_rest[:, None], ls - ls_rest[:, None], other)
        return (alpha * tckd + beta * nckd) * temperature**2, st, agreement_stats(want_metrics, s, ids, t_lp, st)

    return KDRows(row_fn, (teacher_ids, teacher_logprobs))


def nkd_rows(student_logits, teacher_ids, teacher_logprobs, *, gamma, temperature, tail_mass, want_metrics,
             n_rows=None) -> KDRows:
    """Normalized KD (Yang et al. 2023, "From KD to Self-KD: ... Normalized Loss and Customized Soft Labels").

    loss = -T_t log S_t - gamma * lambda^2 * sum_{i != t} N(T_i^lambda) log N(S_i^lambda),

    with t the target class (the teacher's top-1 cached id), T_t and S_t the teacher's and student's
    probabilities of it at temperature 1, and N(.^lambda) the distributions over the non-target
    classes at temperature lambda, renormalized; all over the cached ids. It is a cross-entropy,
    so its minimum is not 0. `tail_mass` is accepted for a uniform call and unused.

    Args:
        gamma: weight of the non-target term (the paper's 1.5).
        temperature: lambda > 0 (the paper's 1.0).
    """
    check_cache_rows(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows, min_k=2)
    check_range("temperature", temperature, *_POSITIVE)

    def row_fn(s, labels, ids, t_lp):
        dtype, valid, st = _cached_classes(s, labels, ids)
        t_lp, s_k = t_lp.to(dtype), st.x_k
        target, other = _target_and_others(ids, t_lp, valid)
        lt = masked_log_softmax(t_lp, valid).gather(1, target)[:, 0]
        ls = masked_log_softmax(s_k, valid).gather(1, target)[:, 0]
        lt_n = masked_log_softmax(t_lp / temperature, other)
        ls_n = masked_log_softmax(s_k / temperature, other)
        non_target = torch.where(other, lt_n.exp() * ls_n, 0.0).sum(-1)
        return -lt.exp() * ls - gamma * temperature**2 * non_target, st, agreement_stats(want_metrics, s, ids, t_lp, st)

    return KDRows(row_fn, (teacher_ids, teacher_logprobs))


def normkd_rows(student_logits, teacher_ids, teacher_logprobs, *, t_norm, tail_mass, want_metrics,
                n_rows=None) -> KDRows:
    """NormKD (Chi et al. 2023): KD with a per-position temperature from the logits' spread.

    Each side gets T = t_norm * std(its logits over the cached ids) (unbiased std, floored at 1e-6;
    the student's T is differentiated through, as in the paper's code), and

        loss = KL(softmax(z_t / T_t) || softmax(z_s / T_s)) * T_t^2

    over the cached ids. The teacher's cached log-probs have the logits' std. `tail_mass` unused.

    Args:
        t_norm: T_norm > 0 (the NormKD paper's 1.5; the BiLD paper's code runs 3.0).
    """
    check_cache_rows(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows, min_k=2)
    check_range("t_norm", t_norm, *_POSITIVE)

    def row_fn(s, labels, ids, t_lp):
        dtype, valid, st = _cached_classes(s, labels, ids)
        z_t, z_s = t_lp.to(dtype), st.x_k
        t_t = t_norm * _masked_std(z_t, valid)
        t_s = t_norm * _masked_std(z_s, valid)
        lt = masked_log_softmax(z_t / t_t[:, None], valid)
        ls = masked_log_softmax(z_s / t_s[:, None], valid)
        return forward_kl(lt, ls, valid) * t_t**2, st, agreement_stats(want_metrics, s, ids, t_lp, st)

    return KDRows(row_fn, (teacher_ids, teacher_logprobs))


def _cached_classes(s, labels, ids, temperature=1.0):
    """What each row function starts from: the cached ids of each row as its classes.

    Args:
        s: (n, V) student logits; labels: (n,) or None; ids: (n, K) cached ids, -1 at padding.
        temperature: the student's temperature in `student_stats`.

    Returns:
        (dtype, valid, st): the compute dtype, (n, K) bool of the real ids, and the student's
        `StudentStats` over the ids at `temperature` (no normalizers).
    """
    _, valid = split_padding(ids)
    return compute_dtype(s.dtype), valid, student_stats(s, ids, temperature, normalizers=False, labels=labels)


def _target_and_others(ids, t_lp, valid):
    """The target class, the teacher's top-1 cached id, as an (n, 1) column index; and the (n, K) bool of the others."""
    target = teacher_top1(ids, t_lp)[:, None]
    return target, valid.scatter(1, target, False)


def _masked_std(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the masked-in entries of each row, floored at 1e-6; (n,)."""
    count = mask.sum(-1).to(z.dtype)
    mean = torch.where(mask, z, 0.0).sum(-1) / count
    var = torch.where(mask, (z - mean[:, None]) ** 2, 0.0).sum(-1) / (count - 1).clamp_min(1.0)
    # Floor before the sqrt: sqrt's gradient at 0 is infinite.
    return var.clamp_min(1e-12).sqrt()
