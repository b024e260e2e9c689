"""A cached KD loss as a per-chunk function, run alone or fused with the label cross entropy.

Each KD loss builds a `KDRows`: what it computes for one chunk of student rows, and its per-row
inputs. `kd_mean` runs it alone (the losses' public functions). `kd_and_ce` runs it together with
the labels' cross entropy: the KD loss hands its labels to `student_stats`, which takes the cross
entropy from the same pass over the vocabulary as the KD normalizers and writes the gradient of
both into one buffer, so CE + KD costs about what KD alone costs.

Rows. The cross entropy is over all N supervised rows, the KD term over the N_kd <= N rows that
have teacher targets, `kd_select` naming them. The teacher rows are walked fused; the others get
the cross entropy alone, each row's pass still made once.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch

from logitcache.stages.train.losses.chunking import Walk, chunk_rows, chunked_mean, chunked_sums
from logitcache.stages.train.losses.rowmath import is_row_max
from logitcache.stages.train.losses.inputs import check_chunk_size
from logitcache.stages.train.losses.student_stats import StudentStats, student_stats

__all__ = ["KDRows", "kd_mean", "kd_and_ce", "label_cross_entropy"]


class KDRows(NamedTuple):
    """One KD loss, ready to run over chunks of rows.

    Attributes:
        row_fn: `row_fn(s, labels, *inputs) -> (kd, st, stats)`. s: (n, V) logits chunk; labels:
            (n,) ids or None; inputs: chunks of `inputs`. Returns kd (n,) the loss per row, st the
            `StudentStats` of its `student_stats` call (made with `labels`, so st.ce is the
            labels' cross entropy), stats {metric: (n,)} (empty unless metrics were asked for).
        inputs: (N_kd, ...) tensors or None, one row per teacher row.
    """

    row_fn: Callable[..., tuple[torch.Tensor, StudentStats, dict[str, torch.Tensor]]]
    inputs: tuple[torch.Tensor | None, ...]


def kd_mean(rows: KDRows, student_logits: torch.Tensor, *, chunk_size: int | None,
            metrics: dict | None) -> torch.Tensor:
    """Mean over the rows of the KD loss alone; `student_logits` (N_kd, V). See `chunking.chunked_mean`."""
    check_chunk_size(chunk_size)
    def row_fn(s, *inputs):
        kd, _, stats = rows.row_fn(s, None, *inputs)
        return kd, stats

    return chunked_mean(row_fn, student_logits, *rows.inputs, rows=chunk_rows(chunk_size, student_logits.shape[1]),
                        metrics=metrics)


def label_cross_entropy(s: torch.Tensor, labels: torch.Tensor, *, want_metrics: bool):
    """Per-row cross entropy of a chunk: ((n,) losses, {"accuracy": (n,)} or {}). s: (n, V); labels: (n,)."""
    st = student_stats(s, labels[:, None])
    stats = {"accuracy": is_row_max(s, labels, st.row_max)} if want_metrics else {}
    return st.lse - st.x_k[:, 0], stats


def kd_and_ce(
    rows: KDRows,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kd_select: torch.Tensor | None,
    ce_weight: float,
    kd_weight: float,
    chunk_size: int | None,
    metrics: dict | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ce_weight * mean CE over N rows + kd_weight * mean KD over N_kd rows, in one pass per row.

    Args:
        rows: the KD loss, built for the N_kd teacher rows.
        student_logits: (N, V). labels: (N,) integer ids.
        kd_select: (N_kd,) integer unique row of `student_logits` of each teacher row; None: row i.
            With N_kd = 0 the total is the cross entropy alone and the parts hold no "kd".
        ce_weight: >= 0; at 0 the cross entropy is not computed and not in the parts.
        kd_weight: > 0.

    Returns:
        total (0-dim), and {"kd": mean KD, "ce": mean CE} detached. `metrics` gets the mean of
        each stat: accuracy over the N rows, the KD loss's own over the N_kd rows.
    """
    check_chunk_size(chunk_size)
    n, vocab = student_logits.shape
    n_kd = n if kd_select is None else kd_select.shape[0]
    want_metrics = metrics is not None
    with_ce = bool(ce_weight)

    def fused(s, y, *inputs):
        kd, st, stats = rows.row_fn(s, y if with_ce else None, *inputs)
        terms = {"kd": kd}
        if with_ce:
            terms["ce"] = st.ce
            if want_metrics:
                stats["accuracy"] = is_row_max(s, y, st.row_max)
        return terms, stats

    def ce_alone(s, y):
        if not with_ce:  # rows outside the KD term, which no term reads: gradient 0
            return {}, {}
        ce, stats = label_cross_entropy(s, y, want_metrics=want_metrics)
        return {"ce": ce}, stats

    if kd_select is None:
        walks = [Walk(fused, (labels, *rows.inputs))]
    else:
        kd_select = kd_select.long()
        others = torch.ones(n, dtype=torch.bool, device=student_logits.device)
        others[kd_select] = False
        others = others.nonzero()[:, 0]  # one device sync
        walks = [Walk(fused, (labels[kd_select], *rows.inputs), index=kd_select)] if n_kd else []
        if others.shape[0]:
            walks.append(Walk(ce_alone, (labels[others],), index=others))
    weights = {"ce": ce_weight / n, "kd": kd_weight / max(n_kd, 1)}
    total, sums, stats = chunked_sums(student_logits, walks, rows=chunk_rows(chunk_size, vocab), weights=weights)
    parts = {"kd": sums["kd"] / n_kd} if n_kd else {}
    if with_ce:
        parts["ce"] = sums["ce"] / n
    if metrics is not None:
        metrics.update({name: value / (n if name == "accuracy" else n_kd) for name, value in stats.items()})
    return total, parts
