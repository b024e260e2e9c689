"""Stage one's inputs: load DATA, and turn each row into teacher tokens and supervised positions.

    rows, info = load_rows("data/train.jsonl")              # datasets.Dataset, {"fingerprint": ..., ...}
    spec = InputSpec.build(prompt_field="q", response_field="a", max_length=2048)
    encode = RowEncoder(tokenizer, spec)
    item = encode(rows[0])                                   # Encoded | Skipped

Supervision (row t of the cache is the teacher's prediction of token t+1):
- `text`: every t in [0, T-1). The text is tokenized as the tokenizer does by default
  (`add_special_tokens=True`, so a BOS where the model family uses one).
- `prompt_response`: prompt tokens (`add_special_tokens=True`) + response tokens (no special
  tokens) + EOS. Supervised: the t whose next token t+1 is a response token (EOS included),
  i.e. t in [len(prompt_ids) - 1, T - 1). Prompt and response are tokenized separately, so the
  response's first token is the same whatever the prompt ends with.
- `chat`: the messages rendered with the teacher tokenizer's chat template, tokenized without
  adding special tokens (what `apply_chat_template(tokenize=True)` does). Supervised: the t whose
  next token lies in an assistant turn, i.e. in the text that rendering message i adds after
  the assistant header: [len(render(m[:i], add_generation_prompt=True)), len(render(m[:i+1]))).
  That span includes the template's end-of-turn token. Spans are found by rendering prefixes
  and mapping characters to tokens through the tokenizer's offsets, so a BPE merge across a
  span boundary cannot shift them. An assistant message that opens a conversation has nothing
  to condition on (and templates cannot render an empty prefix); it is not supervised.

Truncation policy (`max_length`): keep the first `max_length` tokens, cut the end; such rows
are counted as truncated. A row left with no supervised position is skipped.

Rows are skipped and counted, never silently (or raise `InvalidDataError` with `strict`), for
the reasons in `SKIP_REASONS`. Stored text (`Encoded.texts`, for students with another
tokenizer) is the source text the kept teacher tokens cover: in text and prompt/response modes
cut at the last kept token's end; in chat mode the whole conversation as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logitcache.storage.errors import ConfigError, InvalidDataError, LogitCacheError

__all__ = ["InputSpec", "RowEncoder", "Encoded", "Skipped", "SKIP_REASONS", "load_rows", "KINDS"]

KINDS = ("text", "prompt_response", "chat")
SKIP_REASONS = {
    "missing": "the field is absent or null",
    "not_string": "the field is not a string (chat: not a list of {role, content} string messages)",
    "empty": "the field is an empty string (chat: an empty conversation)",
    "too_short": "fewer than 2 tokens, so nothing to predict",
    "no_assistant": "a chat with no assistant message after the first message",
    "template_mismatch": "the chat template does not render the conversation prefix by prefix",
    "no_supervised": "truncation to max_length left no supervised position",
}
# Stored text-field names per input kind: fixed names, so stage two need not know the source columns.
_STORED = {"text": ("text",), "prompt_response": ("prompt", "response"), "chat": ("messages",)}
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass(frozen=True)
class InputSpec:
    """What a row holds and how it becomes a sequence.

    Attributes:
        kind: "text", "prompt_response" or "chat".
        columns: stored name -> source column, e.g. {"prompt": "question", "response": "answer"}.
        max_length: keep at most this many tokens per sequence (the start).
    """

    kind: str
    columns: dict
    max_length: int

    @classmethod
    def build(cls, *, text_field: str | None = None, prompt_field: str | None = None,
              response_field: str | None = None, messages_field: str | None = None,
              max_length: int) -> "InputSpec":
        """Pick the input kind from which fields are given; exactly one kind must be.

        Raises:
            ConfigError: no kind, several kinds, half of prompt/response, or max_length < 2.
        """
        given = [name for name, value in (("--text-field", text_field), ("--prompt-field", prompt_field),
                                          ("--response-field", response_field),
                                          ("--messages-field", messages_field)) if value]
        if bool(prompt_field) != bool(response_field):
            raise ConfigError("--prompt-field and --response-field go together (response-only supervision); "
                              f"got only {given}")
        if text_field and not prompt_field and not messages_field:
            spec = cls("text", {"text": text_field}, max_length)
        elif prompt_field and not text_field and not messages_field:
            spec = cls("prompt_response", {"prompt": prompt_field, "response": response_field}, max_length)
        elif messages_field and not text_field and not prompt_field:
            spec = cls("chat", {"messages": messages_field}, max_length)
        else:
            raise ConfigError(
                "choose one input kind: --text-field F (plain text), --prompt-field P --response-field R, "
                f"or --messages-field M (chat); got {given or 'none'}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"--max-length={max_length!r} must be an integer >= 2")
        return spec

    @property
    def stored_fields(self) -> tuple[str, ...]:
        """Names of the text fields each sequence keeps in the cache."""
        return _STORED[self.kind]

    def describe(self) -> dict:
        """The index's `inputs` section (also fingerprinted)."""
        supervision = {"text": "all", "prompt_response": "response", "chat": "assistant"}[self.kind]
        return {"kind": self.kind, "columns": dict(self.columns), "stored_fields": list(self.stored_fields),
                "supervision": supervision, "max_length": self.max_length, "truncation": "keep_start",
                "append_eos": self.kind == "prompt_response"}


@dataclass
class Encoded:
    """One row as a teacher sequence.

    Attributes:
        token_ids: (T,) teacher token ids, T <= max_length.
        positions: (P,) int32 supervised t, 0 <= t < T-1, ascending.
        texts: stored text fields (see `InputSpec.stored_fields`).
        truncated: the row was cut to max_length.
    """

    token_ids: list[int]
    positions: np.ndarray
    texts: dict
    truncated: bool


@dataclass
class Skipped:
    """A row that yields no sequence: `reason` is a key of `SKIP_REASONS`, `field` the source column."""

    reason: str
    field: str
    detail: str = ""

    def error(self, row: int) -> InvalidDataError:
        return InvalidDataError(f"DATA row {row}: field {self.field!r}: {self.detail or SKIP_REASONS[self.reason]} "
                                f"(--strict is on; without it such rows are skipped and counted as "
                                f"skipped_{self.reason})")


class RowEncoder:
    """Turns dataset rows into `Encoded` sequences (see the module docstring for the rules).

    Args:
        tokenizer: the teacher's fast (Rust-backed) Hugging Face tokenizer; offsets are needed to
            cut stored text and to find chat turns.
        spec: the input kind, columns and max_length.

    Raises:
        ConfigError: the tokenizer is not a fast one, or chat mode without a chat template.
    """

    def __init__(self, tokenizer, spec: InputSpec):
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"the teacher tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
                              "logitcache needs token offsets (a tokenizer.json)")
        if spec.kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--messages-field needs a teacher tokenizer with a chat template; this one has none")
        self.tokenizer, self.spec = tokenizer, spec

    def __call__(self, row: dict) -> Encoded | Skipped:
        """Encode one dataset row (a dict of its columns)."""
        if self.spec.kind == "text":
            return self._text(row)
        if self.spec.kind == "prompt_response":
            return self._prompt_response(row)
        return self._chat(row)

    def _field(self, row: dict, name: str) -> str | Skipped:
        column = self.spec.columns[name]
        value = row.get(column)
        if value is None:
            return Skipped("missing", column)
        if not isinstance(value, str):
            return Skipped("not_string", column, f"expected a string, got {type(value).__name__}")
        if not value:
            return Skipped("empty", column)
        return value

    def _encode(self, text: str, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _text(self, row: dict) -> Encoded | Skipped:
        text = self._field(row, "text")
        if isinstance(text, Skipped):
            return text
        ids, offsets = self._encode(text, True)
        if len(ids) < 2:
            return Skipped("too_short", self.spec.columns["text"])
        kept = min(len(ids), self.spec.max_length)
        truncated = kept < len(ids)
        stored = _cut(text, offsets, kept) if truncated else text
        return Encoded(ids[:kept], np.arange(kept - 1, dtype=np.int32), {"text": stored}, truncated)

    def _prompt_response(self, row: dict) -> Encoded | Skipped:
        prompt = self._field(row, "prompt")
        if isinstance(prompt, Skipped):
            return prompt
        response = self._field(row, "response")
        if isinstance(response, Skipped):
            return response
        prompt_ids, _ = self._encode(prompt, True)
        response_ids, offsets = self._encode(response, False)
        eos = self.tokenizer.eos_token_id
        ids = prompt_ids + response_ids + ([eos] if eos is not None else [])
        kept = min(len(ids), self.spec.max_length)
        first = max(len(prompt_ids) - 1, 0)  # t = first predicts the first response token
        if kept - 1 <= first:
            reason = "no_supervised" if kept < len(ids) else "too_short"
            return Skipped(reason, self.spec.columns["response"])
        truncated = kept < len(ids)
        kept_response = min(max(kept - len(prompt_ids), 0), len(response_ids))
        stored = _cut(response, offsets, kept_response) if truncated else response
        return Encoded(ids[:kept], np.arange(first, kept - 1, dtype=np.int32),
                       {"prompt": prompt, "response": stored}, truncated)

    def _chat(self, row: dict) -> Encoded | Skipped:
        column = self.spec.columns["messages"]
        messages = row.get(column)
        if messages is None:
            return Skipped("missing", column)
        problem = _check_messages(messages)
        if problem:
            return Skipped("empty" if problem == "empty" else "not_string", column, problem)
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            full = self._render(messages, False)
            spans = []
            for i, message in enumerate(messages):
                if message["role"] != "assistant" or i == 0:
                    continue
                before, upto = self._render(messages[:i], True), self._render(messages[: i + 1], False)
                if not (upto.startswith(before) and full.startswith(upto)):
                    return Skipped("template_mismatch", column,
                                   f"rendering the first {i + 1} messages is not a prefix of the whole conversation")
                spans.append((len(before), len(upto)))
        except Exception as e:  # a template may raise anything (jinja errors, its own raise_exception)
            return Skipped("template_mismatch", column, f"the chat template failed: {e.__class__.__name__}: {e}")
        if not spans:
            return Skipped("no_assistant", column)
        ids, offsets = self._encode(full, False)
        starts = np.array([s for s, _ in offsets], dtype=np.int64)
        ends = np.array([e for _, e in offsets], dtype=np.int64)
        in_assistant = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:  # a token is the assistant's if it overlaps the turn's characters
            in_assistant |= (ends > lo) & (starts < hi)
        kept = min(len(ids), self.spec.max_length)
        targets = np.flatnonzero(in_assistant[1:kept]) + 1  # token j is predicted at t = j - 1
        if len(targets) == 0:
            return Skipped("no_supervised", column)
        text = json.dumps(messages, ensure_ascii=False)
        return Encoded(ids[:kept], (targets - 1).astype(np.int32), {"messages": text}, kept < len(ids))

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _check_messages(messages) -> str | None:
    """A description of what is wrong with a chat row, or None."""
    if not isinstance(messages, (list, tuple)):
        return f"expected a list of messages, got {type(messages).__name__}"
    if not messages:
        return "empty"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} is not a {{'role': str, 'content': str}} mapping"
    return None


def _cut(text: str, offsets: list[tuple[int, int]], n: int) -> str:
    """The prefix of `text` covered by its first `n` tokens."""
    return text[: offsets[n - 1][1]] if n > 0 else ""


# --- loading ---------------------------------------------------------------------------------


def load_rows(data: str, *, split: str | None = None, config_name: str | None = None):
    """Load DATA as a `datasets.Dataset` and describe it.

    DATA is, in this order: a `save_to_disk` folder (a Dataset, or a DatasetDict with `split`);
    a local .jsonl/.json/.parquet/.arrow file, or a folder of such files (one kind; split names
    come from file names as in `datasets.load_dataset(folder)`, e.g. `data/test-*.parquet`; all
    files are "train" otherwise); else a hub dataset id. `split` defaults to "train"; slices
    such as "train[:1000]" work for files and hub datasets.

    Returns:
        (dataset, info), info being the index's `dataset` section: source, split, loader,
        num_rows and fingerprint. The fingerprint is a sha256 of the files' bytes for local
        files (so a copy elsewhere has the same one), the saved `_fingerprint` for
        `save_to_disk` folders, and datasets' `_fingerprint` (which follows the hub revision)
        for hub datasets.

    Raises:
        ConfigError: the path does not exist, holds no data files, mixes kinds, names an unknown
            split, or the hub dataset cannot be loaded.
    """
    import datasets

    path = Path(os.path.expanduser(data))
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split is None and len(loaded) == 1:
                split = next(iter(loaded))
            if split not in loaded:
                raise ConfigError(f"--data {data}: split {split!r} not found; it has {sorted(loaded)} (use --split)")
            ds = loaded[split]
        else:
            if split is not None:
                raise ConfigError(f"--data {data}: a saved Dataset has no splits; drop --split {split}")
            ds = loaded
        info = {"loader": "save_to_disk", "fingerprint": ds._fingerprint}
    elif path.exists():
        files = _data_files(path, data)
        if path.is_dir():
            # datasets' own rules pick each split's files (e.g. data/train-*.parquet vs data/test-*.parquet).
            by_split = {str(k): v for k, v in datasets.load_dataset_builder(str(path)).config.data_files.items()}
            base = (split or "train").split("[")[0]
            if base not in by_split:
                raise ConfigError(f"--data {data}: split {base!r} not found; its files form {sorted(by_split)}")
            files = [Path(f) for f in by_split[base]]
            source = str(path)
        else:
            source = _FILE_BUILDERS[path.suffix]
        try:
            ds = datasets.load_dataset(source, data_files=None if path.is_dir() else [str(path)],
                                       split=split or "train")
        except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as e:
            raise unreadable_files(data, files, e) from None
        info = {"loader": f"files:{_FILE_BUILDERS[files[0].suffix]}", "fingerprint": _hash_files(files, path)}
    elif _looks_like_path(data):
        raise ConfigError(f"--data {data}: no such file or folder")
    else:
        try:
            ds = datasets.load_dataset(data, config_name, split=split or "train")
        except Exception as e:  # network, auth, unknown id, offline mode: all mean "cannot load"
            raise ConfigError(f"--data {data}: not a local path, and loading it as a hub dataset failed "
                              f"({e.__class__.__name__}: {e})") from None
        info = {"loader": "hub", "fingerprint": ds._fingerprint}
    if len(ds) == 0:
        raise InvalidDataError(f"--data {data}{f' --split {split}' if split else ''}: no rows")
    info = {"source": str(data), "split": split, "config_name": config_name, "num_rows": len(ds), **info}
    return ds, info


def unreadable_files(data: str, files: list[Path], error: BaseException) -> LogitCacheError:
    """Say which file (and for JSON lines, which line) `datasets` failed on, and why.

    `datasets` reports "An error occurred while generating the dataset" (or a bare StopIteration
    for an empty JSON file, or "Value is too big!"); the cause is found again here, cheaply, by
    reading the files. A ValueError with no such cause (an unknown split) stays a ConfigError."""
    for f in files:
        problem = _file_problem(f)
        if problem:
            return InvalidDataError(f"--data {data}: {f} {problem}")
    if isinstance(error, ValueError):
        return ConfigError(f"--data {data}: {error}")
    cause = error.__cause__ or error.__context__ or error
    return InvalidDataError(f"--data {data}: cannot read the rows ({type(cause).__name__}: {cause}); check that each "
                            f"field has one type in every row")


def _file_problem(f: Path) -> str | None:
    if f.stat().st_size == 0:
        return "is empty (no rows)"
    if f.suffix != ".jsonl":
        return None
    with open(f, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number}: not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON object"
            if not isinstance(row, dict):
                return f"line {number}: a JSON {type(row).__name__}; each line must be one JSON object"
            for key, value in row.items():
                if isinstance(value, int) and not -(2**63) <= value < 2**63:
                    return f"line {number}: field {key!r}: the number {value} does not fit in 64 bits"
    return None


def _data_files(path: Path, data: str) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        files = [p for p in files if p.suffix in _FILE_BUILDERS]
    if not files:
        raise ConfigError(f"--data {data}: no {'/'.join(_FILE_BUILDERS)} files found")
    unknown = [f for f in files if f.suffix not in _FILE_BUILDERS]
    if unknown:
        raise ConfigError(f"--data {data}: {unknown[0].name} is not one of {', '.join(_FILE_BUILDERS)}")
    builders = {_FILE_BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise ConfigError(f"--data {data}: mixes file kinds {sorted(builders)}; point it at one kind")
    return files


def _hash_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        content = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                content.update(block)
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        h.update(f"{rel}\0{content.hexdigest()}\n".encode())
    return h.hexdigest()


def _looks_like_path(data: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else (absolute, relative, ~, a file suffix,
    # more than one slash) was meant as a local path.
    return data.startswith((".", "/", "~")) or data.count("/") > 1 or Path(data).suffix in _FILE_BUILDERS
