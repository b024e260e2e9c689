"""Held-out evaluation: perplexity and next-token accuracy on supervised positions; with teacher
targets, top-1 agreement with the teacher and the KD loss; calibration (ECE, 15 equal-width bins).

    python -m logitcache.pipeline eval --model out/ --data heldout.jsonl --cache heldout_cache/ --json

Every metric is over supervised positions (response tokens for prompt/response rows; the cache's
positions for a cache), pooled over all sequences (not averaged per sequence). The student's
logits are sliced to its tokenizer's vocabulary, as in training (see `checks`). The KD loss is
the training loss's KD term (`batch_loss.loss_parts` at ce_weight 0), pooled over teacher rows:
the same number `KDTrainer.evaluate` logs as eval_cache_kd_loss while training. Like the fused
training loss, evaluation applies the LM head to a chunk of supervised rows at a time
(`row_logits`), so a 152k-vocabulary student's (B, T, V) logits are never built here either.
"""

import math

import numpy as np
import torch

from logitcache.stages.train.batch_loss import TEACHER_FIELDS, final_hidden, head_weights, loss_parts
from logitcache.stages.train.data import ShardedStream
from logitcache.stages.train.loss_settings import LossPlan, loss_settings
from logitcache.stages.train.student import collated_batches, fused_head_problem, load_student

__all__ = ["ECE_BINS", "expected_calibration_error", "evaluate_batches", "evaluate_source", "kd_term", "row_logits",
           "FORWARD_KL"]

ECE_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): sum over equal-width bins of |accuracy - mean confidence| * share of rows.

    Args:
        confidence: (n,) float, the top-1 probability. correct: (n,) bool, top-1 equals the target.
    """
    if len(confidence) == 0:
        return float("nan")
    # Bin b holds (b/B, (b+1)/B]; confidence 0 goes to the first bin.
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


# The KD term reported by default, and for a loss without one (sft): forward KL alone.
FORWARD_KL = loss_settings("kl").weighted(0.0, 1.0)


def kd_term(plan: LossPlan) -> LossPlan:
    """The KD term evaluation reports as kd_loss: `plan`'s alone (weights 0 and 1), or `FORWARD_KL`."""
    return plan.weighted(0.0, 1.0) if plan.distills else FORWARD_KL


def row_logits(model, inputs: dict, rows: torch.Tensor, *, vocab_size: int | None, head: bool,
               chunk_size: int | None = None):
    """The model's logits at `rows`, a chunk of rows at a time: yields (start, (n, V) logits of rows[start:start+n]).

    With `head`, the (B, T, V) logits are never built: the forward runs with `logits_to_keep=1`,
    the decoder's final hidden states are taken by a hook, and the LM head is applied to each
    chunk's rows (`storage.head.apply_head`, as the fused training loss does). Otherwise the
    model's own logits are sliced (a PEFT-wrapped or sharded head, a model without a decoder).

    Args:
        inputs: the model's inputs. rows: (N,) int64 rows of the flattened (B*T) positions.
        vocab_size: the logits columns to keep (see `checks`); None keeps all.
        head: apply the head here (see `student.fused_head_problem`).
        chunk_size: rows per chunk; None: `chunking.chunk_rows` (about 128 MiB of fp32 logits).
    """
    from logitcache.stages.train.losses.chunking import chunk_rows
    from logitcache.storage.head import apply_head, logit_transform

    if head:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = final_hidden(model, inner, inputs)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        weight, bias = head_weights(inner, vocab_size)
        transform = logit_transform(inner.config)
        step = chunk_rows(chunk_size, weight.shape[0])
        for start in range(0, rows.shape[0], step):
            yield start, apply_head(hidden[start:start + step], weight, bias, **transform)
        return
    logits = model(**inputs).logits
    flat = logits.reshape(-1, logits.shape[-1])
    if vocab_size is not None:
        flat = flat[:, :vocab_size]
    step = chunk_rows(chunk_size, flat.shape[1])
    for start in range(0, rows.shape[0], step):
        yield start, flat.index_select(0, rows[start:start + step])


@torch.no_grad()
def evaluate_batches(model, batches, *, vocab_size: int | None, device="cpu", per_position: bool = False,
                     kd: LossPlan | None = FORWARD_KL, head: bool | None = None, chunk_size: int | None = None) -> dict:
    """Metrics of `model` over collated batches (see `collate`), a chunk of supervised rows at a time.

    Args:
        per_position: also return each position's scores, in batch order, so that two models scored
            on the same batches can be compared position by position (paired standard errors).
        kd: the loss plan (`kd_term`) whose KD term is reported as kd_loss on batches with teacher
            targets; None skips it. A loss that reads other batch fields (rskd's sample_counts)
            gets them from the batch.
        head, chunk_size: see `row_logits`; head None: wherever the model allows it
            (`student.fused_head_problem`), so evaluation never builds the (B, T, V) logits either.

    Returns:
        sequences, positions, nll (mean), perplexity, accuracy, ece; with teacher targets also
        teacher_positions, teacher_agreement (student top-1 == teacher top-1), teacher_accuracy
        (teacher top-1 == the actual next token, the ceiling of agreement-driven accuracy) and,
        with `kd`, kd_loss (the mean over teacher rows of that loss's KD term). With
        `per_position`, "per_position": {"nll": (positions,) float32, "correct": (positions,) bool,
        ["agree": (teacher_positions,) bool]}.
    """
    if head is None:
        head = fused_head_problem(model) is None
    model.eval()
    nll, n, seqs = 0.0, 0, 0
    conf, correct, agree, teacher_right, nlls = [], [], [], [], []
    kd_sum, kd_rows = 0.0, 0
    # Batch fields the loss reads besides the top-K (rskd: sample_counts); a cache without them has no kd_loss.
    needs = list(kd.loss.batch_inputs.values()) if kd is not None else []
    for batch in batches:
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        rows, next_all = batch["rows"].to(device), batch["next_ids"].to(device)
        seqs += batch["input_ids"].shape[0]
        if rows.numel() == 0:
            continue
        teacher = {k: batch[k].to(device) for k in (*TEACHER_FIELDS, "kd_select") if k in batch}
        for start, s in row_logits(model, inputs, rows, vocab_size=vocab_size, head=head, chunk_size=chunk_size):
            m = s.shape[0]
            next_ids = next_all[start:start + m]
            logp = torch.log_softmax(s.float(), dim=-1)
            row_nll = -logp.gather(1, next_ids[:, None])[:, 0]
            nll += row_nll.sum().item()
            if per_position:
                nlls.append(row_nll.cpu().numpy().astype(np.float32))
            n += m
            top_lp, top = logp.max(-1)
            conf.append(top_lp.exp().cpu().numpy())
            correct.append((top == next_ids).cpu().numpy())
            if "teacher_ids" not in teacher:
                continue
            # This chunk's teacher rows (kd_select ascends, so the chunks keep the teacher rows' order).
            here = (teacher["kd_select"] >= start) & (teacher["kd_select"] < start + m)
            part = {k: v[here] for k, v in teacher.items()}
            part["kd_select"] = part["kd_select"] - start
            ids, t_lp, sel = part["teacher_ids"], part["teacher_logprobs"], part["kd_select"]
            t_top = ids.gather(1, torch.where(ids >= 0, t_lp, -math.inf).argmax(-1, keepdim=True))[:, 0]
            agree.append((top[sel] == t_top).cpu().numpy())
            teacher_right.append((next_ids[sel] == t_top).cpu().numpy())
            if kd is not None and ids.shape[0] and all(k in part for k in needs):
                _, parts = loss_parts(s, {**part, "next_ids": next_ids}, kd)
                kd_sum += parts["kd"].item() * ids.shape[0]
                kd_rows += ids.shape[0]
    conf_all = np.concatenate(conf) if conf else np.zeros(0)
    correct_all = np.concatenate(correct) if correct else np.zeros(0, dtype=bool)
    mean_nll = nll / n if n else float("nan")
    out = {"sequences": seqs, "positions": n, "nll": mean_nll,
           "perplexity": math.exp(mean_nll) if n else float("nan"),
           "accuracy": float(correct_all.mean()) if n else float("nan"),
           "ece": expected_calibration_error(conf_all, correct_all)}
    if agree:
        agree_all, right_all = np.concatenate(agree), np.concatenate(teacher_right)
        out.update(teacher_positions=int(len(agree_all)), teacher_agreement=float(agree_all.mean()),
                   teacher_accuracy=float(right_all.mean()))
        if kd_rows:
            out["kd_loss"] = kd_sum / kd_rows
    if per_position:
        out["per_position"] = {"nll": np.concatenate(nlls) if nlls else np.zeros(0, np.float32),
                               "correct": correct_all.astype(bool)}
        if agree:
            out["per_position"]["agree"] = agree_all.astype(bool)
    return out


def evaluate_source(model, source, *, pad_id: int, vocab_size: int | None, batch_size: int = 8,
                    max_sequences: int | None = None, device="cpu", per_position: bool = False,
                    kd: LossPlan | None = FORWARD_KL, head: bool | None = None, chunk_size: int | None = None) -> dict:
    """`evaluate_batches` over a `CacheSource` or `JsonlSource`, in order, in this process."""
    stream = ShardedStream(source, shuffle=False, epochs=1, rank=0, world_size=1)
    batches = collated_batches(stream, pad_id=pad_id, batch_size=batch_size, max_sequences=max_sequences)
    return evaluate_batches(model, batches, vocab_size=vocab_size, device=device, per_position=per_position,
                            kd=kd, head=head, chunk_size=chunk_size)


def evaluate(model: str, *, data: str | None = None, cache: str | None = None, batch_size: int = 8,
             max_sequences: int | None = None, max_length: int | None = None, device: str | None = None,
             trust_remote_code: bool = False, per_position: bool = False, storage_options: dict | None = None,
             plan: LossPlan | None = None) -> dict:
    """Load `model` and evaluate it on a jsonl (`data`) and/or a cache's sequences (`cache`), local or
    fsspec URLs (`storage_options` reach fsspec).

    `plan` chooses the KD loss reported on the cache (`kd_term(plan)`; None: forward KL).

    Returns:
        {"model": str, "data": {path, metrics...}, "cache": {path, teacher, metrics...}}, each of the
        last two present when given; with `per_position`, each holds "per_position" arrays (see
        `evaluate_batches`).

    Raises:
        ConfigError: neither data nor cache, an unloadable model, or a cache with another tokenizer.
    """
    from logitcache.stages.train.sources import Reader, draw_temperature, eval_cache_source, jsonl_source
    from logitcache.storage.errors import ConfigError

    if data is None and cache is None:
        raise ConfigError("eval needs --data, --cache or both")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    student = load_student(model, dtype=None, trust_remote_code=trust_remote_code, device=device, flag="--model")
    reader = Reader(model, student.tokenizer, student.vocab_size, max_length or student.max_length,
                    storage_options=storage_options)
    kwargs = dict(pad_id=student.pad_id, vocab_size=student.vocab_size, batch_size=batch_size,
                  max_sequences=max_sequences, device=device, per_position=per_position,
                  kd=FORWARD_KL if plan is None else kd_term(plan))
    out = {"model": model}
    if data is not None:
        out["data"] = {"path": data, **evaluate_source(student.model, jsonl_source(data, reader=reader), **kwargs)}
    if cache is not None:
        source = eval_cache_source(cache, reader=reader, flag="eval --cache")
        index = source.cache.index
        if plan is not None:  # the draws' temperature is a fact of this cache (rskd), not of the plan
            kwargs["kd"] = kd_term(plan.reading(draw_temperature(index)))
        out["cache"] = {"path": cache, "teacher": index["teacher"].get("name_or_path"),
                        **evaluate_source(student.model, source, **kwargs)}
    return out
