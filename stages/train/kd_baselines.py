"""Published logit-distillation losses adapted to a top-K cache: DKD, NKD, NormKD, BiLD, ULD.

DKD, NKD and NormKD come from image classification, where the classes are the whole label set.
Here the classes are the cached ids of each position: teacher and student are both renormalized
over them (exact for the teacher, whose cached log-probs are logits minus a row constant), so
with a cache of the whole vocabulary they are the published losses over the vocabulary. Their
"target class" is the teacher's top-1 cached id, not the label: the label is often outside the
cached ids while the teacher's top-1 never is (BiLD's LLM version of NKD makes the same choice).

Call convention and return value: see `losses`. Each loss `x` is `kd_rows.kd_mean` of `x_rows`,
its per-chunk form (options without defaults: the public function holds them), which
`losses.kd_with_ce` also runs fused with the label cross entropy.
"""

import math

import torch

from logitcache.stages.train.kd_math import (compute_dtype, forward_kl, masked_log_softmax, masked_logsumexp,
                                             split_padding, teacher_tail_mass, teacher_top1, top1_agreement,
                                             uncovered_logprob)
from logitcache.stages.train.kd_rows import KDRows, kd_mean
from logitcache.stages.train.loss_inputs import check_logits, check_range, check_rows, check_teacher
from logitcache.stages.train.student_stats import student_stats
from logitcache.storage.errors import ConfigError

__all__ = ["dkd", "nkd", "normkd", "bild", "uld", "dkd_rows", "nkd_rows", "normkd_rows", "bild_rows", "uld_rows"]

_POSITIVE = (0.0, math.inf)


def dkd(student_logits, teacher_ids, teacher_logprobs, *, alpha: float = 1.0, beta: float = 8.0,
        temperature: float = 1.0, tail_mass: torch.Tensor | None = None, chunk_size: int | None = None,
        metrics: dict | None = None):
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, times T^2 as in the paper's code.

    Over the cached ids as classes, target = the teacher's top-1 cached id (see module docstring):
    TCKD is KL between the binary (target, rest) distributions, NCKD is KL between the distributions
    over the non-target cached ids, each renormalized; all at temperature T.
    `tail_mass` is accepted for a uniform call and unused.

    Args:
        alpha, beta: TCKD and NCKD weights (the paper's CIFAR defaults 1 and 8).
        temperature: T > 0.
    """
    rows = dkd_rows(student_logits, teacher_ids, teacher_logprobs, alpha=alpha, beta=beta, temperature=temperature,
                    tail_mass=tail_mass, want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def dkd_rows(student_logits, teacher_ids, teacher_logprobs, *, alpha, beta, temperature, tail_mass, want_metrics,
             n_rows=None) -> KDRows:
    """`dkd` per chunk, for N_kd = `n_rows` teacher rows (default: the logits' N)."""
    _check(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows, min_k=2)
    check_range("temperature", temperature, *_POSITIVE)

    def row_fn(s, labels, ids, t_lp):
        dtype = compute_dtype(s.dtype)
        _, valid = split_padding(ids)
        lt = masked_log_softmax(t_lp.to(dtype) / temperature, valid)
        st = student_stats(s, ids, temperature, normalizers=False, labels=labels)
        ls = masked_log_softmax(st.x_k, valid)
        target = teacher_top1(ids, t_lp)[:, None]
        other = valid.scatter(1, target, False)
        # log(1 - p_target) as the log of the other classes' mass: no cancellation near p = 1.
        lt_rest, has_rest = masked_logsumexp(lt, other)
        ls_rest, _ = masked_logsumexp(ls, other)
        binary_mask = torch.stack([torch.ones_like(has_rest), has_rest], dim=1)
        tckd = forward_kl(torch.stack([lt.gather(1, target)[:, 0], lt_rest], 1),
                          torch.stack([ls.gather(1, target)[:, 0], ls_rest], 1), binary_mask)
        nckd = forward_kl(lt - lt_rest[:, None], ls - ls_rest[:, None], other)
        return (alpha * tckd + beta * nckd) * temperature**2, st, _agreement(want_metrics, s, ids, t_lp, st)

    return KDRows(row_fn, (teacher_ids, teacher_logprobs))


def nkd(student_logits, teacher_ids, teacher_logprobs, *, gamma: float = 1.5, temperature: float = 1.0,
        tail_mass: torch.Tensor | None = None, chunk_size: int | None = None, metrics: dict | None = None):
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
    rows = nkd_rows(student_logits, teacher_ids, teacher_logprobs, gamma=gamma, temperature=temperature,
                    tail_mass=tail_mass, want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def nkd_rows(student_logits, teacher_ids, teacher_logprobs, *, gamma, temperature, tail_mass, want_metrics,
             n_rows=None) -> KDRows:
    """`nkd` per chunk, for N_kd = `n_rows` teacher rows (default: the logits' N)."""
    _check(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows, min_k=2)
    check_range("temperature", temperature, *_POSITIVE)

    def row_fn(s, labels, ids, t_lp):
        dtype = compute_dtype(s.dtype)
        _, valid = split_padding(ids)
        st = student_stats(s, ids, normalizers=False, labels=labels)
        t_lp, s_k = t_lp.to(dtype), st.x_k
        target = teacher_top1(ids, t_lp)[:, None]
        other = valid.scatter(1, target, False)
        lt = masked_log_softmax(t_lp, valid).gather(1, target)[:, 0]
        ls = masked_log_softmax(s_k, valid).gather(1, target)[:, 0]
        lt_n = masked_log_softmax(t_lp / temperature, other)
        ls_n = masked_log_softmax(s_k / temperature, other)
        non_target = torch.where(other, lt_n.exp() * ls_n, 0.0).sum(-1)
        return -lt.exp() * ls - gamma * temperature**2 * non_target, st, _agreement(want_metrics, s, ids, t_lp, st)

    return KDRows(row_fn, (teacher_ids, teacher_logprobs))


def normkd(student_logits, teacher_ids, teacher_logprobs, *, t_norm: float = 1.5,
           tail_mass: torch.Tensor | None = None, chunk_size: int | None = None, metrics: dict | None = None):
    """NormKD (Chi et al. 2023): KD with a per-position temperature from the logits' spread.

    Each side gets T = t_norm * std(its logits over the cached ids) (unbiased std, floored at 1e-6;
    the student's T is differentiated through, as in the paper's code), and

        loss = KL(softmax(z_t / T_t) || softmax(z_s / T_s)) * T_t^2

    over the cached ids. The teacher's cached log-probs have the logits' std. `tail_mass` unused.

    Args:
        t_norm: T_norm > 0 (1.5, BiLD's setting for LLMs).
    """
    rows = normkd_rows(student_logits, teacher_ids, teacher_logprobs, t_norm=t_norm, tail_mass=tail_mass,
                       want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def normkd_rows(student_logits, teacher_ids, teacher_logprobs, *, t_norm, tail_mass, want_metrics,
                n_rows=None) -> KDRows:
    """`normkd` per chunk, for N_kd = `n_rows` teacher rows (default: the logits' N)."""
    _check(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows, min_k=2)
    check_range("t_norm", t_norm, *_POSITIVE)

    def row_fn(s, labels, ids, t_lp):
        dtype = compute_dtype(s.dtype)
        _, valid = split_padding(ids)
        st = student_stats(s, ids, normalizers=False, labels=labels)
        z_t, z_s = t_lp.to(dtype), st.x_k
        t_t = t_norm * _masked_std(z_t, valid)
        t_s = t_norm * _masked_std(z_s, valid)
        lt = masked_log_softmax(z_t / t_t[:, None], valid)
        ls = masked_log_softmax(z_s / t_s[:, None], valid)
        return forward_kl(lt, ls, valid) * t_t**2, st, _agreement(want_metrics, s, ids, t_lp, st)

    return KDRows(row_fn, (teacher_ids, teacher_logprobs))


def bild(student_logits, teacher_ids, teacher_logprobs, *, top_k: int = 8, temperature: float = 3.0,
         tail_mass: torch.Tensor | None = None, chunk_size: int | None = None, metrics: dict | None = None):
    """Bi-directional Logits Difference loss (Li et al. 2024): teacher-led + student-led halves.

    In each half, take that side's top-k ids in its own rank order, gather both models' logits
    there, form the k(k-1)/2 differences z_i - z_j (i < j) divided by T, softmax over the pairs for
    each model, and take KL(teacher || student). Cached log-probs are logits minus a row constant,
    so the teacher's differences are exact.

    - Teacher-led: the first k cached ids (the cache is sorted by teacher log-prob). Where they
      include -1 padding, only the pairs of the valid ones (a row with one valid id adds 0).
    - Student-led: the student's top-k, taken on the raw logits (no fp32 copy). The teacher's value
      at an id in the cache is the cached one; at an id outside it, the estimate
      log(tail_mass / (V - K)), i.e. the tail spread evenly over the uncovered vocabulary, clamped
      to be <= the smallest cached log-prob. Metric "bild_coverage": the share of the student's
      top-k ids found in the cache (1.0 for a full-vocabulary cache).

    Args:
        top_k: k >= 2, at most the number of cached ids K.
        temperature: T > 0 (the paper's 3.0).
        tail_mass: (N,) stored tail mass for the estimate, or None for 1 - sum(exp(teacher_logprobs)).

    Returns:
        0-dim: mean teacher-led KL + mean student-led KL.
    """
    rows = bild_rows(student_logits, teacher_ids, teacher_logprobs, top_k=top_k, temperature=temperature,
                     tail_mass=tail_mass, want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def bild_rows(student_logits, teacher_ids, teacher_logprobs, *, top_k, temperature, tail_mass, want_metrics,
              n_rows=None) -> KDRows:
    """`bild` per chunk, for N_kd = `n_rows` teacher rows (default: the logits' N)."""
    vocab, k_cached = _check(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows)
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

    def row_fn(s, labels, ids, t_lp, tau):
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
        estimate = uncovered_logprob(t_lp, valid, teacher_tail_mass(t_lp, valid, tau), vocab)
        t_vals = torch.where(found, t_lp.gather(1, column), estimate[:, None])
        student_led = pair_kl(t_vals, s_vals)

        stats = {}
        if want_metrics:
            stats = {"bild_coverage": found.to(dtype).mean(-1), **_agreement(want_metrics, s, ids, t_lp, st)}
        return teacher_led + student_led, st, stats

    return KDRows(row_fn, (teacher_ids, teacher_logprobs, tail_mass))


def uld(student_logits, teacher_ids, teacher_logprobs, *, tail_mass: torch.Tensor | None = None,
        chunk_size: int | None = None, metrics: dict | None = None):
    """Universal Logit Distillation loss (Boizard et al. 2024): L1 between sorted probability vectors.

    Per position: sort each side's probabilities descending, zero-pad to a common length, and sum
    |p_teacher - p_student|. Works across tokenizers: the caller aligns teacher and student
    positions; ids only mark padding and are never looked up in the student's vocabulary (V may
    differ from the teacher's). Train with CE + ULD_KD_WEIGHT * uld (see `losses.kd_total`).

    Teacher side: the K cached probabilities followed by zeros; the tail mass is dropped. The true
    sorted tail (entries <= p_K summing to tail_mass) is unknown; zeros change the loss by at most
    tail_mass (triangle inequality) and are exact for a full-vocabulary cache. Appending the tail as
    one entry instead would set a sum against a single sorted student probability, which is not
    what the loss compares. With zeros, the terms past K are the student's probabilities there, so
    their sum is 1 - (student's top-K mass) and the student's vocabulary is never sorted: only
    top-min(K, V) on its raw logits. Consequence: the student is pushed to put no mass beyond its
    K-th most likely token. `tail_mass` is accepted for a uniform call and unused.
    """
    rows = uld_rows(student_logits, teacher_ids, teacher_logprobs, tail_mass=tail_mass,
                    want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def uld_rows(student_logits, teacher_ids, teacher_logprobs, *, tail_mass, want_metrics, n_rows=None) -> KDRows:
    """`uld` per chunk, for N_kd = `n_rows` teacher rows (default: the logits' N). No metric of its own."""
    vocab, k_cached = _check(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows, same_vocab=False)
    m = min(k_cached, vocab)

    def row_fn(s, labels, ids, t_lp):
        dtype = compute_dtype(s.dtype)
        p_t = torch.where(ids >= 0, t_lp.to(dtype).exp(), 0.0).sort(-1, descending=True).values
        top_ids = s.detach().topk(m, dim=-1).indices
        st = student_stats(s, top_ids, labels=labels)
        p_s = (st.x_k - st.lse[:, None]).exp()
        l1 = (p_t[:, :m] - p_s).abs().sum(-1) + p_t[:, m:].sum(-1) + (1.0 - p_s.sum(-1))
        return l1, st, {}

    return KDRows(row_fn, (teacher_ids, teacher_logprobs))


def _check(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows, *, min_k=1, same_vocab=True):
    """Checks the inputs for N_kd = `n_rows` teacher rows (None: the logits' N); returns (V, K)."""
    n, vocab = check_logits(student_logits)
    k = check_teacher(student_logits, teacher_ids, teacher_logprobs, same_vocab=same_vocab, rows=n_rows)
    check_rows("tail_mass", tail_mass, (n if n_rows is None else n_rows,))
    if k < min_k:
        raise ConfigError(f"this loss splits target from non-target classes and needs K >= {min_k} cached ids, "
                          f"got K = {k}")
    return vocab, k


def _masked_std(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the masked-in entries of each row, floored at 1e-6; (n,)."""
    count = mask.sum(-1).to(z.dtype)
    mean = torch.where(mask, z, 0.0).sum(-1) / count
    var = torch.where(mask, (z - mean[:, None]) ** 2, 0.0).sum(-1) / (count - 1).clamp_min(1.0)
    # Floor before the sqrt: sqrt's gradient at 0 is infinite.
    return var.clamp_min(1e-12).sqrt()


def _agreement(want_metrics, s, ids, t_lp, st) -> dict:
    return {"top1_agreement": top1_agreement(s, ids, t_lp, st.row_max)} if want_metrics else {}
