"""Memory-bounded mean (or weighted sum) of per-position losses over (N, V) student logits.

A distillation loss needs a full-vocabulary normalizer per position, in fp32. Under plain autograd
every fp32 intermediate of every position stays alive until backward, which for N x V logits is
several N x V fp32 tensors. `chunked_mean` walks the positions in chunks instead and, when the
logits need a gradient, differentiates each chunk right away and writes the result into one
gradient buffer of the logits' own dtype. Backward then only scales that buffer. Peak memory is
the logits, their gradient (which autograd would produce anyway), and one chunk's temporaries.
`chunked_sums` does the same for several terms at once (a KD loss and the label cross entropy),
possibly over different rows, so that they share each chunk's pass and one gradient buffer.

The price: the gradient is computed in the forward pass even if backward never runs (so it is
skipped when grad mode is off or the logits do not require grad), and double backward is not
supported. Backward reads grad_output's value (one device sync) to skip scaling by 1.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["CHUNK_ELEMENTS", "chunk_rows", "chunked_mean", "Walk", "chunked_sums"]

# Auto chunk size: rows per chunk so that one fp32 (rows, V) slab is about 128 MiB. Large enough to
# keep a GPU busy per kernel; small enough that a few such temporaries fit beside the logits.
CHUNK_ELEMENTS = 1 << 25

# `row_fn(logits_chunk, *input_chunks) -> (losses, stats)`: losses (n,) float, one per position;
# stats maps a metric name to an (n,) tensor whose mean over all N positions is reported.
RowFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

# `terms_fn(logits_chunk, *input_chunks) -> (terms, stats)`: both map a name to an (n,) tensor,
# one value per position; terms are differentiated, stats are only summed.
TermsFn = Callable[..., tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


class Walk(NamedTuple):
    """One pass of `chunked_sums` over some rows of the logits.

    Attributes:
        terms_fn: per-chunk terms and stats, see `TermsFn`. It must treat rows independently.
        inputs: tensors with one row per visited row (or None), sliced alongside the logits. Constants.
        index: (M,) int64 rows of the logits to visit, in this order; None visits all N in order.
    """

    terms_fn: TermsFn
    inputs: tuple[torch.Tensor | None, ...] = ()
    index: torch.Tensor | None = None


def chunk_rows(chunk_size: int | None, vocab: int) -> int:
    """Rows per chunk: `chunk_size` if given, else as many as fit in `CHUNK_ELEMENTS`."""
    if chunk_size is not None:
        return chunk_size
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def chunked_mean(
    row_fn: RowFn,
    logits: torch.Tensor,
    *row_inputs: torch.Tensor | None,
    rows: int,
    metrics: dict | None = None,
) -> torch.Tensor:
    """Mean over positions of `row_fn`, evaluated `rows` positions at a time.

    Args:
        row_fn: per-chunk loss, see `RowFn`. It must treat rows independently.
        logits: (N, V) float student logits; the only input that receives a gradient.
        *row_inputs: tensors with N rows (or None), sliced alongside `logits`. Constants.
        rows: positions per chunk (>= 1).
        metrics: if given, filled with the mean over positions of every stat `row_fn` returns,
            as detached 0-dim tensors (no device sync here; call `.item()` when logging).

    Returns:
        0-dim tensor, float32 (float64 for float64 logits): mean of the per-position losses.
    """
    def terms_fn(chunk, *inputs):
        losses, stats = row_fn(chunk, *inputs)
        return {"loss": losses}, stats

    n = logits.shape[0]
    loss, _, stats = chunked_sums(logits, [Walk(terms_fn, row_inputs)], rows=rows, weights={"loss": 1.0 / n})
    if metrics is not None:
        metrics.update({name: total / n for name, total in stats.items()})
    return loss


def chunked_sums(
    logits: torch.Tensor,
    walks: list[Walk],
    *,
    rows: int,
    weights: dict[str, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weighted sum of per-position terms over one or more walks, `rows` positions at a time.

    The general form of `chunked_mean`: several named terms (e.g. a KD term on the rows that have
    teacher targets and a cross entropy on every row) share each chunk's pass over the vocabulary,
    and their gradients go into one buffer.

    Args:
        logits: (N, V) float student logits; the only input that receives a gradient.
        walks: together they must visit every row of `logits` exactly once (the gradient buffer
            is not zeroed; a row no term reads gets a zero gradient from its walk).
        rows: positions per chunk (>= 1).
        weights: the factor of each term's sum in the total, e.g. 1 / N for a mean.

    Returns:
        total: 0-dim, float32 (float64 for float64 logits): sum over terms of weight * sum of the term.
        term_sums: {term: detached 0-dim sum over the rows that returned it}.
        stat_sums: {stat: detached 0-dim sum}.
    """
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    term_sums: dict[str, torch.Tensor] = {}
    stat_sums: dict[str, torch.Tensor] = {}

    def run(x):
        return _run_chunks(x, walks, rows, weights, term_sums, stat_sums, want_grad=want_grad)

    if want_grad:
        total = _WithGradient.apply(logits, run)
    else:
        total, _ = run(logits.detach())
    return total, term_sums, stat_sums


def _run_chunks(logits, walks, rows, weights, term_sums, stat_sums, *, want_grad):
    """Returns (total, gradient of the total w.r.t. logits or None)."""
    n = logits.shape[0]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    # With several chunks, each chunk's gradient is copied into one buffer; a single chunk's
    # gradient is the buffer.
    whole = len(walks) == 1 and walks[0].index is None and rows >= n
    grad = torch.empty_like(logits) if want_grad and not whole else None
    total = logits.new_zeros((), dtype=dtype)
    for walk in walks:
        m = n if walk.index is None else walk.index.shape[0]
        for start in range(0, m, rows):
            part = slice(start, start + rows)
            where = part if walk.index is None else walk.index[part]
            chunk = (logits[part] if walk.index is None else logits.index_select(0, where)).detach()
            chunk.requires_grad_(want_grad)
            inputs = [x[part] if isinstance(x, torch.Tensor) else x for x in walk.inputs]
            with torch.set_grad_enabled(want_grad):
                terms, row_stats = walk.terms_fn(chunk, *inputs)
                sums = {name: value.sum() for name, value in terms.items()}
                # Weighted in fp32 before the gradient's cast back to the logits' dtype.
                chunk_total = sum((weights[name] * value for name, value in sums.items()), total.new_zeros(()))
                if want_grad:
                    if chunk_total.requires_grad:
                        (g,) = torch.autograd.grad(chunk_total, chunk, allow_unused=True, materialize_grads=True)
                    else:  # rows no term reads
                        g = torch.zeros_like(chunk)
                    if grad is None:
                        grad = g
                    elif walk.index is None:
                        grad[part] = g
                    else:
                        grad.index_copy_(0, where, g)
            total = total + chunk_total.detach()
            for name, value in sums.items():
                _add(term_sums, name, value.detach())
            for name, value in row_stats.items():
                _add(stat_sums, name, value.detach().to(dtype).sum())
    return total, grad


def _add(sums: dict, name: str, value: torch.Tensor) -> None:
    sums[name] = sums[name] + value if name in sums else value


class _WithGradient(torch.autograd.Function):
    """Returns `run(logits)`'s total; its gradient was already formed by `run` in the forward."""

    @staticmethod
    def forward(ctx, logits, run):
        total, grad = run(logits)
        # Saved (not kept as an attribute) so autograd frees it as soon as backward has run; a leaf
        # then takes the returned tensor as its .grad without a copy.
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # The usual grad_output is exactly 1 (the loss is the root, or weighted by 1): hand the
        # buffer over instead of allocating a scaled copy of it. Reading the value syncs a GPU
        # once per step, which costs far less than an extra (N, V) tensor at the memory peak.
        if not bool(grad_output == 1):
            grad = grad * grad_output.to(grad.dtype)
        return grad, None
