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
import warnings
from contextlib import contextmanager

import numpy as np
import torch

from logitcache.stages.train.batch_loss import TEACHER_FIELDS, final_hidden, head_weights, loss_parts
from logitcache.stages.train.data import CacheSource, ShardedStream
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
    return _ece(_ece_bins(confidence, correct, bins))


def _ece_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """(3, bins) float64 per-bin sums: rows, confidence, correct. Sums, so ranks can add theirs up."""
    # Bin b holds (b/B, (b+1)/B]; confidence 0 goes to the first bin.
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    return np.stack([np.bincount(which, weights=w, minlength=bins)
                     for w in (np.ones(len(which)), confidence.astype(np.float64), correct.astype(np.float64))])


def _ece(sums: np.ndarray) -> float:
    """ECE from `_ece_bins`' sums: sum over bins of |correct - confidence| / all rows."""
    rows = sums[0].sum()
    return float(np.abs(sums[2] - sums[1]).sum() / rows) if rows else float("nan")


# The KD term reported by default, and for a loss without one (sft): forward KL alone.
FORWARD_KL = loss_settings("kl").weighted(0.0, 1.0)


def kd_term(plan: LossPlan, source=None) -> LossPlan:
    """The KD term evaluation reports as kd_loss on `source`: `plan`'s alone (weights 0 and 1), or `FORWARD_KL`.

    A sample-mode cache's draw temperature is a fact of that cache, so the term reads the temperature
    of the cache `source` holds, not that of the cache `plan` was trained on (rskd: older caches
    without `sample_logz` weigh their draws by it).
    """
    if not plan.distills:
        return FORWARD_KL
    if isinstance(source, CacheSource):
        from logitcache.stages.train.sources import draw_temperature

        plan = plan.reading(draw_temperature(source.cache.index))
    return plan.weighted(0.0, 1.0)


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


# Metric sums `evaluate_batches` adds up (and ranks all-reduce), then ECE's per-bin sums.
_SUMS = ("sequences", "positions", "nll", "correct", "teacher_positions", "agree", "teacher_right", "kd", "kd_rows")


@torch.no_grad()
def evaluate_batches(model, batches, *, vocab_size: int | None, device="cpu", per_position: bool = False,
                     kd: LossPlan | None = FORWARD_KL, head: bool | None = None, chunk_size: int | None = None,
                     rank: int = 0, world_size: int = 1) -> dict:
    """Metrics of `model` over collated batches (see `collate`), a chunk of supervised rows at a time.

    Args:
        per_position: also return each position's scores, in batch order, so that two models scored
            on the same batches can be compared position by position (paired standard errors).
        kd: the loss plan (`kd_term`) whose KD term is reported as kd_loss on batches with teacher
            targets; None skips it. A loss that reads other batch fields (rskd's sample_counts)
            gets them from the batch.
        head, chunk_size: see `row_logits`; head None: wherever the model allows it
            (`student.fused_head_problem`), so evaluation never builds the (B, T, V) logits either.
        rank, world_size: evaluation shared across the ranks of a torch.distributed group, every one
            of which calls this with the same batches: rank r scores batches r, r + world_size, ...,
            the metric sums are all-reduced and per_position is gathered back into batch order, so
            every rank returns what one process returns. Every rank runs the same number of forwards
            (FSDP and ZeRO-3 gather parameters in each), padding with one-token ones.

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
    sums = dict.fromkeys(_SUMS, 0.0)
    bins = np.zeros((3, ECE_BINS))
    scores: dict[int, dict[str, list]] = {}  # batch index -> per-position lists
    # Batch fields the loss reads besides the top-K (rskd: sample_counts); a cache without them has no kd_loss.
    needs = list(kd.loss.batch_inputs.values()) if kd is not None else []
    mine = total = 0
    for index, batch in enumerate(batches):
        total += 1
        if index % world_size != rank:
            continue
        mine += 1
        sums["sequences"] += batch["input_ids"].shape[0]
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        rows, next_all = batch["rows"].to(device), batch["next_ids"].to(device)
        if rows.numel() == 0:
            if world_size > 1:
                _idle_forward(model, device)
            continue
        teacher = {k: batch[k].to(device) for k in (*TEACHER_FIELDS, "kd_select") if k in batch}
        here_scores = scores.setdefault(index, {"nll": [], "correct": [], "agree": []})
        for start, s in row_logits(model, inputs, rows, vocab_size=vocab_size, head=head, chunk_size=chunk_size):
            m = s.shape[0]
            next_ids = next_all[start:start + m]
            logp = torch.log_softmax(s.float(), dim=-1)
            row_nll = -logp.gather(1, next_ids[:, None])[:, 0]
            sums["nll"] += row_nll.double().sum().item()
            sums["positions"] += m
            top_lp, top = logp.max(-1)
            right = (top == next_ids).cpu().numpy()
            bins += _ece_bins(top_lp.exp().cpu().numpy(), right)
            sums["correct"] += right.sum()
            if per_position:
                here_scores["nll"].append(row_nll.cpu().numpy().astype(np.float32))
                here_scores["correct"].append(right)
            if "teacher_ids" not in teacher:
                continue
            # This chunk's teacher rows (kd_select ascends, so the chunks keep the teacher rows' order).
            here = (teacher["kd_select"] >= start) & (teacher["kd_select"] < start + m)
            part = {k: v[here] for k, v in teacher.items()}
            part["kd_select"] = part["kd_select"] - start
            ids, t_lp, sel = part["teacher_ids"], part["teacher_logprobs"], part["kd_select"]
            t_top = ids.gather(1, torch.where(ids >= 0, t_lp, -math.inf).argmax(-1, keepdim=True))[:, 0]
            agree = (top[sel] == t_top).cpu().numpy()
            sums["teacher_positions"] += len(agree)
            sums["agree"] += agree.sum()
            sums["teacher_right"] += (next_ids[sel] == t_top).sum().item()
            if per_position:
                here_scores["agree"].append(agree)
            if kd is not None and ids.shape[0] and all(k in part for k in needs):
                _, parts = loss_parts(s, {**part, "next_ids": next_ids}, kd)
                sums["kd"] += parts["kd"].item() * ids.shape[0]
                sums["kd_rows"] += ids.shape[0]
    if world_size > 1:
        for _ in range(-(-total // world_size) - mine):  # the ranks with one batch fewer
            _idle_forward(model, device)
        sums, bins, scores = _all_reduce(sums, bins, scores, device, per_position)
    n = sums["positions"]
    mean_nll = sums["nll"] / n if n else float("nan")
    out = {"sequences": int(sums["sequences"]), "positions": int(n), "nll": mean_nll,
           "perplexity": math.exp(mean_nll) if n else float("nan"),
           "accuracy": sums["correct"] / n if n else float("nan"), "ece": _ece(bins)}
    if sums["teacher_positions"]:
        t = sums["teacher_positions"]
        out.update(teacher_positions=int(t), teacher_agreement=sums["agree"] / t,
                   teacher_accuracy=sums["teacher_right"] / t)
        if sums["kd_rows"]:
            out["kd_loss"] = sums["kd"] / sums["kd_rows"]
    if per_position:
        ordered = [scores[i] for i in sorted(scores)]
        join = lambda key, dtype: np.concatenate([a for s in ordered for a in s[key]] or [np.zeros(0, dtype)])
        out["per_position"] = {"nll": join("nll", np.float32), "correct": join("correct", bool)}
        if sums["teacher_positions"]:
            out["per_position"]["agree"] = join("agree", bool)
    return out


def _idle_forward(model, device) -> None:
    """A one-token forward that scores nothing: the collectives a sharded model runs in every forward."""
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))


def _all_reduce(sums: dict, bins: np.ndarray, scores: dict, device, per_position: bool):
    """Every rank's metric sums added up, and (with `per_position`) every rank's per-batch scores."""
    import torch.distributed as dist

    flat = torch.tensor([sums[k] for k in _SUMS] + bins.ravel().tolist(), dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    values = flat.cpu().numpy()
    sums = dict(zip(_SUMS, values[:len(_SUMS)].tolist()))
    bins = values[len(_SUMS):].reshape(bins.shape)
    if per_position:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, scores)
        scores = {i: s for part in every for i, s in part.items()}
    return sums, bins, scores


def evaluate_source(model, source, *, pad_id: int, vocab_size: int | None, batch_size: int = 8,
                    max_sequences: int | None = None, device="cpu", per_position: bool = False,
                    kd: LossPlan | None = FORWARD_KL, head: bool | None = None, chunk_size: int | None = None,
                    rank: int = 0, world_size: int = 1, progress: str | None = None) -> dict:
    """`evaluate_batches` over a `CacheSource` or `RowsSource`, in order; with world_size > 1 shared
    across the ranks (see `evaluate_batches`; every rank reads the whole source and scores its share).
    `progress`: the label of a bar on stderr counting sequences; None for none."""
    stream = ShardedStream(source, shuffle=False, epochs=1, rank=0, world_size=1)
    batches = collated_batches(stream, pad_id=pad_id, batch_size=batch_size, max_sequences=max_sequences)
    if progress is not None:
        total = sum(source.shard_sizes)
        batches = _counted(batches, progress, total if max_sequences is None else min(total, max_sequences))
    return evaluate_batches(model, batches, vocab_size=vocab_size, device=device, per_position=per_position,
                            kd=kd, head=head, chunk_size=chunk_size, rank=rank, world_size=world_size)


@contextmanager
def transformers_bars(show: bool):
    """transformers' own bars (its "Loading weights") shown only with `show`, like ours."""
    from transformers.utils import logging

    if show or not logging.is_progress_bar_enabled():
        yield
        return
    with warnings.catch_warnings():  # huggingface_hub's, when HF_HUB_DISABLE_PROGRESS_BARS overrides the switch
        warnings.simplefilter("ignore")
        logging.disable_progress_bar()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.enable_progress_bar()


def _counted(batches, label: str, total: int):
    """`batches`, a tqdm bar counting their sequences as each is taken."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=label, unit="seq") as bar:
        for batch in batches:
            yield batch
            bar.update(batch["input_ids"].shape[0])


def evaluate(model: str, *, data: str | None = None, cache: str | None = None, batch_size: int = 8,
             max_sequences: int | None = None, max_length: int | None = None, device: str | None = None,
             trust_remote_code: bool = False, per_position: bool = False, storage_options: dict | None = None,
             plan: LossPlan | None = None, rows=None, chat_template: str | None = None,
             chat_template_kwargs: dict | None = None, prompt_format: str | None = None,
             progress: bool = False) -> dict:
    """Load `model` and evaluate it on rows (`data`: what `precompute --data` takes, loaded by `rows`, a
    `sources.DataOptions`) and/or a cache's sequences (`cache`), local or fsspec URLs (`storage_options`
    reach fsspec).

    `plan` chooses the KD loss reported on the cache (`kd_term(plan)`; None: forward KL).
    `chat_template` (a file), `chat_template_kwargs` and `prompt_format` render --data's chats (see
    `sources`; a cache must record the same ones). `progress`: a bar on stderr per source, counting
    sequences.

    Returns:
        {"model": str, "data": {path, metrics...}, "cache": {path, teacher, metrics...}}, each of the
        last two present when given; with `per_position`, each holds "per_position" arrays (see
        `evaluate_batches`).

    Raises:
        ConfigError: neither data nor cache, an unloadable model, or a cache with another tokenizer.
    """
    from logitcache.stages.train.sources import DataOptions, Reader, eval_cache_source, rows_source
    from logitcache.storage.errors import ConfigError
    from logitcache.storage.inputs import ChatOptions

    if data is None and cache is None:
        raise ConfigError("eval needs --data, --cache or both")
    chat = ChatOptions.load(chat_template, chat_template_kwargs, storage_options=storage_options)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with transformers_bars(progress):
        student = load_student(model, dtype=None, trust_remote_code=trust_remote_code, device=device, flag="--model")
    reader = Reader(model, student.tokenizer, student.vocab_size, max_length or student.max_length,
                    storage_options=storage_options, chat=chat, prompt_format=prompt_format)
    kwargs = dict(pad_id=student.pad_id, vocab_size=student.vocab_size, batch_size=batch_size,
                  max_sequences=max_sequences, device=device, per_position=per_position,
                  kd=FORWARD_KL if plan is None else kd_term(plan))
    out = {"model": model}
    if data is not None:
        source = rows_source(data, reader=reader, rows=rows or DataOptions())
        out["data"] = {"path": data, **evaluate_source(student.model, source, **kwargs,
                                                       progress="eval --data" if progress else None)}
    if cache is not None:
        source = eval_cache_source(cache, reader=reader, flag="eval --cache")
        if plan is not None:
            kwargs["kd"] = kd_term(plan, source)
        out["cache"] = {"path": cache, "teacher": source.cache.index["teacher"].get("name_or_path"),
                        **evaluate_source(student.model, source, **kwargs,
                                          progress="eval --cache" if progress else None)}
    return out
