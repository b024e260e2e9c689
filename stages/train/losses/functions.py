"""The public loss functions, built from the declarations in `registry`, and `kd_with_ce`."""


import inspect
from collections.abc import Callable, Mapping

import torch

from logitcache.stages.train.losses import registry
from logitcache.stages.train.losses.chunking import chunk_rows, chunked_mean
from logitcache.stages.train.losses.fused import KDRows, kd_and_ce, kd_mean, label_cross_entropy
from logitcache.stages.train.losses.inputs import check_chunk_size, check_index, check_logits, check_rows
from logitcache.storage.errors import ConfigError

__all__ = ["LOSSES", "get_loss", "kd_with_ce", "sft"]


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
        name: a KD loss declared in `registry.LOSSES` (not "sft").
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
    spec = registry.get(name)
    if spec.rows is None:
        raise ConfigError(f"kd_with_ce: {name!r} has no KD term; use sft(student_logits, labels=labels)")
    if not ce_weight >= 0 or not kd_weight > 0:
        raise ConfigError(f"kd_with_ce: ce_weight={ce_weight} must be >= 0 and kd_weight={kd_weight} > 0")
    n, _ = check_logits(student_logits)
    if labels is None:
        raise ConfigError("kd_with_ce needs labels=(N,) next-token ids")
    check_rows("labels", labels, (n,), integer=True)
    check_index("kd_select", kd_select, n)
    n_kd = None if kd_select is None else kd_select.shape[0]
    rows = _rows(spec, student_logits, teacher_ids, teacher_logprobs, tail_mass, metrics, n_kd, options)
    return kd_and_ce(rows, student_logits, labels, kd_select=kd_select, ce_weight=ce_weight, kd_weight=kd_weight,
                     chunk_size=chunk_size, metrics=metrics)


def _rows(spec, student_logits, teacher_ids, teacher_logprobs, tail_mass, metrics, n_rows, given) -> KDRows:
    """The `KDRows` of loss `spec` with its options checked and defaulted (see `registry.Loss.resolve`)."""
    given = dict(given)
    inputs = {name: given.pop(name, None) for name in spec.inputs()}
    options = spec.resolve(given)
    return spec.row_function()(student_logits, teacher_ids, teacher_logprobs, tail_mass=tail_mass,
                               want_metrics=metrics is not None, n_rows=n_rows, **inputs, **options)


def _public(spec):
    """The loss `spec` as a function of the whole (N, V) logits, documented by its row function."""
    def loss(student_logits, teacher_ids, teacher_logprobs, *, tail_mass=None, chunk_size=None, metrics=None,
             **options):
        rows = _rows(spec, student_logits, teacher_ids, teacher_logprobs, tail_mass, metrics, None, options)
        return kd_mean(rows, student_logits, chunk_size=chunk_size, metrics=metrics)

    loss.__name__ = loss.__qualname__ = spec.name
    loss.__doc__ = spec.row_function().__doc__
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for p in ("student_logits", "teacher_ids", "teacher_logprobs")]
    params += [inspect.Parameter(name, keyword) for name in spec.batch_inputs]
    params += [inspect.Parameter(name, keyword, default=None) for name in spec.optional_inputs]
    params += [inspect.Parameter(o.name, keyword, default=o.default) for o in spec.options]
    params += [inspect.Parameter(p, keyword, default=None) for p in ("tail_mass", "chunk_size", "metrics")]
    loss.__signature__ = inspect.Signature(params)
    return loss


class _Public(Mapping):
    """Every declared loss as a function of the (N, V) logits, built from its declaration on first use.

    A view of `registry.LOSSES`, not a copy: a loss declared there later is here too.
    """

    def __init__(self):
        self._built: dict[int, Callable[..., torch.Tensor]] = {}

    def __getitem__(self, name: str) -> Callable[..., torch.Tensor]:
        spec = registry.LOSSES[name]
        if spec.rows is None:
            return sft
        if id(spec) not in self._built:
            self._built[id(spec)] = _public(spec)
        return self._built[id(spec)]

    def __iter__(self):
        return iter(registry.LOSSES)

    def __len__(self) -> int:
        return len(registry.LOSSES)


LOSSES: Mapping[str, Callable[..., torch.Tensor]] = _Public()


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss declared under `name`; ConfigError naming the valid ones if there is none."""
    registry.get(name)
    return LOSSES[name]
