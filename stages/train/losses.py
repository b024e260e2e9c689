"""Stage two's losses: train a student against a cache of teacher log-probs.

Every loss has the same shape of call::

    loss = kl(student_logits, teacher_ids, teacher_logprobs, temperature=2.0, metrics=m)

- student_logits: (N, V) bf16/fp16/fp32, the student's logits at the N supervised positions only
  (the caller gathers and aligns them). The only input that gets a gradient.
- teacher_ids: (N, K) integer (int64 or the cache's int32), cached teacher ids sorted by teacher
  log-prob descending; in sample mode unique sampled ids, -1 padding after them.
- teacher_logprobs: (N, K) float32, the teacher's normalized full-vocabulary log-probs at those ids
  (log-softmax at temperature 1). The tail mass is 1 - sum(exp(teacher_logprobs)); pass the cache's
  stored `tail_mass` (N,) to use it instead.

It returns a 0-dim float32 tensor (float64 for float64 logits): the mean over the N positions.
Divergences are returned as they are, without Hinton's T^2 factor (fold it into `kd_weight`),
except in dkd and normkd whose published losses include it. `metrics`, when given a dict, receives
detached 0-dim tensors: "top1_agreement" for every loss that reads teacher ids, plus
"bild_coverage" (bild) and "accuracy" (sft, kd_with_ce). The argmax metrics count a tie for the
largest logit as a hit (see `kd_math.is_row_max`).

Memory: positions are processed `chunk_size` rows at a time (default: about 128 MiB of fp32 per
chunk, see `chunking.CHUNK_ELEMENTS`), and the gradient is formed chunk by chunk into a buffer of
the logits' dtype; no (N, V) fp32 copy of the logits is ever made.

Combining with the label cross entropy: ``total, parts = kd_with_ce("kl", s, ids, lp, y, ...)``
computes ce_weight * CE + kd_weight * KD in one pass over the vocabulary per row (the CE comes
from the KD loss's own normalizer pass) into one gradient buffer, at about the cost of the KD
loss alone; ``kd_total(sft(s, labels=y), kl(s, ids, lp))`` gives the same value and gradient at
the price of a second pass and a second (N, V) gradient.
"""

import inspect
from collections.abc import Callable

import torch

from logitcache.stages.train.chunking import chunk_rows, chunked_mean
from logitcache.stages.train.kd_baselines import (bild, bild_rows, dkd, dkd_rows, nkd, nkd_rows, normkd,
                                                  normkd_rows, uld, uld_rows)
from logitcache.stages.train.kd_math import (compute_dtype, forward_kl, generalized_jsd, reverse_kl, skew_kl,
                                             skew_reverse_kl, split_padding, top1_agreement)
from logitcache.stages.train.kd_rows import KDRows, kd_and_ce, kd_mean, label_cross_entropy
from logitcache.stages.train.loss_inputs import (check_choice, check_chunk_size, check_index, check_logits,
                                                 check_range, check_rows, check_teacher)
from logitcache.stages.train.student_stats import student_stats
from logitcache.stages.train.tails import TAILS, kd_classes
from logitcache.storage.errors import ConfigError

__all__ = [
    "LOSSES", "TAILS", "ULD_KD_WEIGHT", "get_loss", "kd_total", "kd_with_ce",
    "sft", "kl", "rkl", "jsd", "skl", "srkl", "topk_kl", "dkd", "nkd", "normkd", "bild", "uld", "rskd",
]

# ULD's weight in CE + lambda * ULD (Boizard et al. 2024). Applied by the caller via `kd_total`.
ULD_KD_WEIGHT = 1.5


def kd_total(ce: torch.Tensor, kd: torch.Tensor, *, ce_weight: float = 1.0, kd_weight: float = 1.0) -> torch.Tensor:
    """ce_weight * ce + kd_weight * kd, for two 0-dim losses."""
    return ce_weight * ce + kd_weight * kd


def sft(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    *,
    labels: torch.Tensor,
    chunk_size: int | None = None,
    metrics: dict | None = None,
) -> torch.Tensor:
    """Cross-entropy on the labels; the teacher arguments are accepted for a uniform call and unused.

    Args:
        labels: (N,) integer ids in [0, V), the next token at each position.

    Returns:
        0-dim: mean over positions of -log softmax(student_logits)[label]. Metric "accuracy": the
        share of positions whose largest logit is at the label (a tie for the largest counts).
    """
    n, vocab = check_logits(student_logits)
    if labels is None:
        raise ConfigError("sft needs labels=(N,) next-token ids")
    check_rows("labels", labels, (n,), integer=True)
    check_chunk_size(chunk_size)
    want_metrics = metrics is not None

    def row_fn(s, y):
        return label_cross_entropy(s, y, want_metrics=want_metrics)

    return chunked_mean(row_fn, student_logits, labels, rows=chunk_rows(chunk_size, vocab), metrics=metrics)


def kl(student_logits, teacher_ids, teacher_logprobs, *, temperature: float = 1.0, tail: str = "bucket",
       tail_mass: torch.Tensor | None = None, chunk_size: int | None = None, metrics: dict | None = None):
    """Forward KL(teacher || student) at temperature T over the cached ids.

    Args:
        temperature: T > 0; both sides are softmax(logits / T).
        tail: "bucket" (K + 1 classes: the cached ids at their full-vocabulary probability, plus the
            tail mass vs the student's mass outside the cached ids) or "renorm" (both renormalized
            over the cached ids). At T != 1, the bucket's teacher side assumes a flat teacher tail;
            see `tails.kd_classes`. With a cache of the whole vocabulary both equal full KL.
        tail_mass: (N,) stored teacher tail mass, or None to use 1 - sum(exp(teacher_logprobs)).

    Returns:
        0-dim: mean over positions of sum_c p_c (log p_c - log q_c).
    """
    rows = kl_rows(student_logits, teacher_ids, teacher_logprobs, temperature=temperature, tail=tail,
                   tail_mass=tail_mass, want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def rkl(student_logits, teacher_ids, teacher_logprobs, *, temperature: float = 1.0, tail: str = "bucket",
        tail_mass: torch.Tensor | None = None, chunk_size: int | None = None, metrics: dict | None = None):
    """Reverse KL(student || teacher) at temperature T; classes and options as in `kl`.

    Returns:
        0-dim: mean over positions of sum_c q_c (log q_c - log p_c).
    """
    rows = rkl_rows(student_logits, teacher_ids, teacher_logprobs, temperature=temperature, tail=tail,
                   tail_mass=tail_mass, want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def jsd(student_logits, teacher_ids, teacher_logprobs, *, beta: float = 0.5, temperature: float = 1.0,
        tail: str = "bucket", tail_mass: torch.Tensor | None = None, chunk_size: int | None = None,
        metrics: dict | None = None):
    """GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024) over the cached ids.

    JSD(beta)(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, with P
    the teacher and Q the student, as in the paper and TRL's `generalized_jsd_loss`.
    Classes as in `kl`: tail="renorm" is the cached ids renormalized, "bucket" adds the tail bucket.

    Args:
        beta: 0 < beta < 1 (GKD's endpoints 0 and 1 are `kl` and `rkl` by convention; use those).

    Returns:
        0-dim: mean over positions.
    """
    rows = jsd_rows(student_logits, teacher_ids, teacher_logprobs, beta=beta, temperature=temperature, tail=tail,
                    tail_mass=tail_mass, want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def skl(student_logits, teacher_ids, teacher_logprobs, *, alpha: float = 0.1, temperature: float = 1.0,
        tail: str = "bucket", tail_mass: torch.Tensor | None = None, chunk_size: int | None = None,
        metrics: dict | None = None):
    """DistiLLM's skew KL (Ko et al. 2024): KL(P || alpha P + (1 - alpha) Q), P teacher, Q student.

    DistiLLM's code computes the cross-entropy -sum p log(mix), which differs from this by the
    teacher entropy (a constant: same gradient). This returns the divergence itself, so it is
    >= 0 and 0 when the student equals the teacher. Classes as in `kl`.

    Args:
        alpha: skew, 0 <= alpha < 1 (0 is forward KL).
    """
    rows = skl_rows(student_logits, teacher_ids, teacher_logprobs, alpha=alpha, temperature=temperature, tail=tail,
                    tail_mass=tail_mass, want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def srkl(student_logits, teacher_ids, teacher_logprobs, *, alpha: float = 0.1, temperature: float = 1.0,
         tail: str = "bucket", tail_mass: torch.Tensor | None = None, chunk_size: int | None = None,
         metrics: dict | None = None):
    """DistiLLM's skew reverse KL: KL(Q || (1 - alpha) P + alpha Q), P teacher, Q student.

    Args:
        alpha: skew, 0 <= alpha < 1 (0 is reverse KL). Classes as in `kl`.
    """
    rows = srkl_rows(student_logits, teacher_ids, teacher_logprobs, alpha=alpha, temperature=temperature, tail=tail,
                     tail_mass=tail_mass, want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def topk_kl(student_logits, teacher_ids, teacher_logprobs, *, temperature: float = 1.0,
            tail_mass: torch.Tensor | None = None, chunk_size: int | None = None, metrics: dict | None = None):
    """Top-K KD: KL(teacher || student) with both renormalized over the cached ids.

    The same as `kl(..., tail="renorm")`; kept under its own name because it is the usual baseline.
    `tail_mass` is accepted for a uniform call and unused.
    """
    rows = topk_kl_rows(student_logits, teacher_ids, teacher_logprobs, temperature=temperature, tail_mass=tail_mass,
                        want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


def rskd(student_logits, teacher_ids, teacher_logprobs, *, counts: torch.Tensor, temperature: float = 1.0,
         tail_mass: torch.Tensor | None = None, chunk_size: int | None = None, metrics: dict | None = None):
    """Random-sampling KD for sample-mode caches (Anshumann et al. 2025, "Sparse Logit Sampling").

    The teacher is replaced by the empirical distribution of ids drawn from it, which is an
    unbiased estimate of it; the student keeps its full-vocabulary normalizer:

        loss = -sum_i (c_i / sum_j c_j) * log_softmax(student_logits / T)_i

    over the sampled ids i with draw counts c_i. This assumes stage one drew from the teacher at
    temperature 1 (proposal q = p, where the paper's importance weights p/q are all 1); a cache
    drawn from another proposal would need those weights, which this does not apply. It is a
    cross-entropy, so its minimum is the teacher's entropy rather than 0. A row whose counts are
    all 0 contributes 0. `teacher_logprobs` only feeds the top-1 metric; `tail_mass` is unused.

    Args:
        counts: (N, K) draws per id (integer or float), 0 at padding.
        temperature: T > 0 applied to the student.
    """
    rows = rskd_rows(student_logits, teacher_ids, teacher_logprobs, counts=counts, temperature=temperature,
                     tail_mass=tail_mass, want_metrics=metrics is not None)
    return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)


# ---- per-chunk forms (see `kd_rows.KDRows`), run by the public functions above and by `kd_with_ce`.
# Options have no defaults here: the public functions hold them. n_rows: the number of teacher rows
# when it is not the logits' N (kd_with_ce's N_kd).

def kl_rows(student_logits, teacher_ids, teacher_logprobs, *, temperature, tail, tail_mass, want_metrics,
            n_rows=None) -> KDRows:
    return _divergence_rows(forward_kl, student_logits, teacher_ids, teacher_logprobs, temperature, tail, tail_mass,
                            want_metrics, n_rows)


def rkl_rows(student_logits, teacher_ids, teacher_logprobs, *, temperature, tail, tail_mass, want_metrics,
             n_rows=None) -> KDRows:
    return _divergence_rows(reverse_kl, student_logits, teacher_ids, teacher_logprobs, temperature, tail, tail_mass,
                            want_metrics, n_rows)


def jsd_rows(student_logits, teacher_ids, teacher_logprobs, *, beta, temperature, tail, tail_mass, want_metrics,
             n_rows=None) -> KDRows:
    check_range("beta", beta, 0.0, 1.0)
    return _divergence_rows(lambda lt, ls, m: generalized_jsd(lt, ls, m, beta), student_logits, teacher_ids,
                            teacher_logprobs, temperature, tail, tail_mass, want_metrics, n_rows)


def skl_rows(student_logits, teacher_ids, teacher_logprobs, *, alpha, temperature, tail, tail_mass, want_metrics,
             n_rows=None) -> KDRows:
    check_range("alpha", alpha, 0.0, 1.0, low_open=False)
    return _divergence_rows(lambda lt, ls, m: skew_kl(lt, ls, m, alpha), student_logits, teacher_ids,
                            teacher_logprobs, temperature, tail, tail_mass, want_metrics, n_rows)


def srkl_rows(student_logits, teacher_ids, teacher_logprobs, *, alpha, temperature, tail, tail_mass, want_metrics,
              n_rows=None) -> KDRows:
    check_range("alpha", alpha, 0.0, 1.0, low_open=False)
    return _divergence_rows(lambda lt, ls, m: skew_reverse_kl(lt, ls, m, alpha), student_logits, teacher_ids,
                            teacher_logprobs, temperature, tail, tail_mass, want_metrics, n_rows)


def topk_kl_rows(student_logits, teacher_ids, teacher_logprobs, *, temperature, tail_mass, want_metrics,
                 n_rows=None) -> KDRows:
    return _divergence_rows(forward_kl, student_logits, teacher_ids, teacher_logprobs, temperature, "renorm",
                            tail_mass, want_metrics, n_rows)


def rskd_rows(student_logits, teacher_ids, teacher_logprobs, *, counts, temperature, tail_mass, want_metrics,
              n_rows=None) -> KDRows:
    n, _ = check_logits(student_logits)
    n = n if n_rows is None else n_rows
    k = check_teacher(student_logits, teacher_ids, teacher_logprobs, rows=n_rows)
    if counts is None:
        raise ConfigError("rskd needs counts=(N, K) sample counts from a sample-mode cache")
    check_rows("counts", counts, (n, k))
    check_rows("tail_mass", tail_mass, (n,))
    check_range("temperature", temperature, 0.0, float("inf"))

    def row_fn(s, labels, ids, t_lp, c):
        dtype = compute_dtype(s.dtype)
        _, valid = split_padding(ids)
        st = student_stats(s, ids, temperature, labels=labels)
        weights = torch.where(valid, c.to(dtype), 0.0)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        stats = {"top1_agreement": top1_agreement(s, ids, t_lp, st.row_max)} if want_metrics else {}
        return -(weights * (st.x_k - st.lse[:, None])).sum(-1), st, stats

    return KDRows(row_fn, (teacher_ids, teacher_logprobs, counts))


def _divergence_rows(divergence, student_logits, teacher_ids, teacher_logprobs, temperature, tail, tail_mass,
                     want_metrics, n_rows) -> KDRows:
    """Shared body of the divergences over `tails.kd_classes`."""
    n, _ = check_logits(student_logits)
    check_teacher(student_logits, teacher_ids, teacher_logprobs, rows=n_rows)
    check_rows("tail_mass", tail_mass, (n if n_rows is None else n_rows,))
    check_range("temperature", temperature, 0.0, float("inf"))
    check_choice("tail", tail, TAILS)

    def row_fn(s, labels, ids, t_lp, tau):
        lt, ls, mask, st = kd_classes(s, ids, t_lp, tau, temperature=temperature, tail=tail, labels=labels)
        stats = {"top1_agreement": top1_agreement(s, ids, t_lp, st.row_max)} if want_metrics else {}
        return divergence(lt, ls, mask), st, stats

    return KDRows(row_fn, (teacher_ids, teacher_logprobs, tail_mass))


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sft": sft,
    "kl": kl,
    "rkl": rkl,
    "jsd": jsd,
    "skl": skl,
    "srkl": srkl,
    "topk_kl": topk_kl,
    "dkd": dkd,
    "nkd": nkd,
    "normkd": normkd,
    "bild": bild,
    "uld": uld,
    "rskd": rskd,
}


# The per-chunk form of every loss but sft, for `kd_with_ce`.
_ROWS: dict[str, Callable[..., KDRows]] = {
    "kl": kl_rows,
    "rkl": rkl_rows,
    "jsd": jsd_rows,
    "skl": skl_rows,
    "srkl": srkl_rows,
    "topk_kl": topk_kl_rows,
    "dkd": dkd_rows,
    "nkd": nkd_rows,
    "normkd": normkd_rows,
    "bild": bild_rows,
    "uld": uld_rows,
    "rskd": rskd_rows,
}

# Arguments of every KD loss that `kd_with_ce` takes itself rather than as the loss's options.
_RUN_ARGUMENTS = frozenset({"tail_mass", "chunk_size", "metrics"})


def kd_with_ce(
    name: str,
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    kd_select: torch.Tensor | None = None,
    tail_mass: torch.Tensor | None = None,
    chunk_size: int | None = None,
    metrics: dict | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ce_weight * CE(labels) + kd_weight * KD loss `name`, both from one pass over each row's vocabulary.

    The same value and gradient as ``ce_weight * sft(s, labels=y) + kd_weight * loss(s[kd_select], ...)``
    for the rows, at about the cost of the KD loss alone: the cross entropy reuses the KD loss's
    logsumexp (at its temperature T = 1; at T != 1, or for the losses that only gather logits, it
    adds one exp pass per chunk instead of a separate loss), and the gradient of both terms is
    written chunk by chunk into one (N, V) buffer.

    Args:
        name: a KD loss from `LOSSES` (not "sft").
        student_logits: (N, V) student logits at every supervised row.
        teacher_ids, teacher_logprobs: (N_kd, K) the cache rows, as for the loss `name`.
        labels: (N,) integer next-token ids, one per row of `student_logits`.
        ce_weight: >= 0; at 0 the cross entropy is not computed (and not in the parts).
        kd_weight: > 0.
        kd_select: (N_kd,) integer index of each teacher row's row in `student_logits`, unique
            (the collated batch's `kd_select`); None when the teacher rows are the N rows in order.
        tail_mass: (N_kd,) as for the loss `name`.
        chunk_size: rows per chunk, as for every loss.
        metrics: if given, receives the detached means "accuracy" (over the N rows, when
            ce_weight > 0) and the loss's own metrics (over the N_kd rows): top1_agreement,
            bild_coverage.
        **options: the loss's keyword options (temperature, tail, top_k, counts for rskd, ...),
            with the loss's defaults for the ones not given.

    Returns:
        total: 0-dim float32 (float64 for float64 logits): ce_weight * mean CE over the N rows +
            kd_weight * mean KD over the N_kd rows.
        parts: {"kd": mean KD, "ce": mean CE (when ce_weight > 0)}, detached 0-dim.

    Raises:
        ConfigError: "sft" or an unknown loss or option; negative weights.
        InvalidDataError: shapes that do not match.
    """
    loss = get_loss(name)
    if name == "sft":
        raise ConfigError("kd_with_ce: 'sft' has no KD term; use sft(student_logits, labels=labels)")
    if not ce_weight >= 0 or not kd_weight > 0:
        raise ConfigError(f"kd_with_ce: ce_weight={ce_weight} must be >= 0 and kd_weight={kd_weight} > 0")
    n, _ = check_logits(student_logits)
    if labels is None:
        raise ConfigError("kd_with_ce needs labels=(N,) next-token ids")
    check_rows("labels", labels, (n,), integer=True)
    check_index("kd_select", kd_select, n)
    n_kd = None if kd_select is None else kd_select.shape[0]
    params = inspect.signature(loss).parameters
    takes = {p.name for p in params.values() if p.kind is p.KEYWORD_ONLY} - _RUN_ARGUMENTS
    unknown = set(options) - takes
    if unknown:
        raise ConfigError(f"loss {name!r} has no option {', '.join(map(repr, sorted(unknown)))}; "
                          f"it takes {', '.join(sorted(takes)) or 'none'}")
    defaults = {p: None if params[p].default is params[p].empty else params[p].default for p in takes}
    rows = _ROWS[name](student_logits, teacher_ids, teacher_logprobs, tail_mass=tail_mass,
                       want_metrics=metrics is not None, n_rows=n_kd, **{**defaults, **options})
    return kd_and_ce(rows, student_logits, labels, kd_select=kd_select, ce_weight=ce_weight, kd_weight=kd_weight,
                     chunk_size=chunk_size, metrics=metrics)


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss registered under `name`; ConfigError naming the valid ones if there is none."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}") from None
