"""The divergences: forward and reverse KL, GKD's JSD, DistiLLM's skew KLs, and top-K KL.

Each runs over the classes `tails.kd_classes` builds from a cache row: the cached ids, plus (with
tail="bucket") one class for every id the cache leaves out. The formulas take the two
distributions as (n, C) log-probs and a mask (see `rowmath`'s conventions) and return (n,).
"""

import math

import torch

from logitcache.stages.train.losses.fused import KDRows
from logitcache.stages.train.losses.inputs import check_logits, check_rows, check_teacher
from logitcache.stages.train.losses.rowmath import top1_agreement
from logitcache.stages.train.losses.tails import kd_classes

__all__ = ["forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
           "kl_rows", "rkl_rows", "jsd_rows", "skl_rows", "srkl_rows", "topk_kl_rows"]


# ---- the formulas, per row over C classes

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


# ---- the losses' row functions (see `fused.KDRows`); their docstrings are the public functions'

def kl_rows(student_logits, teacher_ids, teacher_logprobs, *, temperature, tail, tail_mass, want_metrics,
            n_rows=None) -> KDRows:
    """Forward KL(teacher || student) at temperature T over the cached ids.

    Args:
        temperature: T > 0; both sides are softmax(logits / T).
        tail: "bucket" (K + 1 classes: the cached ids at their full-vocabulary probability, plus the
            tail mass vs the student's mass outside the cached ids) or "renorm" (both renormalized
            over the cached ids). At T != 1 the teacher's bucket takes the student's tail shape
            (see `tails.kd_classes`). With a cache of the whole vocabulary both equal full KL.
        tail_mass: (N,) stored teacher tail mass, or None to use 1 - sum(exp(teacher_logprobs)).

    Returns:
        0-dim: mean over positions of sum_c p_c (log p_c - log q_c).
    """
    return _divergence_rows(forward_kl, student_logits, teacher_ids, teacher_logprobs, temperature, tail, tail_mass,
                            want_metrics, n_rows)


def rkl_rows(student_logits, teacher_ids, teacher_logprobs, *, temperature, tail, tail_mass, want_metrics,
             n_rows=None) -> KDRows:
    """Reverse KL(student || teacher) at temperature T; classes and options as in `kl`.

    Returns:
        0-dim: mean over positions of sum_c q_c (log q_c - log p_c).
    """
    return _divergence_rows(reverse_kl, student_logits, teacher_ids, teacher_logprobs, temperature, tail, tail_mass,
                            want_metrics, n_rows)


def jsd_rows(student_logits, teacher_ids, teacher_logprobs, *, beta, temperature, tail, tail_mass, want_metrics,
             n_rows=None) -> KDRows:
    """GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024) over the cached ids.

    JSD(beta)(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, with P
    the teacher and Q the student, as in the paper and TRL's `generalized_jsd_loss`.
    Classes as in `kl`: tail="renorm" is the cached ids renormalized, "bucket" adds the tail bucket.

    Args:
        beta: 0 < beta < 1 (GKD's endpoints 0 and 1 are `kl` and `rkl` by convention; use those).

    Returns:
        0-dim: mean over positions.
    """
    return _divergence_rows(lambda lt, ls, m: generalized_jsd(lt, ls, m, beta), student_logits, teacher_ids,
                            teacher_logprobs, temperature, tail, tail_mass, want_metrics, n_rows)


def skl_rows(student_logits, teacher_ids, teacher_logprobs, *, alpha, temperature, tail, tail_mass, want_metrics,
             n_rows=None) -> KDRows:
    """DistiLLM's skew KL (Ko et al. 2024): KL(P || alpha P + (1 - alpha) Q), P teacher, Q student.

    DistiLLM's code computes the cross-entropy -sum p log(mix), which differs from this by the
    teacher entropy (a constant: same gradient). This returns the divergence itself, so it is
    >= 0 and 0 when the student equals the teacher. Classes as in `kl`.

    Args:
        alpha: skew, 0 <= alpha < 1 (0 is forward KL).
    """
    return _divergence_rows(lambda lt, ls, m: skew_kl(lt, ls, m, alpha), student_logits, teacher_ids,
                            teacher_logprobs, temperature, tail, tail_mass, want_metrics, n_rows)


def srkl_rows(student_logits, teacher_ids, teacher_logprobs, *, alpha, temperature, tail, tail_mass, want_metrics,
              n_rows=None) -> KDRows:
    """DistiLLM's skew reverse KL: KL(Q || (1 - alpha) P + alpha Q), P teacher, Q student.

    Args:
        alpha: skew, 0 <= alpha < 1 (0 is reverse KL). Classes as in `kl`.
    """
    return _divergence_rows(lambda lt, ls, m: skew_reverse_kl(lt, ls, m, alpha), student_logits, teacher_ids,
                            teacher_logprobs, temperature, tail, tail_mass, want_metrics, n_rows)


def topk_kl_rows(student_logits, teacher_ids, teacher_logprobs, *, temperature, tail_mass, want_metrics,
                 n_rows=None) -> KDRows:
    """Top-K KD: KL(teacher || student) with both renormalized over the cached ids.

    The same as `kl(..., tail="renorm")`; kept under its own name because it is the usual baseline.
    `tail_mass` is accepted for a uniform call and unused.
    """
    return _divergence_rows(forward_kl, student_logits, teacher_ids, teacher_logprobs, temperature, "renorm",
                            tail_mass, want_metrics, n_rows)


def _divergence_rows(divergence, student_logits, teacher_ids, teacher_logprobs, temperature, tail, tail_mass,
                     want_metrics, n_rows) -> KDRows:
    """Shared body of the divergences over `tails.kd_classes`."""
    n, _ = check_logits(student_logits)
    check_teacher(student_logits, teacher_ids, teacher_logprobs, rows=n_rows)
    check_rows("tail_mass", tail_mass, (n if n_rows is None else n_rows,))

    def row_fn(s, labels, ids, t_lp, tau):
        lt, ls, mask, st = kd_classes(s, ids, t_lp, tau, temperature=temperature, tail=tail, labels=labels)
        stats = {"top1_agreement": top1_agreement(s, ids, t_lp, st.row_max)} if want_metrics else {}
        return divergence(lt, ls, mask), st, stats

    return KDRows(row_fn, (teacher_ids, teacher_logprobs, tail_mass))
