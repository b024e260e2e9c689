"""Memory-bounded mean of a per-position loss over (N, V) student logits.

A distillation loss needs a full-vocabulary normalizer per position, in fp32. Under plain autograd
every fp32 intermediate of every position stays alive until backward, which for N x V logits is
several N x V fp32 tensors. `chunked_mean` walks the positions in chunks instead and, when the
logits need a gradient, differentiates each chunk right away and writes the result into one
gradient buffer of the logits' own dtype. Backward then only scales that buffer. Peak memory is
the logits, their gradient (which autograd would produce anyway), and one chunk's temporaries.

The price: the gradient is computed in the forward pass even if backward never runs (so it is
skipped when grad mode is off or the logits do not require grad), and double backward is not
supported. Backward reads grad_output's value (one device sync) to skip scaling by 1.
"""

from collections.abc import Callable

import torch

__all__ = ["CHUNK_ELEMENTS", "chunk_rows", "chunked_mean"]

# Auto chunk size: rows per chunk so that one fp32 (rows, V) slab is about 128 MiB. Large enough to
# keep a GPU busy per kernel; small enough that a few such temporaries fit beside the logits.
CHUNK_ELEMENTS = 1 << 25

# `row_fn(logits_chunk, *input_chunks) -> (losses, stats)`: losses (n,) float, one per position;
# stats maps a metric name to an (n,) tensor whose mean over all N positions is reported.
RowFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


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
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    stats: dict[str, torch.Tensor] = {}
    if want_grad:
        loss = _ChunkedMean.apply(logits, row_fn, rows, stats, *row_inputs)
    else:
        loss, _ = _run_chunks(logits.detach(), row_fn, rows, stats, row_inputs, want_grad=False)
    if metrics is not None:
        metrics.update({name: total / logits.shape[0] for name, total in stats.items()})
    return loss


def _run_chunks(logits, row_fn, rows, stats, row_inputs, *, want_grad):
    """Returns (mean loss, gradient of the mean w.r.t. logits or None)."""
    n = logits.shape[0]
    # With several chunks, each chunk's gradient is copied into one buffer; a single chunk's
    # gradient is the buffer.
    grad = torch.empty_like(logits) if want_grad and rows < n else None
    total = None
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        chunk = logits[part].detach().requires_grad_(want_grad)
        inputs = [x[part] if isinstance(x, torch.Tensor) else x for x in row_inputs]
        with torch.set_grad_enabled(want_grad):
            losses, row_stats = row_fn(chunk, *inputs)
            chunk_total = losses.sum()
            if want_grad:
                # Differentiate the chunk's share of the mean, so the 1/N scaling happens in fp32
                # before the cast back to the logits' dtype.
                (g,) = torch.autograd.grad(chunk_total / n, chunk, allow_unused=True, materialize_grads=True)
                if grad is None:
                    grad = g
                else:
                    grad[part] = g
        chunk_total = chunk_total.detach()
        total = chunk_total if total is None else total + chunk_total
        for name, value in row_stats.items():
            value = value.detach().to(chunk_total.dtype).sum()
            stats[name] = stats[name] + value if name in stats else value
    return total / n, grad


class _ChunkedMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, row_fn, rows, stats, *row_inputs):
        loss, grad = _run_chunks(logits, row_fn, rows, stats, row_inputs, want_grad=True)
        # Saved (not kept as an attribute) so autograd frees it as soon as backward has run; a leaf
        # then takes the returned tensor as its .grad without a copy.
        ctx.save_for_backward(grad)
        ctx.n_inputs = len(row_inputs)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # The usual grad_output is exactly 1 (the loss is the root, or weighted by 1): hand the
        # buffer over instead of allocating a scaled copy of it. Reading the value syncs a GPU
        # once per step, which costs far less than an extra (N, V) tensor at the memory peak.
        if not bool(grad_output == 1):
            grad = grad * grad_output.to(grad.dtype)
        return (grad, None, None, None) + (None,) * ctx.n_inputs
