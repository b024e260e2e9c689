"""ULD, Universal Logit Distillation (Boizard et al. 2024): works across tokenizers."""

import torch

from logitcache.stages.train.losses.fused import KDRows
from logitcache.stages.train.losses.inputs import check_cache_rows
from logitcache.stages.train.losses.rowmath import compute_dtype
from logitcache.stages.train.losses.student_stats import student_stats

__all__ = ["uld_rows"]


def uld_rows(student_logits, teacher_ids, teacher_logprobs, *, tail_mass, want_metrics, n_rows=None) -> KDRows:
    """Universal Logit Distillation loss (Boizard et al. 2024): L1 between sorted probability vectors.

    Per position: sort each side's probabilities descending, zero-pad to a common length, and sum
    |p_teacher - p_student|. Works across tokenizers: the caller aligns teacher and student
    positions; ids only mark padding and are never looked up in the student's vocabulary (V may
    differ from the teacher's). Default weights CE 1 + ULD 1.5, the paper's lambda (see `registry`).

    The cache holds the teacher's top K; beyond them only its tail mass tau is known. With
    m = min(K, V) the loss is

        sum_{r <= m} |p_t(r) - p_s(r)| + |(teacher mass past rank m) - (student mass past rank m)|

    the ranks past m compared as one mass each: the teacher's is tau plus any cached entries past
    m, the student's its exact mass outside its own top m (no vocabulary sort: a top-m on the raw
    logits). A row with -1 padding (ids of a padded logits width, folded into the tail) uses its number of
    valid ids for K. Sample-mode caches are refused (see `registry`): sorted draws are not top ranks. This is a
    lower bound of ULD on the full distributions (triangle inequality), equal to it when the cache
    covers the vocabulary, or when the teacher's K >= the student's V. At student = teacher every
    term is 0, so the teacher is the loss's minimum (an L1 distance: a zero subgradient there).
    Dropping the tail instead (zeros past K, what zero-padding a top-K teacher does) charged the
    teacher itself twice its tail mass and charged a sharper student less: training pushed
    students to put all their mass in their top K, and nothing pulled an over-confident one back.

    Args:
        tail_mass: (N,) stored teacher tail mass, or None for 1 - sum(exp(teacher_logprobs)).
    """
    vocab, k_cached = check_cache_rows(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows,
                                       same_vocab=False)
    m = min(k_cached, vocab)

    def row_fn(s, labels, ids, t_lp, tau):
        dtype = compute_dtype(s.dtype)
        p_t = torch.where(ids >= 0, t_lp.to(dtype).exp(), 0.0).sort(-1, descending=True).values
        tau = (1.0 - p_t.sum(-1)).clamp_min(0.0) if tau is None else tau.to(dtype)
        top_ids = s.detach().topk(m, dim=-1).indices
        st = student_stats(s, top_ids, labels=labels)
        p_s = (st.x_k - st.lse[:, None]).exp()
        # A row with -1 padding compares only its valid ranks; the rest join the mass past them.
        ranked = torch.arange(m, device=ids.device)[None, :] < (ids >= 0).sum(-1, keepdim=True)
        s_past = (st.tail_lse - st.lse).exp() + torch.where(ranked, 0.0, p_s).sum(-1)
        t_past = tau + torch.where(ranked, 0.0, p_t[:, :m]).sum(-1) + p_t[:, m:].sum(-1)
        l1 = torch.where(ranked, (p_t[:, :m] - p_s).abs(), 0.0).sum(-1) + (t_past - s_past).abs()
        return l1, st, {}

    return KDRows(row_fn, (teacher_ids, teacher_logprobs, tail_mass))
