"""The one door for stage two's data: it opens what training or evaluation reads and refuses what does not fit.

    data = open_training_data(("cache/",), data=None, weights=None, plan=plan, teacher=None, reader=reader,
                              seed=0, window=2, epochs=1, rank=0, world_size=1)
    data.stream, data.cache, data.sample_temperature     # ShardedStream, the run's cache record, draws' T
    source = eval_cache_source("heldout_cache/", reader=reader, flag="--eval-cache")   # same tokenizer only
    source = jsonl_source("heldout.jsonl", reader=reader)

Training reads one of four things, chosen here and nowhere else:
- a **mixture** (`--cache A B`): caches that can feed one loss together (`check_mixable`), each with
  the student's tokenizer, interleaved by weight (`mixing.MixedStream`);
- **one cache, same tokenizer**: the cached ids are student ids (`alignment.SameTokenizerTargets`);
- **one cache re-tokenized**: a student with another tokenizer and a loss that allows it (ULD)
  re-tokenizes the cache's text, or `--data` (`alignment.CrossTokenizerTargets`);
- **jsonl** (`--loss sft` without a cache): text rows (`alignment.TextExample`).
Every cache is opened once, here, and checked against the teacher named by --teacher, the loss
(`checks.check_loss_fits_cache`) and the student's tokenizer (`checks.check_tokenizer`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from logitcache.stages.train.alignment import CrossTokenizerTargets, SameTokenizerTargets, TextExample
from logitcache.stages.train.checks import check_cache_teacher, check_loss_fits_cache, check_tokenizer
from logitcache.stages.train.data import CacheSource, JsonlSource, ShardedStream
from logitcache.stages.train.loss_settings import LossPlan
from logitcache.stages.train.mixing import MixedStream
from logitcache.storage import open_cache
from logitcache.storage.errors import ConfigError
from logitcache.storage.redact import redact_text, redact_url

__all__ = ["Reader", "TrainingData", "open_training_data", "eval_cache_source", "jsonl_source", "check_mixable",
           "draw_temperature"]


@dataclass(frozen=True)
class Reader:
    """Who reads the data: the student's name (for messages), tokenizer, logits columns and truncation.

    Attributes:
        student: the --student (or --model) value. tokenizer: its tokenizer.
        vocab: the logits columns training uses (`checks.student_vocab_size`).
        max_length: truncate sequences to this many tokens (None: no limit).
        storage_options: fsspec options for cache and data URLs.
    """

    student: str
    tokenizer: object
    vocab: int
    max_length: int | None
    storage_options: dict | None = None


@dataclass(frozen=True)
class TrainingData:
    """What training reads.

    Attributes:
        stream: the training items, split by rank (a `MixedStream` for a mixture).
        cache: logitcache_train.json's record of the cache(s) read; None for jsonl.
        sample_temperature: the temperature a sample-mode cache was drawn at (None: topk or jsonl).
    """

    stream: ShardedStream
    cache: dict | None
    sample_temperature: float | None


def open_training_data(caches: Sequence[str], *, data: str | None, weights: Sequence[float] | None, plan: LossPlan,
                       teacher: str | None, reader: Reader, seed: int, window: int, epochs: int | None, rank: int,
                       world_size: int) -> TrainingData:
    """Open the training data (module docstring) and split it by rank.

    Args:
        caches: the --cache URLs (none: train from `data`, a jsonl). data: --data (a jsonl, or the
            text one cache re-tokenizes; `TrainSettings.check` refuses it beside a mixture).
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
        return TrainingData(ShardedStream(jsonl_source(data, reader=reader), epochs=epochs, **layout), None, None)
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
    if same:
        to_item = SameTokenizerTargets(reader.vocab, max_length=reader.max_length, keep_k=plan.keep_k)
    else:
        to_item = _retokenized(index, data, reader=reader, keep_k=plan.keep_k)
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
    return CacheSource(cache, to_item=SameTokenizerTargets(reader.vocab, max_length=reader.max_length))


def jsonl_source(path: str, *, reader: Reader) -> JsonlSource:
    """Text rows of a jsonl ('messages', 'text' or 'prompt'/'response'), tokenized by the student's tokenizer."""
    return JsonlSource(path, to_item=TextExample(reader.tokenizer, max_length=reader.max_length, where=path),
                       storage_options=reader.storage_options)


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


def _retokenized(index: dict, data: str | None, *, reader: Reader, keep_k: int | None) -> CrossTokenizerTargets:
    """Targets for a student with another tokenizer: the cache's own text (what the teacher saw, cut where
    stage one truncated) re-tokenized, else the rows of --data it was made from."""
    from logitcache.storage.inputs import STORED_FIELDS

    fields = STORED_FIELDS[index["inputs"]["kind"]]  # validated when the index was read
    cached_text = set(fields) <= set(index.get("text_fields", []))
    if not cached_text and data is None:
        raise ConfigError(f"the cache stores no {'/'.join(fields)} text for a student with another tokenizer to "
                          f"re-tokenize; give the source data as --data")
    if cached_text and data:
        print(redact_text(f"train: the cache stores the {'/'.join(fields)} text; re-tokenizing that, not --data "
                          f"{data}"), file=sys.stderr, flush=True)
    return CrossTokenizerTargets(reader.tokenizer, fields=fields, max_length=reader.max_length, keep_k=keep_k,
                                 texts=None if cached_text else _rows_by_index(data, index),
                                 prompt_format=index["inputs"].get("prompt_format", "plain"))


def _rows_by_index(path: str, index: dict) -> dict[int, dict]:
    """Rows of the jsonl the cache was made from, by row number, under the cache's stored field names."""
    from logitcache.storage.inputs import STORED_FIELDS

    columns = index["inputs"].get("columns") or {}
    names = (*STORED_FIELDS[index["inputs"]["kind"]], *(("tools",) if "tools" in columns else ()))
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[len(rows)] = {name: row.get(columns.get(name, name)) for name in names}
    return rows


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
