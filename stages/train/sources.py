"""The one door for stage two's data: it opens what training or evaluation reads and refuses what does not fit.

    data = open_training_data(("cache/",), data=None, weights=None, plan=plan, teacher=None, reader=reader,
                              seed=0, window=2, epochs=1, rank=0, world_size=1)
    data.stream, data.cache, data.sample_temperature     # ShardedStream, the run's cache record, draws' T
    source = eval_cache_source("heldout_cache/", reader=reader, flag="--eval-cache")   # same tokenizer only
    source = rows_source("s3://bucket/heldout/", reader=reader, rows=DataOptions(split="test"))

Training reads one of four things, chosen here and nowhere else:
- a **mixture** (`--cache A B`): caches that can feed one loss together (`check_mixable`), each with
  the student's tokenizer, interleaved by weight (`mixing.MixedStream`);
- **one cache, same tokenizer**: the cached ids are student ids (`alignment.SameTokenizerTargets`);
- **one cache re-tokenized**: a student with another tokenizer and a loss that allows it (ULD)
  re-tokenizes the cache's text, or `--data` (`alignment.CrossTokenizerTargets`);
- **rows of --data** (`--loss sft` without a cache): what `precompute --data` takes (a file or folder,
  local or any fsspec URL, a save_to_disk folder, a hub id; `storage.rows.load_rows`), read by the
  field flags or by the stored names 'messages' / 'prompt'+'response' / 'text' (`alignment.TextExample`).
Every cache is opened once, here, and checked against the teacher named by --teacher, the loss
(`checks.check_loss_fits_cache`) and the student's tokenizer (`checks.check_tokenizer`).

Chats are rendered with the student's tokenizer and `Reader.chat` (--chat-template, --chat-template-kwargs).
A cache records the options its teacher rendered with (`ChatOptions.from_index`):
- read with the teacher's tokenizer, its token ids are used as they are, so given options must be the
  recorded ones (`check_rendering`);
- re-tokenized for another tokenizer, its chats are rendered with the student's own template (a
  recorded template file was written for the teacher's special tokens) or --chat-template, and with the
  recorded template variables, given ones replacing them key by key: a cache made with
  enable_thinking=false trains the student without thinking too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from logitcache.stages.train.alignment import CrossTokenizerTargets, SameTokenizerTargets, TextExample
from logitcache.stages.train.checks import check_cache_teacher, check_loss_fits_cache, check_tokenizer
from logitcache.stages.train.data import CacheSource, RowsSource, ShardedStream
from logitcache.stages.train.loss_settings import LossPlan
from logitcache.stages.train.mixing import MixedStream
from logitcache.storage import open_cache
from logitcache.storage.errors import ConfigError
from logitcache.storage.inputs import ChatOptions, InputSpec
from logitcache.storage.redact import redact_text, redact_url

__all__ = ["Reader", "DataOptions", "TrainingData", "open_training_data", "eval_cache_source", "rows_source",
           "check_rendering", "check_mixable", "draw_temperature"]


@dataclass(frozen=True)
class Reader:
    """Who reads the data: the student's name (for messages), tokenizer, logits columns and truncation.

    Attributes:
        student: the --student (or --model) value. tokenizer: its tokenizer.
        vocab: the logits columns training uses (`checks.student_vocab_size`).
        max_length: truncate sequences to this many tokens (None: no limit).
        storage_options: fsspec options for cache and data URLs.
        chat: the chat template and template variables given for the student's rendering (module docstring).
        prompt_format: --prompt-format as given (None: "plain" for --data, a cache's own for a cache).
    """

    student: str
    tokenizer: object
    vocab: int
    max_length: int | None
    storage_options: dict | None = None
    chat: ChatOptions = ChatOptions()
    prompt_format: str | None = None


@dataclass(frozen=True)
class DataOptions:
    """How --data (and --eval-data) are loaded: `storage.rows.load_rows`'s arguments, and the field flags.

    Attributes:
        split, config_name, revision, streaming, max_rows: as `precompute --data` takes them.
        fields: {"text_field": ..., "prompt_field": ..., ...} as `InputSpec.build` takes them; empty: each
            row's stored names ('messages', 'prompt'/'response', 'text') decide.
    """

    split: str | None = None
    config_name: str | None = None
    revision: str | None = None
    streaming: bool = False
    max_rows: int | None = None
    fields: dict = field(default_factory=dict)

    def spec(self, reader: Reader) -> InputSpec | None:
        """The input rule the field flags give (None without them).

        Raises:
            ConfigError: as `InputSpec.build` (several kinds, chat options for plain text, ...).
        """
        fields = {k: v for k, v in self.fields.items() if v}
        if not fields:
            return None
        return InputSpec.build(**fields, prompt_format=reader.prompt_format or "plain", max_length=reader.max_length,
                               chat=reader.chat)


@dataclass(frozen=True)
class TrainingData:
    """What training reads.

    Attributes:
        stream: the training items, split by rank (a `MixedStream` for a mixture).
        cache: logitcache_train.json's record of the cache(s) read; None for --data rows.
        sample_temperature: the temperature a sample-mode cache was drawn at (None: topk or jsonl).
    """

    stream: ShardedStream
    cache: dict | None
    sample_temperature: float | None


def open_training_data(caches: Sequence[str], *, data: str | None, weights: Sequence[float] | None, plan: LossPlan,
                       teacher: str | None, reader: Reader, seed: int, window: int, epochs: int | None, rank: int,
                       world_size: int, rows: DataOptions = DataOptions()) -> TrainingData:
    """Open the training data (module docstring) and split it by rank.

    Args:
        caches: the --cache URLs (none: train from `data`). data: --data (rows to train on, or the
            text one cache re-tokenizes; `TrainSettings.check` refuses it beside a mixture), loaded
            by `rows`.
        weights: --cache-weights, for a mixture. plan: the run's loss. teacher: --teacher (None: any).
        seed, window, epochs, rank, world_size: as for `ShardedStream`.

    Raises:
        ConfigError: a cache that does not fit the loss, the teacher or the student (see the checks),
            caches that cannot be mixed, or --data beside a cache with the student's tokenizer.
    """
    layout = dict(seed=seed, window=window, rank=rank, world_size=world_size)
    if len(caches) > 1:
        return _mixture(caches, weights=weights, plan=plan, teacher=teacher, reader=reader, **layout)
    if not caches:
        return TrainingData(ShardedStream(rows_source(data, reader=reader, rows=rows), epochs=epochs, **layout),
                            None, None)
    url, = caches
    cache = open_cache(url, storage_options=reader.storage_options)
    index = cache.index
    _check(index, url, plan=plan, teacher=teacher)
    has_text = data is not None or bool(index.get("text_fields"))
    same = check_tokenizer(index, reader.tokenizer, needs_same_tokenizer=plan.loss.needs_teacher_tokenizer,
                           student=reader.student, cache=url, read_by=f"--loss {plan.name}",
                           advice=_uld_advice(has_text), teacher_tokenizer=_local_tokenizer(index, reader))
    if same and data is not None:
        raise ConfigError("--data is read for --loss sft without a cache, or as the text a student with another "
                          "tokenizer re-tokenizes; this student shares the cache's tokenizer, so drop --data")
    check_rendering(index, reader, cache=url, same_tokenizer=same)
    if same:
        to_item = SameTokenizerTargets(reader.vocab, max_length=reader.max_length, keep_k=plan.keep_k)
    else:
        to_item = _retokenized(index, data, reader=reader, keep_k=plan.keep_k, rows=rows)
    record = {"url": url, "fingerprint": cache.fingerprint, "teacher": index["teacher"], "mode": cache.mode,
              "k": cache.k, "sequences": len(cache), "same_tokenizer": same}
    stream = ShardedStream(CacheSource(cache, to_item=to_item), epochs=epochs, **layout)
    return TrainingData(stream, record, draw_temperature(index))


def eval_cache_source(url: str, *, reader: Reader, flag: str) -> CacheSource:
    """A held-out cache for evaluation (teacher agreement, kd_loss): opened, its tokenizer the student's.

    Raises:
        ConfigError: its ids mean other tokens to the student (agreement compares token ids).
    """
    cache = open_cache(url, storage_options=reader.storage_options)
    check_tokenizer(cache.index, reader.tokenizer, needs_same_tokenizer=True, student=reader.student, cache=url,
                    read_by=flag, advice="Teacher agreement and kd_loss compare token ids: evaluate on a cache made "
                    "with the student's tokenizer.")
    check_rendering(cache.index, reader, cache=url, same_tokenizer=True)
    return CacheSource(cache, to_item=SameTokenizerTargets(reader.vocab, max_length=reader.max_length))


def rows_source(data: str, *, reader: Reader, rows: DataOptions = DataOptions()) -> RowsSource:
    """The rows of --data (what `precompute --data` takes), tokenized by the student's tokenizer: by the
    field flags, or by each row's 'messages', 'prompt'/'response' or 'text'.

    Raises:
        ConfigError: DATA cannot be loaded (`load_rows`), a field flag names a column it lacks, or the
            field flags do not make one input kind.
    """
    from logitcache.storage.rows import load_rows

    spec = rows.spec(reader)  # refused before anything is read
    loaded, _ = load_rows(data, split=rows.split, config_name=rows.config_name, revision=rows.revision,
                          storage_options=reader.storage_options, streaming=rows.streaming, max_rows=rows.max_rows)
    if spec is not None:
        absent = [c for c in spec.columns.values() if c not in loaded.column_names]
        if absent:
            raise ConfigError(f"--data {redact_url(data)}: column(s) {absent} not found; it has "
                              f"{loaded.column_names}")
        loaded = loaded.select_columns(list(spec.columns.values()))
    to_item = TextExample(reader.tokenizer, max_length=reader.max_length, prompt_format=reader.prompt_format or "plain",
                          chat=reader.chat, spec=spec, where=redact_url(data))
    return RowsSource(loaded, name=data, to_item=to_item)


def check_rendering(index: dict, reader: Reader, *, cache: str, same_tokenizer: bool) -> None:
    """Refuse rendering options that cannot apply to a cache (module docstring).

    Raises:
        ConfigError: --prompt-format other than the cache's; with the teacher's tokenizer, a
            --chat-template or --chat-template-kwargs value other than the cache's (its ids are final).
    """
    inputs = index["inputs"]
    recorded_format = inputs.get("prompt_format", "plain")
    if reader.prompt_format is not None and inputs["kind"] == "prompt_response" \
            and reader.prompt_format != recorded_format:
        raise ConfigError(f"--prompt-format {reader.prompt_format}: the cache {cache} was written with --prompt-format "
                          f"{recorded_format}, which decides its supervised positions; drop --prompt-format")
    if not same_tokenizer:
        return
    recorded, given = ChatOptions.from_index(inputs), reader.chat
    differs = []
    if given.template is not None and given.template != recorded.template:
        was = "another file" if recorded.template else "the tokenizer's own template"
        differs.append(f"--chat-template (the cache: {was})")
    for key, value in given.kwargs.items():
        if key not in recorded.kwargs or recorded.kwargs[key] != value:
            was = repr(recorded.kwargs[key]) if key in recorded.kwargs else "not set"
            differs.append(f"{key}={value!r} (the cache: {was})")
    if differs:
        raise ConfigError(f"the cache {cache} holds token ids its teacher rendered, which a student with the same "
                          f"tokenizer trains on as they are; the chat options given differ from the cache's: "
                          f"{', '.join(differs)}. Drop them, or precompute a cache with them")


# ---- one cache ----------------------------------------------------------------------------------------

def _check(index: dict, url: str, *, plan: LossPlan, teacher: str | None) -> None:
    """Refuse a cache made by another teacher than --teacher (when given), or one the loss cannot read."""
    check_cache_teacher(index, teacher, cache=url)
    check_loss_fits_cache(index, plan, cache=url)


def draw_temperature(index: dict) -> float | None:
    """The temperature a sample-mode cache's ids were drawn at (a fact of the cache), or None."""
    sparsification = index["sparsification"]
    return float(sparsification.get("temperature", 1.0)) if sparsification["mode"] == "sample" else None


def _uld_advice(has_text: bool) -> str:
    if has_text:
        return "For a student with another tokenizer use --loss uld (it re-tokenizes the cached text)."
    return ("A student with another tokenizer needs --loss uld, which re-tokenizes the text: this cache stores none, "
            "so give the source data as --data.")


def _retokenized(index: dict, data: str | None, *, reader: Reader, keep_k: int | None,
                 rows: DataOptions) -> CrossTokenizerTargets:
    """Targets for a student with another tokenizer: the cache's own text (what the teacher saw, cut where
    stage one truncated) re-tokenized, else the rows of --data it was made from. Chats are rendered with
    the student's template (or --chat-template) and the cache's template variables, given ones winning."""
    from logitcache.storage.inputs import STORED_FIELDS

    fields = STORED_FIELDS[index["inputs"]["kind"]]  # validated when the index was read
    cached_text = set(fields) <= set(index.get("text_fields", []))
    if not cached_text and data is None:
        raise ConfigError(f"the cache stores no {'/'.join(fields)} text for a student with another tokenizer to "
                          f"re-tokenize; give the source data as --data")
    if cached_text and data:
        print(redact_text(f"train: the cache stores the {'/'.join(fields)} text; re-tokenizing that, not --data "
                          f"{data}"), file=sys.stderr, flush=True)
    recorded = ChatOptions.from_index(index["inputs"])
    chat = ChatOptions(reader.chat.template, {**recorded.kwargs, **reader.chat.kwargs})
    return CrossTokenizerTargets(reader.tokenizer, fields=fields, max_length=reader.max_length, keep_k=keep_k,
                                 texts=None if cached_text else _rows_by_index(data, index, reader=reader, rows=rows),
                                 prompt_format=index["inputs"].get("prompt_format", "plain"), chat=chat)


def _rows_by_index(data: str, index: dict, *, reader: Reader, rows: DataOptions) -> dict[int, dict]:
    """Rows of the DATA the cache was made from (loaded as --data is, so give the --split the cache was made
    from), by row number, under the cache's stored field names; the field flags name the source columns,
    else the cache's index does."""
    from logitcache.storage.inputs import STORED_FIELDS
    from logitcache.storage.rows import load_rows

    columns = dict(index["inputs"].get("columns") or {})
    spec = rows.spec(reader)
    if spec is not None:
        columns = dict(spec.columns)
    names = (*STORED_FIELDS[index["inputs"]["kind"]], *(("tools",) if "tools" in columns else ()))
    loaded, _ = load_rows(data, split=rows.split, config_name=rows.config_name, revision=rows.revision,
                          storage_options=reader.storage_options, streaming=rows.streaming, max_rows=rows.max_rows)
    block = loaded[0:len(loaded)]
    return {i: {name: (block.get(columns.get(name, name)) or [None] * len(loaded))[i] for name in names}
            for i in range(len(loaded))}


def _local_tokenizer(index: dict, reader: Reader):
    """The teacher's tokenizer when its folder is here (exact ids in refusals); never fetched from a hub."""
    path = index["teacher"].get("name_or_path")
    if not path or not os.path.isdir(path):
        return None
    from transformers import AutoTokenizer

    try:
        # The folder is named by the cache, not by the user: --trust-remote-code (given for the student) does
        # not reach it.
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        return None


# ---- a mixture ----------------------------------------------------------------------------------------

def _mixture(urls: Sequence[str], *, weights: Sequence[float] | None, plan: LossPlan, teacher: str | None,
             reader: Reader, seed: int, window: int, rank: int, world_size: int) -> TrainingData:
    """Open `urls`, refuse what cannot be mixed (`check_mixable`, then each cache against the loss and the
    student, as for one cache), and build the `MixedStream` (see `mixing`)."""
    urls = list(urls)
    if len(set(urls)) != len(urls):
        raise ConfigError(f"--cache names the same cache twice ({', '.join(urls)}); give it once with a larger "
                          f"--cache-weights value")
    caches = [open_cache(url, storage_options=reader.storage_options) for url in urls]
    check_mixable({url: c.index for url, c in zip(urls, caches)}, keep_k=plan.keep_k)
    for url, cache in zip(urls, caches):
        check_rendering(cache.index, reader, cache=url, same_tokenizer=True)
    targets = SameTokenizerTargets(reader.vocab, max_length=reader.max_length, keep_k=plan.keep_k)
    streams = []
    for url, cache in zip(urls, caches):
        _check(cache.index, url, plan=plan, teacher=teacher)
        check_tokenizer(cache.index, reader.tokenizer, needs_same_tokenizer=True, student=reader.student, cache=url,
                        read_by=f"--loss {plan.name} on a mixture of caches",
                        advice=f"A student with another tokenizer (--loss {plan.name}) trains from one cache at a "
                               f"time.")
        streams.append(ShardedStream(CacheSource(cache, to_item=targets), seed=seed, window=window, epochs=None,
                                     rank=rank, world_size=world_size))
    names = [redact_url(u) for u in urls]  # saved in checkpoints: no credentials
    stream = MixedStream(streams, weights=weights, seed=seed, names=names)
    record = {"mixture": [{"url": url, "probability": p, "fingerprint": c.fingerprint, "teacher": c.index["teacher"],
                           "mode": c.mode, "k": c.k, "sequences": len(c)}
                          for url, c, p in zip(urls, caches, stream.probabilities)],
              "same_tokenizer": True}
    return TrainingData(stream, record, draw_temperature(caches[0].index))


def check_mixable(indexes: dict[str, dict], *, keep_k: int | None) -> None:
    """Refuse caches that cannot feed one loss together; the message names the two caches and the difference.

    Args:
        indexes: {cache name (URL): its index}, in --cache order.
        keep_k: the first k ids kept of every row (`--top-k` for losses that cut the cached ids), or None.

    Raises:
        ConfigError: different teacher vocabularies (ids that mean other tokens), modes, K (unless
            `keep_k` cuts every cache to one k) or sampling temperatures.
    """
    (first, a), *rest = indexes.items()
    for other, b in rest:
        pair = f"--cache {first} and --cache {other} cannot be mixed"
        problem = _vocabulary_difference(a["tokenizer"], b["tokenizer"])
        if problem:
            raise ConfigError(f"{pair}: their teachers' token ids differ ({problem}); mixed caches must share one "
                              f"vocabulary, since the loss reads every cached id as the same student token")
        sa, sb = a["sparsification"], b["sparsification"]
        if sa["mode"] != sb["mode"]:
            raise ConfigError(f"{pair}: {first} is a {sa['mode']}-mode cache and {other} a {sb['mode']}-mode cache; "
                              f"a loss reads one kind of target (mix caches of one --mode)")
        if sa["k"] != sb["k"] and keep_k is None:
            hint = (f"; give --top-k {min(sa['k'], sb['k'])} to use the top-{min(sa['k'], sb['k'])} of each"
                    if sa["mode"] == "topk" else "")
            raise ConfigError(f"{pair}: {first} stores K = {sa['k']} ids per position and {other} K = {sb['k']}; "
                              f"a batch holds one K{hint}")
        ta, tb = sa.get("temperature", 1.0), sb.get("temperature", 1.0)
        if sa["mode"] == "sample" and ta != tb:
            raise ConfigError(f"{pair}: {first} was sampled at temperature {ta} and {other} at {tb}; the loss "
                              f"corrects for one sampling temperature")


def _vocabulary_difference(a: dict, b: dict) -> str | None:
    """How two caches' `tokenizer` sections disagree on what ids mean, or None."""
    if a.get("vocab_size") != b.get("vocab_size"):
        return f"{a.get('vocab_size')} vs {b.get('vocab_size')} token ids"
    if "vocab_blocks" in a and "vocab_blocks" in b:
        from logitcache.storage.fingerprint import VOCAB_BLOCK

        for block, (x, y) in enumerate(zip(a["vocab_blocks"], b["vocab_blocks"])):
            if x != y:
                lo = block * VOCAB_BLOCK
                return f"ids {lo}..{min(lo + VOCAB_BLOCK, a['vocab_size']) - 1} do not all mean the same tokens"
        for i, token in a.get("added_tokens", {}).items():
            if b.get("added_tokens", {}).get(i, token) != token:
                return f"id {i} is {token!r} in one and {b['added_tokens'][i]!r} in the other"
        return None
    if a.get("fingerprint") != b.get("fingerprint"):
        return "an older index records only the tokenizer fingerprint, and the two differ"
    return None
