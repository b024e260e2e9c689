"""Training items from cache sequences and text rows: student tokens, labels, and aligned teacher targets.

Alignment convention (the one rule everything here follows): the teacher row stored for position t
predicts token t + 1, and so does a Hugging Face causal LM's `logits[:, t]`. Same-tokenizer targets
therefore sit at the student's logit position t, and `labels` use the HF convention: `labels[t + 1]`
is the token that `logits[:, t]` is trained to predict (-100 where unsupervised; `labels[0]` is never
a target).

An item is a dict of numpy arrays:
    input_ids: (T,) int64 student tokens.
    labels: (T,) int64, -100 where unsupervised.
    kd_positions: (n,) int64 student logit positions t with a teacher row (every one has labels[t + 1] != -100).
    teacher_ids: (n, K) int64 teacher ids, -1 at padding (valid ids first in each row).
    teacher_logprobs: (n, K) float32 teacher log-probs at temperature 1 (0.0 at padding).
    tail_mass: (n,) float32 teacher probability outside the valid ids.
    sample_counts: (n, K) int64, sample-mode caches only.
    sample_logprobs: (n, K) float32, each id's draw log-probability (sample-mode caches that store
        `sample_logz`, see docs/FORMAT.md); 0.0 at padding.
    row_index: int, the source row.
Items from text alone (no cache) carry only input_ids, labels and row_index.
"""

import numpy as np

from logitcache.storage.errors import ConfigError, InvalidDataError
from logitcache.storage.inputs import SKIP_REASONS, STORED_FIELDS, ChatOptions, InputSpec, Skipped, TextEncoder

__all__ = ["IGNORE", "SameTokenizerTargets", "keep_first_k", "fold_out_of_vocab", "CrossTokenizerTargets",
           "TextExample", "encode_example", "answer_turns", "align_answers", "supervised_positions"]

IGNORE = -100
# Sample mode's (n, K) fields beside the ids and log-probs.
_SAMPLE = ("sample_counts", "sample_logprobs")


def supervised_positions(labels: np.ndarray) -> np.ndarray:
    """(n,) int64 logit positions t whose next token is supervised: labels[t + 1] != -100."""
    return np.flatnonzero(labels[1:] != IGNORE).astype(np.int64)


def _teacher_rows(seq: dict, keep) -> dict:
    out = {"teacher_ids": np.asarray(seq["topk_ids"])[keep].astype(np.int64),
           "teacher_logprobs": np.asarray(seq["topk_logprobs"])[keep].astype(np.float32),
           "tail_mass": np.asarray(seq["tail_mass"])[keep].astype(np.float32)}
    if "sample_counts" in seq:
        out["sample_counts"] = np.asarray(seq["sample_counts"])[keep].astype(np.int64)
    if "sample_logprobs" in seq:
        out["sample_logprobs"] = np.asarray(seq["sample_logprobs"])[keep].astype(np.float32)
    return out


def fold_out_of_vocab(rows: dict, vocab_size: int) -> np.ndarray:
    """Move teacher entries at ids >= vocab_size into the tail, in place; returns (n,) bool rows kept.

    Ids at or above the tokenizer's vocabulary are padding columns of a padded logits width: no
    token maps to them, and the student's logits are sliced to the vocabulary (see `checks`). Their
    probability joins `tail_mass`; their slots become -1 padding, moved after the valid ids. A row
    left with no valid id (only a teacher with padded columns on top can produce one) is dropped
    from distillation; its token keeps its cross-entropy label.
    """
    ids, lp = rows["teacher_ids"], rows["teacher_logprobs"]
    bad = ids >= vocab_size
    if not bad.any():
        return np.ones(len(ids), dtype=bool)
    rows["tail_mass"] = np.minimum(rows["tail_mass"] + np.where(bad, np.exp(lp), 0.0).sum(1), 1.0).astype(np.float32)
    ids[bad], lp[bad] = -1, 0.0
    for name in _SAMPLE:
        if name in rows:
            rows[name][bad] = 0
    order = np.argsort(ids < 0, axis=1, kind="stable")
    for name in ("teacher_ids", "teacher_logprobs", *_SAMPLE):
        if name in rows:
            rows[name] = np.take_along_axis(rows[name], order, 1)
    return rows["teacher_ids"][:, 0] >= 0


def keep_first_k(rows: dict, k: int) -> None:
    """Keep the first k cached ids of each row (the teacher's top-k), in place; the rest joins the tail."""
    dropped = rows["teacher_logprobs"][:, k:]
    valid = rows["teacher_ids"][:, k:] >= 0
    rows["tail_mass"] = np.minimum(rows["tail_mass"] + np.where(valid, np.exp(dropped), 0.0).sum(1), 1.0).astype(np.float32)
    for name in ("teacher_ids", "teacher_logprobs", *_SAMPLE):
        if name in rows:
            rows[name] = np.ascontiguousarray(rows[name][:, :k])


class SameTokenizerTargets:
    """Cache sequence -> item for a student with the teacher's tokenizer: targets at t, labels at t + 1.

    Args:
        vocab_size: ids the tokenizer can produce (the cache's `tokenizer.vocab_size`); the student's
            logits are sliced to it and teacher ids at or above it are folded into the tail.
        max_length: truncate longer sequences (positions past the end are dropped).
        keep_k: use only the teacher's top-k of the K cached ids (the rest joins the tail mass).
    """

    def __init__(self, vocab_size: int, *, max_length: int | None = None, keep_k: int | None = None):
        self.vocab_size, self.max_length, self.keep_k = vocab_size, max_length, keep_k

    def __call__(self, seq: dict) -> dict:
        ids = np.asarray(seq["input_ids"], dtype=np.int64)
        pos = np.asarray(seq["positions"], dtype=np.int64)
        keep = np.argsort(pos, kind="stable")  # the format does not promise ascending positions
        if self.max_length is not None and len(ids) > self.max_length:
            ids = ids[:self.max_length]
            keep = keep[pos[keep] < self.max_length - 1]
        pos = pos[keep]
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        labels[pos + 1] = ids[pos + 1]
        rows = _teacher_rows(seq, keep)
        if self.keep_k is not None:
            keep_first_k(rows, self.keep_k)
        kd = fold_out_of_vocab(rows, self.vocab_size)
        if not kd.all():
            rows = {k: v[kd] for k, v in rows.items()}
        return {"input_ids": ids, "labels": labels, "kd_positions": pos[kd], **rows, "row_index": int(seq["row_index"])}


def encode_example(tokenizer, row: dict, *, max_length: int | None = None, prompt_format: str = "plain",
                   chat: ChatOptions | None = None, spec: InputSpec | None = None,
                   where: str = "row") -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a text row for training: returns (input_ids (T,) int64, labels (T,) int64).

    Without `spec` the row uses the stored field names: `messages` (a chat: a list of messages, or
    the JSON text a cache stores; `tools` alongside), `prompt` + `response`, or `text`, rendered with
    `prompt_format` and `chat`; `spec` (the field flags) names the columns instead. Tokens and supervised
    positions follow the format's one rule (`logitcache.storage.inputs`), the one stage one used
    for the teacher, so a student re-tokenizing cached text is supervised where the teacher was.
    Truncated to the first `max_length` tokens. A row left with nothing to supervise gives labels
    that are all -100.

    Raises:
        InvalidDataError: the row has none of those fields, or a field is not a string / a chat.
        ConfigError: a chat (or `prompt_format="chat"`) for a tokenizer without a chat template.
    """
    if spec is None:
        spec = InputSpec.for_row(row, max_length=max_length, prompt_format=prompt_format, chat=chat, where=where)
    out = TextEncoder(tokenizer, spec)(row)
    if isinstance(out, Skipped):
        if out.token_ids is None:
            raise InvalidDataError(f"{where}: field {out.field!r}: {out.detail or SKIP_REASONS[out.reason]}")
        ids = np.asarray(out.token_ids, dtype=np.int64)
        return ids, np.full(len(ids), IGNORE, dtype=np.int64)
    ids = np.asarray(out.token_ids, dtype=np.int64)
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels[out.positions + 1] = ids[out.positions + 1]
    return ids, labels


class TextExample:
    """Text row -> item without teacher targets (`--loss sft` straight from a dataset, `eval --data`).

    `spec` (from the field flags) fixes the columns and kind; without it each row's stored field
    names decide (`encode_example`), rendered with `prompt_format` and `chat`.
    """

    def __init__(self, tokenizer, *, max_length: int | None = None, prompt_format: str = "plain",
                 chat: ChatOptions | None = None, spec: InputSpec | None = None, where: str = "data"):
        self.tokenizer, self.max_length, self.where = tokenizer, max_length, where
        self.prompt_format, self.chat, self.spec = prompt_format, chat, spec

    def __call__(self, row: dict) -> dict:
        ids, labels = encode_example(self.tokenizer, row, max_length=self.max_length, prompt_format=self.prompt_format,
                                     chat=self.chat, spec=self.spec, where=f"{self.where} row {row.get('row_index')}")
        return {"input_ids": ids, "labels": labels, "row_index": int(row["row_index"])}


def answer_turns(positions: np.ndarray) -> list[np.ndarray]:
    """Split ascending supervised positions into turns: runs of consecutive positions.

    A chat's assistant turns are separated by unsupervised tokens (the user's turn, the template's
    role markers), so each turn is one run; a prompt/response row has one.
    """
    positions = np.asarray(positions, dtype=np.int64)
    return np.split(np.arange(len(positions), dtype=np.int64), np.flatnonzero(np.diff(positions) > 1) + 1)


def align_answers(teacher_positions: np.ndarray, student_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair teacher answer rows with student answer positions, turn by turn (Boizard et al. 2024, ULD).

    Each answer turn (`answer_turns`) is aligned from its first token on both sides and truncated to
    the shorter: in turn j, the teacher's i-th supervised position pairs with the student's i-th, for i
    below the shorter turn's length. Turns pair in order, as many as both sides have (a truncated
    sequence has fewer). Aligning every turn afresh keeps a token-count difference in one turn from
    shifting the pairs of the next. The two tokenizations split the text differently, so pair i is
    "the i-th token of this answer on each side", not the same characters; ULD compares sorted
    probabilities, which needs no id mapping.

    Args:
        teacher_positions: (P,) the teacher's supervised positions of the sequence, ascending.
        student_positions: (m,) int64 student logit positions of the answers, ascending.

    Returns:
        teacher_rows: (n,) int64 indices into `teacher_positions`; student_positions: (n,) int64.
    """
    student_positions = np.asarray(student_positions, dtype=np.int64)
    t_rows, s_rows = [], []
    for t_turn, s_turn in zip(answer_turns(teacher_positions), answer_turns(student_positions)):
        n = min(len(t_turn), len(s_turn))
        t_rows.append(t_turn[:n])
        s_rows.append(s_turn[:n])
    if not t_rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(t_rows), student_positions[np.concatenate(s_rows)]


class CrossTokenizerTargets:
    """Cache sequence -> item for a student with another tokenizer (ULD).

    The student re-tokenizes the sequence's stored text (`encode_example`, by the rule the cache was
    written with: a chat through the student's own chat template); teacher rows and student answer
    positions are paired by `align_answers` (a chat's assistant turns, in order, each from its first token).

    Args:
        tokenizer: the student's tokenizer.
        fields: text fields to encode: ("prompt", "response") or ("messages",). Plain-text caches
            ("text",) are refused (see `__init__`).
        max_length: truncate the student sequence.
        texts: optional {row_index: row dict} source of the text when the cache stores none.
        keep_k: use only the teacher's top-k of the K cached ids (the rest joins the tail mass).
        prompt_format: how the cache rendered prompt/response ("plain" or "chat"; its index says).
        chat: the student's chat template and template variables (see `sources._retokenized`).
    """

    def __init__(self, tokenizer, *, fields: tuple[str, ...], max_length: int | None = None, texts: dict | None = None,
                 keep_k: int | None = None, prompt_format: str = "plain", chat: ChatOptions | None = None):
        if tuple(fields) == ("text",):
            # Pairing two tokenizations of a whole document by token index drifts apart as the
            # tokenizers split the text at different rates; aligning by character offsets would need
            # the teacher's tokenizer, which stage two does not load.
            raise ConfigError("a student with another tokenizer (ULD) needs a prompt/response or chat cache, whose "
                              "answer tokens it aligns from the first one (as the ULD paper does); this cache holds "
                              "plain 'text', where pairing two tokenizations token by token drifts to other words. "
                              "Write the cache with --prompt-field/--response-field, or use a student with the "
                              "teacher's tokenizer")
        if tuple(fields) not in STORED_FIELDS.values():
            raise ConfigError(f"cross-tokenizer training re-tokenizes 'prompt'+'response' or 'messages'; "
                              f"the cache's text fields are {list(fields)}")
        self.tokenizer, self.fields, self.max_length, self.texts = tokenizer, tuple(fields), max_length, texts
        self.keep_k, self.prompt_format, self.chat = keep_k, prompt_format, chat

    def __call__(self, seq: dict) -> dict:
        row_index = int(seq["row_index"])
        if self.texts is not None:
            if row_index not in self.texts:
                raise InvalidDataError(f"--data has no row {row_index}, which the cache holds")
            row = self.texts[row_index]
        else:
            row = {f: seq[f] for f in self.fields}
        ids, labels = encode_example(self.tokenizer, row, max_length=self.max_length, prompt_format=self.prompt_format,
                                     chat=self.chat, where=f"cache row {row_index}")
        student = supervised_positions(labels)
        positions = np.asarray(seq["positions"])
        order = np.argsort(positions, kind="stable")
        t_rows, s_pos = align_answers(positions[order], student)
        rows = _teacher_rows(seq, order[t_rows])
        if self.keep_k is not None:
            keep_first_k(rows, self.keep_k)
        return {"input_ids": ids, "labels": labels, "kd_positions": s_pos, **rows, "row_index": row_index}
