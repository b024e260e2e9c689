"""The loss of one collated batch: ce_weight * CE + kd_weight * KD over its supervised rows.

    plan = loss_settings("kl")                                              # see `loss_settings`
    total, metrics = loss_parts(s, batch, plan)                             # s: (N, V) logits
    total, metrics = fused_head_loss(hidden, weight, None, batch, plan)     # hidden: (N, H)

`loss_parts` takes the student's logits at the supervised rows. `fused_head_loss` takes the
student's final hidden states there and the LM head instead, and applies the head a chunk of rows
at a time inside the loss, so the (N, V) logits, their gradient and the model's (B, T, V) logits
never exist: one chunk's (n, V) logits do. It is the same loss in value and gradient (tested
against `loss_parts` on `storage.head.apply_head`'s logits for every loss, fp32 and bf16).

Each chunk is one black-box call of `loss_parts` on the chunk's rows (CE on every row, KD on the
chunk's teacher rows), with the weights scaled by the chunk's share of the rows, so the sum over
chunks is the batch's means. The gradient with respect to the chunk's logits (formed by the losses
in their forward, see `chunking`) goes straight into the chunk's hidden states and the head weight,
inside the forward pass; backward only hands those buffers over, the way `chunking._WithGradient`
does for logits.
"""

import torch

from logitcache.stages.train.loss_settings import LossPlan
from logitcache.stages.train.losses import kd_with_ce, sft
from logitcache.stages.train.losses.chunking import chunk_rows
from logitcache.storage.head import apply_head

__all__ = ["loss_parts", "supervised_logits", "fused_head_loss", "TEACHER_FIELDS"]

# Collated fields with one row per teacher row (see `collate`).
TEACHER_FIELDS = ("teacher_ids", "teacher_logprobs", "tail_mass", "sample_counts", "sample_logprobs")
# Metrics that `loss_parts` averages over all N rows; every other one is over the N_kd teacher rows.
_PER_ROW = ("ce", "accuracy")


def supervised_logits(logits: torch.Tensor, rows: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """(N, V) student logits at the supervised rows, sliced to `vocab_size` columns (see `checks`).

    Args:
        logits: (B, T, W) model output. rows: (N,) int64 indices into the flattened (B*T) rows.
    """
    b, t, width = logits.shape
    flat = logits.reshape(b * t, width)
    if vocab_size is not None and vocab_size < width:
        flat = flat[:, :vocab_size]
    return flat.index_select(0, rows)


def loss_parts(s: torch.Tensor, batch: dict, plan: LossPlan, *,
               chunk_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ce_weight * CE + kd_weight * KD over a batch's supervised rows, and the metrics to log.

    Args:
        s: (N, V) student logits at the batch's supervised rows (`supervised_logits`).
        batch: the collated batch (see `collate`): next_ids (N,), and for KD teacher_ids (N_kd, K),
            teacher_logprobs (N_kd, K), tail_mass (N_kd,), kd_select (N_kd,), [sample_counts].
        plan: the loss, its options and weights (`loss_settings`); sft is CE alone.

    Returns:
        0-dim float32 total, and {name: 0-dim detached mean over rows}: ce, accuracy, kd, and the
        loss's own metrics (top1_agreement, bild_coverage). A term at weight 0 is not computed and
        not logged; neither is kd for a batch without teacher rows.
    """
    ce_weight, kd_weight = plan.ce_weight, plan.kd_weight
    metrics: dict[str, torch.Tensor] = {}
    if kd_weight and batch["teacher_ids"].shape[0] > 0:
        teacher_ids = batch["teacher_ids"]
        # One pass over the vocabulary per row for both terms (see `losses.kd_with_ce`). Same
        # tokenizer: a teacher row for every supervised row, in order (kd_select is 0..N-1).
        kd_select = None if teacher_ids.shape[0] == s.shape[0] else batch["kd_select"]
        extra = {keyword: batch[key] for keyword, key in plan.loss.batch_inputs.items()}
        # A field an older cache lacks reaches the loss as None (rskd: sample_logprobs).
        extra.update({keyword: batch.get(key) for keyword, key in plan.loss.optional_inputs.items()})
        total, parts = kd_with_ce(plan.name, s, teacher_ids, batch["teacher_logprobs"], batch["next_ids"],
                                  ce_weight=ce_weight, kd_weight=kd_weight, kd_select=kd_select,
                                  tail_mass=batch["tail_mass"], chunk_size=chunk_size, metrics=metrics,
                                  **extra, **plan.options)
        # ce, kd; accuracy, and the loss's own: top1_agreement (every loss that reads teacher ids), bild_coverage
        metrics.update(parts)
        return total, metrics
    # A zero that is still a function of the logits (of none of their entries): backward through a
    # micro-batch that no term reads (no teacher rows at ce_weight 0) gives a zero gradient, not an error.
    total = s[:0].sum(dtype=torch.float32)
    if ce_weight:
        ce = sft(s, labels=batch["next_ids"], chunk_size=chunk_size, metrics=metrics)
        total = total + ce_weight * ce
        metrics["ce"] = ce.detach()
    return total, metrics


def final_hidden(model, unwrapped, inputs: dict, **forward_kwargs) -> torch.Tensor:
    """(B, T, H) the decoder's final hidden states, from the model's own forward with `logits_to_keep=1`.

    The model's own forward runs (DDP, FSDP and PEFT wrappers see their call), so its head makes only
    (B, 1, V) logits; the hidden states are taken from the decoder by a forward hook.

    Args:
        model: what is called, wrapped or not. unwrapped: the model whose `get_decoder()` is hooked.
        inputs, forward_kwargs: the call's keyword arguments (e.g. `use_cache=False`).
    """
    captured = []
    hook = unwrapped.get_decoder().register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        model(**inputs, logits_to_keep=1, **forward_kwargs)
    finally:
        hook.remove()
    return captured[-1]


def head_weights(model, vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's (V, H) weight and (V,) bias (or None), cut to the first `vocab_size` rows (None: all)."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if vocab_size is not None and vocab_size < weight.shape[0]:
        weight, bias = weight[:vocab_size], None if bias is None else bias[:vocab_size]
    return weight, bias


def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch: dict,
                    plan: LossPlan, *, chunk_size: int | None = None, transform: dict | None = None,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`loss_parts(apply_head(hidden, weight, bias, **transform), batch, ...)` without the (N, V) logits.

    Args:
        hidden: (N, H) the student's final hidden states (after the final norm) at the supervised
            rows, in the order of `batch["next_ids"]`; float32/bfloat16/float16.
        weight: (V, H) the output embedding (tied or not), already sliced to the V columns training
            uses. bias: (V,) or None.
        batch, plan: as for `loss_parts`.
        chunk_size: rows per chunk (None: `chunking.chunk_rows`, about 128 MiB of fp32 logits).
        transform: `storage.head.logit_transform(config)`: hidden_scale, logit_scale, softcap.

    Returns:
        As `loss_parts`: 0-dim float32 total (differentiable in hidden, weight and bias) and the
        detached metrics, means over the batch's rows.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    ce_weight, kd_weight = plan.ce_weight, plan.kd_weight
    rows = chunk_rows(chunk_size, vocab)
    transform = dict(transform or {})
    teacher = kd_weight and "teacher_ids" in batch and batch["teacher_ids"].shape[0] > 0
    if teacher:
        select, order = _teacher_order(batch, n)
        n_kd = select.shape[0]
        starts = torch.arange(0, n, rows, device=select.device)
        # Teacher rows of chunk c: order[bounds[c]:bounds[c + 1]]. One device sync per batch.
        bounds = torch.searchsorted(select[order], torch.cat([starts, starts.new_tensor([n])])).tolist()
    want_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def run(h_all, w, b):
        total = h_all.new_zeros((), dtype=torch.float64 if h_all.dtype == torch.float64 else torch.float32)
        grad_h = torch.zeros_like(h_all) if want_grad else None
        # Accumulated over chunks in fp32 (bf16 sums of many chunks would drift from autograd's one matmul).
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if want_grad else None
        grad_b = torch.zeros(b.shape, dtype=acc, device=b.device) if want_grad and b is not None else None
        leaf_w = w.detach().requires_grad_(want_grad)
        leaf_b = None if b is None else b.detach().requires_grad_(want_grad)
        for c, start in enumerate(range(0, n, rows)):
            stop = min(start + rows, n)
            sub = {"next_ids": batch["next_ids"][start:stop]}
            n_kd_c = 0
            if teacher:
                pick = order[bounds[c]:bounds[c + 1]]
                n_kd_c = pick.shape[0]
                sub["kd_select"] = select[pick] - start
                sub.update({name: batch[name][pick] for name in TEACHER_FIELDS if name in batch})
            ce_w = ce_weight * (stop - start) / n
            kd_w = kd_weight * n_kd_c / n_kd if n_kd_c else 0.0
            if not (ce_w or kd_w):
                continue  # rows no term reads: gradient 0
            h = h_all[start:stop].detach().requires_grad_(want_grad)
            with torch.set_grad_enabled(want_grad):
                s = apply_head(h, leaf_w, leaf_b, **transform)
                chunk_total, chunk_metrics = loss_parts(s, sub, plan.weighted(ce_w, kd_w), chunk_size=rows)
                if want_grad:
                    wrt = [h, leaf_w] + ([leaf_b] if leaf_b is not None else [])
                    grads = torch.autograd.grad(chunk_total, wrt)
                    grad_h[start:stop] = grads[0]
                    grad_w += grads[1]
                    if leaf_b is not None:
                        grad_b += grads[2]
            del s
            total = total + chunk_total.detach()
            for name, value in chunk_metrics.items():
                weight_c = (stop - start) if name in _PER_ROW else n_kd_c
                sums[name] = sums.get(name, 0.0) + value.detach().to(total.dtype) * weight_c
                counts[name] = counts.get(name, 0) + weight_c
        if want_grad:
            grad_w = grad_w.to(w.dtype)
            grad_b = None if grad_b is None else grad_b.to(b.dtype)
        return total, (grad_h, grad_w, grad_b)

    if want_grad:
        total = _HeadWithGradient.apply(hidden, weight, bias, run)
    else:
        total, _ = run(hidden.detach(), weight.detach(), None if bias is None else bias.detach())
    metrics = {name: value / max(counts[name], 1) for name, value in sums.items()}
    return total, metrics


def _teacher_order(batch: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd_select, order): each teacher row's supervised row (N_kd,), and the teacher rows sorted by it."""
    n_kd = batch["teacher_ids"].shape[0]
    select = batch.get("kd_select")
    if select is None or n_kd == n:
        # Same tokenizer: a teacher row for every supervised row, in order (as `loss_parts` assumes).
        select = torch.arange(n, device=batch["teacher_ids"].device)
        return select, select
    select = select.long()
    return select, torch.argsort(select, stable=True)


class _HeadWithGradient(torch.autograd.Function):
    """Returns `run(hidden, weight, bias)`'s total; its gradients were formed by `run` in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        total, grads = run(hidden, weight, bias)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = list(ctx.saved_tensors)
        if not bool(grad_output == 1):  # see chunking._WithGradient: the usual root loss hands buffers over
            grads = [g * grad_output.to(g.dtype) for g in grads]
        grad_h, grad_w = grads[0], grads[1]
        return grad_h, grad_w, grads[2] if ctx.has_bias else None, None
